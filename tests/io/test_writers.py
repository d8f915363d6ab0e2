"""Output writers: COCO instance / panoptic JSON checked with pycocotools, label maps, overlays, JSON lines, paths,
atomicity and byte-for-byte determinism. Segmentations are built by hand (small masks)."""

from __future__ import annotations

import contextlib
import io
import json
import os
from pathlib import Path

import cv2
import numpy as np
import pytest
from PIL import Image
from pycocotools import mask as mask_util
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from masqclip_cli.io import files as wfiles
from masqclip_cli.io.files import atomic_write_bytes, atomic_write_text, output_path, remove_stale_temp_files
from masqclip_cli.io.writers import (
    WRITERS,
    CocoWriter,
    ItemInfo,
    JsonlWriter,
    LabelsWriter,
    OverlayWriter,
    PanopticWriter,
    make_writers,
    needed_tasks,
)
from masqclip_cli.io.writers import base as wbase
from masqclip_cli.structures import Segment, Segmentation
from masqclip_cli.structures import masks as wmasks
from masqclip_cli.structures.masks import id_to_rgb, mask_bbox, rgb_to_id
from masqclip_cli.vocab import VocabClass, Vocabulary, category_ids

pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")  # pycocotools decode

SAMPLE = Path(__file__).resolve().parents[2] / ".." / "shared" / "data" / "coco-panoptic-sample"

# --- fixtures -------------------------------------------------------------------------------------------------------

# person, car (things), road, sky (stuff)
CLASSES = [("person", True), ("car", True), ("road", False), ("sky", False)]


def make_vocab(ids=None, colors=None) -> Vocabulary:
    return Vocabulary(
        [
            VocabClass(
                name, isthing=thing, id=None if ids is None else ids[i], color=None if colors is None else colors[i]
            )
            for i, (name, thing) in enumerate(CLASSES)
        ]
    )


VOCAB_NOIDS = make_vocab()
VOCAB_IDS = make_vocab(ids=[1, 3, 149, 187], colors=[(220, 20, 60), (0, 0, 142), (128, 64, 128), (70, 130, 180)])
VOCAB_BIG = make_vocab(ids=[1, 300, 1000, 7])


