"""Our model file: one safetensors file with every tensor the model needs and a JSON header.

Tensor names (see docs/model-format.md):

- ``clip.*``: the open_clip ``CLIP`` state_dict (``clip.visual.*`` always; the text tower when saved with it);
- ``masq.*``: the MasQ additions (``masq.mask_pos_embed``, ``masq.q_proj_new.{i}.weight/bias``, optional
  ``masq.k_proj_new.*`` / ``masq.v_proj_new.*``);
- ``proposals.*``: the class-agnostic proposal network, when present;
- ``vocab.text_embeddings``: (N+1, D) precomputed text embeddings of the stored vocabulary, when present.

The safetensors metadata holds ``format`` = ``masqclip``, ``format_version`` and ``config`` (a JSON document). Files are
written to a temporary name and renamed, so an interrupted save never leaves a half-written model.

What a file is, is decided by its content, never by its name (:func:`sniff_model_file`): safetensors (an 8-byte
little-endian header length, then a JSON header starting with ``{``), a PyTorch zip checkpoint (``PK\\x03\\x04``) or a
PyTorch legacy pickle (the ``\\x80`` protocol byte). Every failure to read one is a :class:`ModelFileError` of one line
that names the file and says what it is (empty, text, truncated safetensors, ...).
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from contextlib import contextmanager
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
    "MODEL_FILE_KINDS",
    "ModelFileError",
    "MasQClipParts",
    "model_file_errors",
    "read_header",
    "read_safetensors_metadata",
    "save_model_file",
    "load_model_file",
    "sniff_model_file",
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


#: What :func:`sniff_model_file` returns, and how messages name it.
MODEL_FILE_KINDS: dict[str, str] = {
    "safetensors": "a safetensors file",
    "pytorch-zip": "a PyTorch zip checkpoint",
    "pytorch-pickle": "a pickle (the legacy PyTorch checkpoint format)",
}
#: The largest JSON header the safetensors library accepts (100 MB); a larger "length" is not safetensors.
_MAX_SAFETENSORS_HEADER = 100_000_000
_NEITHER = "neither safetensors, nor a PyTorch zip or pickle"


def _one_line(exc: BaseException, limit: int = 300) -> str:
    """An exception's whole message on one line (whitespace runs joined), cut at ``limit`` characters."""
    text = " ".join(str(exc).split()) or type(exc).__name__
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _describe_unknown(head: bytes, size: int) -> str:
    """What a file that is no model file looks like: ``text starting with '<!DOCTYPE html>'``, ``binary data ...``."""
    if size == 0:
        return "an empty file"
    try:
        text = head.decode("utf-8")
    except UnicodeDecodeError:
        text = None
    if text is not None and all(c.isprintable() or c in "\t\r\n" for c in text):
        start = " ".join(text.split())[:24]
        return f"text starting with {start!r} ({size} bytes)"
    return f"binary data starting with {head[:8].hex(' ')} ({size} bytes)"


def sniff_model_file(path: str | Path, expected: str = "a model file") -> str:
    """The kind of a model file, from its first bytes (never from its name).

    Args:
        path: the file.
        expected: how the message for an unknown content names what was expected (``a model file``, ``a loadable
            PyTorch checkpoint``, ...).

    Returns:
        A :data:`MODEL_FILE_KINDS` key: ``safetensors`` (bytes 0-7: a header length up to 100 MB, byte 8: ``{``),
        ``pytorch-zip`` (``PK\\x03\\x04``) or ``pytorch-pickle`` (``\\x80`` and a protocol 2-5, as ``torch.save`` with
        ``_use_new_zipfile_serialization=False`` and legacy files start).

    Raises:
        ModelFileError: the file is missing or unreadable, or its content is none of those (the message says what it
            looks like: empty, text, binary).
    """
    path = Path(path)
    if not path.is_file():
        raise ModelFileError(f"{path}: model file not found")
    try:
        size = path.stat().st_size
        with path.open("rb") as f:
            head = f.read(64)
    except OSError as exc:
        raise ModelFileError(f"{path}: cannot read the model file ({exc.strerror or exc})") from exc
    if head[:4] == b"PK\x03\x04":
        return "pytorch-zip"
    if len(head) >= 9 and head[8:9] == b"{" and 2 <= int.from_bytes(head[:8], "little") <= _MAX_SAFETENSORS_HEADER:
        return "safetensors"
    if len(head) >= 2 and head[0] == 0x80 and 2 <= head[1] <= 5:
        return "pytorch-pickle"
    raise ModelFileError(f"{path}: not {expected} ({_NEITHER}: {_describe_unknown(head, size)})")


