"""Unit tests of ``masqclip_cli.inference.postprocess`` on hand-built masks and scores (values computed by hand).

Tie rule everywhere: the lowest index wins, as ``torch.argmax`` (lowest class in ``max_c p_cls`` and in the semantic
argmax, lowest kept query in the panoptic pixel argmax, ``(query, class)`` order among equal instance scores and at the
top-k cut).
"""

from __future__ import annotations

import math
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import masqclip_cli.inference.postprocess as pp
from masqclip_cli.inference.postprocess import (
    PostprocessConfig,
    instance_inference,
    panoptic_inference,
    postprocess,
    postprocess_output,
    semantic_inference,
    semantic_scores,
)
from masqclip_cli.modeling.proposals.network import postprocess_masks
from masqclip_cli.structures import Segmentation

BIG = 5.0  # σ(5) = 0.9933, σ(-5) = 0.0067


def sig(x: float) -> float:
    return 1.0 / (1.0 + math.exp(-x))


def row(*values: float) -> torch.Tensor:
    """(1, W) logits of one query on a one-row image."""
    return torch.tensor([values], dtype=torch.float32)


def masks(*rows: torch.Tensor) -> torch.Tensor:
    """(Q, 1, W) from one row per query."""
    return torch.stack(rows)


def seg_tuple(s) -> tuple:
    return (s.id, s.category, s.isthing, s.area, s.bbox, s.query)


def random_inputs(seed: int = 0, q: int = 13, n: int = 6, hw: tuple[int, int] = (8, 10)):
    """Random (Q, h, w) logits at stride 4 of a (4h, 4w) padded input, and a peaky (Q, N) p_cls."""
    g = torch.Generator().manual_seed(seed)
    logits = 3.0 * torch.randn((q, *hw), generator=g)
    p = torch.softmax(3.0 * torch.randn((q, n), generator=g), dim=1) * torch.rand((q, 1), generator=g)
    return logits, p


# ---------------------------------------------------------------------------------------------------- config
def test_config_validation():
    assert PostprocessConfig().tasks == ("panoptic",)
    assert PostprocessConfig(tasks=["instance", "semantic", "instance"]).tasks == ("instance", "semantic")
    assert PostprocessConfig(tasks="semantic").tasks == ("semantic",)
    with pytest.raises(ValueError, match="unknown task"):
        PostprocessConfig(tasks=("depth",))
    with pytest.raises(ValueError, match="semantic_order"):
        PostprocessConfig(semantic_order="bicubic")
    with pytest.raises(ValueError, match="chunk_size"):
        PostprocessConfig(chunk_size=0)
    with pytest.raises(ValueError, match="detections_per_image"):
        PostprocessConfig(detections_per_image=-1)
    with pytest.raises(ValueError, match="object_mask_threshold"):
        PostprocessConfig(object_mask_threshold=float("nan"))


def test_input_validation():
    logits, p = random_inputs(q=3, n=2, hw=(2, 2))
    with pytest.raises(ValueError, match="isthing"):
        postprocess(logits, p, [True], (8, 8), (8, 8))
    with pytest.raises(ValueError, match="queries"):
        postprocess(logits[:2], p, [True, False], (8, 8), (8, 8))
    with pytest.raises(ValueError, match="exceeds"):
        postprocess(logits, p, [True, False], (9, 8), (8, 8))
    with pytest.raises(ValueError, match=r"\(Q, H, W\)"):
        panoptic_inference(logits[0], p, [True, False])
    with pytest.raises(ValueError, match="order"):
        semantic_scores(logits, p, (8, 8), (8, 8), order="sideways")


# ---------------------------------------------------------------------------------------------------- semantic
def test_semantic_constant_masks_by_hand():
    # Two queries with constant logits 0 (σ = 0.5) and 20 (σ ≈ 1): S = 0.5·p0 + p1 = [0.6, 0.4, 0.5].
    logits = torch.stack([torch.zeros(2, 2), torch.full((2, 2), 20.0)])
    p = torch.tensor([[0.2, 0.6, 0.2], [0.5, 0.1, 0.4]])
    for order in ("padded", "resized"):
        s = semantic_scores(logits, p, (7, 6), (8, 8), (5, 9), order=order)
        assert s.shape == (3, 5, 9) and s.dtype == torch.float32
        expect = torch.tensor([0.6, 0.4, 0.5]).view(3, 1, 1).expand(3, 5, 9)
        torch.testing.assert_close(s, expect, atol=1e-6, rtol=0)
        lab = semantic_inference(logits, p, (7, 6), (8, 8), (5, 9), order=order)
        assert lab.dtype == np.int32 and lab.shape == (5, 9) and (lab == 0).all()


