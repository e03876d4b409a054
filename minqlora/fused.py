"""Fused kernels for inference on a GPU: the same arithmetic as the plain modules, in fewer launches.

Why: a batch-1 decode step of a 7B is ~2,900 kernels, most of them elementwise ops on a few thousand
numbers, and a CUDA graph still pays ~3 us for each (bench/NOTES.md #22). These Triton kernels do the work
of several of them in one, rounding where the plain code rounds (and never contracting a multiply and an
add into one FMA, which would skip a rounding), so they give the same bits, not merely close numbers: a
greedy decode of a random 7B, whose top logits are near-tied, then picks the same tokens (the benchmark's
G1 gate; torch.compile's fused kernels round elsewhere and fail it, NOTES #10, #14).

    rms_norm     model.RMSNorm, 8 kernels -> 3: x*x, then torch's own mean (its summation order), then
                 + eps, rsqrt, scale, cast and weight in one.
    rope_pair    model.apply_rope on q and k: 10 kernels -> 2.
    silu_mul     model.MLP's silu(gate) * up: 2 -> 1.
    cast_shared  lora.LoRALinear's cast of its input to fp32, done once for the layers that read one input
                 (q, k, v; gate, up): 7 casts a layer -> 3.
    add_lora     the end of lora.LoRALinear: scale, cast, add: 3 -> 1. The scale is applied after lora_B
                 instead of before it, which gives the same bits when it is a power of two (alpha 16 / r 64):
                 multiplying by 2^k commutes with every rounding of the matmul.

Where: each module asks `active(x)` and calls its kernel, else runs its plain code. Only inside
`with kernels():` (generate.py's CUDA-graph decoding, prompt and steps), under no_grad/inference_mode,
on CUDA tensors, with Triton present; `ALLOWED = False` turns them off everywhere.
No paper section (an implementation matter; gpt-fast fuses the same step with torch.compile instead).
Checked bit for bit against the plain modules on the GPU (tests/test_fused.py, skipped without CUDA)
and by the benchmark's greedy gate; the CPU never runs them.
"""
from __future__ import annotations

import contextlib

import torch

try:  # Triton comes with CUDA builds of torch; a CPU install has none and never needs it
    import triton
    import triton.language as tl
    from triton.language.extra import libdevice
except ImportError:  # pragma: no cover - depends on the install
    triton = None

ALLOWED = True  # set False to run every module's plain code (e.g. to time the difference)
_on = False
_last_cast = None  # cast_shared's (input, dtype, output)


@contextlib.contextmanager
def kernels(on: bool = True):
    """Inside the block, modules use the fused kernels where `active` holds."""
    global _on, _last_cast
    before, _on = _on, on
    try:
        yield
    finally:
        _on, _last_cast = before, None


def available() -> bool:
    return triton is not None and torch.cuda.is_available()


def active(x: torch.Tensor) -> bool:
    return _on and ALLOWED and triton is not None and x.is_cuda and not torch.is_grad_enabled()


