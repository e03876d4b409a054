"""The three ways a minqlora command stops early, and the exit status of each.

    BadInput       a flag, data file, model folder, adapter, checkpoint or output path that cannot be
                   used; found before anything is written                                    exit 2
    TrainingError  training could not go on once started (loss or weights NaN/inf, out of memory,
                   an error mid-run); the checkpoints written so far are kept                exit 1
    Interrupted    Ctrl-C during training, after saving a checkpoint to resume from          exit 130
    OSError        a fault while writing (disk full, permission lost): no half-written file  exit 1
    torch.OutOfMemoryError  in ppl.py, predict.py, merge.py (training reports it as TrainingError)  exit 1

Every message names the file, record, key or flag. Modules this package does not own the errors of
(lora.py, generate.py, torch) raise ValueError for bad input, so a command treats every ValueError
(and FileNotFoundError) as bad input. No paper section: the commands' plumbing. Checked by the exit
status tests in tests/test_train.py, tests/test_train_faults.py, tests/test_inputs.py and
tests/test_infer_scripts.py.
"""
from __future__ import annotations

import math
import pickle
import sys


MEMORY_HINT = ("out of GPU memory. Flags that lower memory: --per_device_train_batch_size 1 (raise "
               "--gradient_accumulation_steps to keep the effective batch), --source_max_len / --target_max_len "
               "(see the data audit above for what they cut), --gradient_checkpointing True, --bits 4, a smaller "
               "--lora_r, --bf16, and --per_device_eval_batch_size for evaluation")  # training's TrainingError


class BadInput(ValueError):
    """Input that cannot be used; nothing has been written."""


class TrainingError(RuntimeError):
    """Training stopped after it had started; earlier checkpoints are kept."""


class Interrupted(Exception):
    """Ctrl-C during training; `path` is the checkpoint saved to resume from (None: no step done).
    `quiet`: a process other than torchrun's process 0, which speaks for the run."""

    def __init__(self, step, path, quiet=False):
        super().__init__(f"interrupted after step {step}")
        self.step, self.path, self.quiet = step, path, quiet


def close_progress_bars():
    """Close every open tqdm bar so that what is printed next is the last thing on screen (a bar left
    open is redrawn after the message)."""
    try:
        from tqdm import tqdm
    except ImportError:  # pragma: no cover
        return
    for bar in list(getattr(tqdm, "_instances", ())):
        bar.close()
    sys.stdout.flush()


def is_int(v) -> bool:
    """A whole number as JSON gives it (true and false are not numbers)."""
    return isinstance(v, int) and not isinstance(v, bool)


def is_number(v, finite: bool = True) -> bool:
    """A number as JSON gives it (not a bool); finite unless finite=False."""
    return (is_int(v) or isinstance(v, float)) and (not finite or math.isfinite(v))


def unreadable(path, e: Exception) -> BadInput:
    """A file its reader refused (truncated, corrupt, another format): the file and the reader's first line.
    torch.load(weights_only=True) refuses a pickle that holds more than tensors with advice to load it
    unsafely (which would run the file's code): that advice is never passed on."""
    if isinstance(e, pickle.UnpicklingError):
        said = "damaged, or a pickle of more than tensors, which is never loaded (it could run code)"
    else:
        said = (str(e).strip().splitlines() or [""])[0]
    return BadInput(f"{path}: cannot read ({type(e).__name__}: {said})")


def describe_os_error(e: OSError) -> str:
    """`path: No space left on device` rather than Python's `[Errno 28] ...: 'path'`."""
    if e.strerror and e.filename:
        return f"{e.filename}: {e.strerror}"
    return str(e)


def run_main(program, *args) -> int:
    """Run a command's program; its errors become one `error: ...` line on stderr and an exit status.
    Input and environment faults never show a traceback; anything else (a bug) keeps its traceback."""
    try:
        program(*args)
    except Interrupted as e:
        close_progress_bars()
        if e.quiet:
            return 130
        then = (f"; checkpoint {e.path}. Continue with the same flags plus --resume_from_checkpoint latest"
                if e.path else "; no step completed, nothing saved. Start again with the same flags plus "
                "--overwrite_output_dir")
        print(f"interrupted after step {e.step}{then}", file=sys.stderr)
        return 130
    except KeyboardInterrupt:
        close_progress_bars()
        print("interrupted before anything was written; nothing was saved", file=sys.stderr)
        return 130
    except TrainingError as e:
        close_progress_bars()
        print(f"error: {e}", file=sys.stderr)
        return 1
    except (ValueError, FileNotFoundError) as e:  # BadInput, and the ValueErrors of lora.py, generate.py
        close_progress_bars()
        print(f"error: {e}", file=sys.stderr)
        return 2
    except RuntimeError as e:
        if type(e).__name__ != "OutOfMemoryError":  # torch.OutOfMemoryError; any other is a bug: traceback
            raise
        close_progress_bars()
        print(f"error: out of memory ({str(e).splitlines()[0] if str(e) else 'torch.OutOfMemoryError'}); nothing "
              "was written. Lower --batch_size (or --max_length, --max_new_tokens)", file=sys.stderr)
        return 1
    except OSError as e:  # a full disk, a permission lost while writing: the work had started
        close_progress_bars()
        print(f"error: {describe_os_error(e)}; the output was not written (files are replaced only when "
              "complete, so what was there before is unchanged)", file=sys.stderr)
        return 1
    return 0
