"""``cvat``: every item of the run in one "CVAT for images 1.1" XML file, ``out/cvat/annotations.xml``.

The file is what CVAT exports as "CVAT for images 1.1" and imports back (into a task, or with datumaro's ``cvat``
format)::

    <annotations>
      <version>1.1</version>
      <meta><task> name, size, mode, ... <labels> one <label> per vocabulary class: name, color (#rrggbb, the
        vocabulary's colours), type "any", attributes (``score``, a text attribute) </labels></task></meta>
      <image id="0" name="a.jpg" width="W" height="H"> the item's shapes </image>
      ...
    </annotations>

Images come in item-id order; ``id`` is the item's 0-based rank in that order (items that produced no record keep
their rank, so ids never depend on which items failed) and ``name`` is the item id -- the image's path relative to
the source root (``sub/b.jpg``), which is what CVAT matches the images of a task by. A video frame
(``clip.mp4#000005``) is named ``clip.mp4#000005.png``: CVAT and datumaro strip the extension from a name to get the
item's id, and ``clip.mp4#000005`` would lose its frame number that way (for the same reason ``a.jpg`` and
``a.png`` of one run share the datumaro id ``a``). Ids with ``..`` or absolute parts are
neutralised as in :func:`~masqclip_cli.io.files.output_path`. Items with no detections are listed with no shapes.

Shapes are the instances (task ``instance``), or, when only panoptic results are given, the panoptic segments
(things and stuff, each segment's pixels on the map); empty masks are left out. Each is written with ``source="auto"
occluded="0" z_order="0"`` and, unless ``cvat_scores`` is off, ``<attribute name="score">`` (declared on every label
as a ``text`` attribute: CVAT's ``number`` attributes are integer ranges with a step and cannot hold a score; datumaro
reads it back as the string). Options:

``cvat_shapes="mask"`` (default): one ``<mask>`` per instance, in CVAT's own mask encoding -- ``left``, ``top``,
    ``width``, ``height`` of the mask's tight box and ``rle``, the run lengths (``", "``-separated) of the box's pixels
    in row-major order, starting with a background run (0 when the box's first pixel is set). Lossless: several parts,
    holes, islands in holes, all in one shape, decoded back exactly by CVAT and datumaro. The lossless, compact choice.
``cvat_shapes="polygon"``: one ``<polygon>`` per connected part (8-connected, as
    :func:`~masqclip_cli.structures.masks.mask_to_polygons` finds them); the parts of a multi-part instance share a
    ``group_id`` (1, 2, ... within the image; a one-part instance has none), which is how CVAT and datumaro
    (``merge_instance_segments``) tell one instance's parts. The outline runs a quarter pixel inside the part's pixel
    edges (coordinates are continuous, pixel (c, r) covering [c, c+1) x [r, r+1)), so a rasteriser that samples
    pixels near their centres -- CVAT, pycocotools as datumaro uses it, OpenCV -- gives back exactly the part's
    pixels at ``cvat_polygon_tolerance=0``. A part inside another part's hole is a polygon of its own.
``cvat_polygon_holes="bridge"``: CVAT polygons have no holes; by default each hole ring (reversed) is joined to the
    exterior by a zero-width bridge walked there and back, so the polygon still excludes the hole under both the
    even-odd (pycocotools) and the non-zero (SVG, CVAT's canvas) fill rules: lossless at tolerance 0, but the bridge
    shows as a line when the polygon is edited. ``"fill"`` writes exteriors only: holes are filled in.
``cvat_polygon_tolerance=0.0``: Douglas-Peucker tolerance in pixels for the polygons' rings (0 = the exact outline,
    many points; 1 cuts the points about four-fold, at IoU ~0.93-0.97 on parts of ~1000 pixels); a ring too thin to
    simplify keeps its exact points, so no part or hole is lost.
``cvat_scores=True``: write the ``score`` attribute (and declare it on the labels).
``cvat_images="none"``: ``"copy"`` or ``"link"`` also put each image under ``out/cvat/images/<name>`` (a copy, or a
    symbolic link to the source file), the layout of a CVAT export "with images" that datumaro's importer needs
    (CVAT itself matches annotations to an existing task's images by name and needs none). Video frames and items
    without a source file are written there as PNG of the decoded frame. A source image is copied as is: a JPEG with
    an EXIF orientation keeps it, and is shown rotated by viewers that ignore it.

The XML is streamed from the records (one item's record in memory at a time), byte-deterministic (fixed attribute
order, no timestamps) and written atomically.

**Tracked sequences** (items with ``ItemInfo.sequence``: a video's frames, or a ``--sequence`` run) are not images of
``annotations.xml``: each sequence gets its own "CVAT for video 1.1" file, ``out/cvat/<sequence>/annotations.xml``
(``annotations.xml`` itself is then written only when the run also has items outside sequences, or has no items)::

    <annotations>
      <version>1.1</version>
      <meta><task> name (the sequence), size (frames), mode "interpolation", start_frame 0, stop_frame (size - 1),
        <labels> as above (``score`` declared mutable: it changes from frame to frame) </labels>,
        <original_size> width, height (the largest frame's) </original_size></task></meta>
      <track id="0" label="person" source="auto" group_id="7">
        <mask frame="0" keyframe="1" outside="0" occluded="0" rle=... left top width height z_order="0">
          <attribute name="score">0.93</attribute></mask>
        ... one shape per frame the object is in; after each run of frames it is in, an ``outside="1"`` keyframe
        on the next frame (the shape repeated), unless that is past the last frame
      </track>
      ...
    </annotations>

CVAT frame numbers are the frames' 0-based positions in the sequence (``ItemInfo.frame``, after ``--every``). One
object (a masqclip track id: the same id in the overlay video, the panoptic PNGs and the other formats) is one
``<track>`` whose ``label`` is the class decided over the whole track (:attr:`Writer.track_classes`, else the most
common per-frame class, ties to the lowest class index); every frame's shape is a keyframe, its ``score`` the
frame's score for that class (when the frame has the object under several classes), else the frame's best. The
``group_id`` is the masqclip track id and ``id`` the CVAT track's 0-based number (tracks in track-id order):
with ``cvat_shapes="polygon"`` an object of several parts becomes several CVAT tracks (a CVAT track has one polygon
per frame) -- the ``k``-th part of each frame in the ``k``-th of them -- which share its ``group_id``. Shapes come
from the instances, else the panoptic segments as for images; **stuff** segments keep one id per class over the
sequence, so with panoptic results each stuff class is one track too (labelled with its class).

Reading it back: CVAT imports the file into a video task (format "CVAT 1.1"); datumaro
(``Dataset.import_from("out/cvat/<sequence>", "cvat")``, one sequence's folder: the items of different sequences
share the names ``frame_000000`` ...) gives one annotation per track shape, with the ``track_id``, ``keyframe`` and
``outside`` attributes (leave out ``outside`` ones: they only end a track) and the group. datumaro 1.13 and earlier
cannot read ``<mask>`` shapes inside a ``<track>`` (``CvatBase._parse_shape_ann`` takes the frame size from an
``<image>`` element, which a video file does not have, and fails with ``AttributeError``): use
``cvat_shapes="polygon"`` for datumaro, masks for CVAT. ``cvat_images`` puts each frame under
``out/cvat/<sequence>/images/frame_<frame, 6 digits>.png`` (the decoded frame), the names datumaro looks for.

A sequence's file is assembled from the records in two streamed passes (one record in memory at a time): the first
counts frames, sizes and each track's per-frame classes, the second appends every shape to a scratch file of the
sequence in ``out/.masqclip/cvat-tracks/`` (remembering where each track's shapes are), from which the XML is then
written track by track; the scratch files are removed.
"""

