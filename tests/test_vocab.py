"""Tests for masqclip_cli.vocab: text/JSON/inline formats, presets, --vocab resolution, templates."""

from __future__ import annotations

import collections.abc
import json
import os
import shutil
from pathlib import Path

import pytest

from masqclip_cli import vocab as vocab_mod
from masqclip_cli.vocab import (
    PRESET_NAMES,
    PresetInfo,
    VocabClass,
    Vocabulary,
    VocabularyError,
    list_presets,
    load_file,
    load_preset,
    load_vocabulary,
    parse_inline,
    parse_text,
    read_templates,
)


def write(tmp_path: Path, name: str, text: str) -> Path:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


def error_of(fn, *args) -> str:
    with pytest.raises(VocabularyError) as info:
        fn(*args)
    message = str(info.value)
    assert "\n" not in message
    return message


# --------------------------------------------------------------------------------------------
# text format
# --------------------------------------------------------------------------------------------

TEXT = """\
# a comment line

person
car, automobile   # trailing comment
road [stuff]
tree-merged: branch, tree, bush [STUFF]
  traffic    light ,  stop\tlight   [Thing]

sky,heaven[stuff]
"""


def test_text_file_all_forms(tmp_path):
    path = write(tmp_path, "classes.txt", TEXT)
    v = load_file(path)
    assert v.source == str(path)
    assert v.names == ["person", "car", "road", "tree-merged", "traffic light", "sky"]
    assert v.prompts == [
        ("person",),
        ("car", "automobile"),
        ("road",),
        ("branch", "tree", "bush"),
        ("traffic light", "stop light"),
        ("sky", "heaven"),
    ]
    assert v.isthing == [True, True, False, False, True, False]
    assert v.thing_indices == [0, 1, 4]
    assert v.stuff_indices == [2, 3, 5]
    assert v.ids == [0, 1, 2, 3, 4, 5]
    assert [c.line for c in v] == [3, 4, 5, 6, 7, 9]
    assert v[3] == VocabClass("tree-merged", ("branch", "tree", "bush"), isthing=False, encode_name=False)
    assert v[3].encode_name is False and v[1].encode_name is True
    assert v[1].synonyms == ("automobile",)


def test_colon_only_counts_before_first_comma():
    v = parse_text("a, b: c\nlabel: x: y, z\n")
    assert v[0].name == "a" and v[0].prompts == ("a", "b: c") and v[0].encode_name
    assert v[1].name == "label" and v[1].prompts == ("x: y", "z") and not v[1].encode_name


def test_colon_form_single_name():
    v = parse_text("door-stuff: door [stuff]")
    assert v[0] == VocabClass("door-stuff", ("door",), isthing=False, encode_name=False)
    assert v.prompts == [("door",)]


def test_crlf_and_bom(tmp_path):
    path = tmp_path / "win.txt"
    path.write_bytes("\ufeffcat\r\ndog [stuff]\r\n".encode())
    v = load_file(path)
    assert v.names == ["cat", "dog"]
    assert v.isthing == [True, False]


def test_same_display_name_different_synonyms_is_not_duplicate():
    v = parse_text("bag\nbag, handbag\nbag: purse\n")
    assert v.names == ["bag", "bag", "bag"]
    assert v.prompts == [("bag",), ("bag", "handbag"), ("purse",)]


@pytest.mark.parametrize(
    ("text", "line", "fragment"),
    [
        ("cat\ncar [xyz]\n", 2, "unknown marker '[xyz]' (use [thing] or [stuff])"),
        ("a,,b\n", 1, "empty name"),
        ("a, b,\n", 1, "empty name"),
        ("cat\n[stuff]\n", 2, "empty class name"),
        ("cat\n\nlabel:\n", 3, "label 'label:' has no names after the ':'"),
        ("label:   [stuff]\n", 1, "no names after the ':'"),
        (": a, b\n", 1, "empty display label"),
        ("car [thing] [stuff]\n", 1, "more than one"),
        ("car [thing\n", 1, "unexpected '['"),
    ],
)
def test_text_errors_name_file_and_line(tmp_path, text, line, fragment):
    path = write(tmp_path, "classes.txt", text)
    message = error_of(load_file, path)
    assert message.startswith(f"{path}:{line}: ")
    assert fragment in message


