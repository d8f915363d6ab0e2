"""Golden tests of the proposal network against the official outputs (shared/golden/README.md §2.3, §4).

Every case and every image: the transformer decoder fed the golden pixel-decoder maps, the class-agnostic instance
inference, the network wiring (with stand-ins for backbone / pixel decoder, fed golden maps) and, once
``proposals/backbone.py`` and ``proposals/pixel_decoder.py`` exist, the whole network end to end.
"""

from __future__ import annotations

import importlib.util
from typing import Any

import pytest
import torch
from golden import GoldenCase, backbone_atol, golden_cases, load_case
from torch import Tensor, nn

from masqclip_cli.modeling.proposals.network import (
    ProposalNetwork,
    build_proposal_network,
    normalize_and_pad,
    postprocess_masks,
    proposal_instances,
)
from masqclip_cli.modeling.proposals.transformer_decoder import MaskedAttentionDecoder

ATOL = 1e-4
PREDICTOR_PREFIX = "sem_seg_head.predictor."


# ---------------------------------------------------------------------------------------------------- helpers
def _decoder_from_case(case: GoldenCase) -> MaskedAttentionDecoder:
    td, pd = case.config["transformer_decoder"], case.config["pixel_decoder"]
    dec = MaskedAttentionDecoder(
        in_channels=int(pd["conv_dim"]),
        hidden_dim=int(td["hidden_dim"]),
        num_queries=int(td["num_queries"]),
        heads=int(td["heads"]),
        ffn_dim=int(td["ffn"]),
        dec_layers=int(td["dec_layers"]),
        mask_dim=int(pd["mask_dim"]),
        pre_norm=bool(td.get("pre_norm", False)),
    )
    sd = {k[len(PREDICTOR_PREFIX) :]: v for k, v in case.state_dict.items() if k.startswith(PREDICTOR_PREFIX)}
    dec.load_state_dict(sd, strict=True)
    return dec.eval()


def _num_images(case: GoldenCase) -> int:
    assert len(case.inputs) >= 1 and len(case.outputs) == len(case.inputs)
    return len(case.inputs)


def _num_aux(out: dict[str, Any]) -> int:
    n = 0
    while f"proposal_aux{n}_pred_logits" in out:
        n += 1
    return n


def _golden_multi_scale(out: dict[str, Any]) -> list[Tensor]:
    return [out[f"pixdec_multi_scale_{j}"][None] for j in range(3)]


def _close(actual: Tensor, expected: Tensor, what: str, atol: float = ATOL) -> None:
    assert actual.shape == expected.shape, f"{what}: shape {tuple(actual.shape)} vs golden {tuple(expected.shape)}"
    err = (actual.float() - expected.float()).abs().max().item() if actual.numel() else 0.0
    assert err <= atol, f"{what}: max abs error {err:.3g} > {atol}"


def _check_predictions(
    logits: Tensor, masks: Tensor, aux: list[dict[str, Tensor]], out: dict[str, Any], where: str, log_p_obj=None
) -> None:
    """Compare batch-1 predictions (leading dim dropped here) with the golden ``proposal_*`` outputs."""
    n_aux = _num_aux(out)
    assert len(aux) == n_aux, f"{where}: {len(aux)} aux predictions vs golden {n_aux}"
    for a, d in enumerate(aux):
        _close(d["pred_logits"][0], out[f"proposal_aux{a}_pred_logits"], f"{where} aux{a} pred_logits")
        _close(d["pred_masks"][0], out[f"proposal_aux{a}_pred_masks"], f"{where} aux{a} pred_masks")
    _close(logits[0], out["proposal_pred_logits"], f"{where} pred_logits")
    _close(masks[0], out["proposal_pred_masks"], f"{where} pred_masks")
    if log_p_obj is None:
        log_p_obj = torch.log_softmax(logits, dim=-1)[..., 0]
    _close(log_p_obj[0], out["proposal_log_p_obj"], f"{where} log_p_obj")


def _image_and_output_size(case: GoldenCase, i: int) -> tuple[tuple[int, int], tuple[int, int]]:
    img = case.inputs[i]["image"]
    h, w = int(img.shape[-2]), int(img.shape[-1])
    out = (int(case.inputs[i].get("height", h)), int(case.inputs[i].get("width", w)))
    return (h, w), out


class _GoldenBackbone(nn.Module):
    """Stand-in backbone: returns the golden ``backbone_res*`` maps (checks that it receives the golden input)."""

    def __init__(self, out: dict[str, Any]) -> None:
        super().__init__()
        self.out = out

    def forward(self, x: Tensor) -> dict[str, Tensor]:
        _close(x[0], self.out["proposal_input_normalized_padded"], "stand-in backbone input")
        return {f"res{k}": self.out[f"backbone_res{k}"][None] for k in (2, 3, 4, 5)}


