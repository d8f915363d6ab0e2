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

Files are read by content (:func:`~masqclip_cli.modeling.checkpoint.sniff_model_file`): a PyTorch zip or pickle
checkpoint is loaded with ``torch.load(weights_only=True)`` only, so a pickle that would build other Python objects
(and could run code) is refused, naming what it holds; a safetensors file of official keys is read with safetensors.
"""

from __future__ import annotations

import io
import pickletools
import re
import warnings
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from masqclip_cli.modeling.builder import build_model, save_model
from masqclip_cli.modeling.checkpoint import (
    FORMAT_NAME,
    MODEL_FILE_KINDS,
    ModelFileError,
    _one_line,
    read_safetensors_metadata,
    sniff_model_file,
)
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
    "refused_pickle_message",
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
    """The state_dict of an official checkpoint file (``{"model": ...}`` wrapper or bare).

    The file's kind is decided by its content: a PyTorch zip or pickle checkpoint is loaded with
    ``torch.load(weights_only=True)`` (never anything that could run code), a safetensors file of official keys with
    safetensors.

    Raises:
        ConversionError: one line naming the file and saying what it is: missing, not a model file at all, truncated
            or corrupt, a pickle refused for safety (:func:`refused_pickle_message`), already our model file, or a
            checkpoint that holds no dict of tensors.
    """
    path = Path(path)
    if not path.is_file():
        raise ConversionError(f"{path}: checkpoint file not found")
    try:
        kind = sniff_model_file(path, expected="a loadable PyTorch checkpoint")
        if kind == "safetensors":
            obj = _read_safetensors_state(path)
        else:
            obj = _torch_load_tensors(path, kind)
    except ModelFileError as exc:
        raise ConversionError(str(exc)) from exc
    what = MODEL_FILE_KINDS[kind]
    if isinstance(obj, dict) and isinstance(obj.get("model"), dict):
        obj = obj["model"]
    if not isinstance(obj, dict) or not obj:
        raise ConversionError(
            f"{path}: {what} that holds no state_dict (expected a dict of tensors or {{'model': ...}})"
        )
    not_named = [k for k in obj if not isinstance(k, str)]
    if not_named:
        raise ConversionError(f"{path}: {what} with keys that are not names: {', '.join(map(repr, not_named[:5]))}")
    bad = [k for k, v in obj.items() if not isinstance(v, torch.Tensor)]
    if bad:
        raise ConversionError(f"{path}: entries that are not tensors: {', '.join(map(str, bad[:5]))}")
    return obj


def _read_safetensors_state(path: Path) -> dict[str, torch.Tensor]:
    """The tensors of a safetensors file that is not our model file (an official state_dict saved as safetensors)."""
    meta = read_safetensors_metadata(path)  # truncation and corruption, named
    if meta.get("format") == FORMAT_NAME:
        raise ConversionError(f"{path}: already a masqclip model file: nothing to convert (use it as it is)")
    from safetensors.torch import load_file

    try:
        return load_file(str(path))
    except Exception as exc:  # noqa: BLE001 - SafetensorError and whatever a damaged file makes the library raise
        raise ConversionError(f"{path}: corrupt safetensors file, its tensors do not load ({_one_line(exc)})") from exc


def _torch_load_tensors(path: Path, kind: str) -> Any:
    """``torch.load(weights_only=True)`` of a zip or pickle checkpoint, every failure a one-line ConversionError."""
    what = MODEL_FILE_KINDS[kind]
    if kind == "pytorch-zip":
        try:
            with zipfile.ZipFile(path) as archive:
                names = archive.namelist()
        except zipfile.BadZipFile as exc:
            raise ConversionError(
                f"{path}: a zip file (the PyTorch checkpoint format), but truncated or corrupt (its zip directory is "
                "missing or damaged)"
            ) from exc
        except Exception as exc:  # noqa: BLE001 - what a damaged directory makes zipfile raise
            raise ConversionError(f"{path}: a zip file, but truncated or corrupt ({_one_line(exc)})") from exc
        if not any(name == "data.pkl" or name.endswith("/data.pkl") for name in names):
            raise ConversionError(f"{path}: a zip archive, but not a PyTorch checkpoint (no data.pkl inside)")
        if any(name.endswith("/constants.pkl") for name in names):
            raise ConversionError(
                f"{path}: a TorchScript archive, not a checkpoint of tensors (save the model's state_dict() with "
                "torch.save and use that file)"
            )
    try:
        # an open file, not the name: torch.load reads a name ending in .safetensors as safetensors, whatever it holds
        with path.open("rb") as f, warnings.catch_warnings():
            warnings.simplefilter("ignore")  # torch warns (several lines) about pickle protocols; the errors say enough
            return torch.load(f, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - a damaged pickle makes the unpickler raise almost anything
        refused = _refused_globals(path, kind, exc)
        if refused:
            raise ConversionError(refused_pickle_message(path, refused)) from None
        reason = _weights_only_reason(exc) if "Weights only load failed" in str(exc) else _one_line(exc)
        raise ConversionError(
            f"{path}: {what}, but it does not load (truncated, corrupt or not written by torch.save: {reason})"
        ) from None


def refused_pickle_message(path: str | Path, globals_found: list[str]) -> str:
    """The one-line message for a pickle that ``weights_only`` loading refused: what it holds, why it was refused,
    and what to do with a file the user trusts (never: load it with pickles of arbitrary objects allowed)."""
    shown = ", ".join(globals_found[:3]) + (f" and {len(globals_found) - 3} more" if len(globals_found) > 3 else "")
    return (
        f"{path}: refused to load: the checkpoint contains Python objects other than tensors ({shown}), which could "
        "run code when loaded; if you trust this file, load it with the code that made it, re-save the weights as "
        "plain tensors (torch.save(model.state_dict(), 'clean.pth')) and use clean.pth"
    )


_REFUSAL_PATTERNS = (
    re.compile(r"GLOBAL (\S+) was not an allowed global"),
    re.compile(r"unsupported GLOBAL (\S+) whose module"),
    re.compile(r"reduce for unrecognized function (.+?)(?: which belongs to|$)", re.MULTILINE),
    re.compile(r"(?:Can only create new object|Can only build).*but got (.+)$", re.MULTILINE),
)


def _refused_globals(path: Path, kind: str, exc: Exception) -> list[str]:
    """The globals (``module.name``) of a checkpoint that ``weights_only`` loading does not allow, when that is why
    it failed; [] for any other failure (a truncated or corrupt file)."""
    if "Weights only load failed" not in str(exc):
        return []
    found = _unsafe_globals(path, kind)
    if found:
        return found
    for pattern in _REFUSAL_PATTERNS:
        match = pattern.search(str(exc))
        if match:
            return [match.group(1).strip()]
    return []


def _weights_only_reason(exc: Exception) -> str:
    """The unpickler's own reason in torch's long ``Weights only load failed`` message (its last paragraph that is
    not advice), on one line."""
    paragraphs = [" ".join(p.split()) for p in str(exc).split("\n\n") if p.strip()]
    reasons = [p for p in paragraphs if not p.startswith(("Weights only load failed", "Check the documentation"))]
    return (reasons[-1] if reasons else "the pickle does not unpickle")[:300]


#: How much of a pickle checkpoint is scanned for globals (the pickles come first, the tensor bytes after them).
_SCAN_BYTES = 64 << 20


def _unsafe_globals(path: Path, kind: str) -> list[str]:
    """The globals a checkpoint's pickles name that ``weights_only`` loading does not allow, found by reading the
    pickle opcodes (nothing is unpickled)."""
    try:
        if kind == "pytorch-zip":
            with path.open("rb") as f:
                return sorted(torch.serialization.get_unsafe_globals_in_checkpoint(f))
        from torch import _weights_only_unpickler

        allowed = set(_weights_only_unpickler._get_allowed_globals())
        with path.open("rb") as f:
            data = f.read(_SCAN_BYTES)
    except Exception:  # noqa: BLE001 - a diagnostic only: without it the generic message is given
        return []
    return list(dict.fromkeys(g for g in _pickle_globals(data) if g not in allowed))


def _pickle_globals(data: bytes) -> list[str]:
    """The ``module.name`` of every GLOBAL / INST / STACK_GLOBAL in the consecutive pickles at the start of
    ``data`` (a legacy ``torch.save`` file is several pickles, then raw tensor bytes), read with :mod:`pickletools`
    (which never builds objects)."""
    found: list[str] = []
    position = 0
    while position < len(data):
        stream = io.BytesIO(data)
        stream.seek(position)
        strings: list[str] = []
        try:
            for opcode, arg, _pos in pickletools.genops(stream):
                if opcode.name in ("GLOBAL", "INST"):
                    found.append(str(arg).replace(" ", "."))
                elif opcode.name == "STACK_GLOBAL" and len(strings) >= 2:
                    found.append(f"{strings[-2]}.{strings[-1]}")
                elif isinstance(arg, str) and "UNICODE" in opcode.name:
                    strings.append(arg)
        except Exception:  # noqa: BLE001 - the end of the pickles (tensor bytes) or a damaged one
            break
        if stream.tell() <= position:
            break
        position = stream.tell()
    return found


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
