"""scripts/train.py under torchrun, with process 1's disk failing as its fourth step starts: for
tests/test_distributed.py (a process that fails stops the whole run, non-zero, checkpoints intact). Step 3's
all-reduce needs process 0 in step 3, so checkpoint-2 is complete by then; failing as step 3 starts would race
torchrun's stopping of process 0 against its writing of checkpoint-2."""
import errno
import os
import sys

from _fixtures_train import load_script

import minqlora.trainer as trainer

if os.environ.get("RANK") == "1":
    real_step = trainer.train_step

    def failing_step(run):
        if run.state.step == 3:
            raise OSError(errno.EIO, "the disk failed on process 1")
        return real_step(run)
    trainer.train_step = failing_step

sys.exit(load_script("train").main(sys.argv[1:]))
