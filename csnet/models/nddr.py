"""NDDR layers (Gao, Ma, Zhao, Liu and Yuille, "NDDR-CNN: Layerwise Feature Fusing in Multi-Task CNNs by
Neural Discriminative Dimensionality Reduction", CVPR 2019).

At a mixing point the T columns' features are concatenated along channels and, per task, reduced back to
the column's width by a 1x1 convolution (a linear layer for (N, C) features), then batch norm and ReLU.
The paper initialises each task's 1x1 convolution "diagonally": weight alpha on its own column's
channel c, beta on every other column's channel c, 0 elsewhere, so each task starts mostly with its
own features; csnet takes alpha and beta from --alpha / --beta / --unit-init like cross-stitch units.
Unlike a cross-stitch unit, the layer has no exact identity: its batch norm renormalises the features.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class NDDRLayer(nn.Module):
    """``forward(xs)``: T tensors (N, C, ...) in, T tensors of the same shape out."""

    def __init__(self, n_tasks: int, channels: int, same: float, other: float):
        super().__init__()
        self.n_tasks, self.channels = n_tasks, channels
        eye = torch.eye(channels)
        # weight[i] maps the concatenation (T*C channels) to task i's C channels
        self.weight = nn.Parameter(torch.stack([torch.cat([eye * (same if j == i else other) for j in range(n_tasks)], 1)
                                                for i in range(n_tasks)]))
        self.norms = nn.ModuleList(nn.BatchNorm2d(channels) for _ in range(n_tasks))

    def forward(self, xs):
        x = torch.cat(list(xs), 1)
        out = []
        for i in range(self.n_tasks):
            if x.dim() == 2:  # (N, C) features: a linear layer, batch norm over the batch
                y = self.norms[i](F.linear(x, self.weight[i])[:, :, None, None])[:, :, 0, 0]
            else:
                y = self.norms[i](F.conv2d(x, self.weight[i][:, :, None, None]))
            out.append(F.relu(y))
        return out

    def mixing_weights(self) -> torch.Tensor:
        """(T, T, C): how much task i's channel c takes from task j's channel c (the diagonal the paper
        initialises; the 1x1 convolution's other entries mix channels and are not shown)."""
        c = torch.arange(self.channels)
        w = self.weight.detach().view(self.n_tasks, self.channels, self.n_tasks, self.channels)
        return w[:, c, :, c].permute(1, 2, 0)

    def macs(self, output) -> int:
        per_task = output[0].numel()
        return self.n_tasks * per_task * self.n_tasks * self.channels
