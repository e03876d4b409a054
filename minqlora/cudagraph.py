"""CUDA graphs for inference: capture a forward once, replay it for every batch of the same shape.

At batch 1 a 7B forward is a few thousand small kernels, and launching them from Python takes longer
than running them (bench/NOTES.md: a 1 x 256 forward, 89 ms of wall time for about 25 ms of GPU work).
A CUDA graph records the launches once; a replay issues them all at once. Inputs and outputs live in
fixed buffers: a new batch is copied into the input buffer, the graph replayed, the output buffer read.
(torch.cuda.graphs, "CUDA Graphs" in the PyTorch docs; gpt-fast captures its decode step the same way.)

`capture(fn)` is the recipe (warm-up on a side stream, then capture); generate.Decoder uses it for the
decode step, `GraphedForward` for whole-sequence forwards (perplexity). Training's graphs (forward and
backward) are accumulate.GraphedLoss. Each is checked against the eager path: on the CPU where the shapes
logic can run (tests/test_generate.py), on the GPU by the benchmark's gates (E1: bench/bench_qlora.py;
G1: bench/bench_decode.py). No paper section.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def capture(fn):
    """Run fn twice on a side stream (libraries set up their workspaces), then capture it: (graph, output).
    `graph.replay()` reruns the captured kernels, rewriting `output` in place."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(2):
            fn()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = fn()
    return graph, out


class GraphedForward:
    """`model(ids)` logits from CUDA graphs, one per (B, T) shape, T padded on the right to a multiple of
    `multiple` (causal attention: padding after a token never changes that token's logits). At most
    `max_graphs` shapes are kept, each with its own memory. Batches of more than `max_tokens` run
    eagerly: they keep the GPU busy on their own, and a capture costs three forwards. Inference only."""

    def __init__(self, model, pad_id: int = 0, multiple: int = 64, max_graphs: int = 4, max_tokens: int = 2048):
        self.model, self.pad_id, self.multiple, self.max_graphs = model, pad_id, multiple, max_graphs
        self.max_tokens = max_tokens
        self.graphs: dict[tuple[int, int], tuple] = {}

    @torch.inference_mode()
    def __call__(self, ids: torch.Tensor) -> torch.Tensor:
        """ids (B, T) on the model's device -> logits (B, T, V), valid until the next call."""
        B, T = ids.shape
        Tp = -(-T // self.multiple) * self.multiple
        if B * Tp > self.max_tokens:
            return self.model(ids)
        key = (B, Tp)
        if key not in self.graphs:
            if len(self.graphs) >= self.max_graphs:
                self.graphs.pop(next(iter(self.graphs)))  # the oldest shape's graph and memory go
            static_in = torch.full((B, Tp), self.pad_id, dtype=torch.long, device=ids.device)  # (B, Tp)
            graph, out = capture(lambda: self.model(static_in))
            self.graphs[key] = (static_in, graph, out)
        static_in, graph, out = self.graphs[key]
        static_in.copy_(F.pad(ids, (0, Tp - T), value=self.pad_id))
        graph.replay()
        return out[:, :T]  # (B, T, V)
