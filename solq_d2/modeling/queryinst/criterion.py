"""Per-stage Hungarian matching and losses of QueryInst (official ``HungarianAssigner``,
``DIIHead.loss`` and ``DynamicMaskHead.loss``)."""

from typing import Dict, List, Sequence, Tuple

import torch
from detectron2.structures import BitMasks
from detectron2.utils import comm
from torch import nn

from ..losses import focal_loss, giou_box_loss, l1_box_loss, one_hot_without_background
from ..matcher import HungarianMatcher

__all__ = ["QueryInstCriterion", "dice_loss"]

Indices = List[Tuple[torch.Tensor, torch.Tensor]]


def dice_loss(probs: torch.Tensor, targets: torch.Tensor, eps: float = 1e-5) -> torch.Tensor:
    """Per-instance dice loss with squared denominators (QueryInst ``dice_loss``).

    Args:
        probs: (P, H, W) mask probabilities.
        targets: (P, H, W) binary targets.

    Returns:
        (P,) ``1 - 2 * sum(p * m) / (sum(p^2) + sum(m^2) + eps)``.
    """
    p = probs.flatten(1)
    m = targets.flatten(1)
    union = (p * p).sum(1) + (m * m).sum(1) + eps
    return 1.0 - 2.0 * (p * m).sum(1) / union


def _reduce_mean_clamped(value: float, device: torch.device) -> float:
    """Mean over the distributed workers (mmdet ``reduce_mean``), at least 1."""
    t = torch.as_tensor(float(value), device=device)
    if comm.get_world_size() > 1:
        torch.distributed.all_reduce(t)
        t = t / comm.get_world_size()
    return max(t.item(), 1.0)


