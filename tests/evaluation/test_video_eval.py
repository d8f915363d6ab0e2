"""Tracking evaluation of `segment --format mots` runs and of a model on the synthetic videos: the ground truth as a
perfect run (HOTA 100, per class too, with the run's own class numbering), per-frame ids joined into one file per video
(ID switches counted by hand from the ground truth), frames placed at their true index, bad run folders refused, and
the demo model end to end in each mode."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from masqclip_cli.data.synthetic_video import VideoConfig, generate_videos
from masqclip_cli.evaluation.tracking import TRACKING_METRICS, read_mots, write_mots
from masqclip_cli.evaluation.video import TRACK_MODES, evaluate_video_model, evaluate_video_run, mode_of_fingerprint
from masqclip_cli.inference.tracking import TrackerConfig
from masqclip_cli.vocab import Vocabulary, load_vocabulary

pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    """2 videos x 8 frames (every video has a track that enters and one that leaves)."""
    root = tmp_path_factory.mktemp("videos")
    generate_videos(VideoConfig(seed=5, num_videos=2, frames=8), root)
    return root


def _manifest(root: Path) -> dict:
    return json.loads((root / "videos.json").read_text())


def _fingerprint(vocab: Vocabulary, tracker: TrackerConfig | None) -> dict:
    """The parts of a run fingerprint the evaluation reads (the rest of a real one is carried along)."""
    out = {"model": "test", "vocabulary": vocab.to_json(), "short_side": 128}
    if tracker is not None:
        out["tracking"] = {"sequence": False, "tracker": tracker.to_json()}
    return out


def _write_run_json(run: Path, fingerprint: dict) -> None:
    (run / ".masqclip").mkdir(parents=True, exist_ok=True)
    (run / ".masqclip" / "run.json").write_text(json.dumps(fingerprint))


def _gt_frames(root: Path, entry: dict) -> dict[int, list]:
    """Frame index -> the ground-truth rows of the frame (MotsObject, in file order)."""
    frames: dict[int, list] = {}
    for obj in read_mots(root / entry["gt"]):
        frames.setdefault(obj.frame, []).append(obj)
    return frames


def _gt_lines(root: Path) -> int:
    return sum(len((root / e["gt"]).read_text().splitlines()) for e in _manifest(root)["videos"])


# --- a perfect run ----------------------------------------------------------------------------------------------------


def test_ground_truth_as_one_run_scores_100(dataset, tmp_path):
    run = tmp_path / "run"
    for entry in _manifest(dataset)["videos"]:
        target = run / "mots" / f"{Path(entry['video']).name}.txt"  # as the mots writer names a video's file
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes((dataset / entry["gt"]).read_bytes())
    report = evaluate_video_run(dataset, run)
    for metric in ("HOTA", "DetA", "AssA", "IDF1", "MOTA"):
        assert report[metric] == pytest.approx(100.0), metric
    assert report["IDSW"] == 0
    assert report["Dets"] == report["GT_Dets"] == _gt_lines(dataset)
    gt_tracks = [t for e in _manifest(dataset)["videos"] for t in e["tracks"]]
    assert report["GT_IDs"] == report["IDs"] == len(gt_tracks)
    # Per class: every class with a track is perfect, and only those classes are listed.
    assert {n["class_id"] for n in report["per_class"].values()} == {t["category_id"] for t in gt_tracks}
    assert all(n["HOTA"] == pytest.approx(100.0) for n in report["per_class"].values())
    assert report["class_mean"]["HOTA"] == pytest.approx(100.0)
    protocol = report["protocol"]
    assert protocol["mode"] == "tracked (unknown tracker)"  # no run.json to say which tracker
    assert protocol["dataset"]["config"]["seed"] == 5 and protocol["dataset"]["frames"] == 16
    assert "lossy" in protocol["input"] and "class-agnostic" in protocol["classes"]
    assert protocol["trackeval"]["version"] not in ("", None)


def test_one_run_per_video_classes_matched_by_name(dataset, tmp_path):
    """Two run folders, one video each, whose vocabulary numbers the classes in reverse order: the class column is
    the run's ids, mapped back by name, so the per-class numbers stay perfect."""
    vocab = load_vocabulary(str(dataset / "vocab.txt"))
    reversed_vocab = Vocabulary(list(vocab)[::-1], source="reversed")
    run_id = {name: cid for name, cid in zip(reversed_vocab.names, reversed_vocab.category_ids())}
    dataset_id = {c["name"]: c["id"] for c in _manifest(dataset)["categories"]}
    to_run = {dataset_id[name]: run_id[name] for name in dataset_id}
    assert any(a != b for a, b in to_run.items())
    tracker = TrackerConfig(max_gap=3)
    runs = tmp_path / "runs"
    for folder, entry in zip(("b", "a"), _manifest(dataset)["videos"]):  # folder names do not matter
        run = runs / folder
        frames = _gt_frames(dataset, entry)
        write_mots(run / "mots" / f"{Path(entry['video']).name}.txt",
                   [(f, [o.track_id for o in objs], [to_run[o.class_id] for o in objs], [o.rle for o in objs])
                    for f, objs in sorted(frames.items())])
        _write_run_json(run, _fingerprint(reversed_vocab, tracker))
    report = evaluate_video_run(dataset, runs)
    assert report["HOTA"] == pytest.approx(100.0)
    assert report["per_class"] and all(n["HOTA"] == pytest.approx(100.0) for n in report["per_class"].values())
    assert report["protocol"]["mode"] == "iou+embedding"
    assert report["protocol"]["tracker"] == tracker.to_json()
    assert report["protocol"]["runs"] == 2
    assert report["protocol"]["run"]["model"] == "test"


