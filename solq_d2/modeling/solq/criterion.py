"""SOLQ's set criterion: Deformable DETR's focal/L1/GIoU losses + the L1 mask-vector loss."""

from typing import Dict, List, Optional

import torch
import torch.nn.functional as F

from ..criterion import SetCriterion
from .dct import DCTMaskCoder

__all__ = ["SOLQCriterion"]


class SOLQCriterion(SetCriterion):
    """Adds ``loss_vectors`` (key ``loss_vector``) to :class:`SetCriterion`.

    Target vectors are encoded once per GT instance (they do not depend on the matching) from
    the targets' ``masks`` (K, H, W) cropped by their ``xyxy_boxes`` (K, 4 pixel GT boxes), then
    gathered with every layer's matching.

    Args:
        mask_coder: :class:`DCTMaskCoder`.
        vector_loss_coef: lambda_vec, applied inside the loss (official 3).
        vector_loss_norm: "mean" (official: mean over matched pairs x coefficients) or
            "num_boxes" (sum / number of GT boxes).
        kwargs: :class:`SetCriterion` arguments; ``losses`` defaults to labels, boxes, vectors.
    """

    def __init__(
        self,
        *,
        mask_coder: DCTMaskCoder,
        vector_loss_coef: float = 3.0,
        vector_loss_norm: str = "mean",
        **kwargs,
    ):
        kwargs.setdefault("losses", ("labels", "boxes", "vectors"))
        super().__init__(**kwargs)
        if vector_loss_norm not in ("mean", "num_boxes"):
            raise ValueError(
                f"vector_loss_norm must be 'mean' or 'num_boxes', got {vector_loss_norm!r}"
            )
        self.mask_coder = mask_coder
        self.vector_loss_coef = vector_loss_coef
        self.vector_loss_norm = vector_loss_norm

    def encode_targets(self, targets: List[Dict]) -> List[Dict]:
        """Add ``vectors`` (K, n_keep) to each target that lacks them."""
        out = []
        for t in targets:
            if "vectors" not in t:
                t = dict(t, vectors=self.mask_coder.encode(t["masks"], t["xyxy_boxes"]))
            out.append(t)
        return out

    def loss_vectors(self, outputs, targets, indices, num_boxes):
        """L1 between matched predicted and target DCT vectors, times ``vector_loss_coef``."""
        pred = outputs["pred_vectors"]
        idx = self._src_permutation_idx(indices)
        src = pred[idx]
        if src.numel() == 0:  # no matched instance: keep the graph connected
            return {"loss_vector": pred.sum() * 0.0}
        tgt = torch.cat([t["vectors"][J] for t, (_, J) in zip(targets, indices)]).to(src)
        if self.vector_loss_norm == "mean":
            loss = F.l1_loss(src, tgt, reduction="mean")
        else:
            loss = F.l1_loss(src, tgt, reduction="sum") / num_boxes
        return {"loss_vector": self.vector_loss_coef * loss}

    def forward(
        self, outputs: Dict, targets: List[Dict], indices: Optional[Dict] = None
    ) -> Dict[str, torch.Tensor]:
        if "vectors" in self.losses:
            targets = self.encode_targets(targets)
        return super().forward(outputs, targets, indices)
