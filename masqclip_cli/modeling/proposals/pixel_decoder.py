"""Mask2Former multi-scale deformable-attention pixel decoder, in plain PyTorch (no compiled ops).

Module and parameter names equal the official keys with the ``sem_seg_head.pixel_decoder.`` prefix removed:
``input_proj.{i}.{0,1}`` (reverse stride order: index 0 takes the coarsest level), ``transformer.level_embed``,
``transformer.encoder.layers.{i}.{self_attn,norm1,linear1,linear2,norm2}``, ``adapter_{k}`` / ``layer_{k}`` (FPN
steps, ``k = 1`` is the finest feature) and ``mask_features``.

The deformable sampling (:func:`ms_deform_attn_sample`) is the bilinear ``F.grid_sample`` formulation (zeros
outside the map, ``align_corners=False``), the same as the reference CPU path of the official code.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from masqclip_cli.modeling.proposals.backbone import ConvNorm2d

__all__ = [
    "MSDeformAttn",
    "MSDeformAttnEncoderLayer",
    "MSDeformAttnPixelDecoder",
    "MSDeformAttnTransformerEncoder",
    "PositionEmbeddingSine",
    "encoder_reference_points",
    "ms_deform_attn_sample",
]


# ---------------------------------------------------------------------------------------------------- sampling
def ms_deform_attn_sample(
    value: Tensor,
    spatial_shapes: Tensor,
    level_start_index: Tensor,
    sampling_locations: Tensor,
    attention_weights: Tensor,
) -> Tensor:
    """Multi-scale deformable attention core: weighted sum of bilinearly sampled values.

    Args:
        value: ``(B, S, heads, head_dim)``, the levels' maps flattened row-major and concatenated
            (``S = sum(H_l * W_l)``).
        spatial_shapes: ``(L, 2)`` long, ``(H_l, W_l)`` per level.
        level_start_index: ``(L,)`` long, offset of each level in ``S`` (only its consistency with
            ``spatial_shapes`` matters; the split uses ``spatial_shapes``).
        sampling_locations: ``(B, Lq, heads, L, P, 2)``, normalised ``(x, y)`` in [0, 1] (0 and 1 = the outer
            edges of the map; values outside sample zeros).
        attention_weights: ``(B, Lq, heads, L, P)``.

    Returns:
        ``(B, Lq, heads * head_dim)`` in ``value``'s dtype. Bilinear interpolation with zero padding and the
        ``align_corners=False`` pixel-centre convention; fp16/bf16 inputs are sampled in float32.
    """
    B, S, M, D = value.shape
    _, Lq, _, L, P, _ = sampling_locations.shape
    shapes = [(int(h), int(w)) for h, w in spatial_shapes.tolist()]
    if sum(h * w for h, w in shapes) != S:
        raise ValueError(f"spatial_shapes {shapes} do not add up to the value length {S}")
    if level_start_index.numel() != len(shapes) or len(shapes) != L:
        raise ValueError(f"{len(shapes)} spatial shapes, {level_start_index.numel()} starts, {L} sampled levels")
    out_dtype = value.dtype
    dtype = torch.float32 if value.dtype in (torch.float16, torch.bfloat16) else value.dtype
    value = value.to(dtype)
    # (B*M, L, P, Lq, 2): grid_sample then returns (B*M, D, P, Lq), reduced over P with contiguous Lq rows.
    grids = (2.0 * sampling_locations.to(dtype) - 1.0).permute(0, 2, 3, 4, 1, 5).reshape(B * M, L, P, Lq, 2)
    weights = attention_weights.to(dtype).permute(0, 2, 3, 4, 1).reshape(B * M, L, P, 1, Lq)
    out = value.new_zeros(B * M, D, Lq)
    for lvl, value_l in enumerate(value.split([h * w for h, w in shapes], dim=1)):
        h, w = shapes[lvl]
        value_l = value_l.permute(0, 2, 3, 1).reshape(B * M, D, h, w)
        sampled = F.grid_sample(value_l, grids[:, lvl], mode="bilinear", padding_mode="zeros", align_corners=False)
        for p in range(P):
            out.addcmul_(sampled[:, :, p], weights[:, lvl, p])
    out = out.view(B, M * D, Lq).transpose(1, 2).contiguous()
    return out.to(out_dtype)


class MSDeformAttn(nn.Module):
    """Multi-scale deformable attention (Deformable DETR), 2-d reference points.

    Args:
        d_model: channel width.
        n_levels: number of feature levels.
        n_heads: attention heads (``d_model % n_heads == 0``).
        n_points: sampling points per head and level.

    Submodules: ``sampling_offsets`` Linear(d, heads*levels*points*2) laid out (heads, levels, points, (x, y)),
    offsets divided by the level's (W, H); ``attention_weights`` Linear(d, heads*levels*points), softmax jointly
    over levels*points per head; ``value_proj``, ``output_proj`` Linear(d, d).
    """

    def __init__(self, d_model: int = 256, n_levels: int = 3, n_heads: int = 8, n_points: int = 4) -> None:
        super().__init__()
        if d_model % n_heads:
            raise ValueError(f"d_model {d_model} is not divisible by n_heads {n_heads}")
        self.d_model, self.n_levels, self.n_heads, self.n_points = d_model, n_levels, n_heads, n_points
        self.sampling_offsets = nn.Linear(d_model, n_heads * n_levels * n_points * 2)
        self.attention_weights = nn.Linear(d_model, n_heads * n_levels * n_points)
        self.value_proj = nn.Linear(d_model, d_model)
        self.output_proj = nn.Linear(d_model, d_model)
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """Deformable DETR init: zero offset weights with a per-head ring bias, uniform attention, xavier projs."""
        nn.init.zeros_(self.sampling_offsets.weight)
        thetas = torch.arange(self.n_heads, dtype=torch.float32) * (2.0 * math.pi / self.n_heads)
        grid = torch.stack([thetas.cos(), thetas.sin()], -1)
        grid = grid / grid.abs().max(-1, keepdim=True)[0]
        grid = grid.view(self.n_heads, 1, 1, 2).repeat(1, self.n_levels, self.n_points, 1)
        grid = grid * torch.arange(1, self.n_points + 1, dtype=torch.float32).view(1, 1, -1, 1)
        self.sampling_offsets.bias.copy_(grid.reshape(-1))
        nn.init.zeros_(self.attention_weights.weight)
        nn.init.zeros_(self.attention_weights.bias)
        for lin in (self.value_proj, self.output_proj):
            nn.init.xavier_uniform_(lin.weight)
            nn.init.zeros_(lin.bias)

    def forward(
        self,
        query: Tensor,
        reference_points: Tensor,
        input_flatten: Tensor,
        spatial_shapes: Tensor,
        level_start_index: Tensor,
    ) -> Tensor:
        """Attend from each query to ``n_points`` sampled positions per head and level.

        Args:
            query: ``(B, Lq, d_model)`` (content + position).
            reference_points: ``(B, Lq, L, 2)`` normalised ``(x, y)`` in [0, 1].
            input_flatten: ``(B, S, d_model)`` flattened levels.
            spatial_shapes: ``(L, 2)`` long ``(H, W)``.
            level_start_index: ``(L,)`` long.

        Returns:
            ``(B, Lq, d_model)``.
        """
        B, Lq, _ = query.shape
        S = input_flatten.shape[1]
        M, L, P = self.n_heads, self.n_levels, self.n_points
        value = self.value_proj(input_flatten).view(B, S, M, self.d_model // M)
        offsets = self.sampling_offsets(query).view(B, Lq, M, L, P, 2)
        weights = self.attention_weights(query).view(B, Lq, M, L * P).softmax(-1).view(B, Lq, M, L, P)
        normalizer = torch.stack([spatial_shapes[:, 1], spatial_shapes[:, 0]], -1).to(reference_points.dtype)
        locations = reference_points[:, :, None, :, None, :] + offsets / normalizer[None, None, None, :, None, :]
        out = ms_deform_attn_sample(value, spatial_shapes, level_start_index, locations, weights)
        return self.output_proj(out)


class MSDeformAttnEncoderLayer(nn.Module):
    """Post-norm encoder layer: deformable self-attention + ReLU FFN (no dropout: inference).

    Names: ``self_attn``, ``norm1``, ``linear1``, ``linear2``, ``norm2``.
    """

    def __init__(
        self, d_model: int = 256, ffn_dim: int = 1024, n_levels: int = 3, n_heads: int = 8, n_points: int = 4
    ) -> None:
        super().__init__()
        self.self_attn = MSDeformAttn(d_model, n_levels, n_heads, n_points)
        self.norm1 = nn.LayerNorm(d_model)
        self.linear1 = nn.Linear(d_model, ffn_dim)
        self.linear2 = nn.Linear(ffn_dim, d_model)
        self.norm2 = nn.LayerNorm(d_model)

    def forward(
        self, src: Tensor, pos: Tensor, reference_points: Tensor, spatial_shapes: Tensor, level_start_index: Tensor
    ) -> Tensor:
        """``src, pos (B, S, d)``, ``reference_points (B, S, L, 2)`` -> ``(B, S, d)``."""
        src = self.norm1(src + self.self_attn(src + pos, reference_points, src, spatial_shapes, level_start_index))
        return self.norm2(src + self.linear2(F.relu(self.linear1(src))))


def encoder_reference_points(spatial_shapes: Tensor, batch: int, n_levels: int, device=None) -> Tensor:
    """Pixel-centre reference points of every flattened position, repeated for every level (valid ratios 1).

    Args:
        spatial_shapes: ``(L, 2)`` long ``(H, W)``.
        batch: B.
        n_levels: number of levels the queries sample from (= L).

    Returns:
        float32 ``(B, S, n_levels, 2)``: ``((j + 0.5) / W, (i + 0.5) / H)`` for position ``(i, j)`` of its level.
    """
    refs = []
    for h, w in spatial_shapes.tolist():
        ys = (torch.arange(h, dtype=torch.float32, device=device) + 0.5) / h
        xs = (torch.arange(w, dtype=torch.float32, device=device) + 0.5) / w
        ref_y, ref_x = torch.meshgrid(ys, xs, indexing="ij")
        refs.append(torch.stack([ref_x.reshape(-1), ref_y.reshape(-1)], -1))
    ref = torch.cat(refs, 0)  # (S, 2)
    return ref[None, :, None, :].expand(batch, -1, n_levels, -1)


class MSDeformAttnTransformerEncoder(nn.Module):
    """Encoder-only deformable transformer over L flattened levels.

    Names: ``level_embed`` ``(L, d_model)`` and ``encoder.layers.{i}``.
    """

    def __init__(
        self,
        d_model: int = 256,
        n_heads: int = 8,
        num_layers: int = 6,
        ffn_dim: int = 1024,
        n_levels: int = 3,
        n_points: int = 4,
    ) -> None:
        super().__init__()
        self.n_levels = n_levels
        self.level_embed = nn.Parameter(torch.empty(n_levels, d_model))
        self.encoder = nn.Module()
        self.encoder.layers = nn.ModuleList(
            MSDeformAttnEncoderLayer(d_model, ffn_dim, n_levels, n_heads, n_points) for _ in range(num_layers)
        )
        for p in self.parameters():
            if p.dim() > 1:
                nn.init.xavier_uniform_(p)
        for layer in self.encoder.layers:
            layer.self_attn.reset_parameters()
        nn.init.normal_(self.level_embed)

    def forward(self, srcs: Sequence[Tensor], pos_embeds: Sequence[Tensor]) -> tuple[Tensor, Tensor, Tensor]:
        """Encode the levels jointly.

        Args:
            srcs: L maps ``(B, d, H_l, W_l)``.
            pos_embeds: L position encodings of the same shapes (``level_embed`` is added here).

        Returns:
            ``memory (B, S, d)``, ``spatial_shapes (L, 2)`` long, ``level_start_index (L,)`` long.
        """
        if len(srcs) != self.n_levels or len(pos_embeds) != self.n_levels:
            raise ValueError(f"expected {self.n_levels} levels, got {len(srcs)} maps and {len(pos_embeds)} encodings")
        device = srcs[0].device
        shapes = [tuple(s.shape[-2:]) for s in srcs]
        src_flat = torch.cat([s.flatten(2).transpose(1, 2) for s in srcs], 1)
        pos_flat = torch.cat(
            [
                p.flatten(2).transpose(1, 2) + self.level_embed[lvl].to(p.dtype).view(1, 1, -1)
                for lvl, p in enumerate(pos_embeds)
            ],
            1,
        )
        spatial_shapes = torch.as_tensor(shapes, dtype=torch.long, device=device)
        level_start_index = torch.cat([spatial_shapes.new_zeros(1), spatial_shapes.prod(1).cumsum(0)[:-1]])
        reference_points = encoder_reference_points(spatial_shapes, src_flat.shape[0], self.n_levels, device)
        out = src_flat
        for layer in self.encoder.layers:
            out = layer(out, pos_flat, reference_points, spatial_shapes, level_start_index)
        return out, spatial_shapes, level_start_index


class PositionEmbeddingSine(nn.Module):
    """DETR sine position encoding for an unpadded map (no mask).

    With ``normalize``: ``e_y = (cumsum_y - offset) / (cumsum_y[last row] + 1e-6) * scale`` (cumsum_y = 1..H),
    likewise ``e_x``; without it ``e = cumsum``. Channel ``2k`` = ``sin(e / T^(2k/F))``, ``2k+1`` =
    ``cos(e / T^(2k/F))`` with ``F = num_pos_feats``; output = [y part, x part]. ``offset = 0`` (DETR's
    ``y_embed / (y_embed[:, -1:] + eps) * scale``) is what the official pixel decoder computes (checked against
    the golden outputs; the ``- 0.5`` variant does not match).

    Shapes: ``x (B, C, H, W) -> (B, 2 * num_pos_feats, H, W)`` in ``x``'s dtype (computed in float32).
    """

    def __init__(
        self,
        num_pos_feats: int = 128,
        temperature: float = 10000.0,
        normalize: bool = True,
        scale: float | None = None,
        offset: float = 0.0,
    ) -> None:
        super().__init__()
        self.num_pos_feats = int(num_pos_feats)
        self.temperature = float(temperature)
        self.normalize = bool(normalize)
        self.scale = 2.0 * math.pi if scale is None else float(scale)
        self.offset = float(offset)

    def forward(self, x: Tensor) -> Tensor:
        """``x (B, C, H, W) -> (B, 2 * num_pos_feats, H, W)``."""
        B, _, H, W = x.shape
        ones = torch.ones(B, H, W, dtype=torch.float32, device=x.device)
        y_embed = ones.cumsum(1)
        x_embed = ones.cumsum(2)
        if self.normalize:
            eps = 1e-6
            y_embed = (y_embed - self.offset) / (y_embed[:, -1:, :] + eps) * self.scale
            x_embed = (x_embed - self.offset) / (x_embed[:, :, -1:] + eps) * self.scale
        dim_t = torch.arange(self.num_pos_feats, dtype=torch.float32, device=x.device)
        dim_t = self.temperature ** (2 * torch.div(dim_t, 2, rounding_mode="floor") / self.num_pos_feats)
        pos_x = x_embed[:, :, :, None] / dim_t
        pos_y = y_embed[:, :, :, None] / dim_t
        pos_x = torch.stack((pos_x[:, :, :, 0::2].sin(), pos_x[:, :, :, 1::2].cos()), dim=4).flatten(3)
        pos_y = torch.stack((pos_y[:, :, :, 0::2].sin(), pos_y[:, :, :, 1::2].cos()), dim=4).flatten(3)
        return torch.cat((pos_y, pos_x), dim=3).permute(0, 3, 1, 2).to(x.dtype)


def _c2_xavier_fill(conv: nn.Conv2d) -> nn.Conv2d:
    nn.init.kaiming_uniform_(conv.weight, a=1)
    if conv.bias is not None:
        nn.init.zeros_(conv.bias)
    return conv


# ---------------------------------------------------------------------------------------------------- decoder
class MSDeformAttnPixelDecoder(nn.Module):
    """Mask2Former pixel decoder: deformable encoder over the coarse levels + FPN steps down to ``common_stride``.

    Args:
        in_channels: channels of every backbone feature, e.g. ``{"res2": 256, ..., "res5": 2048}``.
        strides: stride of every backbone feature, e.g. ``{"res2": 4, ..., "res5": 32}``.
        conv_dim: width of the encoder and FPN maps.
        mask_dim: channels of the mask features.
        encoder_layers: deformable encoder layers.
        heads: deformable attention heads.
        points: sampling points per head and level.
        ffn_dim: encoder FFN width (1024 in the official code).
        deformable_levels: features fed to the encoder (any order; used from coarsest to finest).
        num_groups: GroupNorm groups of every norm.
        common_stride: stride of the mask features. FPN steps = ``log2(min deformable stride / common_stride)``,
            on the finest features (``adapter_1``/``layer_1`` = finest).
        max_multiscale_levels: how many maps (coarsest first: encoder outputs, then FPN outputs) are returned as
            the multi-scale features (3 in the official code).

    Shapes: ``forward(features)`` with ``features[k]`` ``(B, in_channels[k], H/strides[k], W/strides[k])`` ->
    ``(mask_features (B, mask_dim, H/common_stride, W/common_stride), [maps (B, conv_dim, h, w)])``, the maps at
    strides 32, 16, 8 for the official configuration.
    """

    def __init__(
        self,
        in_channels: Mapping[str, int],
        strides: Mapping[str, int],
        conv_dim: int = 256,
        mask_dim: int = 256,
        encoder_layers: int = 6,
        heads: int = 8,
        points: int = 4,
        ffn_dim: int = 1024,
        deformable_levels: Sequence[str] = ("res3", "res4", "res5"),
        num_groups: int = 32,
        common_stride: int = 4,
        max_multiscale_levels: int = 3,
    ) -> None:
        super().__init__()
        missing = [k for k in deformable_levels if k not in in_channels or k not in strides]
        if missing or set(in_channels) != set(strides):
            raise ValueError(f"in_channels/strides must describe the same features incl. {list(deformable_levels)}")
        if conv_dim % 2:
            raise ValueError(f"conv_dim must be even (sine position encoding), got {conv_dim}")
        self.in_features = sorted(in_channels, key=lambda k: strides[k])  # fine -> coarse
        # encoder levels coarse -> fine: input_proj.0 takes the coarsest
        self.transformer_in_features = sorted(deformable_levels, key=lambda k: strides[k])[::-1]
        self.conv_dim, self.mask_dim, self.common_stride = int(conv_dim), int(mask_dim), int(common_stride)
        self.max_multiscale_levels = int(max_multiscale_levels)
        n_levels = len(self.transformer_in_features)

        self.input_proj = nn.ModuleList()
        for name in self.transformer_in_features:
            conv = nn.Conv2d(in_channels[name], conv_dim, kernel_size=1)
            nn.init.xavier_uniform_(conv.weight, gain=1)
            nn.init.zeros_(conv.bias)
            self.input_proj.append(nn.Sequential(conv, nn.GroupNorm(num_groups, conv_dim)))
        self.transformer = MSDeformAttnTransformerEncoder(
            d_model=conv_dim,
            n_heads=heads,
            num_layers=encoder_layers,
            ffn_dim=ffn_dim,
            n_levels=n_levels,
            n_points=points,
        )
        self.pe_layer = PositionEmbeddingSine(conv_dim // 2, normalize=True)

        min_stride = min(strides[k] for k in self.transformer_in_features)
        ratio = min_stride / common_stride
        num_fpn = int(round(math.log2(ratio))) if ratio >= 1 else 0
        if ratio < 1 or 2**num_fpn != ratio:
            raise ValueError(f"min deformable stride {min_stride} / common_stride {common_stride} is not a power of 2")
        if num_fpn > len(self.in_features):
            raise ValueError(f"{num_fpn} FPN steps need {num_fpn} features finer than the deformable levels")
        self.num_fpn_levels = num_fpn
        self.fpn_features = self.in_features[:num_fpn]  # fine -> coarse; adapter_1 = finest
        for idx, name in enumerate(self.fpn_features):
            lateral = ConvNorm2d(
                in_channels[name], conv_dim, kernel_size=1, bias=False, norm=nn.GroupNorm(num_groups, conv_dim)
            )
            output = ConvNorm2d(
                conv_dim,
                conv_dim,
                kernel_size=3,
                padding=1,
                bias=False,
                norm=nn.GroupNorm(num_groups, conv_dim),
                activation=F.relu,
            )
            self.add_module(f"adapter_{idx + 1}", _c2_xavier_fill(lateral))
            self.add_module(f"layer_{idx + 1}", _c2_xavier_fill(output))
        self.mask_features = _c2_xavier_fill(nn.Conv2d(conv_dim, mask_dim, kernel_size=1))

    def forward(self, features: Mapping[str, Tensor]) -> tuple[Tensor, list[Tensor]]:
        """Decode backbone features.

        Args:
            features: ``{name: (B, in_channels[name], h, w)}`` holding at least the deformable levels and the FPN
                features.

        Returns:
            ``mask_features`` ``(B, mask_dim, H/common_stride, W/common_stride)`` and the multi-scale maps
            ``[(B, conv_dim, h, w)]``, coarsest first (strides 32, 16, 8 officially).
        """
        srcs, pos = [], []
        for idx, name in enumerate(self.transformer_in_features):
            x = self.input_proj[idx](features[name])
            srcs.append(x)
            pos.append(self.pe_layer(x))
        memory, spatial_shapes, _ = self.transformer(srcs, pos)
        B = memory.shape[0]
        shapes = [(int(h), int(w)) for h, w in spatial_shapes.tolist()]
        out = [
            z.transpose(1, 2).reshape(B, self.conv_dim, h, w)
            for z, (h, w) in zip(memory.split([h * w for h, w in shapes], dim=1), shapes)
        ]
        for idx in range(self.num_fpn_levels - 1, -1, -1):  # coarse -> fine
            name = self.fpn_features[idx]
            cur = getattr(self, f"adapter_{idx + 1}")(features[name])
            y = cur + F.interpolate(out[-1], size=cur.shape[-2:], mode="bilinear", align_corners=False)
            out.append(getattr(self, f"layer_{idx + 1}")(y))
        return self.mask_features(out[-1]), out[: self.max_multiscale_levels]
