"""Class-agnostic Mask2Former proposal network: ResNet backbone -> MSDeformAttn pixel decoder -> masked-attention
transformer decoder, plus the official pre/post-processing around it.

* :func:`build_proposal_network` builds it from a JSON-able config shaped like a golden ``case.json``
  (sections ``backbone``, ``pixel_decoder``, ``transformer_decoder``, ``pixel_mean``, ``pixel_std``,
  ``size_divisibility``); :data:`PROPOSAL_CONFIGS` holds the official ``"m2f-r50"`` geometry and a ``"tiny"`` one.
* :meth:`ProposalNetwork.load_official_state_dict` loads an official (detectron2 ``MaskFormer`` / ``MasQTuning``)
  state_dict: ``backbone.*`` -> ``backbone.*``, ``sem_seg_head.pixel_decoder.*`` -> ``pixel_decoder.*``,
  ``sem_seg_head.predictor.*`` -> ``predictor.*``; ``criterion.empty_weight`` and ``masqclip.*`` are ignored.
* :func:`normalize_and_pad` / :func:`postprocess_masks` / :func:`proposal_instances` are the official
  ``(x - mean) / std`` + ``ImageList`` padding, ``sem_seg_postprocess`` and class-agnostic instance inference.
"""

from __future__ import annotations

import copy
import math
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from masqclip_cli.modeling.proposals.backbones import build_backbone
from masqclip_cli.modeling.proposals.pixel_decoder import MSDeformAttnPixelDecoder
from masqclip_cli.modeling.proposals.transformer_decoder import MaskedAttentionDecoder

__all__ = [
    "IMAGENET_PIXEL_MEAN",
    "IMAGENET_PIXEL_STD",
    "PROPOSAL_CONFIGS",
    "LoadReport",
    "ProposalNetwork",
    "ProposalOutput",
    "build_proposal_network",
    "map_official_key",
    "normalize_and_pad",
    "postprocess_masks",
    "proposal_instances",
]

IMAGENET_PIXEL_MEAN: tuple[float, float, float] = (123.675, 116.28, 103.53)
IMAGENET_PIXEL_STD: tuple[float, float, float] = (58.395, 57.12, 57.375)

_FEATURE_NAMES = ("res2", "res3", "res4", "res5")

PROPOSAL_CONFIGS: dict[str, dict[str, Any]] = {
    # Official teacher/student geometry (teacher_R50_200k.yaml): R50, MSDeformAttn 6 layers, 100 queries.
    "m2f-r50": {
        "backbone": {
            "depth": 50,
            "stem_out_channels": 64,
            "res2_out_channels": 256,
            "num_groups": 1,
            "width_per_group": 64,
            "stride_in_1x1": False,
            "res5_dilation": 1,
            "norm": "FrozenBN",
        },
        "pixel_decoder": {
            "conv_dim": 256,
            "mask_dim": 256,
            "norm": "GN",
            "encoder_layers": 6,
            "heads": 8,
            "points": 4,
            "encoder_ffn": 1024,
            "common_stride": 4,
            "deformable_levels": ["res3", "res4", "res5"],
        },
        "transformer_decoder": {
            "hidden_dim": 256,
            "heads": 8,
            "ffn": 2048,
            "dec_layers": 10,
            "num_queries": 100,
            "pre_norm": False,
        },
        "pixel_mean": list(IMAGENET_PIXEL_MEAN),
        "pixel_std": list(IMAGENET_PIXEL_STD),
        "size_divisibility": 32,
    },
    # Small geometry for tests (same as golden case_a): narrow R50, 2 encoder layers, 3 decoder layers, 8 queries.
    "tiny": {
        "backbone": {
            "depth": 50,
            "stem_out_channels": 16,
            "res2_out_channels": 32,
            "num_groups": 1,
            "width_per_group": 8,
            "stride_in_1x1": False,
            "res5_dilation": 1,
            "norm": "FrozenBN",
        },
        "pixel_decoder": {
            "conv_dim": 64,
            "mask_dim": 32,
            "norm": "GN",
            "encoder_layers": 2,
            "heads": 4,
            "points": 4,
            "encoder_ffn": 1024,
            "common_stride": 4,
            "deformable_levels": ["res3", "res4", "res5"],
        },
        "transformer_decoder": {
            "hidden_dim": 64,
            "heads": 4,
            "ffn": 128,
            "dec_layers": 4,
            "num_queries": 8,
            "pre_norm": False,
        },
        "pixel_mean": list(IMAGENET_PIXEL_MEAN),
        "pixel_std": list(IMAGENET_PIXEL_STD),
        "size_divisibility": 32,
    },
    # The demo model's geometry (scripts/build_demo_model.py): a slim R50, 3 encoder layers, 6 decoder layers,
    # 24 queries; trains on a 2-core CPU in tens of minutes at 128².
    "demo": {
        "backbone": {
            "depth": 50,
            "stem_out_channels": 24,
            "res2_out_channels": 48,
            "num_groups": 1,
            "width_per_group": 12,
            "stride_in_1x1": False,
            "res5_dilation": 1,
            "norm": "FrozenBN",
        },
        "pixel_decoder": {
            "conv_dim": 96,
            "mask_dim": 64,
            "norm": "GN",
            "encoder_layers": 3,
            "heads": 4,
            "points": 4,
            "encoder_ffn": 256,
            "common_stride": 4,
            "deformable_levels": ["res3", "res4", "res5"],
        },
        "transformer_decoder": {
            "hidden_dim": 96,
            "heads": 4,
            "ffn": 256,
            "dec_layers": 7,
            "num_queries": 24,
            "pre_norm": False,
        },
        "pixel_mean": list(IMAGENET_PIXEL_MEAN),
        "pixel_std": list(IMAGENET_PIXEL_STD),
        "size_divisibility": 32,
    },
}

