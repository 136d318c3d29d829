"""What a loss weighting is: the piece that turns the per-task losses of a step into gradients.

Kept apart from the architecture (LibMTL's split of ``weighting/`` and ``architecture/``): any
weighting trains any network. A weighting is an ``nn.Module``, so its learned parameters reach
the optimizer, its parameters and state (buffers, ``get_extra_state``) the checkpoints and exact
``--resume``, and under torchrun DDP averages its gradients like the network's.
"""

from __future__ import annotations

from typing import ClassVar

import torch
from torch import nn

from csnet.errors import UsageError


class Weighting(nn.Module):
    """Combines ``{task: mean loss of the batch}`` into the step's gradients.

    Most weightings only say how to ``combine`` the losses into one scalar, and ``backward`` runs
    it. Those that work on per-task gradients (PCGrad, GradNorm) set ``per_task_gradients`` and
    override ``backward``; the loop then runs the network outside DDP and averages their gradients
    over processes itself.
    """

    name: ClassVar[str]
    per_task_gradients: ClassVar[bool] = False
    takes_option: ClassVar[bool] = False  # NAME:OPTION (fixed's weights, DWA's temperature, GradNorm's alpha)

    def __init__(self, tasks: dict, option: str | None = None, seed: int = 0):
        super().__init__()
        self.task_names = list(tasks)
        if option is not None and not self.takes_option:
            raise UsageError(f"--weighting {self.name} takes no option (got {self.name}:{option})")

    def check(self, net: nn.Module) -> None:
        """Refuse, before any work, a network this weighting cannot train."""

    def weights(self) -> dict[str, float]:
        """The weight each task's loss has now (logged each epoch as ``loss_weight``)."""
        return dict.fromkeys(self.task_names, 1.0)

    def combine(self, losses: dict[str, torch.Tensor], present: dict[str, torch.Tensor] | None = None) -> torch.Tensor:
        """``present[t]``: 1.0 where the batch had labels for task t (its loss is then a real mean), else 0.0."""
        w = self.weights()
        return sum(w[t] * loss for t, loss in losses.items())

    def backward(self, losses: dict[str, torch.Tensor], net: nn.Module,
                 present: dict[str, torch.Tensor] | None = None) -> None:
        self.combine(losses, present).backward()

    def epoch_end(self, losses: dict[str, float]) -> None:
        """Called with each task's mean training loss after every epoch."""

    def after_step(self) -> None:
        """Called after every optimizer step."""


def number_option(name: str, option: str | None, default: float, what: str, positive: bool) -> float:
    """A weighting's numeric option (``dwa:3``): finite, and positive or at least 0."""
    import math

    if option is None:
        return default
    try:
        value = float(option)
    except ValueError:
        value = math.nan
    if not (math.isfinite(value) and (value > 0 if positive else value >= 0)):
        raise UsageError(f"--weighting {name}:{option}: {what} must be a {'positive' if positive else 'finite'} "
                         f"number{'' if positive else ', 0 or more'}")
    return value


def needs_tasks(name: str, tasks: dict, at_least: int = 2) -> None:
    if len(tasks) < at_least:
        raise UsageError(f"--weighting {name} balances several tasks; this run has {len(tasks)}")
