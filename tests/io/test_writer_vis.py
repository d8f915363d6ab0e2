"""The ``vis`` writer (YouTube-VIS JSON): synthetic tracked sequences with known track ids are written frame by frame,
and the file is read back with json and pycocotools (``mask.decode`` of every RLE, ``mask.area`` / ``toBbox``) and
compared with the masks given: one annotation per track with the decided class (``track_classes``, else the most
common per-frame class), None where the track is absent, the best-scoring row's mask when one track has several rows
in a frame, the mean score; the panoptic thing segments when the run has no instances; untracked items as one-frame
videos; byte determinism and records that come back from JSON."""

from __future__ import annotations

import json
import random

import numpy as np
import pytest
from pycocotools import mask as mask_util

from masqclip_cli.io.writers import WRITERS, ItemInfo, make_writers, missing_tasks, needed_tasks
from masqclip_cli.io.writers.vis import VisWriter
from masqclip_cli.structures import Segment, Segmentation
from masqclip_cli.structures.masks import mask_bbox
from masqclip_cli.vocab import VocabClass, Vocabulary

pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")  # pycocotools decode

CLASSES = [("person", True, 2), ("car", True, 5), ("dog", True, 7), ("road", False, 11)]
VOCAB = Vocabulary([VocabClass(n, isthing=t, id=i) for n, t, i in CLASSES])
PERSON, CAR, DOG, ROAD = range(4)
H, W = 20, 24


def rect(y0: int, x0: int, y1: int, x1: int) -> np.ndarray:
    m = np.zeros((H, W), bool)
    m[y0:y1, x0:x1] = True
    return m


def instances(rows) -> Segmentation:
    """rows: (track id, class index, score, mask, query); sorted by descending score as the engine gives them."""
    rows = sorted(rows, key=lambda r: -r[2])
    return Segmentation(
        (H, W),
        instances=[Segment(tid, cat, score, cat != ROAD, int(m.sum()), mask_bbox(m), mask=m, query=q)
                   for tid, cat, score, m, q in rows],
        vocab=VOCAB,
    )


def frame(sequence: str, index: int, item_id: str | None = None) -> ItemInfo:
    item_id = item_id or f"{sequence}#{index:06d}"
    return ItemInfo(item_id, item_id, W, H, sequence=sequence, frame=index)


# Sequence clip.mp4 (4 frames): track 3 present in frames 0, 1, 3; track 9 in all; track 12 only with an empty mask.
A = [rect(1, 1, 8, 9), rect(2, 2, 9, 10), None, rect(4, 3, 11, 12)]
B1_LOW, B1_HIGH = rect(10, 12, 18, 20), rect(11, 14, 19, 23)  # two rows of track 9 in frame 1: the 0.9 one wins
B = [rect(5, 6, 15, 16), B1_HIGH, rect(12, 2, 19, 9), rect(0, 15, 6, 24)]
CLIP = [
    instances([(3, PERSON, 0.8, A[0], 0), (9, CAR, 0.6, B[0], 1)]),
    instances([(3, PERSON, 0.6, A[1], 0), (9, CAR, 0.4, B1_LOW, 1), (9, DOG, 0.9, B1_HIGH, 2),
               (12, DOG, 0.95, np.zeros((H, W), bool), 3)]),
    instances([(9, DOG, 0.5, B[2], 1)]),
    instances([(3, DOG, 0.7, A[3], 0), (9, CAR, 0.3, B[3], 1)]),
]
# Sequence b/seq (2 frames): track 1 in frame 0 only; frame 1 has no instance.
C0 = rect(3, 3, 7, 20)
BSEQ = [instances([(1, CAR, 0.5, C0, 0)]), instances([])]
# track 3: per-frame classes person, person, dog (most common: person) but the engine decided dog.
TRACK_CLASSES = {"clip.mp4": {3: DOG}, "b/seq": {}}


def run_items():
    items = [(frame("clip.mp4", k), seg) for k, seg in enumerate(CLIP)]
    items += [(frame("b/seq", k, f"b/seq/{k:04d}.png"), seg) for k, seg in enumerate(BSEQ)]
    return items


def write(out, items, track_classes, records_transform=None) -> tuple[dict, bytes]:
    writer = VisWriter(out, VOCAB)
    records = [(info, writer.write_item(info, seg)) for info, seg in items]
    if records_transform is not None:
        records = records_transform(records)
    writer.track_classes = track_classes
    (path,) = writer.finalize(records)
    assert path == out / "vis.json"
    data = path.read_bytes()
    return json.loads(data), data


def decode(rle: dict) -> np.ndarray:
    assert set(rle) == {"size", "counts"} and isinstance(rle["counts"], str)
    return mask_util.decode({"size": rle["size"], "counts": rle["counts"].encode("ascii")}).astype(bool)


def box(m: np.ndarray) -> list[int]:
    ys, xs = np.nonzero(m)
    return [int(xs.min()), int(ys.min()), int(xs.max() - xs.min() + 1), int(ys.max() - ys.min() + 1)]


