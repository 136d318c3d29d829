"""Any backbone as a column: a module cut into named stages, between which units can go.

- torchvision ResNets: the stem (conv1, bn1, relu, maxpool) is one stage that runs per
  column, then ``layer1``..``layer4`` (the units' default places, as in the PyTorch
  notebook that stitches resnet18s); the head is the column's own avgpool -> flatten -> fc.
- torchvision VGGs: ``features`` cut after each max-pool (``pool1``..``pool5``); the head
  is avgpool -> flatten -> classifier.
- torchvision FCN / DeepLabV3 segmentation models: the ResNet stages, then the classifier
  upsampled to the input's size (a dense column).
- ``nn.Sequential`` and a user's own module: its top-level children in order, the last
  one the head. The module's forward must be exactly that sequence (like nn.Sequential).

Stages share their modules with the original network (no copies), so a column
computes what the module computes, bit for bit.
"""

from __future__ import annotations

import inspect
from pathlib import Path

import torch
import torch.nn.functional as F
import torchvision
from torch import nn

from csnet.errors import CsnetError, UsageError
from csnet.config import TORCHVISION_BACKBONES, image_hw
from csnet.usercode import load_function
from csnet.models.columns import Column

TORCHVISION = {name: getattr(torchvision.models, name) for name in TORCHVISION_BACKBONES}


class RepeatChannels(nn.Module):
    """Feed one-channel images to a network built for RGB by repeating the channel.

    Chosen over adapting the first conv so ImageNet weights load unchanged.
    """

    def __init__(self, channels: int = 3):
        super().__init__()
        self.channels = channels

    def forward(self, x):
        return x.expand(-1, self.channels, -1, -1) if x.shape[1] == 1 else x


def _out_channels(modules) -> int | None:
    """Channels (conv) or features (linear) of what the last parameterised layer among ``modules`` outputs."""
    for m in reversed(list(modules)):
        for attr in ("out_channels", "out_features", "num_features"):
            if isinstance(getattr(m, attr, None), int):
                return getattr(m, attr)
    return None


def _channels(stages: dict[str, nn.Module]) -> dict[str, int]:
    """Output width of each stage that has a conv, linear or norm layer of its own. A stage without
    one (a Flatten, a lone ReLU) is left out: its input's width says nothing about its output's."""
    channels = {}
    for name, stage in stages.items():
        found = _out_channels(stage.modules())
        if found is not None:
            channels[name] = found
    return channels


def _column(stages: dict[str, nn.Module], head: nn.Module, points: list[str], skip: str | None = None) -> Column:
    column = Column(stages, head, _channels(stages), skip)
    column.default_points = list(points)
    return column


def resnet_column(model: torchvision.models.ResNet, adapter: nn.Module | None = None) -> Column:
    stem = [adapter] if adapter is not None else []
    stages = {"stem": nn.Sequential(*stem, model.conv1, model.bn1, model.relu, model.maxpool)}
    stages.update({f"layer{k}": getattr(model, f"layer{k}") for k in range(1, 5)})
    # a dense head fuses layer1 (a quarter of the input's size), as FCN fuses an early stage
    return _column(stages, nn.Sequential(model.avgpool, nn.Flatten(1), model.fc), ["layer1", "layer2", "layer3", "layer4"],
                   skip="layer1")


def vgg_column(model: torchvision.models.VGG, adapter: nn.Module | None = None) -> Column:
    stages, current = {}, [adapter] if adapter is not None else []
    for layer in model.features:
        current.append(layer)
        if isinstance(layer, nn.MaxPool2d):
            stages[f"pool{len(stages) + 1}"] = nn.Sequential(*current)
            current = []
    if current:  # layers after the last pool belong to the last stage
        stages[list(stages)[-1]] = nn.Sequential(*stages[list(stages)[-1]], *current)
    return _column(stages, nn.Sequential(model.avgpool, nn.Flatten(1), model.classifier), list(stages),
                   skip="pool2" if "pool2" in stages else None)


class ToInputSize(nn.Module):
    """A segmentation model's classifier followed by bilinear upsampling to the input's size, as
    torchvision's FCN and DeepLabV3 do in their forward."""

    def __init__(self, classifier: nn.Module):
        super().__init__()
        self.classifier = classifier

    def forward(self, h, x):
        return F.interpolate(self.classifier(h), size=x.shape[-2:], mode="bilinear", align_corners=False)


SEGMENTATION_MODELS = (torchvision.models.segmentation.FCN, torchvision.models.segmentation.DeepLabV3)


def segmentation_column(model: nn.Module) -> Column:
    """torchvision's FCN or DeepLabV3 (a ResNet backbone): stem, layer1..layer4, then the classifier at
    the input's size. Its auxiliary classifier, if any, is left out: a column has one output."""
    parts = dict(model.backbone.named_children())
    stages = {"stem": nn.Sequential(parts["conv1"], parts["bn1"], parts["relu"], parts["maxpool"])}
    stages.update({f"layer{k}": parts[f"layer{k}"] for k in range(1, 5) if f"layer{k}" in parts})
    column = _column(stages, ToInputSize(model.classifier), [n for n in stages if n != "stem"])
    column.taps = ("input",)
    return column


