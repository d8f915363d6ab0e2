"""Golden tests of the post-processing against the official outputs (shared/golden/README.md §2.3, §4).

Every case and every image, starting from the case's ``proposal_pred_masks`` and ``final_p_cls``: the post-processed
masks, the semantic scores in both orders, the panoptic map and segments for the case's thresholds and every entry of
``panoptic_variants``, and the instances as a set. Thresholds, ``detections_per_image`` (k, clamped to Q·N) and thing
ids come from ``case.json``; the output size is ``(height, width)`` of ``inputs.pt`` when present, else the image size.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import pytest
import torch
from golden import GoldenCase, golden_cases, load_case
from torch import Tensor

from masqclip_cli.inference.postprocess import PostprocessConfig, postprocess, semantic_scores
from masqclip_cli.modeling.proposals.network import postprocess_masks

ATOL = 1e-4  # README §4: features / logits / scores; and the logit distance within which a discrete decision may flip


# ---------------------------------------------------------------------------------------------------- helpers
@dataclass
class ImageCase:
    index: int
    out: dict[str, Any]
    mask_logits: Tensor  # (Q, Hp/4, Wp/4)
    p_cls: Tensor  # (Q, N)
    image_size: tuple[int, int]
    padded_size: tuple[int, int]
    output_size: tuple[int, int]
    isthing: list[bool]

    @property
    def golden_masks(self) -> Tensor:
        """(Q, H_out, W_out) official post-processed mask logits."""
        return self.out["final_mask_pred_postprocessed"].float()


def _images(case: GoldenCase) -> list[ImageCase]:
    assert len(case.inputs) >= 1 and len(case.outputs) == len(case.inputs)
    n = int(case.config["num_classes"])
    thing_ids = {int(t) for t in case.config.get("thing_ids", [])}
    isthing = [c in thing_ids for c in range(n)]
    stride = int(case.config.get("pixel_decoder", {}).get("common_stride", 4))
    images = []
    for i, (inp, out) in enumerate(zip(case.inputs, case.outputs)):
        masks = out["proposal_pred_masks"].float()
        p_cls = out["final_p_cls"].float()
        assert p_cls.shape == (masks.shape[0], n)
        h, w = (int(v) for v in inp["image"].shape[-2:])
        padded = (int(masks.shape[1]) * stride, int(masks.shape[2]) * stride)
        meta = out.get("meta", {})
        if "padded_hw" in meta:
            assert tuple(meta["padded_hw"]) == padded
        output = (int(inp.get("height", h)), int(inp.get("width", w)))
        images.append(ImageCase(i, out, masks, p_cls, (h, w), padded, output, isthing))
    return images


def _test_cfg(case: GoldenCase) -> dict[str, Any]:
    return case.config.get("test", {})


def _k(case: GoldenCase, img: ImageCase) -> int:
    q, n = img.p_cls.shape
    return min(int(_test_cfg(case).get("detections_per_image", 100)), q * n)


def _keep_stuff(case: GoldenCase) -> bool:
    # The official instance inference drops stuff classes only when panoptic inference is on.
    return not bool(_test_cfg(case).get("panoptic_on", True))


def _panoptic_ambiguous(img: ImageCase, object_mask_threshold: float) -> np.ndarray:
    """(H, W) bool: pixels whose panoptic decision is within ATOL of flipping, judged on the golden mask logits: the
    two best kept ``s_q·σ(m_q)`` within ATOL of each other, or the winner's logit within ATOL of 0."""
    logits = img.golden_masks
    p = img.p_cls
    scores, _ = p.max(dim=1)
    keep = torch.nonzero(scores > object_mask_threshold).flatten()
    h, w = logits.shape[-2:]
    if keep.numel() == 0:
        return np.zeros((h, w), dtype=bool)
    lk = logits[keep]
    prob = scores[keep].view(-1, 1, 1) * lk.sigmoid()
    top = prob.topk(min(2, len(keep)), dim=0)
    amb = torch.zeros((h, w), dtype=torch.bool)
    if len(keep) > 1:
        amb |= (top.values[0] - top.values[1]) < ATOL
    winner_logit = lk.gather(0, top.indices[:1])[0]
    amb |= winner_logit.abs() < ATOL
    return amb.numpy()


def _check_panoptic(
    img: ImageCase,
    result_map: np.ndarray,
    segments: list,
    golden_map: Tensor,
    golden_info: list,
    object_mask_threshold: float,
    label: str,
) -> None:
    golden = golden_map.numpy().astype(np.int32)
    assert result_map.dtype == np.int32 and result_map.shape == golden.shape, label
    diff = result_map != golden
    if diff.any():
        amb = _panoptic_ambiguous(img, object_mask_threshold)
        bad = diff & ~amb
        assert not bad.any(), f"{label}: {int(bad.sum())} non-ambiguous pixels differ ({int(diff.sum())} in all)"
    got = [(s.id, bool(s.isthing), int(s.category)) for s in segments]
    want = [(int(d["id"]), bool(d["isthing"]), int(d["category_id"])) for d in golden_info]
    assert got == want, f"{label}: segments {got} != golden {want}"