class _GoldenPixelDecoder(nn.Module):
    """Stand-in pixel decoder: returns the golden ``pixdec_*`` maps."""

    def __init__(self, out: dict[str, Any]) -> None:
        super().__init__()
        self.out = out

    def forward(self, feats: dict[str, Tensor]) -> tuple[Tensor, list[Tensor]]:
        assert set(feats) >= {"res2", "res3", "res4", "res5"}
        return self.out["pixdec_mask_features"][None], _golden_multi_scale(self.out)


def _full_network_available() -> bool:
    return all(
        importlib.util.find_spec(f"masqclip_cli.modeling.proposals.{m}") is not None
        for m in ("backbone", "pixel_decoder")
    )


# ---------------------------------------------------------------------------------------------------- decoder
@pytest.mark.parametrize("case_dir", golden_cases())
def test_golden_proposal_decoder_predictions(case_dir) -> None:
    """Decoder fed the golden pixel-decoder maps reproduces every aux and final prediction and log p_obj."""
    case = load_case(case_dir)
    dec = _decoder_from_case(case)
    for i in range(_num_images(case)):
        out = case.outputs[i]
        with torch.no_grad():
            res = dec(_golden_multi_scale(out), out["pixdec_mask_features"][None])
        assert len(res["aux_outputs"]) == int(case.config["transformer_decoder"]["dec_layers"]) - 1
        _check_predictions(res["pred_logits"], res["pred_masks"], res["aux_outputs"], out, f"{case.name} image{i}")


@pytest.mark.parametrize("case_dir", golden_cases())
def test_golden_proposal_decoder_batched(case_dir) -> None:
    """Two copies of an image in one batch give the single-image result for each copy."""
    case = load_case(case_dir)
    dec = _decoder_from_case(case)
    out = case.outputs[0]
    ms = [torch.cat([m, m]) for m in _golden_multi_scale(out)]
    mf = out["pixdec_mask_features"][None].expand(2, -1, -1, -1)
    with torch.no_grad():
        res = dec(ms, mf)
    for b in range(2):
        _close(res["pred_logits"][b], out["proposal_pred_logits"], f"batch item {b} pred_logits")
        _close(res["pred_masks"][b], out["proposal_pred_masks"], f"batch item {b} pred_masks")


# ---------------------------------------------------------------------------------------------------- instances
def _match_instances(ours: dict[str, Tensor], ours_logits: Tensor, gold: dict[str, Tensor], where: str) -> None:
    """Set comparison: each golden instance must pair with a distinct one of ours whose mask is equal (pixels with
    |logit| <= 1e-4 may differ) and whose score is within ATOL."""
    g_scores, g_masks, g_classes = gold["scores"], gold["masks"], gold["classes"]
    assert ours["scores"].shape == g_scores.shape, f"{where}: {ours['scores'].shape[0]} vs {g_scores.shape[0]} dets"
    assert ours["pred_masks"].shape == g_masks.shape, f"{where}: mask shape {tuple(ours['pred_masks'].shape)}"
    assert torch.equal(ours["pred_classes"], torch.zeros_like(ours["pred_classes"]))
    assert torch.equal(g_classes, torch.zeros_like(g_classes)), f"{where}: golden classes are not all 0"
    ambiguous = ours_logits.abs() <= ATOL
    used: set[int] = set()
    for j in range(g_scores.shape[0]):
        hit = None
        for m in range(ours["scores"].shape[0]):
            if m in used or abs(float(ours["scores"][m]) - float(g_scores[j])) > ATOL:
                continue
            differ = (ours["pred_masks"][m] != g_masks[j]) & ~ambiguous[m]
            if not bool(differ.any()):
                hit = m
                break
        assert hit is not None, f"{where}: golden instance {j} (score {float(g_scores[j]):.6f}) has no match"
        used.add(hit)


@pytest.mark.parametrize("case_dir", golden_cases())
def test_golden_proposal_instances(case_dir) -> None:
    """Class-agnostic instance inference on our decoder's predictions equals ``proposal_instances_*`` as a set.

    The standalone proposal model used DETECTIONS_PER_IMAGE = Q, and its masks are at the size the golden data has
    (the input image size, or the requested output size): the test follows the data."""
    case = load_case(case_dir)
    dec = _decoder_from_case(case)
    q = int(case.config["transformer_decoder"]["num_queries"])
    for i in range(_num_images(case)):
        out = case.outputs[i]
        where = f"{case.name} image{i}"
        with torch.no_grad():
            res = dec(_golden_multi_scale(out), out["pixdec_mask_features"][None])
        image_size, requested = _image_and_output_size(case, i)
        out_size = tuple(int(s) for s in out["proposal_instances_pred_masks"].shape[-2:])
        assert out_size in (image_size, requested), f"{where}: golden masks at {out_size}"
        padded = tuple(int(s) for s in out["proposal_input_normalized_padded"].shape[-2:])
        mask_out = postprocess_masks(res["pred_masks"][0], padded, image_size, out_size, chunk=3)
        k = int(out["proposal_instances_scores"].shape[0])
        assert k == q, f"{where}: golden proposal model kept {k} detections, expected Q = {q}"
        inst = proposal_instances(res["pred_logits"][0], mask_out, k)
        gold = {
            "scores": out["proposal_instances_scores"],
            "masks": out["proposal_instances_pred_masks"].bool(),
            "classes": out["proposal_instances_pred_classes"],
        }
        _match_instances(inst, mask_out[inst["query_indices"]], gold, where)
        # scores are sorted by p_obj, and k is clamped to Q
        assert proposal_instances(res["pred_logits"][0], mask_out, 10 * q)["scores"].shape[0] == q


