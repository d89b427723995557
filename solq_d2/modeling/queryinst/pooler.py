"""Multi-level RoI pooling with mmdet's level rule (``SingleRoIExtractor.map_roi_levels``)."""

from typing import List

import torch
from detectron2.layers import nonzero_tuple
from detectron2.modeling.poolers import ROIPooler

__all__ = ["QueryInstROIPooler", "assign_rois_to_levels"]


def assign_rois_to_levels(rois: torch.Tensor, num_levels: int, finest_scale: float) -> torch.Tensor:
    """Level index (0 = finest) of each RoI: floor(log2(sqrt(w*h) / finest_scale + 1e-6)).

    With finest_scale 56 and strides 4..32: sqrt(area) < 112 -> 0, < 224 -> 1, < 448 -> 2, else 3.

    Args:
        rois: (R, 5) as (batch index, x1, y1, x2, y2).
        num_levels: number of feature levels; the result is clamped to [0, num_levels - 1].
        finest_scale: box side (pixels) of the finest level's upper bound / 2.

    Returns:
        (R,) int64.
    """
    scale = torch.sqrt((rois[:, 3] - rois[:, 1]) * (rois[:, 4] - rois[:, 2]))
    levels = torch.floor(torch.log2(scale / finest_scale + 1e-6))
    return levels.clamp(min=0, max=num_levels - 1).long()


class QueryInstROIPooler(ROIPooler):
    """Detectron2 :class:`ROIPooler` (its ROIAlign / ROIAlignV2 level poolers) that assigns RoIs to
    levels with mmdet's ``finest_scale`` rule, as the official QueryInst, and takes RoIs as one
    (R, 5) tensor so that the positives of a batch can be pooled in one call.
    """

    def __init__(self, *args, finest_scale: float = 56.0, **kwargs):
        """
        Args:
            args, kwargs: as :class:`ROIPooler` (output_size, scales, sampling_ratio, pooler_type).
            finest_scale: see :func:`assign_rois_to_levels`.
        """
        super().__init__(*args, **kwargs)
        self.finest_scale = finest_scale

    def forward(self, x: List[torch.Tensor], rois: torch.Tensor) -> torch.Tensor:
        """
        Args:
            x: feature maps (B, C, H_l, W_l), finest first, matching ``scales``.
            rois: (R, 5) (batch index, x1, y1, x2, y2) in input-image pixels.

        Returns:
            (R, C, S, S) pooled features in the order of ``rois``.
        """
        num_levels = len(self.level_poolers)
        assert len(x) == num_levels, f"{len(x)} feature maps for {num_levels} pooler levels"
        S = self.output_size[0]
        output = x[0].new_zeros((rois.shape[0], x[0].shape[1], S, S))
        if rois.shape[0] == 0:
            return output
        if num_levels == 1:
            return self.level_poolers[0](x[0], rois)
        levels = assign_rois_to_levels(rois, num_levels, self.finest_scale)
        for level, pooler in enumerate(self.level_poolers):
            inds = nonzero_tuple(levels == level)[0]
            # index_put_ instead of advanced-index assignment (pytorch/issues/49852)
            output.index_put_((inds,), pooler(x[level], rois[inds]))
        return output
