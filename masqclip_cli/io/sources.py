"""Sources: where ``masqclip segment`` reads its images from.

A *spec* (the ``SOURCE`` argument) names the images. It is read as the first of these that applies:

1. ``-``: newline-separated paths on stdin (blank lines and ``#`` lines ignored; relative paths are
   relative to the current directory);
2. an existing **directory**: its images, sorted by id. ``recursive`` descends into subfolders
   (symlinked folders are followed once; loops are cut). Hidden files and folders (``.name``) are
   skipped; the extension match (``extensions``) is case-insensitive;
3. an existing **video** file (by extension, :data:`VIDEO_EXTENSIONS`): its frames, every
   ``every``-th frame from ``start`` seconds (inclusive) to ``end`` seconds (exclusive), counted from
   the first frame in range;
4. an existing ``.txt`` / ``.lst`` file: a **list file** of paths, one a line (blank and ``#`` lines
   ignored); relative entries are relative to the list file's folder;
5. any other existing **file**: that single image (whatever its extension: images are decoded by
   content);
6. a **glob** pattern (contains ``*``, ``?`` or ``[``; ``**`` descends): the matches with an image
   extension, sorted by id. Image sequences are a glob or a folder (``frames/*.png``).

Anything else (a missing path, a pattern nothing matches, an empty folder or list) is a
:class:`SourceError` whose message is one line naming the spec.

Item ids (:attr:`SourceItem.id`) are stable and are what outputs are named after:

* folder and glob items: the path relative to the folder (the glob's fixed leading folder), with
  ``/`` separators (``sub/a.jpg``);
* single files, list entries and stdin entries: the path relative to the current directory when the
  file is under it, otherwise the path as given (list entries: joined to the list file's folder);
* video frames: ``<video id>#<frame index, 6 digits>`` (``clip.mp4#000123``).

Listing never decodes. :func:`iter_items` is a generator of :class:`SourceItem` and of
:class:`SkippedItem` (entries already known to be unusable while listing: a dangling symlink, a
folder named like an image, a missing list entry), so the engine can count and report them.
:func:`decode_item` decodes one item (in a worker) and raises :class:`SkipItem` when it can't.
For videos, :func:`iter_video_frames` decodes frames sequentially (``grab`` every frame, ``retrieve``
only the wanted ones), which is far cheaper than seeking per frame as :func:`decode_item` does.

Decoding rules (:func:`decode_item`), all via PIL:

* the format is found from the content, not the extension (a PNG named ``.jpg`` works);
* EXIF orientation is applied (``ImageOps.exif_transpose``): sizes are after rotation;
* the result is always ``(H, W, 3)`` ``uint8`` RGB:

  - ``L``, ``1``, ``P``, ``CMYK``, ``YCbCr``, ...: PIL's conversion to RGB;
  - ``LA``, ``PA``, ``RGBA``: **the alpha channel is dropped** (not composited onto a background):
    the stored colour of every pixel is kept, so fully transparent pixels show whatever colour they
    store (often black);
  - ``I;16`` (16-bit, any byte order): scaled by 1/257 with rounding (65535 -> 255, 257 -> 1);
  - ``I`` (32-bit integer, e.g. 16-bit PPM/PGM): values within 0..65535 are scaled like 16-bit;
    other ranges are stretched min..max to 0..255;
  - ``F`` (float): values within 0..1 are scaled by 255; values within 0..255 are kept; other
    ranges are stretched min..max to 0..255 (NaN -> 0);

* multi-frame GIF / TIFF: the first frame;
* a truncated file is refused (PIL's ``LOAD_TRUNCATED_IMAGES`` is never set), as are zero-byte
  files, non-images, unreadable files, dangling symlinks and folders;
* images up to :data:`MAX_IMAGE_PIXELS` pixels (40k x 40k) decode; larger ones (decompression
  bombs) are refused, with a reason, before their pixels are decoded. PIL's own limit (and its
  DecompressionBombWarning) is switched off only while :func:`decode_item` runs, then restored;
* a **pixel budget** (``max_pixels``, the CLI's ``--max-pixels``; :data:`DEFAULT_MAX_PIXELS` is the
  value the CLI uses, ``None`` means no budget beyond :data:`MAX_IMAGE_PIXELS`) is checked on the size
  in the image header, before any pixel is decoded: an image over it is skipped with its size in the
  reason (``a.png: 20000x20000 = 400.0 megapixels is over the pixel budget of 64.0 megapixels
  (--max-pixels)``). The size is checked again after decoding, for the few formats whose decoded size
  differs from the header's. For a video the stream's frame size is checked once, when it is listed
  (:func:`iter_items`) or opened (:func:`iter_video_frames`): over the budget, the whole source is a
  :class:`SourceError`, since every frame would be skipped.

Video frames are converted from OpenCV's BGR to RGB.
"""

from __future__ import annotations

