"""DetrInstanceDatasetMapper: augmentation recipe, image/box/mask consistency, empty images."""

import numpy as np
import pycocotools.mask as mask_util
import pytest
import torch
from detectron2.data import transforms as T
from detectron2.structures import BitMasks, BoxMode, PolygonMasks, polygons_to_bitmask

from solq_d2.data import DetrInstanceDatasetMapper, build_dataset_mapper, build_detr_augmentation
from solq_d2.data.annotations import clip_polygon

# Three flat-coloured objects on black: two rectangles (polygons) and a ring (RLE, with a hole).
RED, GREEN, BLUE = (250, 0, 0), (0, 250, 0), (0, 0, 250)
H, W = 120, 160


def _scene():
    img = np.zeros((H, W, 3), dtype=np.uint8)
    img[10:60, 20:90] = RED
    img[70:110, 100:150] = GREEN
    yy, xx = np.mgrid[0:H, 0:W]
    r = np.hypot(yy - 80, xx - 45)
    ring = (r < 28) & (r >= 14)
    img[ring] = BLUE
    rle = mask_util.encode(np.asfortranarray(ring.astype(np.uint8)))
    rle["counts"] = rle["counts"].decode()
    x, y, w, h = mask_util.toBbox(rle).tolist()
    annos = [
        {"bbox": [20, 10, 70, 50], "segmentation": [[20, 10, 90, 10, 90, 60, 20, 60]]},
        {"bbox": [100, 70, 50, 40], "segmentation": [[100, 70, 150, 70, 150, 110, 100, 110]]},
        {"bbox": [x, y, w, h], "segmentation": rle},
    ]
    for k, a in enumerate(annos):
        a.update(category_id=k, bbox_mode=BoxMode.XYWH_ABS, iscrowd=0)
    return img, annos, [RED, GREEN, BLUE]


@pytest.fixture
def scene(tmp_path):
    from PIL import Image

    img, annos, colors = _scene()
    path = tmp_path / "scene.png"
    Image.fromarray(img).save(path)
    record = {"file_name": str(path), "image_id": 7, "height": H, "width": W, "annotations": annos}
    return record, colors


def _bitmaps(instances):
    m = instances.gt_masks
    if isinstance(m, BitMasks):
        return m.tensor.numpy()
    h, w = instances.image_size
    return np.stack([polygons_to_bitmask(p, h, w) for p in m.polygons]) if len(m) else None


def test_registry_builds_the_configured_mapper(data_cfg):
    assert isinstance(build_dataset_mapper(data_cfg, True), DetrInstanceDatasetMapper)
    data_cfg.INPUT.DATASET_MAPPER_NAME = "nope"
    with pytest.raises(
        ValueError, match="'nope' is not a registered dataset mapper.*detr_instance"
    ):
        build_dataset_mapper(data_cfg, True)


def test_augmentation_recipe(data_cfg):
    augs = build_detr_augmentation(data_cfg, True)
    assert [type(a) for a in augs] == [T.RandomFlip, T.RandomApply, T.ResizeShortestEdge]
    branch = augs[1].aug.augs
    assert [type(a) for a in branch] == [T.ResizeShortestEdge, T.RandomCrop]
    assert tuple(branch[0].short_edge_length) == (100, 120) and augs[1].prob == 0.5
    assert branch[1].crop_type == "absolute_range" and tuple(branch[1].crop_size) == (48, 96)
    assert tuple(augs[2].short_edge_length) == (96, 112, 128) and augs[2].max_size == 200
    data_cfg.INPUT.CROP.PROB = 1.0
    assert [type(a) for a in build_detr_augmentation(data_cfg, True)][1] is T.AugmentationList
    data_cfg.INPUT.CROP.ENABLED = False
    assert [type(a) for a in build_detr_augmentation(data_cfg, True)] == [
        T.RandomFlip,
        T.ResizeShortestEdge,
    ]
    test_augs = build_detr_augmentation(data_cfg, False)
    assert len(test_augs) == 1 and set(test_augs[0].short_edge_length) == {112}
    data_cfg.INPUT.MIN_SIZE_TEST = 0
    assert build_detr_augmentation(data_cfg, False) == []
    data_cfg.INPUT.CROP.ENABLED = True
    data_cfg.INPUT.CROP.PROB = 1.5
    with pytest.raises(ValueError, match="INPUT.CROP.PROB"):
        build_detr_augmentation(data_cfg, True)
    data_cfg.INPUT.CROP.PROB = 0.5
    data_cfg.INPUT.MASK_FORMAT = "rle"
    with pytest.raises(ValueError, match="INPUT.MASK_FORMAT"):
        DetrInstanceDatasetMapper(data_cfg, True)


