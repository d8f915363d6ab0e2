"""MOTS txt I/O and TrackEval-based tracking metrics: hand-computed HOTA / IDF1 / MOTA / IDSW on tiny cases, and the
synthetic video world's ground truth scored against itself and against corrupted copies."""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path

import numpy as np
import pytest
from pycocotools import mask as mask_util

from masqclip_cli.data.synthetic_video import VideoConfig, generate_videos
from masqclip_cli.evaluation.tracking import (
    MotsObject,
    _version_tuple,
    evaluate_tracking,
    mots_to_id_maps,
    read_mots,
    write_mots,
)

pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")

H, W, T = 16, 24, 4


def _box(y0: int, x0: int, size: int = 5) -> np.ndarray:
    m = np.zeros((H, W), dtype=bool)
    m[y0 : y0 + size, x0 : x0 + size] = True
    return m


A, B, IGNORE_BOX = _box(2, 2), _box(2, 14), _box(10, 10, 6)


def _write(path: Path, frames) -> Path:
    write_mots(path, frames)
    return path


def _tiny(tmp_path: Path, name: str, frames) -> Path:
    """A one-sequence folder ``name/seq.txt``."""
    return _write(tmp_path / name / "seq.txt", frames).parent


@pytest.fixture
def tiny_gt(tmp_path) -> Path:
    """Two tracks (class 2) visible in all 4 frames."""
    return _tiny(tmp_path, "gt", [(t, [2001, 2002], [2, 2], [A, B]) for t in range(T)])


# --- MOTS txt -------------------------------------------------------------------------------------------------------


def test_write_read_round_trip(tmp_path):
    path = tmp_path / "a.txt"
    frames = [(0, [7, 3], [1, 2], [A, B]), (2, [7], [1], np.stack([A]))]
    assert write_mots(path, frames) == 3
    lines = path.read_text().splitlines()
    assert [line.split()[:5] for line in lines] == [
        ["1", "7", "1", str(H), str(W)],
        ["1", "3", "2", str(H), str(W)],
        ["3", "7", "1", str(H), str(W)],
    ]
    # The RLE column is pycocotools' own compressed RLE of the mask.
    decoded = mask_util.decode({"size": [H, W], "counts": lines[1].split()[5].encode()})
    assert np.array_equal(decoded.astype(bool), B)
    rows = read_mots(path)
    assert [(r.frame, r.track_id, r.class_id) for r in rows] == [(0, 7, 1), (0, 3, 2), (2, 7, 1)]
    assert np.array_equal(rows[2].mask, A)
    maps = mots_to_id_maps(rows, 3, H, W)
    assert np.array_equal(maps[0], np.where(A, 7, np.where(B, 3, 0)))
    assert not maps[1].any()
    # RLE dicts are accepted too, and KITTI MOTS numbers frames from 0.
    write_mots(tmp_path / "b.txt", [(0, [5], [2], [rows[1].rle])], first_frame=0)
    assert (tmp_path / "b.txt").read_text().split()[0] == "0"
    assert read_mots(tmp_path / "b.txt", first_frame=0)[0] == MotsObject(0, 5, 2, rows[1].rle)


def test_write_resolves_overlaps_first_come(tmp_path):
    top = _box(2, 2, 6)
    under = _box(4, 4, 6)
    hidden = _box(3, 3, 2)  # inside ``top``: nothing left of it
    path = tmp_path / "o.txt"
    assert write_mots(path, [(0, [1, 2, 3], [2, 2, 2], [top, under, hidden])]) == 2
    rows = read_mots(path)
    assert [r.track_id for r in rows] == [1, 2]
    assert np.array_equal(rows[0].mask, top)
    assert np.array_equal(rows[1].mask, under & ~top)
    with pytest.raises(ValueError, match="overlaps"):
        write_mots(tmp_path / "e.txt", [(0, [1, 2], [2, 2], [top, under])], overlap="error")


@pytest.mark.parametrize(
    "frames, message",
    [
        ([(1, [1], [2], [A]), (1, [2], [2], [B])], "increase"),
        ([(0, [1, 1], [2, 2], [A, B])], "twice"),
        ([(0, [1, 2], [2], [A, B])], "class ids"),
        ([(0, [1], [2], [A, B])], "masks"),
        ([(0, [-1], [2], [A])], "non-negative"),
        ([(0, [1], [2], [A]), (1, [1], [2], [np.zeros((8, 8), bool)])], "earlier ones"),
    ],
)
def test_write_rejects_bad_input(tmp_path, frames, message):
    path = tmp_path / "bad.txt"
    with pytest.raises(ValueError, match=message):
        write_mots(path, frames)
    assert not path.exists()  # atomic: nothing half-written


