"""Our model file: one safetensors file with every tensor the model needs and a JSON header.

Tensor names (see docs/model-format.md):

- ``clip.*``: the open_clip ``CLIP`` state_dict (``clip.visual.*`` always; the text tower when saved with it);
- ``masq.*``: the MasQ additions (``masq.mask_pos_embed``, ``masq.q_proj_new.{i}.weight/bias``, optional
  ``masq.k_proj_new.*`` / ``masq.v_proj_new.*``);
- ``proposals.*``: the class-agnostic proposal network, when present;
- ``vocab.text_embeddings``: (N+1, D) precomputed text embeddings of the stored vocabulary, when present.

The safetensors metadata holds ``format`` = ``masqclip``, ``format_version`` and ``config`` (a JSON document). Files are
written to a temporary name and renamed, so an interrupted save never leaves a half-written model.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import nn

from masqclip_cli.modeling.clip_loader import ClipSpec, build_open_clip, get_tokenizer, tensor_digest
from masqclip_cli.modeling.masq_visual import MasQVisual
from masqclip_cli.modeling.text import TextEncoder
from masqclip_cli.vocab import Vocabulary

__all__ = [
    "FORMAT_NAME",
    "FORMAT_VERSION",
    "DEFAULT_THRESHOLDS",
    "ModelFileError",
    "MasQClipParts",
    "read_header",
    "save_model_file",
    "load_model_file",
]

FORMAT_NAME = "masqclip"
FORMAT_VERSION = 1
DEFAULT_THRESHOLDS: dict[str, float] = {
    "object_mask_threshold": 0.3,
    "overlap_threshold": 0.3,
    "detections_per_image": 100,
}


class ModelFileError(ValueError):
    """A model file is missing, unreadable or not in our format; the message names the file."""


@dataclass
class MasQClipParts:
    """Everything a model file holds, built into modules (eval mode, CPU unless moved).

    Attributes:
        config: the JSON header's ``config`` document.
        clip_spec: how the CLIP model was made (name, config, tokenizer, weights identity).
        masq_visual: the MasQ visual encoder (wraps ``clip.visual``).
        text_encoder: the text tower + tokenizer, or None when the file was saved without it.
        vocabulary: the stored vocabulary, or None.
        text_embeddings: (N+1, D) stored text embeddings of ``vocabulary`` ("background" last), or None.
        proposals_state: ``proposals.*`` tensors with the prefix removed, or None.
    """

    config: dict[str, Any]
    clip_spec: ClipSpec
    masq_visual: MasQVisual
    text_encoder: TextEncoder | None = None
    vocabulary: Vocabulary | None = None
    text_embeddings: torch.Tensor | None = None
    proposals_state: dict[str, torch.Tensor] | None = field(default=None, repr=False)

    @property
    def proposals_config(self) -> dict[str, Any] | None:
        return self.config.get("proposals")

    @property
    def thresholds(self) -> dict[str, float]:
        return {**DEFAULT_THRESHOLDS, **self.config.get("thresholds", {})}

    @property
    def test_size(self) -> dict[str, int] | None:
        """The input size the model was made for (``short_side``, ``max_size``), or None (the CLI's defaults)."""
        return self.config.get("test_size")


def _masq_extras(masq_visual: MasQVisual) -> dict[str, torch.Tensor]:
    return {k: v for k, v in masq_visual.state_dict().items() if not k.startswith("visual.")}


def save_model_file(
    path: str | Path,
    masq_visual: MasQVisual,
    clip_spec: ClipSpec,
    clip_model: nn.Module | None = None,
    proposals: nn.Module | dict[str, torch.Tensor] | None = None,
    proposals_config: dict[str, Any] | None = None,
    vocabulary: Vocabulary | None = None,
    text_embeddings: torch.Tensor | None = None,
    thresholds: dict[str, float] | None = None,
    templates: list[str] | None = None,
    extra: dict[str, Any] | None = None,
    test_size: dict[str, int] | None = None,
    storage_dtype: torch.dtype | None = None,
) -> Path:
    """Write a model file atomically.

    Args:
        path: destination (``.safetensors``).
        masq_visual: the MasQ visual encoder; its ``visual`` must be ``clip_model.visual`` when both are given.
        clip_spec: the spec from :func:`create_open_clip` (model config, tokenizer).
        clip_model: the whole open_clip model to store its text tower too; None stores the visual tower only.
        proposals: the proposal network (module or state_dict), or None.
        proposals_config: its constructor config (JSON-able), stored as ``config["proposals"]``.
        vocabulary: a vocabulary to store; ``text_embeddings`` (N+1, D) must then be given too.
        thresholds: post-processing defaults (object/overlap thresholds, detections per image).
        templates: the prompt templates the stored text embeddings were made with.
        extra: further JSON-able fields stored under ``config["extra"]``.
        test_size: ``{"short_side": S, "max_size": M}``, the resize `segment` applies by default (for a model made
            for small images, like the demo model); None keeps the official test sizes.
        storage_dtype: store floating-point tensors in this dtype (``torch.float16`` halves the file; they are
            read back as float32); None stores them as they are.

    Returns:
        The written path.
    """
    path = Path(path)
    tensors: dict[str, torch.Tensor] = {}
    if clip_model is not None:
        if clip_model.visual is not masq_visual.visual:
            raise ValueError("clip_model.visual is not the tower wrapped by masq_visual")
        clip_state = clip_model.state_dict()
    else:
        clip_state = {f"visual.{k}": v for k, v in masq_visual.visual.state_dict().items()}
    tensors.update({f"clip.{k}": v for k, v in clip_state.items()})
    tensors.update({f"masq.{k}": v for k, v in _masq_extras(masq_visual).items()})
    if proposals is not None:
        state = proposals.state_dict() if isinstance(proposals, nn.Module) else proposals
        tensors.update({f"proposals.{k}": v for k, v in state.items()})
    if vocabulary is not None:
        if text_embeddings is None or text_embeddings.shape[0] != len(vocabulary) + 1:
            raise ValueError("a stored vocabulary needs text_embeddings of shape (N+1, D)")
        tensors["vocab.text_embeddings"] = text_embeddings
    elif text_embeddings is not None:
        raise ValueError("text_embeddings given without the vocabulary they belong to")
    if storage_dtype is not None:
        tensors = {k: v.to(storage_dtype) if v.is_floating_point() else v for k, v in tensors.items()}
    # the text tower's identity (text-embedding cache key) is that of the stored values
    text_state = {k[len("clip."):]: v for k, v in tensors.items()
                  if k.startswith("clip.") and not k.startswith("clip.visual.")}
    config: dict[str, Any] = {
        "format_version": FORMAT_VERSION,
        "clip": {
            "model_name": clip_spec.model_name,
            "model_cfg": clip_spec.model_cfg,
            "pretrained": clip_spec.pretrained,
            "tokenizer": clip_spec.tokenizer,
            "image_size": masq_visual.image_size,
            "has_text_tower": clip_model is not None,
            "text_weights_id": tensor_digest(text_state) if text_state else None,
        },
        "masq": {
            "fq_init": masq_visual.fq_init,
            "tune": masq_visual.tune,
            "extra_projections": list(masq_visual.extra_projections),
        },
        "proposals": proposals_config,
        "thresholds": {**DEFAULT_THRESHOLDS, **(thresholds or {})},
        "vocabulary": vocabulary.to_json() if vocabulary is not None else None,
        "templates": templates,
        "extra": extra or {},
    }
    if storage_dtype is not None:
        config["storage_dtype"] = str(storage_dtype).removeprefix("torch.")
    if test_size is not None:
        config["test_size"] = {"short_side": int(test_size["short_side"]), "max_size": int(test_size["max_size"])}
    # safetensors refuses shared storage and non-contiguous tensors: store independent contiguous copies.
    tensors = {k: v.detach().to("cpu").contiguous().clone() for k, v in tensors.items()}
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        save_file(
            tensors,
            str(tmp),
            metadata={"format": FORMAT_NAME, "format_version": str(FORMAT_VERSION), "config": json.dumps(config)},
        )
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def read_header(path: str | Path) -> dict[str, Any]:
    """The ``config`` document of a model file, after checking that the file is ours and of a known version."""
    path = Path(path)
    if not path.is_file():
        raise ModelFileError(f"{path}: model file not found")
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
    except Exception as exc:  # noqa: BLE001 - any parse failure means "not a safetensors file"
        raise ModelFileError(f"{path}: not a safetensors model file ({exc})".splitlines()[0]) from exc
    if meta.get("format") != FORMAT_NAME or "config" not in meta:
        raise ModelFileError(f"{path}: not a masqclip model file (no '{FORMAT_NAME}' header)")
    version = int(meta.get("format_version", "0"))
    if version > FORMAT_VERSION:
        raise ModelFileError(
            f"{path}: model format version {version} is newer than this masqclip understands ({FORMAT_VERSION}); "
            "upgrade masqclip"
        )
    try:
        return json.loads(meta["config"])
    except json.JSONDecodeError as exc:
        raise ModelFileError(f"{path}: corrupt model header ({exc})") from exc


def _strip(tensors: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    return {k[len(prefix) :]: v for k, v in tensors.items() if k.startswith(prefix)}


def load_model_file(path: str | Path, device: str | torch.device = "cpu") -> MasQClipParts:
    """Build the parts stored in a model file (modules in eval mode on ``device``)."""
    path = Path(path)
    config = read_header(path)
    tensors = load_file(str(path), device=str(device))
    # half-precision storage (``storage_dtype``) is read back as float32: the model computes in float32 and
    # load_model(precision=...) casts afterwards
    tensors = {k: v.float() if v.dtype in (torch.float16, torch.bfloat16) else v for k, v in tensors.items()}
    clip_cfg = config["clip"]
    clip_model = build_open_clip(clip_cfg["model_cfg"]).to(device)
    clip_state = _strip(tensors, "clip.")
    if clip_cfg.get("has_text_tower", True):
        missing, unexpected = clip_model.load_state_dict(clip_state, strict=False)
        if missing or unexpected:
            raise ModelFileError(f"{path}: CLIP tensors do not match its config: {(missing + unexpected)[:5]}")
    else:
        try:
            clip_model.visual.load_state_dict(_strip(clip_state, "visual."), strict=True)
        except RuntimeError as exc:
            raise ModelFileError(f"{path}: CLIP visual tensors do not match its config: {exc}") from exc
    masq = MasQVisual(
        clip_model.visual,
        fq_init=config["masq"].get("fq_init", "copy"),
        tune=config["masq"].get("tune", "q"),
        extra_projections=tuple(config["masq"].get("extra_projections", ())),
    ).to(device)
    extras = _strip(tensors, "masq.")
    expected = set(_masq_extras(masq))
    if set(extras) != expected:
        bad = sorted(set(extras) ^ expected)[:5]
        raise ModelFileError(f"{path}: MasQ tensors do not match its config: {bad}")
    masq.load_state_dict(extras, strict=False)  # the visual.* half was loaded above; the key sets were checked
    spec = ClipSpec(
        model_name=clip_cfg.get("model_name"),
        model_cfg=clip_cfg["model_cfg"],
        pretrained=str(path),
        weights_id=f"masqclip-file:{clip_cfg.get('text_weights_id')}",
        tokenizer=clip_cfg["tokenizer"],
    )
    text_encoder = None
    if clip_cfg.get("has_text_tower", True):
        text_encoder = TextEncoder(
            clip_model, get_tokenizer(spec), f"{spec.display_name}:{clip_cfg.get('text_weights_id')}"
        )
    vocabulary = None
    if config.get("vocabulary") is not None:
        vocabulary = Vocabulary.from_json(config["vocabulary"], source=f"{path}:vocabulary")
    proposals_state = _strip(tensors, "proposals.") or None
    return MasQClipParts(
        config=config,
        clip_spec=spec,
        masq_visual=masq.eval(),
        text_encoder=text_encoder,
        vocabulary=vocabulary,
        text_embeddings=tensors.get("vocab.text_embeddings"),
        proposals_state=proposals_state,
    )
