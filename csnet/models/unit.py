"""The cross-stitch unit of Misra, Shrivastava, Gupta and Hebert, "Cross-stitch Networks for
Multi-task Learning", CVPR 2016 (arXiv 1604.03539), section 3.2.

For target task i, source task j and channel c the unit computes
``out_i[:, c] = sum_j w[i, j, c] * x_j[:, c]``: every task gets its own row of
mixing weights (a unit that feeds the same mix to every task, or one that only
reads the diagonal, is a known defect of public implementations).
"""

from __future__ import annotations

import torch
from torch import nn


class CrossStitchUnit(nn.Module):
    """Mix T tasks' activations channel by channel with learned (T, T, C) weights.

    Initialised with ``alpha`` on the diagonal (same-task weight, alpha_S in the
    paper) and ``beta`` off it (different-task weight, alpha_D). The paper starts
    from convex combinations such as 0.9 / 0.1; ``alpha=1, beta=0`` is the identity,
    under which each task's output is its own input, unchanged. Training leaves
    the weights unconstrained.
    """

    def __init__(self, n_tasks: int, channels: int, alpha: float = 0.9, beta: float = 0.1):
        super().__init__()
        if n_tasks < 2:
            raise ValueError(f"a cross-stitch unit mixes at least 2 tasks, got {n_tasks}")
        self.n_tasks, self.channels = n_tasks, channels
        diagonal = torch.eye(n_tasks, dtype=torch.bool).unsqueeze(-1).expand(n_tasks, n_tasks, channels)
        self.weight = nn.Parameter(torch.where(diagonal, alpha, beta).float())

    def forward(self, xs: list[torch.Tensor] | dict[str, torch.Tensor]):
        """Take one (B, C, ...) tensor per task, as a list or a {task: tensor} dict; return the same kind."""
        if isinstance(xs, dict):
            return dict(zip(xs, self.forward(list(xs.values()))))
        if len(xs) != self.n_tasks:
            raise ValueError(f"unit built for {self.n_tasks} tasks got {len(xs)} inputs")
        x = torch.stack(xs)  # (T_source, B, C, *spatial)
        w = self.weight.view(self.n_tasks, self.n_tasks, self.channels, *([1] * (x.dim() - 3)))
        # out[i] = sum_j w[i, j] * x[j]: accumulate one source at a time so no (T, T, B, C, ...)
        # product tensor is ever materialised.
        out = w[:, 0].unsqueeze(1) * x[0]
        for j in range(1, self.n_tasks):
            out = out + w[:, j].unsqueeze(1) * x[j]
        return list(out.unbind(0))

    def extra_repr(self) -> str:
        return f"n_tasks={self.n_tasks}, channels={self.channels}"
