"""The ``labelme`` writer, checked with labelme's own code: ``labelme.LabelFile`` loads every file (and the image its
``imagePath`` names) and ``labelme.utils.shapes_to_label`` / ``shape_to_mask`` rasterise the shapes back to each
instance: exactly for mask shapes, IoU >= 0.95 for polygons; on hand-made masks (holes, islands, several parts,
single pixels, empty masks) and on the demo model's output."""

from __future__ import annotations

import base64
import dataclasses
import io
import json
import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from scipy import ndimage

labelme = pytest.importorskip("labelme")
from labelme.utils import shape_to_mask, shapes_to_label  # noqa: E402

from masqclip_cli.io.writers import WRITERS, ItemInfo, make_writers, missing_tasks, needed_tasks  # noqa: E402
from masqclip_cli.io.writers.labelme import LabelmeWriter  # noqa: E402
from masqclip_cli.structures import Segment, Segmentation  # noqa: E402
from masqclip_cli.vocab import VocabClass, Vocabulary  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
CLASSES = [("person", True), ("car", True), ("road", False), ("sky", False)]
VOCAB = Vocabulary([VocabClass(name, isthing=thing) for name, thing in CLASSES])
EIGHT = np.ones((3, 3), dtype=bool)  # 8-connectivity, as the writer splits parts


# --- helpers ----------------------------------------------------------------------------------------------------------


def bbox(mask: np.ndarray) -> tuple[float, float, float, float]:
    ys, xs = np.nonzero(mask)
    if ys.size == 0:
        return (0.0, 0.0, 0.0, 0.0)
    return (float(xs.min()), float(ys.min()), float(xs.max() - xs.min() + 1), float(ys.max() - ys.min() + 1))


def instances_seg(h: int, w: int, rows: list[tuple[int, float, np.ndarray]]) -> Segmentation:
    insts = [Segment(k, c, s, CLASSES[c][1], int(m.sum()), bbox(m), mask=m) for k, (c, s, m) in enumerate(rows, 1)]
    return Segmentation((h, w), instances=insts)


def iou(a: np.ndarray, b: np.ndarray) -> float:
    union = np.count_nonzero(a | b)
    return 1.0 if union == 0 else np.count_nonzero(a & b) / union


def save_image(path: Path, h: int, w: int, seed: int = 0) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)).save(path, format="PNG")
    return path


def write(writer: LabelmeWriter, item: ItemInfo, seg: Segmentation) -> Path:
    record = writer.write_item(item, seg)
    json.dumps(record)  # JSON-able
    path = writer.out_dir / "labelme" / record["file"]
    assert writer.item_files(item) == [path] and path.is_file()
    return path


def load(path: Path):
    """labelme's own loader, as the app opens a file (it also reads the image that imagePath names)."""
    return labelme.LabelFile(str(path))


def groups(label_file) -> dict[int, list[dict]]:
    out: dict[int, list[dict]] = {}
    for shape in label_file.shapes:
        out.setdefault(shape["group_id"], []).append(shape)
    return out


def shape_pixels(shape: dict, size: tuple[int, int]) -> np.ndarray:
    """One shape rasterised by labelme: shape_to_mask for a polygon, shapes_to_label (its mask-shape path) for a
    mask shape."""
    if shape["shape_type"] == "polygon":
        return shape_to_mask(size, shape["points"], "polygon")
    assert shape["shape_type"] == "mask" and isinstance(shape["mask"], np.ndarray)
    _, ins = shapes_to_label(size, [shape], {shape["label"]: 1})
    return ins > 0


def rasterise(shapes: list[dict], size: tuple[int, int]) -> np.ndarray:
    """The union of an instance's shapes via labelme's shapes_to_label (which joins them by label + group_id)."""
    names = {s["label"]: i for i, s in enumerate(shapes, start=1)}
    cls, ins = shapes_to_label(size, shapes, names)
    assert len(np.unique(ins[ins > 0])) <= 1  # one (label, group_id) instance
    return ins > 0


def other(shape: dict) -> dict:
    """labelme keeps unknown shape keys (score) in other_data (labelme >= 6) or as keys (5.x)."""
    return shape.get("other_data", shape)


