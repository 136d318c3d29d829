"""csnet's CPU acceleration, kept apart from the models: ``accelerate(net)`` swaps faster modules
in where their conditions hold and says which kernels applied, and why others did not.

The models in ``csnet.models`` are plain PyTorch and compute the same numbers without this
package (``CSNET_NATIVE=0``, no C compiler, CUDA): the kernels are float32 implementations of
the same layers. What ``accelerate`` does to a network:

- ``unit``: every CrossStitchUnit's ``kernel`` hook runs mix.c (CPU float32, up to 16 tasks);
- ``conv-block``: every ``nn.Sequential(Conv2d, BatchNorm2d, MaxPool2d(2), ReLU)`` becomes a
  FusedConvBlock: bnpool.c after the conv (channels-last maps);
- ``first-block``: such a block whose input needs no gradient runs whole, conv included
  (3x3 conv without bias, at most 3 input channels);
- ``onednn-linear``: ``nn.Linear`` layers of at least 2^20 weights run their products on oneDNN.
"""

from __future__ import annotations

from torch import nn

from csnet.accel.build import status
from csnet.accel.kernels import conv_fits
from csnet.accel.fused import (ONEDNN_LINEAR, ONEDNN_MIN_WEIGHTS, FusedConvBlock, OneDNNLinear,
                               conv_block_pattern, off, unit_kernel)
from csnet.models.unit import CrossStitchUnit

KERNELS = ("unit", "conv-block", "first-block", "onednn-linear")
__all__ = ["KERNELS", "accelerate", "off", "status"]


def accelerate(net: nn.Module) -> dict:
    """Swap csnet's kernels into ``net`` in place (parameters, state-dict keys and hooks unchanged);
    returns {"kernels": {name: how many modules took it}, "not applied": {name: why}}.

    Each swapped module still checks at every call that its kernel applies (device, dtype,
    layout, autocast, hooks) and otherwise runs the PyTorch layer it replaced, so an accelerated
    network is safe to move to CUDA or to evaluate under a forward hook."""
    from csnet.accel.build import lib

    found = dict.fromkeys(KERNELS, 0)
    why: dict[str, str] = {}
    if lib() is None:
        return {"kernels": {}, "not applied": {"*": status()}}
    for module in net.modules():
        if isinstance(module, CrossStitchUnit) and module.mode != "dense":
            module.kernel = unit_kernel
            found["unit"] += 1
        elif conv_block_pattern(module):
            module.__class__ = FusedConvBlock
            found["conv-block"] += 1
            found["first-block"] += conv_fits(module[0])  # whether its input needs a gradient shows per call
        elif type(module) is nn.Linear and module.weight.numel() >= ONEDNN_MIN_WEIGHTS:
            if ONEDNN_LINEAR is None:
                why["onednn-linear"] = "this torch has no usable oneDNN linear op"
            else:
                module.__class__ = OneDNNLinear
                found["onednn-linear"] += 1
    for name in KERNELS:
        if not found[name] and name not in why:
            why[name] = "no layer of the kind it speeds up"
    return {"kernels": {k: v for k, v in found.items() if v}, "not applied": why}

