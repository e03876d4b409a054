"""data.py and audit.py against qlora.py: collator ids/labels/padding, prompt templates, eval split,
transformers' length-grouped sampler, accelerate's seeded shuffle, and the data audit."""
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from minqlora.errors import BadInput
from _fixtures_data import SHARED, copy_llama_tokenizer, hf_tokenizer, qlora_collate, write_llama_tokenizer
from minqlora.audit import audit
from minqlora.data import (
    FORMATS, Example, Prompt, build_examples, collate, encode_example, length_grouped, load_dataset,
    shuffled, split_train_eval,
)
from minqlora.tokenizer import Tokenizer

# qlora.py's ALPACA_PROMPT_DICT, copied verbatim.
QLORA_ALPACA = {
    "prompt_input": (
        "Below is an instruction that describes a task, paired with an input that provides further context. "
        "Write a response that appropriately completes the request.\n\n"
        "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response: "
    ),
    "prompt_no_input": (
        "Below is an instruction that describes a task. "
        "Write a response that appropriately completes the request.\n\n"
        "### Instruction:\n{instruction}\n\n### Response: "
    ),
}

SHORT = ("Hello world", "雅裏怒曰")
LONG_SRC = ("Below is an instruction that describes a task. " * 6, "short")
LONG_TGT = ("Hi", "The quick brown fox jumps over the lazy dog. " * 4)
CHINESE = ("翻譯成文言文：\n雅裏惱怒地說： 從前在福山田獵時，你誣陷獵官。\n答案：", "雅裏怒曰： 昔畋於福山，卿誣獵官，今復有此言。")


@pytest.fixture(scope="module")
def toks(tmp_path_factory):
    """(minqlora Tokenizer, qlora-era transformers tokenizer) over the same trained tokenizer.model.

    The transformers one has legacy=True: qlora.py ran the slow legacy LlamaTokenizer, which tokenises
    the text after "<s>" as if it stood alone. transformers 5's default (legacy=False) drops the "▁"
    that starts the prompt after "<s>"; qlora.py's f"{bos_token}{prompt}" then means something else."""
    folder = write_llama_tokenizer(tmp_path_factory.mktemp("tok") / "llama")
    legacy = tmp_path_factory.mktemp("tok") / "legacy"
    shutil.copytree(folder, legacy)
    cfg = json.loads((legacy / "tokenizer_config.json").read_text())
    (legacy / "tokenizer_config.json").write_text(json.dumps({**cfg, "legacy": True}))
    return Tokenizer.from_dir(folder), hf_tokenizer(legacy), hf_tokenizer(folder)


def mq_collate(tok, pairs, pad_id, **kw):
    return collate([encode_example(tok, s, t, **kw) for s, t in pairs], pad_id)


@pytest.mark.parametrize("pairs,src_max,tgt_max,on_source", [
    ([SHORT], 64, 64, False),
    ([LONG_SRC], 16, 64, False),
    ([LONG_TGT], 64, 12, False),
    ([SHORT, LONG_SRC], 24, 64, True),
    ([CHINESE], 256, 256, False),
    ([CHINESE, SHORT, LONG_TGT, LONG_SRC, ("", "")], 40, 20, False),
], ids=["short", "source-cut", "target-cut", "train-on-source", "chinese", "mixed-batch"])
def test_collate_matches_qlora(toks, pairs, src_max, tgt_max, on_source):
    tok, hf_legacy, _ = toks
    ref = qlora_collate(hf_legacy, pairs, src_max, tgt_max, train_on_source=on_source)
    got = mq_collate(tok, pairs, hf_legacy.pad_token_id, source_max_len=src_max, target_max_len=tgt_max,
                     train_on_source=on_source)
    for key in ("input_ids", "labels", "attention_mask"):
        assert got[key].dtype == torch.long
        assert torch.equal(got[key], ref[key].long()), key