def check_instance(shapes: list[dict], mask: np.ndarray, mode: str) -> None:
    """The instance's shapes against its mask, by labelme's rasterisation, independently of the writer's code."""
    size = mask.shape
    parts, n_parts = ndimage.label(mask, structure=EIGHT)
    union = rasterise(shapes, size)
    if mode == "mask":
        assert [s["shape_type"] for s in shapes] == ["mask"]
        np.testing.assert_array_equal(union, mask)
        return
    assert len(shapes) == n_parts  # one shape per 8-connected part
    if mode == "polygon":
        assert {s["shape_type"] for s in shapes} == {"polygon"}
        assert iou(union, ndimage.binary_fill_holes(mask)) >= 0.95  # holes cannot be polygons
        return
    for shape in shapes:
        pixels = shape_pixels(shape, size)
        if shape["shape_type"] == "mask":  # exactly one whole part
            labels = np.unique(parts[pixels])
            assert labels.size == 1 and labels[0] > 0
            np.testing.assert_array_equal(pixels, parts == labels[0])
        else:
            assert len(shape["points"]) >= 3
            assert shape["mask"] is None
    part_has_holes = [not np.array_equal(ndimage.binary_fill_holes(parts == k), parts == k) for k in
                      range(1, n_parts + 1)]
    if all(part_has_holes):
        np.testing.assert_array_equal(union, mask)
    assert iou(union, mask) >= 0.95


# --- synthetic masks: holes, islands, several parts, tiny parts, empty masks ------------------------------------------


def synthetic(h: int = 48, w: int = 64) -> tuple[Segmentation, list[tuple[int, float, np.ndarray]]]:
    yy, xx = np.mgrid[:h, :w]
    ring = ((yy - 20) ** 2 + (xx - 20) ** 2 <= 15**2) & ((yy - 20) ** 2 + (xx - 20) ** 2 > 7**2)
    island = (yy - 20) ** 2 + (xx - 20) ** 2 <= 2**2  # inside the ring's hole: a part of its own
    donut_and_island = ring | island
    two_blobs = np.zeros((h, w), bool)
    two_blobs[5:15, 42:60] = True
    two_blobs[30:44, 45:58] = True
    two_blobs[36:40, 49:54] = False  # a hole in the second blob
    tiny = np.zeros((h, w), bool)
    tiny[45, 2] = True  # a single pixel
    tiny[40, 5:20] = True  # a one-pixel-wide line
    tiny[2:8, 2:8] = True  # a square
    wiggly = ((yy - 30) ** 2 / 60 + (xx - 35 - 3 * np.sin(yy / 2)) ** 2 / 30) <= 1
    empty = np.zeros((h, w), bool)
    rows = [(0, 0.987654321, donut_and_island), (1, 0.9, two_blobs), (0, 0.5, tiny), (2, 0.25, empty),
            (3, 0.125, wiggly), (1, 0.1, two_blobs.copy())]  # the same mask under two rows (classes)
    return instances_seg(h, w, rows), rows


