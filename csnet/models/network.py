"""A cross-stitch network: one column per task, units after chosen stages (Misra et al., CVPR 2016).

With no units the same class is the independent baseline of the Fashion-MNIST
reproduction: columns side by side, trained on the sum of the task losses.
"""

from __future__ import annotations

import math
import typing
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch
from torch import nn

from csnet import tasks as tasks_lib
from csnet.config import BACKBONES, as_image_size, image_hw, is_custom
from csnet.errors import UsageError
from csnet.settings import from_dict
from csnet.models import columns as columns_lib
from csnet.models.backbones import TORCHVISION, as_column, custom_column, torchvision_column
from csnet.models.columns import Column, DenseHead
from csnet.models.nddr import NDDRLayer
from csnet.models.sluice import SluiceReadout, SluiceUnit
from csnet.models.unit import INITS, MODES, CrossStitchUnit, init_values



def _cross_stitch(n_tasks: int, width: int | None, mode: str, alpha: float, beta: float, init: str, subspaces: int):
    return CrossStitchUnit(n_tasks, width if mode == "channel" else None, mode, alpha, beta, init)


def _nddr(n_tasks, width, mode, alpha, beta, init, subspaces):
    return NDDRLayer(n_tasks, width, *init_values(n_tasks, init, alpha, beta))


def _sluice(n_tasks, width, mode, alpha, beta, init, subspaces):
    return SluiceUnit(n_tasks, width, subspaces, *init_values(n_tasks, init, alpha, beta))


# How columns are mixed at a point, by --arch: each builder makes the module for one stitch point.
MIXERS = {"cross-stitch": _cross_stitch, "nddr": _nddr, "sluice": _sluice}
# Networks without mixers: columns side by side (the independent baseline), hard sharing.
ARCHS = (*MIXERS, "independent", "shared")
FLOAT32_MAX = 3.4028234663852886e38
MAX_SIZE = 2 ** 31 - 1  # torch's kernels index a dimension with 32-bit integers in places
# Named placements of the Fashion convnet. The paper places units after pooling and
# fully connected layers; the reproduction uses pool1, pool2 and fc ("all").
ALIASES = {
    "convnet": {"after-pool": ["pool1", "pool2"], "after-fc": ["fc"]},
    "mlp": {"after-fc": None},  # None: the column's default points, after every hidden layer
    "fcn": {"after-pool": None},
}


