"""Golden oracle, whole model (golden README §4): official checkpoint → convert_official → every stage of both images.

Everything about a case comes from its folder: geometry from case.json, weights from model_state_dict.pt, the text bank
from text_embeddings.pt, the images from inputs.pt.
"""

from __future__ import annotations

import functools

import pytest
import torch
from golden import backbone_atol, case_clip_config, golden_cases, load_case

from masqclip_cli.modeling.convert import convert_official

ATOL = 1e-4


@functools.lru_cache(maxsize=4)
def _converted(case_path: str, tie: bool = False):
    case = load_case(case_path)
    model, report = convert_official(
        case.state_dict,
        proposals=case.config,
        clip_model=case_clip_config(case),
        clip_pretrained=None,
        tie_mask_embeddings=tie,
    )
    model.set_text_embeddings(case.text_embeddings)
    return case, model, report


def _images(case):
    return [inp["image"] for inp in case.inputs]


def _close(actual: torch.Tensor, expected: torch.Tensor, what: str, atol: float = ATOL) -> None:
    assert actual.shape == expected.shape, f"{what}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    err = (actual.float() - expected.float()).abs().max().item()
    assert err <= atol, f"{what}: max abs error {err:.3g} > {atol}"


@pytest.mark.parametrize("case_dir", golden_cases())
def test_golden_whole_model_conversion_is_complete(case_dir):
    case, model, report = _converted(str(case_dir) if case_dir else None)
    assert report.kind == "masq" and report.complete
    assert report.ignored == ["criterion.empty_weight"]
    # every official tensor except the loss buffer was used
    assert report.loaded == len(case.state_dict) - 1


@pytest.mark.parametrize("case_dir", golden_cases())
def test_golden_whole_model_proposal_stages(case_dir):
    case, model, _ = _converted(str(case_dir) if case_dir else None)
    for i, (image, out) in enumerate(zip(_images(case), case.outputs)):
        normalized = model.proposals.normalize_and_pad([image])
        _close(normalized[0], out["proposal_input_normalized_padded"], f"image {i} normalised input", 1e-5)
        with torch.no_grad():
            result = model.proposals(normalized, return_features=True)
        feats = result.features
        for level in ("res2", "res3", "res4", "res5"):
            expected = out[f"backbone_{level}"]
            _close(feats[level][0], expected, f"image {i} {level}", backbone_atol(expected))
        _close(feats["mask_features"][0], out["pixdec_mask_features"], f"image {i} mask features")
        for j, level_map in enumerate(feats["multi_scale"]):
            _close(level_map[0], out[f"pixdec_multi_scale_{j}"], f"image {i} multi-scale {j}")


@pytest.mark.parametrize("case_dir", golden_cases())
def test_golden_whole_model_outputs(case_dir):
    case, model, _ = _converted(str(case_dir) if case_dir else None)
    outputs = model(_images(case), return_aux=True)
    for i, (got, out) in enumerate(zip(outputs, case.outputs)):
        assert got.padded_size == tuple(out["proposal_input_normalized_padded"].shape[-2:])
        _close(got.mask_logits, out["proposal_pred_masks"], f"image {i} final masks")
        _close(got.log_p_obj, out["proposal_log_p_obj"], f"image {i} log p_obj")
        aux_count = sum(1 for k in out if k.startswith("proposal_aux") and k.endswith("_pred_logits"))
        assert len(got.aux) == aux_count
        for j, (logits, masks) in enumerate(got.aux):
            _close(logits, out[f"proposal_aux{j}_pred_logits"], f"image {i} aux {j} logits")
            _close(masks, out[f"proposal_aux{j}_pred_masks"], f"image {i} aux {j} masks")
        # CLIP side, from the model's own proposals
        padded = torch.zeros_like(out["clip_input_image_padded_uint8"])
        image = case.inputs[i]["image"]
        padded[:, : image.shape[1], : image.shape[2]] = image
        assert torch.equal(padded, out["clip_input_image_padded_uint8"])
        pixels = model.masq.preprocess(padded[None])
        _close(pixels[0], out["clip_pixel_input"], f"image {i} CLIP input")
        allowed = model.masq.attention_masks(got.mask_logits[None])
        assert torch.equal(~allowed[0], out["clip_attn_mask_blocked"]), f"image {i} attention masks"
        _close(got.embeddings, out["mask_token_embed_l2norm"], f"image {i} mask-token embeddings")
        _close(got.clip_log_probs, out["clip_log_probs_with_bg"], f"image {i} CLIP log-probabilities")
        _close(got.p_cls, out["final_p_cls"], f"image {i} p_cls")


@pytest.mark.parametrize("case_dir", golden_cases())
def test_golden_whole_model_tied_variant(case_dir):
    case, model, report = _converted(str(case_dir) if case_dir else None, True)
    tied = case.optional("tied_variant.pt")
    if tied is None:
        pytest.skip(f"case {case.name} has no tied_variant.pt")
    assert any("tied" in line for line in report.lines())
    for i, got in enumerate(model(_images(case))):
        logits = 100.0 * got.embeddings @ case.text_embeddings.T
        _close(logits, tied[f"image{i}_clip_logits_x100"], f"image {i} tied logits")
        _close(got.p_cls.log(), tied[f"image{i}_final_log_p_cls"], f"image {i} tied log p_cls")


@pytest.mark.parametrize("case_dir", golden_cases())
def test_golden_whole_model_batch_of_mixed_sizes_equals_one_by_one(case_dir):
    case, model, _ = _converted(str(case_dir) if case_dir else None)
    gen = torch.Generator().manual_seed(5)
    third = torch.randint(0, 256, (3, 70, 45), generator=gen, dtype=torch.uint8)
    images = _images(case) + [third]
    batch = model(images)
    for i, image in enumerate(images):
        (alone,) = model([image])
        assert alone.padded_size == batch[i].padded_size
        for name in ("mask_logits", "log_p_obj", "embeddings", "clip_log_probs", "p_cls"):
            _close(getattr(batch[i], name), getattr(alone, name), f"image {i} {name} batch vs alone", 1e-5)