def check_track(ann: dict, masks: list[np.ndarray | None]) -> None:
    """The annotation's per-frame lists against the expected masks (None = absent), decoded by pycocotools."""
    assert len(ann["segmentations"]) == len(ann["areas"]) == len(ann["bboxes"]) == len(masks)
    for rle, area, bbox, expected in zip(ann["segmentations"], ann["areas"], ann["bboxes"], masks):
        if expected is None:
            assert rle is None and area is None and bbox is None
            continue
        assert rle["size"] == [H, W]
        assert np.array_equal(decode(rle), expected)
        assert area == int(expected.sum())
        assert bbox == box(expected)
        coco_rle = {"size": rle["size"], "counts": rle["counts"].encode("ascii")}
        assert int(mask_util.area(coco_rle)) == area
        assert mask_util.toBbox(coco_rle).tolist() == [float(v) for v in bbox]


def test_tracks_of_two_sequences(tmp_path):
    data, _ = write(tmp_path, run_items(), TRACK_CLASSES)
    assert list(data) == ["info", "licenses", "videos", "categories", "annotations"]
    # videos: id = rank of the sequence name ("b/seq" < "clip.mp4"), file names in frame order
    assert data["videos"] == [
        {"id": 1, "file_names": ["b/seq/0000.png", "b/seq/0001.png"], "width": W, "height": H, "length": 2},
        {"id": 2, "file_names": [f"clip.mp4#{k:06d}" for k in range(4)], "width": W, "height": H, "length": 4},
    ]
    assert [(c["id"], c["name"], c["isthing"]) for c in data["categories"]] == [
        (2, "person", 1), (5, "car", 1), (7, "dog", 1), (11, "road", 0)]
    anns = data["annotations"]
    # one per track (track 12 had only an empty mask: no annotation), ordered by video, then track id
    assert [(a["id"], a["video_id"]) for a in anns] == [(1, 1), (2, 2), (3, 2)]
    b_track, track3, track9 = anns
    for ann in anns:
        assert list(ann) == ["id", "video_id", "category_id", "segmentations", "areas", "bboxes", "score", "iscrowd",
                             "height", "width", "length"]
        assert (ann["iscrowd"], ann["height"], ann["width"], ann["length"]) == (0, H, W, 1)
    check_track(b_track, [C0, None])
    check_track(track3, A)
    check_track(track9, B)  # frame 1: the 0.9 row's mask, not the 0.4 one's
    assert not np.array_equal(B1_LOW, B1_HIGH)
    # classes: track 3 as decided (dog, id 7) although person is its most common per-frame class; track 9 is not in
    # track_classes: its per-frame classes car, dog, dog, car tie, the smaller class index (car, id 5) wins
    assert track3["category_id"] == 7
    assert track9["category_id"] == 5
    assert b_track["category_id"] == 5
    # score: the mean over the frames where the track is present (of the frame's best row)
    assert track3["score"] == round((0.8 + 0.6 + 0.7) / 3, 6)
    assert track9["score"] == round((0.6 + 0.9 + 0.5 + 0.3) / 4, 6)
    assert b_track["score"] == 0.5


def test_fallback_is_the_most_common_per_frame_class(tmp_path):
    data, _ = write(tmp_path, run_items(), {})  # no decision from the engine
    by_track = {(a["video_id"], i): a for i, a in zip((1, 3, 9), data["annotations"])}
    assert by_track[(2, 3)]["category_id"] == 2  # person (2 frames) over dog (1)
    assert by_track[(2, 9)]["category_id"] == 5


def test_panoptic_thing_segments_when_there_are_no_instances(tmp_path):
    pans, expected = [], {4: [], 8: []}
    for k in range(3):
        pan = np.zeros((H, W), np.int32)
        pan[12:, :] = 30  # road (stuff): left out
        thing4 = rect(0, k, 6, 8 + k)
        thing8 = rect(5, 10, 14, 20) if k != 1 else np.zeros((H, W), bool)
        pan[thing4] = 4
        pan[thing8] = 8
        expected[4].append(pan == 4)
        expected[8].append((pan == 8) if k != 1 else None)
        segments = [Segment(4, PERSON, 0.9 - 0.1 * k, True, 0, (0, 0, 0, 0)),
                    Segment(30, ROAD, 0.99, False, 0, (0, 0, 0, 0))]
        if k != 1:
            segments.insert(1, Segment(8, CAR if k == 0 else DOG, 0.5, True, 0, (0, 0, 0, 0)))
        pans.append(Segmentation((H, W), panoptic=pan, segments=segments, vocab=VOCAB))
    items = [(frame("v", k), seg) for k, seg in enumerate(pans)]
    data, _ = write(tmp_path, items, {"v": {4: PERSON, 8: DOG}})
    assert [(a["video_id"], a["category_id"]) for a in data["annotations"]] == [(1, 2), (1, 7)]
    check_track(data["annotations"][0], expected[4])
    check_track(data["annotations"][1], expected[8])
    assert data["annotations"][0]["score"] == round((0.9 + 0.8 + 0.7) / 3, 6)


