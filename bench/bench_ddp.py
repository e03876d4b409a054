"""minqlora on several GPUs of one host (issue 10): T2 and T3 tokens/s of the data-parallel training step,
run under torchrun once with 1 process and once with W; bench/bench.py --gpus W runs both and prints the
speed-up. The step is trainer.train_step's: the step's window of micro-batches dealt out over the
processes as the packed passes need (distributed.deal), each weighed by the whole window's counts, the LoRA
gradients summed once during the last backward pass (distributed.OverlappedReduce; `--reduce after`: after it,
reduce_gradients), then clipping and paged AdamW on every process.

    torchrun --nproc_per_node W bench/bench_ddp.py --ckpt CKPT --shared SHARED

Per process the setting is one GPU's (as transformers counts it, the effective batch grows with W):
    T2  a 16 x 256 micro-batch on each process, accumulation 1
    T3  the course's train.json with the seed's flags: micro-batch 1 x accumulation 16 on each process, over
        the same first 256 records for every W (W times fewer steps)
--torch_compile compiles each decoder layer (train.py's --torch_compile; the line is then "T2-compile"), --lora16
runs the LoRA matmuls in bf16 (train.py's --lora_in_compute_dtype; "+lora16").
--compare_deal (W > 1) times T3 once more with each window dealt by token count, as before bench/NOTES.md #28;
--emulate W (one process, one GPU) times T3 and each of W processes' shares of its W-times-larger windows in
turn, dealt both ways: the W-process step without communication or a second GPU (emulate()).
A gate last (W > 1), eager, in fp32 as bench_qlora.py's: the gradient summed over the processes against process 0
alone computing the whole window (loss within 1e-2 relative, gradient cosine >= 0.999).
"""
import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import bitsandbytes as bnb  # noqa: E402
import torch  # noqa: E402

from bench_decode import compute_in  # noqa: E402  (this folder)
from gates import gate_weights, grads  # noqa: E402
from workloads import PASS_TOKENS, random_window, sync_time, t3_windows  # noqa: E402
from minqlora import accumulate, compiled, distributed  # noqa: E402
from minqlora.loader import load_model  # noqa: E402
from minqlora.lora import apply_lora, set_compute_dtype  # noqa: E402
from minqlora.optim import build_optimizer  # noqa: E402
from minqlora.tokenizer import Tokenizer  # noqa: E402
from minqlora.trainer import accumulate_gradients  # noqa: E402


def log(world, **kw):
    if world.main:
        print(json.dumps({"impl": "minqlora", "processes": world.size, **kw}), flush=True)


class Reducer:
    """The step's sum over the processes: the trainer's (overlapped with the last backward pass) or, for
    comparison, reduce_gradients after the backward."""

    def __init__(self, params, world, overlap=True):
        self.overlapped = distributed.OverlappedReduce(params, world) if overlap else None
        self.params, self.world = params, world
        self.arm = self.overlapped.arm if overlap else None

    def finish(self):
        if self.overlapped:
            self.overlapped.finish()
        else:
            distributed.reduce_gradients(self.params, self.world)


def backward(model, window, world, device, reducer):
    """trainer.train_step's gradient: this process's share of `window`, the whole window's weights, summed."""
    loss = accumulate_gradients(model, distributed.deal(window, world, PASS_TOKENS), device, "example", pad_id=0,
                                pass_tokens=PASS_TOKENS, totals=accumulate.step_totals(window),
                                last_backward=reducer.arm)
    reducer.finish()
    return distributed.sum_all([loss.item()], world, device)[0]


def gate(model, world, device, g, reducer):
    window = random_window(g, 1, 256, 8 * world.size)
    with gate_weights(model):  # the same B on every process: the same seed
        compute_in(model, torch.float32)
        model.zero_grad(set_to_none=True)
        loss = backward(model, window, world, device, reducer)
        together = grads(model)
        model.zero_grad(set_to_none=True)
        alone = float(accumulate_gradients(model, window, device, "example", pad_id=0, pass_tokens=PASS_TOKENS))
        cos = float(torch.nn.functional.cosine_similarity(together, grads(model), dim=0))
        rel = abs(loss - alone) / abs(alone)
        log(world, event="gate", line=f"T2 on {world.size} GPUs", dtype="float32", loss_rel=rel, grad_cos=cos,
            ok=rel <= 1e-2 and cos >= 0.999)
        compute_in(model, torch.bfloat16)
    torch.cuda.empty_cache()