def test_semantic_crop_and_argmax_by_hand():
    # Logits given at the padded size (4, 6): upsampling is the identity; the image is the top-left (3, 4).
    # Query 0 (σ≈1 on columns 0-1, ≈0 elsewhere) votes class 1, query 1 (σ≈1 on columns 2-5) votes class 2.
    q0 = torch.full((4, 6), -20.0)
    q0[:, :2] = 20.0
    q1 = -q0
    logits = torch.stack([q0, q1])
    p = torch.tensor([[0.1, 0.7, 0.2], [0.1, 0.3, 0.6]])
    s = semantic_scores(logits, p, (3, 4), (4, 6))
    assert s.shape == (3, 3, 4)
    torch.testing.assert_close(s[:, :, :2], p[0].view(3, 1, 1).expand(3, 3, 2), atol=1e-6, rtol=0)
    torch.testing.assert_close(s[:, :, 2:], p[1].view(3, 1, 1).expand(3, 3, 2), atol=1e-6, rtol=0)
    lab = semantic_inference(logits, p, (3, 4), (4, 6))
    np.testing.assert_array_equal(lab, np.array([[1, 1, 2, 2]] * 3, dtype=np.int32))
    res = postprocess(logits, p, [True, False, False], (3, 4), (4, 6), config=PostprocessConfig(tasks=("semantic",)))
    np.testing.assert_array_equal(res.semantic, lab)


def test_semantic_ties_lowest_class():
    # One query, σ = 0.5 everywhere: classes 1 and 2 tie above class 0 -> class 1; all tie -> class 0.
    logits = torch.zeros(1, 2, 2)
    lab = semantic_inference(logits, torch.tensor([[0.2, 0.4, 0.4]]), (8, 8), (8, 8))
    assert (lab == 1).all()
    lab = semantic_inference(logits, torch.tensor([[0.3, 0.3, 0.3]]), (8, 8), (8, 8))
    assert (lab == 0).all()
    # Ties across class chunks (one class per chunk): still the lowest index.
    lab = semantic_inference(logits, torch.tensor([[0.2, 0.4, 0.4]]), (8, 8), (8, 8), max_chunk_bytes=1)
    assert (lab == 1).all()


def test_semantic_orders_match_their_definitions():
    logits, p = random_inputs(seed=1)
    image, padded, out = (29, 37), (32, 40), (45, 50)
    up = F.interpolate(logits[None], size=padded, mode="bilinear", align_corners=False)[0]
    s_pad = torch.einsum("qc,qhw->chw", p, up.sigmoid())[:, : image[0], : image[1]]
    want_padded = F.interpolate(s_pad[None], size=out, mode="bilinear", align_corners=False)[0]
    want_resized = torch.einsum("qc,qhw->chw", p, postprocess_masks(logits, padded, image, out).sigmoid())
    got_padded = semantic_scores(logits, p, image, padded, out, order="padded")
    got_resized = semantic_scores(logits, p, image, padded, out, order="resized")
    torch.testing.assert_close(got_padded, want_padded, atol=1e-6, rtol=0)
    torch.testing.assert_close(got_resized, want_resized, atol=1e-6, rtol=0)
    assert (got_padded - got_resized).abs().max() > 1e-3  # the two orders really differ when a resize happens
    # Without a resize they agree.
    a = semantic_scores(logits, p, image, padded, None, order="padded")
    b = semantic_scores(logits, p, image, padded, None, order="resized")
    torch.testing.assert_close(a, b, atol=1e-6, rtol=0)


