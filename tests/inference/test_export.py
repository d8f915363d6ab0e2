"""`masqclip export`: any format from a finished run without the model; the run's own formats reproduced byte for
byte; pre-annotation controls checked against the run's own COCO file filtered independently."""

from __future__ import annotations

import hashlib
import json
from collections import defaultdict
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from masqclip_cli.cli import app
from masqclip_cli.modeling.factory import load_model, save_model
from masqclip_cli.vocab import load_vocabulary

pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")  # pycocotools
runner = CliRunner()
FORMATS = "coco,panoptic,labels,overlay,jsonl"


def _tree(root: Path) -> dict[str, str]:
    """sha256 of every file a writer made (the run state under .masqclip left out)."""
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file() and ".masqclip" not in p.parts}


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory) -> tuple[Path, Path, Path]:
    """(run folder, images folder, model file): tiny-random saved to a file, 3 images, all tasks, 5 formats."""
    root = tmp_path_factory.mktemp("export")
    images = root / "in"
    (images / "sub").mkdir(parents=True)
    rng = np.random.default_rng(0)
    for name, (h, w) in {"a.png": (40, 56), "sub/b.png": (48, 48), "c.png": (36, 60)}.items():
        Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)).save(images / name)
    torch.manual_seed(0)
    model = load_model("tiny-random")
    model.set_vocabulary(load_vocabulary("person; car; road [stuff]; sky [stuff]"))
    model_file = save_model(model, root / "model.safetensors")
    run = root / "run"
    result = runner.invoke(app, ["segment", str(images), "-r", "--model", str(model_file), "--short-side", "64",
                                 "--task", "panoptic,semantic,instance", "--format", FORMATS, "--palette",
                                 "--out", str(run)])
    assert result.exit_code == 0, result.output
    return run, images, model_file


def _export(run: Path, out: Path, *args: str):
    return runner.invoke(app, ["export", str(run), "--out", str(out), *args])


def test_export_reproduces_the_run_byte_for_byte_without_the_model(finished_run, tmp_path):
    run, _, model_file = finished_run
    moved = model_file.with_suffix(".gone")
    model_file.rename(moved)  # the model is not needed
    try:
        result = _export(run, tmp_path / "again", "--format", FORMATS, "--palette")
    finally:
        moved.rename(model_file)
    assert result.exit_code == 0, result.output
    assert "3 exported, 0 failed" in result.stderr
    assert _tree(tmp_path / "again") == _tree(run)
    # the export folder is a run folder too: exporting it again gives the same files
    assert _export(tmp_path / "again", tmp_path / "third", "--format", "coco").exit_code == 0
    assert (tmp_path / "third" / "instances.json").read_bytes() == (run / "instances.json").read_bytes()


def test_controls_match_the_runs_coco_filtered_independently(finished_run, tmp_path):
    run, _, _ = finished_run
    full = json.loads((run / "instances.json").read_text())
    result = _export(run, tmp_path / "x", "--format", "coco", "--min-score", "0.02", "--one-label-per-mask",
                     "--min-area", "20")
    assert result.exit_code == 0, result.output
    got = json.loads((tmp_path / "x" / "instances.json").read_text())
    # expectation: per image and distinct mask (the same RLE), the best-scoring annotation, if it passes
    best: dict[tuple, dict] = {}
    for ann in full["annotations"]:
        key = (ann["image_id"], ann["segmentation"]["counts"])
        if key not in best or ann["score"] > best[key]["score"]:
            best[key] = ann
    expected = sorted((a["image_id"], a["segmentation"]["counts"], a["category_id"], a["score"])
                      for a in best.values() if a["score"] >= 0.02 and a["area"] >= 20)
    assert sorted((a["image_id"], a["segmentation"]["counts"], a["category_id"], a["score"])
                  for a in got["annotations"]) == expected
    assert 0 < len(expected) < len(full["annotations"])
    top = _export(run, tmp_path / "top", "--format", "coco", "--max-per-image", "2")
    assert top.exit_code == 0
    per_image = defaultdict(list)
    for ann in json.loads((tmp_path / "top" / "instances.json").read_text())["annotations"]:
        per_image[ann["image_id"]].append(ann["score"])
    by_image = defaultdict(list)
    for ann in full["annotations"]:
        by_image[ann["image_id"]].append(ann["score"])
    assert {i: sorted(s) for i, s in per_image.items()} == {i: sorted(s)[-2:] for i, s in by_image.items()}


