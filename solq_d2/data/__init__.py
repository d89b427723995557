"""Data: the synthetic "shapes" dataset, the DETR-style dataset mapper, datasets from configs.

Importing this package registers the mapper(s) selectable with ``INPUT.DATASET_MAPPER_NAME`` and
the datasets ``shapes_train`` / ``shapes_val`` (generated on first use into
``$SOLQ_D2_DATASETS/shapes-<version>/``, default ``~/.cache/solq_d2/datasets``).
"""

from .annotations import BadInputLog, ImageReadError, clip_polygon
from .build import DATASET_MAPPERS, build_dataset_mapper, register_dataset_mapper
from .datasets import (
    BUILTIN_SHAPES,
    check_num_classes,
    datasets_root,
    prepare_dataset,
    register_builtin_shapes,
    register_datasets_from_cfg,
    register_shapes,
)
from .detr_instance_mapper import DetrInstanceDatasetMapper, build_detr_augmentation
from .shapes import SHAPES_CLASSES, SHAPES_VERSION, ShapesSpec, generate_shapes, shapes_statistics

register_builtin_shapes()

__all__ = [
    "BUILTIN_SHAPES",
    "BadInputLog",
    "DATASET_MAPPERS",
    "DetrInstanceDatasetMapper",
    "ImageReadError",
    "SHAPES_CLASSES",
    "SHAPES_VERSION",
    "ShapesSpec",
    "build_dataset_mapper",
    "build_detr_augmentation",
    "check_num_classes",
    "clip_polygon",
    "datasets_root",
    "generate_shapes",
    "prepare_dataset",
    "register_builtin_shapes",
    "register_dataset_mapper",
    "register_datasets_from_cfg",
    "register_shapes",
    "shapes_statistics",
]
