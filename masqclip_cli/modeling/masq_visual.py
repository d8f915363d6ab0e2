"""MasQ visual encoder: an open_clip class-token ViT with Mask Class Tokens and new query projections f_Q'.

Token layout
------------
For one image with ``Q`` proposals, a ``G x G`` patch grid and ``N = 1 + G*G`` CLIP tokens, the sequence that goes
through the transformer is (width ``W``)::

    [ m_0 ... m_{Q-1} | CLS | p_0 ... p_{G*G-1} ]      shape (B, Q + N, W)
      Q mask tokens      the N ordinary CLIP ("image") tokens

* image tokens are exactly open_clip's: ``conv1`` patches (row-major) + ``positional_embedding[1:]``, and
  CLS = ``class_embedding + positional_embedding[0]``;
* every mask token starts as ``class_embedding + mask_pos_embed`` (``mask_pos_embed`` is a trainable vector of its own,
  initialised from ``positional_embedding[0]``);
* all tokens go through ``ln_pre`` (if the tower has one).

Attention rule (every block, same mask in every block)
------------------------------------------------------
``h = ln_1(x)`` for all tokens. Image tokens run CLIP's unchanged full self-attention among themselves, with the
frozen ``in_proj`` q/k/v. Mask token ``q`` uses a new query ``f_Q'(h_q)`` and reads the *image tokens'* keys and
values (computed once per block and shared with the image-token attention)::

    attn_q = softmax( f_Q'(h_q) K_img^T / sqrt(head_dim) + M_q ) V_img,   M_q[j] = 0 if allowed[q, j] else -inf

``M_q`` is an additive float mask in the query dtype (:func:`attention_bias`: 0 where allowed, a large finite
negative where blocked) handed to ``torch.nn.functional.scaled_dot_product_attention``, so that CUDA can run the
fused (memory-efficient) kernel, which takes float masks; it is built once per forward, stored padded to a multiple
of 16 columns (the alignment that kernel wants, so no block copies it), and equals the boolean mask bit for bit
(``exp`` of a blocked logit is exactly 0 either way). A fully blocked row (never made by :meth:`MasQVisual.forward`,
which always allows CLS) gives 0, as the boolean path does, never NaN (:func:`masked_attention`).

then both results go through the frozen ``out_proj`` (and layer scale ``ls_1`` if present), the residual, and
``x + ls_2(mlp(ln_2(x)))``. Mask tokens are never keys or values: they see neither each other nor themselves, and
image tokens never see them, so the image path is bit-for-bit the ordinary CLIP forward and each mask token is
independent of every other mask token. Column 0 (CLS) of the mask is always allowed, so a softmax row is never empty.
No ``(Q+N)^2`` attention matrix is built: the image attention is ``N x N`` and the mask attention ``Q x N``.

Output: ``ln_post`` on the mask tokens, ``@ proj``, L2 normalisation: one embedding per proposal, comparable with
CLIP text embeddings.

Optional per-block K'/V' projections (``extra_projections=("k", "v")``) give the mask tokens their own keys/values
computed from the ``ln_1``-normalised image tokens; they are not part of the official method (which tunes Q only).

Tuning ablations (``tune``, paper Table 5)
------------------------------------------
``tune`` picks what MasQ-Tuning trains; ``mask_pos_embed`` is trainable in every mode and the image-token path always
uses the frozen CLIP weights, so ``encode_image`` never changes. Every new weight starts as a copy of the frozen CLIP
one, so with ``fq_init="copy"`` all modes give exactly the same outputs at initialisation.

* ``"q"`` (default, the method): f_Q' trainable (plus any ``extra_projections``, trainable too, as before).
* ``"k"`` / ``"v"``: K' (resp. V') trainable; f_Q' still exists (same state_dict keys) but is a **frozen** copy of
  CLIP's f_Q, so the mask queries are CLIP's own.
* ``"qk"`` / ``"qkv"``: f_Q' and K' (and V') trainable.
* ``"clip"``: the mask-token path gets its own trainable copy of CLIP: per block ``mask_blocks.{i}`` (a deep copy of
  the whole ``ResidualAttentionBlock``: ``ln_1``, ``attn.in_proj_*``, ``attn.out_proj``, ``ls_1``, ``ln_2``,
  ``mlp``, ``ls_2``) plus ``mask_ln_pre``, ``mask_ln_post`` and ``mask_proj``. In block i the mask tokens compute
  ``h_q = copy.ln_1(x_q)`` and read the (frozen-path) image tokens through ``copy.ln_1(x_img)``; q, k, v all come
  from the copied ``in_proj``, then the copied ``out_proj``/``ls_1``, residual, copied ``ln_2``/``mlp``/``ls_2``.
  The image tokens themselves (``conv1``, class/positional embeddings, the frozen blocks) are not copied;
  ``class_embedding`` is not copied either since the trainable ``mask_pos_embed`` is added to it. f_Q' exists as a
  frozen copy but is unused.

The new projections that exist are those ``tune`` implies (k → K', v → V', qk → K', qkv → K', V') together with
``extra_projections``; all of them are trainable (``extra_projections`` keep their meaning of "extra trainable K'/V'"),
so ``MasQVisual(visual, tune=m.tune, extra_projections=m.extra_projections)`` rebuilds the same module.
"""