def sequential_column(module: nn.Module, points: list[str] | None = None) -> Column:
    children = dict(module.named_children())
    if len(children) < 2:
        raise UsageError(f"{type(module).__name__} has {len(children)} child modules; a column needs stages and a head")
    names = list(children)
    stages = {n: children[n] for n in names[:-1]}
    column = _column(stages, children[names[-1]], [])
    # by default, after every stage whose width is known (a Flatten first has none)
    column.default_points = points if points is not None else [n for n in stages if n in column.channels]
    return column


def as_column(module: nn.Module, points: list[str] | None = None) -> Column:
    """Cut a network into stages: csnet columns as they are, torchvision ResNet/VGG by their
    structure, anything else by its top-level children (the last one the head)."""
    if isinstance(module, Column):
        column = module
    elif isinstance(module, torchvision.models.ResNet):
        column = resnet_column(module)
    elif isinstance(module, torchvision.models.VGG):
        column = vgg_column(module)
    elif isinstance(module, SEGMENTATION_MODELS):
        column = segmentation_column(module)
    else:
        column = sequential_column(module, points)
    if points is not None:
        unknown = [p for p in points if p not in column.stages]
        if unknown:
            raise UsageError(f"unknown stitch point(s) {', '.join(unknown)}; valid: {', '.join(column.stages)}")
        column.default_points = list(points)
    if not hasattr(column, "default_points"):
        column.default_points = list(column.stages)
    return column


def torchvision_column(name: str, num_classes: int, in_channels: int, image_size: int | tuple[int, int],
                       weights: Path | None = None) -> Column:
    """A torchvision network as a column; one-channel images repeat their channel to three.
    VGG's five pools need at least 32 pixels, so smaller images (Fashion-MNIST's 28) are
    zero-padded to 32 (zero is the mean after z-scoring)."""
    model = TORCHVISION[name](weights=None, num_classes=num_classes)
    if weights is not None:
        load_weights(model, weights)
    adapters = []
    if in_channels == 1:
        adapters.append(RepeatChannels(3))
    h, w = image_hw(image_size)
    if name.startswith("vgg") and min(h, w) < 32:
        ph, pw = max(0, 32 - h), max(0, 32 - w)
        adapters.append(nn.ZeroPad2d((pw // 2, pw - pw // 2, ph // 2, ph - ph // 2)))
    adapter = nn.Sequential(*adapters) if adapters else None
    return resnet_column(model, adapter) if name.startswith("resnet") else vgg_column(model, adapter)


def load_weights(model: nn.Module, path: Path) -> list[str]:
    """Load a local state dict (torch.load weights_only=True) into ``model``; tensors whose shape
    differs (an ImageNet head of 1000 classes) are skipped and named in the return value."""
    path = Path(path)
    if not path.is_file():
        raise CsnetError(f"--weights {path}: file not found")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise CsnetError(f"--weights {path}: refused or unreadable as plain weights ({type(e).__name__})") from e
    if isinstance(state, dict) and "model" in state and isinstance(state["model"], dict):
        state = state["model"]
    if not isinstance(state, dict):
        raise CsnetError(f"--weights {path}: not a state dict")
    own = model.state_dict()
    usable = {k: v for k, v in state.items() if k in own and own[k].shape == v.shape}
    if not usable:
        raise CsnetError(f"--weights {path}: no tensor matches {type(model).__name__} (wrong architecture?)")
    model.load_state_dict(usable, strict=False)
    return sorted(set(own) - set(usable))


def custom_column(spec: str, num_classes: int, in_channels: int, image_size: int | tuple[int, int]) -> Column:
    """``package.module:function`` returning (nn.Module, [stitch point names]).

    The function is called with ``num_classes`` and, if it accepts them, ``in_channels``
    and ``image_size`` (an int S for S x S images, a tuple (H, W) otherwise). The current folder is
    importable, like ``python -m``. Only call this
    for a spec the user named on the command line (or in Python): it imports and runs code.
    """
    factory = load_function(spec, "--backbone")
    try:
        params = inspect.signature(factory).parameters
    except (TypeError, ValueError):  # a builtin without a signature: pass num_classes only
        params = {}
    kwargs = {"num_classes": num_classes}
    for key, value in (("in_channels", in_channels), ("image_size", image_size)):
        if key in params:
            kwargs[key] = value
    try:
        result = factory(**kwargs)
    except Exception as e:
        raise UsageError(f"--backbone {spec}: {spec.partition(':')[2]}({', '.join(f'{k}={v}' for k, v in kwargs.items())}) "
                         f"raised {type(e).__name__}: {e}") from e
    if not (isinstance(result, tuple) and len(result) == 2 and isinstance(result[0], nn.Module)
            and isinstance(result[1], (list, tuple)) and all(isinstance(p, str) for p in result[1])):
        raise UsageError(f"--backbone {spec}: the function must return (nn.Module, [stitch point names]), "
                         f"it returned {type(result).__name__}")
    module, points = result
    return as_column(module, list(points))