from __future__ import annotations

import math
import os
import re
import shutil
from array import array
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from masqclip_cli.io.files import STATE_DIR, atomic_save_png, atomic_symlink, atomic_write_chunks, output_path
from masqclip_cli.structures import Segmentation
from masqclip_cli.structures.masks import mask_to_polygons, round_score, segment_stats

from .base import ItemInfo, Writer, check_size, ranked_records

__all__ = ["CvatWriter", "cvat_mask_rle", "cvat_polygons"]

SHAPES = ("mask", "polygon")
HOLES = ("bridge", "fill")
IMAGE_MODES = ("none", "copy", "link")
#: Under ``--out``: the run's state folder (as the engine names it) and, in it, the sequences' scratch files.
TRACKS_SCRATCH_DIR = "cvat-tracks"
#: Bytes of track shapes buffered in memory before they are appended to the scratch files.
_SCRATCH_FLUSH = 1 << 20

_BAD_XML_CHARS = re.compile("[\x00-\x08\x0b\x0c\x0e-\x1f\ufffe\uffff]")
_ATTR_ENTITIES = {"&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;", "\n": "&#10;", "\r": "&#13;", "\t": "&#9;"}
_TEXT_ENTITIES = {"&": "&amp;", "<": "&lt;", ">": "&gt;", "\r": "&#13;"}
_ATTR_RE = re.compile('[&<>"\n\r\t]')
_TEXT_RE = re.compile("[&<>\r]")


