"""Unit tests of the masked-attention decoder and the proposal network's plumbing (CPU, small)."""

from __future__ import annotations

import importlib.util
import warnings

import pytest
import torch
from golden import DEFAULT_GOLDEN_ROOT
from torch import Tensor, nn

from masqclip_cli.modeling.proposals.network import (
    PROPOSAL_CONFIGS,
    ProposalNetwork,
    build_proposal_network,
    map_official_key,
    normalize_and_pad,
    postprocess_masks,
    proposal_instances,
)
from masqclip_cli.modeling.proposals.transformer_decoder import (
    MaskedAttentionDecoder,
    attention_mask_from_logits,
    sine_position_embedding,
)

INVENTORY = DEFAULT_GOLDEN_ROOT / "inventory_proposal_teacher_R50.tsv"
PREDICTOR_PREFIX = "sem_seg_head.predictor."


def _inventory() -> dict[str, tuple[tuple[int, ...], str]]:
    if not INVENTORY.is_file():
        import os

        msg = f"key inventory not found: {INVENTORY}"
        if os.environ.get("CI"):
            pytest.fail(msg)
        pytest.skip(msg)
    rows = {}
    for line in INVENTORY.read_text().splitlines()[1:]:
        if not line.strip():
            continue
        key, shape, dtype, _trainable = line.split("\t")
        rows[key] = (tuple(int(s) for s in shape.split("x")), dtype)
    return rows


def _tiny_decoder(seed: int = 0, **kw) -> MaskedAttentionDecoder:
    torch.manual_seed(seed)
    args = dict(in_channels=16, hidden_dim=16, num_queries=5, heads=2, ffn_dim=24, dec_layers=4, mask_dim=8)
    args.update(kw)
    return MaskedAttentionDecoder(**args).eval()


def _tiny_inputs(batch: int = 1, seed: int = 1, channels: int = 16, mask_dim: int = 8) -> tuple[list[Tensor], Tensor]:
    g = torch.Generator().manual_seed(seed)
    ms = [torch.randn(batch, channels, h, w, generator=g) for h, w in ((2, 3), (4, 6), (8, 12))]
    return ms, torch.randn(batch, mask_dim, 16, 24, generator=g)


# ---------------------------------------------------------------------------------------------------- decoder
def test_full_size_decoder_keys_match_inventory() -> None:
    """The default (official full-size) decoder has exactly the inventory's ``sem_seg_head.predictor.*`` keys."""
    inv = {k[len(PREDICTOR_PREFIX) :]: v for k, v in _inventory().items() if k.startswith(PREDICTOR_PREFIX)}
    assert inv, "inventory has no predictor keys"
    dec = MaskedAttentionDecoder()
    ours = {k: (tuple(v.shape), str(v.dtype).removeprefix("torch.")) for k, v in dec.state_dict().items()}
    assert sorted(set(ours) - set(inv)) == [], "keys not in the inventory"
    assert sorted(set(inv) - set(ours)) == [], "inventory keys missing"
    bad = [(k, ours[k], inv[k]) for k in inv if ours[k] != inv[k]]
    assert bad == []
    assert len(dec.transformer_cross_attention_layers) == 9


def test_decoder_shapes_and_aux() -> None:
    dec = _tiny_decoder(dec_layers=5)
    ms, mf = _tiny_inputs(batch=2)
    with torch.no_grad():
        out = dec(ms, mf)
    assert out["pred_logits"].shape == (2, 5, 2)
    assert out["pred_masks"].shape == (2, 5, 16, 24)
    assert len(out["aux_outputs"]) == 4
    for d in out["aux_outputs"]:
        assert d["pred_logits"].shape == (2, 5, 2) and d["pred_masks"].shape == (2, 5, 16, 24)
    # each batch item is independent of the other
    with torch.no_grad():
        single = dec([m[1:] for m in ms], mf[1:])
    torch.testing.assert_close(single["pred_masks"][0], out["pred_masks"][1], atol=1e-5, rtol=0)


