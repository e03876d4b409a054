"""The optimizer and the learning-rate schedules of QLoRA training.

QLoRA (arXiv 2305.14314) §3 introduces paged optimizers: bitsandbytes' AdamW whose state lives in
CUDA unified memory, paged to CPU RAM when a long sequence spikes GPU memory. The update itself is
AdamW's (Loshchilov & Hutter, decoupled weight decay), so `paged_adamw_32bit` steps equal
torch.optim.AdamW's (tests/test_optim.py). On CPU bitsandbytes has no paging and falls back to the
plain 32-bit optimizer.
`paged_adamw_32bit` is FlatPagedAdamW: bitsandbytes' own 32-bit AdamW kernel, called once a step over
every LoRA tensor instead of once per tensor (bnb's optimizer synchronises the GPU after each of them:
~40 ms a step at r=64 on a 7B's 448 tensors, for ~2 ms of GPU work). Checked bit for bit against
bnb.optim.PagedAdamW32bit, whose state-dict layout it keeps (tests/test_optim.py).

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

BNB_MOMENTS = "__bnb_optimizer_quant_state__"  # where bnb's state dict keeps a tensor's moments
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
    if name == "paged_adamw_32bit":
        return FlatPagedAdamW(params, **kw)
    import bitsandbytes as bnb
    return bnb.optim.PagedAdamW8bit(params, **kw)


class FlatPagedAdamW(torch.optim.Optimizer):
    """bitsandbytes' PagedAdamW32bit, one kernel call a step over all parameters.

    The parameters are moved, once, into one fp32 buffer (each becomes a view of its slice: the model and
    this optimizer keep the same Parameter objects), and the two moments live in one buffer each, paged
    (CUDA unified memory) on a GPU as bnb's are. A step concatenates the gradients and calls bnb's 32-bit
    Adam kernel once; Adam is elementwise, so every element gets bnb's per-tensor update exactly. The state
    dict is bnb's (per parameter: "step", "state1", "state2"), so checkpoints load into either."""

    def __init__(self, params, lr: float, betas=(0.9, 0.999), eps: float = 1e-8, weight_decay: float = 0.0):
        super().__init__(list(params), dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay))
        if len(self.param_groups) != 1:
            raise ValueError("paged_adamw_32bit: one parameter group (one set of hyperparameters) only")
        params = self.param_groups[0]["params"]
        device = params[0].device
        for p in params:
            if p.dtype != torch.float32 or p.device != device:
                raise ValueError(f"paged_adamw_32bit: every trainable tensor must be float32 on {device}; "
                                 f"one is {p.dtype} on {p.device}")
        self.params, self.slices, n = params, [], 0
        for p in params:
            self.slices.append(slice(n, n + p.numel()))
            n += p.numel()
        self.flat = torch.empty(n, dtype=torch.float32, device=device)  # (n,): every parameter, in order
        with torch.no_grad():
            for p, sl in zip(params, self.slices):
                self.flat[sl].copy_(p.reshape(-1))  # (numel,)
                p.data = self.flat[sl].view_as(p)  # the update below writes the parameter in place
        self.paged = device.type == "cuda"
        self.moments = (self._buffer(n, device), self._buffer(n, device))  # Adam's m and v, (n,) each
        for p in params:
            self.state[p] = {"step": 0}
        self._point_state()

    def _buffer(self, n: int, device: torch.device) -> torch.Tensor:
        if not self.paged:  # bitsandbytes pages only on CUDA
            return torch.zeros(n, dtype=torch.float32, device=device)
        import bitsandbytes.functional as F
        buf = F.get_paged(n, dtype=torch.float32, device=device)
        F.fill(buf, 0)
        return buf

    def _point_state(self):
        """Each parameter's "state1"/"state2" is the view of its slice of the moment buffers."""
        for p, sl in zip(self.params, self.slices):
            for key, buf in zip(("state1", "state2"), self.moments):
                view = buf[sl].view_as(p)
                if self.paged:  # bnb's kernels take a paged tensor by these marks
                    view.is_paged, view.page_deviceid = True, buf.page_deviceid
                self.state[p][key] = view

    @torch.no_grad()
    def step(self, closure=None):
        if closure is not None:
            raise ValueError("FlatPagedAdamW.step takes no closure")
        group = self.param_groups[0]
        live = [p for p in self.params if p.grad is not None]  # bnb skips a tensor without a gradient
        for p in live:
            self.state[p]["step"] += 1
        if self.paged:  # bring the moments to the GPU before the kernel reads them (bnb does, per tensor)
            import bitsandbytes.functional as F
            for buf in self.moments:
                F.prefetch_tensor(buf)
        steps = {self.state[p]["step"] for p in live}
        if len(live) == len(self.params) and len(steps) == 1:  # the usual case: one call for everything
            grad = torch.cat([p.grad.reshape(-1) for p in live])  # (n,) in the buffer's order
            self._adam(grad, self.flat, *self.moments, steps.pop(), group)
        else:  # some tensor has no gradient (or lags behind): tensor by tensor, as bnb steps
            for p in live:
                st = self.state[p]
                self._adam(p.grad, p.data, st["state1"], st["state2"], st["step"], group)
        if self.paged:  # the paged moments are written asynchronously; bnb synchronises here too
            torch.cuda.synchronize(self.flat.device)

    @staticmethod
    def _adam(grad, param, m, v, step, group):
        import bitsandbytes.functional as F
        F.optimizer_update_32bit("adam", grad, param, m, group["betas"][0], group["eps"], step, group["lr"],
                                 v, group["betas"][1], 0.0, 0.0, group["weight_decay"], 1.0)

    def state_dict(self):
        """bnb's layout: the moments of each parameter under bnb's key for them."""
        sd = super().state_dict()
        sd["state"] = {k: {"step": v["step"], BNB_MOMENTS: {"state1": v["state1"], "state2": v["state2"]}}
                       for k, v in sd["state"].items()}
        return sd

    def load_state_dict(self, state_dict):
        """torch's loading of bnb's layout, then each loaded moment copied into this optimizer's buffers."""
        state_dict = dict(state_dict)
        state_dict["state"] = {k: {kk: vv for kk, vv in v.items() if kk != BNB_MOMENTS} | v.get(BNB_MOMENTS, {})
                               for k, v in state_dict["state"].items()}
        super().load_state_dict(state_dict)
        with torch.no_grad():
            for p, sl in zip(self.params, self.slices):
                st = self.state[p]
                if not {"step", "state1", "state2"} <= set(st):
                    raise ValueError("paged_adamw_32bit: the saved state has no AdamW moments")
                for key, buf in zip(("state1", "state2"), self.moments):
                    if st[key].shape != p.shape:
                        raise ValueError(f"paged_adamw_32bit: a saved moment has shape {tuple(st[key].shape)}, "
                                         f"its parameter {tuple(p.shape)}")
                    buf[sl].copy_(st[key].reshape(-1))  # (numel,)
        self._point_state()


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
