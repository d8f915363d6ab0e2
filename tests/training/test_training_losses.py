"""Matching and losses of the proposal network and of MasQ-Tuning (masqclip_cli.training)."""

from __future__ import annotations

import itertools
import math

import pytest
import torch
import torch.nn.functional as F

from masqclip_cli.training.losses import (
    SetCriterion,
    assign_labels,
    dice_loss,
    masq_loss,
    object_ce_loss,
    sigmoid_ce_loss,
    uncertain_point_coords,
)
from masqclip_cli.training.matcher import HungarianMatcher, make_generator, point_sample

# ------------------------------------------------------------------------------------------------ point sampling


def test_point_sample_pixel_centres():
    img = torch.arange(12.0).reshape(1, 1, 3, 4)
    ys, xs = torch.meshgrid(torch.arange(3), torch.arange(4), indexing="ij")
    coords = torch.stack([(xs.flatten() + 0.5) / 4, (ys.flatten() + 0.5) / 3], -1)[None]
    out = point_sample(img, coords)
    assert out.shape == (1, 1, 12)
    torch.testing.assert_close(out[0, 0], torch.arange(12.0))


def test_make_generator_reproducible_and_independent():
    def draw(seed, it, idx):
        return torch.rand(5, generator=make_generator(seed, it, idx))

    assert torch.equal(draw(0, 3, 1), draw(0, 3, 1))
    assert not torch.equal(draw(0, 3, 1), draw(0, 3, 2))
    assert not torch.equal(draw(0, 3, 1), draw(0, 4, 1))
    assert not torch.equal(draw(0, 3, 1), draw(1, 3, 1))
    logits = torch.randn(2, 1, 6, 6, generator=torch.Generator().manual_seed(0))
    a = uncertain_point_coords(logits, 20, 3, 0.75, make_generator(7, 11, 0))
    b = uncertain_point_coords(logits, 20, 3, 0.75, make_generator(7, 11, 0))
    c = uncertain_point_coords(logits, 20, 3, 0.75, make_generator(7, 11, 1))
    assert a.shape == (2, 20, 2)
    assert torch.equal(a, b)
    assert not torch.equal(a, c)
    assert float(a.min()) >= 0 and float(a.max()) <= 1


def test_uncertain_points_prefer_small_abs_logits():
    # Left half of the map has logit 0 (most uncertain, also through zero padding at the left border),
    # the right half 20. 4 x 16 map: pixel centres of the left half are at x <= 7.5 / 16.
    logits = torch.zeros(1, 1, 4, 16)
    logits[..., 8:] = 20.0
    num_points, oversample, ratio = 40, 3, 0.75
    out = uncertain_point_coords(logits, num_points, oversample, ratio, make_generator(1, 2, 3))
    g = make_generator(1, 2, 3)
    candidates = torch.rand((1, 120, 2), generator=g)
    fresh = torch.rand((1, 10, 2), generator=g)
    important = out[0, :30]
    assert bool((important[:, 0] <= 7.5 / 16 + 1e-6).all())
    assert all(bool((candidates[0] == p).all(-1).any()) for p in important)
    assert torch.equal(out[0, 30:], fresh[0])


def test_uncertain_points_are_the_smallest_abs_logits():
    logits = torch.randn(3, 1, 5, 7, generator=torch.Generator().manual_seed(4)) * 4
    out = uncertain_point_coords(logits, 16, 2.0, 0.5, make_generator(0, 0, 0))
    candidates = torch.rand((3, 32, 2), generator=make_generator(0, 0, 0))
    grid = (2 * candidates - 1)[:, :, None]
    values = F.grid_sample(logits, grid, align_corners=False)[:, 0, :, 0].abs()  # independent of point_sample
    for m in range(3):
        expected = candidates[m][values[m].argsort()[:8]]
        torch.testing.assert_close(out[m, :8], expected)


# ------------------------------------------------------------------------------------------------ matcher


