"""Class-agnostic multi-scale masked-attention transformer decoder (Mask2Former style).

Written from the facts in ``shared/design/METHOD.md`` §1.1 and ``shared/golden/README.md`` §1 ("Transformer
decoder"); parameter names equal the official ``sem_seg_head.predictor.*`` keys with that prefix removed, so an
official state_dict loads one-to-one.

Data flow (``B`` images, ``Q`` queries, hidden width ``C``, ``L`` feature levels, usually 3 at strides 32/16/8)::

    memory_l = input_proj_l(x_l).flatten + level_embed[l]         (B, h_l*w_l, C), keys also get a sine pos. emb.
    tgt      = query_feat                                         (B, Q, C), positional embedding query_embed
    pred_0   = heads(tgt)          -> attention mask for level 0
    for i in 0 .. dec_layers-2:                                   layer i reads level i % L
        tgt = FFN(SelfAttn(MaskedCrossAttn(tgt, memory_{i % L}, mask_i)))
        pred_{i+1} = heads(tgt)    -> attention mask for level (i+1) % L

    heads(tgt): d = decoder_norm(tgt); logits = class_embed(d) (B, Q, 2); masks = einsum(mask_embed(d), mask_features)

The attention mask is the previous mask logits bilinearly resized (align_corners=False) to the level's size;
``sigmoid < 0.5`` is blocked (True), and a query row whose every position is blocked is unblocked entirely.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = [
    "MLP",
    "CrossAttentionLayer",
    "FFNLayer",
    "MaskedAttentionDecoder",
    "SelfAttentionLayer",
    "attention_mask_from_logits",
    "sine_position_embedding",
]


def sine_position_embedding(
    height: int,
    width: int,
    num_pos_feats: int,
    temperature: float = 10000.0,
    normalize: bool = True,
    scale: float = 2 * math.pi,
    device: torch.device | str | None = None,
    dtype: torch.dtype = torch.float32,
) -> Tensor:
    """DETR's sine position embedding for an unpadded ``height x width`` map (no padding mask).

    Coordinates are the 1-based cumulative counts ``y = 1..H``, ``x = 1..W``; with ``normalize`` they become
    ``y / (H + 1e-6) * scale`` (likewise x). Channel ``2k`` is ``sin(coord / T^(2k/F))``, ``2k+1`` is
    ``cos(coord / T^(2k/F))`` with ``F = num_pos_feats``; the y part comes first, then the x part.

    Returns:
        ``(2 * num_pos_feats, height, width)`` tensor of ``dtype`` (computed in float32).
    """
    y_embed = torch.arange(1, height + 1, dtype=torch.float32, device=device)
    x_embed = torch.arange(1, width + 1, dtype=torch.float32, device=device)
    if normalize:
        eps = 1e-6
        y_embed = y_embed / (y_embed[-1:] + eps) * scale
        x_embed = x_embed / (x_embed[-1:] + eps) * scale
    dim_t = torch.arange(num_pos_feats, dtype=torch.float32, device=device)
    dim_t = temperature ** (2 * torch.div(dim_t, 2, rounding_mode="floor") / num_pos_feats)
    pos_y = y_embed[:, None] / dim_t  # (H, F)
    pos_x = x_embed[:, None] / dim_t  # (W, F)
    pos_y = torch.stack((pos_y[:, 0::2].sin(), pos_y[:, 1::2].cos()), dim=2).flatten(1)
    pos_x = torch.stack((pos_x[:, 0::2].sin(), pos_x[:, 1::2].cos()), dim=2).flatten(1)
    shape = (height, width, num_pos_feats)
    pos = torch.cat((pos_y[:, None, :].expand(shape), pos_x[None, :, :].expand(shape)), dim=2)
    return pos.permute(2, 0, 1).contiguous().to(dtype)


def attention_mask_from_logits(mask_logits: Tensor, size: tuple[int, int], num_heads: int) -> Tensor:
    """Masked-attention mask for the next decoder layer.

    Args:
        mask_logits: ``(B, Q, H, W)`` mask logits of the previous prediction.
        size: ``(h, w)`` of the feature level the next layer attends to.
        num_heads: attention heads (the mask is repeated per head).

    Returns:
        bool ``(B * num_heads, Q, h * w)``, True = blocked (``sigmoid(resized logit) < 0.5``), index ``b * heads +
        head``. Rows that would be entirely blocked are all False (the query attends everywhere).
    """
    resized = F.interpolate(mask_logits, size=size, mode="bilinear", align_corners=False)
    blocked = resized.sigmoid().flatten(2) < 0.5  # (B, Q, h*w)
    blocked = blocked & ~blocked.all(dim=-1, keepdim=True)
    return blocked.repeat_interleave(num_heads, dim=0).detach()


class CrossAttentionLayer(nn.Module):
    """Masked cross-attention + residual + LayerNorm (post-norm by default; ``pre_norm`` normalises first).

    Names: ``multihead_attn`` (nn.MultiheadAttention, ``in_proj_weight`` packs q, k, v by rows), ``norm``.
    """

    def __init__(self, d_model: int, nhead: int, pre_norm: bool = False) -> None:
        super().__init__()
        self.multihead_attn = nn.MultiheadAttention(d_model, nhead, dropout=0.0, batch_first=True)
        self.norm = nn.LayerNorm(d_model)
        self.pre_norm = pre_norm
        _xavier_(self)

    def forward(
        self, tgt: Tensor, memory: Tensor, attn_mask: Tensor | None, pos: Tensor | None, query_pos: Tensor | None
    ) -> Tensor:
        """``tgt`` (B, Q, C), ``memory`` (B, S, C), ``attn_mask`` bool (B*heads, Q, S) True = blocked or None,
        ``pos`` (B or 1, S, C) added to keys only, ``query_pos`` (B or 1, Q, C) added to queries. Returns (B, Q, C)."""
        q_in = self.norm(tgt) if self.pre_norm else tgt
        q = q_in if query_pos is None else q_in + query_pos
        k = memory if pos is None else memory + pos
        out = self.multihead_attn(q, k, memory, attn_mask=attn_mask, need_weights=False)[0]
        tgt = tgt + out
        return tgt if self.pre_norm else self.norm(tgt)


class SelfAttentionLayer(nn.Module):
    """Self-attention among queries (``query_pos`` added to q and k, not v) + residual + LayerNorm.

    Names: ``self_attn`` (nn.MultiheadAttention), ``norm``.
    """

    def __init__(self, d_model: int, nhead: int, pre_norm: bool = False) -> None:
        super().__init__()
        self.self_attn = nn.MultiheadAttention(d_model, nhead, dropout=0.0, batch_first=True)
        self.norm = nn.LayerNorm(d_model)
        self.pre_norm = pre_norm
        _xavier_(self)

    def forward(self, tgt: Tensor, query_pos: Tensor | None) -> Tensor:
        """``tgt`` (B, Q, C), ``query_pos`` (B or 1, Q, C) or None. Returns (B, Q, C)."""
        x = self.norm(tgt) if self.pre_norm else tgt
        qk = x if query_pos is None else x + query_pos
        out = self.self_attn(qk, qk, x, need_weights=False)[0]
        tgt = tgt + out
        return tgt if self.pre_norm else self.norm(tgt)


class FFNLayer(nn.Module):
    """``linear2(relu(linear1(x)))`` + residual + LayerNorm. Names: ``linear1``, ``linear2``, ``norm``."""

    def __init__(self, d_model: int, dim_feedforward: int, pre_norm: bool = False) -> None:
        super().__init__()
        self.linear1 = nn.Linear(d_model, dim_feedforward)
        self.linear2 = nn.Linear(dim_feedforward, d_model)
        self.norm = nn.LayerNorm(d_model)
        self.pre_norm = pre_norm
        _xavier_(self)

    def forward(self, tgt: Tensor) -> Tensor:
        """``tgt`` (B, Q, C) -> (B, Q, C)."""
        x = self.norm(tgt) if self.pre_norm else tgt
        tgt = tgt + self.linear2(F.relu(self.linear1(x)))
        return tgt if self.pre_norm else self.norm(tgt)


class MLP(nn.Module):
    """``num_layers`` Linear layers (``layers.{i}``) with ReLU between them (none after the last)."""

    def __init__(self, input_dim: int, hidden_dim: int, output_dim: int, num_layers: int) -> None:
        super().__init__()
        dims_in = [input_dim] + [hidden_dim] * (num_layers - 1)
        dims_out = [hidden_dim] * (num_layers - 1) + [output_dim]
        self.layers = nn.ModuleList(nn.Linear(a, b) for a, b in zip(dims_in, dims_out))

    def forward(self, x: Tensor) -> Tensor:
        """``x`` (..., input_dim) -> (..., output_dim)."""
        last = len(self.layers) - 1
        for i, layer in enumerate(self.layers):
            x = layer(x)
            if i < last:
                x = F.relu(x)
        return x


def _xavier_(module: nn.Module) -> None:
    for p in module.parameters():
        if p.dim() > 1:
            nn.init.xavier_uniform_(p)


class MaskedAttentionDecoder(nn.Module):
    """Mask2Former's multi-scale masked-attention transformer decoder with a binary (object / no-object) class head.

    Args:
        in_channels: channels of the multi-scale pixel-decoder maps (the pixel decoder's ``conv_dim``).
        hidden_dim: transformer width ``C``.
        num_queries: ``Q``.
        heads: attention heads.
        ffn_dim: FFN hidden width.
        dec_layers: number of predictions = decoder layers + 1 (the prediction on the raw queries counts), so
            ``dec_layers - 1`` decoder layers (official 10 -> 9).
        mask_dim: channels of ``mask_features`` (output width of ``mask_embed``).
        pre_norm: pre-norm layers (official: False, post-norm).
        num_feature_levels: levels cycled through by the layers (layer ``i`` reads level ``i % num_feature_levels``).
        enforce_input_proj: use a 1x1 conv ``input_proj.{l}`` even when ``in_channels == hidden_dim``.
        num_classes: kept for reference only; the class head is always ``Linear(hidden_dim, 2)`` (0 = object,
            1 = no-object), as in MasQCLIP.
    """

    def __init__(
        self,
        in_channels: int = 256,
        hidden_dim: int = 256,
        num_queries: int = 100,
        heads: int = 8,
        ffn_dim: int = 2048,
        dec_layers: int = 10,
        mask_dim: int = 256,
        pre_norm: bool = False,
        num_feature_levels: int = 3,
        enforce_input_proj: bool = False,
        num_classes: int = 1,
    ) -> None:
        super().__init__()
        if dec_layers < 1:
            raise ValueError(f"dec_layers must be >= 1, got {dec_layers}")
        if hidden_dim % 2 or hidden_dim % heads:
            raise ValueError(f"hidden_dim {hidden_dim} must be even and divisible by heads {heads}")
        self.hidden_dim = hidden_dim
        self.num_queries = num_queries
        self.num_heads = heads
        self.dec_layers = dec_layers
        self.num_layers = dec_layers - 1
        self.mask_dim = mask_dim
        self.num_feature_levels = num_feature_levels
        self.num_classes = num_classes

        self.transformer_self_attention_layers = nn.ModuleList(
            SelfAttentionLayer(hidden_dim, heads, pre_norm) for _ in range(self.num_layers)
        )
        self.transformer_cross_attention_layers = nn.ModuleList(
            CrossAttentionLayer(hidden_dim, heads, pre_norm) for _ in range(self.num_layers)
        )
        self.transformer_ffn_layers = nn.ModuleList(
            FFNLayer(hidden_dim, ffn_dim, pre_norm) for _ in range(self.num_layers)
        )
        self.decoder_norm = nn.LayerNorm(hidden_dim)
        self.query_feat = nn.Embedding(num_queries, hidden_dim)
        self.query_embed = nn.Embedding(num_queries, hidden_dim)
        self.level_embed = nn.Embedding(num_feature_levels, hidden_dim)
        self.input_proj = nn.ModuleList()
        for _ in range(num_feature_levels):
            if in_channels != hidden_dim or enforce_input_proj:
                conv = nn.Conv2d(in_channels, hidden_dim, kernel_size=1)
                nn.init.kaiming_uniform_(conv.weight, a=1)
                nn.init.zeros_(conv.bias)
                self.input_proj.append(conv)
            else:
                self.input_proj.append(nn.Sequential())
        self.class_embed = nn.Linear(hidden_dim, 2)
        self.mask_embed = MLP(hidden_dim, hidden_dim, mask_dim, 3)

    # ------------------------------------------------------------------------------------------------ helpers
    def prediction_heads(self, output: Tensor, mask_features: Tensor) -> tuple[Tensor, Tensor]:
        """``output`` (B, Q, C), ``mask_features`` (B, mask_dim, H, W) -> (logits (B, Q, 2), masks (B, Q, H, W)).

        ``decoder_norm`` first; masks are logits ``einsum("bqc,bchw->bqhw", mask_embed(.), mask_features)``."""
        decoded = self.decoder_norm(output)
        logits = self.class_embed(decoded)
        masks = torch.einsum("bqc,bchw->bqhw", self.mask_embed(decoded), mask_features)
        return logits, masks

    def _memory(self, multi_scale: list[Tensor]) -> tuple[list[Tensor], list[Tensor], list[tuple[int, int]]]:
        srcs, poss, sizes = [], [], []
        for level in range(self.num_feature_levels):
            x = multi_scale[level]
            h, w = int(x.shape[-2]), int(x.shape[-1])
            sizes.append((h, w))
            pos = sine_position_embedding(h, w, self.hidden_dim // 2, device=x.device, dtype=x.dtype)
            poss.append(pos.flatten(1).transpose(0, 1).unsqueeze(0))  # (1, hw, C)
            src = self.input_proj[level](x).flatten(2).transpose(1, 2)  # (B, hw, C)
            srcs.append(src + self.level_embed.weight[level].to(src.dtype)[None, None, :])
        return srcs, poss, sizes

    # ------------------------------------------------------------------------------------------------ forward
    def forward(self, multi_scale: list[Tensor], mask_features: Tensor) -> dict:
        """Run the decoder.

        Args:
            multi_scale: ``num_feature_levels`` maps ``(B, in_channels, h_l, w_l)``, in the order the layers read
                them (official: strides 32, 16, 8).
            mask_features: ``(B, mask_dim, H/4, W/4)`` per-pixel embeddings.

        Returns:
            dict with ``pred_logits`` ``(B, Q, 2)`` and ``pred_masks`` ``(B, Q, H/4, W/4)`` (mask logits) of the last
            layer, and ``aux_outputs``: a list of ``dec_layers - 1`` dicts with the same keys, for the raw queries
            and then every decoder layer but the last.
        """
        if len(multi_scale) != self.num_feature_levels:
            raise ValueError(f"expected {self.num_feature_levels} feature levels, got {len(multi_scale)}")
        batch = mask_features.shape[0]
        srcs, poss, sizes = self._memory(multi_scale)
        query_pos = self.query_embed.weight.unsqueeze(0)  # (1, Q, C)
        output = self.query_feat.weight.unsqueeze(0).expand(batch, -1, -1)

        predictions: list[tuple[Tensor, Tensor]] = []
        logits, masks = self.prediction_heads(output, mask_features)
        predictions.append((logits, masks))
        for i in range(self.num_layers):
            level = i % self.num_feature_levels
            attn_mask = attention_mask_from_logits(masks, sizes[level], self.num_heads)
            output = self.transformer_cross_attention_layers[i](output, srcs[level], attn_mask, poss[level], query_pos)
            output = self.transformer_self_attention_layers[i](output, query_pos)
            output = self.transformer_ffn_layers[i](output)
            logits, masks = self.prediction_heads(output, mask_features)
            predictions.append((logits, masks))

        return {
            "pred_logits": predictions[-1][0],
            "pred_masks": predictions[-1][1],
            "aux_outputs": [{"pred_logits": lg, "pred_masks": mk} for lg, mk in predictions[:-1]],
        }