_PREFIX_MAP: tuple[tuple[str, str], ...] = (
    ("backbone.", "backbone."),
    ("sem_seg_head.pixel_decoder.", "pixel_decoder."),
    ("sem_seg_head.predictor.", "predictor."),
)
_IGNORED_KEYS = frozenset({"criterion.empty_weight"})
_IGNORED_PREFIXES = ("masqclip.",)


# ---------------------------------------------------------------------------------------------------- outputs
@dataclass
class ProposalOutput:
    """Output of :meth:`ProposalNetwork.forward`.

    Attributes:
        pred_logits: ``(B, Q, 2)`` class logits of the last layer (index 0 = object, 1 = no-object).
        pred_masks: ``(B, Q, Hp/4, Wp/4)`` mask logits of the last layer.
        log_p_obj: ``(B, Q)`` = ``log_softmax(pred_logits, -1)[..., 0]``.
        aux: ``dec_layers - 1`` dicts ``{"pred_logits": (B, Q, 2), "pred_masks": (B, Q, Hp/4, Wp/4)}``: the
            prediction on the raw queries, then after every decoder layer but the last.
        features: with ``return_features=True``: ``res2..res5`` (backbone maps), ``mask_features``
            ``(B, mask_dim, Hp/4, Wp/4)`` and ``multi_scale`` (list of 3 maps at strides 32, 16, 8); else None.
    """

    pred_logits: Tensor
    pred_masks: Tensor
    log_p_obj: Tensor
    aux: list[dict[str, Tensor]]
    features: dict[str, Any] | None = None


class LoadReport(NamedTuple):
    """What :meth:`ProposalNetwork.load_official_state_dict` did (official key names)."""

    missing: list[str]
    unexpected: list[str]
    mismatched: list[str]
    ignored: list[str]


def map_official_key(key: str) -> str | None:
    """Official key -> this network's key (``None`` if outside the proposal network's prefixes)."""
    for src, dst in _PREFIX_MAP:
        if key.startswith(src):
            return dst + key[len(src) :]
    return None


