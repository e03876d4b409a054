"""scripts/merge.py: base + adapter -> one 16-bit checkpoint that transformers reads and that equals peft's model."""
import sys
from pathlib import Path

import pytest
import torch

from _tiny import hf_model
from minqlora.adapter import save_adapter
from minqlora.loader import load_model
from minqlora.lora import apply_lora, lora_modules

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))
import merge  # noqa: E402


@pytest.mark.parametrize("tied, targets", [(False, ["q_proj", "v_proj", "down_proj"]),
                                           (True, ["q_proj", "v_proj", "down_proj"]),
                                           (True, ["q_proj", "lm_head"])])
def test_merged_checkpoint_equals_peft_model(tmp_path, capsys, tied, targets):
    import peft
    import transformers
    hf = hf_model(seed=4, tie_word_embeddings=tied)
    hf.save_pretrained(tmp_path / "base")
    m = load_model(tmp_path / "base", bits=16, progress=False)
    apply_lora(m, r=4, alpha=8, dropout=0.0, targets=targets)
    torch.manual_seed(0)
    for mod in lora_modules(m).values():
        torch.nn.init.normal_(mod.lora_B.weight, std=0.05)
    save_adapter(m, tmp_path / "adapter", r=4, alpha=8, dropout=0.0, targets=targets,
                 base_model_name_or_path=str(tmp_path / "base"))

    assert merge.main(["--base_model_path", str(tmp_path / "base"), "--peft_path", str(tmp_path / "adapter"),
                       "--output_dir", str(tmp_path / "merged"), "--dtype", "float32"]) == 0
    # lm_head's LoRA on a tied base: the merged lm_head is no longer the embeddings, so both are written
    untied = tied and "lm_head" in targets
    assert ("tie_word_embeddings false" in capsys.readouterr().out) == untied
    merged = transformers.LlamaForCausalLM.from_pretrained(tmp_path / "merged").eval()
    assert merged.config.tie_word_embeddings == (tied and not untied)
    ref = peft.PeftModel.from_pretrained(hf_model(seed=4, tie_word_embeddings=tied), tmp_path / "adapter").eval()
    ids = torch.randint(3, 128, (2, 9))
    with torch.no_grad():
        a, b, base = merged(ids).logits, ref(ids).logits, hf(ids).logits
    assert (a - b).abs().max() < 1e-5
    assert (a - base).abs().max() > 1e-3  # the adapter really changed the model


def test_merge_refuses_a_bad_adapter(tmp_path, capsys):
    hf_model(seed=4).save_pretrained(tmp_path / "base")
    assert merge.main(["--base_model_path", str(tmp_path / "base"), "--peft_path", str(tmp_path / "none"),
                       "--output_dir", str(tmp_path / "merged")]) == 2
    assert "error:" in capsys.readouterr().err and not (tmp_path / "merged").exists()


def test_merge_into_4bit_with_a_partial_adapter_writes_a_loadable_checkpoint(tmp_path):
    import transformers
    hf = hf_model(seed=5)
    hf.save_pretrained(tmp_path / "base")
    m = load_model(tmp_path / "base", bits=16, progress=False)
    apply_lora(m, r=4, alpha=8, targets=["q_proj"], verbose=False)
    save_adapter(m, tmp_path / "adapter", r=4, alpha=8, dropout=0.0, targets=["q_proj"], base_model_name_or_path="b")
    assert merge.main(["--base_model_path", str(tmp_path / "base"), "--peft_path", str(tmp_path / "adapter"),
                       "--output_dir", str(tmp_path / "merged"), "--bits", "4", "--dtype", "float32"]) == 0
    merged = transformers.LlamaForCausalLM.from_pretrained(tmp_path / "merged").eval()
    ids = torch.randint(3, 128, (1, 8))
    with torch.no_grad():  # B = 0: the merged model is the dequantized 4-bit base, close to the original
        assert 0 < (merged(ids).logits - hf(ids).logits).abs().max() < 0.5


