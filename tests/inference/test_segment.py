"""`masqclip segment` end to end with the tiny random model: formats, batching, resume, interrupts, shards, errors."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import cv2
import numpy as np
import pytest
from PIL import Image
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval
from typer.testing import CliRunner

from masqclip_cli.cli import app

runner = CliRunner()
VOCAB = "person; car, automobile; road [stuff]; sky [stuff]"
BASE = ["--model", "tiny-random", "--vocab", VOCAB, "--short-side", "96"]


def _images(folder: Path, count: int = 3) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    sizes = [(40, 60), (64, 48), (33, 90), (50, 50), (70, 31), (45, 80), (60, 60), (38, 52), (81, 41), (47, 47)]
    for i in range(count):
        h, w = sizes[i % len(sizes)]
        Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)).save(folder / f"img{i:02d}.png")
    return folder


def _tree(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def _run(args, **kw):
    return runner.invoke(app, ["segment", *args], env={"COLUMNS": "300"}, **kw)


def test_all_tasks_and_formats(tmp_path):
    src = _images(tmp_path / "in")
    out = tmp_path / "out"
    result = _run([str(src), *BASE, "--task", "panoptic,semantic,instance", "--format",
                   "coco,panoptic,labels,overlay,jsonl", "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert "3 done, 0 skipped, 0 failed" in result.stderr
    # COCO instances: pycocotools reads it as ground truth and as results, and COCOeval runs
    gt = COCO(str(out / "instances.json"))
    assert sorted(img["file_name"] for img in gt.dataset["images"]) == ["img00.png", "img01.png", "img02.png"]
    assert [c["name"] for c in gt.dataset["categories"]] == ["person", "car", "road", "sky"]
    if gt.dataset["annotations"]:
        res = gt.loadRes(gt.dataset["annotations"])
        evaluator = COCOeval(gt, res, "segm")
        evaluator.evaluate()
        evaluator.accumulate()
    # panoptic PNG ids equal the JSON's, areas equal pixel counts
    pan = json.loads((out / "panoptic.json").read_text())
    assert {c["name"]: c["isthing"] for c in pan["categories"]} == {"person": 1, "car": 1, "road": 0, "sky": 0}
    for ann in pan["annotations"]:
        rgb = np.asarray(Image.open(out / "panoptic" / ann["file_name"])).astype(np.int64)
        ids = rgb[..., 0] + 256 * rgb[..., 1] + 256**2 * rgb[..., 2]
        assert set(np.unique(ids)) - {0} == {s["id"] for s in ann["segments_info"]}
        for s in ann["segments_info"]:
            assert s["area"] == int((ids == s["id"]).sum())
    # label maps hold only category ids, at the original size
    label = np.asarray(Image.open(out / "labels" / "img00.png.png"))
    assert label.shape == (40, 60) and set(np.unique(label)) <= {1, 2, 3, 4}
    assert Image.open(out / "overlay" / "img02.png.jpg").size == (90, 33)
    lines = (out / "predictions.jsonl").read_text().splitlines()
    assert [json.loads(line)["id"] for line in lines] == ["img00.png", "img01.png", "img02.png"]


def test_batches_give_identical_outputs_and_rerun_changes_nothing(tmp_path):
    src = _images(tmp_path / "in", 4)
    args = [str(src), *BASE, "--task", "panoptic,instance", "--format", "coco,panoptic"]
    assert _run([*args, "--out", str(tmp_path / "b1")]).exit_code == 0
    assert _run([*args, "--out", str(tmp_path / "b3"), "--batch-size", "3"]).exit_code == 0
    assert _tree(tmp_path / "b1") == _tree(tmp_path / "b3")
    lock = tmp_path / "b1" / ".masqclip" / "lock"  # the run lock: held (written) by every run, emptied after

    def mtimes() -> dict:
        return {p: p.stat().st_mtime_ns for p in (tmp_path / "b1").rglob("*") if p.is_file() and p != lock}

    before = mtimes()
    result = _run([*args, "--out", str(tmp_path / "b1")])
    assert result.exit_code == 0 and "0 done, 4 already done (resumed)" in result.stderr
    assert mtimes() == before and lock.read_bytes() == b""


def test_other_options_are_refused_unless_overwrite(tmp_path):
    src = _images(tmp_path / "in", 2)
    out = tmp_path / "out"
    assert _run([str(src), *BASE, "--out", str(out)]).exit_code == 0
    changed = [str(src), "--model", "tiny-random", "--vocab", "cat; dog", "--short-side", "96", "--out", str(out)]
    result = _run(changed)
    assert result.exit_code == 2 and "another model, vocabulary or options" in result.stderr
    assert _run([*changed, "--overwrite"]).exit_code == 0
    pan = json.loads((out / "panoptic.json").read_text())
    assert [c["name"] for c in pan["categories"]] == ["cat", "dog"]


def test_stdin_list_to_jsonl_on_stdout(tmp_path):
    src = _images(tmp_path / "in", 2)
    paths = "\n".join(str(p) for p in sorted(src.glob("*.png"))) + "\n"
    result = _run(["-", *BASE, "--format", "jsonl"], input=paths)
    assert result.exit_code == 0, result.stderr
    lines = [json.loads(line) for line in result.stdout.splitlines()]
    assert len(lines) == 2 and all({"id", "width", "height", "segments"} <= set(d) for d in lines)


def test_bad_items_are_skipped_and_reported(tmp_path):
    src = _images(tmp_path / "in", 2)
    (src / "broken.jpg").write_bytes(b"")
    (src / "text.png").write_text("not an image")
    result = _run([str(src), *BASE, "--out", str(tmp_path / "out")])
    assert result.exit_code == 1
    assert "2 done, 2 skipped" in result.stderr
    assert "skipped: broken.jpg" in result.stderr and "skipped: text.png" in result.stderr
    pan = json.loads((tmp_path / "out" / "panoptic.json").read_text())
    assert len(pan["annotations"]) == 2


def test_video_frames(tmp_path):
    path = tmp_path / "clip.avi"
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"MJPG"), 5, (48, 32))
    for i in range(6):
        writer.write(np.full((32, 48, 3), 40 * i, np.uint8))
    writer.release()
    result = _run([str(path), *BASE, "--every", "2", "--task", "instance", "--format", "coco,overlay",
                   "--out", str(tmp_path / "out")])
    assert result.exit_code == 0, result.output
    coco = json.loads((tmp_path / "out" / "instances.json").read_text())
    assert [im["file_name"] for im in coco["images"]] == ["clip.avi#000000", "clip.avi#000002", "clip.avi#000004"]
    # a video is tracked by default: the overlay is one video (per-frame images only on request)
    assert (tmp_path / "out" / "overlay" / "clip.avi.mp4").is_file()
    assert not (tmp_path / "out" / "overlay" / "clip.avi#000002.jpg").exists()
    untracked = _run([str(path), *BASE, "--every", "2", "--task", "instance", "--format", "overlay", "--no-track",
                      "--out", str(tmp_path / "plain")])
    assert untracked.exit_code == 0, untracked.output
    assert (tmp_path / "plain" / "overlay" / "clip.avi#000002.jpg").is_file()


def test_format_needs_its_task_and_missing_model(tmp_path, monkeypatch):
    src = _images(tmp_path / "in", 1)
    result = _run([str(src), *BASE, "--format", "coco", "--out", str(tmp_path / "o")])
    assert result.exit_code == 2 and "--format coco needs --task instance" in result.stderr
    monkeypatch.setenv("MASQCLIP_MODELS_DIR", str(tmp_path / "models"))
    result = _run([str(src), "--vocab", VOCAB, "--out", str(tmp_path / "o")])
    assert result.exit_code == 2
    assert "masqclip-coco" in result.stderr and "masqclip convert" in result.stderr and "tiny-random" in result.stderr
    result = _run([str(tmp_path / "nothing"), *BASE, "--out", str(tmp_path / "o2")])
    assert result.exit_code == 2 and "nothing" in result.stderr


def test_shards_are_disjoint_cover_all_and_merge_to_a_single_run(tmp_path):
    src = _images(tmp_path / "in", 7)
    args = [str(src), *BASE, "--task", "panoptic,semantic,instance", "--format", "coco,panoptic,labels"]
    assert _run([*args, "--out", str(tmp_path / "single")]).exit_code == 0
    for i in range(3):
        assert _run([*args, "--out", str(tmp_path / f"s{i}"), "--shard", f"{i}/3"]).exit_code == 0
    shard_items = [{p.name for p in (tmp_path / f"s{i}" / "labels").glob("*.png")} for i in range(3)]
    assert sum(len(s) for s in shard_items) == 7 and len(set().union(*shard_items)) == 7
    result = runner.invoke(app, ["merge", *(str(tmp_path / f"s{i}") for i in range(3)), "--out",
                                 str(tmp_path / "merged")])
    assert result.exit_code == 0, result.output
    assert _tree(tmp_path / "merged") == _tree(tmp_path / "single")


def test_interrupted_run_resumes_to_identical_output(tmp_path):
    src = _images(tmp_path / "in", 10)
    cmd = [sys.executable, "-m", "masqclip_cli", "segment", str(src), *BASE, "--task", "panoptic,instance",
           "--format", "coco,panoptic", "--short-side", "320"]
    env = dict(os.environ, COLUMNS="300")
    full = subprocess.run([*cmd, "--out", str(tmp_path / "full")], env=env, capture_output=True, text=True)
    assert full.returncode == 0, full.stderr
    out = tmp_path / "cut"
    proc = subprocess.Popen([*cmd, "--out", str(out)], env=env, stderr=subprocess.PIPE, text=True)
    records = out / ".masqclip" / "items"
    deadline = time.time() + 120
    while time.time() < deadline and len(list(records.glob("*.json"))) < 2 and proc.poll() is None:
        time.sleep(0.01)
    proc.send_signal(signal.SIGINT)
    stderr = proc.communicate(timeout=120)[1]
    if proc.returncode == 0:
        pytest.skip("the run finished before the signal arrived")
    assert proc.returncode == 130, stderr
    done_before = len(list(records.glob("*.json")))
    assert 2 <= done_before < 10
    resumed = subprocess.run([*cmd, "--out", str(out)], env=env, capture_output=True, text=True)
    assert resumed.returncode == 0, resumed.stderr
    assert f"{10 - done_before} done, {done_before} already done (resumed)" in resumed.stderr
    assert _tree(out) == _tree(tmp_path / "full")


def test_shard_from_torchrun_environment(tmp_path, monkeypatch):
    src = _images(tmp_path / "in", 4)
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")
    result = _run([str(src), *BASE, "--format", "labels", "--task", "semantic", "--out", str(tmp_path / "out")])
    assert result.exit_code == 0, result.output
    mine = {p.name for p in (tmp_path / "out" / "shard-001-of-002" / "labels").glob("*.png")}
    from masqclip_cli.inference.engine import in_shard

    assert mine == {f"img{i:02d}.png.png" for i in range(4) if in_shard(f"img{i:02d}.png", (1, 2))}


def test_no_object_score_changes_the_scores(tmp_path):
    src = _images(tmp_path / "in", 1)
    args = ["-", *BASE, "--format", "jsonl", "--task", "instance", "--topk", "3"]
    paths = str(next(src.glob("*.png"))) + "\n"
    with_obj = _run(args, input=paths)
    without = _run([*args, "--no-object-score"], input=paths)
    assert with_obj.exit_code == 0 and without.exit_code == 0
    s1 = [s["score"] for s in json.loads(with_obj.stdout)["segments"]]
    s2 = [s["score"] for s in json.loads(without.stdout)["segments"]]
    assert s1 and s2 and s1 != s2
