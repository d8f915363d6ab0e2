"""Training data, configuration, optimiser rules, backbone initialisation and proposal recall."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision
from PIL import Image

from masqclip_cli.data.datasets import load_dataset
from masqclip_cli.data.synthetic import SynthConfig, generate
from masqclip_cli.evaluation.proposals import mask_iou_matrix, proposal_recall
from masqclip_cli.modeling.proposals.backbone import ResNet, load_torchvision_resnet
from masqclip_cli.modeling.proposals.network import build_proposal_network
from masqclip_cli.training.config import ConfigError, load_config, parse_override
from masqclip_cli.training.data import AugmentConfig, TrainDataset, augment, batch_positions, sample_targets
from masqclip_cli.training.loop import _class_map, lr_factor, param_groups


@pytest.fixture(scope="module")
def synth(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("synth")
    generate(root, SynthConfig(images=5, seed=11, split="train", size=(48, 64), base_only=True, crops=False))
    return root


# ------------------------------------------------------------------------------------------------ data
def test_batch_positions_partition_the_global_batch():
    one = batch_positions(3, 8)
    assert one == list(range(24, 32))
    for world in (2, 4, 8):
        shares = [batch_positions(3, 8, r, world) for r in range(world)]
        assert sum(shares, []) == one
    with pytest.raises(ValueError, match="not divisible"):
        batch_positions(0, 6, 0, 4)


def test_targets_follow_the_panoptic_png(synth):
    dataset = load_dataset("synthetic", synth, split="train")
    sample = dataset.samples[0]
    masks, classes = sample_targets(dataset, sample)
    # Independent read of the PNG: every listed non-crowd segment id becomes one mask of its class.
    rgb = np.asarray(Image.open(sample.label_path)).astype(np.int64)
    ids = rgb[..., 0] + 256 * rgb[..., 1] + 65536 * rgb[..., 2]
    expected = [(ids == s.id, s.category) for s in sample.segments if not s.iscrowd and (ids == s.id).any()]
    assert masks.shape == (len(expected), 48, 64)
    for (m, c), got, got_c in zip(expected, masks, classes, strict=True):
        assert np.array_equal(m, got) and c == got_c
    # base-only: no novel class is annotated
    assert not set(classes.tolist()) & set(dataset.novel)


def test_fixed_augment_resizes_and_flips_consistently():
    image = np.zeros((20, 30, 3), dtype=np.uint8)
    image[:, :10] = 255  # white left third
    masks = np.zeros((1, 20, 30), dtype=bool)
    masks[0, :, :10] = True
    config = AugmentConfig("fixed", size=40, flip=True)
    flipped_seen = unflipped_seen = False
    for seed in range(12):
        out_image, out_masks = augment(image, masks, config, np.random.default_rng(seed))
        assert out_image.shape == (40, 40, 3) and out_masks.shape == (1, 40, 40)
        left = out_masks[0, :, :5].all()
        right = out_masks[0, :, -5:].all()
        assert left != right
        # the mask moves with the image
        assert (out_image[..., 0][out_masks[0]] > 128).mean() > 0.9  # (bilinear image, nearest mask: edges blend)
        flipped_seen |= right
        unflipped_seen |= left
    assert flipped_seen and unflipped_seen


def test_lsj_augment_crops_to_at_most_size():
    image = np.random.default_rng(0).integers(0, 255, (50, 80, 3), dtype=np.uint8)
    masks = np.ones((2, 50, 80), dtype=bool)
    config = AugmentConfig("lsj", size=32, min_scale=0.1, max_scale=2.0)
    shapes = set()
    for seed in range(20):
        out_image, out_masks = augment(image, masks, config, np.random.default_rng(seed))
        assert out_image.shape[0] <= 32 and out_image.shape[1] <= 32
        assert out_masks.shape[1:] == out_image.shape[:2]
        shapes.add(out_image.shape[:2])
    assert (32, 32) in shapes and len(shapes) > 2  # large scales are cropped, small ones keep their aspect ratio


def test_train_dataset_is_seeded_by_position(synth):
    dataset = load_dataset("synthetic", synth, split="train")
    data = TrainDataset(dataset, AugmentConfig("lsj", size=32), seed=5)
    a, b = data.sample_at(7), TrainDataset(dataset, AugmentConfig("lsj", size=32), seed=5).sample_at(7)
    assert a.id == b.id and torch.equal(a.image, b.image) and torch.equal(a.masks, b.masks)
    # every epoch visits every image once
    epoch0 = {data.sample_at(p).id for p in range(5)}
    epoch1 = [data.sample_at(p).id for p in range(5, 10)]
    assert epoch0 == {s.id for s in dataset.samples} == set(epoch1)
    other = TrainDataset(dataset, AugmentConfig("lsj", size=32), seed=6)
    assert [other.sample_at(p).id for p in range(5)] != [data.sample_at(p).id for p in range(5)] or \
        not torch.equal(other.sample_at(0).image, data.sample_at(0).image)
    for p in range(5):
        s = data.sample_at(p)
        assert s.masks.shape[1:] == s.image.shape[1:] and s.masks.shape[0] == s.classes.shape[0]
        assert all(m.any() for m in s.masks)  # empty masks after a crop are dropped


def test_unreadable_image_is_skipped_deterministically(synth, tmp_path):
    import shutil

    copy = tmp_path / "synth"
    shutil.copytree(synth, copy)
    dataset = load_dataset("synthetic", copy, split="train")
    broken = dataset.samples[2]
    broken.image_path.write_bytes(b"not an image")
    data = TrainDataset(dataset, AugmentConfig("none"), seed=0)
    ids = [data.sample_at(p).id for p in range(5)]
    assert broken.id not in ids and data.skipped == {broken.id}


def test_base_class_map(synth):
    dataset = load_dataset("synthetic", synth, split="train")
    vocab, mapping = _class_map(dataset, "auto")
    assert len(vocab) == len(dataset.vocabulary) - len(dataset.novel)
    for full, mapped in enumerate(mapping):
        if full in dataset.novel:
            assert mapped == -1
        else:
            assert vocab.classes[mapped].name == dataset.vocabulary.classes[full].name
    assert _class_map(dataset, "all")[1] is None


# ------------------------------------------------------------------------------------------------ config
def test_config_precedence(tmp_path):
    cfg = tmp_path / "c.toml"
    cfg.write_text('[optim]\nlr = 3e-4\niterations = 50\n[data]\naugment = "lsj"\n')
    config = load_config("masq", cfg, ["iterations=70", "lr_steps=[0.5, 0.75]"], {"iterations": 90, "lr": None,
                                                                                     "init": "x.safetensors"})
    assert config.lr == 3e-4  # file over the stage default 1e-4
    assert config.iterations == 90  # named option over --set over file
    assert config.lr_steps == [0.5, 0.75] and config.augment == "lsj"
    assert load_config("masq", options={"init": "x"}).lr_steps == [0.9]  # the official MasQ schedule
    assert load_config("proposals").batch_size == 16 and load_config("distill", options={"teacher": "t"}).rounds == 2


def test_config_errors(tmp_path):
    assert parse_override("tie_mask_embeddings=true") == ("tie_mask_embeddings", True)
    with pytest.raises(ConfigError, match="expected key=value"):
        parse_override("lr")
    cfg = tmp_path / "c.toml"
    cfg.write_text('stage = "masq"\n')
    with pytest.raises(ConfigError, match="is a config for stage 'masq'"):
        load_config("proposals", cfg)
    with pytest.raises(ConfigError, match="batch_size must be at least 1"):
        load_config("proposals", options={"batch_size": 0})
    with pytest.raises(ConfigError, match="iterations must be an integer"):
        load_config("proposals", overrides=["iterations=1.5"])
    with pytest.raises(ConfigError, match="precision fp64 cannot be used with amp"):
        load_config("proposals", overrides=["precision='fp64'", "amp='fp16'"])


# ------------------------------------------------------------------------------------------------ optimiser
def test_lr_factor_steps():
    assert [lr_factor(i, [0.9], 10, 0.1) for i in (0, 8, 9)] == [1.0, 1.0, pytest.approx(0.1)]
    assert lr_factor(25, [10, 20], 100, 0.5) == 0.25


def test_param_groups_follow_the_detectron2_rules():
    network = build_proposal_network("tiny")
    groups = param_groups(network, 1e-4, 0.05, 0.1)
    by_param = {id(p): g for g in groups for p in g["params"]}
    norm_params = {f"{m_name}.{p_name}" for m_name, m in network.named_modules()
                   if isinstance(m, (torch.nn.GroupNorm, torch.nn.LayerNorm)) for p_name, _ in m.named_parameters()}
    assert len(norm_params) > 10
    for name, param in network.named_parameters():
        group = by_param[id(param)]
        assert group["lr"] == pytest.approx(1e-5 if name.startswith("backbone.") else 1e-4), name
        no_decay = name in norm_params or any(s in name for s in ("query_feat", "query_embed", "level_embed"))
        assert group["weight_decay"] == (0.0 if no_decay else 0.05), name
    assert sum(len(g["params"]) for g in groups) == sum(1 for p in network.parameters() if p.requires_grad)


# ------------------------------------------------------------------------------------------------ backbone
def test_torchvision_resnet_weights_give_the_same_features(tmp_path):
    torch.manual_seed(0)
    tv = torchvision.models.resnet18(weights=None).eval()
    for m in tv.modules():  # non-trivial batch-norm statistics
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.uniform_(-1, 1)
            m.running_var.uniform_(0.5, 2)
    ours = ResNet(18, res2_out_channels=64).eval()
    unused = load_torchvision_resnet(ours, tv.state_dict())
    assert unused == ["fc.weight", "fc.bias"]
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        expected = tv.layer4(tv.layer3(tv.layer2(tv.layer1(tv.maxpool(tv.relu(tv.bn1(tv.conv1(x))))))))
        torch.testing.assert_close(ours(x)["res5"], expected, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="does not fit"):
        load_torchvision_resnet(ResNet(18, res2_out_channels=64, stem_out_channels=32), tv.state_dict())


# ------------------------------------------------------------------------------------------------ recall
def test_mask_iou_matrix_by_hand():
    a = torch.zeros(2, 2, 4, dtype=torch.bool)
    a[0, 0, :2] = True  # 2 pixels
    b = torch.zeros(3, 2, 4, dtype=torch.bool)
    b[0, 0, :4] = True  # 4 pixels, 2 shared with a[0]
    b[1, 1, :] = True
    iou = mask_iou_matrix(a, b)
    assert iou.tolist() == [[0.5, 0.0, 0.0], [0.0, 0.0, 0.0]]


class _OracleNetwork(torch.nn.Module):
    """Returns, at full resolution, the ground-truth masks of the image it is given (looked up by content), with
    every other one left out."""

    def __init__(self, table: dict[bytes, np.ndarray], keep_every: int) -> None:
        super().__init__()
        self.table, self.keep_every = table, keep_every
        self.proxy = torch.nn.Linear(1, 1)
        self.register_buffer("pixel_mean", torch.zeros(3))

    def normalize_and_pad(self, images):
        return torch.stack([im.float() for im in images])

    def forward(self, x):
        masks = self.table[x[0].to(torch.uint8).numpy().tobytes()][:: self.keep_every]
        logits = torch.where(torch.from_numpy(masks), 10.0, -10.0)[None]

        class Out:
            pred_masks = logits

        return Out()


def test_proposal_recall_counts_recovered_segments(synth):
    dataset = load_dataset("synthetic", synth, split="train")
    dataset.short_side = 0  # keep the stored size
    table, total, kept = {}, 0, 0
    for sample in dataset.samples:
        rgb = np.array(Image.open(sample.image_path).convert("RGB"))
        masks, _ = sample_targets(dataset, sample)
        table[torch.from_numpy(rgb).permute(2, 0, 1).contiguous().numpy().tobytes()] = masks
        total += masks.shape[0]
        kept += len(range(0, masks.shape[0], 2))
    perfect = proposal_recall(_OracleNetwork(table, 1), dataset)
    assert perfect["recall@0.5"]["all"] == 100.0 and perfect["mean_best_iou"]["all"] == pytest.approx(100.0)
    assert perfect["segments"]["all"] == total and perfect["images"] == 5
    half = proposal_recall(_OracleNetwork(table, 2), dataset)
    assert half["recall@0.5"]["all"] == pytest.approx(100.0 * kept / total)


CONFIGS = sorted((Path(__file__).parents[2] / "configs").glob("*.toml"))


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_shipped_configs_load(path):
    from masqclip_cli.training.config import read_config_file

    stage = read_config_file(path).get("stage")
    stages = [stage] if stage else ["proposals", "distill", "masq"]
    for s in stages:
        config = load_config(s, path, options={"teacher": "t.safetensors", "init": "p.safetensors"})
        assert config.stage == s


def test_configs_are_shipped():
    assert len(CONFIGS) == 7
