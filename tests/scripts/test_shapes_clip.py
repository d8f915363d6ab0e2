"""The shapes-world CLIP trainer: a short contrastive run learns (loss falls, zero-shot crop accuracy far above
chance), and the saved file loads back through create_open_clip with identical embeddings."""

from __future__ import annotations

import copy
import json
import sys
from pathlib import Path

import pytest
import torch

from masqclip_cli.modeling.clip_loader import create_open_clip, get_tokenizer

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "scripts"))  # scripts/shapes_clip.py: not shipped
from shapes_clip import (  # noqa: E402
    CATEGORY_NAMES,
    SHAPES_CLIP_CONFIG,
    TrainConfig,
    caption_variants,
    contrastive_loss,
    encode_text_trimmed,
    ensure_split,
    load_shapes_clip,
    load_split,
    save_clip,
    semantic_positives,
    sidecar_path,
    train_clip,
    zero_shot_eval,
)

# Tiny sizes: a 32x32 input with 8x8 patches (16 patches + CLS), 2 vision layers, a 1-layer text tower.
TINY_CFG = {
    "embed_dim": 32,
    "quick_gelu": True,
    "vision_cfg": {"image_size": 32, "patch_size": 8, "width": 64, "layers": 2, "head_width": 32},
    "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1},
}


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    data_dir = tmp_path_factory.mktemp("shapes")
    ensure_split(data_dir, "train", 30, seed=3, size=(128, 128))
    data = load_split(data_dir, "train", 32, scenes=False)
    torch.manual_seed(123)  # train_clip seeds itself: the global state must not matter
    model, spec, record = train_clip(data, copy.deepcopy(TINY_CFG), TrainConfig(steps=150, batch_size=64, lr=3e-3))
    return data, model, spec, record


def test_loss_falls_and_crops_are_classified_zero_shot(trained):
    data, model, spec, record = trained
    assert record["steps"] == 150
    assert record["loss_last"] < 0.7 * record["loss_first"], record["loss_curve"]
    result = zero_shot_eval(model, spec, data)
    chance = 1 / len(CATEGORY_NAMES)
    assert result["chance"] == pytest.approx(chance, abs=1e-4)
    assert result["crops"] == data.n_crops > 100
    for key in ("photo", "bare"):
        entry = result[key]
        assert entry["accuracy"] > 5 * chance, entry  # measured ~0.56 (photo) and ~0.66 (bare)
        assert entry["base"] is not None and entry["novel"] is not None
    assert result["bare"]["novel"] > 3 * chance, result["bare"]  # novel names are learned from the captions


def test_training_is_seeded(trained):
    data, model, _, record = trained
    short = TrainConfig(steps=3, batch_size=32, lr=3e-3, seed=5)
    a = train_clip(data, copy.deepcopy(TINY_CFG), short)
    b = train_clip(data, copy.deepcopy(TINY_CFG), short)
    assert [p["loss"] for p in a[2]["loss_curve"]] == [p["loss"] for p in b[2]["loss_curve"]]
    for (name, x), (_, y) in zip(a[0].state_dict().items(), b[0].state_dict().items()):
        assert torch.equal(x, y), name


def test_killed_training_resumes_to_the_same_model_and_validation_picks_the_best_step(trained, tmp_path):
    data = trained[0]
    cfg = TrainConfig(steps=8, batch_size=32, lr=3e-3, seed=2, eval_every=2, checkpoint_every=3, log_every=2)
    scores = iter([0.1, 0.5, 0.3, 0.2, 0.4, 0.6, 0.0, 0.2, 0.1])  # validations at steps 2, 4 (best), 6, 8

    def validate(model, spec):
        assert not model.training
        return next(scores)

    whole, _, record = train_clip(data, copy.deepcopy(TINY_CFG), cfg, validate=validate)
    assert [v["step"] for v in record["validation_curve"]] == [2, 4, 6, 8]
    assert record["best_step"] == 4 and record["best_score"] == 0.5
    # the returned model is the step-4 model: a plain 4-step run of the same schedule (no validation) gives it
    plain = TrainConfig(steps=8, batch_size=32, lr=3e-3, seed=2, log_every=2)
    killed = tmp_path / "ckpt.pt"

    class Killed(Exception):
        pass

    calls = {"n": 0}

    def dies_at_step_4(model, spec):
        calls["n"] += 1
        if calls["n"] == 2:  # the second validation (step 4) comes after the step-3 checkpoint: the process "dies"
            raise Killed
        return 0.0

    with pytest.raises(Killed):
        train_clip(data, copy.deepcopy(TINY_CFG), cfg, validate=dies_at_step_4, checkpoint=killed)
    assert killed.is_file()
    saved_step = torch.load(killed, weights_only=False)["step"]
    assert saved_step == 3
    scores = iter([0.1, 0.5, 0.3, 0.2])  # the resumed run re-validates from step 4 on: step 2 was in the checkpoint

    def validate_resumed(model, spec):
        return next(scores)

    resumed, _, record2 = train_clip(data, copy.deepcopy(TINY_CFG), cfg, validate=validate_resumed,
                                     checkpoint=killed)
    assert not killed.exists()  # removed once training ended
    assert [v["step"] for v in record2["validation_curve"]] == [2, 4, 6, 8]
    assert record2["best_step"] == 6  # step 2 scored 0.0 in the killed run, then 0.1 (4), 0.5 (6), 0.3 (8)
    assert [p["loss"] for p in record2["loss_curve"]] == [p["loss"] for p in record["loss_curve"]]
    # and the uninterrupted run's final model equals the resumed run's final model, step for step
    last_whole, _, _ = train_clip(data, copy.deepcopy(TINY_CFG), plain)
    scores = iter([0.0, 0.0, 0.0, 1.0])  # best = the last step

    def last_is_best(model, spec):
        return next(scores)

    last_resumable, _, _ = train_clip(data, copy.deepcopy(TINY_CFG), cfg, validate=last_is_best)
    for (name, x), (_, y) in zip(last_whole.state_dict().items(), last_resumable.state_dict().items()):
        assert torch.equal(x, y), name
    with pytest.raises(ValueError, match="another CLIP training run"):
        torch.save({"items": 1, "total": 8, "train_config": {}}, killed)
        train_clip(data, copy.deepcopy(TINY_CFG), cfg, checkpoint=killed)
    del whole, resumed