@pytest.mark.parametrize("mode", ["auto", "polygon", "mask"])
def test_synthetic_masks_round_trip_through_labelme(tmp_path, mode):
    seg, rows = synthetic()
    h, w = seg.image_size
    src = save_image(tmp_path / "images" / "sub" / "deeper" / "scene.png", h, w)
    item = ItemInfo("sub/deeper/scene.png", "sub/deeper/scene.png", w, h, str(src))
    writer = LabelmeWriter(tmp_path / "out", VOCAB, labelme_shapes=mode)
    path = write(writer, item, seg)
    assert path == tmp_path / "out" / "labelme" / "sub" / "deeper" / "scene.png.json"

    raw = json.loads(path.read_text(encoding="utf-8"))
    assert list(raw) == ["version", "flags", "shapes", "imagePath", "imageData", "imageHeight", "imageWidth"]
    assert raw["imageData"] is None and raw["flags"] == {}
    assert (raw["imageHeight"], raw["imageWidth"]) == (h, w)
    assert raw["imagePath"] == "../../../../images/sub/deeper/scene.png"
    assert (path.parent / raw["imagePath"]).resolve() == src.resolve()

    lf = load(path)
    assert lf.image_data == src.read_bytes()  # labelme found and read the source image
    found = groups(lf)
    expected = [(c, s, m) for c, s, m in rows if m.any()]  # the empty mask is left out
    assert sorted(found) == list(range(1, len(expected) + 1))
    for group_id, (category, score, mask) in enumerate(expected, start=1):
        shapes = found[group_id]
        assert {s["label"] for s in shapes} == {CLASSES[category][0]}
        assert {other(s)["score"] for s in shapes} == {round(score, 6)}
        assert all(s["flags"] == {} and s["description"] == "" for s in shapes)
        check_instance(shapes, mask, mode)
    if mode == "auto":  # parts with holes and parts whose outline has < 3 points are masks, the rest polygons
        def kind_of(group_id: int, part: np.ndarray) -> str:
            [shape] = [s for s in found[group_id] if (shape_pixels(s, (h, w)) & part).any()]
            return shape["shape_type"]

        donut, blobs, tiny = (ndimage.label(rows[k][2], structure=EIGHT)[0] for k in range(3))
        assert [kind_of(1, donut == k) for k in (1, 2)] == ["mask", "polygon"]  # the ring (holed), the island
        assert [kind_of(2, blobs == k) for k in (1, 2)] == ["polygon", "mask"]  # the plain blob, the holed one
        assert [kind_of(3, tiny == k) for k in (1, 2, 3)] == ["polygon", "mask", "mask"]  # square, line, pixel
        assert {s["shape_type"] for s in found[4]} == {"polygon"}  # the smooth wiggly blob


def test_auto_mode_polygons_are_simplified_but_stay_close(tmp_path):
    """A smooth blob: fewer points than its exact outline (tolerance 0), IoU >= 0.95 in labelme."""
    h, w = 80, 90
    yy, xx = np.mgrid[:h, :w]
    blob = ((yy - 40) ** 2 / 900 + (xx - 45) ** 2 / 1600) <= 1
    seg = instances_seg(h, w, [(0, 0.8, blob)])
    counts = {}
    for tol in (0.0, 1.0, 3.0):
        out = tmp_path / f"t{tol}"
        src = save_image(out / "a.png", h, w)
        writer = LabelmeWriter(out, VOCAB, labelme_tolerance=tol)
        [shape] = load(write(writer, ItemInfo("a.png", "a.png", w, h, str(src)), seg)).shapes
        assert shape["shape_type"] == "polygon"
        counts[tol] = len(shape["points"])
        assert iou(shape_to_mask((h, w), shape["points"], "polygon"), blob) >= (1.0 if tol == 0 else 0.95)
    assert counts[3.0] <= counts[1.0] < counts[0.0] / 2


def test_mask_shape_encoding_is_labelmes(tmp_path):
    """A mask shape: points = inclusive box corners, mask = base64 PNG of the box crop (0/1), as labelme reads it."""
    h, w = 20, 30
    mask = np.zeros((h, w), bool)
    mask[3:12, 5:17] = True
    mask[6:9, 9:12] = False
    seg = instances_seg(h, w, [(1, 0.5, mask)])
    src = save_image(tmp_path / "a.png", h, w)
    path = write(LabelmeWriter(tmp_path / "out", VOCAB), ItemInfo("a.png", "a.png", w, h, str(src)), seg)
    [raw] = json.loads(path.read_text())["shapes"]
    assert list(raw) == ["label", "score", "points", "group_id", "description", "shape_type", "flags", "mask"]
    assert raw["shape_type"] == "mask" and raw["points"] == [[5.0, 3.0], [16.0, 11.0]]
    png = Image.open(io.BytesIO(base64.b64decode(raw["mask"])))
    assert png.format == "PNG" and png.size == (12, 9)
    np.testing.assert_array_equal(np.asarray(png) != 0, mask[3:12, 5:17])
    [shape] = load(path).shapes
    np.testing.assert_array_equal(shape["mask"], mask[3:12, 5:17])


# --- panoptic, video frames, no detections, ids, determinism, options -------------------------------------------------


