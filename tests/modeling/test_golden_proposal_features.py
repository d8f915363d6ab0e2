"""Golden tests of the proposal backbone and pixel decoder against the official outputs (shared/golden/README.md
§2.3, §4), for every case and every image.

The backbone and pixel decoder are built from ``case.json`` alone (``backbone`` / ``pixel_decoder`` sections) and
loaded strictly from the case's ``model_state_dict.pt`` (every ``backbone.*`` / ``sem_seg_head.pixel_decoder.*``
key used, none missing).

Tolerances: 1e-4 absolute (README §4) on the pixel-decoder maps (GroupNorm / LayerNorm outputs, O(1)). The random
backbone's deep features grow large (|res5| ~ 1e3 in case_a), where one float32 ulp is ~1e-4 and the official
float32 outputs are themselves ~1e-3 away from a float64 evaluation (res2/res3 come out bit-identical here; res4/res5
differ by ~1e-6 relative, i.e. oneDNN summation order); backbone maps are therefore compared at
``max(1e-4, 1e-5 * max|golden|)`` (1e-4 absolute whenever the map's magnitude is below 10).
"""

from __future__ import annotations

import functools
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from golden import GoldenCase, backbone_atol, golden_cases, load_case
from torch import Tensor

from masqclip_cli.modeling.proposals.backbone import ResNet
from masqclip_cli.modeling.proposals.pixel_decoder import MSDeformAttnPixelDecoder

ATOL = 1e-4
INPUT_ATOL = 1e-5
BACKBONE_PREFIX = "backbone."
PIXDEC_PREFIX = "sem_seg_head.pixel_decoder."
FEATS = ("res2", "res3", "res4", "res5")


# ---------------------------------------------------------------------------------------------------- helpers
def _build_backbone(cfg: dict[str, Any]) -> ResNet:
    bb = cfg["backbone"]
    assert bb.get("norm", "FrozenBN") == "FrozenBN", bb.get("norm")
    return ResNet(
        depth=int(bb["depth"]),
        stem_out_channels=int(bb["stem_out_channels"]),
        res2_out_channels=int(bb["res2_out_channels"]),
        num_groups=int(bb["num_groups"]),
        width_per_group=int(bb["width_per_group"]),
        stride_in_1x1=bool(bb["stride_in_1x1"]),
        res5_dilation=int(bb["res5_dilation"]),
    )


def _build_pixel_decoder(cfg: dict[str, Any], backbone: ResNet) -> MSDeformAttnPixelDecoder:
    pd = cfg["pixel_decoder"]
    assert pd.get("norm", "GN") == "GN", pd.get("norm")
    return MSDeformAttnPixelDecoder(
        in_channels=dict(backbone.out_channels),
        strides=dict(backbone.strides),
        conv_dim=int(pd["conv_dim"]),
        mask_dim=int(pd["mask_dim"]),
        encoder_layers=int(pd["encoder_layers"]),
        heads=int(pd["heads"]),
        points=int(pd["points"]),
        ffn_dim=int(pd["encoder_ffn"]),
        deformable_levels=list(pd["deformable_levels"]),
        common_stride=int(pd["common_stride"]),
    )


def _strict_load(module: torch.nn.Module, state_dict: dict[str, Tensor], prefix: str) -> None:
    sub = {k[len(prefix) :]: v for k, v in state_dict.items() if k.startswith(prefix)}
    own = module.state_dict()
    missing, unexpected = sorted(set(own) - set(sub)), sorted(set(sub) - set(own))
    assert not missing and not unexpected, f"{prefix}*: missing {missing[:5]}, unexpected {unexpected[:5]}"
    bad = [k for k in own if tuple(own[k].shape) != tuple(sub[k].shape)]
    assert not bad, f"{prefix}*: shape mismatches {bad[:5]}"
    module.load_state_dict(sub, strict=True)


@functools.lru_cache(maxsize=4)
def _models(case_path: str) -> tuple[ResNet, MSDeformAttnPixelDecoder]:
    case = load_case(case_path)
    backbone = _build_backbone(case.config)
    pixdec = _build_pixel_decoder(case.config, backbone)
    _strict_load(backbone, case.state_dict, BACKBONE_PREFIX)
    _strict_load(pixdec, case.state_dict, PIXDEC_PREFIX)
    return backbone.eval(), pixdec.eval()


def _case_and_models(case_dir) -> tuple[GoldenCase, ResNet, MSDeformAttnPixelDecoder]:
    case = load_case(case_dir)
    assert len(case.inputs) >= 1 and len(case.outputs) == len(case.inputs)
    backbone, pixdec = _models(str(case.path))
    return case, backbone, pixdec


