"""Decode-step probe (bench/NOTES.md, attempt 10): for each set of inductor options behind
generate.py's decode="compile", the first call's time (compilation), steady greedy tokens/s, the greedy
gate (first 32 tokens against the CUDA-graph path, which equals the plain path bit for bit), and what one
decode step launches on the GPU (kernels and their summed time, torch.profiler, outside any CUDA graph).

    python bench/decode_probe.py --ckpt /tmp/llama2-7b-random --out OUT_DIR
"""
import argparse
import json
import sys
import time
from collections import Counter
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
from torch.autograd import DeviceType  # noqa: E402
from torch.profiler import ProfilerActivity, profile  # noqa: E402

from minqlora import generate  # noqa: E402
from minqlora.generate import generate_ids  # noqa: E402
from minqlora.loader import load_model  # noqa: E402
from minqlora.lora import apply_lora  # noqa: E402
from minqlora.model import KVCache  # noqa: E402

VARIANTS = {"coordinate_descent": {"coordinate_descent_tuning": True}, "default": {}}


def log(**kw):
    print(json.dumps({"impl": "minqlora", "event": "decode_probe", **kw}), flush=True)


def gpu_ops(fn, label, out):
    """(GPU ops launched by one call of fn, their summed time in ms); the top ones written to out."""
    fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as p:
        fn()
        torch.cuda.synchronize()
    ev = [e for e in p.events() if e.device_type == DeviceType.CUDA]
    by_name = Counter()
    for e in ev:
        by_name[e.name[:90]] += e.device_time_total
    with open(out, "a") as f:
        f.write(f"==== {label}: {len(ev)} GPU ops, {sum(by_name.values()) / 1e3:.2f} ms\n")
        f.writelines(f"{us / 1e3:8.3f} ms  {name}\n" for name, us in by_name.most_common(15))
    return len(ev), round(sum(by_name.values()) / 1e3, 2)


@torch.inference_mode()
def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--ckpt", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--variants", default=",".join(VARIANTS), help="which of VARIANTS, in order")
    args = ap.parse_args()
    torch.backends.cuda.matmul.allow_tf32 = True  # as bench_qlora.py
    model = load_model(args.ckpt, bits=4, quant_type="nf4", double_quant=True, dtype=torch.bfloat16,
                       device="cuda", progress=False)
    apply_lora(model, r=64, alpha=16, dropout=0.01, targets="all", verbose=False)
    model.eval()
    prompt = torch.randint(3, 32000, (64,), generator=torch.Generator().manual_seed(2)).tolist()
    run = lambda mode, n: generate_ids(model, [prompt], eos_ids=[], max_new_tokens=n, decode=mode)[0]  # noqa: E731
    ref = run("graph", 32)

    # One static step's inputs, as the Decoder holds them (cache of one bucket, the prompt prefilled).
    cache = KVCache(model.config, 1, generate.CACHE_BUCKET, torch.bfloat16, "cuda")
    model(torch.tensor([prompt], device="cuda"), kv_cache=cache)
    cache.static, cache.slots = True, torch.tensor([64], device="cuda")
    tok, pos = torch.tensor([[5]], device="cuda"), torch.tensor([[64]], device="cuda")
    key_mask = torch.ones(1, generate.CACHE_BUCKET, dtype=torch.long, device="cuda")
    table = Path(args.out) / "decode_ops.txt"
    n, ms = gpu_ops(lambda: generate.model_step(model, cache, tok, pos, key_mask), "eager static step", table)
    log(variant="eager", gpu_ops=n, gpu_ms=ms)
    for name in args.variants.split(","):
        options = VARIANTS[name]
        generate.COMPILE_OPTIONS, generate._compiled = options, None
        torch._dynamo.reset()
        torch.cuda.synchronize()
        t = time.perf_counter()
        first = run("compile", 32)
        torch.cuda.synchronize()
        first_s = time.perf_counter() - t
        run("compile", 4)
        torch.cuda.synchronize()
        t = time.perf_counter()
        new = run("compile", 128)
        torch.cuda.synchronize()
        tps = len(new) / (time.perf_counter() - t)
        step = generate.compiled_step()
        n, ms = gpu_ops(lambda: step(model, cache, tok, pos, key_mask), f"compiled step, {name}", table)
        log(variant=name, first_call_s=round(first_s, 1), tokens_per_s=round(tps, 1), same_first_32=first == ref,
            gpu_ops=n, gpu_ms=ms)


if __name__ == "__main__":
    main()
