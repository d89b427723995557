"""Loss functions of the DETR-family criteria (torch only; wrappers over torchvision.ops)."""

import torch
import torch.nn.functional as F
from torchvision.ops import box_convert, generalized_box_iou_loss, sigmoid_focal_loss

__all__ = ["focal_loss", "l1_box_loss", "giou_box_loss", "one_hot_without_background"]


def one_hot_without_background(labels: torch.Tensor, num_classes: int) -> torch.Tensor:
    """One-hot over ``num_classes`` where the label ``num_classes`` (no object) is all zeros.

    Args:
        labels: (...,) int64 in [0, num_classes].

    Returns:
        (..., num_classes) float32.
    """
    return F.one_hot(labels, num_classes + 1)[..., :num_classes].float()


def focal_loss(
    logits: torch.Tensor,
    targets: torch.Tensor,
    num_boxes: float,
    alpha: float = 0.25,
    gamma: float = 2.0,
) -> torch.Tensor:
    """Sigmoid focal loss summed over queries and classes, divided by ``num_boxes``
    (Deformable DETR's ``sigmoid_focal_loss(...) * num_queries``).

    Args:
        logits, targets: (B, Q, K); targets in {0, 1}.
    """
    return (
        sigmoid_focal_loss(logits, targets, alpha=alpha, gamma=gamma, reduction="sum") / num_boxes
    )


def l1_box_loss(
    src_boxes: torch.Tensor, target_boxes: torch.Tensor, num_boxes: float
) -> torch.Tensor:
    """Sum of L1 distances between matched boxes (N, 4), divided by ``num_boxes``."""
    return F.l1_loss(src_boxes, target_boxes, reduction="sum") / num_boxes


def giou_box_loss(
    src_boxes: torch.Tensor,
    target_boxes: torch.Tensor,
    num_boxes: float,
    box_format: str = "cxcywh",
) -> torch.Tensor:
    """Sum of ``1 - GIoU`` over matched boxes (N, 4), divided by ``num_boxes``.

    No epsilon in the IoU (DETR's ``generalized_box_iou``), so the value equals the diagonal of
    the pairwise GIoU matrix without computing the matrix.
    """
    if box_format != "xyxy":
        src_boxes = box_convert(src_boxes, box_format, "xyxy")
        target_boxes = box_convert(target_boxes, box_format, "xyxy")
    return generalized_box_iou_loss(src_boxes, target_boxes, reduction="sum", eps=0.0) / num_boxes
