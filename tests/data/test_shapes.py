"""The synthetic shapes dataset: determinism, exact annotations, atomic generation, COCO eval."""

import dataclasses
import hashlib
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pycocotools.mask as mask_util
import pytest
from scipy import ndimage

from solq_d2.data import shapes as S
from solq_d2.data.shapes import ShapesSpec, generate_shapes, render_shapes_image

ROOT = Path(__file__).resolve().parents[2]
SMALL = ShapesSpec(num_images=12, seed=5, min_side=96, max_side=160)


def _digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _decode(ann, h, w) -> np.ndarray:
    segm = ann["segmentation"]
    rle = mask_util.merge(mask_util.frPyObjects(segm, h, w)) if isinstance(segm, list) else segm
    return mask_util.decode(rle).astype(bool)


def test_render_is_deterministic_and_independent_of_split_size(tmp_path):
    a = generate_shapes(tmp_path / "a", SMALL)
    b = generate_shapes(tmp_path / "b", dataclasses.replace(SMALL, num_images=5))
    for i in range(5):
        name = f"{i:06d}.png"
        assert _digest(a / "images" / name) == _digest(b / "images" / name)
    ja, jb = (json.loads((d / "annotations.json").read_text()) for d in (a, b))
    assert ja["annotations"][: len(jb["annotations"])] == jb["annotations"]
    img0, objs0 = render_shapes_image(SMALL, 3)
    img1, objs1 = render_shapes_image(SMALL, 3)
    assert np.array_equal(img0, img1) and objs0 == objs1
    assert not np.array_equal(img0, render_shapes_image(SMALL, 4)[0])


def test_windowed_rasterization_equals_whole_image():
    rng = np.random.default_rng(0)
    h, w = 131, 157
    for k in range(80):
        cls = k % 4
        polys = S._shape_polygons(rng, cls, float(rng.uniform(60, 4000)))
        lo, hi = polys[0].min(axis=0), polys[0].max(axis=0)
        offset = rng.uniform(1 - lo, [w - 1 - hi[0], h - 1 - hi[1]])
        polys = [np.round((p + offset) * 8) / 8 for p in polys]
        mask, (y0, y1, x0, x1) = S._object_mask(cls, polys, h, w)
        full = np.zeros((h, w), dtype=bool)
        full[y0:y1, x0:x1] = mask
        expected = S._rasterize(polys[:1], h, w)
        if cls == 3:
            expected &= ~S._rasterize(polys[1:], h, w)
        assert np.array_equal(full, expected), k


def test_annotations_are_exact_disjoint_and_coco_valid(tmp_path):
    d = generate_shapes(tmp_path / "s", SMALL)
    coco = json.loads((d / "annotations.json").read_text())
    assert [c["name"] for c in coco["categories"]] == list(S.SHAPES_CLASSES)
    images = {img["id"]: img for img in coco["images"]}
    by_image = {}
    for ann in coco["annotations"]:
        img = images[ann["image_id"]]
        h, w = img["height"], img["width"]
        mask = _decode(ann, h, w)
        assert mask.sum() == ann["area"] > 0
        assert np.allclose(
            mask_util.toBbox(mask_util.encode(np.asfortranarray(mask.astype(np.uint8)))),
            ann["bbox"],
        )
        if ann["category_id"] == 4:  # rings are RLE and have a hole (unless occluded)
            assert isinstance(ann["segmentation"], dict)
        by_image.setdefault(ann["image_id"], []).append(mask)
    n_rings_with_hole = sum(
        ndimage.binary_fill_holes(
            _decode(a, images[a["image_id"]]["height"], images[a["image_id"]]["width"])
        ).sum()
        > a["area"]
        for a in coco["annotations"]
        if a["category_id"] == 4
    )
    assert n_rings_with_hole > 0
    for masks in by_image.values():  # visible masks never overlap
        assert (np.sum(masks, axis=0) <= 1).all()
    assert any(len(m) > 1 for m in by_image.values())
    assert any(isinstance(a["segmentation"], list) for a in coco["annotations"])


