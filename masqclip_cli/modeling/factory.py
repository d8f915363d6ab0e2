"""Model registry and loading: registered names, our model files and official checkpoints → :class:`MasQCLIP`.

Registered models map a name to a proposal-network config, a CLIP model and the weights file they need. Weights are
looked for in the models folder, ``$MASQCLIP_MODELS_DIR`` (default ``$XDG_DATA_HOME/masqclip/models``, i.e.
``~/.local/share/masqclip/models``). Nothing is downloaded: a model whose weights are absent raises
:class:`ModelNotAvailableError` saying where to get them and where to put them.
"""

from __future__ import annotations

import copy
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from masqclip_cli.modeling.checkpoint import (
    DEFAULT_THRESHOLDS,
    ModelFileError,
    load_model_file,
    read_header,
    save_model_file,
)
from masqclip_cli.modeling.clip_loader import create_open_clip, get_tokenizer
from masqclip_cli.modeling.masq_visual import MasQVisual
from masqclip_cli.modeling.masqclip import MasQCLIP
from masqclip_cli.modeling.proposals.network import PROPOSAL_CONFIGS, build_proposal_network
from masqclip_cli.modeling.text import TextEncoder

__all__ = [
    "MODEL_REGISTRY",
    "OFFICIAL_WEIGHTS_URL",
    "PRECISIONS",
    "ModelNotAvailableError",
    "RegisteredModel",
    "build_model",
    "load_model",
    "model_status",
    "models_dir",
    "resolve_proposal_config",
    "save_model",
]

logger = logging.getLogger("masqclip")

#: Model files shipped with a clone of the repository (the demo model, in samples/; not part of a wheel).
BUNDLED_MODELS_DIR = Path(__file__).resolve().parents[2] / "samples"
OFFICIAL_WEIGHTS_URL = "https://drive.google.com/drive/folders/1wGpl9k7lEYigvSiI2IMx_V_TBGrzfVNl"
PRECISIONS = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}

# The tiny CLIP used by the tiny test models: the official traits (class token, quick_gelu, head_width = width/heads).
TINY_CLIP_CONFIG: dict[str, Any] = {
    "embed_dim": 32,
    "quick_gelu": True,
    "vision_cfg": {"image_size": 112, "patch_size": 14, "width": 64, "layers": 3, "head_width": 16},
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 64, "heads": 4, "layers": 2},
}


class ModelNotAvailableError(FileNotFoundError):
    """A model's weights are not on this machine; the message says where to get them and where to put them."""


@dataclass(frozen=True)
class RegisteredModel:
    """A named model.

    Attributes:
        name: the registry name (``--model NAME``).
        description: one line for ``masqclip models``.
        proposals: a key of ``PROPOSAL_CONFIGS``.
        clip_model: an open_clip model name or config dict.
        clip_pretrained: the open_clip pretrained tag of its CLIP (None: random).
        filename: our model file expected in the models folder; None for random-weight models.
        source: where the weights are published and how to make the file, for the instructions.
        thresholds: post-processing defaults.
    """

    name: str
    description: str
    proposals: str
    clip_model: str | dict[str, Any]
    clip_pretrained: str | None = None
    filename: str | None = None
    source: str = ""
    thresholds: dict[str, float] = field(default_factory=lambda: dict(DEFAULT_THRESHOLDS))
    bundled: bool = False

    @property
    def random(self) -> bool:
        return self.filename is None


_OFFICIAL_SOURCE = (
    "the official MasQCLIP checkpoints are published at " + OFFICIAL_WEIGHTS_URL + " (MasQ-tuning 'model_final.pth' "
    "of the {setting} setting); download it, then run: masqclip convert model_final.pth --out {path} "
    "(the CLIP text tower comes from open_clip ViT-L-14-336-quickgelu 'openai', or --clip-weights FILE)"
)

MODEL_REGISTRY: dict[str, RegisteredModel] = {
    "masqclip-coco": RegisteredModel(
        name="masqclip-coco",
        description="published cross-dataset model: trained on COCO-panoptic, R50 proposals + CLIP ViT-L/14@336",
        proposals="m2f-r50",
        clip_model="ViT-L-14-336-quickgelu",
        clip_pretrained="openai",
        filename="masqclip-coco.safetensors",
        source=_OFFICIAL_SOURCE.replace("{setting}", "cross-dataset (COCO-panoptic)"),
    ),
    "masqclip-coco-instance": RegisteredModel(
        name="masqclip-coco-instance",
        description="published base-novel model: trained on COCO-48 instances, R50 proposals + CLIP ViT-L/14@336",
        proposals="m2f-r50",
        clip_model="ViT-L-14-336-quickgelu",
        clip_pretrained="openai",
        filename="masqclip-coco-instance.safetensors",
        source=_OFFICIAL_SOURCE.replace("{setting}", "base-novel (COCO instance 48/17)"),
    ),
    "demo": RegisteredModel(
        name="demo",
        description="the project's demo model, trained on the synthetic shapes world only (scripts/build_demo_model.py)"
        ": knows shapes, colours and textures, not real images",
        proposals="demo",
        clip_model="shapes-clip",
        filename="demo.safetensors",
        source="the demo model ships with a clone of the repository (samples/demo.safetensors); rebuild it with "
        "python scripts/build_demo_model.py (writes {path})",
        bundled=True,
    ),
    "full-random": RegisteredModel(
        name="full-random",
        description="the published geometry (m2f-r50 + ViT-L-14-336-quickgelu) with random weights: for benchmarks",
        proposals="m2f-r50",
        clip_model="ViT-L-14-336-quickgelu",
    ),
    "tiny-random": RegisteredModel(
        name="tiny-random",
        description="a tiny model with random weights: for tests and trying the pipeline (outputs are noise)",
        proposals="tiny",
        clip_model=TINY_CLIP_CONFIG,
    ),
}


