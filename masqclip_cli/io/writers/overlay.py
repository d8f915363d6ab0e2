"""``overlay``: the image with translucent masks, outlines and class names, ``out/overlay/<id>.jpg`` (or ``.png``);
for a tracked video source, one video per sequence, ``out/overlay/<sequence>.mp4``.

**Images** (items with no ``ItemInfo.sequence``): one file per item, segments in their class colour (see
:class:`OverlayWriter`).

**Tracked sequences** (``ItemInfo.sequence`` set: the frames of a video, or of a ``--sequence`` run):

- every thing (instance, or panoptic thing segment) is coloured by its **track id** (:func:`track_color`: a fixed
  palette, hues stepped by the golden ratio so neighbouring ids are far apart, the same id the same colour in every
  frame and every run) and labelled ``#<track id> <class> <score>`` -- the class is the **frame's own** class of the
  track (the decided class of the whole track, :attr:`Writer.track_classes`, is only known at finalize, after the
  frames are drawn). Stuff keeps its class colour and name; a semantic-only result is drawn as for an image.
- ``write_item`` draws the frame and writes it to disk at once (one frame in memory): with ``overlay_frames=True``
  as ``out/overlay/<sequence>/<frame>.jpg`` (``<frame>``: the 0-based position in the sequence, 6 digits; ``.png``
  with ``overlay_format="png"``), else in the run's state folder, ``out/.masqclip/overlay-frames/<sequence>.frames/
  <frame>.jpg``. The frame images are **kept** (they are what a resumed run, a re-run or ``masqclip merge`` of
  shards rebuilds the video from; they take what the per-frame overlays of a video took before tracking existed),
  so deleting ``out/.masqclip/overlay-frames`` frees the space at the price of drawing the frames again on a re-run.
- ``finalize`` encodes each sequence, reading one frame image at a time, into ``out/overlay/<sequence>.mp4``
  (``<sequence>`` with the suffix appended, ``clip.mp4`` -> ``clip.mp4.mp4``): H.264 (``libx264``, ``crf`` 20,
  preset ``medium``) in yuv420p when the installed PyAV (``av``) has it, else MPEG-4 Part 2 (``mpeg4``), and
  without PyAV OpenCV's ``mp4v`` writer; a fixed encoder thread count, so the bytes do not depend on the machine's
  cores. The video holds one frame per position from the sequence's first to its last drawn frame, at a constant
  rate: a frame with no image (the item failed) shows the previous one again. Its size is the sequence's largest
  frame, rounded up to even width and height (yuv420p needs them): frames are padded with black on the right and
  bottom. Its rate is the source video's (``cv2.CAP_PROP_FPS``, read when the frame is drawn and kept in the item's
  record) divided by the frame step of ``--every`` (from the frame numbers in the item ids), or 25 when unknown
  (image sequences). The video is encoded to ``out/.masqclip/overlay-encode/`` and then written atomically; an
  identical existing video is left untouched, and a stamp of the frame images it was made from
  (``overlay-encode/<sequence>.json``) lets a re-run skip encoding when nothing changed.

Every file is written atomically (:mod:`masqclip_cli.io.files`); the drawing and the encoding are deterministic.
"""

from __future__ import annotations

import colorsys
import hashlib
import json
import math
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from fractions import Fraction
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from masqclip_cli.io.files import (
    STATE_DIR,
    atomic_save_png,
    atomic_write_bytes,
    atomic_write_chunks,
    atomic_write_text,
    encode_png,
    output_path,
)
from masqclip_cli.structures import Segmentation
from masqclip_cli.structures.masks import segment_stats

from .base import ItemInfo, Writer, check_size, ranked_records

__all__ = ["DEFAULT_FPS", "OverlayWriter", "Region", "encode_video", "render_overlay", "track_color", "video_codec"]

_FONT = cv2.FONT_HERSHEY_SIMPLEX

