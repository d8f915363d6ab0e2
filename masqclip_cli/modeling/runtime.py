"""Run-time choices made outside the model: which device to run on, and a stable identity of a model source.

Both used to live in the command line; they are library functions so that every caller (the CLI, scripts,
notebooks) resolves devices the same way and fingerprints runs with the same model identity.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import torch

from masqclip_cli.modeling.registry import MODEL_REGISTRY, model_status

__all__ = ["IDENTITY_HEAD_BYTES", "model_identity", "resolve_device"]

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
