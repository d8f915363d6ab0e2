"""Building open_clip models from a name, a pretrained tag, a local weights file or a config dict.

Nothing here downloads silently in tests: with ``pretrained=None`` the model is randomly initialised. A pretrained
tag is handed to open_clip, which looks in its cache and may try to download; when that fails (offline) a
:class:`WeightsNotFoundError` says which weights are missing and how to provide them as a local file.
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import json
import logging
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import open_clip
import torch
from torch import nn

__all__ = [
    "ClipSpec",
    "WeightsNotFoundError",
    "build_open_clip",
    "create_open_clip",
    "get_tokenizer",
    "model_config",
    "tensor_digest",
]


class WeightsNotFoundError(FileNotFoundError):
    """Weights that are needed are not available on this machine; the message says how to provide them."""


@dataclass(frozen=True)
class ClipSpec:
    """What a created open_clip model is: enough to rebuild it and to key caches on it.

    Attributes:
        model_name: open_clip model name (``ViT-B-16``), or None for a custom config.
        model_cfg: the full open_clip model config (``embed_dim``, ``vision_cfg``, ``text_cfg``, ``quick_gelu``).
        pretrained: the pretrained tag or local weights file as given, or None for random weights.
        weights_id: an identity of the weights (tag, file path + size + mtime, or a digest of random tensors).
        tokenizer: ``{"name": open_clip model name or "simple", "context_length": int}``.
    """

    model_name: str | None
    model_cfg: dict[str, Any]
    pretrained: str | None
    weights_id: str
    tokenizer: dict[str, Any]

    @property
    def image_size(self) -> int:
        """Input resolution of the vision tower (square)."""
        size = self.model_cfg["vision_cfg"].get("image_size", 224)
        return int(size[0] if isinstance(size, (list, tuple)) else size)

    @property
    def display_name(self) -> str:
        return self.model_name or "custom"


def model_config(model: str | dict[str, Any]) -> tuple[str | None, dict[str, Any]]:
    """Resolve an open_clip model name or config dict into (name or None, a deep-copied config dict)."""
    if isinstance(model, dict):
        cfg = copy.deepcopy(model)
        missing = [k for k in ("embed_dim", "vision_cfg", "text_cfg") if k not in cfg]
        if missing:
            raise ValueError(f"open_clip model config lacks {', '.join(missing)}")
        return None, cfg
    cfg = open_clip.get_model_config(model)
    if cfg is None:
        known = ", ".join(m for m in open_clip.list_models() if m.startswith("ViT-"))[:600]
        raise ValueError(f"unknown open_clip model '{model}' (ViT models include: {known}, ...)")
    cfg = copy.deepcopy(cfg)
    if model.endswith("-quickgelu"):
        cfg["quick_gelu"] = True
    return model, cfg


def build_open_clip(model_cfg: dict[str, Any]) -> nn.Module:
    """A randomly initialised open_clip ``CLIP`` (or ``CustomTextCLIP``) from a config dict, in eval mode."""
    cfg = copy.deepcopy(model_cfg)
    custom_text = cfg.pop("custom_text", False) or "hf_model_name" in cfg.get("text_cfg", {})
    cfg.pop("multimodal_cfg", None)
    cls = open_clip.model.CustomTextCLIP if custom_text else open_clip.model.CLIP
    model = cls(**cfg)
    return model.eval()


def tensor_digest(tensors: dict[str, torch.Tensor] | nn.Module, prefix: str = "") -> str:
    """sha256 over names, shapes, dtypes and bytes of the tensors (of a module's state_dict) whose name starts with
    ``prefix``; a stable identity for random or in-memory weights."""
    state = tensors.state_dict() if isinstance(tensors, nn.Module) else tensors
    h = hashlib.sha256()
    for name in sorted(state):
        if not name.startswith(prefix):
            continue
        t = state[name].detach().to("cpu").contiguous().reshape(-1)
        h.update(f"{name}|{tuple(t.shape)}|{t.dtype}|".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def _file_identity(path: Path) -> str:
    st = path.stat()
    return f"file:{path.resolve()}:{st.st_size}:{st.st_mtime_ns}"


def create_open_clip(
    model: str | dict[str, Any], pretrained: str | Path | None = None
) -> tuple[nn.Module, ClipSpec]:
    """Create an open_clip model in eval mode.

    Args:
        model: an open_clip model name (``ViT-L-14-336-quickgelu``) or a model config dict.
        pretrained: an open_clip pretrained tag (``openai``), a local weights file, or None for random weights.

    Returns:
        (model, spec). Raises :class:`WeightsNotFoundError` when the weights are not available offline.
    """
    name, cfg = model_config(model)
    tokenizer = {
        "name": name or "simple",
        "context_length": int(cfg["text_cfg"].get("context_length", 77)),
    }
    if pretrained is None:
        clip = build_open_clip(cfg)
        spec = ClipSpec(name, cfg, None, f"random:{tensor_digest(clip)}", tokenizer)
        return clip, spec

    path = Path(pretrained).expanduser()
    looks_like_file = path.suffix in {".pt", ".pth", ".bin", ".safetensors", ".ckpt"} or len(path.parts) > 1
    if path.is_file():
        clip = build_open_clip(cfg)
        try:
            open_clip.load_checkpoint(clip, str(path))
        except Exception as exc:  # noqa: BLE001 - re-raised with the file named
            raise ValueError(f"{path}: cannot load open_clip weights: {exc}".splitlines()[0]) from exc
        return clip.eval(), ClipSpec(name, cfg, str(path), _file_identity(path), tokenizer)
    if looks_like_file:
        raise WeightsNotFoundError(f"{path}: CLIP weights file not found")
    if name is None:
        raise WeightsNotFoundError(
            f"pretrained tag '{pretrained}' needs an open_clip model name; with a custom config pass a weights file"
        )
    tags = open_clip.list_pretrained_tags_by_model(name)
    if str(pretrained) not in tags:
        raise ValueError(f"open_clip has no pretrained tag '{pretrained}' for {name} (known: {', '.join(tags)})")
    try:
        with _hub_offline_unless_allowed():
            clip = open_clip.create_model(name, pretrained=str(pretrained))
    except Exception as exc:  # noqa: BLE001 - offline: the hub is unreachable
        raise WeightsNotFoundError(
            f"weights for open_clip {name} '{pretrained}' are not in the local cache and could not be downloaded "
            f"({type(exc).__name__}); download them on a connected machine, or here with "
            f"MASQCLIP_ALLOW_DOWNLOAD=1 (open_clip.create_model('{name}', pretrained='{pretrained}') fills the "
            "cache), or pass the weights file path instead of the tag"
        ) from exc
    return clip.eval(), ClipSpec(name, cfg, str(pretrained), f"{name}/{pretrained}", tokenizer)


@contextlib.contextmanager
def _hub_offline_unless_allowed() -> Iterator[None]:
    """Weights never download silently: the hub is offline unless ``MASQCLIP_ALLOW_DOWNLOAD=1``."""
    if os.environ.get("MASQCLIP_ALLOW_DOWNLOAD") == "1":
        yield
        return
    import huggingface_hub.constants as hub_constants

    saved = hub_constants.HF_HUB_OFFLINE
    hub_constants.HF_HUB_OFFLINE = True
    logger = logging.getLogger()
    level = logger.level
    logger.setLevel(logging.CRITICAL)  # open_clip logs the failed download as an error before raising
    try:
        yield
    finally:
        hub_constants.HF_HUB_OFFLINE = saved
        logger.setLevel(level)


def get_tokenizer(spec: ClipSpec):  # noqa: ANN201 - open_clip tokenizers share no base class
    """The open_clip tokenizer for a :class:`ClipSpec` (a callable: list[str] -> (n, context_length) int64)."""
    text_cfg = spec.model_cfg.get("text_cfg", {})
    if "hf_tokenizer_name" in text_cfg:
        return open_clip.tokenizer.HFTokenizer(text_cfg["hf_tokenizer_name"])
    if spec.tokenizer["name"] != "simple":
        return open_clip.get_tokenizer(spec.tokenizer["name"])
    return open_clip.tokenizer.SimpleTokenizer(context_length=spec.tokenizer["context_length"])


def spec_to_json(spec: ClipSpec) -> str:
    """JSON text of a spec (for checkpoint headers)."""
    return json.dumps(spec.__dict__, sort_keys=True)
