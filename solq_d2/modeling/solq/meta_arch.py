"""SOLQ (Dong et al., NeurIPS 2021) as a Detectron2 meta-architecture."""

import copy
import math
from typing import Dict, List, Optional, Sequence, Tuple

import torch
from detectron2.config import configurable
from detectron2.modeling import META_ARCH_REGISTRY, Backbone, build_backbone
from detectron2.structures import BitMasks, ImageList, PolygonMasks
from torch import nn
from torchvision.ops import box_convert

from ..criterion import expand_weight_dict
from ..matcher import HungarianMatcher
from ..neck import InputProjection
from ..position_encoding import PositionEmbeddingSine
from ..transformer import MLP, DeformableTransformer, DeformableTransformerOutput
from .criterion import SOLQCriterion
from .dct import DCTMaskCoder
from .postprocess import (
    COCO_CATEGORY_IDS,
    coco_id_to_contiguous_table,
    solq_postprocess,
    to_instances,
)

__all__ = ["SOLQ"]


def _log_scalars(values: Dict[str, torch.Tensor]) -> None:
    try:
        from detectron2.utils.events import get_event_storage

        storage = get_event_storage()
    except AssertionError:  # not inside an EventStorage (e.g. a unit test)
        return
    storage.put_scalars(**{k: float(v) for k, v in values.items()})