def test_object_pixels_are_painted_where_annotated(tmp_path):
    """Inside a visible mask the image has one (faintly textured) colour, and mostly another
    colour just outside."""
    import cv2

    d = generate_shapes(tmp_path / "s", SMALL)
    coco = json.loads((d / "annotations.json").read_text())
    images = {img["id"]: img for img in coco["images"]}
    checked, contrasted = 0, 0
    for ann in coco["annotations"]:
        img = images[ann["image_id"]]
        mask = _decode(ann, img["height"], img["width"])
        inner = ndimage.binary_erosion(mask, iterations=2)
        ring = ndimage.binary_dilation(mask, iterations=3) & ~ndimage.binary_dilation(mask)
        if inner.sum() < 30 or ring.sum() < 30:
            continue
        pixels = cv2.imread(str(d / "images" / img["file_name"]))[:, :, ::-1].astype(np.float32)
        # objects are flat or faintly striped: small spread inside, a contrast with outside
        assert pixels[inner].std(axis=0).mean() < 25
        checked += 1
        contrasted += np.abs(pixels[inner].mean(axis=0) - pixels[ring].mean(axis=0)).mean() > 15
    assert checked > 5 and contrasted >= 0.7 * checked


def test_generation_failure_leaves_nothing(tmp_path, monkeypatch):
    stale = tmp_path / ".s.tmp-1-dead"
    stale.mkdir()
    calls = []

    def boom(spec, index):
        calls.append(index)
        if index == 2:
            raise KeyboardInterrupt  # like a kill in the middle of the generation
        return render_shapes_image(spec, index)

    monkeypatch.setattr(S, "render_shapes_image", boom)
    with pytest.raises(KeyboardInterrupt):
        generate_shapes(tmp_path / "s", SMALL)
    assert calls == [0, 1, 2]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["s.lock"]  # stale temp removed too
    monkeypatch.undo()
    d = generate_shapes(tmp_path / "s", SMALL)
    assert len(list((d / "images").iterdir())) == SMALL.num_images


def test_other_spec_in_directory_is_an_error(tmp_path):
    generate_shapes(tmp_path / "s", SMALL)
    with pytest.raises(RuntimeError, match="different specification"):
        generate_shapes(tmp_path / "s", dataclasses.replace(SMALL, seed=6))


def test_concurrent_generation_from_two_processes(tmp_path):
    # shapes.py needs neither torch nor detectron2: load it alone so the processes start fast.
    script = textwrap.dedent(
        f"""
        import importlib.util, sys
        spec = importlib.util.spec_from_file_location("shapes", {str(Path(S.__file__))!r})
        shapes = importlib.util.module_from_spec(spec)
        sys.modules["shapes"] = shapes
        spec.loader.exec_module(shapes)
        shapes.generate_shapes({str(tmp_path / "s")!r}, shapes.ShapesSpec(**{SMALL.__dict__!r}))
        """
    )
    procs = [
        subprocess.Popen([sys.executable, "-c", script], stderr=subprocess.PIPE) for _ in range(2)
    ]
    for p in procs:
        assert p.wait(timeout=300) == 0, p.stderr.read().decode()
    ref = generate_shapes(tmp_path / "ref", SMALL)
    got = tmp_path / "s"
    names = sorted(p.name for p in (got / "images").iterdir())
    assert names == sorted(p.name for p in (ref / "images").iterdir())
    assert all(_digest(got / "images" / n) == _digest(ref / "images" / n) for n in names)
    assert _digest(got / "annotations.json") == _digest(ref / "annotations.json")
    assert not [p for p in tmp_path.iterdir() if ".tmp-" in p.name]


