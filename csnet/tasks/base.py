"""What every task kind provides: its loss, its metrics with their direction, and its head's output.

The training loop, evaluation, model selection, compare and the plots reach a task only
through this interface. Public multi-task frameworks organise tasks the same way (each
task its own loss, metrics and a "higher or lower is better" flag); csnet adds one thing:
everything a task measures is kept as a vector of sums, so batches, epochs and processes
under torchrun combine by addition, and missing labels or ignored pixels add nothing.

A kind's ``primary`` metric is always a higher-is-better number on the scale of a fraction
(accuracy, mean AP, R², mIoU, δ<1.25). Their mean over tasks is the run's validation
``score``, which picks the best epoch: one rule for tasks of any kinds together, and for
classification alone it is the mean accuracy the paper reports.
"""

from __future__ import annotations

import math
from typing import ClassVar

import torch
from torch import nn

from csnet.errors import UsageError

HIGHER, LOWER = "higher", "lower"


class Task:
    """One task of a run: its name, kind, output size, loss and (for regression kinds) target statistics.

    A kind subclasses this in its own file and is named in ``csnet.tasks.KINDS``. It sets the class
    attributes below and implements ``_terms`` (loss and sums of one batch), ``_metrics`` (values
    from the sums) and ``labelled`` (which samples carry a label).
    """

    kind: ClassVar[str]
    dense: ClassVar[bool] = False  # per-pixel outputs at the input's resolution
    metrics: ClassVar[dict[str, str]]  # name -> HIGHER or LOWER is better
    primary: ClassVar[str]  # the metric model selection uses: higher is better, on a fraction's scale
    # How each metric is shown to people: "%" for a fraction (stored as one, shown x100), a unit's name
    # for an error in the target's units, nothing for a plain number (R², a ratio).
    units: ClassVar[dict[str, str]] = {}
    delta: ClassVar[tuple[str, ...]]  # the metrics Δm averages over (Maninis et al., CVPR 2019)
    losses: ClassVar[tuple[str, ...]]  # allowed losses, the first the default
    standardized: ClassVar[bool] = False  # targets z-scored with training statistics inside the run
    gaussian: ClassVar[bool] = False  # a regression-like loss: uncertainty weighting takes its halved form
    fixed_size: ClassVar[int | None] = None

    def __init__(self, name: str, size: int, loss: str | None = None, stats: tuple | None = None):
        self.name, self.size = name, int(size)
        self.loss = loss or self.losses[0]
        if self.loss not in self.losses:
            raise UsageError(f"task {name}: {self.kind} takes the loss {' or '.join(self.losses)}, not {loss!r}")
        if self.fixed_size is not None and self.size != self.fixed_size:
            raise UsageError(f"task {name}: a {self.kind} task has {self.fixed_size} output(s), not {self.size}")
        self.stats = stats  # (mean, std) per output, lists of floats, for standardized kinds

    @property
    def spec(self) -> str:
        """The kind as written in config files and on the command line: ``regression`` or ``regression:l1``."""
        return self.kind if self.loss == self.losses[0] else f"{self.kind}:{self.loss}"

    # ---------------------------------------------------------------- what the loop calls

    def stat_size(self) -> int:
        """Length of the vector of sums after the loss sum and the loss count."""
        raise NotImplementedError

    def terms(self, out: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(loss summed over labelled elements, their count, float64 sums for the metrics) of one batch.
        ``out`` is the head's output in the target's units."""
        return self._terms(out.float(), y)

    def result(self, sums: torch.Tensor) -> dict[str, float]:
        """``loss`` (the mean over labelled elements) and every metric, from the summed vector.
        No labelled element: every value NaN."""
        loss_sum, n, *_ = sums[:2].tolist()
        if not n:
            return dict.fromkeys(["loss", *self.metrics], math.nan)
        return {"loss": loss_sum / n, **self._metrics(sums[2:].double().cpu())}

    def target_shape(self, image_size: tuple[int, ...]) -> tuple[int, ...]:
        """The shape of one sample's target: (outputs,) for vector kinds, the image's (H, W) for dense ones."""
        return tuple(image_size) if self.dense else (self.size,)

    def labelled(self, y: torch.Tensor) -> torch.Tensor:
        """Per sample: whether it has any label for this task."""
        raise NotImplementedError

    def unlabel(self, y: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        """A copy of ``y`` in which the samples ``idx`` carry no label (the data-starved setting)."""
        y = y.clone()
        y[idx] = self.missing_value(y)
        return y

    def missing_value(self, y: torch.Tensor):
        raise NotImplementedError

    def output_layer(self) -> nn.Module | None:
        """A layer after the head that maps standardized outputs back to the target's units, or None."""
        if not self.standardized:
            return None
        # unknown statistics: a network built to check its settings before the data is read, then rebuilt
        return Destandardize(*(self.stats or ([0.0] * self.size, [1.0] * self.size)))

    def describe(self) -> dict:
        """What compare and the plots need to read this task's metrics, written into config.json."""
        return {"kind": self.spec, "primary": self.primary, "metrics": dict(self.metrics), "delta": list(self.delta),
                "units": dict(self.units)}

    # ---------------------------------------------------------------- helpers for kinds

    def _z(self, out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """The error in standardized units: what the loss of a standardized kind is computed on."""
        std = torch.tensor(self.stats[1], dtype=out.dtype, device=out.device)
        return (out - y) / std.view(1, -1, *([1] * (out.dim() - 2)))


class Destandardize(nn.Module):
    """out * std + mean: the head learns standardized targets and the network still answers in the
    target's own units. The statistics come from the run's config, so they are not saved as weights."""

    def __init__(self, mean, std):
        super().__init__()
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32), persistent=False)
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32), persistent=False)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        shape = (1, -1, *([1] * (z.dim() - 2)))
        return z * self.std.view(shape) + self.mean.view(shape)


def counts(values: torch.Tensor, keep: torch.Tensor, bins: int) -> torch.Tensor:
    """How often each of 0..bins-1 occurs among ``values[keep]``, without a data-dependent shape
    (masked values go to an extra bin that is dropped), so it stays one kernel on a GPU."""
    where = torch.where(keep, values, torch.full_like(values, bins))
    return torch.bincount(where.reshape(-1), minlength=bins + 1)[:bins]


def confusion_sums(pred: torch.Tensor, y: torch.Tensor, keep: torch.Tensor, size: int) -> torch.Tensor:
    """[right predictions, per class: right predictions, predictions, labels], over the labelled ``keep``:
    what accuracy, macro-F1 and IoU are computed from."""
    hit = keep & (pred == y)
    return torch.cat([hit.sum().view(1), counts(y, hit, size), counts(pred, keep, size), counts(y, keep, size)])


def macro_mean(values: torch.Tensor, present: torch.Tensor) -> float:
    """Mean over the entries that are ``present`` (NaN when none is)."""
    return float(values[present].mean()) if bool(present.any()) else math.nan
