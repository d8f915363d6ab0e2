"""Writer interface and the helpers every writer shares: output paths, atomic writes, deterministic encodings.

Everything a writer puts under ``--out`` is a pure function of the inputs and options: JSON has a fixed key order,
compact separators and scores rounded to :data:`SCORE_DECIMALS` decimals; PNGs are encoded by Pillow with no
metadata at a fixed compression level; every file is written to a temporary file in its own folder and moved into
place with :func:`os.replace`, so a reader (or a resumed run) never sees a half-written file.
"""

from __future__ import annotations

import io
import itertools
import json
import os
import re
import secrets
from abc import ABC, abstractmethod
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
from PIL import Image
from pycocotools import mask as mask_util

from masqclip_cli.inference.result import Segmentation
from masqclip_cli.vocab import Vocabulary

__all__ = [
    "PNG_COMPRESS_LEVEL",
    "SCORE_DECIMALS",
    "TASKS",
    "ItemInfo",
    "Writer",
    "atomic_save_png",
    "atomic_write_bytes",
    "atomic_write_json",
    "atomic_write_text",
    "category_ids",
    "check_size",
    "dumps_json",
    "encode_png",
    "encode_rle",
    "mask_stats",
    "needed_tasks",
    "output_path",
    "atomic_write_chunks",
    "atomic_write_json_stream",
    "coco_images",
    "ranked_records",
    "remove_stale_temp_files",
    "round_score",
    "segment_stats",
]

#: zlib level of every PNG written (fixed, so files are byte-identical from run to run).
PNG_COMPRESS_LEVEL = 6
#: Scores are rounded to this many decimals in every output.
SCORE_DECIMALS = 6
#: The ``Segmentation`` fields a writer can need.
TASKS = ("instance", "panoptic", "semantic")

_SEPARATORS = re.compile(r"[\\/]+")
_DRIVE = re.compile(r"^[A-Za-z]:$")
_TMP_SUFFIX = ".tmp"
_TMP_NAME = re.compile(r"^\..+\.[0-9a-f]{12}\.tmp$")
_LUT_LIMIT = 1 << 22  # id maps whose ids are all below this are indexed through a lookup table


@dataclass(frozen=True)
class ItemInfo:
    """One input item.

    Attributes:
        id: stable item id, unique in a run (e.g. ``"sub/a.jpg"``, ``"clip.mp4#000005"``); outputs are named from it.
        file_name: the name written into ``images[].file_name`` of the COCO-style JSON files.
        width, height: the image size in pixels.
    """

    id: str
    file_name: str
    width: int
    height: int


# --- paths and atomic writes ---------------------------------------------------------------------------------------


def _id_parts(item_id: str) -> list[str]:
    """The path components of an item id: ``/`` and ``\\`` separate, empty and ``.`` parts are dropped (so an
    absolute id becomes relative), ``..`` becomes ``__`` and a drive ``C:`` becomes ``C_``."""
    if not isinstance(item_id, str):
        raise TypeError(f"item id must be a str, got {type(item_id).__name__}")
    if "\x00" in item_id:
        raise ValueError(f"item id {item_id!r} contains a NUL character")
    parts: list[str] = []
    for part in _SEPARATORS.split(item_id):
        if part in ("", "."):
            continue
        if part == "..":
            part = "__"
        elif not parts and _DRIVE.match(part):
            part = part[0] + "_"
        parts.append(part)
    if not parts:
        raise ValueError(f"item id {item_id!r} has no usable name")
    return parts


def output_path(out_dir: str | os.PathLike[str], kind: str, item_id: str, suffix: str) -> Path:
    """``out_dir/kind/<item_id><suffix>``: the suffix is appended, never substituted, so ``a.jpg`` and ``a.png`` give
    ``a.jpg.png`` and ``a.png.png``; nested ids keep their folders (``sub/a.jpg`` -> ``kind/sub/a.jpg.png``) and ``#``
    is kept. ``..``, empty and absolute parts are neutralised (see :func:`_id_parts`): the path is always inside
    ``out_dir/kind``."""
    if not kind or _SEPARATORS.search(kind) or kind in (".", ".."):
        raise ValueError(f"bad output kind {kind!r}")
    parts = _id_parts(item_id)
    parts[-1] = parts[-1] + suffix
    return Path(out_dir, kind, *parts)


