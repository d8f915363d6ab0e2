"""Evaluation dataset readers (masqclip_cli.data.datasets), each on a tiny fixture in its real on-disk layout."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from pycocotools.coco import COCO

from masqclip_cli.data.datasets import (
    DATASETS,
    DatasetError,
    DatasetInfo,
    EvalDataset,
    GTSegment,
    load_dataset,
)
from masqclip_cli.vocab import Vocabulary, load_preset

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning:pycocotools")

SAMPLE_DIR = Path(__file__).resolve().parents[2] / ".." / "shared" / "data" / "coco-panoptic-sample"

H, W = 6, 8  # every fixture image is 6 x 8


# --------------------------------------------------------------------------------------------------------------------
# fixture writers


def write_image(path: Path, h: int = H, w: int = W, value: int = 100) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((h, w, 3), value, dtype=np.uint8)).save(path)
    return path


def write_panoptic_png(path: Path, ids: np.ndarray) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    ids = np.asarray(ids, dtype=np.int64)
    rgb = np.stack([ids % 256, ids // 256 % 256, ids // 65536], axis=-1).astype(np.uint8)
    Image.fromarray(rgb).save(path)
    return path


def write_label(path: Path, values: np.ndarray) -> Path:
    """PNG (uint8) or 16-bit TIFF (uint16, PIL mode I;16) by the extension."""
    path.parent.mkdir(parents=True, exist_ok=True)
    values = np.asarray(values)
    if path.suffix.lower() in (".tif", ".tiff"):
        h, w = values.shape
        Image.frombytes("I;16", (w, h), values.astype("<u2").tobytes()).save(path)
    else:
        Image.fromarray(values.astype(np.uint8)).save(path)
    return path


def write_json(path: Path, obj) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj))
    return path


def bbox_of(mask: np.ndarray) -> list[int]:
    ys, xs = np.nonzero(mask)
    return [int(xs.min()), int(ys.min()), int(xs.max() - xs.min() + 1), int(ys.max() - ys.min() + 1)]


def panoptic_annotation(image_id, png_name: str, ids: np.ndarray, cats: dict[int, int], crowd=()) -> dict:
    """segments_info for every non-zero id of ``ids`` (category from ``cats``)."""
    segments = []
    for seg_id in sorted(int(v) for v in np.unique(ids) if v):
        mask = ids == seg_id
        segments.append(
            {
                "id": seg_id,
                "category_id": cats[seg_id],
                "area": int(mask.sum()),
                "bbox": bbox_of(mask),
                "iscrowd": int(seg_id in crowd),
            }
        )
    return {"image_id": image_id, "file_name": png_name, "segments_info": segments}


# Two panoptic maps. Image A: person (id 11), crowd person (12), car (13), banner stuff (14), void (0).
IDS_A = np.zeros((H, W), dtype=np.int64)
IDS_A[:2, :4] = 11
IDS_A[:2, 4:] = 12
IDS_A[2:4, :] = 13
IDS_A[4:, :6] = 14  # the last two columns of rows 4-5 stay void
# Image B: a large segment id (needs G and B channels) and one stuff segment.
IDS_B = np.full((H, W), 70000, dtype=np.int64)
IDS_B[3:, :] = 5


def make_coco_panoptic(root: Path, *, cat_person=1, extra_json=None) -> Path:
    """coco/val2017/, coco/panoptic_val2017/, coco/annotations/panoptic_val2017.json (COCO ids from the preset)."""
    vocab = load_preset("coco-panoptic")
    coco = root / "coco"
    write_image(coco / "val2017" / "000000000139.jpg")
    write_image(coco / "val2017" / "000000000042.jpg")
    write_panoptic_png(coco / "panoptic_val2017" / "000000000139.png", IDS_A)
    write_panoptic_png(coco / "panoptic_val2017" / "000000000042.png", IDS_B)
    categories = [{"id": c.id, "name": c.name, "isthing": int(c.isthing)} for c in vocab]
    data = {
        "images": [
            {"id": 139, "file_name": "000000000139.jpg", "height": H, "width": W},
            {"id": 42, "file_name": "000000000042.jpg", "height": H, "width": W},
        ],
        "annotations": [
            panoptic_annotation(139, "000000000139.png", IDS_A, {11: cat_person, 12: 1, 13: 3, 14: 92}, crowd={12}),
            panoptic_annotation(42, "000000000042.png", IDS_B, {70000: 1, 5: 92}),
        ],
        "categories": categories,
    }
    if extra_json:
        extra_json(data)
    write_json(coco / "annotations" / "panoptic_val2017.json", data)
    return root


def coco_from(d: dict) -> COCO:
    coco = COCO()
    coco.dataset = d
    coco.createIndex()
    return coco


def mask_of(coco: COCO, ann: dict) -> np.ndarray:
    return coco.annToMask(ann).astype(bool)


# --------------------------------------------------------------------------------------------------------------------
# the table


def test_table_lists_every_dataset_with_its_defaults():
    names = [
        "coco-panoptic", "ade20k-panoptic", "ade20k-150", "ade20k-847", "pascal-context-59", "pascal-context-459",
        "coco-instance-65", "coco-instance-48", "coco-instance-17", "synthetic", "generic-semantic",
        "generic-panoptic", "generic-instance",
    ]  # fmt: skip
    assert list(DATASETS) == names
    for name, info in DATASETS.items():
        assert isinstance(info, DatasetInfo) and info.name == name
        assert info.task in ("panoptic", "semantic", "instance")
        assert info.how_to_prepare and info.layout and info.summary
        if name == "synthetic":  # evaluated at its native size (the scale it is drawn and trained at)
            assert info.short_side == 0 and info.max_size > 0
        else:
            assert info.short_side > 0 and info.max_size >= info.short_side
        assert info.ignore_label == {"panoptic": 0, "instance": None}.get(info.task, info.ignore_label)
    assert [n for n, i in DATASETS.items() if i.preset is None] == [
        "synthetic", "generic-semantic", "generic-panoptic", "generic-instance",
    ]  # fmt: skip
    assert {n: DATASETS[n].ignore_label for n in ("ade20k-150", "ade20k-847", "pascal-context-59")} == {
        "ade20k-150": 255, "ade20k-847": 65535, "pascal-context-59": 255,
    }  # fmt: skip
    assert DATASETS["synthetic"].options[-1] == "split"
    assert (DATASETS["coco-panoptic"].short_side, DATASETS["coco-panoptic"].max_size) == (800, 1333)
    assert (DATASETS["ade20k-panoptic"].short_side, DATASETS["ade20k-panoptic"].max_size) == (640, 2560)
    assert (DATASETS["ade20k-847"].short_side, DATASETS["ade20k-847"].max_size) == (512, 2048)
    assert "cocodataset.org" in DATASETS["coco-panoptic"].how_to_prepare
    assert "prepare_ade20k_pan_seg.py" in DATASETS["ade20k-panoptic"].how_to_prepare
    assert "prepare_ade20k_sem_seg.py" in DATASETS["ade20k-150"].how_to_prepare
    for name in ("coco-panoptic", "ade20k-150", "ade20k-847", "pascal-context-59", "pascal-context-459",
                 "coco-instance-65", "coco-instance-48", "coco-instance-17"):  # fmt: skip
        assert load_preset(DATASETS[name].preset)  # the named preset exists


def test_unknown_name_and_option(tmp_path):
    with pytest.raises(DatasetError, match="unknown dataset 'coco'.*coco-panoptic"):
        load_dataset("coco", tmp_path)
    with pytest.raises(DatasetError, match="does not take labels"):
        load_dataset("coco-panoptic", tmp_path, labels=tmp_path)
    with pytest.raises(DatasetError, match="does not take split"):
        load_dataset("ade20k-150", tmp_path, split="val")


def test_default_root_is_detectron2_datasets(tmp_path, monkeypatch):
    make_coco_panoptic(tmp_path / "d2")
    monkeypatch.setenv("DETECTRON2_DATASETS", str(tmp_path / "d2"))
    assert len(load_dataset("coco-panoptic")) == 2
    monkeypatch.delenv("DETECTRON2_DATASETS")
    monkeypatch.chdir(tmp_path)
    with pytest.raises(DatasetError, match=r"coco-panoptic: image folder datasets/coco/val2017 is missing"):
        load_dataset("coco-panoptic")  # default: ./datasets
    make_coco_panoptic(tmp_path / "datasets")
    assert len(load_dataset("coco-panoptic")) == 2


# --------------------------------------------------------------------------------------------------------------------
# COCO panoptic


def test_coco_panoptic_samples_and_gt(tmp_path):
    make_coco_panoptic(tmp_path)
    data = load_dataset("coco-panoptic", tmp_path)
    vocab = load_preset("coco-panoptic")
    assert isinstance(data, EvalDataset)
    assert (data.name, data.task, data.ignore_label) == ("coco-panoptic", "panoptic", 0)
    assert (data.short_side, data.max_size) == (800, 1333)
    assert data.tasks() == ("panoptic", "semantic", "instance")
    assert data.vocabulary == vocab and data.novel is None and data.instances_json is None
    assert data.image_dir == tmp_path / "coco" / "val2017"
    assert [s.id for s in data.samples] == ["000000000042.jpg", "000000000139.jpg"]  # sorted by id
    assert [s.image_id for s in data.samples] == [42, 139]
    assert data.samples[1].image_path == tmp_path / "coco" / "val2017" / "000000000139.jpg"
    assert data.samples[1].image_size() == (H, W)

    ids, segments = data.samples[1].panoptic_gt()
    assert ids.dtype == np.int64 and ids.shape == (H, W)
    np.testing.assert_array_equal(ids, IDS_A)
    person, car, banner = vocab.names.index("person"), vocab.names.index("car"), vocab.names.index("banner")
    assert segments == [
        GTSegment(11, person, False, True),
        GTSegment(12, person, True, True),
        GTSegment(13, car, False, True),
        GTSegment(14, banner, False, False),
    ]
    ids_b, segments_b = data.samples[0].panoptic_gt()
    np.testing.assert_array_equal(ids_b, IDS_B)  # 70000 = 112 + 17 * 256 + 1 * 65536
    assert {s.id for s in segments_b} == {5, 70000}

    sem = data.samples[1].semantic_gt()
    assert sem.dtype == np.int64 and sem.shape == (H, W)
    expected = np.full((H, W), -1)
    expected[:2, :4] = person  # crowd (12) and void stay -1
    expected[2:4, :] = car
    expected[4:, :6] = banner
    np.testing.assert_array_equal(sem, expected)


def test_construction_reads_no_pixels(tmp_path):
    make_coco_panoptic(tmp_path)
    png = tmp_path / "coco" / "panoptic_val2017" / "000000000139.png"
    png.write_bytes(b"not a png")
    (tmp_path / "coco" / "val2017" / "000000000139.jpg").write_bytes(b"not a jpeg")
    data = load_dataset("coco-panoptic", tmp_path)  # fine: nothing decoded yet
    with pytest.raises(DatasetError, match="000000000139.png: cannot read the panoptic PNG"):
        data.samples[1].panoptic_gt()
    data.samples[0].panoptic_gt()  # the other sample is unaffected


def test_coco_panoptic_instance_gt_from_things(tmp_path):
    make_coco_panoptic(tmp_path)
    data = load_dataset("coco-panoptic", tmp_path)
    gt = data.instance_gt_coco()
    coco = coco_from(gt)
    assert [(img["id"], img["file_name"], img["height"], img["width"]) for img in gt["images"]] == [
        (1, "000000000042.jpg", H, W),
        (2, "000000000139.jpg", H, W),
    ]
    assert [c["id"] for c in gt["categories"]] == load_preset("coco-panoptic").ids
    anns = coco.loadAnns(coco.getAnnIds())
    # things only: 70000 (image 1), 11, 12 (crowd), 13 (image 2); banner (stuff) is left out
    assert sorted((a["image_id"], a["category_id"], a["iscrowd"], a["area"]) for a in anns) == [
        (1, 1, 0, 3 * W), (2, 1, 0, 8), (2, 1, 1, 8), (2, 3, 0, 2 * W),
    ]  # fmt: skip
    for ann in anns:
        mask = mask_of(coco, ann)
        assert mask.sum() == ann["area"] and ann["bbox"] == bbox_of(mask)
    crowd = next(a for a in anns if a["iscrowd"])
    np.testing.assert_array_equal(mask_of(coco, crowd), IDS_A == 12)
    assert all(isinstance(a["segmentation"]["counts"], str) for a in gt["annotations"])
    json.dumps(gt)  # JSON-serialisable


def test_coco_panoptic_missing_files_name_them(tmp_path):
    make_coco_panoptic(tmp_path)
    (tmp_path / "coco" / "panoptic_val2017" / "000000000042.png").unlink()
    with pytest.raises(DatasetError, match=r"panoptic PNG .*000000000042\.png .*is missing"):
        load_dataset("coco-panoptic", tmp_path)
    make_coco_panoptic(tmp_path)
    (tmp_path / "coco" / "val2017" / "000000000139.jpg").unlink()
    with pytest.raises(DatasetError, match=r"image file .*000000000139\.jpg .*is missing"):
        load_dataset("coco-panoptic", tmp_path)
    make_coco_panoptic(tmp_path)
    (tmp_path / "coco" / "annotations" / "panoptic_val2017.json").unlink()
    with pytest.raises(DatasetError, match=r"panoptic_val2017\.json is missing"):
        load_dataset("coco-panoptic", tmp_path)
    with pytest.raises(DatasetError, match=r"panoptic PNG folder .*nowhere is missing"):
        load_dataset("coco-panoptic", tmp_path, panoptic_dir=tmp_path / "nowhere")


def test_coco_panoptic_mismatched_ids_name_them(tmp_path):
    make_coco_panoptic(tmp_path, cat_person=999)
    with pytest.raises(DatasetError, match=r"panoptic_val2017\.json: image id 139 segment 11: category id 999 is "
                                           r"not in the vocabulary preset:coco-panoptic"):  # fmt: skip
        load_dataset("coco-panoptic", tmp_path)

    def stray_annotation(d):
        d["annotations"][1]["image_id"] = 7

    make_coco_panoptic(tmp_path, extra_json=stray_annotation)
    with pytest.raises(DatasetError, match=r"panoptic_val2017\.json: annotation names image id 7, which is not in"):
        load_dataset("coco-panoptic", tmp_path)

    def unlisted_segment(d):
        d["annotations"][0]["segments_info"].pop()  # segment 14 stays in the PNG

    make_coco_panoptic(tmp_path, extra_json=unlisted_segment)
    data = load_dataset("coco-panoptic", tmp_path)
    with pytest.raises(DatasetError, match=r"000000000139\.png: segment id 14 is in the PNG but not in the JSON"):
        data.samples[1].panoptic_gt()

    def wrong_size(d):
        d["images"][0]["height"] = 5

    make_coco_panoptic(tmp_path, extra_json=wrong_size)
    with pytest.raises(DatasetError, match=r"000000000139\.png: size 6x8 .* does not match the image size 5x8"):
        load_dataset("coco-panoptic", tmp_path).samples[1].panoptic_gt()


@pytest.mark.skipif(not SAMPLE_DIR.is_dir(), reason="shared COCO panoptic sample not present")
def test_real_coco_panoptic_sample():
    data = load_dataset(
        "coco-panoptic",
        images=SAMPLE_DIR / "images",
        panoptic_dir=SAMPLE_DIR / "panoptic",
        panoptic_json=SAMPLE_DIR / "panoptic.json",
    )
    raw = json.loads((SAMPLE_DIR / "panoptic.json").read_text())
    vocab = data.vocabulary
    cat_names = {c["id"]: c["name"] for c in raw["categories"]}
    by_image = {a["image_id"]: a for a in raw["annotations"]}
    assert [s.id for s in data.samples] == ["000000142238.jpg", "000000439180.jpg"]
    for sample in data.samples:
        entry = by_image[sample.image_id]
        ids, segments = sample.panoptic_gt()
        assert ids.shape == sample.image_size() == (sample.height, sample.width)
        assert len(segments) == len(entry["segments_info"])
        for seg, info in zip(segments, entry["segments_info"]):
            assert seg.id == info["id"]
            assert int((ids == seg.id).sum()) == info["area"]  # the JSON area is the pixel count
            assert vocab.ids[seg.category] == info["category_id"]  # maps onto the coco-panoptic preset
            assert vocab[seg.category].name == cat_names[info["category_id"]]
            assert seg.isthing == vocab[seg.category].isthing
            assert seg.iscrowd == bool(info["iscrowd"])
        sem = sample.semantic_gt()
        assert sem.min() >= -1 and sem.max() < len(vocab)
        assert ((sem == -1) == (ids == 0) | np.isin(ids, [s.id for s in segments if s.iscrowd])).all()
    gt = data.instance_gt_coco()
    coco = coco_from(gt)
    assert len(coco.getImgIds()) == 2
    n_things = sum(1 for a in raw["annotations"] for s in a["segments_info"] if s["category_id"] <= 90)
    assert len(gt["annotations"]) == n_things
    for ann in coco.loadAnns(coco.getAnnIds()):
        assert mask_of(coco, ann).sum() == ann["area"]


# --------------------------------------------------------------------------------------------------------------------
# ADE20K panoptic


def ade_panoptic_fixture(root: Path, *, offset: int = 0) -> Path:
    """ADEChallengeData2016 panoptic layout as Mask2Former's prepare_ade20k_pan_seg.py writes it: string image ids,
    categories 0..149 named like the upstream list (``offset=1`` renumbers them 1..150)."""
    vocab = load_preset("ade20k-150")
    ade = root / "ADEChallengeData2016"
    categories = []
    for i, c in enumerate(vocab):
        name = ", ".join(c.prompts) if i != 8 else "window "  # upstream has a trailing space here
        categories.append({"id": i + offset, "name": name, "isthing": int(c.isthing)})
    ids_a = np.zeros((H, W), dtype=np.int64)
    ids_a[:3] = 1
    ids_a[3:] = 2
    images, annotations = [], []
    for stem, ids, cats in (
        ("ADE_val_00000002", ids_a, {1: 12 + offset, 2: 6 + offset}),  # person (thing), road (stuff)
        ("ADE_val_00000001", np.full((H, W), 3), {3: 0 + offset}),  # wall
    ):
        write_image(ade / "images" / "validation" / f"{stem}.jpg")
        write_panoptic_png(ade / "ade20k_panoptic_val" / f"{stem}.png", ids)
        images.append({"id": stem, "file_name": f"{stem}.jpg", "height": H, "width": W})
        annotations.append(panoptic_annotation(stem, f"{stem}.png", ids, cats))
    write_json(
        ade / "ade20k_panoptic_val.json", {"images": images, "annotations": annotations, "categories": categories}
    )
    return root


@pytest.mark.parametrize("offset", [0, 1])
def test_ade20k_panoptic_maps_categories_by_name(tmp_path, offset):
    ade_panoptic_fixture(tmp_path, offset=offset)
    data = load_dataset("ade20k-panoptic", tmp_path)
    assert (data.task, data.ignore_label, data.short_side, data.max_size) == ("panoptic", 0, 640, 2560)
    assert data.vocabulary == load_preset("ade20k-150")
    assert [s.id for s in data.samples] == ["ADE_val_00000001.jpg", "ADE_val_00000002.jpg"]
    assert [s.image_id for s in data.samples] == ["ADE_val_00000001", "ADE_val_00000002"]
    _, segments = data.samples[1].panoptic_gt()
    assert [(s.category, s.isthing) for s in segments] == [(12, True), (6, False)]
    sem = data.samples[1].semantic_gt()
    assert (sem[:3] == 12).all() and (sem[3:] == 6).all()
    assert (data.samples[0].semantic_gt() == 0).all()
    gt = data.instance_gt_coco()
    coco_from(gt)
    assert [(a["image_id"], a["category_id"]) for a in gt["annotations"]] == [(2, 13)]  # ids 1..150 (no preset ids)


def test_ade20k_panoptic_unknown_category_name(tmp_path):
    ade_panoptic_fixture(tmp_path)
    path = tmp_path / "ADEChallengeData2016" / "ade20k_panoptic_val.json"
    d = json.loads(path.read_text())
    d["categories"][12]["name"] = "alien"
    path.write_text(json.dumps(d))
    with pytest.raises(DatasetError, match=r"ade20k_panoptic_val\.json: .*category id 12 \('alien'\) is not in the "
                                           r"vocabulary preset:ade20k-150 \(matched by name\)"):  # fmt: skip
        load_dataset("ade20k-panoptic", tmp_path)


# --------------------------------------------------------------------------------------------------------------------
# semantic datasets


LABEL_A = np.array([[0, 5, 255, 149]] * 3 + [[1, 1, 1, 1]] * 3, dtype=np.int64).repeat(2, axis=1)  # 6 x 8


def ade_semantic_fixture(root: Path, *, d2: bool, original: bool) -> Path:
    ade = root / "ADEChallengeData2016"
    for stem in ("ADE_val_00000002", "ADE_val_00000001"):
        write_image(ade / "images" / "validation" / f"{stem}.jpg")
        if d2:  # 0..149, 255 = ignore
            write_label(ade / "annotations_detectron2" / "validation" / f"{stem}.png", LABEL_A)
        if original:  # 1..150, 0 = ignore
            write_label(ade / "annotations" / "validation" / f"{stem}.png", np.where(LABEL_A == 255, 0, LABEL_A + 1))
    return root


@pytest.mark.parametrize("layout", ["detectron2", "original", "both"])
def test_ade20k_150_both_label_conventions(tmp_path, layout):
    ade_semantic_fixture(tmp_path, d2=layout != "original", original=layout != "detectron2")
    data = load_dataset("ade20k-150", tmp_path)
    assert (data.task, data.tasks(), data.short_side, data.max_size) == ("semantic", ("semantic",), 512, 2048)
    assert data.ignore_label == (0 if layout == "original" else 255)
    assert [s.id for s in data.samples] == ["ADE_val_00000001.jpg", "ADE_val_00000002.jpg"]
    assert [s.image_id for s in data.samples] == ["ADE_val_00000001", "ADE_val_00000002"]
    folder = "annotations" if layout == "original" else "annotations_detectron2"
    assert data.samples[0].label_path.parent.parent.name == folder
    sem = data.samples[0].semantic_gt()
    assert sem.dtype == np.int64 and sem.shape == (H, W)
    np.testing.assert_array_equal(sem, np.where(LABEL_A == 255, -1, LABEL_A))
    with pytest.raises(DatasetError, match="no panoptic ground truth"):
        data.samples[0].panoptic_gt()
    with pytest.raises(DatasetError, match="no instance ground truth"):
        data.instance_gt_coco()


def test_ade20k_150_out_of_range_label_names_file_and_value(tmp_path):
    ade_semantic_fixture(tmp_path, d2=False, original=True)
    bad = np.ones((H, W), dtype=np.uint8)
    bad[0, 0] = 151
    write_label(tmp_path / "ADEChallengeData2016" / "annotations" / "validation" / "ADE_val_00000001.png", bad)
    data = load_dataset("ade20k-150", tmp_path)
    with pytest.raises(DatasetError, match=r"ADE_val_00000001\.png: label value 151 is not a class \(1\.\.150\) or "
                                           r"the ignore value 0"):  # fmt: skip
        data.samples[0].semantic_gt()
    data.samples[1].semantic_gt()


def test_ade20k_150_labels_override_and_ignore_label(tmp_path):
    ade_semantic_fixture(tmp_path, d2=True, original=True)
    ade = tmp_path / "ADEChallengeData2016"
    data = load_dataset("ade20k-150", tmp_path, labels=ade / "annotations" / "validation")
    assert data.ignore_label == 0  # a folder named annotations holds the original convention
    np.testing.assert_array_equal(data.samples[0].semantic_gt(), np.where(LABEL_A == 255, -1, LABEL_A))
    data = load_dataset("ade20k-150", tmp_path, labels=str(ade / "annotations" / "validation"), ignore_label=255)
    with pytest.raises(DatasetError, match="label value 150 is not a class"):
        data.samples[0].semantic_gt()  # read as 0..149: the original 150 is out of range


def test_ade20k_847_16bit_tiff(tmp_path):
    base = tmp_path / "ADE20K_2021_17_01"
    label = np.zeros((H, W), dtype=np.int64)
    label[0] = 846
    label[1] = 65535
    label[2] = 300
    for stem in ("ADE_frame_00000007", "ADE_val_00000001"):
        write_image(base / "images_detectron2" / "validation" / f"{stem}.jpg")
        write_label(base / "annotations_detectron2" / "validation" / f"{stem}.tif", label)
    data = load_dataset("ade20k-847", tmp_path)
    assert (data.ignore_label, len(data.vocabulary), len(data)) == (65535, 847, 2)
    assert [s.id for s in data.samples] == ["ADE_frame_00000007.jpg", "ADE_val_00000001.jpg"]
    assert Image.open(data.samples[0].label_path).mode == "I;16"
    sem = data.samples[1].semantic_gt()
    np.testing.assert_array_equal(sem, np.where(label == 65535, -1, label))


def test_pascal_context_59_png_and_459_tiff(tmp_path):
    ctx = tmp_path / "pascal_ctx_d2"
    label59 = np.tile(np.array([0, 58, 255, 3], dtype=np.int64).repeat(2), (H, 1))
    label459 = np.tile(np.array([0, 458, 65535, 300], dtype=np.int64).repeat(2), (H, 1))
    for stem in ("2008_000002", "2008_000080"):
        write_image(ctx / "images" / "validation" / f"{stem}.jpg")
        write_label(ctx / "annotations_ctx59" / "validation" / f"{stem}.png", label59)
        write_label(ctx / "annotations_ctx459" / "validation" / f"{stem}.tif", label459)
    d59 = load_dataset("pascal-context-59", tmp_path)
    d459 = load_dataset("pascal-context-459", tmp_path)
    assert (d59.ignore_label, len(d59.vocabulary), d459.ignore_label, len(d459.vocabulary)) == (255, 59, 65535, 459)
    assert [s.id for s in d459.samples] == ["2008_000002.jpg", "2008_000080.jpg"]
    np.testing.assert_array_equal(d59.samples[0].semantic_gt(), np.where(label59 == 255, -1, label59))
    np.testing.assert_array_equal(d459.samples[1].semantic_gt(), np.where(label459 == 65535, -1, label459))
    bad = label59.copy()
    bad[0, 0] = 59
    write_label(ctx / "annotations_ctx59" / "validation" / "2008_000080.png", bad)
    with pytest.raises(DatasetError, match=r"2008_000080\.png: label value 59 is not a class \(0\.\.58\)"):
        load_dataset("pascal-context-59", tmp_path).samples[1].semantic_gt()


def test_semantic_pairing_errors_name_the_file(tmp_path):
    ctx = tmp_path / "pascal_ctx_d2"
    labels = ctx / "annotations_ctx59" / "validation"
    write_image(ctx / "images" / "validation" / "a.jpg")
    write_label(labels / "a.png", np.zeros((H, W)))
    write_image(ctx / "images" / "validation" / "b.jpg")
    with pytest.raises(DatasetError, match=r"image .*b\.jpg has no label file .*annotations_ctx59/validation/b\.png"):
        load_dataset("pascal-context-59", tmp_path)
    write_label(labels / "b.png", np.zeros((H, W)))
    write_label(labels / "c.png", np.zeros((H, W)))
    with pytest.raises(DatasetError, match=r"label file .*c\.png has no image"):
        load_dataset("pascal-context-59", tmp_path)
    (labels / "c.png").unlink()
    assert len(load_dataset("pascal-context-59", tmp_path)) == 2
    with pytest.raises(DatasetError, match=r"label folder .*annotations_ctx459/validation is missing"):
        load_dataset("pascal-context-459", tmp_path)
    rgb = write_image(labels / "b.png")  # an RGB "label"
    with pytest.raises(DatasetError, match=f"{rgb}: a label file must be single-channel"):
        load_dataset("pascal-context-59", tmp_path).samples[1].semantic_gt()


def test_generic_semantic(tmp_path):
    label = np.array([[0, 1, 2, 7] * 2] * H)
    for stem in ("x", "y"):
        write_image(tmp_path / "img" / f"{stem}.png")
        write_label(tmp_path / "lab" / f"{stem}.png", label)
    (tmp_path / "lab" / "notes.txt").write_text("not a label")
    with pytest.raises(DatasetError, match="needs vocab="):
        load_dataset("generic-semantic", images=tmp_path / "img", labels=tmp_path / "lab")
    data = load_dataset(
        "generic-semantic",
        images=tmp_path / "img",
        labels=tmp_path / "lab",
        vocab="cat; dog; grass [stuff]",
        ignore_label=7,
    )
    assert (data.ignore_label, data.vocabulary.names, data.short_side) == (7, ["cat", "dog", "grass"], 640)
    assert [s.id for s in data.samples] == ["x.png", "y.png"]
    np.testing.assert_array_equal(data.samples[0].semantic_gt(), np.where(label == 7, -1, label))
    data = load_dataset("generic-semantic", images=tmp_path / "img", labels=tmp_path / "lab", vocab="cat; dog")
    assert data.ignore_label == 255
    with pytest.raises(DatasetError, match=r"y\.png: label value 2 is not a class \(0\.\.1\) or the ignore value 255"):
        data.samples[1].semantic_gt()


# --------------------------------------------------------------------------------------------------------------------
# COCO open-vocabulary instance splits


def make_coco_instances(root: Path, split: str = "instances65", *, cat_ids=(1, 5)) -> Path:
    coco = root / "coco"
    write_image(coco / "val2017" / "000000000139.jpg")
    write_image(coco / "val2017" / "000000000042.jpg")
    crowd = np.zeros((H, W), dtype=bool)
    crowd[3:, 4:] = True
    runs = []  # uncompressed RLE, column-major, starting with zeros
    flat = crowd.flatten(order="F")
    value, count = False, 0
    for v in flat:
        if v != value:
            runs.append(count)
            value, count = v, 0
        count += 1
    runs.append(count)
    data = {
        "images": [
            {"id": 139, "file_name": "000000000139.jpg", "height": H, "width": W},
            {"id": 42, "file_name": "000000000042.jpg", "height": H, "width": W},
        ],
        "annotations": [
            {
                "id": 7,
                "image_id": 139,
                "category_id": cat_ids[0],
                "iscrowd": 0,
                "area": 4.0,
                "bbox": [0, 0, 2, 2],
                "segmentation": [[0, 0, 2, 0, 2, 2, 0, 2]],
            },
            {
                "id": 8,
                "image_id": 139,
                "category_id": cat_ids[1],
                "iscrowd": 1,
                "area": 12.0,
                "bbox": [4, 3, 4, 3],
                "segmentation": {"size": [H, W], "counts": runs},
            },
            {
                "id": 9,
                "image_id": 42,
                "category_id": cat_ids[1],
                "iscrowd": 0,
                "area": 6.0,
                "bbox": [1, 1, 3, 2],
                "segmentation": [[1, 1, 4, 1, 4, 3, 1, 3]],
            },
        ],
        "categories": [{"id": c.id, "name": c.name} for c in load_preset("coco-instance-65")],
    }
    write_json(coco / "annotations" / "ov_split_48_17" / f"instances_val2017_{split}.json", data)
    return root


def test_coco_instance_65_split_and_gt(tmp_path):
    make_coco_instances(tmp_path)
    data = load_dataset("coco-instance-65", tmp_path)
    vocab = load_preset("coco-instance-65")
    assert (data.task, data.tasks(), data.ignore_label, data.short_side) == ("instance", ("instance",), None, 800)
    assert data.instances_json == tmp_path / "coco/annotations/ov_split_48_17/instances_val2017_instances65.json"
    novel_names = set(load_preset("coco-novel-17").names)
    assert data.novel == frozenset(i for i, n in enumerate(vocab.names) if n in novel_names)
    assert len(data.novel) == 17 and vocab.names.index("airplane") in data.novel
    assert [s.id for s in data.samples] == ["000000000042.jpg", "000000000139.jpg"]
    with pytest.raises(DatasetError, match="no semantic ground truth"):
        data.samples[0].semantic_gt()
    gt = data.instance_gt_coco()
    coco = coco_from(gt)
    assert [(i["id"], i["file_name"]) for i in gt["images"]] == [(1, "000000000042.jpg"), (2, "000000000139.jpg")]
    assert [c["id"] for c in gt["categories"]] == vocab.ids
    anns = sorted(coco.loadAnns(coco.getAnnIds()), key=lambda a: (a["image_id"], a["iscrowd"]))
    assert [(a["image_id"], a["category_id"], a["iscrowd"]) for a in anns] == [(1, 5, 0), (2, 1, 0), (2, 5, 1)]
    assert all(isinstance(a["segmentation"]["counts"], str) for a in anns)
    expected = np.zeros((H, W), dtype=bool)
    expected[3:, 4:] = True
    np.testing.assert_array_equal(mask_of(coco, anns[2]), expected)
    assert mask_of(coco, anns[1]).sum() == 4 and anns[1]["area"] == 4.0
    json.dumps(gt)


def test_coco_instance_48_and_17(tmp_path):
    make_coco_instances(tmp_path, "seen48", cat_ids=(1, 2))
    make_coco_instances(tmp_path, "unseen17", cat_ids=(5, 6))
    d48 = load_dataset("coco-instance-48", tmp_path)
    d17 = load_dataset("coco-instance-17", tmp_path)
    assert (len(d48.vocabulary), len(d17.vocabulary)) == (48, 17)
    assert d48.novel is None and d17.novel is None  # one side of the split only
    assert {a["category_id"] for a in d17.instance_gt_coco()["annotations"]} == {5, 6}
    with pytest.raises(DatasetError, match=r"instances_val2017_instances65\.json is missing .*annotations="):
        load_dataset("coco-instance-65", tmp_path)


def test_coco_instance_errors_name_file_and_id(tmp_path):
    make_coco_instances(tmp_path, "seen48", cat_ids=(1, 5))  # 5 (airplane) is novel: not in base-48
    with pytest.raises(DatasetError, match=r"instances_val2017_seen48\.json: annotation 8: category id 5 "
                                           r"\('airplane'\) is not in the vocabulary preset:coco-base-48"):  # fmt: skip
        load_dataset("coco-instance-48", tmp_path)
    make_coco_instances(tmp_path, "instances65")
    (tmp_path / "coco" / "val2017" / "000000000042.jpg").unlink()
    with pytest.raises(DatasetError, match=r"image file .*000000000042\.jpg .*is missing"):
        load_dataset("coco-instance-65", tmp_path)


def test_generic_instance_and_panoptic(tmp_path):
    make_coco_instances(tmp_path)
    ann = tmp_path / "coco/annotations/ov_split_48_17/instances_val2017_instances65.json"
    data = load_dataset("generic-instance", annotations=ann, images=tmp_path / "coco" / "val2017")
    assert data.vocabulary.names == load_preset("coco-instance-65").names and data.vocabulary.ids[4] == 5
    assert (data.short_side, data.max_size, data.novel) == (800, 1333, None)
    assert len(coco_from(data.instance_gt_coco()).getAnnIds()) == 3
    data = load_dataset(
        "generic-instance", annotations=ann, images=tmp_path / "coco" / "val2017", vocab="person; airplane"
    )  # no ids: matched by name
    assert [a["category_id"] for a in data.instance_gt_coco()["annotations"]] == [1, 2, 2]  # JSON order

    make_coco_panoptic(tmp_path)
    coco = tmp_path / "coco"
    kwargs = dict(
        images=coco / "val2017",
        panoptic_dir=coco / "panoptic_val2017",
        panoptic_json=coco / "annotations" / "panoptic_val2017.json",
    )
    data = load_dataset("generic-panoptic", **kwargs)
    assert data.vocabulary.names == load_preset("coco-panoptic").names  # from the JSON categories
    assert data.samples[1].panoptic_gt()[1][2] == GTSegment(13, 2, False, True)
    with pytest.raises(DatasetError, match=r"category id 92 \('banner'\) is not in the vocabulary"):
        load_dataset("generic-panoptic", **kwargs, vocab="person; car")
    with pytest.raises(DatasetError, match="needs panoptic_dir="):
        load_dataset("generic-panoptic", images=coco / "val2017", panoptic_json=kwargs["panoptic_json"])


# --------------------------------------------------------------------------------------------------------------------
# synthetic (hand-written fixture in the layout `masqclip synth` writes)


def make_synthetic(root: Path, split: str = "val") -> Path:
    (root / "vocab.txt").parent.mkdir(parents=True, exist_ok=True)
    (root / "vocab.txt").write_text("circle\nsquare\ntriangle\nstripes [stuff]\n")
    write_json(root / "meta.json", {"base": ["circle", "square", "stripes"], "novel": ["triangle"]})
    categories = [
        {"id": 1, "name": "circle", "isthing": 1}, {"id": 2, "name": "square", "isthing": 1},
        {"id": 3, "name": "triangle", "isthing": 1}, {"id": 4, "name": "stripes", "isthing": 0},
    ]  # fmt: skip
    ids = np.full((H, W), 4, dtype=np.int64)
    ids[1:3, 1:3] = 1
    ids[3:5, 5:7] = 2
    images, annotations = [], []
    for k, cats in enumerate(({1: 3, 2: 1, 4: 4}, {1: 2, 2: 2, 4: 4})):
        name = f"{k:06d}"
        write_image(root / "images" / split / f"{name}.png")
        write_panoptic_png(root / f"panoptic_{split}" / f"{name}.png", ids)
        write_label(root / f"semantic_{split}" / f"{name}.png", np.zeros((H, W)))
        images.append({"id": k + 1, "file_name": f"{name}.png", "height": H, "width": W})
        annotations.append(panoptic_annotation(k + 1, f"{name}.png", ids, cats))
    write_json(
        root / "annotations" / f"panoptic_{split}.json",
        {"images": images, "annotations": annotations, "categories": categories},
    )
    write_json(
        root / "annotations" / f"instances_{split}.json",
        {"images": images, "annotations": [], "categories": categories},
    )
    return root


def test_synthetic(tmp_path):
    make_synthetic(tmp_path / "synth")
    make_synthetic(tmp_path / "synth", split="train")
    data = load_dataset("synthetic", tmp_path / "synth")
    assert (data.task, data.ignore_label, data.short_side, data.max_size) == ("panoptic", 0, 0, 4096)  # native size
    assert data.vocabulary.names == ["circle", "square", "triangle", "stripes"]
    assert data.vocabulary.isthing == [True, True, True, False]
    assert data.novel == frozenset({2})
    assert data.image_dir == tmp_path / "synth" / "images" / "val"
    assert [s.id for s in data.samples] == ["000000.png", "000001.png"]
    _, segments = data.samples[0].panoptic_gt()
    assert [(s.id, s.category, s.isthing) for s in segments] == [(1, 2, True), (2, 0, True), (4, 3, False)]
    sem = data.samples[1].semantic_gt()
    assert (sem[1:3, 1:3] == 1).all() and sem[0, 0] == 3
    gt = data.instance_gt_coco()
    coco_from(gt)
    assert [c["id"] for c in gt["categories"]] == [1, 2, 3, 4]
    assert len(gt["annotations"]) == 4
    train = load_dataset("synthetic", tmp_path / "synth", split="train")
    assert train.image_dir == tmp_path / "synth" / "images" / "train"
    with pytest.raises(DatasetError, match=r"image folder .*images/test is missing"):
        load_dataset("synthetic", tmp_path / "synth", split="test")
    with pytest.raises(DatasetError, match="needs root="):
        load_dataset("synthetic")


def test_synthetic_meta_and_vocab_errors(tmp_path):
    make_synthetic(tmp_path)
    write_json(tmp_path / "meta.json", {"novel": ["hexagon"]})
    with pytest.raises(DatasetError, match=r"meta\.json: novel class 'hexagon' is not in the vocabulary"):
        load_dataset("synthetic", tmp_path)
    (tmp_path / "meta.json").unlink()
    assert load_dataset("synthetic", tmp_path).novel is None
    (tmp_path / "vocab.txt").unlink()
    with pytest.raises(DatasetError, match=r"vocabulary file .*vocab\.txt is missing"):
        load_dataset("synthetic", tmp_path)
    data = load_dataset("synthetic", tmp_path, vocab=Vocabulary.from_json(["circle", "square", "triangle", "stripes"]))
    assert len(data) == 2


def test_docs_datasets_page_matches_the_registry():
    from masqclip_cli.data.datasets import datasets_markdown

    page = Path(__file__).resolve().parents[2] / "docs" / "datasets.md"
    assert page.read_text() == datasets_markdown(), "regenerate docs/datasets.md from datasets_markdown()"
