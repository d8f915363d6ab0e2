"""Unit tests of the proposal backbone (detectron2 ResNet, FrozenBN) and the MSDeformAttn pixel decoder.

* the deformable sampling against a slow, independently written bilinear reference (loops, zeros outside);
* the ``sampling_offsets`` / ``attention_weights`` layouts of :class:`MSDeformAttn` against explicit index formulas;
* reference points, sine position encoding and FrozenBN maths by hand;
* ResNet shapes / strides / channel rule for depth 18, 50, 101 with independent widths;
* the full-size official geometry against ``shared/golden/inventory_proposal_teacher_R50.tsv`` (keys, shapes,
  parameter-vs-buffer).
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from torch import Tensor

from masqclip_cli.modeling.proposals.backbone import FrozenBatchNorm2d, ResNet
from masqclip_cli.modeling.proposals.pixel_decoder import (
    MSDeformAttn,
    MSDeformAttnPixelDecoder,
    PositionEmbeddingSine,
    encoder_reference_points,
    ms_deform_attn_sample,
)

REPO = Path(__file__).resolve().parents[2]
INVENTORY = REPO.parent / "shared" / "golden" / "inventory_proposal_teacher_R50.tsv"
FEATS = ("res2", "res3", "res4", "res5")


# ---------------------------------------------------------------------------------------------------- slow reference
def _bilinear_zero_pad(plane: Tensor, x: float, y: float) -> Tensor:
    """Sample ``plane (H, W, D)`` at normalised ``(x, y)``; pixel (i, j) has its centre at ((j+.5)/W, (i+.5)/H)."""
    H, W, D = plane.shape
    px, py = x * W - 0.5, y * H - 0.5
    x0, y0 = math.floor(px), math.floor(py)
    fx, fy = px - x0, py - y0
    acc = torch.zeros(D, dtype=torch.float64)
    for yy, wy in ((y0, 1.0 - fy), (y0 + 1, fy)):
        for xx, wx in ((x0, 1.0 - fx), (x0 + 1, fx)):
            if 0 <= yy < H and 0 <= xx < W:
                acc += wy * wx * plane[yy, xx].double()
    return acc


def _slow_sample(value: Tensor, shapes: list[tuple[int, int]], locs: Tensor, weights: Tensor) -> Tensor:
    """value (B,S,M,D), locs (B,Lq,M,L,P,2), weights (B,Lq,M,L,P) -> (B, Lq, M*D) float64, by loops."""
    B, S, M, D = value.shape
    _, Lq, _, L, P, _ = locs.shape
    starts = [0]
    for h, w in shapes:
        starts.append(starts[-1] + h * w)
    out = torch.zeros(B, Lq, M * D, dtype=torch.float64)
    for b in range(B):
        for q in range(Lq):
            for m in range(M):
                acc = torch.zeros(D, dtype=torch.float64)
                for lvl, (h, w) in enumerate(shapes):
                    plane = value[b, starts[lvl] : starts[lvl + 1], m].reshape(h, w, D)
                    for p in range(P):
                        x, y = locs[b, q, m, lvl, p].tolist()
                        acc += float(weights[b, q, m, lvl, p]) * _bilinear_zero_pad(plane, x, y)
                out[b, q, m * D : (m + 1) * D] = acc
    return out


def _random_sampling_problem(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    shapes = [(3, 5), (6, 4), (1, 2)]
    S = sum(h * w for h, w in shapes)
    B, Lq, M, D, L, P = 2, 5, 3, 4, len(shapes), 3
    value = torch.randn(B, S, M, D, generator=g)
    locs = torch.rand(B, Lq, M, L, P, 2, generator=g) * 1.6 - 0.3  # many points outside [0, 1]
    locs[0, 0, 0, 0, 0] = torch.tensor([-0.05, 1.1])  # partly outside: one corner row still inside
    locs[0, 0, 0, 0, 1] = torch.tensor([2.0, -1.0])  # far outside: zero
    locs[0, 0, 0, 0, 2] = torch.tensor([0.5, 0.5])  # exact pixel centre / edge cases
    weights = torch.rand(B, Lq, M, L, P, generator=g)
    ss = torch.tensor(shapes, dtype=torch.long)
    lsi = torch.tensor([0, 15, 39], dtype=torch.long)
    return value, ss, lsi, locs, weights, shapes


# ---------------------------------------------------------------------------------------------------- sampling
def test_ms_deform_attn_sample_matches_slow_reference():
    value, ss, lsi, locs, weights, shapes = _random_sampling_problem()
    assert ((locs < 0) | (locs > 1)).any(dim=-1).float().mean() > 0.2
    fast = ms_deform_attn_sample(value, ss, lsi, locs, weights)
    slow = _slow_sample(value, shapes, locs, weights)
    assert fast.shape == (2, 5, 3 * 4) and fast.dtype == torch.float32
    assert (fast.double() - slow).abs().max().item() < 1e-5


def test_ms_deform_attn_sample_outside_is_zero():
    value, ss, lsi, locs, weights, _ = _random_sampling_problem(1)
    far = torch.full_like(locs, 1.0 + 1.0 / 0.9)  # beyond the last pixel centre + 1 pixel on every level
    assert ms_deform_attn_sample(value, ss, lsi, far, weights).abs().max().item() == 0.0


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_ms_deform_attn_sample_low_precision(dtype):
    value, ss, lsi, locs, weights, _ = _random_sampling_problem(2)
    ref = ms_deform_attn_sample(value, ss, lsi, locs, weights)
    out = ms_deform_attn_sample(value.to(dtype), ss, lsi, locs, weights.to(dtype))
    assert out.dtype == dtype and out.shape == ref.shape
    tol = 0.05 if dtype == torch.bfloat16 else 0.01
    assert (out.float() - ref).abs().max().item() < tol * max(1.0, ref.abs().max().item())


def test_ms_deform_attn_sample_rejects_bad_shapes():
    value, ss, lsi, locs, weights, _ = _random_sampling_problem()
    with pytest.raises(ValueError):
        ms_deform_attn_sample(value[:, :-1], ss, lsi, locs, weights)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
def test_ms_deform_attn_sample_cuda_matches_cpu():
    value, ss, lsi, locs, weights, _ = _random_sampling_problem(3)
    ref = ms_deform_attn_sample(value, ss, lsi, locs, weights)
    dev = torch.device("cuda")
    out = ms_deform_attn_sample(value.to(dev), ss.to(dev), lsi.to(dev), locs.to(dev), weights.to(dev))
    assert (out.cpu() - ref).abs().max().item() < 1e-5


# ---------------------------------------------------------------------------------------------------- MSDeformAttn
def test_reference_points_are_pixel_centres():
    ss = torch.tensor([[2, 3], [1, 2]])
    ref = encoder_reference_points(ss, batch=2, n_levels=2)
    assert ref.shape == (2, 8, 2, 2)
    expected = [((j + 0.5) / 3, (i + 0.5) / 2) for i in range(2) for j in range(3)] + [(0.25, 0.5), (0.75, 0.5)]
    assert torch.allclose(ref[1, :, 1], torch.tensor(expected), atol=0, rtol=0)
    assert torch.equal(ref[:, :, 0], ref[:, :, 1])


def test_msdeformattn_layouts_match_explicit_formulas():
    """sampling_offsets = (heads, levels, points, (x, y)) / (W, H); softmax jointly over levels*points per head."""
    torch.manual_seed(0)
    d, L, M, P = 12, 2, 3, 2
    Dh = d // M
    attn = MSDeformAttn(d_model=d, n_levels=L, n_heads=M, n_points=P).double()
    with torch.no_grad():
        for p in attn.parameters():
            p.normal_(0.0, 0.5)
    shapes = [(3, 4), (2, 2)]
    S = 16
    ss = torch.tensor(shapes)
    lsi = torch.tensor([0, 12])
    B = 2
    src = torch.randn(B, S, d, dtype=torch.float64)
    query = torch.randn(B, S, d, dtype=torch.float64)
    centres = [((j + 0.5) / w, (i + 0.5) / h) for h, w in shapes for i in range(h) for j in range(w)]
    ref_pts = torch.tensor(centres, dtype=torch.float64)[None, :, None, :].expand(B, S, L, 2)
    with torch.no_grad():
        out = attn(query, ref_pts, src, ss, lsi)
    assert out.shape == (B, S, d)

    # explicit reference
    with torch.no_grad():
        off = query @ attn.sampling_offsets.weight.T + attn.sampling_offsets.bias
        logit = query @ attn.attention_weights.weight.T + attn.attention_weights.bias
        value = (src @ attn.value_proj.weight.T + attn.value_proj.bias).view(B, S, M, Dh)
        locs = torch.zeros(B, S, M, L, P, 2, dtype=torch.float64)
        wts = torch.zeros(B, S, M, L, P, dtype=torch.float64)
        for b in range(B):
            for q in range(S):
                cx, cy = centres[q]
                for m in range(M):
                    row = torch.stack([logit[b, q, (m * L + lvl) * P + p] for lvl in range(L) for p in range(P)])
                    soft = torch.softmax(row, 0)
                    for lvl, (h, w) in enumerate(shapes):
                        for p in range(P):
                            k = ((m * L + lvl) * P + p) * 2
                            locs[b, q, m, lvl, p, 0] = cx + off[b, q, k] / w
                            locs[b, q, m, lvl, p, 1] = cy + off[b, q, k + 1] / h
                            wts[b, q, m, lvl, p] = soft[lvl * P + p]
        sampled = _slow_sample(value, shapes, locs, wts)
        expected = sampled @ attn.output_proj.weight.T + attn.output_proj.bias
    assert (out - expected).abs().max().item() < 1e-9


def test_msdeformattn_init_is_deformable_detr():
    attn = MSDeformAttn(d_model=16, n_levels=3, n_heads=4, n_points=2)
    assert attn.sampling_offsets.weight.abs().max() == 0 and attn.attention_weights.weight.abs().max() == 0
    bias = attn.sampling_offsets.bias.view(4, 3, 2, 2)
    # head 0 points along +x: (1, 0), (2, 0); head 1 along +y (cos(pi/2) ~ 0)
    assert torch.allclose(bias[0, :, 0], torch.tensor([1.0, 0.0]).expand(3, 2), atol=1e-6)
    assert torch.allclose(bias[0, :, 1], torch.tensor([2.0, 0.0]).expand(3, 2), atol=1e-6)
    assert torch.allclose(bias[1, 0, 1], torch.tensor([0.0, 2.0]), atol=1e-6)


def test_position_embedding_sine_by_hand():
    pe = PositionEmbeddingSine(num_pos_feats=4)
    x = torch.zeros(1, 7, 2, 3)
    out = pe(x)
    assert out.shape == (1, 8, 2, 3)
    H, W, T, F = 2, 3, 10000.0, 4
    for i in range(H):
        for j in range(W):
            ey = (i + 1) / (H + 1e-6) * 2 * math.pi
            ex = (j + 1) / (W + 1e-6) * 2 * math.pi
            exp = []
            for e in (ey, ex):
                for k in range(F // 2):
                    t = T ** (2 * k / F)
                    exp += [math.sin(e / t), math.cos(e / t)]
            assert torch.allclose(out[0, :, i, j], torch.tensor(exp), atol=1e-6), (i, j)


# ---------------------------------------------------------------------------------------------------- backbone
def test_frozen_bn_by_hand():
    bn = FrozenBatchNorm2d(3)
    w, b = [1.5, -0.5, 2.0], [0.1, 0.2, -0.3]
    mean, var = [0.5, -1.0, 0.0], [2.0, 0.25, 1.0]
    for name, vals in (("weight", w), ("bias", b), ("running_mean", mean), ("running_var", var)):
        getattr(bn, name).copy_(torch.tensor(vals))
    assert {n for n, _ in bn.named_parameters()} == set()
    assert set(bn.state_dict()) == {"weight", "bias", "running_mean", "running_var"}
    x = torch.arange(24, dtype=torch.float32).view(2, 3, 2, 2) / 7 - 1
    y = bn(x)
    for n in range(2):
        for c in range(3):
            for i in range(2):
                for j in range(2):
                    s = w[c] / math.sqrt(var[c] + 1e-5)
                    exp = float(x[n, c, i, j]) * s + (b[c] - mean[c] * s)
                    assert abs(float(y[n, c, i, j]) - exp) < 1e-6
    assert FrozenBatchNorm2d(4)(x.new_ones(1, 4, 1, 1)).sub(1).abs().max() < 1e-6  # default = identity
    # mixed precision: bf16 / fp16 input with float32 buffers keeps the input dtype
    for dt in (torch.bfloat16, torch.float16):
        y_lp = bn(x.to(dt))
        assert y_lp.dtype == dt and (y_lp.float() - y).abs().max().item() < 0.05


def _check_resnet(net: ResNet, x: Tensor, channels: list[int], strides: list[int]) -> dict[str, Tensor]:
    with torch.no_grad():
        out = net(x)
    assert list(out) == list(FEATS)
    assert net.out_channels == dict(zip(FEATS, channels))
    assert net.strides == dict(zip(FEATS, strides))
    for k, c, s in zip(FEATS, channels, strides):
        assert out[k].shape == (x.shape[0], c, x.shape[2] // s, x.shape[3] // s), k
    return out


def test_resnet50_independent_widths():
    net = ResNet(depth=50, stem_out_channels=16, res2_out_channels=48, num_groups=2, width_per_group=8).eval()
    _check_resnet(net, torch.randn(2, 3, 64, 96), [48, 96, 192, 384], [4, 8, 16, 32])
    sd = net.state_dict()
    assert sd["stem.conv1.weight"].shape == (16, 3, 7, 7)
    assert [len(getattr(net, k)) for k in FEATS] == [3, 4, 6, 3]
    for k, width, out_c in zip(FEATS, [16, 32, 64, 128], [48, 96, 192, 384]):
        assert sd[f"{k}.0.conv1.weight"].shape[0] == width
        assert sd[f"{k}.1.conv2.weight"].shape == (width, width // 2, 3, 3)  # 2 groups
        assert sd[f"{k}.1.conv3.weight"].shape == (out_c, width, 1, 1)
        assert f"{k}.0.shortcut.weight" in sd and f"{k}.1.shortcut.weight" not in sd
        assert sd[f"{k}.0.shortcut.norm.running_var"].shape == (out_c,)
    assert sd["res2.0.conv1.weight"].shape == (16, 16, 1, 1)
    assert net.res3[0].conv2.stride == (2, 2) and net.res3[0].conv1.stride == (1, 1)
    assert all(not n.endswith(("norm.weight", "norm.bias")) for n, _ in net.named_parameters())
    assert all(".bias" not in n for n, _ in net.named_parameters())  # convs have no bias


def test_resnet101_blocks_and_shapes():
    net = ResNet(depth=101, stem_out_channels=8, res2_out_channels=16, num_groups=1, width_per_group=4).eval()
    assert [len(getattr(net, k)) for k in FEATS] == [3, 4, 23, 3]
    _check_resnet(net, torch.randn(1, 3, 64, 32), [16, 32, 64, 128], [4, 8, 16, 32])


def test_resnet18_basic_blocks():
    net = ResNet(depth=18, stem_out_channels=16, res2_out_channels=64).eval()
    _check_resnet(net, torch.randn(1, 3, 32, 64), [64, 128, 256, 512], [4, 8, 16, 32])
    sd = net.state_dict()
    assert [len(getattr(net, k)) for k in FEATS] == [2, 2, 2, 2]
    assert sd["res2.0.conv1.weight"].shape == (64, 16, 3, 3) and "res2.0.conv3.weight" not in sd
    assert sd["res3.0.conv2.weight"].shape == (128, 128, 3, 3) and "res3.0.shortcut.weight" in sd
    # detectron2: identity shortcut when channels and stride are unchanged
    assert "res2.0.shortcut.weight" not in ResNet(depth=18, stem_out_channels=64, res2_out_channels=64).state_dict()
    with pytest.raises(ValueError):
        ResNet(depth=18, res2_out_channels=48)
    with pytest.raises(ValueError):
        ResNet(depth=34, res2_out_channels=64, res5_dilation=2)
    with pytest.raises(ValueError):
        ResNet(depth=42)


def test_resnet_stride_in_1x1_and_res5_dilation():
    net = ResNet(depth=50, stem_out_channels=8, res2_out_channels=16, width_per_group=4, stride_in_1x1=True)
    assert net.res4[0].conv1.stride == (2, 2) and net.res4[0].conv2.stride == (1, 1)
    dil = ResNet(depth=50, stem_out_channels=8, res2_out_channels=16, width_per_group=4, res5_dilation=2).eval()
    assert dil.res5[0].conv2.dilation == (2, 2) and dil.res5[0].conv2.padding == (2, 2)
    assert dil.res5[0].shortcut.stride == (1, 1)
    _check_resnet(dil, torch.randn(1, 3, 64, 64), [16, 32, 64, 128], [4, 8, 16, 16])


# ---------------------------------------------------------------------------------------------------- pixel decoder
def test_pixel_decoder_two_fpn_steps():
    """Deformable levels res4/res5, common stride 4: adapter_1/layer_1 on res2, adapter_2/layer_2 on res3."""
    ch = {"res2": 24, "res3": 40, "res4": 56, "res5": 72}
    st = {"res2": 4, "res3": 8, "res4": 16, "res5": 32}
    dec = MSDeformAttnPixelDecoder(
        ch, st, conv_dim=32, mask_dim=16, encoder_layers=1, heads=2, points=3, ffn_dim=48,
        deformable_levels=("res5", "res4"), num_groups=8,
    ).eval()  # fmt: skip
    sd = dec.state_dict()
    assert sd["input_proj.0.0.weight"].shape == (32, 72, 1, 1) and sd["input_proj.1.0.weight"].shape == (32, 56, 1, 1)
    assert "input_proj.2.0.weight" not in sd
    assert sd["adapter_1.weight"].shape == (32, 24, 1, 1) and sd["adapter_2.weight"].shape == (32, 40, 1, 1)
    assert sd["layer_2.weight"].shape == (32, 32, 3, 3) and "layer_2.bias" not in sd and "layer_2.norm.bias" in sd
    assert sd["transformer.level_embed"].shape == (2, 32)
    assert sd["transformer.encoder.layers.0.self_attn.sampling_offsets.weight"].shape == (2 * 2 * 3 * 2, 32)
    assert sd["transformer.encoder.layers.0.linear1.weight"].shape == (48, 32)
    H, W = 64, 96
    feats = {k: torch.randn(2, c, H // st[k], W // st[k]) for k, c in ch.items()}
    with torch.no_grad():
        mf, ms = dec(feats)
    assert mf.shape == (2, 16, H // 4, W // 4)
    assert [tuple(m.shape) for m in ms] == [(2, 32, H // s, W // s) for s in (32, 16, 8)]


def test_pixel_decoder_runs_in_bfloat16():
    net = ResNet(depth=50, stem_out_channels=8, res2_out_channels=16, width_per_group=4).eval()
    dec = MSDeformAttnPixelDecoder(net.out_channels, net.strides, conv_dim=32, mask_dim=8, encoder_layers=1,
                                   heads=2, num_groups=8).eval()  # fmt: skip
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        ref_mf, ref_ms = dec(net(x))
        net, dec = net.to(torch.bfloat16), dec.to(torch.bfloat16)
        mf, ms = dec(net(x.to(torch.bfloat16)))
    assert mf.dtype == torch.bfloat16 and all(m.dtype == torch.bfloat16 for m in ms)
    assert (mf.float() - ref_mf).abs().max().item() < 0.1 * max(1.0, ref_mf.abs().max().item())


# ---------------------------------------------------------------------------------------------------- full size
def _read_inventory() -> list[tuple[str, tuple[int, ...], str]]:
    if not INVENTORY.is_file():
        pytest.skip(f"no key inventory at {INVENTORY}")
    rows = []
    for line in INVENTORY.read_text().splitlines()[1:]:
        if not line.strip():
            continue
        key, shape, _dtype, trainable = line.split("\t")[:4]
        rows.append((key, tuple(int(s) for s in shape.split("x")) if shape else (), trainable))
    return rows


def test_full_size_keys_match_official_inventory():
    torch.manual_seed(0)
    backbone = ResNet(depth=50)
    pixdec = MSDeformAttnPixelDecoder(
        backbone.out_channels, backbone.strides, conv_dim=256, mask_dim=256, encoder_layers=6, heads=8, points=4,
        ffn_dim=1024, deformable_levels=("res3", "res4", "res5"), num_groups=32, common_stride=4,
    )  # fmt: skip
    ours: dict[str, tuple[tuple[int, ...], bool]] = {}
    for prefix, mod in (("backbone.", backbone), ("sem_seg_head.pixel_decoder.", pixdec)):
        params = {n for n, _ in mod.named_parameters()}
        for k, v in mod.state_dict().items():
            ours[prefix + k] = (tuple(v.shape), k in params)
    rows = [r for r in _read_inventory() if r[0].startswith(("backbone.", "sem_seg_head.pixel_decoder."))]
    official = {k: (shape, trainable != "buffer") for k, shape, trainable in rows}
    assert len(rows) == len(official)
    assert sorted(set(official) - set(ours)) == [], "missing keys"
    assert sorted(set(ours) - set(official)) == [], "unexpected keys"
    bad = [(k, ours[k], official[k]) for k in official if ours[k] != official[k]]
    assert bad == [], f"shape / parameter-vs-buffer mismatches: {bad[:5]}"
    # and it runs at full width on a small image
    with torch.no_grad():
        mf, ms = pixdec(backbone.eval()(torch.randn(1, 3, 64, 96)))
    assert mf.shape == (1, 256, 16, 24)
    assert [tuple(m.shape) for m in ms] == [(1, 256, 2, 3), (1, 256, 4, 6), (1, 256, 8, 12)]