@pytest.mark.parametrize("mask_format", ["polygon", "bitmask"])
def test_image_boxes_and_masks_stay_consistent(scene, data_cfg, mask_format):
    """Under flips, crops and resizes: every mask lies inside its box, covers pixels of its
    object's colour in the augmented image, and the rectangles' boxes are tight."""
    record, colors = scene
    data_cfg.INPUT.MASK_FORMAT = mask_format
    data_cfg.INPUT.CROP.PROB = 0.7
    mapper = DetrInstanceDatasetMapper(data_cfg, True)
    n_cropped = n_flipped = 0
    for seed in range(30):
        np.random.seed(seed)
        out = mapper(record)
        img = out["image"].permute(1, 2, 0).numpy().astype(np.float32)
        inst = out["instances"]
        assert out["image"].dtype == torch.uint8 and inst.image_size == img.shape[:2]
        assert min(img.shape[:2]) in (96, 112, 128) or max(img.shape[:2]) == 200
        masks = _bitmaps(inst)
        # polygon format: the ring (RLE) turns the whole image's masks into BitMasks
        assert isinstance(inst.gt_masks, BitMasks) == (
            mask_format == "bitmask" or 2 in inst.gt_classes
        )
        n_cropped += len(inst) < 3
        for k in range(len(inst)):
            cls, box, mask = int(inst.gt_classes[k]), inst.gt_boxes.tensor[k].numpy(), masks[k]
            assert mask.any()
            ys, xs = np.nonzero(mask)
            assert xs.min() >= box[0] - 1 and xs.max() + 1 <= box[2] + 1
            assert ys.min() >= box[1] - 1 and ys.max() + 1 <= box[3] + 1
            assert (box[[0, 1]] >= 0).all() and box[2] <= img.shape[1] and box[3] <= img.shape[0]
            if cls < 2:  # rectangles: the box is the mask's tight box
                assert np.abs([xs.min(), ys.min(), xs.max() + 1, ys.max() + 1] - box).max() <= 1.01
            # pixels inside the mask (away from its edge) have the object's colour
            inner = (
                mask
                & np.roll(mask, 1, 0)
                & np.roll(mask, -1, 0)
                & np.roll(mask, 1, 1)
                & np.roll(mask, -1, 1)
            )
            if inner.sum() >= 4:
                assert np.abs(img[inner].mean(axis=0) - colors[cls]).max() < 40, (seed, cls)
        centers = {
            int(c): float(b[0] + b[2]) for c, b in zip(inst.gt_classes, inst.gt_boxes.tensor)
        }
        if 0 in centers and 1 in centers:  # red is left of green unless flipped
            n_flipped += centers[0] > centers[1]
    assert n_cropped > 3 and n_flipped > 3  # the crop and flip branches were exercised


def test_polygon_and_bitmask_formats_agree(scene, data_cfg):
    record, _ = scene
    record = {**record, "annotations": record["annotations"][:2]}  # polygons only
    outs = {}
    for fmt in ("polygon", "bitmask"):
        data_cfg.INPUT.MASK_FORMAT = fmt
        mapper = DetrInstanceDatasetMapper(data_cfg, True)
        outs[fmt] = []
        for seed in range(8):
            np.random.seed(seed)
            outs[fmt].append(mapper(record))
    for a, b in zip(outs["polygon"], outs["bitmask"]):
        assert isinstance(a["instances"].gt_masks, PolygonMasks)
        assert torch.equal(a["image"], b["image"])
        assert torch.equal(a["instances"].gt_boxes.tensor, b["instances"].gt_boxes.tensor)
        pa, pb = _bitmaps(a["instances"]), _bitmaps(b["instances"])
        assert pa.shape == pb.shape
        for ma, mb in zip(pa, pb):
            iou = (ma & mb).sum() / max((ma | mb).sum(), 1)
            assert iou > 0.85


@pytest.mark.parametrize("mask_format", ["polygon", "bitmask"])
def test_images_without_annotations_are_kept(scene, data_cfg, mask_format):
    record, _ = scene
    data_cfg.INPUT.MASK_FORMAT = mask_format
    mapper = DetrInstanceDatasetMapper(data_cfg, True)
    for rec in (
        {**record, "annotations": []},
        {k: v for k, v in record.items() if k != "annotations"},
    ):
        out = mapper(rec)
        inst = out["instances"]
        assert len(inst) == 0 and inst.gt_boxes.tensor.shape == (0, 4)
        assert inst.gt_classes.dtype == torch.int64 and len(inst.gt_masks) == 0
        assert isinstance(inst.gt_masks, PolygonMasks if mask_format == "polygon" else BitMasks)
        assert out["image"].shape[0] == 3


def test_crowd_annotations_are_ignored(scene, data_cfg):
    record, _ = scene
    annos = [dict(a) for a in record["annotations"]]
    annos[0]["iscrowd"] = 1
    data_cfg.INPUT.CROP.ENABLED = False
    out = DetrInstanceDatasetMapper(data_cfg, True)({**record, "annotations": annos})
    assert sorted(out["instances"].gt_classes.tolist()) == [1, 2]


def test_inference_is_deterministic_and_drops_annotations(scene, data_cfg):
    record, _ = scene
    mapper = DetrInstanceDatasetMapper(data_cfg, False)
    a, b = mapper(record), mapper(record)
    assert torch.equal(a["image"], b["image"]) and a["image"].shape == (3, 112, 149)
    assert "instances" not in a and "annotations" not in a
    assert (a["height"], a["width"], a["image_id"]) == (H, W, 7)
    assert "annotations" in record  # input not modified


def test_clip_polygon():
    square = np.array([[-5.0, -5.0], [5.0, -5.0], [5.0, 5.0], [-5.0, 5.0]])
    clipped = clip_polygon(square, 0, 0, 10, 10)
    assert sorted(map(tuple, clipped.tolist())) == [(0, 0), (0, 5), (5, 0), (5, 5)]
    assert len(clip_polygon(square, 6, 6, 10, 10)) == 0
    assert np.array_equal(clip_polygon(square, -10, -10, 10, 10), square)
    # a U shape cut by a window across its two arms: two pieces, areas add up exactly
    u = np.array(
        [[0, 0], [30, 0], [30, 30], [20, 30], [20, 10], [10, 10], [10, 30], [0, 30]], float
    )
    part = clip_polygon(u, 0, 20, 30, 40)
    raster = polygons_to_bitmask([part.reshape(-1)], 40, 40)
    full = polygons_to_bitmask([u.reshape(-1)], 40, 40)
    window = np.zeros_like(full)
    window[20:40, 0:30] = True
    assert np.array_equal(raster, full & window)
