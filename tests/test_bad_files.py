"""Damaged or wrongly typed files (found by an audit; each gave a Python traceback, or was used silently
wrong): config.json values of the wrong type, tokenizer files that cannot be read, chat templates that fail
while rendering, and scripts/plot.py's logs and outputs. Each is BadInput naming the file and the key or line;
a command says it in one `error:` line and exits 2, having written nothing."""
import json
import os
import shutil

import pytest
import torch

from _fixtures_train import TINY, fast_args, load_script, needs_tiny, train_main, write_records
from minqlora.chat import ChatPrompt, ChatTemplateError
from minqlora.config import LlamaConfig, rope_inv_freq
from minqlora.curves import RunLog
from minqlora.errors import BadInput
from minqlora.tokenizer import Tokenizer

BASE = json.loads((TINY / "config.json").read_text(encoding="utf-8"))
TOKENIZER_CONFIG = json.loads((TINY / "tokenizer_config.json").read_text(encoding="utf-8"))
LLAMA3 = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 4.0, "high_freq_factor": 1.0,
          "original_max_position_embeddings": 8192}


def one_error_line(err, *parts):
    lines = err.strip().splitlines()
    assert "Traceback" not in err and lines[-1].startswith("error: "), err
    for part in parts:
        assert part in lines[-1], (part, err)


def tiny_copy(tmp_path, **files):
    """weights/tiny copied, with `files` (name -> bytes, or a dict written as JSON) replaced."""
    folder = tmp_path / "tiny"
    shutil.copytree(TINY, folder)
    for name, content in files.items():
        name = name.replace("__", ".")
        content = json.dumps(content).encode() if isinstance(content, dict) else content
        (folder / name).write_bytes(content)
    return folder


@pytest.fixture
def no_model_load(monkeypatch):
    """Any model load fails the test: refusals must come first."""
    import minqlora.loader

    def boom(*a, **k):
        raise AssertionError("the model was loaded before the refusal")
    monkeypatch.setattr(minqlora.loader, "load_model", boom)


# 1. config.json: each value of the wrong type refused by key (ZeroDivisionError, TypeError, a KeyError at the
# first forward pass, or a string "false" read as true before).
@pytest.mark.parametrize("key,value,message", [
    ("num_key_value_heads", 0, "num_key_value_heads=0: must be a whole number >= 1 or null"),
    ("num_key_value_heads", "2", "num_key_value_heads='2': must be a whole number >= 1 or null"),
    ("rope_scaling", {"type": "linear"}, "rope_scaling of type 'linear' has no 'factor'"),
    ("rope_scaling", {"type": "linear", "factor": "2"}, "rope_scaling['factor']='2': must be a finite number > 0"),
    ("rope_scaling", LLAMA3, "rope_scaling: high_freq_factor=1.0 must be above low_freq_factor=4.0"),
    ("rope_scaling", "linear", "rope_scaling='linear': must be an object {...} or null"),
    ("rope_parameters", "default", "rope_parameters='default': must be an object {...} or null"),
    ("max_position_embeddings", None, "max_position_embeddings=None: must be a whole number >= 1"),
    ("max_position_embeddings", "1024", "max_position_embeddings='1024': must be a whole number >= 1"),
    ("rms_norm_eps", "1e-5", "rms_norm_eps='1e-5': must be a finite number > 0"),
    ("rope_theta", "10000", "rope_theta='10000': must be a finite number > 0"),
    ("eos_token_id", "2", "eos_token_id='2': must be a whole number or a list of whole numbers or null"),
    ("hidden_size", True, "hidden_size=True: must be a whole number >= 1"),
    ("tie_word_embeddings", "false", "tie_word_embeddings='false': must be true or false"),
])
def test_config_values_of_the_wrong_type_are_refused_by_key(tmp_path, key, value, message):
    (tmp_path / "config.json").write_text(json.dumps({**BASE, key: value}))
    with pytest.raises(BadInput) as e:
        LlamaConfig.from_json(tmp_path)
    assert str(e.value).startswith(f"{tmp_path / 'config.json'}: ") and message in str(e.value), str(e.value)


