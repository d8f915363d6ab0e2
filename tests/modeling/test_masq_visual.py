"""MasQVisual on a tiny random (perturbed) open_clip ViT: image path = open_clip, mask-token attention rule, dtypes,
weights loading, refusing unsupported towers."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from golden import build_tiny_clip, tiny_clip_config
from torch import nn

from masqclip_cli.modeling.masq_visual import (
    OPENAI_CLIP_MEAN,
    OPENAI_CLIP_STD,
    MasQVisual,
    MasQVisualOutput,
    create_masq_visual,
    pad_to_multiple,
)

R, P, G, W, L, H, D = 112, 14, 8, 64, 3, 4, 32
N = 1 + G * G


@pytest.fixture(scope="module")
def clip_model() -> nn.Module:
    return build_tiny_clip(seed=0)


@pytest.fixture(scope="module")
def mv(clip_model: nn.Module) -> MasQVisual:
    return MasQVisual(clip_model.visual).eval()


def _pixels(b: int = 2, seed: int = 1) -> torch.Tensor:
    return torch.randn(b, 3, R, R, generator=torch.Generator().manual_seed(seed))


def _masks(b: int, q: int, p_allowed: float = 0.4, seed: int = 2) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    allowed = torch.rand(b, q, N, generator=g) < p_allowed
    allowed[..., 0] = True
    return allowed


def _max_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.float() - b.float()).abs().max().item()


# ------------------------------------------------------------------------------------------------ image path
def test_image_path_matches_open_clip(clip_model: nn.Module, mv: MasQVisual) -> None:
    x = _pixels(3)
    with torch.no_grad():
        ours = mv.encode_image(x)
        assert ours.shape == (3, D)
        assert _max_err(ours, clip_model.visual(x)) < 1e-5
        assert _max_err(ours, clip_model.encode_image(x)) < 1e-5
        # forward with Q > 0 carries the same image embedding
        res = mv(x, _masks(3, 5), return_tokens=True)
        assert _max_err(res.image_embedding, ours) < 1e-5


def test_image_tokens_match_open_clip_blocks(clip_model: nn.Module, mv: MasQVisual) -> None:
    """Token by token, block by block, with mask tokens present: the image tokens are open_clip's."""
    x = _pixels(2)
    q = 6
    with torch.no_grad():
        res = mv(x, _masks(2, q), return_tokens=True)
        t = clip_model.visual._embeds(x)
        assert _max_err(res.tokens_after_ln_pre[:, q:], t) < 1e-6
        for b, blk in enumerate(clip_model.visual.transformer.resblocks):
            t = blk(t)
            assert _max_err(res.tokens_after_block[b][:, q:], t) < 1e-5, f"block {b}"


def test_layer_scale_tower_matches_open_clip() -> None:
    model = build_tiny_clip(seed=3, ls_init_value=0.5)
    m = MasQVisual(model.visual).eval()
    x = _pixels(2)
    with torch.no_grad():
        assert _max_err(m.encode_image(x), model.visual(x)) < 1e-5
        emb = m(x, torch.ones(2, 4, N, dtype=torch.bool))
        assert _max_err(emb, F.normalize(model.visual(x), dim=-1)[:, None].expand(-1, 4, -1)) < 1e-5


# ------------------------------------------------------------------------------------------------ mask tokens
def test_full_mask_with_copied_fq_equals_clip(clip_model: nn.Module, mv: MasQVisual) -> None:
    x = _pixels(2)
    allowed = torch.ones(2, 5, N, dtype=torch.bool)
    with torch.no_grad():
        emb = mv(x, allowed)
        ref = F.normalize(clip_model.encode_image(x), dim=-1)
    assert emb.shape == (2, 5, D)
    assert _max_err(emb, ref[:, None].expand(-1, 5, -1)) < 1e-5
    assert torch.allclose(emb.norm(dim=-1), torch.ones(2, 5), atol=1e-6)

    rnd = MasQVisual(clip_model.visual, fq_init="random").eval()
    with torch.no_grad():
        emb_r = rnd(x, allowed)
    assert _max_err(emb_r, ref[:, None].expand(-1, 5, -1)) > 1e-3