def read_safetensors_metadata(path: str | Path) -> dict[str, str]:
    """The ``__metadata__`` of a safetensors file, after checking that the whole file is there and readable.

    Truncation is named as such: a header length beyond the end of the file, or tensor data (the largest
    ``data_offsets`` end) beyond it. Any other defect (bad JSON, inconsistent offsets, unknown dtypes) is reported as
    a corrupt safetensors file with the reason. Only the header is read, not the tensors.

    Raises:
        ModelFileError: missing, not safetensors by content, truncated or corrupt; one line naming the file.
    """
    path = Path(path)
    kind = sniff_model_file(path, expected="a safetensors model file")
    if kind != "safetensors":
        raise ModelFileError(
            f"{path}: not a safetensors model file (it is {MODEL_FILE_KINDS[kind]}: convert an official MasQCLIP "
            "checkpoint with `masqclip convert`)"
        )
    try:
        size = path.stat().st_size
        with path.open("rb") as f:
            header_len = int.from_bytes(f.read(8), "little")
            if 8 + header_len > size:
                raise ModelFileError(
                    f"{path}: truncated safetensors file (its header says {header_len} header bytes, the file has "
                    f"only {size} bytes in all)"
                )
            raw = f.read(header_len)
    except OSError as exc:
        raise ModelFileError(f"{path}: cannot read the model file ({exc.strerror or exc})") from exc
    try:
        header = json.loads(raw)
    except ValueError as exc:  # JSONDecodeError and UnicodeDecodeError
        raise ModelFileError(f"{path}: corrupt safetensors file (its JSON header does not parse: {exc})") from exc
    if not isinstance(header, dict):
        raise ModelFileError(f"{path}: corrupt safetensors file (its JSON header is not an object)")
    data_end = 0
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        offsets = entry.get("data_offsets") if isinstance(entry, dict) else None
        if not (isinstance(offsets, list) and len(offsets) == 2 and all(type(o) is int for o in offsets)):
            raise ModelFileError(f"{path}: corrupt safetensors file (tensor {name!r} has no valid data_offsets)")
        data_end = max(data_end, offsets[1])
    if 8 + header_len + data_end > size:
        raise ModelFileError(
            f"{path}: truncated safetensors file (its tensor data ends at byte {8 + header_len + data_end}, the file "
            f"has only {size} bytes)"
        )
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
    except Exception as exc:  # noqa: BLE001 - the library's own checks (SafetensorError and others)
        raise ModelFileError(f"{path}: corrupt safetensors file ({_one_line(exc)})") from exc
    return meta


#: What building modules from a damaged header may raise (a corrupt file, not a bug of the caller).
_BUILD_ERRORS = (KeyError, TypeError, ValueError, RuntimeError, AssertionError, AttributeError, IndexError,
                 ZeroDivisionError, OverflowError, MemoryError)


@contextmanager
def model_file_errors(path: str | Path) -> Iterator[None]:
    """Turn what building a model from a file's header and tensors raises into a one-line :class:`ModelFileError`
    naming the file (a ModelFileError passes unchanged)."""
    try:
        yield
    except ModelFileError:
        raise
    except _BUILD_ERRORS as exc:
        raise ModelFileError(
            f"{path}: corrupt model file: its header describes a model that cannot be built from its tensors "
            f"({type(exc).__name__}: {_one_line(exc)})"
        ) from exc


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
    """The ``config`` document of a model file, after checking that the file is ours and of a known version.

    Raises:
        ModelFileError: missing, not safetensors (by content), truncated, corrupt, not ours, or of a newer version.
    """
    path = Path(path)
    meta = read_safetensors_metadata(path)
    if meta.get("format") != FORMAT_NAME or "config" not in meta:
        raise ModelFileError(
            f"{path}: not a masqclip model file (a safetensors file without the '{FORMAT_NAME}' header)"
        )
    try:
        version = int(meta.get("format_version", "0"))
    except ValueError:
        raise ModelFileError(
            f"{path}: corrupt model header (format_version {meta.get('format_version')!r} is not a number)"
        ) from None
    if version > FORMAT_VERSION:
        raise ModelFileError(
            f"{path}: model format version {version} is newer than this masqclip understands ({FORMAT_VERSION}); "
            "upgrade masqclip"
        )
    try:
        config = json.loads(meta["config"])
    except json.JSONDecodeError as exc:
        raise ModelFileError(f"{path}: corrupt model header ({exc})") from exc
    if not isinstance(config, dict) or not isinstance(config.get("clip"), dict):
        raise ModelFileError(f"{path}: corrupt model header (its config is not an object with a 'clip' section)")
    return config


def _strip(tensors: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    return {k[len(prefix) :]: v for k, v in tensors.items() if k.startswith(prefix)}


def load_model_file(path: str | Path, device: str | torch.device = "cpu") -> MasQClipParts:
    """Build the parts stored in a model file (modules in eval mode on ``device``).

    Raises:
        ModelFileError: any defect of the file (see :func:`read_header`; tensors that do not load or do not match
            the header), one line naming the file.
    """
    path = Path(path)
    config = read_header(path)
    try:
        tensors = load_file(str(path), device=str(device))
    except Exception as exc:  # noqa: BLE001 - SafetensorError and whatever a damaged file makes the library raise
        raise ModelFileError(f"{path}: corrupt safetensors file, its tensors do not load ({_one_line(exc)})") from exc
    with model_file_errors(path):
        return _parts_from(path, config, tensors, device)


def _parts_from(path: Path, config: dict[str, Any], tensors: dict[str, torch.Tensor],
                device: str | torch.device) -> MasQClipParts:
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
            raise ModelFileError(f"{path}: CLIP visual tensors do not match its config: {_one_line(exc)}") from exc
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
