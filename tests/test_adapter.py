"""adapter.py against peft (0.21 and 0.22): adapters written here load in peft and vice versa, same logits."""

import json
import os

import pytest
import safetensors.torch
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from safetensors.torch import load_file, save_file

from _tiny import hf_model, mq_from_hf, pair
from minqlora.adapter import load_adapter, save_adapter
from minqlora.errors import BadInput
from minqlora.lora import apply_lora, lora_modules
from minqlora.nf4 import Linear4bit, quantize_linear_weight

ALL = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
IDS = torch.randint(0, 128, (2, 7), generator=torch.Generator().manual_seed(0))


def randomize(named_params, seed=1):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in named_params:
            if "lora_" in n:
                p.copy_(torch.randn(p.shape, generator=g) * 0.05)


def mq_adapter(tmp_path, targets="all", r=4, alpha=8, seed=0, **overrides):
    """A minqlora model with random nonzero LoRA weights, saved; returns (hf, mq, dir)."""
    hf, mq = pair(seed, **overrides)
    apply_lora(mq, r=r, alpha=alpha, dropout=0.05, targets=targets)
    randomize(mq.named_parameters())
    out = tmp_path / "adapter"
    save_adapter(mq, out, r=r, alpha=alpha, dropout=0.05, targets=targets, base_model_name_or_path="tiny-llama")
    return hf, mq, out


def peft_adapter(tmp_path, safe=True, target_modules=ALL, r=4, alpha=16, seed=0, **overrides):
    hf = hf_model(seed, **overrides)
    base = mq_from_hf(hf)  # a clean copy of the base weights before peft wraps hf in place
    ref = get_peft_model(hf, LoraConfig(r=r, lora_alpha=alpha, target_modules=target_modules, task_type="CAUSAL_LM"))
    randomize(ref.named_parameters())
    out = tmp_path / ("peft_st" if safe else "peft_bin")
    ref.save_pretrained(out, safe_serialization=safe)
    return ref.eval(), base, out


@pytest.mark.parametrize("targets", ["all", ["q_proj", "v_proj"]])
def test_minqlora_to_peft(tmp_path, targets):
    hf, mq, out = mq_adapter(tmp_path, targets)
    assert sorted(os.listdir(out)) == ["adapter_config.json", "adapter_model.safetensors"]
    assert [p for p in os.listdir(tmp_path) if p != "adapter"] == []  # no temp folder left behind
    cfg = json.loads((out / "adapter_config.json").read_text())
    assert cfg["target_modules"] == (sorted(ALL) if targets == "all" else ["q_proj", "v_proj"])
    assert (cfg["peft_type"], cfg["task_type"], cfg["r"], cfg["lora_alpha"]) == ("LORA", "CAUSAL_LM", 4, 8)
    sd = load_file(out / "adapter_model.safetensors")
    assert "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight" in sd
    assert len(sd) == 2 * len(lora_modules(mq)) and all(t.dtype == torch.float32 for t in sd.values())

    base_logits = hf(IDS).logits
    ref = PeftModel.from_pretrained(hf, out).eval()
    assert ref.peft_config["default"].r == 4
    with torch.no_grad():
        ref_logits, logits = ref(IDS).logits, mq.eval()(IDS)
    assert (ref_logits - base_logits).abs().max() > 1e-3  # the adapter does change the model
    torch.testing.assert_close(logits, ref_logits, rtol=0, atol=1e-5)


@pytest.mark.parametrize("safe", [True, False])
def test_peft_to_minqlora(tmp_path, safe):
    ref, mq, out = peft_adapter(tmp_path, safe=safe)
    assert (out / ("adapter_model.safetensors" if safe else "adapter_model.bin")).exists()
    cfg = load_adapter(mq, out)
    assert cfg["r"] == 4 and cfg["lora_alpha"] == 16
    assert len(lora_modules(mq)) == 2 * 7 and lora_modules(mq)["model.layers.1.mlp.up_proj"].scaling == 4
    with torch.no_grad():
        torch.testing.assert_close(mq.eval()(IDS), ref(IDS).logits, rtol=0, atol=1e-5)


def test_peft_all_linear_and_in_memory_key_names(tmp_path):
    ref, mq, out = peft_adapter(tmp_path, target_modules="all-linear")
    # peft's in-memory names carry the adapter name: ...lora_A.default.weight. Accept those too.
    sd = {k: v for k, v in ref.state_dict().items() if "lora_" in k}
    assert all(".default.weight" in k for k in sd)
    os.remove(out / "adapter_model.safetensors")
    save_file(sd, out / "adapter_model.safetensors")
    load_adapter(mq, out)
    assert "lm_head" not in " ".join(lora_modules(mq))
    with torch.no_grad():
        torch.testing.assert_close(mq.eval()(IDS), ref(IDS).logits, rtol=0, atol=1e-5)


