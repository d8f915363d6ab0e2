"""yolo-seg writer: the dataset is loaded the way Ultralytics training loads it (``check_det_dataset`` on
``data.yaml``, then ``YOLODataset(..., task="segment")``: zero corrupt images / labels, the expected images and
polygons, each polygon rasterised back by Ultralytics' own ``polygon2mask`` -- as read from the label file and as
resampled for training -- equal to the instance's mask at IoU >= 0.95, exact on the synthetic masks) and with
``supervision.DetectionDataset.from_yolo``. Synthetic masks with holes, islands, several parts, single pixels, empty
masks and images with nothing; nested ids, a video frame, a GIF, an EXIF-rotated JPEG, panoptic-only results; the
demo model's instances; layout, options, collisions and byte-for-byte determinism. Ultralytics never touches the
network (socket calls are refused and counted) and keeps its settings in a temporary folder."""

from __future__ import annotations

import os
import socket
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest
from PIL import Image, ImageOps

from masqclip_cli.io.writers import WRITERS, ItemInfo, make_writers, needed_tasks
from masqclip_cli.io.writers.yolo_seg import YoloSegWriter, mask_rings
from masqclip_cli.structures import Segment, Segmentation
from masqclip_cli.structures.masks import mask_bbox
from masqclip_cli.vocab import VocabClass, Vocabulary

ROOT = Path(__file__).resolve().parents[2]
CLASSES = [("person", True), ("car", True), ("dot", True), ("tree", True), ("road", False), ("sky", False)]
VOCAB = Vocabulary([VocabClass(n, isthing=t) for n, t in CLASSES])
H, W = 40, 56


# --- Ultralytics, offline, with its settings in a temporary folder ---------------------------------------------------


@pytest.fixture(scope="module")
def yolo(tmp_path_factory):
    """Import ``ultralytics`` with ``YOLO_OFFLINE=1`` and ``YOLO_CONFIG_DIR`` in a temporary folder (holding
    placeholder fonts, so that ``check_det_dataset``'s font check finds them instead of downloading one). True when
    that folder is in use (ultralytics not imported before with other settings): then no network use is tolerated."""
    config = tmp_path_factory.mktemp("ultralytics-config")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("YOLO_OFFLINE", "1")
        if "ultralytics" not in sys.modules:
            mp.setenv("YOLO_CONFIG_DIR", str(config))
        pytest.importorskip("ultralytics")
        from ultralytics.utils import USER_CONFIG_DIR

        owned = Path(USER_CONFIG_DIR).resolve() == config.resolve()
        if owned:
            for font in ("Arial.ttf", "Arial.Unicode.ttf"):
                (config / font).write_bytes(b"")
        yield owned


