"""Progressive-distillation pseudo-label selection on hand-built teacher outputs (METHOD.md §2)."""

from __future__ import annotations

import math

import pytest
import torch

from masqclip_cli.training.distill import (
    overlap_matrix,
    sample_points,
    select_pseudo_masks,
    teacher_instance_scores,
)

S = 20  # canvas side


def rect(y0: int, y1: int, x0: int, x1: int, size: int = S) -> torch.Tensor:
    """A bool mask with rows y0..y1-1 and columns x0..x1-1 set."""
    m = torch.zeros(size, size, dtype=torch.bool)
    m[y0:y1, x0:x1] = True
    return m


def stack(*masks: torch.Tensor) -> torch.Tensor:
    return torch.stack(masks) if masks else torch.zeros(0, S, S, dtype=torch.bool)


def select(scores, masks, gt, **kw) -> list[int]:  # noqa: ANN001
    out = select_pseudo_masks(torch.tensor(scores), masks, gt, **kw)
    assert out.dtype == torch.long
    return out.tolist()


GT = rect(0, 4, 0, 10)  # area 40


# ------------------------------------------------------------------------------------------------ scores
def test_teacher_instance_scores_by_hand() -> None:
    logits = torch.tensor([[2.0, 0.0], [0.0, 1.0], [5.0, -5.0]])
    masks = torch.tensor(
        [
            [[1.0, -1.0], [3.0, 0.0]],  # logit 0 is outside (strict > 0)
            [[-2.0, 4.0], [-1.0, -3.0]],
            [[-1.0, -1.0], [-1.0, -1.0]],  # empty mask: score 0
        ]
    )
    scores, binary = teacher_instance_scores(logits, masks)
    sig = torch.sigmoid
    p0 = math.exp(2) / (math.exp(2) + 1)
    p1 = 1 / (1 + math.e)
    expected = [
        p0 * (sig(torch.tensor(1.0)) + sig(torch.tensor(3.0))).item() / (2 + 1e-6),
        p1 * sig(torch.tensor(4.0)).item() / (1 + 1e-6),
        0.0,
    ]
    assert scores.tolist() == pytest.approx(expected, rel=1e-6, abs=1e-7)
    assert binary.dtype == torch.bool
    assert binary.tolist() == [[[True, False], [True, False]], [[False, True], [False, False]], [[False] * 2] * 2]


def test_score_threshold_is_strict() -> None:
    masks = stack(rect(0, 3, 0, 3), rect(5, 8, 5, 8), rect(10, 13, 10, 13), rect(15, 18, 15, 18))
    assert select([0.8001, 0.8, 0.95, 0.5], masks, stack()) == [2, 0]
    assert select([0.8001, 0.8, 0.95, 0.5], masks, stack(), score_threshold=0.9) == [2]
    assert select([0.1, 0.2, 0.3, 0.4], masks, stack()) == []


# ------------------------------------------------------------------------------------------------ GT overlap
def test_dice_by_hand() -> None:
    below = rect(3, 13, 7, 11)  # area 40, meets GT in row 3, cols 7..9: |∩| = 3
    above = rect(3, 13, 6, 10)  # area 40, |∩| = 4
    d = overlap_matrix(stack(below, above), stack(GT))
    assert d[:, 0].tolist() == pytest.approx([7 / 81, 9 / 81])  # (2·3+1)/(40+40+1), (2·4+1)/81
    # IoU: 3/77 and 4/76
    assert overlap_matrix(stack(below, above), stack(GT), "iou")[:, 0].tolist() == pytest.approx([3 / 77, 4 / 76])


def test_gt_overlap_just_below_and_above_threshold() -> None:
    below = rect(3, 13, 7, 11)  # Dice 7/81 = 0.086 < 0.1 -> kept
    above = rect(3, 13, 6, 10)  # Dice 9/81 = 0.111 >= 0.1 -> dropped
    other = rect(10, 20, 15, 20)
    gts = stack(other, GT)  # the max over all GT masks decides
    assert select([0.9], stack(below), gts) == [0]
    assert select([0.9], stack(above), gts) == []
    # exactly at the threshold is dropped (keep iff < β): |∩| = 2, |P| = 9 -> (2·2+1)/(9+40+1) = 0.1
    exact = rect(3, 6, 8, 11)
    assert overlap_matrix(stack(exact), stack(GT)).item() == pytest.approx(0.1)
    assert select([0.9], stack(exact), stack(GT)) == []
    assert select([0.9], stack(exact), stack(GT), overlap_threshold=0.1001) == [0]


def test_no_gt_keeps_everything_above_score() -> None:
    masks = stack(rect(0, 5, 0, 5), rect(10, 15, 10, 15))
    assert select([0.85, 0.9], masks, stack()) == [1, 0]
    empty = select_pseudo_masks(torch.zeros(0), torch.zeros(0, S, S, dtype=torch.bool), stack(GT))
    assert empty.tolist() == [] and empty.dtype == torch.long


# ------------------------------------------------------------------------------------------------ NMS
def test_nms_order_and_suppression_only_by_kept() -> None:
    a = rect(6, 16, 0, 10)  # score 0.90
    b = rect(6, 16, 5, 15)  # score 0.95, Dice(a, b) = (2·50+1)/(201) ≈ 0.5
    c = rect(6, 16, 0, 3)  # score 0.85, overlaps a (suppressed) but not b
    masks = stack(a, b, c)
    assert overlap_matrix(stack(a), stack(b)).item() == pytest.approx(101 / 201)
    assert overlap_matrix(stack(c), stack(b)).item() == pytest.approx(1 / 131)
    # b (higher score) suppresses a, not vice versa; c survives because a was not kept
    assert select([0.90, 0.95, 0.85], masks, stack()) == [1, 2]
    # swap the scores of a and b: now a suppresses b, and c overlaps a -> only a
    assert select([0.95, 0.90, 0.85], masks, stack()) == [0]