@dataclass(frozen=True)
class ModelConfig:
    """Everything needed to rebuild a network; stored in every checkpoint next to the weights.

    ``stitch``: ``none``, ``all`` (the backbone's default points), a named placement
    (``after-pool``, ``after-fc``), or a comma-separated list of stage names.
    ``num_classes``: each task's number of outputs (classes, labels, or values);
    ``kinds``: each task's kind (``csnet.tasks``; empty: all classification);
    ``target_stats``: per task, (mean, std) per output of a standardized kind, else None.
    """

    tasks: tuple[str, ...]
    num_classes: tuple[int, ...]
    kinds: tuple[str, ...] = ()
    target_stats: tuple[typing.Any, ...] = ()
    backbone: str = "convnet"
    # cross-stitch, nddr, sluice (columns mixed at the stitch points), independent (no mixing), or shared:
    # hard parameter sharing up to share_until, then a branch per task
    arch: str = "cross-stitch"
    subspaces: int = 2  # sluice: subspaces per layer (Ruder et al. use 2)
    share_until: str | None = None
    stitch: str = "all"
    unit_mode: str = "channel"
    unit_init: str = "alpha-beta"
    alpha: float = 0.9
    beta: float = 0.1
    in_channels: int = 1
    image_size: int | tuple[int, int] = 28  # S for S x S inputs, (H, W) otherwise
    in_features: int | None = None  # tables: features per row (mlp only); images use channels x size^2
    batch_norm: bool = True
    dropout: float = 0.2
    hidden: tuple[int, ...] = (60, 20)
    # arch "custom" (runs written by csnet.fit): module.path:function that builds the whole network; None
    # where fit was not told, and then csnet cannot rebuild it
    network: str | None = None

    def __post_init__(self):
        # JSON and checkpoints give lists back; keep tuples so configs compare and hash.
        for name in ("tasks", "num_classes", "hidden", "kinds", "target_stats"):
            object.__setattr__(self, name, tuple(getattr(self, name)))
        object.__setattr__(self, "image_size", as_image_size(self.image_size, "image size"))
        self._check_tasks()
        if self.backbone not in BACKBONES and not is_custom(self.backbone):
            raise UsageError(f"unknown backbone {self.backbone!r}; valid: {', '.join(BACKBONES)}, "
                             "or module.path:function for your own")
        if not 0 <= self.dropout < 1:
            raise UsageError(f"--dropout must be in [0, 1), got {self.dropout}")
        if not self.hidden or min(self.hidden) < 1:
            raise UsageError(f"--hidden sizes must be positive, got {','.join(map(str, self.hidden))}")
        if not all(1 <= n <= MAX_SIZE for n in (*self.num_classes, self.in_channels, *self.hw,
                                                 self.in_features or 1, *self.hidden)):
            raise UsageError(f"layer sizes must be whole numbers from 1 to {MAX_SIZE:,} (--hidden "
                             f"{','.join(map(str, self.hidden))}, classes {list(self.num_classes)})")
        if not all(math.isfinite(v) and abs(v) <= FLOAT32_MAX for v in (self.alpha, self.beta)):
            # the units hold float32: a larger value would start the run at inf
            raise UsageError(f"--alpha and --beta must be finite numbers within float32's range (|x| <= 3.4e38), "
                             f"got {self.alpha:g} and {self.beta:g}")
        if self.arch not in ARCHS and self.arch != "custom":
            raise UsageError(f"unknown --arch {self.arch!r}; valid: {', '.join(ARCHS)}")
        if self.network is not None and self.arch != "custom":
            raise UsageError("a whole network of your own (network=module.path:function) goes with arch custom, "
                             "from csnet.fit")
        if self.network is not None and not is_custom(self.network):
            raise UsageError(f"network={self.network!r}: give your network's builder as module.path:function")
        if self.arch == "shared" and not self.share_until:
            raise UsageError("--arch shared needs --share-until STAGE (e.g. pool2 for the convnet)")
        if self.arch in ("shared", "independent") and self.stitch != "none":
            raise UsageError(f"--arch {self.arch} has no units; leave --stitch out")
        if self.arch in ("nddr", "sluice") and self.unit_mode != "channel":
            raise UsageError(f"--unit-mode applies to --arch cross-stitch; {self.arch} mixes per channel")
        if not 1 <= self.subspaces <= MAX_SIZE:
            raise UsageError(f"--subspaces must be at least 1, got {self.subspaces}")
        if self.unit_mode not in MODES:
            raise UsageError(f"unknown --unit-mode {self.unit_mode!r}; valid: {', '.join(MODES)}")
        if self.unit_init not in INITS:
            raise UsageError(f"unknown --unit-init {self.unit_init!r}; valid: {', '.join(INITS)}")
        if self.in_features and self.backbone != "mlp" and not is_custom(self.backbone):
            raise UsageError(f"tables of features need --backbone mlp (or your own), not {self.backbone}")
        if self.stitch == "after-pool" and self.backbone == "mlp":
            raise UsageError("--stitch after-pool does not apply to mlp (no pooling layers); valid: none, after-fc, "
                             "all, or hidden layer names")
        if len(self.tasks) != len(self.num_classes) or len(set(self.tasks)) != len(self.tasks):
            raise UsageError(f"tasks {list(self.tasks)} must be distinct, one per column")
        if self.stitch != "none" and len(self.tasks) < 2 and self.arch != "custom":
            raise UsageError("cross-stitch units need at least two tasks; use --stitch none for one task")

    def _check_tasks(self) -> None:
        n = len(self.tasks)
        if len(self.kinds) not in (0, n) or len(self.target_stats) not in (0, n):
            raise UsageError(f"the model config names {n} tasks but {len(self.kinds)} kinds and "
                             f"{len(self.target_stats)} target statistics")
        stats = []
        for task, size, spec, st in zip(self.tasks, self.num_classes, self.kinds or ("classification",) * n,
                                        self.target_stats or (None,) * n):
            cls = tasks_lib.kind_of(spec) if isinstance(spec, str) else None
            if cls is None:
                raise UsageError(f"task {task}: its kind should be a name, found {spec!r}")
            if cls.dense and self.arch != "custom" and (self.backbone in ("convnet", "mlp") or self.in_features):
                raise UsageError(f"task {task} is per-pixel ({cls.kind}), and --backbone {self.backbone} has no "
                                 "spatial stages to decode it from: use --backbone fcn (or resnet18, vgg11)")
            if st is not None:
                ok = isinstance(st, (list, tuple)) and len(st) == 2 and all(
                    isinstance(v, (list, tuple)) and len(v) == size
                    and all(isinstance(x, (int, float)) and math.isfinite(x) and abs(x) <= FLOAT32_MAX for x in v)
                    for v in st)
                if not ok or min(st[1]) <= 0:
                    raise UsageError(f"task {task}: target statistics should be a finite mean and a positive std "
                                     f"for each of its {size} outputs")
                st = (tuple(float(x) for x in st[0]), tuple(float(x) for x in st[1]))
            stats.append(st)
        if self.target_stats:
            object.__setattr__(self, "target_stats", tuple(stats))

    @property
    def hw(self) -> tuple[int, int]:
        """The input images' (height, width)."""
        return image_hw(self.image_size)

    def input_shape(self) -> tuple[int, ...]:
        """One example's shape: (features,) for tables, (channels, height, width) for images."""
        return (self.in_features,) if self.in_features else (self.in_channels, *self.hw)

    def task_list(self) -> dict[str, tasks_lib.Task]:
        """The tasks as objects that carry their loss and metrics."""
        n = len(self.tasks)
        return {t: tasks_lib.make(t, k, size, st) for t, size, k, st in zip(
            self.tasks, self.num_classes, self.kinds or ("classification",) * n, self.target_stats or (None,) * n)}

    def needs_stats(self) -> bool:
        """A standardized task (regression, depth) whose training statistics are not known yet."""
        return any(t.standardized and t.stats is None for t in self.task_list().values())

    def with_stats(self, stats: dict[str, tuple]) -> "ModelConfig":
        """This config with the training statistics of its standardized tasks filled in."""
        current = self.target_stats or (None,) * len(self.tasks)
        return replace(self, target_stats=tuple(st if st is not None else stats.get(t)
                                                for t, st in zip(self.tasks, current)))

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict, source: str | None = None) -> "ModelConfig":
        return from_dict(cls, d, "model", source)

    def column_arch(self) -> dict:
        """The settings that must agree for two columns to be stitched together."""
        keys = ("backbone", "in_channels", "image_size", "in_features", "batch_norm", "dropout")
        arch = {k: getattr(self, k) for k in keys}
        if self.backbone == "mlp":
            arch["hidden"] = self.hidden
        return arch

    def points(self, column: Column) -> list[str]:
        if self.stitch == "none":
            return []
        if self.stitch == "all":
            return list(column.default_points)
        alias = ALIASES.get(self.backbone, {})
        if self.stitch in alias:
            return list(column.default_points) if alias[self.stitch] is None else alias[self.stitch]
        points = [p.strip() for p in self.stitch.split(",") if p.strip()]
        twice = sorted({p for p in points if points.count(p) > 1})
        if twice:
            raise UsageError(f"--stitch names {', '.join(twice)} more than once")
        unknown = [p for p in points if p not in column.stages]
        if unknown:
            named = ["none", "all", *alias]
            raise UsageError(f"unknown stitch point(s) {', '.join(unknown)} for {self.backbone}; valid: "
                             f"{', '.join(named)}, or stage names {', '.join(column.stages)}")
        return points


