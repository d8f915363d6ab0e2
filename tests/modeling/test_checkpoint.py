"""Our model file: save → load gives identical outputs; the header is checked; writes are atomic."""

import json

import pytest
import torch
from safetensors.torch import save_file
from typer.testing import CliRunner

from masqclip_cli.cli import app
from masqclip_cli.modeling.checkpoint import ModelFileError, load_model_file, read_header, save_model_file
from masqclip_cli.modeling.clip_loader import get_tokenizer
from masqclip_cli.modeling.masq_visual import MasQVisual
from masqclip_cli.modeling.text import TextEncoder, build_text_embeddings
from masqclip_cli.vocab import load_vocabulary


def _perturb(module: torch.nn.Module, seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=gen))


def _inputs(masq: MasQVisual, q: int = 5):
    gen = torch.Generator().manual_seed(3)
    pixels = torch.randn(2, 3, masq.image_size, masq.image_size, generator=gen)
    allowed = masq.attention_masks(torch.randn(2, q, 16, 20, generator=gen))
    return pixels, allowed


def test_round_trip_with_text_tower_and_vocabulary(tiny_clip, tmp_path):
    model, spec = tiny_clip
    masq = MasQVisual(model.visual, fq_init="copy")
    _perturb(masq, 1)  # trained-looking f_Q', mask position embedding and CLIP weights
    vocab = load_vocabulary("person; car, automobile; road [stuff]")
    encoder = TextEncoder(model, get_tokenizer(spec), spec.weights_id)
    text = build_text_embeddings(vocab, encoder)
    path = save_model_file(tmp_path / "m.safetensors", masq, spec, clip_model=model, vocabulary=vocab,
                           text_embeddings=text, thresholds={"object_mask_threshold": 0.5})
    assert [p.name for p in tmp_path.iterdir()] == ["m.safetensors"]  # no temporary file left behind

    parts = load_model_file(path)
    pixels, allowed = _inputs(masq)
    with torch.no_grad():
        assert torch.equal(masq(pixels, allowed), parts.masq_visual(pixels, allowed))
        assert torch.equal(masq.encode_image(pixels), parts.masq_visual.encode_image(pixels))
    assert parts.vocabulary == vocab
    assert torch.equal(parts.text_embeddings, text)
    assert parts.thresholds["object_mask_threshold"] == 0.5 and parts.thresholds["overlap_threshold"] == 0.3
    assert parts.config["clip"]["model_cfg"]["quick_gelu"] is True
    # the stored text tower re-encodes the vocabulary to the same embeddings
    assert torch.allclose(build_text_embeddings(vocab, parts.text_encoder), text, atol=1e-6)
    # the text-cache identity of a model file is stable across loads
    assert load_model_file(path).text_encoder.model_id == parts.text_encoder.model_id
    # every parameter equal, including the frozen CLIP ones
    for key, value in masq.state_dict().items():
        assert torch.equal(value, parts.masq_visual.state_dict()[key]), key


def test_round_trip_visual_only_random_fq_and_kv(tiny_clip, tmp_path):
    model, spec = tiny_clip
    masq = MasQVisual(model.visual, fq_init="random", extra_projections=("k", "v"))
    _perturb(masq, 2)
    path = save_model_file(tmp_path / "v.safetensors", masq, spec)
    parts = load_model_file(path)
    assert parts.text_encoder is None and parts.vocabulary is None and parts.text_embeddings is None
    assert parts.masq_visual.fq_init == "random" and parts.masq_visual.extra_projections == ("k", "v")
    pixels, allowed = _inputs(masq, q=3)
    with torch.no_grad():
        assert torch.equal(masq(pixels, allowed), parts.masq_visual(pixels, allowed))


def test_proposals_state_is_kept(tiny_clip, tmp_path):
    model, spec = tiny_clip
    masq = MasQVisual(model.visual)
    proposals = {"backbone.stem.conv1.weight": torch.randn(4, 3, 7, 7)}
    path = save_model_file(tmp_path / "p.safetensors", masq, spec, proposals=proposals,
                           proposals_config={"name": "tiny"})
    parts = load_model_file(path)
    assert parts.proposals_config == {"name": "tiny"}
    assert torch.equal(parts.proposals_state["backbone.stem.conv1.weight"], proposals["backbone.stem.conv1.weight"])


