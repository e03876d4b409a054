"""compiled.py: torch.compile over each decoder layer computes what the eager layers compute (CPU, fp32,
4-bit base + LoRA, gradient checkpointing), and a checkpointed compiled layer recomputes the dropout masks
its forward drew. Each compilation takes seconds on the CPU: one model, a few shapes."""
import json

import pytest
import torch
from safetensors.torch import load_file
import torch.nn as nn
from torch._dynamo.utils import counters

from minqlora import compiled
from minqlora.config import LlamaConfig
from minqlora.errors import BadInput
from minqlora.lora import apply_lora, lora_modules
from minqlora.model import LlamaForCausalLM
from minqlora.nf4 import quantize_linear_weight

from _fixtures_train import fast_args, needs_tiny, train_main, write_records
from _tiny import TINY

pytestmark = pytest.mark.skipif(not hasattr(torch.compiler, "set_stance"), reason="needs torch >= 2.6")


def tiny_qlora(dropout):
    torch.manual_seed(0)
    m = LlamaForCausalLM(LlamaConfig(**TINY))
    for name, mod in list(m.named_modules()):
        if isinstance(mod, nn.Linear) and name != "lm_head":
            parent, _, child = name.rpartition(".")
            setattr(m.get_submodule(parent), child, quantize_linear_weight(mod.weight.data, compute_dtype=torch.float32))
    apply_lora(m, r=8, alpha=16, dropout=dropout, targets="all", verbose=False)
    with torch.no_grad():  # a non-zero B, so that lora_A gets gradients too
        for mod in lora_modules(m).values():
            mod.lora_B.weight.normal_(0, 0.05)
    m.model.gradient_checkpointing = True
    return m.train()


def loss_and_grads(m, ids, seed=0):
    m.zero_grad(set_to_none=True)
    torch.manual_seed(seed)
    logits = m(ids)
    loss = nn.functional.cross_entropy(logits.float()[:, :-1].flatten(0, 1), ids[:, 1:].flatten())
    loss.backward()
    return loss.item(), torch.cat([p.grad.flatten() for p in m.parameters() if p.grad is not None])


@pytest.fixture(scope="module")
def model():
    m = tiny_qlora(dropout=0.0)
    eager = {T: loss_and_grads(m, torch.randint(3, 128, (2, T), generator=torch.Generator().manual_seed(T)))
             for T in (16, 24, 40)}
    assert compiled.compile_layers(m) == TINY["num_hidden_layers"]
    return m, eager


def test_compiled_layers_equal_eager_ones(model):
    m, eager = model
    counters.clear()
    for T, (ref_loss, ref_grad) in eager.items():  # 24 and 40: the length becomes a symbol, then reused
        loss, grad = loss_and_grads(m, torch.randint(3, 128, (2, T), generator=torch.Generator().manual_seed(T)))
        assert loss == pytest.approx(ref_loss, rel=1e-6)
        torch.testing.assert_close(grad, ref_grad, rtol=1e-4, atol=1e-7)
        assert grad.abs().max() > 0
    assert not counters["graph_break"], dict(counters["graph_break"])  # one graph a layer: all of it fused
    assert counters["stats"]["unique_graphs"] >= 1  # it did compile
    with compiled.eager():  # the stance: the same numbers, eagerly (what evaluation runs)
        loss, grad = loss_and_grads(m, torch.randint(3, 128, (2, 16), generator=torch.Generator().manual_seed(16)))
    assert loss == eager[16][0]
    assert torch.equal(grad, eager[16][1])


def test_checkpointed_compiled_layer_recomputes_its_dropout_masks():
    """Checkpointing recomputes each layer in backward; if the recomputation drew other dropout masks than
    the forward, the gradient would not be the forward's loss's gradient. Compiled with and without
    checkpointing, from the same seed: the same loss (same masks) and the same gradient."""
    m = tiny_qlora(dropout=0.3)
    compiled.compile_layers(m)
    ids = torch.randint(3, 128, (2, 16), generator=torch.Generator().manual_seed(1))
    m.model.gradient_checkpointing = False
    loss_plain, grad_plain = loss_and_grads(m, ids, seed=5)
    m.model.gradient_checkpointing = True
    loss_ckpt, grad_ckpt = loss_and_grads(m, ids, seed=5)
    assert loss_ckpt == pytest.approx(loss_plain, rel=1e-6)
    torch.testing.assert_close(grad_ckpt, grad_plain, rtol=1e-4, atol=1e-7)
    loss_other, _ = loss_and_grads(m, ids, seed=6)
    assert loss_other != pytest.approx(loss_plain, rel=1e-6)  # dropout is on: another seed, other masks


def test_choose():
    cpu = torch.device("cpu")
    assert compiled.choose(False, False, cpu) == (False, None)
    on, words = compiled.choose(True, False, cpu)
    assert on and "--torch_compile" in words
    with pytest.raises(BadInput, match="--cuda_graphs"):
        compiled.choose(True, True, torch.device("cuda"))


@needs_tiny
def test_train_py_with_torch_compile_trains_as_without(tmp_path, capsys):
    """--torch_compile through train.py: the trainer compiles the layers, says so, evaluates eagerly, and the
    adapter after 2 steps equals the eager run's (float rounding: fused kernels sum in another order)."""
    data = write_records(tmp_path / "d.json", 12)
    flags = dict(max_steps=2, save_steps=2, lora_dropout=0.0, do_eval=True, eval_dataset_size=4,
                 evaluation_strategy="steps", eval_steps=2)
    eager_out, compiled_out = tmp_path / "eager", tmp_path / "compiled"
    assert train_main(fast_args(eager_out, data, **flags)) == 0
    capsys.readouterr()
    assert train_main(fast_args(compiled_out, data, torch_compile=True, **flags)) == 0
    assert "decoder layers compiled with torch.compile" in capsys.readouterr().out
    a = load_file(eager_out / "adapter_model.safetensors")
    b = load_file(compiled_out / "adapter_model.safetensors")
    assert a.keys() == b.keys()
    for k in a:  # atol: Adam's m / sqrt(v) magnifies rounding where a gradient is near 0 (seen: 4.5e-6, lr 1e-3)
        torch.testing.assert_close(b[k], a[k], rtol=1e-4, atol=5e-5, msg=lambda m, k=k: f"{k}: {m}")
    logs = [json.loads(line) for line in (compiled_out / "log.jsonl").read_text().splitlines()]
    eager_logs = [json.loads(line) for line in (eager_out / "log.jsonl").read_text().splitlines()]
    ppl = [r["eval_ppl"] for r in logs if "eval_ppl" in r]
    assert ppl and ppl == pytest.approx([r["eval_ppl"] for r in eager_logs if "eval_ppl" in r], rel=1e-5)