@pytest.mark.parametrize("order", ["padded", "resized"])
def test_semantic_chunking_invariance(order):
    logits, p = random_inputs(seed=2)
    args = (logits, p, (29, 37), (32, 40), (45, 50))
    ref = semantic_scores(*args, order=order, chunk_size=13)
    top2 = ref.topk(2, dim=0).values
    near_tie = ((top2[0] - top2[1]) < 1e-5).numpy()
    ref_lab = semantic_inference(*args, order=order, chunk_size=13)
    # While all masks fit in max_chunk_bytes, the query chunking does not change a bit.
    for chunk in (1, 7):
        torch.testing.assert_close(semantic_scores(*args, order=order, chunk_size=chunk), ref, atol=0, rtol=0)
        np.testing.assert_array_equal(semantic_inference(*args, order=order, chunk_size=chunk), ref_lab)
    # Under a byte cap (one class / one or two queries per chunk) the sum's float rounding may differ, ~1e-7.
    for chunk, max_bytes in ((13, 1), (7, 45 * 50 * 4 * 2)):
        s = semantic_scores(*args, order=order, chunk_size=chunk, max_chunk_bytes=max_bytes)
        torch.testing.assert_close(s, ref, atol=1e-6, rtol=0)
        lab = semantic_inference(*args, order=order, chunk_size=chunk, max_chunk_bytes=max_bytes)
        assert not ((lab != ref_lab) & ~near_tie).any()


# ---------------------------------------------------------------------------------------------------- panoptic
ISTHING_3 = [True, False, False]  # class 0 thing, classes 1 and 2 stuff


def test_panoptic_stuff_merge_and_thing_ids():
    # Each query owns one column of a 1x4 image (logit +5 there, -5 elsewhere).
    #   q0: stuff class 1, s 0.9, column 0 -> id 1
    #   q1: thing class 0, s 0.8, column 1 -> id 2
    #   q2: stuff class 1, s 0.95, column 2 -> merged into id 1 (segment score becomes 0.95)
    #   q3: thing class 0, s 0.6, column 3 -> id 3 (things never merge)
    m = masks(
        row(BIG, -BIG, -BIG, -BIG), row(-BIG, BIG, -BIG, -BIG), row(-BIG, -BIG, BIG, -BIG), row(-BIG, -BIG, -BIG, BIG)
    )
    p = torch.tensor([[0.05, 0.9, 0.05], [0.8, 0.1, 0.1], [0.0, 0.95, 0.05], [0.6, 0.2, 0.2]])
    pan, segs = panoptic_inference(m, p, ISTHING_3)
    assert pan.dtype == np.int32 and pan.shape == (1, 4)
    np.testing.assert_array_equal(pan, [[1, 2, 1, 3]])
    assert [seg_tuple(s) for s in segs] == [
        (1, 1, False, 2, (0.0, 0.0, 3.0, 1.0), 0),
        (2, 0, True, 1, (1.0, 0.0, 1.0, 1.0), 1),
        (3, 0, True, 1, (3.0, 0.0, 1.0, 1.0), 3),
    ]
    assert [s.score for s in segs] == pytest.approx([0.95, 0.8, 0.6])
    assert all(s.mask is None for s in segs)


def test_panoptic_two_stuff_classes_do_not_merge():
    m = masks(row(BIG, -BIG), row(-BIG, BIG))
    p = torch.tensor([[0.0, 0.9, 0.1], [0.0, 0.1, 0.9]])
    pan, segs = panoptic_inference(m, p, ISTHING_3)
    np.testing.assert_array_equal(pan, [[1, 2]])
    assert [(s.id, s.category) for s in segs] == [(1, 1), (2, 2)]


def test_panoptic_object_threshold_is_strict():
    # q1 has s = 0.3 exactly: excluded at threshold 0.3 (its column then goes to q0, whose σ < 0.5 there -> void).
    m = masks(row(BIG, -BIG), row(-BIG, BIG))
    p = torch.tensor([[0.9, 0.05, 0.05], [0.3, 0.2, 0.2]])
    pan, segs = panoptic_inference(m, p, ISTHING_3, object_mask_threshold=0.3)
    np.testing.assert_array_equal(pan, [[1, 0]])
    assert [(s.id, s.query) for s in segs] == [(1, 0)]
    pan, segs = panoptic_inference(m, p, ISTHING_3, object_mask_threshold=0.29)
    np.testing.assert_array_equal(pan, [[1, 2]])
    assert [(s.id, s.query) for s in segs] == [(1, 0), (2, 1)]


