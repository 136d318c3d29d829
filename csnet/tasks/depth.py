"""Depth, or any dense regression: a positive value per pixel, scored on valid pixels only with the
NYU-v2 literature's metrics (Eigen et al., NIPS 2014): absolute error, RMSE, absolute relative error,
and the share of pixels whose ratio to the truth is within 1.25 (δ1)."""

from __future__ import annotations

import math

import torch

from csnet.errors import UsageError
from csnet.tasks.base import HIGHER, LOWER, Task


class Depth(Task):
    """Targets: float (N, H, W); NaN, inf or a value <= 0 marks an invalid pixel. The head predicts
    standardized depth and ``Destandardize`` returns it in the target's units; the default loss is
    L1 on the standardized error (the common choice for depth), MSE on request."""

    kind = "depth"
    dense = True
    metrics = {"abs_err": LOWER, "rmse": LOWER, "abs_rel": LOWER, "delta1": HIGHER}
    primary = "delta1"
    units = {"abs_err": "depth units", "rmse": "depth units", "delta1": "%"}
    delta = ("abs_err", "abs_rel")
    losses = ("l1", "mse")
    standardized = True
    gaussian = True
    fixed_size = 1

    def stat_size(self) -> int:
        return 5

    def _terms(self, out, y):
        y = y.view(out.shape)
        keep = torch.isfinite(y) & (y > 0)
        target = torch.where(keep, y, out.detach())
        z = self._z(out, target)
        loss_sum = ((z * z) if self.loss == "mse" else z.abs()).mul(keep).sum()
        pred, truth = out.detach().double(), torch.where(keep, target, torch.ones_like(target)).double()
        err = (pred - truth).abs() * keep
        # a prediction <= 0 is never within 1.25 of a positive depth
        ratio = torch.maximum(pred / truth, truth / pred.clamp_min(1e-12))
        within = (ratio < 1.25) & (pred > 0) & keep
        sums = torch.stack([keep.sum().double(), err.sum(), (err * err).sum(), (err / truth).sum(),
                            within.sum().double()])
        return loss_sum, keep.sum(), sums

    def _metrics(self, s):
        n, abs_sum, sq_sum, rel_sum, within = s.tolist()
        if not n:
            return dict.fromkeys(self.metrics, math.nan)
        return {"abs_err": abs_sum / n, "rmse": math.sqrt(sq_sum / n), "abs_rel": rel_sum / n, "delta1": within / n}

    def statistics(self, y: torch.Tensor) -> tuple[list[float], list[float]]:
        """Mean and standard deviation of the valid training pixels."""
        flat = y.reshape(-1)
        valid = torch.isfinite(flat) & (flat > 0)
        n = int(valid.sum())
        if n == 0:
            raise UsageError(f"task {self.name}: the training set has no valid pixel")
        mean = float(torch.where(valid, flat, 0).sum(dtype=torch.float64)) / n
        var = float(torch.where(valid, flat - mean, 0).square().sum(dtype=torch.float64)) / n
        return [mean], [var ** 0.5 if var > 0 else 1.0]

    def labelled(self, y):
        flat = y.reshape(len(y), -1)
        return (torch.isfinite(flat) & (flat > 0)).any(1)

    def missing_value(self, y):
        return math.nan
