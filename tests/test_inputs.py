"""Prompt templates, dataset reading and CLI flag parsing: the user-facing edges shared by all scripts."""
import json
from dataclasses import dataclass, field

import pytest

from minqlora.cli import parse_dataclasses
from minqlora.course import PROMPT as COURSE
from minqlora.data import Prompt, read_records
from minqlora.errors import BadInput


def test_prompts():
    rec = {"instruction": "翻譯成文言文：\n我說", "input": "", "output": "吾曰"}
    assert Prompt("course")(rec) == COURSE.format(instruction=rec["instruction"])
    assert Prompt("course")(rec).endswith("USER: 翻譯成文言文：\n我說 ASSISTANT:")
    alpaca = Prompt("alpaca")
    assert alpaca(rec).startswith("Below is an instruction that describes a task. Write")
    assert alpaca(rec).endswith("### Instruction:\n翻譯成文言文：\n我說\n\n### Response: ")
    with_input = alpaca({**rec, "input": "ctx"})
    assert "paired with an input" in with_input and "### Input:\nctx\n\n### Response: " in with_input
    assert Prompt("input-output")({"input": "raw {instruction}", "output": "x"}) == "raw {instruction}"


def test_prompt_file(tmp_path):
    f = tmp_path / "p.txt"
    f.write_text("Q: {instruction}\nA:\n")
    assert Prompt(str(f))({"instruction": "hi {x} {input}"}) == "Q: hi {x} {input}\nA:"
    f.write_text("no placeholder")
    with pytest.raises(ValueError, match="needs an {instruction} placeholder"):
        Prompt(str(f))
    with pytest.raises(ValueError, match="neither one of course, alpaca, input-output nor a file"):
        Prompt("alpacca")


def write(tmp_path, name, text):
    p = tmp_path / name
    p.write_text(text, encoding="utf-8")
    return p


def test_read_json_and_jsonl(tmp_path):
    recs = [{"id": "a", "instruction": "i", "output": "o"}, {"id": "b", "instruction": "j", "output": "p"}]
    assert read_records(write(tmp_path, "d.json", json.dumps(recs))) == recs
    assert read_records(write(tmp_path, "d.jsonl", "\n".join(map(json.dumps, recs)) + "\n\n")) == recs
    assert read_records(write(tmp_path, "bom.json", "\ufeff" + json.dumps(recs))) == recs  # a Windows editor's


@pytest.mark.parametrize("name,text,kw,msg", [
    ("d.json", '[{"instruction": "a", "output": "b"},\n {"instruction": "c" "output": 1}]', {},
     r"d\.json: line 2, column \d+"),
    ("d.jsonl", '{"instruction": "a", "output": "b"}\n{oops}\n', {}, r"d\.jsonl: line 2, column 2"),
    ("d.json", '{"instruction": "a"}', {}, "expected a JSON list of records, found a dict"),
    ("d.json", "[]", {}, "no records"),
    ("d.json", "  \n", {}, "the file is empty"),
    ("d.json", '[{"id": "x1", "instruction": "a", "output": "b"}, {"id": "x2", "instruction": "a"}]', {},
     r"record 1 \(id 'x2'\) has no 'output' field"),
    ("d.json", '[{"instruction": 3, "output": "b"}]', {}, r"record 0 has a non-string 'instruction'"),
    ("d.json", '["text"]', {}, "record 0 is a str, not an object"),
    ("d.json", '[{"id": [1], "instruction": "a"}]', {"required": ("instruction",), "unique_ids": True},
     r"record 0 \(id \[1\]\): id must be a string or an integer"),
    ("d.json", '[{"id": 1, "instruction": "a"}, {"id": 1, "instruction": "b"}]',
     {"required": ("instruction",), "unique_ids": True}, r"record 1 \(id 1\): duplicate id, first at record 0"),
    ("d.json", '[{"instruction": "a", "output": "b"}, {"instruction": "\\ud800 x", "output": "b"}]', {},
     r"record 1 field 'instruction' holds an unpaired surrogate escape"),  # sentencepiece raised before
    ("d.jsonl", '{"instruction": "a", "output": "b", "input": "\\udfff"}\n', {}, "field 'input' holds an unpaired"),
    ("d.json", "[" * 100000, {}, "JSON nested too deeply"),  # a RecursionError before
])
def test_bad_datasets_are_located(tmp_path, name, text, kw, msg):
    p = write(tmp_path, name, text)
    with pytest.raises(BadInput, match=msg) as e:
        read_records(p, **kw)
    assert str(p) in str(e.value)


def test_missing_file(tmp_path):
    with pytest.raises(BadInput, match="no such file"):
        read_records(tmp_path / "nope.json")


@dataclass
class Flags:
    steps: int = 3
    rate: float = 1e-3
    name: str = "x"
    group_by_length: bool = False
    keep: bool = True
    limit: int | None = None
    quant: str = field(default="nf4", metadata={"help": "quantization", "choices": ["nf4", "fp4"]})


def test_flags_follow_hf_conventions():
    _, (f,) = parse_dataclasses({"g": Flags}, ["--group_by_length", "--keep", "False", "--limit", "5",
                                                "--steps", "7", "--rate", "0.5"])
    assert f == Flags(steps=7, rate=0.5, group_by_length=True, keep=False, limit=5)
    _, (f,) = parse_dataclasses({"g": Flags}, ["--limit", "None", "--group_by_length", "true"])
    assert f.limit is None and f.group_by_length is True


@pytest.mark.parametrize("argv,msg", [
    (["--stepz", "3"], "unrecognized arguments: --stepz"),
    (["--step", "3"], "unrecognized arguments: --step"),  # no silent abbreviations
    (["--quant", "int8"], "invalid choice: 'int8'"),
    (["--keep", "maybe"], "expected a boolean"),
])
def test_bad_flags_exit_with_a_message(capsys, argv, msg):
    with pytest.raises(SystemExit) as e:
        parse_dataclasses({"g": Flags}, argv)
    assert e.value.code == 2 and msg in capsys.readouterr().err


def test_help_shows_defaults(capsys):
    with pytest.raises(SystemExit):
        parse_dataclasses({"quantization flags": Flags}, ["--help"])
    out = capsys.readouterr().out
    assert "quantization flags:" in out and "quantization (default: nf4)" in out


@pytest.mark.parametrize("fmt, hinted", [("alpaca", False), ("input-output", True)])
def test_the_input_output_hint_only_for_that_format(tmp_path, fmt, hinted):
    """A non-string 'input' under --dataset_format alpaca was told to pass --dataset_format alpaca."""
    from minqlora.data import make_data_module
    p = write(tmp_path, "d.json", json.dumps([{"instruction": "a", "input": True, "output": "b"}]))
    with pytest.raises(BadInput, match="non-string 'input'") as e:
        make_data_module(None, dataset=str(p), dataset_format=fmt, source_max_len=8, target_max_len=8)
    assert ("pass --dataset_format alpaca or course" in str(e.value)) == hinted