import glob
import itertools
import math
import os
import re
import stat
import sys
import threading
import warnings
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path, PurePath
from typing import TextIO

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

__all__ = [
    "DEFAULT_MAX_PIXELS",
    "IMAGE_EXTENSIONS",
    "LIST_EXTENSIONS",
    "MAX_IMAGE_PIXELS",
    "VIDEO_EXTENSIONS",
    "DecodedImage",
    "SkipItem",
    "SkippedItem",
    "SourceError",
    "SourceItem",
    "decode_item",
    "iter_items",
    "iter_video_frames",
    "pil_to_rgb",
    "spec_kind",
]

IMAGE_EXTENSIONS: tuple[str, ...] = (
    ".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp", ".gif", ".ppm", ".pgm", ".jp2",
)  # fmt: skip
VIDEO_EXTENSIONS: tuple[str, ...] = (".mp4", ".avi", ".mov", ".mkv", ".webm", ".m4v", ".mpg", ".mpeg")
#: Files with these extensions are list files (one path a line).
LIST_EXTENSIONS: tuple[str, ...] = (".txt", ".lst")

#: Largest image (width x height) that :func:`decode_item` decodes. A module attribute read at call
#: time, so that tests can lower it.
MAX_IMAGE_PIXELS: int = 40_000 * 40_000

#: The pixel budget (width x height) of ``masqclip segment`` (``--max-pixels``): 64 megapixels covers
#: 48/50-megapixel phone photos and 61-megapixel cameras (8K video frames are 33 megapixels). A run's memory
#: grows with the image's pixels (full-resolution masks in post-processing and writing), not with its file
#: size. Peak RSS of a whole ``segment`` run (tiny model, CPU, one image; the process alone is 1.0 GB):
#: 8000x8000 = 64 Mpx: 5.1 GB (4.8 GiB), 5.9 GB (5.5 GiB) with every task and format; 40 Mpx: 3.4 GB, 3.9 GB
#: with every task and format (demo model: 4.2 GB). Without a budget, 100 Mpx took 7.1 GB and a 20000x20000
#: PNG of 1.2 MB was OOM-killed at 24 GB.
DEFAULT_MAX_PIXELS: int = 64_000_000

# Starting a video at frame >= this many seeks (CAP_PROP_POS_FRAMES) instead of grabbing from frame 0.
_SEEK_MIN_FRAMES = 250

_GLOB_MAGIC = re.compile(r"[*?[]")


class SourceError(ValueError):
    """The spec itself is unusable (missing, nothing matches, empty). One line naming the spec."""


class SkipItem(Exception):
    """One item can't be used. ``str()`` is one line, ``"<item id>: <reason>"``.

    Raised as ``SkipItem(item_id, reason)`` (then :attr:`item_id` and :attr:`reason` are set) or as
    ``SkipItem(message)`` with a ready message that names the item (:attr:`item_id` is None).
    Picklable, so it can cross from a worker process.
    """

    def __init__(self, *args: str) -> None:
        if len(args) == 2:
            self.item_id: str | None = args[0]
            self.reason = _one_line(args[1])
            self.message = f"{args[0]}: {self.reason}"
        elif len(args) == 1:
            self.item_id = None
            self.reason = self.message = _one_line(args[0])
        else:
            raise TypeError("SkipItem(message) or SkipItem(item_id, reason)")
        super().__init__(*args)

    def __str__(self) -> str:
        return self.message


@dataclass(frozen=True)
class SourceItem:
    """One image or one video frame, not decoded yet."""

    id: str
    path: Path
    frame: int | None = None


@dataclass(frozen=True)
class SkippedItem:
    """An entry found unusable while listing (never decoded)."""

    id: str
    reason: str

    @property
    def message(self) -> str:
        return f"{self.id}: {self.reason}"

    def __str__(self) -> str:
        return self.message


@dataclass
class DecodedImage:
    """A decoded image: ``rgb`` is ``(H, W, 3)`` ``uint8``, EXIF orientation applied."""

    item: SourceItem
    rgb: np.ndarray

    @property
    def height(self) -> int:
        return int(self.rgb.shape[0])

    @property
    def width(self) -> int:
        return int(self.rgb.shape[1])


# --------------------------------------------------------------------------------------------------
# Listing


def spec_kind(spec: str) -> str:
    """Which kind of source ``spec`` is: ``"stdin"``, ``"directory"``, ``"video"``, ``"list"``,
    ``"file"`` or ``"glob"``. Raises :class:`SourceError` for a path that doesn't exist."""
    if spec == "-":
        return "stdin"
    if not spec:
        raise SourceError("empty source: give a file, folder, glob pattern, video, list file or '-'")
    path = Path(os.path.expanduser(spec))
    if path.is_dir():
        return "directory"
    if path.exists():
        if not path.is_file():
            raise SourceError(f"{spec}: not a regular file or directory")
        suffix = path.suffix.lower()
        if suffix in VIDEO_EXTENSIONS:
            return "video"
        if suffix in LIST_EXTENSIONS:
            return "list"
        return "file"
    if _GLOB_MAGIC.search(spec):
        return "glob"
    if path.is_symlink():
        raise SourceError(f"{spec}: dangling symlink")
    raise SourceError(f"{spec}: no such file or directory")


