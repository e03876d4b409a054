"""The data audit printed before training: how long prompts and outputs are in tokens, and how many
--source_max_len / --target_max_len will cut.

qlora.py truncates silently (DataCollatorForCausalLM, see data.py). With its defaults on the ADL
2023 HW3 data a student who lowers --source_max_len to save memory can cut most prompts: a cut
prompt loses its end ("### Response:" in alpaca, "ASSISTANT:" in the course prompt), so the model is
trained on prompts that never end the way inference prompts do. This makes that visible. Lengths are
counted as the collator counts them: source = [BOS] + prompt, target = output + [EOS], before cutting.
No paper section (qlora.py's silent truncation, made visible). Checked on crafted data and on the
course data in tests/test_data.py.
"""
from __future__ import annotations

import math

from tqdm import tqdm

PERCENTILES = (50, 90, 95, 99)
WARN_SHARE = 0.05  # warn when more than 5% of sources or targets are cut
_PROMPT_END = {"alpaca": '"### Response:"', "course": '"ASSISTANT:"'}


def _percentile(sorted_values, p):
    """Nearest-rank percentile: the smallest value with at least p% of the values at or below it."""
    return sorted_values[max(math.ceil(p / 100 * len(sorted_values)) - 1, 0)]


def _stats(lengths, limit):
    s = sorted(lengths)
    out = {f"p{p}": _percentile(s, p) for p in PERCENTILES}
    over = sum(n > limit for n in lengths)
    out.update(max=s[-1], mean=sum(s) / len(s), limit=limit, over=over, share_over=over / len(s),
               tokens_lost=sum(max(n - limit, 0) for n in lengths))
    return out


def audit(records, tok, prompt, *, source_max_len, target_max_len, name="train") -> dict:
    """Print the audit of `records` under `prompt` and return its numbers:
    {"name", "records", "source": stats, "target": stats, "warnings": [lines]}, where stats holds
    p50/p90/p95/p99/max/mean token lengths, the limit, how many are over it (`over`, `share_over`)
    and how many tokens the cut drops in all (`tokens_lost`)."""
    if not records:
        raise ValueError(f"audit of {name}: no records")
    src_len, tgt_len = [], []
    for rec in tqdm(records, desc=f"audit {name}", unit="rec", disable=len(records) < 1000, leave=False):
        src_len.append(len(tok.encode(prompt(rec), bos=True)))
        tgt_len.append(len(tok.encode(rec["output"])) + 1)
    src, tgt = _stats(src_len, source_max_len), _stats(tgt_len, target_max_len)

    warnings = []
    prompt_name = getattr(prompt, "name", None)
    if src["share_over"] > WARN_SHARE:
        end = _PROMPT_END.get(prompt_name, "its last tokens")
        warnings.append(
            f"WARNING: {src['share_over']:.1%} of {name} prompts are longer than --source_max_len {source_max_len} "
            f"tokens ([BOS]+prompt). A cut prompt loses its end ({end}), so the model is trained on prompts "
            f"that do not end where inference prompts do. Raise --source_max_len (p99 is {src['p99']}, "
            f"max {src['max']}).")
    if tgt["share_over"] > WARN_SHARE:
        warnings.append(
            f"WARNING: {tgt['share_over']:.1%} of {name} outputs are longer than --target_max_len {target_max_len} "
            f"tokens (output+EOS). A cut output loses its end and its EOS, so the model is not taught to stop "
            f"after it. Raise --target_max_len (p99 is {tgt['p99']}, max {tgt['max']}).")

    _print_report(name, len(records), prompt_name, src, tgt, warnings, _longest(records, src_len, tgt_len))
    return {"name": name, "records": len(records), "source": src, "target": tgt, "warnings": warnings}


def context_warning(source_max_len: int, target_max_len: int, context: int | None, longest: int) -> str | None:
    """A warning when the longest example the limits allow, source_max_len + target_max_len tokens, does
    not fit the model's context (max_position_embeddings); `longest` is the longest example of this data."""
    if context is None or source_max_len + target_max_len <= context:
        return None
    fits = "within the context" if longest <= context else "LONGER than the context"
    return (f"WARNING: --source_max_len {source_max_len} + --target_max_len {target_max_len} = "
            f"{source_max_len + target_max_len} tokens is more than the model's context (max_position_embeddings "
            f"{context}): the longest example these limits allow would run past the positions the model knows. "
            f"The longest example of this data is {longest} tokens ({fits}). Keep the two flags' sum at most "
            f"{context}.")


def _longest(records, src_len, tgt_len, k=3):
    """The k longest prompts and outputs as "id: tokens" (the index in `records` when there is no id),
    to find the records that set p99 and max."""
    def top(lengths):
        order = sorted(range(len(lengths)), key=lambda i: -lengths[i])[:k]
        return ", ".join(f"{records[i].get('id', f'#{i}')}: {lengths[i]}" for i in order)
    return top(src_len), top(tgt_len)


def _print_report(name, n, prompt_name, src, tgt, warnings, longest):
    label = f" with prompt {prompt_name!r}" if prompt_name else ""
    print(f"data audit ({name}): {n} records{label}")
    print(f"  {'tokens':<16}" + "".join(f"{k:>7}" for k in ("p50", "p90", "p95", "p99", "max", "mean"))
          + "   cut")
    for what, st, flag in (("source [BOS]+p", src, "--source_max_len"), ("target out+EOS", tgt, "--target_max_len")):
        cols = "".join(f"{st[k]:>7}" for k in ("p50", "p90", "p95", "p99", "max")) + f"{st['mean']:>7.1f}"
        print(f"  {what:<16}{cols}   {st['share_over']:6.1%} ({st['over']}) > {flag} {st['limit']},"
              f" {st['tokens_lost']} tokens dropped")
    print(f"  longest prompts: {longest[0]}\n  longest outputs: {longest[1]}")
    for line in warnings:
        print(line)