@pytest.mark.parametrize(
    "line, message",
    [
        ("1 1 2 16 24", "6 fields"),
        ("x 1 2 16 24 abc", "integers"),
        ("0 1 2 16 24 abc", "before the first frame"),
        ("1 1 2 16 24 a b", "6 fields"),
        ("1 1 2 16 24 ab~", "RLE"),
    ],
)
def test_read_rejects_bad_lines(tmp_path, line, message):
    path = tmp_path / "bad.txt"
    path.write_text("\n" + line + "\n")
    with pytest.raises(ValueError, match=rf"bad\.txt:2: .*{message}"):
        read_mots(path)


# --- TrackEval on tiny hand-computed cases ----------------------------------------------------------------------------


def test_perfect_tracking(tiny_gt, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    before = sorted(p.name for p in tmp_path.iterdir())
    r = evaluate_tracking(tiny_gt, tiny_gt)
    for name in ("HOTA", "DetA", "AssA", "IDF1", "MOTA"):
        assert r[name] == pytest.approx(100.0), name
    assert (r["IDSW"], r["CLR_TP"], r["GT_Dets"], r["GT_IDs"], r["sequences"], r["frames"]) == (0, 8, 8, 2, 1, 4)
    assert "TrackEval" in r["protocol"] and "class-agnostic" in r["protocol"]
    assert set(r["per_sequence"]) == {"seq"}
    out = capsys.readouterr()
    assert out.out == "" and out.err == ""  # TrackEval's printing is silenced
    assert sorted(p.name for p in tmp_path.iterdir()) == before  # and it wrote nothing here
    assert "float" not in np.__dict__  # TrackEval 1.3.0 needs no numpy alias shim: numpy is left alone


def test_identity_swap_hand_computed(tiny_gt, tmp_path):
    """Prediction ids swap between the two objects at frame 2. Hand computation (every IoU is 1):
    IDF1: the best id assignment matches 2 of the 4 frames of each track, IDTP = 4, IDFN = IDFP = 4,
    IDF1 = 2*4 / (8 + 8) = 50 %; CLEAR: both objects switch once, IDSW = 2, MOTA = 1 - 2/8 = 75 %;
    HOTA: DetA = 100 %, every match has TPA = 2, FNA = 2, FPA = 2, AssA = 1/3, HOTA = sqrt(1/3)."""
    pred = _tiny(tmp_path, "pred", [(t, [1, 2], [2, 2], [A, B] if t < 2 else [B, A]) for t in range(T)])
    r = evaluate_tracking(tiny_gt, pred)
    assert (r["IDTP"], r["IDFN"], r["IDFP"]) == (4, 4, 4)
    assert r["IDF1"] == pytest.approx(50.0)
    assert r["IDSW"] == 2
    assert r["MOTA"] == pytest.approx(75.0)
    assert r["DetA"] == pytest.approx(100.0)
    assert r["AssA"] == pytest.approx(100.0 / 3)
    assert r["HOTA"] == pytest.approx(100.0 * math.sqrt(1 / 3))


def test_missing_object_hand_computed(tiny_gt, tmp_path):
    """Only object A is predicted: TP = 4, FN = 4, FP = 0, so DetA = 4/8, AssA = 1, HOTA = sqrt(1/2),
    MOTA = 1 - 4/8, IDF1 = 2*4 / (4 + 8)."""
    pred = _tiny(tmp_path, "pred", [(t, [1], [2], [A]) for t in range(T)])
    r = evaluate_tracking(tiny_gt, pred)
    assert r["DetA"] == pytest.approx(50.0)
    assert r["AssA"] == pytest.approx(100.0)
    assert r["HOTA"] == pytest.approx(100.0 * math.sqrt(0.5))
    assert r["MOTA"] == pytest.approx(50.0)
    assert r["IDF1"] == pytest.approx(200.0 / 3)
    assert (r["CLR_FN"], r["CLR_FP"], r["IDSW"]) == (4, 0, 0)


def test_ignore_regions(tmp_path):
    """A prediction inside a ground-truth ignore region (class 10) is not a false positive when class 10 is declared
    an ignore class; when it is not, it is one (class 10 left out of the evaluated classes)."""
    gt = _tiny(tmp_path, "gt", [(t, [2001, 10000], [2, 10], [A, IGNORE_BOX]) for t in range(T)])
    pred = _tiny(tmp_path, "pred", [(t, [1, 2], [2, 2], [A, _box(11, 11, 4)]) for t in range(T)])
    r = evaluate_tracking(gt, pred, ignore_class_ids=(10,))
    assert (r["HOTA"], r["CLR_FP"], r["GT_Dets"]) == (pytest.approx(100.0), 0, 4)
    r = evaluate_tracking(gt, pred, class_ids=(2,))
    assert (r["CLR_FP"], r["GT_Dets"]) == (4, 4)
    assert r["DetA"] == pytest.approx(50.0)


def test_per_class_mode(tmp_path):
    """Object B is predicted with the wrong class: class-agnostic scoring does not see it; per class, B is a miss in
    class 2 and a false positive in class 3: TP = 4, FN = 4, FP = 4, DetA = 4 / 12."""
    gt = _tiny(tmp_path, "gt", [(t, [2001, 2002], [2, 2], [A, B]) for t in range(T)])
    pred = _tiny(tmp_path, "pred", [(t, [1, 2], [2, 3], [A, B]) for t in range(T)])
    assert evaluate_tracking(gt, pred)["DetA"] == pytest.approx(100.0)
    r = evaluate_tracking(gt, pred, classes="per_class")
    assert r["DetA"] == pytest.approx(100.0 / 3)
    assert (r["CLR_TP"], r["CLR_FN"], r["CLR_FP"]) == (4, 4, 4)
    assert set(r["per_class"]) == {2, 3}
    assert r["per_class"][2]["DetA"] == pytest.approx(50.0)  # TP 4, FN 4
    assert r["per_class"][3]["DetA"] == pytest.approx(0.0)  # FP 4
    assert r["class_averaged"]["DetA"] == pytest.approx(25.0)
    assert "per class" in r["protocol"]


def test_mots_challenge_layout_and_lengths(tmp_path, tiny_gt):
    """<seq>/gt/gt.txt + seqinfo.ini (MOTS Challenge) gives the same numbers; a frame past seqLength is an error."""
    pred = _tiny(tmp_path, "pred", [(t, [1], [2], [A]) for t in range(T)])
    root = tmp_path / "mots"
    (root / "seq" / "gt").mkdir(parents=True)
    (root / "seq" / "gt" / "gt.txt").write_bytes((tiny_gt / "seq.txt").read_bytes())
    (root / "seq" / "seqinfo.ini").write_text("[Sequence]\nname=seq\nseqLength=10\n")
    flat, layered = evaluate_tracking(tiny_gt, pred), evaluate_tracking(root, pred)
    assert layered["frames"] == 10 and flat["frames"] == T
    assert {k: layered[k] for k in ("HOTA", "IDF1", "MOTA")} == {k: flat[k] for k in ("HOTA", "IDF1", "MOTA")}
    with pytest.raises(ValueError, match="past the sequence's 3 frames"):
        evaluate_tracking(tiny_gt, pred, seq_lengths={"seq": 3})


def test_prediction_files_named_after_the_video(tmp_path, tiny_gt):
    """The ``mots`` writer names a video's file ``<video>.txt`` (``seq.mp4.txt``): it is matched to sequence ``seq``."""
    pred = tmp_path / "pred"
    _write(pred / "seq.mp4.txt", [(t, [1], [2], [A]) for t in range(T)])
    assert evaluate_tracking(tiny_gt, pred)["DetA"] == pytest.approx(50.0)
    _write(pred / "seq.avi.txt", [(t, [1], [2], [A]) for t in range(T)])
    with pytest.raises(ValueError, match="several prediction files for sequence seq"):
        evaluate_tracking(tiny_gt, pred)
    _write(pred / "seq.txt", [(t, [1, 2], [2, 2], [A, B]) for t in range(T)])  # the exact name wins
    assert evaluate_tracking(tiny_gt, pred)["DetA"] == pytest.approx(100.0)


def test_bad_evaluation_input(tmp_path, tiny_gt):
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ValueError, match="no prediction file for 1"):
        evaluate_tracking(tiny_gt, empty)
    overlapping = tmp_path / "overlap" / "seq.txt"
    overlapping.parent.mkdir()
    lines = (tiny_gt / "seq.txt").read_text().splitlines()
    first = lines[0].split()
    overlapping.write_text("\n".join([lines[0], " ".join([first[0], "99", *first[2:]])]) + "\n")
    with pytest.raises(ValueError, match="overlap"):
        evaluate_tracking(tiny_gt, overlapping.parent)
    with pytest.raises(ValueError, match="classes must be"):
        evaluate_tracking(tiny_gt, tiny_gt, classes="mean")


