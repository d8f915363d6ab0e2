"""The ``mots`` writer (MOTS Challenge txt): synthetic tracked sequences with known track ids are written frame by
frame; every line is parsed by hand and its RLE decoded with pycocotools against the expected masks (1-based frames,
the engine's track ids, the decided class's category id, no overlaps: panoptic thing segments when the run has them,
else instances resolved by descending score, a track left empty dropped from the frame); TrackEval's own
``MOTSChallenge`` dataset reads the file as ground truth and as tracker output from a laid-out folder (HOTA 100 and no
ID switch against itself), and so does :func:`masqclip_cli.evaluation.tracking.evaluate_tracking` per class; byte
determinism and records that come back from JSON."""

from __future__ import annotations

import contextlib
import io
import json
import random
import shutil
from pathlib import Path

import numpy as np
import pytest
from pycocotools import mask as mask_util

from masqclip_cli.io.writers import WRITERS, ItemInfo, make_writers, missing_tasks, needed_tasks
from masqclip_cli.io.writers.mots import MotsWriter
from masqclip_cli.structures import Segment, Segmentation
from masqclip_cli.structures.masks import mask_bbox
from masqclip_cli.vocab import VocabClass, Vocabulary

pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")  # pycocotools decode

# Category id 2 is TrackEval MOTSChallenge's only evaluated class ("pedestrian"); 10 (its ignore class) is not used.
CLASSES = [("person", True, 2), ("car", True, 5), ("dog", True, 7), ("road", False, 11)]
VOCAB = Vocabulary([VocabClass(n, isthing=t, id=i) for n, t, i in CLASSES])
PERSON, CAR, DOG, ROAD = range(4)
H, W = 20, 24


def rect(y0: int, x0: int, y1: int, x1: int) -> np.ndarray:
    m = np.zeros((H, W), bool)
    m[y0:y1, x0:x1] = True
    return m


def instances(rows, panoptic=None, segments=()) -> Segmentation:
    """rows: (track id, class index, score, mask); sorted by descending score as the engine gives them."""
    rows = sorted(rows, key=lambda r: -r[2])
    return Segmentation(
        (H, W),
        panoptic=panoptic,
        segments=list(segments),
        instances=[Segment(tid, cat, score, True, int(m.sum()), mask_bbox(m), mask=m, query=k)
                   for k, (tid, cat, score, m) in enumerate(rows)],
        vocab=VOCAB,
    )


def frame(sequence: str, index: int) -> ItemInfo:
    item_id = f"{sequence}#{index:06d}"
    return ItemInfo(item_id, item_id, W, H, sequence=sequence, frame=index)


# clip.mp4, instances only, overlapping: track 3 (person) moves right; track 4 (person) overlaps it; track 6 (dog)
# lies inside track 3 in frame 1 (dropped there); track 8 has two rows in frame 0 (the 0.7 one's mask counts).
T3 = [rect(2, 2 + k, 10, 10 + k) for k in range(3)]
T4 = [rect(6, 6, 14, 14), rect(6, 8, 14, 16), rect(15, 0, 19, 6)]
T6 = [rect(12, 16, 18, 22), rect(4, 5, 7, 8), rect(12, 16, 18, 22)]
T8_LOW, T8_HIGH = rect(0, 18, 5, 24), rect(0, 20, 3, 24)
CLIP = [
    instances([(3, PERSON, 0.9, T3[0]), (4, PERSON, 0.5, T4[0]), (6, DOG, 0.4, T6[0]),
               (8, CAR, 0.2, T8_LOW), (8, DOG, 0.7, T8_HIGH)]),
    instances([(3, PERSON, 0.8, T3[1]), (4, DOG, 0.85, T4[1]), (6, DOG, 0.3, T6[1])]),
    instances([(3, PERSON, 0.6, T3[2]), (4, PERSON, 0.6, T4[2]), (6, DOG, 0.6, T6[2])]),
]
# The masks as MOTS must carry them, worked out by hand: a contested pixel goes to the higher score.
EXPECTED_CLIP = [
    {3: T3[0], 4: T4[0] & ~T3[0], 6: T6[0], 8: T8_HIGH},
    {4: T4[1], 3: T3[1] & ~T4[1]},  # track 4 (0.85) beats track 3 (0.8); track 6 lies inside track 3: dropped
    {3: T3[2], 4: T4[2], 6: T6[2]},
]
# Decided classes: track 4 is person although it was dog in frame 1; track 6 and 8 are not listed: the most common
# per-frame class (dog for both).
TRACK_CLASSES = {"clip.mp4": {3: PERSON, 4: PERSON}}
CLASS_IDS = {3: 2, 4: 2, 6: 7, 8: 7}