def test_panoptic_overlap_threshold():
    # q0 (s 0.5) has σ ≥ 0.5 on all 4 pixels but wins only column 0 (0.5·σ(5) = 0.497 > 0.9·σ(-5) = 0.006);
    # q1 (s 0.9) wins columns 1-3. q0's ratio = 1/4 = 0.25.
    m = masks(row(BIG, BIG, BIG, BIG), row(-BIG, BIG, BIG, BIG))
    p = torch.tensor([[0.5, 0.0, 0.0], [0.9, 0.05, 0.05]])
    pan, segs = panoptic_inference(m, p, ISTHING_3, overlap_threshold=0.3)  # 0.25 < 0.3: q0 dropped, column 0 void
    np.testing.assert_array_equal(pan, [[0, 1, 1, 1]])
    assert [(s.id, s.query, s.area) for s in segs] == [(1, 1, 3)]
    pan, segs = panoptic_inference(m, p, ISTHING_3, overlap_threshold=0.25)  # not below: kept
    np.testing.assert_array_equal(pan, [[1, 2, 2, 2]])
    assert [(s.id, s.query, s.area) for s in segs] == [(1, 0, 1), (2, 1, 3)]


def test_panoptic_empty_areas_are_skipped_even_with_overlap_zero():
    #   q0: σ < 0.5 everywhere but wins column 0 (σ≥0.5 area 0)      -> skipped, column 0 void
    #   q1: σ ≥ 0.5 on column 1 but never wins (argmax area 0)        -> skipped
    #   q2: wins column 1 and 2, σ ≥ 0.5 only on column 2              -> segment = column 2 only
    #   q3: wins column 3 where σ < 0.5, σ ≥ 0.5 on column 2 (lost)   -> areas 1 and 1, intersection 0 -> skipped
    m = masks(
        row(-0.5, -BIG, -BIG, -BIG), row(-BIG, 1.0, -BIG, -BIG), row(-BIG, -0.1, BIG, -BIG), row(-BIG, -BIG, 0.5, -1.0)
    )
    p = torch.tensor([[0.9, 0.0, 0.0], [0.31, 0.0, 0.0], [0.9, 0.0, 0.0], [0.35, 0.0, 0.0]])
    # column 1: q1 0.31·σ(1) = 0.227 < q2 0.9·σ(-0.1) = 0.428; column 3: q3 0.35·σ(-1) = 0.094 beats 0.9·σ(-5) = 0.006
    pan, segs = panoptic_inference(m, p, ISTHING_3, object_mask_threshold=0.3, overlap_threshold=0.0)
    np.testing.assert_array_equal(pan, [[0, 0, 1, 0]])
    assert [(s.id, s.query, s.area, s.bbox) for s in segs] == [(1, 2, 1, (2.0, 0.0, 1.0, 1.0))]


def test_panoptic_ties_lowest_query_and_class():
    # q0 and q1 give the same s·σ on column 0: q0 wins it (lowest index). q1 keeps column 1.
    m = masks(row(BIG, -BIG), row(BIG, BIG))
    p = torch.tensor([[0.8, 0.1, 0.1], [0.8, 0.1, 0.1]])
    pan, segs = panoptic_inference(m, p, ISTHING_3, overlap_threshold=0.5)  # q1: 1 of 2 pixels = 0.5, kept
    np.testing.assert_array_equal(pan, [[1, 2]])
    assert [s.query for s in segs] == [0, 1]
    # Tie in max_c p_cls: the lowest class (0, a thing) is taken.
    pan, segs = panoptic_inference(m[:1], torch.tensor([[0.45, 0.45, 0.1]]), ISTHING_3)
    assert [(s.category, s.isthing) for s in segs] == [(0, True)]
    # The tie rule holds across chunks too (q0 and q1 in different chunks).
    pan1, segs1 = panoptic_inference(m, p, ISTHING_3, overlap_threshold=0.5, chunk_size=1)
    np.testing.assert_array_equal(pan1, [[1, 2]])
    assert [s.query for s in segs1] == [0, 1]