def make_seg(h: int, w: int, seed: int, *, instances=True, panoptic=True, semantic=True) -> Segmentation:
    """A consistent segmentation: sky on top, road below, a person and a car box (things) on top of them, some void
    pixels; instances are the two things plus a second person overlapping the first."""
    rng = np.random.default_rng(seed)
    pan = np.zeros((h, w), dtype=np.int32)
    split = h // 2
    pan[:split, :] = 1  # sky
    pan[split:, :] = 2  # road
    pan[0, :2] = 0  # void corner
    py, px = int(rng.integers(1, h // 2)), int(rng.integers(0, w // 2))
    person = np.zeros((h, w), bool)
    person[py : py + h // 3, px : px + 3] = True
    car = np.zeros((h, w), bool)
    car[h - 3 : h - 1, w - 5 : w - 1] = True
    pan[person] = 3
    pan[car] = 4
    person2 = np.zeros((h, w), bool)
    person2[py + 1 : py + 3, px + 1 : px + 5] = True
    sem = np.select([pan == 1, pan == 2, pan == 3, pan == 4], [3, 2, 0, 1], default=-1).astype(np.int32)
    segments = []
    for sid, cat, score in ((1, 3, 0.91), (2, 2, 0.8712345678), (3, 0, 0.95), (4, 1, 0.7)):
        m = pan == sid
        segments.append(Segment(sid, cat, score, cat < 2, int(m.sum()), mask_bbox(m)))
    insts = []
    for rank, (m, cat, score) in enumerate(((person, 0, 0.97), (car, 1, 0.8), (person2, 0, 0.333333333)), start=1):
        insts.append(Segment(rank, cat, score, True, int(m.sum()), mask_bbox(m), mask=m))
    return Segmentation(
        (h, w),
        semantic=sem if semantic else None,
        panoptic=pan if panoptic else None,
        segments=segments if panoptic else [],
        instances=insts if instances else None,
    )


ITEMS = [
    (ItemInfo("sub/b.png", "sub/b.png", 10, 14), 1),
    (ItemInfo("a.jpg", "a.jpg", 16, 12), 2),
    (ItemInfo("clip.mp4#000005", "clip.mp4", 11, 9), 3),
]


def dataset():
    return [(item, make_seg(item.height, item.width, seed)) for item, seed in ITEMS]


def image_for(item: ItemInfo) -> np.ndarray:
    rng = np.random.default_rng(len(item.id))
    return rng.integers(90, 110, size=(item.height, item.width, 3), dtype=np.uint8)


def run(writer, data=None, *, images=False, roundtrip=False):
    """write_item for every item, then finalize; records optionally through a JSON round trip with sorted keys (as an
    engine might store them)."""
    records = []
    for item, seg in data if data is not None else dataset():
        record = writer.write_item(item, seg, image_for(item) if images else None)
        if roundtrip and record is not None:
            record = json.loads(json.dumps(record, sort_keys=True))
        records.append((item, record))
    return writer.finalize(sorted(records, key=lambda r: r[0].id))


def tree(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def no_temp_files(root: Path) -> bool:
    return not [p for p in root.rglob("*") if p.name.endswith(".tmp")]


# --- base: paths, ids, atomic writes, encodings ---------------------------------------------------------------------


def test_output_path_appends_suffix_and_keeps_names_apart(tmp_path):
    ids = ["a.jpg", "a.png", "a", "sub/a.jpg", "sub/deeper/a.jpg", "clip.mp4#000005", "clip.mp4#000006", "clip.mp4"]
    paths = [output_path(tmp_path, "labels", i, ".png") for i in ids]
    assert paths[0] == tmp_path / "labels" / "a.jpg.png"
    assert paths[1] == tmp_path / "labels" / "a.png.png"
    assert paths[3] == tmp_path / "labels" / "sub" / "a.jpg.png"
    assert paths[5] == tmp_path / "labels" / "clip.mp4#000005.png"
    assert len(set(paths)) == len(ids)
    # A file never has the name of another item's folder: "sub" (file sub.png) vs "sub/x" (folder sub).
    assert output_path(tmp_path, "labels", "sub", ".png").name == "sub.png"


@pytest.mark.parametrize("item_id", ["../../etc/passwd", "/abs/x.jpg", "a/../../b.jpg", "./x/./y.jpg", "C:\\x.jpg"])
def test_output_path_stays_inside(tmp_path, item_id):
    path = output_path(tmp_path, "panoptic", item_id, ".png")
    root = (tmp_path / "panoptic").resolve()
    assert path.resolve().is_relative_to(root)
    assert ".." not in path.relative_to(tmp_path).parts


@pytest.mark.parametrize("item_id", ["", "/", "..", "a\x00b"])
def test_output_path_rejects_unusable_ids(tmp_path, item_id):
    if item_id == "..":
        assert output_path(tmp_path, "k", item_id, ".png") == tmp_path / "k" / "__.png"
        return
    with pytest.raises(ValueError):
        output_path(tmp_path, "k", item_id, ".png")


def test_category_ids_with_and_without_ids():
    assert category_ids(VOCAB_NOIDS) == [1, 2, 3, 4]
    assert category_ids(VOCAB_IDS) == [1, 3, 149, 187]
    mixed = Vocabulary([VocabClass("a", id=5), VocabClass("b")])
    assert category_ids(mixed) == [5, 1]  # given id, else contiguous index (Vocabulary.ids)


def test_atomic_write_replaces_whole_and_leaves_no_temp(tmp_path):
    path = tmp_path / "d" / "f.bin"
    atomic_write_bytes(path, b"x" * 1000)
    atomic_write_bytes(path, b"short")
    assert path.read_bytes() == b"short"
    assert os.listdir(path.parent) == ["f.bin"]
    atomic_write_text(path, "héllo\n")
    assert path.read_bytes() == "héllo\n".encode()


def test_atomic_write_failure_keeps_old_file(tmp_path, monkeypatch):
    path = tmp_path / "f.json"
    path.write_bytes(b"old")

    def boom(src, dst):
        raise OSError("disk full")

    monkeypatch.setattr(wfiles.os, "replace", boom)
    with pytest.raises(OSError, match="disk full"):
        atomic_write_bytes(path, b"new")
    assert path.read_bytes() == b"old"
    assert os.listdir(tmp_path) == ["f.json"]


def test_remove_stale_temp_files(tmp_path, monkeypatch):
    def die(src, dst):
        raise KeyboardInterrupt

    monkeypatch.setattr(wfiles.os, "unlink", lambda p: None)  # as if the process died before cleaning up
    monkeypatch.setattr(wfiles.os, "replace", die)
    with pytest.raises(KeyboardInterrupt):
        atomic_write_bytes(tmp_path / "panoptic" / "sub" / "a.jpg.png", b"x")
    monkeypatch.undo()
    (stale,) = [p for p in tmp_path.rglob("*") if p.is_file()]
    keep = [tmp_path / ".hidden.tmp", tmp_path / "x.tmp", tmp_path / "a.png"]
    for p in keep:
        p.write_bytes(b"")
    assert remove_stale_temp_files(tmp_path) == [stale]
    assert sorted(p for p in tmp_path.rglob("*") if p.is_file()) == sorted(keep)
    assert remove_stale_temp_files(tmp_path / "missing") == []


def test_encode_png_modes_round_trip_and_are_deterministic():
    rng = np.random.default_rng(0)
    cases = [
        (rng.integers(0, 256, (5, 7), dtype=np.uint8), "L", None),
        (rng.integers(0, 65536, (5, 7), dtype=np.uint16), "I;16", None),
        (rng.integers(0, 256, (5, 7, 3), dtype=np.uint8), "RGB", None),
        (rng.integers(0, 3, (5, 7), dtype=np.uint8), "P", [(0, 0, 0), (255, 0, 0), (0, 255, 0)]),
    ]
    for array, mode, palette in cases:
        data = wfiles.encode_png(array, palette=palette)
        assert data == wfiles.encode_png(array.copy(), palette=palette)
        image = Image.open(io.BytesIO(data))
        assert image.mode == mode
        assert image.info.keys() <= {"transparency", "gamma", "dpi"}  # no text / time metadata
        np.testing.assert_array_equal(np.asarray(image), array)
        if palette:
            assert image.getpalette()[:9] == [0, 0, 0, 255, 0, 0, 0, 255, 0]
    with pytest.raises(ValueError):
        wfiles.encode_png(np.zeros((2, 2), np.float32))


@pytest.mark.parametrize("big", [70000, 5_000_000], ids=["lookup", "search"])
def test_segment_stats_matches_brute_force(big):
    rng = np.random.default_rng(1)
    values = [0, 3, 7, big, 12] + ([-4] if big > 70000 else [])
    id_map = rng.choice(values, size=(13, 17)).astype(np.int32)
    ids = [7, 3, big, 99]  # 12 (and -4) are not listed -> cleaned to 0; 99 is absent
    cleaned, areas, bboxes = wmasks.segment_stats(id_map, ids)
    np.testing.assert_array_equal(cleaned, np.where(np.isin(id_map, ids), id_map, 0))
    for sid, area, bbox in zip(ids, areas, bboxes):
        mask = id_map == sid
        assert area == mask.sum()
        assert bbox == [int(v) for v in mask_bbox(mask)]
    assert bboxes[-1] == [0, 0, 0, 0]
    with pytest.raises(ValueError):
        wmasks.segment_stats(id_map, [3, 3])


def test_round_score():
    assert wmasks.round_score(np.float32(0.1)) == 0.1
    assert wmasks.round_score(0.1234567891) == 0.123457
    assert json.dumps(wmasks.round_score(-0.0)) == "0.0"
    with pytest.raises(ValueError):
        wmasks.round_score(float("nan"))


def test_make_writers(tmp_path):
    writers = make_writers(["coco", "Panoptic,labels", "coco"], tmp_path, VOCAB_NOIDS, palette=True, stream=None)
    assert [w.name for w in writers] == ["coco", "panoptic", "labels"]
    assert writers[2].options["palette"] is True
    with pytest.raises(ValueError) as info:
        make_writers(["coco", "geojson"], tmp_path, VOCAB_NOIDS)
    message = str(info.value)
    assert "geojson" in message and all(name in message for name in WRITERS)
    with pytest.raises(ValueError, match="palete"):
        make_writers(["labels"], tmp_path, VOCAB_NOIDS, palete=True)
    with pytest.raises(ValueError, match="output folder"):
        make_writers(["coco"], None, VOCAB_NOIDS)
    assert isinstance(make_writers("jsonl", None, VOCAB_NOIDS)[0], JsonlWriter)
    with pytest.raises(TypeError):
        LabelsWriter(tmp_path, VOCAB_NOIDS, stream=None)


def test_needed_tasks(tmp_path):
    ws = make_writers(["overlay", "jsonl"], tmp_path, VOCAB_NOIDS)
    assert needed_tasks(ws) == {"panoptic"}
    assert needed_tasks(ws, ["semantic"]) == {"semantic", "instance"}
    assert needed_tasks(make_writers(["coco", "overlay", "labels"], tmp_path, VOCAB_NOIDS)) == {"instance", "semantic"}
    builtin = [WRITERS[n] for n in ("coco", "panoptic", "labels", "overlay", "jsonl")]  # the labelling formats differ
    assert {w.name for w in map(lambda c: c(tmp_path, VOCAB_NOIDS), builtin) if w.needs_image} == {"overlay"}


def test_records_with_duplicate_ids_are_refused(tmp_path):
    item = ITEMS[0][0]
    with pytest.raises(ValueError, match="duplicate"):
        CocoWriter(tmp_path, VOCAB_NOIDS).finalize([(item, {"annotations": []}), (item, {"annotations": []})])


# --- coco -----------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("vocab", [VOCAB_NOIDS, VOCAB_IDS], ids=["noids", "ids"])
def test_coco_loads_in_pycocotools_and_self_evaluates_to_ap_1(tmp_path, vocab):
    writer = CocoWriter(tmp_path, vocab)
    assert writer.item_files(ITEMS[0][0]) == []
    (path,) = run(writer)
    assert path == tmp_path / "instances.json"
    data = json.loads(path.read_text())
    assert list(data) == ["info", "licenses", "images", "annotations", "categories"]
    # Images: id = rank of the item id in sorted order.
    assert [(im["id"], im["file_name"]) for im in data["images"]] == [
        (1, "a.jpg"),
        (2, "clip.mp4"),
        (3, "sub/b.png"),
    ]
    assert data["categories"] == [
        {"id": cid, "name": name, "supercategory": "", "isthing": int(thing)}
        for cid, (name, thing) in zip(category_ids(vocab), CLASSES)
    ]
    assert [a["id"] for a in data["annotations"]] == list(range(1, 10))

    gt = COCO(str(path))
    segs = dict(dataset())
    by_id = {im["id"]: im for im in data["images"]}
    items = {it.id: it for it, _ in ITEMS}
    for ann in data["annotations"]:
        rle = ann["segmentation"]
        mask = mask_util.decode(rle).astype(bool)
        item = next(it for it in items.values() if it.file_name == by_id[ann["image_id"]]["file_name"])
        originals = [i for i in segs[item].instances if np.array_equal(i.mask, mask)]
        assert len(originals) == 1
        inst = originals[0]
        assert ann["category_id"] == category_ids(vocab)[inst.category]
        assert ann["area"] == mask.sum() == mask_util.area(rle)
        assert ann["bbox"] == [int(v) for v in mask_bbox(mask)] == mask_util.toBbox(rle).tolist()
        assert ann["score"] == round(inst.score, 6)
        assert ann["iscrowd"] == 0
    results = gt.loadRes(json.loads(json.dumps(data["annotations"])))
    evaluator = COCOeval(gt, results, "segm")
    evaluator.evaluate()
    evaluator.accumulate()
    with contextlib.redirect_stdout(io.StringIO()):
        evaluator.summarize()
    assert evaluator.stats[0] == pytest.approx(1.0)
    assert evaluator.stats[1] == pytest.approx(1.0)


def test_coco_skips_empty_masks_and_needs_instances(tmp_path):
    item, seg = dataset()[0]
    seg.instances = [*seg.instances, Segment(9, 0, 0.5, True, 0, (0, 0, 0, 0), mask=np.zeros(seg.image_size, bool))]
    record = CocoWriter(tmp_path, VOCAB_NOIDS).write_item(item, seg, None)
    assert len(record["annotations"]) == 3
    with pytest.raises(ValueError, match="instance"):
        CocoWriter(tmp_path, VOCAB_NOIDS).write_item(item, make_seg(item.height, item.width, 0, instances=False))
    with pytest.raises(ValueError, match="size"):
        CocoWriter(tmp_path, VOCAB_NOIDS).write_item(ItemInfo("x", "x", 3, 3), seg)


def test_coco_none_records_keep_image_ids(tmp_path):
    writer = CocoWriter(tmp_path, VOCAB_NOIDS)
    records = [(item, writer.write_item(item, seg)) for item, seg in dataset()]
    records = sorted(records, key=lambda r: r[0].id)
    records[1] = (records[1][0], None)  # clip.mp4#000005 produced nothing
    data = json.loads(writer.finalize(records)[0].read_text())
    assert [im["id"] for im in data["images"]] == [1, 3]
    assert {a["image_id"] for a in data["annotations"]} == {1, 3}


# --- panoptic -------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("vocab", [VOCAB_NOIDS, VOCAB_IDS], ids=["noids", "ids"])
def test_panoptic_png_and_json_agree(tmp_path, vocab):
    writer = PanopticWriter(tmp_path, vocab)
    (path,) = run(writer)
    assert path == tmp_path / "panoptic.json"
    data = json.loads(path.read_text())
    assert list(data) == ["images", "annotations", "categories"]
    colors = vocab.colors()
    assert data["categories"] == [
        {"id": cid, "name": name, "supercategory": "", "isthing": int(thing), "color": list(colors[i])}
        for i, (cid, (name, thing)) in enumerate(zip(category_ids(vocab), CLASSES))
    ]
    segs = {item.file_name: seg for item, seg in dataset()}
    images = {im["id"]: im for im in data["images"]}
    assert [a["file_name"] for a in data["annotations"]] == ["a.jpg.png", "clip.mp4#000005.png", "sub/b.png.png"]
    for ann in data["annotations"]:
        image = images[ann["image_id"]]
        png = tmp_path / "panoptic" / ann["file_name"]
        rgb = np.asarray(Image.open(png))
        assert Image.open(png).mode == "RGB" and rgb.shape == (image["height"], image["width"], 3)
        ids = rgb_to_id(rgb)
        seg = segs[image["file_name"]]
        np.testing.assert_array_equal(ids, seg.panoptic)
        assert set(np.unique(ids)) - {0} == {s["id"] for s in ann["segments_info"]}
        by_id = {s.id: s for s in seg.segments}
        for info in ann["segments_info"]:
            assert list(info) == ["id", "category_id", "iscrowd", "bbox", "area", "score"]
            mask = ids == info["id"]
            assert info["area"] == int(mask.sum())
            assert info["bbox"] == [int(v) for v in mask_bbox(mask)]
            assert info["category_id"] == category_ids(vocab)[by_id[info["id"]].category]
            assert info["score"] == round(by_id[info["id"]].score, 6)
    # The same layout as the real COCO panoptic files.
    real = json.loads((SAMPLE / "panoptic.json").read_text())
    assert set(real["annotations"][0]) == set(data["annotations"][0])
    assert set(real["annotations"][0]["segments_info"][0]) <= set(data["annotations"][0]["segments_info"][0])
    assert set(real["categories"][0]) == set(data["categories"][0])
    assert set(real["images"][0]) >= set(data["images"][0])


def test_panoptic_drops_unlisted_pixels_and_empty_segments_and_encodes_big_ids(tmp_path):
    h, w = 6, 5
    pan = np.zeros((h, w), np.int32)
    pan[:2] = 300  # G channel
    pan[2:4] = 70000  # B channel
    pan[4, :] = 55  # not in segments -> 0
    segments = [Segment(300, 2, 0.5, False, 10, (0, 0, 5, 2)), Segment(70000, 0, 0.9, True, 10, (0, 2, 5, 2))]
    segments.append(Segment(5, 1, 0.9, True, 0, (0, 0, 0, 0)))  # no pixels
    item = ItemInfo("x.jpg", "x.jpg", w, h)
    record = PanopticWriter(tmp_path, VOCAB_NOIDS).write_item(
        item, Segmentation((h, w), panoptic=pan, segments=segments)
    )
    assert [s["id"] for s in record["segments_info"]] == [300, 70000]
    rgb = np.asarray(Image.open(tmp_path / "panoptic" / "x.jpg.png"))
    assert tuple(rgb[0, 0]) == (44, 1, 0) and tuple(rgb[2, 0]) == (112, 17, 1)
    expected = np.where(pan == 55, 0, pan)
    np.testing.assert_array_equal(rgb_to_id(rgb), expected)
    np.testing.assert_array_equal(rgb_to_id(id_to_rgb(expected)), expected)
    with pytest.raises(ValueError):
        id_to_rgb(np.array([[256**3]]))


def test_panoptic_item_files_and_needs_panoptic(tmp_path):
    writer = PanopticWriter(tmp_path, VOCAB_NOIDS)
    item, seg = dataset()[2]
    assert writer.item_files(item) == [tmp_path / "panoptic" / "clip.mp4#000005.png"]
    writer.write_item(item, seg)
    assert all(p.is_file() for p in writer.item_files(item))
    with pytest.raises(ValueError, match="panoptic"):
        writer.write_item(item, make_seg(item.height, item.width, 0, panoptic=False))


# --- labels ---------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("vocab", [VOCAB_NOIDS, VOCAB_IDS, VOCAB_BIG], ids=["noids", "ids", "uint16"])
def test_labels_hold_category_ids(tmp_path, vocab):
    writer = LabelsWriter(tmp_path, vocab, palette=True)
    (legend_path,) = run(writer)
    ids = category_ids(vocab)
    big = max(ids) > 255
    for item, seg in dataset():
        labels_path, color_path = writer.item_files(item)
        assert labels_path == output_path(tmp_path, "labels", item.id, ".png")
        image = Image.open(labels_path)
        assert image.mode == ("I;16" if big else "L")
        labels = np.asarray(image)
        assert labels.dtype == (np.uint16 if big else np.uint8)
        assert labels.shape == seg.image_size
        expected = np.where(seg.semantic >= 0, np.array(ids)[seg.semantic.clip(0)], 0)
        np.testing.assert_array_equal(labels, expected)
        assert set(np.unique(labels)) <= set(ids) | {0}
        assert (labels == 0).any()  # the void pixels
        color = Image.open(color_path)
        colors = vocab.colors()
        if big:
            assert color.mode == "RGB"
            rgb = np.asarray(color)
            for i in range(len(vocab)):
                assert (rgb[seg.semantic == i] == colors[i]).all()
        else:
            assert color.mode == "P"
            np.testing.assert_array_equal(np.asarray(color), labels)
            palette = color.getpalette()
            for i, cid in enumerate(ids):
                assert tuple(palette[3 * cid : 3 * cid + 3]) == colors[i]
            assert palette[:3] == [0, 0, 0]
    legend = json.loads(legend_path.read_text())
    assert legend_path == tmp_path / "labels_legend.json"
    assert legend["unlabelled"] == 0 and legend["dtype"] == ("uint16" if big else "uint8")
    assert legend["categories"] == [
        {"id": cid, "name": name, "color": list(vocab.colors()[i]), "isthing": thing}
        for i, (cid, (name, thing)) in enumerate(zip(ids, CLASSES))
    ]


def test_labels_out_of_vocabulary_is_zero_and_no_palette_by_default(tmp_path):
    writer = LabelsWriter(tmp_path, VOCAB_NOIDS)
    sem = np.array([[0, 1, 2, 3], [4, -1, 99, 0]], np.int32)
    item = ItemInfo("s", "s", 4, 2)
    assert writer.item_files(item) == [tmp_path / "labels" / "s.png"]
    writer.write_item(item, Segmentation((2, 4), semantic=sem))
    np.testing.assert_array_equal(np.asarray(Image.open(tmp_path / "labels" / "s.png")), [[1, 2, 3, 4], [0, 0, 0, 1]])
    assert not (tmp_path / "labels_color").exists()
    with pytest.raises(ValueError, match="semantic"):
        writer.write_item(item, Segmentation((2, 4)))


def test_labels_refuses_category_id_zero(tmp_path):
    with pytest.raises(ValueError, match="id 0"):
        LabelsWriter(tmp_path, Vocabulary([VocabClass("bg", id=0), VocabClass("cat", id=1)]))


# --- overlay --------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("source", ["panoptic", "instances", "semantic"])
def test_overlay_png_draws_on_masked_pixels(tmp_path, source):
    writer = OverlayWriter(tmp_path, VOCAB_NOIDS, overlay_format="png")
    item = ItemInfo("a.jpg", "a.jpg", 96, 64)
    kw = {"panoptic": source == "panoptic", "instances": source == "instances", "semantic": source == "semantic"}
    seg = make_seg(item.height, item.width, 5, **kw)
    image = image_for(item)
    assert writer.write_item(item, seg, image) is None
    (path,) = writer.item_files(item)
    assert path == tmp_path / "overlay" / "a.jpg.png"
    out = np.asarray(Image.open(path))
    assert out.shape == image.shape and out.dtype == np.uint8
    if source == "instances":
        masked = np.any([i.mask for i in seg.instances], axis=0)
    elif source == "panoptic":
        masked = seg.panoptic > 0
    else:
        masked = seg.semantic >= 0
    changed = (out != image).any(axis=2)
    assert changed[masked].mean() > 0.95
    if source == "instances":
        assert changed[~masked].mean() < 0.5  # labels may spill out of the masks, not much more


def test_overlay_jpg_valid_and_deterministic(tmp_path):
    item, seg = dataset()[1]
    image = image_for(item)
    a = OverlayWriter(tmp_path / "a", VOCAB_IDS)
    b = OverlayWriter(tmp_path / "b", VOCAB_IDS)
    a.write_item(item, seg, image)
    b.write_item(item, seg, image)
    (pa,), (pb,) = a.item_files(item), b.item_files(item)
    assert pa.name == "a.jpg.jpg"
    assert pa.read_bytes() == pb.read_bytes()
    decoded = cv2.imdecode(np.frombuffer(pa.read_bytes(), np.uint8), cv2.IMREAD_COLOR)
    assert decoded.shape == (item.height, item.width, 3)
    # Grey and RGBA images are accepted; a missing or mis-sized image is not.
    a.write_item(item, seg, image[:, :, 0])
    a.write_item(item, seg, np.dstack([image, np.full(image.shape[:2], 255, np.uint8)]))
    with pytest.raises(ValueError, match="image"):
        a.write_item(item, seg, None)
    with pytest.raises(ValueError):
        a.write_item(item, seg, image[:-1])
    with pytest.raises(ValueError, match="overlay_format"):
        OverlayWriter(tmp_path, VOCAB_IDS, overlay_format="gif")


def test_overlay_colours_are_the_vocabulary_colours(tmp_path):
    h, w = 40, 60
    pan = np.zeros((h, w), np.int32)
    pan[:, :30] = 1
    seg = Segmentation((h, w), panoptic=pan, segments=[Segment(1, 3, 0.9, False, 1200, (0, 0, 30, 40))])
    writer = OverlayWriter(tmp_path, VOCAB_IDS, overlay_format="png", overlay_alpha=1.0)
    item = ItemInfo("c", "c", w, h)
    image = np.zeros((h, w, 3), np.uint8)
    writer.write_item(item, seg, image)
    out = np.asarray(Image.open(writer.item_files(item)[0]))
    assert tuple(out[2, 2]) == VOCAB_IDS.colors()[3]  # away from the label box
    assert tuple(out[2, 50]) == (0, 0, 0)


# --- jsonl ----------------------------------------------------------------------------------------------------------


def test_jsonl_streams_to_a_text_stream(tmp_path):
    stream = io.StringIO()
    writer = JsonlWriter(None, VOCAB_IDS, stream=stream)
    assert run(writer) == []
    lines = stream.getvalue().splitlines()
    assert len(lines) == 3
    data = dataset()
    for line, (item, seg) in zip(lines, data):
        obj = json.loads(line)
        assert list(obj) == ["id", "width", "height", "segments"]
        assert (obj["id"], obj["width"], obj["height"]) == (item.id, item.width, item.height)
        assert len(obj["segments"]) == len(seg.instances)
        for s, inst in zip(obj["segments"], seg.instances):
            assert list(s) == ["id", "category_id", "category", "score", "isthing", "bbox", "area", "rle"]
            np.testing.assert_array_equal(mask_util.decode(s["rle"]).astype(bool), inst.mask)
            assert s["category_id"] == VOCAB_IDS.ids[inst.category]
            assert s["category"] == VOCAB_IDS.names[inst.category] and s["isthing"] is True
            assert s["area"] == inst.mask.sum() and s["bbox"] == [int(v) for v in inst.bbox]
    assert not list(tmp_path.iterdir())


def test_jsonl_file_is_sorted_and_matches_the_stream(tmp_path, capsys):
    (path,) = run(JsonlWriter(tmp_path, VOCAB_NOIDS, stream=io.StringIO()), roundtrip=True)
    assert path == tmp_path / "predictions.jsonl"
    text = path.read_text()
    assert [json.loads(line)["id"] for line in text.splitlines()] == ["a.jpg", "clip.mp4#000005", "sub/b.png"]
    streamed = JsonlWriter(None, VOCAB_NOIDS)  # default stream: sys.stdout
    for item, seg in sorted(dataset(), key=lambda r: r[0].id):
        streamed.write_item(item, seg)
    assert capsys.readouterr().out == text


def test_jsonl_uses_panoptic_segments_without_instances(tmp_path):
    item, _ = ITEMS[0]
    seg = make_seg(item.height, item.width, 7, instances=False)
    stream = io.StringIO()
    JsonlWriter(None, VOCAB_NOIDS, stream=stream).write_item(item, seg)
    obj = json.loads(stream.getvalue())
    assert [s["id"] for s in obj["segments"]] == [1, 2, 3, 4]
    for s in obj["segments"]:
        mask = seg.panoptic == s["id"]
        np.testing.assert_array_equal(mask_util.decode(s["rle"]).astype(bool), mask)
        assert s["area"] == mask.sum() and s["bbox"] == [int(v) for v in mask_bbox(mask)]
        assert s["isthing"] == (s["id"] > 2)
    with pytest.raises(ValueError, match="instance or panoptic"):
        JsonlWriter(None, VOCAB_NOIDS, stream=stream).write_item(item, Segmentation(seg.image_size))


# --- the whole output folder: determinism, resume, atomicity ---------------------------------------------------------


def run_all(out: Path, *, order=None, roundtrip=False, repeat=()):
    # the five general formats (the labelling-tool formats have their own test files)
    writers = make_writers(["coco", "panoptic", "labels", "overlay", "jsonl"], out, VOCAB_IDS, palette=True)
    data = dataset()
    records = {w.name: {} for w in writers}
    for index in order or range(len(data)):
        item, seg = data[index]
        for w in writers:
            record = w.write_item(item, seg, image_for(item))
            if roundtrip and record is not None:
                record = json.loads(json.dumps(record, sort_keys=True, indent=3))
            records[w.name][item.id] = record
    for index in repeat:  # a resumed run writes some items again
        item, seg = data[index]
        for w in writers:
            w.write_item(item, seg, image_for(item))
    written = []
    for w in writers:
        written += w.finalize(sorted(((it, records[w.name][it.id]) for it, _ in data), key=lambda r: r[0].id))
    return writers, written


def test_outputs_are_byte_identical_across_runs_orders_and_resumes(tmp_path):
    _, written = run_all(tmp_path / "one")
    run_all(tmp_path / "two", order=[2, 0, 1], roundtrip=True, repeat=[0, 2])
    one, two = tree(tmp_path / "one"), tree(tmp_path / "two")
    assert one == two
    assert sorted(p.relative_to(tmp_path / "one").as_posix() for p in written) == [
        "instances.json",
        "labels_legend.json",
        "panoptic.json",
        "predictions.jsonl",
    ]
    assert no_temp_files(tmp_path / "one") and no_temp_files(tmp_path / "two")
    # 3 items x (panoptic, labels, labels_color, overlay) + 4 run-level files.
    assert len(one) == 3 * 4 + 4
    for text in ("instances.json", "panoptic.json", "predictions.jsonl"):
        assert str(tmp_path) not in one[text].decode()


def test_every_per_item_file_is_listed_by_item_files(tmp_path):
    writers, written = run_all(tmp_path)
    listed = {p for w in writers for item, _ in ITEMS for p in w.item_files(item)} | set(written)
    assert listed == {p for p in tmp_path.rglob("*") if p.is_file()}


def test_item_names_never_collide(tmp_path):
    ids = ["a.jpg", "a.png", "a", "sub/a.jpg", "clip.mp4#000005", "clip.mp4#000006"]
    writers = make_writers(["panoptic", "labels", "overlay"], tmp_path, VOCAB_NOIDS, overlay_format="png")
    for n, item_id in enumerate(ids):
        item = ItemInfo(item_id, item_id, 6, 5)
        seg = make_seg(5, 6, n)
        for w in writers:
            w.write_item(item, seg, image_for(item))
    files = [p for p in tmp_path.rglob("*") if p.is_file()]
    assert len(files) == len(ids) * 3
    stored = {i: rgb_to_id(np.asarray(Image.open(output_path(tmp_path, "panoptic", i, ".png")))) for i in ids}
    for n, item_id in enumerate(ids):
        np.testing.assert_array_equal(stored[item_id], make_seg(5, 6, n).panoptic)


# --- real COCO panoptic data ----------------------------------------------------------------------------------------


def real_sample():
    if not (SAMPLE / "panoptic.json").is_file():
        pytest.skip("COCO panoptic sample not available")
    from masqclip_cli.vocab import load_preset

    vocab = load_preset("coco-panoptic")
    gt = json.loads((SAMPLE / "panoptic.json").read_text())
    images = {im["id"]: im for im in gt["images"]}
    out = []
    for ann in gt["annotations"]:
        im = images[ann["image_id"]]
        pan = rgb_to_id(np.asarray(Image.open(SAMPLE / "panoptic" / ann["file_name"]).convert("RGB")))
        segments = [
            Segment(s["id"], vocab.ids.index(s["category_id"]), 1.0, vocab.isthing[vocab.ids.index(s["category_id"])],
                    s["area"], tuple(s["bbox"]))
            for s in ann["segments_info"]
        ]  # fmt: skip
        item = ItemInfo(im["file_name"], im["file_name"], im["width"], im["height"])
        out.append((item, Segmentation((im["height"], im["width"]), panoptic=pan, segments=segments), ann))
    return vocab, gt, out


def test_panoptic_writer_reproduces_real_coco_panoptic_ground_truth(tmp_path):
    vocab, gt, samples = real_sample()
    writer = PanopticWriter(tmp_path, vocab)
    records = [(item, writer.write_item(item, seg)) for item, seg, _ in samples]
    data = json.loads(writer.finalize(records)[0].read_text())
    assert [{k: c[k] for k in ("id", "name", "isthing", "color")} for c in gt["categories"]] == [
        {k: c[k] for k in ("id", "name", "isthing", "color")} for c in data["categories"]
    ]
    by_name = {a["file_name"]: a for a in data["annotations"]}
    for item, seg, gt_ann in samples:
        ann = by_name[item.id + ".png"]
        ids = rgb_to_id(np.asarray(Image.open(tmp_path / "panoptic" / ann["file_name"])))
        np.testing.assert_array_equal(ids, seg.panoptic)
        keys = ("id", "category_id", "area", "bbox")
        assert sorted([s[k] for k in keys] for s in ann["segments_info"]) == sorted(
            [s[k] for k in keys] for s in gt_ann["segments_info"]
        )


def test_overlay_falls_back_to_semantic_when_panoptic_is_empty(tmp_path):
    from masqclip_cli.io.writers import make_writers
    from masqclip_cli.io.writers.base import ItemInfo
    from masqclip_cli.structures import Segmentation
    from masqclip_cli.vocab import load_vocabulary

    vocab = load_vocabulary("a; b [stuff]")
    image = np.full((20, 30, 3), 128, np.uint8)
    semantic = np.zeros((20, 30), np.int32)
    semantic[:, 15:] = 1
    seg = Segmentation(image_size=(20, 30), semantic=semantic, panoptic=np.zeros((20, 30), np.int32), segments=[])
    (writer,) = make_writers(["overlay"], tmp_path, vocab, overlay_format="png")
    info = ItemInfo(id="x.png", file_name="x.png", width=30, height=20)
    writer.write_item(info, seg, image)
    drawn = np.asarray(Image.open(tmp_path / "overlay" / "x.png.png").convert("RGB")).astype(int)
    # both halves are tinted, in two different class colours
    assert (drawn[10, 2] != 128).any() and (drawn[10, 27] != 128).any()
    assert (drawn[10, 2] != drawn[10, 27]).any()


# ---------------------------------------------------------------------------------------------------- streaming
def test_json_stream_equals_json_of_the_materialised_object(tmp_path):
    """Iterators anywhere in dicts (or directly in lists) are written as arrays; the bytes equal atomic_write_json."""

    def gen(n):
        for i in range(n):
            yield {"id": i, "name": f"é{i}", "bbox": [i, i + 1], "score": i / 3, "nested": iter([i, None, True])}

    def materialise(obj):
        if isinstance(obj, dict):
            return {k: materialise(v) for k, v in obj.items()}
        if isinstance(obj, (list, tuple)) or hasattr(obj, "__next__"):
            return [materialise(v) for v in obj]
        return obj

    for n in (0, 1, 5):
        obj = {"images": [{"id": 1}], "annotations": gen(n), "empty": iter(()), "mixed": [1, iter([2, 3]), "x"]}
        expected = tmp_path / f"expected{n}.json"
        wfiles.atomic_write_json(expected, materialise(
            {"images": [{"id": 1}], "annotations": gen(n), "empty": iter(()), "mixed": [1, iter([2, 3]), "x"]}
        ))
        streamed = wfiles.atomic_write_json_stream(tmp_path / f"streamed{n}.json", obj)
        assert streamed.read_bytes() == expected.read_bytes()
        json.loads(streamed.read_text())
    with pytest.raises(ValueError):
        wfiles.atomic_write_json_stream(tmp_path / "nan.json", {"a": iter([float("nan")])})
    assert not list(tmp_path.glob(".*.tmp")) and not (tmp_path / "nan.json").exists()


def test_stream_write_keeps_an_identical_file_and_replaces_a_different_one(tmp_path):
    path = tmp_path / "a.txt"
    wfiles.atomic_write_chunks(path, iter(["x\n", "y\n"]))
    before = path.stat().st_mtime_ns
    os.utime(path, ns=(before - 10**9, before - 10**9))
    wfiles.atomic_write_chunks(path, iter(["x\n", "y\n"]))  # same bytes: the file is left as it was
    assert path.stat().st_mtime_ns == before - 10**9
    wfiles.atomic_write_chunks(path, iter(["x\n", "z" * (3 << 20), "\n"]))  # larger than the write buffer
    assert path.read_text() == "x\n" + "z" * (3 << 20) + "\n"


class _CountingRecords:
    """A sorted-by-id record view (as the engine hands writers) that counts how many records were read."""

    sorted_by_id = True

    def __init__(self, items):
        self.items, self.reads = items, 0

    def __len__(self):
        return len(self.items)

    def __iter__(self):
        for item in self.items:
            self.reads += 1
            yield item


def test_ranked_records_streams_a_sorted_view_and_checks_order():
    items = [(wbase.ItemInfo(id=f"im{i}", file_name=f"im{i}.png", width=4, height=3), {"n": i}) for i in range(5)]
    view = _CountingRecords(items)
    ranked = wbase.ranked_records(view)
    assert next(ranked)[:2] == (1, items[0][0]) and view.reads == 1  # lazy: one record read so far
    assert [r for r, _, _ in ranked] == [2, 3, 4, 5]
    with pytest.raises(ValueError, match="duplicate"):
        list(wbase.ranked_records(_CountingRecords([items[0], items[0]])))
    with pytest.raises(ValueError, match="order"):
        list(wbase.ranked_records(_CountingRecords([items[1], items[0]])))
    # anything else is sorted first, as before
    assert [it.id for _, it, _ in wbase.ranked_records(list(reversed(items)))] == [f"im{i}" for i in range(5)]
