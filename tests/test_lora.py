"""lora.py against peft's lora.Linear: outputs, gradients, init, merging, wrapping, freezing."""

import copy
import math

import pytest
import torch
import torch.nn as nn
from peft import LoraConfig, get_peft_model

from _tiny import pair
from minqlora.lora import (
    LoRALinear, apply_lora, count_parameters, freeze_base, lora_modules, merge_lora, target_module_names,
)
from minqlora.nf4 import Linear4bit, quantize_linear_weight

IN, OUT, R, ALPHA = 32, 24, 4, 8


class Toy(nn.Module):
    """Just enough of a causal LM to exercise module selection."""

    def __init__(self, bias=False):
        super().__init__()
        self.embed = nn.Embedding(10, IN)
        self.block = nn.ModuleDict(dict(fc=nn.Linear(IN, OUT, bias=bias), proj=nn.Linear(OUT, IN, bias=False)))
        self.norm = nn.LayerNorm(IN)
        self.lm_head = nn.Linear(IN, 10, bias=False)

    def forward(self, x):  # x: (B, T, IN) floats
        h = self.block["proj"](torch.relu(self.block["fc"](x)))
        return self.lm_head(self.norm(h))


def randomize_lora(model, seed=1):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in lora_modules(model).values():
            m.lora_A.weight.copy_(torch.randn(m.lora_A.weight.shape, generator=g) * 0.1)
            m.lora_B.weight.copy_(torch.randn(m.lora_B.weight.shape, generator=g) * 0.1)



def test_bf16_base_matches_peft_bit_for_bit():
    """A bf16 base with fp32 adapters (peft's default, and what the course's ppl.py loads): the LoRA path
    runs in fp32 and is added before the cast back to bf16, exactly as peft's lora.Linear does."""
    torch.manual_seed(0)
    ours = Toy().to(torch.bfloat16)
    ref = get_peft_model(copy.deepcopy(ours), LoraConfig(r=R, lora_alpha=ALPHA, target_modules=["fc", "proj"]))
    apply_lora(ours, r=R, alpha=ALPHA, targets=["fc", "proj"], verbose=False)
    randomize_lora(ours)
    with torch.no_grad():
        for name, m in lora_modules(ours).items():
            theirs = ref.base_model.model.get_submodule(name)
            assert theirs.lora_A["default"].weight.dtype == m.lora_A.weight.dtype == torch.float32
            theirs.lora_A["default"].weight.copy_(m.lora_A.weight)
            theirs.lora_B["default"].weight.copy_(m.lora_B.weight)
    x = torch.randn(3, 5, IN, dtype=torch.bfloat16)
    with torch.no_grad():
        y, y_ref = ours(x), ref(x)
    assert y.dtype == torch.bfloat16 and torch.equal(y, y_ref)

@pytest.mark.parametrize("bias", [False, True])
def test_matches_peft_outputs_and_grads(bias):
    torch.manual_seed(0)
    ours = Toy(bias=bias)
    ref = get_peft_model(copy.deepcopy(ours), LoraConfig(r=R, lora_alpha=ALPHA, lora_dropout=0.0,
                                                         target_modules=["fc", "proj"]))
    assert apply_lora(ours, r=R, alpha=ALPHA, dropout=0.0, targets=["fc", "proj"]) == ["block.fc", "block.proj"]
    randomize_lora(ours)
    ref_layers = {"block.fc": ref.base_model.model.block["fc"], "block.proj": ref.base_model.model.block["proj"]}
    with torch.no_grad():
        for name, m in lora_modules(ours).items():
            ref_layers[name].lora_A["default"].weight.copy_(m.lora_A.weight)
            ref_layers[name].lora_B["default"].weight.copy_(m.lora_B.weight)
            assert ref_layers[name].scaling["default"] == m.scaling == ALPHA / R

    x = torch.randn(2, 5, IN)
    y, y_ref = ours(x), ref(x)
    torch.testing.assert_close(y, y_ref, rtol=0, atol=1e-6)
    g = torch.randn_like(y)
    y.backward(g)
    y_ref.backward(g)
    for name, m in lora_modules(ours).items():
        assert m.lora_B.weight.grad.abs().sum() > 0
        torch.testing.assert_close(m.lora_A.weight.grad, ref_layers[name].lora_A["default"].weight.grad, rtol=0, atol=1e-6)
        torch.testing.assert_close(m.lora_B.weight.grad, ref_layers[name].lora_B["default"].weight.grad, rtol=0, atol=1e-6)