def test_panoptic_segments_when_there_are_no_instances(tmp_path):
    h, w = 24, 32
    pan = np.zeros((h, w), np.int32)
    pan[:12] = 4  # sky
    pan[12:] = 7  # road
    pan[14:20, 3:9] = 9  # a person
    pan[14:20, 20:26] = 9  # the same segment, second part
    pan[0, :3] = 0  # void
    segments = [Segment(sid, c, s, c < 2, int((pan == sid).sum()), bbox(pan == sid))
                for sid, c, s in ((4, 3, 0.9), (7, 2, 0.8), (9, 0, 0.7), (11, 1, 0.6))]  # 11 has no pixels
    seg = Segmentation((h, w), panoptic=pan, segments=segments)
    src = save_image(tmp_path / "p.png", h, w)
    for mode in ("auto", "mask"):
        path = write(LabelmeWriter(tmp_path / mode, VOCAB, labelme_shapes=mode), ItemInfo("p.png", "p.png", w, h,
                                                                                        str(src)), seg)
        found = groups(load(path))
        assert sorted(found) == [1, 2, 3]
        for group_id, sid, name in ((1, 4, "sky"), (2, 7, "road"), (3, 9, "person")):
            assert {s["label"] for s in found[group_id]} == {name}
            check_instance(found[group_id], pan == sid, mode)


def test_video_frames_no_detections_and_nested_ids(tmp_path):
    h, w = 16, 20
    video = tmp_path / "clips" / "clip.mp4"
    video.parent.mkdir()
    video.write_bytes(b"not decoded by the writer")
    mask = np.zeros((h, w), bool)
    mask[4:10, 4:12] = True
    writer = LabelmeWriter(tmp_path / "out", VOCAB)
    cases = [
        (ItemInfo("clip.mp4#000005", "clip.mp4", w, h, str(video)), instances_seg(h, w, [(0, 0.9, mask)])),
        (ItemInfo("sub/clip.mp4#000007", "sub/clip.mp4", w, h, str(video)), instances_seg(h, w, [])),
        (ItemInfo("none.png", "none.png", w, h, None), instances_seg(h, w, [])),
    ]
    for item, seg in cases:
        path = write(writer, item, seg)
        raw = json.loads(path.read_text())
        frame_name = item.id.rsplit("/", 1)[-1]
        assert raw["imagePath"] == frame_name  # labelme cannot open a frame inside a video: the id's file name
        save_image(path.parent / frame_name, h, w)  # the user saves the frame under that name: labelme opens it
        lf = load(path)
        assert len(lf.shapes) == (1 if item.id.endswith("#000005") else 0)
    assert (tmp_path / "out" / "labelme" / "sub" / "clip.mp4#000007.json").is_file()


def test_output_is_deterministic_and_rewrites_nothing(tmp_path):
    seg, _ = synthetic()
    h, w = seg.image_size
    outputs = []
    for run in ("a", "b"):
        root = tmp_path / run
        src = save_image(root / "img" / "x.png", h, w)
        writer = LabelmeWriter(root / "out", VOCAB)
        path = write(writer, ItemInfo("x.png", "x.png", w, h, str(src)), seg)
        outputs.append(path.read_bytes())
        before = os.stat(path).st_mtime_ns
        write(writer, ItemInfo("x.png", "x.png", w, h, str(src)), seg)
        assert os.stat(path).st_mtime_ns == before
        assert not [p for p in path.parent.iterdir() if p.name.endswith(".tmp")]
    assert outputs[0] == outputs[1]
    assert outputs[0].endswith(b"\n") and b"NaN" not in outputs[0]


def test_registration_tasks_and_options(tmp_path):
    assert WRITERS["labelme"] is LabelmeWriter
    assert LabelmeWriter.any_of_tasks == ("instance", "panoptic") and LabelmeWriter.needs_source
    assert missing_tasks("labelme", ["semantic"]) == {"labelme": ("instance", "panoptic")}
    assert missing_tasks("labelme", ["panoptic"]) == {}
    [writer] = make_writers("labelme", tmp_path, VOCAB, labelme_shapes="MASK", labelme_tolerance="0.5", palette=True)
    assert (writer.shape_mode, writer.tolerance) == ("mask", 0.5)
    assert needed_tasks([writer]) == {"instance"}
    with pytest.raises(ValueError, match="labelme_shapes"):
        LabelmeWriter(tmp_path, VOCAB, labelme_shapes="brush")
    with pytest.raises(ValueError, match="labelme_tolerance"):
        LabelmeWriter(tmp_path, VOCAB, labelme_tolerance=-1)
    with pytest.raises(ValueError, match="needs an output folder"):
        LabelmeWriter(None, VOCAB)
    writer = LabelmeWriter(tmp_path, VOCAB)
    item = ItemInfo("a.png", "a.png", 8, 6, None)
    with pytest.raises(ValueError, match="does not match"):
        writer.write_item(item, Segmentation((5, 8), instances=[]))
    with pytest.raises(ValueError, match="instance or panoptic"):
        writer.write_item(item, Segmentation((6, 8)))
    bad = np.ones((6, 8), bool)
    with pytest.raises(ValueError, match="outside the vocabulary"):
        writer.write_item(item, Segmentation((6, 8), instances=[Segment(1, 9, 0.5, True, 48, bbox(bad), mask=bad)]))
    assert writer.finalize([(item, None)]) == []


