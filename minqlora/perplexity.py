"""Perplexity of each record's output given its prompt, as the course scores it (NTU ADL 2023 HW3's
ppl.py), batched: scripts/ppl.py's number and the trainer's eval metric (the protocol around it:
course.py); and the trainer's eval loss. No paper section.

Per example (data.encode_example): tokens = [BOS] + encode(prompt) + encode(output) + [EOS], prompt
and output tokenised separately, the whole cut to `max_length` (2048) tokens from the right.
Scored: the positions whose label (the next token) is an output token or the EOS, i.e. the course's
output mask shifted like any causal LM loss. perplexity = exp(mean cross-entropy over those tokens);
the reported number is the arithmetic mean of the per-example perplexities (not exp of a mean loss).

The course runs one example at a time; here examples are sorted by length and right-padded into
batches. Real tokens never attend to the padding on their right, so no mask is needed and each
example's number is what batch size 1 gives, to rounding: about 1e-6 relative in float32; in
bfloat16 other matrix shapes round differently (about 1e-3 on the mean, seen on the embedded tiny
model on an H200), so `--batch_size 1` is the course's exact protocol there. An example whose output is cut
away entirely has no scored token: the course gets NaN (0/0) for it, and so does this code, with a
warning. Checked against the course algorithm on transformers' Llama (+ peft) in
tests/test_perplexity.py.
"""
from __future__ import annotations

import math
import warnings

import torch
from tqdm import tqdm

from .cudagraph import GraphedForward
from .data import collate, encode_example
from .generate import PromptTooLongError, eval_mode
from .loss import IGNORE_INDEX, causal_lm_loss, token_nll


@torch.inference_mode()
def eval_nll(model, examples, batch_size, pad_id, device) -> tuple[float, int]:
    """(summed NLL, target tokens) over the eval examples (training's truncation and prompt)."""
    total, count = 0.0, 0
    with eval_mode(model):
        for i in range(0, len(examples), batch_size):
            b = collate(examples[i:i + batch_size], pad_id)
            s, n = causal_lm_loss(model(b["input_ids"].to(device)), b["labels"].to(device), reduction="sum")
            total, count = total + s.item(), count + n.item()
    return total, count


def eval_loss(model, examples, batch_size, pad_id, device) -> float:
    """Mean NLL over every target token of the eval set."""
    total, count = eval_nll(model, examples, batch_size, pad_id, device)
    return total / max(count, 1)


@torch.inference_mode()
def perplexities(model, tokenizer, records, prompt, *, batch_size: int = 8, max_length: int = 2048,
                 progress: bool = True, source: str | None = None, cuda_graphs: bool | None = None) -> list[float]:
    """Each record's perplexity of its `output` given `prompt(record)`, in record order.

    `prompt` is a data.Prompt (or any callable record -> str, e.g. a course.FewShotPrompt).
    The model is scored in eval mode and put back in training mode afterwards if it was training.
    An example longer than the model's context is refused, naming `source` (the file) and the record.
    cuda_graphs (default: on a CUDA device with batch_size > 1): forwards replayed from CUDA graphs
    (cudagraph.GraphedForward), lengths padded on the right like a batch's. At batch_size 1, the course's
    one-at-a-time protocol, nothing is padded, so the number is the course script's to the last digit.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size={batch_size}: must be at least 1")
    if max_length < 2:
        raise ValueError(f"max_length={max_length}: must be at least 2")
    rows = [encode_example(tokenizer, prompt(r), r["output"], max_length=max_length) for r in records]
    ctx = model.config.max_position_embeddings
    for i, e in enumerate(rows):
        if len(e.input_ids) > ctx:
            rid = records[i].get("id")
            raise PromptTooLongError(
                (f"{source}: " if source else "") + f"record {i}" + (f" (id {rid!r})" if rid is not None else "") + f" has {len(e.input_ids)} tokens "
                f"(prompt + output, cut at max_length={max_length}); the model's context "
                f"(max_position_embeddings) is {ctx}: lower --max_length to {ctx} or shorten the prompt")
    order = sorted(range(len(rows)), key=lambda i: len(rows[i].input_ids), reverse=True)
    device = model.lm_head.weight.device
    if cuda_graphs is None:
        cuda_graphs = device.type == "cuda" and batch_size > 1
    forward = GraphedForward(model, tokenizer.pad_id) if cuda_graphs else model
    out = [math.nan] * len(rows)
    with eval_mode(model), tqdm(total=len(rows), desc="perplexity", unit="example",
                                disable=not progress) as bar:
        for start in range(0, len(order), batch_size):
            batch = order[start:start + batch_size]
            b = collate([rows[i] for i in batch], tokenizer.pad_id)
            ids, labels = b["input_ids"].to(device), b["labels"].to(device)  # (B, T) right-padded
            logits = forward(ids)  # (B, T, V)
            nll, mask = token_nll(logits, labels)  # (B, T-1) each
            # The course: exp(sum(loss * mask) / sum(mask)), in fp32; 0/0 gives NaN.
            ppl = torch.exp(nll.sum(1) / mask.sum(1))  # (B,)
            for i, v in zip(batch, ppl.tolist()):
                out[i] = v
            bar.update(len(batch))
    empty = [i for i, e in enumerate(rows) if all(t == IGNORE_INDEX for t in e.labels[1:])]
    if empty:
        warnings.warn(f"{len(empty)} example(s) (first: record {empty[0]}) have no output token left "
                      f"after truncation to max_length={max_length}; their perplexity is NaN")
    return out


def mean_perplexity(values) -> float:
    """The course's reported number: the arithmetic mean of per-example perplexities."""
    values = list(values)
    if not values:
        raise ValueError("mean_perplexity: no values")
    return math.fsum(values) / len(values)
