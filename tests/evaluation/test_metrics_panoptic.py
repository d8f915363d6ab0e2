"""PQ / SQ / RQ against hand-worked examples (COCO panoptic API ``pq_compute`` definitions)."""

from __future__ import annotations

import json

import numpy as np
import pytest

from masqclip_cli.evaluation.panoptic import PanopticAccumulator, PanopticSegmentInfo, pq_from_counts

S = PanopticSegmentInfo
# classes: 0 person (thing), 1 car (thing), 2 sky (stuff), 3 grass (stuff), 4 bus (thing, never seen)
ISTHING = [True, True, False, False, True]
PERSON, CAR, SKY, GRASS, BUS = range(5)

# ---------------------------------------------------------------- image A
# ground truth: 1 sky (16 px), 2 person (6 px), 0 void (4 px), 3 car (6 px), 4 grass (16 px)
GT_A = np.array(
    [
        [1, 1, 1, 1, 1, 1, 1, 1],
        [1, 1, 1, 1, 1, 1, 1, 1],
        [2, 2, 2, 0, 0, 3, 3, 3],
        [2, 2, 2, 0, 0, 3, 3, 3],
        [4, 4, 4, 4, 4, 4, 4, 4],
        [4, 4, 4, 4, 4, 4, 4, 4],
    ]
)
GT_A_SEGS = [S(1, SKY), S(2, PERSON), S(3, CAR), S(4, GRASS)]
PRED_A = np.array(
    [
        [1, 1, 1, 1, 1, 1, 1, 1],
        [1, 1, 1, 1, 1, 1, 1, 1],
        [0, 2, 2, 2, 2, 3, 3, 3],
        [0, 2, 2, 2, 2, 0, 0, 0],
        [4, 4, 4, 4, 4, 4, 4, 4],
        [4, 0, 0, 0, 0, 0, 0, 0],
    ]
)
PRED_A_SEGS = [S(1, SKY), S(2, PERSON), S(3, CAR), S(4, GRASS)]
# sky:    pred 1 == gt 1                       -> IoU 16/16 = 1                         TP
# person: pred 2 = 8 px: 4 on gt 2, 4 on void. union = 6 + 8 - 4 (inter) - 4 (void) = 6
#         -> IoU 4/6 = 2/3 > 0.5 (without removing void it would be 4/10 = 0.4)      TP
# car:    pred 3 = 3 px, all inside gt 3: IoU = 3 / (6 + 3 - 3) = 0.5, not > 0.5      FN (gt 3) + FP (pred 3)
# grass:  pred 4 = 9 px inside gt 4: IoU 9/16 = 0.5625 (just above 0.5)              TP

# ---------------------------------------------------------------- image B
# ground truth: 0 void (8 + 6 px), 5 person crowd (12 px), 6 car (8 px), 7 person (6 px), 8 sky (8 px)
GT_B = np.array(
    [
        [0, 0, 0, 0, 5, 5, 5, 5],
        [0, 0, 0, 0, 5, 5, 5, 5],
        [6, 6, 6, 6, 5, 5, 5, 5],
        [6, 6, 6, 6, 7, 7, 0, 0],
        [8, 8, 8, 8, 7, 7, 0, 0],
        [8, 8, 8, 8, 7, 7, 0, 0],
    ]
)
GT_B_SEGS = [S(5, PERSON, iscrowd=True), S(6, CAR), S(7, PERSON), S(8, SKY)]
PRED_B = np.array(
    [
        [11, 11, 11, 0, 10, 10, 10, 10],
        [11, 11, 11, 0, 10, 10, 10, 10],
        [11, 11, 0, 0, 12, 12, 12, 12],
        [0, 0, 0, 0, 13, 13, 13, 13],
        [14, 14, 14, 0, 13, 13, 13, 13],
        [14, 14, 14, 0, 13, 13, 13, 13],
    ]
)
PRED_B_SEGS = [S(10, PERSON), S(11, GRASS), S(12, CAR), S(13, GRASS), S(14, SKY)]
# sky:   pred 14 = 6 px inside gt 8 (8 px): IoU 6/8 = 0.75                              TP
# car:   gt 6 only overlapped by pred 11 (grass): unmatched                             FN
# person: gt 7 only overlapped by pred 13 (grass): unmatched                            FN
#         gt 5 is crowd: never TP / FN
# pred 10 (person, 8 px) lies on the person crowd: (0 void + 8 crowd) / 8 = 1 > 0.5     ignored
# pred 12 (car, 4 px) lies on the person crowd, which is not its class: 0 / 4          FP car
# pred 11 (grass, 8 px): 6 px on void, 2 on gt car: 6/8 = 0.75 > 0.5                    ignored
# pred 13 (grass, 12 px): 6 px on void, 6 on gt person: 6/12 = 0.5, not > 0.5          FP grass