def _reference_cost(pred_logits, pred_masks, gt_masks, coords, wc=2.0, wm=5.0, wd=5.0):
    """Cost matrix written independently: loops over pairs, BCE via F.binary_cross_entropy_with_logits."""
    grid = (2 * coords - 1)[None, :, None, :]
    p = torch.cat([F.grid_sample(m[None, None], grid, align_corners=False).flatten() for m in pred_masks]).view(
        len(pred_masks), -1
    )
    gs = [F.grid_sample(m[None, None].float(), grid, align_corners=False).flatten() for m in gt_masks]
    cost = torch.zeros(len(pred_masks), len(gt_masks), dtype=torch.float64)
    for q in range(len(pred_masks)):
        for j, g in enumerate(gs):
            bce = F.binary_cross_entropy_with_logits(p[q], g)
            s = p[q].sigmoid()
            dice = 1 - (2 * (s * g).sum() + 1) / (s.sum() + g.sum() + 1)
            cls = -pred_logits[q].softmax(-1)[0]
            cost[q, j] = float(wc * cls + wm * bce + wd * dice)
    return cost


def _brute_force(cost):
    q, g = cost.shape
    best, best_pairs = math.inf, None
    if q >= g:
        for perm in itertools.permutations(range(q), g):
            total = sum(float(cost[perm[j], j]) for j in range(g))
            if total < best:
                best, best_pairs = total, sorted((perm[j], j) for j in range(g))
    else:
        for perm in itertools.permutations(range(g), q):
            total = sum(float(cost[i, perm[i]]) for i in range(q))
            if total < best:
                best, best_pairs = total, sorted((i, perm[i]) for i in range(q))
    return best, best_pairs


@pytest.mark.parametrize("num_queries,num_gt", [(3, 0), (1, 1), (3, 3), (4, 4), (5, 4), (5, 2), (4, 1), (2, 4)])
def test_matcher_equals_brute_force(num_queries, num_gt):
    matcher = HungarianMatcher(num_points=50)
    for trial in range(4):
        rng = torch.Generator().manual_seed(100 * num_queries + 10 * num_gt + trial)
        logits = torch.randn(num_queries, 2, generator=rng) * 2
        masks = torch.randn(num_queries, 8, 8, generator=rng) * 3
        gts = torch.rand(num_gt, 16, 16, generator=rng) > 0.5
        pred_idx, gt_idx = matcher.match(logits, masks, gts, make_generator(5, trial, 0))
        assert pred_idx.dtype == gt_idx.dtype == torch.int64
        if num_gt == 0:
            assert pred_idx.numel() == 0 and gt_idx.numel() == 0
            continue
        coords = torch.rand((50, 2), generator=make_generator(5, trial, 0))  # the matcher's documented draw
        cost = _reference_cost(logits, masks, gts, coords)
        torch.testing.assert_close(matcher.cost_matrix(logits, masks, gts, coords).double(), cost, rtol=1e-5, atol=1e-5)
        best, pairs = _brute_force(cost)
        got = sorted(zip(pred_idx.tolist(), gt_idx.tolist()))
        assert len(got) == min(num_queries, num_gt)
        assert len(set(pred_idx.tolist())) == len(got) and len(set(gt_idx.tolist())) == len(got)
        assert sum(float(cost[i, j]) for i, j in got) == pytest.approx(best, abs=1e-6)
        assert got == pairs


def test_matcher_batch_and_obvious_match():
    matcher = HungarianMatcher(num_points=200)
    gts = torch.zeros(2, 16, 16)
    gts[0, :8] = 1
    gts[1, 8:] = 1
    masks = torch.full((3, 4, 4), -10.0)
    masks[2, :2] = 10  # top half
    masks[0, 2:] = 10  # bottom half
    logits = torch.zeros(3, 2)
    out = matcher.match_batch(logits[None], masks[None], [gts], [make_generator(0, 0, 0)])
    assert len(out) == 1
    assert out[0][0].tolist() == [0, 2] and out[0][1].tolist() == [1, 0]


# ------------------------------------------------------------------------------------------------ losses by hand


