"""Perplexity as the course scores it (NTU ADL 2023 HW3's ppl.py), batched.

Per example: tokens = [BOS] + encode(prompt) + encode(output) + [EOS], prompt and output tokenised
separately without special tokens, the whole cut to `max_length` (2048) tokens from the right.
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

import csv
import io
import json
import math
import statistics
import warnings

import torch
from tqdm import tqdm

from .atomic import atomic_file
from .cudagraph import GraphedForward
from .data import Example, collate
from .generate import PromptTooLongError, eval_mode
from .loss import IGNORE_INDEX, token_nll


def encode_example(tokenizer, prompt_text: str, output: str, max_length: int = 2048):
    """(input ids, labels): labels are -100 on BOS and the prompt, the ids on output + EOS."""
    bos = [tokenizer.bos_id] if tokenizer.bos_id is not None else []
    prompt_ids = bos + tokenizer.encode(prompt_text)
    output_ids = tokenizer.encode(output) + [tokenizer.eos_id]
    ids = (prompt_ids + output_ids)[:max_length]
    labels = ([IGNORE_INDEX] * len(prompt_ids) + output_ids)[:max_length]
    return ids, labels


@torch.inference_mode()
def perplexities(model, tokenizer, records, prompt, *, batch_size: int = 8, max_length: int = 2048,
                 progress: bool = True, source: str | None = None, cuda_graphs: bool | None = None) -> list[float]:
    """Each record's perplexity of its `output` given `prompt(record)`, in record order.

    `prompt` is a prompts.Prompt (or any callable record -> str, e.g. a fewshot.FewShotPrompt).
    The model is scored in eval mode and put back in training mode afterwards if it was training.
    An example longer than the model's context is refused, naming `source` (the file) and the record.
    cuda_graphs (default: on a CUDA device): forwards replayed from CUDA graphs (cudagraph.GraphedForward).
    """
    if batch_size < 1:
        raise ValueError(f"batch_size={batch_size}: must be at least 1")
    if max_length < 2:
        raise ValueError(f"max_length={max_length}: must be at least 2")
    rows = [encode_example(tokenizer, prompt(r), r["output"], max_length) for r in records]
    ctx = model.config.max_position_embeddings
    for i, (ids, _) in enumerate(rows):
        if len(ids) > ctx:
            rid = records[i].get("id")
            raise PromptTooLongError(
                (f"{source}: " if source else "") + f"record {i}" + (f" (id {rid!r})" if rid is not None else "") + f" has {len(ids)} tokens "
                f"(prompt + output, cut at max_length={max_length}); the model's context "
                f"(max_position_embeddings) is {ctx}: lower --max_length to {ctx} or shorten the prompt")
    order = sorted(range(len(rows)), key=lambda i: len(rows[i][0]), reverse=True)
    device = model.lm_head.weight.device
    if cuda_graphs is None:
        cuda_graphs = device.type == "cuda"
    forward = GraphedForward(model, tokenizer.pad_id) if cuda_graphs else model
    out = [math.nan] * len(rows)
    with eval_mode(model), tqdm(total=len(rows), desc="perplexity", unit="example",
                                disable=not progress) as bar:
        for start in range(0, len(order), batch_size):
            batch = order[start:start + batch_size]
            b = collate([Example(*rows[i], length=len(rows[i][0])) for i in batch], tokenizer.pad_id)
            ids, labels = b["input_ids"].to(device), b["labels"].to(device)  # (B, T) right-padded
            logits = forward(ids)  # (B, T, V)
            nll, mask = token_nll(logits, labels)  # (B, T-1) each
            # The course: exp(sum(loss * mask) / sum(mask)), in fp32; 0/0 gives NaN.
            ppl = torch.exp(nll.sum(1) / mask.sum(1))  # (B,)
            for i, v in zip(batch, ppl.tolist()):
                out[i] = v
            bar.update(len(batch))
    empty = [i for i, (_, y) in enumerate(rows) if all(t == IGNORE_INDEX for t in y[1:])]
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


def summarize(draw_means: list[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (n - 1) of several draws' scores; std is 0 for one draw."""
    mean = math.fsum(draw_means) / len(draw_means)
    std = statistics.stdev(draw_means) if len(draw_means) > 1 else 0.0
    return mean, std


def write_per_example(path, rows: list[dict]):
    """Write rows (id, index, perplexity, ...) as CSV for a .csv path, else a JSON list; atomically.

    NaN perplexities become null in JSON and empty cells in CSV.
    """
    clean = [{k: (None if isinstance(v, float) and math.isnan(v) else v) for k, v in r.items()}
             for r in rows]
    if str(path).lower().endswith(".csv"):
        buf = io.StringIO()
        fields = list(clean[0]) if clean else ["id", "index", "perplexity"]
        writer = csv.DictWriter(buf, fieldnames=fields, lineterminator="\n")
        writer.writeheader()
        writer.writerows(clean)
        text = buf.getvalue()
    else:
        text = json.dumps(clean, ensure_ascii=False, indent=1) + "\n"
    with atomic_file(path) as f:
        f.write(text)
