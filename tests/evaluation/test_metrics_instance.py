"""COCO mask AP: a hand-worked case, and agreement with pycocotools' COCOeval called directly."""

from __future__ import annotations

import contextlib
import copy
import io
import json
import math

import numpy as np
import pytest
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from masqclip_cli.evaluation.instance import coco_mask_ap

H, W = 10, 50


def _rect(x0: int, x1: int, h: int = H, w: int = W, y0: int = 0, y1: int | None = None) -> np.ndarray:
    """Bool mask of columns x0..x1 (inclusive), rows y0..y1 (inclusive; default all)."""
    m = np.zeros((h, w), dtype=bool)
    m[y0 : (h if y1 is None else y1 + 1), x0 : x1 + 1] = True
    return m


def _rle(mask: np.ndarray) -> dict:
    rle = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
    return {"size": [int(s) for s in rle["size"]], "counts": rle["counts"].decode("ascii")}


def _gt_ann(ann_id: int, image_id: int, cat: int, mask: np.ndarray, iscrowd: int = 0) -> dict:
    ys, xs = np.nonzero(mask)
    return {
        "id": ann_id,
        "image_id": image_id,
        "category_id": cat,
        "segmentation": _rle(mask),
        "area": int(mask.sum()),
        "iscrowd": iscrowd,
        "bbox": [int(xs.min()), int(ys.min()), int(np.ptp(xs)) + 1, int(np.ptp(ys)) + 1],
    }


# ---------------------------------------------------------------- hand-worked case
# one 10x50 image, one category (id 7), three gt masks, four detections; every region spans all 10 rows
GT_MASKS = [_rect(0, 9), _rect(15, 24), _rect(30, 37)]  # A 100 px, B 100 px, C 80 px
DETS = [  # (mask, score)
    (_rect(0, 9), 0.9),  # d1 = A:                                       IoU 1
    (_rect(17, 26), 0.8),  # d2 on B: inter 80, union 100 + 100 - 80 = 120: IoU 2/3
    (_rect(42, 47), 0.7),  # d3 touches nothing:                           IoU 0
    (_rect(30, 36), 0.6),  # d4 inside C: 70 / 80:                         IoU 0.875
]
HAND_GT = {
    "images": [{"id": 1, "width": W, "height": H, "file_name": "a.png"}],
    "categories": [{"id": 7, "name": "thing7"}],
    "annotations": [_gt_ann(i + 1, 1, 7, m) for i, m in enumerate(GT_MASKS)],
}
HAND_RESULTS = [{"image_id": 1, "category_id": 7, "segmentation": _rle(m), "score": s} for m, s in DETS]

# COCO: detections by score, cumulative TP / FP, recall = TP / 3, precision = TP / (TP + FP), precision made
# non-increasing from the right, then read at recall thresholds 0, 0.01, ..., 1 (101 points) as the precision at
# the first detection whose recall >= the threshold (0 past the last one).
# Thresholds 0.34..0.66 are above 1/3 and at most 2/3; 0.00..0.33: 34 points, 0.34..0.66: 33, 0.67..1.00: 34.
#
# IoU >= 0.50 (also 0.55, 0.60, 0.65): d1 TP, d2 TP, d3 FP, d4 TP
#   recall 1/3, 2/3, 2/3, 1; precision 1, 1, 2/3, 3/4 -> envelope 1, 1, 3/4, 3/4
#   34 points at 1, 33 at 1, 34 at 3/4 -> (67 + 25.5) / 101
AP_LOOSE = 92.5 / 101
# IoU >= 0.75 (also 0.70, 0.80, 0.85): d1 TP, d2 FP, d3 FP, d4 TP
#   recall 1/3, 1/3, 1/3, 2/3; precision 1, 1/2, 1/3, 1/2 -> envelope 1, 1/2, 1/2, 1/2
#   34 points at 1, 33 at 1/2, 34 past the last recall (0) -> (34 + 16.5) / 101 = 0.5
AP_MID = 50.5 / 101
# IoU >= 0.90, 0.95: only d1 TP: recall 1/3 throughout -> 34 points at 1 -> 34 / 101
AP_STRICT = 34 / 101
AP_ALL = (4 * AP_LOOSE + 4 * AP_MID + 2 * AP_STRICT) / 10  # = 640 / 1010


