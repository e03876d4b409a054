"""minqlora's side of the peer benchmark (bench/bench.py runs it beside the peer, on the same card).

The same random Llama-2-7B-shaped checkpoint as the peer (`hf_qlora_baseline.py`), NF4 + double quant,
bf16 compute, LoRA r=64 alpha=16 on every linear but lm_head, gradient checkpointing, paged AdamW 32-bit.
Each line is timed with the fast paths on, after a correctness gate that compares them with minqlora's
plain eager path on the same inputs (loss within 1e-2 relative, LoRA-gradient cosine >= 0.999, the first
32 greedy tokens identical). One JSON line per measurement (impl "minqlora").

    T1         micro-batch 1 x 256 x accumulation 16, the step's micro-batches packed into one pass
    T1-strict  the same in 16 batch-1 passes, each replayed from CUDA graphs
    T1-plain   the plain path (batch-1 passes, eager): the speed before the fast paths
    T2         batch 16 x 256 in one pass;  T3 the course's train.json with the seed's flags
    T1/T2/T3-compile  the same with each decoder layer compiled (compiled.py, --torch_compile)
    LINE+lora16  LINE with the LoRA matmuls in bf16 (train.py --lora_in_compute_dtype; weights stay fp32), as
               the peer computes them (qlora.py casts its LoRA layers to bf16)
    E1/E1b     forward 64 x 256 at batch 1 (CUDA graph) / 16;  E2 the course metric over public_test.json
    G1         greedy, 64-token prompt, 128 new tokens, CUDA-graph decode;  G1-compile the same, compiled
    L1         load + quantize
"""
import argparse
import gc
import json
import resource
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import bitsandbytes as bnb  # noqa: E402
import torch  # noqa: E402

from minqlora import accumulate, compiled  # noqa: E402
from minqlora.cudagraph import GraphedForward  # noqa: E402
from minqlora.loader import load_model  # noqa: E402
from minqlora.lora import apply_lora, computing_in, lora_modules  # noqa: E402
from minqlora.optim import build_optimizer  # noqa: E402
from minqlora.perplexity import mean_perplexity, perplexities  # noqa: E402
from minqlora.tokenizer import Tokenizer  # noqa: E402

from bench_decode import g1  # noqa: E402  (this folder: G1 and G1-compile)
from gates import configure, fresh_compile, gate_optimizer, gate_train  # noqa: E402  (this folder)
from workloads import COURSE, PASS_TOKENS, log, random_window, sync_time, t3_windows  # noqa: E402  (this folder)


def train_speed(model, line, g, *, batch, seq, accum, steps, pass_tokens=0, graphs=None, windows=None):
    params = [p for p in model.parameters() if p.requires_grad]
    opt = build_optimizer(params, "paged_adamw_32bit", lr=3e-4)  # as train.py: optim.FlatPagedAdamW
    if "-compile" in line:
        fresh_compile()
    run = configure(model, pass_tokens=pass_tokens, graphs=graphs)
    model.train()
    windows = windows or [random_window(g, batch, seq, accum) for _ in range(steps + 1)]

    def step(win):
        run(win)
        torch.nn.utils.clip_grad_norm_(params, 0.3)
        opt.step()
        opt.zero_grad(set_to_none=True)

    t = sync_time()
    # Warm-up: the first window; a "-compile" line passes over every window once, compiling each new shape
    # (the timing is then the steady state of a long run, which sees a bounded set of shapes).
    for win in windows if "-compile" in line else windows[:1]:
        step(win)
    first_s = sync_time() - t
    torch.cuda.reset_peak_memory_stats()
    t = sync_time()
    for win in windows[1:]:
        step(win)
    dt = sync_time() - t
    toks = sum(int(b["attention_mask"].sum()) for win in windows[1:] for b in win)
    log(event="train", line=line, tokens=toks, opt_steps=len(windows) - 1, tokens_per_s=round(toks / dt, 1),
        s_per_opt_step=round(dt / (len(windows) - 1), 3), peak_gib=round(torch.cuda.max_memory_allocated() / 2**30, 2),
        warmup_s=round(first_s, 1))
    opt = None  # before empty_cache: the closure holds it too
    torch.cuda.empty_cache()