def test_panoptic_empty_outputs():
    m = masks(row(BIG, BIG), row(BIG, -BIG))
    p = torch.tensor([[0.2, 0.05, 0.05], [0.1, 0.1, 0.1]])  # nobody above 0.3
    pan, segs = panoptic_inference(m, p, ISTHING_3)
    assert pan.dtype == np.int32 and pan.shape == (1, 2) and not pan.any() and segs == []
    # No queries at all.
    pan, segs = panoptic_inference(torch.zeros(0, 3, 4), torch.zeros(0, 3), ISTHING_3)
    assert pan.shape == (3, 4) and not pan.any() and segs == []


def test_panoptic_probabilities_equal_logits():
    logits, p = random_inputs(seed=3, hw=(12, 15))
    isthing = [True, True, False, False, True, False]
    a = panoptic_inference(logits, p, isthing, 0.05, 0.3)
    b = panoptic_inference(logits.sigmoid(), p, isthing, 0.05, 0.3, masks_are_logits=False)
    np.testing.assert_array_equal(a[0], b[0])
    assert [seg_tuple(s) for s in a[1]] == [seg_tuple(s) for s in b[1]]


def test_panoptic_segment_stats_from_final_map():
    logits, p = random_inputs(seed=4, hw=(20, 17))
    isthing = [True, False, True, False, False, True]
    pan, segs = panoptic_inference(logits, p, isthing, 0.05, 0.3)
    assert len(segs) >= 2 and [s.id for s in segs] == list(range(1, len(segs) + 1))
    assert set(np.unique(pan)) <= {0, *[s.id for s in segs]}
    for s in segs:
        mk = pan == s.id
        ys, xs = np.nonzero(mk)
        assert s.area == mk.sum()
        assert s.bbox == (
            float(xs.min()),
            float(ys.min()),
            float(xs.max() - xs.min() + 1),
            float(ys.max() - ys.min() + 1),
        )
        assert s.isthing == isthing[s.category]


# ---------------------------------------------------------------------------------------------------- instance
def _instance_example():
    # q0 logits [2, -1, 0, 3] -> mask [T, F, F, T] (0 is not > 0), mean σ inside = (σ(2) + σ(3)) / 2
    # q1 logits [-3, 1, 1, -2] -> mask [F, T, T, F], mean σ inside = σ(1)
    m = masks(row(2.0, -1.0, 0.0, 3.0), row(-3.0, 1.0, 1.0, -2.0))
    p = torch.tensor([[0.9, 0.1, 0.5], [0.2, 0.8, 0.05]])  # flat: [.9, .1, .5, .2, .8, .05]
    ms0 = (sig(2.0) + sig(3.0)) / (2 + 1e-6)
    ms1 = 2 * sig(1.0) / (2 + 1e-6)
    return m, p, ms0, ms1


def test_instances_by_hand_thing_only():
    m, p, ms0, ms1 = _instance_example()
    isthing = [True, True, False]
    # top-3: (q0, c0) .9, (q1, c1) .8, (q0, c2) .5 -> c2 is stuff and the vocabulary has stuff: dropped.
    inst = instance_inference(m, p, isthing, k=3)
    assert [(i.id, i.query, i.category, i.isthing) for i in inst] == [(1, 0, 0, True), (2, 1, 1, True)]
    assert [i.score for i in inst] == pytest.approx([0.9 * ms0, 0.8 * ms1], abs=1e-6)
    np.testing.assert_array_equal(inst[0].mask, [[True, False, False, True]])
    np.testing.assert_array_equal(inst[1].mask, [[False, True, True, False]])
    assert inst[0].mask.dtype == np.bool_
    assert [(i.area, i.bbox) for i in inst] == [(2, (0.0, 0.0, 4.0, 1.0)), (2, (1.0, 0.0, 2.0, 1.0))]
    # keep_stuff: the stuff detection stays, ranked by its score 0.5·ms0.
    inst = instance_inference(m, p, isthing, k=3, keep_stuff=True)
    assert [(i.query, i.category) for i in inst] == [(0, 0), (1, 1), (0, 2)]
    assert inst[2].score == pytest.approx(0.5 * ms0, abs=1e-6) and not inst[2].isthing
    # The filter runs after the top-k: k=1 keeps (q0, c0); a stuff class at the top is dropped, not replaced.
    p2 = torch.tensor([[0.1, 0.1, 0.95], [0.2, 0.8, 0.05]])
    assert instance_inference(m, p2, isthing, k=1) == []


