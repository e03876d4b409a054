"""Training data, from a file to the micro-batches of each optimizer step.

records (a JSON list or JSON Lines file, every error located) -> prompt text (a template) -> token
ids with the prompt masked and both sides cut to their limits -> right-padded batches; plus the eval
split and the batch order. Reproduces qlora.py (artidoro/qlora, the code of the QLoRA paper, §4-5:
finetune on the response only): `DataCollatorForCausalLM` for tokenising, truncating and masking,
`ALPACA_PROMPT_DICT` / `extract_alpaca_dataset` for --dataset_format alpaca, `make_data_module` for
the eval split (datasets' `train_test_split`) and the `length` column; then transformers' Trainer
order: `get_length_grouped_indices` for --group_by_length, accelerate's seeded shuffle otherwise.
Checked against qlora.py's collator and strings, transformers' sampler and accelerate's shuffle in
tests/test_data.py and tests/test_inputs.py.
"""
from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from .audit import audit, context_warning
from .course import PROMPT as COURSE_PROMPT
from .errors import BadInput
from .loss import IGNORE_INDEX


# --- Records -------------------------------------------------------------------------------------------

def _where(path, i, rec):
    rid = rec.get("id") if isinstance(rec, dict) else None
    return f"{path}: record {i}" + (f" (id {rid!r})" if rid is not None else "")


def _parse(path: Path, text: str) -> list:
    try:
        return _parse_json(path, text)
    except RecursionError:
        raise BadInput(f"{path}: JSON nested too deeply to be records") from None


def _parse_json(path: Path, text: str) -> list:
    if path.suffix == ".jsonl":
        records = []
        for n, line in enumerate(text.splitlines(), 1):
            if line.strip():
                try:
                    records.append(json.loads(line))
                except json.JSONDecodeError as e:
                    raise BadInput(f"{path}: line {n}, column {e.colno}: {e.msg}") from None
        return records
    try:
        records = json.loads(text)
    except json.JSONDecodeError as e:
        raise BadInput(f"{path}: line {e.lineno}, column {e.colno}: {e.msg}") from None
    if not isinstance(records, list):
        raise BadInput(f"{path}: expected a JSON list of records, found a {type(records).__name__}")
    return records


def _encodes(text: str) -> bool:
    try:
        text.encode("utf-8")
        return True
    except UnicodeEncodeError:
        return False


def read_records(path, required=("instruction", "output"), unique_ids=False) -> list[dict]:
    """Load `path` (.json list or .jsonl) and check that every record has the `required` string fields."""
    path = Path(path)
    if path.is_dir():
        raise BadInput(f"{path}: is a folder; give a data file (.json list or .jsonl)")
    if not path.is_file():
        raise BadInput(f"{path}: no such file")
    try:
        text = path.read_text(encoding="utf-8-sig")  # (-sig: a byte-order mark, as Windows editors write, is skipped)
    except (OSError, UnicodeDecodeError) as e:
        raise BadInput(f"{path}: cannot read ({e})") from None
    if not text.strip():
        raise BadInput(f"{path}: the file is empty")
    records = _parse(path, text)
    if not records:
        raise BadInput(f"{path}: no records")
    seen = {}
    for i, rec in enumerate(records):
        if not isinstance(rec, dict):
            raise BadInput(f"{_where(path, i, rec)} is a {type(rec).__name__}, not an object")
        for key in required:
            if not isinstance(rec.get(key), str):
                what = "has no" if key not in rec else "has a non-string"
                raise BadInput(f"{_where(path, i, rec)} {what} {key!r} field")
        for key, value in rec.items():  # JSON may escape half a UTF-16 pair ("\ud800"): no tokenizer takes it
            if isinstance(value, str) and not value.isascii() and not _encodes(value):
                raise BadInput(f"{_where(path, i, rec)} field {key!r} holds an unpaired surrogate escape "
                               "(\\ud800-\\udfff alone): not text")
        if unique_ids and "id" in rec:
            if not isinstance(rec["id"], (str, int)) or isinstance(rec["id"], bool):
                raise BadInput(f"{_where(path, i, rec)}: id must be a string or an integer")
            if rec["id"] in seen:
                raise BadInput(f"{_where(path, i, rec)}: duplicate id, first at record {seen[rec['id']]}")
            seen[rec["id"]] = i
    return records


# --- Prompt templates: how a record {instruction, input?, output} becomes the text the model reads -------

