"""``SOIT`` meta-architecture: two-stage Deformable DETR whose queries generate their own
instance-aware mask layer (Yu et al., "SOIT: Segmenting Objects with Instance-Aware
Transformers", AAAI 2022; authors' code: hikvision-research/opera)."""

import logging
from typing import Dict, List

import torch
from torch import nn

from detectron2.config import configurable
from detectron2.modeling import META_ARCH_REGISTRY, build_backbone
from detectron2.structures import BitMasks, ImageList, PolygonMasks
from torchvision.ops import box_convert

from ..matcher import HungarianMatcher
from ..neck import InputProjection
from ..position_encoding import PositionEmbeddingSine
from ..transformer import DeformableTransformer
from .criterion import SOITSetCriterion
from .dynamic_head import SOITDynamicMaskHead, valid_sizes
from .head import SOITPredictionHeads
from .mask_encoder import SOITMaskEncoder
from .matcher import SOITHungarianMatcher
from .postprocess import soit_postprocess

__all__ = ["SOIT"]

logger = logging.getLogger(__name__)


@META_ARCH_REGISTRY.register()
class SOIT(nn.Module):
    """SOIT (SOIT.md §1): ResNet C3-C5 -> input projections (+ a stride-64 level) -> deformable
    encoder -> two-stage top-N proposals -> deformable decoder with box refinement; every decoder
    layer predicts classes, boxes and D mask parameters per query; the mask encoder turns the
    stride-8 memory into C_mask-channel features on which each instance's generated deformable
    attention layer produces its mask.

    Args:
        backbone: Detectron2 backbone; ``in_features`` are the maps used (finest first).
        input_proj: :class:`InputProjection`.
        position_embedding: :class:`PositionEmbeddingSine`.
        transformer: :class:`DeformableTransformer` (two-stage and box refinement in SOIT).
        mask_encoder: :class:`SOITMaskEncoder`.
        head: :class:`SOITPredictionHeads`.
        mask_head: :class:`SOITDynamicMaskHead`.
        criterion: :class:`SOITSetCriterion`.
        num_queries: N (the number of two-stage proposals, or of learned queries).
        test_topk: detections kept per image.
        mask_threshold: binary-mask probability threshold.
        mask_crop_padding: crop the padding before resizing the masks (SOIT.md §7 fix).
        pixel_mean, pixel_std: input normalisation (per channel, in ``INPUT.FORMAT`` order).
        size_divisibility: the padded batch is a multiple of this.
    """

    @configurable
    def __init__(
        self,
        *,
        backbone: nn.Module,
        in_features: List[str],
        input_proj: InputProjection,
        position_embedding: PositionEmbeddingSine,
        transformer: DeformableTransformer,
        mask_encoder: SOITMaskEncoder,
        head: SOITPredictionHeads,
        mask_head: SOITDynamicMaskHead,
        criterion: SOITSetCriterion,
        num_queries: int,
        test_topk: int = 100,
        mask_threshold: float = 0.5,
        mask_crop_padding: bool = False,
        pixel_mean: List[float],
        pixel_std: List[float],
        size_divisibility: int = 1,
    ):
        super().__init__()
        self.backbone = backbone
        self.in_features = list(in_features)
        self.input_proj = input_proj
        self.position_embedding = position_embedding
        self.transformer = transformer
        self.mask_encoder = mask_encoder
        self.head = head
        self.mask_head = mask_head
        self.criterion = criterion
        self.num_queries = num_queries
        self.test_topk = test_topk
        self.mask_threshold = mask_threshold
        self.mask_crop_padding = mask_crop_padding
        self.size_divisibility = size_divisibility
        if transformer.two_stage:
            self.query_embed = None
        else:
            self.query_embed = nn.Embedding(num_queries, 2 * transformer.d_model)
        self.register_buffer("pixel_mean", torch.tensor(pixel_mean).view(-1, 1, 1), False)
        self.register_buffer("pixel_std", torch.tensor(pixel_std).view(-1, 1, 1), False)

    @classmethod
    def from_config(cls, cfg):
        s = cfg.MODEL.SOIT
        t = cfg.MODEL.DEFORMABLE_TRANSFORMER
        backbone = build_backbone(cfg)
        shapes = backbone.output_shape()
        missing = [f for f in t.IN_FEATURES if f not in shapes]
        if missing:
            raise ValueError(
                f"MODEL.DEFORMABLE_TRANSFORMER.IN_FEATURES {missing} are not outputs of the "
                f"backbone ({sorted(shapes)}); set MODEL.RESNETS.OUT_FEATURES accordingly"
            )
        if shapes[t.IN_FEATURES[0]].stride != 8:
            raise ValueError(
                "SOIT's mask features come from the first level, which must have stride 8; "
                f"{t.IN_FEATURES[0]} has stride {shapes[t.IN_FEATURES[0]].stride}"
            )
        if s.NUM_CLASSES < 1 or s.NUM_QUERIES < 1:
            raise ValueError("MODEL.SOIT.NUM_CLASSES and MODEL.SOIT.NUM_QUERIES must be positive")
        d = t.HIDDEN_DIM
        transformer = DeformableTransformer(cfg, two_stage_num_proposals=s.NUM_QUERIES)
        mask_head = SOITDynamicMaskHead(
            mask_channels=s.MASK_CHANNELS,
            num_heads=s.DYN_HEADS,
            num_points=s.DYN_POINTS,
            upsample=s.MASK_UPSAMPLE,
            pos_embed=s.DYN_POS_EMBED,
        )
        matcher_kwargs = dict(
            cost_class=s.COST_CLASS,
            cost_bbox=s.COST_BBOX,
            cost_giou=s.COST_GIOU,
            focal_alpha=s.FOCAL_ALPHA,
            focal_gamma=s.FOCAL_GAMMA,
            focal_eps=1e-12,  # mmdet FocalLossCost
        )
        if s.COST_DICE > 0 or s.COST_MASK > 0:
            matcher = SOITHungarianMatcher(
                mask_head=mask_head,
                cost_dice=s.COST_DICE,
                cost_mask=s.COST_MASK,
                num_points=s.MATCHER_NUM_POINTS,
                **matcher_kwargs,
            )
        else:
            matcher = HungarianMatcher(**matcher_kwargs)
        base = {"loss_ce": s.CLASS_WEIGHT, "loss_bbox": s.BBOX_WEIGHT, "loss_giou": s.GIOU_WEIGHT}
        dec = dict(base, loss_dice=s.DICE_WEIGHT, loss_bce=s.BCE_WEIGHT)
        weight_dict = {**dec}
        for i in range(t.DEC_LAYERS - 1):
            weight_dict.update({f"{k}_{i}": v for k, v in dec.items()})
        if t.TWO_STAGE:
            weight_dict.update({f"{k}_enc": v for k, v in base.items()})
        criterion = SOITSetCriterion(
            num_classes=s.NUM_CLASSES,
            matcher=matcher,
            weight_dict=weight_dict,
            losses=("labels", "boxes"),
            enc_losses=("labels", "boxes"),
            focal_alpha=s.FOCAL_ALPHA,
            focal_gamma=s.FOCAL_GAMMA,
            mask_head=mask_head,
            mask_loss_layers=s.MASK_LOSS_LAYERS,
            valid_only=s.MASK_LOSS_VALID_ONLY,
        )
        return {
            "backbone": backbone,
            "in_features": t.IN_FEATURES,
            "input_proj": InputProjection(
                [shapes[f].channels for f in t.IN_FEATURES], d, t.NUM_FEATURE_LEVELS, bias=False
            ),
            "position_embedding": PositionEmbeddingSine(
                d // 2, temperature=t.PE_TEMPERATURE, normalize=True, offset=-0.5
            ),
            "transformer": transformer,
            "mask_encoder": SOITMaskEncoder(
                d_model=d,
                mask_channels=s.MASK_CHANNELS,
                num_layers=s.MASK_ENCODER.NUM_LAYERS,
                n_heads=s.MASK_ENCODER.NHEADS,
                n_points=s.MASK_ENCODER.N_POINTS,
                d_ffn=s.MASK_ENCODER.DIM_FEEDFORWARD,
                dropout=t.DROPOUT,
                activation=t.ACTIVATION,
                msda_impl=cfg.MODEL.MSDA.IMPL,
            ),
            "head": SOITPredictionHeads(
                d,
                s.NUM_CLASSES,
                t.DEC_LAYERS,
                mask_head.param_dim,
                s.PARAM_MLP_HIDDEN_LAYERS,
                two_stage=t.TWO_STAGE,
            ),
            "mask_head": mask_head,
            "criterion": criterion,
            "num_queries": s.NUM_QUERIES,
            "test_topk": cfg.TEST.DETECTIONS_PER_IMAGE,
            "mask_threshold": s.MASK_THRESHOLD,
            "mask_crop_padding": s.MASK_CROP_PADDING,
            "pixel_mean": cfg.MODEL.PIXEL_MEAN,
            "pixel_std": cfg.MODEL.PIXEL_STD,
            "size_divisibility": s.SIZE_DIVISIBILITY,
        }

    @property
    def device(self) -> torch.device:
        return self.pixel_mean.device

    # ------------------------------------------------------------------ forward
    def forward(self, batched_inputs: List[Dict]):
        """
        Args:
            batched_inputs: Detectron2 dicts with ``image`` (C, H, W) in ``INPUT.FORMAT``,
                optional ``height``/``width`` (output size) and, in training, ``instances``
                (``gt_boxes``, ``gt_classes``, ``gt_masks``).

        Returns:
            Training: dict of weighted losses. Inference: list of ``{"instances": Instances}``
            with ``pred_boxes``, ``scores``, ``pred_classes``, ``pred_masks`` at the output size.
        """
        images = self.preprocess_image(batched_inputs)
        outputs = self.forward_outputs(images)
        if self.training:
            targets = self.prepare_targets(batched_inputs, images)
            return self.criterion.weighted(self.criterion(outputs, targets))
        sizes = [
            (x.get("height", h), x.get("width", w))
            for x, (h, w) in zip(batched_inputs, images.image_sizes)
        ]
        return [{"instances": r} for r in self.inference(outputs, images, sizes)]

    def preprocess_image(self, batched_inputs: List[Dict]) -> ImageList:
        images = [
            (x["image"].to(self.device) - self.pixel_mean) / self.pixel_std for x in batched_inputs
        ]
        return ImageList.from_tensors(images, self.size_divisibility)

    def forward_outputs(self, images: ImageList) -> Dict:
        """Network outputs on a normalised, padded batch.

        Returns:
            dict: ``pred_logits`` (B, Q, K), ``pred_boxes`` (B, Q, 4) normalised cxcywh,
            ``pred_params`` (B, Q, D) of the last decoder layer; ``aux_outputs`` (the same for
            the earlier layers); with two-stage ``enc_outputs`` (``pred_logits`` (B, S, K),
            ``pred_boxes`` (B, S, 4)) and ``enc_topk_indices`` (B, Q); ``mask_features``
            (B, h, w, C), ``mask_valid_hw`` (B, 2), ``mask_padding`` (B, h, w) at stride 8.
        """
        x = images.tensor
        B, _, Hp, Wp = x.shape
        pad = torch.ones((B, Hp, Wp), dtype=torch.bool, device=x.device)
        for i, (h, w) in enumerate(images.image_sizes):
            pad[i, :h, :w] = False
        feats = self.backbone(x)
        srcs, masks = self.input_proj([feats[f] for f in self.in_features], pad)
        pos = [self.position_embedding(m).to(s.dtype) for m, s in zip(masks, srcs)]
        L = self.head.num_layers
        two_stage = self.transformer.two_stage
        t = self.transformer(
            srcs,
            masks,
            pos,
            query_embed=None if two_stage else self.query_embed.weight,
            bbox_embed=self.head.decoder_bbox_embed,
            enc_class_embed=self.head.class_embed[L] if two_stage else None,
            enc_bbox_embed=self.head.bbox_embed[L] if two_stage else None,
        )
        logits, params = self.head(t.hs)
        boxes = t.pred_boxes
        n0 = int(t.spatial_shapes[0].prod())
        fmask = self.mask_encoder(
            t.memory[:, :n0],
            t.lvl_pos_embed_flatten[:, :n0],
            t.mask_flatten[:, :n0],
            t.spatial_shapes[:1],
            t.valid_ratios[:, :1],
        )
        layer = [
            {"pred_logits": logits[k], "pred_boxes": boxes[k], "pred_params": params[k]}
            for k in range(L)
        ]
        out = dict(layer[-1], aux_outputs=layer[:-1])
        if two_stage:
            out["enc_outputs"] = {
                "pred_logits": t.enc_outputs_class,
                "pred_boxes": t.enc_outputs_coord,
            }
            out["enc_topk_indices"] = t.enc_topk_indices
        out["mask_features"] = fmask
        out["mask_valid_hw"] = valid_sizes(masks[0])
        out["mask_padding"] = masks[0]
        return out

    def prepare_targets(self, batched_inputs: List[Dict], images: ImageList) -> List[Dict]:
        """Per image: ``labels``, ``boxes`` (cxcywh normalised by the unpadded image size) and
        ``masks`` (N, Hp, Wp) uint8 GT masks zero-padded to the batch canvas."""
        Hp, Wp = images.tensor.shape[-2:]
        targets = []
        for x, (h, w) in zip(batched_inputs, images.image_sizes):
            inst = x["instances"].to(self.device)
            scale = torch.as_tensor([w, h, w, h], dtype=torch.float32, device=self.device)
            boxes = box_convert(inst.gt_boxes.tensor, "xyxy", "cxcywh") / scale
            padded = torch.zeros((len(inst), Hp, Wp), dtype=torch.uint8, device=self.device)
            if len(inst):  # Detectron2 adds no gt_masks field to images without instances
                if not inst.has("gt_masks"):
                    raise ValueError("SOIT needs instance masks (gt_masks) for training")
                m = inst.gt_masks
                if isinstance(m, PolygonMasks):
                    m = BitMasks.from_polygon_masks(m, h, w)
                m = m.tensor if isinstance(m, BitMasks) else torch.as_tensor(m)
                padded[:, : m.shape[1], : m.shape[2]] = m.to(device=self.device, dtype=torch.uint8)
            targets.append({"labels": inst.gt_classes, "boxes": boxes, "masks": padded})
        return targets

    def inference(self, outputs: Dict, images: ImageList, output_sizes) -> list:
        """Detections of the last decoder layer (see :func:`soit_postprocess`)."""
        return soit_postprocess(
            outputs["pred_logits"],
            outputs["pred_boxes"],
            outputs["pred_params"],
            outputs["mask_features"],
            outputs["mask_valid_hw"],
            images.image_sizes,
            tuple(images.tensor.shape[-2:]),
            output_sizes,
            self.mask_head,
            topk=self.test_topk,
            mask_threshold=self.mask_threshold,
            crop_padding=self.mask_crop_padding,
        )