# ---------------------------------------------------------------------------------------------------- pre/post
def normalize_and_pad(
    images: Sequence[Tensor] | Tensor,
    pixel_mean: Sequence[float] | Tensor = IMAGENET_PIXEL_MEAN,
    pixel_std: Sequence[float] | Tensor = IMAGENET_PIXEL_STD,
    size_divisibility: int = 32,
    device: torch.device | str | None = None,
) -> Tensor:
    """``(x - mean) / std`` per image, then zero padding bottom/right (0 in normalised space) to a common size.

    Args:
        images: list of ``(3, H_i, W_i)`` uint8 or float images on the 0..255 scale (RGB), or a ``(B, 3, H, W)``
            tensor.
        pixel_mean: ``(3,)`` per-channel mean (0..255 scale).
        pixel_std: ``(3,)`` per-channel std.
        size_divisibility: ``Hp``/``Wp`` are the largest ``H_i``/``W_i`` rounded up to a multiple of this
            (``<= 1``: no rounding).
        device: output device (default: that of the mean tensor, or of the first image).

    Returns:
        float32 ``(B, 3, Hp, Wp)``; image ``i`` occupies ``[:, :H_i, :W_i]`` of row ``i``, the rest is 0.
    """
    imgs = list(images.unbind(0)) if isinstance(images, Tensor) and images.ndim == 4 else list(images)
    if not imgs:
        raise ValueError("normalize_and_pad needs at least one image")
    for im in imgs:
        if im.ndim != 3 or im.shape[0] != 3:
            raise ValueError(f"expected (3, H, W) images, got shape {tuple(im.shape)}")
    if device is None:
        device = pixel_mean.device if isinstance(pixel_mean, Tensor) else imgs[0].device
    mean = torch.as_tensor(pixel_mean, dtype=torch.float32, device=device).view(3, 1, 1)
    std = torch.as_tensor(pixel_std, dtype=torch.float32, device=device).view(3, 1, 1)
    hp = max(int(im.shape[1]) for im in imgs)
    wp = max(int(im.shape[2]) for im in imgs)
    if size_divisibility > 1:
        hp = int(math.ceil(hp / size_divisibility) * size_divisibility)
        wp = int(math.ceil(wp / size_divisibility) * size_divisibility)
    out = torch.zeros(len(imgs), 3, hp, wp, dtype=torch.float32, device=device)
    for i, im in enumerate(imgs):
        out[i, :, : im.shape[1], : im.shape[2]] = (im.to(device=device, dtype=torch.float32) - mean) / std
    return out


def postprocess_masks(
    mask_logits: Tensor,
    padded_size: tuple[int, int],
    image_size: tuple[int, int],
    output_size: tuple[int, int],
    chunk: int | None = None,
) -> Tensor:
    """The official ``sem_seg_postprocess`` of mask logits.

    Bilinear (align_corners=False) upsampling to the padded input size, crop to the unpadded image size, bilinear
    (align_corners=False) resize to the output size. Every query is processed independently, so ``chunk`` (queries
    per step, ``None`` = all at once) changes memory use but not the result.

    Args:
        mask_logits: ``(Q, h, w)`` mask logits (``h, w`` = padded size / 4).
        padded_size: ``(Hp, Wp)`` of the padded network input.
        image_size: ``(H, W)`` of the image inside the padded input.
        output_size: ``(H_out, W_out)`` requested output size.
        chunk: queries per interpolation call, or None.

    Returns:
        ``(Q, H_out, W_out)`` logits, dtype of ``mask_logits``.
    """
    if mask_logits.ndim != 3:
        raise ValueError(f"mask_logits must be (Q, h, w), got shape {tuple(mask_logits.shape)}")
    hp, wp = (int(v) for v in padded_size)
    h, w = (int(v) for v in image_size)
    ho, wo = (int(v) for v in output_size)
    if h > hp or w > wp:
        raise ValueError(f"image_size {image_size} exceeds padded_size {padded_size}")
    q = mask_logits.shape[0]
    out = mask_logits.new_empty((q, ho, wo))
    step = q if chunk is None else int(chunk)
    if step < 1:
        step = max(q, 1)
    for s in range(0, q, step):
        m = mask_logits[s : s + step].unsqueeze(0)
        m = F.interpolate(m, size=(hp, wp), mode="bilinear", align_corners=False)
        m = m[:, :, :h, :w]
        m = F.interpolate(m, size=(ho, wo), mode="bilinear", align_corners=False)
        out[s : s + step] = m[0]
    return out