def test_truncation_semantics(toks):
    tok = toks[0]
    e = encode_example(tok, *LONG_SRC, source_max_len=16, target_max_len=64)
    assert e.input_ids[0] == tok.bos_id and e.labels[:16] == [-100] * 16  # BOS counts towards the 16
    assert e.input_ids[16:] == tok.encode(LONG_SRC[1]) + [tok.eos_id]
    e = encode_example(tok, *LONG_TGT, source_max_len=64, target_max_len=12)
    assert len(e.labels) - e.labels.count(-100) == 12 and tok.eos_id not in e.input_ids  # EOS lost
    assert e.length == len(LONG_TGT[0]) + len(LONG_TGT[1])  # qlora's length column, in characters


def test_bos_then_prompt_ids(toks):
    """The source is [BOS] + tok(prompt), as the course's perplexity script builds it, under the
    transformers 5 tokenizer a user of this checkpoint would load (legacy=False)."""
    tok, _, hf_new = toks
    for src, tgt in (SHORT, CHINESE, LONG_SRC):
        e = encode_example(tok, src, tgt, source_max_len=10_000, target_max_len=10_000)
        ids = hf_new(src, add_special_tokens=False)["input_ids"]
        assert e.input_ids[:len(ids) + 1] == [hf_new.bos_token_id] + ids
        assert e.input_ids[len(ids) + 1:] == hf_new(tgt + "</s>", add_special_tokens=False)["input_ids"]


def test_build_examples_and_limits(toks):
    tok = toks[0]
    recs = [{"instruction": "Hello world", "output": "雅裏"}, {"instruction": "翻譯", "output": "x"}]
    p = Prompt("course")
    got = build_examples(recs, tok, p, source_max_len=30, target_max_len=5, progress=False)
    want = [encode_example(tok, p(r), r["output"], source_max_len=30, target_max_len=5) for r in recs]
    assert got == want and all(isinstance(e, Example) for e in got)
    with pytest.raises(BadInput, match="--source_max_len"):
        build_examples(recs, tok, p, source_max_len=0, target_max_len=5, progress=False)
    with pytest.raises(BadInput, match="--target_max_len"):
        encode_example(tok, "a", "b", source_max_len=4, target_max_len=0)


def test_collate_padding():
    batch = collate([Example([1, 5, 6], [-100, 5, 6], 3), Example([1, 7], [-100, 7], 2)], pad_id=0)
    assert batch["input_ids"].tolist() == [[1, 5, 6], [1, 7, 0]]
    assert batch["labels"].tolist() == [[-100, 5, 6], [-100, 7, -100]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 1, 0]]


def test_alpaca_prompts_equal_qlora():
    p = Prompt("alpaca")
    for rec in ({"instruction": "Do it", "output": "o"}, {"instruction": "Do it", "input": "", "output": "o"}):
        assert p(rec) == QLORA_ALPACA["prompt_no_input"].format(**rec)
    rec = {"instruction": "Do it", "input": "this", "output": "o"}
    assert p(rec) == QLORA_ALPACA["prompt_input"].format(**rec)
    assert Prompt("input-output")({"input": "raw text {x}", "output": "o"}) == "raw text {x}"
    assert Prompt("course")({"instruction": "翻譯", "output": "o"}).endswith("USER: 翻譯 ASSISTANT:")


def test_load_dataset(tmp_path):
    path = tmp_path / "d.json"
    path.write_text(json.dumps([{"instruction": "i", "output": "o"}]), encoding="utf-8")
    assert FORMATS == ("alpaca", "input-output", "course")
    assert load_dataset(path, "alpaca") == load_dataset(path, "course") == [{"instruction": "i", "output": "o"}]
    with pytest.raises(BadInput, match="record 0 has no 'input'"):
        load_dataset(path, "input-output")
    with pytest.raises(BadInput, match="--dataset_format"):
        load_dataset(path, "chip2")
    path.write_text(json.dumps([{"instruction": "i", "input": None, "output": "o"}]), encoding="utf-8")
    with pytest.raises(BadInput, match="non-string 'input'"):
        load_dataset(path, "alpaca")


