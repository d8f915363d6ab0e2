"""``coco``: every instance of the run in one COCO instance-segmentation JSON, ``out/instances.json``."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from masqclip_cli.io.files import atomic_write_json_stream
from masqclip_cli.structures import Segmentation
from masqclip_cli.structures.masks import round_score

from .base import ItemInfo, Writer, check_size, coco_images, ranked_records

__all__ = ["CocoWriter"]


class CocoWriter(Writer):
    """COCO instance JSON: ``images`` (id = 1-based rank of the item id), ``annotations`` (RLE segmentation, area,
    integer bbox, score, iscrowd 0; empty masks are left out) and ``categories`` (the vocabulary, with isthing).

    It loads in pycocotools as ground truth (``COCO``) and its ``annotations`` as results (``COCO.loadRes``).
    Nothing is written per item: the record holds the item's annotations.
    """

    name = "coco"
    tasks = frozenset({"instance"})
    default_for_task = "instance"
    file_name = "instances.json"

    def write_item(self, item: ItemInfo, seg: Segmentation, image: np.ndarray | None = None) -> dict:
        check_size(item, seg)
        if seg.instances is None:
            raise ValueError(f"item {item.id!r}: the coco writer needs instance results (task 'instance')")
        for inst in seg.instances:
            self._category(inst.category)
        try:
            annotations = seg.to_coco(category_ids=self.category_ids)
        except ValueError as exc:
            raise ValueError(f"item {item.id!r}: {exc}") from None
        return {"annotations": annotations}

    def finalize(self, records) -> list[Path]:
        """Two streamed passes over ``records`` (images, then annotations): one item's record in memory at a time."""
        assert self.out_dir is not None
        images = coco_images(records)

        def annotations() -> Iterator[dict[str, Any]]:
            count = 0
            for image_id, _, record in ranked_records(records):
                if record is None:
                    continue
                for ann in record["annotations"]:
                    rle = ann["segmentation"]
                    count += 1
                    yield {
                        "id": count,
                        "image_id": image_id,
                        "category_id": int(ann["category_id"]),
                        "segmentation": {"size": [int(v) for v in rle["size"]], "counts": str(rle["counts"])},
                        "area": int(ann["area"]),
                        "bbox": [int(v) for v in ann["bbox"]],
                        "iscrowd": 0,
                        "score": round_score(ann["score"]),
                    }

        data = {"images": images, "annotations": annotations(), "categories": self._coco_categories(color=False)}
        return [atomic_write_json_stream(self.out_dir / self.file_name, data)]
