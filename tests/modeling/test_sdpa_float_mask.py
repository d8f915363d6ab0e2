"""The mask tokens' attention goes through ``scaled_dot_product_attention`` with an additive FLOAT mask (what CUDA's
fused kernels take), and changes nothing: it equals the former boolean-mask call and a hand-written
``softmax(QK^T/sqrt(d) + M) V``, for fp32 and bf16, on direct calls, on a tiny tower, and on the whole tiny-random
model's mask embeddings / p_cls (against a copy of the former implementation kept here). Fully blocked rows give 0,
as the boolean path does, never NaN."""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from golden import build_tiny_clip

from masqclip_cli.modeling import masq_visual
from masqclip_cli.modeling.factory import load_model
from masqclip_cli.modeling.masq_visual import MasQVisual, attention_bias, masked_attention

DTYPES = [torch.float32, torch.bfloat16]
# bf16 has an 8-bit mantissa: the fused kernel and an fp32 reference differ by a few bf16 ulps of |V| ~ 3
TOL = {torch.float32: 2e-6, torch.bfloat16: 3e-2}


@pytest.fixture(scope="module")
def tiny_visual():  # noqa: ANN201 - the tiny perturbed open_clip vision tower (copy it before use)
    return build_tiny_clip(seed=0).visual


def _qkv(b: int, h: int, q: int, n: int, d: int, dtype: torch.dtype, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(b, h, m, d, generator=g).to(dtype) for m in (q, n, n)]


def _allowed(b: int, q: int, n: int, seed: int = 1, p: float = 0.3) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.rand(b, 1, q, n, generator=g) < p


def old_bool_attention(q, k, v, allowed):  # noqa: ANN001, ANN201 - the former implementation, kept for comparison
    return F.scaled_dot_product_attention(q, k, v, attn_mask=allowed)


def reference(q, k, v, allowed):  # noqa: ANN001, ANN201
    """softmax(QK^T/sqrt(d) + M) V in float64, M = 0 / -inf; a row with nothing allowed is 0."""
    q64, k64, v64 = (t.double() for t in (q, k, v))
    scores = q64 @ k64.transpose(-1, -2) / math.sqrt(q.shape[-1])
    scores = scores + torch.zeros_like(scores).masked_fill(~allowed, float("-inf"))
    probs = torch.softmax(scores, dim=-1).nan_to_num(0.0)  # a fully blocked row: 0/0 -> 0
    return probs @ v64


def _err(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.double() - b.double()).abs().max().item()


# ------------------------------------------------------------------------------------------------ the mask itself
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_attention_bias_is_additive_float_in_the_query_dtype(dtype):
    allowed = _allowed(2, 5, 37)
    bias = attention_bias(allowed, dtype)
    assert bias.dtype == dtype and bias.shape == allowed.shape and not bias.dtype.is_complex
    assert bool((bias[allowed] == 0).all())
    blocked = bias[~allowed]
    assert bool(torch.isfinite(blocked).all()) and bool((blocked <= torch.finfo(dtype).min / 4).all())
    # stored with rows aligned to 16 columns (the fused CUDA kernel copies an unaligned mask in every call)
    assert bias.stride(-2) % 16 == 0 and bias.stride(-1) == 1
    # adding any plausible logit cannot overflow to -inf (fp16 included)
    assert bool(torch.isfinite(blocked - 1000).all())
    with pytest.raises(ValueError, match="bool"):
        attention_bias(bias, dtype)


# ------------------------------------------------------------------------------------------------ direct calls
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("heads_in_mask", [False, True])
def test_masked_attention_equals_bool_path_and_reference(dtype, heads_in_mask):
    b, h, q, n, d = 2, 4, 7, 50, 16
    qq, k, v = _qkv(b, h, q, n, d, dtype)
    allowed = _allowed(b, q, n)
    allowed[..., 0] = True
    if heads_in_mask:
        per_head = torch.rand(b, h, q, n, generator=torch.Generator().manual_seed(3)) < 0.9
        allowed = allowed.expand(b, h, q, n) & per_head
        allowed[..., 0] = True
    new = masked_attention(qq, k, v, allowed)
    assert new.dtype == dtype and new.shape == (b, h, q, d)
    old = old_bool_attention(qq, k, v, allowed)
    ref = reference(qq, k, v, allowed)
    assert _err(new, old) <= TOL[dtype]
    assert _err(new, ref) <= TOL[dtype]
    if dtype == torch.float32:
        assert torch.equal(new, old)  # exp of a blocked logit is exactly 0 either way: bit for bit


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_fully_blocked_rows_give_zero_not_nan(dtype):
    b, h, q, n, d = 1, 2, 4, 20, 8
    qq, k, v = _qkv(b, h, q, n, d, dtype, seed=5)
    allowed = _allowed(b, q, n, seed=6, p=0.5)
    allowed[..., 0] = True
    allowed[0, 0, 1] = False  # query 1: nothing allowed
    allowed[0, 0, 3] = False  # query 3 too
    new = masked_attention(qq, k, v, allowed)
    assert bool(torch.isfinite(new).all())
    assert bool((new[0, :, [1, 3]] == 0).all())
    old = old_bool_attention(qq, k, v, allowed)  # today's boolean path: 0 for such rows as well
    assert bool((old[0, :, [1, 3]] == 0).all())
    tol = TOL.get(dtype, 3e-3)
    assert _err(new, old) <= tol and _err(new, reference(qq, k, v, allowed)) <= tol
    # a plain float mask of -inf would give NaN on some kernels; the finite bias alone gives a uniform row
    raw = F.scaled_dot_product_attention(qq, k, v, attn_mask=attention_bias(allowed, dtype))
    assert bool(torch.isfinite(raw).all())


