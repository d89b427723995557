"""SOLQ: Segmenting Objects by Learning Queries, as a Detectron2 meta-architecture.

Importing this package registers ``SOLQ`` in ``META_ARCH_REGISTRY``.
"""

from .config import add_solq_config
from .criterion import SOLQCriterion
from .dct import DCTMaskCoder, dct_matrix, zigzag_indices
from .meta_arch import SOLQ
from .postprocess import COCO_CATEGORY_IDS, coco_id_to_contiguous_table, solq_postprocess

__all__ = [
    "SOLQ",
    "SOLQCriterion",
    "DCTMaskCoder",
    "add_solq_config",
    "dct_matrix",
    "zigzag_indices",
    "solq_postprocess",
    "coco_id_to_contiguous_table",
    "COCO_CATEGORY_IDS",
]
