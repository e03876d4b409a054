"""nf4.py against bitsandbytes.nn.Linear4bit: same packed bytes, same outputs, sane error."""

import copy

import pytest
import torch
import torch.nn as nn
import bitsandbytes as bnb
import bitsandbytes.functional as bnbF

from minqlora.nf4 import Linear4bit, quantize_linear_weight

OUT, IN = 48, 128  # 96 blocks of 64: not a multiple of 256, so the nested last block is partial


def reference(weight, quant_type, double_quant):
    """bitsandbytes' own module, quantized the documented way (load_state_dict, then .to(device))."""
    ref = bnb.nn.Linear4bit(
        weight.shape[1], weight.shape[0], bias=False, compute_dtype=torch.float32,
        compress_statistics=double_quant, quant_type=quant_type,
    )
    ref.load_state_dict({"weight": weight.clone()})
    return ref.to(weight.device).train()  # train(): no CPU-only weight repacking in eval


@pytest.mark.parametrize("double_quant", [False, True])
@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
def test_matches_bitsandbytes_linear4bit(quant_type, double_quant):
    torch.manual_seed(0)
    w = torch.randn(OUT, IN) * 0.02
    ref = reference(w, quant_type, double_quant)
    mine = quantize_linear_weight(w, quant_type=quant_type, double_quant=double_quant, compute_dtype=torch.float32)

    # Same stored bytes and constants.
    assert mine.weight.dtype == torch.uint8
    assert torch.equal(mine.weight.data, ref.weight.data)
    qs, rqs = mine.quant_state, ref.weight.quant_state
    assert torch.equal(qs.absmax, rqs.absmax)
    assert qs.nested == rqs.nested == double_quant
    if double_quant:
        assert qs.absmax.dtype == torch.uint8  # 8-bit quantized constants
        assert torch.equal(qs.state2.absmax, rqs.state2.absmax)
        assert torch.equal(qs.offset, rqs.offset)
        assert qs.state2.blocksize == 256
    else:
        assert qs.absmax.dtype == torch.float32

    # Same outputs, forward and backward to the input.
    x = torch.randn(2, 5, IN)
    x1, x2 = x.clone().requires_grad_(), x.clone().requires_grad_()
    y_ref, y = ref(x1), mine(x2)
    assert y.shape == (2, 5, OUT) and y.dtype == torch.float32
    torch.testing.assert_close(y, y_ref, rtol=0, atol=1e-6)
    g = torch.randn_like(y)
    y_ref.backward(g)
    y.backward(g)
    torch.testing.assert_close(x2.grad, x1.grad, rtol=0, atol=1e-6)
    # And both equal a plain matmul with the de-quantized weight.
    torch.testing.assert_close(y, x @ mine.dequantize().t(), rtol=1e-5, atol=1e-6)


def test_quantization_error_nf4_in_expected_range():
    torch.manual_seed(0)
    w = torch.randn(256, 512)
    for double_quant in (False, True):
        dq = quantize_linear_weight(w, quant_type="nf4", double_quant=double_quant).dequantize()
        rel = (dq - w).abs().mean() / w.abs().mean()
        # NF4 on Gaussian data: about 0.08-0.09 mean relative error per weight (16 levels).
        assert 0.02 < rel < 0.1, rel
    # NF4 beats FP4 on normally distributed weights (QLoRA §3, Table 2's motivation).
    nf4 = (quantize_linear_weight(w, quant_type="nf4", double_quant=False).dequantize() - w).pow(2).mean()
    fp4 = (quantize_linear_weight(w, quant_type="fp4", double_quant=False).dequantize() - w).pow(2).mean()
    assert nf4 < fp4


