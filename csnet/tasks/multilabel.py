"""Binary and multi-label tasks: K independent yes/no outputs, binary cross-entropy on logits.

Mean average precision is computed from per-label histograms of the logits (2,048 bins
of 1/64 over [-16, 16], the ends open), so it is a sum that adds up over batches and
processes: it is the exact AP of the logits rounded to 1/64, with tied scores taken
as one threshold, as scikit-learn's ``average_precision_score`` takes them.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from csnet.tasks.base import HIGHER, Task, counts, macro_mean

BINS, RANGE = 2048, 16.0


class Multilabel(Task):
    """Targets: float (N, K) of 0/1, NaN where a label is missing."""

    kind = "multilabel"
    metrics = {"accuracy": HIGHER, "mean_ap": HIGHER}
    primary = "mean_ap"
    units = {"accuracy": "%", "mean_ap": "%"}
    delta = ("mean_ap",)
    losses = ("bce",)

    def stat_size(self) -> int:
        return 2 * self.size + 2 * self.size * BINS

    def _terms(self, out, y):
        y = y.view(out.shape)
        keep = ~torch.isnan(y)
        target = torch.where(keep, y, torch.zeros_like(y))
        loss_sum = (F.binary_cross_entropy_with_logits(out, target, reduction="none") * keep).sum()
        positive = target > 0.5
        correct = (((out > 0) == positive) & keep).sum(0)
        k = self.size
        bins = ((out.detach().clamp(-RANGE, RANGE) + RANGE) * (BINS / (2 * RANGE))).long().clamp_(0, BINS - 1)
        cell = bins + torch.arange(k, device=out.device) * BINS  # label-major: label j's bins at j*BINS
        sums = torch.cat([correct, keep.sum(0), counts(cell, keep & positive, k * BINS),
                          counts(cell, keep & ~positive, k * BINS)])
        return loss_sum, keep.sum(), sums.double()

    def _metrics(self, s):
        k = self.size
        correct, n = s[:k], s[k:2 * k]
        pos = s[2 * k:2 * k + k * BINS].view(k, BINS).flip(1)  # highest logits first
        neg = s[2 * k + k * BINS:].view(k, BINS).flip(1)
        return {"accuracy": macro_mean(correct / n.clamp_min(1), n > 0),
                "mean_ap": macro_mean(average_precision(pos, neg), pos.sum(1) > 0)}

    def labelled(self, y):
        return ~torch.isnan(y.view(len(y), -1)).all(1)

    def missing_value(self, y):
        return math.nan


class Binary(Multilabel):
    """One yes/no output: a multi-label task with K = 1."""

    kind = "binary"
    fixed_size = 1


def average_precision(pos: torch.Tensor, neg: torch.Tensor) -> torch.Tensor:
    """Per row, AP = Σ_n (R_n − R_{n−1}) P_n over thresholds from the highest score down, from
    counts of positives and negatives per score bin (each bin one threshold)."""
    tp, fp = pos.cumsum(1), neg.cumsum(1)
    precision = tp / (tp + fp).clamp_min(1)
    return (pos * precision).sum(1) / pos.sum(1).clamp_min(1)
