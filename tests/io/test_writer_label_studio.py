"""The ``label-studio`` writer, checked with Label Studio's own SDK (``label_studio_sdk``): every brush region decodes
back to exactly its mask with ``label_studio_sdk.converter.brush.decode_rle`` (and its RLE bytes equal the SDK's own
encoder ``mask2rle``); every prediction validates against the written config with
``LabelInterface(config).validate_prediction`` (a label not in the config fails); polygon regions go through the
SDK's COCO export (``Converter.convert_to_coco``) and pycocotools fills them back to each part with holes filled
(exact), IoU >= 0.95 against the mask. On hand-made masks (holes, islands, several parts, single pixels, empty masks,
items with no detections, nested ids, panoptic-only results) and on the demo model's output."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from scipy import ndimage

pytest.importorskip("label_studio_sdk")
brush = pytest.importorskip("label_studio_sdk.converter.brush")
from label_studio_sdk.converter import Converter  # noqa: E402
from label_studio_sdk.label_interface import LabelInterface  # noqa: E402
from pycocotools import mask as mask_util  # noqa: E402

from masqclip_cli.io.writers import WRITERS, ItemInfo, make_writers, missing_tasks, needed_tasks  # noqa: E402
from masqclip_cli.io.writers.label_studio import LabelStudioWriter, mask_to_ls_rle  # noqa: E402
from masqclip_cli.structures import Segment, Segmentation  # noqa: E402
from masqclip_cli.vocab import VocabClass, Vocabulary  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")  # pycocotools decode

ROOT = Path(__file__).resolve().parents[2]
CLASSES = [("person", True), ("car", True), ("road", False), ('sky & "clouds"', False)]
VOCAB = Vocabulary([VocabClass(name, isthing=thing) for name, thing in CLASSES])
NAMES = [name for name, _ in CLASSES]
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


def filled_parts(mask: np.ndarray) -> list[np.ndarray]:
    """Each 8-connected part of ``mask`` with its holes filled, in the writer's order (top-most, then left-most
    pixel), computed with scipy independently of the writer."""
    labels, n = ndimage.label(mask, structure=EIGHT)
    parts = []
    for k in range(1, n + 1):
        part = labels == k
        ys, xs = np.nonzero(part)
        top = ys.min()
        parts.append(((int(top), int(xs[ys == top].min())), ndimage.binary_fill_holes(part)))
    return [p for _, p in sorted(parts, key=lambda t: t[0])]


def run(writer: LabelStudioWriter, data: list[tuple[ItemInfo, Segmentation]], *, roundtrip: bool = False):
    records = []
    for item, seg in data:
        record = writer.write_item(item, seg)
        text = json.dumps(record, sort_keys=roundtrip)  # JSON-able (sorted keys: as an engine might store it)
        records.append((item, json.loads(text) if roundtrip else record))
    paths = writer.finalize(sorted(records, key=lambda r: r[0].id))
    folder = writer.out_dir / "label-studio"
    assert paths == [folder / "tasks.json", folder / "config.xml"]
    tasks = json.loads(paths[0].read_text(encoding="utf-8"))
    config = paths[1].read_text(encoding="utf-8")
    return tasks, config


def validate(config: str, tasks: list[dict]) -> LabelInterface:
    """The SDK's checks: the config parses and is valid, each task has the data the config's Image needs, and every
    prediction validates against the config with no error."""
    interface = LabelInterface(config)
    interface.validate()
    assert interface.get_control("label").labels == NAMES
    for task in tasks:
        assert interface.validate_task({"data": task["data"]})
        assert len(task["predictions"]) == 1
        assert interface.validate_prediction(task["predictions"][0], return_errors=True) == []
    return interface


def decode_brush(region: dict) -> np.ndarray:
    """A brush region's mask, with the SDK's decoder (an (H, W, 4) RGBA layer, as Label Studio's frontend reads it)."""
    h, w = region["original_height"], region["original_width"]
    rgba = brush.decode_rle(region["value"]["rle"]).reshape(h, w, 4)
    on = rgba[:, :, 3] > 0
    assert (rgba[on] == 255).all() and (rgba[~on] == 0).all()
    return on


def coco_export(tmp: Path, config: str, tasks: list[dict]) -> dict:
    """The SDK's COCO export of the tasks, their predictions taken as annotations (as when a reviewer accepts them)."""
    exported = [
        {"id": i, "data": t["data"], "annotations": [{"id": i, "result": t["predictions"][0]["result"]}]}
        for i, t in enumerate(tasks, start=1)
    ]
    src = tmp / "export.json"
    src.write_text(json.dumps(exported), encoding="utf-8")
    logging.getLogger("label_studio_sdk").setLevel(logging.ERROR)
    Converter(config, project_dir=str(tmp), download_resources=False).convert_to_coco(
        str(src), str(tmp / "coco"), is_dir=False
    )
    return json.loads((tmp / "coco" / "result.json").read_text(encoding="utf-8"))


def coco_polygon_mask(ann: dict, h: int, w: int) -> np.ndarray:
    return mask_util.decode(mask_util.merge(mask_util.frPyObjects(ann["segmentation"], h, w))).astype(bool)


# --- the RLE: Label Studio's own bytes --------------------------------------------------------------------------------


def test_brush_rle_is_the_sdk_encoding_and_decodes_exactly():
    rng = np.random.default_rng(0)
    masks = []
    for h, w in [(1, 1), (1, 3), (2, 2), (3, 5), (7, 9), (16, 16), (33, 47)]:
        masks += [np.zeros((h, w), bool), np.ones((h, w), bool), rng.random((h, w)) < 0.5, rng.random((h, w)) < 0.03]
    long_runs = np.zeros((200, 360), bool)  # runs of 4 x 20k values (> 65536: split) and of 4 x 300 values (16 bits)
    long_runs[60:150, 30:330] = True
    long_runs[199, 359] = True
    masks.append(long_runs)
    for mask in masks:
        ours = mask_to_ls_rle(mask)
        assert ours == brush.mask2rle(mask.astype(np.uint8) * 255)  # byte for byte the SDK's encoder
        rgba = brush.decode_rle(ours).reshape(*mask.shape, 4)
        np.testing.assert_array_equal(rgba, np.repeat(mask[:, :, None], 4, axis=2).astype(np.uint8) * 255)


# --- brush regions on hand-made masks ---------------------------------------------------------------------------------


def synthetic() -> list[tuple[ItemInfo, Segmentation]]:
    h, w = 40, 52
    ring = np.zeros((h, w), bool)  # a part with a hole, an island in the hole, and a second part
    ring[4:34, 4:34] = True
    ring[14:21, 14:21] = False
    ring[16:19, 16:19] = True
    ring[32:38, 40:50] = True
    diagonal = np.zeros((h, w), bool)  # pixels touching at corners only (one 8-connected part) and a single pixel
    for k in range(8):
        diagonal[20 + k, 30 + k] = True
    diagonal[2, 50] = True
    block = np.zeros((h, w), bool)
    block[30:40, 0:20] = True
    empty = np.zeros((h, w), bool)
    first = instances_seg(h, w, [(0, 0.9, ring), (1, 0.4, diagonal), (2, 0.7, empty), (3, 0.8, block),
                                 (1, 0.6, block)])  # the same mask under two classes
    second = instances_seg(12, 10, [(0, 0.5, np.eye(12, 10, dtype=bool))])
    nothing = instances_seg(8, 6, [])
    return [
        (ItemInfo("sub/deeper/b c.png", "sub/deeper/b c.png", w, h), first),
        (ItemInfo("a.jpg", "a.jpg", 10, 12), second),
        (ItemInfo("clip.mp4#000005", "clip.mp4", 6, 8), nothing),
    ]


def expected_instances(seg: Segmentation) -> list[tuple[str, float, np.ndarray]]:
    return [(NAMES[i.category], i.score, i.mask) for i in seg.instances if i.mask.any()]


def test_brush_regions_decode_to_every_mask_and_validate(tmp_path):
    data = synthetic()
    tasks, config = run(LabelStudioWriter(tmp_path / "out", VOCAB), data)
    assert config.startswith('<View>\n  <Image name="image" value="$image"/>\n  <BrushLabels name="label"')
    interface = validate(config, tasks)
    by_id = {item.id: seg for item, seg in data}
    assert [t["data"]["image"] for t in tasks] == [
        "/data/local-files/?d=a.jpg",
        "/data/local-files/?d=clip.mp4%23000005",
        "/data/local-files/?d=sub/deeper/b%20c.png",
    ]  # item-id order, ids URL-quoted in the local-files URL
    for task, item_id in zip(tasks, ["a.jpg", "clip.mp4#000005", "sub/deeper/b c.png"]):
        seg = by_id[item_id]
        expected = expected_instances(seg)
        (prediction,) = task["predictions"]
        assert list(prediction) == ["model_version", "score", "result"]
        assert prediction["model_version"] == "masqclip"
        result = prediction["result"]
        assert len(result) == len(expected)  # one region per non-empty instance
        mean = np.mean([s for _, s, _ in expected]) if expected else 0.0
        assert prediction["score"] == pytest.approx(mean, abs=1e-6)
        h, w = seg.image_size
        for k, (region, (name, score, mask)) in enumerate(zip(result, expected), start=1):
            assert region["id"] == f"i{k}" and region["type"] == "brushlabels"
            assert (region["from_name"], region["to_name"], region["image_rotation"]) == ("label", "image", 0)
            assert (region["original_width"], region["original_height"]) == (w, h)
            assert region["value"]["format"] == "rle" and region["value"]["brushlabels"] == [name]
            assert region["score"] == pytest.approx(score, abs=1e-6)
            np.testing.assert_array_equal(decode_brush(region), mask)  # exact: holes, islands, parts
            # The SDK's own export-side decoder reads the same layer from an annotation result.
            exported = {**region, "rle": region["value"]["rle"], "brushlabels": [name]}
            (layer,) = brush.decode_from_annotation("label", [exported]).values()
            np.testing.assert_array_equal(layer > 0, mask)
    # The validator rejects what the config does not allow: a label outside it, another control, a bad RLE.
    region = tasks[2]["predictions"][0]["result"][0]
    for bad in (
        {**region, "value": {**region["value"], "brushlabels": ["zebra"]}},
        {**region, "from_name": "mask"},
        {**region, "value": {**region["value"], "rle": [300]}},
    ):
        assert interface.validate_prediction({"result": [bad]}, return_errors=True)
    polygon_config = LabelInterface(config.replace("BrushLabels", "PolygonLabels"))
    assert polygon_config.validate_prediction(tasks[2]["predictions"][0], return_errors=True)  # wrong type


# --- polygon regions --------------------------------------------------------------------------------------------------


def test_polygon_regions_through_the_sdk_coco_export(tmp_path):
    data = synthetic()
    images = tmp_path / "images"
    for item, _ in data:
        path = images / item.id
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (item.width, item.height)).save(path, format="PNG")
    writer = LabelStudioWriter(tmp_path / "out", VOCAB, ls_regions="polygon", ls_image_root=str(images))
    tasks, config = run(writer, data)
    assert "<PolygonLabels name=\"label\" toName=\"image\">" in config
    validate(config, tasks)
    assert tasks[2]["data"]["image"] == f"{images}/sub/deeper/b c.png"  # a path prefix: the id as is
    seg = data[0][1]  # sub/deeper/b c.png: the item with holes, islands, several parts
    h, w = seg.image_size
    result = tasks[2]["predictions"][0]["result"]
    # Region by region: one per 8-connected part, in order, each the part with its holes filled.
    expected = [(k, name, score, mask) for k, (name, score, mask) in enumerate(expected_instances(seg), start=1)]
    regions = iter(result)
    wanted_parts = []
    for k, name, score, mask in expected:
        for n, part in enumerate(filled_parts(mask), start=1):
            region = next(regions)
            assert region["id"] == f"i{k}p{n}" and region["type"] == "polygonlabels"
            assert region["value"]["polygonlabels"] == [name] and region["value"]["closed"] is True
            assert region["score"] == pytest.approx(score, abs=1e-6)
            assert len(region["value"]["points"]) >= 4
            assert all(0 <= x <= 100 and 0 <= y <= 100 for x, y in region["value"]["points"])
            wanted_parts.append((name, part))
    assert next(regions, None) is None
    # The SDK's COCO export (x / 100 * W), rasterised by pycocotools: exactly each part, holes filled.
    coco = coco_export(tmp_path, config, tasks)
    names = {c["id"]: c["name"] for c in coco["categories"]}
    image_id = next(im["id"] for im in coco["images"] if im["file_name"].endswith("b c.png"))
    anns = [a for a in coco["annotations"] if a["image_id"] == image_id]
    assert len(anns) == len(wanted_parts)
    for ann, (name, part) in zip(anns, wanted_parts):
        assert names[ann["category_id"]] == name
        np.testing.assert_array_equal(coco_polygon_mask(ann, h, w), part)
    # Per instance: the union of its parts against the mask itself (holes lost): IoU >= 0.95 here.
    for k, _, _, mask in expected:
        drawn = np.zeros((h, w), bool)
        for region, ann in zip(result, anns):
            if region["id"].startswith(f"i{k}p"):
                drawn |= coco_polygon_mask(ann, h, w)
        assert iou(drawn, mask) >= 0.95
        assert not (mask & ~drawn).any()  # only hole pixels are added


