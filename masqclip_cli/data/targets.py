"""A dataset sample's ground truth as mask targets: what training learns and what evaluation's proposal recall and
mask-label accuracy score against.

:func:`sample_targets`: panoptic datasets give one mask per non-crowd segment (its class = the segment's class);
instance datasets one per non-crowd annotation; semantic datasets one per class present (ignore pixels are in no
mask). Classes are contiguous indices into the dataset vocabulary. :func:`instance_annotations` groups an instance
dataset's COCO annotations by sample id, the ``instances`` argument of :func:`sample_targets`.
"""

from __future__ import annotations

import numpy as np
from pycocotools import mask as mask_utils

from masqclip_cli.data.datasets import DatasetError, EvalDataset, EvalSample

__all__ = ["instance_annotations", "sample_targets"]


def sample_targets(
    dataset: EvalDataset, sample: EvalSample, instances: dict[str, list[dict]] | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """``(masks (G, H, W) bool, classes (G,) int64)`` of one sample at its stored resolution (see the module
    docstring). ``instances`` maps sample ids to their COCO annotations (instance datasets; see
    :func:`instance_annotations`)."""
    if dataset.task == "panoptic":
        ids, segments = sample.panoptic_gt()
        masks, classes = [], []
        for seg in segments:
            if seg.iscrowd:
                continue
            m = ids == seg.id
            if m.any():
                masks.append(m)
                classes.append(seg.category)
        h, w = ids.shape
    elif dataset.task == "semantic":
        labels = sample.semantic_gt()
        h, w = labels.shape
        present = [int(c) for c in np.unique(labels) if c >= 0]
        masks = [labels == c for c in present]
        classes = present
    elif dataset.task == "instance":
        h, w = sample.image_size()
        masks, classes = [], []
        category_index = {int(c["id"]): i for i, c in enumerate(_instance_categories(dataset))}
        for ann in (instances or {}).get(sample.id, []):
            if ann.get("iscrowd", 0):
                continue
            m = mask_utils.decode(ann["segmentation"]).astype(bool)
            if m.shape != (h, w):
                raise DatasetError(
                    f"{sample.image_path}: annotation {ann.get('id')} is {m.shape[0]}x{m.shape[1]}, the image {h}x{w}"
                )
            if m.any():
                masks.append(m)
                classes.append(category_index[int(ann["category_id"])])
    else:  # pragma: no cover - EvalDataset.task is one of the three
        raise DatasetError(f"dataset {dataset.name}: unknown ground-truth kind {dataset.task!r}")
    stacked = np.stack(masks) if masks else np.zeros((0, h, w), dtype=bool)
    return stacked, np.asarray(classes, dtype=np.int64)


def instance_annotations(dataset: EvalDataset) -> dict[str, list[dict]] | None:
    """The COCO annotations of :meth:`EvalDataset.instance_gt_coco` grouped by sample id, for instance datasets
    (None for the others, whose :func:`sample_targets` reads the panoptic / semantic ground truth)."""
    if dataset.task != "instance":
        return None
    gt = dataset.instance_gt_coco()
    by_image = {int(img["id"]): img["file_name"] for img in gt["images"]}
    grouped: dict[str, list[dict]] = {}
    for ann in gt["annotations"]:
        grouped.setdefault(by_image[int(ann["image_id"])], []).append(ann)
    return grouped


def _instance_categories(dataset: EvalDataset) -> list[dict]:
    return dataset.instance_gt_coco()["categories"]