# --- the demo model's output ------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def demo_results():
    torch = pytest.importorskip("torch")
    from masqclip_cli import Predictor

    torch.set_num_threads(2)
    predictor = Predictor("demo", vocab=str(ROOT / "samples" / "vocab.txt"), tasks=("panoptic", "instance"),
                          device="cpu")
    scenes = sorted((ROOT / "samples" / "images").glob("*.png"))[:2]
    return predictor.vocabulary, [(p, predictor.predict(p)) for p in scenes]


@pytest.mark.parametrize("mode", ["auto", "polygon", "mask"])
def test_demo_model_instances_round_trip(tmp_path, demo_results, mode):
    vocab, results = demo_results
    writer = LabelmeWriter(tmp_path, vocab, labelme_shapes=mode)
    for path, seg in results:
        h, w = seg.image_size
        lf = load(write(writer, ItemInfo(path.name, path.name, w, h, str(path)), seg))
        assert lf.image_data == path.read_bytes()
        found = groups(lf)
        kept = [inst for inst in seg.instances if inst.mask.any()]
        assert len(kept) > 10 and sorted(found) == list(range(1, len(kept) + 1))
        for group_id, inst in enumerate(kept, start=1):
            shapes = found[group_id]
            assert {s["label"] for s in shapes} == {vocab.names[inst.category]}
            assert {other(s)["score"] for s in shapes} == {round(inst.score, 6)}
            check_instance(shapes, inst.mask, mode)


def test_demo_model_panoptic_round_trip(tmp_path, demo_results):
    vocab, results = demo_results
    path, seg = results[0]
    seg = dataclasses.replace(seg, instances=None)
    h, w = seg.image_size
    found = groups(load(write(LabelmeWriter(tmp_path, vocab), ItemInfo(path.name, path.name, w, h, str(path)), seg)))
    kept = [s for s in seg.segments if (seg.panoptic == s.id).any()]
    assert sorted(found) == list(range(1, len(kept) + 1))
    assert {vocab.names[s.category] for s in kept if not s.isthing}  # stuff segments are written too
    for group_id, s in enumerate(kept, start=1):
        check_instance(found[group_id], seg.panoptic == s.id, "auto")


def test_segment_command_writes_labelme_files(tmp_path):
    """End to end: `masqclip segment --format labelme` on a nested folder, every file opened by labelme."""
    from typer.testing import CliRunner

    from masqclip_cli.cli import app

    src = tmp_path / "in"
    for rel in ("a.png", "sub/b.png"):
        (src / rel).parent.mkdir(parents=True, exist_ok=True)
        (src / rel).write_bytes((ROOT / "samples" / "images" / "scene-000003.png").read_bytes())
    out = tmp_path / "out"
    result = CliRunner().invoke(app, ["segment", str(src), "--recursive", "--model", "demo", "--vocab",
                                      str(ROOT / "samples" / "vocab.txt"), "--task", "instance", "--format", "labelme",
                                      "--out", str(out)], env={"COLUMNS": "300"})
    assert result.exit_code == 0, result.output
    files = sorted(p.relative_to(out / "labelme").as_posix() for p in (out / "labelme").rglob("*.json"))
    assert files == ["a.png.json", "sub/b.png.json"]
    for rel in files:
        lf = load(out / "labelme" / rel)
        assert lf.shapes and lf.image_data == (src / rel[: -len(".json")]).read_bytes()
