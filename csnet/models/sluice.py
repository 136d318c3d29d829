"""Sluice units (Ruder, Bingel, Augenstein and Søgaard, "Latent Multi-task Architecture Learning",
AAAI 2019).

Each column's layer is split into k subspaces (groups of channels, k = 2 as in the paper), and a
learned (T·k × T·k) matrix alpha mixes every subspace of every task into every other: a
generalisation of the cross-stitch unit (k = 1 is one weight per task pair and layer). csnet
initialises alpha the way it initialises cross-stitch units: --alpha on each subspace's own entry,
--beta spread evenly over the others of its task and of the other tasks (identity with
--unit-init identity). The layer-skip weights beta, which combine each task's mixed layers into its
head's input, are ``SluiceReadout``.
"""

from __future__ import annotations

import torch
from torch import nn


class SluiceUnit(nn.Module):
    """``forward(xs)``: T tensors (N, C, ...) in, T out; C must be a multiple of ``subspaces``."""

    def __init__(self, n_tasks: int, channels: int, subspaces: int, same: float, other: float):
        super().__init__()
        self.n_tasks, self.channels, self.subspaces = n_tasks, channels, subspaces
        n = n_tasks * subspaces
        rest = other / (n - 1) if n > 1 else 0.0
        self.alpha = nn.Parameter(torch.full((n, n), rest).fill_diagonal_(same))

    def forward(self, xs):
        x = torch.stack(list(xs))  # (T, N, C, ...)
        t, n, c = x.shape[:3]
        rest = x.shape[3:]
        parts = x.view(t, n, self.subspaces, c // self.subspaces, *rest).transpose(1, 2)  # (T, k, N, C/k, ...)
        flat = parts.reshape(t * self.subspaces, -1)
        mixed = (self.alpha @ flat).view(t, self.subspaces, n, c // self.subspaces, *rest).transpose(1, 2)
        return list(mixed.reshape(t, n, c, *rest).unbind(0))

    def mixing_weights(self) -> torch.Tensor:
        """(T, T, 1): the weight task i's subspaces take from task j, summed over j's subspaces and
        averaged over i's (1 from itself and 0 from the others at the identity)."""
        k = self.subspaces
        a = self.alpha.detach().view(self.n_tasks, k, self.n_tasks, k)
        return a.sum(3).mean(1).unsqueeze(-1)

    def macs(self, output) -> int:
        return self.n_tasks * output[0].numel() * self.n_tasks * self.subspaces


class SluiceReadout(nn.Module):
    """The layer-skip weights beta: each task's head input is Σ_l beta[i, l] h_{i,l} over its mixed layers
    that have the head input's shape, starting at 1 on the last layer and 0 elsewhere (the plain network).
    With conv columns whose stages change shape only the last layer qualifies; with MLP columns of equal
    widths every hidden layer does."""

    def __init__(self, n_tasks: int, layers: list[str]):
        super().__init__()
        self.layers = list(layers)
        start = torch.zeros(n_tasks, len(layers))
        start[:, -1] = 1.0
        self.beta = nn.Parameter(start)

    def forward(self, i: int, outputs: dict[str, torch.Tensor]) -> torch.Tensor:
        last = outputs[self.layers[-1]]
        h = self.beta[i, -1] * last
        for l, name in enumerate(self.layers[:-1]):
            if name in outputs and outputs[name].shape == last.shape:
                h = h + self.beta[i, l] * outputs[name]
        return h
