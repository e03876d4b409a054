"""Loading Hugging Face checkpoint folders (shards, index, tied embeddings, .bin) and every error."""
import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from _tiny import hf_model
from minqlora.errors import BadInput
from minqlora.loader import load_model, save_checkpoint
from minqlora.nf4 import Linear4bit


@pytest.fixture(scope="module")
def sharded(tmp_path_factory):
    hf = hf_model(seed=1)
    d = tmp_path_factory.mktemp("ckpt")
    hf.save_pretrained(d, max_shard_size="60KB")
    return hf, d


def logits(m, ids):
    with torch.no_grad():
        return m(ids) if not hasattr(m, "generation_config") else m(ids).logits


IDS = torch.randint(3, 128, (2, 10), generator=torch.Generator().manual_seed(0))


def test_sharded_checkpoint_loads_exactly(sharded):
    hf, d = sharded
    assert len(list(d.glob("model-*.safetensors"))) >= 3 and (d / "model.safetensors.index.json").exists()
    m = load_model(d, bits=16, progress=False)
    assert (logits(m, IDS) - logits(hf, IDS)).abs().max() < 1e-5


def test_4bit_load_quantizes_every_linear_but_lm_head(sharded):
    hf, d = sharded
    m = load_model(d, bits=4, quant_type="nf4", double_quant=True, progress=False)
    q = [n for n, mod in m.named_modules() if isinstance(mod, Linear4bit)]
    assert len(q) == 2 * 7 and not isinstance(m.lm_head, Linear4bit)
    # the 4-bit model is close to the 16-bit one, but not equal (the weights really are 4-bit)
    err = (logits(m, IDS) - logits(hf, IDS)).abs().max()
    assert 0 < err < 0.5


def test_tied_embeddings(tmp_path):
    hf = hf_model(seed=2, tie_word_embeddings=True)
    hf.save_pretrained(tmp_path, max_shard_size="60KB")
    m = load_model(tmp_path, bits=16, progress=False)
    assert m.lm_head.weight is m.model.embed_tokens.weight
    assert (logits(m, IDS) - logits(hf, IDS)).abs().max() < 1e-5


def test_bin_fallback(tmp_path):
    hf = hf_model(seed=3)
    hf.config.save_pretrained(tmp_path)
    sd = hf.state_dict()
    sd["model.layers.0.self_attn.rotary_emb.inv_freq"] = torch.ones(8)  # old conversions had these
    torch.save(sd, tmp_path / "pytorch_model.bin")
    m = load_model(tmp_path, bits=16, progress=False)
    assert (logits(m, IDS) - logits(hf, IDS)).abs().max() < 1e-5


def test_save_checkpoint_is_read_by_transformers(tmp_path, sharded):
    import transformers
    _, d = sharded
    m = load_model(d, bits=16, progress=False)
    out = save_checkpoint(m.state_dict(), m.config, tmp_path / "out", max_shard_bytes=50_000, copy_from=d)
    assert len(json.loads((out / "model.safetensors.index.json").read_text())["weight_map"]) == len(m.state_dict())
    hf2 = transformers.LlamaForCausalLM.from_pretrained(out).eval()
    assert (logits(hf2, IDS) - logits(m, IDS)).abs().max() < 1e-5
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary left


def copy_ckpt(src, dst):
    shutil.copytree(src, dst)
    return dst


def shard_with(d, key):
    weight_map = json.loads((d / "model.safetensors.index.json").read_text())["weight_map"]
    return d / weight_map[key]


def test_missing_key(tmp_path, sharded):
    d = copy_ckpt(sharded[1], tmp_path / "c")
    f = shard_with(d, "model.layers.1.mlp.up_proj.weight")
    sd = load_file(f)
    del sd["model.layers.1.mlp.up_proj.weight"]
    save_file(sd, f, metadata={"format": "pt"})
    with pytest.raises(BadInput, match=r"no tensor for model\.layers\.1\.mlp\.up_proj\.weight"):
        load_model(d, bits=16, progress=False)


def test_surplus_key(tmp_path, sharded):
    d = copy_ckpt(sharded[1], tmp_path / "c")
    f = shard_with(d, "model.norm.weight")
    sd = load_file(f)
    sd["model.layers.9.mlp.up_proj.weight"] = torch.zeros(128, 64)
    save_file(sd, f, metadata={"format": "pt"})
    with pytest.raises(BadInput, match=rf"{f.name}: tensor 'model\.layers\.9\.mlp\.up_proj\.weight' is not a parameter"):
        load_model(d, bits=16, progress=False)


def test_wrong_shape(tmp_path, sharded):
    d = copy_ckpt(sharded[1], tmp_path / "c")
    cfg = json.loads((d / "config.json").read_text())
    cfg["intermediate_size"] = 96
    (d / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(BadInput, match=r"mlp\.\w+_proj\.weight' has shape \(\d+, \d+\), config\.json implies"):
        load_model(d, bits=4, progress=False)


def test_truncated_shard(tmp_path, sharded):
    d = copy_ckpt(sharded[1], tmp_path / "c")
    f = sorted(d.glob("model-*.safetensors"))[-1]
    data = f.read_bytes()
    f.write_bytes(data[: len(data) // 2])
    with pytest.raises(BadInput, match=rf"{f.name}: cannot read"):
        load_model(d, bits=16, progress=False)


def test_folder_without_config_or_weights(tmp_path, sharded):
    with pytest.raises(FileNotFoundError, match="no config.json"):
        load_model(tmp_path, progress=False)
    shutil.copy(sharded[1] / "config.json", tmp_path / "config.json")
    with pytest.raises(BadInput, match="no weights"):
        load_model(tmp_path, progress=False)
    (tmp_path / "config.json").write_text("{\"hidden_size\": 64,")
    with pytest.raises(BadInput, match="not valid JSON"):
        load_model(tmp_path, progress=False)


def test_index_naming_a_missing_shard(tmp_path, sharded):
    d = copy_ckpt(sharded[1], tmp_path / "c")
    victim = sorted(d.glob("model-*.safetensors"))[0]
    victim.unlink()
    with pytest.raises(BadInput, match=rf"names {victim.name}, which is not in"):
        load_model(d, progress=False)


def test_written_files_have_ordinary_permissions(tmp_path, sharded):
    import os
    import stat
    from minqlora.adapter import save_adapter
    from minqlora.lora import apply_lora
    mask = os.umask(0o022)
    try:
        m = load_model(sharded[1], bits=16, progress=False)
        out = save_checkpoint(m.state_dict(), m.config, tmp_path / "ckpt", max_shard_bytes=50_000)
        apply_lora(m, r=2, alpha=4, targets=["q_proj"])
        ad = save_adapter(m, tmp_path / "adapter", r=2, alpha=4, dropout=0.0, targets=["q_proj"],
                          base_model_name_or_path="x")
        save_adapter(m, ad, r=2, alpha=4, dropout=0.0, targets=["q_proj"], base_model_name_or_path="x")
    finally:
        os.umask(mask)
    for folder in (out, ad):
        assert stat.S_IMODE(folder.stat().st_mode) == 0o755, folder
        for f in folder.iterdir():
            assert stat.S_IMODE(f.stat().st_mode) == 0o644, f  # readable by whoever grades the adapter