def models_dir() -> Path:
    """``$MASQCLIP_MODELS_DIR``, else ``$XDG_DATA_HOME/masqclip/models`` (``~/.local/share/masqclip/models``)."""
    env = os.environ.get("MASQCLIP_MODELS_DIR")
    if env:
        return Path(env).expanduser()
    xdg = os.environ.get("XDG_DATA_HOME")
    return (Path(xdg).expanduser() if xdg else Path.home() / ".local" / "share") / "masqclip" / "models"


def model_status(entry: RegisteredModel) -> tuple[bool, Path | None]:
    """(available, expected path) of a registered model; random-weight models are always available."""
    if entry.random:
        return True, None
    path = (BUNDLED_MODELS_DIR if entry.bundled else models_dir()) / entry.filename
    return path.is_file(), path


def resolve_proposal_config(proposals: str | dict[str, Any]) -> dict[str, Any]:
    """A proposal-network config from a ``PROPOSAL_CONFIGS`` name or a config dict (deep copy)."""
    if isinstance(proposals, dict):
        return copy.deepcopy(proposals)
    if proposals not in PROPOSAL_CONFIGS:
        raise ValueError(f"unknown proposal network '{proposals}' (known: {', '.join(PROPOSAL_CONFIGS)})")
    return copy.deepcopy(PROPOSAL_CONFIGS[proposals])


def build_model(
    proposals: str | dict[str, Any],
    clip_model: str | dict[str, Any],
    clip_pretrained: str | Path | None = None,
    fq_init: str = "copy",
    seed: int | None = 0,
    thresholds: dict[str, float] | None = None,
) -> MasQCLIP:
    """A model with a randomly initialised proposal network and the given CLIP (random, a tag or a file).

    Args:
        proposals: a ``PROPOSAL_CONFIGS`` name (``m2f-r50``, ``tiny``) or a config dict.
        clip_model: an open_clip model name or config dict.
        clip_pretrained: open_clip pretrained tag, weights file, or None for random CLIP weights.
        fq_init: ``copy`` (f_Q' = CLIP's f_Q) or ``random``.
        seed: seeds the random initialisation (None: leave the global RNG alone).
        thresholds: post-processing defaults stored with the model.
    """
    if seed is not None:
        torch.manual_seed(seed)
    proposal_config = resolve_proposal_config(proposals)
    network = build_proposal_network(proposal_config).eval()
    clip, spec = create_open_clip(clip_model, clip_pretrained)
    masq = MasQVisual(clip.visual, fq_init=fq_init).eval()
    text_encoder = TextEncoder(clip, get_tokenizer(spec), spec.weights_id)
    model = MasQCLIP(network, masq, text_encoder, proposals_config=proposal_config, clip_spec=spec,
                     thresholds=thresholds)
    return model.eval()


def save_model(model: MasQCLIP, path: str | Path, extra: dict[str, Any] | None = None,
               storage_dtype: torch.dtype | None = None) -> Path:
    """Write a model (with its text tower and, when set, its vocabulary) as our model file (``storage_dtype``:
    e.g. ``torch.float16`` to store the weights in half precision, read back as float32)."""
    vocabulary = model.vocabulary
    return save_model_file(
        path,
        model.masq,
        model.clip_spec,
        clip_model=model.text_encoder.model if model.text_encoder is not None else None,
        proposals=model.proposals,
        proposals_config=model.proposals_config,
        vocabulary=vocabulary,
        text_embeddings=model.text_embeddings.cpu() if vocabulary is not None else None,
        thresholds=model.thresholds,
        extra=extra,
        test_size=model.test_size,
        storage_dtype=storage_dtype,
    )


def _model_from_file(path: Path, device: str | torch.device) -> MasQCLIP:
    parts = load_model_file(path, device="cpu")
    if parts.proposals_config is None or parts.proposals_state is None:
        raise ModelFileError(f"{path}: holds no proposal network; it cannot segment images")
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

    Raises:
        ModelNotAvailableError: a registered model's weights are absent (the message says what to do).
        ModelFileError / ValueError: a file that is not a usable model.
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
        try:
            read_header(path)
            is_ours = True
        except ModelFileError:
            is_ours = False
        if is_ours:
            model = _model_from_file(path, device)
        else:
            from masqclip_cli.modeling.convert import convert_official, read_official_checkpoint

            logger.warning("%s is not a masqclip model file: converting it as an official checkpoint", path)
            model, report = convert_official(read_official_checkpoint(path))
            for line in report.lines():
                logger.info("%s", line)
    dtype = PRECISIONS[precision]
    model = model.to(device)
    model.proposals.to(dtype)
    model.masq.to(dtype)
    return model.eval()
