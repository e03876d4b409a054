"""Training data: records -> prompt/target token ids with the prompt masked, padded batches, the eval
split and the length-grouped batch order.

Reproduces qlora.py (artidoro/qlora, the code of the QLoRA paper, which finetunes on the response
only): `DataCollatorForCausalLM` for tokenising, truncating and masking, `extract_alpaca_dataset` for
--dataset_format alpaca, `make_data_module` for the eval split (datasets' `train_test_split`) and
the `length` column, and transformers' `get_length_grouped_indices` for --group_by_length. Checked
against qlora.py's collator code and transformers' sampler in tests/test_data.py.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from tqdm import tqdm

from .loss import IGNORE_INDEX
from .records import DataError, read_records

FORMATS = ("alpaca", "input-output", "course")  # --dataset_format choices
_FIELDS = {"alpaca": ("instruction", "output"), "course": ("instruction", "output"),
           "input-output": ("input", "output")}


def load_dataset(path, dataset_format) -> list[dict]:
    """The records of `path` with the fields `dataset_format` needs (the target is always "output")."""
    if dataset_format not in FORMATS:
        raise DataError(f"--dataset_format {dataset_format!r}: expected one of {', '.join(FORMATS)}")
    records = read_records(path, required=_FIELDS[dataset_format])
    if dataset_format == "alpaca":
        # qlora.py's extract_alpaca_dataset picks the with-input template when input != "": a
        # non-string input (null, a number) would be formatted as text there; refuse it here.
        for i, rec in enumerate(records):
            if "input" in rec and not isinstance(rec["input"], str):
                raise DataError(f"{path}: record {i} has a non-string 'input' field")
    return records


def source_text(record, prompt) -> str:
    """The prompt text (qlora.py's `input` column after formatting); `prompt` is a prompts.Prompt."""
    return prompt(record)


@dataclass
class Example:
    input_ids: list[int]
    labels: list[int]
    length: int  # qlora.py's `length` column: len(prompt) + len(output) in characters, not tokens


def _check_limits(source_max_len, target_max_len):
    if source_max_len < 1:
        raise DataError(f"--source_max_len must be at least 1 (it counts the BOS token), got {source_max_len}")
    if target_max_len < 1:
        raise DataError(f"--target_max_len must be at least 1 (it counts the EOS token), got {target_max_len}")


def encode_example(tok, source: str, target: str, *, source_max_len: int, target_max_len: int,
                   train_on_source: bool = False) -> Example:
    """One (prompt, output) pair as qlora.py's DataCollatorForCausalLM builds it.

    qlora.py tokenises f"{bos_token}{source}" and f"{target}{eos_token}" separately with
    add_special_tokens=False, truncation=True and max_length=source_max_len / target_max_len:
    - the source is [BOS] + ids(source), cut to source_max_len, BOS counted; a cut source loses its
      end (the "### Response:" / "ASSISTANT:" marker), see audit.py;
    - the target is ids(target) + [EOS], cut to target_max_len: a cut target loses its EOS too, so
      the model never sees where such an output stops. Faithful to qlora.py, on purpose.
    Why [BOS] + ids(source) rather than ids("<s>" + source): qlora.py ran the slow legacy
    LlamaTokenizer, which tokenises the text after "<s>" as it would alone (with its leading "▁");
    transformers 5 does not prepend "▁" after a special token, which would silently change the first
    prompt token. [BOS] + ids(prompt) is also what the course's perplexity script feeds the model.
    """
    _check_limits(source_max_len, target_max_len)
    bos = [tok.bos_id] if tok.bos_id is not None else []
    src = (bos + tok.encode(source))[:source_max_len]
    tgt = (tok.encode(target) + [tok.eos_id])[:target_max_len]
    # Labels: the prompt is IGNORE_INDEX unless --train_on_source (then every token is scored).
    labels = src + tgt if train_on_source else [IGNORE_INDEX] * len(src) + tgt
    return Example(input_ids=src + tgt, labels=labels, length=len(source) + len(target))


def build_examples(records, tok, prompt, *, source_max_len, target_max_len, train_on_source=False,
                   progress=True) -> list[Example]:
    """Tokenise every record once, before training (qlora.py tokenises each batch in the collator;
    the ids are the same)."""
    _check_limits(source_max_len, target_max_len)
    if tok.eos_id is None:
        raise DataError("the tokenizer has no EOS token: targets end with one (add eos_token to tokenizer_config.json)")
    return [encode_example(tok, source_text(rec, prompt), rec["output"], source_max_len=source_max_len,
                           target_max_len=target_max_len, train_on_source=train_on_source)
            for rec in tqdm(records, desc="tokenizing", unit="rec", disable=not progress)]


def collate(examples: list[Example], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pad a batch: input_ids with pad_id, labels with IGNORE_INDEX (qlora.py's pad_sequence).

    attention_mask marks the real tokens. qlora.py computes input_ids != pad_token_id, which is the
    same thing there because it adds a new "[PAD]" token; here pad_id may be <unk> (id 0), which can
    occur in real text, so the mask comes from the lengths instead.
    """
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


def split_train_eval(records, *, eval_dataset_size: int, max_eval_samples: int | None, seed: int):
    """Hold out `eval_dataset_size` records, as datasets' `train_test_split(test_size=eval_dataset_size,
    shuffle=True, seed=seed)` does in qlora.py's make_data_module: permutation =
    np.random.default_rng(seed).permutation(n); eval = permutation[:size], train = the rest, in that
    order. Then eval keeps its first `max_eval_samples` records (qlora.py's `select(range(...))`).
    """
    n = len(records)
    if n == 0:
        raise DataError("no training records to split an eval set from")
    if not 0 < eval_dataset_size < n:
        raise DataError(f"--eval_dataset_size {eval_dataset_size}: must be at least 1 and smaller than the "
                        f"{n} training records (or pass an eval file)")
    if max_eval_samples is not None and max_eval_samples < 1:
        raise DataError(f"--max_eval_samples {max_eval_samples} leaves no eval records")
    perm = np.random.default_rng(seed).permutation(n).tolist()
    eval_idx, train_idx = perm[:eval_dataset_size], perm[eval_dataset_size:]
    if max_eval_samples is not None:
        eval_idx = eval_idx[:max_eval_samples]
    return [records[i] for i in train_idx], [records[i] for i in eval_idx]


class RandomSampler:
    """A plain shuffle per epoch: torch.randperm seeded with seed + epoch, as accelerate's
    SeedableRandomSampler (what transformers' Trainer uses without --group_by_length)."""

    def __init__(self, lengths: list[int], group_size: int, seed: int):
        self.n, self.group_size, self.seed = len(lengths), group_size, seed

    def __len__(self):
        return self.n

    def _generator(self, epoch):
        return torch.Generator().manual_seed(self.seed + epoch)

    def indices(self, epoch: int) -> list[int]:
        return torch.randperm(self.n, generator=self._generator(epoch)).tolist()


class LengthGroupedSampler(RandomSampler):
    """transformers' get_length_grouped_indices, which its Trainer uses for --group_by_length with
    batch_size = per_device_train_batch_size * gradient_accumulation_steps (`group_size` here):
    - a random permutation (torch.randperm, generator seeded with seed + epoch);
    - cut into megabatches of mult * group_size, mult = min(n // (4 * group_size), 50), at least 1;
    - each megabatch sorted by length, longest first (a stable sort: ties keep the random order);
    - the first element of the megabatch holding the overall longest element (the first such
      megabatch) swapped with the very first element, so an out-of-memory error shows up at step 1.
    So each optimizer step sees examples of similar length, in a random order of steps.
    """

    def __init__(self, lengths: list[int], group_size: int, seed: int):
        if group_size < 1:
            raise ValueError(f"group_size must be at least 1, got {group_size}")
        super().__init__(lengths, group_size, seed)
        self.lengths = list(lengths)

    def indices(self, epoch: int) -> list[int]:
        n = self.n
        if n == 0:
            return []
        mult = max(min(n // (self.group_size * 4), 50), 1)
        size = mult * self.group_size
        perm = super().indices(epoch)
        megabatches = [sorted(perm[i:i + size], key=lambda j: self.lengths[j], reverse=True)
                       for i in range(0, n, size)]
        heads = [self.lengths[mb[0]] for mb in megabatches]
        k = heads.index(max(heads))  # the first megabatch reaching the maximum (torch.argmax's tie rule)
        megabatches[0][0], megabatches[k][0] = megabatches[k][0], megabatches[0][0]
        return [i for mb in megabatches for i in mb]

