"""The ``cvat`` writer: "CVAT for images 1.1" XML loaded back with datumaro's own CVAT importer
(``datumaro.Dataset.import_from(path, "cvat")``) as a user would load it. Masks must decode back exactly; polygons
must rasterise back (with datumaro's pycocotools rasteriser) exactly at tolerance 0 and at IoU >= 0.95 simplified, on
synthetic masks with holes, islands and several parts and on the demo model's output."""

from __future__ import annotations

import json
import os
import xml.etree.ElementTree as ET
from pathlib import Path

import cv2
import numpy as np
import pytest
from PIL import Image

from masqclip_cli.io.writers import WRITERS, ItemInfo, make_writers
from masqclip_cli.io.writers.cvat import CvatWriter
from masqclip_cli.structures import Segment, Segmentation
from masqclip_cli.structures.masks import mask_bbox
from masqclip_cli.vocab import VocabClass, Vocabulary

datumaro = pytest.importorskip("datumaro")
from datumaro.components.annotation import AnnotationType  # noqa: E402
from datumaro.util import mask_tools  # noqa: E402
from datumaro.util.annotation_util import find_instances  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")  # pycocotools decode

ROOT = Path(__file__).resolve().parents[2]

# A class name that needs XML escaping, and a non-ASCII one.
CLASSES = [("person", True), ('car & "van" <4x4>', True), ("road", False), ("ciel bleu é", False)]
COLORS = [(220, 20, 60), (0, 0, 142), (128, 64, 128), (70, 130, 180)]
VOCAB = Vocabulary([VocabClass(n, isthing=t, color=c) for (n, t), c in zip(CLASSES, COLORS)])
H, W = 64, 80


# --- synthetic data -------------------------------------------------------------------------------------------------


def ring_with_extras() -> np.ndarray:
    """Several parts: a 30x30 square with a 4x4 hole, a 6x5 blob, a single pixel and a one-pixel diagonal line."""
    m = np.zeros((H, W), bool)
    m[5:35, 5:35] = True
    m[15:19, 20:24] = False
    m[40:46, 50:55] = True
    m[60, 2] = True
    for k in range(8):
        m[48 + k, 10 + k] = True
    return m


def ring_with_island() -> np.ndarray:
    """A ring (a hole of 2 x 2 pixels around) with a 2x2 island in its hole: two parts, one inside the other."""
    m = np.zeros((H, W), bool)
    m[20:50, 40:76] = True
    m[30:36, 52:58] = False
    m[32:34, 54:56] = True
    return m


def disc() -> np.ndarray:
    m = np.zeros((H, W), np.uint8)
    cv2.circle(m, (30, 30), 18, 1, -1)  # overlaps ring_with_extras
    return m.astype(bool)


def make_instances(masks_scores_cats) -> Segmentation:
    rows = [
        Segment(k, cat, score, cat < 2, int(m.sum()), mask_bbox(m), mask=m)
        for k, (m, score, cat) in enumerate(masks_scores_cats, start=1)
    ]
    return Segmentation((H, W), instances=rows)


def synthetic():
    """(item, seg, expected [(mask, score, class index)]) for four items: nested ids, a video frame, an empty one."""
    full = [(ring_with_extras(), 0.97, 0), (disc(), 0.333333333, 1), (ring_with_island(), 0.5, 3)]
    with_empty = [(np.zeros((H, W), bool), 0.9, 0), (disc(), 0.8, 2)]  # the empty mask is left out
    return [
        (ItemInfo("sub/b.png", "sub/b.png", W, H), make_instances(full), full),
        (ItemInfo("a.jpg", "a.jpg", W, H), make_instances(with_empty), with_empty[1:]),
        (ItemInfo("clip.mp4#000005", "clip.mp4", W, H), make_instances(full[::-1]), full[::-1]),
        (ItemInfo("nothing.png", "nothing.png", W, H), make_instances([]), []),
    ]


def with_sources(data, src: Path):
    """Write a source file for every item (images as real encoded files, the video as a dummy file) and set
    ``ItemInfo.source`` as the engine does."""
    out = []
    for i, (item, seg, expected) in enumerate(data):
        name = item.id.split("#")[0]
        path = src / name
        path.parent.mkdir(parents=True, exist_ok=True)
        if not path.exists():
            if name.endswith(".mp4"):
                path.write_bytes(b"not really a video")
            else:
                Image.fromarray(rgb_for(i)).save(path)
        info = ItemInfo(item.id, item.file_name, item.width, item.height, source=str(path.resolve()))
        out.append((info, seg, expected))
    return out


