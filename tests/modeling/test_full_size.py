"""The published geometry (m2f-r50 proposals + ViT-L-14-336-quickgelu) with random weights: its keys are exactly the
official ones, and it segments one 640×480 image on CPU (about 2 GB of weights)."""

from __future__ import annotations

import csv

import pytest
import torch
from golden import DEFAULT_GOLDEN_ROOT

from masqclip_cli.modeling.convert import IGNORED_OFFICIAL_KEYS, official_key_to_ours
from masqclip_cli.modeling.factory import build_model
from masqclip_cli.vocab import load_vocabulary


def _inventory(name: str) -> dict[str, tuple[int, ...]]:
    path = DEFAULT_GOLDEN_ROOT / name
    if not path.is_file():
        pytest.skip(f"{path} not found")
    with path.open() as f:
        rows = list(csv.DictReader(f, delimiter="\t"))
    return {r["key"]: tuple(int(x) for x in r["shape"].split("x")) for r in rows}


@pytest.fixture(scope="module")
def full_model():
    return build_model("m2f-r50", "ViT-L-14-336-quickgelu", None, seed=0)


@pytest.mark.parametrize("inventory", ["inventory_masqtuning_R50_ViTL14_336.tsv", "inventory_proposal_teacher_R50.tsv"])
def test_full_size_keys_equal_the_official_inventory(full_model, inventory):
    official = _inventory(inventory)
    ours = full_model.state_dict()
    mapped = {}
    for key, shape in official.items():
        if key in IGNORED_OFFICIAL_KEYS:
            continue
        target = official_key_to_ours(key)
        assert target in ours, f"official {key} has no counterpart ({target})"
        assert tuple(ours[target].shape) == shape, f"{key}: official {shape}, ours {tuple(ours[target].shape)}"
        mapped[target] = key
    expected = set(ours) if "masqtuning" in inventory else {k for k in ours if k.startswith("proposals.")}
    assert set(mapped) == expected, sorted(expected ^ set(mapped))[:5]


def test_full_size_trainable_count_matches_the_paper(full_model):
    trainable = sum(p.numel() for p in full_model.masq.trainable_parameters())
    assert trainable == 25_191_424  # 24 f_Q' (1024² + 1024) + the 1024-d mask position embedding


def test_full_size_forward_on_one_640x480_image(full_model):
    full_model.set_vocabulary(load_vocabulary("person; car, automobile; road [stuff]; sky [stuff]; tree [stuff]"))
    image = torch.randint(0, 256, (3, 480, 640), generator=torch.Generator().manual_seed(0), dtype=torch.uint8)
    (out,) = full_model([image])
    assert out.padded_size == (480, 640)
    assert out.mask_logits.shape == (100, 120, 160)
    assert out.embeddings.shape == (100, 768)
    assert out.p_cls.shape == (100, 5) and out.clip_log_probs.shape == (100, 6)
    assert torch.isfinite(out.p_cls).all() and torch.isfinite(out.mask_logits).all()
    assert torch.allclose(out.embeddings.norm(dim=-1), torch.ones(100), atol=1e-4)
