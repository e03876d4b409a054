"""Training checkpoints: what to write so that a run can stop anywhere and continue exactly.

A checkpoint folder `OUTPUT_DIR/checkpoint-N` (N optimizer steps done) holds
    adapter_config.json, adapter_model.safetensors   the LoRA weights, in peft's format (adapter.py),
                                                     loadable by peft and by the course's ppl.py --peft_path
    trainer_state.pt     optimizer, LR scheduler, gradient scaler and RNG states (python, numpy, torch, cuda)
    trainer_state.json   step, data order (epoch, micro-batch position), best eval, log accumulators, flags
and is written under a temporary name and renamed (atomic.py), so a kill mid-write leaves the previous
checkpoints intact and never a half-written one. The layout follows transformers' Trainer
(checkpoint-N, trainer_state.json, rotation by save_total_limit keeping the best); the adapter files
sit in the folder itself rather than in qlora.py's `checkpoint-N/adapter_model/` subfolder.
"""
from __future__ import annotations

import json
import random
import re
import shutil
from pathlib import Path

import numpy as np
import torch

from .adapter import CONFIG_NAME, SAFETENSORS_NAME, load_adapter, save_adapter
from .atomic import atomic_dir, atomic_file

PREFIX = "checkpoint-"
STATE_PT, STATE_JSON = "trainer_state.pt", "trainer_state.json"
BEST = "best"
# What a run writes into OUTPUT_DIR; any of these means the folder holds a run.
RUN_FILES = ("log.jsonl", "run_config.json", "completed", "curves.png", "curves.csv", CONFIG_NAME,
             SAFETENSORS_NAME, BEST)


class CheckpointError(ValueError):
    pass


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


def find_checkpoint(spec: str, output_dir) -> Path:
    """Resolve --resume_from_checkpoint: 'latest' (the newest in output_dir) or a folder."""
    if spec == "latest":
        found = list_checkpoints(output_dir)
        if not found:
            raise CheckpointError(f"--resume_from_checkpoint latest: no {PREFIX}N folder in {output_dir}")
        return found[-1][1]
    path = Path(spec)
    if not path.is_dir():
        raise CheckpointError(f"--resume_from_checkpoint {spec}: no such folder")
    for name in (STATE_PT, STATE_JSON, CONFIG_NAME):
        if not (path / name).exists():
            raise CheckpointError(f"{path}: not a training checkpoint (no {name})")
    return path


def check_output_dir(output_dir, *, overwrite: bool, resuming: bool) -> list[str]:
    """The previous run's files in output_dir that this run would replace; refuse a folder that holds
    another run unless overwriting or resuming. Changes nothing."""
    out = Path(output_dir)
    if out.exists() and not out.is_dir():
        raise CheckpointError(f"--output_dir {out} is a file")
    found = sorted(p.name for p in (out.iterdir() if out.is_dir() else [])
                   if p.name in RUN_FILES or re.fullmatch(rf"{PREFIX}\d+", p.name))
    if not found or resuming:
        return []
    if not overwrite:
        shown = ", ".join(found[:6]) + (" ..." if len(found) > 6 else "")
        raise CheckpointError(
            f"--output_dir {out} holds another run ({shown}). Continue it with --resume_from_checkpoint "
            "latest, choose another --output_dir, or pass --overwrite_output_dir to delete it")
    return found


def prepare_output_dir(output_dir, *, overwrite: bool, resuming: bool) -> list[str]:
    """check_output_dir, then delete the previous run's files (--overwrite_output_dir) and create the folder."""
    out = Path(output_dir)
    found = check_output_dir(out, overwrite=overwrite, resuming=resuming)
    for name in found:
        p = out / name
        shutil.rmtree(p) if p.is_dir() else p.unlink()
    out.mkdir(parents=True, exist_ok=True)
    if resuming:
        (out / "completed").unlink(missing_ok=True)  # written again when this run completes
    return found


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


def save_training_checkpoint(output_dir, step: int, model, *, lora: dict, optimizer, scheduler, scaler,
                             rng: dict, state: dict) -> Path:
    """Write OUTPUT_DIR/checkpoint-{step} atomically. `lora` = save_adapter's keyword arguments;
    `rng` a rng_state() taken when `state` (a JSON-able dict) was true."""
    dest = Path(output_dir) / f"{PREFIX}{step}"
    with atomic_dir(dest) as tmp:
        save_adapter(model, tmp, **lora)
        torch.save({"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                    "scaler": scaler.state_dict() if scaler is not None else None, "rng": rng},
                   tmp / STATE_PT)
        (tmp / STATE_JSON).write_text(json.dumps({**state, "step": step}, indent=2) + "\n", encoding="utf-8")
    return dest


def load_training_checkpoint(path, model, *, optimizer, scheduler, scaler) -> tuple[dict, dict]:
    """Load adapter, optimizer, scheduler and scaler states in place; return (state json, rng state)."""
    path = Path(path)
    try:
        state = json.loads((path / STATE_JSON).read_text(encoding="utf-8"))
        blob = torch.load(path / STATE_PT, map_location="cpu", weights_only=True)
    except (OSError, json.JSONDecodeError, RuntimeError) as e:
        raise CheckpointError(f"{path}: cannot read the training state ({type(e).__name__}: {e})") from None
    load_adapter(model, path)
    try:
        optimizer.load_state_dict(blob["optimizer"])
    except (ValueError, KeyError) as e:
        raise CheckpointError(f"{path}: optimizer state does not fit this run (different --optim or LoRA "
                              f"layout?): {e}") from None
    scheduler.load_state_dict(blob["scheduler"])
    if scaler is not None and blob.get("scaler"):
        scaler.load_state_dict(blob["scaler"])
    return state, blob["rng"]


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


def save_final(output_dir, model, *, lora: dict, summary: dict):
    """The final adapter into OUTPUT_DIR itself, then `completed` (written last, as qlora.py does)."""
    save_adapter(model, output_dir, **lora)
    with atomic_file(Path(output_dir) / "completed") as f:
        f.write(json.dumps(summary) + "\n")
