"""Text classifier: synonym/template averaging by hand, the background column, the on-disk cache."""

import warnings

import pytest
import torch
import torch.nn.functional as F

from masqclip_cli.modeling.clip_loader import get_tokenizer
from masqclip_cli.modeling.text import TextEmbeddingCache, TextEncoder, build_text_embeddings
from masqclip_cli.vocab import load_vocabulary, parse_text


def _raw(model, tokenizer, text):
    with torch.no_grad():
        return model.encode_text(tokenizer([text]))[0].float()


@pytest.fixture
def encoder(tiny_clip):
    model, spec = tiny_clip
    return TextEncoder(model, get_tokenizer(spec), spec.weights_id)


def test_synonyms_are_averaged_before_normalising(encoder):
    vocab = load_vocabulary("car, automobile; road [stuff]; sky: clouds, fog [stuff]")
    emb = build_text_embeddings(vocab, encoder)
    m, t = encoder.model, encoder.tokenizer
    car = F.normalize((_raw(m, t, "car") + _raw(m, t, "automobile")) / 2, dim=0)
    road = F.normalize(_raw(m, t, "road"), dim=0)
    # the colon form encodes only the names after the colon: "sky" itself is not encoded
    sky = F.normalize((_raw(m, t, "clouds") + _raw(m, t, "fog")) / 2, dim=0)
    background = F.normalize(_raw(m, t, "background"), dim=0)
    assert emb.shape == (4, 32)
    for row, want in zip(emb, [car, road, sky, background]):
        assert torch.allclose(row, want, atol=1e-5)
    # averaging before normalising is not the same as averaging normalised vectors (the test would notice)
    alt = F.normalize(F.normalize(_raw(m, t, "car"), dim=0) + F.normalize(_raw(m, t, "automobile"), dim=0), dim=0)
    assert not torch.allclose(alt, car, atol=1e-4)


def test_templates_average_over_names_and_templates(encoder):
    vocab = load_vocabulary("dog, puppy;")
    templates = ["a photo of a {}.", "there is a {} in the scene"]
    emb = build_text_embeddings(vocab, encoder, templates=templates)
    m, t = encoder.model, encoder.tokenizer
    texts = [tpl.format(n) for n in ("dog", "puppy") for tpl in templates]
    want = F.normalize(torch.stack([_raw(m, t, x) for x in texts]).mean(0), dim=0)
    assert torch.allclose(emb[0], want, atol=1e-5)
    bg = F.normalize(torch.stack([_raw(m, t, tpl.format("background")) for tpl in templates]).mean(0), dim=0)
    assert torch.allclose(emb[1], bg, atol=1e-5)


def test_batching_gives_the_same_embeddings(encoder):
    vocab = load_vocabulary("a; b, c; d; e, f, g; h")
    one = build_text_embeddings(vocab, encoder, batch_size=1000)
    calls = encoder.calls
    small = build_text_embeddings(vocab, encoder, batch_size=3, progress=True)
    assert encoder.calls - calls == 3  # 8 names + background = 9 texts in batches of 3
    assert torch.allclose(one, small, atol=1e-5)


def test_cache_hits_on_second_call(tiny_clip, tmp_path):
    model, spec = tiny_clip
    cache = TextEmbeddingCache(tmp_path / "cache")
    vocab = load_vocabulary("person; car, automobile; road [stuff]")
    first = TextEncoder(model, get_tokenizer(spec), spec.weights_id)
    a = build_text_embeddings(vocab, first, cache=cache)
    assert first.calls == 1
    assert len(list((tmp_path / "cache").glob("*.safetensors"))) == 1

    second = TextEncoder(model, get_tokenizer(spec), spec.weights_id)
    b = build_text_embeddings(vocab, second, cache=cache)
    assert second.calls == 0  # nothing encoded
    assert torch.equal(a, b)

    # anything in the key changes -> encoded again
    build_text_embeddings(vocab, second, cache=cache, templates=["a {}"])
    assert second.calls == 1
    build_text_embeddings(load_vocabulary("person; car; road [stuff]"), second, cache=cache)
    assert second.calls == 2
    other_model = TextEncoder(model, get_tokenizer(spec), "another-weights")
    build_text_embeddings(vocab, other_model, cache=cache)
    assert other_model.calls == 1


def test_default_cache_dir_from_environment(tiny_clip, tmp_path, monkeypatch):
    monkeypatch.setenv("MASQCLIP_CACHE_DIR", str(tmp_path / "envcache"))
    model, spec = tiny_clip
    enc = TextEncoder(model, get_tokenizer(spec), spec.weights_id)
    build_text_embeddings(load_vocabulary("cat;"), enc, cache=TextEmbeddingCache())
    assert len(list((tmp_path / "envcache" / "text").glob("*.safetensors"))) == 1


def test_corrupt_cache_entry_is_recomputed(encoder, tmp_path):
    cache = TextEmbeddingCache(tmp_path)
    vocab = load_vocabulary("cat; dog")
    good = build_text_embeddings(vocab, encoder, cache=cache)
    (entry,) = tmp_path.glob("*.safetensors")
    entry.write_bytes(b"garbage")
    calls = encoder.calls
    with pytest.warns(UserWarning, match="unreadable text-embedding cache entry"):
        again = build_text_embeddings(vocab, encoder, cache=cache)
    assert encoder.calls == calls + 1
    assert torch.allclose(good, again)


def test_name_longer_than_context_warns_with_file_and_line(encoder):
    long_name = " ".join(["word"] * 90)
    vocab = parse_text(f"cat\n{long_name}\n", source="classes.txt")
    with pytest.warns(UserWarning, match=r"classes.txt:2: .*longer than the CLIP context.*truncated"):
        emb = build_text_embeddings(vocab, encoder)
    assert torch.isfinite(emb).all()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        build_text_embeddings(parse_text("cat\ndog\n", source="ok.txt"), encoder)


def test_trimmed_encoding_equals_the_full_context_in_input_order(encoder):
    """Names of very different lengths, in batches of 3 (sorted by length inside encode): every row equals open_clip's
    full 77-token encode_text of that name, in the order given."""
    names = ["a photo of a small red car parked on a wet road at night", "sky", "traffic light", "x",
             "two large wooden chairs", "person", "b c d e f g h i j k", "road"]
    got = encoder.encode(names, batch_size=3)
    with torch.no_grad():
        want = encoder.model.encode_text(encoder.tokenizer(names)).float()
    assert got.shape == want.shape
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    assert encoder.calls == 3


def test_trimmed_encoding_falls_back_without_a_causal_mask(tiny_clip):
    """Without a causal mask the padding columns matter: encode_text_trimmed must run the whole context."""
    from masqclip_cli.modeling.text import encode_text_trimmed

    model, spec = tiny_clip
    tokens = get_tokenizer(spec)(["sky", "a red car on the road"])
    saved = model.attn_mask
    try:
        model.attn_mask = None
        with torch.no_grad():
            assert torch.equal(encode_text_trimmed(model, tokens), model.encode_text(tokens))
    finally:
        model.attn_mask = saved
