"""SOIT inference: top-k (query, class) pairs, boxes, and masks from the dynamic head."""

import math
from typing import List, Sequence, Tuple

import torch
import torch.nn.functional as F
from torchvision.ops import box_convert

from detectron2.structures import Boxes, Instances

from .dynamic_head import SOITDynamicMaskHead

__all__ = ["soit_postprocess"]

# Masks resized to the output size at once; bounds the float buffers of the two resizes.
_RESIZE_CHUNK = 16


def _topk_per_image(logits: torch.Tensor, k: int) -> Tuple[torch.Tensor, ...]:
    """Top-k over the flattened (Q, K) sigmoid scores of one image (opera ``_get_bboxes_single``).

    Returns:
        scores (k,), labels (k,), query indices (k,).
    """
    num_classes = logits.shape[-1]
    scores, index = logits.sigmoid().flatten().topk(min(k, logits.numel()))
    return scores, index % num_classes, torch.div(index, num_classes, rounding_mode="floor")


def _masks_to_output(
    probs: torch.Tensor,
    image_size: Tuple[int, int],
    output_size: Tuple[int, int],
    threshold: float,
) -> torch.Tensor:
    """(N, h, w) probabilities -> (N, out_h, out_w) bool masks, as opera: bilinear
    (``align_corners=True``) resize to the image size, then to the output size, then ``>``."""
    H, W = image_size
    masks = []
    for chunk in probs.split(_RESIZE_CHUNK):
        m = F.interpolate(chunk[:, None], size=(H, W), mode="bilinear", align_corners=True)
        if (H, W) != tuple(output_size):
            m = F.interpolate(m, size=tuple(output_size), mode="bilinear", align_corners=True)
        masks.append(m[:, 0] > threshold)
    if not masks:
        return probs.new_zeros((0,) + tuple(output_size), dtype=torch.bool)
    return torch.cat(masks)


def soit_postprocess(
    pred_logits: torch.Tensor,
    pred_boxes: torch.Tensor,
    pred_params: torch.Tensor,
    fmask: torch.Tensor,
    valid_hw: torch.Tensor,
    image_sizes: Sequence[Tuple[int, int]],
    padded_size: Tuple[int, int],
    output_sizes: Sequence[Tuple[int, int]],
    mask_head: SOITDynamicMaskHead,
    topk: int = 100,
    mask_threshold: float = 0.5,
    crop_padding: bool = False,
) -> List[Instances]:
    """Detections of the last decoder layer, one :class:`Instances` per image.

    Scores are the sigmoid class probabilities; the top ``topk`` (query, class) pairs over all
    Q x K pairs are kept (no NMS; a query can appear with several labels). Each kept query's mask
    comes from the dynamic head (each distinct query computed once, all images in one call), is
    upsampled to stride 2, passed through a sigmoid, resized to the image and then to the output
    size and thresholded (``> mask_threshold``). Boxes are scaled to the image size, clamped to
    it and rescaled to the output size.

    Args:
        pred_logits: (B, Q, K) class logits.
        pred_boxes: (B, Q, 4) normalised cxcywh (relative to each unpadded image).
        pred_params: (B, Q, D) mask parameters.
        fmask: (B, h, w, C) stride-8 mask features; valid_hw: (B, 2) their valid rows/cols.
        image_sizes: (H_b, W_b) of each image in the padded batch (network input pixels).
        padded_size: (Hp, Wp) of the padded batch.
        output_sizes: requested (height, width) of each result.
        mask_head: the dynamic head.
        topk: detections per image.
        mask_threshold: probability threshold of the binary masks.
        crop_padding: crop the valid region of the stride-2 map before resizing (SOIT.md §7);
            False reproduces opera, which is exact only for unpadded images.

    Returns:
        list of Instances with ``pred_boxes``, ``scores``, ``pred_classes``, ``pred_masks``
        (bool, output size) and ``pred_query_indices`` (which query each detection comes from).
    """
    B = pred_logits.shape[0]
    picks = [_topk_per_image(pred_logits[b], topk) for b in range(B)]
    # distinct kept queries of every image, evaluated by the dynamic head in one call
    uniq = [torch.unique(q, return_inverse=True) for _, _, q in picks]
    img_idx = (
        torch.cat([torch.full_like(u, b) for b, (u, _) in enumerate(uniq)])
        if B
        else pred_logits.new_zeros(0, dtype=torch.long)
    )
    queries = torch.cat([u for u, _ in uniq])
    params = pred_params[img_idx, queries]
    centers = pred_boxes[img_idx, queries, :2]
    logits = mask_head(fmask, valid_hw, params, img_idx, centers)
    probs = mask_head.upsample(logits).sigmoid()  # (T, 4h, 4w) on the padded canvas
    probs_per_image = probs.split([len(u) for u, _ in uniq])

    results = []
    for b in range(B):
        scores, labels, qidx = picks[b]
        H, W = image_sizes[b]
        out_h, out_w = output_sizes[b]
        boxes = box_convert(pred_boxes[b, qidx], "cxcywh", "xyxy")
        boxes = boxes * boxes.new_tensor([W, H, W, H])
        boxes[:, 0::2] = boxes[:, 0::2].clamp(min=0, max=W)
        boxes[:, 1::2] = boxes[:, 1::2].clamp(min=0, max=H)
        boxes = boxes * boxes.new_tensor([out_w / W, out_h / H, out_w / W, out_h / H])

        p = probs_per_image[b]
        if crop_padding:  # the image's share of the padded canvas, rounded up
            rows = math.ceil(H * p.shape[-2] / padded_size[0])
            cols = math.ceil(W * p.shape[-1] / padded_size[1])
            p = p[:, :rows, :cols]
        masks = _masks_to_output(p, (H, W), (out_h, out_w), mask_threshold)
        inst = Instances((out_h, out_w))
        inst.pred_boxes = Boxes(boxes)
        inst.scores = scores
        inst.pred_classes = labels
        inst.pred_masks = masks[uniq[b][1]]
        inst.pred_query_indices = qidx
        results.append(inst)
    return results