def test_duplicate_error_message(tmp_path):
    path = write(tmp_path, "classes.txt", "car\nbus\nCar  \n")
    assert error_of(load_file, path) == f"{path}:3: duplicate class 'Car' (first on line 1)"


def test_duplicate_is_case_insensitive_on_prompts_too():
    message = error_of(parse_text, "car, Automobile\n\ncar, automobile [stuff]\n", "classes.txt")
    assert message == "classes.txt:3: duplicate class 'car' (first on line 1)"


def test_empty_vocabulary(tmp_path):
    path = write(tmp_path, "classes.txt", "# only comments\n\n   \n")
    assert error_of(load_file, path) == f"{path}: empty vocabulary (no classes)"
    assert error_of(parse_text, "", "classes.txt") == "classes.txt: empty vocabulary (no classes)"


def test_unreadable_files(tmp_path):
    missing = tmp_path / "nope.txt"
    message = error_of(load_file, missing)
    assert str(missing) in message and "no such" in message

    message = error_of(load_file, tmp_path)
    assert message.startswith(f"{tmp_path}: ") and "is a directory" in message

    bad = tmp_path / "latin1.txt"
    bad.write_bytes(b"cat\ncaf\xe9\n")
    message = error_of(load_file, bad)
    assert message.startswith(f"{bad}:2: ") and "UTF-8" in message


@pytest.mark.skipif(not hasattr(os, "geteuid") or os.geteuid() == 0, reason="root can read anything")
def test_permission_denied(tmp_path):
    path = write(tmp_path, "secret.txt", "cat\n")
    path.chmod(0)
    try:
        message = error_of(load_file, path)
    finally:
        path.chmod(0o644)
    assert message.startswith(f"{path}: ") and "cannot read" in message


# --------------------------------------------------------------------------------------------
# JSON
# --------------------------------------------------------------------------------------------


def test_json_list_form(tmp_path):
    data = [
        {"name": "person"},
        {"name": "car", "synonyms": ["automobile"], "isthing": 1, "id": 30, "color": [0, 0, 142]},
        {"name": "road", "isthing": False},
        {"name": "tree-merged", "synonyms": ["branch", "tree"], "isthing": 0, "encode_name": False},
        "sky",
    ]
    v = load_file(write(tmp_path, "vocab.json", json.dumps(data)))
    assert v.names == ["person", "car", "road", "tree-merged", "sky"]
    assert v.prompts == [("person",), ("car", "automobile"), ("road",), ("branch", "tree"), ("sky",)]
    assert v.isthing == [True, True, False, False, True]
    assert v.ids == [0, 30, 2, 3, 4]
    assert v[1].id == 30 and v[1].color == (0, 0, 142)
    assert v[3].encode_name is False
    assert v[0].id is None and v[0].color is None


def test_json_ids_fall_back_to_index(tmp_path):
    data = [{"name": "a", "id": 10}, {"name": "b"}, {"name": "c", "id": 7}]
    v = load_file(write(tmp_path, "v.json", json.dumps(data)))
    assert v.ids == [10, 1, 7]


def test_json_categories_form_coco(tmp_path):
    data = {
        "info": {"year": 2017},
        "categories": [
            {"supercategory": "person", "isthing": 1, "id": 1, "name": "person", "color": [220, 20, 60]},
            {"supercategory": "vehicle", "isthing": 1, "id": 2, "name": "bicycle", "color": [119, 11, 32]},
            {"supercategory": "textile", "isthing": 0, "id": 92, "name": "banner", "color": [255, 255, 128]},
        ],
    }
    v = load_file(write(tmp_path, "cats.JSON", json.dumps(data)))
    assert v.names == ["person", "bicycle", "banner"]
    assert v.ids == [1, 2, 92]
    assert v.isthing == [True, True, False]
    assert v.colors() == [(220, 20, 60), (119, 11, 32), (255, 255, 128)]


def test_json_round_trip_in_memory():
    v = load_preset("coco-panoptic")
    back = Vocabulary.from_json(v.to_json())
    assert back == v
    assert back.ids == v.ids and back.colors() == v.colors() and back.prompts == v.prompts
    assert back.source == "<json>"


def test_json_round_trip_through_file(tmp_path):
    v = parse_text("a\nb, bb [stuff]\nlabel: x, y\n")
    assert v.to_json() == [
        {"name": "a", "synonyms": [], "isthing": True},
        {"name": "b", "synonyms": ["bb"], "isthing": False},
        {"name": "label", "synonyms": ["x", "y"], "isthing": True, "encode_name": False},
    ]
    path = write(tmp_path, "rt.json", json.dumps(v.to_json()))
    assert load_file(path) == v