def _close(actual: Tensor, expected: Tensor, what: str, atol: float = ATOL) -> None:
    assert actual.shape == expected.shape, f"{what}: shape {tuple(actual.shape)} vs golden {tuple(expected.shape)}"
    err = (actual.float() - expected.float()).abs().max().item() if actual.numel() else 0.0
    assert err <= atol, f"{what}: max abs error {err:.3g} > {atol:.3g}"


def _normalize_pad(image: Tensor, mean: list[float], std: list[float], divisibility: int) -> Tensor:
    """(3, H, W) uint8 -> (3, Hp, Wp): (x - mean) / std, zero-padded bottom/right to a multiple of divisibility."""
    x = (image.float() - torch.tensor(mean).view(-1, 1, 1)) / torch.tensor(std).view(-1, 1, 1)
    H, W = x.shape[-2:]
    d = max(int(divisibility), 1)
    Hp, Wp = -(-H // d) * d, -(-W // d) * d
    return F.pad(x, (0, Wp - W, 0, Hp - H), value=0.0)


# ---------------------------------------------------------------------------------------------------- tests
@pytest.mark.parametrize("case_dir", golden_cases())
def test_golden_proposal_input_normalized_padded(case_dir):
    case = load_case(case_dir)
    for i, (inp, out) in enumerate(zip(case.inputs, case.outputs)):
        ours = _normalize_pad(inp["image"], case.config["pixel_mean"], case.config["pixel_std"],
                              case.config["size_divisibility"])  # fmt: skip
        _close(ours, out["proposal_input_normalized_padded"], f"{case.name} image{i} input", atol=INPUT_ATOL)


@pytest.mark.parametrize("case_dir", golden_cases())
def test_golden_proposal_backbone_strict_weights(case_dir):
    case, backbone, _ = _case_and_models(case_dir)
    n = sum(1 for k in case.state_dict if k.startswith(BACKBONE_PREFIX))
    assert n == len(backbone.state_dict()) > 0


@pytest.mark.parametrize("case_dir", golden_cases())
def test_golden_proposal_backbone_features(case_dir):
    case, backbone, _ = _case_and_models(case_dir)
    for i, out in enumerate(case.outputs):
        with torch.no_grad():
            feats = backbone(out["proposal_input_normalized_padded"][None].float())
        for k in FEATS:
            exp = out[f"backbone_{k}"]
            _close(feats[k][0], exp, f"{case.name} image{i} backbone_{k}", atol=backbone_atol(exp))


@pytest.mark.parametrize("case_dir", golden_cases())
def test_golden_proposal_pixel_decoder_strict_weights(case_dir):
    case, _, pixdec = _case_and_models(case_dir)
    n = sum(1 for k in case.state_dict if k.startswith(PIXDEC_PREFIX))
    assert n == len(pixdec.state_dict()) > 0


def _check_pixdec(case: GoldenCase, i: int, mask_features: Tensor, multi_scale: list[Tensor], where: str) -> None:
    out = case.outputs[i]
    n_levels = sum(1 for k in out if k.startswith("pixdec_multi_scale_"))
    assert len(multi_scale) == n_levels > 0, f"{where}: {len(multi_scale)} maps vs golden {n_levels}"
    _close(mask_features[0], out["pixdec_mask_features"], f"{where} pixdec_mask_features")
    for j, m in enumerate(multi_scale):
        _close(m[0], out[f"pixdec_multi_scale_{j}"], f"{where} pixdec_multi_scale_{j}")


@pytest.mark.parametrize("case_dir", golden_cases())
def test_golden_proposal_pixel_decoder_from_golden_backbone(case_dir):
    """Pixel decoder alone, fed the official backbone maps."""
    case, _, pixdec = _case_and_models(case_dir)
    for i, out in enumerate(case.outputs):
        with torch.no_grad():
            mf, ms = pixdec({k: out[f"backbone_{k}"][None].float() for k in FEATS})
        _check_pixdec(case, i, mf, ms, f"{case.name} image{i} (golden backbone)")


@pytest.mark.parametrize("case_dir", golden_cases())
def test_golden_proposal_pixel_decoder_end_to_end(case_dir):
    """Backbone + pixel decoder from the normalised padded input."""
    case, backbone, pixdec = _case_and_models(case_dir)
    for i, out in enumerate(case.outputs):
        with torch.no_grad():
            mf, ms = pixdec(backbone(out["proposal_input_normalized_padded"][None].float()))
        _check_pixdec(case, i, mf, ms, f"{case.name} image{i}")