@torch.inference_mode()
def eval_speed(model, line, n, seq, batch):
    model.eval()
    g = torch.Generator(device="cuda").manual_seed(1)
    ids = torch.randint(3, 32000, (n, seq), device="cuda", generator=g)
    forward = GraphedForward(model)  # CUDA graphs up to 2,048 tokens a batch; eager above
    plain = model(ids[:batch])
    graphed = forward(ids[:batch])
    if line == "E1":  # the gate: the graph's logits against the eager forward's, same inputs
        log(event="gate", line="E1", same_argmax=float((plain.argmax(-1) == graphed.argmax(-1)).float().mean()),
            max_abs_diff=float((plain.float() - graphed.float()).abs().max()),
            ok=bool((plain.argmax(-1) == graphed.argmax(-1)).float().mean() >= 0.999))
    t = sync_time()
    for i in range(0, n, batch):
        forward(ids[i:i + batch])
    log(event="eval_forward", line=line, examples=n, batch=batch, examples_per_s=round(n / (sync_time() - t), 2))


def e2(model, tok, records, batch_size):
    prompt = lambda r: COURSE.format(r["instruction"])  # noqa: E731
    perplexities(model, tok, records[:batch_size], prompt, batch_size=batch_size, progress=False)  # warm-up
    t = sync_time()
    ppl = perplexities(model, tok, records, prompt, batch_size=batch_size, progress=False)
    dt = sync_time() - t
    log(event="E2_course_ppl", line="E2", examples=len(records), batch=batch_size,
        examples_per_s=round(len(records) / dt, 2), mean_ppl=mean_perplexity(ppl))