def build_column(cfg: ModelConfig, task: tasks_lib.Task, weights: Path | None = None) -> Column:
    """One task's column: the backbone, with the head the task's kind needs."""
    if weights is not None and cfg.backbone not in TORCHVISION:
        raise UsageError(f"--weights applies to torchvision backbones; {cfg.backbone} starts from --from or scratch")
    n = task.size
    if cfg.backbone in ("convnet", "fcn"):
        build = columns_lib.convnet if cfg.backbone == "convnet" else columns_lib.fcn
        column = as_column(build(n, in_channels=cfg.in_channels, image_size=cfg.image_size,
                                 batch_norm=cfg.batch_norm, dropout=cfg.dropout))
    elif cfg.backbone == "mlp":
        column = as_column(columns_lib.mlp(n, in_features=cfg.in_features or cfg.in_channels * cfg.hw[0] * cfg.hw[1],
                                           hidden=cfg.hidden, dropout=cfg.dropout))
    elif cfg.backbone in TORCHVISION:
        column = torchvision_column(cfg.backbone, n, cfg.in_channels, cfg.image_size, weights)
    else:
        column = custom_column(cfg.backbone, n, cfg.in_channels, cfg.image_size)
    return fit_head(column, task)


def fit_head(column: Column, task: tasks_lib.Task) -> Column:
    """Give a column the head its task needs: a DenseHead for a per-pixel task (on a column with a
    spatial ``skip`` stage; a column without one keeps its own head, which must then be dense),
    and the task's output layer (Destandardize) at the end."""
    if task.dense and column.skip is not None:
        last = list(column.stages)[-1]
        column.head = DenseHead(column.channels[last], column.channels[column.skip], task.size)
        column.taps = (column.skip, "input")
    layer = task.output_layer()
    if layer is not None:
        if isinstance(column.head, DenseHead):
            column.head.output = layer
        elif isinstance(column.head, nn.Sequential):
            column.head.append(layer)  # keeps the head's own parameter names
        else:
            column.head = nn.Sequential(column.head, layer)
    return column