def test_input_proj_only_when_needed() -> None:
    assert not any(k.startswith("input_proj") for k in _tiny_decoder().state_dict())
    dec = _tiny_decoder(in_channels=12)
    assert dec.state_dict()["input_proj.0.weight"].shape == (16, 12, 1, 1)
    assert "input_proj.2.bias" in _tiny_decoder(enforce_input_proj=True).state_dict()
    ms, mf = _tiny_inputs(channels=12)
    with torch.no_grad():
        assert torch.isfinite(dec(ms, mf)["pred_masks"]).all()


def test_pre_norm_runs() -> None:
    dec = _tiny_decoder(pre_norm=True)
    ms, mf = _tiny_inputs()
    with torch.no_grad():
        out = dec(ms, mf)
    assert torch.isfinite(out["pred_logits"]).all()
    assert set(dec.state_dict()) == set(_tiny_decoder().state_dict())


def test_sine_position_embedding_by_hand() -> None:
    pos = sine_position_embedding(2, 3, num_pos_feats=4)
    assert pos.shape == (8, 2, 3)
    two_pi = 2 * torch.pi
    y = torch.tensor([1.0, 2.0]) / (2 + 1e-6) * two_pi
    x = torch.tensor([1.0, 2.0, 3.0]) / (3 + 1e-6) * two_pi
    # channel layout: y part [sin(y/1), cos(y/1), sin(y/100), cos(y/100)], then the same for x (T = 1e4, F = 4)
    torch.testing.assert_close(pos[0, :, 0], y.sin())
    torch.testing.assert_close(pos[1, :, 2], y.cos())
    torch.testing.assert_close(pos[2, :, 1], (y / 100).sin())
    torch.testing.assert_close(pos[3, 1, :], (y[1] / 100).cos().expand(3))
    torch.testing.assert_close(pos[4, 0, :], x.sin())
    torch.testing.assert_close(pos[7, 1, :], (x / 100).cos())


def test_attention_mask_rule() -> None:
    logits = torch.tensor([[[[-1.0, 2.0], [0.5, -3.0]], [[-1.0, -2.0], [-0.1, -3.0]]]])  # (1, 2, 2, 2)
    mask = attention_mask_from_logits(logits, (2, 2), num_heads=3)
    assert mask.shape == (3, 2, 4) and mask.dtype == torch.bool
    assert mask[0, 0].tolist() == [True, False, False, True]  # sigmoid < 0.5 is blocked
    assert mask[0, 1].tolist() == [False] * 4  # fully blocked row -> unblocked
    assert torch.equal(mask[1], mask[0]) and torch.equal(mask[2], mask[0])
    # batch-major head layout (b * heads + h), resized with bilinear align_corners=False
    two = torch.stack([logits[0], -logits[0]])
    m2 = attention_mask_from_logits(two, (1, 1), num_heads=2)
    assert m2.shape == (4, 2, 1)
    assert torch.equal(m2[0], m2[1]) and torch.equal(m2[2], m2[3])