class QueryInstCriterion(nn.Module):
    """Matches every stage's predictions to the ground truth independently and computes, per
    stage t with weight w_t: ``w_t * (2 L_focal + 5 L_L1 + 2 L_GIoU + 8 L_dice)``.

    Matching cost: ``COST_CLASS * C_focal + COST_BBOX * L1(xyxy / whwh) - COST_GIOU * GIoU``
    (mmdet ``FocalLossCost`` with eps 1e-12, ``BBoxL1Cost`` on image-normalised xyxy, ``IoUCost``
    giou), solved with scipy. Losses are normalised by the number of matched queries of the batch,
    averaged over workers and clamped to at least 1 (mmdet ``avg_factor``).
    """

    def __init__(
        self,
        *,
        num_classes: int,
        cost_class: float = 2.0,
        cost_bbox: float = 5.0,
        cost_giou: float = 2.0,
        class_weight: float = 2.0,
        l1_weight: float = 5.0,
        giou_weight: float = 2.0,
        mask_weight: float = 8.0,
        focal_alpha: float = 0.25,
        focal_gamma: float = 2.0,
        stage_weights: Sequence[float] = (1.0,) * 6,
    ):
        """
        Args:
            num_classes: K.
            cost_class, cost_bbox, cost_giou: matching cost weights.
            class_weight, l1_weight, giou_weight, mask_weight: loss weights.
            focal_alpha, focal_gamma: focal loss / cost parameters.
            stage_weights: weight of each stage's losses.
        """
        super().__init__()
        self.num_classes = num_classes
        # mmdet HungarianAssigner: FocalLossCost (eps 1e-12), BBoxL1Cost on xyxy / image size,
        # IoUCost giou (GIoU is invariant to the per-image normalisation)
        self.matcher = HungarianMatcher(
            cost_class=cost_class,
            cost_bbox=cost_bbox,
            cost_giou=cost_giou,
            focal_alpha=focal_alpha,
            focal_gamma=focal_gamma,
            focal_eps=1e-12,
            box_format="xyxy",
        )
        self.class_weight, self.l1_weight = class_weight, l1_weight
        self.giou_weight, self.mask_weight = giou_weight, mask_weight
        self.focal_alpha, self.focal_gamma = focal_alpha, focal_gamma
        self.stage_weights = list(stage_weights)

    def extra_repr(self) -> str:
        return (
            f"num_classes={self.num_classes}, weights(class, l1, giou, mask)="
            f"({self.class_weight}, {self.l1_weight}, {self.giou_weight}, {self.mask_weight}), "
            f"stage_weights={self.stage_weights}"
        )

    @torch.no_grad()
    def match(
        self,
        logits: torch.Tensor,
        boxes: torch.Tensor,
        targets: List[Dict[str, torch.Tensor]],
        whwh: torch.Tensor,
    ) -> Indices:
        """
        Args:
            logits: (B, N, K) class logits of a stage.
            boxes: (B, N, 4) its decoded xyxy boxes (pixels).
            targets: per image ``labels`` (T_b,) and ``boxes`` (T_b, 4) xyxy pixels.
            whwh: (B, 4) unpadded image sizes (w, h, w, h).

        Returns:
            Per image (query indices, GT indices), int64 on the logits' device, sorted by query.
        """
        outputs = {"pred_logits": logits, "pred_boxes": boxes / whwh[:, None, :]}
        norm_targets = [
            {"labels": t["labels"], "boxes": t["boxes"] / whwh[b]} for b, t in enumerate(targets)
        ]
        device = logits.device
        return [(i.to(device), j.to(device)) for i, j in self.matcher(outputs, norm_targets)]

    def forward(
        self,
        outputs: List[Dict[str, torch.Tensor]],
        targets: List[Dict[str, torch.Tensor]],
        whwh: torch.Tensor,
    ) -> Tuple[Dict[str, torch.Tensor], Dict[str, float]]:
        """
        Args:
            outputs: per stage, the dicts of :class:`QueryInstHead` in training (with ``indices``).
            targets: per image ``labels`` (T_b,), ``boxes`` (T_b, 4) xyxy pixels and, with masks,
                ``masks`` (T_b, H_pad, W_pad) bool bitmaps of the padded batch.
            whwh: (B, 4) unpadded image sizes.

        Returns:
            losses: ``stage{s}_loss_cls``, ``_loss_bbox``, ``_loss_iou`` (and ``_loss_mask``),
                weighted.
            metrics: ``stage{s}_pos_acc`` (% of matched queries whose top class is the GT's).
        """
        losses, metrics = {}, {}
        for s, out in enumerate(outputs):
            stage_losses, metrics[f"stage{s}_pos_acc"] = self._stage_losses(out, targets, whwh)
            for k, v in stage_losses.items():
                losses[f"stage{s}_{k}"] = v * self.stage_weights[s]
        return losses, metrics

    def _stage_losses(self, out, targets, whwh):
        logits, pred_boxes, indices = out["pred_logits"], out["pred_boxes"], out["indices"]
        B, N, K = logits.shape
        batch_idx = torch.cat([torch.full_like(src, b) for b, (src, _) in enumerate(indices)])
        query_idx = torch.cat([src for src, _ in indices])
        labels = torch.cat([t["labels"][tgt] for t, (_, tgt) in zip(targets, indices)])
        tgt_boxes = torch.cat([t["boxes"][tgt] for t, (_, tgt) in zip(targets, indices)])
        num_pos = _reduce_mean_clamped(len(query_idx), logits.device)

        target_classes = torch.full((B, N), K, dtype=torch.int64, device=logits.device)
        target_classes[batch_idx, query_idx] = labels
        onehot = one_hot_without_background(target_classes, K).to(logits.dtype)
        loss_cls = focal_loss(logits, onehot, num_pos, self.focal_alpha, self.focal_gamma)
        losses = {"loss_cls": self.class_weight * loss_cls}

        if len(query_idx) > 0:
            pos_logits = logits[batch_idx, query_idx].detach()
            pos_acc = (pos_logits.argmax(-1) == labels).float().mean().item() * 100.0
            src_boxes = pred_boxes[batch_idx, query_idx]
            pos_whwh = whwh[batch_idx]
            # L1 on xyxy normalised by the unpadded image size, GIoU in pixels
            loss_l1 = l1_box_loss(src_boxes / pos_whwh, tgt_boxes / pos_whwh, num_pos)
            loss_giou = giou_box_loss(src_boxes, tgt_boxes, num_pos, box_format="xyxy")
            losses["loss_bbox"] = self.l1_weight * loss_l1
            losses["loss_iou"] = self.giou_weight * loss_giou
        else:
            pos_acc = 0.0
            losses["loss_bbox"] = pred_boxes.sum() * 0.0
            losses["loss_iou"] = pred_boxes.sum() * 0.0

        if "pos_mask_logits" in out:
            losses["loss_mask"] = self._mask_loss(out, targets, indices, labels, num_pos)
        return losses, pos_acc

    def _mask_loss(self, out, targets, indices, labels, num_pos):
        mask_logits = out["pos_mask_logits"]
        if mask_logits is None:  # no GT in the batch
            return out["mask_zero_loss"]
        P = mask_logits.shape[0]
        probs = mask_logits[torch.arange(P, device=labels.device), labels].sigmoid()
        # targets: GT bitmaps of the padded batch cropped by the detached predicted boxes b_t,
        # clipped to the padded image first (mmdet mask_target), RoIAlign to 28x28, >= 0.5
        masks = torch.cat([t["masks"][tgt] for t, (_, tgt) in zip(targets, indices)])
        H, W = masks.shape[-2:]
        boxes = torch.cat(
            [out["pred_boxes"][b, src].detach() for b, (src, _) in enumerate(indices)]
        )
        boxes = torch.stack(
            [
                boxes[:, 0].clamp(0, W),
                boxes[:, 1].clamp(0, H),
                boxes[:, 2].clamp(0, W),
                boxes[:, 3].clamp(0, H),
            ],
            dim=1,
        )
        mask_targets = BitMasks(masks).crop_and_resize(boxes, probs.shape[-1]).to(probs.dtype)
        return self.mask_weight * dice_loss(probs, mask_targets).sum() / num_pos