def test_sigmoid_ce_loss_by_hand():
    logits = torch.tensor([[0.0, 2.0, -1.0, 3.0], [0.0, 0.0, 0.0, 0.0]])
    labels = torch.tensor([[1.0, 0.0, 0.0, 1.0], [0.0, 1.0, 0.0, 1.0]])
    # mask 1: softplus(-0) + softplus(2) + softplus(-1) + softplus(-3), averaged over the 4 points
    m1 = (0.6931471805599453 + 2.1269280110429727 + 0.31326168751822286 + 0.04858735157374206) / 4  # 0.795481
    m2 = 0.6931471805599453  # every point ln 2
    assert float(sigmoid_ce_loss(logits[:1], labels[:1], 1)) == pytest.approx(0.7954810677, abs=1e-6)
    assert float(sigmoid_ce_loss(logits, labels, 2)) == pytest.approx((m1 + m2) / 2, abs=1e-6)
    assert float(sigmoid_ce_loss(logits, labels, 4)) == pytest.approx((m1 + m2) / 4, abs=1e-6)


def test_dice_loss_by_hand():
    logits = torch.tensor([[0.0, 2.0, -1.0, 3.0], [0.0, 0.0, 0.0, 0.0]])
    labels = torch.tensor([[1.0, 0.0, 0.0, 1.0], [0.0, 1.0, 0.0, 1.0]])
    # sigmoid: 0.5, 0.8807970780, 0.2689414214, 0.9525741268
    inter = 0.5 + 0.9525741268  # 1.4525741268
    s_sum = 0.5 + 0.8807970780 + 0.2689414214 + 0.9525741268  # 2.6023126262
    m1 = 1 - (2 * inter + 1) / (s_sum + 2 + 1)  # 1 - 3.9051482536 / 5.6023126262 = 0.3029…
    m2 = 1 - (2 * 1.0 + 1) / (2.0 + 2 + 1)  # 0.4
    assert m1 == pytest.approx(0.30294, abs=1e-5)
    assert float(dice_loss(logits[:1], labels[:1], 1)) == pytest.approx(m1, abs=1e-6)
    assert float(dice_loss(logits, labels, 2)) == pytest.approx((m1 + m2) / 2, abs=1e-6)
    # +1 smoothing: an empty prediction on an empty label costs 0, not nan
    assert float(dice_loss(torch.full((1, 4), -1e4), torch.zeros(1, 4), 1)) == pytest.approx(0.0, abs=1e-6)


def test_object_ce_with_no_object_weight_by_hand():
    logits = torch.tensor([[[2.0, 0.0], [0.0, 1.0], [1.0, 1.0]]])
    loss = object_ce_loss(logits, [torch.tensor([1])], no_object_weight=0.1)
    # targets [no-object, object, no-object]; NLL: log(1+e^2), log(1+e^1), log 2; weights 0.1, 1, 0.1
    nll = [2.1269280110429727, 1.3132616875182228, 0.6931471805599453]
    expected = (0.1 * nll[0] + 1.0 * nll[1] + 0.1 * nll[2]) / 1.2  # 1.329391
    assert expected == pytest.approx(1.329391, abs=1e-6)
    assert float(loss) == pytest.approx(expected, abs=1e-6)


def test_masq_loss_by_hand():
    probs = torch.tensor([[0.5, 0.25, 0.25], [0.1, 0.2, 0.7], [0.2, 0.4, 0.4]])
    labels = torch.tensor([0, 2, 1])  # N = 2, index 2 = background
    # -ln 0.5 (w 1), -ln 0.7 (w 0.1), -ln 0.4 (w 1): weighted mean, times 2
    expected = 2.0 * (0.6931471806 + 0.1 * 0.3566749439 + 0.9162907319) / 2.1
    assert expected == pytest.approx(1.566767, abs=1e-6)
    assert float(masq_loss(probs.log(), labels)) == pytest.approx(expected, abs=1e-6)
    assert float(masq_loss(probs.log(), labels, background_weight=1.0, weight=1.0)) == pytest.approx(
        (0.6931471806 + 0.3566749439 + 0.9162907319) / 3, abs=1e-6
    )
    empty = torch.zeros(0, 3, requires_grad=True)
    zero = masq_loss(empty, torch.zeros(0, dtype=torch.long))
    assert float(zero.detach()) == 0.0
    zero.backward()
    assert empty.grad is not None


