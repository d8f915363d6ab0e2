"""Segmentation / Segments: columnar filtering and every conversion, against values computed independently
(pycocotools for RLE, area and boxes; numpy on the hand-built maps; supervision's own Detections)."""

from __future__ import annotations

import numpy as np
import pytest
from pycocotools import mask as mask_util

from masqclip_cli.structures import Segment, Segmentation, Segments
from masqclip_cli.structures.masks import decode_rle, encode_rle, mask_to_polygons, polygons_to_mask, rgb_to_id
from masqclip_cli.vocab import parse_inline

pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")  # pycocotools decode

VOCAB = parse_inline("person; car; road [stuff]; sky [stuff]")  # category ids 1..4


def _box(mask: np.ndarray) -> tuple[float, float, float, float]:
    ys, xs = np.nonzero(mask)
    return (float(xs.min()), float(ys.min()), float(xs.max() - xs.min() + 1), float(ys.max() - ys.min() + 1))


def make() -> Segmentation:
    """A 20x30 image: sky on top, road below, a person (a 6x4 block) and a car (a ring); instances overlap."""
    h, w = 20, 30
    pan = np.zeros((h, w), np.int32)
    pan[:8] = 1  # sky
    pan[8:] = 2  # road
    pan[10:16, 3:7] = 3  # person
    car = np.zeros((h, w), bool)
    car[9:17, 12:22] = True
    car[11:15, 15:19] = False  # a hole
    pan[car] = 4
    pan[0, 29] = 0  # one unlabelled pixel
    segments = [
        Segment(1, 3, 0.9, False, int((pan == 1).sum()), _box(pan == 1)),
        Segment(2, 2, 0.8, False, int((pan == 2).sum()), _box(pan == 2)),
        Segment(3, 0, 0.4, True, int((pan == 3).sum()), _box(pan == 3)),
        Segment(4, 1, 0.7, True, int((pan == 4).sum()), _box(pan == 4)),
    ]
    person = pan == 3
    tiny = np.zeros((h, w), bool)
    tiny[0, 0] = True
    instances = [
        Segment(1, 1, 0.95, True, int(car.sum()), _box(car), mask=car, query=5),
        Segment(2, 0, 0.6, True, int(person.sum()), _box(person), mask=person, query=2),
        Segment(3, 0, 0.2, True, int(car.sum()), _box(car), mask=car, query=5),  # same query, other class
        Segment(4, 1, 0.05, True, 1, _box(tiny), mask=tiny, query=7),
    ]
    semantic = np.where(pan == 1, 3, np.where(pan == 3, 0, np.where(pan == 4, 1, 2))).astype(np.int32)
    return Segmentation((h, w), semantic=semantic, panoptic=pan, segments=segments, instances=instances, vocab=VOCAB)


def test_columns_and_rows():
    seg = make()
    inst = seg.instances
    assert isinstance(inst, Segments) and len(inst) == 4
    assert inst.score.tolist() == [0.95, 0.6, 0.2, 0.05]
    assert inst.class_name.tolist() == ["car", "person", "person", "car"]
    assert inst.bbox.shape == (4, 4) and inst.area.tolist() == [int(m.sum()) for m in inst.masks]
    row = inst[1]
    assert isinstance(row, Segment) and row.name == "person" and row.query == 2 and row.mask is inst.masks[1]
    assert [s.id for s in inst] == [1, 2, 3, 4] and inst[-1].id == 4
    with pytest.raises(IndexError):
        inst[4]
    assert seg.segments.class_name.tolist() == ["sky", "road", "person", "car"]
    assert seg.class_names == ["person", "car", "road", "sky"]


def test_supervision_style_indexing():
    inst = make().instances
    confident = inst[inst.score > 0.5]
    assert confident.id.tolist() == [1, 2] and confident.class_name.tolist() == ["car", "person"]
    assert inst[[3, 0]].id.tolist() == [4, 1]
    assert inst[1:3].score.tolist() == [0.6, 0.2]
    assert len(inst[inst.score > 2]) == 0
    assert confident.masks[0] is inst.masks[0]  # masks are shared, not copied
    with pytest.raises(IndexError):
        inst[np.array([True, False])]


def test_filter():
    seg = make()
    by_score = seg.filter(min_score=0.5)
    assert by_score.instances.id.tolist() == [1, 2]
    assert by_score.segments.id.tolist() == [1, 2, 4]  # the person segment (0.4) is dropped ...
    assert (by_score.panoptic[seg.panoptic == 3] == 0).all()  # ... and its pixels become unlabelled
    assert (by_score.panoptic[seg.panoptic != 3] == seg.panoptic[seg.panoptic != 3]).all()
    assert np.array_equal(by_score.semantic, seg.semantic)  # no scores in the semantic map
    by_area = seg.filter(min_area=2)
    assert by_area.instances.id.tolist() == [1, 2, 3]
    fraction = seg.filter(min_area=30 / (20 * 30))  # 5 % of the image = 30 px: the person (24 px) goes
    assert fraction.instances.id.tolist() == [1, 3] and 3 not in fraction.segments.id.tolist()
    by_class = seg.filter(classes=["car", "sky"])
    assert by_class.instances.class_name.tolist() == ["car", "car"]
    assert by_class.segments.class_name.tolist() == ["sky", "car"]
    expected_sem = np.where(np.isin(seg.semantic, [1, 3]), seg.semantic, -1)
    assert np.array_equal(by_class.semantic, expected_sem)
    assert seg.filter(classes=[0]).instances.id.tolist() == [2, 3]
    with pytest.raises(ValueError, match="bus"):
        seg.filter(classes=["bus"])
    assert len(seg.instances) == 4  # the original is untouched