def test_version_tuple():
    assert _version_tuple("1.3.0") == (1, 3, 0) and _version_tuple("1.0.dev1") == (1, 0)
    assert _version_tuple("2.4.6") >= (1, 24) and _version_tuple("unknown") < (1, 3)


# --- the synthetic video world ----------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def synth(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("synth")
    generate_videos(VideoConfig(seed=2, num_videos=2, frames=16, size=(64, 96)), root)
    return root


def _rows_by_frame(rows: list[MotsObject]) -> dict[int, list[MotsObject]]:
    out: dict[int, list[MotsObject]] = {}
    for r in rows:
        out.setdefault(r.frame, []).append(r)
    return out


def _rewrite(rows: list[MotsObject], path: Path, relabel=lambda frame, track_id: track_id, keep=lambda r: True):
    frames = [
        (
            f,
            [relabel(f, r.track_id) for r in rs if keep(r)],
            [r.class_id for r in rs if keep(r)],
            [r.rle for r in rs if keep(r)],
        )
        for f, rs in sorted(_rows_by_frame(rows).items())
    ]
    write_mots(path, frames)


def test_synthetic_gt_against_itself(synth):
    for mode in ("agnostic", "per_class"):
        r = evaluate_tracking(synth, synth / "gt", classes=mode)
        assert (r["HOTA"], r["IDF1"], r["MOTA"], r["IDSW"]) == (100.0, 100.0, 100.0, 0), mode
        assert r["sequences"] == 2 and r["frames"] == 32


