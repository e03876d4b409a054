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
import contextlib
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
from minqlora.loss import IGNORE_INDEX  # noqa: E402
from minqlora.optim import build_optimizer  # noqa: E402
from minqlora.perplexity import mean_perplexity, perplexities  # noqa: E402
from minqlora.tokenizer import Tokenizer  # noqa: E402
from minqlora.trainer import accumulate_gradients  # noqa: E402

from bench_decode import compute_in, g1  # noqa: E402  (this folder: G1 and G1-compile)

ALPACA = ("Below is an instruction that describes a task. Write a response that appropriately "
          "completes the request.\n\n### Instruction:\n{}\n\n### Response: ")
COURSE = ("你是人工智慧助理，以下是用戶和人工智能助理之間的對話。"
          "你要對用戶的問題提供有用、安全、詳細和禮貌的回答。USER: {} ASSISTANT:")
PASS_TOKENS = 4096


def log(**kw):
    print(json.dumps({"impl": "minqlora", **kw}), flush=True)


def sync_time():
    torch.cuda.synchronize()
    return time.perf_counter()


def batch_of(rows, pad_id=0):
    """Right-padded {input_ids, labels, attention_mask} from (ids, labels) lists."""
    T = max(len(r[0]) for r in rows)
    ids = torch.full((len(rows), T), pad_id, dtype=torch.long)
    labels = torch.full((len(rows), T), IGNORE_INDEX, dtype=torch.long)
    mask = torch.zeros((len(rows), T), dtype=torch.long)
    for i, (x, y) in enumerate(rows):
        ids[i, :len(x)], labels[i, :len(y)], mask[i, :len(x)] = torch.tensor(x), torch.tensor(y), 1
    return {"input_ids": ids, "labels": labels, "attention_mask": mask}