def test_to_coco_decodes_with_pycocotools():
    seg = make()
    anns = seg.to_coco(image_id=7)
    assert len(anns) == 4 and all(a["image_id"] == 7 for a in anns)
    for ann, inst in zip(anns, seg.instances):
        rle = dict(ann["segmentation"], counts=ann["segmentation"]["counts"].encode())
        np.testing.assert_array_equal(mask_util.decode(rle).astype(bool), inst.mask)
        assert ann["area"] == int(mask_util.area(rle))
        assert ann["bbox"] == [int(v) for v in mask_util.toBbox(rle)]
        assert ann["category_id"] == inst.category + 1 and ann["score"] == round(inst.score, 6)
    assert [a["category_id"] for a in seg.to_coco(category_ids=[10, 20, 30, 40])] == [20, 10, 10, 20]
    empty = Segmentation((2, 2), instances=[Segment(1, 0, 0.5, True, 0, (0, 0, 0, 0), mask=np.zeros((2, 2), bool))])
    assert empty.to_coco() == []
    with pytest.raises(ValueError, match="instance"):
        Segmentation((2, 2)).to_coco()


def test_rle_round_trip_with_holes_and_parts():
    rng = np.random.default_rng(3)
    for _ in range(20):
        mask = rng.random((17, 23)) > 0.6
        np.testing.assert_array_equal(decode_rle(encode_rle(mask)), mask)
    uncompressed = {"size": [2, 3], "counts": [1, 2, 3]}  # column-major runs: 1 off, 2 on, 3 off
    np.testing.assert_array_equal(decode_rle(uncompressed), np.array([[0, 1, 0], [1, 0, 0]], bool))


def test_to_panoptic_and_label_map():
    seg = make()
    png, infos = seg.to_panoptic()
    assert png.dtype == np.uint8 and png.shape == (20, 30, 3)
    np.testing.assert_array_equal(rgb_to_id(png), seg.panoptic)
    for info in infos:
        region = seg.panoptic == info["id"]
        assert info["area"] == int(region.sum()) and info["bbox"] == [int(v) for v in _box(region)]
    assert [i["category_id"] for i in infos] == [4, 3, 1, 2]
    labels = seg.to_label_map()
    np.testing.assert_array_equal(labels, seg.semantic + 1)
    sem = seg.semantic.copy()
    sem[0, 0] = -1
    assert Segmentation((20, 30), semantic=sem, vocab=VOCAB).to_label_map(unlabelled=255)[0, 0] == 255


def test_with_vocabulary_names_an_unnamed_result():
    seg = make()
    bare = Segmentation(seg.image_size, panoptic=seg.panoptic, segments=list(seg.segments))
    assert bare.class_names is None and bare.segments.class_name.tolist() == [""] * 4
    named = bare.with_vocabulary(VOCAB)
    assert named.segments.class_name.tolist() == ["sky", "road", "person", "car"]
    assert named.segments == seg.segments


def test_to_detections():
    sv = pytest.importorskip("supervision")
    seg = make()
    det = seg.to_detections()
    assert isinstance(det, sv.Detections) and len(det) == 4
    np.testing.assert_array_equal(det.mask, np.stack(seg.instances.masks))
    x, y, w, h = seg.instances.bbox[0]
    np.testing.assert_allclose(det.xyxy[0], [x, y, x + w, y + h])
    assert det.data["class_name"].tolist() == ["car", "person", "person", "car"]
    confident = det[det.confidence > 0.5]  # supervision's own filtering agrees with ours
    assert confident.data["class_name"].tolist() == seg.filter(min_score=0.5).instances.class_name.tolist()
    pan = seg.to_detections("panoptic")
    np.testing.assert_array_equal(pan.mask[3], seg.panoptic == 4)


def test_instance_polygons_rasterise_back():
    """The instances' masks as polygons (the car has a hole, the person none), rasterised back: IoU >= 0.95."""
    for inst in make().instances[:2]:
        for tolerance in (0.0, 0.5):
            polygons = mask_to_polygons(inst.mask, tolerance=tolerance)
            back = polygons_to_mask(polygons, *inst.mask.shape)
            iou = (back & inst.mask).sum() / (back | inst.mask).sum()
            assert iou >= 0.95, (inst.name, tolerance, iou)
        assert sum(len(p.holes) for p in mask_to_polygons(inst.mask)) == (1 if inst.name == "car" else 0)


def test_preannotation_controls():
    seg = make()
    # per-class floors (by name or index); a class not named keeps all its rows
    per_class = seg.filter(min_score={"car": 0.5})
    assert per_class.instances.id.tolist() == [1, 2, 3]  # the 0.05 car goes, both persons stay
    assert per_class.filter(min_score={0: 0.5}).instances.id.tolist() == [1, 2]
    # one label per mask: instances 1 (car 0.95) and 3 (person 0.2) are the same query's mask
    one = seg.filter(one_label_per_mask=True)
    assert one.instances.id.tolist() == [1, 2, 4] and one.instances.class_name.tolist() == ["car", "person", "car"]
    assert len({m.tobytes() for m in one.instances.masks}) == 3  # distinct masks only
    # the best max_per_image, in their original order; panoptic segments are never capped
    top = seg.filter(max_per_image=2)
    assert top.instances.id.tolist() == [1, 2] and len(top.segments) == 4
    assert seg.filter(max_per_image=0).instances.id.tolist() == []
    both = seg.filter(min_area=2, one_label_per_mask=True, max_per_image=5)
    assert both.instances.id.tolist() == [1, 2]