def profile(model, g, folder):
    """torch.profiler tables of one T1-strict micro-batch, one T2 pass and one plain decode step."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as prof
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    model.train()
    cases = {"t1_micro": ({}, random_window(g, 1, 256, 1)),
             "t2_pass": (dict(pass_tokens=PASS_TOKENS), random_window(g, 16, 256, 1))}
    for name, (kw, win) in cases.items():
        fn = configure(model, **kw)
        fn(win)  # warm-up
        torch.cuda.synchronize()
        with prof(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as p:
            t = time.perf_counter()
            fn(win)
            torch.cuda.synchronize()
            wall = time.perf_counter() - t
        model.zero_grad(set_to_none=True)
        ev = p.key_averages()
        gpu_us = sum(e.self_device_time_total for e in ev)
        log(event="profile", case=name, wall_ms=round(wall * 1e3, 1), gpu_busy_ms=round(gpu_us / 1e3, 1))
        with open(folder / "profiles.txt", "a") as f:
            f.write(f"==== {name}: wall {wall * 1e3:.1f} ms, GPU busy {gpu_us / 1e3:.1f} ms\n")
            f.write(
            ev.table(sort_by="self_device_time_total", row_limit=30) + "\n\n"
            + ev.table(sort_by="self_cpu_time_total", row_limit=30))
    model.eval()
    with torch.inference_mode():
        from minqlora.model import KVCache
        cache = KVCache(model.config, 1, 80, torch.bfloat16, "cuda")
        model(torch.randint(3, 32000, (1, 64), device="cuda"), kv_cache=cache)
        tok = torch.randint(3, 32000, (1, 1), device="cuda")
        model(tok, kv_cache=cache)
        torch.cuda.synchronize()
        with prof(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as p:
            t = time.perf_counter()
            model(tok, kv_cache=cache)
            torch.cuda.synchronize()
            wall = time.perf_counter() - t
    ev = p.key_averages()
    log(event="profile", case="decode_step", wall_ms=round(wall * 1e3, 1),
        gpu_busy_ms=round(sum(e.self_device_time_total for e in ev) / 1e3, 1))
    with open(folder / "profiles.txt", "a") as f:
        f.write(f"==== decode_step: wall {wall * 1e3:.1f} ms\n")
        f.write(ev.table(sort_by="self_device_time_total", row_limit=30) + "\n\n"
                + ev.table(sort_by="self_cpu_time_total", row_limit=30))
    model.train()


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--ckpt", required=True)
    ap.add_argument("--shared", default=None, help="folder with data/adl2023-hw3 and tokenizers/llama2 (T3, E2)")
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--t3_records", type=int, default=128)
    ap.add_argument("--e2_batch", type=int, default=32)
    # Default: every line of the speed issue, T1 and T2 also with both opt-in training flags. G1-compile (an
    # opt-in decode mode, ~100 s of compiling) and the other variants run when named.
    ap.add_argument("--lines", default="L1,gate,T1,T1-strict,T1-plain,T2,T3,T1-compile+lora16,T2-compile+lora16,"
                                       "E1,E2,G1")
    ap.add_argument("--profile", default=None, help="folder for torch profiles of the steps")
    args = ap.parse_args()
    lines = set(args.lines.split(","))
    log(event="env", gpu=torch.cuda.get_device_name(0), torch=torch.__version__, bnb=bnb.__version__)
    torch.backends.cuda.matmul.allow_tf32 = True  # as qlora.py and train.py
    t = time.perf_counter()
    model = load_model(args.ckpt, bits=4, quant_type="nf4", double_quant=True, dtype=torch.bfloat16,
                       device="cuda", progress=False)
    torch.cuda.synchronize()
    log(event="loaded", line="L1", seconds=round(time.perf_counter() - t, 2),
        host_peak_mib=round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024),
        mem_gib=round(torch.cuda.memory_allocated() / 2**30, 2))
    apply_lora(model, r=64, alpha=16, dropout=0.01, targets="all")  # freezes the rest, prints counts
    model.model.gradient_checkpointing = True
    g = torch.Generator().manual_seed(0)
    if args.profile:
        profile(model, g, args.profile)
    if "G1" in lines or "G1-compile" in lines:  # first: G1-compile compiles the decode step, layers uncompiled
        g1(model, compiled="G1-compile" in lines)
    with_compiled = any(line.startswith("T") and "-compile" in line for line in lines)
    if with_compiled:  # in place; every line but the "-compile" ones runs under compiled.eager()
        compiled.compile_layers(model)
    tok = records = None
    if args.shared:
        shared = Path(args.shared)
        tok = Tokenizer.from_dir(shared / "tokenizers/llama2")
        records = {s: json.loads((shared / f"data/adl2023-hw3/{s}.json").read_text(encoding="utf-8"))
                   for s in ("train", "public_test")}
    t3 = (lambda: t3_windows(tok, records["train"][:args.t3_records], 16)) if tok else None  # noqa: E731
    with compiled.eager():
        training_lines(model, g, lines, args.steps, t3)
    training_lines(model, g, {line.removesuffix("-compile") for line in lines if line.endswith("-compile")},
                   args.steps, t3, suffix="-compile")
    lora16 = {line.removesuffix("+lora16") for line in lines if line.endswith("+lora16")}
    with computing_in(model, torch.bfloat16):  # the LoRA matmuls in bf16, as train.py --lora_in_compute_dtype
        with compiled.eager():
            training_lines(model, g, {x for x in lora16 if "-compile" not in x}, args.steps, t3, suffix="+lora16")
        training_lines(model, g, {x.removesuffix("-compile") for x in lora16 if x.endswith("-compile")},
                       args.steps, t3, suffix="-compile+lora16")
    # The gates after the timed lines, which thus run in the state a training run's do (the gates' fp32 round
    # trip was suspected of slowing what follows; bench/NOTES.md #17); they check the same code either way.
    if "gate" in lines:  # the plain reference runs eagerly, the "-compile" variant compiled
        gate_optimizer(model)
        fresh_compile()  # the "-compile" variant compiles for the gate's fp32 shapes
        gate_train(model, g, with_compiled)
        gc.collect()
        torch.cuda.empty_cache()
    with torch.no_grad():  # a fresh adapter again (B = 0), as the peer's E2 and G1 see theirs
        for m in lora_modules(model).values():
            m.lora_B.weight.zero_()
    with compiled.eager():
        if "E1" in lines:
            eval_speed(model, "E1", 64, 256, 1)
            eval_speed(model, "E1b", 64, 256, 16)
        if "E2" in lines and tok:
            e2(model, tok, records["public_test"], args.e2_batch)



def training_lines(model, g, lines, steps, t3, suffix=""):
    """T1, T1-strict, T1-plain, T2, T3 as far as `lines` asks (named with `suffix`)."""
    kw = dict(batch=1, seq=256, accum=16, steps=steps)
    if "T1" in lines:
        train_speed(model, "T1" + suffix, g, pass_tokens=PASS_TOKENS, **kw)
    if "T1-strict" in lines:
        train_speed(model, "T1-strict", g, graphs=accumulate.GraphedLoss(pad_id=0), **kw)
        gc.collect()  # the graphs and their memory pools, before the next line's peak is measured
        torch.cuda.empty_cache()
    if "T1-plain" in lines:
        train_speed(model, "T1-plain", g, **kw)
    if "T2" in lines:
        train_speed(model, "T2" + suffix, g, batch=16, seq=256, accum=1, steps=steps, pass_tokens=PASS_TOKENS)
    if "T3" in lines and t3:
        train_speed(model, "T3" + suffix, g, batch=1, seq=0, accum=16, steps=0, pass_tokens=PASS_TOKENS, windows=t3())

if __name__ == "__main__":
    main()
