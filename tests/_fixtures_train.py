"""Fixtures for the training tests: the embedded tiny checkpoint, small datasets cut from the
example data, and scripts/train.py's main() run in-process."""
import importlib.util
import itertools
import json
import random
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "weights" / "tiny"
EXAMPLE = ROOT / "data" / "example"

needs_tiny = pytest.mark.skipif(not (TINY / "config.json").exists() or not (EXAMPLE / "train.json").exists(),
                                reason="weights/tiny or data/example not generated yet")


def load_script(name):
    spec = importlib.util.spec_from_file_location(f"_script_{name}", ROOT / "scripts" / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def train_main(argv):
    """scripts/train.py's main(argv) in-process; the exit status (argparse's SystemExit included)."""
    try:
        return load_script("train").main([str(a) for a in argv])
    except SystemExit as e:
        return e.code


def write_records(path, n, *, seed=0, shuffle_outputs=False):
    """The first n example records; shuffle_outputs pairs each instruction with another's output,
    so a model pretrained on the example data must learn something new."""
    records = json.loads((EXAMPLE / "train.json").read_text(encoding="utf-8"))[:n]
    if shuffle_outputs:
        outputs = [r["output"] for r in records]
        random.Random(seed).shuffle(outputs)
        records = [{**r, "output": o} for r, o in zip(records, outputs)]
    path.write_text(json.dumps(records, ensure_ascii=False), encoding="utf-8")
    return path


def seed_dataset(path, n=1100):
    """n records (more than the seed command's --eval_dataset_size 1024) cycled from the example
    train/eval/test data, each with a fresh id."""
    pool = [r for name in ("train", "eval", "test") for r in json.loads((EXAMPLE / f"{name}.json").read_text("utf-8"))]
    records = [{**r, "id": f"seed-{i}"} for i, r in enumerate(itertools.islice(itertools.cycle(pool), n))]
    path.write_text(json.dumps(records, ensure_ascii=False), encoding="utf-8")
    return path


def fast_args(out, data, **overrides):
    """A small, fast run on the tiny model; overrides are flag -> value (None drops the flag)."""
    flags = {"model_name_or_path": TINY, "dataset": data, "dataset_format": "alpaca", "output_dir": out,
             "bits": 16, "lora_r": 8, "lora_alpha": 16, "per_device_train_batch_size": 2,
             "gradient_accumulation_steps": 2, "source_max_len": 64, "target_max_len": 32, "max_steps": 4,
             "logging_steps": 1, "save_steps": 2, "learning_rate": 1e-3, "device": "cpu"}
    flags.update(overrides)
    argv = []
    for k, v in flags.items():
        if v is not None:
            argv += [f"--{k}", str(v)]
    return argv


def read_log(path):
    return [json.loads(line) for line in Path(path).read_text(encoding="utf-8").splitlines() if line.strip()]


def train_losses(path):
    return {r["step"]: r["loss"] for r in read_log(path) if "loss" in r}
