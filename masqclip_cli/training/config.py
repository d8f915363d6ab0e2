"""Training configuration: one flat set of named values, stage defaults from the official recipe (METHOD.md §3.2),
TOML config files and command-line overrides.

Precedence (lowest first): the stage's defaults (:data:`STAGE_DEFAULTS`), the config file, ``--set key=value``
overrides, then the named command-line options. A config file is TOML; its tables only group keys for reading (their
names are ignored), so ``[optim] lr = 1e-4`` and a top-level ``lr = 1e-4`` are the same. Unknown keys are errors.
"""

from __future__ import annotations

import dataclasses
import json
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10
    import tomli as tomllib

__all__ = ["STAGES", "STAGE_DEFAULTS", "ConfigError", "TrainConfig", "load_config", "parse_override"]

STAGES = ("proposals", "distill", "masq")


class ConfigError(ValueError):
    """A training configuration that cannot be used (the message names the file or option and the problem)."""


@dataclass
class TrainConfig:
    """Every setting of ``masqclip train`` (see docs/training.md for each one)."""

    stage: str = "proposals"
    out: str = "runs/train"
    # --- data
    dataset: str = "coco-panoptic"
    root: str | None = None
    split: str | None = None            # synthetic datasets: the split to train on (default "train")
    images: str | None = None           # dataset path overrides, as for `masqclip eval`
    panoptic_json: str | None = None
    panoptic_dir: str | None = None
    annotations: str | None = None
    labels: str | None = None
    vocab: str | None = None
    classes: str = "auto"               # auto | all | base: the classes trained on (masq stage vocabulary too)
    augment: str = "fixed"              # fixed | lsj | none
    size: int = 1024
    flip: bool = True
    min_scale: float = 0.1
    max_scale: float = 2.0
    workers: int = 2
    # --- model
    proposals: Any = "m2f-r50"          # proposal-network config name or dict (proposals stage)
    init: str | None = None             # model file to start the proposal network from (proposals stage)
    backbone_weights: str | None = None  # torchvision ResNet state_dict (.pth/.safetensors) for the backbone
    teacher: str | None = None          # distill: the teacher model file
    clip: Any = None                    # open_clip model name or config dict (default: the official ViT-L/14@336)
    clip_weights: str | None = None     # open_clip pretrained tag or weights file (None: random)
    tune: str = "q"
    fq_init: str = "copy"
    tie_mask_embeddings: bool = False
    templates: str | None = None        # prompt templates file for the masq stage's text bank
    # --- optimisation
    iterations: int = 200000
    batch_size: int = 16
    lr: float = 1e-4
    weight_decay: float = 0.05
    backbone_lr_multiplier: float = 0.1
    clip_gradient: float = 0.01         # full-model gradient L2-norm clipping (0: off)
    lr_steps: list = field(default_factory=list)  # fractions (< 1) or iterations (>= 1) where the lr is × lr_gamma
    lr_gamma: float = 0.1
    # --- proposal losses (teacher and student)
    class_weight: float = 2.0
    mask_weight: float = 5.0
    dice_weight: float = 5.0
    no_object_weight: float = 0.1
    num_points: int = 12544
    oversample_ratio: float = 3.0
    importance_sample_ratio: float = 0.75
    # --- progressive distillation
    rounds: int = 2
    score_threshold: float = 0.8
    overlap_threshold: float = 0.1
    overlap: str = "dice"
    # --- MasQ-tuning
    assign_threshold: float = 0.6
    background_weight: float = 0.1
    masq_weight: float = 2.0
    # --- infrastructure
    seed: int = 0
    device: str = "auto"
    amp: str = "auto"                   # auto (fp16 on CUDA, off on CPU) | off | fp16 | bf16
    precision: str = "fp32"             # fp32 | fp64 (proposals/distill: exact-equality checks of the arithmetic)
    checkpoint_every: int = 5000
    eval_every: int = 0                 # 0: only at the end when an eval dataset is set
    eval_dataset: str | None = None
    eval_root: str | None = None
    eval_split: str | None = None
    eval_limit: int | None = None
    eval_tasks: str = "auto"            # auto: proposal recall, plus panoptic/semantic/instance for the masq stage
    log_every: int = 20
    resume: bool = True

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


