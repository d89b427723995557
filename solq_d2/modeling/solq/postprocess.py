"""SOLQ inference post-processing (official ``PostProcess`` of ``models/solq.py``), batched."""

from typing import Dict, List, Optional, Sequence, Tuple

import torch
from detectron2.layers import paste_masks_in_image
from detectron2.structures import Boxes, Instances
from torchvision.ops import box_convert

from ...checkpoint.convert_solq import COCO_CATEGORY_IDS  # torch-only module, one list
from .dct import DCTMaskCoder

__all__ = [
    "solq_postprocess",
    "to_instances",
    "COCO_CATEGORY_IDS",
    "coco_id_to_contiguous_table",
]


def coco_id_to_contiguous_table(num_classes: int = 91) -> torch.Tensor:
    """(num_classes,) int64: contiguous id of each COCO category id, -1 for non-categories."""
    table = torch.full((num_classes,), -1, dtype=torch.int64)
    ids = torch.tensor([i for i in COCO_CATEGORY_IDS if i < num_classes], dtype=torch.int64)
    table[ids] = torch.arange(len(ids))
    return table


@torch.no_grad()
def solq_postprocess(
    pred_logits: torch.Tensor,
    pred_boxes: torch.Tensor,
    pred_vectors: torch.Tensor,
    output_sizes: Sequence[Tuple[int, int]],
    mask_coder: DCTMaskCoder,
    topk: int = 100,
    label_table: Optional[torch.Tensor] = None,
) -> List[Dict[str, torch.Tensor]]:
    """Top-k (query, class) pairs per image, boxes in output pixels, decoded and pasted masks.

    Scores are ``sigmoid`` probabilities; the top ``topk`` over the flattened Q x K entries are
    kept in descending order (a query may appear with several labels; no NMS, no threshold).
    Boxes are cxcywh -> xyxy times (W, H, W, H) of the output size, not clipped. Each kept query's
    vector is decoded to an N x N mask (:meth:`DCTMaskCoder.decode`) and pasted into its box with
    Detectron2's ``paste_masks_in_image`` (threshold 0.5).

    Args:
        pred_logits: (B, Q, K); pred_boxes: (B, Q, 4) normalised cxcywh of the unpadded image;
        pred_vectors: (B, Q, n_keep).
        output_sizes: B (height, width) of the requested outputs.
        mask_coder: decoder of the vectors.
        topk: detections per image (official 100).
        label_table: optional (K,) int64 map of the classifier index to the reported label; -1
            drops the detection (used for the official 91-way COCO head).

    Returns:
        B dicts: ``scores`` (k,), ``labels`` (k,), ``query_index`` (k,), ``boxes`` (k, 4),
        ``masks_n`` (k, N, N) decoded masks before pasting, ``masks`` (k, H, W) bool.
    """
    B, Q, K = pred_logits.shape
    k = min(topk, Q * K)
    prob = pred_logits.sigmoid().view(B, -1)
    scores, flat_idx = torch.topk(prob, k, dim=1)
    query = torch.div(flat_idx, K, rounding_mode="floor")
    labels = flat_idx % K
    boxes = box_convert(pred_boxes, "cxcywh", "xyxy")
    boxes = torch.gather(boxes, 1, query.unsqueeze(-1).expand(-1, -1, 4))
    sizes = torch.as_tensor(output_sizes, device=boxes.device, dtype=torch.int64)
    scale = torch.stack([sizes[:, 1], sizes[:, 0], sizes[:, 1], sizes[:, 0]], 1)
    boxes = boxes * scale[:, None, :]
    vectors = torch.gather(
        pred_vectors, 1, query.unsqueeze(-1).expand(-1, -1, pred_vectors.shape[-1])
    )
    masks_n = mask_coder.decode(vectors.flatten(0, 1)).view(B, k, *([mask_coder.mask_size] * 2))
    results = []
    for i, (h, w) in enumerate(output_sizes):
        keep = slice(None)
        lab = labels[i]
        if label_table is not None:
            lab = label_table.to(lab.device)[lab]
            keep = lab >= 0
        r = {
            "scores": scores[i][keep],
            "labels": lab[keep],
            "query_index": query[i][keep],
            "boxes": boxes[i][keep],
            "masks_n": masks_n[i][keep],
        }
        r["masks"] = paste_masks_in_image(
            r["masks_n"], r["boxes"], (int(h), int(w)), threshold=0.5
        ).to(torch.bool)
        results.append(r)
    return results


def to_instances(result: Dict[str, torch.Tensor], output_size: Tuple[int, int]) -> Instances:
    """Detectron2 ``Instances`` (pred_boxes, scores, pred_classes, pred_masks) of one result."""
    inst = Instances(tuple(int(s) for s in output_size))
    inst.pred_boxes = Boxes(result["boxes"])
    inst.scores = result["scores"]
    inst.pred_classes = result["labels"]
    inst.pred_masks = result["masks"]
    return inst
