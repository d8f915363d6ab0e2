"""Run-time choices made outside the model: which device to run on, a stable identity of a model source, and
``torch.compile`` of a model's forwards with a fallback to eager.

They are library functions so that every caller (the CLI, scripts, notebooks) resolves devices the same way,
fingerprints runs with the same model identity and compiles (or falls back) the same way.
"""

from __future__ import annotations

import hashlib
import os
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from masqclip_cli.modeling.registry import MODEL_REGISTRY, model_status

__all__ = ["COMPILED_PARTS", "IDENTITY_HEAD_BYTES", "compile_model", "is_compiled", "model_identity",
           "resolve_device"]

#: How much of a model file :func:`model_identity` hashes (the header and the first tensors): 1 MiB.
IDENTITY_HEAD_BYTES = 1 << 20


def resolve_device(device: str = "auto") -> str:
    """The torch device to run on.

    Args:
        device: ``auto``, or any torch device string (``cpu``, ``cuda``, ``cuda:1``, ``mps``), returned as given.

    Returns:
        For ``auto``: ``cuda`` when CUDA is available (``cuda:<LOCAL_RANK>`` when ``$LOCAL_RANK`` is set, as under
        torchrun), else ``mps`` when Apple's Metal backend is available, else ``cpu``.
    """
    if device != "auto":
        return device
    if torch.cuda.is_available():
        local_rank = os.environ.get("LOCAL_RANK")
        return f"cuda:{local_rank}" if local_rank is not None else "cuda"
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        return "mps"
    return "cpu"


def model_identity(source: str) -> str:
    """A stable identity of a model source, for run fingerprints.

    Args:
        source: a ``MODEL_REGISTRY`` name or a path to a model file (as given to ``load_model``). A registered
            name is taken as a name only when no file of that name exists, as ``load_model`` does.

    Returns:
        ``registered:<name>`` for a registered model without weights file (random weights); otherwise
        ``file:<sha256 of the file's first MiB>:<file size in bytes>``, for a registered model of the file it
        loads from (so the identity changes when its weights do).

    Raises:
        OSError (FileNotFoundError): the file (or a registered model's weights file) does not exist.
    """
    path = Path(source)
    if source in MODEL_REGISTRY and not path.exists():
        _available, file = model_status(MODEL_REGISTRY[source])
        if file is None:
            return f"registered:{source}"
        path = file
    with path.open("rb") as f:
        head = f.read(IDENTITY_HEAD_BYTES)
    return f"file:{hashlib.sha256(head).hexdigest()}:{path.stat().st_size}"


#: The submodules of a ``MasQCLIP`` whose forwards :func:`compile_model` compiles: the proposal network and the MasQ
#: visual tower (the whole model's own forward buckets images by size and builds per-image results in Python).
COMPILED_PARTS: tuple[str, ...] = ("proposals", "masq")


class _CompileState:
    """Shared by the compiled forwards of one model: after the first failure, every part runs eager."""

    def __init__(self, on_fallback: Callable[[str], None] | None) -> None:
        self.on_fallback = on_fallback
        self.failed: str | None = None

    def fail(self, part: str, exc: BaseException) -> None:
        if self.failed is not None:
            return
        first = (str(exc).strip().splitlines() or [""])[0][:300]
        self.failed = f"torch.compile failed on the model's {part} ({type(exc).__name__}: {first}); running eager"
        if self.on_fallback is not None:
            self.on_fallback(self.failed)
        else:
            warnings.warn(self.failed, RuntimeWarning, stacklevel=3)


class _CompiledForward:
    """A module's forward compiled by ``torch.compile`` (lazily: compilation happens on the first call), falling
    back to the eager forward for good when compiling or running the compiled code raises (out-of-memory errors
    are raised, not hidden: the eager path would fail the same way)."""

    def __init__(self, eager: Callable[..., Any], part: str, state: _CompileState, options: dict[str, Any]) -> None:
        self.eager, self.part, self.state = eager, part, state
        self.compiled: Callable[..., Any] | None = None
        try:
            self.compiled = torch.compile(eager, **options)
        except Exception as exc:  # noqa: BLE001 - any failure to set up compilation means eager
            state.fail(part, exc)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        if self.compiled is not None and self.state.failed is None:
            try:
                return self.compiled(*args, **kwargs)
            except torch.OutOfMemoryError:
                raise
            except Exception as exc:  # noqa: BLE001 - a compiler failure: the same call runs eager
                self.state.fail(self.part, exc)
        return self.eager(*args, **kwargs)


def compile_model(
    model: nn.Module,
    *,
    on_fallback: Callable[[str], None] | None = None,
    parts: Sequence[str] = COMPILED_PARTS,
    **compile_options: Any,
) -> nn.Module:
    """``torch.compile`` the forwards of ``model``'s heavy parts, in place, falling back to eager on failure.

    Compilation happens on each part's first call (and again for new input shapes or dtypes, as ``torch.compile``
    does); if setting it up, compiling or running the compiled code raises anything but an out-of-memory error,
    ``on_fallback`` gets one line saying so (else a ``RuntimeWarning``), that call and every later one of every
    part run the eager forward. Outputs equal eager within float rounding (the compiler may fuse and reorder
    floating-point operations). Compiling an already compiled model does nothing.

    Args:
        model: a ``MasQCLIP`` (any module with the submodules named in ``parts``; a module without them has its own
            forward compiled).
        on_fallback: called once with a one-line message when the model falls back to eager.
        parts: the submodules whose forwards are compiled (default :data:`COMPILED_PARTS`).
        **compile_options: passed to ``torch.compile`` (``backend``, ``mode``, ``dynamic``, ...).

    Returns:
        ``model`` itself.
    """
    if is_compiled(model):
        return model
    state = _CompileState(on_fallback)
    modules = [(name, getattr(model, name)) for name in parts if isinstance(getattr(model, name, None), nn.Module)]
    if not modules:
        modules = [("forward", model)]
    for name, module in modules:
        # an instance attribute shadows the class's forward: nn.Module.__call__ calls self.forward
        module.forward = _CompiledForward(module.forward, name, state, dict(compile_options))
    model._masqclip_compile_state = state  # type: ignore[assignment]  # noqa: SLF001 - marks the model compiled
    return model


def is_compiled(model: nn.Module) -> bool:
    """Whether :func:`compile_model` was applied to ``model`` (whether or not it later fell back to eager)."""
    return isinstance(getattr(model, "_masqclip_compile_state", None), _CompileState)