ALPACA_INPUT = ("Below is an instruction that describes a task, paired with an input that provides "
                "further context. Write a response that appropriately completes the request.\n\n"
                "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response: ")
ALPACA_NO_INPUT = ("Below is an instruction that describes a task. Write a response that "
                   "appropriately completes the request.\n\n### Instruction:\n{instruction}\n\n### Response: ")
FORMATS = ("alpaca", "input-output", "course")  # --dataset_format; a prompt template may also be a file
_PLACEHOLDER = re.compile(r"\{(instruction|input)\}")


class Prompt:
    """`Prompt(template)(record) -> str`, and the record fields it needs. alpaca: qlora.py's
    ALPACA_PROMPT_DICT; input-output: the record's `input` verbatim; course: the seed task's chat
    prompt (course.py); a file: its text with one `{instruction}` placeholder."""

    def __init__(self, template: str):
        self.name, self.fields = template, ("instruction",)
        if template == "course":
            self.template = COURSE_PROMPT
        elif template == "alpaca":
            self.template = None
        elif template == "input-output":
            self.template, self.fields = "{input}", ("input",)
        else:
            path = Path(template)
            if not path.is_file():
                raise BadInput(f"prompt template {template!r} is neither one of course, alpaca, input-output "
                               "nor a file")
            self.template = path.read_text(encoding="utf-8").rstrip("\n")
            if "{instruction}" not in self.template:
                raise BadInput(f"{path}: a prompt template file needs an {{instruction}} placeholder")

    def __call__(self, record: dict) -> str:
        if self.template is None:  # alpaca: qlora.py uses the input variant only for a non-empty input
            if record.get("input", ""):
                return ALPACA_INPUT.format(instruction=record["instruction"], input=record["input"])
            return ALPACA_NO_INPUT.format(instruction=record["instruction"])
        # One pass, so a "{input}" inside the instruction's own text stays as it is.
        return _PLACEHOLDER.sub(lambda m: record.get(m.group(1), ""), self.template)


def load_dataset(path, dataset_format) -> list[dict]:
    """The records of `path` with the fields `dataset_format` needs (the target is always "output")."""
    if dataset_format not in FORMATS:
        raise BadInput(f"--dataset_format {dataset_format!r}: expected one of {', '.join(FORMATS)}")
    records = read_records(path, required=(*Prompt(dataset_format).fields, "output"))
    if dataset_format == "alpaca":
        # qlora.py's extract_alpaca_dataset picks the with-input template when input != "": a
        # non-string input (null, a number) would be formatted as text there; refuse it here.
        for i, rec in enumerate(records):
            if "input" in rec and not isinstance(rec["input"], str):
                raise BadInput(f"{path}: record {i} has a non-string 'input' field")
    return records


# --- Tokenising: qlora.py's DataCollatorForCausalLM, once per record -------------------------------------

@dataclass
class Example:
    input_ids: list[int]
    labels: list[int]
    length: int  # qlora.py's `length` column: len(prompt) + len(output) in characters, not tokens


def check_limits(source_max_len, target_max_len):
    """The one check of --source_max_len / --target_max_len (the flags call it too)."""
    for flag, value, special in (("source_max_len", source_max_len, "BOS"), ("target_max_len", target_max_len, "EOS")):
        if value is not None and value < 1:
            raise BadInput(f"--{flag} {value}: must be at least 1 (it counts the {special} token)")


def encode_example(tok, source: str, target: str, *, source_max_len: int | None = None,
                   target_max_len: int | None = None, train_on_source: bool = False,
                   max_length: int | None = None) -> Example:
    """One (prompt, output) pair as qlora.py's DataCollatorForCausalLM builds it: f"{bos_token}{source}"
    and f"{target}{eos_token}" tokenised separately, each cut to its limit (None: no cut):
    - source = [BOS] + ids(source), BOS counted; a cut source loses its end ("### Response:", see audit.py);
    - target = ids(target) + [EOS]; a cut target loses its EOS too, so the model never sees where such
      an output stops. Faithful to qlora.py, on purpose.
    [BOS] + ids(source), not ids("<s>" + source): qlora.py's slow legacy LlamaTokenizer tokenised the
    text after "<s>" as alone (leading "▁"); transformers 5 does not, which would change the first
    prompt token. The course's perplexity script feeds the same ids, cut as a whole to `max_length`."""
    check_limits(source_max_len, target_max_len)
    src = tok.encode(source, bos=True)[:source_max_len]
    tgt = tok.encode(target, eos=True)[:target_max_len]
    # Labels: the prompt is IGNORE_INDEX unless --train_on_source (then every token is scored).
    labels = src + tgt if train_on_source else [IGNORE_INDEX] * len(src) + tgt
    return Example((src + tgt)[:max_length], labels[:max_length], length=len(source) + len(target))


