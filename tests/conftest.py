"""Shared fixtures: tiny random open_clip models (no weights are ever downloaded in tests)."""

from __future__ import annotations

import copy

import pytest
import torch

from masqclip_cli.modeling.clip_loader import create_open_clip

# A small custom open_clip config with the official geometry's traits: class token, quick_gelu,
# head_width = width / heads.
TINY_CLIP_CFG = {
    "embed_dim": 32,
    "quick_gelu": True,
    "vision_cfg": {"image_size": 112, "patch_size": 14, "width": 64, "layers": 3, "head_width": 16},
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 64, "heads": 4, "layers": 2},
}


@pytest.fixture
def tiny_clip_cfg() -> dict:
    return copy.deepcopy(TINY_CLIP_CFG)


@pytest.fixture
def tiny_clip():
    """(model, spec): a tiny random open_clip CLIP, seeded."""
    torch.manual_seed(0)
    return create_open_clip(copy.deepcopy(TINY_CLIP_CFG))


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path_factory, monkeypatch):
    """Never touch the user's cache from tests."""
    monkeypatch.setenv("MASQCLIP_CACHE_DIR", str(tmp_path_factory.mktemp("cache")))


@pytest.fixture(scope="session")
def demo_ci_build(tmp_path_factory) -> tuple:
    """(work folder, report) of the demo recipe's shortened ``ci`` preset (scripts/build_demo_model.py, about two
    minutes on 2 cores), built once per test session: the demo-model and ablation tests share it."""
    import importlib.util
    import sys
    from dataclasses import asdict
    from pathlib import Path

    script = Path(__file__).resolve().parents[1] / "scripts" / "build_demo_model.py"
    spec = importlib.util.spec_from_file_location("build_demo_model", script)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while the script runs
    spec.loader.exec_module(module)
    work = tmp_path_factory.mktemp("demo-ci")
    report = module.build(module.Preset(**asdict(module.PRESETS["ci"])), work, install=False)
    return work, report


def _missing_tool_fails(report) -> None:
    """Under CI (``CI`` set, as .ci/run runs), a test or test module skipped because a tool library could not be
    imported fails: every labelling format must be loaded by its tool's own library there (README's test command
    installs them from requirements-tools.txt)."""
    import os

    if os.environ.get("CI") and report.skipped and "could not import" in str(report.longrepr):
        report.outcome = "failed"
        report.longrepr = f"{report.longrepr} (missing: pip install --no-deps -r requirements-tools.txt)"


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    _missing_tool_fails(outcome.get_result())


@pytest.hookimpl(hookwrapper=True)
def pytest_make_collect_report(collector):
    outcome = yield
    _missing_tool_fails(outcome.get_result())