@pytest.mark.parametrize(
    ("data", "fragment"),
    [
        ([{"name": "a"}, {"name": "b"}, {"id": 3}], "item 3: 'name' missing"),
        ([{"name": 5}], "item 1: 'name' must be a string"),
        ([{"name": "   "}], "item 1: empty 'name'"),
        ([{"name": "a", "color": [1, 2]}], "item 1: 'color': bad color"),
        ([{"name": "a", "color": [1, 2, 256]}], "item 1: 'color': bad color"),
        ([{"name": "a", "color": [1, 2, -1]}], "item 1: 'color': bad color"),
        ([{"name": "a", "color": [1.0, 2, 3]}], "item 1: 'color': bad color"),
        ([{"name": "a", "color": "red"}], "item 1: 'color': bad color"),
        ([{"name": "a"}, {"name": "b", "id": "7"}], "item 2: 'id' must be an integer"),
        ([{"name": "a", "id": 1.5}], "item 1: 'id' must be an integer"),
        ([{"name": "a", "id": True}], "item 1: 'id' must be an integer"),
        ([{"name": "a", "id": -1}], "item 1: 'id' must be non-negative"),
        ([{"name": "a", "isthing": 2}], "item 1: 'isthing' must be"),
        ([{"name": "a", "synonyms": "b"}], "item 1: 'synonyms' must be a list of strings"),
        ([{"name": "a", "synonyms": ["b", ""]}], "item 1: empty name in 'synonyms'"),
        ([{"name": "a", "encode_name": "no"}], "item 1: 'encode_name' must be true or false"),
        ([{"name": "a", "encode_name": False}], "item 1: 'encode_name' is false"),
        ([42], "item 1: expected an object"),
        ([{"name": "a"}, {"name": "A"}], "item 2: duplicate class 'A' (first is item 1)"),
        ([{"name": "a", "id": 4}, {"name": "b", "id": 4}], "item 2: duplicate id 4"),
        ([], "empty vocabulary (no classes)"),
        ({"classes": []}, "expected a list of classes or an object with a 'categories' list"),
        ({"categories": {"name": "a"}}, "'categories' must be a list"),
        ("person", "expected a list of classes"),
    ],
)
def test_json_errors(tmp_path, data, fragment):
    path = write(tmp_path, "vocab.json", json.dumps(data))
    message = error_of(load_file, path)
    assert message.startswith(f"{path}: ")
    assert fragment in message


def test_invalid_json_names_line(tmp_path):
    path = write(tmp_path, "vocab.json", '[\n  {"name": "a"},\n  {"name": "b"\n]\n')
    message = error_of(load_file, path)
    assert message.startswith(f"{path}:4: invalid JSON: ")


def test_from_json_source_in_errors():
    assert error_of(Vocabulary.from_json, [{}], "x.json") == "x.json: item 1: 'name' missing"


# --------------------------------------------------------------------------------------------
# inline
# --------------------------------------------------------------------------------------------


def test_inline():
    v = parse_inline("person; car, automobile; road [stuff];  ;tree-merged: branch, tree [stuff];")
    assert v.source == "<inline>"
    assert v.names == ["person", "car", "road", "tree-merged"]
    assert v.prompts == [("person",), ("car", "automobile"), ("road",), ("branch", "tree")]
    assert v.isthing == [True, True, False, False]


def test_inline_hash_is_not_a_comment():
    assert parse_inline("#1 fan; b").names == ["#1 fan", "b"]


@pytest.mark.parametrize(
    ("spec", "expected"),
    [
        ("person; car [xyz]", "<inline>: class 2: unknown marker '[xyz]' (use [thing] or [stuff])"),
        ("person; ; a,,b", "<inline>: class 2: empty name in 'a,,b' (doubled or trailing comma?)"),
        ("a; b; label:", "<inline>: class 3: label 'label:' has no names after the ':'"),
        ("car; bus; CAR", "<inline>: class 3: duplicate class 'CAR' (first is class 1)"),
        (" ; ;", "<inline>: empty vocabulary (no classes)"),
        ("a; [stuff]", "<inline>: class 2: empty class name (only a marker)"),
    ],
)
def test_inline_errors(spec, expected):
    assert error_of(parse_inline, spec) == expected


