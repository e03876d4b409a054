"""Gradient accumulation's fast paths: the forward and backward passes of one optimizer step, faster.

One optimizer step covers K micro-batches (--gradient_accumulation_steps). Its loss (--loss_normalization):
    example  sum_k mean_tokens(micro-batch k) / K      what qlora.py's Trainer (transformers 4.3x) did
    token    sum of every target token's loss / their count over the K micro-batches (transformers >= 4.46)
Both are a weighted sum over the step's target tokens, sum_i w_i * nll_i, with
    example  w_i = 1 / (K * n_k)   for a token of micro-batch k with n_k target tokens
    token    w_i = 1 / N           N target tokens in the whole step.

trainer.accumulate_gradients runs one forward and backward per micro-batch, as transformers' Trainer does
(the plain path), or hands the step to one of these, which compute the same gradient:
packed  the fast path: the step's rows packed into as few passes as `pass_tokens` allows, each token
        keeping its weight, so the gradient is the plain path's (up to float rounding and dropout's
        random masks): a few large matmuls instead of K small ones. At micro-batch 1 the plain path
        is bound by launching kernels, not by the GPU's arithmetic (bench/NOTES.md).
graphed (CUDA) one pass per micro-batch as in the plain path, each pass's forward and backward replayed
        from CUDA graphs captured once per padded shape (GraphedLoss): one launch instead of thousands.
Padding is on the right and labelled -100 (collate), so a row's tokens see exactly what they saw in
their own micro-batch. Checked against the plain path in tests/test_accumulate.py (packed, on the CPU) and
by the benchmark's gate (graphed, on a GPU: T1-strict in bench/gates.py). No paper section.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from .errors import BadInput
from .loss import IGNORE_INDEX, token_nll


def step_totals(window) -> tuple[int, int]:
    """(K micro-batches, N target tokens) of a step: the denominators of its loss. Under several processes
    (distributed.py) each computes on its share of the window but divides by the whole window's totals."""
    return len(window), sum(int((b["labels"][:, 1:] != IGNORE_INDEX).sum()) for b in window)


def token_weights(window, normalization: str, totals: tuple[int, int] | None = None) -> list[torch.Tensor]:
    """Each micro-batch's per-token weights (B, T-1), zero where a token is not scored; `totals` (K, N):
    step_totals of the whole step (default: of `window`)."""
    K, N = totals or step_totals(window)
    scored = [(b["labels"][:, 1:] != IGNORE_INDEX).float() for b in window]  # (B, T-1) each
    if normalization == "token":
        return [s / max(N, 1) for s in scored]
    if normalization == "example":
        return [s / (K * max(float(s.sum()), 1.0)) for s in scored]
    raise ValueError(f"loss normalization must be 'example' or 'token', got {normalization!r}")


def weighted_loss(model, ids, labels, w) -> torch.Tensor:
    """sum_i w_i * nll_i over one pass's tokens."""
    nll, _ = token_nll(model(ids), labels)  # (B, T-1)
    return (nll * w).sum()


def scored_loss(model, ids, labels, w) -> torch.Tensor:
    """weighted_loss with lm_head and the softmax only at the positions whose next token is scored (the
    packed path): the same sum, a fraction of the logits' memory. `w` is on the CPU, so finding those
    positions costs the GPU no wait."""
    device = model.lm_head.weight.device
    pos = (w > 0).flatten().nonzero().squeeze(1)  # (N,) indices into the (B * (T-1)) positions
    h = model.model(ids.to(device))[:, :-1]  # (B, T-1, C): position t predicts token t+1
    h = h.reshape(-1, h.shape[-1]).index_select(0, pos.to(device))  # (N, C)
    logits = model.lm_head(h).float()  # (N, V)
    targets = labels[:, 1:].flatten()[pos].to(device)  # (N,)
    nll = F.cross_entropy(logits, targets, reduction="none")  # (N,)
    return (nll * w.flatten()[pos].to(device)).sum()  # w: (B, T-1) -> (N,) at the scored positions


class _Loss(nn.Module):
    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, ids, labels, w):
        return weighted_loss(self.model, ids, labels, w)


