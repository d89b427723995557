"""SOIT: Segmenting Objects with Instance-aware Transformers, as a Detectron2 meta-architecture.

Importing this package registers ``SOIT`` in ``META_ARCH_REGISTRY``.
"""

from .config import add_soit_config
from .dynamic_head import SOITDynamicMaskHead, aligned_bilinear
from .meta_arch import SOIT

__all__ = ["SOIT", "SOITDynamicMaskHead", "add_soit_config", "aligned_bilinear"]
