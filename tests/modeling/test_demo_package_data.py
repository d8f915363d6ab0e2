"""The ``demo`` model ships as package data: a wheel holds ``masqclip_cli/models/demo.safetensors``, byte for byte the
repository's file, and the registry of an installed (unpacked) wheel finds it there.

The wheel is built from a copy of the project's packaging inputs (``pyproject.toml``, ``README.md``,
``masqclip_cli/``) in a temporary folder, so the build writes no ``build/`` or ``*.egg-info`` into the checkout.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from masqclip_cli.modeling.factory import BUNDLED_MODELS_DIR

REPO = Path(__file__).resolve().parents[2]
DEMO_FILE = REPO / "masqclip_cli" / "models" / "demo.safetensors"
WHEEL_MEMBER = "masqclip_cli/models/demo.safetensors"


def _sha256(data_or_path: bytes | Path) -> str:
    digest = hashlib.sha256()
    if isinstance(data_or_path, Path):
        with data_or_path.open("rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                digest.update(block)
    else:
        digest.update(data_or_path)
    return digest.hexdigest()


def _can_build_wheels() -> str | None:
    """None when pip and a setuptools that builds wheels are importable, else why not."""
    if importlib.util.find_spec("pip") is None:
        return "pip is not installed"
    setuptools = importlib.util.find_spec("setuptools")  # found, not imported (it patches distutils on import)
    if setuptools is None:
        return "setuptools (the build backend) is not installed"
    # setuptools >= 70.1 builds wheels itself; older ones need the `wheel` package.
    own = any((Path(d) / "command" / "bdist_wheel.py").is_file() for d in setuptools.submodule_search_locations or ())
    if not own and importlib.util.find_spec("wheel") is None:
        return "neither setuptools' own bdist_wheel (setuptools >= 70.1) nor the `wheel` package is available"
    return None


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    reason = _can_build_wheels()
    if reason:
        pytest.skip(f"cannot build a wheel here: {reason}")
    root = tmp_path_factory.mktemp("wheel")
    src, out = root / "src", root / "dist"
    src.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy2(REPO / name, src / name)
    shutil.copytree(REPO / "masqclip_cli", src / "masqclip_cli",
                    ignore=shutil.ignore_patterns("__pycache__", "*.pyc", "*.tmp"))
    proc = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-index", "-q",
         "-w", str(out), str(src)],
        capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    wheels = sorted(out.glob("masqclip-*.whl"))
    assert len(wheels) == 1, (wheels, proc.stdout + proc.stderr)
    return wheels[0]


def test_repository_file_is_the_bundled_model():
    assert DEMO_FILE.is_file()
    assert BUNDLED_MODELS_DIR.resolve() == DEMO_FILE.parent.resolve()


def test_wheel_holds_the_demo_model(wheel):
    with zipfile.ZipFile(wheel) as z:
        assert WHEEL_MEMBER in z.namelist(), sorted(n for n in z.namelist() if not n.endswith(".py"))
        data = z.read(WHEEL_MEMBER)
    assert len(data) == DEMO_FILE.stat().st_size
    assert _sha256(data) == _sha256(DEMO_FILE)


def test_installed_wheel_finds_the_demo_model(wheel, tmp_path):
    site = tmp_path / "site"
    with zipfile.ZipFile(wheel) as z:
        z.extractall(site)
    probe = (
        "import masqclip_cli\n"
        "from masqclip_cli.modeling.registry import MODEL_REGISTRY, model_status\n"
        "available, path = model_status(MODEL_REGISTRY['demo'])\n"
        "print(masqclip_cli.__file__)\n"
        "print(available)\n"
        "print(path)\n"
    )
    # The unpacked wheel comes first on sys.path, ahead of the editable install of the checkout.
    env = {**os.environ, "PYTHONPATH": str(site)}
    proc = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120,
                          cwd=tmp_path, env=env)
    assert proc.returncode == 0, proc.stderr
    package_file, available, path = proc.stdout.strip().splitlines()[-3:]
    assert Path(package_file).resolve().is_relative_to(site.resolve())
    assert available == "True"
    assert Path(path).resolve() == (site / WHEEL_MEMBER).resolve()
