"""What a command will write and the numbers it is given, checked before any work.

Every script calls these while it reads its flags, before the model loads, so that a path that cannot
be written or a number out of range is refused at once (BadInput, exit 2) with one line naming the
flag, what is wrong and what to do; nothing has been written then. What cannot be known in advance
(a disk that fills up, a permission lost mid-run) is a fault during the work (exit 1; errors.py).
Write permission is checked with os.access, which a root user always passes. No paper section: the
commands' plumbing. Checked in tests/test_faults.py.
"""
from __future__ import annotations

import math
import os
import re
from pathlib import Path

from .errors import BadInput


def _nearest_existing(p: Path) -> Path:
    """The deepest existing folder or file on the way to `p` (p itself if it exists)."""
    p = p.absolute()
    return next(q for q in (p, *p.parents) if q.exists())


def _check_writable_within(p: Path, flag: str, shown):
    """Refuse when the nearest existing thing on the way to `p` is a file, or a folder we may not write."""
    q = _nearest_existing(p)
    if q != p.absolute() and not q.is_dir():
        raise BadInput(f"{flag} {shown}: {q} is a file, not a folder; choose a path outside it")
    folder = q if q.is_dir() else q.parent
    if not os.access(folder, os.W_OK | os.X_OK):
        raise BadInput(f"{flag} {shown}: cannot write in {folder} (permission denied); choose a folder you "
                       "may write or change its permissions")


def check_output_dir_path(path, flag: str = "--output_dir"):
    """A folder the command will create or write into."""
    if path is None or str(path).strip() == "":
        raise BadInput(f'{flag} "": empty; give a folder name (e.g. output/run1)')
    p = Path(path)
    if p.exists() and not p.is_dir():
        raise BadInput(f"{flag} {path}: is a file, not a folder; give a folder name")
    _check_writable_within(p, flag, path)


# What the commands read from a model or an adapter folder (an output of the same name there would replace it).
FOLDER_FILES = re.compile(r"(generation_)?config\.json|special_tokens_map\.json|tokenizer.*|chat_template\..*|"
                          r".*\.safetensors|.*\.bin|.*\.index\.json|adapter_config\.json|minqlora\.json")


def check_output_file_path(path, flag: str, inputs: dict | None = None):
    """A file the command will write (under a temporary name beside it, then renamed); `inputs` ({flag: path}
    of the files and folders the command reads): the file may be none of those files, nor a file the command
    reads in one of those folders (a new file beside them, e.g. predictions in the adapter's folder, may)."""
    if path is None or str(path).strip() == "":
        raise BadInput(f'{flag} "": empty; give a file name')
    p = Path(path)
    if p.is_dir():
        raise BadInput(f"{flag} {path}: is a folder; give a file name")
    for in_flag, in_path in (inputs or {}).items():
        q, out = Path(in_path).resolve() if in_path else None, p.resolve()
        if q is not None and (q == out or (q.is_dir() and out.parent == q and FOLDER_FILES.fullmatch(out.name))):
            where = "is" if q == out else f"is the {out.name} of"
            raise BadInput(f"{flag} {path}: {where} {in_flag} {in_path}, which this command reads; writing it "
                           "would lose it: choose another path")
    if p.exists() and not os.access(p, os.W_OK):
        raise BadInput(f"{flag} {path}: the file may not be written (permission denied)")
    _check_writable_within(p, flag, path)


def check_seed(flag: str, value):
    """A seed: numpy's range, as transformers' set_seed needs (torch's error for a negative or huge one named
    no flag)."""
    if value is not None and not 0 <= value < 2**32:
        raise BadInput(f"--{flag} {value}: must be a whole number from 0 to {2**32 - 1}")


def check_number(flag: str, value, *, low=None, high=None, low_open=False, high_open=False, hint=""):
    """Refuse a value that is NaN/inf or outside [low, high] (open ends with low_open / high_open)."""
    ok = isinstance(value, int) or math.isfinite(value)
    if ok and low is not None:
        ok = value > low if low_open else value >= low
    if ok and high is not None:
        ok = value < high if high_open else value <= high
    if not ok:
        lo = "" if low is None else f"{'>' if low_open else '>='} {low:g}"
        hi = "" if high is None else f"{'<' if high_open else '<='} {high:g}"
        want = " and ".join(s for s in (lo, hi) if s) or "a finite number"
        raise BadInput(f"--{flag} {value}: must be a finite number {want}" + (f"; {hint}" if hint else ""))
