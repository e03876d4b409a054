"""Decoding lines of the benchmark (bench_qlora.py's G1 and G1-compile), and a probe of the decode step.

G1: greedy, batch 1, 64-token prompt, 128 new tokens, decode="graph" (the step captured once as a CUDA graph
and kept between calls, as generate() keeps it; its elementwise work in minqlora.fused's kernels, which round
as the plain modules do: bit for bit the plain path; also timed with a capture per call and unfused). G1-compile: the same with decode="compile" (torch.compile over the
step, then a CUDA graph); its first call compiles, and compile_s is that call's time less a steady call's.

Gates, in bf16: the first 32 greedy tokens equal the plain path's. A random 7B's bf16 logits are near-tied so
often (bf16 spacing 1/32 at the top logit) that a rounding change flips a greedy token within 32 steps: compiled
kernels pass only with inductor's emulate_precision_casts (generate.COMPILE_OPTIONS; NOTES.md #10, #14).

The probe (`python bench/bench_decode.py --ckpt CKPT --out DIR`): for each set of inductor options, the
first call's time, steady tokens/s, and what one decode step launches on the GPU (torch.profiler).
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

from minqlora import fused, generate  # noqa: E402
from minqlora.generate import DecodeGraphs, generate_ids  # noqa: E402
from minqlora.loader import load_model  # noqa: E402
from minqlora.lora import LoRALinear, apply_lora  # noqa: E402
from minqlora.model import KVCache, RMSNorm  # noqa: E402
from minqlora.nf4 import Linear4bit  # noqa: E402

# generate.COMPILE_OPTIONS is the first. emulate_precision_casts rounds fused intermediates where eager would:
# on the CPU (a 1-layer bf16 model) that alone made compiled greedy tokens equal eager's (not tried on a GPU).
VARIANTS = {"coordinate_descent": {"coordinate_descent_tuning": True}, "default": {},
            "eager_rounding": {"emulate_precision_casts": True},
            "coordinate_descent_eager_rounding": {"coordinate_descent_tuning": True, "emulate_precision_casts": True}}


def log(**kw):
    print(json.dumps({"impl": "minqlora", **kw}), flush=True)


def sync_time():
    torch.cuda.synchronize()
    return time.perf_counter()


def compute_in(model, dtype):
    """The dtype every weight computes in: the 4-bit layers' matmuls, embeddings, norms, lm_head (LoRA: fp32)."""
    for m in model.modules():
        if isinstance(m, Linear4bit):
            m.compute_dtype = dtype
        elif isinstance(m, (torch.nn.Embedding, RMSNorm)) or m is model.lm_head:
            m.to(dtype)
    torch.backends.cuda.matmul.allow_tf32 = dtype != torch.float32  # fp32 means fp32 for the gate


def first_difference(a, b):
    return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), None)


def g1(model, compiled=True, prompt_len=64, new_tokens=128):
    """G1, and G1-compile if `compiled` (see the module's docstring). Leaves the model in bf16, LoRA B zero."""
    prompt = torch.randint(3, 32000, (prompt_len,), generator=torch.Generator().manual_seed(2)).tolist()
    graphs = {"graph": DecodeGraphs(), "compile": DecodeGraphs()}  # as generate() keeps them, one per mode

    def run(mode, n, keep=True):
        return generate_ids(model, [prompt], eos_ids=[], max_new_tokens=n, decode=mode,
                            graphs=graphs.get(mode) if keep else None)[0]

    plain = run("plain", 32)
    graph = run("graph", 32)
    log(event="gate", line="G1", decode="graph", same_first_32=plain == graph, ok=plain == graph)
    loras = [m for m in model.modules() if isinstance(m, LoRALinear)]
    with torch.no_grad():  # the fused LoRA kernel sees a non-zero low-rank output too (G1 itself: B = 0)
        for m in loras:
            m.lora_B.weight.normal_(0, 0.02, generator=torch.Generator(m.lora_B.weight.device).manual_seed(3))
        same = run("plain", 32) == run("graph", 32, keep=False)
        for m in loras:
            m.lora_B.weight.zero_()
    log(event="gate", line="G1", decode="graph", lora_b="random", same_first_32=same, ok=same)
    if compiled:  # the same gate, bf16 (generate.COMPILE_OPTIONS round as eager does)
        t = sync_time()
        first = run("compile", 32)
        first_s, t = sync_time() - t, sync_time()
        run("compile", 32)
        steady_s = sync_time() - t
        log(event="gate", line="G1-compile", decode="compile", same_first_32=plain == first,
            first_difference=first_difference(plain, first), ok=plain == first)

    def timed(mode, keep=True):
        run(mode, 4, keep)  # twice: a prompt length seen before has its forward captured (Decoder.prefill)
        run(mode, 4, keep)
        t = sync_time()
        return len(run(mode, new_tokens, keep)) / (sync_time() - t)

    out = {mode: timed(mode) for mode in (("graph", "compile") if compiled else ("graph",))}
    # What each piece buys (NOTES.md #22): the graph captured in every call, and the plain modules' kernels.
    per_call = timed("graph", keep=False)
    fused.ALLOWED = False
    graphs["graph"] = DecodeGraphs()
    unfused = timed("graph")
    fused.ALLOWED = True
    log(event="generate", line="G1", decode="graph", new_tokens=new_tokens, tokens_per_s=round(out["graph"], 1),
        tokens_per_s_capture_per_call=round(per_call, 1), tokens_per_s_unfused=round(unfused, 1))
    if compiled:
        log(event="generate", line="G1-compile", decode="compile", new_tokens=new_tokens,
            tokens_per_s=round(out["compile"], 1), first_call_s=round(first_s, 1),
            compile_s=round(first_s - steady_s, 1))


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
def probe():
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
    # One static step's inputs, as the Decoder holds them (a cache of one bucket, the prompt prefilled).
    cache = KVCache(model.config, 1, generate.CACHE_BUCKET, torch.bfloat16, "cuda")
    model(torch.tensor([prompt], device="cuda"), kv_cache=cache)
    cache.static, cache.slots = True, torch.tensor([64], device="cuda")
    tok, pos = torch.tensor([[5]], device="cuda"), torch.tensor([[64]], device="cuda")
    key_mask = torch.ones(1, generate.CACHE_BUCKET, dtype=torch.long, device="cuda")
    table = Path(args.out) / "decode_ops.txt"
    n, ms = gpu_ops(lambda: generate.model_step(model, cache, tok, pos, key_mask), "eager static step", table)
    log(event="decode_probe", variant="eager", gpu_ops=n, gpu_ms=ms)
    for name in args.variants.split(","):
        generate.COMPILE_OPTIONS, generate._compiled = VARIANTS[name], None
        torch._dynamo.reset()
        t = sync_time()
        first = run("compile", 32)
        first_s = sync_time() - t
        run("compile", 4)
        t = sync_time()
        tps = len(run("compile", 128)) / (sync_time() - t)
        step = generate.compiled_step()
        n, ms = gpu_ops(lambda: step(model, cache, tok, pos, key_mask), f"compiled step, {name}", table)
        log(event="decode_probe", variant=name, first_call_s=round(first_s, 1), tokens_per_s=round(tps, 1),
            bf16_same_first_32=first == ref, first_difference=first_difference(first, ref), gpu_ops=n, gpu_ms=ms)


if __name__ == "__main__":
    probe()