# ------------------------------------------------------------------------------------------------ assign_labels


def _block_gt(rows, cols, full=40):
    m = torch.zeros(full, full)
    m[rows[0] : rows[1], cols[0] : cols[1]] = 1
    return m


def test_assign_labels_dice_threshold():
    size = 20
    # GT at 40x40: block [10:30)^2 -> nearest-resized to [5:15)^2 = 100 px at 20x20; second GT [0:10) x [30:40) -> 25 px
    gts = torch.stack([_block_gt((10, 30), (10, 30)), _block_gt((0, 10), (30, 40))])
    classes = torch.tensor([3, 7])
    block = torch.zeros(size, size, dtype=torch.bool)
    block[5:15, 5:15] = True
    flat_idx = block.flatten().nonzero()[:, 0]

    def pred_with(k):  # the first k pixels of the 100-px GT block (logits +-5, already at size x size)
        m = torch.full((size * size,), -5.0)
        m[flat_idx[:k]] = 5.0
        return m.view(size, size)

    second = torch.full((size, size), -5.0)
    second[0:5, 15:20] = 5.0
    preds = torch.stack([pred_with(43), pred_with(42), pred_with(100), second, second, torch.full((size, size), -5.0)])
    # Dice(43) = 87/144 = 0.6042 > 0.6 ; Dice(42) = 85/143 = 0.5944 <= 0.6
    assert 87 / 144 > 0.6 > 85 / 143
    labels = assign_labels(preds, gts, classes, num_classes=10, size=size)
    assert labels.dtype == torch.int64
    assert labels.tolist() == [3, 10, 3, 7, 7, 10]  # many queries may take one GT; empty -> background
    assert assign_labels(preds, gts[:0], classes[:0], 10, size).tolist() == [10] * 6
    # the threshold is a parameter: Dice 0.5944 passes 0.59
    assert assign_labels(preds[1:2], gts, classes, 10, size, threshold=0.59).tolist() == [3]


def test_assign_labels_resizes_predictions_bilinearly():
    # a 10x10 prediction of the top half, upsampled to 20x20, matches a 20x20 top-half GT
    pred = torch.full((1, 10, 10), -4.0)
    pred[0, :5] = 4.0
    gt = torch.zeros(1, 20, 20)
    gt[0, :10] = 1
    assert assign_labels(pred, gt, torch.tensor([1]), 5, 20).tolist() == [1]
    assert assign_labels(-pred, gt, torch.tensor([1]), 5, 20).tolist() == [5]


# ------------------------------------------------------------------------------------------------ SetCriterion


def _tiny_outputs(seed=0, batch=2, queries=5, aux_layers=2):
    rng = torch.Generator().manual_seed(seed)
    layers = [
        (
            torch.randn(batch, queries, 2, generator=rng).requires_grad_(),
            (torch.randn(batch, queries, 8, 8, generator=rng) * 2).requires_grad_(),
        )
        for _ in range(aux_layers + 1)
    ]
    outputs = {
        "pred_logits": layers[-1][0],
        "pred_masks": layers[-1][1],
        "aux_outputs": [{"pred_logits": lg, "pred_masks": mk} for lg, mk in layers[:-1]],
    }
    return outputs, layers


def _tiny_targets(seed=1):
    rng = torch.Generator().manual_seed(seed)
    return [torch.rand(2, 16, 16, generator=rng) > 0.5, torch.rand(1, 16, 16, generator=rng) > 0.5]


def _criterion():
    return SetCriterion(HungarianMatcher(num_points=64), num_points=64)