# ---------------------------------------------------------------- totals over A + B
EXPECTED = {  # class: (tp, fp, fn, iou_sum)
    PERSON: (1, 0, 1, 2 / 3),
    CAR: (0, 2, 2, 0.0),
    SKY: (2, 0, 0, 1.0 + 0.75),
    GRASS: (1, 1, 0, 0.5625),
    BUS: (0, 0, 0, 0.0),
}
# per class (pq, sq, rq):
#   person: sq = 2/3,               rq = 1 / (1 + 0.5) = 2/3,        pq = 4/9
#   car:    sq = 0 (no tp),         rq = 0 / (0 + 1 + 1) = 0,        pq = 0
#   sky:    sq = 1.75 / 2 = 0.875,  rq = 2 / 2 = 1,                  pq = 0.875
#   grass:  sq = 0.5625,            rq = 1 / (1 + 0.5) = 2/3,        pq = 0.375
#   bus:    tp + fp + fn == 0 -> reported as 0 and left out of every average
PER_CLASS = {
    PERSON: (4 / 9, 2 / 3, 2 / 3),
    CAR: (0.0, 0.0, 0.0),
    SKY: (0.875, 0.875, 1.0),
    GRASS: (0.375, 0.5625, 2 / 3),
    BUS: (0.0, 0.0, 0.0),
}
ALL = ((4 / 9 + 0 + 0.875 + 0.375) / 4, (2 / 3 + 0 + 0.875 + 0.5625) / 4, (2 / 3 + 0 + 1 + 2 / 3) / 4, 4)
THINGS = ((4 / 9 + 0) / 2, (2 / 3 + 0) / 2, (2 / 3 + 0) / 2, 2)  # person, car (bus excluded)
STUFF = ((0.875 + 0.375) / 2, (0.875 + 0.5625) / 2, (1 + 2 / 3) / 2, 2)


def _both() -> PanopticAccumulator:
    acc = PanopticAccumulator(5)
    acc.add(GT_A, GT_A_SEGS, PRED_A, PRED_A_SEGS)
    acc.add(GT_B, GT_B_SEGS, PRED_B, PRED_B_SEGS)
    return acc


def _check_group(got: dict, expected: tuple) -> None:
    pq, sq, rq, n = expected
    assert got["n"] == n
    assert got["pq"] == pytest.approx(100 * pq, abs=1e-9)
    assert got["sq"] == pytest.approx(100 * sq, abs=1e-9)
    assert got["rq"] == pytest.approx(100 * rq, abs=1e-9)


def test_image_a_alone() -> None:
    acc = PanopticAccumulator(5)
    acc.add(GT_A, GT_A_SEGS, PRED_A, PRED_A_SEGS)
    assert acc.tp.tolist() == [1, 0, 1, 1, 0]
    assert acc.fp.tolist() == [0, 1, 0, 0, 0]
    assert acc.fn.tolist() == [0, 1, 0, 0, 0]
    assert acc.iou_sum.tolist() == pytest.approx([2 / 3, 0.0, 1.0, 0.5625, 0.0], abs=1e-12)