def test_instances_all_thing_vocabulary_and_k_clamp():
    m, p, ms0, ms1 = _instance_example()
    inst = instance_inference(m, p, [True, True, True], k=100)  # k clamps to Q·N = 6, nothing filtered
    assert len(inst) == 6
    assert [(i.query, i.category) for i in inst] == [(0, 0), (1, 1), (0, 2), (1, 0), (0, 1), (1, 2)]
    want = [0.9 * ms0, 0.8 * ms1, 0.5 * ms0, 0.2 * ms1, 0.1 * ms0, 0.05 * ms1]
    assert [i.score for i in inst] == pytest.approx(want, abs=1e-6)
    assert instance_inference(m, p, [True, True, True], k=0) == []


def test_instances_ties_and_empty_mask():
    # Two identical queries: equal scores, ranked by (query, class). Top-k cut among equal scores: lowest index.
    m = masks(row(1.0, -1.0), row(1.0, -1.0))
    p = torch.tensor([[0.5, 0.5], [0.5, 0.5]])
    inst = instance_inference(m, p, [True, True], k=4)
    assert [(i.query, i.category) for i in inst] == [(0, 0), (0, 1), (1, 0), (1, 1)]
    inst = instance_inference(m, p, [True, True], k=3)
    assert [(i.query, i.category) for i in inst] == [(0, 0), (0, 1), (1, 0)]
    # A query with no positive logit: empty mask, score 0, area 0, empty box (the official keeps it).
    inst = instance_inference(masks(row(-1.0, -2.0)), torch.tensor([[0.7]]), [True], k=1)
    assert [(i.score, i.area, i.bbox) for i in inst] == [(0.0, 0, (0.0, 0.0, 0.0, 0.0))]


# ---------------------------------------------------------------------------------------------------- postprocess
ISTHING_6 = [True, False, True, False, False, True]
GEOM = dict(image_size=(29, 37), padded_size=(32, 40), output_size=(45, 50))


def _run(logits, p, **cfg) -> Segmentation:
    config = PostprocessConfig(tasks=("semantic", "panoptic", "instance"), **cfg)
    return postprocess(logits, p, ISTHING_6, config=config, **GEOM)


def test_postprocess_tasks_and_types():
    logits, p = random_inputs(seed=5)
    res = postprocess(logits, p, ISTHING_6, (29, 37), (32, 40))  # default: panoptic only, output = image size
    assert isinstance(res, Segmentation) and res.image_size == (29, 37)
    assert res.semantic is None and res.instances is None
    assert res.panoptic.shape == (29, 37) and res.panoptic.dtype == np.int32
    res = _run(logits, p, object_mask_threshold=0.05, detections_per_image=20)
    assert res.image_size == (45, 50)
    assert res.semantic.shape == (45, 50) and res.semantic.dtype == np.int32
    assert res.panoptic.shape == (45, 50) and len(res.segments) >= 1
    assert 1 <= len(res.instances) <= 20 and all(ISTHING_6[i.category] for i in res.instances)
    # Same as the lower-level functions on the post-processed masks.
    full = postprocess_masks(logits, GEOM["padded_size"], GEOM["image_size"], GEOM["output_size"], chunk=1)
    pan, segs = panoptic_inference(full, p, ISTHING_6, 0.05, 0.3)
    np.testing.assert_array_equal(res.panoptic, pan)
    assert [seg_tuple(s) for s in res.segments] == [seg_tuple(s) for s in segs]
    inst = instance_inference(full, p, ISTHING_6, k=20)
    assert [(i.query, i.category, i.score) for i in res.instances] == [(i.query, i.category, i.score) for i in inst]
    sem = semantic_inference(logits, p, order="padded", **GEOM)
    np.testing.assert_array_equal(res.semantic, sem)


def test_postprocess_output_wrapper():
    logits, p = random_inputs(seed=6)
    out = SimpleNamespace(mask_logits=logits, p_cls=p, image_size=(29, 37), padded_size=(32, 40))
    cfg = PostprocessConfig(tasks=("panoptic", "instance"), object_mask_threshold=0.05)
    a = postprocess_output(out, ISTHING_6, (45, 50), cfg)
    b = postprocess(logits, p, ISTHING_6, (29, 37), (32, 40), (45, 50), cfg)
    np.testing.assert_array_equal(a.panoptic, b.panoptic)
    assert [i.score for i in a.instances] == [i.score for i in b.instances]