def proposal_instances(pred_logits: Tensor, mask_logits_out: Tensor, k: int) -> dict[str, Tensor]:
    """Class-agnostic instance inference (official ``MaskFormer.instance_inference`` with one class).

    ``p_obj = softmax(pred_logits)[:, 0]``; top-``k`` queries by ``p_obj`` (``k`` clamped to ``[0, Q]``, sorted
    descending); mask = logit > 0; score = ``p_obj * (sum sigmoid * mask) / (sum mask + 1e-6)``.

    Args:
        pred_logits: ``(Q, 2)`` class logits (index 0 = object).
        mask_logits_out: ``(Q, H, W)`` mask logits at the output resolution (see :func:`postprocess_masks`).
        k: detections to keep.

    Returns:
        dict: ``scores`` float32 ``(k,)``, ``pred_masks`` bool ``(k, H, W)``, ``pred_classes`` int64 ``(k,)`` zeros,
        ``query_indices`` int64 ``(k,)`` (which query each detection comes from).
    """
    if pred_logits.ndim != 2 or pred_logits.shape[-1] != 2:
        raise ValueError(f"pred_logits must be (Q, 2), got shape {tuple(pred_logits.shape)}")
    if mask_logits_out.ndim != 3 or mask_logits_out.shape[0] != pred_logits.shape[0]:
        raise ValueError(
            f"mask_logits_out must be (Q, H, W) with Q = {pred_logits.shape[0]}, got {tuple(mask_logits_out.shape)}"
        )
    q = pred_logits.shape[0]
    k = max(0, min(int(k), q))
    p_obj = pred_logits.float().softmax(-1)[:, 0]
    top_scores, idx = p_obj.topk(k, sorted=True)
    masks = mask_logits_out[idx].float()
    binary = masks > 0
    flat = binary.flatten(1).float()
    mask_scores = (masks.sigmoid().flatten(1) * flat).sum(1) / (flat.sum(1) + 1e-6)
    return {
        "scores": top_scores * mask_scores,
        "pred_masks": binary,
        "pred_classes": torch.zeros(k, dtype=torch.long, device=pred_logits.device),
        "query_indices": idx,
    }


