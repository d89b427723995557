"""Hungarian matching of queries to ground truth (DETR family), ``scipy.optimize``-based."""

from typing import Dict, List, Sequence, Tuple

import torch
from scipy.optimize import linear_sum_assignment
from torch import nn
from torchvision.ops import box_convert, generalized_box_iou

__all__ = ["HungarianMatcher", "focal_class_cost"]

Indices = List[Tuple[torch.Tensor, torch.Tensor]]


def focal_class_cost(
    logits: torch.Tensor,
    labels: torch.Tensor,
    alpha: float = 0.25,
    gamma: float = 2.0,
    eps: float = 1e-8,
) -> torch.Tensor:
    """Focal-loss matching cost at the target class: ``pos - neg`` with
    ``pos = alpha (1-p)^gamma (-log(p+eps))``, ``neg = (1-alpha) p^gamma (-log(1-p+eps))``.

    Deformable DETR's matcher (eps 1e-8); mmdet's ``FocalLossCost`` is the same with eps 1e-12.

    Args:
        logits: (N, K) class logits.
        labels: (T,) int64 target classes.

    Returns:
        (N, T) cost.
    """
    prob = logits.sigmoid()
    neg = (1 - alpha) * (prob**gamma) * (-(1 - prob + eps).log())
    pos = alpha * ((1 - prob) ** gamma) * (-(prob + eps).log())
    return pos[:, labels] - neg[:, labels]


class HungarianMatcher(nn.Module):
    """One-to-one assignment minimising
    ``cost_class * C_focal + cost_bbox * L1 + cost_giou * (-GIoU)`` per image.

    Args:
        cost_class, cost_bbox, cost_giou: weights of the three costs.
        focal_alpha, focal_gamma, focal_eps: focal class cost parameters (Deformable DETR /
            SOLQ hard-code alpha 0.25, gamma 2, eps 1e-8; mmdet's FocalLossCost uses eps 1e-12).
        box_format: format of ``pred_boxes`` and target ``boxes`` (both normalised):
            "cxcywh" (DETR/SOLQ/SOIT; L1 on cxcywh) or "xyxy" (mmdet ``BBoxL1Cost`` as in
            QueryInst: L1 on xyxy divided by the image size). GIoU is on xyxy in both cases.
    """

    def __init__(
        self,
        cost_class: float = 2.0,
        cost_bbox: float = 5.0,
        cost_giou: float = 2.0,
        focal_alpha: float = 0.25,
        focal_gamma: float = 2.0,
        focal_eps: float = 1e-8,
        box_format: str = "cxcywh",
    ):
        super().__init__()
        if box_format not in ("cxcywh", "xyxy"):
            raise ValueError(f"box_format must be 'cxcywh' or 'xyxy', got {box_format!r}")
        if cost_class == 0 and cost_bbox == 0 and cost_giou == 0:
            raise ValueError("all matching costs are 0")
        self.cost_class = cost_class
        self.cost_bbox = cost_bbox
        self.cost_giou = cost_giou
        self.focal_alpha = focal_alpha
        self.focal_gamma = focal_gamma
        self.focal_eps = focal_eps
        self.box_format = box_format

    @torch.no_grad()
    def cost_matrix(self, outputs: Dict[str, torch.Tensor], targets: List[Dict]) -> torch.Tensor:
        """Matching cost of every query of the batch against every target of the batch.

        Args:
            outputs: ``pred_logits`` (B, Q, K) and ``pred_boxes`` (B, Q, 4).
            targets: per image ``labels`` (T_i,) and ``boxes`` (T_i, 4).

        Returns:
            (B, Q, sum_i T_i) float cost (only the block of image i against its own targets is
            used).
        """
        logits = outputs["pred_logits"]
        B, Q = logits.shape[:2]
        out_bbox = outputs["pred_boxes"].flatten(0, 1).float()
        tgt_ids = torch.cat([t["labels"] for t in targets])
        tgt_bbox = torch.cat([t["boxes"] for t in targets]).to(out_bbox)
        if tgt_ids.numel() == 0:
            return out_bbox.new_zeros((B, Q, 0))
        cost = self.cost_class * focal_class_cost(
            logits.flatten(0, 1).float(),
            tgt_ids,
            self.focal_alpha,
            self.focal_gamma,
            self.focal_eps,
        )
        cost = cost + self.cost_bbox * torch.cdist(out_bbox, tgt_bbox, p=1)
        if self.box_format == "cxcywh":
            out_xyxy = box_convert(out_bbox, "cxcywh", "xyxy")
            tgt_xyxy = box_convert(tgt_bbox, "cxcywh", "xyxy")
        else:
            out_xyxy, tgt_xyxy = out_bbox, tgt_bbox
        cost = cost - self.cost_giou * generalized_box_iou(out_xyxy, tgt_xyxy)
        return cost.view(B, Q, -1)

    @torch.no_grad()
    def forward(self, outputs: Dict[str, torch.Tensor], targets: List[Dict]) -> Indices:
        """
        Args:
            outputs: ``pred_logits`` (B, Q, K), ``pred_boxes`` (B, Q, 4).
            targets: B dicts with ``labels`` (T_i,) int64 and ``boxes`` (T_i, 4).

        Returns:
            B pairs ``(query_indices, target_indices)`` (int64, CPU), each of length
            ``min(Q, T_i)``, sorted by query index.
        """
        return self.match_many([outputs], targets)[0]

    @torch.no_grad()
    def match_many(self, outputs_list: Sequence[Dict], targets: List[Dict]) -> List[Indices]:
        """Match several sets of predictions (e.g. every decoder layer) against the same targets
        with a single device-to-host copy of the costs.

        Returns:
            one list of B index pairs per element of ``outputs_list``.
        """
        sizes = [len(t["labels"]) for t in targets]
        costs = [self.cost_matrix(o, targets) for o in outputs_list]
        shapes = [c.shape for c in costs]
        flat = torch.cat([c.flatten() for c in costs])
        if not torch.isfinite(flat).all():
            raise FloatingPointError(
                "HungarianMatcher: non-finite matching cost (NaN/inf predictions?)"
            )
        flat = flat.cpu()  # one device-to-host copy for all sets of predictions
        results = []
        for c in flat.split([s.numel() for s in shapes]):
            c = c.view(shapes[len(results)])
            indices = []
            for i, block in enumerate(c.split(sizes, -1)):
                rows, cols = linear_sum_assignment(block[i].numpy())
                indices.append(
                    (
                        torch.as_tensor(rows, dtype=torch.int64),
                        torch.as_tensor(cols, dtype=torch.int64),
                    )
                )
            results.append(indices)
        return results

    def extra_repr(self) -> str:
        return (
            f"cost_class={self.cost_class}, cost_bbox={self.cost_bbox}, cost_giou={self.cost_giou},"
            f" focal_alpha={self.focal_alpha}, focal_gamma={self.focal_gamma},"
            f" box_format={self.box_format!r}"
        )