def test_synthetic_identity_swap_and_missing_track(synth, tmp_path):
    rows = read_mots(synth / "gt" / "000000.txt")
    counts: dict[int, list[int]] = {}
    for r in rows:
        counts.setdefault(r.track_id, []).append(r.frame)
    # Two tracks visible together in some frame s and later: their ids swap from frame s on.
    (a, fa), (b, fb) = sorted(counts.items(), key=lambda kv: -len(kv[1]))[:2]
    common = sorted(set(fa) & set(fb))
    assert common, "the two longest tracks never overlap in time"
    s = common[len(common) // 2]
    swap = {a: b, b: a}
    pred = tmp_path / "swap"
    _rewrite(rows, pred / "000000.txt", relabel=lambda f, t: swap.get(t, t) if f >= s else t)
    (pred / "000001.txt").write_bytes((synth / "gt" / "000001.txt").read_bytes())
    r = evaluate_tracking(synth, pred)
    assert r["IDSW"] >= 1 and r["IDF1"] < 100.0
    # Hand computation: every mask is exact, so the best id assignment keeps either the frames before s of both
    # tracks or the frames from s on; every other track is fully right.
    before = sum(f < s for f in fa) + sum(f < s for f in fb)
    after = len(fa) + len(fb) - before
    n = len(rows) + len(read_mots(synth / "gt" / "000001.txt"))
    assert r["IDTP"] == n - len(fa) - len(fb) + max(before, after)
    assert r["IDF1"] == pytest.approx(100.0 * r["IDTP"] / n)

    # A track left out: DetA = (N - n_k) / N exactly (every other mask matches with IoU 1), association unharmed.
    missing = tmp_path / "missing"
    _rewrite(rows, missing / "000000.txt", keep=lambda row: row.track_id != a)
    (missing / "000001.txt").write_bytes((synth / "gt" / "000001.txt").read_bytes())
    r = evaluate_tracking(synth, missing)
    assert r["DetA"] == pytest.approx(100.0 * (n - len(fa)) / n)
    assert r["AssA"] == pytest.approx(100.0)
    assert r["CLR_FN"] == len(fa) and r["IDSW"] == 0


def test_synthetic_frames_past_the_video_are_an_error(synth, tmp_path):
    rows = read_mots(synth / "gt" / "000000.txt")
    late = [dataclasses.replace(rows[0], frame=16)]
    pred = tmp_path / "late"
    _rewrite(rows + late, pred / "000000.txt")
    (pred / "000001.txt").write_bytes((synth / "gt" / "000001.txt").read_bytes())
    with pytest.raises(ValueError, match="past the sequence's 16 frames"):
        evaluate_tracking(synth, pred)
