"""Single-task columns cut into named stages, so cross-stitch units can go between them.

``convnet`` is the Fashion-MNIST column of a public TensorFlow reproduction of the paper
(conv3x3 32 -> pool -> conv3x3 64 -> pool -> fc 1024 -> output, batch norm, dropout
with keep probability 0.8, He init). ``mlp`` is the column of the two-domain
notebook ([60, 20] hidden units, then the output layer). ``fcn`` is the convnet made
fully convolutional (a third conv block in place of the fc layer), so every stage keeps
its spatial layout and per-pixel tasks can be decoded from it with ``DenseHead``.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from csnet.config import image_hw


class Column(nn.Module):
    """A network for one task: ``stages`` run in order, then ``head`` maps the last one to the output.

    ``channels[name]`` is the number of channels (conv) or features (fc) a stage
    outputs: what a cross-stitch unit placed after it has to mix. ``taps`` names what
    the head takes besides the last stage's output: earlier stages' outputs, or
    ``"input"`` (a dense head's skip connection and output size); usually nothing.
    ``skip`` is the stage a dense decoder fuses (None: the column has no spatial stages).
    """

    def __init__(self, stages: dict[str, nn.Module], head: nn.Module, channels: dict[str, int],
                 skip: str | None = None):
        super().__init__()
        self.stages = nn.ModuleDict(stages)
        self.head = head
        self.channels = dict(channels)
        self.skip = skip
        self.taps: tuple[str, ...] = ()

    def forward(self, x):
        kept = {"input": x}
        for name, stage in self.stages.items():
            x = stage(x)
            kept[name] = x
        return self.head(x, *[kept[t] for t in self.taps])


class DenseHead(nn.Module):
    """A per-pixel head in the manner of FCN (Long, Shelhamer and Darrell, CVPR 2015): the last stage,
    reduced by a 1x1 conv, upsampled to the skip stage's resolution and added to it (also through a
    1x1 conv), one 3x3 conv, a 1x1 conv to the task's outputs, then bilinear upsampling to the
    input's size. Units stay after the column's stages; this only reads their outputs."""

    def __init__(self, channels: int, skip_channels: int, out: int, width: int = 32):
        super().__init__()
        self.reduce = nn.Sequential(nn.Conv2d(channels, width, 1, bias=False), nn.BatchNorm2d(width))
        self.lateral = nn.Sequential(nn.Conv2d(skip_channels, width, 1, bias=False), nn.BatchNorm2d(width))
        self.fuse = nn.Sequential(nn.ReLU(), nn.Conv2d(width, width, 3, padding=1, bias=False),
                                  nn.BatchNorm2d(width), nn.ReLU())
        self.classify = nn.Conv2d(width, out, 1)
        self.output: nn.Module = nn.Identity()  # a task's Destandardize, when it has one

    def forward(self, h, skip, x):
        y = F.interpolate(self.reduce(h), size=skip.shape[-2:], mode="bilinear", align_corners=False)
        y = self.classify(self.fuse(y + self.lateral(skip)))
        return self.output(F.interpolate(y, size=x.shape[-2:], mode="bilinear", align_corners=False))


# SplitMix64 (Steele, Lea and Flood, OOPSLA 2014) as signed 64-bit constants: torch's int64 ops wrap
# around like unsigned 64-bit arithmetic, so the same bits come out on every device.
_GOLDEN, _MIX1, _MIX2 = (c - 2 ** 64 for c in (0x9E3779B97F4A7C15, 0xBF58476D1CE4E5B9, 0x94D049BB133111EB))


def _shift_right(z: torch.Tensor, k: int) -> torch.Tensor:
    """A logical right shift of int64 bits (torch's >> is arithmetic: it copies the sign bit)."""
    return (z >> k) & ((1 << (64 - k)) - 1)


def hashed_keep(shape, p: float, seed: int | torch.Tensor, device=None) -> torch.Tensor:
    """Dropout's keep mask for ``seed`` (an int64 number or 0-d tensor): element i (in row-major
    order) is kept when the top 24 bits of SplitMix64(seed + (i + 1) * golden ratio) are at least
    p * 2^24, so each is kept with probability 1 - p (to 2^-24). A hash of the index rather than a
    draw per element: the mask is the same on every device and thread count."""
    n = math.prod(shape)
    z = torch.arange(1, n + 1, dtype=torch.int64, device=device) * _GOLDEN + seed
    z = (z ^ _shift_right(z, 30)) * _MIX1
    z = (z ^ _shift_right(z, 27)) * _MIX2
    bits = _shift_right(z ^ _shift_right(z, 31), 40)
    return (bits >= round(p * 2 ** 24)).view(shape)


@torch.library.custom_op("csnet::hashed_keep", mutates_args=())
def _keep(x: torch.Tensor, p: float, seed: torch.Tensor) -> torch.Tensor:
    """``hashed_keep`` for x's shape and device as one opaque op, for compiled graphs. Why: torch.compile
    (inductor) treats ``arange * constant`` as index arithmetic, which it assumes never overflows,
    and so computed other masks than eager mode for most seeds, or failed to compile; an opaque
    op keeps eager and compiled runs on the same bits. The seed is a tensor so that a new seed is
    new data, not a new constant to recompile for (``dynamic=False``, CUDA graphs)."""
    return hashed_keep(x.shape, p, seed, x.device)


@_keep.register_fake
def _(x, p, seed):
    return x.new_empty(x.shape, dtype=torch.bool)  # row-major, whatever x's layout


@torch.compiler.disable  # drawn by torch's generator in compiled runs too (inductor has its own)
def dropout_seed() -> torch.Tensor:
    """A signed 64-bit seed (0-d CPU tensor) from torch's default generator, so that torch.manual_seed
    fixes the masks."""
    return torch.randint(-(2 ** 63), 2 ** 63 - 1, (), dtype=torch.int64)


class Dropout(nn.Dropout):
    """``nn.Dropout`` (the same probability, scaling, evaluation pass and state) whose mask is
    ``hashed_keep`` of a seed drawn from torch's generator instead of ``bernoulli_``. Why: the mask
    is the same on the CPU and on CUDA, at any thread count, and it is faster on the CPU: for the
    Fashion column's (128, 1024) activations, forward and backward took 0.37 ms against
    ``nn.Dropout``'s 0.76 (2 cores)."""

    def forward(self, x):
        if not self.training or self.p == 0:
            return x
        if self.p == 1:
            return x * 0.0
        seed = dropout_seed()
        if torch.compiler.is_compiling():
            keep = torch.ops.csnet.hashed_keep(x.detach(), self.p, seed)
        else:  # the same function without the op's dispatch (about 20 us a call)
            keep = hashed_keep(x.shape, self.p, seed, x.device)
        return x * keep.to(x.dtype) * (1.0 / (1.0 - self.p))


def _he_init(column: Column) -> None:
    """He init (fan-in, ReLU gain) for every layer that feeds a ReLU; Glorot for the output layer,
    which feeds a softmax: with He's gain there, first logits are large and early steps are wasted."""
    for m in column.stages.modules():
        if isinstance(m, (nn.Conv2d, nn.Linear)):
            nn.init.kaiming_normal_(m.weight, nonlinearity="relu")
            if m.bias is not None:
                nn.init.zeros_(m.bias)
    for m in column.head.modules():
        if isinstance(m, nn.Linear):
            nn.init.xavier_uniform_(m.weight)
            nn.init.zeros_(m.bias)


def _conv_block(c_in: int, c_out: int, batch_norm: bool) -> nn.Sequential:
    layers = [nn.Conv2d(c_in, c_out, 3, padding=1, bias=not batch_norm)]
    if batch_norm:
        layers.append(nn.BatchNorm2d(c_out))
    # Pool before ReLU: max-pooling commutes with the (monotone) ReLU, so the output is the same
    # and the ReLU touches a quarter of the values; on the CPU this was the stage's costliest part.
    layers += [nn.MaxPool2d(2), nn.ReLU(inplace=True)]
    return nn.Sequential(*layers)


def convnet(
    num_classes: int,
    *,
    in_channels: int = 1,
    image_size: int | tuple[int, int] = 28,
    batch_norm: bool = True,
    dropout: float = 0.2,
    widths: tuple[int, int] = (32, 64),
    fc_width: int = 1024,
) -> Column:
    """Stages ``pool1``, ``pool2`` and ``fc``: the three places the reproduction stitches."""

    h, w = image_hw(image_size)
    column = Column(
        stages={
            "pool1": _conv_block(in_channels, widths[0], batch_norm),
            "pool2": _conv_block(widths[0], widths[1], batch_norm),
            "fc": nn.Sequential(nn.Flatten(), nn.Linear(widths[1] * (h // 4) * (w // 4), fc_width), nn.ReLU(inplace=True)),
        },
        head=nn.Sequential(Dropout(dropout), nn.Linear(fc_width, num_classes)),
        channels={"pool1": widths[0], "pool2": widths[1], "fc": fc_width},
    )
    _he_init(column)
    return column


def fcn(
    num_classes: int,
    *,
    in_channels: int = 1,
    image_size: int | tuple[int, int] = 64,
    batch_norm: bool = True,
    dropout: float = 0.2,
    widths: tuple[int, int, int] = (32, 64, 128),
) -> Column:
    """Stages ``pool1``, ``pool2``, ``pool3``: the convnet's conv blocks with a third in place of its fc
    layer. A vector head pools globally (as ResNet's does); a dense head fuses ``pool1``."""
    blocks, c_in = {}, in_channels
    for k, width in enumerate(widths, start=1):
        blocks[f"pool{k}"] = _conv_block(c_in, width, batch_norm)
        c_in = width
    column = Column(
        stages=blocks,
        head=nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(1), Dropout(dropout), nn.Linear(c_in, num_classes)),
        channels={f"pool{k}": w for k, w in enumerate(widths, start=1)},
        skip="pool1",
    )
    _he_init(column)
    return column


def mlp(
    num_classes: int,
    *,
    in_features: int = 784,
    hidden: tuple[int, ...] = (60, 20),
    dropout: float = 0.0,
) -> Column:
    """Stages ``hidden1``, ``hidden2``, ...: one per hidden layer (Linear -> ReLU)."""
    stages, channels = {}, {}
    width = in_features
    for k, h in enumerate(hidden, start=1):
        layers = [nn.Flatten()] if k == 1 else []
        layers += [nn.Linear(width, h), nn.ReLU(inplace=True)]
        stages[f"hidden{k}"] = nn.Sequential(*layers)
        channels[f"hidden{k}"] = h
        width = h
    column = Column(stages, nn.Sequential(Dropout(dropout), nn.Linear(width, num_classes)), channels)
    _he_init(column)
    return column