def random_window(g, batch, seq, accum):
    out = []
    for _ in range(accum):
        rows = []
        for _ in range(batch):
            ids = torch.randint(3, 32000, (seq,), generator=g).tolist()
            rows.append((ids, [IGNORE_INDEX] * (seq // 2) + ids[seq // 2:]))  # source tokens not scored
        out.append(batch_of(rows))
    return out


def configure(model, *, pass_tokens=0, graphs=None):
    return lambda win: accumulate_gradients(model, win, "cuda", "example", pad_id=0, pass_tokens=pass_tokens,
                                            graphs=graphs)


def grads(model):
    return torch.cat([p.grad.float().flatten() for p in model.parameters() if p.requires_grad])


def gate_train(model, g, with_compiled=False):
    """Each training fast path against the plain path (batch-1 eager passes) on the same step, dropout at 0.

    The pass/fail gate computes in fp32: it checks that a fast path computes the same function. In bf16
    a random 7B network amplifies rounding, so that two valid orders of the same sums already differ
    (packing at 512 vs 4096 tokens a pass): those cosines are logged beside the gate, for reference."""
    win = random_window(g, 1, 256, 16)
    with gate_weights(model):
        gate_paths(model, win, with_compiled)


def gate_optimizer(model, steps=3):
    """The one-call optimizer (optim.FlatPagedAdamW) against bitsandbytes' per-tensor PagedAdamW32bit on the
    GPU: copies of the LoRA tensors of the first layer, the same gradients, `steps` updates: equal to the bit."""
    shapes = [p.shape for n, p in model.named_parameters() if p.requires_grad and ".layers.0." in n]
    g = torch.Generator(device="cuda").manual_seed(0)
    start = [torch.randn(s, device="cuda", generator=g) for s in shapes]
    grads = [[torch.randn(s, device="cuda", generator=g) for s in shapes] for _ in range(steps)]
    out = []
    for make in (lambda ps: bnb.optim.PagedAdamW32bit(ps, lr=1e-2, weight_decay=0.0),
                 lambda ps: build_optimizer(ps, "paged_adamw_32bit", lr=1e-2)):
        ps = [torch.nn.Parameter(t.clone()) for t in start]
        opt = make(ps)
        for step in grads:
            for p, gr in zip(ps, step):
                p.grad = gr.clone()
            opt.step()
        out.append(ps)
    equal = all(torch.equal(a, b) for a, b in zip(*out))
    log(event="gate", line="optimizer (one call vs bnb per tensor)", tensors=len(shapes), steps=steps, ok=equal)


def fresh_compile():
    """Forget compiled graphs (they stay wrapped, and compile again on their next call), so that a "-compile"
    line sees only its own shapes, as a training run would: shapes of earlier lines (the fp32 gate, T1's
    varied pass lengths) would otherwise leave it the dynamic-length graph."""
    torch._dynamo.reset()


@contextlib.contextmanager
def gate_weights(model):
    """A gate's setting: a non-zero LoRA B (so that lora_A gets gradients too; the same on every process, the
    same seed), dropout 0; on leaving, the fresh adapter (B = 0, no gradients) and the dropout it had."""
    with torch.no_grad():
        for m in lora_modules(model).values():
            m.lora_B.weight.normal_(0, 1e-3)
    drops = [m.lora_dropout for m in lora_modules(model).values() if hasattr(m.lora_dropout, "p")]
    saved = [d.p for d in drops]
    for d in drops:
        d.p = 0.0
    try:
        yield
    finally:
        for d, p in zip(drops, saved):
            d.p = p
        model.zero_grad(set_to_none=True)
        with torch.no_grad():
            for m in lora_modules(model).values():
                m.lora_B.weight.zero_()


def gate_paths(model, win, with_compiled):
    """gate_train's comparisons on one window: fp32 gates, then the bf16 figures logged for reference."""
    model.train()  # as in training (checkpointing on)
    packed = dict(pass_tokens=PASS_TOKENS)
    compiled_variant = (("T1-compile", packed),) if with_compiled else ()  # the packed pass, layers compiled
    for dtype, variants in ((torch.float32, (("T1-strict", dict(graphs=accumulate.GraphedLoss(pad_id=0))),
                                             ("T1", packed)) + compiled_variant),
                            (torch.bfloat16, (("T1", packed), ("T1 at 512 tokens a pass", dict(pass_tokens=512)),
                                              ("plain+lora16", {}), ("T1+lora16", packed))
                             + compiled_variant + tuple((n + "+lora16", kw) for n, kw in compiled_variant))):
        compute_in(model, dtype)
        results = {}
        for name, kw in (("plain", {}),) + variants:
            model.zero_grad(set_to_none=True)
            # "+lora16": the LoRA matmuls in bf16 (--lora_in_compute_dtype), against the fp32-LoRA plain path
            with (contextlib.nullcontext() if "-compile" in name else compiled.eager()), \
                    computing_in(model, torch.bfloat16 if name.endswith("+lora16") else None):
                loss = float(configure(model, **kw)(win))
            results[name] = (loss, grads(model))
        ref_loss, ref_grad = results.pop("plain")
        for name, (loss, grad) in results.items():
            rel = abs(loss - ref_loss) / abs(ref_loss)
            cos = float(torch.nn.functional.cosine_similarity(grad, ref_grad, dim=0))
            ok = rel <= 1e-2 and cos >= 0.999
            if dtype == torch.float32:
                log(event="gate", line=name, dtype="float32", loss_rel=rel, grad_cos=cos, ok=ok)
            else:
                log(event="bf16_reference", line=name, loss_rel=rel, grad_cos=cos)
        torch.cuda.empty_cache()


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


def t3_windows(tok, records, accum, smax=128, tmax=128):
    """The seed's flags on train.json: alpaca prompt, source/target cut at 128, group_by_length at batch 1
    (mega-batches of 50 records, longest first, as the peer orders them), micro-batch 1 x accumulation 16."""
    ex = []
    for r in records:
        s = tok.encode(ALPACA.format(r["instruction"]), bos=True)[:smax]
        t = (tok.encode(r["output"]) + [tok.eos_id])[:tmax]
        ex.append((s + t, [IGNORE_INDEX] * len(s) + t))
    order = []
    for i in range(0, len(ex), 50):
        order += sorted(range(i, min(i + 50, len(ex))), key=lambda j: -len(ex[j][0]))
    wins = [[batch_of([ex[j]]) for j in order[k:k + accum]] for k in range(0, len(order) - len(order) % accum, accum)]
    return [wins[0]] + wins  # the first again as the warm-up


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
