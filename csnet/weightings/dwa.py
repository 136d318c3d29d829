"""Dynamic weight average (Liu, Johns and Davison, CVPR 2019): w_i = T exp(r_i / temperature) /
Σ_j exp(r_j / temperature), r_i the ratio of task i's mean training losses in the last two epochs;
every weight 1 in the first two epochs. ``dwa`` uses the published temperature 2; ``dwa:K`` another."""

from __future__ import annotations

import math

import torch

from csnet.weightings.base import Weighting, needs_tasks, number_option


class DWA(Weighting):
    name = "dwa"
    takes_option = True

    def __init__(self, tasks, option=None, seed=0):
        super().__init__(tasks, option, seed)
        needs_tasks(self.name, tasks)
        self.temperature = number_option(self.name, option, 2.0, "the temperature", positive=True)
        # the last two epochs' mean losses, older first (NaN: not seen yet); saved with the training state
        self.register_buffer("history", torch.full((2, len(tasks)), math.nan, dtype=torch.float64))

    def weights(self):
        if bool(torch.isnan(self.history).any()):
            return dict.fromkeys(self.task_names, 1.0)
        r = self.history[1] / self.history[0]
        w = len(self.task_names) * torch.softmax(r / self.temperature, 0)
        return dict(zip(self.task_names, w.tolist()))

    def epoch_end(self, losses):
        latest = torch.tensor([losses[t] for t in self.task_names], dtype=torch.float64, device=self.history.device)
        self.history.copy_(torch.stack([self.history[1], latest]))
