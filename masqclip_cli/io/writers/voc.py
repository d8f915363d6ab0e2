"""``voc``: Pascal VOC segmentation masks under ``out/voc/``, as CVAT's "Segmentation mask 1.1" import and
datumaro's ``voc_segmentation`` importer read them.

Files (``<name>`` = the item's VOC name, see below)::

    out/voc/SegmentationClass/<name>.png      palette PNG: pixel = class index + 1 (vocabulary order), 0 = background
    out/voc/SegmentationObject/<name>.png     palette PNG: pixel = object number 1..K in the image, 0 = none
    out/voc/labelmap.txt                      "# label:color_rgb:parts:actions", "background:0,0,0::", then one
                                              "name:r,g,b::" line per class (the vocabulary colours)
    out/voc/ImageSets/Segmentation/default.txt  one item name a line, in item-id order
    out/voc/ImageSets/Main/default.txt        the same list (datumaro 1.x's ``voc`` importer and its format
                                              detection look for ``Main``; CVAT's own VOC exports carry both)

Both maps come from the panoptic result (task ``panoptic``). The class PNG's palette is the label map's colours
(entry 0 black, entry i + 1 = class i's colour); readers decode it by colour, so the writer refuses (at construction)
a vocabulary whose colours are not distinct or use black, and one of more than 255 classes (an 8-bit palette holds
background + 255). The object PNG uses VOC's standard object palette (:func:`voc_object_palette`): object n has
colour n of that palette.

Objects (option ``voc_objects``): ``"all"`` (default) numbers every panoptic segment with pixels, stuff included, in
segment-id order; ``"things"`` numbers the thing segments only and leaves stuff at 0, as the VOC challenge did.
The importers (datumaro's, which CVAT's import runs) build one mask annotation per object of ``SegmentationObject``
and take its label from ``SegmentationClass``; pixels outside every object yield no annotation. So with ``"all"``
the import gives back every segment and its class, lossless, while with ``"things"`` it drops the stuff regions
(they stay in the class PNG). An image with more than 255 objects cannot be written (that item fails).

Masks are per-pixel, so holes and multi-part segments are kept exactly: an object is its pixels, however many
parts or holes they form. Segments with no pixels in the map are skipped (no object number), and map pixels whose id
is no segment's are background (0 in both PNGs). An item with no segments gets all-zero PNGs and is listed.

Names: VOC and CVAT name an item by its file name without extension, so ``<name>`` is the item id without its
extension, keeping its folders (``sub/b.jpg`` -> ``SegmentationClass/sub/b.png`` and ``sub/b`` in the list, which
datumaro reads back as the item ``sub/b``); a video frame ``clip.mp4#000005`` is ``clip#000005``. ``..``, absolute and
empty parts are neutralised as in :func:`~masqclip_cli.io.files.output_path`. Two items with one name (``a.jpg`` and
``a.png``) would overwrite each other: the second one written fails with a message naming both. To catch this across
resumed runs too, each class PNG records the item id it belongs to in an ``iTXt`` chunk (``masqclip-item``); readers
ignore it. A name the list file cannot hold (starting with ``#``, with leading or trailing spaces, or a line break)
also fails the item. Images are not copied: the importers read the masks without them (CVAT matches items to the
task's frames by name).
"""

from __future__ import annotations

import re
import struct
import zlib
from pathlib import Path
from typing import Any

import numpy as np

from masqclip_cli.io.files import atomic_write_bytes, atomic_write_text, encode_png, output_path
from masqclip_cli.structures import Segmentation

from .base import ItemInfo, Writer, check_size, ranked_records

__all__ = ["MAX_CLASSES", "MAX_OBJECTS", "VocWriter", "voc_name", "voc_object_palette"]

#: Classes a palette PNG can hold besides background (pixel value = class index + 1 <= 255).
MAX_CLASSES = 255
#: Objects one SegmentationObject PNG can hold (pixel value 1..255).
MAX_OBJECTS = 255
#: The objects written per image (option ``voc_objects``).
OBJECT_MODES = ("all", "things")

_OWNER_KEY = b"masqclip-item"
_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
_FRAME = re.compile(r"^(?P<video>.+)#(?P<frame>\d+)$")


def voc_object_palette() -> list[tuple[int, int, int]]:
    """VOC's standard 256-colour palette (the one of ``SegmentationObject`` and of the VOC class masks): the bits of
    index i are spread over R, G, B from the most significant bit down (index 1 = (128, 0, 0), 2 = (0, 128, 0))."""
    palette = []
    for index in range(256):
        r = g = b = 0
        c = index
        for bit in range(7, -1, -1):
            r |= (c & 1) << bit
            g |= ((c >> 1) & 1) << bit
            b |= ((c >> 2) & 1) << bit
            c >>= 3
        palette.append((r, g, b))
    return palette