def test_fully_blocked_query_attends_everywhere() -> None:
    """A query whose mask logits are all negative attends to every position: outputs stay finite, and its first
    cross-attention output equals an unmasked run, while other queries' outputs are masked."""
    dec = _tiny_decoder(dec_layers=3)
    ms, mf = _tiny_inputs()
    mf[:, 0] = 1.0  # a constant channel lets a hook set query 0's raw mask to a constant

    def force(module, inputs, output):
        output = output.clone()
        output[:, :, 0] = 0.0
        output[:, 0, :] = 0.0
        output[:, 0, 0] = -30.0  # query 0: mask logit -30 everywhere -> fully blocked
        return output

    captured = {}

    def capture(module, args, output):
        captured.setdefault("args", args)
        captured.setdefault("out", output)

    h1 = dec.mask_embed.register_forward_hook(force)
    h2 = dec.transformer_cross_attention_layers[0].register_forward_hook(capture)
    try:
        with torch.no_grad():
            out = dec(ms, mf)
    finally:
        h1.remove()
        h2.remove()
    assert (out["aux_outputs"][0]["pred_masks"][0, 0] == -30.0).all()
    for d in [*out["aux_outputs"], out]:
        assert torch.isfinite(d["pred_logits"]).all() and torch.isfinite(d["pred_masks"]).all()
    tgt, memory, attn_mask, pos, qpos = captured["args"]
    assert attn_mask is not None and not attn_mask[:, 0].any()  # the row was unblocked
    assert attn_mask[:, 1:].any()  # other queries are masked somewhere
    with torch.no_grad():
        unmasked = dec.transformer_cross_attention_layers[0](tgt, memory, None, pos, qpos)
    torch.testing.assert_close(captured["out"][:, 0], unmasked[:, 0], atol=1e-6, rtol=0)
    assert not torch.allclose(captured["out"][:, 1:], unmasked[:, 1:], atol=1e-4)


# ---------------------------------------------------------------------------------------------------- network
class _StubBackbone(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 1)
        self.register_buffer("frozen", torch.ones(4))

    def forward(self, x: Tensor) -> dict[str, Tensor]:
        y = self.conv(x)
        return {f"res{k}": nn.functional.avg_pool2d(y, 2**k) * self.frozen.view(1, -1, 1, 1) for k in (2, 3, 4, 5)}