def test_mask_pos_embed_is_not_aliased(clip_model: nn.Module) -> None:
    m = MasQVisual(clip_model.visual)
    pos = m.visual.positional_embedding
    assert torch.equal(m.mask_pos_embed.detach(), pos[0].detach())
    assert m.mask_pos_embed.data_ptr() != pos.data_ptr()
    before = pos[0].detach().clone()
    with torch.no_grad():
        m.mask_pos_embed.add_(1.0)
    assert torch.equal(pos[0].detach(), before)


def test_mask_pos_embed_is_used(clip_model: nn.Module) -> None:
    m = MasQVisual(clip_model.visual).eval()
    x, allowed = _pixels(1), _masks(1, 3)
    with torch.no_grad():
        a = m(x, allowed, return_tokens=True)
        m.mask_pos_embed.add_(torch.randn(W, generator=torch.Generator().manual_seed(0)))  # not constant: ln_pre
        b = m(x, allowed, return_tokens=True)
    expected = m.visual.class_embedding + m.mask_pos_embed
    assert _max_err(b.tokens_before_ln_pre[0, :3], expected.expand(3, -1)) == 0.0
    assert _max_err(a.embeddings, b.embeddings) > 1e-4
    assert _max_err(a.tokens_after_block[-1][:, 3:], b.tokens_after_block[-1][:, 3:]) == 0.0


def test_attention_weights_respect_mask(mv: MasQVisual) -> None:
    x, allowed = _pixels(2), _masks(2, 7, p_allowed=0.3)
    allowed[1, 2] = False  # empty proposal: only CLS (forced) remains
    with torch.no_grad():
        weights = mv.attention_weights(x, allowed)
    assert len(weights) == L
    for w in weights:
        assert w.shape == (2, H, 7, N)
        blocked = ~allowed[:, None].expand_as(w).clone()
        blocked[1, :, 2, 0] = False
        assert torch.all(w[blocked] == 0.0)
        assert torch.allclose(w.sum(-1), torch.ones_like(w.sum(-1)), atol=1e-6)
        assert torch.all(w[1, :, 2, 0] == 1.0)


def test_math_attention_path_equals_forward(mv: MasQVisual) -> None:
    x, allowed = _pixels(2), _masks(2, 6)
    with torch.no_grad():
        emb = mv(x, allowed)
        weights: list[torch.Tensor] = []
        emb_math = mv._run(x, allowed, collect=False, weights=weights)
    assert len(weights) == L
    assert _max_err(emb, emb_math) < 1e-6


def test_empty_mask_only_cls(clip_model: nn.Module) -> None:
    """Only CLS allowed: the mask token reads only CLS's value, so f_Q' cannot matter; outputs finite."""
    m = MasQVisual(clip_model.visual).eval()
    x = _pixels(2)
    allowed = torch.zeros(2, 3, N, dtype=torch.bool)
    allowed[..., 0] = True
    with torch.no_grad():
        a = m(x, allowed)
        for lin in m.q_proj_new:
            lin.weight.normal_(0, 3.0)
            lin.bias.normal_(0, 3.0)
        b = m(x, allowed)
        # CLS column False in the input is treated as allowed (no NaN)
        c = m(x, torch.zeros(2, 3, N, dtype=torch.bool))
    assert torch.isfinite(a).all() and torch.isfinite(c).all()
    assert _max_err(a, b) < 1e-6
    assert _max_err(a, c) < 1e-6


def test_mask_tokens_do_not_affect_each_other(mv: MasQVisual) -> None:
    x = _pixels(1)
    allowed = _masks(1, 6, seed=5)
    other = _masks(1, 6, seed=9)
    with torch.no_grad():
        full = mv(x, allowed)
        for i in range(6):
            alone = mv(x, allowed[:, i : i + 1])
            assert _max_err(alone[:, 0], full[:, i]) < 1e-6, f"token {i} alone"
            mixed = other.clone()
            mixed[:, i] = allowed[:, i]
            assert _max_err(mv(x, mixed)[:, i], full[:, i]) < 1e-6, f"token {i} with other masks"
        # the masks do matter
        assert _max_err(mv(x, other), full) > 1e-4


