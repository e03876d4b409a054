"""fused.py: the fused inference kernels give the plain modules' bits (GPU tests, skipped without CUDA and
Triton), the CPU always runs the plain code, and the one algebraic step they take (the LoRA scale after lora_B
instead of before it) is exact for a power-of-two scale."""
import pytest
import torch
import torch.nn.functional as F

from minqlora import fused
from minqlora.config import LlamaConfig
from minqlora.generate import DecodeGraphs, generate_ids
from minqlora.lora import LoRALinear, apply_lora
from minqlora.model import LlamaForCausalLM, RMSNorm, apply_rope, rope_cos_sin
from minqlora.nf4 import quantize_linear_weight

gpu = pytest.mark.skipif(not fused.available(), reason="needs CUDA and Triton")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_power_of_two_scale_commutes_with_the_matmul(dtype):
    g = torch.Generator().manual_seed(0)
    h = torch.randn(3, 7, 64, generator=g).to(dtype)
    b = torch.randn(1000, 64, generator=g).to(dtype)
    for scale in (0.25, 2.0, 1 / 64):
        assert torch.equal(F.linear(h * scale, b), F.linear(h, b) * scale)


def test_kernels_only_inside_the_block_on_cuda_without_autograd():
    x = torch.randn(2, 3, 64)
    with fused.kernels(), torch.no_grad():
        assert not fused.active(x)  # a CPU tensor: the plain code
    if fused.available():
        x = x.cuda()
        with fused.kernels():
            assert not fused.active(x)  # autograd on: training passes never take them
            with torch.no_grad():
                assert fused.active(x)
        with torch.no_grad():
            assert not fused.active(x)  # outside kernels()


def _wide(shape, dtype, seed=0):
    """Normal values with magnitudes spread over ~10 binades, both signs."""
    g = torch.Generator(device="cuda").manual_seed(seed)
    x = torch.randn(shape, generator=g, device="cuda") * torch.exp2(torch.randint(-5, 6, shape, device="cuda",
                                                                                    generator=g).float())
    return x.to(dtype)


@gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_rms_norm_bits(dtype):
    norm = RMSNorm(4096, 1e-5).cuda().to(dtype)
    with torch.no_grad():
        norm.weight.copy_(_wide((4096,), dtype, 1))
        for shape in [(1, 1, 4096), (2, 64, 4096)]:
            x = _wide(shape, dtype)
            with fused.kernels():
                got = norm(x)
            assert torch.equal(got, norm(x))


@gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_rope_pair_bits(dtype):
    cfg = LlamaConfig(hidden_size=256, num_attention_heads=4, num_key_value_heads=2, intermediate_size=512)
    B, T = 2, 5
    q = _wide((B, T, 4, 64), dtype).transpose(1, 2)  # (B, nh, T, hd) as Attention makes it
    k = _wide((B, T, 2, 64), dtype, 1).transpose(1, 2)  # (B, nkv, T, hd)
    pos = torch.tensor([[0, 1, 2, 3, 4], [7, 100, 2000, 3, 9]], device="cuda")
    cos, sin = rope_cos_sin(cfg, pos, dtype)
    with torch.no_grad():
        fq, fk = fused.rope_pair(q, k, cos, sin)
        assert torch.equal(fq, apply_rope(q, cos, sin)) and torch.equal(fk, apply_rope(k, cos, sin))
        assert fq.stride() == apply_rope(q, cos, sin).stride()


@gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_silu_mul_bits(dtype):
    g, u = _wide((3, 11008), dtype), _wide((3, 11008), dtype, 1)
    g[0, :4] = torch.tensor([100.0, -100.0, 0.0, -0.0])
    with torch.no_grad():
        assert torch.equal(fused.silu_mul(g, u), F.silu(g) * u)


@gpu
@pytest.mark.parametrize("four_bit", [True, False])
@pytest.mark.parametrize("compute_dtype", [None, torch.bfloat16])
def test_lora_layer_bits(four_bit, compute_dtype):
    w = _wide((1024, 512), torch.bfloat16) * 0.02
    base = quantize_linear_weight(w, compute_dtype=torch.bfloat16) if four_bit else torch.nn.Linear(
        512, 1024, bias=False, device="cuda", dtype=torch.bfloat16)
    layer = LoRALinear(base, r=64, alpha=16, dropout=0.1).eval()
    layer.compute_dtype = compute_dtype
    with torch.no_grad():
        layer.lora_B.weight.normal_(0, 0.05)
        for T in (1, 33):
            x = _wide((2, T, 512), torch.bfloat16, T)
            with fused.kernels():
                got = layer(x)
            assert torch.equal(got, layer(x))


@gpu
def test_graph_decode_with_kept_graphs_equals_plain():
    """Greedy tokens of a 4-bit bf16 model with a non-zero adapter: decode="graph" (fused kernels, the graph
    kept in a DecodeGraphs between calls) equals decode="plain", batch by batch, for batches of two shapes."""
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=512, hidden_size=256, intermediate_size=512, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512)
    model = LlamaForCausalLM(cfg).to("cuda", torch.bfloat16)
    for i, layer in enumerate(model.model.layers):
        for name in ("q_proj", "k_proj", "v_proj", "o_proj"):
            lin = getattr(layer.self_attn, name)
            setattr(layer.self_attn, name, quantize_linear_weight(lin.weight.data, compute_dtype=torch.bfloat16))
    apply_lora(model, r=8, alpha=16, targets="all", verbose=False)  # scaling 2: a power of two
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, LoRALinear):
                m.lora_B.weight.normal_(0, 0.05)
    model.eval()
    graphs = DecodeGraphs(keep=2)
    # Each shape three times: the prompt runs eagerly, then is captured, then replayed.
    batches = [[[5, 9, 13, 2]], [[7, 3, 3, 1]], [[11, 4], [6, 6, 6, 6, 6]], [[8, 100, 3, 4]],
               [[2, 4], [9, 9, 9, 9, 9]], [[12, 4, 5], [6, 7, 6, 6, 6]], [[1, 2, 3, 4]]]
    for prompts in batches:
        kw = dict(eos_ids=[], max_new_tokens=20)
        plain = generate_ids(model, prompts, decode="plain", **kw)
        assert generate_ids(model, prompts, decode="graph", graphs=graphs, **kw) == plain
    assert len(graphs.decoders) == 2  # batch sizes 1 and 2, one slot bucket
    for decoder in graphs.decoders.values():  # each captured its prompt's forward (length 4; length 5)
        assert len(decoder.prefills) == 1