def test_image_b_alone() -> None:
    acc = PanopticAccumulator(5)
    acc.add(GT_B, GT_B_SEGS, PRED_B, PRED_B_SEGS)
    assert acc.tp.tolist() == [0, 0, 1, 0, 0]
    assert acc.fp.tolist() == [0, 1, 0, 1, 0]
    assert acc.fn.tolist() == [1, 1, 0, 0, 0]
    assert acc.iou_sum.tolist() == pytest.approx([0.0, 0.0, 0.75, 0.0, 0.0], abs=1e-12)


def test_counts_and_scores() -> None:
    res = _both().result(ISTHING, subsets={"base": [PERSON, SKY], "novel": [CAR, GRASS, BUS]})
    for c, (tp, fp, fn, iou) in EXPECTED.items():
        row = res["per_class"][c]
        assert row["class"] == c
        assert (row["tp"], row["fp"], row["fn"]) == (tp, fp, fn)
        assert row["iou_sum"] == pytest.approx(iou, abs=1e-12)
        pq, sq, rq = PER_CLASS[c]
        assert row["pq"] == pytest.approx(100 * pq, abs=1e-9)
        assert row["sq"] == pytest.approx(100 * sq, abs=1e-9)
        assert row["rq"] == pytest.approx(100 * rq, abs=1e-9)
    _check_group(res["all"], ALL)
    _check_group(res["things"], THINGS)
    _check_group(res["stuff"], STUFF)
    # base = person, sky; novel = car, grass (bus unseen, excluded)
    _check_group(res["base"], ((4 / 9 + 0.875) / 2, (2 / 3 + 0.875) / 2, (2 / 3 + 1) / 2, 2))
    _check_group(res["novel"], ((0 + 0.375) / 2, (0 + 0.5625) / 2, (0 + 2 / 3) / 2, 2))


def test_merge_equals_single_pass() -> None:
    a = PanopticAccumulator(5)
    a.add(GT_A, GT_A_SEGS, PRED_A, PRED_A_SEGS)
    b = PanopticAccumulator(5)
    b.add(GT_B, GT_B_SEGS, PRED_B, PRED_B_SEGS)
    a.merge(b)
    both = _both()
    np.testing.assert_array_equal(a.state(), both.state())
    assert a.result(ISTHING) == both.result(ISTHING)


def test_state_round_trips() -> None:
    both = _both()
    state = both.state()
    assert state.shape == (5, 4) and state.dtype == np.float64
    # the all_reduce path: per-process states summed, loaded back
    a = PanopticAccumulator(5)
    a.add(GT_A, GT_A_SEGS, PRED_A, PRED_A_SEGS)
    b = PanopticAccumulator(5)
    b.add(GT_B, GT_B_SEGS, PRED_B, PRED_B_SEGS)
    summed = PanopticAccumulator(5)
    summed.load_state(a.state() + b.state())
    np.testing.assert_array_equal(summed.state(), state)
    assert summed.tp.dtype == np.int64
    again = PanopticAccumulator.from_dict(json.loads(json.dumps(both.to_dict())))
    np.testing.assert_array_equal(again.state(), state)
    np.testing.assert_array_equal(PanopticAccumulator.from_state(state).state(), state)
    with pytest.raises(ValueError):
        summed.load_state(state + 0.5)


def test_unknown_pred_id_raises() -> None:
    pred = PRED_A.copy()
    pred[5, 7] = 99
    acc = PanopticAccumulator(5)
    with pytest.raises(ValueError, match="99"):
        acc.add(GT_A, GT_A_SEGS, pred, PRED_A_SEGS)
    assert acc.state().sum() == 0  # nothing accumulated


def test_unlisted_gt_id_is_void() -> None:
    gt = GT_A.copy()
    gt[gt == 0] = 42  # not listed in GT_A_SEGS
    acc = PanopticAccumulator(5)
    acc.add(gt, GT_A_SEGS, PRED_A, PRED_A_SEGS)
    ref = PanopticAccumulator(5)
    ref.add(GT_A, GT_A_SEGS, PRED_A, PRED_A_SEGS)
    np.testing.assert_array_equal(acc.state(), ref.state())