# --------------------------------------------------------------------------------------------
# presets
# --------------------------------------------------------------------------------------------

PRESET_COUNTS = {
    "coco-panoptic": (133, 80, 53),
    "ade20k-150": (150, 100, 50),
    "ade20k-847": (847, 0, 847),
    "pascal-context-59": (59, 0, 59),
    "pascal-context-459": (459, 0, 459),
    "coco-instance-65": (65, 65, 0),
    "coco-base-48": (48, 48, 0),
    "coco-novel-17": (17, 17, 0),
}


def test_preset_names():
    assert set(PRESET_NAMES) == set(PRESET_COUNTS)
    assert len(PRESET_NAMES) == 8


@pytest.mark.parametrize("name", list(PRESET_COUNTS))
def test_preset_counts(name):
    v = load_preset(name)
    total, things, stuff = PRESET_COUNTS[name]
    assert len(v) == total
    assert len(v.thing_indices) == things
    assert len(v.stuff_indices) == stuff
    assert v.source == f"preset:{name}"


def test_list_presets():
    infos = list_presets()
    assert [i.name for i in infos] == list(PRESET_NAMES)
    by_name = {i.name: i for i in infos}
    assert by_name["coco-panoptic"] == PresetInfo("coco-panoptic", 133, 80, 53, True)
    assert by_name["ade20k-150"] == PresetInfo("ade20k-150", 150, 100, 50, False)
    assert by_name["coco-novel-17"] == PresetInfo("coco-novel-17", 17, 17, 0, True)
    assert by_name["pascal-context-459"].has_ids is False


def test_coco_panoptic_entries():
    v = load_preset("coco-panoptic")
    assert v[0] == VocabClass("person", (), True, 1, (220, 20, 60))
    assert v.ids[0] == 1 and v.ids[-1] == 200
    assert v.ids[79] == 90 and v.ids[80] == 92  # last thing, first stuff
    assert v.names[79] == "toothbrush" and v.names[80] == "banner"
    assert v.thing_indices == list(range(80))
    tree = v[116]
    assert tree.name == "tree-merged"
    assert tree.prompts == ("branch", "tree", "bush", "leaves")
    assert tree.isthing is False and tree.encode_name is False
    assert tree.id == 184 and tree.color == (107, 142, 35)
    assert v[132].name == "rug-merged" and v[132].prompts == ("mat", "rug", "carpet")
    assert v[86].name == "door-stuff" and v[86].prompts == ("door",)
    assert sum(not c.encode_name for c in v) == 27


def test_ade20k_150_entries():
    v = load_preset("ade20k-150")
    assert v[0] == VocabClass("wall", (), False)
    assert v[6].name == "road" and v[6].prompts == ("road", "route") and v[6].encode_name
    assert v[12].name == "person" and v[12].isthing
    assert v[149].name == "flag" and v[149].isthing
    assert v.ids == list(range(150))


def test_ade20k_847_repeated_display_names():
    v = load_preset("ade20k-847")
    assert v[1].prompts == ("building", "edifice")
    assert v[782].prompts == ("central processing unit", "cpu", "c p u", "central processor", "processor", "mainframe")
    assert v[846].name == "adding machine"
    bags = [c for c in v if c.name == "bag"]
    assert [c.prompts for c in bags] == [
        ("bag",),
        ("bag", "traveling bag", "travelling bag", "grip", "suitcase"),
        ("bag", "handbag", "pocketbook", "purse"),
    ]
    assert [c.line for c in bags] == [115, 192, 253]


def test_pascal_and_coco_split_entries():
    pc59, pc459 = load_preset("pascal-context-59"), load_preset("pascal-context-459")
    assert pc59.names[0] == "aeroplane" and pc59.names[-1] == "wood"
    assert pc459.names[0] == "accordion" and pc459.names[-1] == "wool"
    novel = load_preset("coco-novel-17")
    assert novel.names[:3] == ["airplane", "bus", "cat"] and novel.ids[:3] == [5, 6, 17]
    base = load_preset("coco-base-48")
    assert (base.names[0], base.ids[0], base.names[-1], base.ids[-1]) == ("person", 1, "toothbrush", 90)
    inst = load_preset("coco-instance-65")
    assert sorted(inst.ids) == inst.ids
    assert set(inst.ids) == set(base.ids) | set(novel.ids)