def stepper(model, world, device, reducer, deal_tokens=PASS_TOKENS):
    """One of trainer.train_step's steps on this process's share of a window (paged AdamW as train.py's:
    optim.FlatPagedAdamW; `deal_tokens` 0: the share dealt by token count, as before bench/NOTES.md #28); it
    returns the step's seconds in each phase: forward + backward of the share, the all-reduce left after the
    backward, clipping + update."""
    params = [p for p in model.parameters() if p.requires_grad]
    opt = build_optimizer(params, "paged_adamw_32bit", lr=3e-4)
    model.train()

    def step(window):
        t0 = sync_time()
        accumulate_gradients(model, distributed.deal(window, world, deal_tokens), device, "example", pad_id=0,
                             pass_tokens=PASS_TOKENS, totals=accumulate.step_totals(window),
                             last_backward=reducer.arm)
        t1 = sync_time()  # (overlapped: the all-reduces sent during the backward are done here too)
        reducer.finish()
        t2 = sync_time()
        torch.nn.utils.clip_grad_norm_(params, 0.3)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return t1 - t0, t2 - t1, sync_time() - t2

    return step


def speed(model, world, device, line, windows, reducer, deal_tokens=PASS_TOKENS):
    """Tokens/s of every process together over windows[1:] (windows[0] warms up; with compiled layers every
    window does once, compiling each new shape, as bench_qlora.py's "-compile" lines), and process 0's seconds
    a step in each phase."""
    step = stepper(model, world, device, reducer, deal_tokens)
    for window in windows if "-compile" in line else windows[:1]:
        step(window)
    phases = [0.0, 0.0, 0.0]
    torch.cuda.reset_peak_memory_stats()
    distributed.barrier(world)
    t = sync_time()
    for window in windows[1:]:
        phases = [a + b for a, b in zip(phases, step(window))]
    dt = sync_time() - t
    n = len(windows) - 1
    tokens = sum(int(b["attention_mask"].sum()) for w in windows[1:] for b in w)
    backward_s = distributed.gather([round(phases[0] / n, 4)], world)  # every process's: the skew shows
    log(world, event="train", line=line, reduce="overlap" if reducer.overlapped else "after",
        deal="packed" if deal_tokens else "tokens", tokens=tokens,
        opt_steps=n, tokens_per_s=round(tokens / dt, 1),
        s_per_opt_step=round(dt / n, 3), s_backward=backward_s, s_all_reduce=round(phases[1] / n, 4),
        s_update=round(phases[2] / n, 4), peak_gib=round(torch.cuda.max_memory_allocated() / 2**30, 2))


def emulate(model, device, line, windows, w, deal_tokens=PASS_TOKENS):
    """One process computing each of w processes' shares of every window in turn (bench/NOTES.md #28): a
    w-process step if every process ran at this GPU's pace, without communication: the slowest share's
    forward + backward, then the update. It isolates how the dealing balances the work from the host's pace
    and NCCL's (#24, #26), and needs one GPU."""
    params = [p for p in model.parameters() if p.requires_grad]
    opt = build_optimizer(params, "paged_adamw_32bit", lr=3e-4)
    model.train()

    def step(window):
        shares = []
        for r in range(w):
            t = sync_time()
            accumulate_gradients(model, distributed.deal(window, distributed.World(rank=r, size=w), deal_tokens),
                                 device, "example", pad_id=0, pass_tokens=PASS_TOKENS,
                                 totals=accumulate.step_totals(window))
            shares.append(sync_time() - t)
        t = sync_time()
        torch.nn.utils.clip_grad_norm_(params, 0.3)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return max(shares) + sync_time() - t, shares

    for window in windows if "-compile" in line else windows[:1]:
        step(window)
    steps = [step(window) for window in windows[1:]]
    tokens = sum(int(b["attention_mask"].sum()) for win in windows[1:] for b in win)
    n = len(steps)
    print(json.dumps({"impl": "minqlora", "event": "emulate", "line": line, "processes_emulated": w,
                      "deal": "packed" if deal_tokens else "tokens", "tokens": tokens, "opt_steps": n,
                      "tokens_per_s": round(tokens / sum(s for s, _ in steps), 1),
                      "s_share": [round(sum(sh[r] for _, sh in steps) / n, 4) for r in range(w)],
                      "s_slowest_share": round(sum(max(sh) for _, sh in steps) / n, 4)}), flush=True)


