"""Device resolution and model identity, as library functions (``masqclip_cli.modeling.factory``).

The identity strings feed run fingerprints, so they are pinned here: ``registered:<name>`` for a registered model
without weights file, ``file:<sha256 of the first MiB>:<size>`` for a file (computed independently below).
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest
import torch

from masqclip_cli.modeling.factory import MODEL_REGISTRY, model_identity, model_status, resolve_device


def _expected_file_identity(path: Path) -> str:
    data = path.read_bytes()
    return f"file:{hashlib.sha256(data[: 1024 * 1024]).hexdigest()}:{len(data)}"


def test_registered_model_without_file_is_its_name():
    assert model_identity("tiny-random") == "registered:tiny-random"
    assert model_identity("full-random") == "registered:full-random"


def test_file_identity_is_digest_of_first_mib_and_size(tmp_path):
    big = tmp_path / "big.safetensors"
    big.write_bytes(bytes(range(256)) * 4096 + b"tail")  # 1 MiB + 4 bytes: the tail counts in the size only
    assert model_identity(str(big)) == _expected_file_identity(big)
    changed_tail = tmp_path / "big2.safetensors"
    changed_tail.write_bytes(bytes(range(256)) * 4096 + b"TAIL")
    assert model_identity(str(changed_tail)) == model_identity(str(big))
    small = tmp_path / "small.bin"
    small.write_bytes(b"abc")
    assert model_identity(str(small)) == f"file:{hashlib.sha256(b'abc').hexdigest()}:3"


def test_registered_model_with_file_is_the_file_identity():
    available, path = model_status(MODEL_REGISTRY["demo"])
    if not available:
        pytest.skip(f"the demo model file is absent ({path})")
    assert model_identity("demo") == _expected_file_identity(path)


def test_existing_file_named_like_a_registered_model_wins(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    Path("tiny-random").write_bytes(b"not a name")
    assert model_identity("tiny-random") == f"file:{hashlib.sha256(b'not a name').hexdigest()}:10"


def test_missing_file_raises(tmp_path):
    with pytest.raises(FileNotFoundError):
        model_identity(str(tmp_path / "nope.safetensors"))


def test_resolve_device_auto_on_this_machine(monkeypatch):
    if torch.cuda.is_available():
        monkeypatch.delenv("LOCAL_RANK", raising=False)
        assert resolve_device("auto") == "cuda"
        monkeypatch.setenv("LOCAL_RANK", "1")
        assert resolve_device() == "cuda:1"
    elif getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        assert resolve_device() == "mps"
    else:
        assert resolve_device("auto") == "cpu"
        assert resolve_device() == "cpu"


def test_resolve_device_auto_prefers_cuda_then_mps(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.delenv("LOCAL_RANK", raising=False)
    assert resolve_device() == "cuda"
    monkeypatch.setenv("LOCAL_RANK", "3")
    assert resolve_device() == "cuda:3"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    if getattr(torch.backends, "mps", None) is not None:
        monkeypatch.setattr(torch.backends.mps, "is_available", lambda: True)
        assert resolve_device() == "mps"
        monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)
    assert resolve_device() == "cpu"


@pytest.mark.parametrize("device", ["cpu", "cuda", "cuda:1", "mps", "meta"])
def test_resolve_device_returns_explicit_devices_as_given(device):
    assert resolve_device(device) == device
