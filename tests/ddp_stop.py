"""Run csnet under torchrun with one rank sending itself SIGINT after a given training step:
a stop request that reached only that rank, which all ranks must still obey at the same step.

Usage: torchrun ... tests/ddp_stop.py RANK STEP csnet-arguments...
"""

import os
import signal
import sys

from csnet.cli import main
from csnet.progress import RichReporter

rank, at = int(sys.argv[1]), int(sys.argv[2])
original, steps = RichReporter.step, {"n": 0}


def step(self):
    original(self)
    steps["n"] += 1
    if steps["n"] == at and int(os.environ["RANK"]) == rank:
        os.kill(os.getpid(), signal.SIGINT)


RichReporter.step = step
sys.exit(main(sys.argv[3:]))