def test_zero_B_leaves_base_output_unchanged():
    torch.manual_seed(0)
    base = nn.Linear(IN, OUT, bias=False)
    x = torch.randn(3, IN)
    y0 = base(x)
    layer = LoRALinear(base, r=R, alpha=ALPHA)
    assert torch.equal(layer(x), y0)
    with torch.no_grad():
        layer.lora_B.weight.fill_(0.01)
    assert not torch.allclose(layer(x), y0)


def test_init_matches_peft_and_kaiming_bound():
    fan_in = 256
    torch.manual_seed(0)
    layer = LoRALinear(nn.Linear(fan_in, 64, bias=False), r=16, alpha=32)
    A, B = layer.lora_A.weight, layer.lora_B.weight
    assert A.shape == (16, fan_in) and B.shape == (64, 16)
    assert torch.count_nonzero(B) == 0
    bound = 1 / math.sqrt(fan_in)  # kaiming_uniform_(a=sqrt(5)): gain sqrt(1/3) * sqrt(3 / fan_in)
    assert A.abs().max() <= bound and A.abs().max() > 0.99 * bound
    assert abs(A.std().item() - bound / math.sqrt(3)) < 0.05 * bound  # uniform(-b, b) has std b/sqrt(3)
    # Same seed, same draws: peft's lora.Linear initialises A identically.
    torch.manual_seed(0)
    base = nn.Linear(fan_in, 64, bias=False)
    ref = get_peft_model(nn.Sequential(base), LoraConfig(r=16, lora_alpha=32, target_modules=["0"]))
    torch.testing.assert_close(ref.base_model.model[0].lora_A["default"].weight, A, rtol=0, atol=0)


def test_fp32_master_weights_with_bf16_compute():
    torch.manual_seed(0)
    base = nn.Linear(IN, OUT, bias=False).to(torch.bfloat16)
    layer = LoRALinear(base, r=R, alpha=ALPHA)
    assert layer.lora_A.weight.dtype == layer.lora_B.weight.dtype == torch.float32
    with torch.no_grad():
        layer.lora_B.weight.normal_()
    x = torch.randn(2, IN, dtype=torch.bfloat16)
    y = layer(x)
    assert y.dtype == torch.bfloat16
    y.float().sum().backward()
    assert layer.lora_A.weight.grad.dtype == torch.float32 and layer.lora_B.weight.grad.abs().sum() > 0
    exact = base(x).float() + (x.float() @ layer.lora_A.weight.t() @ layer.lora_B.weight.t()) * layer.scaling
    torch.testing.assert_close(y.float(), exact, rtol=3e-2, atol=3e-2)


def test_dropout_only_on_lora_path_in_train_mode():
    torch.manual_seed(0)
    layer = LoRALinear(nn.Linear(IN, OUT, bias=False), r=R, alpha=ALPHA, dropout=0.5)
    assert isinstance(layer.lora_dropout, nn.Dropout)
    assert isinstance(LoRALinear(nn.Linear(IN, OUT), r=R, alpha=ALPHA).lora_dropout, nn.Identity)
    with torch.no_grad():
        layer.lora_B.weight.normal_()
    x = torch.randn(4, IN)
    layer.train()
    assert not torch.allclose(layer(x), layer(x))
    # Wrapping keeps the base layer's mode: an eval-mode model stays deterministic after apply_lora.
    assert not LoRALinear(nn.Linear(IN, OUT).eval(), r=R, alpha=ALPHA, dropout=0.5).training
    layer.eval()
    no_drop = layer.base_layer(x) + x @ layer.lora_A.weight.t() @ layer.lora_B.weight.t() * layer.scaling
    torch.testing.assert_close(layer(x), no_drop)