def rgb_for(i: int) -> np.ndarray:
    return np.random.default_rng(i).integers(0, 255, size=(H, W, 3), dtype=np.uint8)


def run(writer, data, *, order=None, roundtrip=False):
    records = []
    for i in order if order is not None else range(len(data)):
        item, seg, _ = data[i]
        record = writer.write_item(item, seg, rgb_for(i) if writer.needs_image else None)
        if roundtrip:
            record = json.loads(json.dumps(record, sort_keys=True))
        records.append((item, record))
    return writer.finalize(sorted(records, key=lambda r: r[0].id))


def load(out: Path) -> dict:
    """The items datumaro imports from ``out/cvat``, by datumaro item id."""
    dataset = datumaro.Dataset.import_from(str(out / "cvat"), "cvat")
    labels = dataset.categories()[AnnotationType.label]
    assert [label.name for label in labels.items] == VOCAB.names
    return {item.id: item for item in dataset}, labels


def dm_id(item_id: str) -> str:
    """The id datumaro gives an image: its name without the extension (a frame's name is ``<id>.png``)."""
    return item_id if "#" in item_id else os.path.splitext(item_id)[0]


def filled(mask: np.ndarray) -> np.ndarray:
    """The mask with its holes filled (everything not reachable from outside), by flood fill."""
    pad = np.pad(mask, 1).astype(np.uint8)
    cv2.floodFill(pad, None, (0, 0), 2)
    return pad[1:-1, 1:-1] != 2


def iou(a: np.ndarray, b: np.ndarray) -> float:
    return float((a & b).sum()) / float((a | b).sum())


def polygon_instances(item, h: int, w: int) -> list[np.ndarray]:
    """The instances of an item's polygons (consecutive polygons with one non-zero group_id are one instance),
    rasterised with datumaro's own polygon rasteriser (pycocotools)."""
    anns = [a for a in item.annotations if a.type == AnnotationType.polygon]
    assert len(anns) == len(item.annotations)
    groups: list[list] = []
    for a in anns:
        if a.group and groups and groups[-1][0].group == a.group:
            groups[-1].append(a)
        else:
            groups.append([a])
    assert len(find_instances(anns)) == len(groups)  # datumaro's own grouping agrees
    for g in groups:
        assert len({(a.label, a.attributes["score"]) for a in g}) == 1
    return [mask_tools.rles_to_mask([a.points for a in g], w, h).astype(bool) for g in groups]


# --- masks ----------------------------------------------------------------------------------------------------------


def test_masks_load_in_datumaro_exactly(tmp_path):
    data = with_sources(synthetic(), tmp_path / "src")
    writer = CvatWriter(tmp_path / "out", VOCAB, cvat_images="copy")
    assert writer.needs_source and writer.needs_image
    paths = run(writer, data, roundtrip=True)
    assert paths == [tmp_path / "out" / "cvat" / "annotations.xml"]
    items, labels = load(tmp_path / "out")
    assert sorted(items) == sorted(dm_id(item.id) for item, _, _ in data)
    for item, _, expected in data:
        got = items[dm_id(item.id)]
        assert got.media.size == (H, W)
        assert len(got.annotations) == len(expected)
        for ann, (mask, score, cat) in zip(got.annotations, expected):
            assert ann.type == AnnotationType.mask
            assert labels[ann.label].name == CLASSES[cat][0]
            np.testing.assert_array_equal(ann.image.astype(bool), mask)  # lossless
            assert float(ann.attributes["score"]) == pytest.approx(score, abs=1e-6)
            assert ann.group == 0
    assert items["sub/b"].annotations[1].attributes["score"] == "0.333333"

    # The images: sources copied byte for byte, the video frame as a PNG of the decoded frame.
    images = tmp_path / "out" / "cvat" / "images"
    assert (images / "sub" / "b.png").read_bytes() == (tmp_path / "src" / "sub" / "b.png").read_bytes()
    assert (images / "a.jpg").read_bytes() == (tmp_path / "src" / "a.jpg").read_bytes()
    frame = np.asarray(Image.open(images / "clip.mp4#000005.png"))
    np.testing.assert_array_equal(frame, rgb_for(2))
    assert writer.item_files(data[2][0]) == [images / "clip.mp4#000005.png"]


