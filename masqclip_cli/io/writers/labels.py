"""``labels``: semantic label maps, ``out/labels/<id>.png`` (pixel = category id), and ``out/labels_legend.json``."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from masqclip_cli.io.files import atomic_save_png, atomic_write_json, output_path
from masqclip_cli.structures import Segmentation
from masqclip_cli.vocab import Vocabulary, short_name

from .base import ItemInfo, Writer, check_size

__all__ = ["MAX_LABEL_ID", "LabelsWriter", "check_labels_vocabulary"]

#: The largest category id a label PNG holds (they are 16-bit at most).
MAX_LABEL_ID = 65535


def check_labels_vocabulary(vocab: Vocabulary) -> list[int]:
    """The category ids the labels writer would write for ``vocab`` (:meth:`Vocabulary.category_ids`), after checking
    that they fit: none is 0 (the unlabelled value) and none is above :data:`MAX_LABEL_ID`. Cheap (no model, no
    files), so a caller can run it before any model loads; :class:`LabelsWriter` runs it when it is built.

    Raises:
        ValueError: one line naming the (first) offending class and its id.
    """
    ids = vocab.category_ids()
    if 0 in ids:
        raise ValueError(
            "the labels writer uses 0 for unlabelled pixels but the vocabulary has a category with id 0 "
            f"('{short_name(vocab.names[ids.index(0)])}'); give it another id"
        )
    too_big = [i for i, category_id in enumerate(ids) if category_id > MAX_LABEL_ID]
    if too_big:
        first = too_big[0]
        more = f" (and {len(too_big) - 1} more above {MAX_LABEL_ID})" if len(too_big) > 1 else ""
        raise ValueError(
            f"{short_name(vocab.source, 200)}: class '{short_name(vocab.names[first])}' has category id {ids[first]}"
            f"{more}, but labels PNGs are 16-bit (ids up to {MAX_LABEL_ID}); use --format panoptic, or a vocabulary "
            "with smaller ids"
        )
    return ids


class LabelsWriter(Writer):
    """Per item ``out/labels/<item id>.png``: one channel, pixel value = category id, 0 = unlabelled (semantic values
    outside the vocabulary). uint8 when every category id of the vocabulary is <= 255, else uint16 (the same for all
    items of a run).

    Option ``palette=True`` also writes ``out/labels_color/<item id>.png``: a palette (P-mode) PNG whose pixel values
    are the same category ids, with the vocabulary colours (0 = black); when some id is above 255 a palette cannot
    hold it and that file is an RGB PNG instead. ``out/labels_legend.json`` lists the categories (id, name, color,
    isthing).
    """

    name = "labels"
    tasks = frozenset({"semantic"})
    default_for_task = "semantic"
    option_defaults = {"palette": False}
    kind = "labels"
    color_kind = "labels_color"
    file_name = "labels_legend.json"

    def __init__(self, out_dir, vocab: Vocabulary, **options: Any) -> None:
        super().__init__(out_dir, vocab, **options)
        ids = check_labels_vocabulary(vocab)  # before any item is processed
        self.dtype = np.uint8 if max(ids) <= 255 else np.uint16
        # Lookup: contiguous index + 1 -> category id (index 0 = out of vocabulary -> 0).
        self._lut = np.array([0, *ids], dtype=self.dtype)
        colors = vocab.colors()
        self._color_lut = np.array([(0, 0, 0), *colors], dtype=np.uint8)
        if self.dtype == np.uint8:
            palette = [(0, 0, 0)] * 256
            for i, cid in enumerate(ids):
                palette[cid] = tuple(colors[i])
            self._palette: list[tuple[int, int, int]] | None = palette
        else:
            self._palette = None

    def _paths(self, item: ItemInfo) -> tuple[Path, Path]:
        assert self.out_dir is not None
        return (
            output_path(self.out_dir, self.kind, item.id, ".png"),
            output_path(self.out_dir, self.color_kind, item.id, ".png"),
        )

    def item_files(self, item: ItemInfo) -> list[Path]:
        labels, color = self._paths(item)
        return [labels, color] if self.options["palette"] else [labels]

    def write_item(self, item: ItemInfo, seg: Segmentation, image: np.ndarray | None = None) -> None:
        size = check_size(item, seg)
        if seg.semantic is None:
            raise ValueError(f"item {item.id!r}: the labels writer needs semantic results (task 'semantic')")
        sem = np.asarray(seg.semantic)
        if sem.shape != size or not np.issubdtype(sem.dtype, np.integer):
            raise ValueError(f"item {item.id!r}: semantic map is {sem.dtype} {sem.shape}, need integers {size}")
        sem = sem.astype(np.int64, copy=False)
        index = np.where((sem >= 0) & (sem < len(self.vocab)), sem + 1, 0)
        labels_path, color_path = self._paths(item)
        label_map = self._lut[index]
        atomic_save_png(labels_path, label_map)
        if self.options["palette"]:
            if self._palette is not None:
                atomic_save_png(color_path, label_map, palette=self._palette)
            else:
                atomic_save_png(color_path, self._color_lut[index])
        return None

    def finalize(self, records) -> list[Path]:
        assert self.out_dir is not None
        colors = self.vocab.colors()
        legend = {
            "unlabelled": 0,
            "dtype": np.dtype(self.dtype).name,
            "categories": [
                {
                    "id": self.category_ids[i],
                    "name": cls.name,
                    "color": [int(c) for c in colors[i]],
                    "isthing": bool(cls.isthing),
                }
                for i, cls in enumerate(self.vocab)
            ],
        }
        return [atomic_write_json(self.out_dir / self.file_name, legend, indent=1)]