@pytest.mark.parametrize("seed", [7, 8])
def test_postprocess_chunking_invariance(seed):
    """Results are identical for chunk_size 1, 7 and Q, and under a byte cap that forces one map per chunk."""
    logits, p = random_inputs(seed=seed)
    q = logits.shape[0]
    common = dict(object_mask_threshold=0.05, detections_per_image=30, semantic_order="resized")
    ref = _run(logits, p, chunk_size=q, **common)
    assert len(ref.segments) >= 2 and len(ref.instances) >= 2
    scores = semantic_scores(logits, p, order="resized", **GEOM)
    top2 = scores.topk(2, dim=0).values
    near_tie = ((top2[0] - top2[1]) < 1e-5).numpy()
    for chunk, max_bytes in ((1, 2**30), (7, 2**30), (q, 2**30), (q, 1)):
        res = _run(logits, p, chunk_size=chunk, max_chunk_bytes=max_bytes, **common)
        np.testing.assert_array_equal(res.panoptic, ref.panoptic)
        assert [seg_tuple(s) + (s.score,) for s in res.segments] == [seg_tuple(s) + (s.score,) for s in ref.segments]
        assert [(i.query, i.category, i.score, i.area, i.bbox) for i in res.instances] == [
            (i.query, i.category, i.score, i.area, i.bbox) for i in ref.instances
        ]
        for a, b in zip(res.instances, ref.instances):
            np.testing.assert_array_equal(a.mask, b.mask)
        assert not ((res.semantic != ref.semantic) & ~near_tie).any()


def test_postprocess_never_upsamples_more_than_a_chunk(monkeypatch):
    """Full-size masks are made at most ``chunk`` queries at a time, ``chunk`` also capped by ``max_chunk_bytes``
    (the small analogue of a 9000x9000 output with Q = 100), and no plane is kept when they do not all fit."""
    logits, p = random_inputs(seed=9)
    sizes: list[int] = []
    real_output, real_padded = pp._MaskPlanes.output, pp._MaskPlanes.padded

    def spy_output(self, idx):
        sizes.append(int(idx.numel()))
        return real_output(self, idx)

    def spy_padded(self, idx):
        sizes.append(int(idx.numel()))
        return real_padded(self, idx)

    monkeypatch.setattr(pp._MaskPlanes, "output", spy_output)
    monkeypatch.setattr(pp._MaskPlanes, "padded", spy_padded)
    common = dict(object_mask_threshold=0.0, detections_per_image=78, semantic_order="resized")
    _run(logits, p, chunk_size=5, **common)
    assert sizes and max(sizes) <= 5
    sizes.clear()
    one_map = 45 * 50 * 4
    kept: list[bool] = []
    real_init = pp._MaskPlanes.__init__

    def spy_init(self, *args, **kwargs):
        real_init(self, *args, **kwargs)
        kept.append(self._padded is not None or self._out is not None)

    monkeypatch.setattr(pp._MaskPlanes, "__init__", spy_init)
    _run(logits, p, chunk_size=16, max_chunk_bytes=2 * one_map, **common)
    assert sizes and max(sizes) <= 2
    assert kept == [False]