def test_preset_prefix_and_unknown():
    assert load_preset("preset:coco-novel-17") == load_preset("coco-novel-17")
    message = error_of(load_preset, "coco")
    assert message.startswith("unknown preset 'coco'; known presets: coco-panoptic, ade20k-150")
    assert "coco-novel-17" in message
    # the template file lives next to the presets but is not one
    assert "unknown preset" in error_of(load_preset, "templates-vild")


@pytest.fixture
def preset_copy(tmp_path, monkeypatch):
    """A private copy of the presets directory installed as PRESETS_DIR."""
    copy = tmp_path / "presets"
    shutil.copytree(vocab_mod.PRESETS_DIR, copy)
    monkeypatch.setattr(vocab_mod, "PRESETS_DIR", copy)
    return copy


def test_missing_preset_data_file(preset_copy):
    (preset_copy / "ade20k-150.txt").unlink()
    message = error_of(load_preset, "ade20k-150")
    assert "data file is missing" in message
    assert str(preset_copy / "ade20k-150.txt") in message
    assert "data file is missing" in error_of(load_vocabulary, "ade20k-150")
    assert "data file is missing" in error_of(list_presets)


def test_preset_ids_count_mismatch(preset_copy):
    ids = preset_copy / "coco-novel-17.ids"
    ids.write_text("".join(ids.read_text().splitlines(keepends=True)[:-1]))
    message = error_of(load_preset, "coco-novel-17")
    assert message == f"{ids}: 16 ids for 17 classes"


def test_preset_colors_count_mismatch_and_bad_value(preset_copy):
    colors = preset_copy / "coco-panoptic.colors"
    lines = colors.read_text().splitlines(keepends=True)
    colors.write_text("".join(lines + ["1 2 3\n"]))
    assert error_of(load_preset, "coco-panoptic") == f"{colors}: 134 colors for 133 classes"
    colors.write_text("".join(lines[:4] + ["1 2 300\n"] + lines[5:]))
    message = error_of(load_preset, "coco-panoptic")
    assert message.startswith(f"{colors}:5: bad color '1 2 300'")


def test_preset_syntax_error_names_preset_and_line(preset_copy):
    path = preset_copy / "coco-novel-17.txt"
    lines = path.read_text().splitlines(keepends=True)
    lines[2] = "cat [animal]\n"
    path.write_text("".join(lines))
    assert error_of(load_preset, "coco-novel-17").startswith("preset:coco-novel-17:3: unknown marker '[animal]'")


# --------------------------------------------------------------------------------------------
# load_vocabulary precedence and guards
# --------------------------------------------------------------------------------------------


