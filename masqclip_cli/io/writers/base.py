"""The writer interface and what every writer shares: :class:`ItemInfo`, the per-item record order
(:func:`ranked_records`), the COCO ``images`` list, and the size check.

Everything a writer puts under ``--out`` is a pure function of the inputs and options: JSON has a fixed key order,
compact separators and scores rounded to :data:`~masqclip_cli.structures.masks.SCORE_DECIMALS` decimals; PNGs are
encoded with no metadata at a fixed compression level; every file is written atomically (:mod:`masqclip_cli.io.files`).
"""

from __future__ import annotations

import os
from abc import ABC, abstractmethod
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import numpy as np

from masqclip_cli.structures import TASKS, Segmentation
from masqclip_cli.vocab import Vocabulary

__all__ = [
    "REGISTERED_WRITERS",
    "TASKS",
    "ItemInfo",
    "Writer",
    "check_size",
    "coco_images",
    "needed_tasks",
    "ranked_records",
]



@dataclass(frozen=True)
class ItemInfo:
    """One input item.

    Attributes:
        id: stable item id, unique in a run (e.g. ``"sub/a.jpg"``, ``"clip.mp4#000005"``); outputs are named from it.
        file_name: the name written into ``images[].file_name`` of the COCO-style JSON files.
        width, height: the image size in pixels.
        source: the absolute path of the source file (for an image; a video for its frames), or None. Kept in the
            item's record only when some writer of the run declares ``needs_source`` (e.g. to copy or link images).
        sequence: the name of the tracked sequence the item is a frame of (a video's id, ``"clip.mp4"``, or the
            ``--sequence`` folder's), or None when the run does not track. Within a tracked sequence the
            ``Segmentation`` a writer gets carries track ids: ``instances.id`` and the thing ``segments.id`` (and so
            the panoptic map) are the track ids, the same object keeping its id across frames; stuff keeps one id per
            class for the whole sequence.
        frame: the 0-based position of the item in its sequence (frames in order, after ``--every``), or None.
    """

    id: str
    file_name: str
    width: int
    height: int
    source: str | None = None
    sequence: str | None = None
    frame: int | None = None


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


#: Every :class:`Writer` subclass with a ``name``, by name, in the order their modules were imported.
REGISTERED_WRITERS: dict[str, type[Writer]] = {}


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
        default_for_task: the task whose default format it is (``--format`` omitted), or None.
        needs_image: whether :meth:`write_item` needs the decoded image.
        needs_source: whether it needs ``ItemInfo.source`` (the source file's path), in write_item and finalize.
        needs_out_dir: whether it can run with ``out_dir=None``.
        option_defaults: the options it accepts, with their defaults.
    """

    name: ClassVar[str] = ""
    tasks: ClassVar[frozenset[str]] = frozenset()
    any_of_tasks: ClassVar[tuple[str, ...]] = ()
    default_for_task: ClassVar[str | None] = None
    needs_image: ClassVar[bool] = False
    needs_source: ClassVar[bool] = False
    needs_out_dir: ClassVar[bool] = True
    option_defaults: ClassVar[Mapping[str, Any]] = {}

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if cls.name:  # a concrete format: register it under its --format name
            other = REGISTERED_WRITERS.get(cls.name)
            if other is not None and other.__qualname__ != cls.__qualname__:
                raise ValueError(f"two writers are named {cls.name!r}: {other.__qualname__} and {cls.__qualname__}")
            REGISTERED_WRITERS[cls.name] = cls

    #: Per tracked sequence, each track id's class index as decided over the whole sequence (a score-weighted vote,
    #: :meth:`masqclip_cli.inference.tracking.Tracker.track_category`), set by the engine before :meth:`finalize`;
    #: empty when the run does not track. Writers that summarise tracks (one class per track) read it.
    track_classes: dict[str, dict[int, int]]

    def __init__(self, out_dir: str | os.PathLike[str] | None, vocab: Vocabulary, **options: Any) -> None:
        unknown = sorted(set(options) - set(self.option_defaults))
        if unknown:
            known = ", ".join(sorted(self.option_defaults)) or "none"
            raise TypeError(f"{self.name} writer: unknown option(s) {', '.join(unknown)} (known: {known})")
        if out_dir is None and self.needs_out_dir:
            raise ValueError(f"the {self.name} writer needs an output folder")
        self.out_dir: Path | None = None if out_dir is None else Path(out_dir)
        self.vocab = vocab
        self.category_ids: list[int] = vocab.category_ids()
        self.options: dict[str, Any] = {**self.option_defaults, **options}
        self.track_classes = {}

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

    def _mask_regions(self, item: ItemInfo, seg: Segmentation) -> list[tuple[int, float, np.ndarray]]:
        """``(class index, score, (H, W) bool mask)`` of every instance when the result has instances, else of every
        panoptic segment (its pixels in the panoptic map); a one-line ValueError naming the item otherwise."""
        size = tuple(int(v) for v in seg.image_size)
        if seg.instances is not None:
            try:
                checked = seg.instance_masks()
            except ValueError as exc:
                raise ValueError(f"item {item.id!r}: {exc}") from None
            return [(self._category(inst.category), inst.score, mask) for inst, mask in checked]
        if seg.panoptic is None:
            raise ValueError(f"item {item.id!r}: the {self.name} writer needs instance or panoptic results")
        pan = np.asarray(seg.panoptic)
        if pan.shape != size:
            raise ValueError(f"item {item.id!r}: panoptic map is {pan.shape}, the image {size}")
        return [(self._category(s.category), s.score, pan == s.id) for s in seg.segments]

    def _coco_categories(self, *, color: bool) -> list[dict[str, Any]]:
        """The vocabulary as a COCO ``categories`` list (id, name, supercategory, isthing[, color])."""
        colors = self.vocab.colors()
        out = []
        for i, cls in enumerate(self.vocab):
            entry: dict[str, Any] = {
                "id": self.category_ids[i],
                "name": cls.name,
                "supercategory": cls.supercategory or "",
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
