"""Fixtures of the data tests: tiny COCO datasets written into tmp_path, configs, unique names."""

import json
import uuid
from pathlib import Path

import numpy as np
import pytest
from PIL import Image


@pytest.fixture
def data_cfg():
    """A detectron2 config with every solq_d2 key, small sizes and the DETR crop branch."""
    from detectron2.config import get_cfg

    from solq_d2 import add_solq_d2_config

    cfg = get_cfg()
    add_solq_d2_config(cfg)
    cfg.INPUT.MIN_SIZE_TRAIN = (96, 112, 128)
    cfg.INPUT.MAX_SIZE_TRAIN = 200
    cfg.INPUT.MIN_SIZE_TEST = 112
    cfg.INPUT.MAX_SIZE_TEST = 200
    cfg.INPUT.CROP.ENABLED = True
    cfg.INPUT.CROP.TYPE = "absolute_range"
    cfg.INPUT.CROP.SIZE = (48, 96)
    cfg.INPUT.CROP.PRE_RESIZE_MIN_SIZES = (100, 120)
    cfg.INPUT.FORMAT = "RGB"
    return cfg


@pytest.fixture
def dataset_names():
    """Unique dataset names; every name handed out is removed from the catalogs afterwards."""
    from detectron2.data import DatasetCatalog, MetadataCatalog

    names = []

    def make(prefix="t"):
        names.append(f"{prefix}_{uuid.uuid4().hex[:8]}")
        return names[-1]

    yield make
    for name in names:
        if name in DatasetCatalog.list():
            DatasetCatalog.remove(name)
        if name in MetadataCatalog.list():
            MetadataCatalog.remove(name)


def write_coco(directory: Path, images, categories=("a", "b", "c"), category_ids=None):
    """Write a COCO instances file and its images.

    Args:
        images: list of (array or PIL image or None, annotations); None writes no file (to test
            missing images); annotations are COCO dicts without id/image_id.
        category_ids: ids of ``categories`` (default 1..n).

    Returns:
        (json_file, image_root) as str.
    """
    root = directory / "images"
    root.mkdir(parents=True, exist_ok=True)
    category_ids = category_ids or list(range(1, len(categories) + 1))
    coco = {
        "images": [],
        "annotations": [],
        "categories": [{"id": i, "name": n} for i, n in zip(category_ids, categories)],
    }
    for k, (img, annos) in enumerate(images):
        file_name = f"{k:04d}.png"
        if img is not None:
            pil = img if isinstance(img, Image.Image) else Image.fromarray(img)
            pil.save(root / file_name)
            w, h = pil.size
        else:
            h, w = 64, 64
        coco["images"].append({"id": k + 1, "file_name": file_name, "height": h, "width": w})
        for a in annos:
            coco["annotations"].append(
                {"id": len(coco["annotations"]) + 1, "image_id": k + 1, "iscrowd": 0, **a}
            )
    json_file = directory / "instances.json"
    json_file.write_text(json.dumps(coco))
    return str(json_file), str(root)


def rect_annotation(x0, y0, x1, y1, category_id=1):
    """A polygon annotation of an axis-aligned rectangle (COCO XYWH bbox)."""
    return {
        "category_id": category_id,
        "bbox": [x0, y0, x1 - x0, y1 - y0],
        "segmentation": [[x0, y0, x1, y0, x1, y1, x0, y1]],
        "area": float((x1 - x0) * (y1 - y0)),
    }


def solid_image(h, w, boxes_colors, background=(0, 0, 0)):
    """(h, w, 3) uint8 RGB image with filled rectangles [(x0, y0, x1, y1), (r, g, b)]."""
    img = np.zeros((h, w, 3), dtype=np.uint8)
    img[:] = background
    for (x0, y0, x1, y1), color in boxes_colors:
        img[y0:y1, x0:x1] = color
    return img


@pytest.fixture
def coco_tools():
    """The helpers above, for test modules (conftest modules cannot be imported by name)."""
    import types

    return types.SimpleNamespace(
        write_coco=write_coco, rect_annotation=rect_annotation, solid_image=solid_image
    )
