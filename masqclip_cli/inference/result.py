"""The one result type every writer and metric consumes: :class:`Segmentation`, at the original image size."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

__all__ = ["Segment", "Segmentation", "mask_bbox"]


def mask_bbox(mask: np.ndarray) -> tuple[float, float, float, float]:
    """COCO box (x, y, width, height) of a boolean (H, W) mask; (0, 0, 0, 0) when empty."""
    rows = np.flatnonzero(mask.any(axis=1))
    if rows.size == 0:
        return (0.0, 0.0, 0.0, 0.0)
    cols = np.flatnonzero(mask.any(axis=0))
    return (float(cols[0]), float(rows[0]), float(cols[-1] - cols[0] + 1), float(rows[-1] - rows[0] + 1))


@dataclass
class Segment:
    """One panoptic segment or one instance.

    Attributes:
        id: panoptic segment id (1-based, the value in ``Segmentation.panoptic``); for instances, 1-based rank.
        category: contiguous class index into the vocabulary (0..N-1), not the dataset id.
        score: confidence in [0, 1].
        isthing: thing or stuff, from the vocabulary.
        area: pixel count.
        bbox: COCO (x, y, width, height).
        mask: (H, W) bool for instances (they may overlap); None for panoptic segments (read them from the map).
        query: index of the proposal query it came from.
    """

    id: int
    category: int
    score: float
    isthing: bool
    area: int
    bbox: tuple[float, float, float, float]
    mask: np.ndarray | None = field(default=None, repr=False)
    query: int = -1


@dataclass
class Segmentation:
    """Everything the requested tasks produced for one image, at its original size (H, W).

    Attributes:
        image_size: (H, W).
        semantic: (H, W) int32 class index (0..N-1) of the per-pixel argmax, or None when not requested.
        panoptic: (H, W) int32 segment ids, 0 = unlabelled, or None.
        segments: panoptic segments (ids match ``panoptic``), in id order.
        instances: instances sorted by descending score, each with its own mask, or None when not requested.
    """

    image_size: tuple[int, int]
    semantic: np.ndarray | None = field(default=None, repr=False)
    panoptic: np.ndarray | None = field(default=None, repr=False)
    segments: list[Segment] = field(default_factory=list)
    instances: list[Segment] | None = None