def test_segment_with_controls_equals_export_with_them(finished_run, tmp_path):
    run, images, model_file = finished_run
    args = ["--min-score", "0.02", "--one-label-per-mask"]
    direct = runner.invoke(app, ["segment", str(images), "-r", "--model", str(model_file), "--short-side", "64",
                                 "--task", "panoptic,semantic,instance", "--format", "coco,panoptic", *args,
                                 "--out", str(tmp_path / "direct")])
    assert direct.exit_code == 0, direct.output
    assert _export(run, tmp_path / "exported", "--format", "coco,panoptic", *args).exit_code == 0
    assert _tree(tmp_path / "direct") == _tree(tmp_path / "exported")


def test_export_errors(finished_run, tmp_path):
    run, _, _ = finished_run
    into_itself = _export(run, run, "--format", "coco")
    assert into_itself.exit_code == 2 and "new folder" in into_itself.stderr
    not_a_run = _export(tmp_path, tmp_path / "o", "--format", "coco")
    assert not_a_run.exit_code == 2 and "not a masqclip segment output" in not_a_run.stderr
    bad_option = _export(run, tmp_path / "o", "--format", "coco", "--option", "nope=1")
    assert bad_option.exit_code == 2 and "expected key=value with key one of" in bad_option.stderr
    bad_score = _export(run, tmp_path / "o", "--format", "coco", "--min-score", "2")
    assert bad_score.exit_code == 2 and "--min-score must be in [0, 1]" in bad_score.stderr
    # a run without the semantic task cannot be exported as labels (checked before anything is written)
    small = tmp_path / "small"
    assert _export(run, small, "--format", "coco").exit_code == 0
    fp = json.loads((small / ".masqclip" / "run.json").read_text())
    fp["postprocess"]["tasks"] = ["instance"]
    (small / ".masqclip" / "run.json").write_text(json.dumps(fp, indent=1) + "\n")
    no_task = _export(small, tmp_path / "labels", "--format", "labels")
    assert no_task.exit_code == 2 and "needs task semantic" in no_task.stderr
    assert not (tmp_path / "labels").exists()


LABELLING = "cvat,label-studio,labelme,yolo-seg,voc"


def test_labelling_formats_export_byte_for_byte_and_take_their_flags(finished_run, tmp_path):
    run, images, model_file = finished_run
    flags = ["--ls-regions", "polygon", "--image-root", "https://host/data", "--option", "cvat_shapes=polygon"]
    direct = runner.invoke(app, ["segment", str(images), "-r", "--model", str(model_file), "--short-side", "64",
                                 "--task", "panoptic,instance", "--format", LABELLING, *flags,
                                 "--out", str(tmp_path / "direct")])
    assert direct.exit_code == 0, direct.output
    moved = model_file.with_suffix(".gone")
    model_file.rename(moved)  # export needs no model
    try:
        exported = _export(run, tmp_path / "exported", "--format", LABELLING, *flags)
    finally:
        moved.rename(model_file)
    assert exported.exit_code == 0, exported.output
    # byte for byte, but for data.yaml's `path:` line, which is the dataset's own absolute folder
    direct_tree, exported_tree = _tree(tmp_path / "direct"), _tree(tmp_path / "exported")
    assert direct_tree.keys() == exported_tree.keys()
    assert {k: v for k, v in direct_tree.items() if k != "yolo-seg/data.yaml"} == {
        k: v for k, v in exported_tree.items() if k != "yolo-seg/data.yaml"}
    yamls = [(tmp_path / name / "yolo-seg" / "data.yaml").read_text().splitlines() for name in ("direct", "exported")]
    assert yamls[0][1:] == yamls[1][1:]
    assert yamls[1][0] == f'path: "{(tmp_path / "exported" / "yolo-seg").resolve()}"'
    tasks = json.loads((tmp_path / "exported" / "label-studio" / "tasks.json").read_text())
    assert [t["data"]["image"] for t in tasks] == ["https://host/data/a.png", "https://host/data/c.png",
                                                   "https://host/data/sub/b.png"]
    types = {r["type"] for t in tasks for r in t["predictions"][0]["result"]}
    assert types == {"polygonlabels"}
    assert "<PolygonLabels" in (tmp_path / "exported" / "label-studio" / "config.xml").read_text()
    bad = _export(run, tmp_path / "bad", "--format", "label-studio", "--ls-regions", "circles")
    assert bad.exit_code == 2 and "ls_regions" in bad.stderr