#: The official recipe per stage (METHOD.md §3.2); everything else comes from :class:`TrainConfig`'s defaults.
STAGE_DEFAULTS: dict[str, dict[str, Any]] = {
    "proposals": {"iterations": 200000, "batch_size": 16, "lr": 1e-4, "checkpoint_every": 5000},
    "distill": {"iterations": 30000, "batch_size": 4, "lr": 1e-4, "rounds": 2, "checkpoint_every": 5000},
    "masq": {"iterations": 10000, "batch_size": 4, "lr": 1e-4, "lr_steps": [0.9], "checkpoint_every": 2000},
}

_FIELDS = {f.name: f for f in dataclasses.fields(TrainConfig)}


def _coerce(key: str, value: Any, where: str) -> Any:
    """Check/convert a value to the field's type (ints accepted for floats; JSON for dicts/lists from strings)."""
    f = _FIELDS[key]
    default = f.default if f.default is not dataclasses.MISSING else f.default_factory()  # type: ignore[misc]
    kind = f.type if isinstance(f.type, str) else getattr(f.type, "__name__", str(f.type))
    if value is None:
        if "None" in kind or key in ("proposals", "clip"):
            return None
        raise ConfigError(f"{where}: {key} cannot be empty")
    if isinstance(default, bool):
        if isinstance(value, str) and value.lower() in ("true", "false", "1", "0", "yes", "no"):
            return value.lower() in ("true", "1", "yes")
        if not isinstance(value, bool):
            raise ConfigError(f"{where}: {key} must be true or false, got {value!r}")
        return value
    if kind.startswith("int"):
        try:
            if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
                raise ValueError
            return int(value)
        except (TypeError, ValueError):
            raise ConfigError(f"{where}: {key} must be an integer, got {value!r}") from None
    if kind.startswith("float"):
        try:
            if isinstance(value, bool):
                raise ValueError
            return float(value)
        except (TypeError, ValueError):
            raise ConfigError(f"{where}: {key} must be a number, got {value!r}") from None
    if key == "lr_steps":
        if isinstance(value, str):
            value = [v for v in value.replace(",", " ").split() if v]
        try:
            return [float(v) for v in value]
        except (TypeError, ValueError):
            raise ConfigError(f"{where}: lr_steps must be a list of numbers, got {value!r}") from None
    if key in ("proposals", "clip") and isinstance(value, str) and value.strip().startswith("{"):
        try:
            return json.loads(value)
        except json.JSONDecodeError as exc:
            raise ConfigError(f"{where}: {key} is not valid JSON ({exc})") from None
    if key in ("proposals", "clip") and isinstance(value, dict):
        return value
    if not isinstance(value, str):
        raise ConfigError(f"{where}: {key} must be a string, got {value!r}")
    return value


def _flatten(table: dict[str, Any], where: str, out: dict[str, Any]) -> None:
    for key, value in table.items():
        if isinstance(value, dict) and key not in ("proposals", "clip"):
            _flatten(value, where, out)
            continue
        name = key.replace("-", "_")
        if name not in _FIELDS:
            raise ConfigError(f"{where}: unknown setting '{key}'")
        if name in out:
            raise ConfigError(f"{where}: '{key}' is set twice")
        out[name] = value


def read_config_file(path: str | Path) -> dict[str, Any]:
    """The settings of a TOML config file (flattened; see the module docstring)."""
    path = Path(path)
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError(f"{path}: config file not found") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{path}: cannot read the config file ({exc})") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: not valid TOML ({exc})") from None
    out: dict[str, Any] = {}
    _flatten(data, str(path), out)
    return out


