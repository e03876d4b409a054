"""Host memory while loading a checkpoint in 4-bit: does the loader stream, or hold the 16-bit model?

Writes a random bf16 Llama checkpoint in two safetensors shards (default about 1 GB, Llama-2-7B's layer
shapes scaled down), then loads it with `load_model(bits=4, dtype=bfloat16)` on the CPU in a fresh process
while a thread samples /proc/self/status every 5 ms. Reports the peak resident memory above the baseline
after imports (anonymous + shared + file-backed; the loader reads each tensor into an anonymous shared
mapping of its own), and each part's own peak, next to the shard sizes and the size of the loaded model.

    python bench/loader_memory.py [--dir /tmp/loader-mem] [--layers 8]
"""
import argparse
import json
import subprocess
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def status_kib(*keys):
    out = {}
    for line in Path("/proc/self/status").read_text().splitlines():
        k, _, v = line.partition(":")
        if k in keys:
            out[k] = int(v.split()[0])
    return out


def make(folder: Path, layers: int):
    import torch
    from minqlora.config import LlamaConfig
    from minqlora.loader import save_checkpoint
    from minqlora.model import LlamaForCausalLM
    if (folder / "config.json").exists():
        return
    cfg = LlamaConfig(hidden_size=2048, intermediate_size=5504, num_hidden_layers=layers,
                      num_attention_heads=16, vocab_size=32000, torch_dtype="bfloat16")
    torch.manual_seed(0)
    with torch.device("meta"):
        shapes = {k: v.shape for k, v in LlamaForCausalLM(cfg).state_dict().items()}
    sd = {k: torch.randn(s, dtype=torch.bfloat16) * 0.02 for k, s in shapes.items()}
    total = sum(t.numel() * 2 for t in sd.values())
    save_checkpoint(sd, cfg, folder, max_shard_bytes=int(total * 0.74))  # two shards, 3:1 like Taiwan-LLM's


def measure(folder: Path):
    import torch
    from minqlora.loader import load_model
    keys = ("RssAnon", "RssFile", "RssShmem")
    base = status_kib(*keys)
    base["total"] = sum(base.values())
    peak = dict(base)
    stop = False

    def sample():
        while not stop:
            now = status_kib(*keys)
            now["total"] = sum(now.values())
            for k, v in now.items():
                peak[k] = max(peak[k], v)
            time.sleep(0.005)

    t = threading.Thread(target=sample)
    t.start()
    start = time.time()
    model = load_model(folder, bits=4, dtype=torch.bfloat16, progress=False)
    seconds = time.time() - start
    stop = True
    t.join()
    model_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    model_bytes += sum(m.weight.quant_state.absmax.numel() * m.weight.quant_state.absmax.element_size()
                       for m in model.modules() if hasattr(m, "quant_state"))
    mib = 1024
    print(json.dumps({
        "shards_mib": sorted(round(f.stat().st_size / 2**20) for f in folder.glob("*.safetensors")),
        "model_4bit_mib": round(model_bytes / 2**20),
        "peak_resident_above_base_mib": round((peak["total"] - base["total"]) / mib),
        "peak_anon_above_base_mib": round((peak["RssAnon"] - base["RssAnon"]) / mib),
        "peak_file_mapped_above_base_mib": round((peak["RssFile"] - base["RssFile"]) / mib),
        "peak_shmem_above_base_mib": round((peak["RssShmem"] - base["RssShmem"]) / mib),
        "load_seconds": round(seconds, 1)}))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--dir", default="/tmp/loader-mem")
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--measure", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    folder = Path(args.dir)
    if args.measure:
        return measure(folder)
    make(folder, args.layers)
    subprocess.run([sys.executable, __file__, "--dir", str(folder), "--measure"], check=True)


if __name__ == "__main__":
    main()