def _check_xml(value: str) -> str:
    if _BAD_XML_CHARS.search(value):
        raise ValueError(f"{value!r} holds a character that XML 1.0 cannot represent")
    return value


def _attr(value: Any) -> str:
    """An XML attribute value, escaped (to go between double quotes)."""
    return _ATTR_RE.sub(lambda m: _ATTR_ENTITIES[m.group()], _check_xml(str(value)))


def _text(value: Any) -> str:
    """XML character data, escaped."""
    return _TEXT_RE.sub(lambda m: _TEXT_ENTITIES[m.group()], _check_xml(str(value)))


def _score_text(score: float) -> str:
    return repr(round_score(score))


# --- shape encodings -----------------------------------------------------------------------------------------------


def cvat_mask_rle(mask: np.ndarray) -> tuple[str, list[int]] | None:
    """CVAT's encoding of a boolean (H, W) mask: ``(rle, [left, top, width, height])`` with ``rle`` the run lengths
    of the tight box's pixels, row-major, background first (``"0, 3, 2, ..."``); None for an empty mask."""
    mask = np.asarray(mask, dtype=bool)
    if mask.ndim != 2:
        raise ValueError(f"a mask must be 2-D, got shape {mask.shape}")
    rows = np.flatnonzero(mask.any(axis=1))
    if rows.size == 0:
        return None
    cols = np.flatnonzero(mask.any(axis=0))
    top, bottom, left, right = int(rows[0]), int(rows[-1]), int(cols[0]), int(cols[-1])
    flat = mask[top : bottom + 1, left : right + 1].ravel()
    bounds = np.concatenate(([0], np.flatnonzero(flat[1:] != flat[:-1]) + 1, [flat.size]))
    counts = np.diff(bounds).tolist()
    if flat[0]:
        counts.insert(0, 0)
    return ", ".join(str(c) for c in counts), [left, top, right - left + 1, bottom - top + 1]


def _simplified(ring: np.ndarray, tolerance: float) -> np.ndarray:
    """``ring`` simplified with Douglas-Peucker (cv2.approxPolyDP, epsilon ``tolerance``); the ring itself when that
    would leave fewer than 3 points (a part or hole thinner than about the tolerance)."""
    if tolerance <= 0:
        return ring
    import cv2

    simplified = cv2.approxPolyDP(np.rint(ring).astype(np.int32).reshape(-1, 1, 2), float(tolerance), True)
    return simplified.reshape(-1, 2).astype(np.float64) if simplified.shape[0] >= 3 else ring


def cvat_polygons(mask: np.ndarray, tolerance: float = 0.0, holes: bool = True) -> list[str]:
    """CVAT ``points`` strings (``"x0,y0;x1,y1;..."``, 2 decimals) of a boolean (H, W) mask, one per 8-connected part,
    in the order of :func:`~masqclip_cli.structures.masks.mask_to_polygons`.

    Each ring runs a quarter pixel inside the part's pixel edges, in continuous coordinates (pixel (c, r) covers
    [c, c+1) x [r, r+1)): it is the pixel-centre outline of the part upsampled 2x, mapped back, so it always has at
    least 3 points (a single pixel is a 0.5 x 0.5 square). With ``holes``, each hole ring (traced the same way, a
    quarter pixel inside the hole, in the opposite direction) is joined to the exterior's first point by a bridge
    walked there and back: filled with the even-odd rule (pycocotools) or the non-zero rule (SVG), the polygon is the
    part minus its holes. Without, holes are filled in. ``tolerance`` > 0 (pixels) simplifies each ring (see
    :func:`_simplified`); no part or hole is ever dropped."""
    mask = np.asarray(mask, dtype=bool)
    if mask.ndim != 2:
        raise ValueError(f"a mask must be 2-D, got shape {mask.shape}")
    rows = np.flatnonzero(mask.any(axis=1))
    if rows.size == 0:
        return []
    cols = np.flatnonzero(mask.any(axis=0))
    top, left = int(rows[0]), int(cols[0])
    crop = mask[top : int(rows[-1]) + 1, left : int(cols[-1]) + 1]
    double = np.repeat(np.repeat(crop, 2, axis=0), 2, axis=1)
    epsilon = 2.0 * float(tolerance)  # in the upsampled grid
    out = []
    for polygon in mask_to_polygons(double):
        exterior = _simplified(polygon.exterior, epsilon)
        pieces = [exterior]
        if holes:
            start = exterior[:1]
            for hole in polygon.holes:
                ring = _simplified(hole, epsilon)[::-1]  # the opposite direction: a hole under the non-zero rule too
                pieces += [start, ring, ring[:1], start]
        ring = np.concatenate(pieces)
        xs = left + (ring[:, 0] + 0.5) / 2.0
        ys = top + (ring[:, 1] + 0.5) / 2.0
        out.append(";".join(f"{x:.2f},{y:.2f}" for x, y in zip(xs.tolist(), ys.tolist())))
    return out


