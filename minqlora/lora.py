"""LoRA: low-rank adapters around frozen linear layers, written out by hand.

LoRA paper (arXiv 2106.09685) §4.1: a frozen weight W0 gets a trainable
low-rank update, h = W0 x + (alpha / r) * B A x, with A (r x in) random and
B (out x r) zero at init, so training starts exactly at the base model.
QLoRA (arXiv 2305.14314) §3 puts adapters on *every* linear layer of the
transformer (not just q/v) with W0 stored in NF4 (see nf4.py); that is
`targets="all"` here, which like artidoro/qlora leaves `lm_head` alone.

Usage:
    wrapped = apply_lora(model, r=64, alpha=16, dropout=0.1, targets="all")
        # wraps the targets, then freeze_base(model): only lora_A / lora_B
        # train, and it prints the trainable / total counts
    ...train...
    merge_lora(model)               # plain nn.Linear layers again, 16-bit

Parameter names follow peft (`...q_proj.base_layer.weight`,
`...q_proj.lora_A.weight`, `...q_proj.lora_B.weight`) so adapter.py can
write files peft loads. Checked against peft's `LoraLayer` / `lora.Linear`
(same outputs, same gradients, same init; see tests/test_lora.py).
"""

from __future__ import annotations

import contextlib
import math

import torch
import torch.nn as nn
import torch.nn.functional as F
from bitsandbytes.nn import Params4bit

from . import fused
from .nf4 import Linear4bit

LINEAR_TYPES = (nn.Linear, Linear4bit)  # the layers LoRA may wrap
EXCLUDED_FROM_ALL = ("lm_head",)  # `targets="all"` skips these (artidoro/qlora does too)


class LoRALinear(nn.Module):
    """base_layer(x) + lora_B(lora_A(dropout(x))) * alpha / r."""

    def __init__(self, base_layer: nn.Module, r: int, alpha: float, dropout: float = 0.0):
        super().__init__()
        if not isinstance(base_layer, LINEAR_TYPES):
            raise TypeError(f"LoRALinear wraps nn.Linear or Linear4bit, got {type(base_layer).__name__}")
        if r <= 0:
            raise ValueError(f"LoRA rank r must be positive, got {r}")
        self.base_layer = base_layer
        self.in_features = base_layer.in_features
        self.out_features = base_layer.out_features
        self.r = r
        self.alpha = alpha
        self.scaling = alpha / r
        self.lora_dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.compute_dtype: torch.dtype | None = None  # the low-rank matmuls' dtype; None: the weights' (fp32)
        # Master weights in fp32 on the base layer's device, whatever the model's dtype.
        device = base_layer.weight.device
        self.lora_A = nn.Linear(self.in_features, r, bias=False, device=device, dtype=torch.float32)
        self.lora_B = nn.Linear(r, self.out_features, bias=False, device=device, dtype=torch.float32)
        self.reset_lora_parameters()
        self.train(base_layer.training)  # wrapping an eval-mode model keeps it in eval mode (no dropout)

    @torch.no_grad()
    def reset_lora_parameters(self):
        # As peft (init_lora_weights=True): A ~ nn.Linear's default init, B = 0.
        nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))
        nn.init.zeros_(self.lora_B.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        result = self.base_layer(x)
        # The low-rank path runs in the adapter's dtype (fp32), as peft computes it; `compute_dtype` (train.py's
        # --lora_in_compute_dtype) runs its matmuls in the model's bf16 instead, as qlora.py's --bf16 casts its
        # LoRA layers, while the weights stay fp32 (their gradients arrive through the casts). bench/NOTES.md #2.
        dtype = self.compute_dtype or self.lora_A.weight.dtype
        a, b = self.lora_A.weight.to(dtype), self.lora_B.weight.to(dtype)  # no-ops in the default fp32
        x = self.lora_dropout(x)
        exact_scale = math.frexp(self.scaling)[0] == 0.5
        fast = exact_scale and fused.active(x)  # inference on a GPU: the same bits in fewer kernels (fused.py)
        h = F.linear(fused.cast_shared(x, dtype) if fast else x.to(dtype), a)  # (..., r)
        if fast:  # scale, cast and add in one kernel
            return fused.add_lora(result, F.linear(h, b), self.scaling, isinstance(self.base_layer, Linear4bit))
        if exact_scale:  # 2^k scales exactly: the same bits on the r-wide tensor
            # (alpha 16 / r 64 = 0.25 as in QLoRA) as on the out-wide one, for a fraction of the work
            h = F.linear(h * self.scaling, b)  # (..., out)
        else:
            h = F.linear(h, b) * self.scaling  # (..., out), peft's order
        if isinstance(self.base_layer, Linear4bit):
            # peft's 4-bit layer (tuners/lora/bnb.py) casts the low-rank output to the result's dtype,
            # then adds: a bf16 model scores exactly as transformers + peft (the course's ppl.py) do.
            return result + h.to(result.dtype)
        return (result + h).to(result.dtype)  # peft's 16-bit layer (tuners/lora/layer.py) adds, then casts

    @torch.no_grad()
    def merged_weight(self) -> torch.Tensor:
        """W0 + scaling * B @ A, in the base layer's (compute) dtype."""
        base = self.base_layer
        w0 = base.dequantize() if isinstance(base, Linear4bit) else base.weight
        delta = (self.lora_B.weight.float() @ self.lora_A.weight.float()) * self.scaling
        return (w0.float() + delta.to(w0.device)).to(w0.dtype)

    def extra_repr(self) -> str:
        return f"r={self.r}, alpha={self.alpha}, scaling={self.scaling:g}"


def set_compute_dtype(model: nn.Module, dtype: torch.dtype | None):
    """Run every LoRA layer's low-rank matmuls in `dtype` (None: in the adapter weights' own fp32)."""
    for m in lora_modules(model).values():
        m.compute_dtype = dtype


@contextlib.contextmanager
def computing_in(model: nn.Module, dtype: torch.dtype | None):
    """`set_compute_dtype` inside the block; each layer's previous setting after it."""
    before = {name: m.compute_dtype for name, m in lora_modules(model).items()}
    set_compute_dtype(model, dtype)
    try:
        yield
    finally:
        for name, m in lora_modules(model).items():
            m.compute_dtype = before.get(name)


def _is_target(name: str, targets: list[str]) -> str | None:
    # Like peft's target_modules list: a target matches the full name or a dotted suffix of it.
    for t in targets:
        if name == t or name.endswith("." + t):
            return t
    return None


def target_module_names(model: nn.Module, targets: str | list[str] = "all", *, each_must_match: bool = True
                        ) -> list[str]:
    """Names of the linear modules `apply_lora` would wrap, in model order. each_must_match=False (a peft
    adapter's list, which may name modules of other architectures, as peft allows): one match is enough."""
    if isinstance(targets, str):
        if targets != "all":
            raise ValueError(f'targets must be "all" or a list of module names, got {targets!r}')
        return [
            name
            for name, m in model.named_modules()
            if isinstance(m, LINEAR_TYPES) and name.split(".")[-1] not in EXCLUDED_FROM_ALL
        ]
    targets = list(targets)
    if not targets:
        raise ValueError("targets is an empty list: nothing to put LoRA on")
    names, matched = [], set()
    for name, m in model.named_modules():
        t = _is_target(name, targets)
        if t is None:
            continue
        if not isinstance(m, LINEAR_TYPES):
            raise ValueError(
                f"LoRA target {t!r} matches module {name!r} of type {type(m).__name__}, "
                "which is not a linear layer (nn.Linear or Linear4bit)"
            )
        names.append(name)
        matched.add(t)
    unmatched = [t for t in targets if t not in matched]
    if unmatched and each_must_match:
        raise ValueError(f"LoRA target {unmatched[0]!r} matches no module of the model")
    if not names:
        raise ValueError(f"no LoRA target of {targets} matches a module of the model")
    return names


def lora_modules(model: nn.Module) -> dict[str, LoRALinear]:
    return {name: m for name, m in model.named_modules() if isinstance(m, LoRALinear)}


def _replace(model: nn.Module, name: str, new: nn.Module):
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new)


