"""The model registry: registered names, where their weights are expected and whether they are on this machine.

Registered models map a name to a proposal-network config, a CLIP model and the weights file they need. Weights are
looked for in the models folder, ``$MASQCLIP_MODELS_DIR`` (default ``$XDG_DATA_HOME/masqclip/models``, i.e.
``~/.local/share/masqclip/models``), except for bundled models (the ``demo`` model), which ship inside the package
(:data:`BUNDLED_MODELS_DIR`, ``masqclip_cli/models/``, package data of the wheel). Nothing here loads a model: see
:mod:`masqclip_cli.modeling.factory`.
"""

from __future__ import annotations

import importlib.resources
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from masqclip_cli.modeling.checkpoint import DEFAULT_THRESHOLDS

__all__ = [
    "DEFAULT_MODEL",
    "BUNDLED_MODELS_DIR",
    "MODEL_REGISTRY",
    "OFFICIAL_WEIGHTS_URL",
    "TINY_CLIP_CONFIG",
    "ModelNotAvailableError",
    "RegisteredModel",
    "model_status",
    "models_dir",
]


def _bundled_models_dir() -> Path:
    """The package's own ``models/`` data folder (a real directory for wheel, editable and source installs)."""
    folder = importlib.resources.files("masqclip_cli").joinpath("models")
    return folder if isinstance(folder, Path) else Path(__file__).resolve().parents[1] / "models"


#: Model files shipped inside the package (``masqclip_cli/models/``: the demo model); package data of the wheel.
BUNDLED_MODELS_DIR: Path = _bundled_models_dir()
#: The model used when none is named (the official COCO-trained MasQCLIP).
DEFAULT_MODEL = "masqclip-coco"
OFFICIAL_WEIGHTS_URL = "https://drive.google.com/drive/folders/1wGpl9k7lEYigvSiI2IMx_V_TBGrzfVNl"

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
        name: the registry name (the ``source`` given to ``load_model``).
        description: one line for listings of the registered models.
        proposals: a key of ``PROPOSAL_CONFIGS``.
        clip_model: an open_clip model name or config dict.
        clip_pretrained: the open_clip pretrained tag of its CLIP (None: random).
        filename: our model file expected in the models folder; None for random-weight models.
        source: where the weights are published and how to make the file, for the instructions.
        thresholds: post-processing defaults.
        bundled: the file ships inside the package (:data:`BUNDLED_MODELS_DIR`), not in the models folder.
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
        source="the demo model ships inside the masqclip package (masqclip_cli/models/demo.safetensors); rebuild it "
        "from a clone of the repository with python scripts/build_demo_model.py (writes {path})",
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
