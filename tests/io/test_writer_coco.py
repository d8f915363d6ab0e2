"""The ``coco`` writer's options: ``coco_masks`` (RLE or polygons, holes filled), the ``info`` / ``licenses`` keys and
``coco_license``, ``coco_layout=cvat`` (CVAT's "COCO 1.0" folder) with ``coco_images`` copy / symlink / none.

Polygons are rasterised back with pycocotools (``COCO.annToMask``) and compared with the original mask with its holes
filled by scipy (``binary_fill_holes``); the file is loaded with pycocotools ``COCO`` and evaluated with ``COCOeval``.
The cvat layout is loaded with datumaro's own importer (``Dataset.import_from(root, "coco_instances")``) as a user
would: items, image files and sizes, masks (RLE exact, polygons IoU >= 0.95), label names. Synthetic masks with holes,
an island in a hole, several parts, a single pixel, a one-pixel diagonal line and an empty mask; nested ids, a video
frame, a GIF and an item with nothing found."""

from __future__ import annotations

import contextlib
import io
import json
import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from pycocotools import mask as mask_util
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval
from scipy import ndimage

import masqclip_cli
from masqclip_cli.io.writers import ItemInfo, make_writers
from masqclip_cli.io.writers.coco import CocoWriter, coco_polygons
from masqclip_cli.structures import Segment, Segmentation
from masqclip_cli.structures.masks import mask_bbox
from masqclip_cli.vocab import VocabClass, Vocabulary

pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")  # pycocotools decode

CLASSES = [("person", True), ("car", True), ("road", False), ("sky blue é", False)]
IDS = [1, 3, 149, 187]  # COCO category ids, not contiguous: label mapping is checked, not assumed
VOCAB = Vocabulary([VocabClass(n, isthing=t, id=i) for (n, t), i in zip(CLASSES, IDS)])
H, W = 48, 64


# --- synthetic data -------------------------------------------------------------------------------------------------


def square_with_extras() -> np.ndarray:
    """Four parts: a 24x24 square with a 4x4 hole, a 6x5 blob, a single pixel, a one-pixel diagonal line."""
    m = np.zeros((H, W), bool)
    m[4:28, 4:28] = True
    m[12:16, 14:18] = False
    m[34:40, 40:45] = True
    m[46, 2] = True
    for k in range(7):
        m[36 + k, 8 + k] = True
    return m


def ring_with_island() -> np.ndarray:
    """A ring whose 6x6 hole holds a 2x2 island: two parts, one inside the other's hole."""
    m = np.zeros((H, W), bool)
    m[10:40, 32:62] = True
    m[20:26, 44:50] = False
    m[22:24, 46:48] = True
    return m


def disc() -> np.ndarray:
    yy, xx = np.mgrid[:H, :W]
    return (yy - 24) ** 2 + (xx - 24) ** 2 <= 15**2  # overlaps square_with_extras


def make_instances(rows) -> Segmentation:
    return Segmentation(
        (H, W),
        instances=[
            Segment(k, cat, score, cat < 2, int(m.sum()), mask_bbox(m), mask=m)
            for k, (m, score, cat) in enumerate(rows, start=1)
        ],
    )


def synthetic():
    """(item, seg, expected [(mask, score, class index)]): nested id, a JPEG with an empty mask, a video frame, a GIF
    (written as a PNG), an item with nothing found."""
    full = [(square_with_extras(), 0.97, 0), (disc(), 0.333333333, 1), (ring_with_island(), 0.5, 3)]
    with_empty = [(np.zeros((H, W), bool), 0.9, 0), (disc(), 0.8, 2)]  # the empty mask is left out
    return [
        (ItemInfo("sub/b.png", "sub/b.png", W, H), make_instances(full), full),
        (ItemInfo("a.jpg", "a.jpg", W, H), make_instances(with_empty), with_empty[1:]),
        (ItemInfo("clip.mp4#000005", "clip.mp4#000005", W, H), make_instances(full[::-1]), full[::-1]),
        (ItemInfo("x.gif", "x.gif", W, H), make_instances(full[1:]), full[1:]),
        (ItemInfo("nothing.png", "nothing.png", W, H), make_instances([]), []),
    ]


def rgb_for(i: int) -> np.ndarray:
    return np.random.default_rng(i).integers(0, 255, size=(H, W, 3), dtype=np.uint8)