def test_xml_is_cvat_1_1(tmp_path):
    """The layout CVAT writes: version, task meta with every label (colour, score attribute), images in id order
    with 0-based ids, CVAT's run-length encoding of masks over the tight box."""
    data = synthetic()
    run(CvatWriter(tmp_path, VOCAB), data)
    root = ET.parse(tmp_path / "cvat" / "annotations.xml").getroot()
    assert root.tag == "annotations" and root.findtext("version") == "1.1"
    task = root.find("meta/task")
    assert task.findtext("size") == "4" and task.findtext("mode") == "annotation"
    labels = task.findall("labels/label")
    assert [lab.findtext("name") for lab in labels] == [n for n, _ in CLASSES]
    assert [lab.findtext("color") for lab in labels] == ["#dc143c", "#00008e", "#804080", "#4682b4"]
    for lab in labels:
        assert [a.findtext("name") for a in lab.findall("attributes/attribute")] == ["score"]
        assert lab.find("attributes/attribute").findtext("input_type") == "text"
    images = root.findall("image")
    assert [(im.get("id"), im.get("name")) for im in images] == [
        ("0", "a.jpg"),
        ("1", "clip.mp4#000005.png"),
        ("2", "nothing.png"),
        ("3", "sub/b.png"),
    ]
    assert all((im.get("width"), im.get("height")) == (str(W), str(H)) for im in images)
    assert len(images[2]) == 0  # no detections: listed, no shapes

    # Decode CVAT's RLE by hand: runs over the box, row-major, background first.
    for im, (_, _, expected) in zip(images, [data[1], data[2], data[3], data[0]]):
        for el, (mask, _, _) in zip(im.findall("mask"), expected):
            assert (el.get("source"), el.get("occluded"), el.get("z_order")) == ("auto", "0", "0")
            left, top, width, height = (int(el.get(k)) for k in ("left", "top", "width", "height"))
            counts = [int(c) for c in el.get("rle").split(", ")]
            assert sum(counts) == width * height
            flat = np.repeat(np.arange(len(counts)) % 2 == 1, counts)
            canvas = np.zeros((H, W), bool)
            canvas[top : top + height, left : left + width] = flat.reshape(height, width)
            np.testing.assert_array_equal(canvas, mask)
            ys, xs = np.nonzero(mask)
            assert (left, top, width, height) == (xs.min(), ys.min(), np.ptp(xs) + 1, np.ptp(ys) + 1)


def test_panoptic_segments_when_no_instances(tmp_path):
    pan = np.zeros((H, W), np.int32)
    pan[:30] = 7  # stuff
    pan[30:] = 300  # stuff
    pan[10:20, 10:60] = 12  # a thing in two parts
    pan[40:50, 10:20] = 12
    pan[0, :5] = 99  # not a listed segment: ignored
    segments = [
        Segment(300, 2, 0.6, False, 0, (0, 0, 0, 0)),
        Segment(12, 0, 0.9, True, 0, (0, 0, 0, 0)),
        Segment(7, 3, 0.7, False, 0, (0, 0, 0, 0)),
        Segment(5, 1, 0.8, True, 0, (0, 0, 0, 0)),  # no pixels: left out
    ]
    seg = Segmentation((H, W), panoptic=pan, segments=segments)
    item = ItemInfo("p.png", "p.png", W, H, source=None)
    writer = CvatWriter(tmp_path, VOCAB, cvat_images="copy")
    writer.finalize([(item, writer.write_item(item, seg, rgb_for(0)))])
    items, labels = load(tmp_path)
    anns = items["p"].annotations
    assert [(labels[a.label].name, a.attributes["score"]) for a in anns] == [
        ("ciel bleu é", "0.7"),
        ("person", "0.9"),
        ("road", "0.6"),
    ]
    for a, sid in zip(anns, (7, 12, 300)):
        np.testing.assert_array_equal(a.image.astype(bool), pan == sid)