def test_nms_ties_keep_lower_index() -> None:
    m = rect(5, 10, 5, 10)
    assert select([0.9, 0.9, 0.9], stack(m, m, rect(15, 18, 15, 18)), stack()) == [0, 2]


def test_gt_filter_then_nms() -> None:
    # the top candidate overlaps GT and is dropped before NMS, so it cannot suppress the second one
    top = rect(0, 8, 0, 10)  # overlaps GT
    second = rect(4, 12, 0, 10)  # Dice with top = 81/161, disjoint from GT (rows 0..3)
    assert overlap_matrix(stack(second), stack(GT)).item() == pytest.approx(1 / 121)
    assert select([0.99, 0.9], stack(top, second), stack(GT)) == [1]
    assert select([0.99, 0.9], stack(top, second), stack()) == [0]


# ------------------------------------------------------------------------------------------------ kinds
def test_iou_kind_differs_from_dice() -> None:
    p = rect(3, 13, 5, 10)  # area 50, meets GT in row 3, cols 5..9: |∩| = 5
    assert overlap_matrix(stack(p), stack(GT)).item() == pytest.approx(11 / 91)  # Dice 0.121 -> dropped
    assert overlap_matrix(stack(p), stack(GT), "iou").item() == pytest.approx(5 / 85)  # IoU 0.059 -> kept
    assert select([0.9], stack(p), stack(GT)) == []
    assert select([0.9], stack(p), stack(GT), overlap="iou") == [0]
    empty = stack(rect(0, 0, 0, 0))
    assert overlap_matrix(empty, empty, "iou").item() == 0.0
    assert overlap_matrix(empty, empty, "dice").item() == 1.0  # +1 smoothing: (0+1)/(0+1)


def test_dice_points_on_every_pixel_centre_equals_full_dice() -> None:
    g = torch.Generator().manual_seed(0)
    a = torch.rand(6, S, S, generator=g) < 0.4
    b = torch.rand(4, S, S, generator=g) < 0.3
    ys, xs = torch.meshgrid(torch.arange(S), torch.arange(S), indexing="ij")
    centres = torch.stack([(ys.flatten() + 0.5) / S, (xs.flatten() + 0.5) / S], dim=1)
    full = overlap_matrix(a, b, "dice")
    assert torch.equal(overlap_matrix(a, b, "dice-points", centres), full)
    # nearest-pixel reads in normalised coordinates: a 2x-upsampled GT gives the same point Dice
    b2 = b.repeat_interleave(2, dim=1).repeat_interleave(2, dim=2)
    pts = sample_points(500, torch.Generator().manual_seed(1))
    assert torch.equal(overlap_matrix(a, b2, "dice-points", pts), overlap_matrix(a, b, "dice-points", pts))
    with pytest.raises(ValueError, match="points"):
        overlap_matrix(a, b, "dice-points")


def test_dice_points_deterministic_and_close_to_full_dice() -> None:
    a = stack(rect(0, 12, 0, 12), rect(5, 20, 3, 20))
    b = stack(rect(4, 16, 4, 16), rect(0, 20, 0, 8))
    p1 = sample_points(200_000, torch.Generator().manual_seed(7))
    p2 = sample_points(200_000, torch.Generator().manual_seed(7))
    assert torch.equal(p1, p2) and p1.min() >= 0 and p1.max() < 1
    est = overlap_matrix(a, b, "dice-points", p1)
    af, bf = a.flatten(1).float(), b.flatten(1).float()
    exact = 2 * af @ bf.T / (af.sum(1)[:, None] + bf.sum(1)[None, :])  # unsmoothed Dice of the areas
    assert (est - exact).abs().max().item() < 0.01

    # selection with point Dice: same seed -> same result; clear-cut cases agree with the full Dice
    # a, b, c as in the NMS test, a free one (0.99) and a copy of the GT (0.97, dropped)
    masks = stack(rect(6, 16, 0, 10), rect(6, 16, 5, 15), rect(6, 16, 0, 3), rect(17, 20, 15, 20), GT)
    scores = [0.90, 0.95, 0.85, 0.99, 0.97]
    kw = {"overlap": "dice-points", "num_points": 4096}
    r1 = select(scores, masks, stack(GT), generator=torch.Generator().manual_seed(3), **kw)
    r2 = select(scores, masks, stack(GT), generator=torch.Generator().manual_seed(3), **kw)
    assert r1 == r2 == select(scores, masks, stack(GT)) == [3, 1, 2]


def test_bad_arguments() -> None:
    with pytest.raises(ValueError, match="overlap kind"):
        overlap_matrix(stack(GT), stack(GT), "giou")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="same size"):
        overlap_matrix(stack(GT), torch.zeros(1, 5, 5, dtype=torch.bool))
    with pytest.raises(ValueError, match="teacher_masks"):
        select_pseudo_masks(torch.ones(2), stack(GT), stack())
    with pytest.raises(ValueError, match="pred_logits"):
        teacher_instance_scores(torch.zeros(3, 3), torch.zeros(3, 2, 2))