def test_existing_file_wins_over_preset(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    write(tmp_path, "ade20k-150", "my class\n")
    v = load_vocabulary("ade20k-150")
    assert v.names == ["my class"] and v.source == "ade20k-150"
    # ... unless the preset is asked for explicitly
    assert len(load_vocabulary("preset:ade20k-150")) == 150


def test_file_paths(tmp_path):
    path = write(tmp_path, "classes.txt", "cat\ndog\n")
    assert load_vocabulary(str(path)).names == ["cat", "dog"]
    assert load_vocabulary(path).names == ["cat", "dog"]
    jpath = write(tmp_path, "v.json", '[{"name": "cat"}]')
    assert load_vocabulary(str(jpath)).names == ["cat"]


def test_file_with_semicolon_in_name_is_a_file(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    write(tmp_path, "a;b", "zebra\n")
    assert load_vocabulary("a;b").names == ["zebra"]


def test_directory_is_an_error(tmp_path):
    assert "is a directory" in error_of(load_vocabulary, str(tmp_path))


def test_preset_wins_over_inline():
    assert len(load_vocabulary("coco-panoptic")) == 133
    assert len(load_vocabulary("  ade20k-847 ")) == 847
    assert len(load_vocabulary("COCO-Novel-17")) == 17
    assert len(load_vocabulary("preset: coco-base-48")) == 48


def test_preset_prefix_unknown():
    message = error_of(load_vocabulary, "preset:person")
    assert message.startswith("unknown preset 'person'; known presets: ")


@pytest.mark.parametrize("spec", ["classes.txt", "data/classes", "my.JSON", "x.csv", "foo.vocab", "C:\\v\\classes"])
def test_guard_path_like_missing_file(tmp_path, monkeypatch, spec):
    monkeypatch.chdir(tmp_path)
    assert error_of(load_vocabulary, spec) == f"{spec}: no such vocabulary file"


def test_guard_missing_path_object(tmp_path):
    missing = tmp_path / "cats"
    assert error_of(load_vocabulary, missing) == f"{missing}: no such vocabulary file"


@pytest.mark.parametrize("spec", ["ade20k-15", "ade20k", "coco-panoptc", "pascal-context-60", "coco-novel17"])
def test_guard_close_to_preset(tmp_path, monkeypatch, spec):
    monkeypatch.chdir(tmp_path)
    message = error_of(load_vocabulary, spec)
    assert message.startswith(f"unknown preset '{spec}'; known presets: coco-panoptic, ")


def test_trailing_semicolon_forces_inline(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert load_vocabulary("ade20k-15;").names == ["ade20k-15"]
    assert load_vocabulary("classes.txt;").names == ["classes.txt"]


def test_inline_fallback(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    v = load_vocabulary("person; car, automobile; road [stuff]")
    assert v.source == "<inline>"
    assert v.prompts == [("person",), ("car", "automobile"), ("road",)]
    assert load_vocabulary("zebra").names == ["zebra"]
    assert load_vocabulary("cat; dog/wolf").names == ["cat", "dog/wolf"]


def test_long_inline_spec_is_not_a_path_error():
    spec = "; ".join(f"class number {i}" for i in range(400))
    assert len(load_vocabulary(spec)) == 400


@pytest.mark.parametrize("spec", ["", "   ", "\t\n"])
def test_empty_spec(spec):
    assert "empty vocabulary spec" in error_of(load_vocabulary, spec)


# --------------------------------------------------------------------------------------------
# Vocabulary object
# --------------------------------------------------------------------------------------------


def test_vocabulary_construction_errors():
    assert error_of(Vocabulary, []) == "<memory>: empty vocabulary (no classes)"
    assert (
        error_of(Vocabulary, [VocabClass("a"), VocabClass("b"), VocabClass("A")])
        == "<memory>: class 3: duplicate class 'A' (first is class 1)"
    )
    assert "no names to encode" in error_of(Vocabulary, [VocabClass("a", encode_name=False)])
    assert "bad color" in error_of(Vocabulary, [VocabClass("a", color=(0, 0, 999))])
    assert "empty class name" in error_of(Vocabulary, [VocabClass(" ")])
    assert "duplicate id 0" in error_of(Vocabulary, [VocabClass("a"), VocabClass("b", id=0)])


def test_vocabulary_sequence_protocol():
    classes = [VocabClass("a"), VocabClass("b", ("bee",), isthing=False), VocabClass("c", id=9)]
    v = Vocabulary(classes, source="mine")
    assert isinstance(v, collections.abc.Sequence)
    assert len(v) == 3
    assert v[1] is classes[1] and v[-1] is classes[2]
    assert list(v) == classes
    assert v.index(classes[1]) == 1 and classes[2] in v
    assert v.ids == [0, 1, 9]
    with pytest.raises(IndexError):
        v[3]
    with pytest.raises(TypeError):
        v["a"]


def test_vocabulary_equality_ignores_source_and_line():
    a = parse_text("\n\ncat\ndog, puppy [stuff]\n", "one.txt")
    b = parse_inline("cat; dog, puppy [stuff]")
    assert a == b and hash(a) == hash(b)
    assert a != parse_inline("cat; dog, puppy")
    assert a != parse_inline("dog, puppy [stuff]; cat")
    assert a != ["cat", "dog"]


def test_vocabclass_accepts_lists():
    c = VocabClass("car", ["automobile", "auto"], color=[1, 2, 3])
    assert c.synonyms == ("automobile", "auto") and c.color == (1, 2, 3)
    assert c.prompts == ("car", "automobile", "auto")
    assert VocabClass("label", ("x",), encode_name=False).prompts == ("x",)
    hash(c)


def test_colors_deterministic_distinct_and_given_kept():
    v = load_preset("ade20k-847")
    colors = v.colors()
    assert colors == load_preset("ade20k-847").colors()
    assert len(set(colors[:150])) == 150
    assert len(set(colors)) == 847
    assert all(len(c) == 3 and all(isinstance(x, int) and 0 <= x <= 255 for x in c) for c in colors)
    assert all(max(c) >= 100 for c in colors)  # never (near-)black
    # palette colour depends on the index only
    assert parse_inline("x; y; z").colors() == colors[:3]
    mixed = Vocabulary([VocabClass("a"), VocabClass("b", color=(1, 2, 3))])
    assert mixed.colors() == [colors[0], (1, 2, 3)]
    # given colours of a preset are used
    assert load_preset("coco-panoptic").colors()[0] == (220, 20, 60)


def test_colors_known_first_values():
    # pinned so that colours stay the same across releases. Worked by hand from HSV:
    # class 0: hue 0, s 0.85, v 0.95 -> (0.95, 0.1425, 0.1425) * 255;
    # class 1: hue 0.618 (golden ratio), s 0.55, v 0.80 -> (0.36, 0.4885, 0.80) * 255.
    assert parse_inline("a; b").colors() == [(242, 36, 36), (92, 125, 204)]


def test_fingerprint():
    v = parse_inline("cat; dog, puppy")
    fp = v.fingerprint()
    assert len(fp) == 64 and int(fp, 16) >= 0
    assert fp == parse_text("cat\ndog, puppy\n").fingerprint()
    # only prompts matter: display labels, thing/stuff, ids, colours do not
    same_prompts = Vocabulary([VocabClass("kitty", ("cat",), False, 5, (1, 2, 3), False), v[1]])
    assert same_prompts.fingerprint() == fp
    assert parse_inline("cat [stuff]; dog, puppy").fingerprint() == fp
    # order and prompts do
    assert parse_inline("dog, puppy; cat").fingerprint() != fp
    assert parse_inline("cat; puppy, dog").fingerprint() != fp
    assert parse_inline("cat; dog").fingerprint() != fp
    assert parse_inline("cat; dog, puppy; bird").fingerprint() != fp
    # no ambiguity between splitting names differently
    assert parse_inline("a, b; c").fingerprint() != parse_inline("a; b, c").fingerprint()
    assert load_preset("ade20k-150").fingerprint() == load_preset("ade20k-150").fingerprint()


def test_error_format():
    assert str(VocabularyError("bad", "f.txt", 3)) == "f.txt:3: bad"
    assert str(VocabularyError("bad", "f.txt")) == "f.txt: bad"
    assert str(VocabularyError("bad\nthing")) == "bad thing"
    assert isinstance(VocabularyError("x"), ValueError)


# --------------------------------------------------------------------------------------------
# templates
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("spec", [None, "none", "None", " NONE "])
def test_templates_none(spec):
    assert read_templates(spec) is None


def test_templates_vild():
    templates = read_templates("vild")
    assert len(templates) == 14
    assert templates[0] == "a photo of a {}."
    assert templates[1] == "This is a photo of a {}"
    assert templates[-1] == "There is a large {} in the scene."
    assert read_templates("VILD") == templates


def test_templates_file(tmp_path):
    path = write(tmp_path, "t.txt", "# my templates\n\na photo of a {}.\n  # indented comment\n  {} in the wild  \n")
    assert read_templates(str(path)) == ["a photo of a {}.", "{} in the wild"]
    assert read_templates(path) == ["a photo of a {}.", "{} in the wild"]


@pytest.mark.parametrize(
    ("text", "line", "fragment"),
    [
        ("a photo of a {}\nno placeholder\n", 2, "has 0 '{}' placeholders (need exactly one)"),
        ("# c\n{} and {}\n", 2, "has 2 '{}' placeholders"),
        ("a {0} photo {}\n", 1, "stray"),
        ("a {} photo }\n", 1, "stray"),
    ],
)
def test_templates_errors(tmp_path, text, line, fragment):
    path = write(tmp_path, "t.txt", text)
    message = error_of(read_templates, str(path))
    assert message.startswith(f"{path}:{line}: ")
    assert fragment in message


def test_templates_empty_and_missing(tmp_path):
    empty = write(tmp_path, "empty.txt", "# nothing\n\n")
    assert error_of(read_templates, str(empty)) == f"{empty}: no templates in file (empty)"
    missing = tmp_path / "missing.txt"
    message = error_of(read_templates, str(missing))
    assert message.startswith(f"{missing}: no such templates file")
    assert error_of(read_templates, "clip").startswith("clip: no such templates file")
    assert "is a directory" in error_of(read_templates, str(tmp_path))


def test_templates_vild_missing_file(preset_copy):
    (preset_copy / "templates-vild.txt").unlink()
    assert str(preset_copy / "templates-vild.txt") in error_of(read_templates, "vild")
