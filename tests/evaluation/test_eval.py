"""`masqclip eval` and `masqclip synth` end to end: ground truth against itself, in-memory scoring equals scoring the
files `segment` wrote, torchrun with 2 CPU processes equals one process."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from typer.testing import CliRunner

from masqclip_cli.cli import app
from masqclip_cli.data.datasets import load_dataset
from masqclip_cli.data.synthetic import SynthConfig, generate
from masqclip_cli.evaluation.instance import coco_mask_ap
from masqclip_cli.evaluation.panoptic import PanopticAccumulator, PanopticSegmentInfo
from masqclip_cli.evaluation.semantic import SemanticAccumulator

runner = CliRunner()


@pytest.fixture(scope="module")
def synth_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("synth")
    generate(root, SynthConfig(images=5, seed=3, size=(96, 96), crops=False))
    return root


def test_synthetic_ground_truth_against_itself_is_perfect(synth_root):
    data = load_dataset("synthetic", synth_root)
    n = len(data.vocabulary)
    pan, sem = PanopticAccumulator(n), SemanticAccumulator(n, ignore_index=-1)
    for sample in data.samples:
        ids, segments = sample.panoptic_gt()
        infos = [PanopticSegmentInfo(s.id, s.category, s.iscrowd) for s in segments]
        pan.add(ids, infos, ids, infos)
        gt = sample.semantic_gt()
        sem.add(gt, gt)
    assert pan.result(list(data.vocabulary.isthing))["all"]["pq"] == pytest.approx(100.0)
    assert sem.result()["mIoU"] == pytest.approx(100.0)
    gt_coco = data.instance_gt_coco()
    results = [{"image_id": a["image_id"], "category_id": a["category_id"], "segmentation": a["segmentation"],
                "score": 1.0} for a in gt_coco["annotations"]]
    assert coco_mask_ap(gt_coco, results)["AP"] == pytest.approx(100.0)


def _eval(args):
    result = runner.invoke(app, ["eval", *args], env={"COLUMNS": "200"})
    assert result.exit_code == 0, result.output
    return result


def _numbers(report: dict) -> dict:
    """The metric blocks without timings."""
    return json.loads(json.dumps(report["metrics"]))


def test_in_memory_equals_scoring_segment_files(synth_root, tmp_path):
    common = ["--dataset", "synthetic", "--root", str(synth_root), "--task", "panoptic,semantic,instance"]
    _eval([*common, "--model", "tiny-random", "--report", str(tmp_path / "model.json")])
    seg = runner.invoke(app, ["segment", str(synth_root / "images" / "val"), "--model", "tiny-random", "--vocab",
                              str(synth_root / "vocab.txt"), "--task", "panoptic,semantic,instance", "--format",
                              "coco,panoptic,labels", "--short-side", "0", "--out",
                              str(tmp_path / "pred")], env={"COLUMNS": "200"})
    assert seg.exit_code == 0, seg.output
    _eval([*common, "--predictions", str(tmp_path / "pred"), "--report", str(tmp_path / "files.json")])
    model = json.loads((tmp_path / "model.json").read_text())
    files = json.loads((tmp_path / "files.json").read_text())
    assert model["images"] == files["images"] == 5
    assert _numbers(model) == _numbers(files)
    # not a comparison of empty results: the random model's segments and pixels were counted
    assert sum(c["fp"] for c in model["metrics"]["panoptic"]["per_class"]) > 0
    assert sum(c["pred_pixels"] for c in model["metrics"]["semantic"]["per_class"]) > 0
    protocol = model["protocol"]
    for key in ("dataset", "short_side", "max_size", "object_mask_threshold", "vocabulary", "model_identity",
                "device", "precision", "templates"):
        assert key in protocol
    assert model["seconds_model_per_image"] > 0 and files["seconds_model_per_image"] is None


def test_eval_errors_are_one_line(synth_root, tmp_path):
    result = runner.invoke(app, ["eval", "--dataset", "nope", "--root", str(tmp_path)], env={"COLUMNS": "300"})
    assert result.exit_code == 2 and "nope" in result.stderr
    result = runner.invoke(app, ["eval", "--dataset", "synthetic", "--root", str(synth_root), "--predictions",
                                 str(tmp_path)], env={"COLUMNS": "300"})
    assert result.exit_code == 2 and "not a masqclip segment output" in result.stderr


def test_synth_command_is_deterministic(tmp_path):
    for name in ("a", "b"):
        result = runner.invoke(app, ["synth", "--out", str(tmp_path / name), "--images", "2", "--size", "64",
                                     "--seed", "7", "--no-crops"])
        assert result.exit_code == 0, result.output
    files = sorted(p.relative_to(tmp_path / "a") for p in (tmp_path / "a").rglob("*") if p.is_file())
    assert files and all((tmp_path / "a" / f).read_bytes() == (tmp_path / "b" / f).read_bytes() for f in files)


def test_torchrun_two_processes_equal_one(synth_root, tmp_path):
    args = ["eval", "--dataset", "synthetic", "--root", str(synth_root), "--model", "tiny-random", "--task",
            "panoptic,semantic,instance", "--threads", "1"]
    env = dict(os.environ, COLUMNS="200", OMP_NUM_THREADS="1")
    single = subprocess.run([sys.executable, "-m", "masqclip_cli", *args, "--report", str(tmp_path / "one.json")],
                            env=env, capture_output=True, text=True)
    assert single.returncode == 0, single.stderr
    multi = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2",
                            "--master-port", "29517", "-m", "masqclip_cli", *args, "--report",
                            str(tmp_path / "two.json")], env=env, capture_output=True, text=True, timeout=600)
    assert multi.returncode == 0, multi.stderr[-3000:]
    one = json.loads((tmp_path / "one.json").read_text())
    two = json.loads((tmp_path / "two.json").read_text())
    assert two["processes"] == 2 and one["processes"] == 1 and two["images"] == one["images"]

    def close(a, b):
        if isinstance(a, dict):
            assert a.keys() == b.keys()
            for k in a:
                close(a[k], b[k])
        elif isinstance(a, list):
            assert len(a) == len(b)
            for x, y in zip(a, b):
                close(x, y)
        elif isinstance(a, float) and isinstance(b, float):
            assert abs(a - b) <= 1e-6
        else:
            assert a == b

    close(one["metrics"], two["metrics"])


def test_real_coco_panoptic_sample_against_itself_is_pq_100():
    from pathlib import Path

    sample = Path(__file__).resolve().parents[2].parent / "shared" / "data" / "coco-panoptic-sample"
    if not sample.is_dir():
        pytest.skip(f"{sample} not found")
    data = load_dataset("coco-panoptic", images=sample / "images", panoptic_dir=sample / "panoptic",
                        panoptic_json=sample / "panoptic.json")
    n = len(data.vocabulary)
    pan, sem = PanopticAccumulator(n), SemanticAccumulator(n, ignore_index=-1)
    for s in data.samples:
        ids, segments = s.panoptic_gt()
        infos = [PanopticSegmentInfo(g.id, g.category, g.iscrowd) for g in segments]
        pan.add(ids, infos, ids, infos)
        sem.add(s.semantic_gt(), s.semantic_gt())
    result = pan.result(list(data.vocabulary.isthing))
    assert result["all"]["pq"] == pytest.approx(100.0) and result["all"]["n"] > 5
    assert sem.result()["mIoU"] == pytest.approx(100.0)
