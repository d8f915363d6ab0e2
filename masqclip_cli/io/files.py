"""Files under ``--out``, written safely and deterministically: output paths from item ids, atomic writes (a temporary
file in the same folder, fsynced, then :func:`os.replace`), deterministic JSON (also streamed from iterators) and PNG
encoding. A reader (or a resumed run) never sees a half-written file.
"""

from __future__ import annotations

import errno
import io
import itertools
import json
import os
import re
import secrets
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

__all__ = [
    "STATE_DIR",
    "PNG_COMPRESS_LEVEL",
    "atomic_save_png",
    "atomic_symlink",
    "atomic_write_bytes",
    "atomic_write_chunks",
    "atomic_write_json",
    "atomic_write_json_stream",
    "atomic_write_text",
    "dumps_json",
    "encode_png",
    "output_path",
    "remove_stale_temp_files",
]

#: zlib level of every PNG written (fixed, so files are byte-identical from run to run).
PNG_COMPRESS_LEVEL = 6

_SEPARATORS = re.compile(r"[\\/]+")
_DRIVE = re.compile(r"^[A-Za-z]:$")
_TMP_SUFFIX = ".tmp"
_TMP_NAME = re.compile(r"^\..+\.[0-9a-f]{12}\.tmp$")


# --- paths and atomic writes ---------------------------------------------------------------------------------------


#: The folder under an output folder where a run keeps its state (fingerprint, records, results, lock).
STATE_DIR = ".masqclip"

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


def _remove_quietly(path: Path) -> None:
    try:
        os.unlink(path)
    except OSError:
        pass


def _replace(tmp: Path, path: Path) -> Path:
    """Move a finished temporary file (or link) over ``path``; on failure the temporary is removed."""
    try:
        os.replace(tmp, path)
    except BaseException:
        _remove_quietly(tmp)
        raise
    return path


#: errno values of "this folder cannot be written": a complete output there is still fine to re-check.
_READ_ONLY_ERRNOS = frozenset({errno.EROFS, errno.EACCES, errno.EPERM})


def _same_stream(chunks: Iterable[str | bytes], path: Path) -> bool:
    """Whether the bytes of ``chunks`` (text as UTF-8) are exactly the file at ``path``, read alongside."""
    with open(path, "rb") as f:
        for chunk in chunks:
            data = chunk.encode("utf-8") if isinstance(chunk, str) else bytes(chunk)
            if f.read(len(data)) != data:
                return False
        return f.read(1) == b""


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
    try:
        tmp, f = _open_temp(path)
    except OSError as exc:
        # A folder we may not write to (read-only, no permission): fine when the file already holds these bytes
        # (a re-run over a complete output writes nothing); chunks is then consumed once, to compare.
        if compare and exc.errno in _READ_ONLY_ERRNOS and path.is_file() and _same_stream(chunks, path):
            return path
        raise
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
    except OSError as exc:
        _remove_quietly(tmp)
        if exc.filename is None and exc.errno is not None:  # a failed write (no space): name the file
            raise OSError(exc.errno, exc.strerror, str(path)) from exc
        raise
    except BaseException:
        _remove_quietly(tmp)
        raise
    if compare and _same_file_contents(tmp, path):
        os.unlink(tmp)
        return path
    return _replace(tmp, path)


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


def atomic_symlink(path: str | os.PathLike[str], target: str | os.PathLike[str]) -> Path:
    """Make ``path`` a symbolic link to ``target``, atomically (a temporary link in the same folder, then
    :func:`os.replace`); a link that already points there is left alone."""
    path, target = Path(path), str(target)
    try:
        if path.is_symlink() and os.readlink(path) == target:
            return path
    except OSError:
        pass
    path.parent.mkdir(parents=True, exist_ok=True)
    while True:
        tmp = path.with_name(f".{path.name[:200]}.{secrets.token_hex(6)}{_TMP_SUFFIX}")
        try:
            os.symlink(target, tmp)
            break
        except FileExistsError:  # pragma: no cover - a 48-bit random clash
            continue
    return _replace(tmp, path)
