"""Data keys of solq_d2 (``INPUT.*``, ``DATASETS.*``); see solq_d2/config.py.

Detectron2's own keys are reused with their meaning unchanged: ``INPUT.MIN_SIZE_TRAIN``,
``INPUT.MAX_SIZE_TRAIN``, ``INPUT.MIN_SIZE_TRAIN_SAMPLING``, ``INPUT.MIN_SIZE_TEST``,
``INPUT.MAX_SIZE_TEST``, ``INPUT.RANDOM_FLIP``, ``INPUT.FORMAT``, ``INPUT.MASK_FORMAT``,
``INPUT.CROP.{ENABLED,TYPE,SIZE}`` (the DETR recipe sets ENABLED True, TYPE "absolute_range",
SIZE (384, 600)), ``DATALOADER.FILTER_EMPTY_ANNOTATIONS`` (the DETR-family recipes keep images
without annotations: set it False).
"""


__all__ = ["add_data_config"]


def add_data_config(cfg):
    """Add the data keys to ``cfg`` (one comment per key)."""
    # Dataset mapper used by the train/test loaders, by name (solq_d2.data.build_dataset_mapper).
    # "detr_instance": DetrInstanceDatasetMapper (flip, multi-scale, optional resize-crop-resize).
    cfg.INPUT.DATASET_MAPPER_NAME = "detr_instance"
    # Shorter-side lengths (pixels; one is chosen at random) of the resize that precedes the random
    # crop in the crop branch (used only when INPUT.CROP.ENABLED). No max size, as DETR's
    # RandomResize([400, 500, 600]) (SOLQ datasets/coco.py, SOIT/QueryInst "crop" recipes).
    cfg.INPUT.CROP.PRE_RESIZE_MIN_SIZES = (400, 500, 600)
    # Probability (0-1) of taking the "resize -> random crop -> resize" branch instead of the plain
    # multi-scale resize (used only when INPUT.CROP.ENABLED). DETR's RandomSelect p = 0.5.
    cfg.INPUT.CROP.PROB = 0.5
    # COCO-format datasets to register from the config: a list of [name, json_file, image_root]
    # (paths absolute or relative to the working directory). Registered by
    # solq_d2.data.register_datasets_from_cfg (the trainer calls it), then usable by name in
    # DATASETS.TRAIN / DATASETS.TEST. Default: none.
    cfg.DATASETS.COCO_INSTANCES = []
    return cfg
