"""scripts/ppl.py and scripts/predict.py end to end: the printed number equals the course algorithm
on transformers, predictions cover every id in order with no prompt or special tokens, and each
kind of bad input gives `error: ...` naming the file or record, exit code 2, and no output file."""
import importlib.util
import json
import math
import re
import subprocess
import sys

import pytest
import torch

from _fixtures_infer import (REPO, course_reference_ppl, hf_pair, make_peft_adapter, model_dir,
                             records, write_json)
from _tiny import hf_model
from minqlora.generate import generate
from minqlora.loader import load_model
from minqlora.data import Prompt
from minqlora.tokenizer import Tokenizer


def load_script(name):
    spec = importlib.util.spec_from_file_location(f"script_{name}", REPO / "scripts" / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod.main


ppl_main, predict_main = load_script("ppl"), load_script("predict")
FP32 = ["--bits", "16", "--dtype", "float32", "--device", "cpu", "--progress", "False"]


@pytest.fixture(scope="module")
def folder():
    return model_dir()


def printed_mean(text):
    return float(re.search(r"^Mean perplexity: (\S+)$", text, re.M).group(1))


@pytest.mark.parametrize("adapter_format", [None, "safetensors", "bin"])
def test_ppl_cli_equals_course_reference(folder, tmp_path, capsys, adapter_format):
    data = write_path(tmp_path / "test.json", records())
    flags = []
    adapter = None
    if adapter_format:
        adapter = make_peft_adapter(folder, tmp_path / "adapter")
        if adapter_format == "bin":  # peft's older format: a torch.save'd state dict
            from safetensors.torch import load_file
            torch.save(load_file(adapter / "adapter_model.safetensors"), adapter / "adapter_model.bin")
            (adapter / "adapter_model.safetensors").unlink()
        flags = ["--peft_path", str(adapter)]
    hf, hf_tok = hf_pair(folder, adapter)
    ref = course_reference_ppl(hf, hf_tok, records(), Prompt("course"), max_length=100)
    out_csv = tmp_path / "per.csv"
    rc = ppl_main(["--base_model_path", str(folder), "--test_data_path", str(data), "--max_length", "100",
                   "--batch_size", "3", "--per_example_out", str(out_csv), *FP32, *flags])
    assert rc == 0
    assert printed_mean(capsys.readouterr().out) == pytest.approx(sum(ref) / len(ref), rel=1e-4)
    lines = out_csv.read_text().splitlines()
    assert lines[0] == "id,index,perplexity" and len(lines) == len(ref) + 1
    for line, rec, want in zip(lines[1:], records(), ref):
        rid, _, value = line.split(",")
        assert rid == rec["id"] and float(value) == pytest.approx(want, rel=1e-4)


def test_ppl_cli_four_bit_default_and_few_shot_repeats(folder, tmp_path, capsys):
    data = write_path(tmp_path / "test.json", [r for r in records(0) if r["id"] != "a6"])  # 3 each way
    base = ["--base_model_path", str(folder), "--test_data_path", str(data), "--progress", "False"]
    assert ppl_main(base) == 0  # 4-bit NF4, float32 on CPU
    four_bit = printed_mean(capsys.readouterr().out)
    assert ppl_main(base + ["--bits", "16"]) == 0
    sixteen = printed_mean(capsys.readouterr().out)
    assert math.isfinite(four_bit) and four_bit != sixteen and four_bit == pytest.approx(sixteen, rel=0.2)

    out = tmp_path / "per.json"
    assert ppl_main(base + ["--few_shot", "2", "--repeats", "3", "--balanced", "--seed", "1",
                            "--per_example_out", str(out)]) == 0
    text = capsys.readouterr().out
    draws = [float(x) for x in re.findall(r"^Draw \d/3: 2 shots \(1 modern->classical, 1 classical->modern\)"
                                          r", 4 scored, mean perplexity: (\S+)$", text, re.M)]
    assert len(draws) == 3 and len(set(draws)) == 3
    assert printed_mean(text) == pytest.approx(sum(draws) / 3)
    assert re.search(r"^Std perplexity: \S+ \(sample std over 3 draws\)$", text, re.M)
    rows = json.loads(out.read_text())
    assert [r["draw"] for r in rows] == [1] * 4 + [2] * 4 + [3] * 4
    for d in (1, 2, 3):
        vals = [r["perplexity"] for r in rows if r["draw"] == d]
        assert sum(vals) / 4 == pytest.approx(draws[d - 1])


def write_path(path, obj):
    write_json(path, obj)
    return path


def test_predict_writes_every_id_in_order_without_prompt(folder, tmp_path):
    recs = [{"id": r["id"], "instruction": r["instruction"]} for r in records()]
    recs.insert(2, {"id": 17, "instruction": "短"})  # ids need not be strings
    data, out = write_path(tmp_path / "in.json", recs), tmp_path / "sub" / "out.json"
    rc = predict_main(["--base_model_path", str(folder), "--test_data_path", str(data), "--output_path",
                       str(out), "--max_new_tokens", "10", "--batch_size", "3", *FP32])
    assert rc == 0
    preds = json.loads(out.read_text(encoding="utf-8"))
    assert [p["id"] for p in preds] == [r["id"] for r in recs] and set(preds[0]) == {"id", "output"}
    prompt = Prompt("course")
    for p, r in zip(preds, recs):
        assert "<s>" not in p["output"] and "</s>" not in p["output"]
        assert "USER:" not in p["output"] and r["instruction"] not in p["output"]
    model = load_model(folder, bits=16, dtype=torch.float32, progress=False)
    want = generate(model, Tokenizer.from_dir(folder), [prompt(r) for r in recs], max_new_tokens=10,
                    batch_size=1, progress=False)
    assert [p["output"] for p in preds] == want
    assert any(w for w in want)
    assert [f.name for f in out.parent.iterdir()] == ["out.json"]  # no temporary file left


def bad_cases(tmp_path, folder):
    ok = records(0)
    other = tmp_path / "other_model"
    hf_model(0, vocab_size=400, hidden_size=32, intermediate_size=64).save_pretrained(other)
    mismatched = make_peft_adapter(other, tmp_path / "bad_adapter")
    raw = {"not_list.json": '{"id": "a", "instruction": "x"}', "empty.json": "",
           "trailing.json": '[{"id": "a", "instruction": "x", "output": "y"},]'}
    for name, text in raw.items():
        (tmp_path / name).write_text(text, encoding="utf-8")
    files = {
        "no_instruction.json": [ok[0], {"id": "b7", "output": "y"}],
        "no_output.json": [ok[0], {"id": "b8", "instruction": "x"}],
        "dup.json": [ok[0], ok[1], dict(ok[2], id=ok[0]["id"])],
        "too_long.json": [ok[0], {"id": "long1", "instruction": "長" * 2000, "output": "y"}],
        "good.json": ok,
    }
    for name, obj in files.items():
        write_json(tmp_path / name, obj)
    both, ppl, pred = ("ppl", "predict"), ("ppl",), ("predict",)
    return [  # (script kinds, test file, extra flags, expected message regex)
        (both, "not_list.json", [], r"not_list\.json: expected a JSON list of records, found a dict"),
        (both, "empty.json", [], r"empty\.json: the file is empty"),
        (both, "trailing.json", [], r"trailing\.json: line 1, column \d+"),
        (both, "missing.json", [], r"missing\.json: no such file"),
        (both, "no_instruction.json", [], r"no_instruction\.json: record 1 \(id 'b7'\) has no 'instruction'"),
        (ppl, "no_output.json", [], r"no_output\.json: record 1 \(id 'b8'\) has no 'output'"),
        (both, "dup.json", [], r"dup\.json: record 2 \(id 'a1'\): duplicate id, first at record 0"),
        (both, "too_long.json", [], r"too_long\.json: record 1 \(id 'long1'\) has \d+ tokens.* is 384"),
        (both, "good.json", ["--peft_path", str(mismatched)], r"bad_adapter.*shape"),
        (both, "good.json", ["--peft_path", str(tmp_path / "nowhere")], r"nowhere.*adapter_config\.json"),
        (both, "good.json", ["--prompt_template", "nope"], r"--prompt_template: .*'nope'"),
        (both, "good.json", ["--batch_size", "0"], r"--batch_size 0: must be at least 1"),
        (ppl, "good.json", ["--per_example_out", str(tmp_path)], r"--per_example_out .*: is a folder"),
        (pred, "good.json", ["--output_path", str(tmp_path / "good.json" / "x.json")], r"good\.json is a file"),
        (ppl, "good.json", ["--repeats", "3"], r"need --few_shot"),
        (ppl, "good.json", ["--few_shot", "7"], r"good\.json: 7 usable records, too few"),
    ]


def test_bad_inputs_fail_cleanly(folder, tmp_path, capsys):
    cases = bad_cases(tmp_path, folder)
    capsys.readouterr()
    for kinds, name, flags, message in cases:
        for kind in kinds:
            out = tmp_path / "out" / f"{kind}.json"
            main = ppl_main if kind == "ppl" else predict_main
            dest = ["--per_example_out" if kind == "ppl" else "--output_path", str(out)]
            rc = main(["--base_model_path", str(folder), "--test_data_path", str(tmp_path / name),
                       *dest, *FP32, *flags])
            err = capsys.readouterr().err
            assert rc == 2, (kind, name, flags, err)
            assert err.startswith("error: ") and "Traceback" not in err
            assert re.search(message, err), (kind, name, err)
            assert not out.exists() and not (out.parent.exists() and any(out.parent.iterdir()))


def test_predict_keeps_old_output_until_a_run_completes(folder, tmp_path):
    out = write_path(tmp_path / "out.json", [{"id": "old", "output": "kept"}])
    before = out.read_text()
    bad = write_path(tmp_path / "bad.json", [{"id": "x", "instruction": "長" * 2000}])
    args = ["--base_model_path", str(folder), "--output_path", str(out), *FP32]
    assert predict_main(args + ["--test_data_path", str(bad)]) == 2
    assert out.read_text() == before
    good = write_path(tmp_path / "good.json", [{"id": "x", "instruction": "hi"}])
    assert predict_main(args + ["--test_data_path", str(good), "--max_new_tokens", "3"]) == 0
    assert [p["id"] for p in json.loads(out.read_text())] == ["x"]
    assert sorted(f.name for f in tmp_path.iterdir()) == ["bad.json", "good.json", "out.json"]


@pytest.mark.skipif(not (REPO / "weights/tiny/config.json").exists() or
                    not (REPO / "data/example/predict.json").exists(), reason="no embedded model/data")
def test_default_runs_on_embedded_model(tmp_path):
    """`python scripts/ppl.py` and `python scripts/predict.py` with no model or data flags."""
    def run(script, *flags):
        return subprocess.run([sys.executable, f"scripts/{script}", *flags], cwd=REPO,
                              capture_output=True, text=True, timeout=300)

    res = run("ppl.py", "--progress", "False")
    assert res.returncode == 0, res.stderr
    assert 1 < printed_mean(res.stdout) < 1e4
    out = tmp_path / "pred.json"
    res = run("predict.py", "--output_path", str(out), "--max_new_tokens", "24", "--progress", "False")
    assert res.returncode == 0, res.stderr
    ids = [r["id"] for r in json.loads((REPO / "data/example/predict.json").read_text(encoding="utf-8"))]
    assert [p["id"] for p in json.loads(out.read_text(encoding="utf-8"))] == ids
