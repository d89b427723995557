"""Evaluation: Detectron2's ``COCOEvaluator`` for boxes and masks, fast path only when built."""

import logging
import os
from typing import Optional

__all__ = ["fast_coco_eval_available", "build_coco_evaluator"]

logger = logging.getLogger(__name__)


def fast_coco_eval_available() -> bool:
    """Whether Detectron2's compiled ``COCOevalAccumulate`` (``use_fast_impl=True``) exists.

    The PyPI copy of Detectron2 v0.6 has no compiled extension (its ``detectron2._C`` is a
    placeholder, or missing); the official pycocotools path is then used.
    """
    try:
        from detectron2 import _C
    except ImportError:
        return False
    try:
        return hasattr(_C, "COCOevalAccumulate")
    except Exception:  # a placeholder module raising something else than AttributeError
        return False


def build_coco_evaluator(cfg, dataset_name: str, output_folder: Optional[str] = None):
    """A ``COCOEvaluator`` for ``cfg.TEST.EVAL_TASKS`` (default bbox + segm) on ``dataset_name``.

    Args:
        cfg: the config (reads ``TEST.EVAL_TASKS``, ``TEST.DETECTIONS_PER_IMAGE``, ``OUTPUT_DIR``).
        dataset_name: a registered dataset (COCO json, or any Detectron2-format dataset, which
            the evaluator converts to COCO format itself).
        output_folder: where predictions and the COCO-format results go; default
            ``<OUTPUT_DIR>/inference/<dataset_name>``.
    """
    from detectron2.evaluation import COCOEvaluator

    if output_folder is None:
        output_folder = os.path.join(cfg.OUTPUT_DIR, "inference", dataset_name)
    tasks = tuple(cfg.TEST.EVAL_TASKS)
    unknown = set(tasks) - {"bbox", "segm"}
    if not tasks or unknown:
        raise ValueError(f"TEST.EVAL_TASKS must be a non-empty subset of bbox, segm; got {tasks}")
    fast = fast_coco_eval_available()
    if not fast:
        logger.info("detectron2._C.COCOevalAccumulate is not built: using pycocotools' COCOeval")
    return COCOEvaluator(
        dataset_name,
        tasks=tasks,
        distributed=True,
        output_dir=output_folder,
        max_dets_per_image=cfg.TEST.DETECTIONS_PER_IMAGE,
        use_fast_impl=fast,
    )