def apply_lora(
    model: nn.Module,
    r: int,
    alpha: float,
    dropout: float = 0.0,
    targets: str | list[str] = "all",
    *,
    freeze: bool = True,
    verbose: bool = True,
) -> list[str]:
    """Wrap each targeted linear in a LoRALinear, in place; return the wrapped names.

    `targets="all"`: every nn.Linear / Linear4bit except lm_head. A list: module
    names or dotted suffixes, e.g. ["q_proj", "v_proj"]; each must match.
    Then, unless freeze=False, `freeze_base(model)`: only lora_A/lora_B stay trainable,
    and the counts are printed (verbose).
    """
    existing = lora_modules(model)
    if existing:
        raise ValueError(f"model already has LoRA layers (e.g. {next(iter(existing))!r}); apply_lora once")
    names = target_module_names(model, targets)
    if not names:
        raise ValueError("apply_lora: the model has no linear layer to wrap")
    for name in names:
        _replace(model, name, LoRALinear(model.get_submodule(name), r, alpha, dropout))
    if freeze:
        freeze_base(model, verbose=verbose)
    return names


def _num_params(p: torch.Tensor) -> int:
    # A 4-bit weight holds two codes per byte: count the weights it stands for (as peft does).
    if isinstance(p, Params4bit):
        return p.numel() * 2 * p.element_size()
    return p.numel()


def count_parameters(model: nn.Module) -> tuple[int, int]:
    """(trainable, total), a 4-bit weight counted as in_features * out_features."""
    trainable = total = 0
    for p in model.parameters():  # shared (tied) parameters are yielded once
        n = _num_params(p)
        total += n
        if p.requires_grad:
            trainable += n
    return trainable, total


def freeze_base(model: nn.Module, verbose: bool = True) -> tuple[int, int]:
    """requires_grad=True only on lora_A / lora_B weights; print and return the counts."""
    if not lora_modules(model):
        raise ValueError("freeze_base: the model has no LoRA layers; call apply_lora first")
    for p in model.parameters():
        p.requires_grad_(False)
    for m in lora_modules(model).values():
        m.lora_A.weight.requires_grad_(True)
        m.lora_B.weight.requires_grad_(True)
    trainable, total = count_parameters(model)
    if verbose:
        print(
            f"trainable params: {trainable:,d} || all params: {total:,d} "
            f"|| trainable%: {100 * trainable / total:.4f}"
        )
    return trainable, total


@torch.no_grad()
def merge_lora(model: nn.Module) -> nn.Module:
    """Replace every LoRALinear by a plain nn.Linear holding W0 + B A * alpha / r.

    A 4-bit base is de-quantized to its compute dtype first, so the result is
    a 16-bit (or fp32) model ready to be saved as a Hugging Face checkpoint.
    """
    for name, m in lora_modules(model).items():
        w = m.merged_weight()
        bias = getattr(m.base_layer, "bias", None)
        merged = nn.Linear(m.in_features, m.out_features, bias=bias is not None, device=w.device, dtype=w.dtype)
        merged.weight.copy_(w)
        merged.weight.requires_grad_(m.base_layer.weight.requires_grad)  # frozen if the base was
        if bias is not None:
            merged.bias.copy_(bias)
            merged.bias.requires_grad_(bias.requires_grad)
        _replace(model, name, merged)
    return model
