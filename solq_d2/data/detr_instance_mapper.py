"""``DetrInstanceDatasetMapper``: the DETR-family training augmentation for instance segmentation.

Train: horizontal flip (p = 0.5), then with probability ``INPUT.CROP.PROB`` "resize the shorter
side to one of ``INPUT.CROP.PRE_RESIZE_MIN_SIZES`` -> random crop (``INPUT.CROP.TYPE`` /
``INPUT.CROP.SIZE``, DETR: absolute_range 384-600)", then the multi-scale resize of the shorter
side (``INPUT.MIN_SIZE_TRAIN`` / ``INPUT.MAX_SIZE_TRAIN``). This is the recipe of Deformable DETR,
SOLQ (``datasets/transforms.py``), SOIT and QueryInst's "crop" configs (SOLQ.md §1.5, SOIT.md
§10, QUERYINST.md "Augmentation"); SOLQ's extra resize before the random choice only adds a
resampling, and is not reproduced.

Test: deterministic resize (``INPUT.MIN_SIZE_TEST`` / ``INPUT.MAX_SIZE_TEST``), annotations dropped.
"""

import copy
import logging
import sys
from typing import Dict, List, Union

import numpy as np
import torch
from detectron2.config import configurable
from detectron2.data import detection_utils as utils
from detectron2.data import transforms as T
from detectron2.structures import BitMasks, Boxes, Instances, PolygonMasks

from .annotations import BadInputLog, read_image_checked, sanitize_annotation, transform_annotation
from .build import register_dataset_mapper

__all__ = ["DetrInstanceDatasetMapper", "build_detr_augmentation"]

logger = logging.getLogger(__name__)


def build_detr_augmentation(cfg, is_train: bool) -> List[T.Augmentation]:
    """The augmentation list of :class:`DetrInstanceDatasetMapper` (see the module docstring).

    Raises:
        ValueError: invalid ``INPUT.*`` values.
    """
    inp = cfg.INPUT
    if not is_train:
        if inp.MIN_SIZE_TEST == 0:  # detectron2's convention: no resize
            return []
        return [T.ResizeShortestEdge(inp.MIN_SIZE_TEST, inp.MAX_SIZE_TEST, "choice")]
    augs: List[T.Augmentation] = []
    if inp.RANDOM_FLIP not in ("horizontal", "vertical", "none"):
        raise ValueError(
            f"INPUT.RANDOM_FLIP must be horizontal/vertical/none, got {inp.RANDOM_FLIP}"
        )
    if inp.RANDOM_FLIP != "none":
        augs.append(
            T.RandomFlip(
                horizontal=inp.RANDOM_FLIP == "horizontal", vertical=inp.RANDOM_FLIP == "vertical"
            )
        )
    if inp.CROP.ENABLED:
        if not 0.0 <= inp.CROP.PROB <= 1.0:
            raise ValueError(f"INPUT.CROP.PROB must be in [0, 1], got {inp.CROP.PROB}")
        sizes = list(inp.CROP.PRE_RESIZE_MIN_SIZES)
        if not sizes or any(int(s) <= 0 for s in sizes):
            raise ValueError(f"INPUT.CROP.PRE_RESIZE_MIN_SIZES must be positive sizes, got {sizes}")
        branch = T.AugmentationList(
            [
                # DETR's RandomResize([400, 500, 600]) has no max size.
                T.ResizeShortestEdge(sizes, max_size=sys.maxsize, sample_style="choice"),
                T.RandomCrop(inp.CROP.TYPE, inp.CROP.SIZE),
            ]
        )
        if inp.CROP.PROB > 0:
            augs.append(branch if inp.CROP.PROB == 1.0 else T.RandomApply(branch, inp.CROP.PROB))
    augs.append(
        T.ResizeShortestEdge(inp.MIN_SIZE_TRAIN, inp.MAX_SIZE_TRAIN, inp.MIN_SIZE_TRAIN_SAMPLING)
    )
    return augs


