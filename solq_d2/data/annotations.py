"""Checking, repairing and transforming instance annotations on the data path.

Bad input is either an error that names the file (unreadable image, RLE of the wrong size,
unknown segmentation type) or, when one instance can be dropped and training go on, dropped and
counted by :class:`BadInputLog` (degenerate boxes, invalid polygons, missing masks, boxes
entirely outside the image).
"""

import logging
import time
from collections import Counter
from typing import Dict, List, Optional, Tuple

import numpy as np
import pycocotools.mask as mask_util
from detectron2.data import detection_utils as utils
from detectron2.data import transforms as T
from detectron2.structures import BoxMode
from detectron2.utils.file_io import PathManager
from PIL import Image, ImageOps

__all__ = [
    "ImageReadError",
    "BadInputLog",
    "read_image_checked",
    "sanitize_annotation",
    "transform_annotation",
    "clip_polygon",
]

logger = logging.getLogger(__name__)

# What each counted problem means (printed in the log).
_ISSUES = {
    "degenerate_box": "box with zero/negative size or non-finite coordinates: instance dropped",
    "invalid_polygon": "polygon with < 3 points, odd length, non-finite values or zero area: "
    "polygon dropped",
    "no_valid_mask": "no valid polygon left / empty RLE: instance dropped",
    "missing_mask": "annotation without 'segmentation': instance dropped (masks are required)",
    "box_outside_image": "box entirely outside the image: instance dropped",
    "box_clipped": "box extends beyond the image: clipped",
    "box_from_mask": "annotation without 'bbox': box computed from its mask",
    "rle_as_bitmask": "RLE/bitmap mask with INPUT.MASK_FORMAT=polygon: the image's masks are "
    "given as BitMasks",
}


_HIGH_BIT_DEPTH_MODES = ("I", "I;16", "I;16L", "I;16B", "I;16N", "F")


class ImageReadError(OSError):
    """An image file is missing, unreadable or corrupt (the message names the file)."""


class BadInputLog:
    """Counts annotation problems; logs the first ones in full, then a summary periodically.

    Attributes:
        counts (Counter): number of occurrences of each problem kind (keys of ``_ISSUES``).
    """

    def __init__(self, first_n: int = 3, period_s: float = 300.0):
        self.counts: Counter = Counter()
        self._first_n = first_n
        self._period_s = period_s
        self._last_summary = time.monotonic()

    def report(self, kind: str, file_name: str, detail: str = "") -> None:
        assert kind in _ISSUES, kind
        self.counts[kind] += 1
        if self.counts[kind] <= self._first_n:
            more = " (further cases are counted in a periodic summary)" * (
                self.counts[kind] == self._first_n
            )
            logger.warning(f"{file_name}: {_ISSUES[kind]}{detail and ' - ' + detail}{more}")
        elif time.monotonic() - self._last_summary > self._period_s:
            self._last_summary = time.monotonic()
            logger.warning(
                f"annotation issues handled so far by this data worker: {dict(self.counts)}"
            )


def read_image_checked(dataset_dict: Dict, image_format: str) -> np.ndarray:
    """Read ``dataset_dict["file_name"]`` in ``image_format`` and check its size against the dict.

    EXIF orientation is applied; grayscale, palette, RGBA and CMYK images are converted (alpha is
    dropped), as detectron2's ``read_image`` does.

    Raises:
        ImageReadError: missing, unreadable, corrupt or high-bit-depth (16-bit, float) file; the
            message names the file and the image id.
        detectron2's SizeMismatchError: the file's size differs from the dict's height/width.
    """
    file_name = dataset_dict["file_name"]
    where = f"image {file_name!r} (image_id={dataset_dict.get('image_id')})"
    try:
        with PathManager.open(file_name, "rb") as f:
            pil = Image.open(f)
            if pil.mode in _HIGH_BIT_DEPTH_MODES:
                raise ImageReadError(
                    f"{where} has pixel mode {pil.mode!r} (16/32-bit or float): converting it to "
                    "8 bits would clip it silently; convert the file to 8 bits per channel first"
                )
            pil = ImageOps.exif_transpose(pil)
            image = utils.convert_PIL_to_numpy(pil, image_format)
    except ImageReadError:
        raise
    except Exception as e:
        raise ImageReadError(f"cannot read {where}: {type(e).__name__}: {e}") from e
    if image.ndim != 3 or image.shape[0] == 0 or image.shape[1] == 0:
        raise ImageReadError(f"{where} decoded to an array of shape {image.shape}")
    utils.check_image_size(dataset_dict, image)
    return image


