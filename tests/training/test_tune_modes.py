"""MasQVisual ``tune`` modes (paper Table 5): equal outputs at initialisation, exactly the mode's parameters trained,
image path untouched."""

from __future__ import annotations

import pytest
import torch
from golden import build_tiny_clip
from torch import nn

from masqclip_cli.modeling.masq_visual import TUNE_MODES, MasQVisual

R, G, W, L, D = 112, 8, 64, 3, 32
N = 1 + G * G
Q = 5
N_PROJ = L * (W * W + W)  # one set of per-block W x W projections with bias

MODES = ["q", "k", "v", "qk", "qkv", "clip"]


@pytest.fixture(scope="module")
def inputs() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 3, R, R, generator=g)
    allowed = torch.rand(2, Q, N, generator=g) < 0.5
    allowed[..., 0] = True
    return x, allowed


@pytest.fixture(scope="module")
def reference(inputs: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    m = MasQVisual(build_tiny_clip(seed=0).visual, fq_init="copy", tune="q").eval()
    with torch.no_grad():
        return m(*inputs)


def _build(mode: str) -> MasQVisual:
    return MasQVisual(build_tiny_clip(seed=0).visual, tune=mode).eval()


def _expected_trainable(m: MasQVisual, mode: str) -> set[str]:
    names = {"mask_pos_embed"}
    for proj in ("q", "k", "v"):
        if proj in mode and mode != "clip":
            names |= {f"{proj}_proj_new.{i}.{p}" for i in range(L) for p in ("weight", "bias")}
    if mode == "clip":
        names |= {n for n, _ in m.named_parameters() if n.startswith(("mask_blocks.", "mask_ln_pre.", "mask_ln_post."))}
        names.add("mask_proj")
    return names


def test_modes_listed() -> None:
    assert tuple(MODES) == TUNE_MODES


@pytest.mark.parametrize("mode", MODES)
def test_init_equals_q_mode(mode: str, inputs: tuple[torch.Tensor, torch.Tensor], reference: torch.Tensor) -> None:
    m = _build(mode)
    assert m.tune == mode
    with torch.no_grad():
        out = m(*inputs)
        probs = m.attention_weights(*inputs)
    assert (out - reference).abs().max().item() < 1e-6
    assert len(probs) == L and all(p.shape == (2, 4, Q, N) for p in probs)


@pytest.mark.parametrize("mode", MODES)
def test_trainable_set_and_one_sgd_step(mode: str, inputs: tuple[torch.Tensor, torch.Tensor]) -> None:
    m = _build(mode)
    names = {id(p): n for n, p in m.named_parameters()}
    trainable = m.trainable_parameters()
    assert len({id(p) for p in trainable}) == len(trainable)
    trainable_names = {names[id(p)] for p in trainable}
    assert trainable_names == _expected_trainable(m, mode)
    assert trainable_names == {n for n, p in m.named_parameters() if p.requires_grad}
    assert not any(p.requires_grad for p in m.visual.parameters())
    if mode in ("q", "k", "v"):
        assert sum(p.numel() for p in trainable) == N_PROJ + W
    elif mode in ("qk", "qkv"):
        assert sum(p.numel() for p in trainable) == len(mode) * N_PROJ + W

    x, allowed = inputs
    before = {k: v.detach().clone() for k, v in m.state_dict().items()}
    with torch.no_grad():
        img_before = m.encode_image(x)
    direction = torch.randn(D, generator=torch.Generator().manual_seed(3))
    opt = torch.optim.SGD(trainable, lr=0.1)
    opt.zero_grad()
    (m(x, allowed) @ direction).sum().backward()
    opt.step()

    after = m.state_dict()
    assert set(after) == set(before)
    for key, old in before.items():
        changed = not torch.equal(after[key], old)
        if key not in trainable_names:
            assert not changed, f"{mode}: frozen {key} changed"
        elif key.startswith("k_proj_new.") and key.endswith(".bias"):
            # a key bias adds the same q·b to every logit of a softmax row: its gradient is 0 in exact arithmetic
            assert m.get_parameter(key).grad.abs().max().item() < 1e-5
        else:
            assert changed, f"{mode}: trainable {key} did not change"
    with torch.no_grad():
        assert torch.equal(m.encode_image(x), img_before)


def test_k_and_v_modes_read_image_tokens_through_new_projections(inputs: tuple[torch.Tensor, torch.Tensor]) -> None:
    x, allowed = inputs
    for mode, attr in (("k", "k_proj_new"), ("v", "v_proj_new")):
        m = _build(mode)
        with torch.no_grad():
            base = m(x, allowed, return_tokens=True)
            getattr(m, attr)[1].weight.mul_(1.5)
            out = m(x, allowed, return_tokens=True)
        assert (out.embeddings - base.embeddings).abs().max().item() > 1e-4
        assert torch.equal(out.tokens_after_block[-1][:, Q:], base.tokens_after_block[-1][:, Q:])


def test_clip_mode_mask_path_uses_the_copy(inputs: tuple[torch.Tensor, torch.Tensor]) -> None:
    x, allowed = inputs
    m = _build("clip")
    with torch.no_grad():
        base = m(x, allowed, return_tokens=True)
        m.mask_blocks[0].mlp.c_fc.weight.mul_(1.5)
        out = m(x, allowed, return_tokens=True)
        assert (out.embeddings - base.embeddings).abs().max().item() > 1e-4
        assert torch.equal(out.tokens_after_block[-1][:, Q:], base.tokens_after_block[-1][:, Q:])
        m.reset_mask_path_from_clip()
        assert (m(x, allowed) - base.embeddings).abs().max().item() < 1e-6


def test_extra_projections_round_trip_and_validation() -> None:
    visual = build_tiny_clip(seed=0).visual
    for mode, extra in (("q", ()), ("k", ("k",)), ("v", ("v",)), ("qk", ("k",)), ("qkv", ("k", "v")), ("clip", ())):
        m = MasQVisual(visual, tune=mode)
        assert m.extra_projections == extra
        again = MasQVisual(visual, fq_init=m.fq_init, extra_projections=m.extra_projections, tune=m.tune)
        assert set(again.state_dict()) == set(m.state_dict())
        assert [n for n, p in again.named_parameters() if p.requires_grad] == [
            n for n, p in m.named_parameters() if p.requires_grad
        ]
    # extra_projections keep their old meaning: extra trainable K'/V' (q + k, v = qkv's trainable set)
    legacy = MasQVisual(visual, extra_projections=("k", "v"))
    assert legacy.tune == "q" and sum(p.numel() for p in legacy.trainable_parameters()) == 3 * N_PROJ + W
    # "k" with an extra V': both trainable, f_Q' frozen
    kv = MasQVisual(visual, tune="k", extra_projections=("v",))
    assert kv.trainable_projections == ("k", "v") and not kv.q_proj_new[0].weight.requires_grad
    assert MasQVisual(visual, tune="qk", fq_init="random").q_proj_new[0].weight.requires_grad
    with pytest.raises(ValueError, match="tune must be one of"):
        MasQVisual(visual, tune="kv")
    with pytest.raises(ValueError, match="fq_init='random'"):
        MasQVisual(visual, tune="k", fq_init="random")
    with pytest.raises(ValueError, match="extra_projections"):
        MasQVisual(visual, tune="clip", extra_projections=("k",))


def test_official_loader_in_non_q_modes() -> None:
    src = MasQVisual(build_tiny_clip(seed=1).visual).eval()
    sd = {f"visual.{k}": v.clone() for k, v in src.visual.state_dict().items()}
    sd["mask_embeddings"] = src.mask_pos_embed.detach().clone()
    for mode in ("k", "clip"):
        dst = MasQVisual(build_tiny_clip(seed=2).visual, tune=mode)
        dst.load_official_state_dict(sd, prefix="")  # no new_q_proj keys: f_Q' re-copied from the loaded CLIP
        blk = dst.visual.transformer.resblocks[1]
        assert torch.equal(dst.q_proj_new[1].weight, blk.attn.in_proj_weight[:W])
        if mode == "clip":
            assert torch.equal(dst.mask_blocks[1].attn.in_proj_weight, blk.attn.in_proj_weight)
            assert torch.equal(dst.mask_proj, dst.visual.proj)
    with pytest.raises(ValueError, match="missing"):
        MasQVisual(build_tiny_clip(seed=2).visual, tune="qk").load_official_state_dict(sd, prefix="")


def test_modes_move_with_the_module() -> None:
    m = MasQVisual(build_tiny_clip(seed=0, layers=1).visual, tune="clip").to(torch.float64)
    assert m.mask_proj.dtype == torch.float64 and m.mask_blocks[0].attn.in_proj_weight.dtype == torch.float64
    assert isinstance(m.mask_blocks[0], nn.Module)
