"""The course: NTU ADL 2023 HW3, the seed's task (classical <-> modern Chinese translation with
Taiwan-LLM), kept here so that the general QLoRA path reads without it.

- `PROMPT`: the course's chat prompt, which its ppl.py scores with (`--prompt_template course`, the
  default of scripts/ppl.py and predict.py; `--dataset_format course` for training).
- The metric protocol: each test record's perplexity of its output given the prompt ([BOS] + prompt
  + output + [EOS], cut to 2048 tokens, perplexity.py), the reported number their arithmetic mean
  (`perplexity.mean_perplexity`); with few-shot draws, each draw's mean, then the draws' mean and
  sample std (scripts/ppl.py).
- Few-shot (in-context) draws, below: what HW3 students ran by hand for the in-context-learning
  comparison, one flag here. Each draw picks K examples at random and puts the same K in front of
  every scored prompt; R draws give R scores. Where the examples come from:
  - the test file itself (no pool given, or the pool is the test file): the K drawn records are
    removed from that draw's scored set, so no prompt ever contains its own answer;
  - another file (e.g. train.json): any pool record that is also a test record (same id, or same
    instruction and output) is never drawn, and every test record is scored.
  Draws come from one `random.Random(seed)`: the same seed gives the same draws; a draw that repeats
  an earlier one is redrawn (up to 100 times), so repeats differ whenever the pool allows it.
- `--balanced` draws split K evenly (counts differ by at most one) between the two translation
  directions, told apart by the classical/modern classifier `direction(instruction)`; an unbalanced
  draw was found to hurt the score.

How the examples are written (the course's prompt is a Vicuna-style chat, so the examples become
earlier turns of that conversation, under one system message):
    course (any template holding "USER: {instruction} ASSISTANT:"):
        <system> USER: i1 ASSISTANT: o1 USER: i2 ASSISTANT: o2 USER: <instruction> ASSISTANT:
    any other template (alpaca, input-output, a file): each example's full prompt + output + "\\n\\n",
        then the scored prompt.
No paper section (the course's own protocol). Checked against the course's ppl.py algorithm and for
the draws' rules in tests/test_perplexity.py and tests/test_infer_scripts.py.
"""
from __future__ import annotations

import random
import re

from .errors import BadInput

PROMPT = ("你是人工智慧助理，以下是用戶和人工智能助理之間的對話。你要對用戶的問題提供有用、安全、"
          "詳細和禮貌的回答。USER: {instruction} ASSISTANT:")
CHAT_TURN = "USER: {instruction} ASSISTANT:"
TO_CLASSICAL, TO_MODERN = "modern->classical", "classical->modern"

# Direction classifier: a few phrasings of "translate into X" / "how is this said in X", matched
# anywhere in the instruction (Traditional and Simplified characters). An instruction matching
# patterns of exactly one direction gets that direction; none or both gives None (unclassified).
_VERB = r"(?:翻譯|翻译|譯|译|轉換|转换|轉|转|改寫|改写|寫|写|改)成?為?"
_PATTERNS = {
    TO_CLASSICAL: [
        _VERB + r"(?:文言|古文|古漢語|古汉语|古代漢語|古代汉语|古語|古语)",  # 翻譯成文言文, 翻譯成古文
        r"古代(?:怎麼|怎么|如何)?(?:說|说|講|讲|表達|表达|寫|写)",  # 這句話在古代怎麼說
        r"用(?:文言|古文)",  # 用文言文寫
        r"(?:文言文?|古文)(?:怎麼|怎么|如何)(?:說|说|寫|写|表達|表达)",  # 文言文怎麼說
    ],
    TO_MODERN: [
        _VERB + r"(?:現代|现代|白話|白话|今文|口語|口语)",  # 翻譯成現代文, 翻譯成白話文
        r"(?:文言文?|古文)(?:翻譯|翻译|譯|译)",  # 文言文翻譯：
        r"(?:現代|现代|白話|白话)(?:文|漢語|汉语)?(?:怎麼|怎么|如何)(?:說|说|寫|写|表達|表达)",
    ],
}
_COMPILED = {d: [re.compile(p) for p in ps] for d, ps in _PATTERNS.items()}


def direction(instruction: str) -> str | None:
    """TO_CLASSICAL, TO_MODERN, or None when the instruction names neither direction or both."""
    found = [d for d, pats in _COMPILED.items() if any(p.search(instruction) for p in pats)]
    return found[0] if len(found) == 1 else None


