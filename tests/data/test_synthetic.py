"""The synthetic shapes world: determinism, consistency of the three annotation formats, base/novel splits,
captions, crops, vocabulary and occlusion."""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import io
import json
import re
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from pycocotools import mask as mask_util
from pycocotools.coco import COCO

from masqclip_cli.data.synthetic import (
    CROP_SIZE,
    DEFAULT_NOVEL,
    IGNORE_LABEL,
    SYNTH_CATEGORIES,
    SynthConfig,
    generate,
    make_scene,
)
from masqclip_cli.structures.masks import mask_stats
from masqclip_cli.vocab import category_ids, load_vocabulary

CFG = SynthConfig(images=6, seed=4, split="val", size=(96, 96))  # seed 4 draws all four novel categories
BY_ID = {c["id"]: c for c in SYNTH_CATEGORIES}
NOVEL_IDS = {c["id"] for c in SYNTH_CATEGORIES if c["name"] in DEFAULT_NOVEL}

# pycocotools' RLE decode trips a numpy 2 deprecation warning inside pycocotools itself.
pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")


@pytest.fixture(scope="module")
def full(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("full")
    generate(out, CFG)
    return out


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> Path:
    """The same scenes as ``full`` (same seed and split), novel categories unannotated."""
    out = tmp_path_factory.mktemp("base")
    generate(out, dataclasses.replace(CFG, base_only=True))
    return out


def tree_hashes(root: Path) -> dict[str, str]:
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


def load_png(path: Path) -> np.ndarray:
    return np.array(Image.open(path))


def panoptic_ids(path: Path) -> np.ndarray:
    rgb = load_png(path).astype(np.int64)
    return rgb[..., 0] + 256 * rgb[..., 1] + 256 * 256 * rgb[..., 2]


def read_json(path: Path):
    return json.loads(path.read_text(encoding="utf-8"))


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def named_in(caption: str, name: str) -> bool:
    return re.search(rf"\b{re.escape(name)}(e?s)?\b", caption) is not None


# --- determinism --------------------------------------------------------------------------------------------------


def test_same_seed_gives_byte_identical_dataset(full, tmp_path):
    summary = generate(tmp_path / "again", CFG)
    first, second = tree_hashes(full), tree_hashes(tmp_path / "again")
    assert first == second
    expected = {
        "images/val/000000.png",
        "panoptic_val/000005.png",
        "semantic_val/000005.png",
        "annotations/panoptic_val.json",
        "annotations/instances_val.json",
        "captions_val.jsonl",
        "crops_val.jsonl",
        "crops_val/000000_0.png",
        "vocab.txt",
        "meta.json",
    }
    assert expected <= set(first)
    assert not any(name.endswith(".tmp") for name in first)
    assert summary["images"] == 6 and summary["crops"] == len(read_jsonl(full / "crops_val.jsonl"))


def test_different_seed_or_split_gives_different_images(full, tmp_path):
    for config in (dataclasses.replace(CFG, seed=5, crops=False), dataclasses.replace(CFG, split="test", crops=False)):
        out = tmp_path / f"{config.seed}-{config.split}"
        generate(out, config)
        for i in range(CFG.images):
            a = (full / "images/val" / f"{i:06d}.png").read_bytes()
            b = (out / "images" / config.split / f"{i:06d}.png").read_bytes()
            assert a != b


def test_any_scene_regenerates_alone(full):
    scene = make_scene(dataclasses.replace(CFG, images=1, base_only=True, crops=False), 4)
    assert np.array_equal(scene.image, load_png(full / "images/val/000004.png"))
    caption = read_jsonl(full / "captions_val.jsonl")[4]
    assert caption == {"image": "000004.png", "caption": scene.caption}


# --- the three formats agree --------------------------------------------------------------------------------------


@pytest.mark.parametrize("which", ["full", "base"])
def test_panoptic_instances_semantic_agree(which, request):
    root: Path = request.getfixturevalue(which)
    panoptic = read_json(root / "annotations/panoptic_val.json")
    instances = read_json(root / "annotations/instances_val.json")
    assert [c["id"] for c in panoptic["categories"]] == list(range(1, len(SYNTH_CATEGORIES) + 1))
    assert [c["name"] for c in panoptic["categories"]] == [c["name"] for c in SYNTH_CATEGORIES]
    assert {c["id"] for c in instances["categories"]} == {c["id"] for c in SYNTH_CATEGORIES if c["isthing"]}
    assert panoptic["images"] == instances["images"]
    assert len(panoptic["annotations"]) == CFG.images
    instances_by_image: dict[int, list[dict]] = {}
    for ann in instances["annotations"]:
        instances_by_image.setdefault(ann["image_id"], []).append(ann)
    assert [a["id"] for a in instances["annotations"]] == list(range(1, len(instances["annotations"]) + 1))

    for image, ann in zip(panoptic["images"], panoptic["annotations"]):
        assert ann["image_id"] == image["id"] and ann["file_name"] == image["file_name"]
        assert (image["height"], image["width"]) == CFG.size
        ids = panoptic_ids(root / "panoptic_val" / ann["file_name"])
        semantic = load_png(root / "semantic_val" / ann["file_name"])
        assert ids.shape == semantic.shape == CFG.size and semantic.dtype == np.uint8
        segments = ann["segments_info"]
        assert sorted(int(v) for v in np.unique(ids) if v) == sorted(s["id"] for s in segments)
        assert np.array_equal(ids == 0, semantic == IGNORE_LABEL)
        things = []
        for s in segments:
            assert list(s) == ["id", "category_id", "iscrowd", "bbox", "area"] and s["iscrowd"] == 0
            mask = ids == s["id"]
            assert (s["area"], s["bbox"]) == mask_stats(mask) and s["area"] > 0
            assert np.all(semantic[mask] == s["category_id"] - 1)
            if BY_ID[s["category_id"]]["isthing"]:
                things.append((s, mask))
        # Instances: exactly the thing segments, same masks, areas and boxes.
        anns = instances_by_image.get(image["id"], [])
        assert len(anns) == len(things)
        for a, (s, mask) in zip(anns, things):
            assert a["category_id"] == s["category_id"] and a["iscrowd"] == 0
            assert (a["area"], a["bbox"]) == (s["area"], s["bbox"])
            assert np.array_equal(mask_util.decode(a["segmentation"]).astype(bool), mask)
            assert a["segmentation"]["size"] == list(CFG.size)


def test_pycocotools_loads_instances(full):
    with contextlib.redirect_stdout(io.StringIO()):
        coco = COCO(str(full / "annotations/instances_val.json"))
    assert len(coco.getImgIds()) == CFG.images
    assert len(coco.getCatIds()) == sum(c["isthing"] for c in SYNTH_CATEGORIES)
    ann_ids = coco.getAnnIds()
    assert ann_ids
    for ann in coco.loadAnns(ann_ids):
        assert coco.annToMask(ann).sum() == ann["area"]


# --- base / novel -------------------------------------------------------------------------------------------------


def test_base_only_leaves_novel_categories_unannotated_but_visible(full, base):
    assert tree_hashes(full / "images") == tree_hashes(base / "images")
    assert (full / "captions_val.jsonl").read_bytes() == (base / "captions_val.jsonl").read_bytes()
    full_json = read_json(full / "annotations/panoptic_val.json")
    base_json = read_json(base / "annotations/panoptic_val.json")
    captions = read_jsonl(base / "captions_val.jsonl")
    novel_things = novel_stuff = 0
    for full_ann, base_ann, caption in zip(full_json["annotations"], base_json["annotations"], captions):
        name = full_ann["file_name"]
        full_ids = panoptic_ids(full / "panoptic_val" / name)
        base_ids = panoptic_ids(base / "panoptic_val" / name)
        base_semantic = load_png(base / "semantic_val" / name)
        kept = [s for s in full_ann["segments_info"] if s["category_id"] not in NOVEL_IDS]
        assert base_ann["segments_info"] == kept
        for s in full_ann["segments_info"]:
            mask = full_ids == s["id"]
            if s["category_id"] in NOVEL_IDS:
                assert np.all(base_ids[mask] == 0) and np.all(base_semantic[mask] == IGNORE_LABEL)
                assert named_in(caption["caption"], BY_ID[s["category_id"]]["name"])
                if BY_ID[s["category_id"]]["isthing"]:
                    novel_things += 1
                else:
                    novel_stuff += 1
            else:
                assert np.all(base_ids[mask] == s["id"])
        assert np.array_equal(base_ids == 0, np.isin(full_ids // 1000, list(NOVEL_IDS)))
    assert novel_things > 0 and novel_stuff > 0  # the seed draws both kinds, so this test means something
    base_instances = read_json(base / "annotations/instances_val.json")["annotations"]
    full_instances = read_json(full / "annotations/instances_val.json")["annotations"]
    assert base_instances and not any(a["category_id"] in NOVEL_IDS for a in base_instances)
    assert len(base_instances) == sum(a["category_id"] not in NOVEL_IDS for a in full_instances)


def test_meta_lists_base_and_novel_and_merges_splits(tmp_path):
    out = tmp_path / "data"
    small = SynthConfig(images=2, size=(64, 64), crops=False)
    generate(out, dataclasses.replace(small, split="train", base_only=True))
    generate(out, small)
    meta = read_json(out / "meta.json")
    assert meta["novel"] == list(DEFAULT_NOVEL)
    assert set(meta["base"]) | set(meta["novel"]) == {c["name"] for c in SYNTH_CATEGORIES}
    assert [c["id"] for c in meta["categories"]] == [c["id"] for c in SYNTH_CATEGORIES]
    assert sorted(meta["splits"]) == ["train", "val"]
    assert meta["splits"]["train"]["base_only"] is True and meta["splits"]["val"]["base_only"] is False
    assert not set(meta["splits"]["train"]["annotated"]) & set(DEFAULT_NOVEL)
    with pytest.raises(ValueError, match="novel"):
        generate(out, dataclasses.replace(small, novel=("circle",)))
    # A smaller re-run of a split removes the files the larger one left.
    generate(out, dataclasses.replace(small, images=1))
    assert sorted(p.name for p in (out / "images/val").iterdir()) == ["000000.png"]
    assert (out / "images/train/000001.png").is_file()


# --- captions, crops, vocabulary ----------------------------------------------------------------------------------


def test_captions_name_every_present_category(full):
    panoptic = read_json(full / "annotations/panoptic_val.json")  # full split: every category annotated
    captions = read_jsonl(full / "captions_val.jsonl")
    assert [c["image"] for c in captions] == [im["file_name"] for im in panoptic["images"]]
    for caption, ann in zip(captions, panoptic["annotations"]):
        present = {BY_ID[s["category_id"]]["name"] for s in ann["segments_info"]}
        named = {c["name"] for c in SYNTH_CATEGORIES if named_in(caption["caption"], c["name"])}
        assert named == present, caption


def test_crops(full):
    crops = read_jsonl(full / "crops_val.jsonl")
    panoptic = read_json(full / "annotations/panoptic_val.json")
    present = {
        ann["file_name"]: {BY_ID[s["category_id"]]["name"] for s in ann["segments_info"]}
        for ann in panoptic["annotations"]
    }
    files = sorted(p.name for p in (full / "crops_val").iterdir())
    assert files == sorted(c["crop"] for c in crops)
    kinds = set()
    for c in crops:
        assert list(c) == ["crop", "image", "caption", "category"]
        assert c["crop"].startswith(c["image"][:-4] + "_")
        assert c["category"] in present[c["image"]]
        assert c["caption"].startswith("a photo of ") and named_in(c["caption"], c["category"])
        array = load_png(full / "crops_val" / c["crop"])
        assert array.shape == (CROP_SIZE, CROP_SIZE, 3)
        kinds.add(bool(next(x for x in SYNTH_CATEGORIES if x["name"] == c["category"])["isthing"]))
    assert kinds == {True, False}  # object crops and stuff patches
    # One crop per object that is at least half visible, in drawing order, then the stuff patches.
    for index in range(CFG.images):
        scene = make_scene(CFG, index)
        mine = [c["category"] for c in crops if c["image"] == f"{index:06d}.png"]
        wanted = [o.category for o in scene.objects if o.mask.sum() >= 0.5 * o.shape_mask.sum()]
        assert mine[: len(wanted)] == wanted
        assert set(mine[len(wanted) :]) <= {s.category for s in scene.stuff}
        assert [c["crop"] for c in crops if c["image"] == f"{index:06d}.png"] == [
            f"{index:06d}_{k}.png" for k in range(len(mine))
        ]


def test_vocab_file_loads_with_flags_and_ids(full):
    vocab = load_vocabulary(full / "vocab.txt")
    assert vocab.names == [c["name"] for c in SYNTH_CATEGORIES]
    assert vocab.isthing == [bool(c["isthing"]) for c in SYNTH_CATEGORIES]
    assert category_ids(vocab) == [c["id"] for c in SYNTH_CATEGORIES]
    assert len(vocab.thing_indices) >= 12 and len(vocab.stuff_indices) >= 6


# --- scenes -------------------------------------------------------------------------------------------------------


def test_occluded_objects_keep_only_their_visible_part():
    overlaps = 0
    for index in range(12):
        scene = make_scene(CFG, index)
        objects = scene.objects
        assert CFG.min_objects <= len(objects) <= CFG.max_objects
        for i, obj in enumerate(objects):
            later = np.zeros(CFG.size, dtype=bool)
            for other in objects[i + 1 :]:
                later |= other.shape_mask
                overlaps += bool((obj.shape_mask & other.shape_mask).any())
                assert not (obj.mask & other.shape_mask).any()
            assert np.array_equal(obj.mask, obj.shape_mask & ~later)
            assert np.array_equal(scene.segment_map == obj.segment_id, obj.mask)
        covered = np.zeros(CFG.size, dtype=bool)
        for obj in objects:
            covered |= obj.shape_mask
        for s in scene.stuff:
            assert np.array_equal(s.mask, s.region_mask & ~covered)
        assert (scene.segment_map > 0).all()
    assert overlaps > 0  # the scenes do contain occlusions


def test_scene_sizes_and_object_counts():
    config = SynthConfig(images=1, size=(48, 80), min_objects=1, max_objects=1)
    scene = make_scene(config, 0)
    assert scene.image.shape == (48, 80, 3) and scene.image.dtype == np.uint8
    assert len(scene.objects) == 1
    empty = make_scene(dataclasses.replace(config, min_objects=0, max_objects=0), 0)
    assert empty.objects == [] and empty.caption.startswith("an empty scene of ")


@pytest.mark.parametrize(
    "changes",
    [
        {"novel": ("unicorn",)},
        {"min_objects": 5, "max_objects": 2},
        {"split": "../x"},
        {"seed": -1},
        {"size": (16, 16)},
        {"images": -1},
    ],
)
def test_config_is_validated(changes):
    with pytest.raises(ValueError):
        SynthConfig(**changes)
