"""Official MasQCLIP checkpoints (detectron2 format) → our model.

An official file is ``{"model": state_dict, ...}`` or a bare state_dict. Teacher/student files hold the proposal
network only (``backbone.*``, ``sem_seg_head.*``); MasQ-tuning files add the CLIP visual branch
(``masqclip.visual.*``), the new query projections (``...attn.new_q_proj.*``) and ``masqclip.mask_embeddings``.
``criterion.empty_weight`` is a loss buffer and is ignored. The CLIP text tower is never in those files: it comes from
open_clip (a pretrained tag or a local weights file).

Key map (official → ours):

| official | ours |
|---|---|
| ``backbone.X`` | ``proposals.backbone.X`` |
| ``sem_seg_head.pixel_decoder.X`` | ``proposals.pixel_decoder.X`` |
| ``sem_seg_head.predictor.X`` | ``proposals.predictor.X`` |
| ``masqclip.visual.transformer.resblocks.{i}.attn.new_q_proj.{weight,bias}`` | ``masq.q_proj_new.{i}.{weight,bias}`` |
| ``masqclip.visual.X`` | ``masq.visual.X`` |
| ``masqclip.mask_embeddings`` | ``masq.mask_pos_embed`` |

Unknown, missing and mis-shaped keys stop the conversion, naming them, unless ``allow_partial`` is set; the report
then lists exactly what was skipped and what was left at initial values. The file's ``mask_embeddings`` is kept;
``tie_mask_embeddings`` reproduces the official loader, where ``positional_embedding[0]`` overwrites it (the two
share storage there; golden README, "Storage aliasing").
"""

from __future__ import annotations

import pickle
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from masqclip_cli.modeling.builder import build_model, save_model
from masqclip_cli.modeling.masqclip import MasQCLIP
from masqclip_cli.modeling.proposals.network import map_official_key

__all__ = [
    "IGNORED_OFFICIAL_KEYS",
    "ConversionError",
    "ConversionReport",
    "convert_checkpoint_file",
    "convert_official",
    "official_key_to_ours",
    "read_official_checkpoint",
]

IGNORED_OFFICIAL_KEYS = frozenset({"criterion.empty_weight"})
_NEW_Q = re.compile(r"^masqclip\.visual\.transformer\.resblocks\.(\d+)\.attn\.new_q_proj\.(weight|bias)$")


class ConversionError(ValueError):
    """An official checkpoint that cannot be converted as asked; the message names the keys or the file."""


def official_key_to_ours(key: str) -> str | None:
    """Our name for an official key, or None when the key has no counterpart (unknown)."""
    if key == "masqclip.mask_embeddings":
        return "masq.mask_pos_embed"
    match = _NEW_Q.match(key)
    if match:
        return f"masq.q_proj_new.{match.group(1)}.{match.group(2)}"
    if key.startswith("masqclip.visual."):
        return "masq.visual." + key[len("masqclip.visual.") :]
    proposal_key = map_official_key(key)
    return None if proposal_key is None else "proposals." + proposal_key


