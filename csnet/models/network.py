"""A cross-stitch network: one column per task, units after chosen stages (Misra et al., CVPR 2016).

With no units the same class is the independent baseline of the Fashion-MNIST
reproduction: columns side by side, trained on the sum of the task losses.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields

import torch
from torch import nn

from csnet.errors import UsageError
from csnet.models import columns as columns_lib
from csnet.models.columns import Column
from csnet.models.unit import CrossStitchUnit

BACKBONES = ("convnet", "mlp")
# Where each --stitch choice puts units, per backbone. The paper places units after
# pooling and fully connected layers; the reproduction uses pool1, pool2 and fc ("all").
STITCH_POINTS = {
    "convnet": {"none": [], "after-pool": ["pool1", "pool2"], "after-fc": ["fc"], "all": ["pool1", "pool2", "fc"]},
    "mlp": {"none": [], "after-fc": None, "all": None},  # None: after every hidden layer
}


@dataclass(frozen=True)
class ModelConfig:
    """Everything needed to rebuild a network; stored in every checkpoint next to the weights."""

    tasks: tuple[str, ...]
    num_classes: tuple[int, ...]
    backbone: str = "convnet"
    stitch: str = "all"
    alpha: float = 0.9
    beta: float = 0.1
    in_channels: int = 1
    image_size: int = 28
    batch_norm: bool = True
    dropout: float = 0.2
    hidden: tuple[int, ...] = (60, 20)

    def __post_init__(self):
        # JSON and checkpoints give lists back; keep tuples so configs compare and hash.
        for name in ("tasks", "num_classes", "hidden"):
            object.__setattr__(self, name, tuple(getattr(self, name)))
        if self.backbone not in BACKBONES:
            raise UsageError(f"unknown backbone {self.backbone!r}; valid: {', '.join(BACKBONES)}")
        if self.stitch not in STITCH_POINTS[self.backbone]:
            valid = ", ".join(STITCH_POINTS[self.backbone])
            raise UsageError(f"--stitch {self.stitch} does not apply to {self.backbone}; valid: {valid}")
        if len(self.tasks) != len(self.num_classes) or len(set(self.tasks)) != len(self.tasks):
            raise UsageError(f"tasks {list(self.tasks)} must be distinct, one per column")
        if self.stitch != "none" and len(self.tasks) < 2:
            raise UsageError("cross-stitch units need at least two tasks; use --stitch none for one task")

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "ModelConfig":
        unknown = set(d) - {f.name for f in fields(cls)}
        if unknown:
            raise UsageError(f"unknown model setting(s): {', '.join(sorted(unknown))}")
        return cls(**d)

    def column_arch(self) -> dict:
        """The settings that must agree for two columns to be stitched together."""
        keys = ("backbone", "in_channels", "image_size", "batch_norm", "dropout")
        arch = {k: getattr(self, k) for k in keys}
        if self.backbone == "mlp":
            arch["hidden"] = self.hidden
        return arch

    def points(self) -> list[str]:
        points = STITCH_POINTS[self.backbone][self.stitch]
        return [f"hidden{k}" for k in range(1, len(self.hidden) + 1)] if points is None else points


def build_column(cfg: ModelConfig, num_classes: int) -> Column:
    if cfg.backbone == "convnet":
        return columns_lib.convnet(
            num_classes, in_channels=cfg.in_channels, image_size=cfg.image_size,
            batch_norm=cfg.batch_norm, dropout=cfg.dropout,
        )
    return columns_lib.mlp(
        num_classes, in_features=cfg.in_channels * cfg.image_size ** 2, hidden=cfg.hidden, dropout=cfg.dropout,
    )


class CrossStitchNet(nn.Module):
    """Columns that all see the same input, mixed by a unit after each stage named in ``points``.

    ``forward(x)`` returns ``{task: logits}``; ``features(x)`` the activations each
    task's head receives.
    """

    def __init__(self, columns: dict[str, Column], points: list[str], alpha: float = 0.9, beta: float = 0.1):
        super().__init__()
        self.columns = nn.ModuleDict(columns)
        first = next(iter(columns.values()))
        self.stage_names = list(first.stages)
        for task, column in columns.items():
            if list(column.stages) != self.stage_names:
                raise UsageError(f"column {task!r} has stages {list(column.stages)}, expected {self.stage_names}")
        unknown = [p for p in points if p not in self.stage_names]
        if unknown:
            raise UsageError(f"unknown stitch point(s) {unknown}; valid: {', '.join(self.stage_names)}")
        self.units = nn.ModuleDict(
            {p: CrossStitchUnit(len(columns), first.channels[p], alpha, beta) for p in points}
        )

    @property
    def tasks(self) -> list[str]:
        return list(self.columns)

    def features(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        cols = list(self.columns.values())
        xs = [x] * len(cols)
        for name in self.stage_names:
            xs = [col.stages[name](xi) for col, xi in zip(cols, xs)]
            if name in self.units:
                xs = self.units[name](xs)
        return dict(zip(self.columns, xs))

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        return {task: self.columns[task].head(h) for task, h in self.features(x).items()}

    def unit_parameters(self) -> list[nn.Parameter]:
        return list(self.units.parameters())


def build_network(cfg: ModelConfig) -> CrossStitchNet:
    columns = {task: build_column(cfg, n) for task, n in zip(cfg.tasks, cfg.num_classes)}
    return CrossStitchNet(columns, cfg.points(), cfg.alpha, cfg.beta)
