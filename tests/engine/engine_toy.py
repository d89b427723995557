"""Test helpers for the engine: a tiny COCO dataset on disk and a tiny set-prediction model.

``EngineToyModel`` is a Detectron2 meta-architecture of a few layers that predicts boxes, classes
and masks for a fixed set of queries and is trained like SOLQ: Hungarian matching, and box/mask
losses divided by the number of ground-truth boxes all-reduced over the processes. It lets the
engine (trainer, optimizer, checkpoints, distributed training) be tested independently of the
real models and fast. Switching the engine tests to a real meta-architecture is a matter of
returning its config from :func:`make_cfg` (see ``ARCH`` there).
"""

import json
import os
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from PIL import Image
from scipy.optimize import linear_sum_assignment
from torch import nn
from torchvision.ops import sigmoid_focal_loss

import detectron2.utils.comm as comm
from detectron2.config import configurable, get_cfg
from detectron2.data import DatasetCatalog
from detectron2.data.datasets import register_coco_instances
from detectron2.modeling import META_ARCH_REGISTRY
from detectron2.structures import BitMasks, Boxes, ImageList, Instances, PolygonMasks

import solq_d2

ENGINE_TESTS_DIR = Path(__file__).resolve().parent
REPO_ROOT = ENGINE_TESTS_DIR.parents[1]
CLASSES = ["square", "bar"]