def test_load_into_wrapped_model_and_4bit_base(tmp_path):
    hf, mq, out = mq_adapter(tmp_path, targets="all")
    _, fresh = pair(0)
    apply_lora(fresh, r=4, alpha=8, targets="all")  # e.g. resuming: already wrapped
    load_adapter(fresh, out)
    torch.testing.assert_close(fresh(IDS), mq(IDS), rtol=0, atol=0)
    _, other_rank = pair(0)
    apply_lora(other_rank, r=8, alpha=8, targets="all")
    with pytest.raises(BadInput, match="r=4.*r=8"):
        load_adapter(other_rank, out)
    # A 4-bit base: the adapter wraps the Linear4bit layers; logits close to the 16-bit ones.
    _, q = pair(0)
    for name, m in list(q.named_modules()):
        if isinstance(m, torch.nn.Linear) and name != "lm_head":
            parent, _, child = name.rpartition(".")
            setattr(q.get_submodule(parent), child, quantize_linear_weight(m.weight.data))
    load_adapter(q, out)
    assert all(isinstance(m.base_layer, Linear4bit) for m in lora_modules(q).values())
    rel = (q(IDS) - mq(IDS)).abs().mean() / mq(IDS).abs().mean()
    assert rel < 0.2


def edit_config(folder, **changes):
    p = folder / "adapter_config.json"
    cfg = json.loads(p.read_text())
    cfg.update(changes)
    p.write_text(json.dumps(cfg))


def edit_tensors(folder, fn):
    p = folder / "adapter_model.safetensors"
    sd = fn(load_file(p))
    save_file(sd, p)


def assert_refused(folder, match, **overrides):
    _, mq = pair(0, **overrides)
    with pytest.raises(BadInput, match=match):
        load_adapter(mq, folder)
    assert not lora_modules(mq)  # a refused adapter leaves the model untouched


def test_refuses_other_hidden_size(tmp_path):
    _, _, out = mq_adapter(tmp_path, hidden_size=32, intermediate_size=64)
    assert_refused(out, r"adapter_model.safetensors: key 'base_model\.model\.model\.layers\.\d\.[a-z_.]+\.lora_[AB]\.weight' "
                        r"has shape \(\d+, \d+\), expected \(\d+, \d+\)")


def test_refuses_rank_mismatch(tmp_path):
    _, _, out = mq_adapter(tmp_path)
    edit_config(out, r=8)
    assert_refused(out, r"lora_[AB]\.weight' has shape .*rank 8 from adapter_config.json.*the tensor implies rank 4")


def test_refuses_surplus_key(tmp_path):
    _, _, out = mq_adapter(tmp_path, targets=["q_proj"])
    edit_tensors(out, lambda sd: {**sd, "base_model.model.model.layers.0.self_attn.k_proj.lora_A.weight": torch.zeros(4, 64)})
    assert_refused(out, "k_proj.lora_A.weight'.*has no LoRA layer")
    edit_tensors(out, lambda sd: {**{k: v for k, v in sd.items() if "k_proj" not in k},
                                  "base_model.model.model.embed_tokens.lora_embedding_A": torch.zeros(4, 128)})
    assert_refused(out, "unexpected key 'base_model.model.model.embed_tokens.lora_embedding_A'")


def test_refuses_missing_tensor(tmp_path):
    _, _, out = mq_adapter(tmp_path)
    key = "base_model.model.model.layers.1.mlp.down_proj.lora_B.weight"
    edit_tensors(out, lambda sd: {k: v for k, v in sd.items() if k != key})
    assert_refused(out, f"adapter_model.safetensors: no tensor for {key}")