def atomic_write_bytes(path: str | os.PathLike[str], data: bytes) -> Path:
    """Write ``data`` to ``path`` atomically: a temporary file in the same folder (created with the umask's
    permissions), flushed and fsynced, then :func:`os.replace`-d over ``path``. Parent folders are created. On any
    error the temporary file is removed and ``path`` is left as it was. A file that already holds exactly ``data`` is
    not touched (a re-run over a complete output rewrites nothing)."""
    path = Path(path)
    try:
        if path.stat().st_size == len(data) and path.read_bytes() == data:
            return path
    except OSError:
        pass
    return atomic_write_chunks(path, (data,), compare=False)


def remove_stale_temp_files(out_dir: str | os.PathLike[str]) -> list[Path]:
    """Delete the temporary files an interrupted run left under ``out_dir`` (names ``.<name>.<12 hex>.tmp``, as
    :func:`atomic_write_bytes` makes them), so a resumed run ends with the same folder as an uninterrupted one.
    Call it before writing, never while writers are running. Returns the removed paths (sorted)."""
    root = Path(out_dir)
    if not root.is_dir():
        return []
    removed = []
    for path in sorted(root.rglob(".*.tmp")):
        if _TMP_NAME.match(path.name) and path.is_file():
            path.unlink()
            removed.append(path)
    return removed


def atomic_write_text(path: str | os.PathLike[str], text: str) -> Path:
    """:func:`atomic_write_bytes` of ``text`` encoded as UTF-8 (no newline translation)."""
    return atomic_write_bytes(path, text.encode("utf-8"))


def dumps_json(obj: Any, *, indent: int | None = None) -> str:
    """Deterministic JSON: key order as built (never sorted), compact separators (or ``indent``), UTF-8 text kept
    as is, NaN/Infinity refused."""
    separators = (",", ":") if indent is None else (",", ": ")
    return json.dumps(obj, ensure_ascii=False, allow_nan=False, separators=separators, indent=indent)


def atomic_write_json(path: str | os.PathLike[str], obj: Any, *, indent: int | None = None) -> Path:
    """:func:`dumps_json` plus a final newline, written atomically."""
    return atomic_write_text(path, dumps_json(obj, indent=indent) + "\n")


def _open_temp(path: Path):  # noqa: ANN202 - (temporary path, binary file object)
    path.parent.mkdir(parents=True, exist_ok=True)
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0)
    while True:
        tmp = path.with_name(f".{path.name[:200]}.{secrets.token_hex(6)}{_TMP_SUFFIX}")
        try:
            fd = os.open(tmp, flags, 0o666)
        except FileExistsError:  # pragma: no cover - a 48-bit random clash
            continue
        return tmp, os.fdopen(fd, "wb")


def _same_file_contents(a: Path, b: Path) -> bool:
    try:
        if a.stat().st_size != b.stat().st_size:
            return False
        with open(a, "rb") as fa, open(b, "rb") as fb:
            while True:
                chunk_a, chunk_b = fa.read(1 << 20), fb.read(1 << 20)
                if chunk_a != chunk_b:
                    return False
                if not chunk_a:
                    return True
    except OSError:
        return False


def atomic_write_chunks(path: str | os.PathLike[str], chunks: Iterable[str | bytes], *, compare: bool = True) -> Path:
    """Stream ``chunks`` (bytes, or text written as UTF-8) into ``path`` atomically: a temporary file in the same
    folder (created with the umask's permissions, parent folders created), flushed and fsynced, then
    :func:`os.replace`-d over ``path`` -- unless (``compare``) ``path`` already holds exactly these bytes, which is
    then left untouched. On any error the temporary file is removed and ``path`` is left as it was. Memory use is one
    chunk (plus a 1 MiB write buffer), whatever the total."""
    path = Path(path)
    tmp, f = _open_temp(path)
    try:
        with f:
            buffer: list[bytes] = []
            size = 0
            for chunk in chunks:
                data = chunk.encode("utf-8") if isinstance(chunk, str) else bytes(chunk)
                buffer.append(data)
                size += len(data)
                if size >= 1 << 20:
                    f.write(b"".join(buffer))
                    buffer, size = [], 0
            f.write(b"".join(buffer))
            f.flush()
            os.fsync(f.fileno())
        if compare and _same_file_contents(tmp, path):
            os.unlink(tmp)
        else:
            os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
    return path


def _iter_json(obj: Any) -> Iterator[str]:
    """:func:`dumps_json` (compact) of ``obj`` in pieces; any iterator or generator in it is written as a JSON array
    and consumed lazily (so a list of millions of annotations is never built)."""
    if isinstance(obj, dict):
        yield "{"
        for i, (key, value) in enumerate(obj.items()):
            if not isinstance(key, str):
                raise TypeError(f"JSON object keys must be strings, got {type(key).__name__}")
            yield ("," if i else "") + dumps_json(key) + ":"
            yield from _iter_json(value)
        yield "}"
    elif isinstance(obj, Iterator) or (isinstance(obj, (list, tuple)) and any(isinstance(v, Iterator) for v in obj)):
        yield "["
        for i, value in enumerate(obj):
            if i:
                yield ","
            yield from _iter_json(value)
        yield "]"
    else:
        yield dumps_json(obj)


