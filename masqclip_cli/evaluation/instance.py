"""COCO mask AP through pycocotools' ``COCOeval`` (``iouType="segm"``), reported like detectron2's COCOEvaluator.

* ``AP``, ``AP50``, ``AP75``, ``APs``, ``APm``, ``APl`` are ``COCOeval.stats[0:6]`` × 100 (NaN where COCOeval gives -1,
  i.e. no ground truth in that bucket), with the default parameters (IoU 0.50:0.05:0.95, 101 recall points,
  ``maxDets`` 1/10/100, COCO area ranges).
* As detectron2 does, a ``"bbox"`` key in the results is dropped before ``loadRes``: otherwise pycocotools would take
  the box area, not the mask area, as the detection's area for the small / medium / large buckets.
* Per-category AP: mean of ``precision[:, :, k, area=all, maxDets=100]`` over its entries > -1, × 100 (NaN for a
  category without ground truth), as detectron2's per-category table.
* Subsets (name → category ids, e.g. base / novel): the numbers ``COCOeval`` gives with ``params.catIds`` restricted
  to the subset. COCOeval evaluates and accumulates every category on its own, so they are read from the full run's
  precision array (same values, same order, same mean) instead of running the evaluation again.
* Empty ``results``: evaluated against an empty detection set (pycocotools' ``loadRes`` cannot load an empty list),
  which gives 0 for every bucket that has ground truth.

The inputs are not modified (pycocotools rewrites the annotations it is given; copies are passed).
"""

from __future__ import annotations

import contextlib
import copy
import io
import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

__all__ = ["coco_mask_ap", "METRICS"]

METRICS = ("AP", "AP50", "AP75", "APs", "APm", "APl")
_RESERVED = frozenset(METRICS) | {"per_class"}
_REQUIRED = ("image_id", "category_id", "segmentation", "score")


def _quiet():
    return contextlib.redirect_stdout(io.StringIO())


def _load_gt(gt: Any):
    from pycocotools.coco import COCO

    if isinstance(gt, COCO):
        return gt
    if isinstance(gt, (str, Path)):
        with open(gt, encoding="utf-8") as f:
            dataset = json.load(f)
    elif isinstance(gt, Mapping):
        # COCOeval replaces each annotation's "segmentation" by its RLE and adds "ignore": work on copies.
        dataset = dict(gt)
        dataset["annotations"] = [dict(a) for a in gt.get("annotations", [])]
    else:
        raise TypeError(f"gt must be a COCO json path, a dict or a pycocotools COCO, got {type(gt).__name__}")
    for key in ("images", "categories"):
        if key not in dataset:
            raise ValueError(f"COCO ground truth has no {key!r}")
    dataset.setdefault("annotations", [])
    coco = COCO()
    coco.dataset = dataset
    with _quiet():
        coco.createIndex()
    return coco


def _load_results(coco_gt, results: Sequence[Mapping[str, Any]]):
    from pycocotools.coco import COCO

    anns = []
    for i, r in enumerate(results):
        missing = [k for k in _REQUIRED if k not in r]
        if missing:
            raise ValueError(f"result {i} lacks {', '.join(missing)}")
        ann = {k: v for k, v in r.items() if k != "bbox"}
        seg = ann["segmentation"]
        if not isinstance(seg, Mapping) or "counts" not in seg or "size" not in seg:
            raise ValueError(f"result {i}: segmentation must be a compressed RLE dict with 'size' and 'counts'")
        ann["segmentation"] = dict(seg)
        anns.append(ann)
    unknown = sorted({a["image_id"] for a in anns} - set(coco_gt.getImgIds()))
    if unknown:
        raise ValueError(f"results refer to image ids not in the ground truth: {unknown[:10]}")
    if anns:
        with _quiet():
            return coco_gt.loadRes(anns)
    empty = COCO()
    empty.dataset = {
        "images": list(coco_gt.dataset["images"]),
        "categories": copy.deepcopy(coco_gt.dataset["categories"]),
        "annotations": [],
    }
    with _quiet():
        empty.createIndex()
    return empty


def _percent(x: float) -> float:
    return float(x * 100) if x >= 0 else float("nan")


