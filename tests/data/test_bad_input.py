"""Bad input on the data path: a clear error naming the file, or handled and counted."""

import logging

import numpy as np
import pycocotools.mask as mask_util
import pytest
import torch
from detectron2.data import DatasetCatalog
from detectron2.data.datasets import register_coco_instances
from detectron2.structures import BitMasks, BoxMode
from PIL import Image

from solq_d2.data import DetrInstanceDatasetMapper, ImageReadError


@pytest.fixture
def mapper(data_cfg):
    """Train mapper without random augmentation (identity geometry): outputs are predictable."""
    data_cfg.INPUT.CROP.ENABLED = False
    data_cfg.INPUT.RANDOM_FLIP = "none"
    data_cfg.INPUT.MIN_SIZE_TRAIN = (64,)
    data_cfg.INPUT.MAX_SIZE_TRAIN = 1000
    return DetrInstanceDatasetMapper(data_cfg, True)


def _record(tmp_path, annos, image=None, name="img.png"):
    path = tmp_path / name
    (image if image is not None else Image.new("RGB", (96, 64), (10, 20, 30))).save(path)
    w, h = Image.open(path).size
    annos = [{"iscrowd": 0, "category_id": 0, "bbox_mode": BoxMode.XYWH_ABS, **a} for a in annos]
    return {"file_name": str(path), "image_id": 1, "height": h, "width": w, "annotations": annos}


def _square(x, y, s):
    return {"bbox": [x, y, s, s], "segmentation": [[x, y, x + s, y, x + s, y + s, x, y + s]]}


def test_missing_image_names_the_file(tmp_path, mapper):
    rec = _record(tmp_path, [])
    rec["file_name"] = str(tmp_path / "does_not_exist.jpg")
    with pytest.raises(ImageReadError, match="does_not_exist.jpg.*image_id=1"):
        mapper(rec)