def test_q_zero(mv: MasQVisual) -> None:
    x = _pixels(2)
    with torch.no_grad():
        emb = mv(x, torch.zeros(2, 0, N, dtype=torch.bool))
        res = mv(x, torch.zeros(2, 0, N, dtype=torch.bool), return_tokens=True)
    assert emb.shape == (2, 0, D)
    assert res.tokens_after_block[-1].shape == (2, N, W)
    assert mv.attention_masks(torch.zeros(2, 0, 10, 10)).shape == (2, 0, N)


def test_batch_equals_single_images(mv: MasQVisual) -> None:
    x = _pixels(2, seed=11)
    allowed = torch.cat([_masks(1, 5, 0.2, seed=3), _masks(1, 5, 0.7, seed=4)])
    with torch.no_grad():
        both = mv(x, allowed)
        for i in range(2):
            assert _max_err(both[i], mv(x[i : i + 1], allowed[i : i + 1])[0]) < 1e-6


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_close_to_fp32(clip_model: nn.Module, dtype: torch.dtype) -> None:
    ref_m = MasQVisual(clip_model.visual).eval()
    x, allowed = _pixels(2), _masks(2, 6)
    allowed[0, 1] = False  # empty proposal
    with torch.no_grad():
        ref = ref_m(x, allowed)
        ref_img = ref_m.encode_image(x)
    low_clip = build_tiny_clip(seed=0)
    m = MasQVisual(low_clip.visual).eval().to(dtype)
    assert m.mask_pos_embed.dtype == dtype and m.q_proj_new[0].weight.dtype == dtype
    with torch.no_grad():
        emb = m(x, allowed)  # float32 input is cast to the module dtype
        img = m.encode_image(x)
    assert emb.dtype == dtype and torch.isfinite(emb).all()
    cos = F.cosine_similarity(emb.float(), ref, dim=-1)
    assert cos.min().item() > 0.99, cos.min().item()
    assert F.cosine_similarity(img.float(), ref_img, dim=-1).min().item() > 0.99


def test_extra_kv_copies_leave_output_unchanged(clip_model: nn.Module, mv: MasQVisual) -> None:
    kv = MasQVisual(clip_model.visual, extra_projections=("k", "v")).eval()
    assert kv.k_proj_new is not None and kv.v_proj_new is not None
    assert mv.k_proj_new is None and mv.v_proj_new is None
    x, allowed = _pixels(2), _masks(2, 5)
    with torch.no_grad():
        base = mv(x, allowed, return_tokens=True)
        out = kv(x, allowed, return_tokens=True)
        assert _max_err(out.embeddings, base.embeddings) < 1e-6
        # K'/V' are really used by the mask tokens only
        kv.v_proj_new[1].weight.mul_(2.0)
        changed = kv(x, allowed, return_tokens=True)
    assert _max_err(changed.embeddings, base.embeddings) > 1e-4
    assert _max_err(changed.tokens_after_block[-1][:, 5:], base.tokens_after_block[-1][:, 5:]) == 0.0
    n_new = L * (W * W + W)
    assert sum(p.numel() for p in kv.trainable_parameters()) == 3 * n_new + W
    with pytest.raises(ValueError, match="extra_projections"):
        MasQVisual(clip_model.visual, extra_projections=("q",))


