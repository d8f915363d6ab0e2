"""Golden tests, CLIP side: MasQVisual + classifier against the official implementation's outputs (golden README §2.3).

For every case and every image, starting from the case's proposal masks / object scores and text bank.
"""

from __future__ import annotations

import importlib.util
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from golden import GoldenCase, build_case_masq_visual, golden_cases, load_case

from masqclip_cli.modeling.masq_visual import MasQVisual, MasQVisualOutput, pad_to_multiple

ATOL = 1e-4
CASES = golden_cases()


def _close(actual: torch.Tensor, expected: torch.Tensor, what: str, atol: float = ATOL) -> None:
    assert actual.shape == expected.shape, f"{what}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    err = (actual.float() - expected.float()).abs().max().item() if expected.numel() else 0.0
    assert err <= atol, f"{what}: max abs error {err:.3g} > {atol}"


def _classify(emb: torch.Tensor, text: torch.Tensor, log_p_obj: torch.Tensor | None, scale: float) -> Any:
    """The project's classifier when present; else the §1.5 maths inline (logits, log_probs, log_p_cls, p_cls)."""
    if importlib.util.find_spec("masqclip_cli.modeling.classifier") is not None:
        from masqclip_cli.modeling.classifier import classify

        out = classify(emb, text, log_p_obj, logit_scale=scale)
        return out.logits, out.log_probs, out.log_p_cls, out.p_cls
    logits = scale * emb @ text.T
    log_probs = F.log_softmax(logits, dim=-1)
    log_p_cls = log_probs[..., :-1] + (0.0 if log_p_obj is None else log_p_obj[..., None])
    return logits, log_probs, log_p_cls, log_p_cls.exp()


class _Run:
    """The CLIP branch run once per (case, image)."""

    def __init__(self, case: GoldenCase, mv: MasQVisual, i: int) -> None:
        self.out = case.outputs[i]
        self.pixel = mv.preprocess(self.out["clip_input_image_padded_uint8"][None])  # (1,3,R,R)
        self.allowed = mv.attention_masks(self.out["proposal_pred_masks"][None])  # (1,Q,N)
        with torch.no_grad():
            res = mv(self.pixel, self.allowed, return_tokens=True)
        assert isinstance(res, MasQVisualOutput)
        self.res = res
        scale = float(case.config.get("clip_logit_scale", 100.0))
        self.logits, self.log_probs, self.log_p_cls, self.p_cls = _classify(
            res.embeddings[0], case.text_embeddings, self.out["proposal_log_p_obj"], scale
        )


_cache: dict[tuple[str, int], _Run] = {}
_models: dict[str, MasQVisual] = {}


def _model(case: GoldenCase) -> MasQVisual:
    key = str(case.path)
    if key not in _models:
        _models[key] = build_case_masq_visual(case)
    return _models[key]


def _runs(case_dir: Any) -> tuple[GoldenCase, list[_Run]]:
    case = load_case(case_dir)
    runs = []
    for i in range(len(case.inputs)):
        key = (str(case.path), i)
        if key not in _cache:
            _cache[key] = _Run(case, _model(case), i)
        runs.append(_cache[key])
    return case, runs


@pytest.mark.parametrize("case_dir", CASES)
def test_golden_clip_padding_and_pixel_input(case_dir: Any) -> None:
    case = load_case(case_dir)
    mv = _model(case)
    divisor = int(case.config["size_divisibility"])
    for i, (inp, out) in enumerate(zip(case.inputs, case.outputs, strict=True)):
        padded = pad_to_multiple(inp["image"], divisor)
        expected = out["clip_input_image_padded_uint8"]
        assert padded.dtype == expected.dtype and torch.equal(padded, expected), f"image {i}: padded image differs"
        pixel = mv.preprocess(padded[None])
        assert pixel.dtype == torch.float32
        _close(pixel[0], out["clip_pixel_input"], f"image {i} clip_pixel_input")