@META_ARCH_REGISTRY.register()
class SOLQ(nn.Module):
    """Deformable DETR with box refinement + a unified query representation: each query
    predicts a class, a box and a DCT vector encoding its mask in the box.

    Parameter names follow the official code (``transformer.*``, ``input_proj.*``,
    ``query_embed``, ``class_embed``, ``bbox_embed``) except the Detectron2 backbone
    (``backbone.*``) and the shared mask MLP (``vector_embed.layers.*``, one module instead of
    six aliases); see :mod:`solq_d2.checkpoint.convert_solq`.

    Args:
        backbone: Detectron2 backbone returning ``in_features``.
        in_features: backbone outputs fed to the transformer, finest first.
        transformer: :class:`DeformableTransformer` (its ``box_refine``/``two_stage`` settings
            decide the head layout).
        num_classes: K classifier outputs.
        num_queries: Q (single-stage: learned ``query_embed`` (Q, 2d); two-stage: must equal
            the transformer's ``two_stage_num_proposals``).
        vector_hidden_dim: hidden size of the mask-vector MLP.
        mask_coder: :class:`DCTMaskCoder` (its ``n_keep`` is the vector length).
        criterion: :class:`SOLQCriterion`.
        aux_loss: supervise every decoder layer.
        pixel_mean, pixel_std: per-channel normalisation in ``INPUT.FORMAT`` order.
        size_divisibility: pad the batch to a multiple of this (0: only to the batch maximum).
        test_topk: detections per image.
        coco_id_labels: classifier index = COCO category id (official 91-way head); outputs are
            mapped to contiguous ids, training labels to COCO ids.
    """

    @configurable
    def __init__(
        self,
        *,
        backbone: Backbone,
        in_features: Sequence[str],
        transformer: DeformableTransformer,
        num_classes: int,
        num_queries: int,
        vector_hidden_dim: int,
        mask_coder: DCTMaskCoder,
        criterion: SOLQCriterion,
        aux_loss: bool = True,
        pixel_mean: Sequence[float],
        pixel_std: Sequence[float],
        size_divisibility: int = 0,
        test_topk: int = 100,
        coco_id_labels: bool = False,
        pe_temperature: float = 10000.0,
    ):
        super().__init__()
        self.backbone = backbone
        self.in_features = list(in_features)
        shapes = backbone.output_shape()
        missing = [f for f in self.in_features if f not in shapes]
        if missing:
            raise ValueError(f"backbone has no outputs {missing}; it has {sorted(shapes)}")
        d = transformer.d_model
        self.transformer = transformer
        self.num_classes = num_classes
        self.num_queries = num_queries
        self.aux_loss = aux_loss
        self.size_divisibility = size_divisibility
        self.test_topk = test_topk
        self.coco_id_labels = coco_id_labels
        self.two_stage = transformer.two_stage
        self.box_refine = transformer.decoder.box_refine
        if self.two_stage and num_queries != transformer.two_stage_num_proposals:
            raise ValueError(
                f"two-stage SOLQ: NUM_QUERIES ({num_queries}) must equal "
                f"TWO_STAGE_NUM_PROPOSALS ({transformer.two_stage_num_proposals})"
            )
        if coco_id_labels and num_classes <= max(COCO_CATEGORY_IDS):
            raise ValueError(
                f"COCO_ID_LABELS needs NUM_CLASSES > {max(COCO_CATEGORY_IDS)} (official: 91), "
                f"got {num_classes}"
            )

        self.input_proj = InputProjection(
            [shapes[f].channels for f in self.in_features], d, transformer.num_feature_levels
        )
        self.position_embedding = PositionEmbeddingSine(d // 2, pe_temperature, normalize=True)
        if not self.two_stage:
            self.query_embed = nn.Embedding(num_queries, 2 * d)
        self._build_heads(d, num_classes, vector_hidden_dim, mask_coder.n_keep)
        self.mask_coder = mask_coder
        self.criterion = criterion

        self.register_buffer("pixel_mean", torch.tensor(pixel_mean).view(-1, 1, 1), False)
        self.register_buffer("pixel_std", torch.tensor(pixel_std).view(-1, 1, 1), False)
        if coco_id_labels:
            self.register_buffer("label_table", coco_id_to_contiguous_table(num_classes), False)
            self.register_buffer("coco_ids", torch.tensor(COCO_CATEGORY_IDS), False)

    def _build_heads(self, d: int, num_classes: int, vector_hidden_dim: int, n_keep: int):
        """Official head layout and initialisation (SOLQ ``models/solq.py``)."""
        L = self.transformer.num_decoder_layers
        num_pred = L + 1 if self.two_stage else L
        class_embed = nn.Linear(d, num_classes)
        nn.init.constant_(class_embed.bias, -math.log((1 - 0.01) / 0.01))
        bbox_embed = MLP(d, d, 4, 3)
        nn.init.constant_(bbox_embed.layers[-1].weight, 0)
        nn.init.constant_(bbox_embed.layers[-1].bias, 0)
        if self.box_refine:  # one head per layer (+ the encoder-proposal head)
            self.class_embed = nn.ModuleList(copy.deepcopy(class_embed) for _ in range(num_pred))
            self.bbox_embed = nn.ModuleList(copy.deepcopy(bbox_embed) for _ in range(num_pred))
            nn.init.constant_(self.bbox_embed[0].layers[-1].bias[2:], -2.0)
        else:  # one head shared by all layers
            nn.init.constant_(bbox_embed.layers[-1].bias[2:], -2.0)
            self.class_embed = nn.ModuleList([class_embed])
            self.bbox_embed = nn.ModuleList([bbox_embed])
        if self.two_stage:
            for m in self.bbox_embed:
                nn.init.constant_(m.layers[-1].bias[2:], 0.0)
        self.vector_embed = MLP(d, vector_hidden_dim, n_keep, 3)
        nn.init.constant_(self.vector_embed.layers[-1].weight, 0)
        nn.init.constant_(self.vector_embed.layers[-1].bias, 0)
        nn.init.constant_(self.vector_embed.layers[-1].bias[2:], -2.0)  # official init quirk

    @classmethod
    def from_config(cls, cfg):
        s = cfg.MODEL.SOLQ
        t = cfg.MODEL.DEFORMABLE_TRANSFORMER
        transformer = DeformableTransformer(cfg)
        mask_coder = DCTMaskCoder(s.GT_MASK_LEN, s.N_KEEP, s.MASK_DECODE_THRESHOLD)
        matcher = HungarianMatcher(
            cost_class=s.COST_CLASS,
            cost_bbox=s.COST_BBOX,
            cost_giou=s.COST_GIOU,
            focal_alpha=s.FOCAL_ALPHA,
            focal_gamma=s.FOCAL_GAMMA,
        )
        weights = {
            "loss_ce": s.CLASS_WEIGHT,
            "loss_bbox": s.BBOX_WEIGHT,
            "loss_giou": s.GIOU_WEIGHT,
            "loss_vector": s.VECTOR_WEIGHT,
        }
        weights = expand_weight_dict(weights, t.DEC_LAYERS - 1 if s.AUX_LOSS else 0, t.TWO_STAGE)
        criterion = SOLQCriterion(
            num_classes=s.NUM_CLASSES,
            matcher=matcher,
            weight_dict=weights,
            mask_coder=mask_coder,
            vector_loss_coef=s.VECTOR_LOSS_COEF,
            vector_loss_norm=s.VECTOR_LOSS_NORM,
            focal_alpha=s.FOCAL_ALPHA,
            focal_gamma=s.FOCAL_GAMMA,
        )
        return {
            "backbone": build_backbone(cfg),
            "in_features": t.IN_FEATURES,
            "transformer": transformer,
            "num_classes": s.NUM_CLASSES,
            "num_queries": s.NUM_QUERIES,
            "vector_hidden_dim": s.VECTOR_HIDDEN_DIM,
            "mask_coder": mask_coder,
            "criterion": criterion,
            "aux_loss": s.AUX_LOSS,
            "pixel_mean": cfg.MODEL.PIXEL_MEAN,
            "pixel_std": cfg.MODEL.PIXEL_STD,
            "size_divisibility": s.SIZE_DIVISIBILITY,
            "test_topk": cfg.TEST.DETECTIONS_PER_IMAGE,
            "coco_id_labels": s.COCO_ID_LABELS,
            "pe_temperature": t.PE_TEMPERATURE,
        }

    @property
    def device(self) -> torch.device:
        return self.pixel_mean.device

    @staticmethod
    def _head(heads: nn.ModuleList, k: int) -> nn.Module:
        return heads[k] if len(heads) > 1 else heads[0]

    # ---- network --------------------------------------------------------------------------------
    def preprocess_image(self, batched_inputs: List[Dict]) -> Tuple[ImageList, torch.Tensor]:
        """Normalise, pad (zeros, bottom/right) and build the padding mask (B, Hp, Wp), True on
        padding."""
        images = [x["image"].to(self.device) for x in batched_inputs]
        images = [(x - self.pixel_mean) / self.pixel_std for x in images]
        images = ImageList.from_tensors(images, self.size_divisibility)
        return images, self.padding_mask(images)

    @staticmethod
    def padding_mask(images: ImageList) -> torch.Tensor:
        B, _, H, W = images.tensor.shape
        sizes = torch.as_tensor(images.image_sizes, device=images.tensor.device).view(B, 2)
        rows = torch.arange(H, device=sizes.device)[None, :, None] >= sizes[:, 0, None, None]
        cols = torch.arange(W, device=sizes.device)[None, None, :] >= sizes[:, 1, None, None]
        return rows | cols

    def forward_network(
        self, images: torch.Tensor, mask: torch.Tensor, all_layers: bool = True
    ) -> Tuple[Dict, DeformableTransformerOutput]:
        """Raw predictions of a normalised, padded batch.

        Args:
            images: (B, 3, Hp, Wp); mask: (B, Hp, Wp) bool, True on padding.
            all_layers: also predict the earlier decoder layers (``aux_outputs``).

        Returns:
            outputs: ``pred_logits`` (B, Q, K), ``pred_boxes`` (B, Q, 4) normalised cxcywh of
                the unpadded image, ``pred_vectors`` (B, Q, n_keep) for the last layer;
                ``aux_outputs`` (list of such dicts for layers 0..L-2) when ``all_layers``;
                ``enc_outputs`` (``pred_logits``, ``pred_boxes`` of all tokens) in two-stage.
            the transformer's output.
        """
        features = self.backbone(images)
        srcs, masks = self.input_proj([features[f] for f in self.in_features], mask)
        pos = [self.position_embedding(m).to(s.dtype) for m, s in zip(masks, srcs)]
        L = self.transformer.num_decoder_layers
        out = self.transformer(
            srcs,
            masks,
            pos,
            None if self.two_stage else self.query_embed.weight,
            bbox_embed=[self._head(self.bbox_embed, k) for k in range(L)],
            enc_class_embed=self._head(self.class_embed, L) if self.two_stage else None,
            enc_bbox_embed=self._head(self.bbox_embed, L) if self.two_stage else None,
        )
        layers = range(L) if all_layers else [L - 1]
        per_layer = [
            {
                "pred_logits": self._head(self.class_embed, k)(out.hs[k]),
                "pred_boxes": out.pred_boxes[k],
                "pred_vectors": self.vector_embed(out.hs[k]),
            }
            for k in layers
        ]
        outputs = dict(per_layer[-1])
        if all_layers:
            outputs["aux_outputs"] = per_layer[:-1]
        if self.two_stage:
            outputs["enc_outputs"] = {
                "pred_logits": out.enc_outputs_class,
                "pred_boxes": out.enc_outputs_coord,
            }
        return outputs, out

    # ---- training -------------------------------------------------------------------------------
    def prepare_targets(self, batched_inputs: List[Dict]) -> List[Dict[str, torch.Tensor]]:
        """Criterion targets from Detectron2 ``instances`` (boxes in input pixels)."""
        targets = []
        for x in batched_inputs:
            if "instances" not in x:
                raise ValueError("SOLQ training needs 'instances' in every input dict")
            inst = x["instances"].to(self.device)
            h, w = inst.image_size
            xyxy = inst.gt_boxes.tensor.to(torch.float32)
            scale = torch.tensor([w, h, w, h], dtype=torch.float32, device=self.device)
            labels = inst.gt_classes
            if self.coco_id_labels:
                labels = self.coco_ids[labels]
            if not inst.has("gt_masks"):
                if len(inst) > 0:
                    raise ValueError("SOLQ training needs instance masks (gt_masks)")
                masks = torch.zeros((0, h, w), dtype=torch.bool, device=self.device)
            elif isinstance(inst.gt_masks, PolygonMasks):
                masks = BitMasks.from_polygon_masks(inst.gt_masks, h, w).tensor.to(self.device)
            else:
                masks = inst.gt_masks.tensor
            targets.append(
                {
                    "labels": labels,
                    "boxes": box_convert(xyxy, "xyxy", "cxcywh") / scale,
                    "xyxy_boxes": xyxy,
                    "masks": masks,
                }
            )
        return targets

    def forward(self, batched_inputs: List[Dict]):
        """
        Args:
            batched_inputs: Detectron2 dicts with ``image`` (C, H, W) in ``INPUT.FORMAT``,
                ``instances`` (training: ``gt_boxes``, ``gt_classes``, ``gt_masks``) and
                optionally ``height``/``width`` (requested output size at inference).

        Returns:
            training: dict of weighted losses. inference: one ``{"instances": Instances}`` per
            image with ``pred_boxes``, ``scores``, ``pred_classes``, ``pred_masks`` (bool, at the
            requested output size).
        """
        images, mask = self.preprocess_image(batched_inputs)
        if not self.training:
            return self.inference(batched_inputs, images, mask)
        outputs, _ = self.forward_network(images.tensor, mask, all_layers=self.aux_loss)
        losses = self.criterion(outputs, self.prepare_targets(batched_inputs))
        _log_scalars({k: v for k, v in losses.items() if k not in self.criterion.weight_dict})
        return self.criterion.weighted(losses)

    # ---- inference ------------------------------------------------------------------------------
    def inference(
        self,
        batched_inputs: List[Dict],
        images: Optional[ImageList] = None,
        mask: Optional[torch.Tensor] = None,
    ) -> List[Dict]:
        if images is None:
            images, mask = self.preprocess_image(batched_inputs)
        outputs, _ = self.forward_network(images.tensor, mask, all_layers=False)
        sizes = [
            (x.get("height", hw[0]), x.get("width", hw[1]))
            for x, hw in zip(batched_inputs, images.image_sizes)
        ]
        results = solq_postprocess(
            outputs["pred_logits"],
            outputs["pred_boxes"],
            outputs["pred_vectors"],
            sizes,
            self.mask_coder,
            topk=self.test_topk,
            label_table=self.label_table if self.coco_id_labels else None,
        )
        return [{"instances": to_instances(r, s)} for r, s in zip(results, sizes)]