def test_label_map_in_segment_export_and_merge(finished_run, tmp_path):
    run, images, model_file = finished_run
    label_map = tmp_path / "project.csv"
    label_map.write_text("class,label,id\nperson,Human,7\ncar,Vehicle,9\nroad,Ground,30\nsky,Ground\n")
    segment_args = ["segment", str(images), "-r", "--model", str(model_file), "--short-side", "64",
                    "--task", "panoptic,semantic,instance", "--format", "coco,panoptic,labels"]
    direct = runner.invoke(app, [*segment_args, "--label-map", str(label_map), "--out", str(tmp_path / "direct")])
    assert direct.exit_code == 0, direct.output
    exported = _export(run, tmp_path / "exported", "--format", "coco,panoptic,labels", "--label-map", str(label_map))
    assert exported.exit_code == 0, exported.output
    assert _tree(tmp_path / "direct") == _tree(tmp_path / "exported")
    # the project's labels and ids, road and sky merged into one stuff class
    panoptic = json.loads((tmp_path / "direct" / "panoptic.json").read_text())
    assert [(c["id"], c["name"], c["isthing"]) for c in panoptic["categories"]] == [
        (7, "Human", 1), (9, "Vehicle", 1), (30, "Ground", 0)]
    full = json.loads((run / "panoptic.json").read_text())
    old_names = {c["id"]: c["name"] for c in full["categories"]}
    for old_ann, new_ann in zip(full["annotations"], panoptic["annotations"]):
        ground = [s for s in old_ann["segments_info"] if old_names[s["category_id"]] in ("road", "sky")]
        merged = [s for s in new_ann["segments_info"] if s["category_id"] == 30]
        assert len(merged) == min(len(ground), 1)  # one Ground segment per image, holding all road and sky pixels
        assert sum(s["area"] for s in merged) == sum(s["area"] for s in ground)
    # shards with a label map merge into the single run's files
    shard_dirs = []
    for i in range(2):
        shard = runner.invoke(app, [*segment_args, "--label-map", str(label_map), "--shard", f"{i}/2",
                                    "--out", str(tmp_path / f"shard{i}")])
        assert shard.exit_code in (0, 1), shard.output
        shard_dirs.append(str(tmp_path / f"shard{i}"))
    merged = runner.invoke(app, ["merge", *shard_dirs, "--out", str(tmp_path / "merged")])
    assert merged.exit_code == 0, merged.output
    assert _tree(tmp_path / "merged") == _tree(tmp_path / "direct")


def test_label_map_errors_exit_2_naming_the_file(finished_run, tmp_path):
    run, images, _ = finished_run
    typo = tmp_path / "typo.json"
    typo.write_text('{"persn": "Human"}')
    # refused before the model loads: the model named here does not exist
    before_model = runner.invoke(app, ["segment", str(images), "--model", str(tmp_path / "no-model.safetensors"),
                                       "--vocab", "person; car", "--label-map", str(typo), "--out",
                                       str(tmp_path / "o")])
    assert before_model.exit_code == 2 and str(typo) in before_model.stderr and "persn" in before_model.stderr
    exported = _export(run, tmp_path / "o2", "--format", "coco", "--label-map", str(typo))
    assert exported.exit_code == 2 and str(typo) in exported.stderr
    assert not (tmp_path / "o2" / "instances.json").exists()
    unreadable = _export(run, tmp_path / "o3", "--format", "coco", "--label-map", str(tmp_path / "map.xml"))
    assert unreadable.exit_code == 2 and "map.xml" in unreadable.stderr