class InputNorm(nn.Module):
    """``(x - mean) / std``: the inputs z-scored with the training split's statistics, kept as buffers so a
    checkpoint carries them and nothing beside the weights is needed to run the network (timm keeps a
    model's input statistics with the model for the same reason). One value for gray images, one per
    channel (C, 1, 1) for colour, one per feature (F,) for tables; the identity until ``set``.

    A loaded state dict brings its own shape; a state dict without these buffers (csnet runs written
    before they existed, which kept the statistics beside the weights) leaves them as they are, for the
    caller to set."""

    def __init__(self):
        super().__init__()
        self.register_buffer("mean", torch.zeros(()))
        self.register_buffer("std", torch.ones(()))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean) / self.std

    @torch.no_grad()
    def set(self, mean, std) -> "InputNorm":
        device = self.mean.device
        self.mean = torch.as_tensor(mean, dtype=torch.float32).clone().to(device)
        self.std = torch.as_tensor(std, dtype=torch.float32).clone().to(device)
        return self

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        for name in ("mean", "std"):
            value = state_dict.get(prefix + name)
            if isinstance(value, torch.Tensor):
                setattr(self, name, torch.empty_like(value, dtype=torch.float32, device=self.mean.device))
        found = [prefix + n for n in ("mean", "std") if prefix + n in state_dict]
        if found:
            super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                          error_msgs)