def atomic_write_json_stream(path: str | os.PathLike[str], obj: Any) -> Path:
    """:func:`atomic_write_json` (compact) streamed: iterators inside ``obj`` become JSON arrays, consumed lazily.
    The bytes equal ``atomic_write_json`` of the same object with its iterators turned into lists."""
    return atomic_write_chunks(path, itertools.chain(_iter_json(obj), ("\n",)))


def encode_png(array: np.ndarray, *, palette: Sequence[tuple[int, int, int]] | None = None) -> bytes:
    """Encode an image as PNG bytes, deterministically (Pillow, no metadata, :data:`PNG_COMPRESS_LEVEL`).

    The mode follows the array: (H, W) uint8 -> ``L`` (``P`` with ``palette``: a list of up to 256 RGB colours,
    entry i for pixel value i), (H, W) uint16 -> 16-bit grey, (H, W, 3) uint8 -> ``RGB``.
    """
    array = np.ascontiguousarray(array)
    if array.ndim == 2 and array.dtype == np.uint8:
        h, w = array.shape
        if palette is not None:
            if len(palette) > 256:
                raise ValueError(f"a PNG palette holds at most 256 colours, got {len(palette)}")
            image = Image.frombytes("P", (w, h), array.tobytes())
            flat = [int(c) for color in palette for c in color]
            image.putpalette(flat + [0] * (768 - len(flat)))
        else:
            image = Image.frombytes("L", (w, h), array.tobytes())
    elif array.ndim == 2 and array.dtype == np.uint16:
        if palette is not None:
            raise ValueError("a palette PNG needs uint8 pixels")
        h, w = array.shape
        image = Image.frombytes("I;16", (w, h), array.astype("<u2", copy=False).tobytes())
    elif array.ndim == 3 and array.shape[2] == 3 and array.dtype == np.uint8:
        if palette is not None:
            raise ValueError("a palette PNG needs a 2-D array")
        h, w = array.shape[:2]
        image = Image.frombytes("RGB", (w, h), array.tobytes())
    else:
        raise ValueError(f"cannot encode a {array.dtype} array of shape {array.shape} as PNG")
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", compress_level=PNG_COMPRESS_LEVEL, optimize=False)
    return buffer.getvalue()


def atomic_save_png(
    path: str | os.PathLike[str], array: np.ndarray, *, palette: Sequence[tuple[int, int, int]] | None = None
) -> Path:
    """:func:`encode_png` written atomically."""
    return atomic_write_bytes(path, encode_png(array, palette=palette))


# --- values --------------------------------------------------------------------------------------------------------


def category_ids(vocab: Vocabulary) -> list[int]:
    """Per class, the category id written to every output: the vocabulary's ids when it gives any, else 1..N in
    vocabulary order (0 stays free for "unlabelled"). A vocabulary that gives some ids but not all uses
    :attr:`Vocabulary.ids` (given id, else contiguous index)."""
    if all(c.id is None for c in vocab):
        return list(range(1, len(vocab) + 1))
    return list(vocab.ids)


def round_score(score: float) -> float:
    """A score as written: a Python float rounded to :data:`SCORE_DECIMALS` decimals (finite, or ValueError)."""
    value = float(score)
    if not np.isfinite(value):
        raise ValueError(f"score is not finite: {score!r}")
    return round(value, SCORE_DECIMALS) + 0.0  # + 0.0 turns -0.0 into 0.0


def encode_rle(mask: np.ndarray) -> dict[str, Any]:
    """COCO compressed RLE of a boolean (H, W) mask: ``{"size": [H, W], "counts": str}`` (pycocotools)."""
    mask = np.asarray(mask)
    if mask.ndim != 2:
        raise ValueError(f"a mask must be 2-D, got shape {mask.shape}")
    rle = mask_util.encode(np.asfortranarray(mask, dtype=np.uint8))
    counts = rle["counts"]
    return {"size": [int(rle["size"][0]), int(rle["size"][1])], "counts": counts.decode("ascii")}