def iter_items(
    spec: str,
    *,
    recursive: bool = False,
    extensions: Sequence[str] = IMAGE_EXTENSIONS,
    every: int = 1,
    start: float | None = None,
    end: float | None = None,
    stdin: TextIO | None = None,
    max_pixels: int | None = None,
) -> Iterator[SourceItem | SkippedItem]:
    """The items of ``spec`` (see the module doc), lazily.

    The spec is checked when this is called, not when iteration starts: a missing path, a pattern
    with no match, an empty folder / list / frame range raise :class:`SourceError` here. ``every``,
    ``start`` and ``end`` apply to videos only; ``recursive`` and ``extensions`` to folders (and
    ``extensions`` to glob matches). Video frames are listed from the container's frame count (no
    decoding); :func:`iter_video_frames` is the sequential decoder for them. ``max_pixels`` applies
    to videos only (images are checked when decoded, :func:`decode_item`): a video whose frames are
    larger is a :class:`SourceError`.
    """
    _check_frame_options(every, start, end)
    _check_max_pixels(max_pixels)
    exts = _normalise_extensions(extensions)
    kind = spec_kind(spec)
    if kind == "stdin":
        gen: Iterable[SourceItem | SkippedItem] = _iter_path_lines(
            stdin if stdin is not None else sys.stdin, base=None, what="no paths on stdin"
        )
    elif kind == "directory":
        gen = _list_directory(spec, recursive=recursive, exts=exts)
    elif kind == "video":
        gen = _list_video(spec, every=every, start=start, end=end, max_pixels=max_pixels)
    elif kind == "list":
        gen = _iter_list_file(spec)
    elif kind == "file":
        gen = [SourceItem(Path(spec).name, Path(os.path.expanduser(spec)))]  # a single source: its file name
    else:
        gen = _list_glob(spec, exts=exts)
    it = iter(gen)
    try:
        first = next(it)  # the generators raise SourceError when they have nothing at all
    except StopIteration:  # pragma: no cover - every generator raises instead
        raise SourceError(f"no images in '{spec}'") from None
    return itertools.chain([first], it)


def _check_frame_options(every: int, start: float | None, end: float | None) -> None:
    if isinstance(every, bool) or not isinstance(every, int) or every < 1:
        raise SourceError(f"every must be a whole number >= 1, got {every!r}")
    for name, value in (("start", start), ("end", end)):
        if value is not None and (not math.isfinite(value) or value < 0):
            raise SourceError(f"{name} must be a number of seconds >= 0, got {value!r}")
    if start is not None and end is not None and end <= start:
        raise SourceError(f"end ({end:g} s) must be after start ({start:g} s)")


def _normalise_extensions(extensions: Sequence[str]) -> frozenset[str]:
    if isinstance(extensions, str):
        extensions = [extensions]
    exts = frozenset(("." + e.lower().lstrip(".")) for e in extensions if e.strip("."))
    if not exts:
        raise SourceError("no image extensions given")
    return exts


def _has_ext(name: str, exts: frozenset[str]) -> bool:
    return os.path.splitext(name)[1].lower() in exts


def _given_id(path: str) -> str:
    """The id of a file named directly: relative to cwd when under it, else the path as given."""
    path = os.path.expanduser(path)
    absolute = os.path.abspath(path)
    try:
        rel = os.path.relpath(absolute, os.getcwd())
    except ValueError:  # pragma: no cover - another drive on Windows
        rel = None
    if rel is not None and rel != ".." and not rel.startswith(".." + os.sep) and not os.path.isabs(rel):
        return PurePath(rel).as_posix()
    return PurePath(os.path.normpath(path)).as_posix()


