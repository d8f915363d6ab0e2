"""``panoptic``: COCO-panoptic PNGs (``out/panoptic/<id>.png``) and ``out/panoptic.json``."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from masqclip_cli.io.files import atomic_save_png, atomic_write_json_stream, output_path
from masqclip_cli.structures import Segmentation
from masqclip_cli.structures.masks import round_score

from .base import ItemInfo, Writer, check_size, coco_images, ranked_records

__all__ = ["PanopticWriter"]


class PanopticWriter(Writer):
    """COCO panoptic format, as the reference tools read it.

    Per item, ``out/panoptic/<item id>.png``: RGB, segment id = R + 256 G + 256^2 B, 0 = unlabelled. Segments with no
    pixels are left out, and pixels whose id is not one of ``seg.segments`` are written as 0, so the PNG and the JSON
    always agree. ``out/panoptic.json``: ``images`` (id = 1-based rank of the item id), ``annotations`` (image_id,
    file_name = the PNG's path relative to ``out/panoptic/``, segments_info with id, category_id, iscrowd, bbox, area
    measured on the map, score) and ``categories`` (id, name, supercategory, isthing, color).
    """

    name = "panoptic"
    tasks = frozenset({"panoptic"})
    default_for_task = "panoptic"
    kind = "panoptic"
    file_name = "panoptic.json"

    def _png_path(self, item: ItemInfo) -> Path:
        assert self.out_dir is not None
        return output_path(self.out_dir, self.kind, item.id, ".png")

    def item_files(self, item: ItemInfo) -> list[Path]:
        return [self._png_path(item)]

    def write_item(self, item: ItemInfo, seg: Segmentation, image: np.ndarray | None = None) -> dict:
        size = check_size(item, seg)
        if seg.panoptic is None:
            raise ValueError(f"item {item.id!r}: the panoptic writer needs panoptic results (task 'panoptic')")
        pan = np.asarray(seg.panoptic)
        if pan.shape != size:
            raise ValueError(f"item {item.id!r}: panoptic map is {pan.shape}, the image {size}")
        for s in seg.segments:
            self._category(s.category)
        try:
            png, infos = seg.to_panoptic(category_ids=self.category_ids)
        except ValueError as exc:
            raise ValueError(f"item {item.id!r}: {exc}") from None
        path = self._png_path(item)
        atomic_save_png(path, png)
        return {"file_name": path.relative_to(self.out_dir / self.kind).as_posix(), "segments_info": infos}

    def finalize(self, records) -> list[Path]:
        """Two streamed passes over ``records`` (images, then annotations): one item's record in memory at a time.
        In a tracked sequence a segment id is its track id and its ``category_id`` the track's class decided over
        the whole sequence (:attr:`Writer.track_classes`), the same in every frame."""
        assert self.out_dir is not None
        images = coco_images(records)

        def annotations() -> Iterator[dict[str, Any]]:
            for image_id, item, record in ranked_records(records):
                if record is None:
                    continue
                decided = self.track_classes.get(item.sequence, {}) if item.sequence is not None else {}
                infos = [
                    {
                        "id": int(info["id"]),
                        "category_id": (self.category_ids[decided[int(info["id"])]] if int(info["id"]) in decided
                                        else int(info["category_id"])),
                        "iscrowd": 0,
                        "bbox": [int(v) for v in info["bbox"]],
                        "area": int(info["area"]),
                        "score": round_score(info["score"]),
                    }
                    for info in record["segments_info"]
                ]
                yield {"image_id": image_id, "file_name": str(record["file_name"]), "segments_info": infos}

        data = {"images": images, "annotations": annotations(), "categories": self._coco_categories(color=True)}
        return [atomic_write_json_stream(self.out_dir / self.file_name, data)]