if triton is not None:

    @triton.jit
    def _square_kernel(x_ptr, out_ptr, n, BLOCK: tl.constexpr):
        offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        x = tl.load(x_ptr + offs, mask=offs < n).to(tl.float32)
        tl.store(out_ptr + offs, x * x, mask=offs < n)  # torch's pow(x, 2) is x * x

    @triton.jit
    def _norm_scale_kernel(x_ptr, ms_ptr, w_ptr, out_ptr, C, eps, BLOCK: tl.constexpr):
        row = tl.program_id(0)
        offs = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
        m = offs < C
        x = tl.load(x_ptr + row * C + offs, mask=m).to(tl.float32)
        r = libdevice.rsqrt(tl.load(ms_ptr + row) + eps)  # torch.rsqrt: the same rsqrt.approx.f32
        y = (x * r).to(x_ptr.dtype.element_ty)  # x.to(dtype)
        w = tl.load(w_ptr + offs, mask=m).to(tl.float32)
        tl.store(out_ptr + row * C + offs, (w * y.to(tl.float32)).to(out_ptr.dtype.element_ty), mask=m)

    @triton.jit
    def _rope_kernel(x_ptr, cos_ptr, sin_ptr, out_ptr, heads, HD: tl.constexpr):
        row = tl.program_id(0)  # one head of one token: x (B*T*heads, HD), cos/sin (B*T, HD)
        offs = tl.arange(0, HD)
        x = tl.load(x_ptr + row * HD + offs).to(tl.float32)
        partner = tl.load(x_ptr + row * HD + (offs + HD // 2) % HD).to(tl.float32)
        rot = tl.where(offs < HD // 2, -partner, partner)  # rotate_half: cat(-x2, x1)
        c = tl.load(cos_ptr + (row // heads) * HD + offs).to(tl.float32)
        s = tl.load(sin_ptr + (row // heads) * HD + offs).to(tl.float32)
        dt = out_ptr.dtype.element_ty
        a, b = (x * c).to(dt), (rot * s).to(dt)  # each product rounded, as two eager multiplications
        tl.store(out_ptr + row * HD + offs, (a.to(tl.float32) + b.to(tl.float32)).to(dt))

    @triton.jit
    def _silu_mul_kernel(g_ptr, u_ptr, out_ptr, n, BLOCK: tl.constexpr):
        offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        m = offs < n
        g = tl.load(g_ptr + offs, mask=m).to(tl.float32)
        u = tl.load(u_ptr + offs, mask=m).to(tl.float32)
        dt = out_ptr.dtype.element_ty
        silu = libdevice.div_rn(g, 1.0 + libdevice.exp(-g)).to(dt)  # torch's silu: x / (1 + exp(-x)), IEEE /
        tl.store(out_ptr + offs, (silu.to(tl.float32) * u).to(dt), mask=m)

    @triton.jit
    def _add_lora_kernel(res_ptr, h_ptr, out_ptr, n, scale, ROUND_FIRST: tl.constexpr, BLOCK: tl.constexpr):
        offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        m = offs < n
        r = tl.load(res_ptr + offs, mask=m).to(tl.float32)
        h = tl.load(h_ptr + offs, mask=m).to(tl.float32) * scale  # exact: scale is a power of two
        dt = out_ptr.dtype.element_ty
        if ROUND_FIRST:  # peft's 4-bit layer: cast the low-rank output, then add
            h = h.to(dt).to(tl.float32)
        tl.store(out_ptr + offs, (r + h).to(dt), mask=m)


_BLOCK = 1024
# No contraction of a multiply and an add into one FMA: it skips the rounding the plain code does between
# them (x * cos + rot * sin differed in 1 of 8 elements with it, in fp32 and, through the casts, in bf16).
_EXACT = dict(enable_fp_fusion=False)


def _grid(n):
    return (triton.cdiv(n, _BLOCK),)


def rms_norm(x, weight, eps: float):
    """model.RMSNorm.forward's arithmetic: (..., C) -> (..., C) in weight * x's dtype."""
    x = x.contiguous()
    sq = torch.empty(x.shape, dtype=torch.float32, device=x.device)
    _square_kernel[_grid(x.numel())](x, sq, x.numel(), BLOCK=_BLOCK, **_EXACT)
    ms = sq.mean(-1, keepdim=True)  # (..., 1) torch's reduction, so the sum adds in the plain order
    out = torch.empty(x.shape, dtype=torch.promote_types(weight.dtype, x.dtype), device=x.device)
    C = x.shape[-1]
    grid = (x.numel() // C, triton.cdiv(C, _BLOCK))
    _norm_scale_kernel[grid](x, ms, weight, out, C, eps, BLOCK=_BLOCK, **_EXACT)
    return out


def _rope(x, cos, sin):
    B, h, T, hd = x.shape
    xt = x.transpose(1, 2)  # (B, T, h, hd): the projection's own layout, contiguous
    if not xt.is_contiguous():
        xt = xt.contiguous()
    out = torch.empty_like(xt)  # (B, T, h, hd)
    _rope_kernel[(B * T * h,)](xt, cos.contiguous(), sin.contiguous(), out, h, HD=hd, **_EXACT)
    return out.transpose(1, 2)  # (B, h, T, hd), the strides the plain ops give


def rope_fits(x, cos) -> bool:
    """One program a head needs head_dim a power of two (64, 128), and a cos row for each (batch, token)."""
    B, _, T, hd = x.shape
    return hd & (hd - 1) == 0 and tuple(cos.shape) == (B, T, hd)


def rope_pair(q, k, cos, sin):
    """model.apply_rope on q (B, nh, T, hd) and k (B, nkv, T, hd); cos, sin (B, T, hd)."""
    return _rope(q, cos, sin), _rope(k, cos, sin)


def silu_mul(gate, up):
    """F.silu(gate) * up, elementwise."""
    gate, up = gate.contiguous(), up.contiguous()
    out = torch.empty_like(gate)
    _silu_mul_kernel[_grid(gate.numel())](gate, up, out, gate.numel(), BLOCK=_BLOCK, **_EXACT)
    return out


def cast_shared(x, dtype):
    """x.to(dtype); the previous call's copy when x is the same tensor (held here, so its id is not reused).
    The model never writes into a layer's input, and an inference tensor has no version counter to check."""
    global _last_cast
    if _last_cast is None or _last_cast[0] is not x or _last_cast[1] != dtype:
        _last_cast = (x, dtype, x.to(dtype))
    return _last_cast[2]


def add_lora(result, h, scaling: float, round_first: bool):
    """result + (h * scaling): h (fp32, before scaling) cast to result's dtype first if round_first (peft's
    4-bit layer), else added in fp32 and cast after (its 16-bit layer). scaling must be a power of two."""
    result, h = result.contiguous(), h.contiguous()
    out = torch.empty_like(result)
    _add_lora_kernel[_grid(out.numel())](result, h, out, out.numel(), scaling, ROUND_FIRST=round_first,
                                         BLOCK=_BLOCK, **_EXACT)
    return out