@pytest.mark.parametrize("case_dir", CASES)
def test_golden_clip_attention_mask(case_dir: Any) -> None:
    _, runs = _runs(case_dir)
    for i, r in enumerate(runs):
        blocked = r.out["clip_attn_mask_blocked"]
        assert r.allowed.dtype == torch.bool
        assert r.allowed.shape == (1, *blocked.shape), f"image {i}: mask shape"
        assert torch.equal(~r.allowed[0], blocked), f"image {i}: {(~r.allowed[0] != blocked).sum()} entries differ"


@pytest.mark.parametrize("case_dir", CASES)
def test_golden_clip_tokens(case_dir: Any) -> None:
    _, runs = _runs(case_dir)
    for i, r in enumerate(runs):
        _close(r.res.tokens_before_ln_pre[0], r.out["clip_tokens_before_ln_pre"], f"image {i} tokens before ln_pre")
        _close(r.res.tokens_after_ln_pre[0], r.out["clip_tokens_after_ln_pre"], f"image {i} tokens after ln_pre")
        n_blocks = sum(1 for k in r.out if k.startswith("clip_tokens_after_block"))
        assert n_blocks == len(r.res.tokens_after_block), f"image {i}: block count"
        for b in range(n_blocks):
            _close(r.res.tokens_after_block[b][0], r.out[f"clip_tokens_after_block{b}"], f"image {i} block {b}")


@pytest.mark.parametrize("case_dir", CASES)
def test_golden_clip_mask_embeddings(case_dir: Any) -> None:
    _, runs = _runs(case_dir)
    for i, r in enumerate(runs):
        _close(r.res.embeddings_prenorm[0], r.out["mask_token_embed_prenorm"], f"image {i} prenorm embedding")
        _close(r.res.embeddings[0], r.out["mask_token_embed_l2norm"], f"image {i} l2norm embedding")


@pytest.mark.parametrize("case_dir", CASES)
def test_golden_clip_logits_and_final_scores(case_dir: Any) -> None:
    _, runs = _runs(case_dir)
    for i, r in enumerate(runs):
        _close(r.logits, r.out["clip_logits_x100"], f"image {i} clip_logits_x100")
        _close(r.log_probs, r.out["clip_log_probs_with_bg"], f"image {i} clip_log_probs_with_bg")
        _close(r.log_p_cls, r.out["final_log_p_cls"], f"image {i} final_log_p_cls")
        _close(r.p_cls, r.out["final_p_cls"], f"image {i} final_p_cls")


@pytest.mark.parametrize("case_dir", CASES)
def test_golden_clip_batched_equals_single(case_dir: Any) -> None:
    """All images of the case in one batch (padded to a common size is not needed: CLIP input is R x R)."""
    case, runs = _runs(case_dir)
    mv = _model(case)
    pixel = torch.cat([r.pixel for r in runs])
    allowed = torch.cat([r.allowed for r in runs])
    with torch.no_grad():
        emb = mv(pixel, allowed)
    for i, r in enumerate(runs):
        _close(emb[i], r.out["mask_token_embed_l2norm"], f"batched image {i}")


@pytest.mark.parametrize("case_dir", CASES)
def test_golden_clip_tied_variant(case_dir: Any) -> None:
    """With mask_pos_embed := positional_embedding[0] (the unmodified official aliasing) logits match tied_variant."""
    case, runs = _runs(case_dir)
    tied = case.optional("tied_variant.pt")
    if tied is None:
        pytest.skip(f"case {case.name} has no tied_variant.pt")
    mv = build_case_masq_visual(case)
    with torch.no_grad():
        mv.mask_pos_embed.copy_(mv.visual.positional_embedding[0])
    scale = float(case.config.get("clip_logit_scale", 100.0))
    for i, r in enumerate(runs):
        with torch.no_grad():
            emb = mv(r.pixel, r.allowed)[0]
        logits, _, log_p_cls, _ = _classify(emb, case.text_embeddings, r.out["proposal_log_p_obj"], scale)
        _close(logits, tied[f"image{i}_clip_logits_x100"], f"image {i} tied logits")
        _close(log_p_cls, tied[f"image{i}_final_log_p_cls"], f"image {i} tied final_log_p_cls")
        assert not torch.allclose(logits, r.out["clip_logits_x100"], atol=1e-3), "tied variant should differ"
