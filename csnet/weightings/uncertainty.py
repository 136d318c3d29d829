"""Uncertainty weighting (Kendall, Gal and Cipolla, CVPR 2018): one learned log-variance s_i per task,
L = Σ_i exp(−s_i) L_i + s_i for a classification-like loss and ½ exp(−s_i) L_i + ½ s_i for a Gaussian
(regression) one, s_i = log σ_i², starting at 0 (every weight 1, or ½ for regression). This is the form
most public implementations use; the paper's own classification term has s_i / 2 (log σ_i), and its
Gaussian form is applied here to L1 losses too (a Laplace form would fit them better)."""

from __future__ import annotations

import torch
from torch import nn

from csnet.weightings.base import Weighting


class Uncertainty(Weighting):
    name = "uncertainty"

    def __init__(self, tasks, option=None, seed=0):
        super().__init__(tasks, option, seed)
        self.log_var = nn.Parameter(torch.zeros(len(tasks)))
        self.register_buffer("scale", torch.tensor([0.5 if t.gaussian else 1.0 for t in tasks.values()]),
                             persistent=False)

    def combine(self, losses, present=None):
        # a batch without labels for a task has loss 0: its s_i term would only pull s_i down, so it counts
        # only where the batch had labels (multiplied, not skipped: every s_i stays in the graph for DDP)
        terms = [self.scale[i] * (torch.exp(-self.log_var[i]) * losses[t]
                                  + self.log_var[i] * (present[t] if present is not None else 1.0))
                 for i, t in enumerate(self.task_names)]
        return torch.stack(terms).sum()

    def weights(self):
        w = (self.scale * torch.exp(-self.log_var.detach())).tolist()
        return dict(zip(self.task_names, w))
