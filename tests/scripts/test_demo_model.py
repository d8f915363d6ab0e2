"""The demo model (scripts/build_demo_model.py): the recipe really learns, and the shipped model works.

1. A shortened recipe (the ``ci`` preset: tiny sizes, a few hundred iterations, about two minutes on 2 cores) runs
   every stage of the real build -- shapes CLIP, teacher on base-only scenes, 2 rounds of distillation, MasQ-tuning --
   and the learning is real: the teacher's proposal recall at IoU 0.5 on its training scenes is at least 30 points
   above an untrained network's, and MasQ-tuning raises the mask-label accuracy on held-out scenes by at least 10
   points over the untuned model (f_Q' = a copy of CLIP's f_Q, on the same proposals).
2. The shipped ``demo`` model (``samples/demo.safetensors``) loads by name, segments ``samples/images``
   into valid COCO panoptic and instance files, and scores above a floor on a small synthetic split drawn with its own
   seed (the floors are a few points under the values measured when the model was built, so a regression fails).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from masqclip_cli.cli import app
from masqclip_cli.data.datasets import load_dataset
from masqclip_cli.data.synthetic import SynthConfig, generate
from masqclip_cli.evaluation.runner import EvalOptions, evaluate
from masqclip_cli.inference.postprocess import PostprocessConfig
from masqclip_cli.modeling.factory import BUNDLED_MODELS_DIR, load_model

REPO = Path(__file__).resolve().parents[2]
SAMPLE_SCENES = sorted((REPO / "samples" / "images").glob("scene-*"))

# Measured on the check split below when the shipped model was built (docs/demo-model.md); floors a few points under.
CHECK_SPLIT = {"images": 24, "seed": 21, "size": 128}
FLOOR_PQ_ALL = 30.0  # measured 33.4
FLOOR_MIOU_ALL = 32.0  # measured 35.3


@pytest.fixture(scope="module")
def ci_report(demo_ci_build) -> dict:
    return demo_ci_build[1]


def test_ci_recipe_teacher_recall_is_learned(ci_report):
    recall = ci_report["proposal_recall"]["train"]
    untrained = recall["untrained"]["recall@0.5"]["all"]
    teacher = recall["teacher"]["recall@0.5"]["all"]
    assert teacher >= untrained + 30.0, (untrained, teacher)


def test_ci_recipe_masq_tuning_raises_label_accuracy(ci_report):
    accuracy = ci_report["mask_label_accuracy"]
    assert accuracy["masqclip"]["labelled"]["all"] >= 30  # enough labelled queries for the comparison to mean much
    assert accuracy["masqclip"]["labelled"] == accuracy["untuned"]["labelled"]  # same proposals, same labels
    assert accuracy["masqclip"]["all"] >= accuracy["untuned"]["all"] + 10.0, accuracy


def test_ci_recipe_reports_every_stage(ci_report, tmp_path):
    assert set(ci_report["seconds"]) >= {"data", "clip", "teacher", "distill", "masq", "evaluation", "total"}
    assert len(ci_report["distill"]["pseudo_masks_per_image"]) == 2  # two rounds, each logged
    for name in ("masqclip", "untuned"):
        metrics = ci_report["evaluation"][name]
        assert {"panoptic", "semantic", "instance"} <= set(metrics)
        assert {"all", "base", "novel"} <= set(metrics["panoptic"])
    model = load_model(Path(ci_report["model"]["path"]))
    assert model.masq.tune == "q"
    assert len(model.vocabulary) == 20  # the full shapes vocabulary (base and novel) ships with the model


# --- the shipped model -----------------------------------------------------------------------------------------


def test_demo_model_is_shipped_and_registered():
    assert (BUNDLED_MODELS_DIR / "demo.safetensors").is_file()
    assert (BUNDLED_MODELS_DIR / "demo.safetensors").stat().st_size < 20 * 2**20  # "a few MB"
    result = CliRunner().invoke(app, ["models"])
    assert result.exit_code == 0, result.output
    assert "demo" in result.output
    assert len(SAMPLE_SCENES) >= 4


def test_demo_segments_the_sample_scenes(tmp_path):
    out = tmp_path / "out"
    result = CliRunner().invoke(app, ["segment", str(REPO / "samples" / "images"), "--model", "demo", "--vocab",
                                      str(REPO / "samples" / "vocab.txt"), "--task", "panoptic,instance",
                                      "--format", "panoptic,coco,overlay", "--out", str(out)])
    assert result.exit_code == 0, result.output
    panoptic = json.loads((out / "panoptic.json").read_text())
    names = {c["id"]: c["name"] for c in panoptic["categories"]}
    assert len(names) == 20 and "star" in names.values()
    assert len(panoptic["annotations"]) == len(SAMPLE_SCENES)
    void_fractions = []
    for ann in panoptic["annotations"]:
        png = np.asarray(Image.open(out / "panoptic" / ann["file_name"]).convert("RGB")).astype(np.int64)
        ids = png[..., 0] + 256 * png[..., 1] + 65536 * png[..., 2]
        segments = {s["id"]: s for s in ann["segments_info"]}
        assert len(segments) >= 3  # a scene has stuff and several shapes: a trained model finds more than one
        assert set(np.unique(ids)) - {0} == set(segments)
        for sid, s in segments.items():
            assert s["area"] == int((ids == sid).sum()) and s["category_id"] in names
        void_fractions.append(float((ids == 0).mean()))
    # most pixels are explained (measured: 2-11 % void, 38 % on the scene whose novel water is missed; mean 12 %)
    assert max(void_fractions) < 0.5 and np.mean(void_fractions) < 0.2, void_fractions
    from pycocotools.coco import COCO

    coco = COCO(str(out / "instances.json"))
    assert len(coco.getImgIds()) == len(SAMPLE_SCENES) and len(coco.getAnnIds()) > 0
    assert len(list((out / "overlay").iterdir())) == len(SAMPLE_SCENES)
    # no --short-side given: the model's own test size (the size it was trained at) was used
    run = json.loads((out / ".masqclip" / "run.json").read_text())
    assert '"short_side": 128' in json.dumps(run), run


def test_demo_scores_above_the_floor_on_a_fresh_split(tmp_path):
    generate(tmp_path, SynthConfig(images=CHECK_SPLIT["images"], seed=CHECK_SPLIT["seed"], split="check",
                                   size=(CHECK_SPLIT["size"], CHECK_SPLIT["size"]), crops=False))
    dataset = load_dataset("synthetic", tmp_path, split="check")
    model = load_model("demo")
    model.set_vocabulary(dataset.vocabulary)
    tasks = ("panoptic", "semantic")
    metrics = evaluate(dataset, EvalOptions(tasks=tasks, postprocess=PostprocessConfig(tasks=tasks)),
                       model=model)["metrics"]
    assert metrics["panoptic"]["all"]["pq"] >= FLOOR_PQ_ALL, metrics["panoptic"]["all"]
    assert metrics["semantic"]["mIoU"] >= FLOOR_MIOU_ALL, metrics["semantic"]["mIoU"]