def _polygon_area(poly: np.ndarray) -> float:
    x, y = poly[0::2], poly[1::2]
    return 0.5 * abs(float(np.dot(x, np.roll(y, -1)) - np.dot(y, np.roll(x, -1))))


def _clean_polygons(segm: list) -> Tuple[List[np.ndarray], int]:
    """Valid polygons of a COCO polygon list (flat float64 arrays) and the number dropped."""
    good, bad = [], 0
    for p in segm:
        try:
            arr = np.asarray(p, dtype=np.float64).reshape(-1)
        except (TypeError, ValueError):
            bad += 1
            continue
        if len(arr) < 6 or len(arr) % 2 or not np.isfinite(arr).all() or _polygon_area(arr) <= 0:
            bad += 1
            continue
        good.append(arr)
    return good, bad


def sanitize_annotation(
    anno: Dict, image_size: Tuple[int, int], file_name: str, log: BadInputLog
) -> Optional[Dict]:
    """Check and repair one (non-crowd) annotation of an image before augmentation.

    Args:
        anno: a detectron2 annotation dict (``bbox``, ``bbox_mode``, ``category_id``,
            ``segmentation``: polygon list, COCO RLE with compressed or uncompressed counts, or an
            (H, W) array). Not modified.
        image_size: (H, W) of the image as read.
        file_name: for messages.
        log: where dropped/repaired instances are counted.

    Returns:
        a new annotation with an XYXY_ABS ``bbox``, valid polygons as flat arrays or a
        compressed RLE (dicts are decoded later), or None if the instance must be dropped.

    Raises:
        ValueError: an RLE or mask array whose size is not the image's, or an unknown
            segmentation type.
    """
    h, w = image_size
    anno = dict(anno)
    segm = anno.get("segmentation")
    if segm is None or (isinstance(segm, (list, tuple)) and len(segm) == 0):
        log.report("missing_mask", file_name)
        return None
    if isinstance(segm, (list, tuple)):
        polygons, n_bad = _clean_polygons(segm)
        if n_bad:
            log.report("invalid_polygon", file_name, f"{n_bad} of {len(segm)} polygons")
        if not polygons:
            log.report("no_valid_mask", file_name)
            return None
        anno["segmentation"] = polygons
    elif isinstance(segm, dict):
        if "counts" not in segm or "size" not in segm:
            raise ValueError(f"{file_name}: RLE segmentation without 'counts'/'size': {segm}")
        if [int(v) for v in segm["size"]] != [h, w]:
            raise ValueError(
                f"{file_name}: RLE segmentation of size {list(segm['size'])} on an image of size "
                f"{[h, w]} (height, width)"
            )
        if isinstance(segm["counts"], list):  # uncompressed RLE
            segm = mask_util.frPyObjects(segm, h, w)
        if mask_util.area(segm) == 0:
            log.report("no_valid_mask", file_name, "empty RLE")
            return None
        anno["segmentation"] = segm
    elif isinstance(segm, np.ndarray):
        if segm.shape != (h, w):
            raise ValueError(f"{file_name}: mask of shape {segm.shape} on an image of {(h, w)}")
        if not segm.any():
            log.report("no_valid_mask", file_name, "empty mask array")
            return None
    else:
        raise ValueError(
            f"{file_name}: unsupported segmentation of type {type(segm).__name__}; expected "
            "polygons (list of [x0, y0, x1, y1, ...]), a COCO RLE dict or an (H, W) array"
        )

    if anno.get("bbox") is None:
        anno["bbox"] = _box_from_segmentation(anno["segmentation"], h, w)
        anno["bbox_mode"] = BoxMode.XYXY_ABS
        log.report("box_from_mask", file_name)
    try:
        box = [float(v) for v in anno["bbox"]]
        if len(box) != 4:
            raise ValueError(f"{len(box)} numbers")
        box = BoxMode.convert(box, anno.get("bbox_mode", BoxMode.XYWH_ABS), BoxMode.XYXY_ABS)
    except (TypeError, ValueError) as e:
        log.report("degenerate_box", file_name, f"bbox={anno['bbox']!r} ({e})")
        return None
    box = np.asarray(box, dtype=np.float64)
    if box.shape != (4,) or not np.isfinite(box).all() or box[2] <= box[0] or box[3] <= box[1]:
        log.report("degenerate_box", file_name, f"bbox={anno['bbox']}")
        return None
    clipped = np.clip(box, 0, [w, h, w, h])
    if clipped[2] <= clipped[0] or clipped[3] <= clipped[1]:
        log.report("box_outside_image", file_name, f"box {box.tolist()} in {w}x{h}")
        return None
    if np.abs(clipped - box).max() > 1.0:
        log.report("box_clipped", file_name, f"box {box.tolist()} in {w}x{h}")
    anno["bbox"], anno["bbox_mode"] = clipped, BoxMode.XYXY_ABS
    return anno


