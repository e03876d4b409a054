"""minqlora.perplexity against the course's ppl.py algorithm run on transformers' Llama (+ peft), and
the few-shot protocol of minqlora.course (draws, balance, exclusion of the scored example)."""
import json
import math

import pytest
import torch

from _fixtures_infer import SHARED, course_reference_ppl, hf_pair, make_peft_adapter, model_dir, records
from minqlora.adapter import load_adapter
from minqlora.errors import BadInput
from minqlora.course import (TO_CLASSICAL, TO_MODERN, FewShotPrompt, direction,
                              plan_draws)
from minqlora.loader import load_model
from minqlora.data import Prompt, encode_example
from minqlora.perplexity import mean_perplexity, perplexities
from minqlora.tokenizer import Tokenizer

PROMPT = Prompt("course")
MAX_LEN = 120  # the long record (about 200 tokens) is cut, its output only partly scored


@pytest.fixture(scope="module")
def folder():
    return model_dir()


def ours(folder, adapter=None):
    model = load_model(folder, bits=16, dtype=torch.float32, progress=False)
    if adapter is not None:
        load_adapter(model, adapter)
    return model, Tokenizer.from_dir(folder)


def assert_close(a, b, rel=1e-4):
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert x == pytest.approx(y, rel=rel), (a, b)


def test_fixture_has_mixed_lengths_and_a_truncated_record(folder):
    tok = Tokenizer.from_dir(folder)
    lengths = [len(encode_example(tok, PROMPT(r), r["output"], max_length=10**6).input_ids) for r in records()]
    assert len(set(lengths)) >= 5
    assert max(lengths) > MAX_LEN and sorted(lengths)[-2] <= MAX_LEN
    e = encode_example(tok, PROMPT(records()[0]), records()[0]["output"], max_length=2048)
    ids, labels = e.input_ids, e.labels
    assert ids[0] == tok.bos_id and ids[-1] == tok.eos_id and labels[-1] == tok.eos_id
    n_prompt = 1 + len(tok.encode(PROMPT(records()[0])))
    assert labels[:n_prompt] == [-100] * n_prompt and labels[n_prompt:] == ids[n_prompt:]


@pytest.mark.parametrize("batch_size", [1, 3, 8])
def test_matches_course_reference(folder, batch_size):
    hf, hf_tok = hf_pair(folder)
    ref = course_reference_ppl(hf, hf_tok, records(), PROMPT, max_length=MAX_LEN)
    model, tok = ours(folder)
    got = perplexities(model, tok, records(), PROMPT, batch_size=batch_size, max_length=MAX_LEN,
                       progress=False)
    assert_close(got, ref)
    assert mean_perplexity(got) == pytest.approx(sum(ref) / len(ref), rel=1e-4)
    assert len(set(round(v, 3) for v in got)) == len(got)  # not one number repeated


def test_matches_course_reference_with_peft_adapter(folder, tmp_path):
    adapter = make_peft_adapter(folder, tmp_path / "adapter")
    hf, hf_tok = hf_pair(folder, adapter)
    ref = course_reference_ppl(hf, hf_tok, records(), PROMPT, max_length=MAX_LEN)
    base_ref = course_reference_ppl(hf_pair(folder)[0], hf_tok, records(), PROMPT, max_length=MAX_LEN)
    assert abs(ref[0] - base_ref[0]) > 1e-3 * ref[0]  # the adapter matters
    model, tok = ours(folder, adapter)
    for bs in (1, 4):
        assert_close(perplexities(model, tok, records(), PROMPT, batch_size=bs, max_length=MAX_LEN,
                                  progress=False), ref)


def test_eval_mode_inside_and_training_state_restored(folder, tmp_path):
    adapter = make_peft_adapter(folder, tmp_path / "adapter", dropout=0.5)
    hf, hf_tok = hf_pair(folder, adapter)
    ref = course_reference_ppl(hf, hf_tok, records(0), PROMPT)
    model, tok = ours(folder, adapter)
    model.train()  # LoRA dropout 0.5 would change every number if left on
    got = perplexities(model, tok, records(0), PROMPT, batch_size=4, progress=False)
    assert model.training and all(m.training for m in model.modules())
    assert_close(got, ref)
    assert torch.is_grad_enabled()


def test_other_template_and_nan_for_fully_truncated_output(folder):
    hf, hf_tok = hf_pair(folder)
    alpaca = Prompt("alpaca")
    model, tok = ours(folder)
    assert_close(perplexities(model, tok, records(), alpaca, batch_size=5, progress=False),
                 course_reference_ppl(hf, hf_tok, records(), alpaca))
    n_prompt = len(encode_example(tok, PROMPT(records()[0]), "", max_length=10**6).input_ids) - 1
    with pytest.warns(UserWarning, match="no output token left"):
        got = perplexities(model, tok, records()[:2], PROMPT, max_length=n_prompt, progress=False)
    assert math.isnan(got[0])  # the course gets 0/0 = NaN too


def test_mean_is_arithmetic_mean_of_perplexities():
    assert mean_perplexity([1.0, 3.0, 8.0]) == 4.0
    with pytest.raises(ValueError):
        mean_perplexity([])


# --- few-shot -------------------------------------------------------------------------------------

def pool_records(n_classical=6, n_modern=5, n_unknown=0):
    recs = [{"id": f"c{i}", "instruction": f"句子{i}\n翻譯成文言文：", "output": f"古{i}"} for i in range(n_classical)]
    recs += [{"id": f"m{i}", "instruction": f"文言文翻譯：\n句{i}", "output": f"今{i}"} for i in range(n_modern)]
    recs += [{"id": f"u{i}", "instruction": f"hello {i}", "output": "x"} for i in range(n_unknown)]
    return recs


