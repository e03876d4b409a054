"""scripts/train.py under torchrun, with process 1's disk failing in its third step: for
tests/test_distributed.py (a process that fails stops the whole run, non-zero, checkpoints intact)."""
import errno
import os
import sys

from _fixtures_train import load_script

import minqlora.trainer as trainer

if os.environ.get("RANK") == "1":
    real_step = trainer.train_step

    def failing_step(run):
        if run.state.step == 2:
            raise OSError(errno.EIO, "the disk failed on process 1")
        return real_step(run)
    trainer.train_step = failing_step

sys.exit(load_script("train").main(sys.argv[1:]))