def parse_override(text: str) -> tuple[str, Any]:
    """``key=value`` → ``(key, value)``; the value is parsed as a TOML value when it is one (numbers, booleans,
    lists, inline tables), else kept as a string."""
    if "=" not in text:
        raise ConfigError(f"override {text!r}: expected key=value")
    key, raw = text.split("=", 1)
    key = key.strip().replace("-", "_")
    if key not in _FIELDS:
        raise ConfigError(f"override {text!r}: unknown setting '{key}'")
    raw = raw.strip()
    try:
        value = tomllib.loads(f"v = {raw}")["v"]
    except tomllib.TOMLDecodeError:
        value = raw
    return key, value


def load_config(stage: str, config_file: str | Path | None = None, overrides: list[str] | None = None,
                options: dict[str, Any] | None = None) -> TrainConfig:
    """Build the config of a stage: defaults, then the file, then ``overrides`` (``key=value``), then ``options``
    (named command-line options; None values are ignored)."""
    if stage not in STAGES:
        raise ConfigError(f"unknown training stage '{stage}' (use {', '.join(STAGES)})")
    values: dict[str, Any] = dict(STAGE_DEFAULTS[stage])
    if config_file is not None:
        from_file = read_config_file(config_file)
        if "stage" in from_file and from_file["stage"] != stage:
            raise ConfigError(f"{config_file}: is a config for stage '{from_file['stage']}', not '{stage}'")
        values.update({k: _coerce(k, v, str(config_file)) for k, v in from_file.items()})
    for text in overrides or []:
        key, value = parse_override(text)
        values[key] = _coerce(key, value, f"override {text}")
    for key, value in (options or {}).items():
        if value is not None:
            values[key] = _coerce(key, value, f"--{key.replace('_', '-')}")
    values["stage"] = stage
    config = TrainConfig(**values)
    _validate(config)
    return config


def _validate(c: TrainConfig) -> None:
    checks = [
        (c.iterations >= 1, f"iterations must be at least 1, got {c.iterations}"),
        (c.batch_size >= 1, f"batch_size must be at least 1, got {c.batch_size}"),
        (c.lr > 0, f"lr must be positive, got {c.lr}"),
        (c.weight_decay >= 0, f"weight_decay must be >= 0, got {c.weight_decay}"),
        (c.clip_gradient >= 0, f"clip_gradient must be >= 0, got {c.clip_gradient}"),
        (c.rounds >= 1, f"rounds must be at least 1, got {c.rounds}"),
        (c.checkpoint_every >= 0, f"checkpoint_every must be >= 0, got {c.checkpoint_every}"),
        (c.eval_every >= 0, f"eval_every must be >= 0, got {c.eval_every}"),
        (c.workers >= 0, f"workers must be >= 0, got {c.workers}"),
        (c.log_every >= 1, f"log_every must be at least 1, got {c.log_every}"),
        (c.amp in ("auto", "off", "fp16", "bf16"), f"amp must be auto, off, fp16 or bf16, got {c.amp!r}"),
        (c.precision in ("fp32", "fp64"), f"precision must be fp32 or fp64, got {c.precision!r}"),
        (not (c.precision == "fp64" and c.amp in ("fp16", "bf16")), "precision fp64 cannot be used with amp"),
        (not (c.precision == "fp64" and c.stage == "masq"), "precision fp64 is for the proposals and distill stages"),
        (c.overlap in ("dice", "iou", "dice-points"), f"overlap must be dice, iou or dice-points, got {c.overlap!r}"),
        (c.classes in ("auto", "all", "base"), f"classes must be auto, all or base, got {c.classes!r}"),
        (c.augment in ("fixed", "lsj", "none"), f"augment must be fixed, lsj or none, got {c.augment!r}"),
        (c.fq_init in ("copy", "random"), f"fq_init must be copy or random, got {c.fq_init!r}"),
        (all(s > 0 for s in c.lr_steps), f"lr_steps must be positive, got {c.lr_steps}"),
    ]
    for ok, message in checks:
        if not ok:
            raise ConfigError(message)
    if c.stage == "distill" and not c.teacher:
        raise ConfigError("train distill needs teacher=FILE (the model file of the class-agnostic teacher)")
    if c.stage == "masq" and not c.init:
        raise ConfigError("train masq needs proposals=FILE (the model file whose proposal network is used)")