def test_merge_never_replaces_a_folder_it_was_not_told_to(tmp_path, capsys):
    hf_model(seed=4).save_pretrained(tmp_path / "base")
    m = load_model(tmp_path / "base", bits=16, progress=False)
    apply_lora(m, r=2, alpha=4, targets=["q_proj"], verbose=False)
    save_adapter(m, tmp_path / "adapter", r=2, alpha=4, dropout=0.0, targets=["q_proj"], base_model_name_or_path="b")
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "keep.txt").write_text("mine")
    flags = ["--base_model_path", str(tmp_path / "base"), "--peft_path", str(tmp_path / "adapter")]
    assert merge.main([*flags, "--output_dir", str(tmp_path / "busy")]) == 2
    assert "exists and is not empty" in capsys.readouterr().err
    assert (tmp_path / "busy" / "keep.txt").read_text() == "mine"
    assert merge.main([*flags, "--output_dir", str(tmp_path / "base"), "--overwrite_output_dir"]) == 2
    assert "is the base model or the adapter folder" in capsys.readouterr().err
    assert merge.main([*flags, "--output_dir", str(tmp_path / "busy"), "--overwrite_output_dir"]) == 2
    assert "holds files that are not a checkpoint's (keep.txt)" in capsys.readouterr().err
    assert (tmp_path / "busy" / "keep.txt").read_text() == "mine"
    (tmp_path / "busy" / "keep.txt").unlink()
    assert merge.main([*flags, "--output_dir", str(tmp_path / "busy")]) == 0
    assert merge.main([*flags, "--output_dir", str(tmp_path / "busy"), "--overwrite_output_dir"]) == 0
    assert (tmp_path / "busy" / "config.json").exists()
    (tmp_path / "file").write_text("x")
    assert merge.main([*flags, "--output_dir", str(tmp_path / "file")]) == 2
    assert "file: is a file, not a folder" in capsys.readouterr().err


def test_merge_refuses_several_processes(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")  # as torchrun sets it
    assert merge.main(["--peft_path", str(tmp_path), "--output_dir", str(tmp_path / "m")]) == 2
    assert "merge.py runs in one process, not 2" in capsys.readouterr().err
    assert not (tmp_path / "m").exists()



def test_save_checkpoint_never_drops_an_lm_head_that_is_not_the_embeddings(tmp_path):
    from minqlora.loader import save_checkpoint
    hf_model(seed=4, tie_word_embeddings=True).save_pretrained(tmp_path / "base")
    m = load_model(tmp_path / "base", bits=16, progress=False)
    save_checkpoint(m.state_dict(), m.config, tmp_path / "same")  # tied: written once
    m.lm_head.weight = torch.nn.Parameter(m.lm_head.weight + 1)
    with pytest.raises(ValueError, match="lm_head.weight differs from model.embed_tokens.weight"):
        save_checkpoint(m.state_dict(), m.config, tmp_path / "untied")
    assert not (tmp_path / "untied").exists()


def test_merge_keeps_the_dtype_transformers_5_writes_as_dtype(tmp_path):
    """transformers >= 4.56 writes "dtype", not "torch_dtype": --dtype auto took float32 (twice the size) and
    left the stale "dtype" beside the new torch_dtype."""
    import json
    from safetensors.torch import load_file
    hf = hf_model(seed=4).to(torch.bfloat16)
    hf.save_pretrained(tmp_path / "base")
    saved = json.loads((tmp_path / "base" / "config.json").read_text())
    assert saved.get("dtype") == "bfloat16" and "torch_dtype" not in saved  # what the test is about
    m = load_model(tmp_path / "base", bits=16, progress=False)
    apply_lora(m, r=4, alpha=8, dropout=0.0, targets=["q_proj"])
    save_adapter(m, tmp_path / "adapter", r=4, alpha=8, dropout=0.0, targets=["q_proj"], base_model_name_or_path=None)
    assert merge.main(["--base_model_path", str(tmp_path / "base"), "--peft_path", str(tmp_path / "adapter"),
                       "--output_dir", str(tmp_path / "merged")]) == 0
    weights = load_file(tmp_path / "merged" / "model.safetensors")
    assert {t.dtype for t in weights.values()} == {torch.bfloat16}
    written = json.loads((tmp_path / "merged" / "config.json").read_text())
    assert written["torch_dtype"] == "bfloat16" and written.get("dtype", "bfloat16") == "bfloat16"