def _entry_item(item_id: str, path: Path) -> SourceItem | SkippedItem:
    """A named entry (list file / stdin) checked cheaply: it must exist and be a file."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        if os.path.islink(path):
            return SkippedItem(item_id, "dangling symlink")
        return SkippedItem(item_id, "no such file or directory")
    except PermissionError:
        return SkippedItem(item_id, "permission denied")
    except OSError as e:
        return SkippedItem(item_id, _os_reason(e))
    if stat.S_ISDIR(st.st_mode):
        return SkippedItem(item_id, "is a directory")
    if not stat.S_ISREG(st.st_mode):
        return SkippedItem(item_id, "not a regular file")
    if path.suffix.lower() in VIDEO_EXTENSIONS:
        return SkippedItem(item_id, "is a video: give it as the source itself to read its frames")
    return SourceItem(item_id, path)


def _iter_path_lines(lines: Iterable[str], *, base: str | None, what: str) -> Iterator[SourceItem | SkippedItem]:
    count = 0
    for raw in lines:
        entry = raw.strip().lstrip("\ufeff").strip()
        if not entry or entry.startswith("#"):
            continue
        entry = os.path.expanduser(entry)
        if base is not None and not os.path.isabs(entry):
            entry = os.path.join(base, entry)
        count += 1
        yield _entry_item(_given_id(entry), Path(entry))
    if count == 0:
        raise SourceError(what)


def _iter_list_file(spec: str) -> Iterator[SourceItem | SkippedItem]:
    path = os.path.expanduser(spec)
    try:
        f = open(path, encoding="utf-8-sig", errors="surrogateescape")
    except OSError as e:
        raise SourceError(f"{spec}: cannot read list file: {_os_reason(e)}") from None
    with f:
        try:
            yield from _iter_path_lines(f, base=os.path.dirname(path), what=f"no paths in list file '{spec}'")
        except UnicodeError as e:  # pragma: no cover - surrogateescape decodes any bytes
            raise SourceError(f"{spec}: cannot read list file: {e}") from None


def _list_directory(spec: str, *, recursive: bool, exts: frozenset[str]) -> Iterator[SourceItem | SkippedItem]:
    root = Path(os.path.expanduser(spec))
    found: list[SourceItem | SkippedItem] = []
    has_subdirs = False
    try:
        root_stat = os.stat(root)
    except OSError as e:
        raise SourceError(f"{spec}: {_os_reason(e)}") from None
    visited = {(root_stat.st_dev, root_stat.st_ino)}
    stack: list[tuple[str, str]] = [(str(root), "")]
    while stack:
        folder, prefix = stack.pop()
        try:
            with os.scandir(folder) as it:
                entries = list(it)
        except OSError as e:
            if not prefix:
                raise SourceError(f"{spec}: cannot list folder: {_os_reason(e)}") from None
            found.append(SkippedItem(prefix.rstrip("/"), f"cannot list folder: {_os_reason(e)}"))
            continue
        for entry in entries:
            name = entry.name
            if name.startswith("."):
                continue
            rel = prefix + name
            try:
                is_dir = entry.is_dir()
            except OSError:
                is_dir = False
            if is_dir:
                has_subdirs = True
                if recursive:
                    try:
                        st = os.stat(entry.path)
                    except OSError as e:
                        found.append(SkippedItem(rel, f"cannot list folder: {_os_reason(e)}"))
                        continue
                    key = (st.st_dev, st.st_ino)
                    if key not in visited:  # symlinked folders: each real folder once
                        visited.add(key)
                        stack.append((entry.path, rel + "/"))
                elif _has_ext(name, exts):
                    found.append(SkippedItem(rel, "is a directory"))
                continue
            if not _has_ext(name, exts):
                continue
            found.append(_listed_file(rel, entry.path))
    if not found:
        hint = " (use recursive to descend into subfolders)" if has_subdirs and not recursive else ""
        raise SourceError(f"no images in '{spec}'{hint}")
    found.sort(key=lambda x: x.id)
    yield from found


def _listed_file(item_id: str, path: str) -> SourceItem | SkippedItem:
    """A folder / glob entry with an image extension that is not a folder."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return SkippedItem(item_id, "dangling symlink" if os.path.islink(path) else "no such file or directory")
    except OSError as e:
        return SkippedItem(item_id, _os_reason(e))
    if stat.S_ISDIR(st.st_mode):
        return SkippedItem(item_id, "is a directory")
    if not stat.S_ISREG(st.st_mode):
        return SkippedItem(item_id, "not a regular file")
    return SourceItem(item_id, Path(path))


def _glob_root(pattern: str) -> str:
    """The leading folders of ``pattern`` without glob characters ('.' when there are none)."""
    parts = PurePath(pattern).parts
    fixed: list[str] = []
    for part in parts[:-1]:
        if _GLOB_MAGIC.search(part):
            break
        fixed.append(part)
    return str(PurePath(*fixed)) if fixed else "."


def _list_glob(spec: str, *, exts: frozenset[str]) -> Iterator[SourceItem | SkippedItem]:
    pattern = os.path.expanduser(spec)
    root = _glob_root(pattern)
    found: list[SourceItem | SkippedItem] = []
    for match in glob.iglob(pattern, recursive=True):
        if not _has_ext(match, exts):
            continue
        rel = PurePath(os.path.relpath(match, root)).as_posix()
        found.append(_listed_file(rel, match))
    if not found:
        raise SourceError(f"no images match '{spec}'")
    found.sort(key=lambda x: x.id)
    yield from found


# --------------------------------------------------------------------------------------------------
# Videos