# ---------------------------------------------------------------------------------------------------- network
class ProposalNetwork(nn.Module):
    """Backbone + pixel decoder + :class:`MaskedAttentionDecoder`, with ImageNet normalisation buffers.

    Args:
        backbone: ``(B, 3, Hp, Wp) -> {"res2": ..., "res5": ...}`` (strides 4..32).
        pixel_decoder: ``features -> (mask_features (B, mask_dim, Hp/4, Wp/4), [3 maps at strides 32, 16, 8])``.
        predictor: the transformer decoder.
        pixel_mean, pixel_std: ``(3,)`` on the 0..255 scale; non-persistent buffers (not in the state_dict).
        size_divisibility: padding multiple used by :meth:`normalize_and_pad`.
    """

    def __init__(
        self,
        backbone: nn.Module,
        pixel_decoder: nn.Module,
        predictor: MaskedAttentionDecoder,
        pixel_mean: Sequence[float] = IMAGENET_PIXEL_MEAN,
        pixel_std: Sequence[float] = IMAGENET_PIXEL_STD,
        size_divisibility: int = 32,
    ) -> None:
        super().__init__()
        self.backbone = backbone
        self.pixel_decoder = pixel_decoder
        self.predictor = predictor
        self.register_buffer("pixel_mean", torch.tensor(list(pixel_mean), dtype=torch.float32), persistent=False)
        self.register_buffer("pixel_std", torch.tensor(list(pixel_std), dtype=torch.float32), persistent=False)
        self.size_divisibility = int(size_divisibility)

    @property
    def num_queries(self) -> int:
        return self.predictor.num_queries

    def normalize_and_pad(self, images: Sequence[Tensor] | Tensor) -> Tensor:
        """List of ``(3, H_i, W_i)`` 0..255 images -> float32 ``(B, 3, Hp, Wp)`` on this module's device:
        ``(x - pixel_mean) / pixel_std``, zero-padded bottom/right to the largest size rounded up to a multiple of
        ``size_divisibility`` (see :func:`normalize_and_pad`)."""
        mean, std = self.pixel_mean, self.pixel_std
        return normalize_and_pad(images, mean, std, self.size_divisibility, mean.device)

    def forward(self, images_normalized_padded: Tensor, return_features: bool = False) -> ProposalOutput:
        """Run the network on a normalised, padded batch.

        Args:
            images_normalized_padded: ``(B, 3, Hp, Wp)`` from :meth:`normalize_and_pad` (``Hp, Wp`` multiples of
                32 so that every stride divides them).
            return_features: also return the intermediate maps in ``features``.

        Returns:
            :class:`ProposalOutput` (``pred_logits (B, Q, 2)``, ``pred_masks (B, Q, Hp/4, Wp/4)``,
            ``log_p_obj (B, Q)``, ``aux``, ``features``).
        """
        feats = self.backbone(images_normalized_padded)
        decoded = self.pixel_decoder(feats)
        mask_features, multi_scale = decoded[0], list(decoded[1])
        out = self.predictor(multi_scale, mask_features)
        features = None
        if return_features:
            features = dict(feats)
            features["mask_features"] = mask_features
            features["multi_scale"] = multi_scale
        return ProposalOutput(
            pred_logits=out["pred_logits"],
            pred_masks=out["pred_masks"],
            log_p_obj=F.log_softmax(out["pred_logits"], dim=-1)[..., 0],
            aux=out["aux_outputs"],
            features=features,
        )

    def load_official_state_dict(self, state_dict: Mapping[str, Tensor], strict: bool = True) -> LoadReport:
        """Load official Mask2Former/MasQCLIP proposal weights.

        ``backbone.*`` -> ``backbone.*``, ``sem_seg_head.pixel_decoder.*`` -> ``pixel_decoder.*``,
        ``sem_seg_head.predictor.*`` -> ``predictor.*``. ``criterion.empty_weight`` and ``masqclip.*`` are ignored.
        A detectron2 checkpoint dict ``{"model": state_dict, ...}`` is unwrapped.

        Args:
            state_dict: official key -> tensor.
            strict: raise on any missing, unexpected or mis-shaped key. With ``strict=False`` those are skipped
                with a warning (detectron2's behaviour) and everything else is loaded.

        Returns:
            :class:`LoadReport` with official key names.

        Raises:
            ValueError: (strict) naming the first few missing / unexpected / mis-shaped keys.
        """
        if "model" in state_dict and isinstance(state_dict["model"], Mapping):
            state_dict = state_dict["model"]
        own = self.state_dict()
        inverse = {}
        for key in own:
            for src, dst in _PREFIX_MAP:
                if key.startswith(dst):
                    inverse[key] = src + key[len(dst) :]
                    break
        mapped: dict[str, Tensor] = {}
        unexpected: list[str] = []
        mismatched: list[str] = []
        ignored: list[str] = []
        for key, value in state_dict.items():
            if key in _IGNORED_KEYS or key.startswith(_IGNORED_PREFIXES):
                ignored.append(key)
                continue
            target = map_official_key(key)
            if target is None or target not in own:
                unexpected.append(key)
            elif tuple(value.shape) != tuple(own[target].shape):
                mismatched.append(f"{key}: {tuple(value.shape)} vs expected {tuple(own[target].shape)}")
            else:
                mapped[target] = value
        missing = [inverse.get(k, k) for k in own if k not in mapped and not _was_mismatched(k, inverse, mismatched)]
        problems = []
        for label, items in (("missing", missing), ("unexpected", unexpected), ("shape mismatch", mismatched)):
            if items:
                shown = ", ".join(items[:5]) + (f", ... ({len(items)} in all)" if len(items) > 5 else "")
                problems.append(f"{label}: {shown}")
        if problems:
            msg = "official proposal-network weights: " + "; ".join(problems)
            if strict:
                raise ValueError("cannot load " + msg)
            warnings.warn("skipped keys loading " + msg, stacklevel=2)
        self.load_state_dict(mapped, strict=strict)
        return LoadReport(missing, unexpected, mismatched, ignored)


def _was_mismatched(own_key: str, inverse: dict[str, str], mismatched: list[str]) -> bool:
    official = inverse.get(own_key, own_key)
    return any(m.startswith(official + ":") for m in mismatched)