def build_examples(records, tok, prompt, *, source_max_len, target_max_len, train_on_source=False,
                   progress=True) -> list[Example]:
    """Tokenise every record once, before training (qlora.py, in the collator: the same ids)."""
    if tok.eos_id is None:
        raise BadInput("the tokenizer has no EOS token: targets end with one (add eos_token to tokenizer_config.json)")
    return [encode_example(tok, prompt(rec), rec["output"], source_max_len=source_max_len,
                           target_max_len=target_max_len, train_on_source=train_on_source)
            for rec in tqdm(records, desc="tokenizing", unit="rec", disable=not progress)]


def collate(examples: list[Example], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pad a batch: input_ids with pad_id, labels with IGNORE_INDEX (qlora.py's pad_sequence).
    attention_mask marks the real tokens: from the lengths, not input_ids != pad_id as in qlora.py (which
    adds a "[PAD]" token), since pad_id may be <unk> (id 0), which can occur in real text."""
    B, T = len(examples), max(len(e.input_ids) for e in examples)
    input_ids = torch.full((B, T), pad_id, dtype=torch.long)  # (B, T)
    labels = torch.full((B, T), IGNORE_INDEX, dtype=torch.long)  # (B, T)
    attention_mask = torch.zeros((B, T), dtype=torch.long)  # (B, T)
    for b, e in enumerate(examples):
        n = len(e.input_ids)
        input_ids[b, :n] = torch.tensor(e.input_ids, dtype=torch.long)
        labels[b, :n] = torch.tensor(e.labels, dtype=torch.long)
        attention_mask[b, :n] = 1
    return {"input_ids": input_ids, "labels": labels, "attention_mask": attention_mask}


# --- The eval split and the train data: qlora.py's make_data_module --------------------------------------

def split_train_eval(records, *, eval_dataset_size: int, max_eval_samples: int | None, seed: int):
    """Hold out `eval_dataset_size` records as datasets' `train_test_split(test_size=eval_dataset_size,
    shuffle=True, seed=seed)` in qlora.py's make_data_module: eval = the first `size` of
    np.random.default_rng(seed).permutation(n), train = the rest, in that order; then eval keeps its
    first `max_eval_samples` (qlora.py's `select(range(...))`)."""
    n = len(records)
    if n == 0:
        raise BadInput("no training records to split an eval set from")
    if not 0 < eval_dataset_size < n:
        raise BadInput(f"--eval_dataset_size {eval_dataset_size}: must be at least 1 and smaller than the "
                       f"{n} training records (or pass an eval file)")
    if max_eval_samples is not None and max_eval_samples < 1:
        raise BadInput(f"--max_eval_samples {max_eval_samples} leaves no eval records")
    perm = np.random.default_rng(seed).permutation(n).tolist()
    eval_idx, train_idx = perm[:eval_dataset_size], perm[eval_dataset_size:]
    return [records[i] for i in train_idx], [records[i] for i in eval_idx[:max_eval_samples]]


def make_data_module(tok, *, dataset, dataset_format, eval_dataset=None, do_eval=False, eval_dataset_size=1024,
                     max_train_samples=None, max_eval_samples=None, source_max_len, target_max_len,
                     train_on_source=False, seed=42, context=None, progress=True, prompt=None):
    """Records -> (train examples, eval examples or None, eval records or None, audits); qlora.py's
    make_data_module, and the data audit. `context`: the model's max_position_embeddings. `prompt`: how a
    record becomes prompt text (default: Prompt(dataset_format); e.g. a chat.ChatPrompt)."""
    check_limits(source_max_len, target_max_len)
    try:
        records, eval_records = load_dataset(dataset, dataset_format), None
        if do_eval and eval_dataset:
            eval_records = load_dataset(eval_dataset, dataset_format)[:max_eval_samples]
        elif do_eval:
            records, eval_records = split_train_eval(records, eval_dataset_size=eval_dataset_size,
                                                     max_eval_samples=max_eval_samples, seed=seed)
    except BadInput as e:
        wrong_format = dataset_format == "input-output" and "'input'" in str(e)  # instruction records, probably
        hint = (" (--dataset_format input-output reads each record's 'input'; for instruction/output records "
                "pass --dataset_format alpaca or course)") if wrong_format else ""
        raise BadInput(f"{e}{hint}") from None
    records = records[:max_train_samples]
    if not records:
        raise BadInput(f"{dataset}: no training records left (--max_train_samples {max_train_samples})")
    if eval_records is not None and not eval_records:
        raise BadInput("no evaluation records left (--max_eval_samples)")
    prompt = prompt or Prompt(dataset_format)
    lim = dict(source_max_len=source_max_len, target_max_len=target_max_len)
    audits = [audit(records, tok, prompt, **lim, name="train")]
    if eval_records:
        audits.append(audit(eval_records, tok, prompt, **lim, name="eval"))
    ex = dict(**lim, train_on_source=train_on_source, progress=progress)
    train_ex = build_examples(records, tok, prompt, **ex)
    eval_ex = build_examples(eval_records, tok, prompt, **ex) if eval_records else None
    warning = context_warning(source_max_len, target_max_len, context,
                              max(len(e.input_ids) for e in train_ex + (eval_ex or [])))
    if warning:
        print(warning)
        audits[0]["warnings"].append(warning)
    return train_ex, eval_ex, eval_records, audits


# --- The order of the examples: transformers' Trainer, resumable ------------------------------------------

def shuffled(n: int, seed: int, epoch: int) -> list[int]:
    """torch.randperm seeded with seed + epoch: accelerate's SeedableRandomSampler (no --group_by_length)."""
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed + epoch)).tolist()


def length_grouped(lengths: list[int], group_size: int, seed: int, epoch: int) -> list[int]:
    """transformers' get_length_grouped_indices, which its Trainer uses for --group_by_length with
    batch_size = per_device_train_batch_size * gradient_accumulation_steps (`group_size` here):
    - a random permutation (`shuffled`);
    - cut into megabatches of mult * group_size, mult = min(n // (4 * group_size), 50), at least 1;
    - each megabatch sorted by length, longest first (a stable sort: ties keep the random order);
    - the first element of the megabatch holding the overall longest element (the first such
      megabatch) swapped with the very first element, so an out-of-memory error shows up at step 1.
    So each optimizer step sees examples of similar length, in a random order of steps.
    """
    n = len(lengths)
    if n == 0:
        return []
    size = max(min(n // (group_size * 4), 50), 1) * group_size
    perm = shuffled(n, seed, epoch)
    megabatches = [sorted(perm[i:i + size], key=lambda j: lengths[j], reverse=True) for i in range(0, n, size)]
    heads = [lengths[mb[0]] for mb in megabatches]
    k = heads.index(max(heads))  # the first megabatch reaching the maximum (torch.argmax's tie rule)
    megabatches[0][0], megabatches[k][0] = megabatches[k][0], megabatches[0][0]
    return [i for mb in megabatches for i in mb]


class DataOrder:
    """Which examples each step sees: a fresh permutation per epoch, cut into micro-batches of
    `batch_size`; (epoch, pos) = the next micro-batch, all a checkpoint needs to continue the same
    order. A step takes `accum` micro-batches, or what is left of the epoch (its last step may be short)."""

    def __init__(self, lengths, batch_size, accum, *, seed, group_by_length):
        self.lengths, self.bs, self.accum, self.seed = list(lengths), batch_size, accum, seed
        self.group_by_length, self.epoch, self.pos, self._cache = group_by_length, 0, 0, (None, None)
        self.batches_per_epoch = math.ceil(len(self.lengths) / batch_size)
        self.steps_per_epoch = math.ceil(self.batches_per_epoch / accum)

    def indices(self, epoch):
        if self.group_by_length:
            return length_grouped(self.lengths, self.bs * self.accum, self.seed, epoch)
        return shuffled(len(self.lengths), self.seed, epoch)

    def window(self) -> list[list[int]]:
        """The example indices of this step's micro-batches."""
        if self._cache[0] != self.epoch:
            order = self.indices(self.epoch)
            self._cache = (self.epoch, [order[i:i + self.bs] for i in range(0, len(order), self.bs)])
        return self._cache[1][self.pos:self.pos + self.accum]

    def advance(self, n):
        self.pos += n
        if self.pos >= self.batches_per_epoch:
            self.epoch, self.pos = self.epoch + 1, 0

    def epoch_float(self):
        return round(self.epoch + self.pos / self.batches_per_epoch, 4)
