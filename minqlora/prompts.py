"""Prompt templates: how a record {instruction, input?, output} becomes the text the model reads.

`course` is the ADL 2023 HW3 chat prompt that the course's perplexity script scores with; `alpaca`
is qlora.py's ALPACA_PROMPT_DICT (its --dataset_format alpaca); `input-output` uses a record's
`input` field verbatim. A template file holds one `{instruction}` placeholder. Checked against
qlora.py's strings in tests/test_data.py.
"""
from __future__ import annotations

import re
from pathlib import Path

COURSE = ("你是人工智慧助理，以下是用戶和人工智能助理之間的對話。你要對用戶的問題提供有用、安全、"
          "詳細和禮貌的回答。USER: {instruction} ASSISTANT:")
ALPACA_INPUT = ("Below is an instruction that describes a task, paired with an input that provides "
                "further context. Write a response that appropriately completes the request.\n\n"
                "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response: ")
ALPACA_NO_INPUT = ("Below is an instruction that describes a task. Write a response that "
                   "appropriately completes the request.\n\n### Instruction:\n{instruction}\n\n### Response: ")
NAMES = ("course", "alpaca", "input-output")
PLACEHOLDER = re.compile(r"\{(instruction|input)\}")


class Prompt:
    """`Prompt(name_or_file)(record) -> str`, and the record fields it needs."""

    def __init__(self, template: str):
        self.name = template
        if template == "course":
            self.template, self.fields = COURSE, ("instruction",)
        elif template == "alpaca":
            self.template, self.fields = None, ("instruction",)
        elif template == "input-output":
            self.template, self.fields = "{input}", ("input",)
        else:
            path = Path(template)
            if not path.is_file():
                raise ValueError(f"prompt template {template!r} is neither one of {', '.join(NAMES)} "
                                 "nor a file")
            self.template = path.read_text(encoding="utf-8").rstrip("\n")
            if "{instruction}" not in self.template:
                raise ValueError(f"{path}: a prompt template file needs an {{instruction}} placeholder")
            self.fields = ("instruction",)

    def __call__(self, record: dict) -> str:
        if self.template is None:  # alpaca: qlora.py uses the input variant only for a non-empty input
            if record.get("input", ""):
                return ALPACA_INPUT.format(instruction=record["instruction"], input=record["input"])
            return ALPACA_NO_INPUT.format(instruction=record["instruction"])
        # One pass, so a "{input}" inside the instruction's own text stays as it is.
        return PLACEHOLDER.sub(lambda m: record.get(m.group(1), ""), self.template)