# ------------------------------------------------------------------------------------------------ inputs
def test_attention_masks_patch_rule(mv: MasQVisual) -> None:
    logits = torch.full((1, 3, R, R), -5.0)
    logits[0, 0, 20, 30] = 1.0  # one pixel in patch (1, 2)
    logits[0, 1] = 2.0  # everything
    allowed = mv.attention_masks(logits)
    assert allowed.shape == (1, 3, N) and allowed.dtype == torch.bool
    assert allowed[..., 0].all()
    expected = torch.zeros(N, dtype=torch.bool)
    expected[0] = True
    expected[1 + (20 // P) * G + 30 // P] = True
    assert torch.equal(allowed[0, 0], expected)
    assert allowed[0, 1].all()
    assert not allowed[0, 2, 1:].any()
    # low-resolution logits are upsampled bilinearly; any positive pixel in a patch allows it
    low = torch.full((2, 1, 8, 8), -1.0)
    low[1, 0, :, :4] = 1.0
    a = mv.attention_masks(low)
    assert not a[0, 0, 1:].any()
    grid = a[1, 0, 1:].view(G, G)
    assert grid[:, :4].all() and not grid[:, 5:].any()


def test_pad_to_multiple() -> None:
    img = torch.randint(0, 256, (3, 117, 150), dtype=torch.uint8)
    p = pad_to_multiple(img, 32)
    assert p.shape == (3, 128, 160) and p.dtype == torch.uint8
    assert torch.equal(p[:, :117, :150], img)
    assert not p[:, 117:].any() and not p[:, :, 150:].any()
    batch = pad_to_multiple(img[None].float(), 32)
    assert batch.shape == (1, 3, 128, 160)
    same = torch.zeros(3, 96, 64)
    assert pad_to_multiple(same, 32) is same


def test_preprocess(mv: MasQVisual) -> None:
    img = torch.randint(0, 256, (2, 3, 128, 160), dtype=torch.uint8)
    out = mv.preprocess(img)
    assert out.shape == (2, 3, R, R) and out.dtype == torch.float32
    assert torch.equal(out, mv.preprocess(img.float()))
    x = F.interpolate(img.float() / 255, size=(R, R), mode="bicubic", align_corners=False)
    mean = torch.tensor(OPENAI_CLIP_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(OPENAI_CLIP_STD).view(1, 3, 1, 1)
    assert _max_err(out, (x - mean) / std) < 1e-5


def test_preprocess_uses_tower_mean_std() -> None:
    model = build_tiny_clip(seed=0, perturb=False)
    model.visual.image_mean = (0.5, 0.5, 0.5)
    model.visual.image_std = (0.25, 0.25, 0.25)
    m = MasQVisual(model.visual)
    out = m.preprocess(torch.full((1, 3, R, R), 255, dtype=torch.uint8))
    assert torch.allclose(out, torch.full_like(out, 2.0))


def test_input_validation(mv: MasQVisual) -> None:
    x = _pixels(2)
    with pytest.raises(ValueError, match="bool"):
        mv(x, torch.ones(2, 3, N))
    with pytest.raises(ValueError, match="allowed must be"):
        mv(x, torch.ones(1, 3, N, dtype=torch.bool))
    with pytest.raises(ValueError, match="pixel_values"):
        mv(torch.zeros(2, 3, 64, 64), torch.ones(2, 3, N, dtype=torch.bool))


# ------------------------------------------------------------------------------------------------ structure
def test_properties_and_names(mv: MasQVisual) -> None:
    assert (mv.image_size, mv.patch_size, mv.grid_size, mv.num_tokens) == (R, P, G, N)
    assert (mv.width, mv.output_dim, mv.num_heads, mv.num_layers) == (W, D, H, L)
    names = set(mv.state_dict())
    assert {
        "visual.conv1.weight",
        "visual.transformer.resblocks.0.attn.in_proj_weight",
        "visual.proj",
        "mask_pos_embed",
        "q_proj_new.2.weight",
        "q_proj_new.2.bias",
    } <= names
    with pytest.raises(ValueError, match="num_heads"):
        MasQVisual(mv.visual, num_heads=8)


def test_freezing_and_gradients(clip_model: nn.Module) -> None:
    m = MasQVisual(clip_model.visual)
    assert not any(p.requires_grad for p in m.visual.parameters())
    trainable = m.trainable_parameters()
    assert all(p.requires_grad for p in trainable)
    assert sum(p.numel() for p in trainable) == L * (W * W + W) + W
    assert {id(p) for p in trainable} == {id(p) for p in m.parameters() if p.requires_grad}
    x, allowed = _pixels(1), _masks(1, 4)
    m(x, allowed).sum().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in trainable)
    assert all(p.grad is None for p in m.visual.parameters())


@pytest.mark.parametrize(
    ("vision_extra", "match"),
    [
        ({"pool_type": "avg"}, "pool_type='avg'"),
        ({"attentional_pool": True, "attn_pooler_heads": 4}, "attentional pooling"),
        ({"qk_norm": True}, "CustomResidualAttentionBlock"),
    ],
)
def test_refuses_unsupported_towers(vision_extra: dict, match: str) -> None:
    model = build_tiny_clip(seed=0, perturb=False, layers=1, **vision_extra)
    with pytest.raises(ValueError, match=match) as err:
        MasQVisual(model.visual)
    msg = str(err.value)
    assert "class-token ViT" in msg and "\n" not in msg


def test_refuses_non_vit() -> None:
    with pytest.raises(ValueError, match="not an open_clip VisionTransformer"):
        MasQVisual(nn.Linear(3, 3))  # type: ignore[arg-type]


# ------------------------------------------------------------------------------------------------ weights
def _official_state(source: MasQVisual, prefix: str = "masqclip.") -> dict[str, torch.Tensor]:
    sd = {f"{prefix}visual.{k}": v.clone() for k, v in source.visual.state_dict().items()}
    for i, lin in enumerate(source.q_proj_new):
        sd[f"{prefix}visual.transformer.resblocks.{i}.attn.new_q_proj.weight"] = lin.weight.detach().clone()
        sd[f"{prefix}visual.transformer.resblocks.{i}.attn.new_q_proj.bias"] = lin.bias.detach().clone()
    sd[f"{prefix}mask_embeddings"] = torch.randn(W)
    sd["backbone.stem.conv1.weight"] = torch.zeros(1)  # outside the prefix: ignored
    return sd


def test_load_official_state_dict_roundtrip() -> None:
    src = MasQVisual(build_tiny_clip(seed=1).visual, fq_init="random").eval()
    sd = _official_state(src)
    dst = MasQVisual(build_tiny_clip(seed=2).visual, extra_projections=("k",)).eval()
    dst.load_official_state_dict(sd)
    assert torch.equal(dst.mask_pos_embed.detach(), sd["masqclip.mask_embeddings"])
    assert not torch.equal(dst.mask_pos_embed.detach(), dst.visual.positional_embedding[0])
    # absent K' keys: K' re-copied from the loaded CLIP k rows
    assert torch.equal(dst.k_proj_new[0].weight, dst.visual.transformer.resblocks[0].attn.in_proj_weight[W : 2 * W])
    x, allowed = _pixels(2), _masks(2, 4)
    with torch.no_grad():
        src.mask_pos_embed.copy_(sd["masqclip.mask_embeddings"])
        assert _max_err(dst(x, allowed), src(x, allowed)) < 1e-6
    plain = MasQVisual(build_tiny_clip(seed=3).visual)
    plain.load_official_state_dict(
        {k[len("masqclip.") :]: v for k, v in sd.items() if k.startswith("masqclip.")}, prefix=""
    )


def test_load_official_state_dict_is_strict() -> None:
    src = MasQVisual(build_tiny_clip(seed=1, perturb=False).visual)
    dst = MasQVisual(build_tiny_clip(seed=2, perturb=False).visual)
    sd = _official_state(src)
    missing = dict(sd)
    del missing["masqclip.visual.transformer.resblocks.1.attn.new_q_proj.bias"]
    with pytest.raises(ValueError, match=r"missing: masqclip\.visual\.transformer\.resblocks\.1\.attn\.new_q_proj"):
        dst.load_official_state_dict(missing)
    extra = dict(sd, **{"masqclip.visual.foo": torch.zeros(1)})
    with pytest.raises(ValueError, match=r"unexpected: masqclip\.visual\.foo"):
        dst.load_official_state_dict(extra)
    bad = dict(sd, **{"masqclip.mask_embeddings": torch.zeros(W + 1)})
    with pytest.raises(ValueError, match="shape mismatch: masqclip.mask_embeddings"):
        dst.load_official_state_dict(bad)
    with pytest.raises(ValueError, match="missing"):
        dst.load_official_state_dict({})


def test_create_masq_visual_from_config() -> None:
    m = create_masq_visual(tiny_clip_config(), None, fq_init="random", extra_projections=("v",))
    assert isinstance(m, MasQVisual) and not m.training
    assert (m.image_size, m.grid_size, m.width, m.output_dim, m.num_heads) == (R, G, W, D, H)
    assert m.v_proj_new is not None and m.k_proj_new is None
    with torch.no_grad():
        out = m(_pixels(1), _masks(1, 2), return_tokens=True)
    assert isinstance(out, MasQVisualOutput) and out.embeddings.shape == (1, 2, D)