@pytest.fixture
def no_network(monkeypatch):
    """Refuse (and count) every name lookup and connection."""
    attempts: list[str] = []

    def refuse(*args, **kwargs):
        attempts.append(repr(args[:2]))
        raise OSError("network disabled in this test")

    monkeypatch.setattr(socket, "getaddrinfo", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    monkeypatch.setattr(socket.socket, "connect", refuse)
    return attempts


def load_with_ultralytics(data_yaml: Path):
    """``check_det_dataset`` + ``YOLODataset`` as training does; returns (data, dataset, scan results, messages)."""
    from ultralytics.data import YOLODataset
    from ultralytics.data.utils import check_det_dataset, load_dataset_cache_file

    data = check_det_dataset(str(data_yaml))
    dataset = YOLODataset(img_path=data["val"], data=data, task="segment", augment=False)
    cache = load_dataset_cache_file(Path(dataset.label_files[0]).parent.with_suffix(".cache"))
    found, missing, empty, corrupt, total = cache["results"]
    return (
        data,
        dataset,
        {"found": found, "missing": missing, "empty": empty, "corrupt": corrupt, "total": total},
        cache["msgs"],
    )


def rasterise(polygon: np.ndarray, h: int, w: int) -> np.ndarray:
    """A normalised (N, 2) polygon as Ultralytics draws it (denormalised in float32 as its ``Instances`` do, then
    ``polygon2mask``: truncated to integers and filled)."""
    from ultralytics.data.utils import polygon2mask

    pixels = np.asarray(polygon, np.float32) * np.array([w, h], np.float32)
    return polygon2mask((h, w), [pixels.reshape(-1)], color=1).astype(bool)


def iou(a: np.ndarray, b: np.ndarray) -> float:
    union = np.count_nonzero(a | b)
    return np.count_nonzero(a & b) / union if union else 1.0


# --- building results ------------------------------------------------------------------------------------------------


def instances_seg(h, w, entries) -> Segmentation:
    """Instances from (class index, mask) pairs."""
    rows = [
        Segment(k, cat, 0.9 - 0.01 * k, True, int(m.sum()), mask_bbox(m), mask=m)
        for k, (cat, m) in enumerate(entries, start=1)
    ]
    return Segmentation((h, w), instances=rows)


def box(h, w, y0, y1, x0, x1) -> np.ndarray:
    m = np.zeros((h, w), bool)
    m[y0:y1, x0:x1] = True
    return m


def donut(h, w) -> np.ndarray:
    """One part with two holes, one of them holding an island (a second part), plus a separate blob: 3 parts."""
    m = box(h, w, 3, 30, 4, 40)
    m[8:14, 8:18] = False  # hole 1
    m[16:27, 20:36] = False  # hole 2 ...
    m[19:24, 24:31] = True  # ... with an island
    m[10, 30] = False  # a one-pixel hole
    m[33:38, 44:52] = True  # a separate blob
    return m


def has_hole(mask: np.ndarray) -> bool:
    """Whether some background component (4-connected) does not touch the image border."""
    n, labels = cv2.connectedComponents((~mask).astype(np.uint8), connectivity=4)
    border = set(np.concatenate([labels[0], labels[-1], labels[:, 0], labels[:, -1]]).tolist())
    return any(k not in border for k in range(1, n))


def parts(mask: np.ndarray) -> list[np.ndarray]:
    """The 8-connected parts of a mask, in raster order of their first pixel (an independent expectation)."""
    n, labels = cv2.connectedComponents(mask.astype(np.uint8), connectivity=8)
    return [labels == k for k in range(1, n)]


def expected_lines(entries) -> tuple[list[tuple[int, np.ndarray]], list[list[int]]]:
    """What the label file must hold for (class, mask) pairs: the distinct (class, part) pairs in order, and for
    each entry the indices of its parts among them."""
    distinct: list[tuple[int, np.ndarray]] = []
    index: dict[tuple[int, bytes], int] = {}
    members = []
    for cat, mask in entries:
        own = []
        for part in parts(mask):
            key = (cat, np.packbits(part).tobytes())
            if key not in index:
                index[key] = len(distinct)
                distinct.append((cat, part))
            own.append(index[key])
        members.append(own)
    return distinct, members


def write_all(writer, items):
    """write_item for each (item, seg, rgb), then finalize with the records sorted by id."""
    records = [(item, writer.write_item(item, seg, rgb)) for item, seg, rgb in items]
    return writer.finalize(sorted(records, key=lambda r: r[0].id))


def tree(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def rgb_of(path: Path) -> np.ndarray:
    """The image as masqclip decodes it (EXIF orientation applied, RGB)."""
    with Image.open(path) as im:
        return np.asarray(ImageOps.exif_transpose(im).convert("RGB"))


@pytest.fixture
def synthetic(tmp_path):
    """Source files and results for every case; returns (items, expectations by expected image path)."""
    src = tmp_path / "src"
    rng = np.random.default_rng(0)

    def picture(h, w):
        return rng.integers(0, 255, size=(h, w, 3), dtype=np.uint8)

    def save(rel, array, **kw):
        path = src / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(array).save(path, **kw)
        return path

    items, expect = [], {}

    def add(item_id, source, seg, rgb, image_rel, entries):
        info = ItemInfo(item_id, item_id, seg.image_size[1], seg.image_size[0], None if source is None else str(source))
        items.append((info, seg, rgb))
        expect[image_rel] = entries

    # a.png: holes, island, several parts, an empty mask, a single pixel, a one-pixel-wide line, duplicates.
    a = save("a.png", picture(H, W))
    pixel = np.zeros((H, W), bool)
    pixel[37, 2] = True
    line = box(H, W, 35, 36, 10, 20)
    two = box(H, W, 32, 38, 24, 30) | box(H, W, 0, 2, 0, 3)
    entries = [(0, donut(H, W)), (1, two), (1, np.zeros((H, W), bool)), (2, pixel), (2, line), (1, two.copy()),
               (3, donut(H, W))]  # fmt: skip
    add("a.png", a, instances_seg(H, W, entries), rgb_of(a), "a.png", [e for e in entries if e[1].any()])
    # sub/b.jpg: nested, a JPEG; sub/deeper/c.png: nothing found.
    b = save("sub/b.jpg", picture(H, W), quality=90)
    entries = [(4, box(H, W, 20, 40, 0, 56)), (5, box(H, W, 0, 20, 0, 56))]
    add("sub/b.jpg", b, instances_seg(H, W, entries), rgb_of(b), "sub/b.jpg", entries)
    c = save("sub/deeper/c.png", picture(12, 10))
    add("sub/deeper/c.png", c, instances_seg(12, 10, []), rgb_of(c), "sub/deeper/c.png", [])
    # images/x.png: an id with an "images" folder of its own.
    x = save("images/x.png", picture(H, W))
    entries = [(0, box(H, W, 5, 15, 5, 25))]
    add("images/x.png", x, instances_seg(H, W, entries), rgb_of(x), "images/x.png", entries)
    # A video frame: the source is the video, the image is the decoded frame.
    video = src / "clip.mp4"
    video.write_bytes(b"not decoded by the writer")
    frame = picture(H, W)
    entries = [(1, donut(H, W))]
    add("clip.mp4#000003", video, instances_seg(H, W, entries), frame, "clip.mp4#000003.png", entries)
    # A GIF (not read by Ultralytics): written as a PNG of the decoded image.
    g = save("g.gif", picture(H, W))
    entries = [(2, box(H, W, 10, 30, 10, 30))]
    add("g.gif", g, instances_seg(H, W, entries), rgb_of(g), "g.gif.png", entries)
    # An EXIF-rotated JPEG (orientation 6: a quarter turn): the results are in the rotated frame (W x H here).
    stored = Image.fromarray(picture(H, W))
    exif = stored.getexif()
    exif[0x0112] = 6
    rot = src / "rot.jpg"
    stored.save(rot, exif=exif.tobytes(), quality=95)
    rh, rw = rgb_of(rot).shape[:2]
    assert (rh, rw) == (W, H)
    entries = [(3, box(rh, rw, 2, 20, 3, 12) | box(rh, rw, 40, 50, 20, 38))]
    add("rot.jpg", rot, instances_seg(rh, rw, entries), rgb_of(rot), "rot.jpg", entries)
    # Panoptic results only: every segment, things and stuff.
    p = save("pan.png", picture(H, W))
    pan = np.zeros((H, W), np.int32)
    pan[:20] = 1  # sky
    pan[20:] = 2  # road
    pan[25:35, 5:15] = 3  # a car
    pan[5:15, 30:50] = 4  # a person with a hole of sky
    pan[8:11, 38:41] = 1
    pan[0, 0] = 0  # void
    segs = [Segment(sid, cat, 0.8, cat < 4, int((pan == sid).sum()), mask_bbox(pan == sid))
            for sid, cat in ((1, 5), (2, 4), (3, 1), (4, 0))]  # fmt: skip
    seg = Segmentation((H, W), panoptic=pan, segments=segs)
    add("pan.png", p, seg, rgb_of(p), "pan.png", [(s.category, pan == s.id) for s in segs])
    return items, expect


# --- the tests -------------------------------------------------------------------------------------------------------


def test_registered_with_its_tasks_and_options(tmp_path):
    assert WRITERS["yolo-seg"] is YoloSegWriter
    assert YoloSegWriter.any_of_tasks == ("instance", "panoptic") and not YoloSegWriter.tasks
    assert YoloSegWriter.needs_source and YoloSegWriter.needs_image
    assert dict(YoloSegWriter.option_defaults) == {"yolo_images": "copy", "yolo_split": "val"}
    w = YoloSegWriter(tmp_path, VOCAB)
    assert needed_tasks([w]) == {"instance"} and needed_tasks([w], ["panoptic"]) == {"panoptic"}
    for bad in ({"yolo_images": "hardlink"}, {"yolo_split": ""}, {"yolo_split": "a/b"}, {"yolo_split": ".."}):
        with pytest.raises(ValueError):
            YoloSegWriter(tmp_path, VOCAB, **bad)
    (made,) = make_writers("yolo-seg", tmp_path, VOCAB, yolo_images="none", yolo_split="train")
    assert (made.mode, made.split) == ("none", "train")
    with pytest.raises(ValueError):
        YoloSegWriter(None, VOCAB)


def test_mask_rings_fill_back_exactly_with_holes_islands_and_thin_parts():
    rng = np.random.default_rng(3)
    masks = [donut(H, W), box(H, W, 0, H, 0, W), box(H, W, 5, 6, 5, 6), box(H, W, 2, 30, 7, 8)]
    for k in range(60):  # noisy blobs: many holes, diagonal gaps, islands
        m = rng.random((30, 40)) < rng.uniform(0.4, 0.8)
        op = cv2.MORPH_OPEN if k % 2 else cv2.MORPH_CLOSE
        masks.append(cv2.morphologyEx(m.astype(np.uint8), op, np.ones((2, 2), np.uint8)) > 0)
    exact = 0
    for m in masks:
        rings = mask_rings(m)
        assert len(rings) == len(parts(m)) and all(len(r) >= 3 for r in rings)
        filled = np.zeros(m.shape, np.uint8)
        for r in rings:
            part = np.zeros(m.shape, np.uint8)
            cv2.fillPoly(part, [r.astype(np.int32).reshape(-1, 1, 2)], 1)
            filled |= part
        assert iou(filled > 0, m) >= 0.99
        exact += bool(np.array_equal(filled > 0, m))
    assert exact >= len(masks) - 3  # a cut that cannot avoid the background adds a few pixels, rarely
    assert np.array_equal(mask_rings(box(H, W, 5, 6, 5, 6))[0], [[5, 5]] * 3)
    assert mask_rings(np.zeros((4, 4), bool)) == []


def test_layout_lines_and_data_yaml(tmp_path, synthetic):
    items, expect = synthetic
    out = tmp_path / "out"
    written = write_all(YoloSegWriter(out, VOCAB), items)
    root = out / "yolo-seg"
    assert written == [root / "data.yaml"]
    files = set(tree(root))
    labels = {
        "labels/val/a.txt", "labels/val/sub/b.txt", "labels/val/sub/deeper/c.txt", "images/val/labels/x.txt",
        "labels/val/clip.mp4#000003.txt", "labels/val/g.gif.txt", "labels/val/rot.txt", "labels/val/pan.txt",
    }  # fmt: skip
    assert files == {"data.yaml"} | labels | {f"images/val/{rel}" for rel in expect}
    # Images: sources byte for byte, the frame and the GIF as PNGs of the decoded image.
    by_id = {item.id: (item, rgb) for item, _, rgb in items}
    for rel in ("a.png", "sub/b.jpg", "rot.jpg", "images/x.png"):
        assert (root / "images/val" / rel).read_bytes() == Path(by_id[rel][0].source).read_bytes()
    assert np.array_equal(rgb_of(root / "images/val/clip.mp4#000003.png"), by_id["clip.mp4#000003"][1])
    assert np.array_equal(rgb_of(root / "images/val/g.gif.png"), by_id["g.gif"][1])
    # Lines: class index then >= 3 points, 6 decimals in (0, 1); an empty file for nothing found.
    assert (root / "labels/val/sub/deeper/c.txt").read_bytes() == b""
    text = (root / "labels/val/a.txt").read_text()
    assert text.endswith("\n")
    for line in text.splitlines():
        cls, *coords = line.split(" ")
        assert int(cls) in range(len(VOCAB)) and len(coords) >= 6 and len(coords) % 2 == 0
        assert all(len(c) == 8 and c.startswith("0.") for c in coords)
    distinct, _ = expected_lines(expect["a.png"])
    assert len(text.splitlines()) == len(distinct) == 3 + 2 + 1 + 1 + 3  # the repeated instance is written once
    # A vertex is the pixel centre, rounded down: the single pixel (37, 2) of a 56 x 40 image.
    assert f"2 {'0.044642 0.937499 ' * 3}".strip() in text.splitlines()
    yaml = pytest.importorskip("yaml")
    data = yaml.safe_load((root / "data.yaml").read_text())
    assert list(data) == ["path", "train", "val", "names"]  # no nc
    assert data["path"] == str(root.resolve()) and data["train"] == data["val"] == "images/val"
    assert data["names"] == {i: name for i, name in enumerate(VOCAB.names)}


def test_loaded_by_ultralytics_training_loader(tmp_path, synthetic, yolo, no_network):
    items, expect = synthetic
    out = tmp_path / "out"
    write_all(YoloSegWriter(out, VOCAB), items)
    root = out / "yolo-seg"
    data, dataset, scan, msgs = load_with_ultralytics(root / "data.yaml")
    assert data["nc"] == len(VOCAB) and data["names"] == dict(enumerate(VOCAB.names))
    assert scan == {"found": len(items), "missing": 0, "empty": 1, "corrupt": 0, "total": len(items)}
    assert msgs == []  # no warnings either (duplicates, restored JPEGs, ...)
    by_path = {Path(lb["im_file"]).relative_to(root / "images/val").as_posix(): lb for lb in dataset.labels}
    assert set(by_path) == set(expect)
    for i, im_file in enumerate(dataset.im_files):
        rel = Path(im_file).relative_to(root / "images/val").as_posix()
        label = by_path[rel]
        h, w = label["shape"]
        entries = expect[rel]
        assert (h, w) == (entries[0][1].shape if entries else (12, 10))
        distinct, members = expected_lines(entries)
        assert label["cls"].reshape(-1).astype(int).tolist() == [cat for cat, _ in distinct]
        assert len(label["segments"]) == len(distinct)
        resampled = dataset.get_image_and_label(i)["instances"].segments  # as training gets them
        assert len(resampled) == len(distinct)
        raw = [rasterise(s, h, w) for s in label["segments"]]
        trained = [rasterise(s, h, w) for s in resampled]
        for (_, part), got, got_resampled in zip(distinct, raw, trained):
            assert np.array_equal(got, part), rel  # exact: holes bridged, pixel centres truncated back
            assert iou(got_resampled, part) >= 0.95, rel
        for (_, mask), own in zip(entries, members):  # union over the parts of each instance
            assert np.array_equal(np.logical_or.reduce([raw[k] for k in own]), mask)
    if yolo:
        assert no_network == []


def test_loaded_by_supervision(tmp_path, synthetic):
    sv = pytest.importorskip("supervision")
    items, expect = synthetic
    out = tmp_path / "out"
    write_all(YoloSegWriter(out, VOCAB), items)
    root = out / "yolo-seg"
    ds = sv.DetectionDataset.from_yolo(
        images_directory_path=str(root / "images/val"),
        annotations_directory_path=str(root / "labels/val"),
        data_yaml_path=str(root / "data.yaml"),
    )
    assert ds.classes == VOCAB.names
    flat = {rel for rel in expect if "/" not in rel}  # supervision reads one folder, not its subfolders
    assert {Path(p).name for p in ds.image_paths} == flat
    for path, _, det in ds:
        distinct, members = expected_lines(expect[Path(path).name])
        assert det.class_id.tolist() == [cat for cat, _ in distinct]
        for (_, part), got in zip(distinct, det.mask):
            assert np.array_equal(got, part)  # exact: supervision rounds, the vertices sit just below the centre
        for (_, mask), own in zip(expect[Path(path).name], members):
            assert iou(np.logical_or.reduce([det.mask[k] for k in own]), mask) >= 0.95


def test_demo_model_round_trip(tmp_path, yolo, no_network):
    sv = pytest.importorskip("supervision")
    import torch

    from masqclip_cli import Predictor
    from masqclip_cli.vocab import load_vocabulary

    torch.set_num_threads(2)
    vocab_file = ROOT / "samples" / "vocab.txt"
    vocab = load_vocabulary(str(vocab_file))
    predictor = Predictor("demo", vocab=str(vocab_file), tasks=("instance",), device="cpu")
    scenes = sorted((ROOT / "samples" / "images").glob("*.png"))[:3]
    items, expect = [], {}
    for scene in scenes:
        seg = predictor.predict(scene)
        h, w = seg.image_size
        items.append((ItemInfo(scene.name, scene.name, w, h, str(scene.resolve())), seg, rgb_of(scene)))
        expect[scene.name] = [(int(i.category), np.asarray(i.mask)) for i in seg.instances if i.mask.any()]
    out = tmp_path / "out"
    write_all(YoloSegWriter(out, vocab), items)
    root = out / "yolo-seg"
    _, dataset, scan, msgs = load_with_ultralytics(root / "data.yaml")
    assert scan == {"found": 3, "missing": 0, "empty": 0, "corrupt": 0, "total": 3} and msgs == []
    holes, raw_ious = 0, []
    for i, label in enumerate(dataset.labels):
        name = Path(label["im_file"]).name
        h, w = label["shape"]
        distinct, members = expected_lines(expect[name])
        holes += sum(has_hole(m) for _, m in expect[name])
        assert label["cls"].reshape(-1).astype(int).tolist() == [cat for cat, _ in distinct]
        raw = [rasterise(s, h, w) for s in label["segments"]]
        trained = [rasterise(s, h, w) for s in dataset.get_image_and_label(i)["instances"].segments]
        assert len(raw) == len(trained) == len(distinct)
        for (_, mask), own in zip(expect[name], members):
            raw_ious.append(iou(np.logical_or.reduce([raw[k] for k in own]), mask))
            assert raw_ious[-1] >= 0.95
            assert iou(np.logical_or.reduce([trained[k] for k in own]), mask) >= 0.95
    assert holes > 0  # the demo's masks do have holes, and they come back
    assert np.mean(raw_ious) > 0.999
    ds = sv.DetectionDataset.from_yolo(str(root / "images/val"), str(root / "labels/val"), str(root / "data.yaml"))
    assert len(ds) == 3
    for path, _, det in ds:
        distinct, members = expected_lines(expect[Path(path).name])
        assert len(det) == len(distinct)
        for (_, mask), own in zip(expect[Path(path).name], members):
            assert iou(np.logical_or.reduce([det.mask[k] for k in own]), mask) >= 0.95
    if yolo:
        assert no_network == []


def test_symlink_and_none_modes(tmp_path, synthetic, yolo, no_network):
    items, expect = synthetic
    out = tmp_path / "links"
    write_all(YoloSegWriter(out, VOCAB, yolo_images="symlink", yolo_split="train"), items)
    root = out / "yolo-seg"
    link = root / "images/train/sub/b.jpg"
    assert link.is_symlink() and os.readlink(link) == os.path.abspath(items[1][0].source)
    frame = root / "images/train/clip.mp4#000003.png"
    assert frame.is_file() and not frame.is_symlink()  # a frame cannot be linked
    _, dataset, scan, _ = load_with_ultralytics(root / "data.yaml")
    assert scan["corrupt"] == 0 and scan["found"] == len(dataset.labels) == len(items)
    none = tmp_path / "none"
    write_all(YoloSegWriter(none, VOCAB, yolo_images="none"), items)
    # Labels and data.yaml only (images/val/labels/x.txt is the label of the id images/x.png).
    assert {p.suffix for p in (none / "yolo-seg").rglob("*") if p.is_file()} == {".txt", ".yaml"}
    assert (none / "yolo-seg/labels/val/a.txt").read_bytes() == (root / "labels/train/a.txt").read_bytes()
    writer = YoloSegWriter(none, VOCAB, yolo_images="none")
    assert writer.item_files(items[0][0]) == [none / "yolo-seg/labels/val/a.txt"]


def test_same_label_for_two_ids_fails_the_second(tmp_path):
    rgb = np.zeros((H, W, 3), np.uint8)
    seg = instances_seg(H, W, [(0, box(H, W, 1, 9, 1, 9))])
    src = tmp_path / "src"
    src.mkdir()
    jpg, png = src / "a.jpg", src / "a.png"
    Image.fromarray(rgb).save(jpg)
    Image.fromarray(rgb).save(png)
    a_jpg = ItemInfo("a.jpg", "a.jpg", W, H, str(jpg))
    a_png = ItemInfo("a.png", "a.png", W, H, str(png))
    writer = YoloSegWriter(tmp_path / "out", VOCAB)
    record = writer.write_item(a_jpg, seg, rgb)
    with pytest.raises(ValueError, match=r"'a\.png'.*labels/val/a\.txt.*'a\.jpg'"):
        writer.write_item(a_png, seg, rgb)
    assert not (tmp_path / "out/yolo-seg/images/val/a.png").exists()
    # A resumed run (a new writer) sees a.jpg's image on disk.
    with pytest.raises(ValueError, match=r"images/val/a\.jpg"):
        YoloSegWriter(tmp_path / "out", VOCAB).write_item(a_png, seg, rgb)
    # Records of two runs (no images to see) meet in finalize.
    first = YoloSegWriter(tmp_path / "none", VOCAB, yolo_images="none")
    second = YoloSegWriter(tmp_path / "none", VOCAB, yolo_images="none")
    records = [(a_jpg, first.write_item(a_jpg, seg, rgb)), (a_png, second.write_item(a_png, seg, rgb))]
    with pytest.raises(ValueError, match="same YOLO label"):
        first.finalize(records)
    assert writer.finalize([(a_jpg, record)]) == [tmp_path / "out/yolo-seg/data.yaml"]


def test_deterministic_resumable_and_yaml_quoting(tmp_path, synthetic):
    items, _ = synthetic
    vocab = Vocabulary([VocabClass('person: "tall"'), VocabClass("ünï #c"), VocabClass("yes"),
                        VocabClass("x\u2028y\x85z", isthing=False), VocabClass("null", isthing=False),
                        VocabClass("- [a]", isthing=False)])  # fmt: skip
    out = tmp_path / "out"
    write_all(YoloSegWriter(out, vocab), items)
    first = tree(out)
    mtimes = {p: p.stat().st_mtime_ns for p in out.rglob("*") if p.is_file()}
    write_all(YoloSegWriter(out, vocab), items)  # a re-run: the same bytes, nothing rewritten
    assert tree(out) == first
    assert {p: p.stat().st_mtime_ns for p in out.rglob("*") if p.is_file()} == mtimes
    assert not [p for p in out.rglob("*") if p.name.endswith(".tmp")]
    writer = YoloSegWriter(out, vocab)
    for item, _, _ in items:
        assert all(p.is_file() for p in writer.item_files(item))
    yaml = pytest.importorskip("yaml")
    assert yaml.safe_load((out / "yolo-seg/data.yaml").read_text(encoding="utf-8"))["names"] == dict(
        enumerate(vocab.names)
    )


def test_bad_inputs_fail_the_item(tmp_path):
    writer = YoloSegWriter(tmp_path, VOCAB)
    item = ItemInfo("clip.mp4#000001", "clip.mp4", W, H, str(tmp_path / "clip.mp4"))
    seg = instances_seg(H, W, [(0, box(H, W, 1, 9, 1, 9))])
    with pytest.raises(ValueError, match="decoded image"):
        writer.write_item(item, seg, None)
    with pytest.raises(ValueError, match="outside the vocabulary"):
        writer.write_item(item, instances_seg(H, W, [(len(VOCAB), box(H, W, 1, 9, 1, 9))]), np.zeros((H, W, 3)))
    with pytest.raises(ValueError, match="instance or panoptic"):
        writer.write_item(item, Segmentation((H, W)), np.zeros((H, W, 3), np.uint8))
    with pytest.raises(ValueError, match="does not match"):
        writer.write_item(ItemInfo("a.png", "a.png", W + 1, H), seg, None)