# ---------------------------------------------------------------------------------------------------- tests
@pytest.mark.parametrize("case_dir", golden_cases())
def test_golden_postprocess_masks(case_dir):
    """Upsample to the padded size, crop, resize to the output size == ``final_mask_pred_postprocessed``."""
    case = load_case(case_dir)
    for img in _images(case):
        got = postprocess_masks(img.mask_logits, img.padded_size, img.image_size, img.output_size)
        want = img.golden_masks
        assert got.shape == want.shape, f"image {img.index}"
        torch.testing.assert_close(got, want, atol=ATOL, rtol=0, msg=lambda m, i=img.index: f"image {i}: {m}")


@pytest.mark.parametrize("order,key", [("padded", "sem_seg_semantic_only_config"), ("resized", "sem_seg")])
@pytest.mark.parametrize("case_dir", golden_cases())
def test_golden_postprocess_semantic_scores(case_dir, order, key):
    """Semantic scores: "padded" order == the semantic-only config's, "resized" order == the all-tasks config's."""
    case = load_case(case_dir)
    seen = 0
    for img in _images(case):
        if key not in img.out:
            continue
        seen += 1
        want = img.out[key].float()
        for chunk in (1, 3, 16):
            got = semantic_scores(
                img.mask_logits, img.p_cls, img.image_size, img.padded_size, img.output_size, order, chunk_size=chunk
            )
            assert got.shape == want.shape
            torch.testing.assert_close(got, want, atol=ATOL, rtol=0, msg=lambda m, i=img.index: f"image {i}: {m}")
    if not seen:
        pytest.skip(f"case {case.name} has no {key}")


@pytest.mark.parametrize("order,key", [("padded", "sem_seg_semantic_only_config"), ("resized", "sem_seg")])
@pytest.mark.parametrize("case_dir", golden_cases())
def test_golden_postprocess_semantic_argmax(case_dir, order, key):
    """``postprocess`` semantic labels == argmax of the golden scores, except where the top two are within ATOL."""
    case = load_case(case_dir)
    seen = 0
    for img in _images(case):
        if key not in img.out:
            continue
        seen += 1
        want_scores = img.out[key].float()
        cfg = PostprocessConfig(tasks=("semantic",), semantic_order=order)
        res = postprocess(
            img.mask_logits, img.p_cls, img.isthing, img.image_size, img.padded_size, img.output_size, cfg
        )
        assert res.semantic is not None and res.semantic.dtype == np.int32
        assert res.semantic.shape == tuple(want_scores.shape[-2:])
        assert res.panoptic is None and res.instances is None
        want = want_scores.argmax(dim=0).numpy()
        if want_scores.shape[0] > 1:
            top2 = want_scores.topk(2, dim=0).values
            amb = ((top2[0] - top2[1]) < ATOL).numpy()
        else:
            amb = np.zeros_like(want, dtype=bool)
        bad = (res.semantic != want) & ~amb
        assert not bad.any(), f"image {img.index}: {int(bad.sum())} pixels differ"
    if not seen:
        pytest.skip(f"case {case.name} has no {key}")


@pytest.mark.parametrize("case_dir", golden_cases())
def test_golden_postprocess_panoptic(case_dir):
    """Panoptic map and segments_info for the case's own thresholds."""
    case = load_case(case_dir)
    t = _test_cfg(case)
    obj, ovl = float(t.get("object_mask_threshold", 0.3)), float(t.get("overlap_threshold", 0.3))
    for img in _images(case):
        cfg = PostprocessConfig(tasks=("panoptic",), object_mask_threshold=obj, overlap_threshold=ovl)
        res = postprocess(
            img.mask_logits, img.p_cls, img.isthing, img.image_size, img.padded_size, img.output_size, cfg
        )
        assert res.image_size == img.output_size
        _check_panoptic(
            img,
            res.panoptic,
            res.segments,
            img.out["panoptic_seg"],
            img.out["panoptic_segments_info"],
            obj,
            f"image {img.index} ({obj}, {ovl})",
        )
        # Our additions: areas and boxes from the final map, score = s_q of a contributing query.
        for s in res.segments:
            assert s.area == int((res.panoptic == s.id).sum()) > 0
            assert s.mask is None and 0 <= s.query < img.p_cls.shape[0]
            s_q, c_q = img.p_cls.max(dim=1)
            assert int(c_q[s.query]) == s.category
            # score = s_q; for merged stuff the largest s_q of the class's kept queries (query = the first one)
            assert s.score >= float(s_q[s.query])
            assert any(abs(s.score - float(v)) < 1e-7 for v, c in zip(s_q, c_q) if int(c) == s.category)


