"""Model loading: registered names, our model files and official checkpoints → :class:`MasQCLIP`.

The front door of :mod:`masqclip_cli.modeling`. Registered models (:mod:`~masqclip_cli.modeling.registry`) map a name
to a proposal-network config, a CLIP model and the weights file they need. Weights are looked for in the models
folder, ``$MASQCLIP_MODELS_DIR`` (default ``$XDG_DATA_HOME/masqclip/models``, i.e. ``~/.local/share/masqclip/models``);
the ``demo`` model ships inside the package. Nothing is downloaded: a model whose weights are absent raises
:class:`ModelNotAvailableError` saying where to get them and where to put them.

This module also re-exports the names of the lower modules that callers use (``build_model``, ``save_model``,
``resolve_proposal_config`` from :mod:`~masqclip_cli.modeling.builder`; the registry; ``resolve_device`` and
``model_identity`` from :mod:`~masqclip_cli.modeling.runtime`), so ``from masqclip_cli.modeling.factory import ...``
keeps working.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch

from masqclip_cli.modeling.builder import build_model, resolve_proposal_config, save_model
from masqclip_cli.modeling.checkpoint import (
    FORMAT_NAME,
    MODEL_FILE_KINDS,
    ModelFileError,
    load_model_file,
    model_file_errors,
    read_safetensors_metadata,
    sniff_model_file,
)
from masqclip_cli.modeling.convert import (
    ConversionError,
    convert_official,
    official_key_to_ours,
    read_official_checkpoint,
)
from masqclip_cli.modeling.masqclip import MasQCLIP
from masqclip_cli.modeling.proposals.network import build_proposal_network
from masqclip_cli.modeling.registry import (
    BUNDLED_MODELS_DIR,
    DEFAULT_MODEL,
    MODEL_REGISTRY,
    OFFICIAL_WEIGHTS_URL,
    TINY_CLIP_CONFIG,
    ModelNotAvailableError,
    RegisteredModel,
    model_status,
    models_dir,
)
from masqclip_cli.modeling.runtime import model_identity, resolve_device

__all__ = [
    "BUNDLED_MODELS_DIR",
    "DEFAULT_MODEL",
    "MODEL_REGISTRY",
    "OFFICIAL_WEIGHTS_URL",
    "PRECISIONS",
    "TINY_CLIP_CONFIG",
    "ModelNotAvailableError",
    "RegisteredModel",
    "build_model",
    "load_model",
    "model_identity",
    "model_status",
    "models_dir",
    "resolve_device",
    "resolve_proposal_config",
    "save_model",
]

logger = logging.getLogger("masqclip")

PRECISIONS = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def _model_from_file(path: Path, device: str | torch.device) -> MasQCLIP:
    parts = load_model_file(path, device="cpu")
    if parts.proposals_config is None or parts.proposals_state is None:
        raise ModelFileError(f"{path}: holds no proposal network; it cannot segment images")
    with model_file_errors(path):
        network = build_proposal_network(parts.proposals_config).eval()
        missing, unexpected = network.load_state_dict(parts.proposals_state, strict=False)
        if missing or unexpected:
            raise ModelFileError(f"{path}: proposal tensors do not match its config: {(missing + unexpected)[:5]}")
        model = MasQCLIP(network, parts.masq_visual, parts.text_encoder, proposals_config=parts.proposals_config,
                         clip_spec=parts.clip_spec, thresholds=parts.thresholds)
        model.test_size = parts.test_size
        if parts.vocabulary is not None and parts.text_embeddings is not None:
            model.set_text_embeddings(parts.text_embeddings, parts.vocabulary)
    return model


def _model_from_official(path: Path, kind: str) -> MasQCLIP:
    """Convert an official checkpoint (any kind but our model file) on the fly, every failure naming the file."""
    what = MODEL_FILE_KINDS[kind]
    state = read_official_checkpoint(path)
    if not any(official_key_to_ours(key) for key in state):
        sample = ", ".join(repr(key) for key in list(state)[:3])
        header = " without the masqclip header" if kind == "safetensors" else ""
        raise ModelFileError(
            f"{path}: {what}{header}, but neither a masqclip model file nor an official MasQCLIP checkpoint "
            f"(none of its {len(state)} tensors has a MasQCLIP name; it has {sample})"
        )
    try:
        model, report = convert_official(state)
    except ConversionError as exc:
        raise ConversionError(f"{path}: {what} read as an official MasQCLIP checkpoint: {exc}") from exc
    logger.warning("%s is %s, not a masqclip model file: converted it as an official MasQCLIP checkpoint "
                   "(`masqclip convert` saves the result)", path, what)
    for line in report.lines():
        logger.info("%s", line)
    return model


def _missing_weights_message(entry: RegisteredModel, path: Path) -> str:
    return (
        f"model '{entry.name}' needs weights that are not on this machine: {path} is missing. "
        + entry.source.replace("{path}", str(path))
        + f". Set MASQCLIP_MODELS_DIR to keep models elsewhere. Available now: {', '.join(_available_names())}"
    )


def _available_names() -> list[str]:
    return [name for name, entry in MODEL_REGISTRY.items() if model_status(entry)[0]]


def load_model(
    source: str | Path,
    device: str | torch.device = "cpu",
    precision: str = "fp32",
) -> MasQCLIP:
    """Load a model by registered name, from our model file, or from an official checkpoint (converted on the fly).

    Args:
        source: a ``MODEL_REGISTRY`` name, a path to our ``.safetensors`` model file, or a path to an official
            detectron2-format MasQCLIP checkpoint (``.pth``).
        device: torch device.
        precision: ``fp32``, ``bf16`` or ``fp16`` for the proposal network and the CLIP visual tower (the text tower
            and all outputs stay float32).

    A file's kind is decided by its content (:func:`~masqclip_cli.modeling.checkpoint.sniff_model_file`), not by its
    name: a safetensors file with the masqclip header is our model file; any other safetensors, PyTorch zip or
    pickle file is read as an official checkpoint (``torch.load(weights_only=True)``: a pickle of other Python
    objects is refused, never run).

    Raises:
        ModelNotAvailableError: a registered model's weights are absent (the message says what to do).
        ModelFileError / ConversionError (both ValueError): a file that is not a usable model; one line that names
            the file and says what it is (not a model file, truncated safetensors, refused pickle, ...).
    """
    if precision not in PRECISIONS:
        raise ValueError(f"unknown precision '{precision}' (use {', '.join(PRECISIONS)})")
    source_str = str(source)
    if source_str in MODEL_REGISTRY and not Path(source_str).exists():
        entry = MODEL_REGISTRY[source_str]
        if entry.random:
            model = build_model(entry.proposals, entry.clip_model, None, thresholds=entry.thresholds)
        else:
            available, path = model_status(entry)
            if not available:
                raise ModelNotAvailableError(_missing_weights_message(entry, path))
            model = _model_from_file(path, device)
    else:
        path = Path(source_str).expanduser()
        if not path.is_file():
            raise ModelNotAvailableError(
                f"{source_str}: no such model file or registered model (registered: {', '.join(MODEL_REGISTRY)})"
            )
        kind = sniff_model_file(path)  # by content, not by name
        if kind == "safetensors" and read_safetensors_metadata(path).get("format") == FORMAT_NAME:
            model = _model_from_file(path, device)
        else:
            model = _model_from_official(path, kind)
    dtype = PRECISIONS[precision]
    model = model.to(device)
    model.proposals.to(dtype)
    model.masq.to(dtype)
    return model.eval()
