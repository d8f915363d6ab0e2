"""Vocabularies of any size (issue 17): palette colours that never run out, labels ids that must fit 16 bits, long
class names shortened in messages, and a bounded fuzz test of the vocabulary readers."""

from __future__ import annotations

import colorsys
import json
import time
import warnings

import numpy as np
import pytest

from masqclip_cli import vocab as vocab_mod
from masqclip_cli.io.writers.labels import MAX_LABEL_ID, LabelsWriter, check_labels_vocabulary
from masqclip_cli.vocab import (
    FIRST_PALETTE_SIZE,
    LATER_PALETTE_SIZE,
    VocabClass,
    Vocabulary,
    VocabularyError,
    load_vocabulary,
    parse_inline,
    short_name,
)

# --- the oracle: the palette as it was before issue 17, copied verbatim (bar the step cap) -------------------------


def old_palette(n: int, max_steps: int | None = None) -> list[tuple[int, int, int]]:
    """The pre-issue-17 ``_palette``: loops forever for n > 2,856 unless ``max_steps`` caps it."""
    golden = 0.6180339887498949
    levels = ((0.85, 0.95), (0.55, 0.80), (0.95, 0.65))
    out: list[tuple[int, int, int]] = []
    seen: set[tuple[int, int, int]] = set()
    i = 0
    while len(out) < n and (max_steps is None or i < max_steps):
        s, v = levels[i % len(levels)]
        r, g, b = colorsys.hsv_to_rgb((i * golden) % 1.0, s, v)
        color = (round(r * 255), round(g * 255), round(b * 255))
        if color not in seen:
            seen.add(color)
            out.append(color)
        i += 1
    return out


def numbered_vocabulary(n: int) -> Vocabulary:
    return Vocabulary([VocabClass(f"class {i}") for i in range(n)], source="numbered")


def fresh_colors(n: int) -> tuple[list[tuple[int, int, int]], float]:
    """``numbered_vocabulary(n).colors()`` computed from scratch, and the seconds it took."""
    vocab = numbered_vocabulary(n)
    vocab_mod._palette.cache_clear()
    start = time.perf_counter()
    colors = vocab.colors()
    return colors, time.perf_counter() - start


