"""Training checkpoints: what to write so that a run can stop anywhere and continue exactly.

A checkpoint folder `OUTPUT_DIR/checkpoint-N` (N optimizer steps done) holds
    adapter_config.json, adapter_model.safetensors   the LoRA weights, in peft's format (adapter.py),
                                                     loadable by peft and by the course's ppl.py --peft_path
    trainer_state.pt     optimizer, LR scheduler, gradient scaler and RNG states (python, numpy, torch, cuda)
    trainer_state.json   step, data order (epoch, micro-batch position), best eval, log accumulators, flags,
                         the LR schedule (type, total and warmup steps, scheduler steps taken)
and is written under a temporary name and renamed (atomic.py), so a kill mid-write leaves the previous
checkpoints intact and never a half-written one. The layout follows transformers' Trainer
(checkpoint-N, trainer_state.json, rotation by save_total_limit keeping the best); the adapter files
sit in the folder itself rather than in qlora.py's `checkpoint-N/adapter_model/` subfolder.
On resume the optimizer's moments come back but not its hyperparameters or the scheduler's state:
the LR is derived from this run's schedule at the saved scheduler step (optim.fast_forward).
No paper section. Checked by resuming against a straight run (after a stop and after Ctrl-C) in
tests/test_checkpoint.py.
"""
from __future__ import annotations

import contextlib
import dataclasses
import io
import json
import re
import shutil
import signal
import threading
from pathlib import Path

import torch

from .adapter import CONFIG_NAME, INFO_NAME, SAFETENSORS_NAME, load_adapter, save_adapter
from .atomic import atomic_dir, atomic_file
from .optim import fast_forward, schedule_change
from .runstate import set_rng_state
from .errors import BadInput

PREFIX = "checkpoint-"
STATE_PT, STATE_JSON = "trainer_state.pt", "trainer_state.json"
BEST = "best"
# What a run writes into OUTPUT_DIR; any of these means the folder holds a run.
RUN_FILES = ("log.jsonl", "run_config.json", "completed", "curves.png", "curves.csv", CONFIG_NAME,
             SAFETENSORS_NAME, BEST)


# Flags whose change on resume makes the continuation differ from an uninterrupted run: warned about.
ORDER_FLAGS = ("dataset", "dataset_format", "prompt_template", "source_max_len", "target_max_len",
               "per_device_train_batch_size", "gradient_accumulation_steps", "seed", "data_seed", "group_by_length", "learning_rate",
               "lr_scheduler_type", "loss_normalization", "lora_dropout", "bits", "bf16", "fp16",
               "adam_beta1", "adam_beta2", "adam_epsilon", "weight_decay", "max_grad_norm")

# Flags that fix what a checkpoint holds (the adapter's layout, the optimizer state's kind): a checkpoint
# written with other values cannot be continued.
LAYOUT_FLAGS = ("lora_r", "lora_alpha", "lora_modules", "optim")


def flag_changes(saved: dict, now: dict, world_size: int, where) -> list[str]:
    """Warnings for the ORDER_FLAGS whose value differs between a checkpoint's run (`saved`: its state) and
    this one, and for another number of processes. A step is accumulation x processes micro-batches, in one
    order: the same product (2 processes x 8 resumed by 1 x 16) continues as the run would have."""
    was, w0, w1 = saved.get("args", {}), saved.get("processes", 1), world_size  # flags, processes: then, now
    a1 = now["gradient_accumulation_steps"]
    a0 = was.get("gradient_accumulation_steps", a1)
    same = a0 * w0 == a1 * w1  # the step's micro-batches, hence the data order
    out = [f"warning: --{k} was {was[k]!r} in {where}, now {now[k]!r}: the continuation differs from an "
           "uninterrupted run" for k in ORDER_FLAGS if k in was and was[k] != now[k]
           and not (same and k == "gradient_accumulation_steps")]
    if w0 != w1:
        out.append(f"{'note' if same else 'warning'}: {where} was trained with {w0} process(es) x accumulation {a0}, "
                   f"this run has {w1} x {a1}: " + ("the same micro-batches a step, in the same order" if same else
                   f"{a1 * w1} micro-batches a step instead of {a0 * w0}; the data position is kept"))
    return out