@pytest.mark.parametrize("change,match", [
    ({"use_dora": True}, "use_dora=True is not supported"),
    ({"bias": "all"}, "bias='all' is not supported"),
    ({"modules_to_save": ["lm_head"]}, "modules_to_save"),
    ({"fan_in_fan_out": True}, "fan_in_fan_out"),
    ({"rank_pattern": {"q_proj": 8}}, "rank_pattern"),
    ({"alpha_pattern": {"q_proj": 8}}, "alpha_pattern"),
    ({"use_rslora": True}, "use_rslora"),
    ({"target_modules": ".*proj"}, "regex"),
    ({"target_modules": ["qkv_proj"]}, r"no LoRA target of \['qkv_proj'\] matches"),
    ({"peft_type": "IA3"}, "only LORA"),
    ({"layers_to_transform": 0}, "layers_to_transform=0 is not supported"),  # 0 is set, though falsy
    ({"use_bdlora": {"a": 1}}, "use_bdlora"),
    # PiSSA, OLoRA, LoftQ: peft rebuilds a changed base when it loads these; added to ours, another model
    ({"init_lora_weights": "pissa"}, "init_lora_weights='pissa': peft loads such an adapter onto a changed base"),
    ({"init_lora_weights": "pissa_niter_4"}, "init_lora_weights='pissa_niter_4'"),
    ({"init_lora_weights": "olora"}, "init_lora_weights='olora'"),
    ({"init_lora_weights": "loftq"}, "init_lora_weights='loftq'"),
    ({"init_lora_weights": "corda"}, "init_lora_weights='corda'"),
    # fields of the wrong type: one line naming the field, not a TypeError from deep inside
    ({"r": 4.0}, r"r=4\.0; the rank must be a whole number"),
    ({"r": True}, "r=True; the rank must be a whole number"),
    ({"lora_alpha": "8"}, "lora_alpha='8'; must be a number"),
    ({"lora_dropout": 1.5}, r"lora_dropout=1\.5; must be a number in \[0, 1\)"),
    ({"target_modules": None}, "target_modules=None; must be a list of module names"),
    ({"target_modules": ["q_proj", 3]}, r"target_modules=\['q_proj', 3\]; must be a list"),
])
def test_refuses_unsupported_config(tmp_path, change, match):
    _, _, out = mq_adapter(tmp_path, targets=["q_proj"])
    edit_config(out, **change)
    assert_refused(out, match)


def test_refuses_a_config_that_is_not_an_object(tmp_path):
    _, _, out = mq_adapter(tmp_path, targets=["q_proj"])
    (out / "adapter_config.json").write_text("[1, 2]")
    assert_refused(out, r"adapter_config.json: cannot read it: must hold a JSON object \{...\}, not list")


@pytest.mark.parametrize("init", [False, "gaussian", "orthogonal"])
def test_inits_that_keep_the_base_load(tmp_path, init):
    _, mq, out = mq_adapter(tmp_path, targets=["q_proj"])
    edit_config(out, init_lora_weights=init)
    _, fresh = pair(0)
    load_adapter(fresh, out)
    with torch.no_grad():
        torch.testing.assert_close(fresh.eval()(IDS), mq.eval()(IDS), rtol=0, atol=0)


def test_peft_lm_head_and_a_target_of_another_architecture(tmp_path):
    """As peft loads them: a target that matches nothing here ("query_key_value") is passed over, and the base
    weight peft saves beside a targeted lm_head's LoRA (lm_head.base_layer.weight) is checked against ours."""
    ref, mq, out = peft_adapter(tmp_path, target_modules=["q_proj", "lm_head", "query_key_value"])
    sd = load_file(out / "adapter_model.safetensors")
    assert "base_model.model.lm_head.base_layer.weight" in sd  # what peft writes; the test relies on it
    load_adapter(mq, out)
    assert sorted(lora_modules(mq)) == ["lm_head", "model.layers.0.self_attn.q_proj", "model.layers.1.self_attn.q_proj"]
    with torch.no_grad():
        torch.testing.assert_close(mq.eval()(IDS), ref(IDS).logits, rtol=0, atol=1e-5)
    # a base weight that is not this model's (another base, a resized vocabulary) is refused
    edit_tensors(out, lambda sd: {**sd, "base_model.model.lm_head.base_layer.weight":
                                  sd["base_model.model.lm_head.base_layer.weight"] + 1})
    assert_refused(out, r"key 'base_model.model.lm_head.base_layer.weight' is a base weight \(128, 64\) that "
                        r"differs from this model's lm_head.weight")


def test_refuses_missing_files(tmp_path):
    _, _, out = mq_adapter(tmp_path)
    os.remove(out / "adapter_model.safetensors")
    assert_refused(out, "no adapter_model.safetensors or adapter_model.bin")
    assert_refused(tmp_path / "nowhere", "adapter_config.json")