def _open_video(path: Path, label: str):
    import cv2

    if not path.is_file():
        raise SourceError(f"{label}: no such file")
    cap = cv2.VideoCapture(str(path))
    if not cap.isOpened():
        cap.release()
        raise SourceError(f"{label}: cannot open video")
    return cap


def _frame_range(cap, label: str, start: float | None, end: float | None) -> tuple[int, int | None]:
    """[first, stop) frame indices for ``start``/``end`` seconds (stop None: to the end)."""
    import cv2

    if start is None and end is None:
        return 0, None
    fps = cap.get(cv2.CAP_PROP_FPS)
    if not (math.isfinite(fps) and fps > 0):
        raise SourceError(f"{label}: unknown frame rate, so start/end can't be used")
    first = max(0, math.ceil(start * fps - 1e-6)) if start is not None else 0
    stop = max(0, math.ceil(end * fps - 1e-6)) if end is not None else None
    return first, stop


def _range_text(start: float | None, end: float | None) -> str:
    if start is None and end is None:
        return ""
    return f" between {start or 0:g} s and " + ("the end" if end is None else f"{end:g} s")


def _list_video(
    spec: str, *, every: int, start: float | None, end: float | None, max_pixels: int | None
) -> Iterator[SourceItem]:
    import cv2

    path = Path(os.path.expanduser(spec))
    vid = path.name  # frames are "<video file name>#<frame>"
    cap = _open_video(path, spec)
    try:
        _check_video_budget(cap, spec, max_pixels)
        first, stop = _frame_range(cap, spec, start, end)
        count = int(cap.get(cv2.CAP_PROP_FRAME_COUNT) or 0)
        if count <= 0:  # unknown (some streams): count by grabbing, no colour conversion
            count = 0
            while (stop is None or count < stop) and cap.grab():
                count += 1
    finally:
        cap.release()
    stop = count if stop is None else min(stop, count)
    frames = range(first, stop, every)
    if not frames:
        raise SourceError(f"no frames in '{spec}'{_range_text(start, end)}")
    for index in frames:
        yield SourceItem(f"{vid}#{index:06d}", path, index)


def iter_video_frames(
    path: str | os.PathLike[str],
    every: int = 1,
    start: float | None = None,
    end: float | None = None,
    *,
    max_pixels: int | None = None,
) -> Iterator[tuple[SourceItem, np.ndarray]]:
    """Decode a video's frames sequentially: ``(item, rgb)`` for every ``every``-th frame from
    ``start`` s (inclusive) to ``end`` s (exclusive); ``rgb`` is ``(H, W, 3)`` ``uint8``.

    Ids match :func:`iter_items` for the same video spec. Frames not wanted are only ``grab``-bed
    (never converted). The video is opened when this is called (a :class:`SourceError` if it
    can't be, or if its frames are over ``max_pixels``); the capture is released when the iterator
    finishes or is closed. When the container does not tell the frame size, the first decoded frame
    is checked instead (a :class:`SourceError` raised by the iterator).
    """
    _check_frame_options(every, start, end)
    _check_max_pixels(max_pixels)
    label = os.fspath(path)
    vpath = Path(os.path.expanduser(label))
    cap = _open_video(vpath, label)
    try:
        checked = _check_video_budget(cap, label, max_pixels)
        first, stop = _frame_range(cap, label, start, end)
    except BaseException:
        cap.release()
        raise
    return _decode_video(cap, vpath, vpath.name, every, first, stop, None if checked else (label, max_pixels))


def _video_size(cap) -> tuple[int, int] | None:
    """The stream's (width, height) as the container tells it; None when unknown."""
    import cv2

    width, height = cap.get(cv2.CAP_PROP_FRAME_WIDTH), cap.get(cv2.CAP_PROP_FRAME_HEIGHT)
    if not (math.isfinite(width) and math.isfinite(height)) or width <= 0 or height <= 0:
        return None
    return int(width), int(height)


def _check_video_budget(cap, label: str, max_pixels: int | None) -> bool:
    """:class:`SourceError` when the stream's frames are over ``max_pixels``. True when checked (or no
    budget), False when the container does not tell the frame size."""
    if max_pixels is None:
        return True
    size = _video_size(cap)
    if size is None:
        return False
    reason = _budget_reason(size[0], size[1], max_pixels)
    if reason is not None:
        raise SourceError(f"{label}: video frame size {reason}")
    return True


