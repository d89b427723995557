"""QueryInst (Instances as Queries, ICCV 2021): Sparse R-CNN + dynamic mask heads.

Importing this package registers the ``QueryInst`` meta-architecture.
"""

from .config import add_queryinst_config
from .criterion import QueryInstCriterion
from .dynamic_conv import DynamicConv
from .head import QueryInstHead
from .mask_head import DynamicMaskHead
from .meta_arch import QueryInst
from .pooler import QueryInstROIPooler, assign_rois_to_levels
from .stage import QueryInstStage, decode_box_deltas

__all__ = [
    "add_queryinst_config",
    "QueryInst",
    "QueryInstHead",
    "QueryInstStage",
    "DynamicMaskHead",
    "DynamicConv",
    "QueryInstCriterion",
    "QueryInstROIPooler",
    "assign_rois_to_levels",
    "decode_box_deltas",
]
