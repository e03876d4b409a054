"""Data parallelism over the processes `torchrun` starts: each holds the whole 4-bit model, takes its share of
every optimizer step's micro-batches, and the LoRA gradients are summed across processes once a step.

    torchrun --nproc_per_node 2 scripts/train.py <the same flags>

The environment is torchrun's (RANK, LOCAL_RANK, WORLD_SIZE, MASTER_ADDR/PORT); without it there is one
process and nothing here does anything. Backend: NCCL on GPUs (process LOCAL_RANK on cuda:LOCAL_RANK),
gloo on the CPU. What the trainer and the scripts do with a World:
- training: a step's window of K x W micro-batches (K = --gradient_accumulation_steps, W processes) is
  dealt out (`deal`: with packed passes, in runs of similar lengths so that little padding is computed;
  otherwise by token count, longest first, each to the process with the fewest tokens); each
  process weighs its tokens by the whole step's counts (accumulate.step_totals), so the sum of the
  processes' gradients is the gradient one process with accumulation K x W computes; `OverlappedReduce`
  sums them once, during the last micro-batch's backward (no communication on the micro-steps before), then every
  process clips and steps the same optimizer on the same numbers, and the replicas stay equal;
- evaluation, ppl.py and predict.py: record i to process i mod W (`shard`), the results gathered back in
  record order (`gather`);
- only process 0 (`main`) writes files and prints; every process reads the same checkpoint to resume.
This is DistributedDataParallel's arithmetic, written out: `reduce_gradients` sums the gradients in a few
flat buffers after the backward; `OverlappedReduce` (the trainer's) sums the same buffers but starts each
during the step's last backward pass, as soon as backward has finished its gradients (torch's DDP overlaps
communication the same way, with hooks; its wrapper is not used because its hooks would also fire on the
micro-steps and inside packed and CUDA-graphed passes). The summed buckets become the gradients (views, no
copy back). On two H200s summing a 7B's ~160M fp32 LoRA numbers then leaves 3-4 ms after a ~0.4 s pass
(bench/NOTES.md #21, #25).
No paper section; checked in tests/test_distributed.py (2 gloo processes against 1 process).
"""
from __future__ import annotations

import contextlib
import io
import os
import signal
from dataclasses import dataclass

import torch
import torch.distributed as dist

from . import accumulate
from .errors import BadInput


@dataclass(frozen=True)
class World:
    rank: int = 0
    size: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        return self.rank == 0