# --- per-frame ids (no tracking) --------------------------------------------------------------------------------------


def _frame_mode_run(dataset: Path, run: Path) -> int:
    """A run without tracking built from the ground truth: one one-frame file per frame (``<video>#<frame>.txt``,
    frame 1), each frame's objects numbered 1, 2, ... by track id (as segment ids restart in every frame). Returns
    the ID switches this must give, counted from the ground truth: a track's id in a frame differs from its id in the
    last frame it was seen."""
    vocab = load_vocabulary(str(dataset / "vocab.txt"))
    _write_run_json(run, _fingerprint(vocab, None))
    switches = 0
    for entry in _manifest(dataset)["videos"]:
        frames = _gt_frames(dataset, entry)
        last_id: dict[int, int] = {}
        for frame in range(entry["num_frames"]):
            objs = sorted(frames.get(frame, []), key=lambda o: o.track_id)
            ids = list(range(1, len(objs) + 1))
            for obj, new in zip(objs, ids):
                switches += obj.track_id in last_id and last_id[obj.track_id] != new
                last_id[obj.track_id] = new
            name = f"{Path(entry['video']).name}#{frame:06d}"
            write_mots(run / "mots" / f"{name}.txt",
                       [(0, ids, [o.class_id for o in objs], [o.rle for o in objs])] if objs else [])
    return switches


def test_frame_mode_joins_per_frame_ids(dataset, tmp_path):
    expected_switches = _frame_mode_run(dataset, tmp_path / "frame")
    assert expected_switches > 0  # the dataset has tracks entering and leaving: the per-frame numbering shifts
    frame = evaluate_video_run(dataset, tmp_path / "frame")
    # The same masks as the ground truth: detection is perfect, only association suffers.
    assert frame["DetA"] == pytest.approx(100.0)
    assert frame["Dets"] == frame["GT_Dets"] == _gt_lines(dataset)
    assert frame["IDSW"] == expected_switches
    assert frame["MOTA"] == pytest.approx(100.0 * (1 - expected_switches / frame["GT_Dets"]))
    assert frame["AssA"] < 100.0 and frame["HOTA"] < 100.0 and frame["IDF1"] < 100.0
    assert frame["protocol"]["mode"] == "frame" and frame["protocol"]["tracker"] is None
    assert "each frame's own panoptic segment ids" in frame["protocol"]["frame_ids"]
    assert frame["protocol"]["frames_run"] == 16
    # The tracked run over the same masks (the ground truth's ids) associates perfectly.
    tracked = tmp_path / "tracked"
    for entry in _manifest(dataset)["videos"]:
        (tracked / "mots").mkdir(parents=True, exist_ok=True)
        (tracked / "mots" / f"{Path(entry['video']).name}.txt").write_bytes((dataset / entry["gt"]).read_bytes())
    _write_run_json(tracked, _fingerprint(load_vocabulary(str(dataset / "vocab.txt")), TrackerConfig()))
    tracked_assa = evaluate_video_run(dataset, tracked)["AssA"]
    assert tracked_assa == pytest.approx(100.0) and tracked_assa > frame["AssA"]


