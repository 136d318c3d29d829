"""csnet: cross-stitch networks for multi-task learning (Misra et al., CVPR 2016) on PyTorch."""

from csnet.models.backbones import as_column
from csnet.models.network import CrossStitchNet, ModelConfig, build_network, stitch
from csnet.models.unit import CrossStitchUnit

__version__ = "0.1.0"
__all__ = ["CrossStitchNet", "CrossStitchUnit", "ModelConfig", "as_column", "build_network", "stitch", "__version__"]
