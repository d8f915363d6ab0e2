"""``label-studio``: Label Studio pre-annotations, ``out/label-studio/tasks.json`` and ``out/label-studio/config.xml``.

``config.xml`` is the labelling config to paste into the project (Settings > Labeling Interface > Code)::

    <View>
      <Image name="image" value="$image"/>
      <BrushLabels name="label" toName="image">      (<PolygonLabels ...> with ls_regions="polygon")
        <Label value="person" background="#dc143c"/>  one per vocabulary class, in vocabulary order
        ...

``tasks.json`` is a JSON list of tasks to import (Import > Upload Files), one per item in item-id order::

    {"data": {"image": <reference>},
     "predictions": [{"model_version": "masqclip", "score": <mean>, "result": [<region>, ...]}]}

One prediction per item holds every region of it; its ``score`` is the MEAN of the scores of the instances written
(each instance counts once, however many regions it gives; 0.0 for an item with no detections, whose prediction
has an empty ``result``: the task imports unannotated, and Label Studio still shows that the model ran). Regions
use ``from_name`` "label", ``to_name`` "image", ``original_width`` / ``original_height`` (the image size),
``image_rotation`` 0, the instance's ``score`` (6 decimals) and a stable ``id`` (``i<k>`` for the k-th instance
written in the item, ``i<k>p<n>`` for part n of it as polygons). Every label is a vocabulary class name; the
config lists them all, so the names match (class names must be unique: a vocabulary with two classes of one display
name is refused, Label Studio could not tell them apart).

Regions (option ``ls_regions``):

* ``"brush"`` (default): one ``brushlabels`` region per instance, ``value`` ``{"format": "rle", "rle": [...],
  "brushlabels": [name]}``: Label Studio's own brush RLE (the byte stream of ``label_studio_sdk.converter.brush``'s
  ``mask2rle``, here computed with numpy, byte for byte the same: an RGBA image, every channel 255 on the mask, 0
  elsewhere, run-length coded with word size 8 and run sizes 3, 4, 8, 16 bits). Lossless: several parts and holes
  are simply pixels of the one mask, and ``decode_rle`` gives the mask back exactly. The stream counts H * W * 4
  values in 32 bits, so an image must have fewer than 2^30 pixels.
* ``"polygon"``: ``polygonlabels`` regions, ``value`` ``{"points": [[x, y], ...], "closed": true, "polygonlabels":
  [name]}``, points in percent of the image width / height (Label Studio's coordinates are continuous, 0..100
  across the image). A mask of several 8-connected parts gives one region per part (an island inside another part's
  hole is a part of its own), ordered by each part's top-most, then left-most corner; all of an instance's regions
  share its label and score. Each polygon is the part's exact pixel-edge outline: the corners of the pixels'
  boundary (pixel column c spans x = c / W * 100 .. (c + 1) / W * 100), every corner kept, so Label Studio draws
  exactly the part's pixels, and the SDK's COCO export (``Converter.convert_to_coco``: x / 100 * W) gives polygons
  that pycocotools fills back to exactly the part. Where two pixels of a part touch only at a corner the outline
  passes through that corner twice. A Label Studio polygon has no holes: they are filled in (a mask with holes comes
  back larger by its holes' area; use ``"brush"`` to keep them). A single pixel is a 4-point square: every polygon
  has at least 4 points.

Which results: the instances (``seg.instances``) when the item has them, else the panoptic segments (each
segment's mask is its pixels in ``seg.panoptic``); several instances with the same mask under different classes are
several regions. Instances with no pixels are left out.

``data.image`` (option ``ls_image_root``): the default ``"/data/local-files/?d="`` + the item id serves the images
through Label Studio's local files storage (start Label Studio with ``LABEL_STUDIO_LOCAL_FILES_SERVING_ENABLED=true``
and ``LABEL_STUDIO_LOCAL_FILES_DOCUMENT_ROOT`` = the input folder, and add a local storage on it). Any other string
is a prefix joined with the item id: a URL prefix (it contains ``://`` or ``?``, e.g. ``https://bucket/images/`` or
``s3://bucket/images``) has the id URL-quoted (``/`` kept: ``sub/a b.jpg`` -> ``sub/a%20b.jpg``, ``#`` ->
``%23``); a path prefix (e.g. ``/data/images``) gets the id as is. A ``/`` is put between prefix and id unless the
prefix is empty or ends with ``/``, ``\\`` or ``=``. Nested ids keep their folders (``sub/b.png``). A video frame's
id (``clip.mp4#000005``) names no file: Label Studio shows its regions once the frame is saved under that name.

Option ``ls_model_version`` (default ``"masqclip"``) is each prediction's ``model_version``. Both files are
rewritten at the end of every run from the items' records (nothing is written per item); JSON is compact with a
fixed key order, so a run's output is byte-for-byte reproducible.
"""