def test_untracked_items_are_one_frame_videos(tmp_path):
    m1, m2 = rect(0, 0, 5, 5), rect(3, 3, 9, 9)
    items = [
        (ItemInfo("z.jpg", "z.jpg", W, H), instances([(1, DOG, 0.7, m1, 0), (2, PERSON, 0.6, m2, 1)])),
        (ItemInfo("a.jpg", "a.jpg", W, H), instances([(1, CAR, 0.4, m2, 0)])),
    ]
    data, _ = write(tmp_path, items, {"z.jpg": {1: PERSON}})  # not a sequence: track_classes is not consulted
    assert [(v["id"], v["file_names"], v["length"]) for v in data["videos"]] == [(1, ["a.jpg"], 1), (2, ["z.jpg"], 1)]
    assert [(a["video_id"], a["category_id"], a["score"]) for a in data["annotations"]] == [
        (1, 5, 0.4), (2, 7, 0.7), (2, 2, 0.6)]
    for ann, m in zip(data["annotations"], (m2, m1, m2)):
        check_track(ann, [m])


def test_deterministic_and_records_from_json(tmp_path):
    _, first = write(tmp_path / "a", run_items(), TRACK_CLASSES)
    _, again = write(tmp_path / "b", run_items(), TRACK_CLASSES)
    assert first == again

    def through_json(records):  # records come back from JSON, keys shuffled, in any order
        rng = random.Random(0)
        out = []
        for info, record in records:
            record = json.loads(json.dumps(record))
            for row in record["tracks"]:
                keys = list(row)
                rng.shuffle(keys)
                row_copy = {k: row[k] for k in keys}
                row.clear()
                row.update(row_copy)
            out.append((info, record))
        rng.shuffle(out)
        return out

    # track_classes from JSON too: string keys
    classes = json.loads(json.dumps(TRACK_CLASSES))
    _, shuffled = write(tmp_path / "c", run_items(), classes, through_json)
    assert shuffled == first


def test_frames_without_record_and_left_out_videos(tmp_path):
    writer = VisWriter(tmp_path, VOCAB)
    items = run_items()
    records = [(info, writer.write_item(info, seg)) for info, seg in items]
    records = [(info, None if info.id == "clip.mp4#000001" or info.sequence == "b/seq" else rec)
               for info, rec in records]
    writer.track_classes = TRACK_CLASSES
    writer.finalize(records)
    data = json.loads((tmp_path / "vis.json").read_text())
    assert [v["id"] for v in data["videos"]] == [2]  # b/seq has no record at all: left out, ids keep their rank
    assert data["videos"][0]["length"] == 4
    track3, track9 = data["annotations"]
    check_track(track3, [A[0], None, None, A[3]])
    assert track9["segmentations"][1] is None
    assert track3["score"] == round((0.8 + 0.7) / 2, 6)


def test_bad_input(tmp_path):
    writer = VisWriter(tmp_path, VOCAB)
    seg = instances([(1, CAR, 0.5, rect(0, 0, 2, 2), 0)])
    with pytest.raises(ValueError, match="needs instance or panoptic"):
        writer.write_item(frame("v", 0), Segmentation((H, W), vocab=VOCAB))
    with pytest.raises(ValueError, match="segmentation size"):
        writer.write_item(ItemInfo("v#0", "v#0", W + 1, H, sequence="v", frame=0), seg)
    with pytest.raises(ValueError, match="track ids must be positive"):
        writer.write_item(frame("v", 0), instances([(0, CAR, 0.5, rect(0, 0, 2, 2), 0)]))
    rec = writer.write_item(frame("v", 0), seg)
    with pytest.raises(ValueError, match=r"'v#000000' and 'v#x' are both frame 0 of 'v'"):
        writer.finalize([(frame("v", 0), rec), (frame("v", 0, "v#x"), rec)])
    with pytest.raises(ValueError, match="different sizes"):
        other_size = ItemInfo("v#1", "v#1", W, H + 2, sequence="v", frame=1)
        writer.finalize([(frame("v", 0), rec), (other_size, {"tracks": []})])
    with pytest.raises(ValueError, match="has the name of a tracked sequence"):
        writer.finalize([(frame("v", 0), rec), (ItemInfo("v", "v", W, H), rec)])
    with pytest.raises(ValueError, match="not a vis record"):
        writer.finalize([(frame("v", 0), {"objects": []})])


def test_registered_with_its_tasks(tmp_path):
    assert WRITERS["vis"] is VisWriter
    assert missing_tasks("vis", ["semantic"]) == {"vis": ("instance", "panoptic")}
    assert missing_tasks("vis", ["panoptic"]) == {}
    (writer,) = make_writers("vis", tmp_path, VOCAB)
    assert needed_tasks([writer]) == {"instance"}
    assert writer.item_files(frame("v", 0)) == []
