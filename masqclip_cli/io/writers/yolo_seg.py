"""``yolo-seg``: an Ultralytics YOLO segmentation dataset, ``out/yolo-seg/`` (images, one label file per image,
``data.yaml``), ready for ``yolo segment train data=out/yolo-seg/data.yaml``; the layout is also the one of CVAT's
"Ultralytics YOLO Segmentation" import (not checked here).

Layout (``<split>`` is the option ``yolo_split``, default ``val``)::

    out/yolo-seg/
        data.yaml
        images/<split>/<item id>          the image (see "Images")
        labels/<split>/<item id minus its extension>.txt

Labels. The label of an image is where Ultralytics looks for it (``ultralytics.data.utils.img2label_paths``): the
image path with its *last* ``/images/`` folder replaced by ``/labels/`` and its extension by ``.txt``. Nested ids keep
their folders (``sub/b.jpg`` -> ``labels/<split>/sub/b.txt``); an id with an ``images`` folder of its own
(``images/x.jpg``) therefore gets its label at ``images/<split>/labels/x.txt``, which is where Ultralytics reads it.
Two ids that differ only in their extension (``a.jpg``, ``a.png``) would share ``a.txt``: the second one written
fails with an error naming both (also against an image already on disk from an earlier, resumed run; ``finalize``
refuses such a pair that came in from separate runs or shards).

One line per polygon: ``<class index> x1 y1 x2 y2 ...``, class index = the vocabulary's contiguous index (0..N-1,
the keys of ``names``), coordinates normalised by the image width / height, 6 decimals. A vertex at pixel column c,
row r is the pixel's centre ``((c + 0.5) / W, (r + 0.5) / H)``, rounded *down* to 6 decimals and kept strictly below
the centre (by 0.5 to 1.5 millionths): Ultralytics rasterises labels with ``cv2.fillPoly`` after truncating the
coordinates to integers (also the 1000 points it resamples every polygon to), supervision after rounding them to the
nearest integer; a value just below the centre gives back exactly pixel (c, r) to both (images up to 330 000 pixels
wide; the margin also covers their float32 arithmetic), where a value on either side of a plain 6-decimal rounding
would move some vertices by a pixel. Every line has at least 3 points (a one-pixel part is its point three times, a
one-pixel-wide straight part its two ends and the first again), so that no line is ever taken for a box. An image
with nothing found gets an empty label file (a "background" image for Ultralytics). The exact repeat of a line
already written for the same image (the same class and the same polygon, e.g. one mask named by two queries) is
written once, as Ultralytics would drop it anyway.

What is written:

* instances (task ``instance``, preferred): every instance with a non-empty mask (empty masks are skipped);
* otherwise panoptic segments (task ``panoptic``): every segment of the panoptic map, things and stuff alike. The
  writer declares ``any_of_tasks = ("instance", "panoptic")``; a run with neither computes instances.

Multi-part masks: YOLO has no way to group polygons, so each 8-connected part of a mask is a line of its own (an
instance in Ultralytics), with the instance's class. Parts are in raster order of their top-most, left-most pixel.

Holes: a YOLO polygon is one ring. A part with holes is written as one *bridged* ring: the outer boundary, then for
each hole a zero-width cut (the same segment there and back) to the hole's boundary, around the hole, and back.
``cv2.fillPoly`` (Ultralytics, supervision) fills it with the even-odd rule and draws its edges, so it gives back the
part with its holes; the cut is chosen, among the shortest, to run over the part's own pixels, so the round trip is
exact in almost all cases (a cut that cannot avoid background adds those few pixels). The hole boundaries go the
other way round from the outer one, so they stay holes under the non-zero winding rule too (SVG's default). Measured on
the demo model's instances (holes included) loaded by Ultralytics: IoU 1.0 as read from the label files, >= 0.995 after
its resampling to 1000 points per polygon for training, 1.0 through supervision (writing the outer ring only: IoU
down to 0.66).

Images (option ``yolo_images``):

* ``"copy"`` (default): the source file copied byte for byte (streamed, atomically; EXIF orientation is honoured by
  Ultralytics as by masqclip, so the coordinates match);
* ``"symlink"``: an absolute symbolic link to the source file (links need privileges on Windows);
* ``"none"``: no images; only labels and ``data.yaml`` (put the images in ``images/<split>/`` yourself).

With ``copy`` and ``symlink``, an item whose source cannot be used as is gets the decoded image (what the model saw)
written as a PNG instead: a video frame (``clip.mp4#000005`` -> ``images/<split>/clip.mp4#000005.png``, label
``clip.mp4#000005.txt``) and an image whose extension Ultralytics or supervision do not list (``.gif``, ``.ppm``,
``.pgm``, ``.jp2``, none: ``x.gif`` -> ``x.gif.png``, label ``x.gif.txt``). A source whose content is not a format
they read (a GIF named ``.jpg``) or that is unknown keeps its name and gets PNG bytes. Ultralytics treats images
smaller than 10 x 10 pixels as corrupt.

``data.yaml``: ``path`` (the absolute dataset root: Ultralytics resolves a relative ``path``, ``.`` included, against
the current directory, not against the YAML file; after moving the folder, fix ``path`` or delete that line, then the
YAML's folder is used), ``train`` and ``val`` (both ``images/<split>``), ``names`` (index -> class name, the whole
vocabulary). No ``nc`` (Ultralytics derives it from ``names``; CVAT's import rejects it).

Readers: Ultralytics (``check_det_dataset`` + ``YOLODataset(task="segment")``, nested folders included) and
supervision (``DetectionDataset.from_yolo``, which reads one folder: ``images/<split>`` and ``labels/<split>``
without their subfolders).
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import cv2
import numpy as np
from PIL import Image
from scipy.ndimage import find_objects
from scipy.spatial import cKDTree

from masqclip_cli.io.files import (
    atomic_symlink,
    atomic_write_bytes,
    atomic_write_chunks,
    atomic_write_text,
    encode_png,
    output_path,
)
from masqclip_cli.io.sources import VIDEO_EXTENSIONS
from masqclip_cli.structures import Segmentation

from .base import ItemInfo, Writer, check_size, ranked_records

__all__ = ["YoloSegWriter", "image_file_path", "mask_rings", "write_image_file"]

#: Image extensions copied (or linked) as they are: read by Ultralytics (``IMG_FORMATS``) and supervision's
#: ``from_yolo`` alike. Anything else is written as a PNG.
COPY_SUFFIXES = frozenset({".bmp", ".jpg", ".jpeg", ".png", ".tif", ".tiff", ".webp"})
#: PIL formats of a source file that are copied as they are (Ultralytics checks the content's format).
_COPY_FORMATS = frozenset({"BMP", "JPEG", "MPO", "PNG", "TIFF", "WEBP"})
#: Extensions of files Ultralytics takes for images (its ``IMG_FORMATS``): a sibling with one of them would share
#: our label file.
_SIBLING_EXTS = ("avif", "bmp", "dng", "heic", "heif", "jp2", "jpeg", "jpg", "mpo", "png", "tif", "tiff", "webp")
_IMAGE_MODES = ("copy", "symlink", "none")
#: Candidate cuts tried per hole (shortest first) before taking the shortest even if it crosses background.
_CUT_TRIES = 32


# --- mask -> YOLO rings ---------------------------------------------------------------------------------------------


def _signed_area(ring: np.ndarray) -> float:
    x, y = ring[:, 0].astype(np.float64), ring[:, 1].astype(np.float64)
    return 0.5 * float(np.dot(x, np.roll(y, -1)) - np.dot(np.roll(x, -1), y))


def _cut_inside(p: np.ndarray, q: np.ndarray, region: np.ndarray) -> bool:
    """Whether the 8-connected line from p to q (x, y in ``region``'s coordinates) lies on the part's pixels."""
    x0, y0 = int(min(p[0], q[0])), int(min(p[1], q[1]))
    x1, y1 = int(max(p[0], q[0])), int(max(p[1], q[1]))
    canvas = np.zeros((y1 - y0 + 1, x1 - x0 + 1), dtype=np.uint8)
    cv2.line(canvas, (int(p[0]) - x0, int(p[1]) - y0), (int(q[0]) - x0, int(q[1]) - y0), 1, cv2.LINE_8)
    return bool(region[y0 : y1 + 1, x0 : x1 + 1][canvas.astype(bool)].all())


def _bridge(ring: np.ndarray, hole: np.ndarray, region: np.ndarray) -> np.ndarray:
    """``ring`` with ``hole`` spliced in along a zero-width cut: ring[..i], hole[j..], hole[..j], ring[i..]."""
    k = min(4, len(ring))
    dist, idx = cKDTree(ring).query(hole, k=k)
    dist, idx = np.asarray(dist).reshape(len(hole), k), np.asarray(idx).reshape(len(hole), k)
    order = np.argsort(dist, axis=None, kind="stable")  # (hole point, neighbour) pairs, shortest cut first
    pick = int(order[0])
    for flat in order[:_CUT_TRIES].tolist():
        j, n = divmod(flat, k)
        if _cut_inside(ring[idx[j, n]], hole[j], region):
            pick = flat
            break
    j, n = divmod(pick, k)
    i = int(idx[j, n])
    return np.concatenate([ring[: i + 1], hole[j:], hole[: j + 1], ring[i:]])


def _part_ring(region: np.ndarray) -> np.ndarray:
    """One part (an 8-connected (h, w) uint8 0/1 region whose border rows and columns are 0) as one int ring through
    pixel centres, its holes bridged in (window coordinates)."""
    contours, hierarchy = cv2.findContours(region, cv2.RETR_CCOMP, cv2.CHAIN_APPROX_SIMPLE)
    tops = [c for c, h in zip(contours, hierarchy[0]) if h[3] < 0]
    if len(tops) != 1:  # cannot happen for one 8-connected part; guard against a silent wrong answer
        raise RuntimeError(f"expected one outer contour, got {len(tops)}")
    ring = tops[0].reshape(-1, 2).astype(np.int64)
    holes = [c.reshape(-1, 2).astype(np.int64) for c, h in zip(contours, hierarchy[0]) if h[3] >= 0]
    if holes:
        outer_sign = np.sign(_signed_area(ring))
        holes.sort(key=lambda h: (int(h[:, 1].min()), int(h[h[:, 1] == h[:, 1].min(), 0].min())))
        for hole in holes:
            if np.sign(_signed_area(hole)) == outer_sign:
                hole = hole[::-1]
            ring = _bridge(ring, hole, region)
    if len(ring) == 1:
        ring = np.repeat(ring, 3, axis=0)
    elif len(ring) == 2:
        ring = ring[[0, 1, 0]]
    return ring


def mask_rings(mask: np.ndarray, offset: tuple[int, int] = (0, 0)) -> list[np.ndarray]:
    """The YOLO rings of a mask (nonzero = foreground): one (N, 2) int64 array of x, y pixel indices (N >= 3) per
    8-connected part, holes bridged in (see the module docstring), in raster order of each part's first pixel.
    ``offset`` (x, y) is added to every point (for a mask cropped out of a larger image). ``cv2.fillPoly`` of each ring,
    OR-ed, gives back the mask (exactly, unless a hole cannot be reached over the part's own pixels)."""
    fg = (np.asarray(mask) != 0).astype(np.uint8)
    if fg.ndim != 2:
        raise ValueError(f"a mask must be 2-D, got shape {fg.shape}")
    if not fg.any():
        return []
    n_parts, labels, stats, _ = cv2.connectedComponentsWithStats(fg, connectivity=8, ltype=cv2.CV_32S)
    rings = []
    for part in range(1, n_parts):  # labels follow raster order of each part's first pixel
        x, y, w, h = (int(v) for v in stats[part, :4])
        region = np.zeros((h + 2, w + 2), dtype=np.uint8)
        region[1:-1, 1:-1] = labels[y : y + h, x : x + w] == part
        ring = _part_ring(region)
        rings.append(ring + np.array([x - 1 + offset[0], y - 1 + offset[1]], dtype=np.int64))
    return rings


def _micro_coords(ring: np.ndarray, scale: np.ndarray) -> list[int]:
    """x0, y0, x1, y1, ... of an int ring as millionths of the image size: each pixel centre ``(c + 0.5) / W``
    rounded down, at least half a millionth below the centre (see the module docstring). ``scale`` = (W, H) / 1e6."""
    return np.floor((ring + 0.5) / scale - 0.5).astype(np.int64).ravel().tolist()


def _crop(mask: np.ndarray) -> tuple[np.ndarray, int, int] | None:
    """(the mask cut to its box, x0, y0), or None when it is empty."""
    rows = np.flatnonzero(mask.any(axis=1))
    if rows.size == 0:
        return None
    cols = np.flatnonzero(mask.any(axis=0))
    y0, y1, x0, x1 = int(rows[0]), int(rows[-1]) + 1, int(cols[0]), int(cols[-1]) + 1
    return mask[y0:y1, x0:x1], x0, y0


# --- files ------------------------------------------------------------------------------------------------------------


def _yaml_str(text: str) -> str:
    """A YAML double-quoted scalar (JSON string syntax, which YAML reads), with every character YAML does not allow
    raw in a quoted scalar (C1 controls, line / paragraph separators, surrogates, U+FFFE/FFFF) escaped."""
    out = []
    for ch in json.dumps(str(text), ensure_ascii=False):
        o = ord(ch)
        if 0x7F <= o <= 0x9F or o in (0x2028, 0x2029, 0xFFFE, 0xFFFF) or 0xD800 <= o <= 0xDFFF:
            out.append(f"\\u{o:04x}")
        else:
            out.append(ch)
    return "".join(out)


def _file_chunks(path: str) -> Iterator[bytes]:
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            yield chunk


def _copyable_content(source: str) -> bool:
    """Whether the file's content is a format Ultralytics reads (PIL's header read only)."""
    try:
        with Image.open(source) as im:
            return im.format in _COPY_FORMATS
    except Exception:  # noqa: BLE001 - unreadable here: write the decoded image instead
        return False


def _is_video(source: str | None) -> bool:
    return source is not None and Path(source).suffix.lower() in VIDEO_EXTENSIONS


# --- the writer -------------------------------------------------------------------------------------------------------


def image_file_path(images_dir: Path, subset: str, item: ItemInfo) -> tuple[Path, bool]:
    """Where the writers that lay images out beside their labels put ``item``'s image, and whether it is the source
    file as is: ``images_dir/subset/<id>`` when the id's extension is copied (:data:`COPY_SUFFIXES`), else
    ``images_dir/subset/<id>.png`` (a video frame, another extension: the decoded image)."""
    as_is = Path(item.id).suffix.lower() in COPY_SUFFIXES and not _is_video(item.source)
    return output_path(images_dir, subset, item.id, "" if as_is else ".png"), as_is


def write_image_file(item: ItemInfo, path: Path, as_is: bool, image: np.ndarray | None, size: tuple[int, int],
                     mode: str, writer: str) -> None:
    """Put ``item``'s image at ``path``: the source file copied (``mode="copy"``) or linked (``"symlink"``) when
    ``as_is`` and the source is a readable file, else ``image`` (the decoded (H, W, 3) uint8 RGB, ``size`` = (H, W))
    encoded as PNG. Shared by the writers that lay images out beside their labels (``writer`` names the one asking,
    for messages)."""
    source = item.source
    if as_is and source is not None and os.path.isfile(source) and _copyable_content(source):
        same = os.path.abspath(source) == os.path.abspath(path)
        if same or (not path.is_symlink() and path.exists() and path.samefile(source)):
            return  # the output already is the source
        if mode == "symlink":
            atomic_symlink(path, os.path.abspath(source))
        else:
            atomic_write_chunks(path, _file_chunks(source), compare=not path.is_symlink())
        return
    if image is None:
        raise ValueError(f"item {item.id!r}: the {writer} writer needs the decoded image to write {path.name}")
    rgb = np.asarray(image)
    if rgb.dtype != np.uint8 or rgb.ndim != 3 or rgb.shape[2] != 3 or rgb.shape[:2] != size:
        raise ValueError(f"item {item.id!r}: image is {rgb.dtype} {rgb.shape}, need uint8 {size + (3,)} RGB")
    if path.is_symlink():
        path.unlink()
    atomic_write_bytes(path, encode_png(rgb))


class YoloSegWriter(Writer):
    """Ultralytics YOLO segmentation dataset under ``out/yolo-seg/``: ``images/<split>/``, ``labels/<split>/`` (one
    polygon per line, holes bridged, one line per part) and ``data.yaml``. See the module docstring.

    Options: ``yolo_images`` (``"copy"``, ``"symlink"`` or ``"none"``: how the images get into ``images/``) and
    ``yolo_split`` (the split folder name, also ``train`` and ``val`` of ``data.yaml``; default ``"val"``).
    """

    name = "yolo-seg"
    any_of_tasks = ("instance", "panoptic")
    needs_image = True
    needs_source = True
    option_defaults = {"yolo_images": "copy", "yolo_split": "val"}
    kind = "yolo-seg"
    file_name = "data.yaml"

    def __init__(self, out_dir, vocab, **options: Any) -> None:
        super().__init__(out_dir, vocab, **options)
        mode = str(self.options["yolo_images"]).strip().lower()
        if mode not in _IMAGE_MODES:
            known = ", ".join(_IMAGE_MODES)
            raise ValueError(f"yolo_images must be one of {known}, got {self.options['yolo_images']!r}")
        split = str(self.options["yolo_split"])
        if not split or split in (".", "..") or "/" in split or "\\" in split or split != split.strip():
            raise ValueError(f"yolo_split must be a plain folder name, got {self.options['yolo_split']!r}")
        self.mode, self.split = mode, split
        self.root: Path | None = None if self.out_dir is None else self.out_dir / self.kind
        self._claims: dict[str, str] = {}  # label file (relative to root) -> item id, in this run

    # --- paths ------------------------------------------------------------------------------------------------------
    def _image_path(self, item: ItemInfo) -> tuple[Path, bool]:
        """(the image's path, whether it is the source as is): ``images/<split>/<id>`` when the id's extension is
        copied, else ``images/<split>/<id>.png`` (a video frame, another extension)."""
        assert self.root is not None
        return image_file_path(self.root / "images", self.split, item)

    def _label_path(self, image: Path) -> Path:
        """Where Ultralytics reads the label of ``image`` (``img2label_paths``: the last ``/images/`` becomes
        ``/labels/``, the extension ``.txt``)."""
        assert self.root is not None
        rel = "/" + image.relative_to(self.root).as_posix()
        rel = "/labels/".join(rel.rsplit("/images/", 1)).rsplit(".", 1)[0] + ".txt"
        return self.root / rel[1:]

    def item_files(self, item: ItemInfo) -> list[Path]:
        image, _ = self._image_path(item)
        label = self._label_path(image)
        return [label] if self.mode == "none" else [image, label]

    # --- per item -----------------------------------------------------------------------------------------------------
    def _regions(self, item: ItemInfo, seg: Segmentation, size: tuple[int, int]) -> Iterator[tuple[int, np.ndarray]]:
        """(class index, ring) of every polygon to write, in order."""
        if seg.instances is not None:
            for inst in seg.instances:
                category = self._category(inst.category)
                mask = np.asarray(inst.mask) if inst.mask is not None else None
                if mask is None or mask.shape != size:
                    raise ValueError(f"item {item.id!r}: instance {inst.id} has no {size} mask")
                cropped = _crop(mask != 0)
                if cropped is None:
                    continue
                window, x0, y0 = cropped
                for ring in mask_rings(window, (x0, y0)):
                    yield category, ring
        elif seg.panoptic is not None:
            pan = np.asarray(seg.panoptic)
            if pan.shape != size or not np.issubdtype(pan.dtype, np.integer):
                raise ValueError(f"item {item.id!r}: panoptic map is {pan.dtype} {pan.shape}, need integers {size}")
            pan = pan.astype(np.int64, copy=False)
            ids = [int(s.id) for s in seg.segments if int(s.id) > 0]
            slices = find_objects(np.where(pan > 0, pan, 0), max_label=max(ids, default=0)) if ids else []
            for s in seg.segments:
                category = self._category(s.category)
                sid = int(s.id)
                box = slices[sid - 1] if 0 < sid <= len(slices) else None
                if box is None:
                    continue  # no pixels
                window = pan[box] == sid
                for ring in mask_rings(window, (box[1].start, box[0].start)):
                    yield category, ring
        else:
            raise ValueError(f"item {item.id!r}: the yolo-seg writer needs instance or panoptic results")

    def _claim(self, item: ItemInfo, image: Path, label: Path) -> None:
        """Fail the item when another item of the run, or an image already on disk, has the same label file."""
        assert self.root is not None
        key = label.relative_to(self.root).as_posix()
        other = self._claims.get(key)
        if other is not None and other != item.id:
            raise ValueError(
                f"item {item.id!r}: its YOLO label {key} is that of item {other!r} too (YOLO names a label after "
                "the image without its extension); rename one of them"
            )
        if self.mode != "none":
            stem = image.name.rsplit(".", 1)[0]
            for ext in _SIBLING_EXTS:
                for e in (ext, ext.upper()):
                    sibling = image.with_name(f"{stem}.{e}")
                    if sibling.name.lower() != image.name.lower() and (sibling.exists() or sibling.is_symlink()):
                        raise ValueError(
                            f"item {item.id!r}: its YOLO label {key} is also that of the image "
                            f"{sibling.relative_to(self.root).as_posix()} already in the output; rename one of them"
                        )
        self._claims[key] = item.id

    def write_item(self, item: ItemInfo, seg: Segmentation, image: np.ndarray | None = None) -> dict:
        assert self.root is not None
        size = check_size(item, seg)
        h, w = size
        scale = np.array([w, h], dtype=np.float64) / 1e6
        lines: list[str] = []
        seen: set[str] = set()
        for category, ring in self._regions(item, seg, size):
            line = f"{category} " + " ".join(f"0.{q:06d}" for q in _micro_coords(ring, scale))
            if line not in seen:
                seen.add(line)
                lines.append(line)
        image_path, as_is = self._image_path(item)
        label_path = self._label_path(image_path)
        self._claim(item, image_path, label_path)
        if self.mode != "none":
            write_image_file(item, image_path, as_is, image, size, self.mode, self.name)
        atomic_write_text(label_path, "".join(line + "\n" for line in lines))
        return {
            "image": None if self.mode == "none" else image_path.relative_to(self.root).as_posix(),
            "label": label_path.relative_to(self.root).as_posix(),
            "polygons": len(lines),
        }

    # --- run level ------------------------------------------------------------------------------------------------
    def finalize(self, records) -> list[Path]:
        """``data.yaml``; a ValueError when two items' records share a label file (items written by separate runs
        or shards, which write_item could not see together)."""
        assert self.root is not None
        labels: dict[str, str] = {}
        for _, item, record in ranked_records(records):
            if record is None:
                continue
            label = str(record["label"])
            if label in labels:
                raise ValueError(
                    f"yolo-seg: items {labels[label]!r} and {item.id!r} have the same YOLO label {label} (YOLO "
                    "names a label after the image without its extension); rename one of them and run again"
                )
            labels[label] = item.id
        images = f"images/{self.split}"
        text = [
            f"path: {_yaml_str(str(self.root.resolve()))}",
            f"train: {_yaml_str(images)}",
            f"val: {_yaml_str(images)}",
            "names:",
            *(f"  {i}: {_yaml_str(name)}" for i, name in enumerate(self.vocab.names)),
        ]
        return [atomic_write_text(self.root / self.file_name, "\n".join(text) + "\n")]
