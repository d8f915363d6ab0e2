"""``labelme``: one labelme JSON per item, ``out/labelme/<item id>.json``, which labelme opens as an annotation of the
source image. X-AnyLabeling reads the same JSON, with two limits of its own: no ``mask`` shapes (use
``labelme_shapes="polygon"``), and only the file name of ``imagePath``, looked up beside the JSON or in its image
folder.

Each file is labelme's annotation JSON: ``version``, ``flags`` ({}), ``shapes``, ``imagePath``, ``imageData`` (null:
the image is not embedded), ``imageHeight``, ``imageWidth``. ``imagePath`` is the source image's path relative to
the JSON file's folder (``os.path.relpath``, ``/`` separators; the absolute path where no relative one exists, e.g.
another Windows drive), so ``labelme out/labelme/sub/a.jpg.json`` opens the image with its shapes. labelme's folder
mode looks for ``<image stem>.json`` beside the image (or in ``--output``), a name these files do not have: open a
JSON file itself.

Shapes. Every instance (``seg.instances``; without instances, every panoptic segment, whose mask is its pixels in
``seg.panoptic``) becomes one or more shapes sharing a ``group_id`` (1, 2, ... in the order written, so labelme's
``shapes_to_label`` joins them into one instance); ``label`` is the class name, ``score`` the confidence (rounded to 6
decimals, the field X-AnyLabeling writes), ``description`` "", ``flags`` {}. Instances with no pixels are left out;
an item with no detections gets a file with no shapes (the image opens unannotated). Option ``labelme_shapes``:

* ``"auto"`` (default): one ``polygon`` shape per 8-connected part of the mask (a mask of several parts gives
  several polygons with one group_id; an island inside a hole is a part of its own). A part with holes, which a
  polygon cannot hold, becomes a ``mask`` shape instead, as does a part whose outline has fewer than 3 points
  (a single pixel, a straight one-pixel-wide line): auto is exact for those parts and close (see below) for the rest.
* ``"polygon"``: polygons only (X-AnyLabeling reads no ``mask`` shapes). Holes are dropped (filled in); a part whose
  outline has fewer than 3 points gets those 1 or 2 points repeated up to 3 (labelme draws them exactly).
* ``"mask"``: one ``mask`` shape per instance (all its parts, holes kept): lossless.

A ``mask`` shape is labelme's (>= 5.4): ``points`` = the top-left and bottom-right pixel of the region's bounding box
(inclusive), ``mask`` = a base64 PNG (8-bit grey, 0/1) of the region cropped to that box, as labelme writes and
reads it (``mask[y1:y2 + 1, x1:x2 + 1]``). Polygon points are pixel centres (x = column, y = row) on the part's
boundary pixels, which labelme's rasteriser (``labelme.utils.shape_to_mask``: PIL, outline included) fills back to
the part. They are simplified with Douglas-Peucker, epsilon ``labelme_tolerance`` pixels (default 1.0; 0 keeps every
corner); where that would leave the part's labelme rasterisation below IoU :data:`MIN_PART_IOU` (0.96: small parts),
the tolerance is halved (down to 0.25 px, then 0) until it does not, so every instance rasterises back with IoU >=
0.96 against its mask (auto), or against its mask with holes filled (polygon).

Video frames: labelme cannot open a frame inside a video, so for a frame (the source is a video file) and for an
item with no source, ``imagePath`` is the item id's file name (``clip.mp4#000005``) and ``imageHeight`` /
``imageWidth`` are the frame's size: save the frame under that name beside the JSON file (or point ``imagePath`` at
it) to open it. The item id's folders are the JSON file's folders (``sub/a.jpg`` -> ``labelme/sub/a.jpg.json``).
Nothing is written at the end of the run.
"""

from __future__ import annotations

import base64
import os
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw

from masqclip_cli.io.files import atomic_write_json, encode_png, output_path
from masqclip_cli.io.sources import VIDEO_EXTENSIONS
from masqclip_cli.structures import Segmentation
from masqclip_cli.structures.masks import Polygon, mask_stats, mask_to_polygons, polygons_to_mask, round_score

from .base import ItemInfo, Writer, check_size

__all__ = ["LABELME_VERSION", "LabelmeWriter"]

#: ``version`` written: the first labelme release whose reader decodes ``mask`` shapes.
LABELME_VERSION = "5.4.0"
SHAPE_MODES = ("auto", "polygon", "mask")
#: A polygon is simplified less when its rasterisation would fall below this IoU with the part it outlines.
MIN_PART_IOU = 0.96


def _b64_png(region: np.ndarray) -> str:
    """A bool region as labelme stores a mask shape: base64 of an 8-bit grey PNG holding 0 / 1."""
    return base64.b64encode(encode_png(np.ascontiguousarray(region, dtype=np.uint8))).decode("ascii")


def _simplified(ring: np.ndarray, tolerance: float) -> np.ndarray:
    """An exact (tolerance 0) ring simplified with cv2.approxPolyDP (epsilon = ``tolerance`` pixels), as
    mask_to_polygons does at that tolerance."""
    if tolerance <= 0 or len(ring) < 3:
        return ring
    import cv2

    out = cv2.approxPolyDP(ring.astype(np.int32).reshape(-1, 1, 2), float(tolerance), True)
    return out.reshape(-1, 2).astype(np.float64)


def _pil_fill(ring: np.ndarray, height: int, width: int) -> np.ndarray:
    """A ring rasterised as labelme does (``labelme.utils.shape_to_mask``: PIL ``ImageDraw.polygon`` with outline and
    fill), on a (height, width) canvas."""
    canvas = Image.new("L", (width, height), 0)
    ImageDraw.Draw(canvas).polygon([tuple(p) for p in ring.tolist()], outline=1, fill=1)
    return np.asarray(canvas, dtype=bool)