# --- polygons -------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("holes", ["bridge", "fill"])
def test_polygons_load_in_datumaro(tmp_path, holes):
    data = with_sources(synthetic(), tmp_path / "src")
    writer = CvatWriter(tmp_path / "out", VOCAB, cvat_shapes="polygon", cvat_polygon_holes=holes, cvat_images="link")
    run(writer, data, roundtrip=True)
    items, labels = load(tmp_path / "out")
    for item, _, expected in data:
        got = items[dm_id(item.id)]
        masks = polygon_instances(got, H, W)
        assert len(masks) == len(expected)
        for m, (mask, _, _) in zip(masks, expected):
            if holes == "bridge":
                np.testing.assert_array_equal(m, mask)  # holes and islands kept: exact at tolerance 0
            else:
                np.testing.assert_array_equal(m, filled(mask))  # holes filled in, nothing else lost
                assert iou(m, mask) >= 0.95
    # Multi-part instances share a group id, one-part instances have none.
    groups = [a.group for a in items["sub/b"].annotations]
    assert groups == [1, 1, 1, 1, 0, 2, 2]
    assert [labels[a.label].name for a in items["sub/b"].annotations][4] == 'car & "van" <4x4>'
    # cvat_images="link": symbolic links to the sources (the frame, from a video, is written as PNG).
    images = tmp_path / "out" / "cvat" / "images"
    assert os.readlink(images / "sub" / "b.png") == str((tmp_path / "src" / "sub" / "b.png").resolve())
    assert not (images / "clip.mp4#000005.png").is_symlink()


def test_simplified_polygons_keep_iou(tmp_path):
    data = synthetic()
    counts = {}
    for tol in (0.0, 1.0):
        out = tmp_path / str(tol)
        run(CvatWriter(out, VOCAB, cvat_shapes="polygon", cvat_polygon_tolerance=tol, cvat_images="copy"), data)
        items, _ = load(out)
        counts[tol] = sum(len(a.points) for it in items.values() for a in it.annotations)
        for item, _, expected in data:
            masks = polygon_instances(items[dm_id(item.id)], H, W)
            assert len(masks) == len(expected)  # no part lost
            for m, (mask, _, _) in zip(masks, expected):
                assert iou(m, mask) >= 0.95
    assert counts[1.0] < counts[0.0] / 2


# --- the demo model -------------------------------------------------------------------------------------------------


def test_demo_model_round_trip(tmp_path):
    torch = pytest.importorskip("torch")
    from masqclip_cli import Predictor

    torch.set_num_threads(2)
    predictor = Predictor("demo", vocab=str(ROOT / "samples" / "vocab.txt"), tasks=("instance",), device="cpu")
    scenes = sorted((ROOT / "samples" / "images").glob("*.png"))[:2]
    data = []
    for path in scenes:
        seg = predictor.predict(path)
        h, w = seg.image_size
        expected = [(np.asarray(i.mask, bool), i.score, i.category) for i in seg.instances if np.any(i.mask)]
        assert expected
        data.append((ItemInfo(path.name, path.name, w, h, source=str(path)), seg, expected))
    vocab = predictor.vocabulary
    for shapes in ("mask", "polygon"):
        out = tmp_path / shapes
        writer = CvatWriter(out, vocab, cvat_shapes=shapes, cvat_images="link")
        records = [(item, writer.write_item(item, seg, None)) for item, seg, _ in data]
        writer.finalize(records)
        dataset = datumaro.Dataset.import_from(str(out / "cvat"), "cvat")
        names = [c.name for c in dataset.categories()[AnnotationType.label].items]
        assert names == vocab.names
        items = {it.id: it for it in dataset}
        assert sorted(items) == sorted(p.stem for p in scenes)
        for item, seg, expected in data:
            got = items[Path(item.id).stem]
            assert got.media.size == seg.image_size
            if shapes == "mask":
                assert len(got.annotations) == len(expected)
                for ann, (mask, score, cat) in zip(got.annotations, expected):
                    assert names[ann.label] == vocab.names[cat]
                    np.testing.assert_array_equal(ann.image.astype(bool), mask)
                    assert float(ann.attributes["score"]) == pytest.approx(float(score), abs=1e-6)
            else:
                masks = polygon_instances(got, *seg.image_size)
                assert len(masks) == len(expected)
                for m, (mask, _, _) in zip(masks, expected):
                    assert iou(m, mask) >= 0.95
                    np.testing.assert_array_equal(m, mask)  # exact at the default tolerance 0


# --- the writer's contract ------------------------------------------------------------------------------------------