def test_forward_hands_sdpa_a_float_mask(tiny_visual, monkeypatch):
    """What the tower passes to SDPA: the image attention gets no mask, the mask tokens a float mask in q's dtype."""
    mv = MasQVisual(copy.deepcopy(tiny_visual)).eval()
    seen = []
    real = F.scaled_dot_product_attention

    def spy(q, k, v, attn_mask=None, **kw):  # noqa: ANN001, ANN003, ANN202
        seen.append(None if attn_mask is None else (attn_mask.dtype, q.dtype, tuple(attn_mask.shape)))
        return real(q, k, v, attn_mask=attn_mask, **kw)

    monkeypatch.setattr(masq_visual.F, "scaled_dot_product_attention", spy)
    pixels = torch.randn(2, 3, mv.image_size, mv.image_size)
    allowed = _allowed(2, 5, mv.num_tokens)[:, 0]
    with torch.no_grad():
        mv(pixels, allowed)
    masks = [s for s in seen if s is not None]
    assert len(masks) == mv.num_layers and seen.count(None) == mv.num_layers
    assert all(m == (torch.float32, torch.float32, (2, 1, 5, mv.num_tokens)) for m in masks)


# ------------------------------------------------------------------------------------------------ a real tower
def _patched_forward(mv: MasQVisual, pixels: torch.Tensor, allowed: torch.Tensor, impl, monkeypatch) -> torch.Tensor:
    """The tower's forward with its mask-token attention replaced by ``impl(q, k, v, allowed (B,1,Q,N))``."""
    with monkeypatch.context() as m:
        m.setattr(MasQVisual, "_mask_attention",
                  lambda self, q, k, v, allowed, weights, bias=None: impl(q, k, v, allowed[:, None]).to(q.dtype))
        with torch.no_grad():
            return mv(pixels, allowed)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("tune", ["q", "clip"])
def test_tower_equals_bool_path_and_reference(dtype, tune, tiny_visual, monkeypatch):
    torch.manual_seed(0)
    mv = MasQVisual(copy.deepcopy(tiny_visual), tune=tune).eval().to(dtype)
    g = torch.Generator().manual_seed(2)
    pixels = torch.randn(2, 3, mv.image_size, mv.image_size, generator=g)
    allowed = torch.rand(2, 6, mv.num_tokens, generator=g) < 0.3
    with torch.no_grad():
        new = mv(pixels, allowed)
    old = _patched_forward(mv, pixels, allowed, old_bool_attention, monkeypatch)
    ref = _patched_forward(mv, pixels, allowed, reference, monkeypatch)
    assert new.dtype == dtype
    # embeddings are L2-normalised: errors are absolute on unit vectors
    tol = {torch.float32: 1e-5, torch.bfloat16: 2e-2}[dtype]
    assert _err(new, old) <= tol, _err(new, old)
    assert _err(new, ref) <= tol, _err(new, ref)
    if dtype == torch.float32:
        assert torch.equal(new, old)


# ------------------------------------------------------------------------------------------------ the whole model
@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_whole_model_outputs_unchanged(precision, monkeypatch):
    torch.manual_seed(0)
    model = load_model("tiny-random", precision=precision)
    model.set_vocabulary(load_vocab())
    g = torch.Generator().manual_seed(4)
    images = [torch.randint(0, 256, (3, 96, 128), generator=g, dtype=torch.uint8),
              torch.randint(0, 256, (3, 70, 90), generator=g, dtype=torch.uint8)]
    new = model(images)
    with monkeypatch.context() as m:
        m.setattr(MasQVisual, "_mask_attention",
                  lambda self, q, k, v, allowed, weights, bias=None: old_bool_attention(q, k, v, allowed[:, None]))
        old = model(images)
    for a, b in zip(new, old):
        assert torch.equal(a.mask_logits, b.mask_logits)  # the proposals do not depend on the CLIP side
        if precision == "fp32":
            assert torch.equal(a.embeddings, b.embeddings) and torch.equal(a.p_cls, b.p_cls)
        else:
            assert _err(a.embeddings, b.embeddings) <= 2e-2 and _err(a.p_cls, b.p_cls) <= 2e-2
        assert bool(torch.isfinite(a.p_cls).all())


def load_vocab():  # noqa: ANN201
    from masqclip_cli.vocab import load_vocabulary

    return load_vocabulary("cat; dog; road [stuff]; sky [stuff]")