def read_official_checkpoint(path: str | Path) -> dict[str, torch.Tensor]:
    """The state_dict of an official checkpoint file (``{"model": ...}`` wrapper or bare), loaded without pickles
    of arbitrary objects (``weights_only=True``)."""
    path = Path(path)
    if not path.is_file():
        raise ConversionError(f"{path}: checkpoint file not found")
    try:
        obj = torch.load(str(path), map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, ValueError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ConversionError(f"{path}: not a loadable PyTorch checkpoint of tensors ({first})") from exc
    if isinstance(obj, dict) and isinstance(obj.get("model"), dict):
        obj = obj["model"]
    if not isinstance(obj, dict) or not obj:
        raise ConversionError(f"{path}: holds no state_dict (expected a dict of tensors or {{'model': ...}})")
    bad = [k for k, v in obj.items() if not isinstance(v, torch.Tensor)]
    if bad:
        raise ConversionError(f"{path}: entries that are not tensors: {', '.join(map(str, bad[:5]))}")
    return obj


@dataclass
class ConversionReport:
    """What a conversion did.

    Attributes:
        kind: ``masq`` (MasQ-tuning file: proposals + CLIP visual + f_Q') or ``proposals`` (teacher/student file).
        loaded: number of tensors taken from the file.
        ignored: official keys deliberately ignored (``criterion.empty_weight``).
        unknown: official keys with no counterpart (skipped).
        mismatched: (our key, shape in file, our shape) of skipped tensors.
        left_at_init: our keys not set from the file (initial values kept).
        notes: further lines (where the CLIP side came from, tying).
    """

    kind: str
    loaded: int = 0
    ignored: list[str] = field(default_factory=list)
    unknown: list[str] = field(default_factory=list)
    mismatched: list[tuple[str, tuple[int, ...], tuple[int, ...]]] = field(default_factory=list)
    left_at_init: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    @property
    def complete(self) -> bool:
        return not (self.unknown or self.mismatched or self.left_at_init)

    def lines(self) -> list[str]:
        """Human-readable report, one fact per line."""
        out = [f"official {self.kind} checkpoint: {self.loaded} tensors loaded"]
        out += [f"ignored (loss-only): {k}" for k in self.ignored]
        out += [f"unknown key skipped: {k}" for k in self.unknown]
        out += [f"shape mismatch skipped: {k} file {list(a)} model {list(b)}" for k, a, b in self.mismatched]
        out += [f"left at initial values: {k}" for k in self.left_at_init]
        return out + self.notes


def convert_official(
    state_dict: dict[str, torch.Tensor],
    proposals: str | dict[str, Any] = "m2f-r50",
    clip_model: str | dict[str, Any] = "ViT-L-14-336-quickgelu",
    clip_pretrained: str | Path | None = "openai",
    allow_partial: bool = False,
    tie_mask_embeddings: bool = False,
    fq_init: str = "copy",
    thresholds: dict[str, float] | None = None,
) -> tuple[MasQCLIP, ConversionReport]:
    """Build our model from an official state_dict.

    Args:
        state_dict: official tensors (see :func:`read_official_checkpoint`).
        proposals: the proposal-network geometry (``m2f-r50`` for the published files) or a config dict.
        clip_model: the open_clip model of the CLIP branch (``ViT-L-14-336-quickgelu`` for the published files).
        clip_pretrained: where the text tower (and, for proposal-only files, the visual tower) comes from: an open_clip
            tag, a local weights file, or None for random weights (tests; a fixed text bank).
        allow_partial: convert despite unknown, missing or mis-shaped keys, reporting them.
        tie_mask_embeddings: set mask_pos_embed := positional_embedding[0], as the official loader does.
        fq_init: how f_Q' is initialised when the file has none (proposal-only files).
        thresholds: post-processing defaults stored with the model.

    Returns:
        (model, report). Raises :class:`ConversionError` on an incomplete conversion without ``allow_partial``.
    """
    kind = "masq" if any(k.startswith("masqclip.") for k in state_dict) else "proposals"
    model = build_model(proposals, clip_model, clip_pretrained, fq_init=fq_init, seed=0, thresholds=thresholds)
    target = model.state_dict()
    expected = {k for k in target if kind == "masq" or k.startswith("proposals.")}
    report = ConversionReport(kind=kind)
    mapped: dict[str, torch.Tensor] = {}
    for key, value in state_dict.items():
        if key in IGNORED_OFFICIAL_KEYS:
            report.ignored.append(key)
            continue
        ours = official_key_to_ours(key)
        if ours is None or ours not in expected:
            report.unknown.append(key)
            continue
        if tuple(value.shape) != tuple(target[ours].shape):
            report.mismatched.append((key, tuple(value.shape), tuple(target[ours].shape)))
            continue
        mapped[ours] = value
    report.left_at_init = sorted(expected - set(mapped))  # includes the targets of mis-shaped tensors
    if not report.complete and not allow_partial:
        problems = (
            [f"unknown key '{k}'" for k in report.unknown]
            + [f"'{k}' has shape {list(a)}, the model expects {list(b)}" for k, a, b in report.mismatched]
            + [f"no tensor for '{k}'" for k in report.left_at_init if not any(
                official_key_to_ours(m) == k for m, _, _ in report.mismatched)]
        )
        more = f" (and {len(problems) - 5} more)" if len(problems) > 5 else ""
        raise ConversionError(
            "checkpoint does not match the model: " + "; ".join(problems[:5]) + more
            + " (pass allow_partial=True to convert anyway and report what was skipped)"
        )
    missing, unexpected = model.load_state_dict(mapped, strict=False)
    assert not unexpected, unexpected
    report.loaded = len(mapped)
    masq = model.masq
    if kind == "proposals":
        report.notes.append(
            f"CLIP from open_clip ({model.clip_spec.display_name}, {clip_pretrained or 'random weights'}); "
            f"f_Q' {fq_init}-initialised (untuned): a zero-shot MasQ baseline"
        )
    else:
        report.notes.append(f"CLIP text tower from open_clip ({model.clip_spec.display_name}, "
                            f"{clip_pretrained or 'random weights'})")
    if tie_mask_embeddings:
        with torch.no_grad():
            masq.mask_pos_embed.copy_(masq.visual.positional_embedding[0])
        report.notes.append("mask_embeddings tied: set to positional_embedding[0] as the official loader does")
    return model.eval(), report


def convert_checkpoint_file(src: str | Path, dst: str | Path, **kwargs: Any) -> ConversionReport:
    """Convert an official checkpoint file into our model file (written atomically); kwargs as
    :func:`convert_official`."""
    model, report = convert_official(read_official_checkpoint(src), **kwargs)
    save_model(model, dst, extra={"converted_from": str(src), "conversion": report.lines()})
    return report
