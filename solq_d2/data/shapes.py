"""The synthetic "shapes" instance-segmentation dataset (COCO format), generated on first use.

Every image is drawn from its own random stream ``numpy.random.default_rng([seed, index])``, so
the dataset is a pure function of its :class:`ShapesSpec` (and of :data:`SHAPES_VERSION`): two
generations are byte-identical and the first ``k`` images do not depend on ``num_images``.

An image holds 0 to ``max_objects`` objects of 4 classes (:data:`SHAPES_CLASSES`) on a textured
background (gradient, stripes, checkerboard or smooth noise). Objects are painted in order, so
later ones occlude earlier ones; the annotation of an object is exactly the set of pixels it
covers in the final image:

* a polygon (``segmentation: [[x0, y0, x1, y1, ...]]``) when the object is fully visible and has
  no hole (circles are 12-96-gons, triangles, rotated or axis-aligned rectangles);
* a compressed RLE (``{"size": [h, w], "counts": str}``) for rings (they have a hole, which COCO
  polygons cannot express: several polygons are a union) and for partially occluded objects.

Object areas are drawn per COCO size bucket (small < 32², medium < 96², large ≥ 96² pixels), so
COCOEvaluator's AP_s / AP_m / AP_l are all populated. ``python -m solq_d2.data.shapes --stats``
prints the statistics of the built-in splits (see docs/datasets.md).
"""

import dataclasses
import itertools
import json
import math
import multiprocessing
import os
import shutil
import uuid
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Dict, List, Tuple, Union

import numpy as np
import pycocotools.mask as mask_util
from PIL import Image

__all__ = [
    "SHAPES_VERSION",
    "SHAPES_CLASSES",
    "SHAPES_COLORS",
    "ShapesSpec",
    "render_shapes_image",
    "generate_shapes",
    "shapes_statistics",
]

# Bump when the generator's output changes: the cache directory is named after it.
SHAPES_VERSION = "v2"
SHAPES_CLASSES = ("circle", "triangle", "rectangle", "ring")
# One RGB colour per class for detectron2's Visualizer (metadata ``thing_colors``).
SHAPES_COLORS = [(230, 25, 75), (0, 130, 200), (60, 180, 75), (245, 130, 48)]
# COCO's area thresholds of the small / medium / large buckets (pixels).
COCO_AREA_SMALL, COCO_AREA_MEDIUM = 32**2, 96**2

ANNOTATIONS_FILE = "annotations.json"
IMAGES_DIR = "images"
SPEC_FILE = "spec.json"


@dataclasses.dataclass(frozen=True)
class ShapesSpec:
    """Parameters of one split of the shapes dataset.

    Attributes:
        num_images: number of images.
        seed: seed of the split; image ``i`` uses ``default_rng([seed, i])``.
        min_side, max_side: image width and height are drawn uniformly in this range (pixels).
        max_objects: an image holds 1 to ``max_objects`` objects (fewer if placement fails).
        empty_prob: probability that an image holds no object at all.
        bucket_probs: probabilities of drawing an object's area in COCO's small / medium / large
            bucket (areas are log-uniform inside a bucket).
        min_area: smallest object area (pixels).
        max_hidden: largest fraction of an object that later objects may hide.
    """

    num_images: int
    seed: int
    min_side: int = 160
    max_side: int = 256
    max_objects: int = 6
    empty_prob: float = 0.03
    bucket_probs: Tuple[float, float, float] = (0.3, 0.45, 0.25)
    min_area: int = 100
    max_hidden: float = 0.5

    def __post_init__(self):
        if self.num_images < 0 or self.max_objects < 1 or not 16 <= self.min_side <= self.max_side:
            raise ValueError(f"invalid ShapesSpec {self}")
        if len(self.bucket_probs) != 3 or abs(sum(self.bucket_probs) - 1.0) > 1e-6:
            raise ValueError(f"ShapesSpec.bucket_probs must be 3 probabilities, got {self}")

    def to_json(self) -> Dict:
        d = dataclasses.asdict(self)
        d["bucket_probs"] = list(self.bucket_probs)
        d["version"] = SHAPES_VERSION
        return d


# ----------------------------------------------------------------------------------------------
# Drawing