def test_split_train_eval():
    recs = [{"id": i} for i in range(50)]
    train, ev = split_train_eval(recs, eval_dataset_size=10, max_eval_samples=None, seed=42)
    assert (train, ev) == split_train_eval(recs, eval_dataset_size=10, max_eval_samples=None, seed=42)
    assert len(train) == 40 and len(ev) == 10
    ids_t, ids_e = [r["id"] for r in train], [r["id"] for r in ev]
    assert not set(ids_t) & set(ids_e) and sorted(ids_t + ids_e) == list(range(50))
    # datasets' train_test_split(test_size=10, shuffle=True, seed=42): eval first, train the rest.
    perm = np.random.default_rng(42).permutation(50).tolist()
    assert ids_e == perm[:10] and ids_t == perm[10:]
    assert split_train_eval(recs, eval_dataset_size=10, max_eval_samples=None, seed=1)[1] != ev
    _, capped = split_train_eval(recs, eval_dataset_size=10, max_eval_samples=3, seed=42)
    assert capped == ev[:3]


@pytest.mark.parametrize("kw,match", [
    (dict(eval_dataset_size=5, max_eval_samples=None), "--eval_dataset_size 5"),
    (dict(eval_dataset_size=0, max_eval_samples=None), "--eval_dataset_size 0"),
    (dict(eval_dataset_size=2, max_eval_samples=0), "--max_eval_samples"),
])
def test_split_errors(kw, match):
    with pytest.raises(BadInput, match=match):
        split_train_eval([{"id": i} for i in range(5)], seed=0, **kw)
    with pytest.raises(BadInput, match="no training records"):
        split_train_eval([], eval_dataset_size=1, max_eval_samples=None, seed=0)


@pytest.mark.parametrize("n,group,seed", [(1000, 16, 42), (1000, 4, 0), (37, 4, 3), (5, 8, 1), (300, 1, 7)])
def test_length_grouped_sampler_equals_transformers(n, group, seed):
    from transformers.trainer_pt_utils import get_length_grouped_indices

    g = torch.Generator().manual_seed(1234)
    # Few distinct lengths (ties: the sort must be stable) and nearly all distinct (the longest is
    # rarely in the first megabatch: it must be swapped to the front).
    for high in (60, 100_000):
        lengths = torch.randint(1, high, (n,), generator=g).tolist()
        for epoch in (0, 1):
            ref = get_length_grouped_indices(lengths, group, generator=torch.Generator().manual_seed(seed + epoch))
            assert length_grouped(lengths, group, seed, epoch) == ref
        assert length_grouped(lengths, group, seed, 0) != length_grouped(lengths, group, seed, 1) or n < 10
        assert lengths[length_grouped(lengths, group, seed, 0)[0]] == max(lengths)  # longest first


def test_random_sampler_equals_accelerate():
    from accelerate.data_loader import SeedableRandomSampler

    ref = SeedableRandomSampler(range(100), data_seed=5)
    first, second = list(ref), list(ref)  # accelerate moves to the next epoch after each pass
    assert shuffled(100, 5, 0) == first and shuffled(100, 5, 1) == second
    assert sorted(shuffled(100, 5, 3)) == list(range(100)) and shuffled(100, 5, 3) == shuffled(100, 5, 3)


class CharTok:
    """One token per character: lengths are easy to craft."""
    bos_id, eos_id = 1, 2

    def encode(self, text, bos=False, eos=False):
        return [self.bos_id] * bos + [ord(c) for c in text] + [self.eos_id] * eos