def _polygon_ring(exterior: np.ndarray, tolerance: float) -> np.ndarray | None:
    """The simplest ring (tolerance, then halved down to 0.25 px, then 0) whose labelme rasterisation has IoU >=
    :data:`MIN_PART_IOU` with the filled exterior; None when every simplified ring has fewer than 3 points (then the
    exact ring is too: a single pixel or a one-pixel-wide line)."""
    tolerances = []
    t = tolerance
    while t >= 0.25:
        tolerances.append(t)
        t /= 2
    tolerances.append(0.0)
    x0, y0 = (int(v) for v in exterior.min(axis=0))
    x1, y1 = (int(v) for v in exterior.max(axis=0))
    h, w = y1 - y0 + 1, x1 - x0 + 1
    origin = np.array([x0, y0], dtype=np.float64)
    reference = polygons_to_mask([Polygon(exterior - origin)], h, w)
    for t in tolerances:
        ring = _simplified(exterior, t)
        if len(ring) < 3:
            continue
        if t == 0:
            return ring
        drawn = _pil_fill(ring - origin, h, w)
        union = np.count_nonzero(drawn | reference)
        if np.count_nonzero(drawn & reference) >= MIN_PART_IOU * union:
            return ring
    return None


class LabelmeWriter(Writer):
    """labelme JSON per item (see the module docstring): polygon and mask shapes, grouped per instance."""

    name = "labelme"
    any_of_tasks = ("instance", "panoptic")
    needs_source = True
    option_defaults = {"labelme_shapes": "auto", "labelme_tolerance": 1.0}
    kind = "labelme"

    def __init__(self, out_dir, vocab, **options: Any) -> None:
        super().__init__(out_dir, vocab, **options)
        mode = str(self.options["labelme_shapes"]).strip().lower()
        if mode not in SHAPE_MODES:
            raise ValueError(f"labelme_shapes must be one of {', '.join(SHAPE_MODES)}, got {mode!r}")
        tolerance = float(self.options["labelme_tolerance"])
        if not (np.isfinite(tolerance) and tolerance >= 0):
            raise ValueError(f"labelme_tolerance must be a finite number >= 0, got {tolerance!r}")
        self.shape_mode = mode
        self.tolerance = tolerance

    def _json_path(self, item: ItemInfo) -> Path:
        assert self.out_dir is not None
        return output_path(self.out_dir, self.kind, item.id, ".json")

    def item_files(self, item: ItemInfo) -> list[Path]:
        return [self._json_path(item)]

    # --- per item --------------------------------------------------------------------------------------------------
    def _image_path(self, item: ItemInfo, json_path: Path) -> str:
        """``imagePath``: the source relative to the JSON's folder; the id's file name for video frames / no source."""
        if item.source is None or Path(item.source).suffix.lower() in VIDEO_EXTENSIONS:
            return json_path.name[: -len(".json")]
        try:
            rel = os.path.relpath(os.path.abspath(item.source), os.path.abspath(json_path.parent))
        except ValueError:  # another drive (Windows): no relative path
            rel = os.path.abspath(item.source)
        return rel.replace(os.sep, "/")

    def _shape(self, label: str, score: float, group: int, points: list[list[float]], shape_type: str,
               mask: str | None) -> dict[str, Any]:
        return {
            "label": label,
            "score": score,
            "points": points,
            "group_id": group,
            "description": "",
            "shape_type": shape_type,
            "flags": {},
            "mask": mask,
        }

    def _mask_shape(self, label: str, score: float, group: int, region: np.ndarray) -> dict[str, Any]:
        _, (x, y, w, h) = mask_stats(region)
        crop = region[y : y + h, x : x + w]
        points = [[float(x), float(y)], [float(x + w - 1), float(y + h - 1)]]
        return self._shape(label, score, group, points, "mask", _b64_png(crop))

    def _instance_shapes(self, label: str, score: float, group: int, mask: np.ndarray) -> list[dict[str, Any]]:
        if self.shape_mode == "mask":
            return [self._mask_shape(label, score, group, mask)]
        h, w = mask.shape
        shapes = []
        for part in mask_to_polygons(mask, 0.0):  # exact rings, simplified per part
            ring = None if self.shape_mode == "auto" and part.holes else _polygon_ring(part.exterior, self.tolerance)
            if ring is None and self.shape_mode == "auto":
                shapes.append(self._mask_shape(label, score, group, polygons_to_mask([part], h, w)))
                continue
            if ring is None:  # polygon mode: the exact 1- or 2-point outline, its points repeated up to 3
                ring = np.resize(part.exterior, (3, 2))
            points = [[float(px), float(py)] for px, py in ring.tolist()]
            shapes.append(self._shape(label, score, group, points, "polygon", None))
        return shapes

    def write_item(self, item: ItemInfo, seg: Segmentation, image: np.ndarray | None = None) -> dict:
        height, width = check_size(item, seg)
        names = self.vocab.names
        shapes: list[dict[str, Any]] = []
        group = 0
        for category, score, mask in self._mask_regions(item, seg):
            if not mask.any():
                continue
            group += 1
            shapes.extend(self._instance_shapes(names[category], round_score(score), group, mask))
        path = self._json_path(item)
        data = {
            "version": LABELME_VERSION,
            "flags": {},
            "shapes": shapes,
            "imagePath": self._image_path(item, path),
            "imageData": None,
            "imageHeight": height,
            "imageWidth": width,
        }
        atomic_write_json(path, data)
        return {"file": path.relative_to(self.out_dir / self.kind).as_posix(), "instances": group,
                "shapes": len(shapes)}

