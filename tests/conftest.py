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