def _decode_video(
    cap, path: Path, vid: str, every: int, first: int, stop: int | None, unchecked: tuple[str, int] | None = None
):
    """``unchecked``: (label, max_pixels) when the budget could not be checked from the container: the
    first decoded frame is checked instead."""
    import cv2

    try:
        index = 0
        if first >= _SEEK_MIN_FRAMES:
            cap.set(cv2.CAP_PROP_POS_FRAMES, first)
            if int(round(cap.get(cv2.CAP_PROP_POS_FRAMES))) == first:
                index = first
            else:  # the backend can't seek exactly: start over and grab up to `first`
                cap.release()
                cap = cv2.VideoCapture(str(path))
        while stop is None or index < stop:
            if not cap.grab():
                break
            if index >= first and (index - first) % every == 0:
                ok, bgr = cap.retrieve()
                if ok and bgr is not None:
                    if unchecked is not None:
                        reason = _budget_reason(bgr.shape[1], bgr.shape[0], unchecked[1])
                        if reason is not None:
                            raise SourceError(f"{unchecked[0]}: video frame size {reason}")
                        unchecked = None
                    yield SourceItem(f"{vid}#{index:06d}", path, index), _bgr_to_rgb(bgr)
            index += 1
    finally:
        cap.release()


def _bgr_to_rgb(frame: np.ndarray) -> np.ndarray:
    import cv2

    if frame.ndim == 2:
        return np.ascontiguousarray(np.repeat(frame[:, :, None], 3, axis=2))
    if frame.shape[2] == 4:
        return cv2.cvtColor(frame, cv2.COLOR_BGRA2RGB)
    return cv2.cvtColor(frame, cv2.COLOR_BGR2RGB)


def _decode_frame(item: SourceItem, max_pixels: int | None) -> DecodedImage:
    import cv2

    assert item.frame is not None
    if not item.path.is_file():
        raise SkipItem(item.id, "video not found")
    cap = cv2.VideoCapture(str(item.path))
    try:
        if not cap.isOpened():
            raise SkipItem(item.id, "cannot open video")
        size = _video_size(cap) if max_pixels is not None else None
        if size is not None:
            _check_size(item.id, size[0], size[1], max_pixels)
        if item.frame > 0:
            cap.set(cv2.CAP_PROP_POS_FRAMES, item.frame)
        ok, bgr = cap.read()
    finally:
        cap.release()
    if not ok or bgr is None:
        raise SkipItem(item.id, f"cannot read frame {item.frame}")
    if max_pixels is not None and size is None:  # the container did not tell: check the decoded frame
        _check_size(item.id, bgr.shape[1], bgr.shape[0], max_pixels)
    return DecodedImage(item, _bgr_to_rgb(bgr))


# --------------------------------------------------------------------------------------------------
# Decoding

_limit_lock = threading.Lock()
_limit_users = 0
_saved_limit: int | None = None
# ignores the warnings issued by PIL's own modules (the same entry object is added and removed)
_PIL_WARNINGS_IGNORED = ("ignore", None, Warning, re.compile(r"PIL(\.|$)"), 0)


def _warning_filters_changed() -> None:
    mutated = getattr(warnings, "_filters_mutated", None)  # resets the "already warned" caches
    if mutated is not None:
        mutated()


@contextmanager
def _pil_limit_off() -> Iterator[None]:
    """Switch PIL's own MAX_IMAGE_PIXELS check off, and ignore the warnings PIL issues, while any of our
    decodes runs (thread-safe, reference counted), then put the previous state back.

    :func:`decode_item` checks sizes against the pixel budget and :data:`MAX_IMAGE_PIXELS` itself, so that a
    bomb is refused with a clear reason and without PIL's DecompressionBombWarning for images between PIL's
    limit and ours. PIL's other warnings on damaged files ("Corrupt EXIF data", "Truncated File Read", ...)
    would print a source line on stderr for an item that either decodes (EXIF ignored) or is skipped with a
    reason; they are ignored in that window (in every thread, PIL's modules only: a filter on the module)."""
    global _limit_users, _saved_limit
    with _limit_lock:
        if _limit_users == 0:
            _saved_limit = Image.MAX_IMAGE_PIXELS
            Image.MAX_IMAGE_PIXELS = None
            warnings.filters.insert(0, _PIL_WARNINGS_IGNORED)
            _warning_filters_changed()
        _limit_users += 1
    try:
        yield
    finally:
        with _limit_lock:
            _limit_users -= 1
            if _limit_users == 0:
                Image.MAX_IMAGE_PIXELS = _saved_limit
                for index, entry in enumerate(warnings.filters):
                    if entry is _PIL_WARNINGS_IGNORED:
                        del warnings.filters[index]
                        _warning_filters_changed()
                        break


