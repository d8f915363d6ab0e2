"""Official checkpoints → our model: refusal of renamed / mis-shaped keys, partial conversion, file round trip,
registered models and `masqclip models` / `masqclip convert`."""

from __future__ import annotations

import json

import pytest
import torch
from golden import case_clip_config, golden_cases, load_case
from typer.testing import CliRunner

from masqclip_cli import load_model
from masqclip_cli.cli import app
from masqclip_cli.modeling.convert import (
    ConversionError,
    convert_checkpoint_file,
    convert_official,
    official_key_to_ours,
    read_official_checkpoint,
)
from masqclip_cli.modeling.factory import ModelNotAvailableError
from masqclip_cli.vocab import load_vocabulary

runner = CliRunner()


def _kwargs(case):
    return {"proposals": case.config, "clip_model": case_clip_config(case), "clip_pretrained": None}


def test_key_map():
    assert official_key_to_ours("backbone.res2.0.conv1.weight") == "proposals.backbone.res2.0.conv1.weight"
    assert official_key_to_ours("sem_seg_head.pixel_decoder.input_proj.0.0.weight") == (
        "proposals.pixel_decoder.input_proj.0.0.weight")
    assert official_key_to_ours("sem_seg_head.predictor.query_feat.weight") == "proposals.predictor.query_feat.weight"
    assert official_key_to_ours("masqclip.visual.transformer.resblocks.11.attn.new_q_proj.bias") == (
        "masq.q_proj_new.11.bias")
    assert official_key_to_ours("masqclip.visual.ln_post.weight") == "masq.visual.ln_post.weight"
    assert official_key_to_ours("masqclip.mask_embeddings") == "masq.mask_pos_embed"
    assert official_key_to_ours("something.else") is None


def test_read_official_checkpoint_forms(tmp_path):
    state = {"backbone.stem.conv1.weight": torch.zeros(2, 3, 7, 7)}
    torch.save({"model": state, "iteration": 5}, tmp_path / "wrapped.pth")
    torch.save(state, tmp_path / "bare.pth")
    for name in ("wrapped.pth", "bare.pth"):
        assert list(read_official_checkpoint(tmp_path / name)) == ["backbone.stem.conv1.weight"]
    (tmp_path / "junk.pth").write_bytes(b"not a checkpoint")
    with pytest.raises(ConversionError, match="junk.pth: not a loadable PyTorch checkpoint"):
        read_official_checkpoint(tmp_path / "junk.pth")
    torch.save({"model": {"a": torch.zeros(1), "b": 3}}, tmp_path / "mixed.pth")
    with pytest.raises(ConversionError, match="mixed.pth: entries that are not tensors: b"):
        read_official_checkpoint(tmp_path / "mixed.pth")
    with pytest.raises(ConversionError, match="absent.pth: checkpoint file not found"):
        read_official_checkpoint(tmp_path / "absent.pth")


@pytest.mark.parametrize("case_dir", golden_cases())
def test_renamed_and_misshaped_keys_are_refused_by_name(case_dir):
    case = load_case(case_dir)
    renamed = dict(case.state_dict)
    renamed["sem_seg_head.predictor.query_feat.weightx"] = renamed.pop("sem_seg_head.predictor.query_feat.weight")
    with pytest.raises(ConversionError, match=r"unknown key 'sem_seg_head.predictor.query_feat.weightx'.*"
                                              r"proposals.predictor.query_feat.weight"):
        convert_official(renamed, **_kwargs(case))
    misshaped = dict(case.state_dict)
    key = "masqclip.visual.transformer.resblocks.0.attn.new_q_proj.weight"
    misshaped[key] = misshaped[key][:, :-1].clone()
    with pytest.raises(ConversionError, match=f"'{key}' has shape"):
        convert_official(misshaped, **_kwargs(case))


@pytest.mark.parametrize("case_dir", golden_cases())
def test_allow_partial_reports_what_was_left_at_init(case_dir):
    case = load_case(case_dir)
    state = dict(case.state_dict)
    del state["masqclip.mask_embeddings"]
    state["extra.thing"] = torch.zeros(3)
    model, report = convert_official(state, allow_partial=True, **_kwargs(case))
    assert report.left_at_init == ["masq.mask_pos_embed"]
    assert report.unknown == ["extra.thing"]
    lines = "\n".join(report.lines())
    assert "left at initial values: masq.mask_pos_embed" in lines and "unknown key skipped: extra.thing" in lines


@pytest.mark.parametrize("case_dir", golden_cases())
def test_proposal_only_checkpoint_converts(case_dir):
    case = load_case(case_dir)
    state = {k: v for k, v in case.state_dict.items() if not k.startswith("masqclip.")}
    model, report = convert_official(state, **_kwargs(case))
    assert report.kind == "proposals" and report.complete
    assert any("untuned" in line for line in report.lines())
    # the proposal weights are the file's
    got = model.proposals.state_dict()["predictor.query_feat.weight"]
    assert torch.equal(got, case.state_dict["sem_seg_head.predictor.query_feat.weight"])