def test_tracked_frames_go_to_their_true_index(dataset, tmp_path):
    """A tracked run over every other frame (``--every 2``): its file numbers the sampled frames 1, 2, ...; the item
    records say which video frame each is, and the unsampled frames count as misses."""
    entries = _manifest(dataset)["videos"]
    run = tmp_path / "every2"
    vocab = load_vocabulary(str(dataset / "vocab.txt"))
    _write_run_json(run, _fingerprint(vocab, TrackerConfig()))
    expected_tp = expected_fn = 0
    for i, entry in enumerate(entries):
        video = Path(entry["video"]).name
        frames = _gt_frames(dataset, entry)
        step = 2 if i == 0 else 1
        sampled = list(range(0, entry["num_frames"], step))
        write_mots(run / "mots" / f"{video}.txt",
                   [(p, [o.track_id for o in frames[f]], [o.class_id for o in frames[f]], [o.rle for o in frames[f]])
                    for p, f in enumerate(sampled) if frames.get(f)])
        for p, f in enumerate(sampled):
            record = {"id": f"{video}#{f:06d}", "sequence": video, "frame": p, "writers": {}}
            path = run / ".masqclip" / "items" / f"{video}#{f:06d}.json"
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(json.dumps(record))
        expected_tp += sum(len(frames.get(f, [])) for f in sampled)
        expected_fn += sum(len(objs) for f, objs in frames.items() if f not in sampled)
    assert expected_fn > 0
    report = evaluate_video_run(dataset, run, per_class=False)
    assert (report["CLR_TP"], report["CLR_FN"], report["CLR_FP"]) == (expected_tp, expected_fn, 0)
    assert report["DetPr"] == pytest.approx(100.0)
    assert report["protocol"]["frames_run"] == 4 + 8
    assert "per_class" not in report


# --- bad run folders --------------------------------------------------------------------------------------------------


def test_bad_runs_are_refused(dataset, tmp_path):
    entries = _manifest(dataset)["videos"]
    first = Path(entries[0]["video"]).name
    run = tmp_path / "one"
    (run / "mots").mkdir(parents=True)
    (run / "mots" / f"{first}.txt").write_bytes((dataset / entries[0]["gt"]).read_bytes())
    with pytest.raises(ValueError, match=r"no mots prediction for 1 video\(s\) of the dataset: 000001"):
        evaluate_video_run(dataset, run)
    (run / "mots" / f"{first}#000000.txt").write_text("")
    with pytest.raises(ValueError, match="both a tracked file and per-frame files for video 000000"):
        evaluate_video_run(dataset, run)
    with pytest.raises(ValueError, match="no mots/ folder"):
        evaluate_video_run(dataset, tmp_path / "one" / "mots")
    with pytest.raises(ValueError, match="videos.json: cannot read"):
        evaluate_video_run(tmp_path, run)
    # a run of mode "frame" (no tracking in its fingerprint) with tracked files
    frame_run = tmp_path / "frame-run"
    for entry in entries:
        (frame_run / "mots").mkdir(parents=True, exist_ok=True)
        (frame_run / "mots" / f"{Path(entry['video']).name}.txt").write_bytes((dataset / entry["gt"]).read_bytes())
    _write_run_json(frame_run, _fingerprint(load_vocabulary(str(dataset / "vocab.txt")), None))
    with pytest.raises(ValueError, match="tracked mots files in runs of mode 'frame'"):
        evaluate_video_run(dataset, frame_run)
    # two runs of different modes
    mixed = tmp_path / "mixed"
    for entry, tracker in zip(entries, (TrackerConfig(), TrackerConfig(use_embeddings=False))):
        folder = mixed / entry["name"]
        (folder / "mots").mkdir(parents=True)
        (folder / "mots" / f"{Path(entry['video']).name}.txt").write_bytes((dataset / entry["gt"]).read_bytes())
        _write_run_json(folder, _fingerprint(load_vocabulary(str(dataset / "vocab.txt")), tracker))
    with pytest.raises(ValueError, match=r"different modes \(iou, iou\+embedding\)"):
        evaluate_video_run(dataset, mixed)


def test_mode_of_fingerprint():
    assert mode_of_fingerprint({}) == "frame"
    assert mode_of_fingerprint({"tracking": {"tracker": TrackerConfig().to_json()}}) == "iou+embedding"
    assert mode_of_fingerprint({"tracking": {"tracker": TrackerConfig(use_embeddings=False).to_json()}}) == "iou"
    with pytest.raises(ValueError, match="tracker.use_embeddings"):
        mode_of_fingerprint({"tracking": {}})


