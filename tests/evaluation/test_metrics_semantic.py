"""mIoU / fwIoU / pACC / mACC against a hand-made confusion matrix (detectron2 SemSegEvaluator definitions)."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from masqclip_cli.evaluation.semantic import SemanticAccumulator

GT = np.array(
    [
        [0, 0, 0, 1],
        [0, 0, 1, 1],
        [2, 2, 255, 255],
    ]
)
PRED = np.array(
    [
        [0, 0, 1, 1],
        [0, 3, 1, 1],
        [2, 9, 0, 3],  # 9: outside 0..3 -> wrong; the last two pixels are ignored (gt 255)
    ]
)
# evaluated pixels (gt, pred): (0,0) x3, (0,1), (0,3), (1,1) x3, (2,2), (2,9 -> invalid)
CONF = [  # gt rows, pred cols 0..3
    [3, 1, 0, 1],
    [0, 3, 0, 0],
    [0, 0, 1, 0],
    [0, 0, 0, 0],
]
# gt pixels per class: 5, 3, 2 (one predicted 9), 0; pred pixels per class: 3, 4, 1, 1; tp: 3, 3, 1, 0
# IoU: 0: 3 / (5 + 3 - 3) = 0.6; 1: 3 / (3 + 4 - 3) = 0.75; 2: 1 / (2 + 1 - 1) = 0.5; 3: no gt pixel -> left out
# ACC: 0: 3/5; 1: 3/3; 2: 1/2
MIOU = (0.6 + 0.75 + 0.5) / 3
FWIOU = (5 * 0.6 + 3 * 0.75 + 2 * 0.5) / 10
PACC = (3 + 3 + 1) / 10
MACC = (0.6 + 1.0 + 0.5) / 3


def _check(res: dict) -> None:
    assert res["mIoU"] == pytest.approx(100 * MIOU, abs=1e-9)
    assert res["fwIoU"] == pytest.approx(100 * FWIOU, abs=1e-9)
    assert res["pACC"] == pytest.approx(100 * PACC, abs=1e-9)
    assert res["mACC"] == pytest.approx(100 * MACC, abs=1e-9)
    assert res["n"] == 3


def test_hand_made_confusion() -> None:
    acc = SemanticAccumulator(4)
    acc.add(GT, PRED)
    assert acc.confusion.tolist() == CONF
    assert acc.confusion_full[:, 4].tolist() == [0, 0, 1, 0]
    res = acc.result(subsets={"base": [0, 1], "novel": [2, 3]})
    _check(res)
    per = res["per_class"]
    assert [p["IoU"] for p in per[:3]] == pytest.approx([60.0, 75.0, 50.0], abs=1e-9)
    assert [p["ACC"] for p in per[:3]] == pytest.approx([60.0, 100.0, 50.0], abs=1e-9)
    assert math.isnan(per[3]["IoU"]) and math.isnan(per[3]["ACC"])
    assert [p["gt_pixels"] for p in per] == [5, 3, 2, 0]
    assert [p["pred_pixels"] for p in per] == [3, 4, 1, 1]
    assert res["base"]["mIoU"] == pytest.approx(100 * (0.6 + 0.75) / 2, abs=1e-9)
    assert res["base"]["mACC"] == pytest.approx(100 * (0.6 + 1.0) / 2, abs=1e-9)
    assert res["base"]["n"] == 2
    assert res["novel"]["mIoU"] == pytest.approx(50.0, abs=1e-9)  # class 3 has no gt pixel
    assert res["novel"]["n"] == 1


def test_out_of_range_gt_is_ignored_and_ignore_none() -> None:
    gt = GT.copy()
    gt[2, 2] = 7  # outside 0..3: ignored like 255
    gt[2, 3] = -1
    acc = SemanticAccumulator(4, ignore_index=None)
    acc.add(gt, PRED)
    assert acc.confusion.tolist() == CONF
    _check(acc.result())


def test_ignore_index_inside_the_class_range() -> None:
    acc = SemanticAccumulator(4, ignore_index=2)
    acc.add(GT, PRED)
    assert acc.confusion.tolist() == [[3, 1, 0, 1], [0, 3, 0, 0], [0, 0, 0, 0], [0, 0, 0, 0]]


def test_merge_state_and_dict() -> None:
    a = SemanticAccumulator(4)
    a.add(GT[:2], PRED[:2])
    b = SemanticAccumulator(4)
    b.add(GT[2:], PRED[2:])
    summed = SemanticAccumulator(4)
    summed.load_state(a.state() + b.state())
    a.merge(b)
    for acc in (a, summed, SemanticAccumulator.from_dict(json.loads(json.dumps(a.to_dict())))):
        assert acc.confusion.tolist() == CONF
        _check(acc.result())
    with pytest.raises(ValueError):
        a.merge(SemanticAccumulator(5))


def test_prediction_only_class_is_left_out_of_the_mean() -> None:
    # detectron2 averages IoU over classes with gt pixels: class 1 (only predicted) does not count as IoU 0
    acc = SemanticAccumulator(2)
    acc.add(np.array([[0, 0, 0, 0]]), np.array([[0, 0, 0, 1]]))
    res = acc.result()
    assert res["mIoU"] == pytest.approx(75.0) and res["n"] == 1
    assert res["fwIoU"] == pytest.approx(75.0) and res["pACC"] == pytest.approx(75.0)


def test_validation_and_empty() -> None:
    acc = SemanticAccumulator(2)
    with pytest.raises(ValueError, match="shape"):
        acc.add(np.zeros((2, 2), int), np.zeros((2, 3), int))
    with pytest.raises(ValueError, match="integer"):
        acc.add(np.zeros((2, 2)), np.zeros((2, 2), int))
    with pytest.raises(ValueError, match="reserved"):
        acc.result(subsets={"mIoU": [0]})
    res = acc.result()
    assert math.isnan(res["mIoU"]) and math.isnan(res["pACC"]) and res["n"] == 0
