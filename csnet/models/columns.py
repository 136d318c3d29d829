"""Single-task columns cut into named stages, so cross-stitch units can go between them.

``convnet`` is the Fashion-MNIST column of the TensorFlow reproduction in CONTEXT.md
(conv3x3 32 -> pool -> conv3x3 64 -> pool -> fc 1024 -> output, batch norm, dropout
with keep probability 0.8, He init). ``mlp`` is the column of the two-domain
notebook ([60, 20] hidden units, then the output layer).
"""

from __future__ import annotations

from torch import nn


class Column(nn.Module):
    """A network for one task: ``stages`` run in order, then ``head`` maps the last one to logits.

    ``channels[name]`` is the number of channels (conv) or features (fc) a stage
    outputs: what a cross-stitch unit placed after it has to mix.
    """

    def __init__(self, stages: dict[str, nn.Module], head: nn.Module, channels: dict[str, int]):
        super().__init__()
        self.stages = nn.ModuleDict(stages)
        self.head = head
        self.channels = dict(channels)

    def forward(self, x):
        for stage in self.stages.values():
            x = stage(x)
        return self.head(x)


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


def convnet(
    num_classes: int,
    *,
    in_channels: int = 1,
    image_size: int = 28,
    batch_norm: bool = True,
    dropout: float = 0.2,
    widths: tuple[int, int] = (32, 64),
    fc_width: int = 1024,
) -> Column:
    """Stages ``pool1``, ``pool2`` and ``fc``: the three places the reproduction stitches."""

    def conv_block(c_in: int, c_out: int) -> nn.Sequential:
        layers = [nn.Conv2d(c_in, c_out, 3, padding=1, bias=not batch_norm)]
        if batch_norm:
            layers.append(nn.BatchNorm2d(c_out))
        # Pool before ReLU: max-pooling commutes with the (monotone) ReLU, so the output is the same
        # and the ReLU touches a quarter of the values; on the CPU this was the stage's costliest part.
        layers += [nn.MaxPool2d(2), nn.ReLU(inplace=True)]
        return nn.Sequential(*layers)

    side = image_size // 4
    column = Column(
        stages={
            "pool1": conv_block(in_channels, widths[0]),
            "pool2": conv_block(widths[0], widths[1]),
            "fc": nn.Sequential(nn.Flatten(), nn.Linear(widths[1] * side * side, fc_width), nn.ReLU(inplace=True)),
        },
        head=nn.Sequential(nn.Dropout(dropout), nn.Linear(fc_width, num_classes)),
        channels={"pool1": widths[0], "pool2": widths[1], "fc": fc_width},
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
    column = Column(stages, nn.Sequential(nn.Dropout(dropout), nn.Linear(width, num_classes)), channels)
    _he_init(column)
    return column