# --- a model, end to end ----------------------------------------------------------------------------------------------


def test_demo_model_in_each_mode(tmp_path):
    from masqclip_cli.modeling.factory import load_model

    root = tmp_path / "data"
    generate_videos(VideoConfig(seed=9, num_videos=1, frames=6), root)
    model = load_model("demo")
    with pytest.raises(ValueError, match="mode must be one of frame, iou, iou\\+embedding"):
        evaluate_video_model(root, model, None, "sort", tmp_path / "bad")
    reports = {}
    for mode in TRACK_MODES:
        work = tmp_path / mode
        report = evaluate_video_model(root, model, None, mode, work, model_id="demo-test", batch_size=2,
                                      tracker_config=TrackerConfig(max_gap=2))
        reports[mode] = report
        for metric in TRACKING_METRICS:
            assert math.isfinite(report[metric]), (mode, metric)
        assert 0.0 <= report["HOTA"] <= 100.0
        assert report["GT_Dets"] == _gt_lines(root)
        protocol = report["protocol"]
        assert protocol["mode"] == mode and protocol["run"]["model"] == "demo-test"
        assert protocol["frames_run"] == 6 and protocol["dataset"]["config"]["seed"] == 9
        fingerprint = json.loads((work / "000000" / ".masqclip" / "run.json").read_text())
        if mode == "frame":
            assert protocol["tracker"] is None and "tracking" not in fingerprint
            assert sorted(p.name for p in (work / "000000" / "mots").iterdir()) == [
                f"000000.mp4#{k:06d}.txt" for k in range(6)
            ]
        else:
            assert protocol["tracker"]["use_embeddings"] == (mode == "iou+embedding")
            assert protocol["tracker"]["max_gap"] == 2
            assert fingerprint["tracking"]["tracker"] == protocol["tracker"]
        timing = report["timing"]
        assert timing["frames_computed"] == 6 and timing["frames_reused"] == 0
        assert timing["seconds_per_frame"] > 0 and timing["batch_size"] == 2
    # One model pass per frame whatever the mode: the three runs score the same detections.
    assert len({r["Dets"] for r in reports.values()}) == 1
    # A second call resumes the finished runs: nothing is computed again, the numbers are the same.
    again = evaluate_video_model(root, model, None, "iou", tmp_path / "iou", model_id="demo-test", batch_size=2,
                                 tracker_config=TrackerConfig(max_gap=2))
    assert again["timing"]["frames_computed"] == 0 and again["timing"]["frames_reused"] == 6
    assert again["timing"]["seconds_per_frame"] is None
    assert {k: again[k] for k in TRACKING_METRICS} == {k: reports["iou"][k] for k in TRACKING_METRICS}


def test_cli_synth_video_and_eval_tracking(tmp_path):
    from typer.testing import CliRunner

    from masqclip_cli.cli import app

    cli = CliRunner()
    root, work = tmp_path / "vid", tmp_path / "work"
    assert cli.invoke(app, ["synth", "--video", "--out", str(root), "--images", "1", "--frames", "6"]).exit_code == 0
    assert sorted(p.name for p in (root / "videos").iterdir()) == ["000000.mp4"]
    model_run = cli.invoke(app, ["eval", "--dataset", "synthetic-video", "--root", str(root), "--model", "demo",
                                 "--work", str(work), "--report", str(tmp_path / "r.json")])
    assert model_run.exit_code == 0, model_run.output
    report = json.loads((tmp_path / "r.json").read_text())
    assert report["protocol"]["mode"] == "iou+embedding" and 0 <= report["HOTA"] <= 100
    # the same runs scored from their files, and the same files as plain MOTS ground truth + predictions
    again = cli.invoke(app, ["eval", "--dataset", "synthetic-video", "--root", str(root), "--predictions", str(work),
                             "--report", str(tmp_path / "r2.json")])
    assert again.exit_code == 0, again.output
    assert json.loads((tmp_path / "r2.json").read_text())["HOTA"] == report["HOTA"]
    mots = cli.invoke(app, ["eval", "--dataset", "mots", "--root", str(root / "gt"), "--predictions",
                            str(work / "000000"), "--report", str(tmp_path / "r3.json")])
    assert mots.exit_code == 0, mots.output
    assert json.loads((tmp_path / "r3.json").read_text())["IDSW"] == report["IDSW"]
    missing = cli.invoke(app, ["eval", "--dataset", "mots", "--predictions", str(work)])
    assert missing.exit_code == 2 and "--root" in missing.stderr