@pytest.mark.parametrize("content,message", [
    (b"[]", "must hold a JSON object {...}, not list"),
    (b'{"model_type": "llama\xff"}', "cannot read it: not UTF-8 text"),
])
def test_a_config_that_is_not_a_json_object_names_the_file(tmp_path, content, message):
    (tmp_path / "config.json").write_bytes(content)
    with pytest.raises(BadInput, match=r"^" + str(tmp_path / "config.json").replace("\\", r"\\") + ": ") as e:
        LlamaConfig.from_json(tmp_path)
    assert message in str(e.value)


def test_rope_parameters_spelled_with_type_are_applied():
    """{"type": "linear"} in rope_parameters was passed over (no scaling) while rope_scaling honoured it."""
    plain = rope_inv_freq(LlamaConfig.from_dict(BASE))
    scaled = LlamaConfig.from_dict({**BASE, "rope_parameters": {"type": "linear", "factor": 2.0}})
    torch.testing.assert_close(rope_inv_freq(scaled), plain / 2)


@needs_tiny
def test_training_refuses_a_rope_scaling_without_factor_before_writing(tmp_path, capsys):
    folder = tiny_copy(tmp_path, config__json={**BASE, "rope_scaling": {"type": "linear"}})
    argv = fast_args(tmp_path / "out", write_records(tmp_path / "d.json", 8), model_name_or_path=folder)
    assert train_main(argv) == 2
    one_error_line(capsys.readouterr().err, f"{folder / 'config.json'}: rope_scaling of type 'linear' has no")
    assert not (tmp_path / "out").exists()


# 2. Tokenizer files that cannot be read (sentencepiece's RuntimeError, tokenizers' bare Exception, JSON errors).
GARBAGE = bytes(range(256)) * 4


@pytest.mark.parametrize("name,content,message", [
    ("tokenizer.model", b"", "tokenizer.model: cannot read it: not a SentencePiece model"),
    ("tokenizer.model", GARBAGE, "tokenizer.model: cannot read it: not a SentencePiece model"),
    ("tokenizer_config.json", b'{"legacy": false,', "tokenizer_config.json: cannot read it: not valid JSON (line 1"),
    ("special_tokens_map.json", b"[]", "special_tokens_map.json: cannot read it: must hold a JSON object"),
    ("generation_config.json", b"\xff\xfe{}", "generation_config.json: cannot read it: not UTF-8 text"),
    ("generation_config.json", b'{"eos_token_id": "2"}', "generation_config.json: eos_token_id='2': must be a"),
    ("tokenizer_config.json", b'{"eos_token": 5}', "tokenizer_config.json: eos_token=5: must be a string"),
])
def test_a_damaged_tokenizer_file_is_named(tmp_path, name, content, message):
    folder = tiny_copy(tmp_path, **{name.replace(".", "__"): content})
    with pytest.raises(BadInput) as e:
        Tokenizer.from_dir(folder)
    assert str(e.value).startswith(f"{folder / name}: ") and message in str(e.value), str(e.value)


def test_a_negative_pad_token_id_means_none(tmp_path):
    """Early Llama conversions wrote pad_token_id -1: the config loads, and the tokenizer has no pad (was -1)."""
    folder = tiny_copy(tmp_path, config__json={**BASE, "pad_token_id": -1})
    assert LlamaConfig.from_json(folder).pad_token_id == -1
    tok = Tokenizer.from_dir(folder)
    assert tok.pad_token_id is None and tok.pad_id == 0


@pytest.mark.parametrize("content", ['{"model": {"vocab": {"1": 2}}}', "not json", "[]"])
def test_a_damaged_tokenizer_json_is_named(tmp_path, content):
    folder = tiny_copy(tmp_path)
    (folder / "tokenizer.model").unlink()
    (folder / "tokenizer.json").write_text(content)
    with pytest.raises(BadInput, match="tokenizer.json: cannot read it: not a tokenizers JSON file") as e:
        Tokenizer.from_dir(folder)
    assert str(e.value).startswith(str(folder / "tokenizer.json"))


