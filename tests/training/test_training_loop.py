"""`masqclip train`: the loop on a tiny model and a handful of synthetic scenes (CPU).

Independent expectations: the loss must really fall; a resumed run must equal an uninterrupted one; 2 torchrun
processes must equal 1 process with the same global batch; MasQ-tuning must leave every frozen tensor bit-identical.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from masqclip_cli.data.synthetic import SynthConfig, generate
from masqclip_cli.modeling.checkpoint import _masq_extras, read_header
from masqclip_cli.modeling.factory import load_model
from masqclip_cli.training import loop
from masqclip_cli.training.config import load_config
from masqclip_cli.training.loop import train
from masqclip_cli.vocab import parse_inline

TINY = {"proposals": "tiny", "clip": "tiny", "batch_size": 2, "num_points": 256, "augment": "none", "flip": False,
        "workers": 0, "checkpoint_every": 0, "log_every": 1}


@pytest.fixture(scope="module")
def synth(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("synth")
    generate(root, SynthConfig(images=4, seed=3, split="train", size=(64, 64), base_only=True, crops=False))
    generate(root, SynthConfig(images=3, seed=4, split="val", size=(64, 64), crops=False))
    return root


def _config(stage: str, synth: Path, out: Path, **kw):
    tiny = TINY if stage == "proposals" else {k: v for k, v in TINY.items() if k != "clip"}  # keep the file's CLIP
    return load_config(stage, options={"dataset": "synthetic", "root": str(synth), "out": str(out), **tiny, **kw})


def _metrics(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.fixture(scope="module")
def teacher(synth, tmp_path_factory) -> dict:
    """A teacher trained for 120 iterations (lr 1e-3 to be CPU-friendly): its model file and its loss log."""
    out = tmp_path_factory.mktemp("teacher")
    result = train(_config("proposals", synth, out, iterations=120, lr=1e-3, log_every=20, eval_dataset="synthetic",
                           eval_split="val"))
    return {"final": result.final, "metrics": _metrics(out / "metrics.jsonl"), "result": result}


def test_teacher_loss_falls_by_half(teacher):
    losses = [r["total"] for r in teacher["metrics"] if "total" in r]
    assert len(losses) == 6
    assert losses[-1] <= 0.5 * losses[0], losses
    evals = [r for r in teacher["metrics"] if "eval" in r]
    assert len(evals) == 1 and evals[0]["eval"]["proposals"]["images"] == 3
    assert set(evals[0]["eval"]["proposals"]["recall@0.5"]) >= {"all", "things", "stuff", "base", "novel"}


def test_final_model_loads_and_segments(teacher):
    model = load_model(teacher["final"])
    info = json.loads(json.dumps(model.proposals_config))
    assert info["transformer_decoder"]["num_queries"] == 8
    model.set_vocabulary(parse_inline("circle; sky [stuff]"))
    out = model([torch.zeros(3, 64, 64, dtype=torch.uint8)])[0]
    assert out.p_cls.shape == (8, 2)


def test_resume_equals_uninterrupted(synth, tmp_path):
    kwargs = {"iterations": 6, "lr": 1e-3, "checkpoint_every": 2}
    whole = train(_config("proposals", synth, tmp_path / "whole", **kwargs))

    def interrupt(phase: str, done: int) -> None:
        if done == 3:
            signal.raise_signal(signal.SIGINT)  # handled by the loop: finish the step, checkpoint, stop

    with pytest.raises(KeyboardInterrupt):
        train(_config("proposals", synth, tmp_path / "split", **kwargs), on_step=interrupt)
    state = torch.load(tmp_path / "split" / "checkpoint.pt", weights_only=False)
    assert state["iteration"] == 3
    assert not (tmp_path / "split" / "final.safetensors").exists()
    resumed = train(_config("proposals", synth, tmp_path / "split", **kwargs))
    assert resumed.iterations_run == 3

    a, b = load_file(str(whole.final)), load_file(str(resumed.final))
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=1e-6, msg=key)
    # The log has each iteration once.
    iterations = [r["iteration"] for r in _metrics(tmp_path / "split" / "metrics.jsonl") if "total" in r]
    assert iterations == [1, 2, 3, 4, 5, 6]


def test_resume_refuses_changed_settings(synth, tmp_path):
    def stop(phase: str, done: int) -> None:
        signal.raise_signal(signal.SIGINT)

    with pytest.raises(KeyboardInterrupt):
        train(_config("proposals", synth, tmp_path, iterations=4), on_step=stop)
    with pytest.raises(ValueError, match="batch_size=2"):
        train(_config("proposals", synth, tmp_path, iterations=4, batch_size=4))


def _tensor_diff(a: dict, b: dict) -> float:
    return max((a[k].double() - b[k].double()).abs().max().item() for k in a)


@pytest.mark.skipif(shutil.which("torchrun") is None, reason="torchrun not on PATH")
def test_torchrun_two_processes_equal_one(synth, tmp_path):
    args = ["--dataset", "synthetic", "--root", str(synth), "--proposals", "tiny", "--clip", "tiny",
            "--iterations", "3", "--batch-size", "4", "--lr", "1e-3", "--augment", "none", "--workers", "0",
            "--set", "num_points=256", "--set", "precision=fp64", "--set", "flip=false", "--checkpoint-every", "0",
            "-q"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    two = subprocess.run(["torchrun", "--nproc-per-node", "2", "--master-port", "29533", "-m", "masqclip_cli",
                          "train", "proposals", *args, "--out", str(tmp_path / "two")],
                         capture_output=True, text=True, env=env, timeout=300)
    assert two.returncode == 0, two.stderr[-3000:]
    one = train(load_config("proposals", options={
        "dataset": "synthetic", "root": str(synth), "out": str(tmp_path / "one"), "proposals": "tiny", "clip": "tiny",
        "iterations": 3, "batch_size": 4, "lr": 1e-3, "augment": "none", "workers": 0, "num_points": 256,
        "precision": "fp64", "flip": False, "checkpoint_every": 0}))
    a, b = load_file(str(one.final)), load_file(str(tmp_path / "two" / "final.safetensors"))
    assert a.keys() == b.keys()
    assert _tensor_diff(a, b) <= 1e-6
    # ... and training did move the weights (by far more than the tolerance).
    config = load_config("proposals", options={"proposals": "tiny", "clip": "tiny", "seed": 0})
    initial = {f"proposals.{k}": v for k, v in loop._proposals_model(config).proposals.state_dict().items()}
    moved = max((a[k].double() - initial[k].double()).abs().max().item() for k in initial)
    assert moved > 1e-3


def test_distill_rounds(synth, teacher, tmp_path):
    result = train(_config("distill", synth, tmp_path, teacher=str(teacher["final"]), rounds=2, iterations=2,
                           score_threshold=0.0, overlap_threshold=1.01))
    for r in (1, 2):
        assert (tmp_path / f"round-{r}" / "final.safetensors").exists()
    assert result.final == tmp_path / "final.safetensors"
    assert load_file(str(result.final)).keys() == load_file(str(tmp_path / "round-2" / "final.safetensors")).keys()
    # With the thresholds opened up, the teacher's masks join the targets.
    logged = [r for r in _metrics(tmp_path / "round-1" / "metrics.jsonl") if "pseudo_masks" in r]
    assert logged and all(r["pseudo_masks"] >= 0 for r in logged)
    assert any(r["pseudo_masks"] > 0 for r in logged)
    # Round 2's teacher is round 1's student.
    header = json.loads(json.dumps(load_model(result.final).proposals_config))
    assert header["transformer_decoder"]["num_queries"] == 8
    training = read_header(result.final)["extra"]["training"]
    assert training["round"] == 2
    assert training["teacher"].endswith("round-1/final.safetensors")


@pytest.mark.parametrize("tune", ["q", "k", "v", "qk", "qkv", "clip"])
def test_masq_tuning_changes_only_trainable(synth, teacher, tmp_path, tune):
    config = _config("masq", synth, tmp_path, init=str(teacher["final"]), iterations=1, tune=tune, lr=1e-3)
    base = load_model(teacher["final"])
    initial = loop._attach_clip(base, base.proposals, base.proposals_config, config, tune=tune)
    trainable = {n for n, p in initial.masq.named_parameters() if p.requires_grad}
    before = {f"masq.{k}": v.clone() for k, v in _masq_extras(initial.masq).items()}
    teacher_tensors = load_file(str(teacher["final"]))

    result = train(config)
    after = load_file(str(result.final))
    changed = set()
    for key, value in after.items():
        if key.startswith("vocab."):  # the training vocabulary's text bank, new in this file
            continue
        if key.startswith("masq."):
            reference = before[key]
        else:
            reference = teacher_tensors[key]
        if not torch.equal(value, reference):
            changed.add(key)
    assert changed == {f"masq.{n}" for n in trainable}, (tune, sorted(changed), sorted(trainable))
    assert "mask_pos_embed" in trainable


def test_masq_tied_mask_embeddings_stay_tied(synth, teacher, tmp_path):
    result = train(_config("masq", synth, tmp_path, init=str(teacher["final"]), iterations=1, lr=1e-3,
                           tie_mask_embeddings=True))
    model = load_model(result.final)
    assert torch.equal(model.masq.mask_pos_embed, model.masq.visual.positional_embedding[0])
    assert model.vocabulary is not None and len(model.vocabulary) == 16  # the base classes only


def _cli(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "masqclip_cli", *args], capture_output=True, text=True, cwd=cwd,
                          timeout=300)


def test_cli_train_with_config_file(synth, tmp_path):
    cfg = tmp_path / "tiny.toml"
    cfg.write_text(
        '[data]\ndataset = "synthetic"\naugment = "none"\nworkers = 0\n'
        '[model]\nproposals = "tiny"\nclip = "tiny"\n'
        '[optim]\niterations = 2\nbatch_size = 2\nnum_points = 256\n'
    )
    run = _cli("train", "proposals", "--config", str(cfg), "--root", str(synth), "--out", str(tmp_path / "run"), "-q")
    assert run.returncode == 0, run.stderr
    assert "2 iterations" in run.stderr
    saved = json.loads((tmp_path / "run" / "config.json").read_text())
    assert saved["iterations"] == 2 and saved["num_points"] == 256 and saved["lr"] == 1e-4
    assert (tmp_path / "run" / "final.safetensors").exists()


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["train", "distill", "--dataset", "synthetic"], "needs --teacher"),
        (["train", "masq", "--proposals", "missing.safetensors", "--dataset", "synthetic", "--root", "."],
         "missing.safetensors: proposals model file not found"),
        (["train", "proposals", "--set", "nope=1"], "unknown setting 'nope'"),
        (["train", "proposals", "--set", "lr=fast"], "lr must be a number"),
        (["train", "teacher"], "unknown training stage 'teacher'"),
        (["train", "masq", "--proposals", "x.safetensors", "--tune", "z"], "--tune must be one of"),
    ],
)
def test_cli_train_errors(tmp_path, args, message):
    run = _cli(*args, cwd=tmp_path)
    assert run.returncode == 2
    lines = [ln for ln in run.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and message in lines[0], run.stderr


def test_cli_config_file_errors(tmp_path):
    bad = tmp_path / "bad.toml"
    bad.write_text("[optim]\nlearning_rate = 1\n")
    run = _cli("train", "proposals", "--config", str(bad))
    assert run.returncode == 2 and f"{bad}: unknown setting 'learning_rate'" in run.stderr
    bad.write_text("iterations = \n")
    run = _cli("train", "proposals", "--config", str(bad))
    assert run.returncode == 2 and f"{bad}: not valid TOML" in run.stderr