def mask_stats(mask: np.ndarray) -> tuple[int, list[int]]:
    """(pixel count, integer COCO bbox [x, y, w, h]) of a boolean mask; (0, [0, 0, 0, 0]) when empty."""
    mask = np.asarray(mask, dtype=bool)
    rows = np.flatnonzero(mask.any(axis=1))
    if rows.size == 0:
        return 0, [0, 0, 0, 0]
    cols = np.flatnonzero(mask.any(axis=0))
    area = int(np.count_nonzero(mask))
    return area, [int(cols[0]), int(rows[0]), int(cols[-1] - cols[0] + 1), int(rows[-1] - rows[0] + 1)]


def segment_stats(id_map: np.ndarray, ids: Sequence[int]) -> tuple[np.ndarray, list[int], list[list[int]]]:
    """Pixel counts and boxes of the given segment ids in an (H, W) id map, in one pass over the map.

    Returns ``(cleaned, areas, bboxes)``: ``cleaned`` is the map with every id not in ``ids`` set to 0 (int64),
    ``areas[k]`` the pixel count of ``ids[k]`` and ``bboxes[k]`` its integer COCO box ([0, 0, 0, 0] when absent).
    ``ids`` must be distinct positive integers.
    """
    id_map = np.asarray(id_map)
    if id_map.ndim != 2 or not np.issubdtype(id_map.dtype, np.integer):
        raise ValueError(f"an id map must be a 2-D integer array, got {id_map.dtype} {id_map.shape}")
    ids_arr = np.asarray(list(ids), dtype=np.int64)
    k = ids_arr.size
    if k and (ids_arr.min() <= 0 or np.unique(ids_arr).size != k):
        raise ValueError("segment ids must be distinct positive integers")
    h, w = id_map.shape
    # Index of each pixel's segment in ``ids`` (k = not one of them).
    lo, hi = (int(id_map.min()), int(id_map.max())) if id_map.size else (0, 0)
    if k == 0:
        index = np.zeros((h, w), dtype=np.intp)
    elif lo >= 0 and hi <= _LUT_LIMIT:
        lut = np.full(hi + 1, k, dtype=np.intp)
        small = ids_arr <= hi
        lut[ids_arr[small]] = np.flatnonzero(small)
        index = lut[id_map]
    else:
        flat = id_map.astype(np.int64, copy=False)
        order = np.argsort(ids_arr, kind="stable")
        sorted_ids = ids_arr[order]
        pos = np.searchsorted(sorted_ids, flat).clip(0, k - 1)
        index = np.where(sorted_ids[pos] == flat, order[pos], k)
    areas = np.bincount(index.ravel(), minlength=k + 1)[:k]
    rows = np.zeros((h, k + 1), dtype=bool)
    cols = np.zeros((w, k + 1), dtype=bool)
    rows[np.arange(h)[:, None], index] = True
    cols[np.arange(w)[None, :], index] = True
    y0 = rows.argmax(axis=0)
    y1 = h - 1 - rows[::-1].argmax(axis=0)
    x0 = cols.argmax(axis=0)
    x1 = w - 1 - cols[::-1].argmax(axis=0)
    bboxes = [
        [int(x0[j]), int(y0[j]), int(x1[j] - x0[j] + 1), int(y1[j] - y0[j] + 1)] if areas[j] else [0, 0, 0, 0]
        for j in range(k)
    ]
    cleaned = np.append(ids_arr, 0)[index]
    return cleaned, [int(a) for a in areas], bboxes


def ranked_records(
    records: Iterable[tuple[ItemInfo, dict | None]],
) -> Iterator[tuple[int, ItemInfo, dict | None]]:
    """``(image_id, item, record)`` for every record, sorted by item id; image_id is the 1-based rank in that order
    (items whose record is None keep their rank, so ids do not depend on which items produced output).

    ``records`` with a true ``sorted_by_id`` attribute (the engine's on-disk record view) are already in id order and
    are streamed, one record in memory at a time; anything else is sorted first. A duplicate id raises ValueError."""
    ordered = records if getattr(records, "sorted_by_id", False) else sorted(records, key=lambda r: r[0].id)
    previous: str | None = None
    for rank, (item, record) in enumerate(ordered, start=1):
        if previous is not None and item.id <= previous:
            if item.id == previous:
                raise ValueError(f"duplicate item id {item.id!r} in the records")
            raise ValueError(f"records not in item-id order: {item.id!r} after {previous!r}")
        previous = item.id
        yield rank, item, record


def coco_images(records: Iterable[tuple[ItemInfo, dict | None]]) -> list[dict[str, Any]]:
    """The COCO ``images`` list of the items that have a record: ``id`` (rank, see :func:`ranked_records`),
    ``file_name``, ``width``, ``height``."""
    return [
        {"id": image_id, "file_name": item.file_name, "width": int(item.width), "height": int(item.height)}
        for image_id, item, record in ranked_records(records)
        if record is not None
    ]