from __future__ import annotations

import copy
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
import torch.nn.functional as F
from open_clip.transformer import ResidualAttentionBlock, VisionTransformer
from torch import Tensor, nn

from masqclip_cli.modeling.clip_loader import create_open_clip

__all__ = [
    "OPENAI_CLIP_MEAN",
    "OPENAI_CLIP_STD",
    "TUNE_MODES",
    "MasQVisual",
    "MasQVisualOutput",
    "attention_bias",
    "create_masq_visual",
    "masked_attention",
    "pad_to_multiple",
]

OPENAI_CLIP_MEAN: tuple[float, float, float] = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD: tuple[float, float, float] = (0.26862954, 0.26130258, 0.27577711)

_PROJ_NAMES = ("q", "k", "v")
TUNE_MODES: tuple[str, ...] = ("q", "k", "v", "qk", "qkv", "clip")


def pad_to_multiple(image: Tensor, divisor: int = 32) -> Tensor:
    """Zero-pad an image (bottom and right) so that height and width are multiples of ``divisor``.

    Args:
        image: ``(3, H, W)`` or ``(B, 3, H, W)``, any dtype (uint8 raw images included).
        divisor: the size divisibility (detectron2's ``SIZE_DIVISIBILITY``, 32 in MasQCLIP).

    Returns:
        ``(3, Hp, Wp)`` or ``(B, 3, Hp, Wp)``, same dtype, ``Hp = ceil(H / divisor) * divisor`` (likewise ``Wp``);
        the original pixels sit top-left, the rest is 0. The input is returned unchanged if already aligned.
    """
    if image.ndim not in (3, 4):
        raise ValueError(f"pad_to_multiple expects (3,H,W) or (B,3,H,W), got shape {tuple(image.shape)}")
    if divisor < 1:
        raise ValueError(f"divisor must be >= 1, got {divisor}")
    h, w = image.shape[-2:]
    pad_h, pad_w = (-h) % divisor, (-w) % divisor
    if pad_h == 0 and pad_w == 0:
        return image
    return F.pad(image, (0, pad_w, 0, pad_h), mode="constant", value=0)


#: Column alignment of the float attention mask's storage (the CUDA memory-efficient kernel copies a mask whose
#: row stride is not a multiple of 16 in every call; a mask made aligned once is used as is in every block).
_MASK_ALIGN = 16