_OBJECT_PALETTE = voc_object_palette()


def voc_name(item_id: str) -> str:
    """The VOC item name of an item id: its path without the file extension, folders kept, ``/``-separated
    (``sub/b.jpg`` -> ``sub/b``; a video frame ``clip.mp4#000005`` -> ``clip#000005``)."""
    parts = list(output_path(".", "voc", item_id, "").parts[1:])  # sanitised as every output path is
    last = parts[-1]
    frame = _FRAME.match(last)
    if frame:
        stem = Path(frame["video"]).stem if Path(frame["video"]).suffix else frame["video"]
        parts[-1] = f"{stem}#{frame['frame']}"
    else:
        parts[-1] = Path(last).stem if Path(last).suffix else last
    return "/".join(parts)


def _png_with_owner(png: bytes, owner: str) -> bytes:
    """``png`` with an ``iTXt`` chunk ``masqclip-item`` = ``owner`` (UTF-8, uncompressed) inserted before IEND."""
    if png[-12:-8] != b"\x00\x00\x00\x00" or png[-8:-4] != b"IEND":
        raise ValueError("not a PNG ending with IEND")
    body = _OWNER_KEY + b"\x00\x00\x00\x00\x00" + owner.encode("utf-8")  # no compression, no language, no translation
    chunk = struct.pack(">I", len(body)) + b"iTXt" + body + struct.pack(">I", zlib.crc32(b"iTXt" + body))
    return png[:-12] + chunk + png[-12:]


def png_owner(path: str | Path) -> str | None:
    """The item id recorded in a class PNG this writer wrote, or None (no file, not a PNG, no such chunk)."""
    try:
        data = Path(path).read_bytes()
    except OSError:
        return None
    if not data.startswith(_PNG_SIGNATURE):
        return None
    pos = len(_PNG_SIGNATURE)
    prefix = _OWNER_KEY + b"\x00"
    while pos + 8 <= len(data):
        length, kind = struct.unpack(">I4s", data[pos : pos + 8])
        body = data[pos + 8 : pos + 8 + length]
        if kind == b"iTXt" and body.startswith(prefix):
            return body[len(prefix) + 4 :].decode("utf-8", "replace")
        if kind == b"IEND":
            break
        pos += 12 + length
    return None