def write(out: Path, items, track_classes, records_transform=None) -> list[Path]:
    writer = MotsWriter(out, VOCAB)
    records = [(info, writer.write_item(info, seg)) for info, seg in items]
    if records_transform is not None:
        records = records_transform(records)
    writer.track_classes = track_classes
    return writer.finalize(records)


def clip_items():
    return [(frame("clip.mp4", k), seg) for k, seg in enumerate(CLIP)]


def parse(path: Path) -> dict[int, dict[int, tuple[int, np.ndarray]]]:
    """frame (as written) -> track id -> (class id, mask), every line checked field by field."""
    out: dict[int, dict[int, tuple[int, np.ndarray]]] = {}
    text = path.read_text()
    assert text == "" or text.endswith("\n")
    for line in text.splitlines():
        fields = line.split(" ")
        assert len(fields) == 6, line
        frame_no, track_id, class_id, height, width = (int(v) for v in fields[:5])
        assert (height, width) == (H, W)
        mask = mask_util.decode({"size": [height, width], "counts": fields[5].encode("ascii")}).astype(bool)
        assert mask.any()
        assert track_id not in out.setdefault(frame_no, {})
        out[frame_no][track_id] = (class_id, mask)
    return out


def test_instances_without_overlaps(tmp_path):
    (path,) = write(tmp_path, clip_items(), TRACK_CLASSES)
    assert path == tmp_path / "mots" / "clip.mp4.txt"
    frames = parse(path)
    assert sorted(frames) == [1, 2, 3]  # 1-based
    for k, expected in enumerate(EXPECTED_CLIP):
        got = frames[k + 1]
        assert sorted(got) == sorted(expected)
        for track_id, mask in expected.items():
            class_id, decoded = got[track_id]
            assert class_id == CLASS_IDS[track_id]
            assert np.array_equal(decoded, mask), (k, track_id)
        assert np.sum([m.astype(int) for _, m in got.values()], axis=0).max() == 1  # no overlaps
    # within a frame, lines are ordered by track id
    order = [(int(a), int(b)) for a, b, *_ in (line.split() for line in path.read_text().splitlines())]
    assert order == sorted(order)


def panoptic_items():
    """Three frames with a panoptic map (things 5 and 7, stuff 40) and overlapping instances that mots must ignore."""
    items, expected = [], []
    for k in range(3):
        pan = np.zeros((H, W), np.int32)
        pan[15:, :] = 40
        pan[rect(1, k, 9, 9 + k)] = 5
        if k != 2:
            pan[rect(4, 12, 12, 20)] = 7
        segments = [Segment(5, PERSON, 0.9, True, 0, (0, 0, 0, 0)), Segment(40, ROAD, 0.8, False, 0, (0, 0, 0, 0))]
        if k != 2:
            segments.insert(1, Segment(7, CAR, 0.6, True, 0, (0, 0, 0, 0)))
        seg = instances([(5, PERSON, 0.9, rect(0, 0, 12, 12)), (7, CAR, 0.95, rect(0, 0, 12, 12))],
                        panoptic=pan, segments=segments)
        items.append((frame("b/pan.mp4", k), seg))
        expected.append({5: pan == 5, **({7: pan == 7} if k != 2 else {})})
    return items, expected


def test_panoptic_thing_segments_are_preferred(tmp_path):
    items, expected = panoptic_items()
    (path,) = write(tmp_path, items, {"b/pan.mp4": {5: PERSON, 7: CAR}})
    assert path == tmp_path / "mots" / "b" / "pan.mp4.txt"  # nested sequence names keep their folders
    frames = parse(path)
    assert sorted(frames) == [1, 2, 3]
    for k, exp in enumerate(expected):
        assert {t: (c, m.tolist()) for t, (c, m) in frames[k + 1].items()} == {
            t: ({5: 2, 7: 5}[t], m.tolist()) for t, m in exp.items()}