@pytest.mark.parametrize("suffix", [".safetensors", ".pt"])
def test_saved_file_loads_through_create_open_clip(trained, tmp_path, suffix):
    _, model, spec, _ = trained
    path = tmp_path / f"shapes-clip{suffix}"
    saved = save_clip(model, TINY_CFG, path)
    assert saved["config"] == str(sidecar_path(path)) and path.is_file()
    config = json.loads(sidecar_path(path).read_text())
    assert config == TINY_CFG
    loaded, loaded_spec = create_open_clip(config, path)
    assert loaded_spec.image_size == 32 and loaded_spec.tokenizer == {"name": "simple", "context_length": 16}
    images = torch.randn(5, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    tokens = get_tokenizer(loaded_spec)(["star", "a photo of a red star", "brick wall", "water", "x"])
    with torch.no_grad():
        assert torch.equal(model.encode_image(images), loaded.encode_image(images))
        assert torch.equal(model.encode_text(tokens), loaded.encode_text(tokens))
    again, _ = load_shapes_clip(path)
    with torch.no_grad():
        assert torch.equal(model.encode_image(images), again.encode_image(images))


def test_default_config_is_a_masq_compatible_open_clip():
    from open_clip.model import CLIP

    from masqclip_cli.modeling.masq_visual import MasQVisual

    clip, spec = create_open_clip(copy.deepcopy(SHAPES_CLIP_CONFIG))
    assert isinstance(clip, CLIP) and spec.image_size == 64
    MasQVisual(clip.visual)  # class token, standard blocks: MasQ accepts the tower
    assert sum(p.numel() for p in clip.parameters()) < 5_000_000


def test_trimmed_text_forward_equals_open_clip():
    torch.manual_seed(0)
    clip, spec = create_open_clip(copy.deepcopy(TINY_CFG))
    tokens = get_tokenizer(spec)(["star", "a photo of a red star", "two blue circles on grass under the sky"])
    with torch.no_grad():
        torch.testing.assert_close(encode_text_trimmed(clip, tokens), clip.encode_text(tokens))


def test_caption_variants_and_duplicate_aware_loss():
    assert caption_variants("a photo of a red star", "star") == [
        "a photo of a red star", "a photo of a star", "red star", "star"
    ]
    assert caption_variants("a photo of an orange arrow", "arrow")[1] == "a photo of an arrow"
    assert caption_variants("a photo of the sky", "sky") == ["a photo of the sky", "the sky", "sky"]
    assert caption_variants("a photo of a brick wall", "brick wall") == ["a photo of a brick wall", "brick wall"]
    # Items 0 and 1 share a caption. Plain InfoNCE prefers their embeddings apart (B), duplicate-aware targets
    # prefer them together (A).
    eye = torch.eye(3)
    together, apart = eye[[0, 0, 2]], eye
    scale = torch.tensor(4.0).log()
    assert contrastive_loss(apart, apart, scale) < contrastive_loss(together, together, scale)
    ids = torch.tensor([0, 0, 1])
    assert contrastive_loss(together, together, scale, ids) < contrastive_loss(apart, apart, scale, ids)


def test_semantic_positives_mark_every_text_true_of_an_image():
    texts = ["a photo of a red star", "star", "blue star", "a photo of the sky", "red circle", "a red star and a sky",
             "sky"]
    categories = ["star", "star", "star", "sky", "circle", None, "sky"]
    colours = ["red", "blue", "blue", None, "red", None, None]
    # rows: images, columns: texts; written out by hand
    expected = torch.tensor([
        [1, 1, 0, 0, 0, 0, 0],  # red star: its caption, "star"; not "blue star"
        [0, 1, 1, 0, 0, 0, 0],  # blue star: "star", "blue star"; not the red star's caption
        [0, 1, 1, 0, 0, 0, 0],
        [0, 0, 0, 1, 0, 0, 1],  # a sky crop: both sky captions
        [0, 0, 0, 0, 1, 0, 0],  # red circle: only its own ("red" does not make the red star's texts true)
        [0, 0, 0, 0, 0, 1, 0],  # a scene: only its own caption
        [0, 0, 0, 1, 0, 0, 1],
    ], dtype=torch.bool)
    assert torch.equal(semantic_positives(texts, categories, colours), expected)
    # and the loss with these targets is the mean of the two cross-entropies over the rows / columns
    f = torch.nn.functional.normalize(torch.randn(7, 8, generator=torch.Generator().manual_seed(0)), dim=-1)
    g = torch.nn.functional.normalize(torch.randn(7, 8, generator=torch.Generator().manual_seed(1)), dim=-1)
    scale = torch.tensor(2.0)
    logits = scale.exp() * f @ g.t()
    rows = -(expected.float() / expected.sum(1, keepdim=True) * logits.log_softmax(1)).sum(1).mean()
    cols = -(expected.t().float() / expected.t().sum(1, keepdim=True) * logits.t().log_softmax(1)).sum(1).mean()
    assert contrastive_loss(f, g, scale, positives=expected).item() == pytest.approx(((rows + cols) / 2).item(),
                                                                                     rel=1e-6)