def _cocoeval_direct(gt: dict, results: list[dict], cat_ids: list[int] | None = None) -> COCOeval:
    with contextlib.redirect_stdout(io.StringIO()):
        coco_gt = COCO()
        coco_gt.dataset = copy.deepcopy(gt)
        coco_gt.createIndex()
        coco_dt = coco_gt.loadRes(copy.deepcopy(results))
        ev = COCOeval(coco_gt, coco_dt, iouType="segm")
        if cat_ids is not None:
            ev.params.catIds = cat_ids
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    return ev


def test_hand_worked_ap() -> None:
    res = coco_mask_ap(HAND_GT, HAND_RESULTS)
    assert res["AP50"] == pytest.approx(100 * AP_LOOSE, abs=1e-9)
    assert res["AP75"] == pytest.approx(50.0, abs=1e-9)
    assert res["AP"] == pytest.approx(100 * AP_ALL, abs=1e-9)
    assert res["AP"] == pytest.approx(100 * 640 / 1010, abs=1e-9)
    assert res["APs"] == pytest.approx(100 * AP_ALL, abs=1e-9)  # every mask is small (< 32**2 px)
    assert math.isnan(res["APm"]) and math.isnan(res["APl"])  # no medium / large gt
    (row,) = res["per_class"]
    assert row["category_id"] == 7 and row["name"] == "thing7"
    assert row["AP"] == pytest.approx(100 * AP_ALL, abs=1e-9)
    assert row["AP50"] == pytest.approx(100 * AP_LOOSE, abs=1e-9)
    assert row["AP75"] == pytest.approx(50.0, abs=1e-9)
    # and what COCOeval prints for the same data
    stats = _cocoeval_direct(HAND_GT, HAND_RESULTS).stats
    assert [res[k] for k in ("AP", "AP50", "AP75", "APs")] == pytest.approx(list(100 * stats[:4]), abs=1e-12)


def test_inputs_are_not_modified_and_bbox_is_ignored(tmp_path) -> None:
    gt = copy.deepcopy(HAND_GT)
    results = copy.deepcopy(HAND_RESULTS)
    # a box far larger than the mask: pycocotools would take its area (2500 px -> "medium") if it were kept
    with_box = [dict(r, bbox=[0, 0, 50, 50]) for r in results]
    res = coco_mask_ap(gt, with_box)
    assert gt == HAND_GT and results == HAND_RESULTS
    assert all(set(r) == {"image_id", "category_id", "segmentation", "score", "bbox"} for r in with_box)
    assert res["APs"] == pytest.approx(100 * AP_ALL, abs=1e-9) and math.isnan(res["APm"])
    path = tmp_path / "gt.json"
    path.write_text(json.dumps(HAND_GT))
    assert coco_mask_ap(path, results)["AP"] == res["AP"]
    assert coco_mask_ap(str(path), results)["AP"] == res["AP"]


def _random_case() -> tuple[dict, list[dict]]:
    rng = np.random.default_rng(0)
    h, w = 64, 72
    images = [{"id": i, "width": w, "height": h, "file_name": f"{i}.png"} for i in (3, 5, 9)]
    cats = [{"id": c, "name": f"c{c}"} for c in (1, 2, 4, 8)]  # category 8 never has ground truth
    anns, results = [], []
    for img in images:
        for _ in range(6):
            cat = int(rng.choice([1, 2, 4]))
            x0, y0 = int(rng.integers(0, w - 8)), int(rng.integers(0, h - 8))
            x1, y1 = x0 + int(rng.integers(3, 56)), y0 + int(rng.integers(3, 56))
            m = _rect(x0, min(x1, w - 1), h, w, y0, min(y1, h - 1))
            anns.append(_gt_ann(len(anns) + 1, img["id"], cat, m, iscrowd=int(rng.random() < 0.1)))
            for _ in range(2):  # jittered detections, sometimes of another class
                dx, dy = rng.integers(-3, 4, size=2)
                dm = np.roll(m, (int(dy), int(dx)), axis=(0, 1))
                dcat = cat if rng.random() < 0.8 else int(rng.choice([1, 2, 4, 8]))
                results.append(
                    {"image_id": img["id"], "category_id": dcat, "segmentation": _rle(dm), "score": float(rng.random())}
                )
        for _ in range(3):  # pure false positives
            x0, y0 = int(rng.integers(0, w - 8)), int(rng.integers(0, h - 8))
            results.append(
                {
                    "image_id": img["id"],
                    "category_id": int(rng.choice([1, 2, 4, 8])),
                    "segmentation": _rle(_rect(x0, x0 + 5, h, w, y0, y0 + 5)),
                    "score": float(rng.random()),
                }
            )
    return {"images": images, "categories": cats, "annotations": anns}, results


