"""Output writers: what ``masqclip segment --format ...`` writes under ``--out``.

=========  ====================================================================  =====================
format     files                                                                 needs
=========  ====================================================================  =====================
coco       ``instances.json`` (COCO instance JSON, RLE masks)                    instance
panoptic   ``panoptic/<id>.png`` + ``panoptic.json`` (COCO panoptic)             panoptic
labels     ``labels/<id>.png`` (+ ``labels_color/<id>.png``), legend JSON        semantic
overlay    ``overlay/<id>.jpg`` (or ``.png``): the image with masks drawn        any one, + the image
jsonl      ``predictions.jsonl``, or one line per item on a stream               instance or panoptic
=========  ====================================================================  =====================

``<id>`` is the item id with the suffix appended (``a.jpg`` -> ``a.jpg.png``), see :func:`output_path`.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

from masqclip_cli.vocab import Vocabulary

from .base import (
    ItemInfo,
    Writer,
    atomic_save_png,
    atomic_write_bytes,
    atomic_write_json,
    atomic_write_text,
    category_ids,
    needed_tasks,
    output_path,
    remove_stale_temp_files,
)
from .coco import CocoWriter
from .jsonl import JsonlWriter
from .labels import LabelsWriter
from .overlay import OverlayWriter
from .panoptic import PanopticWriter

__all__ = [
    "WRITERS",
    "CocoWriter",
    "ItemInfo",
    "JsonlWriter",
    "LabelsWriter",
    "OverlayWriter",
    "PanopticWriter",
    "Writer",
    "atomic_save_png",
    "atomic_write_bytes",
    "atomic_write_json",
    "atomic_write_text",
    "category_ids",
    "make_writers",
    "needed_tasks",
    "output_path",
    "remove_stale_temp_files",
]

#: Every output format, by ``--format`` name.
WRITERS: dict[str, type[Writer]] = {
    cls.name: cls for cls in (CocoWriter, PanopticWriter, LabelsWriter, OverlayWriter, JsonlWriter)
}


def make_writers(
    formats: Sequence[str] | str,
    out_dir: str | os.PathLike[str] | None,
    vocab: Vocabulary,
    **options: Any,
) -> list[Writer]:
    """Writers for ``formats`` (names from :data:`WRITERS`; an entry may hold several separated by commas; case and
    repeats ignored), in the order given.

    Each writer gets only the options it declares (``Writer.option_defaults``), so one options dict can serve every
    format; an option that no known format declares is a ValueError, as is an unknown format.
    """
    if isinstance(formats, str):
        formats = [formats]
    names: list[str] = []
    for entry in formats:
        for name in str(entry).split(","):
            name = name.strip().lower()
            if name and name not in names:
                names.append(name)
    unknown = [n for n in names if n not in WRITERS]
    if unknown:
        raise ValueError(
            f"unknown output format{'s' if len(unknown) > 1 else ''} {', '.join(repr(n) for n in unknown)}; "
            f"known formats: {', '.join(WRITERS)}"
        )
    declared = {opt for cls in WRITERS.values() for opt in cls.option_defaults}
    stray = sorted(set(options) - declared)
    if stray:
        raise ValueError(f"unknown writer option(s) {', '.join(stray)}; known options: {', '.join(sorted(declared))}")
    writers = []
    for name in names:
        cls = WRITERS[name]
        own = {k: v for k, v in options.items() if k in cls.option_defaults}
        writers.append(cls(out_dir, vocab, **own))
    return writers