def test_blockwise_absmax_is_stored_exactly():
    # Every block's largest-magnitude weight maps to code +-1 and dequantizes back exactly.
    torch.manual_seed(0)
    w = torch.randn(16, 64)
    m = quantize_linear_weight(w, quant_type="nf4", double_quant=False)
    assert m.quant_state.absmax.shape == (16,)  # one per 64-weight block
    torch.testing.assert_close(m.quant_state.absmax, w.abs().amax(dim=1))
    dq = m.dequantize()
    idx = w.abs().argmax(dim=1)
    torch.testing.assert_close(dq.gather(1, idx[:, None]), w.gather(1, idx[:, None]))


def test_shapes_dtypes_and_packing():
    w = torch.randn(OUT, IN, dtype=torch.bfloat16)
    m = quantize_linear_weight(w, double_quant=True)
    assert (m.in_features, m.out_features) == (IN, OUT)
    assert m.compute_dtype == torch.bfloat16  # default: the weight's dtype
    assert m.weight.numel() == OUT * IN // 2  # two 4-bit codes per byte
    assert not m.weight.requires_grad
    assert m.dequantize().shape == (OUT, IN) and m.dequantize().dtype == torch.bfloat16
    x = torch.randn(3, IN)  # fp32 input, bf16 compute: result comes back in fp32
    y = m(x)
    assert y.dtype == torch.float32 and y.shape == (3, OUT)
    ref = (x.to(torch.bfloat16) @ m.dequantize().t()).float()
    torch.testing.assert_close(y, ref, rtol=2e-2, atol=2e-2)
    assert "nf4" in repr(m)


def test_compute_dtype_override():
    w = torch.randn(OUT, IN)
    m = quantize_linear_weight(w, compute_dtype=torch.bfloat16)
    assert m.dequantize().dtype == torch.bfloat16
    assert m(torch.randn(2, IN)).dtype == torch.float32


def test_quantize_a_linear_and_refusals():
    torch.manual_seed(0)
    lin = nn.Linear(IN, OUT, bias=False)
    m = quantize_linear_weight(lin.weight.data, quant_type="nf4", double_quant=False)
    assert isinstance(m, Linear4bit)
    x = torch.randn(4, IN)
    rel = (m(x) - lin(x)).abs().mean() / lin(x).abs().mean()
    assert 0 < rel < 0.15
    with pytest.raises(ValueError, match="quant_type"):
        quantize_linear_weight(torch.randn(OUT, IN), quant_type="int4")
    with pytest.raises(ValueError, match="2-D"):
        quantize_linear_weight(torch.randn(IN))


def test_moves_with_module_to_and_deepcopy():
    torch.manual_seed(0)
    w = torch.randn(OUT, IN)
    model = nn.Sequential(quantize_linear_weight(w, double_quant=True))
    x = torch.randn(2, IN)
    y0 = model(x)
    model = model.to(torch.device("cpu"))
    model = model.to(torch.float16)  # a dtype cast must not touch the uint8 codes or fp32 constants
    m = model[0]
    assert m.weight.dtype == torch.uint8 and m.quant_state.offset.dtype == torch.float32
    assert m.weight.device.type == "cpu" and m.quant_state.absmax.device.type == "cpu"
    torch.testing.assert_close(model(x), y0, rtol=0, atol=0)
    clone = copy.deepcopy(m)
    torch.testing.assert_close(clone(x), y0, rtol=0, atol=0)
    if torch.cuda.is_available():
        m_cuda = copy.deepcopy(m).to("cuda")
        assert m_cuda.weight.device.type == "cuda"
        assert m_cuda.quant_state.absmax.device.type == "cuda"
        assert m_cuda.quant_state.state2.absmax.device.type == "cuda"
        torch.testing.assert_close(m_cuda(x.cuda()).cpu(), y0, rtol=1e-4, atol=1e-5)


def test_weight_quantized_on_its_own_device():
    # The loader passes tensors already on the target device; quantization stays there.
    w = torch.randn(OUT, IN)
    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    for dev in devices:
        m = quantize_linear_weight(w.to(dev))
        assert m.weight.device.type == dev and m.quant_state.absmax.device.type == dev
        assert isinstance(m.quant_state, bnbF.QuantState)