def with_sources(data, src: Path):
    """Write each item's source file (real encoded images; the video a dummy file) and set ``ItemInfo.source``."""
    out = []
    for i, (item, seg, expected) in enumerate(data):
        path = src / item.id.split("#")[0]
        path.parent.mkdir(parents=True, exist_ok=True)
        if path.suffix == ".mp4":
            path.write_bytes(b"not really a video")
        else:
            Image.fromarray(rgb_for(i)).save(path)
        out.append((ItemInfo(item.id, item.file_name, W, H, source=str(path.resolve())), seg, expected))
    return out


def run(writer, data, *, order=None, roundtrip=False):
    """write_item for every item (in ``order``), records optionally through a sorted-key JSON round trip, then
    finalize; returns (written paths, records)."""
    records = []
    for i in order if order is not None else range(len(data)):
        item, seg, _ = data[i]
        record = writer.write_item(item, seg, rgb_for(i) if writer.needs_image else None)
        if roundtrip:
            record = json.loads(json.dumps(record, sort_keys=True))
        records.append((item, record))
    records.sort(key=lambda r: r[0].id)
    return writer.finalize(records), records


def filled(mask: np.ndarray) -> np.ndarray:
    return ndimage.binary_fill_holes(mask)


def iou(a: np.ndarray, b: np.ndarray) -> float:
    return float((a & b).sum()) / float((a | b).sum())


def parts(mask: np.ndarray) -> int:
    return int(ndimage.label(mask, structure=np.ones((3, 3), int))[1])  # 8-connected parts


def by_file_name(data, writer) -> dict[str, list]:
    return {writer.image_file_name(item): expected for item, _, expected in data}


