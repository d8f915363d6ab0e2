"""``panoptic``: COCO-panoptic PNGs (``out/panoptic/<id>.png``) and ``out/panoptic.json``."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from masqclip_cli.inference.result import Segmentation

from .base import (
    ItemInfo,
    Writer,
    atomic_save_png,
    atomic_write_json_stream,
    check_size,
    coco_images,
    output_path,
    ranked_records,
    round_score,
    segment_stats,
)

__all__ = ["PanopticWriter", "id_to_rgb", "rgb_to_id"]

MAX_SEGMENT_ID = 256**3 - 1


def id_to_rgb(id_map: np.ndarray) -> np.ndarray:
    """(H, W) segment ids -> (H, W, 3) uint8 with id = R + 256 G + 256^2 B (the COCO panoptic encoding)."""
    id_map = np.asarray(id_map, dtype=np.int64)
    if id_map.size and (id_map.min() < 0 or id_map.max() > MAX_SEGMENT_ID):
        raise ValueError(f"panoptic segment ids must be in 0..{MAX_SEGMENT_ID}")
    return np.stack([id_map & 255, (id_map >> 8) & 255, (id_map >> 16) & 255], axis=-1).astype(np.uint8)


def rgb_to_id(rgb: np.ndarray) -> np.ndarray:
    """(H, W, 3) COCO panoptic PNG pixels -> (H, W) int64 segment ids."""
    rgb = np.asarray(rgb, dtype=np.int64)
    return rgb[..., 0] + 256 * rgb[..., 1] + 256 * 256 * rgb[..., 2]


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
        segments = sorted(seg.segments, key=lambda s: int(s.id))
        ids = [int(s.id) for s in segments]
        if any(not 0 < i <= MAX_SEGMENT_ID for i in ids) or len(set(ids)) != len(ids):
            raise ValueError(f"item {item.id!r}: segment ids must be distinct and in 1..{MAX_SEGMENT_ID}")
        cleaned, areas, bboxes = segment_stats(pan, ids)
        infos: list[dict[str, Any]] = []
        for s, area, bbox in zip(segments, areas, bboxes):
            index = self._category(s.category)
            if area == 0:
                continue
            infos.append(
                {
                    "id": int(s.id),
                    "category_id": self.category_ids[index],
                    "iscrowd": 0,
                    "bbox": bbox,
                    "area": area,
                    "score": round_score(s.score),
                }
            )
        path = self._png_path(item)
        atomic_save_png(path, id_to_rgb(cleaned))
        return {"file_name": path.relative_to(self.out_dir / self.kind).as_posix(), "segments_info": infos}

    def finalize(self, records) -> list[Path]:
        """Two streamed passes over ``records`` (images, then annotations): one item's record in memory at a time."""
        assert self.out_dir is not None
        images = coco_images(records)

        def annotations() -> Iterator[dict[str, Any]]:
            for image_id, _, record in ranked_records(records):
                if record is None:
                    continue
                infos = [
                    {
                        "id": int(info["id"]),
                        "category_id": int(info["category_id"]),
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
