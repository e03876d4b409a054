"""The optimizer and the learning-rate schedules of QLoRA training.

QLoRA (arXiv 2305.14314) §3 introduces paged optimizers: bitsandbytes' AdamW whose state lives in
CUDA unified memory, paged to CPU RAM when a long sequence spikes GPU memory. The update itself is
AdamW's (Loshchilov & Hutter, decoupled weight decay), so `paged_adamw_32bit` steps equal
torch.optim.AdamW's (tests/test_optim.py). On CPU bitsandbytes has no paging and falls back to the
plain 32-bit optimizer.

Schedules are transformers' (optimization.py) formulas as LambdaLR multipliers of the peak LR,
indexed by the number of optimizer steps taken; checked against transformers' get_*_schedule* in
tests/test_optim.py. Note transformers' `constant` has no warmup at all, even with --warmup_ratio:
qlora.py's defaults (constant, warmup_ratio 0.03) therefore train at the full LR from step 1.
A resumed run does not restore the saved schedule: it puts this run's schedule (its --max_steps,
warmup and --learning_rate) at the saved position (`fast_forward`, through the scheduler's public
`last_epoch` and `step()`), so the flags of the resumed run decide the LR from its first step.
"""
from __future__ import annotations

import functools
import math
import warnings

import torch
from torch.optim.lr_scheduler import LambdaLR

OPTIMIZERS = ("paged_adamw_32bit", "paged_adamw_8bit", "adamw_torch")
SCHEDULES = ("constant", "constant_with_warmup", "linear", "cosine")


def build_optimizer(params, name: str = "paged_adamw_32bit", *, lr: float, betas=(0.9, 0.999),
                    eps: float = 1e-8, weight_decay: float = 0.0) -> torch.optim.Optimizer:
    params = [p for p in params if p.requires_grad]
    if not params:
        raise ValueError("no trainable parameters: apply LoRA and freeze the base first")
    kw = dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay)
    if name == "adamw_torch":
        return torch.optim.AdamW(params, **kw)
    if name not in OPTIMIZERS:
        raise ValueError(f"optimizer {name!r}: expected one of {', '.join(OPTIMIZERS)}")
    import bitsandbytes as bnb
    cls = bnb.optim.PagedAdamW32bit if name == "paged_adamw_32bit" else bnb.optim.PagedAdamW8bit
    return cls(params, **kw)


def quiet_cpu_paging():
    """bitsandbytes warns on every CPU parameter that paging is unavailable; say it once instead."""
    warnings.filterwarnings("ignore", message="Paged optimizers are not supported on CPU")


def warmup_steps_for(num_training_steps: int, warmup_steps: int = 0, warmup_ratio: float = 0.0) -> int:
    """transformers' TrainingArguments.get_warmup_steps: explicit steps win, else ceil(ratio * total)."""
    return warmup_steps if warmup_steps > 0 else math.ceil(num_training_steps * warmup_ratio)


# The multipliers, one per schedule, for optimizer step `step` (0 for the first update).
def constant(step: int) -> float:
    return 1.0


def constant_with_warmup(step: int, *, num_warmup_steps: int) -> float:
    if step < num_warmup_steps:
        return float(step) / float(max(1.0, num_warmup_steps))
    return 1.0


def linear(step: int, *, num_warmup_steps: int, num_training_steps: int) -> float:
    if step < num_warmup_steps:
        return float(step) / float(max(1, num_warmup_steps))
    return max(0.0, float(num_training_steps - step) / float(max(1, num_training_steps - num_warmup_steps)))


def cosine(step: int, *, num_warmup_steps: int, num_training_steps: int, num_cycles: float = 0.5) -> float:
    if step < num_warmup_steps:
        return float(step) / float(max(1, num_warmup_steps))
    progress = float(step - num_warmup_steps) / float(max(1, num_training_steps - num_warmup_steps))
    return max(0.0, 0.5 * (1.0 + math.cos(math.pi * float(num_cycles) * 2.0 * progress)))


def lr_lambda(name: str, num_warmup_steps: int, num_training_steps: int):
    if name == "constant":
        return constant
    if name == "constant_with_warmup":
        return functools.partial(constant_with_warmup, num_warmup_steps=num_warmup_steps)
    if name == "linear":
        return functools.partial(linear, num_warmup_steps=num_warmup_steps, num_training_steps=num_training_steps)
    if name == "cosine":
        return functools.partial(cosine, num_warmup_steps=num_warmup_steps, num_training_steps=num_training_steps)
    raise ValueError(f"lr_scheduler_type {name!r}: expected one of {', '.join(SCHEDULES)}")


# Which of (total steps, warmup steps) each schedule's LR depends on.
DEPENDS = {"constant": (), "constant_with_warmup": ("warmup_steps",), "linear": ("total_steps", "warmup_steps"),
           "cosine": ("total_steps", "warmup_steps")}


def build_scheduler(optimizer, name: str, num_warmup_steps: int, num_training_steps: int) -> LambdaLR:
    """LambdaLR: after k optimizer steps (and k scheduler steps) the LR is peak * f(k)."""
    return LambdaLR(optimizer, lr_lambda(name, num_warmup_steps, num_training_steps))


def fast_forward(scheduler: LambdaLR, step: int) -> float:
    """Put `scheduler` and its optimizer where `step` scheduler steps would have: every param group's
    lr = its peak (the scheduler's base_lrs, i.e. this run's --learning_rate) * f(step). Returns that lr.
    On resume the LR is derived this way, never restored, so it always follows this run's schedule."""
    for group, base in zip(scheduler.optimizer.param_groups, scheduler.base_lrs):
        group["initial_lr"] = base  # a loaded optimizer carries the old run's
    scheduler.last_epoch = step - 1
    with warnings.catch_warnings():  # "step() before optimizer.step()": no update is skipped here
        warnings.simplefilter("ignore", UserWarning)
        scheduler.step()  # LambdaLR's lr is closed-form in last_epoch: base * f(step), in every group
    return scheduler.get_last_lr()[0]


def schedule_change(name: str, saved: dict | None, now: dict) -> str | None:
    """A warning when the total or warmup steps that `name`'s LR depends on differ between the
    checkpoint's schedule (`saved`: {"total_steps", "warmup_steps"}) and this run's; else None."""
    if not saved or saved.get("type", name) != name:  # a changed type is warned about as a flag
        return None
    changed = [k for k in DEPENDS[name] if saved.get(k) is not None and saved[k] != now[k]]
    if not changed:
        return None
    what = ", ".join(f"{k.replace('_', ' ')} {saved[k]} -> {now[k]}" for k in changed)
    return (f"warning: the {name} LR schedule changed on resume ({what}: --max_steps, --num_train_epochs, "
            "--warmup_steps or --warmup_ratio differ): the steps done so far followed the old schedule, the "
            "next ones follow the new one")


def describe_schedule(name: str, num_warmup_steps: int, warmup_ratio: float, warmup_steps: int) -> str:
    if name == "constant":
        note = " (transformers' 'constant' has no warmup; --warmup_ratio/--warmup_steps are ignored: use " \
               "constant_with_warmup for one)" if (warmup_ratio > 0 or warmup_steps > 0) else ""
        return f"lr schedule: constant{note}"
    return f"lr schedule: {name}, {num_warmup_steps} warmup steps"