def write_tiny_coco(root, num_images: int = 4, size: int = 64, seed: int = 0):
    """Write ``num_images`` RGB PNGs with 0-3 filled rectangles (polygon masks) and a COCO json.

    Image 1 has no annotation (DETR-style training keeps such images).

    Returns:
        (json_file, image_root) as strings.
    """
    rng = np.random.RandomState(seed)
    root = Path(root)
    img_dir = root / "images"
    img_dir.mkdir(parents=True, exist_ok=True)
    images, annotations = [], []
    for i in range(num_images):
        img = np.full((size, size, 3), 30, dtype=np.uint8) + rng.randint(
            0, 20, (size, size, 3)
        ).astype(np.uint8)
        n = 0 if i == 1 else 1 + i % 3
        for _ in range(n):
            w, h = rng.randint(10, size // 2, size=2)
            x0, y0 = rng.randint(0, size - w), rng.randint(0, size - h)
            cat = int(rng.randint(1, len(CLASSES) + 1))
            img[y0 : y0 + h, x0 : x0 + w] = (220, 60, 60) if cat == 1 else (60, 220, 60)
            poly = [x0, y0, x0 + w, y0, x0 + w, y0 + h, x0, y0 + h]
            annotations.append(
                {
                    "id": len(annotations) + 1,
                    "image_id": i + 1,
                    "category_id": cat,
                    "bbox": [float(x0), float(y0), float(w), float(h)],
                    "area": float(w * h),
                    "iscrowd": 0,
                    "segmentation": [[float(v) for v in poly]],
                }
            )
        name = f"{i:03d}.png"
        Image.fromarray(img).save(img_dir / name)
        images.append({"id": i + 1, "file_name": name, "height": size, "width": size})
    data = {
        "images": images,
        "annotations": annotations,
        "categories": [{"id": k + 1, "name": c} for k, c in enumerate(CLASSES)],
    }
    json_file = root / "instances.json"
    json_file.write_text(json.dumps(data))
    return str(json_file), str(img_dir)


def register_tiny_coco(name: str, root, **kwargs) -> str:
    """Write (if needed) and register a tiny COCO dataset under ``name``; returns the name."""
    json_file = Path(root) / "instances.json"
    if not json_file.exists():
        write_tiny_coco(root, **kwargs)
    if name not in DatasetCatalog.list():
        register_coco_instances(name, {}, str(json_file), str(Path(root) / "images"))
    return name


# Default model of the engine tests: "toy" (EngineToyModel: fast, independent of the models) or
# "solq" (a tiny SOLQ). The distributed test uses SOLQ (dist_check.ARCH).
ARCH = "toy"


def make_cfg(train: str, test: str = "", output_dir: str = "", arch: str = ARCH):
    """A tiny CPU config training on dataset ``train`` (and evaluating on ``test``)."""
    cfg = get_cfg()
    solq_d2.add_solq_d2_config(cfg)
    if arch == "toy":
        cfg.MODEL.META_ARCHITECTURE = "EngineToyModel"
        cfg.MODEL.ROI_HEADS.NUM_CLASSES = len(CLASSES)
    elif arch == "solq":  # a tiny SOLQ: ResNet-18-GN from scratch, 64-d transformer
        cfg.MODEL.META_ARCHITECTURE = "SOLQ"
        cfg.MODEL.PIXEL_MEAN = [123.675, 116.28, 103.53]
        cfg.MODEL.PIXEL_STD = [58.395, 57.12, 57.375]
        cfg.INPUT.FORMAT = "RGB"
        cfg.INPUT.MASK_FORMAT = "bitmask"
        cfg.MODEL.BACKBONE.FREEZE_AT = 0
        cfg.MODEL.RESNETS.DEPTH = 18
        cfg.MODEL.RESNETS.RES2_OUT_CHANNELS = 64
        cfg.MODEL.RESNETS.NORM = "GN"  # batch-independent (the distributed test compares runs)
        cfg.MODEL.RESNETS.STRIDE_IN_1X1 = False
        cfg.MODEL.RESNETS.OUT_FEATURES = ["res3", "res4", "res5"]
        t = cfg.MODEL.DEFORMABLE_TRANSFORMER
        t.IN_FEATURES = ["res3", "res4", "res5"]
        t.HIDDEN_DIM, t.DIM_FEEDFORWARD, t.ENC_LAYERS, t.DEC_LAYERS = 64, 128, 1, 2
        t.DROPOUT = 0.0
        cfg.MODEL.SOLQ.NUM_CLASSES = len(CLASSES)
        cfg.MODEL.SOLQ.NUM_QUERIES = 8
        cfg.MODEL.SOLQ.VECTOR_HIDDEN_DIM = 64
        # official SOLQ averages the vector loss per process; with "num_boxes" every loss term is
        # normalised by the all-reduced box count and N processes train exactly like one
        cfg.MODEL.SOLQ.VECTOR_LOSS_NORM = "num_boxes"
    else:
        raise ValueError(arch)
    cfg.MODEL.DEVICE = "cpu"
    cfg.MODEL.MASK_ON = True
    cfg.MODEL.WEIGHTS = ""
    cfg.DATASETS.TRAIN = (train,)
    cfg.DATASETS.TEST = (test,) if test else ()
    cfg.DATALOADER.NUM_WORKERS = 0
    cfg.DATALOADER.FILTER_EMPTY_ANNOTATIONS = False
    cfg.INPUT.MIN_SIZE_TRAIN = (64,)
    cfg.INPUT.MAX_SIZE_TRAIN = 96
    cfg.INPUT.MIN_SIZE_TEST = 64
    cfg.INPUT.MAX_SIZE_TEST = 96
    cfg.INPUT.RANDOM_FLIP = "none"
    if arch == "toy":
        cfg.INPUT.MASK_FORMAT = "polygon"
    cfg.INPUT.CROP.ENABLED = False  # deterministic inputs (the distributed test compares runs)
    if "PROB" in cfg.INPUT.CROP:
        cfg.INPUT.CROP.PROB = 0.0
    cfg.SOLVER.IMS_PER_BATCH = 2
    cfg.SOLVER.BASE_LR = 1e-3
    cfg.SOLVER.MAX_ITER = 4
    cfg.SOLVER.STEPS = ()
    cfg.SOLVER.WARMUP_ITERS = 0
    cfg.SOLVER.CHECKPOINT_PERIOD = 2
    cfg.SOLVER.CLIP_GRADIENTS.ENABLED = True
    cfg.SOLVER.CLIP_GRADIENTS.CLIP_TYPE = "full_model"
    cfg.SOLVER.CLIP_GRADIENTS.CLIP_VALUE = 0.1
    cfg.TEST.EVAL_PERIOD = 0
    cfg.OUTPUT_DIR = str(output_dir)
    cfg.SEED = 0
    return cfg


def _box_cxcywh_to_xyxy(b):
    cx, cy, w, h = b.unbind(-1)
    return torch.stack([cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2], -1)


def _ddp_mean_box_count(count: int, device) -> float:
    """DETR's normaliser: ground-truth boxes summed over all processes, divided by their count."""
    n = torch.tensor([float(count)], device=device)
    if comm.get_world_size() > 1:
        dist.all_reduce(n)
    return max((n / comm.get_world_size()).item(), 1.0)


class EngineToyModel(nn.Module):
    """Conv features -> per-query class logits (sigmoid), cxcywh boxes and mask logits at 1/4
    resolution. Not a useful detector: a few parameters of each kind the optimizer groups care
    about (backbone, norm, embedding) and the loss normalisation of the real models."""

    @configurable
    def __init__(
        self,
        *,
        num_classes: int,
        num_queries: int = 6,
        dim: int = 16,
        pixel_mean=(103.53, 116.28, 123.675),
        pixel_std=(57.375, 57.12, 58.395),
    ):
        super().__init__()
        self.num_classes = num_classes
        self.backbone = nn.Sequential(
            nn.Conv2d(3, dim, 3, 2, 1),
            nn.ReLU(),
            nn.Conv2d(dim, dim, 3, 2, 1),
            nn.GroupNorm(4, dim),
        )
        self.query_embed = nn.Embedding(num_queries, dim)
        self.class_embed = nn.Linear(dim, num_classes)
        self.bbox_embed = nn.Linear(dim, 4)
        self.mask_embed = nn.Linear(dim, dim)
        self.register_buffer("pixel_mean", torch.tensor(pixel_mean).view(-1, 1, 1), False)
        self.register_buffer("pixel_std", torch.tensor(pixel_std).view(-1, 1, 1), False)

    @classmethod
    def from_config(cls, cfg):
        return {
            "num_classes": cfg.MODEL.ROI_HEADS.NUM_CLASSES,
            "pixel_mean": cfg.MODEL.PIXEL_MEAN,
            "pixel_std": cfg.MODEL.PIXEL_STD,
        }

    @property
    def device(self):
        return self.pixel_mean.device

    def forward(self, batched_inputs):
        images = [
            (x["image"].to(self.device).float() - self.pixel_mean) / self.pixel_std
            for x in batched_inputs
        ]
        images = ImageList.from_tensors(images, 4)
        feats = self.backbone(images.tensor)  # (B, D, H/4, W/4)
        q = self.query_embed.weight[None] + feats.mean(dim=(2, 3))[:, None]  # (B, Q, D)
        logits = self.class_embed(q)  # (B, Q, K+1)
        boxes = self.bbox_embed(q).sigmoid()  # (B, Q, 4) cxcywh, normalised
        masks = torch.einsum("bqd,bdhw->bqhw", self.mask_embed(q), feats)
        if self.training:
            targets = [x["instances"].to(self.device) for x in batched_inputs]
            return self.losses(logits, boxes, masks, targets, images)
        return self.inference(logits, boxes, masks, images, batched_inputs)

    def losses(self, logits, boxes, masks, targets, images):
        """SOLQ-style set losses: sigmoid focal class loss, L1 box loss and BCE mask loss over
        Hungarian-matched queries, all summed and divided by the mean (over processes) number of
        ground-truth boxes, so that D processes with batch B/D train exactly like one with B."""
        num_boxes = _ddp_mean_box_count(sum(len(t) for t in targets), logits.device)
        onehot = torch.zeros_like(logits)
        # zero but connected to every head: a process whose images have no box still produces a
        # gradient for each parameter, which DistributedDataParallel waits for
        loss_bbox = boxes.sum() * 0.0
        loss_mask = masks.sum() * 0.0
        ph, pw = images.tensor.shape[-2:]
        for b, t in enumerate(targets):
            if len(t) == 0:
                continue
            h, w = images.image_sizes[b]
            scale = torch.tensor([w, h, w, h], dtype=torch.float32, device=logits.device)
            gt = t.gt_boxes.tensor / scale
            gt_cxcywh = torch.cat([(gt[:, :2] + gt[:, 2:]) / 2, gt[:, 2:] - gt[:, :2]], -1)
            cost = torch.cdist(boxes[b], gt_cxcywh, p=1) - logits[b].sigmoid()[:, t.gt_classes]
            qi, ti = linear_sum_assignment(cost.detach().cpu().numpy())
            qi, ti = torch.as_tensor(qi), torch.as_tensor(ti)
            onehot[b, qi, t.gt_classes[ti]] = 1.0
            loss_bbox = loss_bbox + (boxes[b, qi] - gt_cxcywh[ti]).abs().sum()
            gt_masks = t.gt_masks
            if isinstance(gt_masks, PolygonMasks):
                gt_masks = BitMasks.from_polygon_masks(gt_masks, h, w)
            m = F.pad(gt_masks.tensor.float(), (0, pw - w, 0, ph - h))
            m = F.interpolate(
                m[:, None], size=masks.shape[-2:], mode="bilinear", align_corners=False
            )
            bce = F.binary_cross_entropy_with_logits(masks[b, qi], m[ti, 0], reduction="none")
            loss_mask = loss_mask + bce.mean(dim=(1, 2)).sum()
        loss_ce = sigmoid_focal_loss(logits, onehot, alpha=0.25, gamma=2.0, reduction="sum")
        return {
            "loss_ce": loss_ce / num_boxes,
            "loss_bbox": loss_bbox / num_boxes,
            "loss_mask": loss_mask / num_boxes,
        }

    def inference(self, logits, boxes, masks, images, batched_inputs):
        results = []
        probs = logits.sigmoid()
        ph, pw = images.tensor.shape[-2:]
        for b, x in enumerate(batched_inputs):
            h, w = images.image_sizes[b]
            out_h, out_w = x.get("height", h), x.get("width", w)
            scores, labels = probs[b].max(-1)
            scale = torch.tensor([out_w, out_h, out_w, out_h], device=self.device)
            m = F.interpolate(masks[b][None], size=(ph, pw), mode="bilinear", align_corners=False)
            m = F.interpolate(
                m[:, :, :h, :w], size=(out_h, out_w), mode="bilinear", align_corners=False
            )
            inst = Instances((out_h, out_w))
            inst.pred_boxes = Boxes(_box_cxcywh_to_xyxy(boxes[b]) * scale)
            inst.pred_boxes.clip((out_h, out_w))
            inst.scores = scores
            inst.pred_classes = labels
            inst.pred_masks = m[0] > 0
            results.append({"instances": inst})
        return results


if "EngineToyModel" not in META_ARCH_REGISTRY:
    META_ARCH_REGISTRY.register(EngineToyModel)
