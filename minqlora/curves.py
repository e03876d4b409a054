"""A run's log.jsonl, written line by line, and the learning curves drawn from it: train loss, eval
loss and eval perplexity against the optimizer step.

The picture the course's student needed: eval loss turned up around step 1,100 of a 10,000-step run
while the train loss kept falling, and nobody looked until 110 hours later. The trainer rewrites
`curves.png` and `curves.csv` at every evaluation; `scripts/plot.py` redraws one or several logs.
log.jsonl lines are JSON objects; train lines carry "loss", eval lines "eval_loss"/"eval_ppl", and
"event" lines (start, audit, checkpoint, best, interrupted, end) say what happened.
No paper section. Checked in tests/test_checkpoint.py.
"""
from __future__ import annotations

import csv
import json
import math
import warnings
from pathlib import Path

from .atomic import atomic_file
from .errors import BadInput, is_int, is_number

COLUMNS = ("step", "epoch", "loss", "eval_loss", "eval_ppl")


def _step_of(line):
    """The step a log line belongs to (0: none); inf for a line cut short by a kill, or not a record."""
    try:
        rec = json.loads(line)
    except json.JSONDecodeError:
        return math.inf
    step = rec.get("step", 0) if isinstance(rec, dict) else None
    return step if is_number(step, finite=False) else math.inf


class RunLog:
    """log.jsonl: one JSON object per line, flushed at once; on resume, lines after the checkpoint go
    (the cut log is written under a temporary name and renamed: a kill then loses no line)."""

    def __init__(self, path, keep_until_step=None):
        self.path = Path(path)
        if keep_until_step is not None and self.path.exists():
            lines = self.path.read_text(encoding="utf-8").splitlines()
            kept = [ln for ln in lines if _step_of(ln) <= keep_until_step]
            with atomic_file(self.path) as f:
                f.writelines(ln + "\n" for ln in kept)
        self.f = open(self.path, "a", encoding="utf-8")

    def write(self, **rec):
        self.f.write(json.dumps(rec, ensure_ascii=False) + "\n")
        self.f.flush()

    def close(self):
        self.f.close()


def _records(path: Path):
    """(line number, record) of each non-blank line. An invalid last line that does not end the file with a
    newline is the line a kill cut short, and is passed over; any other invalid line is refused (BadInput)."""
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise BadInput(f"{path}: cannot read it: not UTF-8 text ({e.reason} at byte {e.start}); is it a "
                       "log.jsonl?") from None
    lines = [(n, ln) for n, ln in enumerate(text.splitlines(), 1) if ln.strip()]
    for i, (n, line) in enumerate(lines):
        try:
            rec = json.loads(line)
        except json.JSONDecodeError as e:
            if i == len(lines) - 1 and i > 0 and not text.endswith("\n"):
                return  # the last line of a run killed mid-write
            raise BadInput(f"{path}: line {n}, column {e.colno}: not valid JSON ({e.msg})") from None
        if not isinstance(rec, dict):
            raise BadInput(f"{path}: line {n}: must be a JSON object {{...}}, not {type(rec).__name__}")
        yield n, rec


def _check(path: Path, n: int, rec: dict):
    """A record's step is a whole number and its numbers numbers (NaN included: a diverged run logs it)."""
    if not is_int(rec["step"]):
        raise BadInput(f"{path}: line {n}: step={rec['step']!r}: must be a whole number")
    for k in COLUMNS[1:]:
        if rec.get(k) is not None and not is_number(rec[k], finite=False):
            raise BadInput(f"{path}: line {n}: {k}={rec[k]!r}: must be a number")


def read_log(path) -> dict[str, list]:
    """{"train": [(step, loss)], "eval_loss": [(step, v)], "eval_ppl": [(step, v)], "rows": merged by step}."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such log")
    rows: dict[int, dict] = {}
    for n, rec in _records(path):
        if "event" in rec or "step" not in rec or not any(k in rec for k in COLUMNS[2:]):
            continue
        _check(path, n, rec)
        row = rows.setdefault(rec["step"], {"step": rec["step"]})
        row.update({k: rec[k] for k in COLUMNS[1:] if rec.get(k) is not None})
    ordered = [rows[s] for s in sorted(rows)]
    series = {k: [(r["step"], r[k]) for r in ordered if k in r] for k in ("loss", "eval_loss", "eval_ppl")}
    return {"train": series["loss"], "eval_loss": series["eval_loss"], "eval_ppl": series["eval_ppl"],
            "rows": ordered}


def write_csv(log: dict, csv_path):
    with atomic_file(csv_path) as f:
        w = csv.DictWriter(f, fieldnames=COLUMNS, restval="")
        w.writeheader()
        for row in log["rows"]:
            w.writerow(row)


def plot(runs: list[tuple[str, dict]], png_path, title: str | None = None):
    """One figure, two panels: losses (train solid, eval dashed) and eval perplexity; one colour per run."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_loss, ax_ppl) = plt.subplots(1, 2, figsize=(11, 4))
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for i, (label, log) in enumerate(runs):
        c = colors[i % len(colors)]
        prefix = f"{label}: " if len(runs) > 1 else ""
        for key, style, what, ax in (("train", "-", "train loss", ax_loss), ("eval_loss", "--", "eval loss", ax_loss),
                                     ("eval_ppl", "-", "eval perplexity", ax_ppl)):
            pts = log[key]
            if pts:
                xs, ys = zip(*pts)
                ax.plot(xs, ys, style, color=c, marker="o" if len(pts) < 30 and key != "train" else None,
                        markersize=3, label=prefix + what)
        best = min(log["eval_ppl"], key=lambda p: p[1], default=None)
        if best is not None:
            ax_ppl.axvline(best[0], color=c, alpha=0.3, linestyle=":")
            ax_ppl.annotate(f"best {best[1]:.3f} @ {best[0]}", best, textcoords="offset points", xytext=(4, 6),
                            fontsize=8, color=c)
    ax_loss.set(xlabel="optimizer step", ylabel="loss (mean token NLL)", title="loss")
    ax_ppl.set(xlabel="optimizer step", ylabel="mean per-example perplexity", title="eval perplexity")
    for ax in (ax_loss, ax_ppl):
        ax.grid(alpha=0.3)
        if ax.lines:
            ax.legend(fontsize=8)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    png_path = Path(png_path)
    png_path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_file(png_path, mode="wb") as f:
        fig.savefig(f, format="png", dpi=100)
    plt.close(fig)


def redraw_curves(out, say):
    """OUTPUT_DIR's curves.png and curves.csv from its log.jsonl; a plot that cannot be drawn is said
    (`say`), never stops training."""
    out = Path(out)
    try:
        write_curves(out / "log.jsonl", out / "curves.png", out / "curves.csv", title=str(out))
    except (ValueError, OSError) as e:
        say(f"warning: curves not redrawn ({e}); the numbers are in {out / 'log.jsonl'}")


def write_curves(log_path, png_path, csv_path, title: str | None = None) -> dict:
    """Redraw one run's curves.png and curves.csv from its log; returns the parsed log.
    Without matplotlib only the CSV is written (with a warning): a missing plot never stops training."""
    log = read_log(log_path)
    write_csv(log, csv_path)
    try:
        plot([(Path(log_path).parent.name, log)], png_path, title=title)
    except ImportError as e:
        warnings.warn(f"curves.png not drawn ({e}); the numbers are in {csv_path}")
    return log