@pytest.mark.parametrize("output_size", [(29, 37), (45, 50), (20, 24)])
def test_postprocess_upsamples_each_plane_once_and_equals_per_task(monkeypatch, output_size):
    """With all three tasks, every mask plane is upsampled to the padded size once (shared by the tasks) and the
    results equal each task's own function on the official post-processed masks, bit for bit."""
    logits, p = random_inputs(seed=11)
    q = logits.shape[0]
    geom = dict(image_size=(29, 37), padded_size=(32, 40), output_size=output_size)
    calls: list[tuple[int, ...]] = []
    real = F.interpolate

    def counting(x, *args, **kwargs):
        calls.append(tuple(kwargs.get("size") or args[0]))
        return real(x, *args, **kwargs)

    monkeypatch.setattr(pp, "F", SimpleNamespace(interpolate=counting))
    config = PostprocessConfig(tasks=("semantic", "panoptic", "instance"), object_mask_threshold=0.05,
                               detections_per_image=40)
    res = postprocess(logits, p, ISTHING_6, config=config, **geom)
    monkeypatch.undo()
    assert calls.count((32, 40)) == q  # one upsampling per plane, not one per task
    full = postprocess_masks(logits, geom["padded_size"], geom["image_size"], output_size, chunk=1)
    pan, segs = panoptic_inference(full, p, ISTHING_6, 0.05, 0.3)
    np.testing.assert_array_equal(res.panoptic, pan)
    assert [seg_tuple(s) + (s.score,) for s in res.segments] == [seg_tuple(s) + (s.score,) for s in segs]
    inst = instance_inference(full, p, ISTHING_6, k=40)
    assert [(i.query, i.category, i.score, i.area, i.bbox) for i in res.instances] == [
        (i.query, i.category, i.score, i.area, i.bbox) for i in inst
    ]
    for a, b in zip(res.instances, inst):
        np.testing.assert_array_equal(a.mask, b.mask)
    np.testing.assert_array_equal(res.semantic, semantic_inference(logits, p, order="padded", **geom))


def _near_tie(scores: torch.Tensor) -> np.ndarray:
    top2 = scores.topk(2, dim=0).values
    return ((top2[0] - top2[1]) < 1e-5).numpy()


@pytest.mark.parametrize("order", ["padded", "resized"])
def test_semantic_pruning_of_large_vocabularies_is_exact(monkeypatch, order):
    """With 400 classes and peaky probabilities most classes are skipped, and the argmax still equals the argmax of
    all N score maps; a class that is no query's top class but wins where many masks overlap (by its sum over
    queries) is kept."""
    g = torch.Generator().manual_seed(21)
    q, n = 13, 400
    logits = 3.0 * torch.randn((q, 8, 10), generator=g)
    logits[:, 2:5, 3:7] = 6.0  # every mask covers this block: the sum-over-queries class wins there
    p = torch.softmax(8.0 * torch.randn((q, n), generator=g), dim=1) * 0.5
    p[:, 123] = 0.0
    p[torch.arange(q), p.argmax(dim=1)] = 0.45  # every query's top class at 0.45 ...
    p[:, 123] = 0.3  # ... and class 123 at 0.3 in every query: never a top class, but the largest sum
    assert not (p.argmax(dim=1) == 123).any()
    geom = dict(image_size=(29, 37), padded_size=(32, 40), output_size=(45, 50))
    kept: list[int] = []
    real = pp._semantic_candidates

    def spy(*args):
        out = real(*args)
        kept.append(int(out.numel()))
        return out

    monkeypatch.setattr(pp, "_semantic_candidates", spy)
    got = semantic_inference(logits, p, order=order, **geom)
    scores = semantic_scores(logits, p, order=order, **geom)
    want = scores.argmax(dim=0).numpy()
    assert kept and kept[0] < n // 4  # most classes were skipped
    assert not ((got != want) & ~_near_tie(scores)).any()
    assert (want == 123).any() and (got == 123).any()
    # the all-tasks entry point prunes the same way
    res = postprocess(logits, p, [True] * n, config=PostprocessConfig(tasks=("semantic",), semantic_order=order),
                      **geom)
    np.testing.assert_array_equal(res.semantic, got)


def test_semantic_pruning_keeps_everything_when_sigma_underflows():
    """Where every mask's σ is 0 (logits below -104 in float32) all classes tie at 0 and class 0 wins: no pruning."""
    g = torch.Generator().manual_seed(22)
    q, n = 5, 100
    logits = 3.0 * torch.randn((q, 8, 10), generator=g)
    logits[:, 0, 0] = -200.0
    p = torch.softmax(8.0 * torch.randn((q, n), generator=g), dim=1)
    p[:, 0] = 1e-9
    geom = dict(image_size=(32, 40), padded_size=(32, 40))
    got = semantic_inference(logits, p, **geom)
    scores = semantic_scores(logits, p, **geom)
    assert got[0, 0] == 0
    assert not ((got != scores.argmax(dim=0).numpy()) & ~_near_tie(scores)).any()
