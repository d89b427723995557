"""Optional mask-aware matching for SOIT (SOIT.md §9 option B; not in the paper or opera)."""

from typing import Dict, List

import torch
import torch.nn.functional as F

from ..matcher import HungarianMatcher
from .dynamic_head import SOITDynamicMaskHead

__all__ = ["SOITHungarianMatcher"]


def _dice_cost(p: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """(Q, P) probabilities, (T, P) targets -> (Q, T) ``1 - (2Σpt + 1) / (Σp + Σt + 1)``."""
    num = 2 * p @ t.T
    den = p.sum(-1)[:, None] + t.sum(-1)[None, :]
    return 1 - (num + 1) / (den + 1)


def _bce_cost(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """(Q, P) logits, (T, P) targets -> (Q, T) mean sigmoid cross-entropy over the points."""
    pos = F.binary_cross_entropy_with_logits(x, torch.ones_like(x), reduction="none")
    neg = F.binary_cross_entropy_with_logits(x, torch.zeros_like(x), reduction="none")
    return (pos @ t.T + neg @ (1 - t).T) / x.shape[1]


class SOITHungarianMatcher(HungarianMatcher):
    """:class:`HungarianMatcher` plus dice and BCE costs between every query's mask and every GT
    mask (Mask2Former-style), evaluated at ``num_points`` random points of each image.

    The dynamic head runs on all Q queries of the matched layer (no gradient); predictions are
    sampled bilinearly from the stride-8 logits and targets from the stride-2 soft masks
    (``targets[i]["soft_masks"]``), at the same random points (uniform over the padded canvas).
    Sets of predictions without ``pred_params`` (the encoder proposals) get no mask cost.

    Args:
        mask_head: the dynamic head.
        cost_dice, cost_mask: weights of the dice and BCE costs.
        num_points: points per image.
        other args: :class:`HungarianMatcher`.
    """

    def __init__(
        self,
        *,
        mask_head: SOITDynamicMaskHead,
        cost_dice: float = 0.0,
        cost_mask: float = 0.0,
        num_points: int = 12544,
        **kwargs,
    ):
        super().__init__(**kwargs)
        if num_points < 1:
            raise ValueError(f"MODEL.SOIT.MATCHER_NUM_POINTS must be positive, got {num_points}")
        self.__dict__["mask_head"] = mask_head  # no weights; belongs to the model
        self.cost_dice = cost_dice
        self.cost_mask = cost_mask
        self.num_points = num_points

    @torch.no_grad()
    def cost_matrix(self, outputs: Dict[str, torch.Tensor], targets: List[Dict]) -> torch.Tensor:
        cost = super().cost_matrix(outputs, targets)
        if "pred_params" not in outputs or cost.shape[-1] == 0:
            return cost
        fmask, valid_hw = outputs["mask_features"], outputs["mask_valid_hw"]
        B, Q = outputs["pred_params"].shape[:2]
        params = outputs["pred_params"].flatten(0, 1)
        centers = outputs["pred_boxes"][..., :2].flatten(0, 1)
        img_idx = torch.arange(B, device=params.device).repeat_interleave(Q)
        logits = self.mask_head(fmask, valid_hw, params, img_idx, centers).view(
            B, Q, 1, *fmask.shape[1:3]
        )
        start = 0
        for b, t in enumerate(targets):
            n = len(t["labels"])
            if n == 0:
                continue
            pts = torch.rand(1, 1, self.num_points, 2, device=params.device) * 2 - 1
            x = F.grid_sample(logits[b], pts.expand(Q, -1, -1, -1), align_corners=False)
            x = x.view(Q, -1).float()
            tgt = t["soft_masks"][:, None].to(x)
            y = F.grid_sample(tgt, pts.expand(n, -1, -1, -1), align_corners=False).view(n, -1)
            block = self.cost_mask * _bce_cost(x, y) + self.cost_dice * _dice_cost(x.sigmoid(), y)
            cost[b, :, start : start + n] += block.to(cost)
            start += n
        return cost

    def extra_repr(self) -> str:
        return (
            super().extra_repr()
            + f", cost_dice={self.cost_dice}, cost_mask={self.cost_mask}, num_points={self.num_points}"
        )
