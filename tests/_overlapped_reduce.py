"""Run by tests/test_distributed.py under torchrun (2 gloo processes): distributed.OverlappedReduce against
distributed.reduce_gradients on a stack of linears, with buckets of a few numbers (many buckets); one step where
both processes run a backward pass, one where process 1 has none (it only calls finish)."""
import sys

import torch
import torch.nn as nn

from minqlora import distributed


def model():
    torch.manual_seed(0)  # the same weights on both processes
    return nn.Sequential(*[nn.Linear(8, 8) for _ in range(5)])


def grads(m):
    return [p.grad.clone() for p in m.parameters()]


world = distributed.start("cpu")
ref, mine = model(), model()
reducer = distributed.OverlappedReduce(list(mine.parameters()), world, bucket=30)
assert len(reducer.buckets) > 3, len(reducer.buckets)
x = torch.randn(4, 8, generator=torch.Generator().manual_seed(1 + world.rank))  # each process its own data
for m in (ref, mine):
    m(x).square().sum().backward()  # a first micro-step: not summed
for step, idle in enumerate((False, world.rank == 1)):
    ref.zero_grad(set_to_none=True)
    mine.zero_grad(set_to_none=True)
    if not idle:
        ref(x).square().sum().backward()
    distributed.reduce_gradients(list(ref.parameters()), world)  # the reference: after the backward
    if not idle:
        reducer.arm()
        mine(x).square().sum().backward()
        # every bucket is complete by the end of the backward, so each was sent during it
        assert len(reducer.sent) == len(reducer.buckets), (len(reducer.sent), len(reducer.buckets))
    reducer.finish()  # (all processes issue the same all-reduces in the same order: nothing in between)
    for a, b in zip(grads(ref), grads(mine)):
        assert torch.equal(a, b), (step, (a - b).abs().max())
distributed.stop(world)
print(f"process {world.rank}: equal over {len(reducer.buckets)} buckets", flush=True)
sys.exit(0)