from __future__ import annotations

import base64
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import quote
from xml.sax.saxutils import quoteattr

import numpy as np

from masqclip_cli.io.files import atomic_write_json_stream, atomic_write_text
from masqclip_cli.structures import Segmentation
from masqclip_cli.structures.masks import round_score

from .base import ItemInfo, Writer, check_size, ranked_records

__all__ = ["LOCAL_FILES_PREFIX", "LabelStudioWriter", "config_xml", "mask_to_ls_rle", "pixel_outlines"]

#: The default ``ls_image_root``: Label Studio's local files serving URL.
LOCAL_FILES_PREFIX = "/data/local-files/?d="
REGION_MODES = ("brush", "polygon")
FROM_NAME = "label"
TO_NAME = "image"
_MAX_VALUES = 2**32 - 1  # the stream's value count is a 32-bit number
_POINT_DECIMALS = 6


# --- Label Studio's brush RLE ---------------------------------------------------------------------------------------

# The stream's header: value count (32 bits, filled in per mask), word size - 1 = 7 (5 bits), then run-size - 1 for
# each of the four run-length fields 3, 4, 8 and 16 bits wide (4 bits each).
_HEADER_TAIL = [int(b) for b in f"{8 - 1:05b}" + "".join(f"{s - 1:04b}" for s in (3, 4, 8, 16))]
_TOKEN_BITS = 27  # the widest token: flag 1 + size index 2 + length 16 + value 8


def mask_to_ls_rle(mask: np.ndarray) -> list[int]:
    """Label Studio's brush RLE of an (H, W) mask (nonzero = on): a list of byte values, the same bytes as
    ``label_studio_sdk.converter.brush.mask2rle(mask * 255)`` (an RGBA layer of H * W * 4 values, 255 on the mask),
    which ``label_studio_sdk.converter.brush.decode_rle`` decodes back to exactly the mask (reshape to (H, W, 4)).

    The stream: 32-bit value count, 5-bit word size - 1, four 4-bit run sizes - 1, then one token per run of equal
    values (every run here is a multiple of 4 long: a literal run never occurs): ``1``, a 2-bit index into the run
    sizes, the run length - 1 in that many bits, the 8-bit value; runs over 65536 are split into 65536-long tokens
    first. It ends with 1 to 8 zero bits (the reference encoder always pads, even at a byte boundary)."""
    mask = np.asarray(mask)
    if mask.ndim != 2:
        raise ValueError(f"a mask must be 2-D, got shape {mask.shape}")
    flat = (mask != 0).ravel()
    total = flat.size * 4
    if total > _MAX_VALUES:
        raise ValueError(f"a {mask.shape[0]} x {mask.shape[1]} mask is too large for Label Studio's brush RLE")
    if flat.size == 0:
        starts = np.zeros(0, dtype=np.int64)
    else:
        starts = np.flatnonzero(np.concatenate(([True], flat[1:] != flat[:-1])))
    lengths = np.diff(np.append(starts, flat.size)).astype(np.int64) * 4
    values = np.where(flat[starts], 255, 0).astype(np.int64)
    # Runs over 2^16: (n - 1) // 2^16 full tokens of 2^16 first, then the rest (1..2^16) in one token.
    full = (lengths - 1) // 65536
    rest = lengths - 65536 * full
    count = full + 1
    run_of_token = np.repeat(np.arange(lengths.size), count)
    first_token = np.cumsum(count) - count
    is_last = np.zeros(run_of_token.size, dtype=bool)
    is_last[first_token + full] = True
    length = np.where(is_last, rest[run_of_token], 65536)
    value = values[run_of_token]
    # Size index and field width: <= 8 -> 0 (3 bits), <= 16 -> 1 (4), <= 256 -> 2 (8), else 3 (16; also a short rest).
    index = np.select([length <= 8, length <= 16, length <= 256], [0, 1, 2], default=3)
    index = np.where(is_last & (full[run_of_token] > 0), 3, index)
    field = np.array([3, 4, 8, 16], dtype=np.int64)[index]
    width = 3 + field + 8
    code = (1 << (width - 1)) | (index << (field + 8)) | ((length - 1) << 8) | value
    shifts = np.arange(_TOKEN_BITS - 1, -1, -1, dtype=np.int64)
    bits = (code[:, None] >> shifts[None, :]) & 1
    keep = shifts[None, :] < width[:, None]
    header = [int(b) for b in f"{total:032b}"] + _HEADER_TAIL
    stream = np.concatenate((np.array(header, dtype=np.uint8), bits[keep].astype(np.uint8)))
    pad = 8 - stream.size % 8  # 1..8: the reference pads a full byte at a byte boundary
    stream = np.concatenate((stream, np.zeros(pad, dtype=np.uint8)))
    return np.packbits(stream).tolist()