# --- panoptic-only results, options, determinism ----------------------------------------------------------------------


def test_panoptic_segments_without_instances(tmp_path):
    pan = np.zeros((9, 11), np.int32)
    pan[:4] = 1
    pan[4:, :5] = 2
    pan[6:8, 7:10] = 7
    segments = [Segment(1, 3, 0.9, False, 44, bbox(pan == 1)), Segment(2, 2, 0.5, False, 25, bbox(pan == 2)),
                Segment(7, 0, 0.8, True, 6, bbox(pan == 7)), Segment(9, 1, 0.3, True, 0, (0.0, 0.0, 0.0, 0.0))]
    seg = Segmentation((9, 11), panoptic=pan, segments=segments)  # no instances; segment 9 has no pixels
    tasks, config = run(LabelStudioWriter(tmp_path, VOCAB), [(ItemInfo("p.png", "p.png", 11, 9), seg)])
    validate(config, tasks)
    result = tasks[0]["predictions"][0]["result"]
    assert [r["value"]["brushlabels"] for r in result] == [[NAMES[3]], [NAMES[2]], [NAMES[0]]]
    for region, sid in zip(result, (1, 2, 7)):
        np.testing.assert_array_equal(decode_brush(region), pan == sid)
    assert tasks[0]["predictions"][0]["score"] == pytest.approx((0.9 + 0.5 + 0.8) / 3, abs=1e-6)


