"""csnet: cross-stitch networks for multi-task learning (Misra et al., CVPR 2016) on PyTorch."""

import importlib

__version__ = "0.1.0"

# The library's names, imported on first use (PEP 562): ``import csnet`` and ``csnet --help`` do not
# load torch until a name that needs it is asked for.
_LAZY = {
    "CrossStitchNet": "csnet.models.network",
    "ModelConfig": "csnet.models.network",
    "build_network": "csnet.models.network",
    "stitch": "csnet.models.network",
    "CrossStitchUnit": "csnet.models.unit",
    "as_column": "csnet.models.backbones",
    "fit": "csnet.api",
}
__all__ = [*_LAZY, "__version__"]


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'csnet' has no attribute {name!r}")


def __dir__():
    return sorted([*globals(), *_LAZY])