# ---------------------------------------------------------------------------------------------------- network
@pytest.mark.parametrize("case_dir", golden_cases())
def test_golden_proposal_normalize_and_pad(case_dir) -> None:
    """``normalize_and_pad`` of each ``inputs.pt`` image equals ``proposal_input_normalized_padded``."""
    case = load_case(case_dir)
    mean, std, div = case.config["pixel_mean"], case.config["pixel_std"], int(case.config["size_divisibility"])
    for i in range(_num_images(case)):
        x = normalize_and_pad([case.inputs[i]["image"]], mean, std, div)
        _close(x[0], case.outputs[i]["proposal_input_normalized_padded"], f"{case.name} image{i} input", atol=1e-5)


@pytest.mark.parametrize("case_dir", golden_cases())
def test_golden_proposal_network_wiring(case_dir) -> None:
    """ProposalNetwork with stand-ins returning the golden backbone / pixel-decoder maps: official predictor weights
    load through ``load_official_state_dict`` and forward reproduces every prediction, log p_obj and features."""
    case = load_case(case_dir)
    for i in range(_num_images(case)):
        out = case.outputs[i]
        td, pd = case.config["transformer_decoder"], case.config["pixel_decoder"]
        predictor = MaskedAttentionDecoder(
            in_channels=int(pd["conv_dim"]),
            hidden_dim=int(td["hidden_dim"]),
            num_queries=int(td["num_queries"]),
            heads=int(td["heads"]),
            ffn_dim=int(td["ffn"]),
            dec_layers=int(td["dec_layers"]),
            mask_dim=int(pd["mask_dim"]),
            pre_norm=bool(td.get("pre_norm", False)),
        )
        net = ProposalNetwork(
            _GoldenBackbone(out),
            _GoldenPixelDecoder(out),
            predictor,
            case.config["pixel_mean"],
            case.config["pixel_std"],
            int(case.config["size_divisibility"]),
        ).eval()
        sd = {
            k: v for k, v in case.state_dict.items() if not k.startswith(("backbone.", "sem_seg_head.pixel_decoder."))
        }
        report = net.load_official_state_dict(sd)
        assert "criterion.empty_weight" in report.ignored
        x = net.normalize_and_pad([case.inputs[i]["image"]])
        with torch.no_grad():
            res = net(x, return_features=True)
        where = f"{case.name} image{i} (wiring)"
        _check_predictions(res.pred_logits, res.pred_masks, res.aux, out, where, log_p_obj=res.log_p_obj)
        assert set(res.features) >= {"res2", "res3", "res4", "res5", "mask_features", "multi_scale"}
        assert len(res.features["multi_scale"]) == 3


@pytest.mark.parametrize("case_dir", golden_cases())
def test_golden_proposal_network_end_to_end(case_dir) -> None:
    """``build_proposal_network(case.json)`` + ``load_official_state_dict`` reproduces the backbone, pixel decoder and
    every prediction, from ``proposal_input_normalized_padded`` and from ``inputs.pt`` via ``normalize_and_pad``."""
    case = load_case(case_dir)
    if not _full_network_available():
        pytest.skip("proposals/backbone.py or proposals/pixel_decoder.py not present yet")
    net = build_proposal_network(case.config)
    net.load_official_state_dict(case.state_dict, strict=True)
    net.eval()
    for i in range(_num_images(case)):
        out = case.outputs[i]
        where = f"{case.name} image{i} (end to end)"
        x_gold = out["proposal_input_normalized_padded"][None]
        x_ours = net.normalize_and_pad([case.inputs[i]["image"]])
        _close(x_ours, x_gold, f"{where} input", atol=1e-5)
        with torch.no_grad():
            res = net(x_gold, return_features=True)
            res2 = net(x_ours)
        for k in (2, 3, 4, 5):
            _close(res.features[f"res{k}"][0], out[f"backbone_res{k}"], f"{where} backbone res{k}",
                   atol=backbone_atol(out[f"backbone_res{k}"]))
        _close(res.features["mask_features"][0], out["pixdec_mask_features"], f"{where} mask_features")
        for j in range(3):
            _close(res.features["multi_scale"][j][0], out[f"pixdec_multi_scale_{j}"], f"{where} multi_scale {j}")
        _check_predictions(res.pred_logits, res.pred_masks, res.aux, out, where, log_p_obj=res.log_p_obj)
        _check_predictions(
            res2.pred_logits, res2.pred_masks, res2.aux, out, where + " via normalize_and_pad", log_p_obj=res2.log_p_obj
        )
