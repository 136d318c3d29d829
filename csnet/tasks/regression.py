"""Regression: a scalar or vector target, MSE or L1 on targets standardized with the training split's
statistics; MAE, RMSE and R² reported in the target's own units."""

from __future__ import annotations

import math

import torch

from csnet.errors import UsageError
from csnet.tasks.base import HIGHER, LOWER, Task


class Regression(Task):
    """Targets: float (N, D), NaN where missing. The head ends in ``Destandardize``, so the network's
    output is in the target's units; the loss is taken on the standardized error."""

    kind = "regression"
    metrics = {"mae": LOWER, "rmse": LOWER, "r2": HIGHER}
    primary = "r2"
    units = {"mae": "target units", "rmse": "target units"}
    delta = ("mae", "rmse")
    losses = ("mse", "l1")
    standardized = True
    gaussian = True

    def stat_size(self) -> int:
        return 5 * self.size

    def _terms(self, out, y):
        y = y.view(out.shape)
        keep = ~torch.isnan(y)
        target = torch.where(keep, y, out.detach())  # a missing target: zero error, then masked out
        z = self._z(out, target)
        loss_sum = ((z * z) if self.loss == "mse" else z.abs()).mul(keep).sum()
        err = (out.detach() - target).double()
        # R²'s total sum of squares, around the training mean: no cancellation in float64
        centred = (target.double() - torch.tensor(self.stats[0], dtype=torch.float64, device=y.device)) * keep
        sums = torch.cat([keep.sum(0).double(), (err.abs() * keep).sum(0), (err * err * keep).sum(0),
                          centred.sum(0), (centred * centred).sum(0)])
        return loss_sum, keep.sum(), sums

    def _metrics(self, s):
        n, abs_sum, sq_sum, c_sum, c_sq = s.view(5, self.size)
        has = n > 0
        if not bool(has.any()):
            return dict.fromkeys(self.metrics, math.nan)
        n, abs_sum, sq_sum, c_sum, c_sq = (v[has] for v in (n, abs_sum, sq_sum, c_sum, c_sq))
        total = c_sq - c_sum * c_sum / n  # Σ (y - ȳ)² over the evaluated targets
        varies = total > 0  # R² of an output whose targets do not vary is undefined: left out of the mean
        r2 = (1 - sq_sum[varies] / total[varies]).mean() if bool(varies.any()) else math.nan
        return {"mae": float((abs_sum / n).mean()), "rmse": float((sq_sum / n).sqrt().mean()), "r2": float(r2)}

    def statistics(self, y: torch.Tensor) -> tuple[list[float], list[float]]:
        """Per output, mean and standard deviation of the labelled training targets (std 1 where they do
        not vary, so a constant target is learnt as its mean)."""
        y = y.double().view(len(y), -1)
        keep = ~torch.isnan(y)
        if not bool(keep.any(0).all()):
            raise UsageError(f"task {self.name}: no training sample has a target for every output")
        n = keep.sum(0)
        mean = torch.where(keep, y, 0).sum(0) / n
        var = torch.where(keep, (y - mean) ** 2, 0).sum(0) / n
        std = torch.where(var > 0, var.sqrt(), torch.ones_like(var))
        return mean.tolist(), std.tolist()

    def labelled(self, y):
        return ~torch.isnan(y.view(len(y), -1)).all(1)

    def missing_value(self, y):
        return math.nan