def test_overwrite_is_atomic_and_header_readable(tiny_clip, tmp_path):
    model, spec = tiny_clip
    masq = MasQVisual(model.visual)
    path = tmp_path / "m.safetensors"
    save_model_file(path, masq, spec)
    save_model_file(path, masq, spec, thresholds={"overlap_threshold": 0.8})
    assert read_header(path)["thresholds"]["overlap_threshold"] == 0.8
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.safetensors"]
    result = CliRunner().invoke(app, ["model", "info", str(path)], env={"COLUMNS": "200"})
    assert result.exit_code == 0 and "quick_gelu" in result.output and "True" in result.output


def test_bad_files_are_named(tmp_path):
    with pytest.raises(ModelFileError, match="nothing.safetensors: model file not found"):
        read_header(tmp_path / "nothing.safetensors")
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"\x00" * 64)
    with pytest.raises(ModelFileError, match="junk.safetensors: not a safetensors model file"):
        read_header(junk)
    foreign = tmp_path / "foreign.safetensors"
    save_file({"x": torch.zeros(1)}, str(foreign))
    with pytest.raises(ModelFileError, match="foreign.safetensors: not a masqclip model file"):
        load_model_file(foreign)
    future = tmp_path / "future.safetensors"
    save_file({"x": torch.zeros(1)}, str(future),
              metadata={"format": "masqclip", "format_version": "99", "config": json.dumps({})})
    with pytest.raises(ModelFileError, match="format version 99 is newer"):
        read_header(future)


def test_mismatched_tensors_are_refused(tiny_clip, tmp_path):
    model, spec = tiny_clip
    masq = MasQVisual(model.visual)
    path = save_model_file(tmp_path / "m.safetensors", masq, spec)
    from safetensors.torch import load_file

    tensors = load_file(str(path))
    del tensors["masq.q_proj_new.0.weight"]
    from safetensors import safe_open

    with safe_open(str(path), "pt") as f:
        meta = f.metadata()
    broken = tmp_path / "broken.safetensors"
    save_file(tensors, str(broken), metadata=meta)
    with pytest.raises(ModelFileError, match="broken.safetensors: MasQ tensors do not match"):
        load_model_file(broken)


@pytest.mark.parametrize("tune", ["k", "clip"])
def test_round_trip_keeps_the_tune_mode(tiny_clip, tmp_path, tune):
    model, spec = tiny_clip
    masq = MasQVisual(model.visual, tune=tune)
    _perturb(masq, 4)
    parts = load_model_file(save_model_file(tmp_path / f"{tune}.safetensors", masq, spec))
    assert parts.masq_visual.tune == tune
    names = {n for n, p in parts.masq_visual.named_parameters() if p.requires_grad}
    assert names == {n for n, p in masq.named_parameters() if p.requires_grad}
    pixels, allowed = _inputs(masq, q=3)
    with torch.no_grad():
        assert torch.equal(masq(pixels, allowed), parts.masq_visual(pixels, allowed))


def test_half_storage_halves_the_file_and_reads_back_float32(tiny_clip, tmp_path):
    model, spec = tiny_clip
    masq = MasQVisual(model.visual, fq_init="copy")
    _perturb(masq, 4)
    vocab = load_vocabulary("person; car")
    text = build_text_embeddings(vocab, TextEncoder(model, get_tokenizer(spec), spec.weights_id))
    full = save_model_file(tmp_path / "full.safetensors", masq, spec, clip_model=model, vocabulary=vocab,
                           text_embeddings=text)
    half = save_model_file(tmp_path / "half.safetensors", masq, spec, clip_model=model, vocabulary=vocab,
                           text_embeddings=text, storage_dtype=torch.float16)
    assert half.stat().st_size < 0.55 * full.stat().st_size
    assert read_header(half)["storage_dtype"] == "float16" and "storage_dtype" not in read_header(full)
    parts = load_model_file(half)
    for key, value in masq.state_dict().items():
        loaded = parts.masq_visual.state_dict()[key]
        assert loaded.dtype == value.dtype  # read back in the model's own dtype
        assert torch.equal(loaded, value.half().to(value.dtype)), key  # the nearest float16 value, nothing else
    assert parts.text_embeddings.dtype == torch.float32
    assert torch.equal(parts.text_embeddings, text.half().float())
    # the text tower's identity (text-cache key) is that of the values stored, so the two files never share a cache
    assert parts.text_encoder.model_id != load_model_file(full).text_encoder.model_id


def test_test_size_is_stored_and_read(tiny_clip, tmp_path):
    model, spec = tiny_clip
    masq = MasQVisual(model.visual)
    path = save_model_file(tmp_path / "s.safetensors", masq, spec, test_size={"short_side": 128, "max_size": 512})
    assert load_model_file(path).test_size == {"short_side": 128, "max_size": 512}
    assert load_model_file(save_model_file(tmp_path / "n.safetensors", masq, spec)).test_size is None