def test_untracked_items_are_one_frame_files(tmp_path):
    items = [
        (ItemInfo("sub/a.jpg", "sub/a.jpg", W, H), instances([(1, CAR, 0.9, T3[0]), (2, DOG, 0.3, T4[0])])),
        (ItemInfo("empty.jpg", "empty.jpg", W, H), instances([])),
    ]
    paths = write(tmp_path, items, {})
    assert paths == [tmp_path / "mots" / "empty.jpg.txt", tmp_path / "mots" / "sub" / "a.jpg.txt"]
    assert paths[0].read_text() == ""  # nothing found: an empty file
    frames = parse(paths[1])
    assert sorted(frames) == [1]
    assert frames[1][1][0] == 5 and np.array_equal(frames[1][1][1], T3[0])
    assert frames[1][2][0] == 7 and np.array_equal(frames[1][2][1], T4[0] & ~T3[0])


def test_deterministic_and_records_from_json(tmp_path):
    (first,) = write(tmp_path / "a", clip_items(), TRACK_CLASSES)
    (again,) = write(tmp_path / "b", clip_items(), TRACK_CLASSES)
    assert first.read_bytes() == again.read_bytes()

    def through_json(records):
        rng = random.Random(1)
        out = [(info, json.loads(json.dumps(record))) for info, record in records]
        for _, record in out:
            rng.shuffle(record["objects"])
        rng.shuffle(out)
        return out

    (shuffled,) = write(tmp_path / "c", clip_items(), json.loads(json.dumps(TRACK_CLASSES)), through_json)
    assert shuffled.read_bytes() == first.read_bytes()


# --- TrackEval, the reference reader --------------------------------------------------------------------------------


def _trackeval():
    """TrackEval as the project imports it (silenced; numpy aliases put back only for versions that need them)."""
    from masqclip_cli.evaluation.tracking import _import_trackeval

    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        pytest.importorskip("trackeval")
    return _import_trackeval()


def lay_out(root: Path, seq: str, gt_file: Path, tracker_file: Path, length: int) -> dict:
    """The folder TrackEval's MOTSChallenge dataset reads (split "train", tracker "masq"); its dataset config."""
    split = root / "gt" / "MOTS-train"
    (split / seq / "gt").mkdir(parents=True)
    shutil.copy(gt_file, split / seq / "gt" / "gt.txt")
    (split / seq / "seqinfo.ini").write_text(f"[Sequence]\nname={seq}\nseqLength={length}\nimWidth={W}\nimHeight={H}\n")
    (root / "gt" / "seqmaps").mkdir()
    (root / "gt" / "seqmaps" / "MOTS-train.txt").write_text(f"name\n{seq}\n")
    data = root / "trackers" / "MOTS-train" / "masq" / "data"
    data.mkdir(parents=True)
    shutil.copy(tracker_file, data / f"{seq}.txt")
    return {
        "GT_FOLDER": str(root / "gt"), "TRACKERS_FOLDER": str(root / "trackers"), "OUTPUT_FOLDER": str(root / "out"),
        "TRACKERS_TO_EVAL": ["masq"], "CLASSES_TO_EVAL": ["pedestrian"], "SPLIT_TO_EVAL": "train",
        "PRINT_CONFIG": False,
    }


def test_trackeval_reads_it_as_ground_truth_and_as_tracker(tmp_path):
    trackeval = _trackeval()
    (path,) = write(tmp_path / "run", clip_items(), TRACK_CLASSES)
    seq = path.name[: -len(".txt")]
    assert seq == "clip.mp4"
    config = lay_out(tmp_path / "te", seq, path, path, len(CLIP))
    log = io.StringIO()
    with contextlib.redirect_stdout(log), contextlib.redirect_stderr(log):
        dataset = trackeval.datasets.MOTSChallenge(config)
        raw = dataset.get_raw_seq_data("masq", seq)
    assert raw["num_timesteps"] == len(CLIP)
    for t, expected in enumerate(EXPECTED_CLIP):
        for side in ("gt", "tracker"):
            ids = raw[f"{side}_ids"][t].tolist()
            assert sorted(ids) == sorted(expected)
            assert raw[f"{side}_classes"][t].tolist() == [CLASS_IDS[i] for i in ids]
            for track_id, rle in zip(ids, raw[f"{side}_dets"][t]):
                assert np.array_equal(mask_util.decode(rle).astype(bool), expected[track_id])
        assert not mask_util.area(raw["gt_ignore_region"][t])  # no class 10: no ignore region

    evaluator = trackeval.Evaluator({
        "USE_PARALLEL": False, "BREAK_ON_ERROR": True, "PRINT_RESULTS": False, "PRINT_CONFIG": False,
        "TIME_PROGRESS": False, "OUTPUT_SUMMARY": False, "OUTPUT_DETAILED": False, "PLOT_CURVES": False,
        "DISPLAY_LESS_PROGRESS": True,
    })
    metrics = [trackeval.metrics.HOTA(), trackeval.metrics.CLEAR({"PRINT_CONFIG": False}),
               trackeval.metrics.Identity({"PRINT_CONFIG": False})]
    with contextlib.redirect_stdout(log), contextlib.redirect_stderr(log):
        output, _ = evaluator.evaluate([dataset], metrics)
    res = output["MOTSChallenge"]["masq"][seq]["pedestrian"]
    person_dets = sum(1 for exp in EXPECTED_CLIP for t in exp if CLASS_IDS[t] == 2)
    assert person_dets == 6
    assert res["CLEAR"]["CLR_TP"] == person_dets and res["CLEAR"]["CLR_FP"] == 0 and res["CLEAR"]["CLR_FN"] == 0
    assert np.allclose(res["HOTA"]["HOTA"], 1.0)
    assert res["CLEAR"]["IDSW"] == 0 and res["CLEAR"]["MOTA"] == 1.0
    assert res["Identity"]["IDF1"] == 1.0