def _same_record_keys(rec: dict) -> set:
    keys = {("text", rec.get("instruction"), rec.get("input"), rec.get("output"))}
    if rec.get("id") is not None:
        keys.add(("id", rec["id"]))
    return keys


def _describe(where: str, i: int, rec: dict) -> str:
    rid = f" (id {rec['id']!r})" if rec.get("id") is not None else ""
    return f"{where}: record {i}{rid}"


def _draw(candidates: list[int], k: int, rng: random.Random, groups: dict | None) -> list[int]:
    if groups is None:
        return rng.sample(candidates, k)
    a, b = groups[TO_CLASSICAL], groups[TO_MODERN]
    half = k // 2
    ka = half + (k % 2 if rng.random() < 0.5 else 0)  # an odd K: the extra one goes either way
    picked = rng.sample(a, ka) + rng.sample(b, k - ka)
    rng.shuffle(picked)  # directions interleaved, not grouped
    return picked


def plan_draws(test: list[dict], pool: list[dict] | None, *, k: int, repeats: int, seed: int,
               balanced: bool = False, pool_name: str = "pool") -> list[tuple[list[dict], list[int]]]:
    """`repeats` draws of `k` examples: a list of (shots, indices of the test records to score).

    `pool` None means the test file is the pool (drawn records are not scored in that draw).
    """
    if k < 1:
        raise BadInput(f"--few_shot {k}: need at least one example")
    from_test = pool is None
    if from_test:
        pool, candidates = test, list(range(len(test)))
    else:
        test_keys = set().union(*(_same_record_keys(r) for r in test))
        candidates = [i for i, r in enumerate(pool) if not (_same_record_keys(r) & test_keys)]
    need = k + 1 if from_test else k  # from the test file, at least one record must stay scored
    if len(candidates) < need:
        extra = " and keep one to score" if from_test else " (records also in the test file excluded)"
        raise BadInput(f"{pool_name}: {len(candidates)} usable records, too few to draw {k} "
                           f"examples{extra}")

    groups = None
    if balanced:
        groups = {TO_CLASSICAL: [], TO_MODERN: []}
        for i in candidates:
            d = direction(pool[i].get("instruction", ""))
            if d is None:
                snippet = pool[i].get("instruction", "")[:40].replace("\n", "\\n")
                raise BadInput(
                    f"--balanced: cannot tell the translation direction of {_describe(pool_name, i, pool[i])} "
                    f"from its instruction {snippet!r} (no phrase like 翻譯成文言文/古文/古代怎麼說 or "
                    "翻譯成現代文/白話文/文言文翻譯, or both); drop --balanced or fix the record")
            groups[d].append(i)
        for d, members in groups.items():
            want = (k + 1) // 2
            if len(members) < want:
                raise BadInput(f"--balanced: {pool_name} has {len(members)} usable {d} records, "
                                   f"fewer than the {want} that {k} balanced examples may need")

    rng = random.Random(seed)
    draws, seen = [], set()
    for _ in range(repeats):
        for _attempt in range(100):
            picked = _draw(candidates, k, rng, groups)
            if frozenset(picked) not in seen:
                break
        seen.add(frozenset(picked))
        shots = [pool[i] for i in picked]
        drop = set(picked) if from_test else set()
        scored = [i for i in range(len(test)) if i not in drop]
        draws.append((shots, scored))
    return draws


class FewShotPrompt:
    """`prompt` (a data.Prompt) with `shots` written in front; callable like a Prompt."""

    def __init__(self, prompt, shots: list[dict]):
        self.prompt, self.shots = prompt, list(shots)
        self.fields = prompt.fields
        template = getattr(prompt, "template", None)
        self.chat = isinstance(template, str) and CHAT_TURN in template
        self.with_shots = prompt.with_shots(self.shots) if hasattr(prompt, "with_shots") else None  # chat.py
        if self.chat:
            self.turns = "".join(f"{s['instruction']} ASSISTANT: {s['output']} USER: " for s in self.shots)
        else:
            self.prefix = "".join(prompt(s) + s["output"] + "\n\n" for s in self.shots)

    def __call__(self, record: dict) -> str:
        if self.with_shots is not None:
            return self.with_shots(record)
        if self.chat:
            return self.prompt({**record, "instruction": self.turns + record["instruction"]})
        return self.prefix + self.prompt(record)


def direction_counts(records: list[dict]) -> dict:
    """How many records go each way (and how many are unclassified), e.g. for a summary line."""
    counts = {TO_CLASSICAL: 0, TO_MODERN: 0, None: 0}
    for r in records:
        counts[direction(r.get("instruction", ""))] += 1
    return counts
