"""The state of a training run, as trainer.py passes it around: `RunState` (where the run is: what every
checkpoint's trainer_state.json saves and a resume restores), the random generators' states (`rng_state`,
saved in trainer_state.pt) and `Run` (everything trainer.setup builds and the step, evaluation and
checkpoints share). No paper section; exercised by tests/test_train.py and
tests/test_checkpoint.py (exact resume).
"""
from __future__ import annotations

import random
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from . import accumulate, distributed
from .curves import RunLog
from .data import DataOrder, Prompt
from .tokenizer import Tokenizer
from .train_args import RunArgs


class NoLog:
    """The log of a process other than 0 (distributed.py): process 0 writes log.jsonl."""
    def write(self, **rec):
        pass

    def close(self):
        pass


@dataclass
class RunState:
    """Where a run is: saved in every checkpoint's trainer_state.json (with the flags and the schedule)."""
    step: int = 0  # optimizer steps done
    epoch: int = 0  # the data position: epoch, next micro-batch (DataOrder)
    pos: int = 0
    best_step: int | None = None  # the best eval perplexity so far, kept in OUTPUT_DIR/best
    best_ppl: float | None = None
    best_loss: float | None = None
    bad_evals: int = 0  # evaluations since the best (--early_stopping_patience)
    last_eval_step: int | None = None
    acc_loss: float = 0.0  # sums since the last train log line
    acc_steps: int = 0
    acc_tokens: int = 0
    acc_time: float = 0.0
    elapsed: float = 0.0  # seconds, the runs this one continues included


def seed_everything(seed):
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def rng_state() -> dict:
    version, keys, gauss = random.getstate()
    _, np_keys, np_pos, np_has_gauss, np_gauss = np.random.get_state()
    state = {"python": [version, list(keys), gauss],
             "numpy": {"keys": torch.from_numpy(np_keys.astype(np.int64)), "pos": int(np_pos),
                       "has_gauss": int(np_has_gauss), "gauss": float(np_gauss)},
             "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict):
    version, keys, gauss = state["python"]
    random.setstate((version, tuple(keys), gauss))
    n = state["numpy"]
    np.random.set_state(("MT19937", n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["gauss"]))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


@dataclass
class Run:
    """Everything `setup` builds, which the step, evaluation and checkpoints share."""
    args: RunArgs
    out: Path
    device: torch.device
    model: torch.nn.Module
    tok: Tokenizer
    params: list
    lora: dict  # save_adapter's keywords
    opt: torch.optim.Optimizer
    sched: torch.optim.lr_scheduler.LambdaLR
    scaler: torch.amp.GradScaler | None
    schedule: dict
    order: DataOrder
    train_ex: list
    eval_ex: list | None
    eval_records: list | None
    metric_prompt: Prompt
    total_steps: int
    state: RunState
    log: RunLog | None = None
    started: float = 0.0  # perf_counter() when this process started the run
    step_rng: dict | None = None  # the RNG state right after the last step: what a checkpoint restores
    pass_tokens: int = 0  # the packed fast path's tokens a pass (0: one pass per micro-batch)
    graphs: accumulate.GraphedLoss | None = None  # the CUDA-graph fast path (--cuda_graphs)
    world: distributed.World = distributed.World()  # the processes torchrun started (one without it)
    reducer: distributed.OverlappedReduce | None = None  # sums the gradients over those processes

    def elapsed(self):
        return round(self.state.elapsed + time.perf_counter() - self.started, 2)

    def advice(self) -> str:
        """What to change after non-finite numbers, for the error message."""
        t = self.args.train
        return (f"Try a lower --learning_rate (now {t.learning_rate:g}), a --max_grad_norm (now {t.max_grad_norm:g})"
                + (", or --bf16 instead of --fp16" if t.fp16 else ""))