class VocWriter(Writer):
    """Pascal VOC segmentation (``SegmentationClass`` + ``SegmentationObject`` palette PNGs, ``labelmap.txt``, the
    ``ImageSets/{Segmentation,Main}/default.txt`` lists) from the panoptic result. See the module docstring."""

    name = "voc"
    tasks = frozenset({"panoptic"})
    option_defaults = {"voc_objects": "all"}
    root = "voc"
    class_dir = "SegmentationClass"
    object_dir = "SegmentationObject"
    labelmap_file = "labelmap.txt"
    list_files = ("ImageSets/Segmentation/default.txt", "ImageSets/Main/default.txt")

    def __init__(self, out_dir, vocab, **options: Any) -> None:
        super().__init__(out_dir, vocab, **options)
        mode = self.options["voc_objects"]
        if mode not in OBJECT_MODES:
            raise ValueError(f"voc writer: voc_objects must be one of {', '.join(OBJECT_MODES)}, got {mode!r}")
        n = len(vocab)
        if n > MAX_CLASSES:
            raise ValueError(
                f"the voc writer cannot write {n} classes: a VOC class mask is an 8-bit palette PNG, which holds "
                f"background + at most {MAX_CLASSES} classes; use a smaller vocabulary or another format (labels)"
            )
        names = list(vocab.names)
        for name in names:
            bad = (
                not name
                or name != name.strip()
                or name.startswith("#")
                or any(c in name for c in ":\n\r")
                or name == "background"
            )
            if bad:
                raise ValueError(
                    f"the voc writer cannot write the class name {name!r} into labelmap.txt: names must be non-empty, "
                    "without ':' or line breaks, not start with '#' or a space, and not be 'background' (label 0)"
                )
        seen: dict[str, int] = {}
        for i, name in enumerate(names):
            if name in seen:
                raise ValueError(f"the voc writer needs distinct class names: {name!r} is class {seen[name]} and {i}")
            seen[name] = i
        self._colors = [tuple(int(v) for v in c) for c in vocab.colors()]
        owner: dict[tuple[int, int, int], str] = {(0, 0, 0): "background"}
        for name, color in zip(names, self._colors):
            if color in owner:
                raise ValueError(
                    f"the voc writer needs a distinct colour per class (VOC masks are decoded by colour, black is "
                    f"background): {name!r} and {owner[color]!r} are both {color}; give them other colours"
                )
            owner[color] = name
        self._class_palette = [(0, 0, 0), *self._colors]
        self._claimed: dict[str, str] = {}  # VOC name -> item id, for the items written by this writer

    # --- paths ---------------------------------------------------------------------------------------------------
    def _paths(self, name: str) -> tuple[Path, Path]:
        assert self.out_dir is not None
        base = self.out_dir / self.root
        return output_path(base, self.class_dir, name, ".png"), output_path(base, self.object_dir, name, ".png")

    def item_files(self, item: ItemInfo) -> list[Path]:
        return list(self._paths(voc_name(item.id)))

    # --- per item ------------------------------------------------------------------------------------------------
    def _checked_name(self, item: ItemInfo) -> str:
        name = voc_name(item.id)
        if name != name.strip() or name.startswith("#") or "\n" in name or "\r" in name:
            raise ValueError(
                f"item {item.id!r}: its VOC name {name!r} cannot be a line of ImageSets/Segmentation/default.txt "
                "(it starts with '#' or a space, ends with a space or holds a line break); rename the file"
            )
        other = self._claimed.get(name)
        if other is None:
            other = png_owner(self._paths(name)[0])
        if other is not None and other != item.id:
            raise ValueError(
                f"item {item.id!r}: VOC names items by file name without extension, and {name!r} is already item "
                f"{other!r}'s (voc/{self.class_dir}/{name}.png); rename one of the two files"
            )
        return name

    def _maps(self, item: ItemInfo, seg: Segmentation, size: tuple[int, int]) -> tuple[np.ndarray, np.ndarray, int]:
        """(class map, object map, object count), both (H, W) uint8."""
        if seg.panoptic is None:
            raise ValueError(f"item {item.id!r}: the voc writer needs panoptic results (task 'panoptic')")
        pan = np.asarray(seg.panoptic)
        if pan.shape != size or not np.issubdtype(pan.dtype, np.integer):
            raise ValueError(f"item {item.id!r}: panoptic map is {pan.dtype} {pan.shape}, need integers {size}")
        table = seg.segments
        table = table[np.argsort(table.id, kind="stable")]
        ids = table.id.tolist()
        if len(set(ids)) != len(ids) or any(i <= 0 for i in ids):
            raise ValueError(f"item {item.id!r}: panoptic segment ids must be distinct and positive")
        for c in table.class_id.tolist():
            self._category(c)
        present, inverse = np.unique(pan.astype(np.int64, copy=False), return_inverse=True)
        in_map = set(present.tolist())
        class_of: dict[int, int] = {}
        object_of: dict[int, int] = {}
        things_only = self.options["voc_objects"] == "things"
        for sid, category, isthing in zip(ids, table.class_id.tolist(), table.isthing.tolist()):
            if sid not in in_map:  # no pixels: skipped
                continue
            class_of[sid] = category + 1
            if isthing or not things_only:
                object_of[sid] = len(object_of) + 1
        if len(object_of) > MAX_OBJECTS:
            raise ValueError(
                f"item {item.id!r}: {len(object_of)} objects do not fit a VOC object PNG (at most {MAX_OBJECTS})"
            )
        values = present.tolist()
        class_lut = np.array([class_of.get(v, 0) for v in values], dtype=np.uint8)
        object_lut = np.array([object_of.get(v, 0) for v in values], dtype=np.uint8)
        inverse = inverse.reshape(size)
        return class_lut[inverse], object_lut[inverse], len(object_of)

    def write_item(self, item: ItemInfo, seg: Segmentation, image: np.ndarray | None = None) -> dict:
        size = check_size(item, seg)
        class_map, object_map, objects = self._maps(item, seg, size)
        name = self._checked_name(item)
        class_path, object_path = self._paths(name)
        self._claimed[name] = item.id
        atomic_write_bytes(object_path, encode_png(object_map, palette=_OBJECT_PALETTE))
        atomic_write_bytes(class_path, _png_with_owner(encode_png(class_map, palette=self._class_palette), item.id))
        return {"name": name, "objects": objects}

    # --- run level -----------------------------------------------------------------------------------------------
    def finalize(self, records) -> list[Path]:
        assert self.out_dir is not None
        base = self.out_dir / self.root
        lines = ["# label:color_rgb:parts:actions", "background:0,0,0::"]
        lines += [f"{name}:{r},{g},{b}::" for name, (r, g, b) in zip(self.vocab.names, self._colors)]
        labelmap = atomic_write_text(base / self.labelmap_file, "\n".join(lines) + "\n")
        names: dict[str, str] = {}
        for _, item, record in ranked_records(records):
            if record is None:
                continue
            name = str(record["name"])
            if name in names:
                raise ValueError(f"voc writer: items {names[name]!r} and {item.id!r} share the VOC name {name!r}")
            names[name] = item.id
        listing = "".join(f"{name}\n" for name in names)
        return [labelmap, *(atomic_write_text(base / rel, listing) for rel in self.list_files)]