def test_agrees_with_cocoeval_including_subsets() -> None:
    gt, results = _random_case()
    res = coco_mask_ap(gt, results, subsets={"base": [1, 2], "novel": [4, 8]})
    ev = _cocoeval_direct(gt, results)
    for i, k in enumerate(("AP", "AP50", "AP75", "APs", "APm", "APl")):
        expected = 100 * ev.stats[i] if ev.stats[i] >= 0 else float("nan")
        assert res[k] == pytest.approx(expected, abs=1e-12, nan_ok=True)
    assert 0 < res["AP"] < 100 and 0 < res["APs"] < 100 and 0 < res["APm"] < 100
    # per class: detectron2's mean of precision[:, :, k, area all, maxDets 100] over entries > -1
    for k, row in enumerate(res["per_class"]):
        assert row["category_id"] == [1, 2, 4, 8][k] and type(row["category_id"]) is int
        p = ev.eval["precision"][:, :, k, 0, -1]
        p = p[p > -1]
        assert row["AP"] == pytest.approx(100 * p.mean() if p.size else float("nan"), abs=1e-12, nan_ok=True)
    assert math.isnan(res["per_class"][3]["AP"])  # category 8: no ground truth
    # subsets equal COCOeval run with params.catIds restricted
    for name, cats in (("base", [1, 2]), ("novel", [4, 8])):
        sub = _cocoeval_direct(gt, results, cat_ids=cats).stats
        for i, k in enumerate(("AP", "AP50", "AP75", "APs", "APm", "APl")):
            expected = 100 * sub[i] if sub[i] >= 0 else float("nan")
            assert res[name][k] == pytest.approx(expected, abs=1e-12, nan_ok=True)
    # image / category restriction
    only = coco_mask_ap(gt, results, image_ids=[5], category_ids=[2, 4])
    with contextlib.redirect_stdout(io.StringIO()):
        coco_gt = COCO()
        coco_gt.dataset = copy.deepcopy(gt)
        coco_gt.createIndex()
        ev = COCOeval(coco_gt, coco_gt.loadRes(copy.deepcopy(results)), iouType="segm")
        ev.params.imgIds, ev.params.catIds = [5], [2, 4]
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    assert only["AP"] == pytest.approx(100 * ev.stats[0], abs=1e-12)
    assert [r["category_id"] for r in only["per_class"]] == [2, 4]


def test_empty_results() -> None:
    res = coco_mask_ap(HAND_GT, [])
    assert res["AP"] == 0.0 and res["AP50"] == 0.0 and res["AP75"] == 0.0 and res["APs"] == 0.0
    assert math.isnan(res["APm"]) and math.isnan(res["APl"])  # no gt there: undefined, as with detections
    assert res["per_class"][0]["AP"] == 0.0
    res = coco_mask_ap(HAND_GT, [], subsets={"base": [7]})
    assert res["base"]["AP"] == 0.0


def test_errors() -> None:
    bad_image = [dict(HAND_RESULTS[0], image_id=99)]
    with pytest.raises(ValueError, match="99"):
        coco_mask_ap(HAND_GT, bad_image)
    with pytest.raises(ValueError, match="score"):
        coco_mask_ap(HAND_GT, [{k: v for k, v in HAND_RESULTS[0].items() if k != "score"}])
    with pytest.raises(ValueError, match="not evaluated"):
        coco_mask_ap(HAND_GT, HAND_RESULTS, subsets={"novel": [3]})
    with pytest.raises(ValueError, match="image_ids"):
        coco_mask_ap(HAND_GT, HAND_RESULTS, image_ids=[2])