def test_save_is_atomic_and_keeps_other_files(tmp_path, monkeypatch):
    hf, mq, out = mq_adapter(tmp_path)
    # Overwriting an existing folder replaces our files and keeps the rest.
    (out / "optimizer.pt").write_text("keep me")
    (out / "adapter_model.bin").write_text("stale")
    with torch.no_grad():
        lora_modules(mq)["model.layers.0.self_attn.q_proj"].lora_B.weight.add_(1.0)
    save_adapter(mq, out, r=4, alpha=8, dropout=0.05, targets="all", base_model_name_or_path="tiny-llama")
    assert sorted(os.listdir(out)) == ["adapter_config.json", "adapter_model.safetensors", "optimizer.pt"]
    _, fresh = pair(0)
    load_adapter(fresh, out)
    torch.testing.assert_close(fresh(IDS), mq(IDS), rtol=0, atol=0)

    # A crash mid-write leaves neither a half-written adapter nor a temporary folder.
    def crash(*a, **k):
        raise RuntimeError("disk full")

    monkeypatch.setattr(safetensors.torch, "save_file", crash)
    with pytest.raises(RuntimeError, match="disk full"):
        save_adapter(mq, tmp_path / "new", r=4, alpha=8, dropout=0.0, targets="all", base_model_name_or_path=None)
    assert sorted(os.listdir(tmp_path)) == ["adapter"]
    with pytest.raises(RuntimeError, match="disk full"):
        save_adapter(mq, out, r=4, alpha=8, dropout=0.0, targets="all", base_model_name_or_path=None)
    assert sorted(os.listdir(out)) == ["adapter_config.json", "adapter_model.safetensors", "optimizer.pt"]


def test_save_checks_arguments(tmp_path):
    _, mq = pair(0)
    with pytest.raises(BadInput, match="no LoRA layers"):
        save_adapter(mq, tmp_path / "a", r=4, alpha=8, dropout=0.0, targets="all", base_model_name_or_path=None)
    apply_lora(mq, r=4, alpha=8, targets=["q_proj"])
    with pytest.raises(BadInput, match="r=8"):
        save_adapter(mq, tmp_path / "a", r=8, alpha=8, dropout=0.0, targets="all", base_model_name_or_path=None)
    with pytest.raises(BadInput, match="v_proj"):
        save_adapter(mq, tmp_path / "a", r=4, alpha=8, dropout=0.0, targets=["q_proj", "v_proj"],
                     base_model_name_or_path=None)
    # Wrapping only some q_proj layers: short names would over-match in peft, so full names are written.
    _, mq2 = pair(0)
    apply_lora(mq2, r=4, alpha=8, targets=["layers.1.self_attn.q_proj"])
    save_adapter(mq2, tmp_path / "b", r=4, alpha=8, dropout=0.0, targets=["layers.1.self_attn.q_proj"],
                 base_model_name_or_path=None)
    cfg = json.loads((tmp_path / "b" / "adapter_config.json").read_text())
    assert cfg["target_modules"] == ["model.layers.1.self_attn.q_proj"]
    _, mq3 = pair(0)
    load_adapter(mq3, tmp_path / "b")
    assert list(lora_modules(mq3)) == ["model.layers.1.self_attn.q_proj"]



@pytest.mark.parametrize("name", ["adapter_model.safetensors", "adapter_model.bin"])
def test_refuses_a_corrupt_adapter_file(tmp_path, name):
    _, _, out = mq_adapter(tmp_path)
    st = out / "adapter_model.safetensors"
    data = st.read_bytes()
    st.unlink()
    (out / name).write_bytes(data[: len(data) // 2] if name.endswith("safetensors") else b"not a pickle")
    _, fresh = pair(0)
    with pytest.raises(BadInput, match=rf"{name}: cannot read"):
        load_adapter(fresh, out)
    assert not lora_modules(fresh)  # refused before the model was touched


@pytest.mark.parametrize("damage, message", [
    (lambda t: t.to(torch.int32), "torch.int32, not floating point"),  # truncated to the base model before
    (lambda t: t.fill_(float("nan")), "non-finite values"),  # a perplexity of nan, exit 0, before
])
def test_refuses_damaged_lora_tensors(tmp_path, damage, message):
    _, _, out = mq_adapter(tmp_path, targets=["q_proj"])
    key = "base_model.model.model.layers.1.self_attn.q_proj.lora_B.weight"
    edit_tensors(out, lambda sd: {**sd, key: damage(sd[key])})
    assert_refused(out, f"key '{key}' is .*{message}")


def test_a_pickle_of_more_than_tensors_is_refused_in_one_line_without_unsafe_advice(tmp_path):
    _, _, out = mq_adapter(tmp_path)
    sd = load_file(out / "adapter_model.safetensors")
    (out / "adapter_model.safetensors").unlink()
    torch.save({**sd, "extra": os.getcwd}, out / "adapter_model.bin")  # a function: not weights_only
    _, fresh = pair(0)
    with pytest.raises(BadInput) as e:
        load_adapter(fresh, out)
    message = str(e.value)
    assert "adapter_model.bin: cannot read (UnpicklingError: damaged, or a pickle of more than tensors" in message
    assert "\n" not in message and "weights_only` set to `False`" not in message