#: The frame rate of a sequence video when the source's is unknown (an image sequence).
DEFAULT_FPS = 25.0
#: Under ``--out``: the run's state folder (as the engine names it), and in it the frames and the encoder's work.
FRAMES_DIR = "overlay-frames"
ENCODE_DIR = "overlay-encode"
#: Encoder threads: fixed, so the video's bytes do not depend on the machine (x264 / mpeg4 output depends on it).
ENCODER_THREADS = 4
#: A stamp's format version (a change re-encodes every video once).
_STAMP_VERSION = 1
_GOLDEN = 0.6180339887498949


@dataclass
class Region:
    """One thing to draw: a bool mask cropped to its box, the box's top-left corner, an RGB colour, a label."""

    mask: np.ndarray
    x0: int
    y0: int
    color: tuple[int, int, int]
    text: str

    @classmethod
    def from_mask(cls, mask: np.ndarray, color: tuple[int, int, int], text: str) -> Region | None:
        """A region from a full-size mask (None when it is empty)."""
        mask = np.asarray(mask, dtype=bool)
        rows = np.flatnonzero(mask.any(axis=1))
        if rows.size == 0:
            return None
        cols = np.flatnonzero(mask.any(axis=0))
        y0, y1, x0, x1 = int(rows[0]), int(rows[-1]) + 1, int(cols[0]), int(cols[-1]) + 1
        return cls(mask[y0:y1, x0:x1], x0, y0, tuple(int(c) for c in color), text)


def _as_rgb(image: np.ndarray, size: tuple[int, int], item_id: str) -> np.ndarray:
    image = np.asarray(image)
    if image.dtype != np.uint8:
        raise ValueError(f"item {item_id!r}: the overlay image must be uint8, got {image.dtype}")
    if image.ndim == 2:
        image = np.repeat(image[:, :, None], 3, axis=2)
    elif image.ndim == 3 and image.shape[2] == 4:
        image = image[:, :, :3]
    if image.ndim != 3 or image.shape[2] != 3:
        raise ValueError(f"item {item_id!r}: the overlay image must be (H, W, 3) RGB, got shape {image.shape}")
    if image.shape[:2] != size:
        raise ValueError(f"item {item_id!r}: image is {image.shape[:2]}, the segmentation {size} (H, W)")
    return image


def _text_color(color: tuple[int, int, int]) -> tuple[int, int, int]:
    r, g, b = color
    return (0, 0, 0) if 0.299 * r + 0.587 * g + 0.114 * b > 140 else (255, 255, 255)


def track_color(track_id: int) -> tuple[int, int, int]:
    """The RGB colour of a track id, the same in every frame and run: hue ``(id * 0.618...) mod 1`` (the golden ratio
    step puts consecutive ids about 137.5 degrees apart on the colour wheel), saturation and value cycling over
    (0.90, 0.95), (0.70, 0.80), (0.95, 0.70) with ``id mod 3``, so ids whose hues come close still differ."""
    k = int(track_id)
    hue = (k * _GOLDEN) % 1.0
    saturation, value = ((0.90, 0.95), (0.70, 0.80), (0.95, 0.70))[k % 3]
    r, g, b = colorsys.hsv_to_rgb(hue, saturation, value)
    return int(round(r * 255)), int(round(g * 255)), int(round(b * 255))