# --- tracked sequences ---------------------------------------------------------------------------------------------


@dataclass
class _SequenceInfo:
    """One sequence as the first pass over the records sees it: its scratch file's number, frame count (last frame
    + 1), largest frame size and, per track id, how many frames had it under each class (its best one there)."""

    number: int
    frames: int = 0
    height: int = 0
    width: int = 0
    votes: dict[int, Counter] = field(default_factory=dict)


@dataclass
class _TrackShapes:
    """One CVAT track in the second pass: where its shapes are in the sequence's scratch file (``offsets``,
    ``lengths``), the last frame it has a shape on and that shape's geometry and attribute text."""

    offsets: array = field(default_factory=lambda: array("q"))
    lengths: array = field(default_factory=lambda: array("q"))
    last: int = -1
    last_shape: tuple[str, str] = ("", "")


def _track_shape(tag: str, frame: int, outside: bool, geometry: str, body: str) -> str:
    """One ``<mask>`` / ``<polygon>`` of a track, a keyframe."""
    return (
        f'    <{tag} frame="{frame}" keyframe="1" outside="{int(outside)}" occluded="0" {geometry} z_order="0">\n'
        f"{body}    </{tag}>\n"
    )


# --- the writer ----------------------------------------------------------------------------------------------------


class CvatWriter(Writer):
    """The "CVAT for images 1.1" XML of the run (see the module docstring): ``out/cvat/annotations.xml``, with
    ``out/cvat/images/`` when ``cvat_images`` is ``"copy"`` or ``"link"``.

    It loads in datumaro (``datumaro.Dataset.import_from("out/cvat", "cvat")``, images needed) and in CVAT (upload
    annotations, format "CVAT 1.1"). The record of an item holds its image name and its shapes."""

    name = "cvat"
    any_of_tasks = ("instance", "panoptic")
    option_defaults = {
        "cvat_shapes": "mask",
        "cvat_polygon_holes": "bridge",
        "cvat_polygon_tolerance": 0.0,
        "cvat_scores": True,
        "cvat_images": "none",
    }
    kind = "cvat"
    file_name = "annotations.xml"
    images_dir = "images"

    def __init__(self, out_dir, vocab, **options: Any) -> None:
        super().__init__(out_dir, vocab, **options)
        shapes = self.options["cvat_shapes"]
        if shapes not in SHAPES:
            raise ValueError(f"cvat_shapes must be one of {', '.join(SHAPES)}, got {shapes!r}")
        holes = self.options["cvat_polygon_holes"]
        if holes not in HOLES:
            raise ValueError(f"cvat_polygon_holes must be one of {', '.join(HOLES)}, got {holes!r}")
        tolerance = self.options["cvat_polygon_tolerance"]
        if (
            isinstance(tolerance, bool)
            or not isinstance(tolerance, (int, float))
            or not (math.isfinite(tolerance) and tolerance >= 0)
        ):
            raise ValueError(f"cvat_polygon_tolerance must be a finite number >= 0, got {tolerance!r}")
        images = self.options["cvat_images"]
        if images not in IMAGE_MODES:
            raise ValueError(f"cvat_images must be one of {', '.join(IMAGE_MODES)}, got {images!r}")
        # Per instance: the engine asks writer.needs_source / writer.needs_image.
        self.needs_source = self.needs_image = images != "none"

    # --- per item --------------------------------------------------------------------------------------------------
    def _root(self) -> Path:
        assert self.out_dir is not None
        return self.out_dir / self.kind

    def sequence_dir(self, sequence: str) -> Path:
        """``out/cvat/<sequence>``: a tracked sequence's ``annotations.xml`` and ``images/``."""
        assert self.out_dir is not None
        return output_path(self.out_dir, self.kind, sequence, "")

    def _image_path(self, item: ItemInfo) -> Path:
        """``out/cvat/images/<name>``; the image name is this path relative to ``out/cvat/images``. A frame of a
        tracked sequence: ``out/cvat/<sequence>/images/frame_<frame>.png``."""
        if item.sequence is not None:
            return self.sequence_dir(item.sequence) / self.images_dir / self.image_name(item)
        suffix = ".png" if "#" in os.path.splitext(item.id)[1] else ""  # a video frame: keep its number in the id
        return output_path(self._root(), self.images_dir, item.id, suffix)

    def image_name(self, item: ItemInfo) -> str:
        """The ``<image name>`` of an item: its id (neutralised like an output path), ``.png`` added to a frame;
        ``frame_<frame, 6 digits>.png`` for a frame of a tracked sequence (CVAT's and datumaro's frame names)."""
        if item.sequence is not None:
            if item.frame is None or int(item.frame) < 0:
                raise ValueError(f"item {item.id!r}: a frame of sequence {item.sequence!r} needs its frame number")
            return f"frame_{int(item.frame):06d}.png"
        return self._image_path(item).relative_to(self._root() / self.images_dir).as_posix()

    def item_files(self, item: ItemInfo) -> list[Path]:
        return [self._image_path(item)] if self.options["cvat_images"] != "none" else []

    def _masks(
        self, item: ItemInfo, seg: Segmentation, size: tuple[int, int]
    ) -> Iterator[tuple[int, int, float, Any]]:
        """(id, class index, score, bool mask) of every non-empty shape: the instances, else the panoptic segments
        (ids are track ids in a tracked sequence)."""
        if seg.instances is not None:
            for inst in seg.instances:
                index = self._category(inst.category)
                if inst.mask is None:
                    raise ValueError(f"item {item.id!r}: instance {inst.id} has no mask")
                mask = np.asarray(inst.mask, dtype=bool)
                if mask.shape != size:
                    raise ValueError(f"item {item.id!r}: instance {inst.id} mask is {mask.shape}, the image {size}")
                if mask.any():
                    yield int(inst.id), index, float(inst.score), mask
        elif seg.panoptic is not None:
            pan = np.asarray(seg.panoptic)
            if pan.shape != size:
                raise ValueError(f"item {item.id!r}: panoptic map is {pan.shape}, the image {size}")
            ordered = sorted(seg.segments, key=lambda s: int(s.id))
            for s in ordered:
                self._category(s.category)
            cleaned, areas, bboxes = segment_stats(pan, [int(s.id) for s in ordered])
            for s, area, (x, y, w, h) in zip(ordered, areas, bboxes):
                if area:
                    mask = np.zeros(size, dtype=bool)
                    mask[y : y + h, x : x + w] = cleaned[y : y + h, x : x + w] == int(s.id)
                    yield int(s.id), int(s.category), float(s.score), mask
        else:
            raise ValueError(f"item {item.id!r}: the cvat writer needs instance or panoptic results")

    def _geometry(self, mask: np.ndarray) -> dict[str, Any] | None:
        """A mask's shape fields in the record: ``rle`` and ``box``, or ``polygons`` (None when nothing is left)."""
        if self.options["cvat_shapes"] == "polygon":
            tolerance = float(self.options["cvat_polygon_tolerance"])
            parts = cvat_polygons(mask, tolerance, self.options["cvat_polygon_holes"] == "bridge")
            return {"polygons": parts} if parts else None
        rle, box = cvat_mask_rle(mask)
        return {"rle": rle, "box": box}

    def write_item(self, item: ItemInfo, seg: Segmentation, image: np.ndarray | None = None) -> dict:
        """The record: the image name and its shapes. An image's shape: ``label``, ``score`` and its geometry. A
        sequence frame's: ``track`` (the track id), ``labels`` (``[class index, score]`` of every row of the track in
        this frame, best first: rows of one object under several classes share its mask) and the geometry."""
        size = check_size(item, seg)
        shapes: list[dict[str, Any]] = []
        if item.sequence is None:
            for _, index, score, mask in self._masks(item, seg, size):
                geometry = self._geometry(mask)
                if geometry is not None:
                    shapes.append({"label": index, "score": round_score(score), **geometry})
        else:
            rows: dict[int, list[tuple[int, float, Any]]] = {}
            for track, index, score, mask in self._masks(item, seg, size):
                if track < 1:
                    raise ValueError(f"item {item.id!r}: track ids are >= 1, got {track}")
                rows.setdefault(track, []).append((index, score, mask))
            for track in sorted(rows):
                ranked = sorted(rows[track], key=lambda r: (-r[1], r[0]))
                geometry = self._geometry(ranked[0][2])
                if geometry is not None:
                    labels = [[index, round_score(score)] for index, score, _ in ranked]
                    shapes.append({"track": track, "labels": labels, **geometry})
        if self.options["cvat_images"] != "none":
            self._write_image(item, image, size)
        return {"name": self.image_name(item), "shapes": shapes}

    def _write_image(self, item: ItemInfo, image: np.ndarray | None, size: tuple[int, int]) -> None:
        path = self._image_path(item)
        source = Path(item.source) if item.source else None
        if source is not None and source.name == path.name and source.is_file():
            if self.options["cvat_images"] == "link":
                atomic_symlink(path, source.resolve())
            else:
                with open(source, "rb") as f:
                    atomic_write_chunks(path, iter(lambda: f.read(1 << 20), b""))
            return
        if image is None:
            raise ValueError(f"item {item.id!r}: cvat_images={self.options['cvat_images']!r} needs the decoded image")
        rgb = np.asarray(image)
        if rgb.shape[:2] != size:
            raise ValueError(f"item {item.id!r}: the image is {rgb.shape[:2]}, the segmentation {size}")
        atomic_save_png(path, np.ascontiguousarray(rgb, dtype=np.uint8))

    # --- the run ---------------------------------------------------------------------------------------------------
    def finalize(self, records) -> list[Path]:
        """Two streamed passes over ``records`` (count, then images): one item's record in memory at a time. Then
        the sequences' files (see the module docstring)."""
        assert self.out_dir is not None
        count, last, sequences = 0, -1, False
        for rank, item, record in ranked_records(records):
            if item.sequence is not None:
                sequences = True
            elif record is not None:
                count, last = count + 1, rank - 1
        written = []
        if count or not sequences:
            written.append(atomic_write_chunks(self._root() / self.file_name, self._xml(records, count, last)))
        if sequences:
            written += self._write_sequences(records)
        return written

    # --- tracked sequences ----------------------------------------------------------------------------------------
    def _write_sequences(self, records) -> list[Path]:
        """``out/cvat/<sequence>/annotations.xml`` of every sequence in ``records``: a pass to count, a pass to
        spill each shape to the sequence's scratch file, then each file written track by track."""
        assert self.out_dir is not None
        sequences: dict[str, _SequenceInfo] = {}
        for _, item, record in ranked_records(records):
            if item.sequence is None:
                continue
            info = sequences.setdefault(item.sequence, _SequenceInfo(len(sequences)))
            if item.frame is None or int(item.frame) < 0:
                raise ValueError(f"item {item.id!r}: a frame of sequence {item.sequence!r} has no frame number")
            info.frames = max(info.frames, int(item.frame) + 1)
            info.height, info.width = max(info.height, int(item.height)), max(info.width, int(item.width))
            for shape in (record or {}).get("shapes", ()):
                best = self._category(shape["labels"][0][0])
                info.votes.setdefault(int(shape["track"]), Counter())[best] += 1
        labels = {name: self._track_labels(name, info) for name, info in sequences.items()}
        scratch = self.out_dir / STATE_DIR / TRACKS_SCRATCH_DIR
        shutil.rmtree(scratch, ignore_errors=True)
        scratch.mkdir(parents=True, exist_ok=True)
        try:
            tracks = self._spill(records, sequences, labels, scratch)
            written = []
            for name in sorted(sequences):
                info = sequences[name]
                path = self.sequence_dir(name) / self.file_name
                part = scratch / f"{info.number}.part"
                part.touch()
                with open(part, "rb") as f:
                    chunks = self._sequence_xml(name, info, labels[name], tracks.get(name, {}), f)
                    written.append(atomic_write_chunks(path, chunks))
            return written
        finally:
            shutil.rmtree(scratch, ignore_errors=True)

    def _track_labels(self, sequence: str, info: _SequenceInfo) -> dict[int, int]:
        """Each track's class: the decided one (:attr:`track_classes`), else its most common per-frame class."""
        decided = {int(k): int(v) for k, v in self.track_classes.get(sequence, {}).items()}
        out = {}
        for track, votes in info.votes.items():
            if track in decided:
                out[track] = self._category(decided[track])
            else:
                out[track] = min(votes.items(), key=lambda kv: (-kv[1], kv[0]))[0]
        return out

    def _spill(
        self, records, sequences: dict[str, _SequenceInfo], labels: dict[str, dict[int, int]], scratch: Path
    ) -> dict[str, dict[tuple[int, int], _TrackShapes]]:
        """Append every track shape to its sequence's scratch file (``<number>.part``, an ``outside`` keyframe first
        after a gap in the track); returns where each CVAT track's shapes are, per sequence, by (track id, part)."""
        scores = bool(self.options["cvat_scores"])
        tracks: dict[str, dict[tuple[int, int], _TrackShapes]] = {}
        pending: dict[int, list[bytes]] = {}  # scratch file number -> chunks not yet written
        sizes: dict[int, int] = {}  # scratch file number -> bytes written or pending
        buffered = 0

        def flush() -> None:
            for number, chunks in pending.items():
                with open(scratch / f"{number}.part", "ab") as f:
                    f.write(b"".join(chunks))
            pending.clear()

        for _, item, record in ranked_records(records):
            if item.sequence is None or record is None:
                continue
            info, frame = sequences[item.sequence], int(item.frame)
            sequence_tracks = tracks.setdefault(item.sequence, {})
            for shape in record["shapes"]:
                track = int(shape["track"])
                label = labels[item.sequence][track]
                frame_scores = {int(index): float(score) for index, score in shape["labels"]}
                score = frame_scores.get(label, float(shape["labels"][0][1]))
                body = f'      <attribute name="score">{_score_text(score)}</attribute>\n' if scores else ""
                if "rle" in shape:
                    left, top, width, height = (int(v) for v in shape["box"])
                    geometries = [
                        ("mask", f'rle="{_attr(shape["rle"])}" left="{left}" top="{top}" width="{width}"'
                                 f' height="{height}"')
                    ]
                else:
                    geometries = [("polygon", f'points="{_attr(points)}"') for points in shape["polygons"]]
                for part, (tag, geometry) in enumerate(geometries):
                    shapes = sequence_tracks.setdefault((track, part), _TrackShapes())
                    if frame <= shapes.last:
                        raise ValueError(
                            f"item {item.id!r}: track {track} of sequence {item.sequence!r} has frame {frame} after "
                            f"frame {shapes.last} (frames must come in order, once each)"
                        )
                    text = ""
                    if 0 <= shapes.last < frame - 1:  # the object left: end the track's run of frames
                        text = _track_shape(tag, shapes.last + 1, True, *shapes.last_shape)
                    data = (text + _track_shape(tag, frame, False, geometry, body)).encode("utf-8")
                    offset = sizes.get(info.number, 0)
                    shapes.offsets.append(offset)
                    shapes.lengths.append(len(data))
                    sizes[info.number] = offset + len(data)
                    pending.setdefault(info.number, []).append(data)
                    buffered += len(data)
                    shapes.last, shapes.last_shape = frame, (geometry, body)
                    if buffered >= _SCRATCH_FLUSH:
                        flush()
                        buffered = 0
        flush()
        return tracks

    def _sequence_xml(
        self,
        sequence: str,
        info: _SequenceInfo,
        labels: dict[int, int],
        tracks: dict[tuple[int, int], _TrackShapes],
        scratch,  # noqa: ANN001 - the sequence's scratch file, open for reading
    ) -> Iterator[str | bytes]:
        """The "CVAT for video 1.1" XML of one sequence, each track's shapes read back from ``scratch``."""
        names = self.vocab.names
        yield '<?xml version="1.0" encoding="utf-8"?>\n<annotations>\n  <version>1.1</version>\n  <meta>\n'
        yield "    <task>\n"
        yield f"      <name>{_text(sequence)}</name>\n"
        yield f"      <size>{info.frames}</size>\n"
        yield "      <mode>interpolation</mode>\n"
        yield "      <overlap>0</overlap>\n"
        yield "      <bugtracker></bugtracker>\n"
        yield "      <start_frame>0</start_frame>\n"
        yield f"      <stop_frame>{max(info.frames - 1, 0)}</stop_frame>\n"
        yield "      <frame_filter></frame_filter>\n"
        yield "      <labels>\n"
        yield from self._label_lines(mutable=True)
        yield "      </labels>\n"
        yield "      <original_size>\n"
        yield f"        <width>{info.width}</width>\n"
        yield f"        <height>{info.height}</height>\n"
        yield "      </original_size>\n"
        yield "    </task>\n  </meta>\n"
        for number, key in enumerate(sorted(tracks)):
            track, shapes = key[0], tracks[key]
            label = _attr(names[labels[track]])
            yield f'  <track id="{number}" label="{label}" source="auto" group_id="{track}">\n'
            for offset, length in zip(shapes.offsets, shapes.lengths):
                scratch.seek(offset)
                yield scratch.read(length)
            if shapes.last < info.frames - 1:  # the object is gone after its last frame
                tag = "mask" if shapes.last_shape[0].startswith("rle=") else "polygon"
                yield _track_shape(tag, shapes.last + 1, True, *shapes.last_shape)
            yield "  </track>\n"
        yield "</annotations>\n"

    def _label_lines(self, *, mutable: bool = False) -> Iterator[str]:
        colors = self.vocab.colors()
        for i, name in enumerate(self.vocab.names):
            r, g, b = (int(c) for c in colors[i])
            yield "      <label>\n"
            yield f"        <name>{_text(name)}</name>\n"
            yield f"        <color>#{r:02x}{g:02x}{b:02x}</color>\n"
            yield "        <type>any</type>\n"
            if self.options["cvat_scores"]:
                yield "        <attributes>\n"
                yield "          <attribute>\n"
                yield "            <name>score</name>\n"
                yield f"            <mutable>{mutable}</mutable>\n"
                yield "            <input_type>text</input_type>\n"
                yield "            <default_value></default_value>\n"
                yield "            <values></values>\n"
                yield "          </attribute>\n"
                yield "        </attributes>\n"
            else:
                yield "        <attributes>\n        </attributes>\n"
            yield "      </label>\n"

    def _xml(self, records, count: int, last: int) -> Iterator[str]:
        names = self.vocab.names
        scores = bool(self.options["cvat_scores"])
        yield '<?xml version="1.0" encoding="utf-8"?>\n<annotations>\n  <version>1.1</version>\n  <meta>\n'
        yield "    <task>\n"
        yield "      <name>masqclip</name>\n"
        yield f"      <size>{count}</size>\n"
        yield "      <mode>annotation</mode>\n"
        yield "      <overlap>0</overlap>\n"
        yield "      <bugtracker></bugtracker>\n"
        yield "      <start_frame>0</start_frame>\n"
        yield f"      <stop_frame>{max(last, 0)}</stop_frame>\n"
        yield "      <frame_filter></frame_filter>\n"
        yield "      <labels>\n"
        yield from self._label_lines()
        yield "      </labels>\n    </task>\n  </meta>\n"
        for rank, item, record in ranked_records(records):
            if record is None or item.sequence is not None:
                continue
            yield (
                f'  <image id="{rank - 1}" name="{_attr(record["name"])}" width="{int(item.width)}"'
                f' height="{int(item.height)}">\n'
            )
            group = 0
            for shape in record["shapes"]:
                label = _attr(names[self._category(shape["label"])])
                common = f'label="{label}" source="auto" occluded="0"'
                body = f'      <attribute name="score">{_score_text(shape["score"])}</attribute>\n' if scores else ""
                if "rle" in shape:
                    left, top, width, height = (int(v) for v in shape["box"])
                    yield (
                        f'    <mask {common} rle="{_attr(shape["rle"])}" left="{left}" top="{top}" width="{width}"'
                        f' height="{height}" z_order="0">\n{body}    </mask>\n'
                    )
                    continue
                parts = [str(p) for p in shape["polygons"]]
                grouped = ""
                if len(parts) > 1:
                    group += 1
                    grouped = f' group_id="{group}"'
                for points in parts:
                    yield f'    <polygon {common} points="{_attr(points)}" z_order="0"{grouped}>\n'
                    yield f"{body}    </polygon>\n"
            yield "  </image>\n"
        yield "</annotations>\n"