def _summarize_ap(coco_eval, k_indices: Sequence[int]) -> dict[str, float]:
    """``COCOeval.summarize``'s six AP numbers over categories ``k_indices`` (positions in ``params.catIds``)."""
    p = coco_eval.params
    precision = coco_eval.eval["precision"]  # (T, R, K, A, M)
    m = [i for i, d in enumerate(p.maxDets) if d == p.maxDets[-1]][0]
    k = list(k_indices)

    def one(iou_thr: float | None = None, area: str = "all") -> float:
        a = p.areaRngLbl.index(area)
        s = precision[:, :, k, a, m]
        if iou_thr is not None:
            s = s[np.where(iou_thr == p.iouThrs)[0]]
        valid = s[s > -1]
        return _percent(np.mean(valid)) if valid.size else float("nan")

    return {
        "AP": one(),
        "AP50": one(0.5),
        "AP75": one(0.75),
        "APs": one(area="small"),
        "APm": one(area="medium"),
        "APl": one(area="large"),
    }


def coco_mask_ap(
    gt: Mapping[str, Any] | str | Path,
    results: Sequence[Mapping[str, Any]],
    image_ids: Sequence[int] | None = None,
    category_ids: Sequence[int] | None = None,
    subsets: Mapping[str, Sequence[int]] | None = None,
) -> dict[str, Any]:
    """Mask AP of COCO-format ``results`` against a COCO instance ground truth (see the module docstring).

    Args:
        gt: COCO instances json (path, dict, or a pycocotools ``COCO``).
        results: ``[{"image_id", "category_id", "segmentation": RLE {"size", "counts"}, "score"}, ...]``.
        image_ids: evaluate these images only (``params.imgIds``); default all images of ``gt``.
        category_ids: evaluate these categories only (``params.catIds``); default all categories of ``gt``.
        subsets: name → category ids (within the evaluated ones): AP numbers over those categories.

    Returns:
        ``{"AP", "AP50", "AP75", "APs", "APm", "APl", <subset>: {same six}, "per_class": [{"category_id", "name",
        "AP", "AP50", "AP75"}]}`` in percent; NaN where the ground truth has nothing to measure.
    """
    from pycocotools.cocoeval import COCOeval

    coco_gt = _load_gt(gt)
    coco_dt = _load_results(coco_gt, results)
    coco_eval = COCOeval(coco_gt, coco_dt, iouType="segm")
    if image_ids is not None:
        known = set(coco_gt.getImgIds())
        bad = sorted({int(i) for i in image_ids} - known)
        if bad:
            raise ValueError(f"image_ids not in the ground truth: {bad[:10]}")
        coco_eval.params.imgIds = sorted({int(i) for i in image_ids})
    cat_ids = sorted({int(c) for c in (category_ids if category_ids is not None else coco_gt.getCatIds())})
    bad = sorted(set(cat_ids) - set(coco_gt.getCatIds()))
    if bad:
        raise ValueError(f"category_ids not in the ground truth: {bad[:10]}")
    coco_eval.params.catIds = cat_ids
    with _quiet():
        coco_eval.evaluate()
        coco_eval.accumulate()
        coco_eval.summarize()

    out: dict[str, Any] = {name: _percent(coco_eval.stats[i]) for i, name in enumerate(METRICS)}
    position = {int(c): i for i, c in enumerate(coco_eval.params.catIds)}
    for name, members in (subsets or {}).items():
        if name in _RESERVED:
            raise ValueError(f"subset name {name!r} is reserved")
        members = sorted({int(c) for c in members})
        bad = [c for c in members if c not in position]
        if bad:
            raise ValueError(f"subset {name!r}: category ids {bad[:10]} are not evaluated")
        out[name] = _summarize_ap(coco_eval, [position[c] for c in members])

    precision = coco_eval.eval["precision"]
    p = coco_eval.params
    t50 = np.where(p.iouThrs == 0.5)[0]
    t75 = np.where(p.iouThrs == 0.75)[0]
    per_class = []
    for k, cat_id in enumerate(p.catIds):
        entry: dict[str, Any] = {"category_id": int(cat_id), "name": coco_gt.cats[cat_id].get("name", str(cat_id))}
        for key, t in (("AP", slice(None)), ("AP50", t50), ("AP75", t75)):
            s = precision[t, :, k, 0, -1]
            s = s[s > -1]
            entry[key] = float(np.mean(s) * 100) if s.size else float("nan")
        per_class.append(entry)
    out["per_class"] = per_class
    return out