# ---------------------------------------------------------------------------------------------------- builder
def build_proposal_network(config: Mapping[str, Any] | str) -> ProposalNetwork:
    """Build a :class:`ProposalNetwork` (random init, eval mode) from a config dict or a :data:`PROPOSAL_CONFIGS`
    name.

    The dict has the shape of a golden ``case.json`` (other keys are ignored):

    * ``backbone``: ``type`` (a :data:`~masqclip_cli.modeling.proposals.backbones.BACKBONES` name, default
      ``resnet``) and that backbone's fields; for ``resnet``: ``depth, stem_out_channels, res2_out_channels,
      num_groups, width_per_group, stride_in_1x1, res5_dilation`` (optional ``in_channels`` = 3, ``norm`` =
      ``"FrozenBN"``);
    * ``pixel_decoder``: ``conv_dim, mask_dim, encoder_layers, heads, points, encoder_ffn, common_stride,
      deformable_levels`` (optional ``norm`` = ``"GN"``, ``gn_groups`` = 32);
    * ``transformer_decoder``: ``hidden_dim, heads, ffn, dec_layers, num_queries, pre_norm`` (optional
      ``decoder_layers`` = dec_layers - 1, checked; ``num_feature_levels`` = 3; ``enforce_input_proj`` = False);
    * ``pixel_mean``, ``pixel_std`` (0..255 scale), ``size_divisibility``.

    Raises:
        ValueError: unknown config name or inconsistent values.
    """
    if isinstance(config, str):
        if config not in PROPOSAL_CONFIGS:
            raise ValueError(f"unknown proposal config {config!r}; known: {sorted(PROPOSAL_CONFIGS)}")
        config = PROPOSAL_CONFIGS[config]
    config = copy.deepcopy(dict(config))
    backbone = build_backbone(config["backbone"])

    pd = config["pixel_decoder"]
    if pd.get("norm", "GN") != "GN":
        raise ValueError(f"only GroupNorm pixel decoders are supported, got norm {pd['norm']!r}")
    out_channels = backbone.out_channels
    strides = backbone.strides
    pixel_decoder = MSDeformAttnPixelDecoder(
        in_channels={k: int(out_channels[k]) for k in _FEATURE_NAMES},
        strides={k: int(strides[k]) for k in _FEATURE_NAMES},
        conv_dim=int(pd["conv_dim"]),
        mask_dim=int(pd["mask_dim"]),
        encoder_layers=int(pd["encoder_layers"]),
        heads=int(pd["heads"]),
        points=int(pd.get("points", 4)),
        ffn_dim=int(pd.get("encoder_ffn", 1024)),
        deformable_levels=list(pd.get("deformable_levels", ["res3", "res4", "res5"])),
        num_groups=int(pd.get("gn_groups", 32)),
        common_stride=int(pd.get("common_stride", 4)),
    )

    td = config["transformer_decoder"]
    dec_layers = int(td["dec_layers"])
    if "decoder_layers" in td and int(td["decoder_layers"]) != dec_layers - 1:
        raise ValueError(f"transformer_decoder: decoder_layers {td['decoder_layers']} != dec_layers - 1")
    predictor = MaskedAttentionDecoder(
        in_channels=int(pd["conv_dim"]),
        hidden_dim=int(td["hidden_dim"]),
        num_queries=int(td["num_queries"]),
        heads=int(td["heads"]),
        ffn_dim=int(td["ffn"]),
        dec_layers=dec_layers,
        mask_dim=int(pd["mask_dim"]),
        pre_norm=bool(td.get("pre_norm", False)),
        num_feature_levels=int(td.get("num_feature_levels", 3)),
        enforce_input_proj=bool(td.get("enforce_input_proj", False)),
    )
    return ProposalNetwork(
        backbone,
        pixel_decoder,
        predictor,
        pixel_mean=tuple(config.get("pixel_mean", IMAGENET_PIXEL_MEAN)),
        pixel_std=tuple(config.get("pixel_std", IMAGENET_PIXEL_STD)),
        size_divisibility=int(config.get("size_divisibility", 32)),
    ).eval()