def _background(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    """A textured (h, w, 3) float32 RGB background."""
    c0, c1 = rng.uniform(0, 255, 3).astype(np.float32), rng.uniform(0, 255, 3).astype(np.float32)
    kind = rng.integers(4)
    theta = rng.uniform(0, 2 * np.pi)
    ys = np.arange(h, dtype=np.float32)[:, None]
    xs = np.arange(w, dtype=np.float32)[None, :]
    if kind == 0:  # linear gradient
        proj = xs * np.float32(np.cos(theta)) + ys * np.float32(np.sin(theta))
        t = (proj - proj.min()) / max(float(np.ptp(proj)), 1.0)
    elif kind == 1:  # stripes
        proj = xs * np.float32(np.cos(theta)) + ys * np.float32(np.sin(theta))
        t = 0.5 + 0.5 * np.sin(proj * np.float32(2 * np.pi / rng.uniform(6, 40)))
    elif kind == 2:  # checkerboard
        cell = int(rng.integers(8, 33))
        t = ((xs // cell + ys // cell) % 2).astype(np.float32)
    else:  # smooth noise
        grid = rng.random((int(rng.integers(3, 9)), int(rng.integers(3, 9)))).astype(np.float32)
        smooth = Image.fromarray(grid, mode="F").resize((w, h), Image.BICUBIC)
        t = np.clip(np.asarray(smooth, dtype=np.float32), 0, 1)
    return c0 + t[..., None] * (c1 - c0)


def _circle(cx: float, cy: float, r: float, phase: float) -> np.ndarray:
    n = int(np.clip(math.ceil(math.pi * r / 2), 12, 96))
    a = phase + np.arange(n) * (2 * np.pi / n)
    return np.stack([cx + r * np.cos(a), cy + r * np.sin(a)], axis=1)


def _shape_polygons(rng: np.random.Generator, cls: int, area: float) -> List[np.ndarray]:
    """Polygons (k, 2) of one object centred at (0, 0), whose mask area is about ``area``.

    A ring is returned as [outer, inner]: its mask is outer minus inner.
    """
    phase = rng.uniform(0, 2 * np.pi)
    if cls == 0:  # circle
        return [_circle(0.0, 0.0, math.sqrt(area / math.pi), phase)]
    if cls == 1:  # triangle: vertices on a circle, every interior angle >= 25 degrees
        while True:
            a = np.sort(rng.uniform(0, 2 * np.pi, 3))
            arcs = np.diff(np.concatenate([a, a[:1] + 2 * np.pi]))
            if arcs.min() >= np.deg2rad(50):  # interior angle = half the opposite arc
                break
        pts = np.stack([np.cos(a), np.sin(a)], axis=1)
        (ux, uy), (vx, vy) = pts[1] - pts[0], pts[2] - pts[0]
        unit = 0.5 * abs(ux * vy - uy * vx)
        pts = pts * math.sqrt(area / unit)
        return [pts - pts.mean(axis=0)]
    if cls == 2:  # rectangle, axis-aligned half of the time
        aspect = math.exp(rng.uniform(math.log(1 / 3), math.log(3)))
        w = max(math.sqrt(area * aspect), 4.0)
        h = max(area / w, 4.0)
        t = 0.0 if rng.random() < 0.5 else rng.uniform(0, np.pi / 2)
        cx, cy = np.array([-w, w, w, -w]) / 2, np.array([-h, -h, h, h]) / 2
        c, s = math.cos(t), math.sin(t)
        return [np.stack([c * cx - s * cy, s * cx + c * cy], axis=1)]
    # ring: area = pi R^2 (1 - rho^2)
    rho = rng.uniform(0.4, 0.65)
    outer = math.sqrt(area / (math.pi * (1 - rho**2)))
    return [_circle(0.0, 0.0, outer, phase), _circle(0.0, 0.0, rho * outer, phase)]


def _rasterize(polygons: List[np.ndarray], h: int, w: int) -> np.ndarray:
    """Union of polygons as an (h, w) bool mask, with COCO's rasteriser (as the evaluator)."""
    rles = mask_util.frPyObjects([p.reshape(-1).tolist() for p in polygons], h, w)
    return mask_util.decode(mask_util.merge(rles)).astype(bool)


def _object_mask(cls: int, polygons: List[np.ndarray], h: int, w: int):
    """Rasterise an object inside a window around it (much cheaper than the whole image).

    Coordinates are multiples of 1/8 pixel, so shifting them by whole pixels is exact in floating
    point and COCO's rasteriser gives the same pixels as on the whole image (checked by a test).

    Returns:
        mask: (y1 - y0, x1 - x0) bool, the object's pixels inside the window.
        window: (y0, y1, x0, x1) in image pixels.
    """
    lo, hi = polygons[0].min(axis=0), polygons[0].max(axis=0)
    x0, y0 = max(int(math.floor(lo[0])) - 2, 0), max(int(math.floor(lo[1])) - 2, 0)
    x1, y1 = min(int(math.ceil(hi[0])) + 3, w), min(int(math.ceil(hi[1])) + 3, h)
    shifted = [p - np.array([x0, y0], dtype=p.dtype) for p in polygons]
    mask = _rasterize(shifted[:1], y1 - y0, x1 - x0)
    if cls == 3:  # ring: outer disk minus inner disk
        mask &= ~_rasterize(shifted[1:], y1 - y0, x1 - x0)
    return mask, (y0, y1, x0, x1)


def _overlap(a: Dict, b_mask: np.ndarray, b_win: Tuple[int, int, int, int]):
    """Slices of ``a["visible"]`` and of ``b_mask`` over the intersection of their windows."""
    (ay0, ay1, ax0, ax1), (by0, by1, bx0, bx1) = a["window"], b_win
    y0, y1, x0, x1 = max(ay0, by0), min(ay1, by1), max(ax0, bx0), min(ax1, bx1)
    if y0 >= y1 or x0 >= x1:
        return None
    sa = (slice(y0 - ay0, y1 - ay0), slice(x0 - ax0, x1 - ax0))
    sb = (slice(y0 - by0, y1 - by0), slice(x0 - bx0, x1 - bx0))
    return sa, sb


def _sample_area(rng: np.random.Generator, spec: ShapesSpec, h: int, w: int) -> float:
    large_max = min(0.35 * h * w, 24000.0)
    bounds = [(spec.min_area, COCO_AREA_SMALL), (COCO_AREA_SMALL, COCO_AREA_MEDIUM)]
    if large_max > 1.05 * COCO_AREA_MEDIUM:
        bounds.append((COCO_AREA_MEDIUM, large_max))
    probs = np.asarray(spec.bucket_probs[: len(bounds)], dtype=np.float64)
    lo, hi = bounds[int(rng.choice(len(bounds), p=probs / probs.sum()))]
    return math.exp(rng.uniform(math.log(lo), math.log(hi)))


def render_shapes_image(spec: ShapesSpec, index: int) -> Tuple[np.ndarray, List[Dict]]:
    """Draw image ``index`` of a split.

    Returns:
        image: (H, W, 3) uint8 RGB.
        objects: one dict per object in painting order with ``category_id`` (1-based),
            ``segmentation`` (polygon list or compressed RLE with str counts), ``bbox``
            (XYWH of the visible mask) and ``area`` (visible mask area, pixels).
    """
    rng = np.random.default_rng([spec.seed, index])
    h, w = (int(v) for v in rng.integers(spec.min_side, spec.max_side + 1, size=2))
    canvas = _background(rng, h, w)
    n_objects = 0 if rng.random() < spec.empty_prob else int(rng.integers(1, spec.max_objects + 1))
    placed = []  # dicts: cls, polygons, window, full (area), n_visible, visible (window mask)
    for _ in range(n_objects):
        cls = int(rng.integers(len(SHAPES_CLASSES)))
        area = _sample_area(rng, spec, h, w)
        for _try in range(25):
            polys = _shape_polygons(rng, cls, area)
            lo, hi = polys[0].min(axis=0), polys[0].max(axis=0)
            fit = min(1.0, (w - 2) / (hi[0] - lo[0]), (h - 2) / (hi[1] - lo[1]))
            polys = [p * fit for p in polys]
            lo, hi = lo * fit, hi * fit
            low = np.array([1 - lo[0], 1 - lo[1]])
            offset = rng.uniform(low, np.maximum(low, [w - 1 - hi[0], h - 1 - hi[1]]))
            # Quantised coordinates are what the JSON stores: rasterise exactly those.
            polys = [np.round((p + offset) * 8) / 8 for p in polys]
            mask, win = _object_mask(cls, polys, h, w)
            full = int(mask.sum())
            if full < spec.min_area * 0.5:
                continue
            hidden = []
            for o in placed:
                ov = _overlap(o, mask, win)
                n = 0 if ov is None else int((o["visible"][ov[0]] & mask[ov[1]]).sum())
                hidden.append((ov, n))
            if all(
                o["n_visible"] - n >= (1 - spec.max_hidden) * o["full"]
                for o, (_, n) in zip(placed, hidden)
            ):
                break
        else:
            continue  # no valid placement: drop the object
        for o, (ov, n) in zip(placed, hidden):
            if n:
                o["visible"][ov[0]] &= ~mask[ov[1]]
                o["n_visible"] -= n
        obj = {"cls": cls, "polygons": polys, "window": win, "full": full, "n_visible": full}
        placed.append({**obj, "visible": mask.copy()})
        region = canvas[win[0] : win[1], win[2] : win[3]]
        region[mask] = _object_fill(rng, region, mask)
    # No per-pixel noise: it would make the PNGs 5x larger and 2x slower to write and read.
    image = np.clip(canvas, 0, 255, out=canvas).round(out=canvas).astype(np.uint8)
    return image, [_annotation(o, h, w) for o in placed]


def _object_fill(rng: np.random.Generator, region: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """Colours (n, 3) of the n pixels of ``mask`` in ``region`` (a window of the canvas): a flat
    or striped colour that contrasts with what lies underneath."""
    under = region[mask].mean(axis=0)
    for _ in range(10):
        color = rng.uniform(0, 255, 3)
        if np.abs(color - under).mean() >= 50:
            break
    fill = np.broadcast_to(color.astype(np.float32), (int(mask.sum()), 3))
    if rng.random() < 0.3:  # faint texture inside the object
        ys, xs = np.nonzero(mask)
        wave = np.sin((xs * rng.uniform(-1, 1) + ys * rng.uniform(-1, 1)) * rng.uniform(0.3, 1.0))
        fill = fill + 20.0 * wave[:, None].astype(np.float32)
    return fill


def _annotation(obj: Dict, h: int, w: int) -> Dict:
    y0, y1, x0, x1 = obj["window"]
    visible = np.zeros((h, w), dtype=np.uint8, order="F")
    visible[y0:y1, x0:x1] = obj["visible"]
    rle = mask_util.encode(visible)
    area = obj["n_visible"]
    if obj["cls"] != 3 and area == obj["full"]:
        segmentation = [[float(v) for v in p.reshape(-1)] for p in obj["polygons"]]
    else:
        segmentation = {"size": [h, w], "counts": rle["counts"].decode("ascii")}
    return {
        "category_id": obj["cls"] + 1,
        "segmentation": segmentation,
        "bbox": [float(v) for v in mask_util.toBbox(rle)],
        "area": float(area),
        "iscrowd": 0,
    }


# ----------------------------------------------------------------------------------------------
# Writing a split (atomically) and reading its statistics


def _render_chunk(directory: Path, spec: ShapesSpec, indices: range) -> List[Tuple]:
    """Render and save images ``indices``; return their (index, height, width, objects)."""
    out = []
    for i in indices:
        image, objects = render_shapes_image(spec, i)
        Image.fromarray(image).save(directory / IMAGES_DIR / f"{i:06d}.png", compress_level=1)
        out.append((i, image.shape[0], image.shape[1], objects))
    return out


def _num_workers() -> int:
    try:
        cpus = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        cpus = os.cpu_count() or 1
    return max(1, min(cpus, 4))


def _write_split(directory: Path, spec: ShapesSpec) -> None:
    (directory / IMAGES_DIR).mkdir(parents=True)
    chunks = [range(s, min(s + 100, spec.num_images)) for s in range(0, spec.num_images, 100)]
    workers = min(_num_workers(), len(chunks))
    if workers > 1 and "fork" in multiprocessing.get_all_start_methods():
        # Forked workers only run numpy / PIL / pycocotools (no torch, OpenCV or BLAS threads).
        ctx = multiprocessing.get_context("fork")
        with ProcessPoolExecutor(workers, mp_context=ctx) as pool:
            rendered = list(pool.map(_render_chunk, *zip(*[(directory, spec, c) for c in chunks])))
    else:
        rendered = [_render_chunk(directory, spec, c) for c in chunks]
    images, annotations = [], []
    for i, h, w, objects in itertools.chain.from_iterable(rendered):
        images.append({"id": i + 1, "file_name": f"{i:06d}.png", "height": h, "width": w})
        for obj in objects:
            annotations.append({"id": len(annotations) + 1, "image_id": i + 1, **obj})
    coco = {
        "info": {"description": f"solq_d2 synthetic shapes {SHAPES_VERSION}", **spec.to_json()},
        "images": images,
        "annotations": annotations,
        "categories": [
            {"id": i + 1, "name": name, "supercategory": "shape"}
            for i, name in enumerate(SHAPES_CLASSES)
        ],
    }
    with open(directory / ANNOTATIONS_FILE, "w") as f:
        json.dump(coco, f, separators=(",", ":"))
    with open(directory / SPEC_FILE, "w") as f:
        json.dump(spec.to_json(), f, indent=1, sort_keys=True)


def _check_spec(directory: Path, spec: ShapesSpec) -> None:
    try:
        with open(directory / SPEC_FILE) as f:
            found = json.load(f)
    except (OSError, ValueError) as e:
        raise RuntimeError(
            f"shapes dataset directory {directory} is incomplete or corrupt ({e}); delete it and "
            "it will be generated again"
        ) from e
    if found != spec.to_json():
        raise RuntimeError(
            f"shapes dataset directory {directory} was generated with a different specification "
            f"({found}, expected {spec.to_json()}); delete it or use another directory"
        )


def generate_shapes(directory: Union[str, os.PathLike], spec: ShapesSpec) -> Path:
    """Generate a split into ``directory`` unless it is already there; return ``directory``.

    The split is written into a temporary sibling directory and renamed into place, under a
    file lock (``<directory>.lock``): concurrent callers (several processes of one training run)
    generate it once, and a killed generation never leaves a partial ``directory``.

    Layout: ``directory/annotations.json`` (COCO instances), ``directory/images/NNNNNN.png``,
    ``directory/spec.json``.

    Raises:
        RuntimeError: if ``directory`` exists but holds another specification or is incomplete.
    """
    from iopath.common.file_io import file_lock

    directory = Path(directory).expanduser().resolve()
    if (directory / ANNOTATIONS_FILE).is_file():
        _check_spec(directory, spec)
        return directory
    with file_lock(str(directory)):
        if directory.exists():
            _check_spec(directory, spec)
            if not (directory / ANNOTATIONS_FILE).is_file():
                raise RuntimeError(f"shapes dataset directory {directory} is incomplete; delete it")
            return directory
        # Leftovers of killed generations (we hold the lock, so none is in progress).
        for stale in directory.parent.glob(f".{directory.name}.tmp-*"):
            shutil.rmtree(stale, ignore_errors=True)
        tmp = directory.parent / f".{directory.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        try:
            _write_split(tmp, spec)
            os.replace(tmp, directory)
        finally:
            if tmp.exists():
                shutil.rmtree(tmp, ignore_errors=True)
    return directory


def shapes_statistics(json_file: Union[str, os.PathLike]) -> Dict:
    """Counts of a COCO instances file: images, instances, per class, per COCO size bucket
    (by the ``area`` field, as COCOEvaluator buckets ground truth), RLE annotations."""
    with open(json_file) as f:
        coco = json.load(f)
    names = {c["id"]: c["name"] for c in coco["categories"]}
    per_image = {img["id"]: 0 for img in coco["images"]}
    by_class = {name: {"small": 0, "medium": 0, "large": 0} for name in names.values()}
    n_rle = 0
    for ann in coco["annotations"]:
        per_image[ann["image_id"]] += 1
        a = ann["area"]
        bucket = "small" if a < COCO_AREA_SMALL else "medium" if a < COCO_AREA_MEDIUM else "large"
        by_class[names[ann["category_id"]]][bucket] += 1
        n_rle += isinstance(ann["segmentation"], dict)
    counts = list(per_image.values())
    sizes = [(img["width"], img["height"]) for img in coco["images"]]
    return {
        "images": len(counts),
        "instances": len(coco["annotations"]),
        "empty_images": sum(c == 0 for c in counts),
        "max_instances_per_image": max(counts, default=0),
        "by_class": by_class,
        "by_bucket": {
            b: sum(v[b] for v in by_class.values()) for b in ("small", "medium", "large")
        },
        "rle_annotations": n_rle,
        "min_side": min((min(s) for s in sizes), default=0),
        "max_side": max((max(s) for s in sizes), default=0),
    }