def later_oracle(count: int) -> np.ndarray:
    """(count, 3) int: the documented later-colour scheme, written independently with numpy: candidate k's bit i goes
    to bit 7 - i // 3 of channel i % 3, channels are 255 minus that; dark, grey and first-ring candidates dropped."""
    k = np.arange(min(1 << 24, 8 * count + 64), dtype=np.int64)
    channels = np.zeros((len(k), 3), dtype=np.int64)
    for i in range(24):
        channels[:, i % 3] |= ((k >> i) & 1) << (7 - i // 3)
    rgb = 255 - channels
    high, low = rgb.max(axis=1), rgb.min(axis=1)
    keep = (high >= 128) & (high - low >= 64)
    for ring in ((242, 36), (204, 92), (166, 8)):
        keep &= ~((high == ring[0]) & (low == ring[1]))
    assert keep.sum() >= count
    return rgb[keep][:count]


# --- colours ---------------------------------------------------------------------------------------------------------


def test_first_scheme_has_exactly_2856_colours():
    """The old loop, run 10x longer than it needs, finds 2,856 colours and no more: today's limit."""
    colors = old_palette(10**6, max_steps=200_000)
    assert len(colors) == FIRST_PALETTE_SIZE == 2856
    assert {(max(c), min(c)) for c in colors} == {(242, 36), (204, 92), (166, 8)}


@pytest.mark.parametrize("n", [1, 2, 3, 150, 847, 2855, 2856])
def test_colours_up_to_today_limit_are_unchanged(n):
    assert numbered_vocabulary(n).colors() == old_palette(n)


@pytest.mark.parametrize("n", [3_000, 20_000, 100_000])
def test_big_vocabularies_get_colours_fast_and_distinct(n):
    colors, seconds = fresh_colors(n)
    assert seconds < 2.0, f"{n} colours took {seconds:.2f} s"  # measured 0.13 / 0.13 / 0.20 s (2 cores)
    assert len(colors) == n
    assert all(type(x) is int and 0 <= x <= 255 for c in colors for x in c)
    assert colors[:2856] == old_palette(2856)  # a prefix: the first classes keep their colours
    assert len(set(colors)) == n  # no duplicate at all (the later scheme repeats after 13.1 million)
    later = np.array(colors[2856:])
    np.testing.assert_array_equal(later, later_oracle(n - 2856))
    assert later.max(axis=1).min() >= 128  # never dark
    assert (later.max(axis=1) - later.min(axis=1)).min() >= 64  # never grey
    step = np.abs(np.diff(later, axis=0)).max(axis=1)
    assert step.min() >= 64  # consecutive classes differ by at least 64 in some channel


def test_later_colours_start_on_the_coarse_lattice():
    """Hand-computed: candidates 0..7 are the 2x2x2 lattice {255, 127}^3; white and (127, 127, 127) are grey."""
    colors = numbered_vocabulary(2856 + 6).colors()[2856:]
    assert colors == [(127, 255, 255), (255, 127, 255), (127, 127, 255), (255, 255, 127), (127, 255, 127),
                      (255, 127, 127)]


def test_later_palette_size_is_the_allowed_part_of_the_cube():
    values = np.arange(256, dtype=np.int16)
    r, g, b = np.meshgrid(values, values, values, indexing="ij", sparse=True)
    high = np.maximum(np.maximum(r, g), b)
    low = np.minimum(np.minimum(r, g), b)
    allowed = (high >= 128) & (high - low >= 64)
    for ring in ((242, 36), (204, 92), (166, 8)):
        allowed &= ~((high == ring[0]) & (low == ring[1]))
    assert int(allowed.sum()) == LATER_PALETTE_SIZE


def test_given_colours_still_win_in_big_vocabularies():
    classes = [VocabClass(f"c{i}", color=(1, 2, 3) if i == 5000 else None) for i in range(6000)]
    colors = Vocabulary(classes).colors()
    assert colors[5000] == (1, 2, 3)
    assert colors[:5000] == numbered_vocabulary(5000).colors()


def test_vocab_show_of_3000_classes_ends(tmp_path):
    """The CLI command that hung: it now prints every class with its colour."""
    from typer.testing import CliRunner

    from masqclip_cli.cli import app

    path = tmp_path / "big.txt"
    path.write_text("\n".join(f"class {i}" for i in range(3000)) + "\n", encoding="utf-8")
    result = CliRunner().invoke(app, ["vocab", "show", str(path)], env={"COLUMNS": "200"})
    assert result.exit_code == 0, result.output
    assert "3000 classes" in result.output
    expected = "#{:02x}{:02x}{:02x}".format(*numbered_vocabulary(3000).colors()[2999])
    assert expected in result.output.splitlines()[-2]


# --- labels: ids must fit 16 bits ------------------------------------------------------------------------------------


def test_labels_refuses_ids_above_65535_when_built(tmp_path):
    vocab = Vocabulary([VocabClass("cat", id=7), VocabClass("dog", id=70_000), VocabClass("cow", id=70_001)],
                       source="big-ids.json")
    with pytest.raises(ValueError) as info:
        LabelsWriter(tmp_path / "out", vocab)
    message = str(info.value)
    assert "\n" not in message
    assert message == ("big-ids.json: class 'dog' has category id 70000 (and 1 more above 65535), but labels PNGs "
                       "are 16-bit (ids up to 65535); use --format panoptic, or a vocabulary with smaller ids")
    assert not (tmp_path / "out").exists()  # refused before anything is written
    with pytest.raises(ValueError, match="class 'dog' has category id 70000"):
        check_labels_vocabulary(vocab)


def test_labels_accepts_65535_as_uint16(tmp_path):
    vocab = Vocabulary([VocabClass("cat", id=1), VocabClass("dog", id=MAX_LABEL_ID)])
    assert check_labels_vocabulary(vocab) == [1, 65535]
    assert LabelsWriter(tmp_path, vocab).dtype == np.uint16


def test_labels_error_shortens_a_long_class_name(tmp_path):
    name = "x" * 10_000
    with pytest.raises(ValueError) as info:
        LabelsWriter(tmp_path, Vocabulary([VocabClass(name, id=100_000)]))
    assert len(str(info.value)) < 300 and "xxx..." in str(info.value)
    with pytest.raises(ValueError) as info:
        LabelsWriter(tmp_path, Vocabulary([VocabClass(name, id=0), VocabClass("b", id=1)]))
    assert len(str(info.value)) < 300 and "id 0" in str(info.value)


# --- long names in messages ------------------------------------------------------------------------------------------


def test_short_name():
    assert short_name("person") == "person"
    assert short_name("a  b\n\tc") == "a b c"
    assert short_name("a" * 60) == "a" * 60
    assert short_name("a" * 61) == "a" * 57 + "..."
    assert short_name("abcd efgh", limit=8) == "abcd..."  # no space before the dots
    assert len(short_name("y" * 10_000, limit=100)) == 100


def error_of(fn, *args) -> str:
    with pytest.raises(VocabularyError) as info:
        fn(*args)
    message = str(info.value)
    assert "\n" not in message
    return message


LONG = "n" * 10_000


@pytest.mark.parametrize(
    "spec, problem",
    [
        (f"{LONG}; {LONG}", "duplicate class 'nnn"),
        (f"a [{LONG}]", "unknown marker '[nnn"),
        (f"{LONG}] x", "unexpected '[' or ']' in 'nnn"),
        (f"a; {LONG}, , b", "empty name in 'nnn"),
        (f"{LONG}:  ", "label 'nnn"),
    ],
    ids=["duplicate", "marker", "bracket", "empty-name", "label"],
)
def test_inline_errors_quote_long_names_short(spec, problem):
    message = error_of(parse_inline, spec)
    assert problem in message and len(message) < 300
    assert "..." in message


def test_json_and_text_errors_quote_long_values_short(tmp_path):
    bad_json = tmp_path / "v.json"
    for item in ({"name": "a", "isthing": LONG}, {"name": "a", "id": LONG}, {"name": "a", "color": [LONG, 1, 2]},
                 {"name": "a", "encode_name": LONG}, {"name": "a", "min_score": LONG}):
        bad_json.write_text(json.dumps([item]), encoding="utf-8")
        message = error_of(load_vocabulary, str(bad_json))
        assert message.startswith(f"{bad_json}: item 1: '") and len(message) < 300 + len(str(bad_json)), message
    text = tmp_path / "v.txt"
    text.write_text(f"ok\n{LONG}, {LONG} [x]\n", encoding="utf-8")
    message = error_of(load_vocabulary, str(text))
    assert message.startswith(f"{text}:2: unknown marker") and len(message) < 300 + len(str(text))
    missing = "d/" + "p" * 10_000 + ".txt"
    message = error_of(load_vocabulary, missing)
    assert message.endswith(": no such vocabulary file") and len(message) < 300


def test_json_that_python_cannot_decode_is_a_vocabulary_error(tmp_path):
    path = tmp_path / "v.json"
    path.write_text("[" * 100_000, encoding="utf-8")
    assert error_of(load_vocabulary, str(path)) == f"{path}: invalid JSON: nested too deeply"
    path.write_text('[{"name": "a", "id": ' + "9" * 5000 + "}]", encoding="utf-8")
    assert error_of(load_vocabulary, str(path)).startswith(f"{path}: invalid JSON: Exceeds the limit")


class _FakeEncoder:
    """A text encoder for ``_check_lengths``: 77-token context, one token per character."""

    context_length = 77

    @staticmethod
    def token_count(text: str) -> int:
        return len(text)


def test_too_long_class_name_warning_is_short():
    from masqclip_cli.modeling.text import _check_lengths

    vocab = Vocabulary([VocabClass("ok"), VocabClass("w" * 10_000, line=2)], source="names.txt")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        _check_lengths(vocab, _FakeEncoder(), None)
    assert len(caught) == 1
    message = str(caught[0].message)
    assert message.startswith("names.txt:2: class name 'www") and "10000 tokens" in message
    assert "\n" not in message and len(message) < 300


# --- fuzz: the readers raise VocabularyError or succeed --------------------------------------------------------------

TEXT_SAMPLE = """# a vocabulary
person
car, automobile
tree-merged: branch, tree, bush [stuff]
road [stuff]
sky [ Stuff ]   # comment
"""
JSON_SAMPLE = json.dumps(
    {"categories": [
        {"name": "person", "id": 1, "isthing": 1, "color": [220, 20, 60], "supercategory": "person"},
        {"name": "car", "synonyms": ["automobile"], "id": 3, "min_score": 0.5},
        {"name": "tree-merged", "synonyms": ["tree", "bush"], "encode_name": False, "isthing": False, "id": 7},
        {"name": "sky", "id": 8},
    ]},
    indent=1,
)
INLINE_SAMPLE = "person; car, automobile; road [stuff]; tree-merged: tree, bush [stuff]"
SPECIAL = "[]:;,#{}\"'\\\n\t \x00\ufeff\u2028,[thing][stuff]0-1.5e9"
FIELDS = ("name", "id", "color", "synonyms", "isthing", "encode_name", "min_score", "supercategory", "categories")


def test_fuzz_samples_are_valid(tmp_path):
    """The samples the fuzz tests mutate load as they are (the mutations start from a working case)."""
    (tmp_path / "v.json").write_text(JSON_SAMPLE, encoding="utf-8")
    (tmp_path / "v.txt").write_text(TEXT_SAMPLE, encoding="utf-8")
    assert load_vocabulary(str(tmp_path / "v.json")).ids == [1, 3, 7, 8]
    assert load_vocabulary(str(tmp_path / "v.txt")).names == ["person", "car", "tree-merged", "road", "sky"]
    assert parse_inline(INLINE_SAMPLE).names == ["person", "car", "road", "tree-merged"]


def check_result(load, *args) -> bool:
    """``load(*args)`` gives a usable vocabulary (True) or a one-line VocabularyError (False); nothing else."""
    try:
        vocab = load(*args)
    except VocabularyError as exc:
        message = str(exc)
        assert message and "\n" not in message and "\r" not in message
        assert len(message) < 600, message
        return False
    assert isinstance(vocab, Vocabulary) and len(vocab) >= 1
    colors = vocab.colors()
    assert len(colors) == len(vocab)
    assert all(len(c) == 3 and all(type(x) is int and 0 <= x <= 255 for x in c) for c in colors)
    assert all(type(i) is int and i >= 0 for i in vocab.ids) and len(set(vocab.ids)) == len(vocab)
    assert all(name.strip() and "\n" not in name for name in vocab.names)
    assert all(vocab.prompts) and all(p.strip() for prompts in vocab.prompts for p in prompts)
    assert Vocabulary.from_json(vocab.to_json()) == vocab  # what was read can be written and read back
    return True


def fuzz_tools(max_examples: int = 100):
    """(given, settings, strategies, mutated): hypothesis, skipping the test when it is not installed."""
    hypothesis = pytest.importorskip("hypothesis")
    st = hypothesis.strategies

    @st.composite
    def mutated(draw, sample: str, max_edits: int = 8) -> str:
        """``sample`` after 1 to ``max_edits`` random edits (insert / delete / replace / duplicate a span), biased
        to syntax characters."""
        text = sample
        for _ in range(draw(st.integers(1, max_edits))):
            at = draw(st.integers(0, len(text)))
            op = draw(st.sampled_from(["insert", "delete", "replace", "duplicate"]))
            piece = draw(st.text(alphabet=st.one_of(st.sampled_from(SPECIAL), st.characters()), min_size=1, max_size=6))
            end = min(len(text), at + draw(st.integers(1, 12)))
            if op == "insert":
                text = text[:at] + piece + text[at:]
            elif op == "delete":
                text = text[:at] + text[end:]
            elif op == "replace":
                text = text[:at] + piece + text[end:]
            else:
                text = text[:end] + text[at:end] + text[end:]
        return text

    settings = hypothesis.settings(max_examples=max_examples, deadline=None, database=None)
    return hypothesis.given, settings, st, mutated


def test_fuzz_text_files(tmp_path):
    given, settings, st, mutated = fuzz_tools()
    path = tmp_path / "vocab.txt"
    loaded = []

    @settings
    @given(text=mutated(TEXT_SAMPLE))
    def run(text):
        path.write_text(text, encoding="utf-8", errors="surrogatepass")  # a lone surrogate: not UTF-8
        loaded.append(check_result(load_vocabulary, str(path)))

    run()
    assert any(loaded) and not all(loaded)  # both outcomes were exercised


def test_fuzz_text_file_bytes(tmp_path):
    given, settings, st, _ = fuzz_tools()
    path = tmp_path / "vocab.vocab"
    raw = TEXT_SAMPLE.encode("utf-8")

    @settings
    @given(data=st.binary(max_size=40), at=st.integers(0, len(raw)))
    def run(data, at):
        path.write_bytes(raw[:at] + data + raw[at:])
        check_result(load_vocabulary, path)

    run()


def test_fuzz_json_files(tmp_path):
    given, settings, st, mutated = fuzz_tools()
    path = tmp_path / "vocab.json"

    @settings
    @given(text=mutated(JSON_SAMPLE, max_edits=3))
    def run(text):
        path.write_text(text, encoding="utf-8", errors="surrogatepass")
        check_result(load_vocabulary, str(path))

    run()


def test_fuzz_json_structures():
    given, settings, st, _ = fuzz_tools(max_examples=300)
    json_values = st.recursive(
        st.none() | st.booleans() | st.integers(-3, 70_000) | st.floats(allow_nan=True) | st.text(max_size=8)
        | st.sampled_from(FIELDS),
        lambda children: st.lists(children, max_size=4)
        | st.dictionaries(st.sampled_from(FIELDS), children, max_size=5),
        max_leaves=20,
    )
    names = st.text(alphabet=st.characters(codec="utf-8"), min_size=1, max_size=6).filter(str.strip)
    valid_items = st.fixed_dictionaries(
        {"name": names},
        optional={
            "synonyms": st.lists(names, max_size=3),
            "isthing": st.booleans() | st.integers(0, 1),
            "color": st.tuples(*[st.integers(0, 255)] * 3).map(list),
            "encode_name": st.just(True),
            "min_score": st.floats(0, 1),
            "supercategory": st.text(max_size=4),
        },
    )
    edge_values = st.sampled_from([-1, 256, 65536, 1.5, float("nan"), True, "", " ", [], [1, 2], [1, 2, 300],
                                   [1.0, 2, 3], [True, 0, 0], ["a", 2], [None], [""], {}, None])

    @st.composite
    def vocabularies(draw):
        """A valid class list (unique names, ids 1..N or none), often with one field of one class then broken."""
        items = draw(st.lists(valid_items, min_size=1, max_size=6, unique_by=lambda item: item["name"].casefold()))
        if draw(st.booleans()):
            for number, item in enumerate(items, start=1):
                item["id"] = number
        if draw(st.booleans()):
            item = draw(st.sampled_from(items))
            item[draw(st.sampled_from(FIELDS[:-1]))] = draw(edge_values | json_values)
        return {"categories": items} if draw(st.booleans()) else items

    @settings
    @given(obj=st.one_of(vocabularies(), json_values))
    def run(obj):
        check_result(Vocabulary.from_json, obj, "<fuzz>")

    run()


def test_fuzz_inline_specs(tmp_path, monkeypatch):
    given, settings, st, mutated = fuzz_tools()
    monkeypatch.chdir(tmp_path)  # an empty folder: relative names in a spec are no existing files
    loaded = []

    @settings
    @given(spec=mutated(INLINE_SAMPLE))
    def run(spec):
        loaded.append(check_result(load_vocabulary, spec))

    run()
    assert any(loaded) and not all(loaded)