def decode_item(item: SourceItem, *, max_pixels: int | None = None) -> DecodedImage:
    """Decode one item to RGB ``uint8`` ``(H, W, 3)`` (see the module doc); :class:`SkipItem` when it can't.

    ``max_pixels``: the pixel budget (width x height); an image over it is skipped, from its header,
    before its pixels are decoded (a video frame: from the stream's frame size). None: no budget, only
    :data:`MAX_IMAGE_PIXELS`. ``masqclip segment`` passes ``--max-pixels`` (:data:`DEFAULT_MAX_PIXELS`).
    ValueError for a ``max_pixels`` that is not a whole number >= 1.
    """
    _check_max_pixels(max_pixels)
    if item.frame is not None:
        return _decode_frame(item, max_pixels)
    _check_file(item)
    limit = MAX_IMAGE_PIXELS
    with _pil_limit_off():
        try:
            im = Image.open(item.path)
        except PermissionError:
            raise SkipItem(item.id, "permission denied") from None
        except UnidentifiedImageError:
            raise SkipItem(item.id, "not a recognised image format") from None
        except Image.DecompressionBombError:
            raise SkipItem(item.id, f"image too large (over {limit} pixels)") from None
        except OSError as e:
            raise SkipItem(item.id, f"cannot read: {_os_reason(e)}") from None
        except Exception as e:  # malformed headers surface as assorted errors
            raise SkipItem(item.id, f"cannot read image header: {_exc_text(e)}") from None
        with im:
            width, height = im.size  # from the header: nothing is decoded yet
            _check_size(item.id, width, height, max_pixels)
            tile = getattr(im, "_tile_size", None)  # TIFF: the decoder allocates one tile up front
            if tile:
                _check_size(item.id, tile[0], tile[1], max_pixels, tile=True)
            if width <= 0 or height <= 0:
                raise SkipItem(item.id, f"empty image ({width}x{height})")
            try:
                im.load()
            except Image.DecompressionBombError:
                raise SkipItem(item.id, f"image too large (over {limit} pixels)") from None
            except MemoryError:
                raise SkipItem(item.id, f"out of memory decoding a {width}x{height} image") from None
            except OSError as e:
                if "truncated" in str(e).lower():
                    raise SkipItem(item.id, "truncated image file") from None
                raise SkipItem(item.id, f"cannot decode image: {_exc_text(e)}") from None
            except Exception as e:  # SyntaxError, ValueError, EOFError, zlib.error, ...
                raise SkipItem(item.id, f"cannot decode image: {_exc_text(e)}") from None
            if im.size != (width, height):  # a few formats (ICO, ICNS, ...) decode to another size
                _check_size(item.id, im.size[0], im.size[1], max_pixels)
            try:
                oriented = ImageOps.exif_transpose(im, in_place=False)
            except Exception:  # a broken EXIF block: keep the stored orientation
                oriented = im
            try:
                rgb = _to_rgb(oriented)
            except ValueError as e:
                raise SkipItem(item.id, f"unsupported image mode {oriented.mode!r}: {_exc_text(e)}") from None
            except Exception as e:
                raise SkipItem(item.id, f"cannot convert {oriented.mode!r} image to RGB: {_exc_text(e)}") from None
    return DecodedImage(item, rgb)


def _check_max_pixels(max_pixels: int | None) -> None:
    if max_pixels is not None and (isinstance(max_pixels, bool) or not isinstance(max_pixels, int) or max_pixels < 1):
        raise ValueError(f"max_pixels must be a whole number of pixels >= 1 (or None: no budget), got {max_pixels!r}")


def _megapixels(pixels: int, decimals: int) -> str:
    """``pixels`` in megapixels with at most ``decimals`` decimals (trailing zeros dropped, one kept)."""
    text = f"{pixels / 1e6:.{decimals}f}".rstrip("0")
    return text + "0" if text.endswith(".") else text


def _budget_reason(width: int, height: int, max_pixels: int) -> str | None:
    """None when ``width x height`` is within ``max_pixels``, else the reason, e.g.
    ``"20000x20000 = 400.0 megapixels is over the pixel budget of 64.0 megapixels (--max-pixels)"``.

    The budget is shown exactly; the image's size with one decimal (two significant digits below one
    megapixel), and more where needed to read as over the budget (``64.01``, not ``64.0``, over ``64.0``)."""
    pixels = width * height
    if pixels <= max_pixels:
        return None
    budget = _megapixels(max_pixels, 6)
    decimals = 1 if pixels >= 1_000_000 else min(6, 1 - math.floor(math.log10(pixels / 1e6)))
    while decimals < 6 and float(_megapixels(pixels, decimals)) <= float(budget):
        decimals += 1
    return (
        f"{width}x{height} = {_megapixels(pixels, decimals)} megapixels is over the pixel budget of {budget} "
        "megapixels (--max-pixels)"
    )


def _check_size(item_id: str, width: int, height: int, max_pixels: int | None, *, tile: bool = False) -> None:
    """:class:`SkipItem` when ``width x height`` is over the pixel budget or over :data:`MAX_IMAGE_PIXELS`
    (whichever is lower names the reason)."""
    limit = MAX_IMAGE_PIXELS
    if max_pixels is not None and max_pixels <= limit:
        reason = _budget_reason(width, height, max_pixels)
        if reason is not None:
            raise SkipItem(item_id, ("tile " if tile else "") + reason)
    if width * height > limit:
        what = "pixel tile" if tile else "pixels"
        raise SkipItem(item_id, f"image too large ({width}x{height} {what}, limit {limit})")


