"""4-bit (NF4 / FP4) frozen linear layer, quantized through bitsandbytes.

QLoRA paper (arXiv 2305.14314) §2-3: the frozen base weights are stored in
4-bit NormalFloat (NF4), optionally with Double Quantization of the
quantization constants, and de-quantized to the 16-bit compute dtype on the
fly inside every matmul. Gradients flow through the layer to its input (for
the LoRA adapters upstream) but the 4-bit weight itself is never trained.

What is stored, per linear layer of shape (out_features, in_features):
  * `weight`: the 4-bit codes, two per byte, flattened to a uint8 tensor of
    shape (out*in/2, 1) (a `bitsandbytes.nn.Params4bit`). Each code indexes a
    16-entry table: NF4 = quantiles of N(0, 1) scaled to [-1, 1]; FP4 = a
    tiny float format.
  * `weight.quant_state.absmax`: one scale per block of `blocksize` (64)
    consecutive weights, the block's absolute maximum.
  * with double quant: those absmax values are themselves quantized to 8 bits
    in blocks of 256 (`quant_state.state2`), after subtracting their mean (an
    fp32 `offset`). That takes the constants from 32/64 = 0.5 bit/param to
    8/64 + 32/(64*256) ~= 0.127 bit/param.

When quantization happens: at load time, tensor by tensor. The loader hands
each 16-bit checkpoint tensor (already on its target device) to
`quantize_linear_weight`, which returns this module; the 16-bit tensor can be
freed at once, so the model never holds its full 16-bit weights.

Checked against `bitsandbytes.nn.Linear4bit` (same packed bytes, same
outputs; see tests/test_nf4.py). Unlike it, this module has no bias (Llama
has none), no lazy quantize-on-`.to(device)` and no CPU repacking. Its
`state_dict()` holds only the packed codes, not the quant_state: to persist a
model, save the 16-bit checkpoint (or just the LoRA adapter) and re-quantize.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import bitsandbytes as bnb
import bitsandbytes.functional as bnbF
from bitsandbytes.nn import Params4bit

QUANT_TYPES = ("nf4", "fp4")


class Linear4bit(nn.Module):
    """y = x @ dequant(W).T, computed in `compute_dtype`; W frozen in 4-bit."""

    def __init__(self, weight: Params4bit, compute_dtype: torch.dtype):
        super().__init__()
        out_features, in_features = weight.quant_state.shape
        self.in_features = in_features
        self.out_features = out_features
        self.compute_dtype = compute_dtype
        # Params4bit is an nn.Parameter subclass that carries its QuantState
        # (absmax, code table, nested state) and moves it along in `.to()`,
        # so `module.to(device)` moves codes and constants together.
        self.weight = weight

    @property
    def quant_state(self) -> bnbF.QuantState:
        return self.weight.quant_state

    @property
    def quant_type(self) -> str:
        return self.weight.quant_state.quant_type

    @property
    def double_quant(self) -> bool:
        return self.weight.quant_state.nested

    @property
    def blocksize(self) -> int:
        return self.weight.quant_state.blocksize

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Cast the input to the compute dtype (bf16 in QLoRA), run the fused
        # dequantize+matmul, and hand the result back in the caller's dtype.
        out = bnb.matmul_4bit(x.to(self.compute_dtype), self.weight.t(), quant_state=self.weight.quant_state)
        return out.to(x.dtype)

    @torch.no_grad()
    def dequantize(self) -> torch.Tensor:
        """The (out_features, in_features) weight, de-quantized, in compute dtype."""
        w = bnbF.dequantize_4bit(self.weight.data, self.weight.quant_state)
        return w.to(self.compute_dtype)

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, "
            f"quant_type={self.quant_type}, double_quant={self.double_quant}, "
            f"blocksize={self.blocksize}, compute_dtype={self.compute_dtype}"
        )


def quantize_linear_weight(
    weight: torch.Tensor,
    *,
    quant_type: str = "nf4",
    double_quant: bool = True,
    compute_dtype: torch.dtype | None = None,
    blocksize: int = 64,
) -> Linear4bit:
    """Quantize one (out, in) linear weight on its current device -> Linear4bit.

    `compute_dtype=None` means the weight's own dtype. The input tensor is not
    kept (the caller may free it afterwards).
    """
    if quant_type not in QUANT_TYPES:
        raise ValueError(f"quant_type must be one of {QUANT_TYPES}, got {quant_type!r}")
    if weight.dim() != 2:
        raise ValueError(f"expected a 2-D (out_features, in_features) weight, got shape {tuple(weight.shape)}")
    if not weight.is_floating_point():
        raise ValueError(f"expected a floating-point weight, got {weight.dtype}")
    if weight.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        weight = weight.to(torch.float32)
    if compute_dtype is None:
        compute_dtype = weight.dtype
    with torch.no_grad():
        packed, quant_state = bnbF.quantize_4bit(
            weight.detach().contiguous(),
            blocksize=blocksize,
            compress_statistics=double_quant,
            quant_type=quant_type,
            quant_storage=torch.uint8,
        )
    param = Params4bit(
        packed,
        requires_grad=False,
        quant_state=quant_state,
        blocksize=blocksize,
        compress_statistics=double_quant,
        quant_type=quant_type,
        quant_storage=torch.uint8,
        bnb_quantized=True,  # already quantized: `.to()` must only move it
    )
    return Linear4bit(param, compute_dtype)


@torch.no_grad()
def dequantize_linears(model: nn.Module) -> nn.Module:
    """Replace every Linear4bit in `model` by an nn.Linear holding its dequantized weight (compute dtype),
    e.g. to write a 16-bit checkpoint from a 4-bit model."""
    for name, m in list(model.named_modules()):
        if isinstance(m, Linear4bit):
            w = m.dequantize()
            plain = nn.Linear(m.in_features, m.out_features, bias=False, device=w.device, dtype=w.dtype)
            plain.weight.copy_(w)
            plain.weight.requires_grad_(False)
            parent_name, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent_name) if parent_name else model, child, plain)
    return model
