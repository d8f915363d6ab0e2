"""The package's layers, as the import-linter contracts in pyproject.toml state them, hold -- and the contract really
fails on an upward import (checked on a copy of the package with one deliberate violation)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
LINT = shutil.which("lint-imports")

pytestmark = pytest.mark.skipif(LINT is None, reason="import-linter is not installed (pip install -e '.[dev]')")


def _lint(config: Path, pythonpath: Path) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(pythonpath))
    return subprocess.run([LINT, "--config", str(config), "--no-cache"], cwd=pythonpath, env=env, text=True,
                          capture_output=True, timeout=120)


def _copy_package(tmp_path: Path) -> Path:
    shutil.copytree(ROOT / "masqclip_cli", tmp_path / "masqclip_cli",
                    ignore=shutil.ignore_patterns("__pycache__", "*.safetensors", "presets"))
    shutil.copy(ROOT / "pyproject.toml", tmp_path / "pyproject.toml")
    return tmp_path


def test_contracts_hold_on_the_package(tmp_path):
    copy = _copy_package(tmp_path)
    result = _lint(copy / "pyproject.toml", copy)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "2 kept, 0 broken" in result.stdout


def test_an_upward_import_breaks_the_layers_contract(tmp_path):
    copy = _copy_package(tmp_path)
    masks = copy / "masqclip_cli" / "structures" / "masks.py"
    # structures (the bottom layer) reaching up into the inference engine, hidden in a function as cycles often are
    masks.write_text(masks.read_text() + "\n\ndef _upward():\n    from masqclip_cli.inference import engine  # noqa\n")
    result = _lint(copy / "pyproject.toml", copy)
    assert result.returncode != 0
    assert "BROKEN" in result.stdout and "masqclip_cli.structures.masks -> masqclip_cli.inference.engine" in (
        result.stdout)


def test_a_cycle_between_siblings_breaks_the_acyclic_contract(tmp_path):
    copy = _copy_package(tmp_path)
    # modeling.masqclip imports modeling.classifier; make classifier import masqclip back: a cycle between siblings
    text = copy / "masqclip_cli" / "modeling" / "classifier.py"
    text.write_text(text.read_text() + "\n\ndef _cycle():\n    from masqclip_cli.modeling import masqclip  # noqa\n")
    result = _lint(copy / "pyproject.toml", copy)
    assert result.returncode != 0
    assert "No import cycles" in result.stdout and "BROKEN" in result.stdout
    assert sys.modules.get("masqclip_cli") is not None  # the tests' own import is untouched
