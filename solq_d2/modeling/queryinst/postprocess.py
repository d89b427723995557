"""QueryInst inference: top-k over queries x classes of the last stage, mask pasting."""

from typing import Callable, List, Optional, Tuple

import torch
from detectron2.layers import paste_masks_in_image
from detectron2.structures import Boxes, Instances

__all__ = ["select_topk", "rescale_instances", "paste_masks"]

MaskLogitsFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def select_topk(
    logits: torch.Tensor,
    boxes: torch.Tensor,
    image_sizes: List[Tuple[int, int]],
    topk: int,
    mask_logits_fn: Optional[MaskLogitsFn] = None,
) -> List[Instances]:
    """Official ``simple_test``: per image, the k highest sigmoid scores over the flattened N x K
    entries (no threshold, no NMS; one query may appear with several classes).

    Args:
        logits: (B, N, K) last-stage class logits.
        boxes: (B, N, 4) last-stage xyxy boxes in input pixels.
        image_sizes: (h, w) of each unpadded input image.
        topk: k (clamped to N*K).
        mask_logits_fn: ``(batch_idx (R,), query_idx (R,)) -> (R, K, M, M)`` mask logits of
            those queries; called once, for the distinct queries among the detections of the
            batch (the official code runs the mask head on all N queries: same result, as the
            head treats every RoI independently at inference).

    Returns:
        Per image :class:`Instances` of the input size with ``pred_boxes``, ``scores``,
        ``pred_classes`` and, with ``mask_logits_fn``, ``pred_masks`` (k, 1, M, M)
        probabilities of each detection's class channel; sorted by decreasing score.
    """
    B, N, K = logits.shape
    scores = logits.sigmoid().flatten(1)  # (B, N*K)
    k = min(topk, N * K)
    top_scores, top_idx = scores.topk(k, dim=1, sorted=True)
    query_idx = torch.div(top_idx, K, rounding_mode="floor")
    classes = top_idx % K
    probs = None
    if mask_logits_fn is not None:
        flat = torch.arange(B, device=logits.device)[:, None] * N + query_idx
        unique, inverse = torch.unique(flat.flatten(), return_inverse=True)
        mask_logits = mask_logits_fn(torch.div(unique, N, rounding_mode="floor"), unique % N)
        probs = mask_logits[inverse, classes.flatten()].sigmoid()
        probs = probs.view(B, k, 1, *mask_logits.shape[-2:])
    results = []
    for b, image_size in enumerate(image_sizes):
        res = Instances(image_size)
        res.pred_boxes = Boxes(boxes[b, query_idx[b]])
        res.scores = top_scores[b]
        res.pred_classes = classes[b]
        if probs is not None:
            res.pred_masks = probs[b]
        results.append(res)
    return results


def rescale_instances(
    results: Instances,
    output_height: int,
    output_width: int,
    mask_threshold: float = 0.5,
    clip_boxes: bool = False,
) -> Instances:
    """Resize detections from the input image to the requested output size.

    Unlike Detectron2's ``detector_postprocess`` (which clips boxes, drops empty ones and pastes
    masks with the clipped boxes), the default keeps the official behaviour: boxes are scaled but
    not clipped, nothing is dropped, and masks are pasted with the unclipped boxes
    (``paste_masks_in_image``: the same grid_sample algorithm as mmdet's ``_do_paste_mask``).

    Args:
        results: output of :func:`select_topk` for one image.
        output_height, output_width: requested size (the dataset's ``height`` / ``width``).
        mask_threshold: binarisation threshold of the pasted probabilities (``>=``).
        clip_boxes: clip boxes to the output image before pasting (Detectron2 behaviour).

    Returns:
        :class:`Instances` of the output size; ``pred_masks`` (k, H, W) bool.
    """
    in_h, in_w = results.image_size
    out = Instances((output_height, output_width), **results.get_fields())
    out.pred_boxes = boxes = Boxes(results.pred_boxes.tensor.clone())
    boxes.scale(output_width / in_w, output_height / in_h)
    if clip_boxes:
        boxes.clip(out.image_size)
    if out.has("pred_masks"):
        out.pred_masks = paste_masks(
            out.pred_masks[:, 0], boxes.tensor, (output_height, output_width), mask_threshold
        )
    return out


def paste_masks(
    masks: torch.Tensor, boxes: torch.Tensor, image_shape: Tuple[int, int], threshold: float
) -> torch.Tensor:
    """Detectron2's ``paste_masks_in_image`` for boxes that may lie partly or wholly outside the
    image.

    Pixels whose centre lies outside a box are always below the threshold (the bilinear weight of
    the mask there is < 0.5), so a box that does not overlap the image gives an empty mask; such
    boxes are not passed to Detectron2's paste, whose CPU path expects boxes that touch the image.

    Args:
        masks: (k, M, M) probabilities.
        boxes: (k, 4) xyxy boxes in output pixels (not clipped).
        image_shape: (H, W) of the output image.
        threshold: binarisation threshold (``>=``).

    Returns:
        (k, H, W) bool.
    """
    H, W = image_shape
    out = torch.zeros((len(masks), H, W), dtype=torch.bool, device=masks.device)
    inside = (boxes[:, 2] >= 0) & (boxes[:, 3] >= 0) & (boxes[:, 0] <= W) & (boxes[:, 1] <= H)
    if inside.any():
        out[inside] = paste_masks_in_image(masks[inside], boxes[inside], image_shape, threshold)
    return out
