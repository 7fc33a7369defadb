"""`loupe train` as torchrun runs it, for tests/test_train_scale.py: every process calls the
CLI; with LOUPE_TEST_INTERRUPT_AT=k each process gets a Ctrl-C as step k starts (the way a
killed job stops: the same step everywhere, after the last checkpoint)."""

import os
import sys

import loupe.train
from loupe.cli import main

stop = os.environ.get("LOUPE_TEST_INTERRUPT_AT")
if stop is not None:
    real = loupe.train.Trainer.step

    def step(self, k, parts, epoch):  # type: ignore[no-untyped-def]
        if k == int(stop):
            raise KeyboardInterrupt
        return real(self, k, parts, epoch)

    loupe.train.Trainer.step = step  # type: ignore[method-assign]

sys.exit(main(sys.argv[1:]))
