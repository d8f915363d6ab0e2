"""The ``voc`` writer: Pascal VOC segmentation PNGs + labelmap + image-set lists, read back by datumaro's own VOC
importers (``voc_segmentation``, and ``voc`` as CVAT's "Segmentation mask 1.1" import calls it), lossless, on
synthetic masks with holes and several parts and on the demo model's output; the PNGs read by Pillow as palette
images; name collisions, limits and determinism."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

dm = pytest.importorskip("datumaro")

from datumaro.components.annotation import AnnotationType  # noqa: E402
from datumaro.components.environment import Environment  # noqa: E402
from datumaro.util.mask_tools import lazy_mask  # noqa: E402

from masqclip_cli.io.writers import WRITERS, ItemInfo, make_writers, needed_tasks  # noqa: E402
from masqclip_cli.io.writers.voc import VocWriter, png_owner, voc_name, voc_object_palette  # noqa: E402
from masqclip_cli.structures import Segment, Segmentation  # noqa: E402
from masqclip_cli.structures.masks import mask_bbox  # noqa: E402
from masqclip_cli.vocab import VocabClass, Vocabulary  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]

# person, car (things), road, sky (stuff)
VOCAB = Vocabulary(
    [
        VocabClass("person"),
        VocabClass("car", color=(0, 0, 142)),
        VocabClass("road", isthing=False),
        VocabClass("sky", isthing=False, color=(70, 130, 180)),
    ]
)

# VOC's object palette, from the VOC devkit's published colours (independent of the code under test).
KNOWN_VOC_COLORS = {0: (0, 0, 0), 1: (128, 0, 0), 2: (0, 128, 0), 3: (128, 128, 0), 4: (0, 0, 128),
                    5: (128, 0, 128), 15: (192, 128, 128), 20: (0, 64, 128), 255: (224, 224, 192)}


def make_seg(h: int, w: int, seed: int) -> Segmentation:
    """Sky over road (stuff); a person ring (a hole showing sky); a car in two parts, one with a hole that holds a
    second person; a segment with no pixels; void pixels (0) and pixels of an id that is no segment's (99)."""
    rng = np.random.default_rng(seed)
    pan = np.zeros((h, w), np.int32)
    pan[: h // 2] = 1  # sky
    pan[h // 2 :] = 2  # road
    oy, ox = int(rng.integers(0, 3)), int(rng.integers(0, 3))
    pan[oy + 1 : oy + 8, ox + 1 : ox + 8] = 3  # person ring ...
    pan[oy + 3 : oy + 6, ox + 3 : ox + 6] = 1  # ... around a hole of sky
    pan[h - 8 : h - 1, w - 9 : w - 1] = 4  # car part 1 ...
    pan[h - 6 : h - 3, w - 7 : w - 3] = 5  # ... with a second person in its hole
    pan[h - 4 : h - 1, 1:4] = 4  # car part 2
    pan[0, :3] = 0  # void
    pan[h // 2, :2] = 99  # an id with no segment
    table = [(1, 3, False), (2, 2, False), (3, 0, True), (4, 1, True), (5, 0, True), (6, 1, True)]  # 6: no pixels
    segments = [
        Segment(sid, cat, 0.5 + sid / 20, thing, int((pan == sid).sum()), mask_bbox(pan == sid))
        for sid, cat, thing in table
    ]
    return Segmentation((h, w), panoptic=pan, segments=segments)


ITEMS = [
    (ItemInfo("sub/b.png", "sub/b.png", 22, 20), 1),
    (ItemInfo("a.jpg", "a.jpg", 24, 18), 2),
    (ItemInfo("clip.mp4#000005", "clip.mp4", 20, 20), 3),
]
EMPTY = ItemInfo("empty.png", "empty.png", 9, 7)  # no detections


def dataset() -> list[tuple[ItemInfo, Segmentation]]:
    data = [(item, make_seg(item.height, item.width, seed)) for item, seed in ITEMS]
    data.append((EMPTY, Segmentation((EMPTY.height, EMPTY.width), panoptic=np.zeros((7, 9), np.int32))))
    return data


def write(out: Path, data, *, order=None, roundtrip=False, **options) -> VocWriter:
    writer = VocWriter(out, VOCAB, **options)
    records = {}
    for index in order or range(len(data)):
        item, seg = data[index]
        record = writer.write_item(item, seg)
        records[item.id] = json.loads(json.dumps(record, sort_keys=True)) if roundtrip else record
    writer.finalize(sorted(((item, records[item.id]) for item, _ in data), key=lambda r: r[0].id))
    return writer


def expected_objects(seg: Segmentation, things_only: bool) -> set[tuple[int, bytes]]:
    """(datumaro label = class index + 1, mask bytes) of every segment with pixels that should be an object."""
    pan = np.asarray(seg.panoptic)
    out = set()
    for s in seg.segments:
        mask = pan == s.id
        if mask.any() and (s.isthing or not things_only):
            out.add((s.category + 1, np.packbits(mask).tobytes() + bytes(str(mask.shape), "ascii")))
    return out


def expected_class_map(seg: Segmentation) -> np.ndarray:
    pan = np.asarray(seg.panoptic)
    out = np.zeros(pan.shape, np.uint8)
    for s in seg.segments:
        out[pan == s.id] = s.category + 1
    return out


def key(mask: np.ndarray) -> bytes:
    mask = np.asarray(mask, bool)
    return np.packbits(mask).tobytes() + bytes(str(mask.shape), "ascii")


def imported(path: Path, fmt: str) -> dict[str, list[tuple[int, np.ndarray]]]:
    ds = dm.Dataset.import_from(str(path), fmt)
    labels = ds.categories()[AnnotationType.label]
    assert [c.name for c in labels] == ["background", *VOCAB.names]
    out = {}
    for item in ds:
        assert item.subset == "default"
        assert all(a.type == AnnotationType.mask for a in item.annotations)
        out[item.id] = [(a.label, np.asarray(a.image, bool)) for a in item.annotations]
    return out


# --- the real importer ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("fmt", ["voc_segmentation", "voc"])
def test_datumaro_reads_every_segment_back_exactly(tmp_path, fmt):
    data = dataset()
    write(tmp_path, data)
    got = imported(tmp_path / "voc", fmt)
    assert sorted(got) == ["a", "clip#000005", "empty", "sub/b"]  # nested name kept, extension dropped
    for item, seg in data:
        anns = got[voc_name(item.id)]
        assert {(label, key(mask)) for label, mask in anns} == expected_objects(seg, things_only=False)
        assert len(anns) == len(expected_objects(seg, things_only=False))
        # the per-class pixels: the union of each label's masks is exactly our class map
        class_map = np.zeros(seg.image_size, np.uint8)
        for label, mask in anns:
            assert not class_map[mask].any()  # objects do not overlap
            class_map[mask] = label
        np.testing.assert_array_equal(class_map, expected_class_map(seg))
    assert got["empty"] == []
    # holes and parts survive: the ring's hole is sky, the car has two parts with a person in a hole
    seg = data[0][1]
    person = [m for label, m in got["sub/b"] if label == 1]
    ring = next(m for m in person if m.sum() == (np.asarray(seg.panoptic) == 3).sum())
    assert ring.sum() == 7 * 7 - 3 * 3


def test_format_detection_finds_voc(tmp_path):
    write(tmp_path, dataset())
    detected = Environment().detect_dataset(str(tmp_path / "voc"))
    assert {"voc", "voc_segmentation"} <= set(detected)


def test_things_mode_leaves_stuff_out_of_the_objects(tmp_path):
    data = dataset()
    write(tmp_path, data, voc_objects="things")
    got = imported(tmp_path / "voc", "voc_segmentation")
    ds = dm.Dataset.import_from(str(tmp_path / "voc"), "voc_segmentation")
    inverse = ds.categories()[AnnotationType.mask].inverse_colormap
    for item, seg in data:
        name = voc_name(item.id)
        assert {(label, key(mask)) for label, mask in got[name]} == expected_objects(seg, things_only=True)
        # the class PNG still holds the stuff: decode it as datumaro does (by the labelmap's colours)
        decoded = lazy_mask(str(tmp_path / "voc" / "SegmentationClass" / f"{name}.png"), inverse)()
        np.testing.assert_array_equal(decoded, expected_class_map(seg))


def test_demo_model_round_trip(tmp_path):
    torch = pytest.importorskip("torch")
    from masqclip_cli import Predictor

    torch.set_num_threads(2)
    predictor = Predictor("demo", vocab=str(ROOT / "samples" / "vocab.txt"), tasks=("panoptic",), device="cpu")
    scenes = sorted((ROOT / "samples" / "images").glob("*.png"))[:3]
    data = []
    for path in scenes:
        seg = predictor.predict(path)
        h, w = seg.image_size
        data.append((ItemInfo(f"scenes/{path.name}", path.name, w, h), seg))
    vocab = data[0][1].vocab
    writer = VocWriter(tmp_path, vocab)
    writer.finalize([(item, writer.write_item(item, seg)) for item, seg in data])
    ds = dm.Dataset.import_from(str(tmp_path / "voc"), "voc_segmentation")
    assert [c.name for c in ds.categories()[AnnotationType.label]] == ["background", *vocab.names]
    got = {item.id: [(a.label, np.asarray(a.image, bool)) for a in item.annotations] for item in ds}
    assert sorted(got) == sorted(f"scenes/{p.stem}" for p in scenes)
    total = 0
    for item, seg in data:
        anns = got[voc_name(item.id)]
        assert {(label, key(mask)) for label, mask in anns} == expected_objects(seg, things_only=False)
        total += len(anns)
    assert total > 0


# --- the files themselves -------------------------------------------------------------------------------------------


def test_pngs_are_palette_images_with_the_label_map_colours(tmp_path):
    data = dataset()
    write(tmp_path, data)
    colors = [(0, 0, 0), *VOCAB.colors()]
    assert colors[2] == (0, 0, 142) and colors[4] == (70, 130, 180)
    for item, seg in data:
        name = voc_name(item.id)
        with Image.open(tmp_path / "voc" / "SegmentationClass" / f"{name}.png") as im:
            assert im.mode == "P" and im.size == (item.width, item.height)
            palette = im.getpalette()
            assert [tuple(palette[3 * i : 3 * i + 3]) for i in range(len(colors))] == colors
            np.testing.assert_array_equal(np.asarray(im), expected_class_map(seg))
        with Image.open(tmp_path / "voc" / "SegmentationObject" / f"{name}.png") as im:
            assert im.mode == "P"
            palette = im.getpalette()
            for index, color in KNOWN_VOC_COLORS.items():
                assert tuple(palette[3 * index : 3 * index + 3]) == color
            objects = np.asarray(im)
        # objects numbered 1..K in segment-id order, stuff included; background / void / unknown ids are 0
        pan = np.asarray(seg.panoptic)
        numbered = [s.id for s in seg.segments if (pan == s.id).any()]
        expected = np.zeros(pan.shape, np.uint8)
        for n, sid in enumerate(numbered, start=1):
            expected[pan == sid] = n
        np.testing.assert_array_equal(objects, expected)
    palette = voc_object_palette()
    assert len(palette) == 256 and all(palette[i] == c for i, c in KNOWN_VOC_COLORS.items())
    from datumaro.plugins.data_formats.voc.format import VocInstColormap

    assert [tuple(int(v) for v in VocInstColormap[i]) for i in range(256)] == palette


def test_labelmap_and_lists(tmp_path):
    write(tmp_path, dataset())
    root = tmp_path / "voc"
    r, g, b = VOCAB.colors()[0]
    rr, rg, rb = VOCAB.colors()[2]
    assert (root / "labelmap.txt").read_text() == (
        "# label:color_rgb:parts:actions\nbackground:0,0,0::\n"
        f"person:{r},{g},{b}::\ncar:0,0,142::\nroad:{rr},{rg},{rb}::\nsky:70,130,180::\n"
    )
    listing = "a\nclip#000005\nempty\nsub/b\n"  # item-id order
    assert (root / "ImageSets" / "Segmentation" / "default.txt").read_text() == listing
    assert (root / "ImageSets" / "Main" / "default.txt").read_text() == listing
    assert not (root / "JPEGImages").exists()


def test_failed_items_are_not_listed(tmp_path):
    writer = VocWriter(tmp_path, VOCAB)
    data = dataset()
    records = [(item, writer.write_item(item, seg)) for item, seg in data[:2]] + [(data[2][0], None)]
    writer.finalize(sorted(records, key=lambda r: r[0].id))
    assert (tmp_path / "voc/ImageSets/Segmentation/default.txt").read_text() == "a\nsub/b\n"
    writer.finalize([])
    assert (tmp_path / "voc/ImageSets/Segmentation/default.txt").read_text() == ""


def test_outputs_are_byte_identical_across_orders_and_resumes(tmp_path):
    data = dataset()
    first = write(tmp_path / "one", data)
    write(tmp_path / "two", data, order=[3, 2, 0, 1, 2], roundtrip=True)

    def tree(root: Path) -> dict[str, bytes]:
        return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}

    one, two = tree(tmp_path / "one"), tree(tmp_path / "two")
    assert one == two
    per_item = {p.relative_to(tmp_path / "one").as_posix() for item, _ in data for p in first.item_files(item)}
    run_level = {"voc/labelmap.txt", "voc/ImageSets/Segmentation/default.txt", "voc/ImageSets/Main/default.txt"}
    assert set(one) == per_item | run_level
    assert not [name for name in one if name.endswith(".tmp")]


# --- names and collisions -------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("item_id", "name"),
    [
        ("a.jpg", "a"),
        ("sub/deeper/b.PNG", "sub/deeper/b"),
        ("clip.mp4#000005", "clip#000005"),
        ("a#1.png", "a#1"),
        ("noext", "noext"),
        ("a.tar.gz", "a.tar"),
        (".hidden", ".hidden"),
        ("../x.png", "__/x"),
        ("/abs/y.jpg", "abs/y"),
    ],
)
def test_voc_name(item_id, name):
    assert voc_name(item_id) == name


def test_same_stem_collides_and_the_second_item_fails(tmp_path):
    item, seg = dataset()[1]  # a.jpg
    other = ItemInfo("a.png", "a.png", item.width, item.height)
    writer = VocWriter(tmp_path, VOCAB)
    writer.write_item(item, seg)
    path = tmp_path / "voc" / "SegmentationClass" / "a.png"
    before = path.read_bytes()
    assert png_owner(path) == "a.jpg"
    with Image.open(path) as im:
        im.load()
        assert im.text["masqclip-item"] == "a.jpg"  # a standard iTXt chunk
    empty = Segmentation(seg.image_size, panoptic=np.zeros(seg.image_size, np.int32))
    with pytest.raises(ValueError, match=r"item 'a.png': .*'a' is already item 'a.jpg'"):
        writer.write_item(other, empty)
    assert path.read_bytes() == before
    # a resumed run (new writer, files on disk) still refuses the second one, and accepts the first again
    again = VocWriter(tmp_path, VOCAB)
    with pytest.raises(ValueError, match="already item 'a.jpg'"):
        again.write_item(other, empty)
    again.write_item(item, seg)
    assert path.read_bytes() == before
    # records that share a name (e.g. merged shards) are refused when the lists are written
    with pytest.raises(ValueError, match="share the VOC name 'a'"):
        again.finalize([(item, {"name": "a", "objects": 1}), (other, {"name": "a", "objects": 0})])


@pytest.mark.parametrize("item_id", ["#tag.png", " lead.png", "trail .png", "x\ny.png"])
def test_names_the_list_cannot_hold_fail_the_item(tmp_path, item_id):
    seg = Segmentation((4, 4), panoptic=np.zeros((4, 4), np.int32))
    with pytest.raises(ValueError, match="cannot be a line of ImageSets"):
        VocWriter(tmp_path, VOCAB).write_item(ItemInfo(item_id, item_id, 4, 4), seg)


# --- limits and bad input -------------------------------------------------------------------------------------------


def test_more_than_255_classes_refused_at_construction(tmp_path):
    with pytest.raises(ValueError, match="256 classes.*8-bit palette PNG"):
        VocWriter(tmp_path, Vocabulary([VocabClass(f"c{i}") for i in range(256)]))


def test_255_classes_fit(tmp_path):
    vocab = Vocabulary([VocabClass(f"c{i}") for i in range(255)])
    pan = np.array([[1, 2], [0, 0]], np.int32)
    seg = Segmentation((2, 2), panoptic=pan, segments=[Segment(1, 254, 0.9, True, 1, (0, 0, 1, 1)),
                                                       Segment(2, 0, 0.9, True, 1, (1, 0, 1, 1))])
    writer = VocWriter(tmp_path, vocab)
    item = ItemInfo("x.png", "x.png", 2, 2)
    writer.finalize([(item, writer.write_item(item, seg))])
    (ds_item,) = list(dm.Dataset.import_from(str(tmp_path / "voc"), "voc_segmentation"))
    assert sorted((a.label, key(a.image)) for a in ds_item.annotations) == sorted(
        [(255, key(pan == 1)), (1, key(pan == 2))]
    )


@pytest.mark.parametrize(
    ("classes", "match"),
    [
        ([VocabClass("a:b")], "class name 'a:b'"),
        ([VocabClass("background")], "class name 'background'"),
        ([VocabClass("#x")], "class name '#x'"),
        ([VocabClass("a", color=(1, 2, 3)), VocabClass("b", color=(1, 2, 3))], "'b' and 'a' are both"),
        ([VocabClass("a", color=(0, 0, 0))], "'a' and 'background' are both"),
    ],
)
def test_vocabularies_the_label_map_cannot_hold(tmp_path, classes, match):
    with pytest.raises(ValueError, match=match):
        VocWriter(tmp_path, Vocabulary(classes))


def test_bad_option_and_bad_items(tmp_path):
    with pytest.raises(ValueError, match="voc_objects must be one of all, things"):
        VocWriter(tmp_path, VOCAB, voc_objects="stuff")
    writer = VocWriter(tmp_path, VOCAB)
    item, seg = dataset()[0]
    with pytest.raises(ValueError, match="needs panoptic results"):
        writer.write_item(item, Segmentation(seg.image_size))
    with pytest.raises(ValueError, match="does not match the image size"):
        writer.write_item(ItemInfo(item.id, item.file_name, item.width + 1, item.height), seg)
    bad = Segmentation(seg.image_size, panoptic=seg.panoptic, segments=[Segment(1, 9, 0.5, True, 1, (0, 0, 1, 1))])
    with pytest.raises(ValueError, match="outside the vocabulary"):
        writer.write_item(item, bad)


def test_more_than_255_objects_fail_the_item(tmp_path):
    pan = np.arange(1, 257, dtype=np.int32).reshape(16, 16)
    segments = [Segment(i, 0, 0.9, True, 1, (0, 0, 1, 1)) for i in range(1, 257)]
    with pytest.raises(ValueError, match="256 objects do not fit"):
        VocWriter(tmp_path, VOCAB).write_item(
            ItemInfo("m.png", "m.png", 16, 16), Segmentation((16, 16), panoptic=pan, segments=segments)
        )
    # in "things" mode stuff segments take no object number
    segments[0] = Segment(1, 3, 0.9, False, 1, (0, 0, 1, 1))
    record = VocWriter(tmp_path, VOCAB, voc_objects="things").write_item(
        ItemInfo("m.png", "m.png", 16, 16), Segmentation((16, 16), panoptic=pan, segments=segments)
    )
    assert record == {"name": "m", "objects": 255}


# --- registration ---------------------------------------------------------------------------------------------------


def test_registered_with_its_task_and_option(tmp_path):
    assert WRITERS["voc"] is VocWriter
    assert VocWriter.tasks == frozenset({"panoptic"}) and not VocWriter.needs_image and not VocWriter.needs_source
    (writer,) = make_writers("voc", tmp_path, VOCAB, voc_objects="things")
    assert writer.options == {"voc_objects": "things"}
    assert needed_tasks([writer]) == {"panoptic"}