@pytest.mark.parametrize("case_dir", golden_cases())
def test_golden_postprocess_panoptic_variants(case_dir):
    """Every entry of ``panoptic_variants`` (other object / overlap thresholds on the same inputs)."""
    case = load_case(case_dir)
    n_variants = 0
    for img in _images(case):
        for v in img.out.get("panoptic_variants", []):
            n_variants += 1
            obj, ovl = float(v["object_mask_threshold"]), float(v["overlap_threshold"])
            cfg = PostprocessConfig(tasks=("panoptic",), object_mask_threshold=obj, overlap_threshold=ovl, chunk_size=3)
            res = postprocess(
                img.mask_logits, img.p_cls, img.isthing, img.image_size, img.padded_size, img.output_size, cfg
            )
            _check_panoptic(
                img,
                res.panoptic,
                res.segments,
                v["panoptic_seg"],
                v["segments_info"],
                obj,
                f"image {img.index} variant ({obj}, {ovl})",
            )
    if not n_variants:
        pytest.skip(f"case {case.name} has no panoptic_variants")


@pytest.mark.parametrize("case_dir", golden_cases())
def test_golden_postprocess_instances(case_dir):
    """Instances as a set, matched by (class, mask); scores to ATOL. Mask pixels may differ only where the query's
    logit is within ATOL of 0."""
    case = load_case(case_dir)
    for img in _images(case):
        cfg = PostprocessConfig(
            tasks=("instance",), detections_per_image=_k(case, img), instance_keep_stuff=_keep_stuff(case)
        )
        res = postprocess(
            img.mask_logits, img.p_cls, img.isthing, img.image_size, img.padded_size, img.output_size, cfg
        )
        got = res.instances
        assert got is not None
        want_masks = img.out["instances_pred_masks"].bool().numpy()
        want_cls = img.out["instances_pred_classes"].tolist()
        want_scores = img.out["instances_scores"].tolist()
        assert len(got) == len(want_cls), f"image {img.index}: {len(got)} instances, golden {len(want_cls)}"
        near_zero = (img.golden_masks.abs() < ATOL).numpy()
        used: set[int] = set()
        for j, (c, m, sc) in enumerate(zip(want_cls, want_masks, want_scores)):
            match = [
                r
                for r, inst in enumerate(got)
                if r not in used and inst.category == c and not ((inst.mask != m) & ~near_zero[inst.query]).any()
            ]
            assert match, f"image {img.index}: golden instance {j} (class {c}) has no match"
            r = min(match, key=lambda r: abs(got[r].score - sc))
            used.add(r)
            assert abs(got[r].score - sc) <= ATOL, f"image {img.index}: instance {j} score {got[r].score} != {sc}"
        # Our additions: sorted by score, 1-based rank ids, bool masks at the output size, area and box of the mask.
        assert [i.id for i in got] == list(range(1, len(got) + 1))
        assert all(a.score >= b.score for a, b in zip(got, got[1:]))
        for inst in got:
            assert inst.mask.dtype == np.bool_ and inst.mask.shape == img.output_size
            assert inst.area == int(inst.mask.sum())
            assert inst.isthing == img.isthing[inst.category]


@pytest.mark.parametrize("case_dir", golden_cases())
def test_golden_postprocess_all_tasks(case_dir):
    """One call with every task equals the per-task calls (masks shared between panoptic and instance)."""
    case = load_case(case_dir)
    t = _test_cfg(case)
    obj, ovl = float(t.get("object_mask_threshold", 0.3)), float(t.get("overlap_threshold", 0.3))
    for img in _images(case):
        args = (img.mask_logits, img.p_cls, img.isthing, img.image_size, img.padded_size, img.output_size)
        common = dict(
            object_mask_threshold=obj,
            overlap_threshold=ovl,
            detections_per_image=_k(case, img),
            instance_keep_stuff=_keep_stuff(case),
        )
        both = postprocess(*args, PostprocessConfig(tasks=("semantic", "panoptic", "instance"), **common))
        sem = postprocess(*args, PostprocessConfig(tasks=("semantic",), **common))
        pan = postprocess(*args, PostprocessConfig(tasks=("panoptic",), **common))
        ins = postprocess(*args, PostprocessConfig(tasks=("instance",), **common))
        np.testing.assert_array_equal(both.semantic, sem.semantic)
        np.testing.assert_array_equal(both.panoptic, pan.panoptic)
        assert [(s.id, s.category, s.area) for s in both.segments] == [(s.id, s.category, s.area) for s in pan.segments]
        assert [(i.query, i.category, i.score) for i in both.instances] == [
            (i.query, i.category, i.score) for i in ins.instances
        ]