def test_merge_equals_unmerged():
    torch.manual_seed(0)
    model = Toy(bias=True)
    apply_lora(model, r=R, alpha=ALPHA, targets="all")
    randomize_lora(model)
    x = torch.randn(2, 3, IN)
    y = model(x)
    merged = merge_lora(model)
    assert merged is model and not lora_modules(model)
    assert type(model.block["fc"]) is nn.Linear and model.block["fc"].bias is not None
    assert set(model.state_dict()) == set(Toy(bias=True).state_dict())  # plain HF-style names again
    torch.testing.assert_close(model(x), y, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("compute_dtype", [torch.float32, torch.bfloat16])
def test_merge_equals_unmerged_4bit(compute_dtype):
    torch.manual_seed(0)
    w = torch.randn(OUT, IN, dtype=compute_dtype) * 0.05
    layer = LoRALinear(quantize_linear_weight(w, compute_dtype=compute_dtype), r=R, alpha=ALPHA)
    randomize_lora(nn.Sequential(layer))
    x = torch.randn(5, IN, dtype=compute_dtype)
    y = layer(x)
    model = merge_lora(nn.Sequential(layer))
    merged = model[0]
    assert type(merged) is nn.Linear and merged.weight.dtype == compute_dtype
    tol = 1e-5 if compute_dtype == torch.float32 else 3e-2
    torch.testing.assert_close(merged(x), y, rtol=tol, atol=tol)
    # The merged weight is the de-quantized one plus the update, not the original w.
    dq = layer.base_layer.dequantize().float()
    delta = (layer.lora_B.weight @ layer.lora_A.weight) * layer.scaling
    torch.testing.assert_close(merged.weight.float(), (dq + delta).to(compute_dtype).float())


def test_apply_lora_all_skips_lm_head_and_freeze_counts(capsys):
    torch.manual_seed(0)
    model = Toy()
    total_before = sum(p.numel() for p in model.parameters())
    wrapped = apply_lora(model, r=R, alpha=ALPHA, targets="all")
    assert wrapped == ["block.fc", "block.proj"]
    assert isinstance(model.block["fc"], LoRALinear) and type(model.lm_head) is nn.Linear
    names = dict(model.named_parameters())
    assert {"block.fc.base_layer.weight", "block.fc.lora_A.weight", "block.fc.lora_B.weight"} <= set(names)
    trainable, total = freeze_base(model)
    expected = R * IN + OUT * R + R * OUT + IN * R
    assert trainable == expected and total == total_before + expected
    assert {n for n, p in model.named_parameters() if p.requires_grad} == {
        "block.fc.lora_A.weight", "block.fc.lora_B.weight", "block.proj.lora_A.weight", "block.proj.lora_B.weight"}
    out = capsys.readouterr().out
    assert f"trainable params: {expected:,d} || all params: {total:,d} || trainable%: {100 * expected / total:.4f}" in out


def test_target_errors():
    with pytest.raises(ValueError, match="'k_proj'"):
        apply_lora(Toy(), r=R, alpha=ALPHA, targets=["fc", "k_proj"])
    with pytest.raises(ValueError, match="'norm'.*not a linear"):
        apply_lora(Toy(), r=R, alpha=ALPHA, targets=["norm"])
    with pytest.raises(ValueError, match="all"):
        apply_lora(Toy(), r=R, alpha=ALPHA, targets="everything")
    model = Toy()
    apply_lora(model, r=R, alpha=ALPHA, targets=["fc"])
    with pytest.raises(ValueError, match="already has LoRA"):
        apply_lora(model, r=R, alpha=ALPHA, targets=["proj"])
    with pytest.raises(ValueError, match="apply_lora first"):
        freeze_base(Toy())
    assert target_module_names(Toy(), ["block.fc", "lm_head"]) == ["block.fc", "lm_head"]  # explicit lm_head is fine


def test_llama_counts_match_peft():
    hf, mq = pair()
    targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    ref = get_peft_model(hf, LoraConfig(r=8, lora_alpha=16, target_modules=targets))
    wrapped = apply_lora(mq, r=8, alpha=16, targets="all")
    assert len(wrapped) == 7 * 2 and not any("lm_head" in n for n in wrapped)
    assert freeze_base(mq, verbose=False) == ref.get_nb_trainable_parameters()


def test_qlora_llama_trains_only_adapters():
    hf, mq = pair()
    x = torch.randint(0, 128, (2, 6))
    # Quantize every decoder linear the way the loader does, module by module.
    for name, m in list(mq.named_modules()):
        if isinstance(m, nn.Linear) and name != "lm_head":
            parent, _, child = name.rpartition(".")
            setattr(mq.get_submodule(parent), child, quantize_linear_weight(m.weight.data, double_quant=True))
    n_total_4bit = count_parameters(mq)[1]
    assert n_total_4bit == sum(p.numel() for p in hf.parameters())  # 4-bit weights counted as in*out
    apply_lora(mq, r=4, alpha=8, dropout=0.1, targets="all")
    assert all(isinstance(m.base_layer, Linear4bit) for m in lora_modules(mq).values())
    trainable, total = freeze_base(mq, verbose=False)
    # r * (in + out) per linear: q 64+64, k 64+32, v 64+32, o 64+64, gate/up 64+128, down 128+64; 2 layers
    assert trainable == 4 * (128 + 96 + 96 + 128 + 192 + 192 + 192) * 2
    assert total == n_total_4bit + trainable
    mq.train()
    randomize_lora(mq)
    mq(x).logsumexp(-1).mean().backward()
    grads = {n for n, p in mq.named_parameters() if p.grad is not None}
    assert grads and all(".lora_A." in n or ".lora_B." in n for n in grads)
    assert len(grads) == 2 * 7 * 2  # layers x linears x (A, B)


@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
def test_bf16_4bit_base_matches_peft_bit_for_bit(quant_type):
    """A 4-bit base in bf16 with fp32 adapters: peft's bnb layer casts the low-rank output to bf16 and
    then adds (its 16-bit layer adds first): the course's ppl.py numbers depend on that rounding."""
    import bitsandbytes as bnb
    torch.manual_seed(0)
    w = torch.randn(OUT, IN, dtype=torch.bfloat16)
    ref_base = bnb.nn.Linear4bit(IN, OUT, bias=False, compute_dtype=torch.bfloat16, quant_type=quant_type)
    ref_base.weight = bnb.nn.Params4bit(w, requires_grad=False, quant_type=quant_type)._quantize("cpu")
    ref = nn.Sequential(ref_base)
    ref.is_loaded_in_4bit = True  # what transformers sets on a 4-bit model; peft then picks its bnb layer
    ref = get_peft_model(ref, LoraConfig(r=R, lora_alpha=ALPHA, target_modules=["0"]))
    ours = LoRALinear(Linear4bit(ref_base.weight, torch.bfloat16), R, ALPHA)
    theirs = ref.base_model.model[0]
    assert type(theirs).__module__.endswith("lora.bnb")  # peft's 4-bit layer, the one under test
    with torch.no_grad():
        ours.lora_A.weight.copy_(torch.randn(R, IN) * 0.3)
        ours.lora_B.weight.copy_(torch.randn(OUT, R) * 0.3)
        theirs.lora_A["default"].weight.copy_(ours.lora_A.weight)
        theirs.lora_B["default"].weight.copy_(ours.lora_B.weight)
        x = torch.randn(64, IN, dtype=torch.bfloat16)
        y, y_ref = ours(x), ref(x)
        added_in_fp32 = (ours.base_layer(x) + (x.float() @ ours.lora_A.weight.T @ ours.lora_B.weight.T)
                         * ours.scaling).to(torch.bfloat16)
    assert y.dtype == y_ref.dtype == torch.bfloat16
    assert torch.equal(y, y_ref)
    assert not torch.equal(y, added_in_fp32)  # the test can tell the two roundings apart



@pytest.mark.parametrize("alpha", [16, 24])  # scaling 0.25 (scaled on the r-wide tensor) and 0.375 (peft's order)
def test_power_of_two_scaling_gives_peft_bits(alpha):
    """With a power-of-two scaling the low-rank output is scaled before lora_B, bit for bit what peft's
    `lora_B(lora_A(x)) * scaling` gives; other scalings use peft's order itself."""
    torch.manual_seed(0)
    layer = LoRALinear(nn.Linear(IN, OUT, bias=False), 64, alpha)
    with torch.no_grad():
        layer.lora_B.weight.normal_()
        x = torch.randn(257, IN)
        peft_order = layer.base_layer(x) + (x @ layer.lora_A.weight.T @ layer.lora_B.weight.T) * layer.scaling
        assert torch.equal(layer(x), peft_order)


def test_lora_in_compute_dtype_matches_qlora_py_casts():
    """`compute_dtype` (train.py's --lora_in_compute_dtype) on a bf16 4-bit base: the outputs and the A / B
    gradients of peft's layer after qlora.py's cast of its LoRA modules to bf16, bit for bit, while our
    weights and their gradients stay fp32. `computing_in` restores the fp32 path after its block."""
    import bitsandbytes as bnb
    from minqlora.lora import computing_in, set_compute_dtype
    torch.manual_seed(0)
    w = torch.randn(OUT, IN, dtype=torch.bfloat16)
    ref_base = bnb.nn.Linear4bit(IN, OUT, bias=False, compute_dtype=torch.bfloat16, quant_type="nf4")
    ref_base.weight = bnb.nn.Params4bit(w, requires_grad=False, quant_type="nf4")._quantize("cpu")
    ref = nn.Sequential(ref_base)
    ref.is_loaded_in_4bit = True
    ref = get_peft_model(ref, LoraConfig(r=R, lora_alpha=ALPHA, target_modules=["0"]))
    ours = nn.Sequential(LoRALinear(Linear4bit(ref_base.weight, torch.bfloat16), R, ALPHA))
    theirs = ref.base_model.model[0]
    with torch.no_grad():
        ours[0].lora_A.weight.copy_(torch.randn(R, IN) * 0.3)
        ours[0].lora_B.weight.copy_(torch.randn(OUT, R) * 0.3)
        theirs.lora_A["default"].weight.copy_(ours[0].lora_A.weight)
        theirs.lora_B["default"].weight.copy_(ours[0].lora_B.weight)
    for n, mod in ref.named_modules():  # qlora.py, after get_peft_model, under --bf16
        if "lora_" in n:
            mod.to(torch.bfloat16)
    x = torch.randn(64, IN, dtype=torch.bfloat16)
    fp32_path = ours(x).detach()
    set_compute_dtype(ours, torch.bfloat16)
    y, y_ref = ours(x), ref(x)
    assert y.dtype == y_ref.dtype == torch.bfloat16 and torch.equal(y, y_ref)
    assert not torch.equal(y, fp32_path)  # the test tells the two paths apart
    y.float().square().sum().backward()
    y_ref.float().square().sum().backward()
    for name in ("lora_A", "lora_B"):
        mine, peft_w = getattr(ours[0], name).weight, getattr(theirs, name)["default"].weight
        assert mine.dtype == mine.grad.dtype == torch.float32 and peft_w.grad.dtype == torch.bfloat16
        assert torch.equal(mine.grad, peft_w.grad.float())
    with computing_in(ours, None):
        assert torch.equal(ours(x), fp32_path)
    assert ours[0].compute_dtype == torch.bfloat16
