"""Tracking in `masqclip segment` over a video: stable ids across frames (the same object keeps its id, panoptic
segment ids are track ids, one class per track), frame-by-frame ids with --no-track, --sequence over images, and a
run killed with SIGKILL mid-video resuming to byte-identical outputs."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from masqclip_cli.cli import app

av = pytest.importorskip("av")
pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")  # pycocotools
runner = CliRunner()
SAMPLES = Path(__file__).resolve().parents[2] / "samples"
FRAMES = 16


def _tree(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file() and ".masqclip" not in p.parts}


@pytest.fixture(scope="module")
def clip(tmp_path_factory) -> Path:
    """A 16-frame video: a sample scene sliding right by 3 px per frame (lossless-ish mpeg4 at high quality)."""
    path = tmp_path_factory.mktemp("video") / "clip.mp4"
    scene = np.asarray(Image.open(SAMPLES / "images" / "scene-000000.png").convert("RGB"))
    container = av.open(str(path), "w")
    stream = container.add_stream("mpeg4", rate=10)
    stream.width, stream.height, stream.pix_fmt = scene.shape[1], scene.shape[0], "yuv420p"
    stream.options = {"qscale": "1"}
    for t in range(FRAMES):
        for packet in stream.encode(av.VideoFrame.from_ndarray(np.roll(scene, 3 * t, axis=1), format="rgb24")):
            container.mux(packet)
    for packet in stream.encode():
        container.mux(packet)
    container.close()
    return path


ARGS = ["--model", "demo", "--vocab", str(SAMPLES / "vocab.txt"), "--task", "panoptic,instance",
        "--format", "panoptic,coco", "--one-label-per-mask", "--min-score", "0.05", "--threads", "1"]


def _segment(source: Path, out: Path, *extra: str):
    return runner.invoke(app, ["segment", str(source), *ARGS, *extra, "--out", str(out)])


@pytest.fixture(scope="module")
def tracked(clip, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("tracked") / "out"
    result = _segment(clip, out)
    assert result.exit_code == 0, result.output
    return out


def _segments_by_frame(out: Path) -> list[dict[int, int]]:
    data = json.loads((out / "panoptic.json").read_text())
    return [{s["id"]: s["category_id"] for s in ann["segments_info"]} for ann in data["annotations"]]


def test_ids_are_stable_across_frames_and_one_class_per_track(tracked):
    frames = _segments_by_frame(tracked)
    assert len(frames) == FRAMES
    # the scene only slides: most objects are found in most frames under one id
    counts: dict[int, int] = {}
    for frame in frames:
        for sid in frame:
            counts[sid] = counts.get(sid, 0) + 1
    # (the demo model finds a shape in some frames and not others: ids come back after such gaps)
    assert len([sid for sid, n in counts.items() if n >= FRAMES // 2]) >= 3
    assert len(counts) <= max(len(f) for f in frames) + 3  # not a new id per frame
    assert sum(counts.values()) >= 3 * len(counts)
    # one class per track id in every frame (the decided class)
    classes: dict[int, set[int]] = {}
    for frame in frames:
        for sid, cat in frame.items():
            classes.setdefault(sid, set()).add(cat)
    assert all(len(c) == 1 for c in classes.values())
    # the PNG ids are the JSON ids
    png = np.asarray(Image.open(tracked / "panoptic" / "clip.mp4#000005.png").convert("RGB")).astype(np.int64)
    ids = png[..., 0] + 256 * png[..., 1] + 65536 * png[..., 2]
    assert set(np.unique(ids).tolist()) - {0} == set(frames[5])
    # COCO instances of a frame carry no id, but the run fingerprint records the tracking
    fingerprint = json.loads((tracked / ".masqclip" / "run.json").read_text())
    assert fingerprint["tracking"]["tracker"]["max_gap"] == 5
    # each frame's record keeps the tracker's state after that frame (what a resumed run restarts from)
    for t in (0, FRAMES - 1):
        record = json.loads((tracked / ".masqclip" / "items" / f"clip.mp4#{t:06d}.json").read_text())
        assert record["tracker"]["last_frame"] == t and (record["sequence"], record["frame"]) == ("clip.mp4", t)


def test_no_track_gives_frame_by_frame_ids(clip, tracked, tmp_path):
    result = _segment(clip, tmp_path / "plain", "--no-track")
    assert result.exit_code == 0, result.output
    plain = _segments_by_frame(tmp_path / "plain")
    # per-frame panoptic ids restart in every frame: small ids only, and no tracker state
    assert all(max(frame, default=0) <= len(frame) for frame in plain)
    record = json.loads((tmp_path / "plain" / ".masqclip" / "items" / "clip.mp4#000003.json").read_text())
    assert "tracker" not in record and "sequence" not in record
    assert "tracking" not in json.loads((tmp_path / "plain" / ".masqclip" / "run.json").read_text())
    # the same pixels were segmented: the union of segments per frame covers the same area
    tracked_frames = json.loads((tracked / "panoptic.json").read_text())["annotations"]
    plain_frames = json.loads((tmp_path / "plain" / "panoptic.json").read_text())["annotations"]
    for a, b in zip(tracked_frames, plain_frames):
        assert sum(s["area"] for s in a["segments_info"]) == sum(s["area"] for s in b["segments_info"])


def test_sequence_over_images(tmp_path):
    folder = tmp_path / "seq"
    folder.mkdir()
    scene = np.asarray(Image.open(SAMPLES / "images" / "scene-000001.png").convert("RGB"))
    for t in range(4):
        Image.fromarray(np.roll(scene, 2 * t, axis=0)).save(folder / f"f{t:02d}.png")
    assert _segment(folder, tmp_path / "o", "--sequence").exit_code == 0
    frames = _segments_by_frame(tmp_path / "o")
    shared = set(frames[0]) & set(frames[1]) & set(frames[2]) & set(frames[3])
    assert len(shared) >= 2  # objects keep their ids through the sequence
    record = json.loads((tmp_path / "o" / ".masqclip" / "items" / "f03.png.json").read_text())
    assert (record["sequence"], record["frame"], record["tracker"]["last_frame"]) == ("seq", 3, 3)


def test_killed_mid_video_resumes_to_identical_outputs(clip, tracked, tmp_path):
    out = tmp_path / "killed"
    cmd = [sys.executable, "-m", "masqclip_cli", "segment", str(clip), *ARGS, "--out", str(out)]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    items = out / ".masqclip" / "items"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and proc.poll() is None:
        if items.is_dir() and len(list(items.glob("*.json"))) >= 6:
            break
        time.sleep(0.02)
    assert proc.poll() is None, "the run finished before it could be killed"
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    done_before = len(list(items.glob("*.json")))
    assert 6 <= done_before < FRAMES
    resumed = _segment(clip, out)
    assert resumed.exit_code == 0, resumed.output
    assert "already done (resumed)" in resumed.stderr
    assert _tree(out) == _tree(tracked)


def test_vis_and_mots_of_a_tracked_video_load_in_their_readers(clip, tmp_path):
    from pycocotools import mask as mask_util

    from masqclip_cli.evaluation.tracking import evaluate_tracking, read_mots

    result = _segment(clip, tmp_path / "v", "--format", "vis,mots,panoptic")
    assert result.exit_code == 0, result.output
    vis = json.loads((tmp_path / "v" / "vis.json").read_text())
    assert [v["length"] for v in vis["videos"]] == [FRAMES]
    assert len(vis["annotations"]) >= 3
    for ann in vis["annotations"]:
        assert len(ann["segmentations"]) == FRAMES
        for t, rle in enumerate(ann["segmentations"]):
            if rle is not None:  # the track's mask in frame t is non-empty and its area is the recorded one
                assert int(mask_util.decode(rle).sum()) == ann["areas"][t] > 0
    objects = read_mots(tmp_path / "v" / "mots" / "clip.mp4.txt")
    assert {o.frame for o in objects} <= set(range(FRAMES))
    # TrackEval reads it as ground truth and as tracker output: against itself, perfect
    metrics = evaluate_tracking({"clip": tmp_path / "v" / "mots" / "clip.mp4.txt"},
                                {"clip": tmp_path / "v" / "mots" / "clip.mp4.txt"}, seq_lengths={"clip": FRAMES})
    assert metrics["HOTA"] == pytest.approx(100) and metrics["IDSW"] == 0


def test_a_video_stays_in_one_shard_and_shards_merge_to_the_single_run(clip, tracked, tmp_path):
    shard_dirs = []
    for i in range(2):
        result = _segment(clip, tmp_path / f"s{i}", "--shard", f"{i}/2")
        assert result.exit_code in (0, 2), result.output
        shard_dirs.append(tmp_path / f"s{i}")
    counts = [len(list((d / ".masqclip" / "items").glob("*.json"))) if (d / ".masqclip" / "items").is_dir() else 0
              for d in shard_dirs]
    assert sorted(counts) == [0, FRAMES]  # all frames of the video in one shard
    merged = runner.invoke(app, ["merge", *map(str, shard_dirs), "--out", str(tmp_path / "merged")])
    assert merged.exit_code == 0, merged.output
    assert _tree(tmp_path / "merged") == _tree(tracked)


def test_overlay_video_and_cvat_tracks_of_a_run_load_in_pyav_and_datumaro(clip, tmp_path):
    datumaro = pytest.importorskip("datumaro")
    args = [a for a in ARGS if a not in ("--one-label-per-mask",)]
    args[args.index("--task") + 1] = "panoptic"  # the CVAT tracks are then the panoptic thing and stuff segments
    args[args.index("--format") + 1] = "overlay,cvat,panoptic"
    result = runner.invoke(app, ["segment", str(clip), *args, "--option", "cvat_shapes=polygon", "--out",
                                 str(tmp_path / "o")])
    assert result.exit_code == 0, result.output
    with av.open(str(tmp_path / "o" / "overlay" / "clip.mp4.mp4")) as container:
        frames = [f.to_ndarray(format="rgb24") for f in container.decode(video=0)]
    assert len(frames) == FRAMES and frames[0].shape == (256, 256, 3)
    dataset = datumaro.Dataset.import_from(str(tmp_path / "o" / "cvat" / "clip.mp4"), "cvat")
    assert len(dataset) == FRAMES
    # every CVAT track is one of the run's panoptic track ids, present in the frames where the panoptic output has it
    panoptic = _segments_by_frame(tmp_path / "o")
    names = {c["id"]: c["name"] for c in json.loads((tmp_path / "o" / "panoptic.json").read_text())["categories"]}
    labels = dataset.categories()[datumaro.AnnotationType.label]
    seen: dict[int, set[int]] = {}
    for item in dataset:
        frame = int(item.attributes.get("frame", item.id.split("_")[-1]))
        for ann in item.annotations:
            if ann.attributes.get("outside"):  # the keyframe that ends a run of a track: not a shape in the frame
                continue
            seen.setdefault(int(ann.group), set()).add(frame)
            track = int(ann.group)
            assert track in panoptic[frame] and labels[ann.label].name == names[panoptic[frame][track]]
    assert seen
    for tid, frames_of in seen.items():
        assert frames_of == {f for f in range(FRAMES) if tid in panoptic[f]}


def test_export_of_a_tracked_run_is_refused_in_one_line(tracked, tmp_path):
    result = runner.invoke(app, ["export", str(tracked), "--format", "coco", "--out", str(tmp_path / "x")])
    assert result.exit_code == 2
    assert "tracked (video) run cannot be exported" in result.stderr and len(result.stderr.strip().splitlines()) == 1