def attention_bias(allowed: Tensor, dtype: torch.dtype) -> Tensor:
    """The additive float attention mask of a boolean one (True = allowed).

    Blocked entries get ``finfo(dtype).min / 2``: large enough that ``exp`` of a blocked logit is exactly 0 (as with
    ``-inf``), finite so that a fully blocked row cannot turn into NaN, and with room below it so that adding a
    logit cannot overflow to ``-inf`` in fp16. The storage is padded to a multiple of 16 columns (the returned
    tensor is a view of the first ``N``), the alignment the fused CUDA kernel needs.

    Args:
        allowed: ``(..., N)`` bool.
        dtype: the query dtype (float32, bfloat16, float16, float64).

    Returns:
        ``(..., N)`` tensor of ``dtype`` on ``allowed``'s device: 0 where allowed, ``finfo(dtype).min / 2`` where not.
    """
    if allowed.dtype != torch.bool:
        raise ValueError(f"attention_bias expects a bool mask (True = allowed), got {allowed.dtype}")
    n = int(allowed.shape[-1])
    padded = -(-n // _MASK_ALIGN) * _MASK_ALIGN if n else 0
    bias = torch.zeros((*allowed.shape[:-1], padded), dtype=dtype, device=allowed.device)[..., :n]
    return bias.masked_fill_(~allowed, torch.finfo(dtype).min / 2)


def masked_attention(
    query: Tensor, key: Tensor, value: Tensor, allowed: Tensor, bias: Tensor | None = None
) -> Tensor:
    """``softmax(query key^T / sqrt(d) + M) value`` through ``scaled_dot_product_attention`` with a float mask.

    Args:
        query: ``(B, H, Q, d)``.
        key, value: ``(B, H, N, d)``, the dtype of ``query``.
        allowed: ``(B, 1 or H, Q, N)`` bool, True = query q may attend to key j.
        bias: :func:`attention_bias` of ``allowed`` in the query dtype, if already made (reused across blocks).

    Returns:
        ``(B, H, Q, d)`` in the query dtype; a row with no allowed key is 0 (as the boolean-mask path gives), never
        NaN.
    """
    if bias is None:
        bias = attention_bias(allowed, query.dtype)
    out = F.scaled_dot_product_attention(query, key, value, attn_mask=bias)
    return out.masked_fill(~allowed.any(dim=-1, keepdim=True), 0)


@dataclass
class MasQVisualOutput:
    """Everything :meth:`MasQVisual.forward` computes, returned with ``return_tokens=True``.

    Token tensors are in the order ``[Q mask tokens, CLS, G*G patches]``, shape ``(B, Q + 1 + G*G, W)``.

    Attributes:
        embeddings: ``(B, Q, D)`` L2-normalised mask embeddings (what ``forward`` returns by default).
        embeddings_prenorm: ``(B, Q, D)`` ``ln_post(mask tokens) @ proj`` before L2 normalisation.
        image_embedding: ``(B, D)`` the image path's own embedding ``ln_post(CLS) @ proj`` (= open_clip's
            ``visual(x)``, un-normalised).
        tokens_before_ln_pre: ``(B, Q+N, W)`` tokens entering ``ln_pre``.
        tokens_after_ln_pre: ``(B, Q+N, W)``.
        tokens_after_block: one ``(B, Q+N, W)`` tensor per residual block.
    """

    embeddings: Tensor
    embeddings_prenorm: Tensor
    image_embedding: Tensor
    tokens_before_ln_pre: Tensor
    tokens_after_ln_pre: Tensor
    tokens_after_block: list[Tensor] = field(default_factory=list)


def _unsupported(what: str) -> ValueError:
    return ValueError(
        f"unsupported CLIP vision tower: {what}; MasQ needs an open_clip class-token ViT "
        "(VisionTransformer, pool_type='tok', standard ResidualAttentionBlock)"
    )


def _check_supported(visual: nn.Module) -> None:
    """Raise a one-line ValueError naming the first property of ``visual`` that MasQ cannot handle."""
    if not isinstance(visual, VisionTransformer):
        raise _unsupported(
            f"{type(visual).__name__} is not an open_clip VisionTransformer (timm/ResNet towers "
            "have no class token to copy)"
        )
    if getattr(visual, "attn_pool", None) is not None:
        raise _unsupported("attentional pooling (attentional_pool=True)")
    if getattr(visual, "pool_type", None) != "tok":
        raise _unsupported(f"pool_type={getattr(visual, 'pool_type', None)!r} (only 'tok' pooling)")
    ih, iw = visual.image_size
    ph, pw = visual.patch_size
    if ih != iw or ph != pw:
        raise _unsupported(f"non-square image_size {visual.image_size} / patch_size {visual.patch_size}")
    if visual.proj is None:
        raise _unsupported("no output projection (proj is None)")
    blocks = visual.transformer.resblocks
    width = visual.class_embedding.shape[-1]
    n_tok = 1 + visual.grid_size[0] * visual.grid_size[1]
    if tuple(visual.positional_embedding.shape) != (n_tok, width):
        raise _unsupported(
            f"positional_embedding of shape {tuple(visual.positional_embedding.shape)}, expected "
            f"({n_tok}, {width}) covering CLS + patches"
        )
    for i, blk in enumerate(blocks):
        if not isinstance(blk, ResidualAttentionBlock):
            raise _unsupported(
                f"block {i} is {type(blk).__name__} (custom blocks: qk_norm/scaled-cosine/scale_* attention)"
            )
        attn = blk.attn
        if not isinstance(attn, nn.MultiheadAttention):
            raise _unsupported(f"block {i} attention is {type(attn).__name__}, not nn.MultiheadAttention")
        if (
            not attn._qkv_same_embed_dim
            or attn.in_proj_bias is None
            or attn.bias_k is not None
            or attn.add_zero_attn
            or attn.embed_dim != width
        ):
            raise _unsupported(
                f"block {i} nn.MultiheadAttention is not packed-qkv with bias (kdim/vdim, "
                "bias=False, add_bias_kv or add_zero_attn)"
            )
        if hasattr(blk, "ln_1_kv"):
            raise _unsupported(f"block {i} is a cross-attention block")


class MasQVisual(nn.Module):
    """An open_clip class-token ViT with Mask Class Tokens (one per proposal) and per-block query projections f_Q'.

    Parameters (state_dict names):
        ``visual.*``: the wrapped open_clip ``VisionTransformer`` under its own names (frozen by the constructor).
        ``mask_pos_embed``: ``(W,)`` trainable; mask token = ``class_embedding + mask_pos_embed``.
        ``q_proj_new.{i}.weight`` ``(W, W)``, ``.bias`` ``(W,)``: f_Q' of block i, trainable.
        ``k_proj_new.{i}.*`` / ``v_proj_new.{i}.*``: optional K'/V' of block i (``extra_projections``), trainable.
        ``mask_blocks.{i}.*``, ``mask_ln_pre.*``, ``mask_ln_post.*``, ``mask_proj``: the mask path's own CLIP copy
        (``tune="clip"`` only).

    Args:
        visual: an open_clip ``VisionTransformer`` with a class token (``clip_model.visual``). It is wrapped, not
            copied: its parameters are shared with the CLIP model it came from and set to ``requires_grad=False``.
        fq_init: ``"copy"`` (f_Q' = CLIP's own q projection; an untuned model then equals CLIP's masked class-token
            classifier) or ``"random"`` (PyTorch's default ``nn.Linear`` init, as the official training code).
        num_heads: attention heads; read from the blocks (``attn.num_heads``); if given it must agree.
        extra_projections: subset of ``("k", "v")``: add per-block K'/V' used only by the mask tokens, initialised
            as copies of CLIP's own k/v projections, trainable (in addition to what ``tune`` trains).
        tune: which weights MasQ-Tuning trains, one of :data:`TUNE_MODES` (paper Table 5; see the module docstring).
            ``fq_init="random"`` needs f_Q' to be trained (``"q"``, ``"qk"``, ``"qkv"``); ``"clip"`` takes no
            ``extra_projections``.
    """

    def __init__(
        self,
        visual: VisionTransformer,
        fq_init: Literal["copy", "random"] = "copy",
        num_heads: int | None = None,
        extra_projections: Sequence[str] = (),
        tune: str = "q",
    ) -> None:
        super().__init__()
        _check_supported(visual)
        if fq_init not in ("copy", "random"):
            raise ValueError(f"fq_init must be 'copy' or 'random', got {fq_init!r}")
        extra = tuple(extra_projections)
        bad = [p for p in extra if p not in ("k", "v")]
        if bad or len(set(extra)) != len(extra):
            raise ValueError(f"extra_projections must be a subset of ('k', 'v') without repeats, got {extra}")
        if tune not in TUNE_MODES:
            raise ValueError(f"tune must be one of {TUNE_MODES}, got {tune!r}")
        if tune == "clip" and extra:
            raise ValueError(
                f"tune='clip' takes no extra_projections (the mask path has its own CLIP copy), got {extra}"
            )
        if fq_init == "random" and "q" not in tune:
            raise ValueError(f"fq_init='random' needs a tune mode that trains f_Q' (q, qk, qkv), got tune={tune!r}")

        blocks = visual.transformer.resblocks
        heads = {int(blk.attn.num_heads) for blk in blocks}
        if len(heads) != 1:
            raise _unsupported(f"blocks with different head counts {sorted(heads)}")
        block_heads = heads.pop()
        if num_heads is not None and num_heads != block_heads:
            raise ValueError(f"num_heads={num_heads} disagrees with the tower's blocks ({block_heads} heads)")

        self.visual = visual
        self.visual.requires_grad_(False)
        self.num_heads: int = block_heads
        self.fq_init: str = fq_init
        self.tune: str = tune
        implied = set(extra) | ({p for p in ("k", "v") if p in tune} if tune != "clip" else set())
        self.extra_projections: tuple[str, ...] = tuple(p for p in ("k", "v") if p in implied)
        extra = self.extra_projections

        ref = visual.class_embedding
        width = ref.shape[-1]
        self.mask_pos_embed = nn.Parameter(visual.positional_embedding.detach()[0].clone())
        self.q_proj_new = self._new_projections(width, ref)
        self.k_proj_new: nn.ModuleList | None = self._new_projections(width, ref) if "k" in extra else None
        self.v_proj_new: nn.ModuleList | None = self._new_projections(width, ref) if "v" in extra else None
        if fq_init == "copy":
            self.reset_projections_from_clip(("q",))
        self.reset_projections_from_clip(self.extra_projections)

        # tune="clip": the mask path's own trainable copy of every CLIP weight it uses (image path stays frozen)
        self.mask_blocks: nn.ModuleList | None = None
        self.mask_ln_pre: nn.Module | None = None
        self.mask_ln_post: nn.Module | None = None
        self.mask_proj: nn.Parameter | None = None
        if tune == "clip":
            self.mask_blocks = nn.ModuleList(copy.deepcopy(blk) for blk in blocks)
            self.mask_ln_pre = copy.deepcopy(visual.ln_pre)
            self.mask_ln_post = copy.deepcopy(visual.ln_post)
            self.mask_proj = nn.Parameter(visual.proj.detach().clone())
            for mod in (self.mask_blocks, self.mask_ln_pre, self.mask_ln_post):
                mod.requires_grad_(True)

        self.trainable_projections: tuple[str, ...] = (("q",) if "q" in tune else ()) + self.extra_projections
        if "q" not in self.trainable_projections:
            self.q_proj_new.requires_grad_(False)  # a frozen copy of CLIP's f_Q

        mean = getattr(visual, "image_mean", None)
        std = getattr(visual, "image_std", None)
        self.image_mean: tuple[float, ...] = tuple(float(m) for m in mean) if mean is not None else OPENAI_CLIP_MEAN
        self.image_std: tuple[float, ...] = tuple(float(s) for s in std) if std is not None else OPENAI_CLIP_STD

    def _new_projections(self, width: int, ref: Tensor) -> nn.ModuleList:
        n = len(self.visual.transformer.resblocks)
        return nn.ModuleList(nn.Linear(width, width, bias=True, device=ref.device, dtype=ref.dtype) for _ in range(n))

    @torch.no_grad()
    def reset_projections_from_clip(self, which: Iterable[str] = ("q",)) -> None:
        """Copy CLIP's own frozen projections into the new ones: ``"q"`` -> f_Q', ``"k"`` -> K', ``"v"`` -> V'.

        The rows of block i's packed ``in_proj_weight`` ``(3W, W)`` / ``in_proj_bias`` ``(3W,)`` are q, k, v in
        that order.
        """
        width = self.width
        for name in which:
            if name not in _PROJ_NAMES:
                raise ValueError(f"unknown projection {name!r} (expected 'q', 'k' or 'v')")
            mods = getattr(self, f"{name}_proj_new")
            if mods is None:
                raise ValueError(f"no {name.upper()}' projections (enable them with extra_projections)")
            r = _PROJ_NAMES.index(name)
            for blk, lin in zip(self.visual.transformer.resblocks, mods, strict=True):
                lin.weight.copy_(blk.attn.in_proj_weight[r * width : (r + 1) * width])
                lin.bias.copy_(blk.attn.in_proj_bias[r * width : (r + 1) * width])

    # ------------------------------------------------------------------ geometry
    @property
    def image_size(self) -> int:
        """Input resolution R of the tower (square)."""
        return int(self.visual.image_size[0])

    @property
    def patch_size(self) -> int:
        """Patch size P (square)."""
        return int(self.visual.patch_size[0])

    @property
    def grid_size(self) -> int:
        """Patch grid side G = R // P."""
        return int(self.visual.grid_size[0])

    @property
    def num_tokens(self) -> int:
        """Number of CLIP tokens N = 1 + G*G (CLS + patches)."""
        return 1 + self.grid_size * self.grid_size

    @property
    def width(self) -> int:
        """Transformer width W."""
        return int(self.visual.class_embedding.shape[-1])

    @property
    def output_dim(self) -> int:
        """Embedding dimension D (columns of ``proj``)."""
        return int(self.visual.proj.shape[1])

    @property
    def num_layers(self) -> int:
        """Number of residual blocks."""
        return len(self.visual.transformer.resblocks)

    @property
    def head_dim(self) -> int:
        """W // heads."""
        return self.width // self.num_heads

    def trainable_parameters(self) -> list[nn.Parameter]:
        """The parameters MasQ-Tuning trains in this ``tune`` mode (exactly those with ``requires_grad``): the
        trainable new projections (f_Q' in ``"q"`` mode, plus K'/V' if present), the mask path's CLIP copy in
        ``"clip"`` mode, and ``mask_pos_embed``."""
        params: list[nn.Parameter] = []
        for name in self.trainable_projections:
            params.extend(getattr(self, f"{name}_proj_new").parameters())
        if self.mask_blocks is not None:
            for mod in (self.mask_blocks, self.mask_ln_pre, self.mask_ln_post):
                params.extend(mod.parameters())
            params.append(self.mask_proj)
        params.append(self.mask_pos_embed)
        return params

    @torch.no_grad()
    def reset_mask_path_from_clip(self) -> None:
        """``tune="clip"``: copy the frozen CLIP weights into the mask path's own copy (blocks, ``ln_pre``,
        ``ln_post``, ``proj``). A no-op in the other modes."""
        if self.mask_blocks is None:
            return
        v = self.visual
        for blk, cp in zip(v.transformer.resblocks, self.mask_blocks, strict=True):
            cp.load_state_dict(blk.state_dict())
        self.mask_ln_pre.load_state_dict(v.ln_pre.state_dict())
        self.mask_ln_post.load_state_dict(v.ln_post.state_dict())
        self.mask_proj.copy_(v.proj)

    # ------------------------------------------------------------------ inputs
    def preprocess(self, images_padded: Tensor) -> Tensor:
        """Turn zero-padded raw images into CLIP pixel input.

        ``/255``, bicubic resize ("squash", no aspect preservation, padding included) to ``R x R`` with
        ``align_corners=False``, no antialias and no clamping, then ``(x - mean) / std`` with the tower's
        ``image_mean``/``image_std`` (OpenAI CLIP values when open_clip did not set them).

        Args:
            images_padded: ``(B, 3, Hp, Wp)`` uint8, or float on the 0..255 scale; RGB; already zero-padded to the
                proposal network's padded size (see :func:`pad_to_multiple`).

        Returns:
            ``(B, 3, R, R)`` float32.
        """
        if images_padded.ndim != 4 or images_padded.shape[1] != 3:
            raise ValueError(f"preprocess expects (B,3,H,W) images, got shape {tuple(images_padded.shape)}")
        x = images_padded.to(torch.float32) / 255.0
        r = self.image_size
        x = F.interpolate(x, size=(r, r), mode="bicubic", align_corners=False, antialias=False)
        mean = torch.tensor(self.image_mean, dtype=torch.float32, device=x.device).view(1, 3, 1, 1)
        std = torch.tensor(self.image_std, dtype=torch.float32, device=x.device).view(1, 3, 1, 1)
        return (x - mean) / std

    def attention_masks(self, mask_logits: Tensor) -> Tensor:
        """Per-proposal attention masks for the mask tokens, True = ALLOWED.

        Bilinear upsampling of the logits to ``R x R`` (``align_corners=False``), max-pool with kernel = stride =
        P, ``> 0`` (a patch is in if any of its pixels is), flattened row-major, and an always-True CLS column
        prepended. Computed in float32 (or float64 if given).

        Args:
            mask_logits: ``(B, Q, h, w)`` proposal mask logits (any resolution, typically padded size / 4).

        Returns:
            ``(B, Q, 1 + G*G)`` bool.
        """
        if mask_logits.ndim != 4:
            raise ValueError(f"attention_masks expects (B,Q,h,w) logits, got shape {tuple(mask_logits.shape)}")
        b, q = mask_logits.shape[:2]
        if q == 0 or b == 0:
            return torch.ones(b, q, self.num_tokens, dtype=torch.bool, device=mask_logits.device)
        m = mask_logits if mask_logits.dtype == torch.float64 else mask_logits.to(torch.float32)
        r, p = self.image_size, self.patch_size
        m = F.interpolate(m, size=(r, r), mode="bilinear", align_corners=False)
        m = F.max_pool2d(m, kernel_size=p, stride=p)
        patches = (m > 0).flatten(2)
        cls = torch.ones(b, q, 1, dtype=torch.bool, device=m.device)
        return torch.cat([cls, patches], dim=2)

    # ------------------------------------------------------------------ forward
    def forward(self, pixel_values: Tensor, allowed: Tensor, return_tokens: bool = False) -> Tensor | MasQVisualOutput:
        """Mask embeddings, one per proposal.

        Args:
            pixel_values: ``(B, 3, R, R)`` CLIP input (:meth:`preprocess`); cast to the module's dtype.
            allowed: ``(B, Q, 1 + G*G)`` bool, True = mask token q may attend to that CLIP token (see
                :meth:`attention_masks`); column 0 (CLS) is always treated as allowed. Q may be 0.
            return_tokens: also return the intermediates (:class:`MasQVisualOutput`).

        Returns:
            ``(B, Q, D)`` L2-normalised embeddings in the module's dtype, or a :class:`MasQVisualOutput`.
        """
        allowed = self._check_allowed(pixel_values, allowed)
        return self._run(pixel_values, allowed, collect=return_tokens)

    def encode_image(self, pixel_values: Tensor) -> Tensor:
        """The image path alone: ``(B, 3, R, R)`` -> ``(B, D)``, equal to open_clip's ``visual(pixel_values)``
        (un-normalised). Same block code as :meth:`forward` with Q = 0."""
        allowed = torch.ones(pixel_values.shape[0], 0, self.num_tokens, dtype=torch.bool, device=pixel_values.device)
        out = self._run(pixel_values, allowed, collect=True)
        return out.image_embedding

    def attention_weights(self, pixel_values: Tensor, allowed: Tensor) -> list[Tensor]:
        """The mask tokens' attention probabilities in every block (explicit softmax, for tests/diagnostics).

        Args:
            pixel_values: ``(B, 3, R, R)``.
            allowed: ``(B, Q, 1 + G*G)`` bool.

        Returns:
            one float32 tensor ``(B, heads, Q, 1 + G*G)`` per block; disallowed entries are exactly 0.
        """
        allowed = self._check_allowed(pixel_values, allowed)
        weights: list[Tensor] = []
        self._run(pixel_values, allowed, collect=False, weights=weights)
        return weights

    def _check_allowed(self, pixel_values: Tensor, allowed: Tensor) -> Tensor:
        r = self.image_size
        if pixel_values.ndim != 4 or tuple(pixel_values.shape[1:]) != (3, r, r):
            raise ValueError(f"pixel_values must be (B,3,{r},{r}), got {tuple(pixel_values.shape)}")
        if allowed.dtype != torch.bool:
            raise ValueError(f"allowed must be a bool tensor (True = allowed), got {allowed.dtype}")
        b = pixel_values.shape[0]
        if allowed.ndim != 3 or allowed.shape[0] != b or allowed.shape[2] != self.num_tokens:
            raise ValueError(f"allowed must be (B={b}, Q, {self.num_tokens}), got {tuple(allowed.shape)}")
        if allowed.shape[1] > 0:
            allowed = allowed.clone()
            allowed[..., 0] = True  # CLS always allowed: no empty softmax row
        return allowed

    def _run(
        self, pixel_values: Tensor, allowed: Tensor, collect: bool, weights: list[Tensor] | None = None
    ) -> Tensor | MasQVisualOutput:
        v = self.visual
        dtype = v.conv1.weight.dtype
        b, q = allowed.shape[:2]
        w = self.width

        x = v.conv1(pixel_values.to(dtype))  # (B, W, G, G)
        x = x.reshape(b, w, -1).permute(0, 2, 1)  # (B, G*G, W), row-major patches
        cls = v.class_embedding.to(dtype).view(1, 1, w).expand(b, 1, w)
        img = torch.cat([cls, x], dim=1) + v.positional_embedding.to(dtype)  # (B, N, W)
        mask_tok = (v.class_embedding.to(dtype) + self.mask_pos_embed.to(dtype)).view(1, 1, w).expand(b, q, w)
        x = torch.cat([mask_tok, img], dim=1)  # (B, Q+N, W)
        before = x
        if self.mask_ln_pre is None:
            x = v.ln_pre(x)
        else:
            x = torch.cat([self.mask_ln_pre(x[:, :q]), v.ln_pre(x[:, q:])], dim=1)
        after_pre = x

        # the mask tokens' additive float mask, made once for every block (the explicit-softmax path reads `allowed`)
        bias = attention_bias(allowed[:, None], dtype) if q > 0 and weights is None else None  # (B, 1, Q, N)
        blocks_out: list[Tensor] = []
        for i, blk in enumerate(v.transformer.resblocks):
            x = self._block(i, blk, x, allowed, weights, bias)
            if collect:
                blocks_out.append(x)

        if self.mask_blocks is None:
            mask_out = v.ln_post(x[:, :q]) @ v.proj  # (B, Q, D)
        else:
            mask_out = self.mask_ln_post(x[:, :q]) @ self.mask_proj.to(dtype)
        emb = F.normalize(mask_out, dim=-1)
        if not collect:
            return emb
        image_embedding = v.ln_post(x[:, q]) @ v.proj  # (B, D)
        return MasQVisualOutput(emb, mask_out, image_embedding, before, after_pre, blocks_out)

    def _block(
        self,
        i: int,
        blk: ResidualAttentionBlock,
        x: Tensor,
        allowed: Tensor,
        weights: list[Tensor] | None,
        bias: Tensor | None = None,
    ) -> Tensor:
        """One residual block on ``x`` ``(B, Q+N, W)`` = [mask tokens, image tokens]; ``bias`` ``(B, 1, Q, N)`` is
        :func:`attention_bias` of ``allowed`` (made once per forward)."""
        if self.mask_blocks is not None:
            return self._block_clip_copy(i, blk, x, allowed, weights, bias)
        b, q = allowed.shape[:2]
        heads, hd, w = self.num_heads, self.head_dim, self.width
        attn = blk.attn
        h = blk.ln_1(x)
        h_mask, h_img = h[:, :q], h[:, q:]
        n = h_img.shape[1]

        qkv = F.linear(h_img, attn.in_proj_weight, attn.in_proj_bias)  # (B, N, 3W)
        q_img, k_img, v_img = qkv.view(b, n, 3, heads, hd).permute(2, 0, 3, 1, 4).unbind(0)  # (B, H, N, hd)
        o_img = F.scaled_dot_product_attention(q_img, k_img, v_img)  # (B, H, N, hd)

        if q > 0:
            q_m = self.q_proj_new[i](h_mask).view(b, q, heads, hd).transpose(1, 2)  # (B, H, Q, hd)
            k_m = k_img if self.k_proj_new is None else self._split(self.k_proj_new[i](h_img))
            v_m = v_img if self.v_proj_new is None else self._split(self.v_proj_new[i](h_img))
            o_mask = self._mask_attention(q_m, k_m, v_m, allowed, weights, bias)
            o = torch.cat([o_mask, o_img], dim=2)  # (B, H, Q+N, hd)
        else:
            o = o_img
        o = o.transpose(1, 2).reshape(b, q + n, w)
        o = attn.out_proj(o)
        x = x + blk.ls_1(o)
        x = x + blk.ls_2(blk.mlp(blk.ln_2(x)))
        return x

    def _mask_attention(
        self,
        q_m: Tensor,
        k_m: Tensor,
        v_m: Tensor,
        allowed: Tensor,
        weights: list[Tensor] | None,
        bias: Tensor | None = None,
    ) -> Tensor:
        """Masked attention of the mask tokens ``(B, H, Q, hd)`` over image keys/values ``(B, H, N, hd)``: SDPA with
        the additive float mask ``bias`` ``(B, 1, Q, N)`` (made here from ``allowed`` when None; every row has CLS
        allowed, so no row is empty), or with ``weights`` the explicit float32 softmax, recorded."""
        mask = allowed[:, None]  # (B, 1, Q, N), broadcast over heads
        if weights is None:
            if bias is None or bias.dtype != q_m.dtype:
                bias = attention_bias(mask, q_m.dtype)
            return F.scaled_dot_product_attention(q_m, k_m, v_m, attn_mask=bias)
        scores = (q_m.float() @ k_m.float().transpose(-1, -2)) * (self.head_dim**-0.5)  # (B, H, Q, N)
        probs = scores.masked_fill(~mask, float("-inf")).softmax(dim=-1)
        weights.append(probs)
        return (probs @ v_m.float()).to(v_m.dtype)

    def _block_clip_copy(
        self,
        i: int,
        blk: ResidualAttentionBlock,
        x: Tensor,
        allowed: Tensor,
        weights: list[Tensor] | None,
        bias: Tensor | None = None,
    ) -> Tensor:
        """``tune="clip"``: image tokens through the frozen ``blk``, mask tokens through ``mask_blocks[i]``."""
        b, q = allowed.shape[:2]
        w = self.width
        x_mask, x_img = x[:, :q], x[:, q:]
        n = x_img.shape[1]
        attn = blk.attn
        qkv = F.linear(blk.ln_1(x_img), attn.in_proj_weight, attn.in_proj_bias)  # (B, N, 3W)
        q_img, k_img, v_img = qkv.view(b, n, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
        o_img = F.scaled_dot_product_attention(q_img, k_img, v_img).transpose(1, 2).reshape(b, n, w)
        new_img = x_img + blk.ls_1(attn.out_proj(o_img))
        new_img = new_img + blk.ls_2(blk.mlp(blk.ln_2(new_img)))
        if q == 0:
            return new_img

        cp = self.mask_blocks[i]
        wi, bi = cp.attn.in_proj_weight, cp.attn.in_proj_bias
        q_m = self._split(F.linear(cp.ln_1(x_mask), wi[:w], bi[:w]))  # (B, H, Q, hd)
        kv_m = F.linear(cp.ln_1(x_img), wi[w:], bi[w:])  # (B, N, 2W): copied k, v of the image tokens
        k_m, v_m = self._split(kv_m[..., :w]), self._split(kv_m[..., w:])
        o_mask = self._mask_attention(q_m, k_m, v_m, allowed, weights, bias)
        o_mask = o_mask.transpose(1, 2).reshape(b, q, w)
        x_mask = x_mask + cp.ls_1(cp.attn.out_proj(o_mask))
        x_mask = x_mask + cp.ls_2(cp.mlp(cp.ln_2(x_mask)))
        return torch.cat([x_mask, new_img], dim=1)

    def _split(self, t: Tensor) -> Tensor:
        b, n, _ = t.shape
        return t.view(b, n, self.num_heads, self.head_dim).transpose(1, 2)

    # ------------------------------------------------------------------ weights
    @torch.no_grad()
    def load_official_state_dict(self, state_dict: Mapping[str, Tensor], prefix: str = "masqclip.") -> None:
        """Load the official MasQCLIP CLIP-branch weights (strict within ``prefix``).

        Keys (after ``prefix``): ``visual.<OpenAI/open_clip names>`` -> ``self.visual``;
        ``visual.transformer.resblocks.{i}.attn.new_q_proj.{weight,bias}`` -> ``q_proj_new[i]``;
        ``mask_embeddings`` -> ``mask_pos_embed`` (loaded as saved, independent of ``positional_embedding[0]``).
        Optional ``...attn.new_k_proj.*`` / ``new_v_proj.*`` load K'/V' when those exist; K'/V' whose keys are absent
        are re-copied from the newly loaded CLIP k/v. In ``tune`` modes that do not train f_Q' (``"k"``, ``"v"``,
        ``"clip"``) ``new_q_proj`` is optional in the same way (absent: re-copied from CLIP's f_Q). In ``"clip"`` mode
        the mask path's CLIP copy is re-copied from the loaded CLIP. Keys outside ``prefix`` are ignored.

        Raises:
            ValueError: missing or unexpected keys within ``prefix``, or shape mismatches (the first few are named).
        """
        targets: dict[str, Tensor] = {f"visual.{k}": t for k, t in self.visual.state_dict(keep_vars=True).items()}
        targets["mask_embeddings"] = self.mask_pos_embed
        optional: dict[str, Tensor] = {}
        for name in _PROJ_NAMES:
            mods = getattr(self, f"{name}_proj_new")
            if mods is None:
                continue
            for i, lin in enumerate(mods):
                for pname in ("weight", "bias"):
                    key = f"visual.transformer.resblocks.{i}.attn.new_{name}_proj.{pname}"
                    required = name == "q" and "q" in self.trainable_projections
                    (targets if required else optional)[key] = getattr(lin, pname)

        given = {k[len(prefix) :]: t for k, t in state_dict.items() if k.startswith(prefix)}
        missing = [prefix + k for k in targets if k not in given]
        unexpected = [prefix + k for k in given if k not in targets and k not in optional]
        mismatched = [
            f"{prefix}{k}: {tuple(given[k].shape)} vs {tuple(t.shape)}"
            for k, t in {**targets, **optional}.items()
            if k in given and tuple(given[k].shape) != tuple(t.shape)
        ]
        problems = []
        for label, items in (("missing", missing), ("unexpected", unexpected), ("shape mismatch", mismatched)):
            if items:
                shown = ", ".join(items[:5]) + (f", ... ({len(items)} in all)" if len(items) > 5 else "")
                problems.append(f"{label}: {shown}")
        if problems:
            raise ValueError("cannot load MasQ CLIP weights: " + "; ".join(problems))

        for k, t in targets.items():
            t.copy_(given[k])
        refresh = []
        for k, t in optional.items():
            if k in given:
                t.copy_(given[k])
            else:
                refresh.append(k.split(".attn.new_")[1][0])
        self.reset_projections_from_clip(sorted(set(refresh)))
        self.reset_mask_path_from_clip()


def create_masq_visual(
    clip_model: str | dict[str, Any],
    pretrained: str | Path | None = None,
    fq_init: Literal["copy", "random"] = "copy",
    **kwargs: Any,
) -> MasQVisual:
    """Create an open_clip model (name or config dict; pretrained tag, local weights file or None for random init)
    and wrap its vision tower in a :class:`MasQVisual` (eval mode). The text tower is dropped; extra keyword
    arguments go to :class:`MasQVisual` (``num_heads``, ``extra_projections``, ``tune``)."""
    clip, _spec = create_open_clip(clip_model, pretrained)
    return MasQVisual(clip.visual, fq_init=fq_init, **kwargs).eval()