def check_size(item: ItemInfo, seg: Segmentation) -> tuple[int, int]:
    """(H, W) of the item, checked against the segmentation's ``image_size``."""
    size = (int(item.height), int(item.width))
    if tuple(int(v) for v in seg.image_size) != size:
        raise ValueError(
            f"item {item.id!r}: segmentation size {tuple(seg.image_size)} does not match the image size {size} (H, W)"
        )
    return size


# --- the interface -------------------------------------------------------------------------------------------------


class Writer(ABC):
    """One output format.

    The engine calls :meth:`write_item` once per item (in any order, possibly across several runs when resuming),
    keeps the returned record (a small JSON-able dict) on disk, and at the end calls :meth:`finalize` with the records
    of every item. Records may come back from a JSON round trip (key order not guaranteed): finalize rebuilds every
    object it writes in a fixed key order.

    Class attributes:
        name: the format name (``--format``).
        tasks: the ``Segmentation`` fields it needs, all of them ("instance", "panoptic", "semantic").
        any_of_tasks: fields of which it needs at least one, in order of preference (first = the default to compute).
        needs_image: whether :meth:`write_item` needs the decoded image.
        needs_out_dir: whether it can run with ``out_dir=None``.
        option_defaults: the options it accepts, with their defaults.
    """

    name: ClassVar[str] = ""
    tasks: ClassVar[frozenset[str]] = frozenset()
    any_of_tasks: ClassVar[tuple[str, ...]] = ()
    needs_image: ClassVar[bool] = False
    needs_out_dir: ClassVar[bool] = True
    option_defaults: ClassVar[Mapping[str, Any]] = {}

    def __init__(self, out_dir: str | os.PathLike[str] | None, vocab: Vocabulary, **options: Any) -> None:
        unknown = sorted(set(options) - set(self.option_defaults))
        if unknown:
            known = ", ".join(sorted(self.option_defaults)) or "none"
            raise TypeError(f"{self.name} writer: unknown option(s) {', '.join(unknown)} (known: {known})")
        if out_dir is None and self.needs_out_dir:
            raise ValueError(f"the {self.name} writer needs an output folder")
        self.out_dir: Path | None = None if out_dir is None else Path(out_dir)
        self.vocab = vocab
        self.category_ids: list[int] = category_ids(vocab)
        self.options: dict[str, Any] = {**self.option_defaults, **options}

    def __repr__(self) -> str:
        return f"{type(self).__name__}(out_dir={str(self.out_dir)!r})"

    def item_files(self, item: ItemInfo) -> list[Path]:
        """The files :meth:`write_item` writes for ``item`` (a resumed run skips an item when they all exist)."""
        return []

    @abstractmethod
    def write_item(self, item: ItemInfo, seg: Segmentation, image: np.ndarray | None = None) -> dict | None:
        """Write the item's own files atomically; return the record :meth:`finalize` needs (JSON-able) or None."""

    def finalize(self, records: Sequence[tuple[ItemInfo, dict | None]]) -> list[Path]:
        """Write the run-level files atomically from every item's record; return the paths written."""
        return []

    # --- helpers for subclasses ----------------------------------------------------------------------------------
    def _category(self, index: int) -> int:
        """Check a contiguous class index; return it as an int."""
        index = int(index)
        if not 0 <= index < len(self.vocab):
            raise ValueError(f"class index {index} is outside the vocabulary (0..{len(self.vocab) - 1})")
        return index

    def _coco_categories(self, *, color: bool) -> list[dict[str, Any]]:
        """The vocabulary as a COCO ``categories`` list (id, name, supercategory, isthing[, color])."""
        colors = self.vocab.colors()
        out = []
        for i, cls in enumerate(self.vocab):
            entry: dict[str, Any] = {
                "id": self.category_ids[i],
                "name": cls.name,
                "supercategory": "",
                "isthing": int(cls.isthing),
            }
            if color:
                entry["color"] = [int(c) for c in colors[i]]
            out.append(entry)
        return out


def needed_tasks(writers: Iterable[Writer], requested: Iterable[str] = ()) -> set[str]:
    """The ``Segmentation`` fields to compute for these writers: the requested tasks, every writer's ``tasks``, and
    for a writer whose ``any_of_tasks`` is not yet covered, its first (preferred) one."""
    needed = set(requested)
    writers = list(writers)
    for writer in writers:
        needed |= set(writer.tasks)
    for writer in writers:
        if writer.any_of_tasks and not needed.intersection(writer.any_of_tasks):
            needed.add(writer.any_of_tasks[0])
    return needed
