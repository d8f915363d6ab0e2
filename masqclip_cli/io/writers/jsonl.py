"""``jsonl``: one JSON line per item, to ``out/predictions.jsonl`` or streamed to a text stream (stdout)."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import numpy as np

from masqclip_cli.io.files import atomic_write_chunks, dumps_json
from masqclip_cli.structures import Segmentation
from masqclip_cli.structures.masks import encode_rle, round_score, segment_stats

from .base import ItemInfo, Writer, check_size, ranked_records

__all__ = ["JsonlWriter"]


class JsonlWriter(Writer):
    """One line per item::

        {"id", "width", "height", "segments": [{"id", "category_id", "category", "score", "isthing", "bbox", "area",
        "rle"}]}

    Segments are the instances when the segmentation has them, else the panoptic segments (RLE of each segment's
    pixels on the map); empty segments are left out.

    With an output folder, :meth:`finalize` writes ``out/predictions.jsonl`` (lines sorted by item id). With
    ``out_dir=None``, :meth:`write_item` writes each line to the ``stream`` option (default: ``sys.stdout`` at the
    time of writing) and flushes it, and finalize writes nothing.
    """

    name = "jsonl"
    any_of_tasks = ("instance", "panoptic")
    needs_out_dir = False
    option_defaults = {"stream": None}
    file_name = "predictions.jsonl"

    def line(self, item: ItemInfo, seg: Segmentation) -> str:
        """The item's JSON line (no newline)."""
        size = check_size(item, seg)
        names, isthing = self.vocab.names, self.vocab.isthing
        segments: list[dict[str, Any]] = []

        def add(sid: int, category: int, score: float, area: int, bbox: list[int], rle: dict[str, Any]) -> None:
            index = self._category(category)
            segments.append(
                {
                    "id": int(sid),
                    "category_id": self.category_ids[index],
                    "category": names[index],
                    "score": round_score(score),
                    "isthing": bool(isthing[index]),
                    "bbox": bbox,
                    "area": area,
                    "rle": rle,
                }
            )

        if seg.instances is not None:
            for inst in seg.instances:
                self._category(inst.category)
            try:
                pairs = seg.coco_instances(category_ids=self.category_ids)
            except ValueError as exc:
                raise ValueError(f"item {item.id!r}: {exc}") from None
            for inst, ann in pairs:
                add(inst.id, inst.category, inst.score, ann["area"], ann["bbox"], ann["segmentation"])
        elif seg.panoptic is not None:
            pan = np.asarray(seg.panoptic)
            if pan.shape != size:
                raise ValueError(f"item {item.id!r}: panoptic map is {pan.shape}, the image {size}")
            ordered = sorted(seg.segments, key=lambda s: int(s.id))
            cleaned, areas, bboxes = segment_stats(pan, [int(s.id) for s in ordered])
            for s, area, bbox in zip(ordered, areas, bboxes):
                if area:
                    x, y, w, h = bbox
                    mask = np.zeros(size, dtype=bool)
                    mask[y : y + h, x : x + w] = cleaned[y : y + h, x : x + w] == int(s.id)
                    add(s.id, s.category, s.score, area, bbox, encode_rle(mask))
        else:
            raise ValueError(f"item {item.id!r}: the jsonl writer needs instance or panoptic results")
        obj = {"id": item.id, "width": int(item.width), "height": int(item.height), "segments": segments}
        return dumps_json(obj)

    def write_item(self, item: ItemInfo, seg: Segmentation, image: np.ndarray | None = None) -> dict | None:
        text = self.line(item, seg)
        if self.out_dir is None:
            stream = self.options["stream"] or sys.stdout
            stream.write(text + "\n")
            stream.flush()
            return None
        return {"line": text}

    def finalize(self, records) -> list[Path]:
        if self.out_dir is None:
            return []
        lines = (str(record["line"]) + "\n" for _, _, record in ranked_records(records) if record is not None)
        return [atomic_write_chunks(self.out_dir / self.file_name, lines)]
