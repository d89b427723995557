"""QueryInst ("Instances as Queries", ICCV 2021) as a Detectron2 meta-architecture."""

import logging
from typing import Dict, List, Optional, Sequence

import torch
import torch.nn.functional as F
from detectron2.config import configurable
from detectron2.modeling import META_ARCH_REGISTRY, Backbone, build_backbone
from detectron2.structures import BitMasks, ImageList, Instances, PolygonMasks
from detectron2.utils.events import get_event_storage
from torch import nn
from torchvision.ops import box_convert

from .criterion import QueryInstCriterion
from .head import QueryInstHead
from .postprocess import rescale_instances, select_topk

__all__ = ["QueryInst"]

logger = logging.getLogger(__name__)


@META_ARCH_REGISTRY.register()
class QueryInst(nn.Module):
    """Sparse R-CNN (learned proposal boxes and features refined by S dynamic stages) with a
    dynamic mask head per stage, all stages supervised in parallel; inference uses the last
    stage's boxes and mask head. With ``MODEL.MASK_ON=False`` this is Sparse R-CNN.

    Parameter names follow Detectron2's Sparse R-CNN (``init_proposal_boxes``,
    ``init_proposal_features``, ``head.head_series.{s}``) plus ``head.mask_heads.{s}``, so official
    mmdet QueryInst checkpoints convert one-to-one (``solq_d2.checkpoint.convert_queryinst``).
    """

    @configurable
    def __init__(
        self,
        *,
        backbone: Backbone,
        head: QueryInstHead,
        criterion: QueryInstCriterion,
        in_features: Sequence[str],
        num_queries: int,
        hidden_dim: int,
        pixel_mean: Sequence[float],
        pixel_std: Sequence[float],
        test_topk: int = 100,
        mask_threshold: float = 0.5,
        clip_boxes: bool = False,
        prior_prob: float = 0.01,
    ):
        """
        Args:
            backbone: FPN backbone; its ``in_features`` maps are pooled (strides 4..32).
            head: the S stages and mask heads.
            criterion: per-stage matching and losses.
            in_features: names of the pooled feature maps, finest first.
            num_queries: N learned proposals.
            hidden_dim: C, width of the proposal features.
            pixel_mean, pixel_std: input normalisation, in ``INPUT.FORMAT`` channel order.
            test_topk: detections per image.
            mask_threshold: binarisation threshold of pasted masks.
            clip_boxes: clip output boxes (Detectron2 behaviour) instead of the official unclipped
                boxes; see :func:`rescale_instances`.
            prior_prob: class-bias init probability.
        """
        super().__init__()
        self.backbone = backbone
        self.head = head
        self.criterion = criterion
        self.in_features = list(in_features)
        self.num_queries = num_queries
        self.test_topk = test_topk
        self.mask_threshold = mask_threshold
        self.clip_boxes = clip_boxes
        self.register_buffer("pixel_mean", torch.tensor(pixel_mean).view(-1, 1, 1), False)
        self.register_buffer("pixel_std", torch.tensor(pixel_std).view(-1, 1, 1), False)

        # learned proposals: normalised cxcywh boxes (whole image at init) and features N(0, 1)
        self.init_proposal_features = nn.Embedding(num_queries, hidden_dim)
        self.init_proposal_boxes = nn.Embedding(num_queries, 4)
        nn.init.constant_(self.init_proposal_boxes.weight[:, :2], 0.5)
        nn.init.constant_(self.init_proposal_boxes.weight[:, 2:], 1.0)
        self.head.reset_parameters(prior_prob)

    @classmethod
    def from_config(cls, cfg):
        q = cfg.MODEL.QUERYINST
        if len(q.STAGE_LOSS_WEIGHTS) != q.NUM_STAGES:
            raise ValueError(
                f"MODEL.QUERYINST.STAGE_LOSS_WEIGHTS has {len(q.STAGE_LOSS_WEIGHTS)} entries for "
                f"NUM_STAGES={q.NUM_STAGES}"
            )
        backbone = build_backbone(cfg)
        shapes = backbone.output_shape()
        missing = [f for f in q.IN_FEATURES if f not in shapes]
        if missing:
            raise ValueError(
                f"MODEL.QUERYINST.IN_FEATURES {missing} are not outputs of the backbone "
                f"({sorted(shapes)})"
            )
        criterion = QueryInstCriterion(
            num_classes=q.NUM_CLASSES,
            cost_class=q.COST_CLASS,
            cost_bbox=q.COST_BBOX,
            cost_giou=q.COST_GIOU,
            class_weight=q.CLASS_WEIGHT,
            l1_weight=q.L1_WEIGHT,
            giou_weight=q.GIOU_WEIGHT,
            mask_weight=q.MASK_WEIGHT,
            focal_alpha=q.FOCAL_ALPHA,
            focal_gamma=q.FOCAL_GAMMA,
            stage_weights=q.STAGE_LOSS_WEIGHTS,
        )
        return {
            "backbone": backbone,
            "head": QueryInstHead(cfg, shapes),
            "criterion": criterion,
            "in_features": q.IN_FEATURES,
            "num_queries": q.NUM_QUERIES,
            "hidden_dim": q.HIDDEN_DIM,
            "pixel_mean": cfg.MODEL.PIXEL_MEAN,
            "pixel_std": cfg.MODEL.PIXEL_STD,
            "test_topk": q.TEST_TOPK,
            "mask_threshold": q.MASK_THRESHOLD,
            "clip_boxes": q.CLIP_BOXES,
            "prior_prob": q.PRIOR_PROB,
        }

    @property
    def device(self) -> torch.device:
        return self.pixel_mean.device

    @property
    def mask_on(self) -> bool:
        return self.head.mask_on

    def forward(self, batched_inputs: List[Dict]):
        """
        Args:
            batched_inputs: Detectron2 dicts: ``image`` (C, H, W) in ``INPUT.FORMAT``;
                in training ``instances`` with ``gt_boxes`` (xyxy input pixels), ``gt_classes``
                and, with masks, ``gt_masks`` (BitMasks or PolygonMasks); optional ``height``,
                ``width`` (output size, default the input size).

        Returns:
            Training: dict of weighted losses (``stage{s}_loss_cls/bbox/iou/mask``).
            Inference: per image ``{"instances": Instances}`` with ``pred_boxes`` (xyxy output
            pixels), ``scores``, ``pred_classes`` and ``pred_masks`` (k, H, W) bool.
        """
        if not self.training:
            return self.inference(batched_inputs)
        losses, metrics, _ = self.compute_losses(batched_inputs)
        self._log_metrics(metrics)
        return losses

    def compute_losses(self, batched_inputs: List[Dict]):
        """Training forward: the stages with per-stage matching, then the criterion.

        Returns:
            losses: dict of weighted losses; metrics: ``stage{s}_pos_acc``; outputs: the per-stage
            dicts of :class:`QueryInstHead` (with ``indices``).
        """
        images = self.preprocess_image(batched_inputs)
        features, boxes, queries, whwh = self._prepare(images)
        targets = self.prepare_targets(batched_inputs, images)

        def match_fn(stage: int, out: Dict[str, torch.Tensor]):
            return self.criterion.match(out["pred_logits"], out["pred_boxes"], targets, whwh)

        outputs = self.head(features, boxes, queries, match_fn=match_fn)
        losses, metrics = self.criterion(outputs, targets, whwh)
        return losses, metrics, outputs

    def inference(self, batched_inputs: List[Dict], do_postprocess: bool = True):
        """Inference on ``batched_inputs``; with ``do_postprocess=False`` the detections stay in
        input-image coordinates with 28x28 mask probabilities (``pred_masks`` (k, 1, 28, 28))."""
        assert not self.training
        images = self.preprocess_image(batched_inputs)
        features, outputs = self.forward_stages(images)
        return self.detections(features, outputs, images, batched_inputs, do_postprocess)

    def detections(
        self,
        features: List[torch.Tensor],
        outputs: List[Dict[str, torch.Tensor]],
        images: ImageList,
        batched_inputs: List[Dict],
        do_postprocess: bool = True,
    ):
        """Top-k detections of the last stage (:func:`select_topk`), the last mask head run on
        the detected queries, and, with ``do_postprocess``, the resizing to each input's
        ``height`` x ``width`` (:func:`rescale_instances`)."""
        last = outputs[-1]
        mask_logits_fn = None
        if self.mask_on:

            def mask_logits_fn(batch_idx, query_idx):
                boxes = last["pred_boxes"][batch_idx, query_idx]
                rois = torch.cat([batch_idx[:, None].to(boxes.dtype), boxes], dim=1)
                queries = last["attn_queries"][batch_idx, query_idx]
                return self.head.mask_forward(len(outputs) - 1, features, rois, queries)

        results = select_topk(
            last["pred_logits"],
            last["pred_boxes"],
            images.image_sizes,
            self.test_topk,
            mask_logits_fn,
        )
        if not do_postprocess:
            return results
        processed = []
        for res, inp, image_size in zip(results, batched_inputs, images.image_sizes):
            height = inp.get("height", image_size[0])
            width = inp.get("width", image_size[1])
            r = rescale_instances(res, height, width, self.mask_threshold, self.clip_boxes)
            processed.append({"instances": r})
        return processed

    def forward_stages(self, images: ImageList, all_stage_masks: bool = False):
        """Backbone, proposals and the S stages without matching.

        Returns:
            features: the pooled FPN maps; outputs: the per-stage dicts of
            :class:`QueryInstHead` (with every stage's ``pred_mask_logits`` on all queries if
            ``all_stage_masks``, for analysis).
        """
        features, boxes, queries, _ = self._prepare(images)
        return features, self.head(features, boxes, queries, all_stage_masks=all_stage_masks)

    def _prepare(self, images: ImageList):
        features = self.backbone(images.tensor)
        features = [features[f] for f in self.in_features]
        whwh = torch.tensor(
            [[w, h, w, h] for h, w in images.image_sizes],
            dtype=features[0].dtype,
            device=self.device,
        )
        B = len(images.image_sizes)
        boxes = box_convert(self.init_proposal_boxes.weight, "cxcywh", "xyxy")
        boxes = boxes[None] * whwh[:, None, :]
        queries = self.init_proposal_features.weight[None].expand(B, -1, -1)
        return features, boxes, queries, whwh

    def preprocess_image(self, batched_inputs: List[Dict]) -> ImageList:
        """Normalise and pad the images (zeros, bottom/right, to the backbone's divisibility)."""
        images = [x["image"].to(self.device) for x in batched_inputs]
        images = [(x - self.pixel_mean) / self.pixel_std for x in images]
        return ImageList.from_tensors(images, self.backbone.size_divisibility)

    def prepare_targets(self, batched_inputs: List[Dict], images: ImageList) -> List[Dict]:
        """Per image ``labels`` (T,), ``boxes`` (T, 4) xyxy input pixels and, with masks,
        ``masks`` (T, H_pad, W_pad) bool: GT bitmaps on the padded batch (polygons are rasterised
        at full resolution, as mmdet's ``poly2mask``)."""
        if any("instances" not in x for x in batched_inputs):
            raise ValueError("QueryInst training needs 'instances' in every input dict")
        H, W = images.tensor.shape[-2:]
        targets = []
        for x in batched_inputs:
            inst: Instances = x["instances"].to(self.device)
            t = {"labels": inst.gt_classes, "boxes": inst.gt_boxes.tensor}
            if self.mask_on:
                t["masks"] = self._padded_bitmasks(inst, H, W)
            targets.append(t)
        return targets

    def _padded_bitmasks(self, inst: Instances, H: int, W: int) -> torch.Tensor:
        if not inst.has("gt_masks"):
            if len(inst) == 0:
                return torch.zeros((0, H, W), dtype=torch.bool, device=self.device)
            raise ValueError(
                "QueryInst with MODEL.MASK_ON needs 'gt_masks' in the instances (load the dataset "
                "with masks), or set MODEL.MASK_ON=False to train Sparse R-CNN"
            )
        masks = inst.gt_masks
        if isinstance(masks, PolygonMasks):
            return BitMasks.from_polygon_masks(masks, H, W).tensor.to(self.device)
        if isinstance(masks, BitMasks):
            t = masks.tensor.to(device=self.device, dtype=torch.bool)
            return F.pad(t, (0, W - t.shape[-1], 0, H - t.shape[-2]))
        raise TypeError(f"unsupported gt_masks type {type(masks).__name__}")

    def _log_metrics(self, metrics: Dict[str, float]):
        try:
            storage = get_event_storage()
        except AssertionError:  # no EventStorage outside a trainer
            return
        storage.put_scalars(**metrics)