def _box_from_segmentation(segm, h: int, w: int) -> List[float]:
    if isinstance(segm, list):
        pts = np.concatenate(segm).reshape(-1, 2)
        return [*pts.min(axis=0).tolist(), *pts.max(axis=0).tolist()]
    if isinstance(segm, np.ndarray):
        segm = mask_util.encode(np.asfortranarray(segm.astype(np.uint8)))
    x, y, bw, bh = mask_util.toBbox(segm).tolist()
    return [x, y, x + bw, y + bh]


def clip_polygon(poly: np.ndarray, x0: float, y0: float, x1: float, y1: float) -> np.ndarray:
    """Clip a polygon to the rectangle [x0, x1] x [y0, y1] (Sutherland-Hodgman).

    Exact for any simple polygon; where a concave polygon leaves the rectangle several times the
    pieces are joined by zero-area edges along the border, which rasterise to nothing.

    Args:
        poly: (N, 2) vertices.

    Returns:
        (M, 2) vertices (M may be 0).
    """
    for axis, bound, keep_above in ((0, x0, True), (0, x1, False), (1, y0, True), (1, y1, False)):
        if len(poly) == 0:
            break
        d = poly[:, axis] - bound if keep_above else bound - poly[:, axis]
        inside = d >= 0
        nxt, d_next, inside_next = np.roll(poly, -1, 0), np.roll(d, -1), np.roll(inside, -1)
        crossing = inside != inside_next
        with np.errstate(divide="ignore", invalid="ignore"):
            t = np.where(crossing, d / (d - d_next), 0.0)
        cut = poly + t[:, None] * (nxt - poly)
        # Vertex i (if inside) then the crossing point of edge i -> i+1 (if any).
        candidates = np.stack([poly, cut], axis=1).reshape(-1, 2)
        poly = candidates[np.stack([inside, crossing], axis=1).reshape(-1)]
    return poly


def _transform_polygons(
    polygons: List[np.ndarray], transforms: T.TransformList
) -> List[np.ndarray]:
    polys = [p.reshape(-1, 2) for p in polygons]
    for t in transforms.transforms:
        if isinstance(t, T.CropTransform):
            # detectron2/fvcore crop polygons with shapely (an optional dependency, and it drops
            # holes); clipping to the crop window is exact and needs nothing.
            polys = [clip_polygon(p, t.x0, t.y0, t.x0 + t.w, t.y0 + t.h) for p in polys]
            polys = [t.apply_coords(p) for p in polys if len(p) >= 3]
        else:
            polys = t.apply_polygons(polys)
    flat = [np.asarray(p, dtype=np.float64).reshape(-1) for p in polys]
    return [p for p in flat if len(p) >= 6 and _polygon_area(p) > 0]


def transform_annotation(
    anno: Dict, transforms: T.TransformList, image_size: Tuple[int, int]
) -> Optional[Dict]:
    """Apply the augmentation's transforms to a sanitized annotation (in place).

    The box is transformed and clipped to the new image (as DETR's crop does); polygons are
    transformed exactly (cropping clips them); RLE / array masks are decoded and transformed as
    images.

    Args:
        image_size: (H, W) after the transforms.

    Returns:
        the annotation, or None if its mask left the image entirely (e.g. cropped out).
    """
    box = transforms.apply_box(np.asarray([anno["bbox"]], dtype=np.float64))[0]
    h, w = image_size
    anno["bbox"] = np.clip(box, 0, [w, h, w, h])
    anno["bbox_mode"] = BoxMode.XYXY_ABS
    segm = anno["segmentation"]
    if isinstance(segm, list):
        polygons = _transform_polygons(segm, transforms)
        if not polygons:
            return None
        anno["segmentation"] = polygons
    else:
        mask = mask_util.decode(segm) if isinstance(segm, dict) else segm.astype(np.uint8)
        mask = transforms.apply_segmentation(mask)
        if mask.shape != (h, w):
            raise RuntimeError(f"transformed mask of shape {mask.shape}, image {image_size}")
        if not mask.any():
            return None
        # writable and C-contiguous (PIL-based resizes return read-only arrays)
        anno["segmentation"] = np.require(mask, dtype=np.uint8, requirements=["C", "W"])
    return anno