class CrossStitchNet(nn.Module):
    """Columns that all see the same input, mixed by a unit after each stage named in ``points``.

    ``forward(x)`` returns ``{task: output of that column's own head}``; ``features(x)``
    ``{task: tensor after the last stage}`` (what each head receives).
    """

    def __init__(self, columns: dict[str, Column], points: list[str], alpha: float = 0.9, beta: float = 0.1,
                 mode: str = "channel", init: str = "alpha-beta", mixer: str = "cross-stitch", subspaces: int = 2):
        super().__init__()
        self.columns = nn.ModuleDict(columns)
        first_task, first = next(iter(columns.items()))
        self.stage_names = list(first.stages)
        for task, column in columns.items():
            if list(column.stages) != self.stage_names:
                raise UsageError(f"column {task!r} has stages {list(column.stages)}, "
                                 f"column {first_task!r} has {self.stage_names}")
        unknown = [p for p in points if p not in self.stage_names]
        if unknown:
            raise UsageError(f"unknown stitch point(s) {', '.join(unknown)}; valid: {', '.join(self.stage_names)}")
        if mixer not in MIXERS:
            raise UsageError(f"unknown mixer {mixer!r}; valid: {', '.join(MIXERS)}")
        units = {}
        for p in points:
            widths = {t: c.channels.get(p) for t, c in columns.items()}
            if mode == "channel" and None in widths.values():
                raise UsageError(f"cannot tell how many channels stage {p} outputs (it has no conv, linear or "
                                 "norm layer of its own); stitch after a stage that has one"
                                 + (", or use --unit-mode layer or dense" if mixer == "cross-stitch" else ""))
            if mode == "channel" and len(set(widths.values())) > 1:
                raise UsageError(f"columns differ at stitch point {p}: channels {widths}"
                                 + (f" ({mixer} needs the same width in every column)" if mixer != "cross-stitch"
                                    else ""))
            if mixer == "sluice" and widths[first_task] % subspaces:
                raise UsageError(f"--subspaces {subspaces} does not divide the {widths[first_task]} channels of stitch "
                                 f"point {p}")
            units[p] = MIXERS[mixer](len(columns), widths[first_task], mode, alpha, beta, init, subspaces)
        self.input_norm = InputNorm()
        self.units = nn.ModuleDict(units)
        self.mixer = mixer
        # sluice's layer-skip weights, over the mixed layers and the last stage (Ruder et al.'s beta)
        self.readout = SluiceReadout(len(columns), list(dict.fromkeys([*points, self.stage_names[-1]]))) \
            if mixer == "sluice" and points else None

    @property
    def tasks(self) -> list[str]:
        return list(self.columns)

    def _stages(self, x: torch.Tensor):
        """Every column's output after the last stage, and the (mixed) stage outputs their heads tap."""
        x = self.input_norm(x)
        cols = list(self.columns.values())
        taps = {t for col in cols for t in col.taps}
        if self.readout is not None:
            taps |= set(self.readout.layers)
        xs = [x] * len(cols)
        kept = [{"input": x} for _ in cols]
        for name in self.stage_names:
            xs = [col.stages[name](xi) for col, xi in zip(cols, xs)]
            if name in self.units:
                xs = self.units[name](xs)
            if name in taps:
                for k, h in enumerate(xs):
                    kept[k][name] = h
        if self.readout is not None:
            xs = [self.readout(k, kept[k]) for k in range(len(cols))]
        return xs, kept

    def features(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        return dict(zip(self.columns, self._stages(x)[0]))

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        xs, kept = self._stages(x)
        out = {}
        for task, h, k in zip(self.columns, xs, kept):
            head, taps = self.columns[task].head, self.columns[task].taps
            out[task] = head(h, *[k[t] for t in taps]) if taps else head(h)
        return out

    def unit_parameters(self) -> list[nn.Parameter]:
        """The mixing parameters (units, NDDR layers, sluice's alpha and beta): their own learning-rate group."""
        return list(self.units.parameters()) + (list(self.readout.parameters()) if self.readout is not None else [])

    def shared_parameters(self) -> list[nn.Parameter]:
        """The last mixed layer: every column's stage at the last stitch point, which every task's loss
        reaches through that point's unit (what GradNorm measures gradients at); none without units."""
        if not self.units:
            return []
        last = list(self.units)[-1]
        return [p for col in self.columns.values() for p in col.stages[last].parameters() if p.requires_grad]

    def materialize(self, example: torch.Tensor) -> "CrossStitchNet":
        """Size lazy (dense) units with one forward pass; needed before an optimizer is built."""
        if any(isinstance(p, nn.parameter.UninitializedParameter) for p in self.unit_parameters()):
            was_training = self.training
            with torch.no_grad():
                self.eval()(example)
            self.train(was_training)
        return self


def count_macs(net: nn.Module, example: torch.Tensor) -> int:
    """Multiply-adds per example of one forward pass: convolutions, linear layers and units
    (the rest, such as norms and pooling, is a few percent and left out)."""
    total = 0

    def hook(module, inputs, output):
        nonlocal total
        if isinstance(module, nn.Conv2d):
            total += output.numel() * module.in_channels // module.groups * math.prod(module.kernel_size)
        elif isinstance(module, nn.Linear):
            total += output.numel() * module.in_features
        elif isinstance(module, CrossStitchUnit):
            per_task = output[0].numel()
            total += module.n_tasks * per_task * (module.n_tasks * per_task if module.mode == "dense" else module.n_tasks)
        elif hasattr(module, "macs"):  # other mixers say what they cost
            total += module.macs(output)

    handles = [m.register_forward_hook(hook) for m in net.modules()
               if isinstance(m, (nn.Conv2d, nn.Linear, CrossStitchUnit, NDDRLayer, SluiceUnit))]
    was_training = net.training
    try:
        with torch.no_grad():
            net.eval()(example[:1])
    finally:
        net.train(was_training)
        for h in handles:
            h.remove()
    return total


def stitch(columns: dict[str, nn.Module], *, mode: str = "channel", alpha: float = 0.9, beta: float = 0.1,
           init: str = "alpha-beta", points: list[str] | None = None, mixer: str = "cross-stitch",
           subspaces: int = 2) -> CrossStitchNet:
    """Stitch one network per task into a cross-stitch network (``mixer="nddr"`` or ``"sluice"``: NDDR
    layers or sluice units at the same points instead of cross-stitch units).

    ``columns`` may be csnet columns, torchvision ResNets or VGGs, ``nn.Sequential``s, or
    any module whose forward applies its top-level children in order (the last one the
    head). Units go after each column's default points (ResNet: layer1..layer4; VGG:
    every max-pool) unless ``points`` names the stages. With ``alpha=1, beta=0`` (or
    ``init="identity"``) each output equals its column's own output bit for bit.
    In ``dense`` mode, run one forward pass (or ``materialize(example)``) before
    building an optimizer: the matrix is sized by the first input.
    """
    if len(columns) < 2:
        raise UsageError("stitch needs at least two columns")
    cols = {task: as_column(m) for task, m in columns.items()}
    chosen = list(points) if points is not None else next(iter(cols.values())).default_points
    return CrossStitchNet(cols, chosen, alpha, beta, mode, init, mixer, subspaces)


class SharedNet(nn.Module):
    """Hard parameter sharing, the paper's "split" baselines (section 4): the first column's stages
    up to and including ``share_until`` form one trunk all tasks use; each task keeps its own
    later stages and head. ``forward(x)`` returns ``{task: logits}`` like the cross-stitch network."""

    def __init__(self, columns: dict[str, Column], share_until: str):
        super().__init__()
        first = next(iter(columns.values()))
        names = list(first.stages)
        if share_until not in names:
            raise UsageError(f"unknown --share-until {share_until!r}; valid: {', '.join(names)}")
        k = names.index(share_until) + 1
        self.trunk = nn.ModuleDict({n: first.stages[n] for n in names[:k]})
        self.branches = nn.ModuleDict({t: nn.ModuleDict({n: c.stages[n] for n in names[k:]}) for t, c in columns.items()})
        self.heads = nn.ModuleDict({t: c.head for t, c in columns.items()})
        self.taps = {t: c.taps for t, c in columns.items()}
        self.input_norm = InputNorm()
        self.units = nn.ModuleDict()  # none: nothing to mix

    @property
    def tasks(self) -> list[str]:
        return list(self.heads)

    def _stages(self, x: torch.Tensor):
        x = self.input_norm(x)
        kept = {"input": x}
        for name, stage in self.trunk.items():
            x = stage(x)
            kept[name] = x
        out, taps = {}, {}
        for task, branch in self.branches.items():
            h, mine = x, dict(kept)
            for name, stage in branch.items():
                h = stage(h)
                mine[name] = h
            out[task], taps[task] = h, [mine[t] for t in self.taps[task]]
        return out, taps

    def features(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        return self._stages(x)[0]

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        out, taps = self._stages(x)
        return {task: self.heads[task](h, *taps[task]) for task, h in out.items()}

    def unit_parameters(self) -> list[nn.Parameter]:
        return []

    def shared_parameters(self) -> list[nn.Parameter]:
        """The last shared stage of the trunk."""
        return [p for p in list(self.trunk.values())[-1].parameters() if p.requires_grad]


class Network(nn.Module):
    """A network of your own whose forward returns {task: tensor}, as csnet's training loop takes it: without
    units (a CrossStitchNet from ``stitch`` has its own and needs no wrapping)."""

    def __init__(self, net: nn.Module):
        super().__init__()
        self.net = net
        self.input_norm = InputNorm()
        self.units = nn.ModuleDict()

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        return self.net(self.input_norm(x))

    def unit_parameters(self) -> list[nn.Parameter]:
        return []

    def shared_parameters(self) -> list[nn.Parameter]:
        """GradNorm's shared layer is unknown in a network csnet did not build: every trainable weight."""
        return [p for p in self.net.parameters() if p.requires_grad]


def as_network(net: nn.Module) -> nn.Module:
    """``net`` as the training loop takes it: csnet's networks as they are, any other module wrapped."""
    return net if all(hasattr(net, a) for a in ("unit_parameters", "units", "input_norm")) else Network(net)


def _custom_network(cfg: ModelConfig) -> nn.Module:
    from csnet.usercode import load_function

    if cfg.network is None:
        raise UsageError("this network was trained from Python (csnet.fit) without network='module.path:function' "
                         "naming a function that builds it, so csnet cannot rebuild it; evaluate it in Python, or "
                         "pass network= to csnet.fit")
    try:
        net = load_function(cfg.network, "--backbone")()
    except UsageError:
        raise
    except Exception as e:  # the user's code
        raise UsageError(f"--backbone {cfg.network}: {cfg.network.partition(':')[2]}() raised "
                         f"{type(e).__name__}: {e}") from e
    if not isinstance(net, nn.Module):
        raise UsageError(f"--backbone {cfg.network}: the function must return the network (an nn.Module), "
                         f"it returned {type(net).__name__}")
    return as_network(net)


def build_network(cfg: ModelConfig, weights: Path | None = None) -> CrossStitchNet | SharedNet:
    tasks = cfg.task_list()
    if cfg.arch == "custom":
        net = _custom_network(cfg)
        check_outputs(net, tasks, torch.zeros(2, *cfg.input_shape()))
        return net
    columns = {name: build_column(cfg, task, weights) for name, task in tasks.items()}
    if cfg.arch == "shared":
        net = SharedNet(columns, cfg.share_until)
    else:
        net = CrossStitchNet(columns, cfg.points(next(iter(columns.values()))), cfg.alpha, cfg.beta, cfg.unit_mode,
                             cfg.unit_init, cfg.arch if cfg.arch in MIXERS else "cross-stitch", cfg.subspaces)
    example = torch.zeros(2, *cfg.input_shape())
    if cfg.arch != "shared":
        net.materialize(example)
    if any(t.dense for t in tasks.values()) or is_custom(cfg.backbone):
        check_outputs(net, tasks, example)
    return net


def check_outputs(net: nn.Module, tasks: dict, example: torch.Tensor) -> None:
    """Each head's output has its task's shape: (N, outputs), or (N, outputs, H, W) at the input's size for a
    per-pixel task. Checked once, on a two-example batch, so a wrong head fails before any data is read."""
    was_training = net.training
    try:
        with torch.no_grad():
            out = net.eval()(example)
    except RuntimeError as e:
        raise UsageError(f"the network fails on a {'x'.join(map(str, example.shape[1:]))} input: "
                         f"{str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__}") from e
    finally:
        net.train(was_training)
    if not isinstance(out, dict):
        raise UsageError(f"the network's forward must return {{task: output}}, it returned {type(out).__name__}")
    missing = [name for name in tasks if not isinstance(out.get(name), torch.Tensor)]
    if missing:
        raise UsageError(f"the network returns no output for task {missing[0]} (it returns: "
                         f"{', '.join(map(str, out)) or 'nothing'})")
    n = example.shape[0]
    for name, task in tasks.items():
        want = (n, task.size, *example.shape[-2:]) if task.dense else (n, task.size)
        got = tuple(out[name].shape)
        if got != want:
            raise UsageError(f"task {name} ({task.kind}): its head outputs {got}, it should output {want}"
                             + (" (per pixel, at the input's size)" if task.dense else ""))