def render_overlay(image: np.ndarray, regions: list[Region], alpha: float = 0.5) -> np.ndarray:
    """Draw ``regions`` on an RGB uint8 image, in order: each mask blended with its colour at ``alpha``, then every
    outline, then every label (at the mask's most interior pixel, on a box of the region's colour). Returns a new RGB
    uint8 array; the drawing is deterministic."""
    h, w = image.shape[:2]
    canvas = image.astype(np.float32)
    for r in regions:
        view = canvas[r.y0 : r.y0 + r.mask.shape[0], r.x0 : r.x0 + r.mask.shape[1]]
        view[r.mask] = view[r.mask] * (1.0 - alpha) + np.asarray(r.color, dtype=np.float32) * alpha
    out = np.ascontiguousarray(np.clip(np.rint(canvas), 0, 255).astype(np.uint8))

    scale = max(0.35, min(h, w) / 900.0)
    line = max(1, int(round(min(h, w) / 400.0)))
    thickness = max(1, int(round(scale * 1.5)))
    for r in regions:
        contours, _ = cv2.findContours(
            r.mask.astype(np.uint8), cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE, offset=(r.x0, r.y0)
        )
        cv2.drawContours(out, contours, -1, r.color, line, lineType=cv2.LINE_8)
    for r in regions:
        if not r.text:
            continue
        padded = np.pad(r.mask, 1).astype(np.uint8)
        dist = cv2.distanceTransform(padded, cv2.DIST_L2, 3)
        cy, cx = np.unravel_index(int(np.argmax(dist)), dist.shape)
        cx, cy = int(cx) - 1 + r.x0, int(cy) - 1 + r.y0
        (tw, th), base = cv2.getTextSize(r.text, _FONT, scale, thickness)
        x = min(max(cx - tw // 2, 0), max(w - tw - 2, 0))
        y = min(max(cy + th // 2, th + 2), max(h - base - 2, th + 2))
        cv2.rectangle(out, (x - 2, y - th - 2), (x + tw + 2, y + base), r.color, thickness=-1)
        cv2.putText(out, r.text, (x, y), _FONT, scale, _text_color(r.color), thickness, cv2.LINE_AA)
    return out


# --- video encoding ------------------------------------------------------------------------------------------------


def _pyav() -> Any:
    """The ``av`` module (PyAV), or None when it is not installed."""
    try:
        import av
    except ImportError:  # pragma: no cover - PyAV is installed in the test environment
        return None
    return av


def video_codec() -> str:
    """The encoder :func:`encode_video` uses: ``"libx264"`` when PyAV has it, else ``"mpeg4"`` (PyAV), else
    ``"mp4v"`` (OpenCV's writer, without PyAV)."""
    av = _pyav()
    if av is None:
        return "mp4v"
    return "libx264" if "libx264" in av.codecs_available else "mpeg4"


def encode_video(
    path: str | Path, frames: Iterable[np.ndarray], size: tuple[int, int], fps: Fraction, codec: str | None = None
) -> str:
    """Encode RGB uint8 ``frames`` (each (H, W, 3), ``size`` = (H, W), both even) into an MP4 file at ``path``, one
    frame in memory at a time, at the constant rate ``fps``: ``libx264`` (crf 20, preset medium) or ``mpeg4`` in
    yuv420p through PyAV, or ``mp4v`` through OpenCV (``codec``, default :func:`video_codec`). Returns the codec.
    ``path`` is written in place: encode to a temporary path and move it (see :meth:`OverlayWriter.finalize`)."""
    h, w = size
    if h % 2 or w % 2 or h <= 0 or w <= 0:
        raise ValueError(f"video frames must have an even, positive size, got {size} (H, W)")
    codec = codec or video_codec()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)

    def checked(frames: Iterable[np.ndarray]) -> Iterator[np.ndarray]:
        for index, frame in enumerate(frames):
            frame = np.asarray(frame)
            if frame.shape != (h, w, 3) or frame.dtype != np.uint8:
                raise ValueError(f"{path}: frame {index} is {frame.dtype} {frame.shape}, not uint8 {(h, w, 3)}")
            yield np.ascontiguousarray(frame)

    frames = checked(frames)
    if codec == "mp4v":
        writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"mp4v"), float(fps), (w, h))
        if not writer.isOpened():  # pragma: no cover - OpenCV built without a video backend
            raise RuntimeError(f"{path}: OpenCV cannot write an mp4v video")
        try:
            for frame in frames:
                writer.write(np.ascontiguousarray(frame[:, :, ::-1]))
        finally:
            writer.release()
        return codec
    av = _pyav()
    if av is None:
        raise RuntimeError(f"{path}: the {codec} encoder needs PyAV (pip install av)")
    with av.open(str(path), mode="w", format="mp4") as container:
        stream = container.add_stream(codec, rate=fps)
        stream.width, stream.height, stream.pix_fmt = w, h, "yuv420p"
        stream.codec_context.thread_count = ENCODER_THREADS
        if codec == "libx264":
            stream.options = {"crf": "20", "preset": "medium"}
        else:  # mpeg4's default 200 kb/s is far too low: about 0.2 bit per pixel
            stream.codec_context.bit_rate = max(1_000_000, int(w * h * float(fps) * 0.2))
        for index, frame in enumerate(frames):
            video_frame = av.VideoFrame.from_ndarray(frame, format="rgb24")
            video_frame.pts = index
            for packet in stream.encode(video_frame):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return codec


def _even(n: int) -> int:
    return n + (n % 2)


def _frame_rate(fps: float) -> Fraction:
    """``fps`` as the fraction an MP4 time base can hold (30000/1001 for 29.97...)."""
    return Fraction(fps).limit_denominator(1001)


@dataclass
class _Sequence:
    """What finalize knows of one sequence, from its records: the drawn frames' (frame -> (H, W)), the source rate
    and the source frame numbers (from the item ids) of the first and last drawn frames."""

    frames: dict[int, tuple[int, int]] = field(default_factory=dict)
    fps: float | None = None
    numbers: dict[int, int] = field(default_factory=dict)

    def rate(self) -> Fraction:
        """The video's rate: the source's divided by the frame step (``--every``), or :data:`DEFAULT_FPS`."""
        if self.fps is None:
            return _frame_rate(DEFAULT_FPS)
        fps = float(self.fps)
        if len(self.numbers) >= 2:
            first, last = min(self.numbers), max(self.numbers)
            step = (self.numbers[last] - self.numbers[first]) / (last - first)
            if step > 0:
                fps /= step
        return _frame_rate(fps)


# --- the writer ----------------------------------------------------------------------------------------------------


class OverlayWriter(Writer):
    """Per item ``out/overlay/<item id>.jpg`` (option ``overlay_format="png"`` for ``.png``): the image with every
    segment blended in its class colour (``overlay_alpha``, default 0.5), outlined, and labelled with its class name
    (plus the score for instances and panoptic things). Uses the panoptic result when it has segments, else the
    instances when there are any (drawn lowest score first, so the best is on top), else the semantic map.
    Colours are the vocabulary's (:meth:`Vocabulary.colors`), the same for a class in every image. JPEG quality:
    ``jpeg_quality`` (default 90).

    Frames of a tracked sequence are drawn with track colours and ids, and ``finalize`` encodes one video per
    sequence, ``out/overlay/<sequence>.mp4``; ``overlay_frames=True`` also keeps each frame as
    ``out/overlay/<sequence>/<frame>.jpg`` (see the module docstring). The record of a frame is ``{"fps": source
    rate or None}``; an image has none.
    """

    name = "overlay"
    any_of_tasks = ("panoptic", "instance", "semantic")
    needs_image = True
    needs_source = True  # a frame's source video gives the sequence video its frame rate
    option_defaults = {"overlay_format": "jpg", "overlay_alpha": 0.5, "jpeg_quality": 90, "overlay_frames": False}
    kind = "overlay"

    def __init__(self, out_dir, vocab, **options: Any) -> None:
        super().__init__(out_dir, vocab, **options)
        fmt = str(self.options["overlay_format"]).lower().lstrip(".")
        fmt = "jpg" if fmt == "jpeg" else fmt
        if fmt not in ("jpg", "png"):
            raise ValueError(f"overlay_format must be 'jpg' or 'png', got {self.options['overlay_format']!r}")
        self.format = fmt
        self.alpha = float(self.options["overlay_alpha"])
        if not 0.0 <= self.alpha <= 1.0:
            raise ValueError(f"overlay_alpha must be in [0, 1], got {self.alpha}")
        self.quality = int(self.options["jpeg_quality"])
        if not 1 <= self.quality <= 100:
            raise ValueError(f"jpeg_quality must be in 1..100, got {self.quality}")
        keep = self.options["overlay_frames"]
        if not isinstance(keep, bool):
            raise ValueError(f"overlay_frames must be true or false, got {keep!r}")
        self.keep_frames = keep
        self.colors = [tuple(int(c) for c in color) for color in vocab.colors()]
        self._fps_cache: dict[str, float | None] = {}  # source video -> its rate (a file's property, not run state)

    # --- paths -----------------------------------------------------------------------------------------------------
    def _path(self, item: ItemInfo) -> Path:
        assert self.out_dir is not None
        return output_path(self.out_dir, self.kind, item.id, "." + self.format)

    def frame_path(self, item: ItemInfo) -> Path:
        """Where a sequence frame's image goes: ``out/overlay/<sequence>/<frame>.<fmt>`` (``overlay_frames``), else
        ``out/.masqclip/overlay-frames/<sequence>.frames/<frame>.<fmt>``."""
        if item.sequence is None or item.frame is None or int(item.frame) < 0:
            raise ValueError(f"item {item.id!r}: a frame of a sequence needs its sequence and frame number (>= 0)")
        return self._frame_file(item.sequence, int(item.frame))

    def _frame_file(self, sequence: str, frame: int) -> Path:
        assert self.out_dir is not None
        name = f"{frame:06d}.{self.format}"
        if self.keep_frames:
            return output_path(self.out_dir, self.kind, sequence, "") / name
        return output_path(self.out_dir / STATE_DIR, FRAMES_DIR, sequence, ".frames") / name

    def video_path(self, sequence: str) -> Path:
        """``out/overlay/<sequence>.mp4``."""
        assert self.out_dir is not None
        return output_path(self.out_dir, self.kind, sequence, ".mp4")

    def _encode_paths(self, sequence: str) -> tuple[Path, Path]:
        assert self.out_dir is not None
        return (
            output_path(self.out_dir / STATE_DIR, ENCODE_DIR, sequence, ".mp4"),
            output_path(self.out_dir / STATE_DIR, ENCODE_DIR, sequence, ".json"),
        )

    def item_files(self, item: ItemInfo) -> list[Path]:
        return [self._path(item) if item.sequence is None else self.frame_path(item)]

    # --- drawing ---------------------------------------------------------------------------------------------------
    def regions(self, seg: Segmentation, *, tracked: bool = False) -> list[Region]:
        """What to draw for a segmentation, in drawing order (empty segments left out). ``tracked``: the ids are
        track ids; things are coloured by :func:`track_color` and labelled ``#<id> <class> <score>``."""
        names, isthing = self.vocab.names, self.vocab.isthing
        size = tuple(int(v) for v in seg.image_size)
        out: list[Region | None] = []

        def sized(array: np.ndarray, what: str) -> np.ndarray:
            array = np.asarray(array)
            if array.shape != size:
                raise ValueError(f"{what} is {array.shape}, the image {size}")
            return array

        def thing(segment_id: int, index: int, score: float) -> tuple[tuple[int, int, int], str]:
            if tracked:
                return track_color(segment_id), f"#{segment_id} {names[index]} {score:.2f}"
            return self.colors[index], f"{names[index]} {score:.2f}"

        # draw the first result that has something to show: panoptic segments, instances, the semantic map
        if seg.panoptic is not None and (seg.segments or (seg.instances is None and seg.semantic is None)):
            pan = sized(seg.panoptic, "panoptic map")
            segments = sorted(seg.segments, key=lambda s: int(s.id))
            indices = [self._category(s.category) for s in segments]
            _, areas, bboxes = segment_stats(pan, [int(s.id) for s in segments])
            # Stuff first, things on top.
            order = sorted(range(len(segments)), key=lambda k: (isthing[indices[k]], int(segments[k].id)))
            for k in order:
                s, index, (x, y, w, h) = segments[k], indices[k], bboxes[k]
                if not areas[k]:
                    continue
                if isthing[index]:
                    color, text = thing(int(s.id), index, float(s.score))
                else:
                    color, text = self.colors[index], names[index]
                out.append(Region(pan[y : y + h, x : x + w] == int(s.id), x, y, color, text))
        elif seg.instances is not None and (seg.instances or seg.semantic is None):
            for inst in sorted(seg.instances, key=lambda s: float(s.score)):
                index = self._category(inst.category)
                if inst.mask is None:
                    raise ValueError(f"instance {inst.id} has no mask")
                color, text = thing(int(inst.id), index, float(inst.score))
                out.append(Region.from_mask(sized(inst.mask, f"instance {inst.id} mask"), color, text))
        elif seg.semantic is not None:
            sem = sized(seg.semantic, "semantic map")
            for index in np.unique(sem).tolist():
                if 0 <= index < len(self.vocab):
                    out.append(Region.from_mask(sem == index, self.colors[index], names[index]))
        else:
            raise ValueError("the overlay writer needs panoptic, instance or semantic results")
        return [r for r in out if r is not None]

    def _encode_image(self, item: ItemInfo, drawn: np.ndarray) -> bytes:
        if self.format == "png":
            return encode_png(drawn)
        ok, buffer = cv2.imencode(
            ".jpg", np.ascontiguousarray(drawn[:, :, ::-1]), [cv2.IMWRITE_JPEG_QUALITY, self.quality]
        )
        if not ok:  # pragma: no cover
            raise RuntimeError(f"item {item.id!r}: JPEG encoding failed")
        return buffer.tobytes()

    def write_item(self, item: ItemInfo, seg: Segmentation, image: np.ndarray | None = None) -> dict | None:
        size = check_size(item, seg)
        if image is None:
            raise ValueError(f"item {item.id!r}: the overlay writer needs the image")
        rgb = _as_rgb(image, size, item.id)
        tracked = item.sequence is not None
        drawn = render_overlay(rgb, self.regions(seg, tracked=tracked), self.alpha)
        path = self.frame_path(item) if tracked else self._path(item)
        if self.format == "png":
            atomic_save_png(path, drawn)
        else:
            atomic_write_bytes(path, self._encode_image(item, drawn))
        return {"fps": self._source_fps(item)} if tracked else None

    def _source_fps(self, item: ItemInfo) -> float | None:
        """The frame rate of a video frame's source (``cv2.CAP_PROP_FPS``, 6 decimals), or None (an image, or no
        source path)."""
        if not item.source or not item.id.startswith(f"{item.sequence}#"):
            return None
        if item.source not in self._fps_cache:
            fps = None
            capture = cv2.VideoCapture(item.source)
            try:
                if capture.isOpened():
                    value = float(capture.get(cv2.CAP_PROP_FPS))
                    fps = round(value, 6) if math.isfinite(value) and value > 0 else None
            finally:
                capture.release()
            self._fps_cache[item.source] = fps
        return self._fps_cache[item.source]

    # --- the run ---------------------------------------------------------------------------------------------------
    def finalize(self, records) -> list[Path]:
        """Encode one video per sequence from its frame images (one pass over ``records``, then one frame image in
        memory at a time); images need nothing. Returns the videos."""
        if self.out_dir is None:
            return []
        sequences: dict[str, _Sequence] = {}
        for _, item, record in ranked_records(records):
            if item.sequence is None or record is None:
                continue
            if item.frame is None or int(item.frame) < 0:
                raise ValueError(f"item {item.id!r}: a frame of sequence {item.sequence!r} has no frame number")
            seq = sequences.setdefault(item.sequence, _Sequence())
            frame = int(item.frame)
            if frame in seq.frames:
                raise ValueError(f"item {item.id!r}: frame {frame} of sequence {item.sequence!r} appears twice")
            seq.frames[frame] = (int(item.height), int(item.width))
            if seq.fps is None and record.get("fps") is not None:
                seq.fps = float(record["fps"])
            number = item.id.rsplit("#", 1)[-1] if item.id.startswith(f"{item.sequence}#") else ""
            if number.isdigit():
                seq.numbers[frame] = int(number)
        return [self._finalize_sequence(name, sequences[name]) for name in sorted(sequences)]

    def _finalize_sequence(self, sequence: str, seq: _Sequence) -> Path:
        first, last = min(seq.frames), max(seq.frames)
        height = _even(max(h for h, _ in seq.frames.values()))
        width = _even(max(w for _, w in seq.frames.values()))
        rate = seq.rate()
        paths = {f: self._frame_file(sequence, f) for f in sorted(seq.frames)}
        missing = [p for p in paths.values() if not p.is_file()]
        if missing:
            raise ValueError(
                f"overlay: sequence {sequence!r}: the frame image {missing[0]} is missing ({len(missing)} of "
                f"{len(paths)}); run again to draw the frames"
            )
        codec = video_codec()
        video = self.video_path(sequence)
        work, stamp_path = self._encode_paths(sequence)
        stamp = self._stamp(paths, rate, (height, width), codec)
        if video.is_file() and stamp_path.is_file():
            try:
                old = json.loads(stamp_path.read_text())
            except (OSError, ValueError):
                old = None
            if old == {**stamp, "video_bytes": video.stat().st_size}:
                return video  # encoded from exactly these frame images already
        encode_video(work, self._frames(paths, first, last, (height, width)), (height, width), rate, codec)
        try:
            with open(work, "rb") as f:
                atomic_write_chunks(video, iter(lambda: f.read(1 << 20), b""))
        finally:
            work.unlink(missing_ok=True)
        atomic_write_text(stamp_path, json.dumps({**stamp, "video_bytes": video.stat().st_size}) + "\n")
        return video

    def _stamp(self, paths: dict[int, Path], rate: Fraction, size: tuple[int, int], codec: str) -> dict[str, Any]:
        """What a video is made from: its frame images (number, size, modification time), rate, size and codec."""
        digest = hashlib.sha256()
        for frame, path in paths.items():
            st = path.stat()
            digest.update(f"{frame}:{st.st_size}:{st.st_mtime_ns}\n".encode())
        return {
            "version": _STAMP_VERSION,
            "frames": digest.hexdigest(),
            "rate": str(rate),
            "size": list(size),
            "codec": codec,
        }

    def _frames(
        self, paths: dict[int, Path], first: int, last: int, size: tuple[int, int]
    ) -> Iterator[np.ndarray]:
        """The video's frames, first..last: each frame image padded to ``size`` (black right and bottom); a frame
        with no image repeats the previous one."""
        height, width = size
        previous: np.ndarray | None = None
        for frame in range(first, last + 1):
            path = paths.get(frame)
            if path is not None:
                bgr = cv2.imdecode(np.fromfile(path, dtype=np.uint8), cv2.IMREAD_COLOR)
                if bgr is None:
                    raise ValueError(f"{path}: not a readable image (a frame of an overlay video)")
                h, w = bgr.shape[:2]
                if h > height or w > width:  # pragma: no cover - sizes come from the records
                    raise ValueError(f"{path}: the frame is {h}x{w}, larger than the video's {height}x{width}")
                canvas = np.zeros((height, width, 3), np.uint8)
                canvas[:h, :w] = bgr[:, :, ::-1]
                previous = canvas
            assert previous is not None  # the first frame always has an image
            yield previous