def test_audit_crafted(capsys):
    recs = [{"input": "a" * k, "output": "b" * m} for k, m in ((3, 1), (5, 2), (7, 3), (30, 4))]
    r = audit(recs, CharTok(), Prompt("input-output"), source_max_len=10, target_max_len=5, name="train")
    out = capsys.readouterr().out
    assert r["records"] == 4
    src, tgt = r["source"], r["target"]  # source lengths 4, 6, 8, 31; target 2, 3, 4, 5
    assert (src["p50"], src["p90"], src["p99"], src["max"]) == (6, 31, 31, 31)
    assert (src["over"], src["share_over"], src["tokens_lost"]) == (1, 0.25, 21)
    assert (tgt["p50"], tgt["max"], tgt["over"], tgt["share_over"]) == (3, 5, 0, 0.0)
    assert len(r["warnings"]) == 1 and "--source_max_len" in r["warnings"][0]
    warn = [line for line in out.splitlines() if line.startswith("WARNING:")]
    assert len(warn) == 1 and "25.0%" in warn[0] and "--source_max_len" in warn[0]
    assert "longest prompts: #3: 31, #2: 8, #1: 6" in out

    r = audit(recs, CharTok(), Prompt("input-output"), source_max_len=31, target_max_len=4)
    out = capsys.readouterr().out
    warn = [line for line in out.splitlines() if line.startswith("WARNING:")]
    assert r["source"]["over"] == 0 and r["target"]["share_over"] == 0.25  # 31 tokens fit in 31
    assert len(warn) == 1 and "--target_max_len" in warn[0] and "EOS" in warn[0]


HW3 = SHARED / "data" / "adl2023-hw3" / "train.json"
LLAMA2 = SHARED / "tokenizers" / "llama2" / "tokenizer.model"


@pytest.mark.skipif(not (HW3.exists() and LLAMA2.exists()), reason="needs /work/shared's HW3 data and Llama-2 tokenizer")
def test_audit_course_data(tmp_path, capsys):
    tok = Tokenizer.from_dir(copy_llama_tokenizer(LLAMA2, tmp_path / "llama2"))
    recs = load_dataset(HW3, "alpaca")
    r = audit(recs, tok, Prompt("alpaca"), source_max_len=128, target_max_len=128)
    assert r["records"] == 10_000
    assert abs(r["source"]["share_over"] - 0.18) <= 0.015 and abs(r["target"]["share_over"] - 0.035) <= 0.015
    assert '"### Response:"' in capsys.readouterr().out
    r = audit(recs, tok, Prompt("course"), source_max_len=128, target_max_len=128)
    assert abs(r["source"]["share_over"] - 0.79) <= 0.03
    assert '"ASSISTANT:"' in capsys.readouterr().out


TINY = Path(__file__).resolve().parents[1] / "weights" / "tiny"
EXAMPLE = Path(__file__).resolve().parents[1] / "data" / "example" / "train.json"


@pytest.mark.skipif(not (TINY / "tokenizer.model").exists() or not EXAMPLE.exists(), reason="embedded defaults absent")
def test_embedded_example_matches_qlora(tmp_path):
    """The shipped tiny checkpoint's tokenizer on the shipped example data, course prompt."""
    legacy = tmp_path / "legacy"
    shutil.copytree(TINY, legacy, ignore=shutil.ignore_patterns("*.safetensors*"))
    cfg = json.loads((legacy / "tokenizer_config.json").read_text())
    (legacy / "tokenizer_config.json").write_text(json.dumps({**cfg, "legacy": True}))
    hf = hf_tokenizer(legacy)
    recs, p = load_dataset(EXAMPLE, "course")[:16], Prompt("course")
    pairs = [(p(r), r["output"]) for r in recs]
    ref = qlora_collate(hf, pairs, 48, 24)
    examples = build_examples(recs, Tokenizer.from_dir(TINY), p, source_max_len=48, target_max_len=24, progress=False)
    got = collate(examples, hf.pad_token_id)
    assert all(torch.equal(got[k], ref[k].long()) for k in ("input_ids", "labels", "attention_mask"))