def test_set_criterion_finite_keys_grads_deterministic():
    criterion = _criterion()
    outputs, layers = _tiny_outputs()
    targets = _tiny_targets()
    losses = criterion(outputs, targets, seed=3, iteration=10)
    expected_keys = {"loss_ce", "loss_mask", "loss_dice", "total"} | {
        f"loss_{n}_{i}" for n in ("ce", "mask", "dice") for i in range(2)
    }
    assert set(losses) == expected_keys
    assert all(bool(torch.isfinite(v)) and v.dim() == 0 for v in losses.values())
    weighted = sum(
        {"ce": 2.0, "mask": 5.0, "dice": 5.0}[k.split("_")[1]] * v for k, v in losses.items() if k != "total"
    )
    torch.testing.assert_close(losses["total"], weighted)

    # loss_ce of the last layer = the hand-checked CE on the matcher's own indices (first draws of each generator)
    gens = [make_generator(3, 10, b) for b in range(2)]
    idx = criterion.matcher.match_batch(outputs["pred_logits"], outputs["pred_masks"], targets, gens)
    torch.testing.assert_close(losses["loss_ce"], object_ce_loss(outputs["pred_logits"], [p for p, _ in idx], 0.1))

    losses["total"].backward()
    for logits, masks in layers:
        assert logits.grad is not None and masks.grad is not None
        assert float(logits.grad.abs().sum()) > 0 and float(masks.grad.abs().sum()) > 0

    again = criterion(_tiny_outputs()[0], targets, seed=3, iteration=10)
    assert all(torch.equal(losses[k].detach(), again[k].detach()) for k in losses)
    other = criterion(_tiny_outputs()[0], targets, seed=3, iteration=11)
    assert not torch.equal(other["loss_mask"], again["loss_mask"])


def test_set_criterion_split_batch_matches_full_batch():
    # per-sample generators: two processes with one image each (sample_offset 0 and 1) see the same draws
    criterion = _criterion()
    targets = _tiny_targets()
    outputs, _ = _tiny_outputs()
    full = criterion(outputs, targets, seed=0, iteration=2)

    def part(b):
        out = {
            "pred_logits": outputs["pred_logits"][b : b + 1],
            "pred_masks": outputs["pred_masks"][b : b + 1],
            "aux_outputs": [{k: v[b : b + 1] for k, v in a.items()} for a in outputs["aux_outputs"]],
        }
        return criterion(out, targets[b : b + 1], seed=0, iteration=2, sample_offset=b)

    p0, p1 = part(0), part(1)
    for key in ("loss_mask", "loss_dice", "loss_mask_0", "loss_dice_1"):
        # sum over masks / num_masks: full * 3 = part0 * 2 + part1 * 1
        torch.testing.assert_close(full[key] * 3, p0[key] * 2 + p1[key] * 1)


def test_set_criterion_without_targets():
    criterion = _criterion()
    outputs, layers = _tiny_outputs(aux_layers=1)
    losses = criterion(outputs, [torch.zeros(0, 16, 16), torch.zeros(0, 16, 16)], seed=0, iteration=0)
    assert float(losses["loss_mask"].detach()) == 0.0 and float(losses["loss_dice"].detach()) == 0.0
    # every query is no-object: plain CE towards index 1 (uniform weights 0.1 cancel in the weighted mean)
    expected = F.cross_entropy(outputs["pred_logits"].detach().reshape(-1, 2), torch.ones(10, dtype=torch.long))
    torch.testing.assert_close(losses["loss_ce"].detach(), expected)
    losses["total"].backward()
    assert layers[-1][0].grad is not None and layers[-1][1].grad is not None


def test_set_criterion_accepts_proposal_output_like_object():
    class Out:
        pass

    outputs, _ = _tiny_outputs(aux_layers=1)
    obj = Out()
    obj.pred_logits, obj.pred_masks, obj.aux = outputs["pred_logits"], outputs["pred_masks"], outputs["aux_outputs"]
    criterion = _criterion()
    a = criterion(obj, _tiny_targets(), seed=1, iteration=1)
    b = criterion(outputs, _tiny_targets(), seed=1, iteration=1)
    assert set(a) == set(b) and torch.equal(a["total"].detach(), b["total"].detach())
