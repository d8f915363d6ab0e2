"""CLIP loading: random, local weights file, pretrained tag offline, bad inputs."""

import pytest
import torch

from masqclip_cli.modeling.clip_loader import (
    WeightsNotFoundError,
    create_open_clip,
    get_tokenizer,
    model_config,
    tensor_digest,
)


def test_random_model_from_config(tiny_clip_cfg):
    torch.manual_seed(0)
    model, spec = create_open_clip(tiny_clip_cfg)
    assert spec.model_name is None and spec.pretrained is None
    assert spec.image_size == 112
    assert spec.weights_id == f"random:{tensor_digest(model)}"
    assert type(model.visual.transformer.resblocks[0].mlp.gelu).__name__ == "QuickGELU"
    assert model.visual.transformer.resblocks[0].attn.num_heads == 4  # head_width 16 -> 64 / 16
    tokens = get_tokenizer(spec)(["a photo of a cat"])
    assert tokens.shape == (1, 77)


def test_named_model_config_and_quickgelu_suffix():
    name, cfg = model_config("ViT-L-14-336-quickgelu")
    assert name == "ViT-L-14-336-quickgelu" and cfg["quick_gelu"] is True
    assert cfg["vision_cfg"]["image_size"] == 336 and cfg["vision_cfg"]["patch_size"] == 14
    with pytest.raises(ValueError, match="unknown open_clip model 'ViT-Nope'"):
        model_config("ViT-Nope")
    with pytest.raises(ValueError, match="lacks"):
        model_config({"embed_dim": 8})


def test_local_weights_file_round_trip(tiny_clip_cfg, tmp_path):
    torch.manual_seed(1)
    source, _ = create_open_clip(tiny_clip_cfg)
    path = tmp_path / "tiny_clip.pt"
    torch.save(source.state_dict(), path)
    loaded, spec = create_open_clip(tiny_clip_cfg, pretrained=path)
    assert spec.pretrained == str(path) and spec.weights_id.startswith("file:")
    for key, value in source.state_dict().items():
        assert torch.equal(value, loaded.state_dict()[key]), key
    # a file from another geometry is refused with the file named
    other = dict(tiny_clip_cfg, embed_dim=16)
    with pytest.raises(ValueError, match="tiny_clip.pt: cannot load open_clip weights"):
        create_open_clip(other, pretrained=path)


def test_missing_weights_are_named(tiny_clip_cfg, tmp_path):
    with pytest.raises(WeightsNotFoundError, match="nothere.pt: CLIP weights file not found"):
        create_open_clip(tiny_clip_cfg, pretrained=tmp_path / "nothere.pt")
    with pytest.raises(WeightsNotFoundError, match="needs an open_clip model name"):
        create_open_clip(tiny_clip_cfg, pretrained="openai")


def test_pretrained_tag_offline_says_how_to_provide_it(monkeypatch, tmp_path):
    monkeypatch.delenv("MASQCLIP_ALLOW_DOWNLOAD", raising=False)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))  # an empty cache: the tag cannot be found locally
    with pytest.raises(WeightsNotFoundError, match="not in the local cache.*weights file path"):
        create_open_clip("ViT-B-32", pretrained="openai")
    with pytest.raises(ValueError, match="no pretrained tag 'nope'"):
        create_open_clip("ViT-B-32", pretrained="nope")