class _StubPixelDecoder(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.proj = nn.Conv2d(4, 16, 1)
        self.mask = nn.Conv2d(4, 8, 1)

    def forward(self, feats: dict[str, Tensor]) -> tuple[Tensor, list[Tensor]]:
        return self.mask(feats["res2"]), [self.proj(feats[k]) for k in ("res5", "res4", "res3")]


def _stub_network() -> ProposalNetwork:
    torch.manual_seed(0)
    return ProposalNetwork(_StubBackbone(), _StubPixelDecoder(), _tiny_decoder()).eval()


def _official(net: ProposalNetwork) -> dict[str, Tensor]:
    """Random official-format state_dict for ``net`` (inverse of the loader's key mapping)."""
    rename = {"backbone.": "backbone.", "pixel_decoder.": "sem_seg_head.pixel_decoder.", "predictor.": PREDICTOR_PREFIX}
    sd = {}
    for k, v in net.state_dict().items():
        for src, dst in rename.items():
            if k.startswith(src):
                sd[dst + k[len(src) :]] = torch.randn_like(v)
    return sd


def test_network_forward_and_buffers() -> None:
    net = _stub_network()
    assert "pixel_mean" not in net.state_dict() and "pixel_std" not in net.state_dict()
    assert {n for n, _ in net.named_children()} == {"backbone", "pixel_decoder", "predictor"}
    x = net.normalize_and_pad([torch.randint(0, 256, (3, 50, 70), dtype=torch.uint8)] * 2)
    assert x.shape == (2, 3, 64, 96)
    with torch.no_grad():
        out = net(x, return_features=True)
    assert out.pred_logits.shape == (2, 5, 2) and out.pred_masks.shape == (2, 5, 16, 24)
    torch.testing.assert_close(out.log_p_obj, torch.log_softmax(out.pred_logits, -1)[..., 0])
    assert len(out.aux) == 3
    assert set(out.features) == {"res2", "res3", "res4", "res5", "mask_features", "multi_scale"}
    assert net(x).features is None


def test_load_official_state_dict() -> None:
    net = _stub_network()
    sd = _official(net)
    extra = {"criterion.empty_weight": torch.ones(2), "masqclip.visual.proj": torch.zeros(3, 3)}
    report = net.load_official_state_dict({**sd, **extra})
    assert sorted(report.ignored) == sorted(extra) and not report.missing and not report.unexpected
    key = PREDICTOR_PREFIX + "query_feat.weight"
    torch.testing.assert_close(net.predictor.query_feat.weight, sd[key], atol=0, rtol=0)
    torch.testing.assert_close(net.backbone.frozen, sd["backbone.frozen"], atol=0, rtol=0)
    torch.testing.assert_close(net.pixel_decoder.mask.bias, sd["sem_seg_head.pixel_decoder.mask.bias"])
    net.load_official_state_dict({"model": sd, "iteration": 3})  # detectron2 checkpoint wrapper

    renamed = dict(sd)
    renamed[PREDICTOR_PREFIX + "query_feats.weight"] = renamed.pop(key)
    with pytest.raises(ValueError, match="query_feats.weight") as err:
        net.load_official_state_dict(renamed)
    assert "missing" in str(err.value) and key in str(err.value)

    bad_key = PREDICTOR_PREFIX + "class_embed.weight"
    misshaped = {**sd, bad_key: torch.zeros(3, 16)}
    with pytest.raises(ValueError, match=r"class_embed\.weight.*\(3, 16\)"):
        net.load_official_state_dict(misshaped)

    with pytest.raises(ValueError, match="something.else"):
        net.load_official_state_dict({**sd, "something.else": torch.zeros(1)})

    # non-strict: skip the bad key with a warning, load the rest
    before = net.predictor.class_embed.weight.clone()
    sd2 = {k: torch.randn_like(v) for k, v in misshaped.items()}
    sd2[bad_key] = torch.zeros(3, 16)
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        report = net.load_official_state_dict(sd2, strict=False)
    assert w and report.mismatched and not report.missing
    torch.testing.assert_close(net.predictor.class_embed.weight, before, atol=0, rtol=0)
    torch.testing.assert_close(net.predictor.query_feat.weight, sd2[key], atol=0, rtol=0)


def test_map_official_key() -> None:
    assert map_official_key("sem_seg_head.predictor.level_embed.weight") == "predictor.level_embed.weight"
    assert map_official_key("sem_seg_head.pixel_decoder.adapter_1.weight") == "pixel_decoder.adapter_1.weight"
    assert map_official_key("backbone.stem.conv1.weight") == "backbone.stem.conv1.weight"
    assert map_official_key("masqclip.visual.proj") is None


def test_normalize_and_pad_by_hand() -> None:
    a = torch.arange(18, dtype=torch.uint8).view(3, 2, 3) * 10
    b = torch.full((3, 5, 1), 200, dtype=torch.uint8)
    mean, std = (10.0, 20.0, 30.0), (2.0, 4.0, 5.0)
    x = normalize_and_pad([a, b], mean, std, size_divisibility=4)
    assert x.shape == (2, 3, 8, 4) and x.dtype == torch.float32
    exp_a = torch.zeros(3, 8, 4)
    exp_b = torch.zeros(3, 8, 4)
    for c in range(3):
        exp_a[c, :2, :3] = (a[c].float() - mean[c]) / std[c]
        exp_b[c, :5, :1] = (200.0 - mean[c]) / std[c]
    assert exp_a[0, 0, 0] == -5.0 and exp_b[2, 4, 0] == 34.0
    torch.testing.assert_close(x[0], exp_a, atol=0, rtol=0)
    torch.testing.assert_close(x[1], exp_b, atol=0, rtol=0)
    assert normalize_and_pad([a, b], mean, std, size_divisibility=1).shape == (2, 3, 5, 3)
    torch.testing.assert_close(normalize_and_pad([a.float()], mean, std, 4), x[:1, :, :4], atol=0, rtol=0)
    assert normalize_and_pad([a], mean, std, 32).shape == (1, 3, 32, 32)


def test_postprocess_masks_by_hand() -> None:
    logits = torch.tensor([[[0.0, 4.0], [8.0, 12.0]]])  # (1, 2, 2)
    # bilinear 2 -> 4 (align_corners=False) samples at -0.25, 0.25, 0.75, 1.25 (clamped): weights 1, .75/.25, ...
    padded = torch.tensor([[0.0, 1, 3, 4], [2, 3, 5, 6], [6, 7, 9, 10], [8, 9, 11, 12]])
    torch.testing.assert_close(postprocess_masks(logits, (4, 4), (4, 4), (4, 4))[0], padded)
    cropped = padded[:3, :2]
    torch.testing.assert_close(postprocess_masks(logits, (4, 4), (3, 2), (3, 2))[0], cropped)
    wide = torch.tensor([[0.0, 0.25, 0.75, 1.0], [2, 2.25, 2.75, 3], [6, 6.25, 6.75, 7]])
    torch.testing.assert_close(postprocess_masks(logits, (4, 4), (3, 2), (3, 4))[0], wide)


def test_postprocess_masks_chunking_is_exact() -> None:
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(7, 8, 10, generator=g)
    full = postprocess_masks(logits, (32, 40), (29, 35), (50, 61))
    assert full.shape == (7, 50, 61)
    for chunk in (1, 3, 7, 100):
        assert torch.equal(postprocess_masks(logits, (32, 40), (29, 35), (50, 61), chunk=chunk), full)


def test_proposal_instances_by_hand() -> None:
    logits = torch.tensor([[2.0, 0.0], [0.0, 0.0], [-1.0, 1.0]])
    masks = torch.tensor([[[1.0, -1.0], [2.0, -3.0]], [[-1.0, -1.0], [-1.0, -1.0]], [[0.5, 0.5], [0.5, -0.5]]])
    out = proposal_instances(logits, masks, k=2)
    p = torch.softmax(logits, -1)[:, 0]
    s0 = p[0] * (torch.sigmoid(torch.tensor(1.0)) + torch.sigmoid(torch.tensor(2.0))) / (2 + 1e-6)
    s1 = p[1] * 0.0
    torch.testing.assert_close(out["scores"], torch.stack([s0, s1]))
    assert out["query_indices"].tolist() == [0, 1]
    assert out["pred_masks"].dtype == torch.bool and out["pred_masks"][0].tolist() == [[True, False], [True, False]]
    assert out["pred_classes"].tolist() == [0, 0]
    assert proposal_instances(logits, masks, k=10)["scores"].shape == (3,)


# ---------------------------------------------------------------------------------------------------- configs
def test_proposal_configs_shape() -> None:
    assert {"m2f-r50", "tiny"} <= set(PROPOSAL_CONFIGS)
    full = PROPOSAL_CONFIGS["m2f-r50"]
    assert full["transformer_decoder"]["num_queries"] == 100 and full["transformer_decoder"]["dec_layers"] == 10
    assert full["pixel_decoder"]["encoder_layers"] == 6 and full["backbone"]["stem_out_channels"] == 64
    for cfg in PROPOSAL_CONFIGS.values():
        assert {"backbone", "pixel_decoder", "transformer_decoder", "pixel_mean", "pixel_std"} <= set(cfg)


@pytest.mark.skipif(
    any(
        importlib.util.find_spec(f"masqclip_cli.modeling.proposals.{m}") is None for m in ("backbone", "pixel_decoder")
    ),
    reason="proposals/backbone.py or proposals/pixel_decoder.py not present yet",
)
def test_full_size_network_keys_match_inventory() -> None:
    """``build_proposal_network("m2f-r50")`` has the inventory's keys (``criterion.empty_weight`` aside), mapped."""
    inv = _inventory()
    net = build_proposal_network("m2f-r50")
    ours = {k: tuple(v.shape) for k, v in net.state_dict().items()}
    expected = {map_official_key(k): shape for k, (shape, _) in inv.items() if k != "criterion.empty_weight"}
    assert None not in expected
    assert sorted(set(ours) ^ set(expected)) == []
    assert [k for k in expected if ours[k] != expected[k]] == []
    tiny = build_proposal_network("tiny")
    with torch.no_grad():
        out = tiny(tiny.normalize_and_pad([torch.zeros(3, 64, 64)]))
    assert out.pred_masks.shape == (1, 8, 16, 16)