@contextlib.contextmanager
def defer_sigint():
    """Hold Ctrl-C back while parameters and optimizer state change, so a checkpoint is never torn."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    caught = []
    previous = signal.signal(signal.SIGINT, lambda *_: caught.append(True))
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
    if caught:
        raise KeyboardInterrupt


def list_checkpoints(output_dir) -> list[tuple[int, Path]]:
    """[(step, folder)] of OUTPUT_DIR/checkpoint-N folders, oldest first (temporary folders skipped)."""
    out = []
    root = Path(output_dir)
    if root.is_dir():
        for p in root.iterdir():
            m = re.fullmatch(rf"{PREFIX}(\d+)", p.name)
            if m and p.is_dir():
                out.append((int(m.group(1)), p))
    return sorted(out)


def last_good(output_dir) -> str:
    """The newest checkpoint folder, for error messages (when there is none, how to start again)."""
    found = list_checkpoints(output_dir)
    return str(found[-1][1]) if found else "none (to start again: the same flags plus --overwrite_output_dir)"


def find_checkpoint(spec: str, output_dir) -> Path:
    """Resolve --resume_from_checkpoint: 'latest' (the newest in output_dir) or a folder."""
    if spec == "latest":
        found = list_checkpoints(output_dir)
        if not found:
            raise BadInput(f"--resume_from_checkpoint latest: no {PREFIX}N folder in {output_dir}")
        return found[-1][1]
    path = Path(spec)
    if not path.is_dir():
        raise BadInput(f"--resume_from_checkpoint {spec}: no such folder")
    for name in (STATE_PT, STATE_JSON, CONFIG_NAME):
        if not (path / name).exists():
            raise BadInput(f"{path}: not a training checkpoint (no {name})")
    return path


def check_output_dir(output_dir, *, overwrite: bool, resuming: bool, resume_from=None) -> list[str]:
    """The previous run's files in output_dir that this run would replace; refuse a folder that holds
    another run unless overwriting, or resuming that run (`resume_from` None or a checkpoint inside
    output_dir). Changes nothing."""
    out = Path(output_dir)
    if out.exists() and not out.is_dir():
        raise BadInput(f"--output_dir {out} is a file")
    found = sorted(p.name for p in (out.iterdir() if out.is_dir() else [])
                   if p.name in RUN_FILES or re.fullmatch(rf"{PREFIX}\d+", p.name))
    here = resuming and (resume_from is None or Path(resume_from).resolve().parent == out.resolve())
    if not found or here:
        return []
    if not overwrite:
        shown = ", ".join(found[:6]) + (" ..." if len(found) > 6 else "")
        if resuming:
            raise BadInput(
                f"--output_dir {out} holds another run ({shown}), not the one --resume_from_checkpoint "
                f"{resume_from} belongs to ({Path(resume_from).parent}); continuing into it would mix the two "
                "runs' logs and checkpoints. Use that run's folder as --output_dir, an empty --output_dir, or "
                f"--overwrite_output_dir to delete the run in {out}")
        cont = ("Continue it with --resume_from_checkpoint latest, choose" if list_checkpoints(out) else
                "It saved no checkpoint to continue from: choose")  # (stopped before its first)
        raise BadInput(f"--output_dir {out} holds another run ({shown}). {cont} another --output_dir, or pass "
                       "--overwrite_output_dir to delete it")
    return found


def prepare_output_dir(output_dir, *, overwrite: bool, resuming: bool, resume_from=None) -> list[str]:
    """check_output_dir, then delete the previous run's files (--overwrite_output_dir) and create the folder."""
    out = Path(output_dir)
    found = check_output_dir(out, overwrite=overwrite, resuming=resuming, resume_from=resume_from)
    for name in found:
        p = out / name
        shutil.rmtree(p) if p.is_dir() else p.unlink()
    out.mkdir(parents=True, exist_ok=True)  # `completed` goes once the resume has succeeded (trainer.setup)
    return found


def save_training_checkpoint(output_dir, step: int, model, *, lora: dict, optimizer, scheduler, scaler,
                             rng: dict, state: dict) -> Path:
    """Write OUTPUT_DIR/checkpoint-{step} atomically. `lora` = save_adapter's keyword arguments;
    `rng` a runstate.rng_state() taken when `state` (a JSON-able dict) was true."""
    dest = Path(output_dir) / f"{PREFIX}{step}"
    with atomic_dir(dest) as tmp:
        save_adapter(model, tmp, **lora)
        buf = io.BytesIO()  # serialized in memory, written by Python: a full disk is an OSError (ENOSPC),
        torch.save({"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),  # not torch's
                    "scaler": scaler.state_dict() if scaler is not None else None, "rng": rng}, buf)  # "pos"
        with open(tmp / STATE_PT, "wb") as f:
            f.write(buf.getbuffer())
        (tmp / STATE_JSON).write_text(json.dumps({**state, "step": step}, indent=2) + "\n", encoding="utf-8")
    return dest