@register_dataset_mapper("detr_instance")
class DetrInstanceDatasetMapper:
    """Map a detectron2 dataset dict to the model's input, with DETR-style augmentation.

    Output dict: the input's keys (``file_name``, ``image_id``, ``height``, ``width``, ...) plus

    * ``image``: (C, H, W) uint8 tensor in ``image_format``;
    * ``instances`` (training only): ``gt_boxes`` (``Boxes``, XYXY in input pixels, clipped to
      the image), ``gt_classes`` (int64), ``gt_masks`` (``PolygonMasks`` or ``BitMasks`` per
      ``instance_mask_format``; always present, possibly empty). Images without annotations are
      kept, with empty instances.

    Crowd annotations are ignored. Bad input: see :mod:`solq_d2.data.annotations`; counts are in
    ``self.bad_input.counts``. With ``instance_mask_format="polygon"``, an image that has RLE or
    bitmap masks (e.g. objects with holes) gets ``BitMasks`` for all its instances, because
    polygons cannot represent holes.
    """

    @configurable
    def __init__(
        self,
        is_train: bool = True,
        *,
        augmentations: List[Union[T.Augmentation, T.Transform]],
        image_format: str,
        instance_mask_format: str = "polygon",
    ):
        """
        Args:
            is_train: training (augment, keep annotations) or inference (resize only).
            augmentations: applied in order (see :func:`build_detr_augmentation`).
            image_format: ``INPUT.FORMAT`` ("BGR", "RGB", "L", ...).
            instance_mask_format: "polygon" or "bitmask".
        """
        if instance_mask_format not in ("polygon", "bitmask"):
            raise ValueError(
                f"INPUT.MASK_FORMAT must be 'polygon' or 'bitmask', got {instance_mask_format!r}"
            )
        self.is_train = is_train
        self.augmentations = T.AugmentationList(augmentations)
        self.image_format = image_format
        self.instance_mask_format = instance_mask_format
        self.bad_input = BadInputLog()
        mode = "training" if is_train else "inference"
        logger.info(f"[DetrInstanceDatasetMapper] augmentations used in {mode}: {augmentations}")

    @classmethod
    def from_config(cls, cfg, is_train: bool = True) -> Dict:
        return {
            "is_train": is_train,
            "augmentations": build_detr_augmentation(cfg, is_train),
            "image_format": cfg.INPUT.FORMAT,
            "instance_mask_format": cfg.INPUT.MASK_FORMAT,
        }

    def __call__(self, dataset_dict: Dict) -> Dict:
        """
        Args:
            dataset_dict: one image in detectron2's dataset format (not modified).

        Returns:
            the model input dict (see the class docstring).
        """
        dataset_dict = copy.deepcopy(dataset_dict)
        image = read_image_checked(dataset_dict, self.image_format)
        original_size = image.shape[:2]
        aug_input = T.AugInput(image)
        transforms = self.augmentations(aug_input)
        image = aug_input.image
        dataset_dict["image"] = torch.as_tensor(np.ascontiguousarray(image.transpose(2, 0, 1)))
        annotations = dataset_dict.pop("annotations", None) or []
        dataset_dict.pop("sem_seg_file_name", None)
        if self.is_train:
            dataset_dict["instances"] = self.annotations_to_instances(
                annotations, dataset_dict["file_name"], original_size, transforms, image.shape[:2]
            )
        return dataset_dict

    def annotations_to_instances(
        self, annotations: List[Dict], file_name: str, original_size, transforms, image_size
    ) -> Instances:
        """Sanitize, transform and convert one image's annotations.

        Args:
            annotations: the dataset dict's ``annotations``.
            file_name: for messages.
            original_size: (H, W) of the image as read.
            transforms: the augmentation's ``TransformList``.
            image_size: (H, W) after the transforms.
        """
        annos = []
        for anno in annotations:
            if anno.get("iscrowd", 0):
                continue
            anno = sanitize_annotation(anno, original_size, file_name, self.bad_input)
            if anno is not None:
                anno = transform_annotation(anno, transforms, image_size)
            if anno is not None:
                annos.append(anno)

        mask_format = self.instance_mask_format
        if mask_format == "polygon" and any(
            isinstance(a["segmentation"], np.ndarray) for a in annos
        ):
            mask_format = "bitmask"
            self.bad_input.report("rle_as_bitmask", file_name)
        if annos:
            instances = utils.annotations_to_instances(annos, image_size, mask_format=mask_format)
            instances = utils.filter_empty_instances(instances)
        else:
            instances = Instances(image_size)
            instances.gt_boxes = Boxes(torch.zeros((0, 4), dtype=torch.float32))
            instances.gt_classes = torch.zeros((0,), dtype=torch.int64)
            if mask_format == "polygon":
                instances.gt_masks = PolygonMasks([])
            else:
                instances.gt_masks = BitMasks(torch.zeros((0, *image_size), dtype=torch.bool))
        return instances