@pytest.mark.parametrize("kind", ["garbage", "truncated", "empty"])
def test_corrupt_image_names_the_file(tmp_path, mapper, kind):
    rec = _record(tmp_path, [_square(5, 5, 20)])
    path = tmp_path / "img.png"
    noise = np.random.default_rng(0).integers(0, 255, (64, 96, 3), dtype=np.uint8)
    Image.fromarray(noise).save(path)
    data = path.read_bytes()
    path.write_bytes(
        {"garbage": b"not an image" * 50, "truncated": data[: len(data) // 2], "empty": b""}[kind]
    )
    with pytest.raises(ImageReadError, match="img.png"):
        mapper(rec)


def test_image_size_mismatch_names_the_file(tmp_path, mapper):
    rec = _record(tmp_path, [])
    rec["height"] = 65
    with pytest.raises(Exception, match="img.png"):
        mapper(rec)


@pytest.mark.parametrize(
    "mode, fmt, expected",
    [
        ("L", "RGB", (7, 7, 7)),
        ("L", "BGR", (7, 7, 7)),
        ("RGBA", "RGB", (200, 100, 50)),
        ("RGBA", "BGR", (50, 100, 200)),
        ("P", "RGB", (200, 100, 50)),
        ("CMYK", "RGB", None),
    ],
)
def test_grayscale_rgba_palette_images_are_converted(tmp_path, data_cfg, mode, fmt, expected):
    data_cfg.INPUT.FORMAT = fmt
    data_cfg.INPUT.CROP.ENABLED = False
    data_cfg.INPUT.MIN_SIZE_TRAIN = (64,)
    if mode == "L":
        img = Image.new("L", (96, 64), 7)
    else:
        img = (
            Image.new("RGBA", (96, 64), (200, 100, 50, 128)).convert(mode)
            if mode != "RGBA"
            else Image.new("RGBA", (96, 64), (200, 100, 50, 128))
        )
    rec = _record(
        tmp_path, [_square(10, 10, 30)], image=img, name=f"img.{'jpg' if mode == 'CMYK' else 'png'}"
    )
    out = DetrInstanceDatasetMapper(data_cfg, True)(rec)
    assert out["image"].shape == (3, 64, 96) and out["image"].dtype == torch.uint8
    if expected is not None:
        assert out["image"][:, 32, 48].tolist() == list(expected)
    assert len(out["instances"]) == 1


def test_16_bit_image_is_an_error_not_a_silent_clip(tmp_path, mapper):
    img = Image.fromarray(np.full((64, 96), 3000, dtype=np.uint16))
    with pytest.raises(ImageReadError, match="img.png.*16/32-bit"):
        mapper(_record(tmp_path, [], image=img))


def test_exif_orientation_is_applied(tmp_path, mapper):
    img = Image.new("RGB", (64, 96), (1, 2, 3))  # stored portrait, displayed landscape
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees
    path = tmp_path / "img.jpg"
    img.save(path, exif=exif.tobytes())
    rec = {"file_name": str(path), "image_id": 3, "height": 64, "width": 96, "annotations": []}
    assert mapper(rec)["image"].shape == (3, 64, 96)


def test_empty_annotation_list_from_a_coco_file(tmp_path, mapper, dataset_names, coco_tools):
    img = coco_tools.solid_image(64, 96, [])
    json_file, root = coco_tools.write_coco(
        tmp_path, [(img, []), (img, [coco_tools.rect_annotation(4, 4, 30, 30)])]
    )
    name = dataset_names()
    register_coco_instances(name, {}, json_file, root)
    dicts = DatasetCatalog.get(name)
    outs = [mapper(d) for d in dicts]
    assert [len(o["instances"]) for o in outs] == [0, 1]


def test_bad_annotations_in_a_coco_file(tmp_path, mapper, dataset_names, coco_tools):
    """Through detectron2's load_coco_json and the mapper, as in training."""
    img = coco_tools.solid_image(64, 96, [])
    rect = coco_tools.rect_annotation
    annos = [
        rect(4, 4, 30, 30),
        {**rect(40, 4, 60, 30), "bbox": [40, 4, 0, 26]},  # degenerate box
        {**rect(40, 4, 60, 30), "segmentation": [[40, 4, 60, 4]]},  # 2-point polygon
        {**rect(40, 4, 60, 30), "segmentation": [[40, 4, 50, 4, 60, 4]]},  # zero area
        {**rect(40, 40, 60, 60), "segmentation": _rle_square(64, 96, 40, 40, 20, compressed=False)},
        {k: v for k, v in rect(70, 40, 90, 60).items() if k != "bbox"},  # no bbox
        rect(80, 50, 120, 90),  # partly outside the image
        rect(-40, -40, -10, -10),  # entirely outside
    ]
    json_file, root = coco_tools.write_coco(tmp_path, [(img, annos)])
    name = dataset_names()
    register_coco_instances(name, {}, json_file, root)
    (record,) = DatasetCatalog.get(name)
    inst = mapper(record)["instances"]
    assert inst.gt_boxes.tensor.tolist() == [
        [4, 4, 30, 30],
        [40, 40, 60, 60],
        [70, 40, 90, 60],
        [80, 50, 96, 64],
    ]
    assert isinstance(inst.gt_masks, BitMasks)  # the RLE annotation (polygon mask format)
    assert dict(mapper.bad_input.counts) == {
        "degenerate_box": 1,
        "invalid_polygon": 1,  # the 2-point polygon was already dropped by load_coco_json
        "no_valid_mask": 1,
        "box_from_mask": 1,
        "box_clipped": 1,
        "box_outside_image": 1,
        "rle_as_bitmask": 1,
    }


def test_degenerate_boxes_are_dropped_and_counted(tmp_path, mapper, caplog):
    annos = [
        _square(10, 10, 20),
        {**_square(40, 10, 20), "bbox": [40, 10, 0, 20]},  # zero width
        {**_square(40, 10, 20), "bbox": [40, 10, -5, 20]},  # negative width
        {**_square(40, 10, 20), "bbox": [40, float("nan"), 20, 20]},
        {**_square(40, 10, 20), "bbox": [40, 10, 20]},  # 3 numbers
    ]
    with caplog.at_level(logging.WARNING, logger="solq_d2.data"):
        out = mapper(_record(tmp_path, annos))
    assert len(out["instances"]) == 1
    assert out["instances"].gt_boxes.tensor.tolist() == [[10, 10, 30, 30]]
    assert mapper.bad_input.counts["degenerate_box"] == 4
    assert "img.png" in caplog.text and "zero/negative size" in caplog.text


def test_invalid_polygons_are_dropped_and_counted(tmp_path, mapper):
    good = [10, 10, 30, 10, 30, 30, 10, 30]
    annos = [
        {
            "bbox": [10, 10, 20, 20],
            "segmentation": [good, [1, 1, 5, 5]],
        },  # 2 points: polygon dropped
        {"bbox": [10, 10, 20, 20], "segmentation": [[1, 1, 5, 5, 9]]},  # odd length
        {"bbox": [10, 10, 20, 20], "segmentation": [[0, 0, 10, 10, 20, 20]]},  # zero area
        {"bbox": [10, 10, 20, 20], "segmentation": [[0, 0, float("inf"), 10, 20, 0]]},
        {"bbox": [10, 10, 20, 20], "segmentation": [["a", "b", "c", "d", "e", "f"]]},
        {"bbox": [10, 10, 20, 20], "segmentation": []},  # no mask at all
        {"bbox": [10, 10, 20, 20]},
    ]
    out = mapper(_record(tmp_path, annos))
    inst = out["instances"]
    assert len(inst) == 1 and len(inst.gt_masks.polygons[0]) == 1
    assert mapper.bad_input.counts["invalid_polygon"] == 5
    assert mapper.bad_input.counts["no_valid_mask"] == 4
    assert mapper.bad_input.counts["missing_mask"] == 2


def _rle_square(h, w, x, y, s, compressed=True, str_counts=False):
    m = np.zeros((h, w), dtype=np.uint8)
    m[y : y + s, x : x + s] = 1
    if not compressed:  # COCO "uncompressed RLE": counts of alternating runs, column-major
        flat = m.flatten(order="F")
        change = np.flatnonzero(np.diff(flat)) + 1
        runs = np.diff(np.concatenate([[0], change, [len(flat)]])).tolist()
        return {"size": [h, w], "counts": ([0] if flat[0] else []) + runs}
    rle = mask_util.encode(np.asfortranarray(m))
    if str_counts:
        rle["counts"] = rle["counts"].decode()
    return rle


@pytest.mark.parametrize("mask_format", ["polygon", "bitmask"])
def test_rle_masks_compressed_and_uncompressed(tmp_path, mapper, mask_format):
    mapper.instance_mask_format = mask_format
    annos = [
        {"bbox": [10, 10, 20, 20], "segmentation": _rle_square(64, 96, 10, 10, 20)},
        {
            "bbox": [40, 10, 20, 20],
            "segmentation": _rle_square(64, 96, 40, 10, 20, str_counts=True),
        },
        {
            "bbox": [10, 35, 20, 20],
            "segmentation": _rle_square(64, 96, 10, 35, 20, compressed=False),
        },
        {"bbox": [40, 35, 20, 20], "segmentation": [[40, 35, 60, 35, 60, 55, 40, 55]]},
    ]
    inst = mapper(_record(tmp_path, annos))["instances"]
    assert isinstance(inst.gt_masks, BitMasks) and len(inst) == 4
    masks = inst.gt_masks.tensor.numpy()
    for m, (x, y) in zip(masks, [(10, 10), (40, 10), (10, 35), (40, 35)]):
        expected = np.zeros((64, 96), dtype=bool)
        expected[y : y + 20, x : x + 20] = True
        assert np.array_equal(m, expected)
    assert mapper.bad_input.counts["rle_as_bitmask"] == (mask_format == "polygon")


def test_rle_of_the_wrong_size_names_the_file(tmp_path, mapper):
    annos = [{"bbox": [10, 10, 20, 20], "segmentation": _rle_square(32, 32, 10, 10, 5)}]
    with pytest.raises(ValueError, match="img.png: RLE segmentation of size \\[32, 32\\]"):
        mapper(_record(tmp_path, annos))
    with pytest.raises(ValueError, match="img.png: unsupported segmentation of type str"):
        mapper(_record(tmp_path, [{"bbox": [10, 10, 20, 20], "segmentation": "circle"}]))


def test_empty_rle_is_dropped(tmp_path, mapper):
    annos = [{"bbox": [10, 10, 20, 20], "segmentation": _rle_square(64, 96, 0, 0, 0)}]
    assert len(mapper(_record(tmp_path, annos))["instances"]) == 0
    assert mapper.bad_input.counts["no_valid_mask"] == 1


@pytest.mark.parametrize("mask_format", ["polygon", "bitmask"])
def test_out_of_image_coordinates(tmp_path, mapper, mask_format):
    mapper.instance_mask_format = mask_format
    annos = [
        # half outside on the left and the bottom: clipped to the image
        {"bbox": [-20, 44, 40, 40], "segmentation": [[-20, 44, 20, 44, 20, 84, -20, 84]]},
        # entirely outside: dropped
        {"bbox": [200, 10, 20, 20], "segmentation": [[200, 10, 220, 10, 220, 30, 200, 30]]},
        # no bbox: computed from the polygon
        {"bbox": None, "segmentation": [[50, 5, 70, 5, 70, 25, 50, 25]]},
    ]
    inst = mapper(_record(tmp_path, annos))["instances"]
    assert inst.gt_boxes.tensor.tolist() == [[0, 44, 20, 64], [50, 5, 70, 25]]
    assert mapper.bad_input.counts == {"box_clipped": 1, "box_outside_image": 1, "box_from_mask": 1}
    m = inst.gt_masks.tensor if mask_format == "bitmask" else inst.gt_masks
    if mask_format == "polygon":
        from detectron2.structures import polygons_to_bitmask

        m = torch.from_numpy(np.stack([polygons_to_bitmask(p, 64, 96) for p in m.polygons]))
    assert int(m[0].sum()) == 20 * 20 and m[0, 44:64, 0:20].all()


def test_bad_input_log_summarises_after_the_first_cases(caplog):
    from solq_d2.data import BadInputLog

    log = BadInputLog(first_n=2, period_s=0.0)
    with caplog.at_level(logging.WARNING, logger="solq_d2.data"):
        for _ in range(5):
            log.report("degenerate_box", "x.jpg")
    assert log.counts["degenerate_box"] == 5
    assert caplog.text.count("x.jpg") == 2 and "'degenerate_box': 5" in caplog.text