def load_training_checkpoint(path, model, *, optimizer, scaler, check=None) -> tuple[dict, dict]:
    """Load adapter, optimizer and scaler states in place; return (state json, rng state). The
    scheduler's state is not loaded (the caller derives it: optim.fast_forward), and the optimizer's
    hyperparameters are the caller's to set again from its flags. `check(state)` may refuse the saved
    state before anything is loaded."""
    path = Path(path)
    earlier = f"resume from an earlier {PREFIX}N in {path.parent} instead"
    try:
        state = json.loads((path / STATE_JSON).read_text(encoding="utf-8"))
        if not isinstance(state, dict) or not isinstance(state.get("step"), int):
            raise ValueError("not a trainer state")
    except (OSError, ValueError, UnicodeDecodeError) as e:
        raise BadInput(f"{path / STATE_JSON}: cannot read the training state ({e}); {earlier}") from None
    try:
        blob = torch.load(path / STATE_PT, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 -- torch's own wording advises an unsafe reload; never pass it on
        raise BadInput(f"{path / STATE_PT}: cannot read ({type(e).__name__}): the file is damaged or was not "
                       f"written by minqlora; {earlier}") from None
    if not isinstance(blob, dict) or not {"optimizer", "rng"} <= set(blob):
        raise BadInput(f"{path / STATE_PT}: not a minqlora training state (no optimizer or RNG state); {earlier}")
    if check is not None:
        check(state)
    load_adapter(model, path)
    try:
        optimizer.load_state_dict(blob["optimizer"])
    except (ValueError, KeyError) as e:
        raise BadInput(f"{path}: optimizer state does not fit this run (different --optim or LoRA "
                              f"layout?): {e}") from None
    if scaler is not None and blob.get("scaler"):
        scaler.load_state_dict(blob["scaler"])
    return state, blob["rng"]


def resume_run(run, resume: Path, hyper: dict, say):
    """Continue runstate.Run `run` from checkpoint `resume`: adapter, optimizer moments, RNG, data position,
    best-so-far, log accumulators (its RunState). Writes nothing: a refused resume leaves every file as it
    was (the trainer prepares the output folder and calls restore_best after it). The optimizer's
    hyperparameters (`hyper`) and the LR come from this run's flags and schedule, at the saved position;
    `say` prints the notes and warnings."""
    def check(saved):  # what a continuation cannot change: refused before anything is loaded or written
        now, was = run.args.to_dict(), saved.get("args", {})
        for k in LAYOUT_FLAGS:
            if k in was and was[k] != now[k]:
                raise BadInput(f"{resume / STATE_JSON}: the run was trained with --{k} {was[k]}, this command has "
                               f"--{k} {now[k]}; resume with --{k} {was[k]}, or start a new run in another "
                               "--output_dir")
        if saved["step"] > run.total_steps:  # (equal: the run ends at that checkpoint, its adapter the final one)
            raise BadInput(f"{resume}: the run is at step {saved['step']}, past the {run.total_steps} steps this "
                           "command trains; raise --max_steps (or --num_train_epochs) to continue it")
        pos, batches = saved.get("pos", 0), run.order.batches_per_epoch
        if pos >= batches or saved.get("epoch", 0) < 0:
            raise BadInput(f"{resume / STATE_JSON}: the run stopped at micro-batch {pos} of epoch {saved.get('epoch')}, "
                           f"but this command's data has {batches} micro-batches an epoch ({len(run.train_ex)} "
                           f"examples): the dataset no longer matches the saved position. Resume with the "
                           f"run's --dataset ({was.get('dataset')}) and data flags, or start a new run")
        n = saved.get("train_examples")
        if n is not None and n != len(run.train_ex):
            say(f"warning: {resume} was trained on {n} examples, this command has {len(run.train_ex)}: the data "
                "order differs from an uninterrupted run")

    saved, rng = load_training_checkpoint(resume, run.model, optimizer=run.opt, scaler=run.scaler, check=check)
    for warning in flag_changes(saved, run.args.to_dict(), run.world.size, resume):
        say(warning)
    names = [f.name for f in dataclasses.fields(run.state)]
    run.state = st = type(run.state)(**{k: saved[k] for k in names if k in saved})
    for group in run.opt.param_groups:
        group.update(hyper)
    lr_now = fast_forward(run.sched, saved.get("schedule", {}).get("step", st.step))
    warning = schedule_change(run.schedule["type"], saved.get("schedule"), run.schedule)
    if warning:
        say(f"{warning} (step {st.step + 1}: lr {lr_now:.3g})")
    set_rng_state(rng)
    run.order.epoch, run.order.pos = st.epoch, st.pos
    say(f"resumed from {resume} at step {st.step} (epoch {run.order.epoch_float()})")


def restore_best(run, resume: Path, say):
    """After resume_run and once the output folder is prepared: make OUTPUT_DIR/best the resumed best
    (reconcile_best), or forget that best when it is no longer on disk."""
    st = run.state
    note, kept = reconcile_best(run.out, resume, dataclasses.asdict(st))
    if note:
        say(note)
    if not kept:
        st.best_step, st.best_ppl, st.best_loss, st.bad_evals = None, None, None, 0


def rotate(output_dir, limit: int | None, keep=()) -> list[Path]:
    """Delete the oldest checkpoints beyond `limit`, never one whose step is in `keep` (best, newest)."""
    if limit is None:
        return []
    found = list_checkpoints(output_dir)
    removable = [p for s, p in found if s not in keep]
    removed = []
    while len(found) - len(removed) > limit and removable:
        p = removable.pop(0)
        shutil.rmtree(p, ignore_errors=True)
        removed.append(p)
    return removed


def save_best(output_dir, model, *, lora: dict, info: dict) -> Path:
    """OUTPUT_DIR/best: the adapter with the lowest eval perplexity so far, and best.json saying which."""
    dest = Path(output_dir) / BEST
    with atomic_dir(dest) as tmp:
        save_adapter(model, tmp, **lora)
        (tmp / "best.json").write_text(json.dumps(info, indent=2) + "\n", encoding="utf-8")
    return dest


def _best_step(folder):
    try:
        return json.loads((Path(folder) / "best.json").read_text(encoding="utf-8"))["step"]
    except (OSError, ValueError, KeyError, TypeError):
        return None


def reconcile_best(output_dir, resume, state: dict) -> tuple[str | None, bool]:
    """Make OUTPUT_DIR/best the resumed state's best (state["best_step"]). best/ can be newer than the
    checkpoint (resuming from an older one after a later best) or absent (resuming into another folder).
    It is restored from checkpoint-{best_step} or from the checkpoint's own run's best/ where either
    holds that step's adapter, else removed. Returns (a note to print or None, whether the state's best
    is on disk in best/); when it is not, the caller forgets it and the next evaluation starts a new best."""
    out, resume = Path(output_dir), Path(resume)
    best, step = out / BEST, state.get("best_step")
    have = _best_step(best) if best.exists() else None
    if step is None or have == step:
        if step is None and best.exists():
            shutil.rmtree(best)
            return f"note: removed {best} (step {have}): {resume} was written before any best", True
        return None, True
    was = f"{best} held step {have}" if best.exists() else f"{best} was missing"
    for src in (resume.parent / f"{PREFIX}{step}", resume.parent / BEST):
        if (src / SAFETENSORS_NAME).is_file() and (src / CONFIG_NAME).is_file() and \
                (src.name != BEST or _best_step(src) == step):
            with atomic_dir(best) as tmp:
                for name in (CONFIG_NAME, SAFETENSORS_NAME, INFO_NAME):
                    if (src / name).exists():
                        shutil.copy2(src / name, tmp / name)
                info = {"step": step, "eval_ppl": state.get("best_ppl"), "eval_loss": state.get("best_loss"),
                        "restored_from": str(src)}
                (tmp / "best.json").write_text(json.dumps(info, indent=2) + "\n", encoding="utf-8")
            return f"note: {was}; restored the best of {resume} (step {step}) from {src}", True
    if best.exists():
        shutil.rmtree(best)
    return (f"note: {was}; the best of {resume} (step {step}) is no longer on disk (its checkpoint was rotated "
            f"away), so {best} is removed and the next evaluation starts a new best"), False


def save_final(output_dir, model, *, lora: dict, summary: dict):
    """The final adapter into OUTPUT_DIR itself, then `completed` (written last, as qlora.py does)."""
    save_adapter(model, output_dir, **lora)
    with atomic_file(Path(output_dir) / "completed") as f:
        f.write(json.dumps(summary) + "\n")