def course_records(shared, n):
    """The Llama-2 tokenizer and the course's first n training records (T3's)."""
    tok = Tokenizer.from_dir(Path(shared) / "tokenizers/llama2")
    records = json.loads((Path(shared) / "data/adl2023-hw3/train.json").read_text(encoding="utf-8"))
    return tok, records[:n]


def union_us(spans):
    """Microseconds covered by the union of (start, end) intervals."""
    total, end = 0.0, None
    for a, b in sorted(spans):
        if end is None or a > end:
            total, end = total + (b - a), b
        elif b > end:
            total, end = total + (b - end), b
    return total


def profile(model, world, device, windows, reducer):
    """Where a step's time goes on each process (NOTES.md #24): wall seconds a step, the union of its compute
    kernels' intervals (busy), NCCL's kernels, the kernels and the CPU ops that take the most time. If the
    2-process pass is slower because kernels run slower, `busy` grows; if because the CPU issues them
    slower, the GPU's idle time (wall - busy) grows."""
    from torch.profiler import ProfilerActivity, profile as torch_profile
    step = stepper(model, world, device, reducer)
    step(windows[0])
    distributed.barrier(world)
    with torch_profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        t = sync_time()
        for window in windows[1:]:
            step(window)
        wall = (sync_time() - t) / (len(windows) - 1)  # seconds a step
    n = len(windows) - 1
    spans, kernels = [], {}  # compute kernels' (start, end) in us; ms a step by kernel name (NCCL's together)
    for e in prof.events():
        if e.device_type != torch.autograd.DeviceType.CUDA:
            continue
        nccl = "nccl" in e.name.lower()
        if not nccl:
            spans.append((e.time_range.start, e.time_range.end))
        key = "nccl" if nccl else e.name.split("<")[0].split("(")[0][:48]
        kernels[key] = kernels.get(key, 0.0) + (e.time_range.end - e.time_range.start) / 1e3 / n
    cpu = {e.key[:48]: e.self_cpu_time_total / 1e3 / n for e in prof.key_averages()
           if e.device_type == torch.autograd.DeviceType.CPU}
    busy = union_us(spans) / 1e6 / n

    def top(d, k):
        return {name: round(ms, 2) for name, ms in sorted(d.items(), key=lambda kv: -kv[1])[:k]}

    mine = {"rank": world.rank, "s_step": round(wall, 4), "s_busy": round(busy, 4), "s_idle": round(wall - busy, 4),
            "ms_nccl": round(kernels.get("nccl", 0.0), 2), "kernels_per_step": round(len(spans) / n),
            "top_ms": top(kernels, 12), "top_cpu_ms": top(cpu, 10)}
    for row in distributed.gather([mine], world):
        log(world, event="profile", **row)
    torch.cuda.empty_cache()


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--ckpt", required=True)
    ap.add_argument("--shared", default=None, help="folder with data/adl2023-hw3 and tokenizers/llama2 (T3)")
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--t3_records", type=int, default=256, help="T3's records, the same for every W (the first "
                    "window again as the warm-up)")
    ap.add_argument("--skip_gate", action="store_true", help="no gate (to see whether it changes the speed)")
    ap.add_argument("--torch_compile", action="store_true", help="compile each decoder layer (lines \"-compile\")")
    ap.add_argument("--lora16", action="store_true", help="the LoRA matmuls in bf16 (lines \"+lora16\")")
    ap.add_argument("--profile", type=int, default=0, help="profile this many T2 steps after the timed ones "
                    "(where the time goes on each process)")
    ap.add_argument("--compare_deal", action="store_true", help="T3 once more, each window dealt by token count "
                    "instead of by padded passes (distributed.deal_packed; logged with deal \"tokens\")")
    ap.add_argument("--emulate", type=int, default=0, help="one process: T3 only, also as this many processes "
                    "would share its windows, each share timed in turn (emulate(); needs --shared)")
    ap.add_argument("--reduce", choices=["overlap", "after"], default="overlap",
                    help="sum the gradients during the last backward pass (the trainer's) or after it")
    args = ap.parse_args()
    world = distributed.start("cuda")
    device = torch.device("cuda", world.local_rank)
    torch.backends.cuda.matmul.allow_tf32 = True
    log(world, event="env", gpu=torch.cuda.get_device_name(device), torch=torch.__version__, bnb=bnb.__version__)
    torch.manual_seed(0)  # the same LoRA initialisation on every process, as the trainer's seed gives
    model = load_model(args.ckpt, bits=4, quant_type="nf4", double_quant=True, dtype=torch.bfloat16,
                       device=device, progress=False)
    apply_lora(model, r=64, alpha=16, dropout=0.01, targets="all", verbose=world.main)
    model.model.gradient_checkpointing = True
    suffix = ("-compile" if args.torch_compile else "") + ("+lora16" if args.lora16 else "")
    if args.torch_compile:  # the first step of each shape compiles: the warm-up step (T2) or window (T3)
        compiled.compile_layers(model)
    if args.lora16:
        set_compute_dtype(model, torch.bfloat16)
    g = torch.Generator().manual_seed(0)  # the same windows on every process: each takes its share
    reducer = Reducer([p for p in model.parameters() if p.requires_grad], world, overlap=args.reduce == "overlap")
    if args.emulate:
        assert world.size == 1 and args.shared, "--emulate runs as one process and needs --shared"
        # T3 on this process, and as args.emulate processes would share it, both dealings, twice
        tok, records = course_records(args.shared, args.t3_records)
        one, several = t3_windows(tok, records, 16), t3_windows(tok, records, 16 * args.emulate)
        for _ in range(2):
            speed(model, world, device, "T3" + suffix, one, reducer)
            for deal_tokens in (PASS_TOKENS, 0):
                emulate(model, device, "T3" + suffix, several, args.emulate, deal_tokens)
        return
    speed(model, world, device, "T2" + suffix, [random_window(g, 16, 256, world.size) for _ in range(args.steps + 1)],
          reducer)
    if args.profile:
        profile(model, world, device, [random_window(g, 16, 256, world.size) for _ in range(args.profile + 1)],
                reducer)
    if world.size > 1:  # what the step's one communication costs: the LoRA gradients' all-reduce alone
        params = [p for p in model.parameters() if p.requires_grad]
        for p in params:
            p.grad = torch.ones_like(p)
        distributed.reduce_gradients(params, world)
        t = sync_time()
        for _ in range(5):
            distributed.reduce_gradients(params, world)
        ms = (sync_time() - t) / 5 * 1e3
        n = sum(p.numel() for p in params)
        log(world, event="all_reduce", numbers=n, ms=round(ms, 2), gb_per_s=round(4 * n / ms / 1e6, 1))
        model.zero_grad(set_to_none=True)
    if args.shared:
        tok, records = course_records(args.shared, args.t3_records)
        windows = t3_windows(tok, records, 16 * world.size)
        speed(model, world, device, "T3" + suffix, windows, reducer)
        if args.compare_deal and world.size > 1:  # the same windows dealt by token count (before NOTES.md #28)
            speed(model, world, device, "T3" + suffix, windows, reducer, deal_tokens=0)
    # The gate last, so that the timed steps run on a process in the state the trainer's are (first suspected of
    # slowing them; moving it did not change the figures: bench/NOTES.md #17).
    if world.size > 1 and not args.skip_gate:  # eager, with fp32 LoRA: it checks the sharding of the step
        set_compute_dtype(model, None)
        with compiled.eager():
            gate(model, world, device, g, reducer)
    distributed.stop(world)


if __name__ == "__main__":
    main()