@needs_tiny
def test_ppl_says_which_tokenizer_file_is_damaged(tmp_path, capsys):
    folder = tiny_copy(tmp_path, tokenizer__model=GARBAGE)
    data = write_records(tmp_path / "d.json", 4)
    argv = ["--base_model_path", str(folder), "--test_data_path", str(data), "--bits", "16", "--device", "cpu",
            "--progress", "False", "--prompt_template", "alpaca"]
    assert load_script("ppl").main(argv) == 2
    one_error_line(capsys.readouterr().err, f"{folder / 'tokenizer.model'}: cannot read it")


# 3. Chat templates that fail while rendering: refused naming the folder, before the model loads.
FAILING = [("{{ messages[5].content }}", "UndefinedError"), ("{{ 1 // 0 }}", "ZeroDivisionError"),
           ("{{ messages[0].content + 1 }}", "TypeError")]


@pytest.mark.parametrize("template,what", FAILING)
def test_a_template_that_fails_to_render_is_refused_when_read(tmp_path, template, what):
    folder = tiny_copy(tmp_path, tokenizer_config__json={**TOKENIZER_CONFIG, "chat_template": template})
    with pytest.raises(ChatTemplateError, match=f"the chat template failed while rendering \\({what}") as e:
        ChatPrompt(folder)
    assert str(folder) in str(e.value) and isinstance(e.value, BadInput)


def test_a_template_failing_only_with_few_shot_turns_names_the_folder(tmp_path):
    template = "{% if messages|length > 1 %}{{ 1 // 0 }}{% endif %}{{ messages[-1].content }}"
    chat = ChatPrompt(tiny_copy(tmp_path, tokenizer_config__json={**TOKENIZER_CONFIG, "chat_template": template}))
    assert chat({"instruction": "hi"}) == "hi"
    with pytest.raises(ChatTemplateError, match=f"{tmp_path / 'tiny'}: the chat template failed while rendering"):
        chat.with_shots([{"instruction": "a", "output": "b"}])({"instruction": "hi"})


@pytest.mark.parametrize("name,content,message", [
    ("chat_template.json", b'{"chat_template": ', "chat_template.json: cannot read it: not valid JSON"),
    ("chat_template.jinja", b"{{ messages \xff }}", "chat_template.jinja: cannot read it: not UTF-8 text"),
    ("tokenizer_config.json", b'["chat_template"]', "tokenizer_config.json: cannot read it: must hold a JSON object"),
])
def test_an_unreadable_template_file_is_named(tmp_path, name, content, message):
    folder = tiny_copy(tmp_path, **{name.replace(".", "__"): content})
    with pytest.raises(BadInput, match=message) as e:
        ChatPrompt(folder)
    assert str(e.value).startswith(str(folder / name))


@needs_tiny
@pytest.mark.parametrize("template,what", FAILING[:2])
def test_ppl_and_predict_refuse_a_failing_template_before_loading(tmp_path, capsys, no_model_load, template, what):
    folder = tiny_copy(tmp_path, tokenizer_config__json={**TOKENIZER_CONFIG, "chat_template": template})
    data = write_records(tmp_path / "d.json", 4)
    flags = ["--base_model_path", str(folder), "--test_data_path", str(data), "--device", "cpu",
             "--progress", "False", "--prompt_template", "chat"]
    assert load_script("ppl").main(flags) == 2
    one_error_line(capsys.readouterr().err, str(folder), f"failed while rendering ({what}")
    assert load_script("predict").main(flags + ["--output_path", str(tmp_path / "p.json")]) == 2
    one_error_line(capsys.readouterr().err, f"failed while rendering ({what}")
    assert not (tmp_path / "p.json").exists()


# 4. scripts/plot.py: outputs checked before anything is written, bad log lines named.
@pytest.fixture
def log(tmp_path):
    path = tmp_path / "R" / "log.jsonl"
    path.parent.mkdir()
    path.write_text('{"event": "start", "step": 0}\n{"step": 1, "loss": 2.0}\n{"step": 2, "loss": 1.5}\n')
    return path