def tree(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.mark.parametrize("shapes", ["mask", "polygon"])
def test_output_is_byte_identical_across_orders_and_round_trips(tmp_path, shapes):
    data = with_sources(synthetic(), tmp_path / "src")
    run(CvatWriter(tmp_path / "a", VOCAB, cvat_shapes=shapes, cvat_images="copy"), data)
    run(CvatWriter(tmp_path / "b", VOCAB, cvat_shapes=shapes, cvat_images="copy"), data, order=[3, 1, 0, 2],
        roundtrip=True)  # fmt: skip
    assert tree(tmp_path / "a") == tree(tmp_path / "b")
    assert not [p for p in (tmp_path / "a").rglob("*") if p.name.endswith(".tmp")]


def test_no_scores_and_failed_items_keep_ids(tmp_path):
    data = synthetic()
    writer = CvatWriter(tmp_path, VOCAB, cvat_scores=False)
    assert not writer.needs_source and not writer.needs_image and writer.item_files(data[0][0]) == []
    records = [(item, writer.write_item(item, seg)) for item, seg, _ in data]
    records[1] = (records[1][0], None)  # a.jpg failed: not listed, its rank (first) kept
    writer.finalize(sorted(records, key=lambda r: r[0].id))
    root = ET.parse(tmp_path / "cvat" / "annotations.xml").getroot()
    assert [(im.get("id"), im.get("name")) for im in root.findall("image")] == [
        ("1", "clip.mp4#000005.png"),
        ("2", "nothing.png"),
        ("3", "sub/b.png"),
    ]
    assert root.find(".//attribute") is None and root.findtext("meta/task/size") == "3"
    # Without images datumaro cannot import it (its importer opens every image): cvat_images is for that.
    with pytest.raises(Exception):  # noqa: B017 - datumaro's DatasetImportError
        datumaro.Dataset.import_from(str(tmp_path / "cvat"), "cvat")


def test_registration_options_and_errors(tmp_path):
    assert WRITERS["cvat"] is CvatWriter
    assert CvatWriter.any_of_tasks == ("instance", "panoptic") and not CvatWriter.tasks
    [writer] = make_writers("cvat", tmp_path, VOCAB, cvat_shapes="polygon")
    assert writer.options["cvat_shapes"] == "polygon"
    for bad in (
        {"cvat_shapes": "box"},
        {"cvat_polygon_holes": "keep"},
        {"cvat_polygon_tolerance": -1},
        {"cvat_polygon_tolerance": float("nan")},
        {"cvat_images": "move"},
    ):
        with pytest.raises(ValueError):
            CvatWriter(tmp_path, VOCAB, **bad)
    with pytest.raises(ValueError, match="output folder"):
        CvatWriter(None, VOCAB)
    item = ItemInfo("a.png", "a.png", W, H)
    with pytest.raises(ValueError, match="instance or panoptic"):
        CvatWriter(tmp_path, VOCAB).write_item(item, Segmentation((H, W)))
    with pytest.raises(ValueError, match="size"):
        CvatWriter(tmp_path, VOCAB).write_item(ItemInfo("a.png", "a.png", W + 1, H), make_instances([]))
    bad_class = make_instances([(disc(), 0.5, 7)])
    with pytest.raises(ValueError, match="outside the vocabulary"):
        CvatWriter(tmp_path, VOCAB).write_item(item, bad_class)


def winding_fill(points: list[float], h: int, w: int) -> np.ndarray:
    """Pixels whose centre (c + 0.5, r + 0.5) has a non-zero winding number (SVG's default fill rule, as CVAT's
    canvas draws polygons)."""
    py, px = np.mgrid[0:h, 0:w] + 0.5
    xs, ys = np.array(points[0::2]), np.array(points[1::2])
    wn = np.zeros((h, w), int)
    for x0, y0, x1, y1 in zip(xs, ys, np.roll(xs, -1), np.roll(ys, -1)):
        cross = (x1 - x0) * (py - y0) - (px - x0) * (y1 - y0)
        wn += ((y0 <= py) & (y1 > py) & (cross > 0)).astype(int) - ((y0 > py) & (y1 <= py) & (cross < 0)).astype(int)
    return wn != 0


def test_polygons_are_exact_on_random_masks_under_both_fill_rules():
    """Noise masks (many parts, holes, islands, diagonal-only contacts): even-odd (pycocotools, datumaro) and non-zero
    (SVG) filling of the bridged polygons both give back the mask exactly."""
    from masqclip_cli.io.writers.cvat import cvat_polygons

    rng = np.random.default_rng(7)
    for _ in range(25):
        h, w = (int(v) for v in rng.integers(4, 28, size=2))
        mask = rng.random((h, w)) < rng.uniform(0.3, 0.8)
        parts = [[float(v) for pair in s.split(";") for v in pair.split(",")] for s in cvat_polygons(mask)]
        if not mask.any():
            assert parts == []
            continue
        np.testing.assert_array_equal(mask_tools.rles_to_mask(parts, w, h).astype(bool), mask)
        np.testing.assert_array_equal(np.logical_or.reduce([winding_fill(p, h, w) for p in parts]), mask)
