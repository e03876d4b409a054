"""Training data for the loop: records -> audited, tokenised examples -> the micro-batches of each step.

qlora.py's make_data_module (load, hold out `eval_dataset_size` records, cut to max_*_samples,
tokenise) and the order in which transformers' Trainer feeds them: a sampler permutation per epoch
(length-grouped with --group_by_length, data.py), cut into micro-batches of
per_device_train_batch_size, `gradient_accumulation_steps` of them per optimizer step. The position
(epoch, next micro-batch) is all a checkpoint needs to continue the same order.
"""
from __future__ import annotations

import math

from .audit import audit, context_warning
from .chat import prompt_for
from .data import build_examples, load_dataset, split_train_eval
from .records import DataError
from .train_args import RunArgs


def prepare_data(a: RunArgs, tok, progress, context: int | None = None):
    """Records -> (train examples, eval examples, eval records, audits); qlora.py's make_data_module.
    `context`: the model's max_position_embeddings, for the warning on limits that exceed it."""
    d, t = a.data, a.train
    try:
        records = load_dataset(d.dataset, d.dataset_format)
        eval_records = None
        if t.do_eval:
            if d.eval_dataset:
                eval_records = load_dataset(d.eval_dataset, d.dataset_format)[:d.max_eval_samples]
            else:
                seed = t.data_seed if t.data_seed is not None else t.seed
                records, eval_records = split_train_eval(records, eval_dataset_size=d.eval_dataset_size,
                                                         max_eval_samples=d.max_eval_samples, seed=seed)
    except DataError as e:
        hint = (" (--dataset_format input-output reads each record's 'input'; for instruction/output records "
                "pass --dataset_format alpaca or course)") if "'input'" in str(e) else ""
        raise DataError(f"{e}{hint}") from None
    if d.max_train_samples is not None:
        records = records[:d.max_train_samples]
    if not records:
        raise DataError(f"{d.dataset}: no training records left (--max_train_samples {d.max_train_samples})")
    if eval_records is not None and not eval_records:
        raise DataError("no evaluation records left (--max_eval_samples)")
    prompt = prompt_for(d.prompt_template or d.dataset_format, a.model.model_name_or_path)
    lim = dict(source_max_len=d.source_max_len, target_max_len=d.target_max_len)
    audits = [audit(records, tok, prompt, **lim, name="train")]
    if eval_records:
        audits.append(audit(eval_records, tok, prompt, **lim, name="eval"))
    ex = dict(**lim, train_on_source=t.train_on_source, progress=progress)
    train_ex = build_examples(records, tok, prompt, **ex)
    eval_ex = build_examples(eval_records, tok, prompt, **ex) if eval_records else None
    warning = context_warning(d.source_max_len, d.target_max_len, context,
                              max(len(e.input_ids) for e in train_ex + (eval_ex or [])))
    if warning:
        print(warning)
        audits[0]["warnings"].append(warning)
    return train_ex, eval_ex, eval_records, audits


class DataOrder:
    """Which examples each step sees: a fresh sampler permutation per epoch, cut into micro-batches;
    (epoch, pos) = the next micro-batch, saved in checkpoints. A step takes `accum` micro-batches, or
    what is left of the epoch (its last step may be short)."""

    def __init__(self, sampler, batch_size, accum, epoch=0, pos=0):
        self.sampler, self.bs, self.accum, self.epoch, self.pos = sampler, batch_size, accum, epoch, pos
        self._cache = (None, None)
        self.batches_per_epoch = math.ceil(len(sampler) / batch_size)
        self.steps_per_epoch = math.ceil(self.batches_per_epoch / accum)

    def batches(self, epoch):
        if self._cache[0] != epoch:
            order = self.sampler.indices(epoch)
            self._cache = (epoch, [order[i:i + self.bs] for i in range(0, len(order), self.bs)])
        return self._cache[1]

    def window(self):
        return self.batches(self.epoch)[self.pos:self.pos + self.accum]

    def advance(self, n):
        self.pos += n
        if self.pos >= self.batches_per_epoch:
            self.epoch, self.pos = self.epoch + 1, 0

    def epoch_float(self):
        return round(self.epoch + self.pos / self.batches_per_epoch, 4)