def plot_main(argv):
    return load_script("plot").main([str(a) for a in argv])


@pytest.mark.parametrize("flags,message", [
    (["-o", "{log}"], "-o {log}: is the log {log}, which this command reads"),
    (["-o", "out.png", "--csv", "{log}"], "--csv {log}: is the log {log}, which this command reads"),
    (["-o", "{dir}"], "-o {dir}: is a folder; give a file name"),
    (["-o", "{dir}/x.png", "--csv", "{dir}/x.png"], "--csv {dir}/x.png: is also -o"),
])
def test_plot_refuses_an_output_it_cannot_or_must_not_write(tmp_path, capsys, log, flags, message):
    fill = dict(log=log, dir=log.parent)
    before = log.read_bytes()
    assert plot_main([log, *(f.format(**fill) for f in flags)]) == 2
    one_error_line(capsys.readouterr().err, message.format(**fill))
    assert log.read_bytes() == before and sorted(p.name for p in log.parent.iterdir()) == ["log.jsonl"]


@pytest.mark.parametrize("flag", ["-o", "--csv"])
def test_plot_refuses_an_output_in_a_read_only_folder(tmp_path, capsys, monkeypatch, log, flag):
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    real = os.access  # root passes every os.access: also deny it here, as for a user
    monkeypatch.setattr(os, "access", lambda p, mode, **k: False if str(p) == str(locked) else real(p, mode, **k))
    try:
        target = locked / "x.out"
        argv = [log, "-o", tmp_path / "c.png", flag, target] if flag == "--csv" else [log, flag, target]
        assert plot_main(argv) == 2
        one_error_line(capsys.readouterr().err, f"{flag} {target}: cannot write in {locked} (permission denied)")
        assert list(locked.iterdir()) == [] and not (tmp_path / "c.png").exists()
    finally:
        locked.chmod(0o700)


@pytest.mark.parametrize("text,message", [
    ('{"step": 1, "loss": 2.0}\n{oops\n{"step": 2, "loss": 1.0}\n', "bad.jsonl: line 2, column 2: not valid JSON"),
    ('{"step": 1, "loss": 2.0}\n{"step": 2, "lo\n', "bad.jsonl: line 2, column 13: not valid JSON"),
    ('{oops', "bad.jsonl: line 1, column 2: not valid JSON"),
    ('{"step": "x", "loss": 2.0}\n', "bad.jsonl: line 1: step='x': must be a whole number"),
    ('{"step": 1, "loss": 2.0}\n[1, 2]\n', "bad.jsonl: line 2: must be a JSON object {...}, not list"),
    ('{"step": 1, "loss": "high"}\n', "bad.jsonl: line 1: loss='high': must be a number"),
    ('\xff\xfe', "bad.jsonl: cannot read it: not UTF-8 text"),
])
def test_plot_names_the_file_and_line_of_a_bad_log(tmp_path, capsys, text, message):
    """A bad line was passed over (an empty plot, exit 0) or gave "invalid literal for int()" alone. Only a
    last line that does not end the file with a newline (a kill cut it short) is still passed over."""
    bad = tmp_path / "bad.jsonl"
    bad.write_bytes(text.encode("latin-1") if text.startswith("\xff") else text.encode())
    assert plot_main([bad, "-o", tmp_path / "c.png"]) == 2
    one_error_line(capsys.readouterr().err, message)
    assert not (tmp_path / "c.png").exists()


def test_resuming_a_log_with_lines_it_did_not_write_keeps_its_own(tmp_path):
    path = tmp_path / "log.jsonl"
    path.write_text('{"step": 1, "loss": 2.0}\n[1]\n{"step": "x"}\n{"event": "audit"}\n{"step": 3, "loss": 1.0}\n')
    RunLog(path, keep_until_step=2).close()
    assert path.read_text() == '{"step": 1, "loss": 2.0}\n{"event": "audit"}\n'