@pytest.mark.parametrize("case_dir", golden_cases())
def test_official_to_ours_to_loaded_model_gives_identical_outputs(case_dir, tmp_path):
    case = load_case(case_dir)
    src = tmp_path / "model_final.pth"
    torch.save({"model": case.state_dict, "iteration": 0}, src)
    report = convert_checkpoint_file(src, tmp_path / "ours.safetensors", **_kwargs(case))
    assert report.complete
    direct, _ = convert_official(case.state_dict, **_kwargs(case))
    loaded = load_model(tmp_path / "ours.safetensors")
    vocab = load_vocabulary("cat; dog; road [stuff]")
    direct.set_vocabulary(vocab)
    loaded.set_vocabulary(vocab)
    images = [inp["image"] for inp in case.inputs]
    for a, b in zip(direct(images, return_aux=True), loaded(images, return_aux=True)):
        assert torch.equal(a.mask_logits, b.mask_logits)
        assert torch.equal(a.embeddings, b.embeddings)
        assert torch.equal(a.p_cls, b.p_cls)


@pytest.mark.parametrize("case_dir", golden_cases())
def test_cli_convert_writes_model_and_report(case_dir, tmp_path):
    case = load_case(case_dir)
    src = tmp_path / "model_final.pth"
    torch.save(case.state_dict, src)
    (tmp_path / "proposals.json").write_text(json.dumps(case.config))
    (tmp_path / "clip.json").write_text(json.dumps(case_clip_config(case)))
    args = ["convert", str(src), "--out", str(tmp_path / "m.safetensors"), "--proposals",
            str(tmp_path / "proposals.json"), "--clip-model", str(tmp_path / "clip.json"), "--clip-weights", "none"]
    result = runner.invoke(app, args, env={"COLUMNS": "200"})
    assert result.exit_code == 0, result.output
    assert "tensors loaded" in result.stderr and (tmp_path / "m.safetensors").is_file()
    torch.save({"model": {"bogus": torch.zeros(1)}}, tmp_path / "bad.pth")
    args[1] = str(tmp_path / "bad.pth")
    result = runner.invoke(app, args, env={"COLUMNS": "300"})
    assert result.exit_code == 2 and "unknown key 'bogus'" in result.stderr


def test_registered_model_without_weights_says_what_to_do(tmp_path, monkeypatch):
    monkeypatch.setenv("MASQCLIP_MODELS_DIR", str(tmp_path / "models"))
    with pytest.raises(ModelNotAvailableError, match=r"masqclip-coco.safetensors is missing.*drive.google.com.*"
                                                     r"masqclip convert"):
        load_model("masqclip-coco")
    result = runner.invoke(app, ["models"], env={"COLUMNS": "250"})
    assert result.exit_code == 0
    assert "masqclip-coco" in result.output and "tiny-random" in result.output
    assert "masqclip convert model_final.pth" in result.output
    with pytest.raises(ModelNotAvailableError, match="no such model file or registered model"):
        load_model(tmp_path / "nope.safetensors")


def test_tiny_random_model_runs_with_a_typed_vocabulary():
    model = load_model("tiny-random")
    model.set_vocabulary(load_vocabulary("person; car, automobile; road [stuff]"))
    gen = torch.Generator().manual_seed(0)
    (out,) = model([torch.randint(0, 256, (3, 50, 70), generator=gen, dtype=torch.uint8)])
    q = out.mask_logits.shape[0]
    assert out.padded_size == (64, 96) and out.mask_logits.shape[1:] == (16, 24)
    assert out.p_cls.shape == (q, 3) and out.clip_log_probs.shape == (q, 4)
    # p_cls = p_obj * p_clip without background: rows sum to p_obj * (1 - p_background)
    expected = out.p_obj * (1 - out.clip_log_probs[:, -1].exp())
    assert torch.allclose(out.p_cls.sum(-1), expected, atol=1e-6)


def test_bf16_precision_runs_and_stays_close_to_fp32():
    vocab = load_vocabulary("person; car; road [stuff]")
    image = torch.randint(0, 256, (3, 64, 80), generator=torch.Generator().manual_seed(1), dtype=torch.uint8)
    outs = {}
    for precision in ("fp32", "bf16"):
        model = load_model("tiny-random", precision=precision)
        assert model.masq.visual.conv1.weight.dtype == (torch.bfloat16 if precision == "bf16" else torch.float32)
        model.set_vocabulary(vocab)
        (outs[precision],) = model([image])
    assert outs["bf16"].p_cls.dtype == torch.float32 and torch.isfinite(outs["bf16"].p_cls).all()
    cos = torch.nn.functional.cosine_similarity(outs["fp32"].embeddings, outs["bf16"].embeddings, dim=-1)
    assert cos.min() > 0.95
    with pytest.raises(ValueError, match="unknown precision"):
        load_model("tiny-random", precision="fp8")
