"""One dynamic stage of Sparse R-CNN / QueryInst (mmdet ``DIIHead``, Detectron2 ``RCNNHead``)."""

import math
from typing import Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from .dynamic_conv import DynamicConv

__all__ = ["QueryInstStage", "decode_box_deltas", "SCALE_CLAMPS"]

# Clamp of the log-size deltas (dw, dh): (lower, upper); see MODEL.QUERYINST.SCALE_CLAMP.
SCALE_CLAMPS = {
    # mmdet DeltaXYWHBBoxCoder: |dw|, |dh| <= |log(wh_ratio_clip)|, wh_ratio_clip = 16 / 1000
    "mmdet": (-abs(math.log(16 / 1000)), abs(math.log(16 / 1000))),
    # Detectron2 Sparse R-CNN (head.py _DEFAULT_SCALE_CLAMP): dw, dh <= log(100000 / 16), no
    # lower bound
    "d2": (None, math.log(100000.0 / 16)),
}


def decode_box_deltas(
    deltas: torch.Tensor,
    boxes: torch.Tensor,
    weights: Sequence[float] = (2.0, 2.0, 1.0, 1.0),
    scale_clamp: Tuple = SCALE_CLAMPS["mmdet"],
) -> torch.Tensor:
    """Apply (dx, dy, dw, dh) deltas to xyxy boxes; no clipping to the image.

    The arithmetic follows mmdet's ``delta2bbox`` operation by operation (centre as (x1+x2)/2), so
    the result is bit-identical to the official code.

    Args:
        deltas: (R, 4) raw regression outputs.
        boxes: (R, 4) reference boxes, xyxy.
        weights: (wx, wy, ww, wh); the deltas are multiplied by 1/w (mmdet target_stds).
        scale_clamp: (lower or None, upper) clamp of dw, dh.

    Returns:
        (R, 4) decoded xyxy boxes.
    """
    stds = deltas.new_tensor([1.0 / w for w in weights])
    deltas = deltas * stds
    dx, dy, dw, dh = deltas.unbind(-1)
    lo, hi = scale_clamp
    dw = dw.clamp(min=lo, max=hi)
    dh = dh.clamp(min=lo, max=hi)
    x1, y1, x2, y2 = boxes.unbind(-1)
    px = (x1 + x2) * 0.5
    py = (y1 + y2) * 0.5
    pw = x2 - x1
    ph = y2 - y1
    gw = pw * dw.exp()
    gh = ph * dh.exp()
    gx = px + pw * dx
    gy = py + ph * dy
    return torch.stack([gx - gw * 0.5, gy - gh * 0.5, gx + gw * 0.5, gy + gh * 0.5], dim=-1)


def _tower(hidden_dim: int, num_blocks: int) -> nn.Sequential:
    layers = []
    for _ in range(num_blocks):
        layers += [nn.Linear(hidden_dim, hidden_dim, bias=False), nn.LayerNorm(hidden_dim)]
        layers.append(nn.ReLU(inplace=True))
    return nn.Sequential(*layers)


class QueryInstStage(nn.Module):
    """MSA over the queries of an image, DynamicConv with the box RoI features, FFN, class and box
    towers, box-delta decoding.

    Module names follow Detectron2's Sparse R-CNN ``RCNNHead`` (see QUERYINST.md §9 for the mmdet
    names).
    """

    def __init__(
        self,
        *,
        num_classes: int,
        hidden_dim: int = 256,
        num_heads: int = 8,
        dim_feedforward: int = 2048,
        dropout: float = 0.0,
        dynamic_dim: int = 64,
        pooler_resolution: int = 7,
        num_cls_fcs: int = 1,
        num_reg_fcs: int = 3,
        bbox_weights: Sequence[float] = (2.0, 2.0, 1.0, 1.0),
        scale_clamp: Tuple = SCALE_CLAMPS["mmdet"],
    ):
        """
        Args:
            num_classes: K (sigmoid classifier, no background logit).
            hidden_dim: C.
            num_heads: heads of the self-attention.
            dim_feedforward: FFN hidden width.
            dropout: dropout of MSA, interaction residual and FFN.
            dynamic_dim: D of :class:`DynamicConv`.
            pooler_resolution: side S of the box RoI features.
            num_cls_fcs, num_reg_fcs: blocks of the class / box towers.
            bbox_weights, scale_clamp: see :func:`decode_box_deltas`.
        """
        super().__init__()
        self.hidden_dim = hidden_dim
        self.bbox_weights = tuple(bbox_weights)
        self.scale_clamp = tuple(scale_clamp)
        # batch_first=False as the official code (mmcv MultiheadAttention); sequence = queries
        self.self_attn = nn.MultiheadAttention(hidden_dim, num_heads, dropout=dropout)
        self.dropout1 = nn.Dropout(dropout)
        self.norm1 = nn.LayerNorm(hidden_dim)
        self.inst_interact = DynamicConv(hidden_dim, dynamic_dim, pooler_resolution, True)
        self.dropout2 = nn.Dropout(dropout)
        self.norm2 = nn.LayerNorm(hidden_dim)
        self.linear1 = nn.Linear(hidden_dim, dim_feedforward)
        self.dropout = nn.Dropout(dropout)
        self.linear2 = nn.Linear(dim_feedforward, hidden_dim)
        self.dropout3 = nn.Dropout(dropout)
        self.norm3 = nn.LayerNorm(hidden_dim)
        self.cls_module = _tower(hidden_dim, num_cls_fcs)
        self.reg_module = _tower(hidden_dim, num_reg_fcs)
        self.class_logits = nn.Linear(hidden_dim, num_classes)
        self.bboxes_delta = nn.Linear(hidden_dim, 4)

    def forward(
        self, roi_features: torch.Tensor, queries: torch.Tensor, boxes: torch.Tensor
    ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """
        Args:
            roi_features: (B*N, C, S, S) box RoI features, image-major.
            queries: (B, N, C) queries from the previous stage.
            boxes: (B, N, 4) xyxy boxes the RoIs were pooled from.

        Returns:
            logits: (B, N, K) class logits.
            pred_boxes: (B, N, 4) decoded xyxy boxes (with gradient).
            queries: (B, N, C) output queries q_t (input of the next stage).
            attn_queries: (B, N, C) q* = LN(q + MSA(q)), read by the dynamic mask head.
        """
        B, N, C = queries.shape
        q = queries.transpose(0, 1)  # (N, B, C)
        q = self.norm1(q + self.dropout1(self.self_attn(q, q, q)[0]))
        attn_queries = q.transpose(0, 1)  # (B, N, C)

        x = attn_queries.reshape(B * N, C)
        x = self.norm2(x + self.dropout2(self.inst_interact(x, roi_features)))
        x = self.norm3(x + self.dropout3(self.linear2(self.dropout(F.relu(self.linear1(x))))))

        logits = self.class_logits(self.cls_module(x))
        deltas = self.bboxes_delta(self.reg_module(x))
        pred_boxes = decode_box_deltas(
            deltas, boxes.reshape(-1, 4), self.bbox_weights, self.scale_clamp
        )
        return logits.view(B, N, -1), pred_boxes.view(B, N, 4), x.view(B, N, C), attn_queries