def launched_size() -> int:
    """How many processes torchrun started (WORLD_SIZE), 1 without torchrun."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def start(device: str = "auto") -> World:
    """Join torchrun's process group (a no-op for a single process). `device` is the --device flag: under
    torchrun a GPU process uses cuda:LOCAL_RANK, so cuda:N is refused."""
    size = launched_size()
    if size == 1:
        return World()
    if dist.is_initialized():
        return current()
    rank, local = int(os.environ["RANK"]), int(os.environ["LOCAL_RANK"])
    if device.startswith("cuda:"):
        raise BadInput(f"--device {device}: under torchrun each process uses cuda:LOCAL_RANK; pass --device cuda "
                       "(or auto) and choose the GPUs with CUDA_VISIBLE_DEVICES")
    signal.signal(signal.SIGTERM, stopped_by_torchrun)
    gpu = device != "cpu" and torch.cuda.is_available()
    if gpu:
        torch.cuda.set_device(local)  # before the process group, so that NCCL binds this GPU
    dist.init_process_group("nccl" if gpu else "gloo", device_id=torch.device("cuda", local) if gpu else None)
    return World(rank, size, local)


def one_process_only(program: str):
    """Refuse to run `program` (which writes one output, e.g. merge.py) as several torchrun processes."""
    size = launched_size()
    if size > 1:
        raise BadInput(f"{program} runs in one process, not {size}: start it with python, not torchrun "
                       "(its processes would all write the same output)")


def stopped_by_torchrun(signum, frame):
    """SIGTERM, which torchrun sends the other processes when one fails: leave through Python, so that a file
    being written is removed from its temporary name (atomic.py) rather than left there."""
    raise SystemExit(128 + signum)


def current() -> World:
    if not dist.is_initialized():
        return World()
    return World(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", "0")))


def is_main() -> bool:
    """Process 0? Before the process group is joined (the scripts' checks), by torchrun's environment, as `start`
    reads it: one process unless launched_size() > 1."""
    if dist.is_initialized():
        return current().main
    return launched_size() == 1 or os.environ.get("RANK", "0") == "0"


def quiet(world: World):
    """Process 0 speaks for all: in the other processes, what the block prints (the data audit) goes nowhere."""
    return contextlib.nullcontext() if world.main else contextlib.redirect_stdout(io.StringIO())


def stop(world: World):
    """Leave the process group once every process is here (process 0 may still be writing)."""
    if world.size > 1 and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def barrier(world: World):
    if world.size > 1:
        dist.barrier()


def shard(items: list, world: World) -> list:
    """This process's items: every W-th, from its rank (lengths stay balanced when items are sorted)."""
    return items[world.rank::world.size]


def deal(batches: list[dict], world: World, pass_tokens: int = 0) -> list[dict]:
    """This process's share of a step's micro-batches. Every process computes the same dealing, and the step's
    gradient is the sum over its micro-batches whoever computes them: the dealing changes only who waits.
    pass_tokens 0 (one pass per micro-batch): by token count, longest first, each to the process with the
    fewest tokens so far (ties: the lowest rank; equal sizes are dealt as `shard` deals them), in window order.
    pass_tokens > 0 (accumulate.pack's passes): `deal_packed`."""
    if world.size == 1:
        return list(batches)
    if pass_tokens > 0:
        return deal_packed(batches, world, pass_tokens)
    sizes = [int(b["attention_mask"].sum()) for b in batches]
    load, mine = [0] * world.size, []
    for i in sorted(range(len(batches)), key=lambda i: -sizes[i]):  # stable: equal sizes keep their order
        r = min(range(world.size), key=lambda r: load[r])
        load[r] += sizes[i]
        if r == world.rank:
            mine.append(i)
    return [batches[i] for i in sorted(mine)]  # in the window's order


def deal_packed(batches: list[dict], world: World, pass_tokens: int) -> list[dict]:
    """This process's share when its micro-batches' rows are packed into padded passes (accumulate.pack): a pass
    costs its rows x its longest row, padding included. Dealing by token count pads every process's rows up to
    the window's longest; here the micro-batches, longest first, are cut into W runs of similar lengths, the cuts
    placed so that the most padded tokens any process computes is as small as these cuts allow (bisection on
    that bound, each run filled greedily). Process r takes run r, longest first: the order its cost assumed.
    On T3's windows (group_by_length) this is 13% fewer padded tokens a process than dealing by token count
    (bench/NOTES.md #28)."""
    rows = [[int(n) for n in b["attention_mask"].sum(1)] for b in batches]  # each micro-batch's row lengths
    order = sorted(range(len(batches)), key=lambda i: -max(rows[i]))  # stable: equal lengths keep their order

    def add(state, items):  # pack's state after the rows of these micro-batches
        for i in items:
            for n in rows[i]:
                state = accumulate.add_row(state, n, pass_tokens)
        return state

    def runs(bound: int) -> list[list[int]]:  # `order` cut greedily into runs of at most `bound` padded tokens
        out, state = [[]], (0, 0, 0)
        for i in order:
            state = add(state, [i])
            if len(out[-1]) and accumulate.padded_tokens(state) > bound:
                out.append([])
                state = add((0, 0, 0), [i])
            out[-1].append(i)
        return out

    lo, hi = 0, accumulate.padded_tokens(add((0, 0, 0), order))  # one run holds them all
    while lo < hi:  # the smallest bound that needs at most W runs
        mid = (lo + hi) // 2
        lo, hi = (lo, mid) if len(runs(mid)) <= world.size else (mid + 1, hi)
    mine = runs(hi)
    return [batches[i] for i in mine[world.rank]] if world.rank < len(mine) else []


def gather(local: list, world: World) -> list:
    """Undo `shard`: every process's results, back in the order of the items they were computed from."""
    if world.size == 1:
        return list(local)
    parts = [None] * world.size
    dist.all_gather_object(parts, local)
    out = [None] * sum(len(p) for p in parts)
    for r, part in enumerate(parts):
        out[r::world.size] = part
    return out


def from_main(value, world: World):
    """Process 0's `value` on every process (a decision made where the files are written)."""
    if world.size == 1:
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def sum_all(values: list[float], world: World, device) -> list[float]:
    """Elementwise sum of `values` over the processes (eval loss totals, a step's loss)."""
    if world.size == 1:
        return list(values)
    t = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return t.tolist()


def reduce_gradients(params: list[torch.Tensor], world: World, bucket: int = 1 << 25):
    """Sum every parameter's .grad over the processes, through flat buffers of at most `bucket` numbers
    (128 MB in fp32): a few all-reduces a step, not one per tensor. A parameter without a gradient on
    this process (it saw no micro-batch) contributes zeros."""
    if world.size == 1:
        return
    _zeros_for_missing(params)
    for group in _buckets(params, bucket):
        flat = torch.cat([q.grad.reshape(-1) for q in group])  # (numbers in the bucket,)
        dist.all_reduce(flat)
        _unflatten_grads(group, flat)


def _zeros_for_missing(params: list[torch.Tensor]):
    """A parameter without a gradient on this process (it saw no micro-batch) contributes zeros to the sum."""
    for p in params:
        if p.grad is None:
            p.grad = torch.zeros_like(p)


def _buckets(params: list[torch.Tensor], bucket: int) -> list[list[torch.Tensor]]:
    """`params` in order, cut into groups, each closed once it holds `bucket` numbers (the last: the rest)."""
    groups, group, size = [], [], 0
    for p in params:
        group.append(p)
        size += p.numel()
        if size >= bucket:
            groups.append(group)
            group, size = [], 0
    return groups + [group] if group else groups


def _unflatten_grads(group: list[torch.Tensor], flat: torch.Tensor):
    """Make each parameter's .grad its slice of the bucket's summed numbers, in order: views, not copies
    (a copy per tensor was ~448 launches a step, most of the 8 ms left after a 7B's backward: bench/NOTES.md
    #25). The next step's zero_grad(set_to_none=True) lets the bucket go."""
    offset = 0
    for q in group:
        q.grad = flat[offset:offset + q.numel()].view_as(q)
        offset += q.numel()


class OverlappedReduce:
    """`reduce_gradients`'s sum, started during the step's last backward pass. `arm()` just before that pass
    (accumulate.py's `last_backward`), `finish()` after it: then every gradient is the sum over the processes.

    The buckets hold the parameters in reverse order, the order in which backward finishes their gradients
    (last layer first); a post-accumulate-grad hook counts each parameter in once, and each bucket is sent
    (an async all-reduce) when it and every bucket before it are complete, so that every process issues the
    same all-reduces in the same order. What has not been sent by `finish()` (a process that had no
    micro-batch, a parameter without a gradient) is sent then, zeros for a missing gradient."""

    def __init__(self, params: list[torch.Tensor], world: World, bucket: int = 1 << 22):
        # 16 MB buckets: the last one, sent only when backward ends, is ~3% of a 7B's LoRA numbers
        self.world, self.buckets = world, _buckets(params[::-1], bucket)
        self.bucket_of = {id(p): k for k, b in enumerate(self.buckets) for p in b}
        self.hooks = [p.register_post_accumulate_grad_hook(self._ready) for p in params] if world.size > 1 else []
        self.armed = False

    def arm(self):
        self.armed, self.seen, self.next, self.sent = True, set(), 0, []
        self.missing = [len(b) for b in self.buckets]

    def _ready(self, p):
        if not self.armed or id(p) in self.seen:
            return
        self.seen.add(id(p))
        self.missing[self.bucket_of[id(p)]] -= 1
        while self.next < len(self.buckets) and self.missing[self.next] == 0:
            self._send()

    def _send(self):
        group = self.buckets[self.next]
        flat = torch.cat([q.grad.reshape(-1) for q in group])  # (numbers in the bucket,)
        self.sent.append((group, flat, dist.all_reduce(flat, async_op=True)))
        self.next += 1

    def finish(self):
        if self.world.size == 1:
            return
        if not self.armed:  # no backward pass on this process this step
            self.arm()
        self.armed = False
        _zeros_for_missing([p for group in self.buckets[self.next:] for p in group])
        while self.next < len(self.buckets):
            self._send()
        for group, flat, work in self.sent:
            work.wait()
            _unflatten_grads(group, flat)
        self.sent = []
