"""The three ways a minqlora command stops early, and the exit status of each.

    BadInput       a flag, data file, model folder, adapter, checkpoint or output path that cannot be
                   used; found before anything is written                                    exit 2
    TrainingError  training could not go on once started (loss or weights NaN/inf, out of memory,
                   an error mid-run); the checkpoints written so far are kept                exit 1
    Interrupted    Ctrl-C during training, after saving a checkpoint to resume from          exit 130

Every message names the file, record, key or flag. Modules this package does not own the errors of
(lora.py, generate.py, torch) raise ValueError for bad input, so a command treats every ValueError
(and FileNotFoundError) as bad input. No paper section: the commands' plumbing. Checked by the exit
status tests in tests/test_train.py, tests/test_inputs.py and tests/test_infer_scripts.py.
"""
from __future__ import annotations

import sys


class BadInput(ValueError):
    """Input that cannot be used; nothing has been written."""


class TrainingError(RuntimeError):
    """Training stopped after it had started; earlier checkpoints are kept."""


class Interrupted(Exception):
    """Ctrl-C during training; `path` is the checkpoint saved to resume from (None: no step done)."""

    def __init__(self, step, path):
        super().__init__(f"interrupted after step {step}")
        self.step, self.path = step, path


def run_main(program, *args) -> int:
    """Run a command's program; its errors become one `error: ...` line on stderr and an exit status."""
    try:
        program(*args)
    except Interrupted as e:
        where = f"; checkpoint {e.path}" if e.path else "; no step completed, nothing saved"
        print(f"interrupted after step {e.step}{where}. Continue with the same flags plus "
              "--resume_from_checkpoint latest", file=sys.stderr)
        return 130
    except KeyboardInterrupt:
        print("interrupted before anything was written; nothing was saved", file=sys.stderr)
        return 130
    except TrainingError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except (ValueError, FileNotFoundError) as e:  # BadInput, and the ValueErrors of lora.py, generate.py
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0