# --- the labelling config -------------------------------------------------------------------------------------------


def config_xml(names: list[str], colors: list[tuple[int, int, int]], regions: str = "brush") -> str:
    """The labelling config matching the tasks: an ``Image`` named "image" showing ``$image`` and a ``BrushLabels``
    (or ``PolygonLabels``) control named "label" with one ``Label`` per class (value = the class name, background =
    its colour)."""
    tag = "BrushLabels" if regions == "brush" else "PolygonLabels"
    lines = ["<View>", f'  <Image name="{TO_NAME}" value="$image"/>']
    lines.append(f'  <{tag} name="{FROM_NAME}" toName="{TO_NAME}">')
    for name, (r, g, b) in zip(names, colors):
        lines.append(f"    <Label value={quoteattr(name)} background=\"#{int(r):02x}{int(g):02x}{int(b):02x}\"/>")
    lines += [f"  </{tag}>", "</View>"]
    return "\n".join(lines) + "\n"


# --- the writer -----------------------------------------------------------------------------------------------------


def pixel_outlines(mask: np.ndarray) -> list[np.ndarray]:
    """The exact pixel-edge outline of each 8-connected part of an (H, W) mask (nonzero = on), holes filled in: one
    (N, 2) int64 ring of (x, y) pixel corners per part (corner (x, y) is the top-left corner of pixel column x, row
    y), N >= 4, no repeated consecutive points and no point in the middle of a straight run. A point inside a ring
    (even-odd) is inside the part or one of its holes; where two pixels touch only at a corner the ring passes
    through it twice. Parts are ordered by their top-most, then left-most corner; [] for an empty mask.

    The mask's bounding box is upsampled 2x (each pixel a 2 x 2 block), so that every pixel edge lies between two
    rows or columns of cells; OpenCV traces the outer boundary cells of each part (``RETR_CCOMP``, top level: parts,
    including islands in holes) and the boundary cell at upsampled column X (row Y) lies on the pixel edge at
    x = ceil(X / 2) (y = ceil(Y / 2))."""
    import cv2

    mask = np.asarray(mask) != 0
    rows = np.flatnonzero(mask.any(axis=1))
    if rows.size == 0:
        return []
    cols = np.flatnonzero(mask.any(axis=0))
    y0, x0 = int(rows[0]), int(cols[0])
    crop = mask[y0 : int(rows[-1]) + 1, x0 : int(cols[-1]) + 1].astype(np.uint8)
    up = np.pad(np.repeat(np.repeat(crop, 2, axis=0), 2, axis=1), 1)
    contours, hierarchy = cv2.findContours(up, cv2.RETR_CCOMP, cv2.CHAIN_APPROX_SIMPLE)
    rings: list[tuple[tuple[int, int], np.ndarray]] = []
    for contour, links in zip(contours, hierarchy[0]):
        if links[3] != -1:  # a hole's boundary
            continue
        cells = contour.reshape(-1, 2).astype(np.int64) - 1  # undo the padding
        ring = -(-cells // 2) + np.array([x0, y0], dtype=np.int64)
        ring = ring[np.any(ring != np.roll(ring, 1, axis=0), axis=1)]  # a diagonal step maps to one corner
        step_in = ring - np.roll(ring, 1, axis=0)
        step_out = np.roll(ring, -1, axis=0) - ring
        straight = (step_in[:, 0] * step_out[:, 1] == step_in[:, 1] * step_out[:, 0]) & (
            (step_in * step_out).sum(axis=1) > 0
        )
        ring = ring[~straight]
        top = int(ring[:, 1].min())
        rings.append(((top, int(ring[ring[:, 1] == top, 0].min())), ring))
    rings.sort(key=lambda r: r[0])
    return [ring for _, ring in rings]


def _percent(value: float, size: int) -> float:
    return round(float(value) / size * 100.0, _POINT_DECIMALS) + 0.0


class LabelStudioWriter(Writer):
    """Label Studio tasks with one prediction each, and the matching labelling config (see the module docstring)."""

    name = "label-studio"
    any_of_tasks = ("instance", "panoptic")
    option_defaults = {"ls_regions": "brush", "ls_image_root": LOCAL_FILES_PREFIX, "ls_model_version": "masqclip"}
    kind = "label-studio"
    tasks_file = "tasks.json"
    config_file = "config.xml"

    def __init__(self, out_dir, vocab, **options: Any) -> None:
        super().__init__(out_dir, vocab, **options)
        regions = self.options["ls_regions"]
        if regions not in REGION_MODES:
            raise ValueError(f"ls_regions must be one of {', '.join(REGION_MODES)}, got {regions!r}")
        for option in ("ls_image_root", "ls_model_version"):
            if not isinstance(self.options[option], str):
                raise ValueError(f"{option} must be a string, got {self.options[option]!r}")
        names = list(vocab.names)
        seen: set[str] = set()
        for name in names:
            if name in seen:
                raise ValueError(
                    f"the label-studio writer names labels by class name, and two classes are named {name!r}"
                )
            seen.add(name)
        self.regions = regions

    # --- per item ------------------------------------------------------------------------------------------------
    def write_item(self, item: ItemInfo, seg: Segmentation, image: np.ndarray | None = None) -> dict:
        """The item's regions (brush RLE as base64 bytes, or polygon points in percent), for :meth:`finalize`."""
        height, width = check_size(item, seg)
        names = self.vocab.names
        regions: list[dict[str, Any]] = []
        scores: list[float] = []
        k = 0
        for category, score, mask in self._mask_regions(item, seg):
            if not mask.any():
                continue
            k += 1
            score = round_score(score)
            scores.append(score)
            if self.regions == "brush":
                rle = base64.b64encode(bytes(mask_to_ls_rle(mask))).decode("ascii")
                regions.append({"id": f"i{k}", "label": names[category], "score": score, "rle": rle})
                continue
            for n, ring in enumerate(pixel_outlines(mask), start=1):
                points = [[_percent(x, width), _percent(y, height)] for x, y in ring.tolist()]
                regions.append({"id": f"i{k}p{n}", "label": names[category], "score": score, "points": points})
        mean = round_score(sum(scores) / len(scores)) if scores else 0.0
        return {"score": mean, "regions": regions}

    # --- run level -----------------------------------------------------------------------------------------------
    def image_reference(self, item_id: str) -> str:
        """``data.image`` of an item: ``ls_image_root`` joined with the item id (see the module docstring)."""
        root = str(self.options["ls_image_root"])
        is_url = "://" in root or "?" in root
        name = quote(item_id, safe="/") if is_url else item_id
        if root and not root.endswith(("/", "\\", "=")):
            root += "/"
        return root + name

    def _region(self, item: ItemInfo, region: dict[str, Any]) -> dict[str, Any]:
        label = str(region["label"])
        if "rle" in region:
            rle = list(base64.b64decode(region["rle"]))
            kind, value = "brushlabels", {"format": "rle", "rle": rle, "brushlabels": [label]}
        else:
            points = [[float(x), float(y)] for x, y in region["points"]]
            kind, value = "polygonlabels", {"points": points, "closed": True, "polygonlabels": [label]}
        return {
            "id": str(region["id"]),
            "from_name": FROM_NAME,
            "to_name": TO_NAME,
            "type": kind,
            "original_width": int(item.width),
            "original_height": int(item.height),
            "image_rotation": 0,
            "value": value,
            "score": round_score(region["score"]),
        }

    def finalize(self, records) -> list[Path]:
        """``tasks.json`` streamed (one item's regions in memory at a time) and ``config.xml``."""
        assert self.out_dir is not None
        folder = self.out_dir / self.kind
        model_version = str(self.options["ls_model_version"])

        def tasks() -> Iterator[dict[str, Any]]:
            for _, item, record in ranked_records(records):
                if record is None:
                    continue
                result = [self._region(item, region) for region in record["regions"]]
                prediction = {"model_version": model_version, "score": round_score(record["score"]), "result": result}
                yield {"data": {"image": self.image_reference(item.id)}, "predictions": [prediction]}

        tasks_path = atomic_write_json_stream(folder / self.tasks_file, tasks())
        config = config_xml(list(self.vocab.names), self.vocab.colors(), self.regions)
        return [tasks_path, atomic_write_text(folder / self.config_file, config)]