def test_builtin_splits_are_registered_lazily_and_have_all_size_buckets(tmp_path):
    """The real registered datasets: metadata without files, then shapes_val generated."""
    script = textwrap.dedent(
        """
        import json, os, sys
        import numpy as np
        import solq_d2  # registers shapes_train / shapes_val
        from detectron2.data import DatasetCatalog, MetadataCatalog
        from solq_d2.data import BUILTIN_SHAPES, shapes_statistics
        from solq_d2.data.shapes import render_shapes_image
        root = os.environ["SOLQ_D2_DATASETS"]
        out = {"classes": MetadataCatalog.get("shapes_train").thing_classes,
               "files_before": os.listdir(root)}
        dicts = DatasetCatalog.get("shapes_val")
        meta = MetadataCatalog.get("shapes_val")
        out["stats"] = shapes_statistics(meta.json_file)
        out["n_dicts"] = len(dicts)
        spec = BUILTIN_SHAPES["shapes_val"][1]
        from PIL import Image
        img = np.asarray(Image.open(dicts[7]["file_name"]))
        out["image7_matches"] = bool(np.array_equal(img, render_shapes_image(spec, 7)[0]))
        out["train_dir_absent"] = not os.path.exists(MetadataCatalog.get("shapes_train").json_file)
        print("RESULT" + json.dumps(out))
        """
    )
    env = {**os.environ, "PYTHONPATH": str(ROOT), "SOLQ_D2_DATASETS": str(tmp_path)}
    res = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    out = json.loads(res.stdout.split("RESULT")[-1])
    assert out["classes"] == ["circle", "triangle", "rectangle", "ring"]
    assert out["files_before"] == []
    assert out["train_dir_absent"] and out["image7_matches"]
    stats = out["stats"]
    assert out["n_dicts"] == stats["images"] == 250
    assert stats["empty_images"] > 0 and stats["max_instances_per_image"] >= 5
    assert 2.0 < stats["instances"] / stats["images"] < 5.0
    n = stats["instances"]
    for bucket in ("small", "medium", "large"):  # every COCO size bucket is well populated
        assert stats["by_bucket"][bucket] > 0.08 * n, stats
    for cls, buckets in stats["by_class"].items():
        assert all(v > 0 for v in buckets.values()), (cls, buckets)
    assert 0 < stats["rle_annotations"] < n
    assert 160 <= stats["min_side"] and stats["max_side"] <= 256


def test_coco_evaluator_scores_ground_truth_as_perfect(tmp_path, dataset_names):
    import detectron2
    import torch
    from detectron2.data import DatasetCatalog
    from detectron2.evaluation import COCOEvaluator
    from detectron2.structures import Boxes, BoxMode, Instances

    from solq_d2.data import prepare_dataset, register_shapes

    name = dataset_names("shapes_eval")
    register_shapes(name, tmp_path / "s", SMALL)
    prepare_dataset(name)  # COCOEvaluator reads the json file when it is built
    fast = hasattr(detectron2._C, "COCOevalAccumulate")
    evaluator = COCOEvaluator(
        name, tasks=("bbox", "segm"), distributed=False, output_dir=None, use_fast_impl=fast
    )
    dicts = DatasetCatalog.get(name)
    evaluator.reset()
    for d in dicts:
        h, w = d["height"], d["width"]
        inst = Instances((h, w))
        annos = d["annotations"]
        boxes = [BoxMode.convert(a["bbox"], a["bbox_mode"], BoxMode.XYXY_ABS) for a in annos]
        inst.pred_boxes = Boxes(torch.tensor(boxes, dtype=torch.float64).reshape(-1, 4))
        inst.scores = torch.ones(len(annos))
        inst.pred_classes = torch.tensor([a["category_id"] for a in annos], dtype=torch.int64)
        masks = [_decode(a, h, w) for a in annos]
        inst.pred_masks = torch.from_numpy(np.stack(masks) if masks else np.zeros((0, h, w), bool))
        evaluator.process([d], [{"instances": inst}])
    results = evaluator.evaluate()
    assert results["bbox"]["AP"] == pytest.approx(100.0)
    assert results["segm"]["AP"] == pytest.approx(100.0)


def test_statistics_command_prints_bucket_tables(tmp_path, dataset_names, capsys):
    from solq_d2.data import register_shapes
    from solq_d2.data.__main__ import main

    name = dataset_names("shapes_cli")
    register_shapes(name, tmp_path / "s", SMALL)
    main([name])
    out = capsys.readouterr().out
    stats = S.shapes_statistics(tmp_path / "s" / "annotations.json")
    assert f"**{name}**: 12 images" in out
    b = stats["by_bucket"]
    assert f"| all | {b['small']} | {b['medium']} | {b['large']} | {stats['instances']} |" in out