def pil_to_rgb(im: Image.Image) -> np.ndarray:
    """An opened PIL image as decoded items are: EXIF orientation applied, any mode to ``(H, W, 3)`` uint8 RGB
    (alpha dropped, 16-bit and float greys scaled; see the module doc). ValueError for a mode that cannot be
    converted."""
    try:
        oriented = ImageOps.exif_transpose(im, in_place=False)
    except Exception:  # a broken EXIF block: keep the stored orientation
        oriented = im
    return _to_rgb(oriented if oriented is not None else im)


def _check_file(item: SourceItem) -> None:
    """Cheap checks with clear reasons before PIL sees the file."""
    path = item.path
    try:
        st = os.stat(path)
    except FileNotFoundError:
        raise SkipItem(item.id, "dangling symlink" if os.path.islink(path) else "no such file") from None
    except PermissionError:
        raise SkipItem(item.id, "permission denied") from None
    except OSError as e:
        raise SkipItem(item.id, _os_reason(e)) from None
    if stat.S_ISDIR(st.st_mode):
        raise SkipItem(item.id, "is a directory")
    if not stat.S_ISREG(st.st_mode):
        raise SkipItem(item.id, "not a regular file")
    if st.st_size == 0:
        raise SkipItem(item.id, "empty file (0 bytes)")


def _to_rgb(im: Image.Image) -> np.ndarray:
    mode = im.mode
    if mode == "RGB":
        out = np.asarray(im)
    elif mode.startswith("I;16"):
        a = np.asarray(im).astype(np.uint32)
        out = _gray3(((a + 128) // 257).astype(np.uint8))
    elif mode == "I":
        out = _gray3(_scale_int(np.asarray(im).astype(np.int64)))
    elif mode == "F":
        out = _gray3(_scale_float(np.asarray(im).astype(np.float64)))
    elif mode in ("RGBA", "LA", "PA", "RGBa", "La", "RGBX"):
        # drop alpha: keep each pixel's stored colour (see the module doc)
        base = {"RGBA": "RGB", "RGBa": "RGB", "RGBX": "RGB", "LA": "L", "La": "L", "PA": "RGBA"}[mode]
        if mode == "PA":
            rgba = np.asarray(im.convert("RGBA"))
            out = rgba[:, :, :3]
        elif base == "L":
            out = _gray3(np.asarray(im)[:, :, 0])
        else:
            out = np.asarray(im)[:, :, :3]
    elif mode == "P":
        # a palette with transparency converts through RGBA (PIL warns otherwise); alpha dropped
        src = im.convert("RGBA") if "transparency" in im.info else im
        out = np.asarray(src.convert("RGB"))
    else:  # L, 1, CMYK, YCbCr, LAB, HSV, ...
        out = np.asarray(im.convert("RGB"))
    out = np.ascontiguousarray(out, dtype=np.uint8)
    if out.ndim != 3 or out.shape[2] != 3:  # pragma: no cover - defensive
        raise ValueError(f"converted to shape {out.shape}")
    if not out.flags.writeable:
        out = out.copy()
    return out


def _gray3(gray: np.ndarray) -> np.ndarray:
    return np.repeat(gray[:, :, None], 3, axis=2)


def _stretch(a: np.ndarray) -> np.ndarray:
    lo, hi = float(a.min()), float(a.max())
    if hi <= lo:
        return np.zeros(a.shape, np.uint8)
    return np.rint((a - lo) * (255.0 / (hi - lo))).astype(np.uint8)


def _scale_int(a: np.ndarray) -> np.ndarray:
    if a.size and a.min() >= 0 and a.max() <= 65535:
        return ((a + 128) // 257).astype(np.uint8)
    return _stretch(a)


def _scale_float(a: np.ndarray) -> np.ndarray:
    a = np.nan_to_num(a, nan=0.0, posinf=0.0, neginf=0.0)
    if not a.size:
        return a.astype(np.uint8)
    lo, hi = float(a.min()), float(a.max())
    if lo >= 0 and hi <= 1:
        return np.rint(a * 255.0).astype(np.uint8)
    if lo >= 0 and hi <= 255:
        return np.rint(a).astype(np.uint8)
    return _stretch(a)


def _os_reason(e: OSError) -> str:
    if isinstance(e, PermissionError):
        return "permission denied"
    if isinstance(e, FileNotFoundError):
        return "no such file or directory"
    if isinstance(e, IsADirectoryError):
        return "is a directory"
    return _one_line(e.strerror or str(e) or type(e).__name__).lower()


def _exc_text(e: BaseException) -> str:
    return _one_line(str(e) or type(e).__name__)


def _one_line(text: str) -> str:
    return " ".join(str(text).split())