def tree(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


# --- info, licenses, defaults ----------------------------------------------------------------------------------------


def test_default_file_has_info_and_empty_licenses_first(tmp_path):
    writer = CocoWriter(tmp_path, VOCAB)
    assert (writer.needs_source, writer.needs_image, CocoWriter.needs_source, CocoWriter.needs_image) == (False,) * 4
    (path,), _ = run(writer, synthetic())
    assert path == tmp_path / "instances.json"
    data = json.loads(path.read_text())
    assert list(data) == ["info", "licenses", "images", "annotations", "categories"]
    assert data["info"] == {
        "description": "masqclip pre-annotations",
        "version": masqclip_cli.__version__,
        "contributor": "masqclip",
    }
    assert data["licenses"] == []
    assert [(im["id"], im["file_name"]) for im in data["images"]] == [
        (1, "a.jpg"),
        (2, "clip.mp4#000005"),
        (3, "nothing.png"),
        (4, "sub/b.png"),
        (5, "x.gif"),
    ]
    assert all(list(im) == ["id", "file_name", "width", "height"] for im in data["images"])
    assert [c["id"] for c in data["categories"]] == IDS
    # RLE masks, exact, area and bbox of the mask.
    expected = by_file_name(synthetic(), writer)
    for im in data["images"]:
        anns = [a for a in data["annotations"] if a["image_id"] == im["id"]]
        assert len(anns) == len(expected[im["file_name"]])
        for ann, (mask, score, cat) in zip(anns, expected[im["file_name"]]):
            np.testing.assert_array_equal(mask_util.decode(ann["segmentation"]).astype(bool), mask)
            assert ann["category_id"] == IDS[cat] and ann["score"] == round(score, 6)
            assert ann["area"] == mask.sum() and ann["bbox"] == [int(v) for v in mask_bbox(mask)]
    COCO(str(path))  # loads


def test_license_is_declared_and_on_every_image(tmp_path):
    (path,), _ = run(CocoWriter(tmp_path / "lic", VOCAB, coco_license="CC BY 4.0"), synthetic())
    data = json.loads(path.read_text())
    assert data["licenses"] == [{"id": 1, "name": "CC BY 4.0", "url": ""}]
    assert [im["license"] for im in data["images"]] == [1] * 5
    gt = COCO(str(path))
    assert gt.dataset["licenses"][0]["name"] == "CC BY 4.0"
    # Nothing else changes.
    (plain,), _ = run(CocoWriter(tmp_path / "plain", VOCAB), synthetic())
    other = json.loads(plain.read_text())
    assert [{k: v for k, v in im.items() if k != "license"} for im in data["images"]] == other["images"]
    assert data["annotations"] == other["annotations"] and data["categories"] == other["categories"]


# --- polygons --------------------------------------------------------------------------------------------------------


def test_polygons_rasterise_to_the_filled_masks_in_pycocotools(tmp_path):
    data = synthetic()
    writer = CocoWriter(tmp_path, VOCAB, coco_masks="polygon")
    (path,), records = run(writer, data, roundtrip=True)
    gt = COCO(str(path))
    expected = by_file_name(data, writer)
    checked = 0
    for im in gt.dataset["images"]:
        anns = gt.loadAnns(gt.getAnnIds(imgIds=[im["id"]]))
        assert len(anns) == len(expected[im["file_name"]])
        for ann, (mask, _, cat) in zip(anns, expected[im["file_name"]]):
            polygons = ann["segmentation"]
            assert isinstance(polygons, list) and len(polygons) == parts(mask)  # one polygon per part
            for polygon in polygons:
                assert len(polygon) >= 6 and len(polygon) % 2 == 0
                assert all(isinstance(v, float) and round(v, 2) == v for v in polygon)
                assert all(0 <= x <= W for x in polygon[0::2]) and all(0 <= y <= H for y in polygon[1::2])
            back = gt.annToMask(ann).astype(bool)
            target = filled(mask)
            assert iou(back, target) >= 0.95
            np.testing.assert_array_equal(back, target)  # exact: the outline a quarter pixel inside the pixels
            # area and bbox stay those of the mask (holes not counted), not of the polygons
            assert ann["area"] == int(mask.sum())
            assert ann["bbox"] == [int(v) for v in mask_bbox(mask)]
            assert ann["category_id"] == IDS[cat]
            checked += 1
    assert checked == 9
    # the holes really were there, and are now filled
    assert (filled(square_with_extras()) & ~square_with_extras()).sum() == 16
    # the records keep RLE whatever the option, so an export can switch
    assert all(isinstance(a["segmentation"], dict) for _, r in records for a in r["annotations"])


def test_polygon_ground_truth_evaluates_in_cocoeval(tmp_path):
    """RLE results (holes kept) against the polygon ground truth (holes filled): every instance is matched at IoU
    0.5 and 0.75 (the filled holes cost at most a few percent)."""
    data = synthetic()
    (gt_path,), _ = run(CocoWriter(tmp_path / "gt", VOCAB, coco_masks="polygon"), data)
    (dt_path,), _ = run(CocoWriter(tmp_path / "dt", VOCAB), data)
    gt = COCO(str(gt_path))
    results = gt.loadRes(json.loads(dt_path.read_text())["annotations"])
    evaluator = COCOeval(gt, results, "segm")
    evaluator.evaluate()
    evaluator.accumulate()
    with contextlib.redirect_stdout(io.StringIO()):
        evaluator.summarize()
    assert evaluator.stats[1] == pytest.approx(1.0)  # AP at IoU 0.5
    assert evaluator.stats[2] == pytest.approx(1.0)  # AP at IoU 0.75


def test_polygons_come_from_the_records_so_an_export_can_switch(tmp_path):
    data = synthetic()
    _, rle_records = run(CocoWriter(tmp_path / "rle", VOCAB), data)
    polygon_writer = CocoWriter(tmp_path / "poly", VOCAB, coco_masks="polygon")
    (own,), own_records = run(polygon_writer, data, order=[3, 1, 4, 0, 2], roundtrip=True)
    assert own_records == [(item, json.loads(json.dumps(r, sort_keys=True))) for item, r in rle_records]
    before = own.read_bytes()
    (again,) = CocoWriter(tmp_path / "poly", VOCAB, coco_masks="polygon").finalize(rle_records)
    assert again.read_bytes() == before  # deterministic, from RLE records


def test_coco_polygons_of_small_shapes():
    m = np.zeros((5, 6), bool)
    m[2, 3] = True  # one pixel: a 0.5 x 0.5 square a quarter pixel inside it
    assert coco_polygons(m) == [[3.25, 2.25, 3.25, 2.75, 3.75, 2.75, 3.75, 2.25]]
    m[1, 0:3] = True  # a one-pixel-wide line, 8-connected to the pixel: one part
    (polygon,) = coco_polygons(m)
    rle = mask_util.frPyObjects([polygon], 5, 6)
    np.testing.assert_array_equal(mask_util.decode(mask_util.merge(rle)).astype(bool), m)
    assert coco_polygons(np.zeros((3, 3), bool)) == []


# --- the cvat layout, loaded by datumaro -------------------------------------------------------------------------


def datumaro_items(root: Path):
    datumaro = pytest.importorskip("datumaro")
    from datumaro.components.annotation import AnnotationType

    dataset = datumaro.Dataset.import_from(str(root), "coco_instances")
    labels = dataset.categories()[AnnotationType.label]
    assert [label.name for label in labels.items] == [name for name, _ in CLASSES]
    return {item.id: item for item in dataset}, labels, AnnotationType


def instance_masks(item, annotation_type) -> list[tuple[int, np.ndarray]]:
    """(label, mask) of each COCO annotation of a datumaro item, in annotation id order: the RLE mask decoded, or the
    annotation's polygons (datumaro's one Polygon per part, grouped by annotation id) rasterised by pycocotools."""
    out = []
    for ann_id in sorted({a.id for a in item.annotations}):
        anns = [a for a in item.annotations if a.id == ann_id and a.type != annotation_type.bbox]
        if anns[0].type == annotation_type.mask:
            assert len(anns) == 1
            out.append((anns[0].label, anns[0].image.astype(bool)))
        else:
            assert {a.type for a in anns} == {annotation_type.polygon}
            assert len({a.label for a in anns}) == 1
            rles = mask_util.frPyObjects([list(a.points) for a in anns], H, W)
            out.append((anns[0].label, mask_util.decode(mask_util.merge(rles)).astype(bool)))
    return out


@pytest.mark.parametrize("masks", ["rle", "polygon"])
@pytest.mark.parametrize("images", ["copy", "symlink", "none"])
def test_cvat_layout_loads_in_datumaro(tmp_path, images, masks):
    data = with_sources(synthetic(), tmp_path / "src")
    out = tmp_path / "out"
    (writer,) = make_writers(["coco"], out, VOCAB, coco_layout="cvat", coco_images=images, coco_masks=masks)
    assert writer.needs_source is writer.needs_image is (images != "none")
    paths, _ = run(writer, data, roundtrip=True)
    root = out / "coco-cvat"
    assert paths == [root / "annotations" / "instances_default.json"]
    image_dir = root / "images" / "default"
    names = {item.id: writer.image_file_name(item) for item, _, _ in data}
    assert names == {
        "sub/b.png": "sub/b.png",
        "a.jpg": "a.jpg",
        "clip.mp4#000005": "clip.mp4#000005.png",  # a frame: the decoded image
        "x.gif": "x.gif.png",  # not an extension copied as is
        "nothing.png": "nothing.png",
    }
    listed = {p for item, _, _ in data for p in writer.item_files(item)}
    on_disk = {p for p in image_dir.rglob("*") if p.is_file() or p.is_symlink()} if image_dir.exists() else set()
    assert listed == on_disk
    if images == "none":
        assert on_disk == set() and not (root / "images").exists()
        # the user puts the images in place; then datumaro loads the folder
        for i, (item, _, _) in enumerate(data):
            target = image_dir / names[item.id]
            target.parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(rgb_for(i)).save(target, "PNG")
    else:
        assert on_disk == {image_dir / n for n in names.values()}
        for i, (item, _, _) in enumerate(data):
            path = image_dir / names[item.id]
            if names[item.id] == item.id:  # the source as is
                assert path.read_bytes() == Path(item.source).read_bytes()
                assert path.is_symlink() is (images == "symlink")
                if images == "symlink":
                    assert os.readlink(path) == item.source
            else:  # the decoded image, as PNG
                assert not path.is_symlink()
                np.testing.assert_array_equal(np.asarray(Image.open(path)), rgb_for(i))

    coco = json.loads(paths[0].read_text())
    assert sorted(im["file_name"] for im in coco["images"]) == sorted(names.values())
    if images == "symlink":
        # datumaro's COCO importer refuses an image whose real path is outside images/default (join_within_base):
        # the links load once replaced by the files they point to, as `cp -rL` or `zip -r` (what CVAT is given) do.
        errors = pytest.importorskip("datumaro.components.errors")
        with pytest.raises(errors.DatasetImportError):
            datumaro_items(root)
        for path in on_disk:
            if path.is_symlink():
                content = path.read_bytes()
                path.unlink()
                path.write_bytes(content)
    items, labels, annotation_type = datumaro_items(root)
    assert len(items) == len(data)
    for item, _, expected in data:
        got = items[os.path.splitext(names[item.id])[0]]
        assert Path(got.media.path).resolve() == (image_dir / names[item.id]).resolve()
        assert Path(got.media.path).exists()
        assert got.media.size == (H, W)
        with Image.open(got.media.path) as im:
            assert im.size == (W, H)
        loaded = instance_masks(got, annotation_type)
        assert len(loaded) == len(expected)
        for (label, mask), (original, _, cat) in zip(loaded, expected):
            assert labels[label].name == CLASSES[cat][0]
            if masks == "rle":
                np.testing.assert_array_equal(mask, original)
            else:
                assert iou(mask, filled(original)) >= 0.95


def test_cvat_layout_is_byte_deterministic(tmp_path):
    data = with_sources(synthetic(), tmp_path / "src")
    for name, order in (("one", None), ("two", [4, 2, 0, 3, 1])):
        writer = CocoWriter(tmp_path / name, VOCAB, coco_layout="cvat", coco_masks="polygon", coco_license="x")
        run(writer, data, order=order, roundtrip=name == "two")
    assert tree(tmp_path / "one") == tree(tmp_path / "two")
    assert str(tmp_path) not in (tmp_path / "one" / "coco-cvat" / "annotations" / "instances_default.json").read_text()


def test_cvat_layout_rewrites_a_missing_image(tmp_path):
    data = with_sources(synthetic(), tmp_path / "src")
    writer = CocoWriter(tmp_path / "out", VOCAB, coco_layout="cvat")
    item, seg, _ = data[0]
    writer.write_item(item, seg, rgb_for(0))
    (image,) = writer.item_files(item)
    assert image == tmp_path / "out" / "coco-cvat" / "images" / "default" / "sub" / "b.png"
    image.unlink()
    assert not all(p.is_file() for p in writer.item_files(item))  # what tells a resumed run to write the item again
    writer.write_item(item, seg, rgb_for(0))
    assert image.read_bytes() == Path(item.source).read_bytes()
    assert CocoWriter(tmp_path, VOCAB, coco_layout="cvat", coco_images="none").item_files(item) == []
    assert CocoWriter(tmp_path, VOCAB, coco_images="symlink").item_files(item) == []  # flat: no images


def test_cvat_layout_refuses_two_items_with_one_image(tmp_path):
    writer = CocoWriter(tmp_path, VOCAB, coco_layout="cvat", coco_images="none")
    seg = make_instances([(disc(), 0.5, 0)])
    a, b = ItemInfo("x.gif", "x.gif", W, H), ItemInfo("x.gif.png", "x.gif.png", W, H)
    records = [(a, writer.write_item(a, seg)), (b, writer.write_item(b, seg))]
    with pytest.raises(ValueError, match=r"'x.gif' and 'x.gif.png' .*images/default/x.gif.png"):
        writer.finalize(records)
    # the flat layout keeps ItemInfo.file_name as given, shared or not
    flat = CocoWriter(tmp_path, VOCAB)
    (path,) = flat.finalize(records)
    assert [im["file_name"] for im in json.loads(path.read_text())["images"]] == ["x.gif", "x.gif.png"]


def test_cvat_layout_needs_the_image(tmp_path):
    data = with_sources(synthetic(), tmp_path / "src")
    item, seg, _ = data[2]
    with pytest.raises(ValueError, match="clip.mp4#000005.*decoded image"):
        CocoWriter(tmp_path, VOCAB, coco_layout="cvat").write_item(item, seg, None)


# --- options ---------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("option", "value", "choices"),
    [
        ("coco_masks", "polygons", "rle, polygon"),
        ("coco_masks", "RLE", "rle, polygon"),
        ("coco_layout", "datumaro", "flat, cvat"),
        ("coco_images", "link", "copy, symlink, none"),
        ("coco_images", None, "copy, symlink, none"),
    ],
)
def test_bad_option_values_name_the_option_and_the_choices(tmp_path, option, value, choices):
    with pytest.raises(ValueError) as info:
        CocoWriter(tmp_path, VOCAB, **{option: value})
    assert str(info.value) == f"{option} must be one of {choices}, got {value!r}"


def test_bad_license_and_unknown_option(tmp_path):
    with pytest.raises(ValueError, match="coco_license must be a string"):
        CocoWriter(tmp_path, VOCAB, coco_license=1)
    with pytest.raises(TypeError, match="coco_mask"):
        CocoWriter(tmp_path, VOCAB, coco_mask="polygon")


def test_needs_source_and_image_per_instance(tmp_path):
    flags = {
        (layout, images): (w.needs_source, w.needs_image)
        for layout in ("flat", "cvat")
        for images in ("copy", "symlink", "none")
        for w in [CocoWriter(tmp_path, VOCAB, coco_layout=layout, coco_images=images)]
    }
    assert flags == {
        ("flat", "copy"): (False, False),
        ("flat", "symlink"): (False, False),
        ("flat", "none"): (False, False),
        ("cvat", "copy"): (True, True),
        ("cvat", "symlink"): (True, True),
        ("cvat", "none"): (False, False),
    }
    assert CocoWriter.needs_source is False and CocoWriter.needs_image is False  # the class is left alone