class GraphedLoss:
    """`weighted_loss` whose forward and backward are CUDA graphs, captured once per padded shape.

    A pass's length is padded on the right to a multiple of `bucket` (labels -100, weight 0: the real
    tokens see exactly what they saw), so a few shapes serve every length; at most `max_graphs` are kept,
    each holding its activations in a memory pool of its own. Gradient checkpointing is off inside a
    graph (its recompute restores RNG states, which a capture cannot): the activations of one pass are
    kept, which at batch 1 is what the graph is for. Parameters' .grad accumulate as in eager mode.
    """

    def __init__(self, pad_id: int = 0, bucket: int = 128, max_graphs: int = 2):
        self.pad_id, self.bucket, self.max_graphs = pad_id, bucket, max_graphs
        self.graphs: dict[tuple[int, int], object] = {}

    def __call__(self, model, ids, labels, w):
        T = -(-ids.shape[1] // self.bucket) * self.bucket
        ids = F.pad(ids, (0, T - ids.shape[1]), value=self.pad_id)  # (B, T)
        labels = F.pad(labels, (0, T - labels.shape[1]), value=IGNORE_INDEX)  # (B, T)
        w = F.pad(w, (0, T - 1 - w.shape[1]), value=0.0)  # (B, T-1)
        key = tuple(ids.shape)
        if key not in self.graphs:
            if len(self.graphs) >= self.max_graphs:
                self.graphs.pop(next(iter(self.graphs)))  # the oldest shape's graph and its memory go
            lm = model.model
            saved, lm.gradient_checkpointing = lm.gradient_checkpointing, False
            try:
                # a module of its own per shape: make_graphed_callables replaces that module's forward
                self.graphs[key] = torch.cuda.make_graphed_callables(_Loss(model), (ids, labels, w),
                                                                     allow_unused_input=True)
            finally:
                lm.gradient_checkpointing = saved
        # The graph's backward returns gradients living in its own buffers; a parameter without a .grad
        # would take that buffer as its .grad, and the next replay would overwrite it. With a .grad
        # already there, autograd adds into it, as in eager mode.
        for p in model.parameters():
            if p.requires_grad and p.grad is None:
                p.grad = torch.zeros_like(p)
        return self.graphs[key](ids, labels, w)


def graphed(model, window, device, normalization="example", scaler=None, *, graphs: GraphedLoss, totals=None,
            last_backward=None):
    """One pass per micro-batch, each pass's forward and backward replayed from `graphs`; the step's loss."""
    step_loss = torch.zeros((), device=device)
    for i, (b, w) in enumerate(zip(window, token_weights(window, normalization, totals))):
        loss = graphs(model, b["input_ids"].to(device), b["labels"].to(device), w.to(device))
        if last_backward and i == len(window) - 1:
            last_backward()
        (scaler.scale(loss) if scaler else loss).backward()
        step_loss += loss.detach()
    return step_loss


PAD_MULTIPLE = 64  # a pass's length rounds up to this: few shapes, so GPU libraries' per-shape plans are reused


def padded(n: int, multiple: int = PAD_MULTIPLE) -> int:
    return -(-n // multiple) * multiple


def add_row(state: tuple[int, int, int], n: int, pass_tokens: int, multiple: int = PAD_MULTIPLE
            ) -> tuple[int, int, int]:
    """`pack`'s rule for one more row of length n. state: (padded tokens of the closed passes, rows in the open
    pass, its padded length). A row opens a new pass when the open one, with it, would exceed pass_tokens."""
    closed, rows, T = state
    longest = max(T, padded(n, multiple))
    if rows and longest * (rows + 1) > pass_tokens:
        return closed + rows * T, 1, padded(n, multiple)
    return closed, rows + 1, longest


def padded_tokens(state: tuple[int, int, int]) -> int:
    """The tokens, padding included, that the passes of `add_row`'s state compute."""
    return state[0] + state[1] * state[2]


def pack(window, weights, pad_id: int, pass_tokens: int, multiple: int = PAD_MULTIPLE
         ) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """The step's rows as passes of (ids (R, T), labels (R, T), weights (R, T-1)), R * T <= pass_tokens
    (or one row when a row alone is longer); rows keep their order, each pass right-padded to its longest
    row rounded up to `multiple` (add_row's rule)."""
    passes, state = [], (0, 0, 0)
    for b, w in zip(window, weights):
        for i in range(b["input_ids"].shape[0]):
            n = int(b["attention_mask"][i].sum())  # the row's real length (right padding)
            state = add_row(state, n, pass_tokens, multiple)
            if state[1] == 1:  # the row opened a pass
                passes.append([])
            passes[-1].append((b["input_ids"][i, :n], b["labels"][i, :n], w[i, :max(n - 1, 0)]))
    out = []
    for rs in passes:
        T = padded(max(len(r[0]) for r in rs), multiple)
        ids = torch.stack([F.pad(r[0], (0, T - len(r[0])), value=pad_id) for r in rs])  # (R, T)
        labels = torch.stack([F.pad(r[1], (0, T - len(r[1])), value=IGNORE_INDEX) for r in rs])  # (R, T)
        w = torch.stack([F.pad(r[2], (0, T - 1 - len(r[2])), value=0.0) for r in rs])  # (R, T-1)
        out.append((ids, labels, w))
    return out


def packed(model, window, device, normalization="example", scaler=None, *, pad_id: int = 0,
           pass_tokens: int = 4096, totals=None, last_backward=None) -> torch.Tensor:
    """The fast path: the same weighted loss and gradient as `plain`, in ceil(tokens / pass_tokens) passes.
    `last_backward()`, if given, is called just before the last backward pass (distributed.OverlappedReduce)."""
    step_loss = torch.zeros((), device=device)
    passes = pack(window, token_weights(window, normalization, totals), pad_id, pass_tokens)
    for i, (ids, labels, w) in enumerate(passes):
        loss = scored_loss(model, ids, labels, w)
        if last_backward and i == len(passes) - 1:
            last_backward()
        (scaler.scale(loss) if scaler else loss).backward()
        step_loss += loss.detach()
    return step_loss


def choose(pass_tokens: int, cuda_graphs: bool, device) -> tuple[int, bool, str]:
    """--pass_tokens / --cuda_graphs -> (tokens a packed pass, CUDA graphs or not, the choice in words)."""
    if cuda_graphs:
        if device.type != "cuda":
            raise BadInput(f"--cuda_graphs True needs a CUDA device (the run is on {device})")
        if pass_tokens > 0:
            raise BadInput("--cuda_graphs True replays one pass per micro-batch: it needs --pass_tokens 0 (or -1)")
        return 0, True, "one pass per micro-batch, replayed from CUDA graphs (--cuda_graphs)"
    tokens = pass_tokens if pass_tokens >= 0 else (4096 if device.type == "cuda" else 0)
    if tokens == 0:
        return 0, False, "one pass per micro-batch (--pass_tokens 0)"
    return tokens, False, (f"each step's micro-batches packed into passes of at most {tokens} tokens, the same "
                           "gradient (--pass_tokens; 0: one pass per micro-batch)")
