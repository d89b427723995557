"""The S dynamic stages of QueryInst with their box and mask RoI poolers and mask heads."""

import math
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch
from detectron2.config import configurable
from detectron2.layers import ShapeSpec
from torch import nn

from .mask_head import DynamicMaskHead
from .pooler import QueryInstROIPooler
from .stage import SCALE_CLAMPS, QueryInstStage

__all__ = ["QueryInstHead", "boxes_to_rois"]

# (stage index, stage outputs) -> per image (query indices, GT indices), both int64 (M_b,)
MatchFn = Callable[[int, Dict[str, torch.Tensor]], List[Tuple[torch.Tensor, torch.Tensor]]]


def boxes_to_rois(boxes: torch.Tensor) -> torch.Tensor:
    """(B, N, 4) xyxy boxes -> (B*N, 5) RoIs (batch index, x1, y1, x2, y2), image-major."""
    B, N, _ = boxes.shape
    batch_idx = torch.arange(B, device=boxes.device, dtype=boxes.dtype).repeat_interleave(N)
    return torch.cat([batch_idx[:, None], boxes.reshape(B * N, 4)], dim=1)


class QueryInstHead(nn.Module):
    """Runs the stages t = 1..S: box RoIAlign of b_{t-1}, :class:`QueryInstStage`, then (with
    masks) the stage's :class:`DynamicMaskHead` on 14x14 RoIAlign of the detached b_t with q*_t.

    In training, a ``match_fn`` assigns queries to ground truth after each stage and only the
    matched queries go through that stage's mask head (as the official code: the mask-head
    BatchNorm sees the positives of the batch). In inference the mask heads do not run here (the
    meta-architecture runs the last one on the detected queries, :meth:`mask_forward`) unless
    ``all_stage_masks`` is asked for.
    """

    @configurable
    def __init__(
        self,
        *,
        stages: List[QueryInstStage],
        mask_heads: Optional[List[DynamicMaskHead]],
        box_pooler: QueryInstROIPooler,
        mask_pooler: Optional[QueryInstROIPooler],
    ):
        """
        Args:
            stages: S stage modules.
            mask_heads: S mask heads, or None for a box-only model (Sparse R-CNN).
            box_pooler: 7x7 RoI pooler.
            mask_pooler: 14x14 RoI pooler (None without masks).
        """
        super().__init__()
        self.head_series = nn.ModuleList(stages)
        self.mask_on = mask_heads is not None
        if self.mask_on:
            assert len(mask_heads) == len(stages) and mask_pooler is not None
            self.mask_heads = nn.ModuleList(mask_heads)
        self.box_pooler = box_pooler
        self.mask_pooler = mask_pooler

    @classmethod
    def from_config(cls, cfg, input_shape: Dict[str, ShapeSpec]):
        q = cfg.MODEL.QUERYINST
        in_features = q.IN_FEATURES
        scales = tuple(1.0 / input_shape[f].stride for f in in_features)
        channels = {input_shape[f].channels for f in in_features}
        if channels != {q.HIDDEN_DIM}:
            raise ValueError(
                f"MODEL.QUERYINST.HIDDEN_DIM={q.HIDDEN_DIM} must equal the channels of the pooled "
                f"features {in_features} ({sorted(channels)}; MODEL.FPN.OUT_CHANNELS)"
            )
        if q.SCALE_CLAMP not in SCALE_CLAMPS:
            raise ValueError(
                f"MODEL.QUERYINST.SCALE_CLAMP={q.SCALE_CLAMP!r}; expected one of "
                f"{sorted(SCALE_CLAMPS)}"
            )
        if q.NUM_STAGES < 1:
            raise ValueError(f"MODEL.QUERYINST.NUM_STAGES={q.NUM_STAGES} must be >= 1")

        def pooler(resolution):
            return QueryInstROIPooler(
                output_size=resolution,
                scales=scales,
                sampling_ratio=q.POOLER_SAMPLING_RATIO,
                pooler_type=q.POOLER_TYPE,
                finest_scale=q.FINEST_SCALE,
            )

        stages = [
            QueryInstStage(
                num_classes=q.NUM_CLASSES,
                hidden_dim=q.HIDDEN_DIM,
                num_heads=q.NUM_HEADS,
                dim_feedforward=q.DIM_FEEDFORWARD,
                dropout=q.DROPOUT,
                dynamic_dim=q.DYNAMIC_DIM,
                pooler_resolution=q.BOX_POOLER_RESOLUTION,
                num_cls_fcs=q.NUM_CLS_FCS,
                num_reg_fcs=q.NUM_REG_FCS,
                bbox_weights=q.BBOX_REG_WEIGHTS,
                scale_clamp=SCALE_CLAMPS[q.SCALE_CLAMP],
            )
            for _ in range(q.NUM_STAGES)
        ]
        mask_heads = None
        if cfg.MODEL.MASK_ON:
            mask_heads = [
                DynamicMaskHead(
                    num_classes=q.NUM_CLASSES,
                    hidden_dim=q.HIDDEN_DIM,
                    dynamic_dim=q.DYNAMIC_DIM,
                    pooler_resolution=q.MASK_POOLER_RESOLUTION,
                    num_convs=q.MASK_NUM_CONVS,
                    conv_dim=q.MASK_CONV_DIM,
                    norm=q.MASK_NORM,
                )
                for _ in range(q.NUM_STAGES)
            ]
        return {
            "stages": stages,
            "mask_heads": mask_heads,
            "box_pooler": pooler(q.BOX_POOLER_RESOLUTION),
            "mask_pooler": pooler(q.MASK_POOLER_RESOLUTION) if mask_heads else None,
        }

    def reset_parameters(self, prior_prob: float = 0.01):
        """Official initialisation (QUERYINST.md §7): xavier-uniform for every >= 2-D parameter of
        the stages and mask heads, class-logit bias -log((1 - p) / p), mask predictor bias 0;
        LayerNorm / BatchNorm and the other biases keep PyTorch's defaults."""
        bias_value = -math.log((1 - prior_prob) / prior_prob)
        for stage in self.head_series:
            for p in stage.parameters():
                if p.dim() > 1:
                    nn.init.xavier_uniform_(p)
            nn.init.constant_(stage.class_logits.bias, bias_value)
        if self.mask_on:
            for head in self.mask_heads:
                for p in head.parameters():
                    if p.dim() > 1:
                        nn.init.xavier_uniform_(p)
                nn.init.constant_(head.predictor.bias, 0.0)

    @property
    def num_stages(self) -> int:
        return len(self.head_series)

    def mask_forward(
        self, stage: int, features: List[torch.Tensor], rois: torch.Tensor, queries: torch.Tensor
    ) -> torch.Tensor:
        """Mask logits (R, K, 2S, 2S) of stage ``stage``'s head for RoIs (R, 5), queries (R, C)."""
        roi_features = self.mask_pooler(features, rois)
        return self.mask_heads[stage](roi_features, queries)

    def forward(
        self,
        features: List[torch.Tensor],
        boxes: torch.Tensor,
        queries: torch.Tensor,
        match_fn: Optional[MatchFn] = None,
        all_stage_masks: bool = False,
    ) -> List[Dict[str, torch.Tensor]]:
        """
        Args:
            features: FPN maps (B, C, H_l, W_l), finest first.
            boxes: (B, N, 4) initial xyxy proposals in input pixels.
            queries: (B, N, C) initial proposal features.
            match_fn: training only; see ``MatchFn``. Enables the mask heads on matched queries.
            all_stage_masks: inference: run every stage's mask head on all queries (analysis and
                parity tests).

        Returns:
            One dict per stage with ``input_boxes`` (B, N, 4), ``pred_logits`` (B, N, K),
            ``pred_boxes`` (B, N, 4, with gradient), ``queries`` (B, N, C), ``attn_queries``
            (B, N, C); with ``match_fn``: ``indices`` (list of (query idx, GT idx) per image) and,
            with masks, ``pos_mask_logits`` (P, K, 28, 28) for the matched queries in image-major
            order (None, with a zero ``mask_zero_loss``, when the batch has no GT); with
            ``all_stage_masks``, ``pred_mask_logits`` (B, N, K, 28, 28).
        """
        outputs = []
        B, N, _ = boxes.shape
        for s, stage in enumerate(self.head_series):
            roi_features = self.box_pooler(features, boxes_to_rois(boxes))
            logits, pred_boxes, queries, attn_queries = stage(roi_features, queries, boxes)
            out = {
                "input_boxes": boxes,
                "pred_logits": logits,
                "pred_boxes": pred_boxes,
                "queries": queries,
                "attn_queries": attn_queries,
            }
            boxes = pred_boxes.detach()
            if match_fn is not None:
                out["indices"] = indices = match_fn(s, out)
                if self.mask_on and sum(len(src) for src, _ in indices) == 0:
                    # no GT in the batch: skip the head (BatchNorm on 0 RoIs would write NaN
                    # running stats) and keep its parameters in the graph with a zero loss
                    head = self.mask_heads[s]
                    out["pos_mask_logits"] = None
                    out["mask_zero_loss"] = sum(p.sum() for p in head.parameters()) * 0.0
                elif self.mask_on:
                    batch_idx = torch.cat(
                        [torch.full_like(src, b) for b, (src, _) in enumerate(indices)]
                    )
                    query_idx = torch.cat([src for src, _ in indices])
                    pos_boxes = boxes[batch_idx, query_idx]
                    rois = torch.cat([batch_idx[:, None].to(pos_boxes.dtype), pos_boxes], dim=1)
                    out["pos_mask_logits"] = self.mask_forward(
                        s, features, rois, attn_queries[batch_idx, query_idx]
                    )
            elif self.mask_on and all_stage_masks:
                mask_logits = self.mask_forward(
                    s, features, boxes_to_rois(boxes), attn_queries.reshape(B * N, -1)
                )
                out["pred_mask_logits"] = mask_logits.view(B, N, *mask_logits.shape[1:])
            outputs.append(out)
        return outputs