def test_trackeval_refuses_overlapping_masks(tmp_path):
    """The check the writer must pass is real: the same frame with overlapping masks is refused by TrackEval."""
    trackeval = _trackeval()
    bad = tmp_path / "bad.txt"
    counts = [mask_util.encode(np.asfortranarray(m.astype(np.uint8)))["counts"].decode() for m in (T3[0], T4[0])]
    bad.write_text(f"1 3 2 {H} {W} {counts[0]}\n1 4 2 {H} {W} {counts[1]}\n")
    config = lay_out(tmp_path / "te", "bad", bad, bad, 1)
    with contextlib.redirect_stdout(io.StringIO()), pytest.raises(trackeval.utils.TrackEvalException, match="overlap"):
        trackeval.datasets.MOTSChallenge(config).get_raw_seq_data("masq", "bad")


def test_evaluation_module_reads_it(tmp_path):
    """masqclip's own tracking evaluation (TrackEval per class) reads the folder: the run against itself is perfect
    in every class."""
    tracking = pytest.importorskip("masqclip_cli.evaluation.tracking")
    items, _ = panoptic_items()
    write(tmp_path, clip_items() + items, {**TRACK_CLASSES, "b/pan.mp4": {5: PERSON, 7: CAR}})
    rows = tracking.read_mots(tmp_path / "mots" / "clip.mp4.txt")
    assert [(r.frame, r.track_id, r.class_id) for r in rows][:4] == [(0, 3, 2), (0, 4, 2), (0, 6, 7), (0, 8, 7)]
    files = {"clip": tmp_path / "mots" / "clip.mp4.txt", "pan": tmp_path / "mots" / "b" / "pan.mp4.txt"}
    report = tracking.evaluate_tracking(files, files, classes="per_class")
    assert sorted(report["per_class"]) == [2, 5, 7]
    for numbers in [report, *report["per_class"].values()]:
        assert numbers["HOTA"] == pytest.approx(100.0) and numbers["IDSW"] == 0


def test_bad_input(tmp_path):
    writer = MotsWriter(tmp_path, VOCAB)
    with pytest.raises(ValueError, match="needs panoptic or instance"):
        writer.write_item(frame("v", 0), Segmentation((H, W), vocab=VOCAB))
    rec = writer.write_item(frame("v", 0), instances([(1, CAR, 0.5, T3[0])]))
    with pytest.raises(ValueError, match="would both be written to"):
        writer.finalize([(frame("a/../v", 0), rec), (frame("a/__/v", 0), rec)])
    with pytest.raises(ValueError, match="not a mots record"):
        writer.finalize([(frame("v", 0), {"tracks": []})])
    with pytest.raises(ValueError, match="different sizes"):
        writer.finalize([(frame("v", 0), rec), (ItemInfo("v#1", "v#1", W, H + 2, sequence="v", frame=1), rec)])


def test_registered_with_its_tasks(tmp_path):
    assert WRITERS["mots"] is MotsWriter
    assert missing_tasks("mots", ["semantic"]) == {"mots": ("panoptic", "instance")}
    assert missing_tasks("mots", ["instance"]) == {}
    (writer,) = make_writers("mots", tmp_path, VOCAB)
    assert needed_tasks([writer]) == {"panoptic"}
    assert needed_tasks([writer], ["instance"]) == {"instance"}
