"""Predictor: one image from a path, a PIL image or a numpy array gives one result; a batch equals its images one by
one; the model file's stored thresholds are used (by the Python API and by `segment`) and can be overridden; results
equal the model + post-processing run by hand."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from masqclip_cli import Predictor, Segmentation  # the top-level names a user imports
from masqclip_cli.cli import app
from masqclip_cli.inference.postprocess import PostprocessConfig, postprocess
from masqclip_cli.modeling.factory import load_model, save_model
from masqclip_cli.vocab import load_vocabulary

ROOT = Path(__file__).resolve().parents[2]
SCENES = sorted((ROOT / "samples" / "images").glob("*.png"))[:3]
VOCAB_FILE = ROOT / "samples" / "vocab.txt"
TASKS = ("panoptic", "semantic", "instance")


@pytest.fixture(scope="module")
def demo() -> Predictor:
    torch.set_num_threads(2)
    return Predictor("demo", vocab=str(VOCAB_FILE), tasks=TASKS, device="cpu")


def _same(a: Segmentation, b: Segmentation, score_atol: float = 0.0) -> None:
    """Equal maps and tables; scores equal, or within ``score_atol`` (a batched matmul sums in another order)."""
    assert a.image_size == b.image_size
    np.testing.assert_array_equal(a.panoptic, b.panoptic)
    np.testing.assert_array_equal(a.semantic, b.semantic)
    for x, y in ((a.segments, b.segments), (a.instances, b.instances)):
        for column in ("id", "class_id", "isthing", "area", "bbox", "query"):
            np.testing.assert_array_equal(getattr(x, column), getattr(y, column))
        np.testing.assert_allclose(x.score, y.score, rtol=0, atol=score_atol)
    for m, n in zip(a.instances.masks, b.instances.masks):
        np.testing.assert_array_equal(m, n)


def test_path_pil_and_numpy_inputs_agree(demo):
    path = SCENES[0]
    by_path = demo.predict(path)
    by_str = demo.predict(str(path))
    with Image.open(path) as im:
        by_pil = demo.predict(im)
        rgb = np.asarray(im.convert("RGB"))
    by_array = demo.predict(rgb)
    for other in (by_str, by_pil, by_array):
        _same(by_path, other)
    assert by_path.image_size == rgb.shape[:2]
    assert by_path.class_names == load_vocabulary(str(VOCAB_FILE)).names
    assert set(by_path.segments.class_name.tolist()) <= set(by_path.class_names)
    assert len(by_path.segments) > 0 and len(by_path.instances) > 0


def test_batch_equals_single(demo):
    singles = [demo.predict(p) for p in SCENES]
    for batch_size in (None, 2):
        for a, b in zip(singles, demo.predict_batch(SCENES, batch_size=batch_size)):
            _same(a, b, score_atol=2e-6)  # below the 6 decimals every output file keeps


def test_result_equals_the_model_and_postprocess_by_hand(demo):
    """An independent path: PIL's bilinear resize to the model's stored test size (128 short side), the model
    forward, then postprocess() with the default config."""
    with Image.open(SCENES[1]) as im:
        rgb = np.asarray(im.convert("RGB"))
    h, w = rgb.shape[:2]
    scale = 128 / min(h, w)
    resized = np.asarray(Image.fromarray(rgb).resize((int(w * scale + 0.5), int(h * scale + 0.5)), Image.BILINEAR))
    with torch.no_grad():
        out = demo.model([torch.from_numpy(resized.copy()).permute(2, 0, 1)])[0]
    ref = postprocess(out.mask_logits, out.p_cls, demo.vocabulary.isthing, out.image_size, out.padded_size, (h, w),
                      PostprocessConfig(tasks=TASKS))
    _same(demo.predict(rgb), ref.with_vocabulary(demo.vocabulary))


def test_bad_inputs():
    predictor = Predictor(load_model("tiny-random"), vocab=["cat", "dog"])
    with pytest.raises(ValueError, match="uint8"):
        predictor.predict(np.zeros((8, 8, 3), np.float32))
    with pytest.raises(ValueError, match=r"\(H, W, 3\)"):
        predictor.predict(np.zeros((8, 8, 4), np.uint8))
    with pytest.raises(TypeError, match="path, a PIL image or a numpy array"):
        predictor.predict(42)
    with pytest.raises(TypeError, match="detections_per_imag"):
        Predictor(predictor.model, detections_per_imag=3)
    gray = predictor.predict(np.full((20, 24), 128, np.uint8))  # grey is accepted as RGB
    assert gray.image_size == (20, 24) and gray.class_names == ["cat", "dog"]


@pytest.fixture(scope="module")
def strict_model_file(tmp_path_factory) -> Path:
    """tiny-random with stored thresholds no query can pass (object mask threshold 1.0) and 3 detections."""
    torch.manual_seed(0)
    model = load_model("tiny-random")
    model.set_vocabulary(load_vocabulary("person; car; road [stuff]"))
    model.thresholds = {"object_mask_threshold": 1.0, "overlap_threshold": 0.3, "detections_per_image": 3}
    path = tmp_path_factory.mktemp("model") / "strict.safetensors"
    save_model(model, path)
    return path


def test_stored_thresholds_are_used_and_can_be_overridden(strict_model_file):
    image = np.random.default_rng(0).integers(0, 255, (48, 64, 3), dtype=np.uint8)
    stored = Predictor(strict_model_file, tasks=("panoptic", "instance"))
    assert (stored.config.object_mask_threshold, stored.config.detections_per_image) == (1.0, 3)
    seg = stored.predict(image)
    assert len(seg.segments) == 0 and (seg.panoptic == 0).all()  # max p_cls > 1.0 never holds
    assert len(seg.instances) == 3
    loose = Predictor(stored.model, tasks=("panoptic", "instance"), object_mask_threshold=0.0,
                      detections_per_image=5)
    seg = loose.predict(image)
    assert len(seg.segments) > 0 and len(seg.instances) == 5
    assert stored.with_options(detections_per_image=2).predict(image).instances.id.tolist() == [1, 2]


def test_segment_uses_the_stored_thresholds(strict_model_file, tmp_path):
    image = tmp_path / "in" / "a.png"
    image.parent.mkdir()
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (48, 64, 3), dtype=np.uint8)).save(image)
    runner = CliRunner()
    base = [str(image), "--model", str(strict_model_file), "--task", "panoptic,instance", "--format", "panoptic,coco"]
    result = runner.invoke(app, ["segment", *base, "--out", str(tmp_path / "stored")])
    assert result.exit_code == 0, result.output
    assert json.loads((tmp_path / "stored" / "panoptic.json").read_text())["annotations"][0]["segments_info"] == []
    assert len(json.loads((tmp_path / "stored" / "instances.json").read_text())["annotations"]) <= 3
    result = runner.invoke(app, ["segment", *base, "--object-threshold", "0", "--out", str(tmp_path / "loose")])
    assert result.exit_code == 0, result.output
    assert json.loads((tmp_path / "loose" / "panoptic.json").read_text())["annotations"][0]["segments_info"] != []