def test_options_registry_and_errors(tmp_path):
    assert WRITERS["label-studio"] is LabelStudioWriter
    assert LabelStudioWriter.any_of_tasks == ("instance", "panoptic") and not LabelStudioWriter.tasks
    assert needed_tasks(make_writers("label-studio", tmp_path, VOCAB)) == {"instance"}
    assert missing_tasks("label-studio", ["panoptic"]) == {}
    assert missing_tasks("label-studio", ["semantic"]) == {"label-studio": ("instance", "panoptic")}
    item = ItemInfo("sub/a b#1.png", "sub/a b#1.png", 4, 3)
    refs = {
        "https://bucket/images/": "https://bucket/images/sub/a%20b%231.png",
        "s3://bucket/images": "s3://bucket/images/sub/a%20b%231.png",
        "/data/images": "/data/images/sub/a b#1.png",
        "": "sub/a b#1.png",
    }
    for root, expected in refs.items():
        assert LabelStudioWriter(tmp_path, VOCAB, ls_image_root=root).image_reference(item.id) == expected
    mask = np.zeros((3, 4), bool)
    mask[1, 1:3] = True
    writer = LabelStudioWriter(tmp_path / "v", VOCAB, ls_model_version="v2.1")
    tasks, _ = run(writer, [(item, instances_seg(3, 4, [(1, 0.25, mask)]))])
    assert tasks[0]["predictions"][0]["model_version"] == "v2.1"
    with pytest.raises(ValueError, match="ls_regions"):
        LabelStudioWriter(tmp_path, VOCAB, ls_regions="mask")
    with pytest.raises(TypeError, match="unknown option"):
        LabelStudioWriter(tmp_path, VOCAB, regions="brush")
    twins = Vocabulary([VocabClass("car", synonyms=("automobile",)), VocabClass("car", synonyms=("truck",))])
    with pytest.raises(ValueError, match="two classes are named 'car'"):
        LabelStudioWriter(tmp_path, twins)
    with pytest.raises(ValueError, match="needs instance or panoptic"):
        LabelStudioWriter(tmp_path, VOCAB).write_item(item, Segmentation((3, 4)))
    with pytest.raises(ValueError, match="does not match"):
        LabelStudioWriter(tmp_path, VOCAB).write_item(ItemInfo("x.png", "x.png", 5, 3), instances_seg(3, 4, []))


