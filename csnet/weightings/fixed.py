"""Static weights, ``--weighting fixed:fine=1,coarse=0.5``; a task not named keeps weight 1."""

from __future__ import annotations

import math

from csnet.errors import UsageError
from csnet.weightings.base import Weighting


class Fixed(Weighting):
    name = "fixed"
    takes_option = True

    def __init__(self, tasks, option=None, seed=0):
        super().__init__(tasks, option, seed)
        if not option:
            raise UsageError("--weighting fixed needs its weights: fixed:TASK=W,TASK=W (e.g. fixed:fine=1,coarse=0.5)")
        self.fixed = dict.fromkeys(tasks, 1.0)
        for item in option.split(","):
            task, _, value = item.partition("=")
            try:
                w = float(value)
            except ValueError:
                raise UsageError(f"--weighting fixed: {item!r} is not TASK=W with W a number") from None
            if task not in tasks:
                raise UsageError(f"--weighting fixed: no task {task!r} in this run (tasks: {', '.join(tasks)})")
            if not math.isfinite(w) or w < 0:
                raise UsageError(f"--weighting fixed: the weight of {task} must be a finite number, 0 or more "
                                 f"(got {value})")
            self.fixed[task] = w

    def weights(self):
        return dict(self.fixed)