def test_direction_classifier():
    assert direction("翻譯成文言文：\n我今天要去京城。\n答案：") == TO_CLASSICAL
    assert direction("我們應該辭官。\n翻譯成古文：") == TO_CLASSICAL
    assert direction("希望您以後留意。\n這句話在中國古代怎麼說：") == TO_CLASSICAL
    assert direction("吾等無書信。\n翻譯成白話文：") == TO_MODERN
    assert direction("文言文翻譯：\n後未旬，果見囚執。") == TO_MODERN
    assert direction("辛未，命吳堅為左丞相。\n把這句話翻譯成現代文。") == TO_MODERN
    assert direction("hello") is None
    assert direction("翻譯成文言文，再翻譯成現代文") is None  # both: refuse to guess


@pytest.mark.skipif(not (SHARED / "data/adl2023-hw3/train.json").exists(), reason="no shared course data")
def test_direction_classifier_covers_course_data():
    for name in ("train.json", "public_test.json", "private_test.json"):
        data = json.loads((SHARED / "data/adl2023-hw3" / name).read_text(encoding="utf-8"))
        dirs = [direction(r["instruction"]) for r in data]
        assert None not in dirs
        assert 0.4 < dirs.count(TO_CLASSICAL) / len(dirs) < 0.6


def test_draws_from_test_file_deterministic_exclusive_and_different():
    test = pool_records()
    a = plan_draws(test, None, k=4, repeats=5, seed=7)
    b = plan_draws(test, None, k=4, repeats=5, seed=7)
    assert [[s["id"] for s in shots] for shots, _ in a] == [[s["id"] for s in shots] for shots, _ in b]
    assert len({frozenset(s["id"] for s in shots) for shots, _ in a}) == 5  # repeats differ
    for shots, scored in a:
        ids = {s["id"] for s in shots}
        assert len(shots) == 4 and len(scored) == len(test) - 4
        assert not ids & {test[i]["id"] for i in scored}
        p = FewShotPrompt(PROMPT, shots)
        for i in scored:
            text = p(test[i])
            assert test[i]["output"] not in text  # never its own answer
            assert all(s["output"] in text for s in shots)
            assert text.endswith(f"USER: {test[i]['instruction']} ASSISTANT:")
    assert plan_draws(test, None, k=4, repeats=1, seed=8)[0][0] != a[0][0]


def test_separate_pool_excludes_test_records_and_scores_all():
    test = pool_records(3, 3)
    pool = pool_records(6, 5) + [{"id": "zz", "instruction": test[0]["instruction"], "output": test[0]["output"]}]
    for shots, scored in plan_draws(test, pool, k=5, repeats=4, seed=1):
        assert scored == list(range(len(test)))
        test_ids = {r["id"] for r in test}
        assert not {s["id"] for s in shots} & (test_ids | {"zz"})
    with pytest.raises(BadInput, match="too few"):
        plan_draws(test, pool_records(3, 3), k=1, repeats=1, seed=0)  # every pool record is a test one


@pytest.mark.parametrize("k", [4, 5])
def test_balanced_draws(k):
    for shots, _ in plan_draws(pool_records(8, 3), None, k=k, repeats=6, seed=3, balanced=True):
        n_c = sum(direction(s["instruction"]) == TO_CLASSICAL for s in shots)
        assert abs(n_c - (k - n_c)) <= 1 and len(shots) == k


def test_balanced_refuses_unclassifiable_or_too_few():
    with pytest.raises(BadInput, match=r"translation direction of p.json: record 8 \(id 'u0'\)"):
        plan_draws(pool_records(4, 4, 1), None, k=4, repeats=1, seed=0, balanced=True, pool_name="p.json")
    with pytest.raises(BadInput, match="classical->modern"):
        plan_draws(pool_records(8, 1), None, k=4, repeats=1, seed=0, balanced=True)
    plan_draws(pool_records(4, 4, 1), None, k=4, repeats=1, seed=0)  # unbalanced: fine


def test_few_shot_prompt_format():
    shots = pool_records(1, 1)
    chat = FewShotPrompt(PROMPT, shots)(records()[0])
    assert chat.count("USER:") == 3 and chat.count("ASSISTANT:") == 3 and chat.endswith("ASSISTANT:")
    assert chat.count("你是人工智慧助理") == 1  # one system message
    assert f"USER: {shots[0]['instruction']} ASSISTANT: {shots[0]['output']} USER: " in chat
    alpaca = Prompt("alpaca")
    text = FewShotPrompt(alpaca, shots)(records()[0])
    assert text == alpaca(shots[0]) + shots[0]["output"] + "\n\n" + alpaca(shots[1]) + \
        shots[1]["output"] + "\n\n" + alpaca(records()[0])


def test_few_shot_scoring_matches_course_reference(folder):
    """The few-shot prompts really are what gets scored: one draw, scored by hand, same numbers."""
    model, tok = ours(folder)
    test = records(0)
    (shots, scored), = plan_draws(test, None, k=2, repeats=1, seed=0)
    p = FewShotPrompt(PROMPT, shots)
    got = perplexities(model, tok, [test[i] for i in scored], p, batch_size=3, progress=False)
    hf, hf_tok = hf_pair(folder)
    assert_close(got, course_reference_ppl(hf, hf_tok, [test[i] for i in scored], p))