def test_crowd_pixels_stay_in_the_union() -> None:
    # pq_compute removes only void from the union, not the crowd: gt person 1 (4 px), person crowd 2 (4 px),
    # pred person 5 covers both (8 px): IoU = 4 / (4 + 8 - 4 - 0) = 0.5 -> no match; then pred 5 is unmatched,
    # (0 void + 4 crowd) / 8 = 0.5 -> not > 0.5 -> FP. gt 1 -> FN.
    gt = np.array([[1, 1, 2, 2], [1, 1, 2, 2]])
    pred = np.full((2, 4), 5)
    acc = PanopticAccumulator(1)
    acc.add(gt, [S(1, 0), S(2, 0, iscrowd=True)], pred, [S(5, 0)])
    assert (acc.tp[0], acc.fp[0], acc.fn[0]) == (0, 1, 1)


def test_last_crowd_segment_of_a_class_is_the_one_used() -> None:
    # Two crowd segments of class 0 (ids 1 then 2). Pred 5 (class 0) lies on crowd 1 only: pq_compute keeps one
    # crowd label per class, the last listed, so with [1, 2] it sees 0 crowd pixels -> FP; with [2, 1] -> ignored.
    gt = np.array([[1, 1, 2, 2]])
    pred = np.array([[5, 5, 0, 0]])
    acc = PanopticAccumulator(1)
    acc.add(gt, [S(1, 0, True), S(2, 0, True)], pred, [S(5, 0)])
    assert (acc.tp[0], acc.fp[0], acc.fn[0]) == (0, 1, 0)
    acc = PanopticAccumulator(1)
    acc.add(gt, [S(2, 0, True), S(1, 0, True)], pred, [S(5, 0)])
    assert (acc.tp[0], acc.fp[0], acc.fn[0]) == (0, 0, 0)


def test_listed_segments_without_pixels() -> None:
    gt = np.array([[1, 1, 0, 0]])
    pred = np.array([[3, 3, 0, 0]])
    acc = PanopticAccumulator(2)
    # gt 2 is listed but has no pixel: still a FN (pq_compute iterates the listed segments); pred 4 has no pixel:
    # skipped
    acc.add(gt, [S(1, 0), S(2, 1)], pred, [S(3, 0), S(4, 1)])
    assert acc.tp.tolist() == [1, 0] and acc.fp.tolist() == [0, 0] and acc.fn.tolist() == [0, 1]


def test_input_validation() -> None:
    acc = PanopticAccumulator(2)
    gt = np.array([[1, 0]])
    with pytest.raises(ValueError, match="shape"):
        acc.add(gt, [S(1, 0)], np.zeros((2, 2), int), [])
    with pytest.raises(ValueError, match="category"):
        acc.add(gt, [S(1, 2)], np.zeros((1, 2), int), [])
    with pytest.raises(ValueError, match="twice"):
        acc.add(gt, [S(1, 0), S(1, 1)], np.zeros((1, 2), int), [])
    with pytest.raises(ValueError, match="reserved"):
        acc.add(gt, [S(0, 0)], np.zeros((1, 2), int), [])
    with pytest.raises(ValueError, match="isthing"):
        acc.result([True])
    with pytest.raises(ValueError, match="reserved"):
        acc.result([True, False], subsets={"all": [0]})
    with pytest.raises(ValueError):
        acc.merge(PanopticAccumulator(3))


def test_empty_groups_and_pq_from_counts() -> None:
    res = PanopticAccumulator(2).result([True, False])
    assert res["all"] == {"pq": 0.0, "sq": 0.0, "rq": 0.0, "n": 0}
    assert pq_from_counts(2, 1, 1, 1.5) == pytest.approx((0.5, 0.75, 2 / 3))