def test_output_is_deterministic_across_runs_and_record_round_trips(tmp_path):
    outputs = []
    for k, (regions, roundtrip) in enumerate((("brush", False), ("brush", True), ("polygon", False),
                                              ("polygon", True))):
        run(LabelStudioWriter(tmp_path / str(k), VOCAB, ls_regions=regions), synthetic(), roundtrip=roundtrip)
        folder = tmp_path / str(k) / "label-studio"
        outputs.append({p.name: p.read_bytes() for p in sorted(folder.iterdir())})
        assert sorted(outputs[-1]) == ["config.xml", "tasks.json"]  # no temporary files left
    assert outputs[0] == outputs[1] and outputs[2] == outputs[3] and outputs[0] != outputs[2]


# --- the demo model ---------------------------------------------------------------------------------------------------


def test_demo_model_round_trip(tmp_path):
    torch = pytest.importorskip("torch")
    from masqclip_cli import Predictor

    torch.set_num_threads(2)
    predictor = Predictor("demo", vocab=str(ROOT / "samples" / "vocab.txt"), tasks=("instance",), device="cpu")
    vocab = predictor.vocabulary
    scenes = sorted((ROOT / "samples" / "images").glob("*.png"))[:2]
    data = []
    for path in scenes:
        seg = predictor.predict(path)
        h, w = seg.image_size
        data.append((ItemInfo(path.name, path.name, w, h), seg))
    assert sum(len(seg.instances) for _, seg in data) > 0
    image_root = str(scenes[0].parent)

    brush_tasks, brush_config = run(LabelStudioWriter(tmp_path / "b", vocab, ls_image_root=image_root), data)
    poly_writer = LabelStudioWriter(tmp_path / "p", vocab, ls_regions="polygon", ls_image_root=image_root)
    poly_tasks, poly_config = run(poly_writer, data)
    for config, tasks in ((brush_config, brush_tasks), (poly_config, poly_tasks)):
        interface = LabelInterface(config)
        assert interface.get_control("label").labels == vocab.names
        for task in tasks:
            assert interface.validate_prediction(task["predictions"][0], return_errors=True) == []
    coco = coco_export(tmp_path, poly_config, poly_tasks)
    names = {c["id"]: c["name"] for c in coco["categories"]}
    for (item, seg), brush_task, poly_task, image in zip(data, brush_tasks, poly_tasks, coco["images"]):
        assert brush_task["data"]["image"] == f"{image_root}/{item.id}" == image["file_name"]
        h, w = seg.image_size
        expected = [(vocab.names[i.category], i.mask) for i in seg.instances if i.mask.any()]
        regions = brush_task["predictions"][0]["result"]
        assert [r["value"]["brushlabels"] for r in regions] == [[name] for name, _ in expected]
        for region, (_, mask) in zip(regions, expected):
            np.testing.assert_array_equal(decode_brush(region), mask)  # exact, overlapping masks and all
        anns = [a for a in coco["annotations"] if a["image_id"] == image["id"]]
        result = poly_task["predictions"][0]["result"]
        assert len(anns) == len(result)
        for k, (name, mask) in enumerate(expected, start=1):
            drawn = np.zeros((h, w), bool)
            for region, ann in zip(result, anns):
                if region["id"].startswith(f"i{k}p"):
                    assert names[ann["category_id"]] == name
                    drawn |= coco_polygon_mask(ann, h, w)
            assert iou(drawn, mask) >= 0.95
            np.testing.assert_array_equal(drawn, ndimage.binary_fill_holes(mask) | mask)
