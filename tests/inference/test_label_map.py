"""--label-map: the file forms (JSON, CSV with and without header, TSV, quoting), every error naming the file, the
mapped vocabulary (merge, drop, ids, thing / stuff, colour, min_score) and one result relabelled, checked pixel by
pixel against maps written out by hand; the mapped result written by the real COCO writer and read by pycocotools."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
from pycocotools import mask as mask_util
from pycocotools.coco import COCO

from masqclip_cli.inference.label_map import LabelMap, LabelMapError, LabelRule
from masqclip_cli.io.writers import ItemInfo, make_writers
from masqclip_cli.structures import Segment, Segmentation
from masqclip_cli.vocab import VocabClass, Vocabulary, parse_inline

pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")  # pycocotools decode

# class indices:     0       1     2        3              4                  5             6
VOCAB = parse_inline("person; car; truck; road [stuff]; pavement [stuff]; sky [stuff]; tree [stuff]")
PERSON, CAR, TRUCK, ROAD, PAVEMENT, SKY, TREE = range(7)

# car and truck -> vehicle, pavement -> road (merging into the unnamed class road), sky dropped; person, tree kept
MAP = {"car": "vehicle", "truck": {"name": "vehicle"}, "pavement": "road", "sky": None}
# mapped indices: person 0, vehicle 1, road 2, tree 3

# A 6x8 panoptic map: ids 1 sky, 2 pavement, 3 road, 4 person, 5 car, 6 truck, 7 tree, 0 void.
PANOPTIC = np.array(
    [
        [1, 1, 1, 1, 1, 1, 1, 1],
        [1, 1, 1, 1, 7, 7, 1, 1],
        [4, 4, 0, 5, 5, 6, 6, 6],
        [4, 4, 0, 5, 5, 6, 6, 2],
        [3, 3, 3, 3, 2, 2, 2, 2],
        [3, 3, 3, 3, 2, 2, 2, 2],
    ],
    dtype=np.int32,
)
# After MAP, by hand: sky void, pavement (2) and road (3) one segment with the smaller id, 2.
PANOPTIC_MAPPED = np.array(
    [
        [0, 0, 0, 0, 0, 0, 0, 0],
        [0, 0, 0, 0, 7, 7, 0, 0],
        [4, 4, 0, 5, 5, 6, 6, 6],
        [4, 4, 0, 5, 5, 6, 6, 2],
        [2, 2, 2, 2, 2, 2, 2, 2],
        [2, 2, 2, 2, 2, 2, 2, 2],
    ],
    dtype=np.int32,
)
SEMANTIC = np.array(
    [
        [5, 5, 5, 5, 5, 5, 5, 5],
        [5, 5, 5, 5, 6, 6, 5, 5],
        [0, 0, -1, 1, 1, 2, 2, 2],
        [0, 0, -1, 1, 1, 2, 2, 4],
        [3, 3, 3, 3, 4, 4, 4, 4],
        [3, 3, 3, 3, 4, 4, 4, 4],
    ],
    dtype=np.int32,
)
SEMANTIC_MAPPED = np.array(
    [
        [-1, -1, -1, -1, -1, -1, -1, -1],
        [-1, -1, -1, -1, 3, 3, -1, -1],
        [0, 0, -1, 1, 1, 1, 1, 1],
        [0, 0, -1, 1, 1, 1, 1, 2],
        [2, 2, 2, 2, 2, 2, 2, 2],
        [2, 2, 2, 2, 2, 2, 2, 2],
    ],
    dtype=np.int32,
)
H, W = PANOPTIC.shape


def _box(mask: np.ndarray) -> tuple[float, float, float, float]:
    ys, xs = np.nonzero(mask)
    return (float(xs.min()), float(ys.min()), float(xs.max() - xs.min() + 1), float(ys.max() - ys.min() + 1))


def _mask(*cells: tuple[int, int]) -> np.ndarray:
    out = np.zeros((H, W), bool)
    for y, x in cells:
        out[y, x] = True
    return out


MASK_A = PANOPTIC == 5  # one query's mask, proposed as car, truck and person
MASK_P = PANOPTIC == 4
MASK_B = PANOPTIC == 6
MASK_S = PANOPTIC == 1
MASK_C = _mask((4, 0), (4, 1), (5, 0))  # two rows without a query, pixel-identical (two arrays)
MASK_D = _mask((5, 7))


def make_seg(vocab: Vocabulary = VOCAB) -> Segmentation:
    # (segment id, class, score, query), in id order
    rows = [(1, SKY, 0.9, 10), (2, PAVEMENT, 0.6, 11), (3, ROAD, 0.8, 12), (4, PERSON, 0.7, 13), (5, CAR, 0.5, 14),
            (6, TRUCK, 0.4, 15), (7, TREE, 0.3, 16)]
    segments = [
        Segment(i, c, s, vocab[c].isthing, int((PANOPTIC == i).sum()), _box(PANOPTIC == i), query=q)
        for i, c, s, q in rows
    ]
    # (rank, class, score, query, mask), by descending score
    inst_rows = [
        (1, CAR, 0.9, 3, MASK_A),
        (2, TRUCK, 0.7, 3, MASK_A),  # the same query as 1; car and truck are both vehicle: de-duplicated
        (3, PERSON, 0.6, 1, MASK_P),
        (4, TRUCK, 0.5, 4, MASK_B),
        (5, SKY, 0.4, 6, MASK_S),  # dropped
        (6, PERSON, 0.3, 3, MASK_A),  # the same query, another label: kept
        (7, TRUCK, 0.25, -1, MASK_C),
        (8, CAR, 0.2, -1, MASK_C.copy()),  # no query, the same pixels as 7: de-duplicated
        (9, CAR, 0.15, -1, MASK_D),  # no query, other pixels: kept
    ]
    instances = [Segment(i, c, s, True, int(m.sum()), _box(m), mask=m, query=q) for i, c, s, q, m in inst_rows]
    return Segmentation((H, W), semantic=SEMANTIC.copy(), panoptic=PANOPTIC.copy(), segments=segments,
                        instances=instances, vocab=vocab)


def assert_same(a: Segmentation, b: Segmentation) -> None:
    """Field by field equality of two results (maps with their dtypes, tables with their class names)."""
    assert tuple(a.image_size) == tuple(b.image_size)
    for name in ("semantic", "panoptic"):
        x, y = getattr(a, name), getattr(b, name)
        assert (x is None) == (y is None)
        if x is not None:
            assert x.dtype == y.dtype and np.array_equal(x, y), name
    assert a.segments == b.segments and a.segments.class_name.tolist() == b.segments.class_name.tolist()
    assert (a.instances is None) == (b.instances is None)
    if a.instances is not None:
        assert a.instances == b.instances
        assert a.instances.class_name.tolist() == b.instances.class_name.tolist()
    assert a.vocab == b.vocab


def write(tmp_path: Path, name: str, text: str | bytes) -> Path:
    path = tmp_path / name
    if isinstance(text, bytes):
        path.write_bytes(text)
    else:
        path.write_text(text, encoding="utf-8")
    return path


# --- file forms ----------------------------------------------------------------------------------------------------

EXPECTED_RULES = (
    LabelRule("car", "vehicle", None),
    LabelRule("pavement", "road", None),
    LabelRule("sky", None, None),
    LabelRule("truck", "vehicle", 3),
)


def test_json_with_all_three_value_kinds(tmp_path):
    path = write(tmp_path, "map.json", json.dumps(
        {"truck": {"name": "vehicle", "id": 3}, "car": "vehicle", "sky": None, "pavement": {"name": " road "}}))
    label_map = LabelMap.load(path)
    assert label_map.rules == EXPECTED_RULES
    assert label_map.source == str(path)


@pytest.mark.parametrize(
    "name, text",
    [
        ("map.csv", "truck,vehicle,3\ncar,vehicle\nsky,\npavement,road,\n"),
        ("map.csv", "class,label,id\ntruck,vehicle,3\ncar,vehicle,\n\nsky,,\npavement , road\n"),
        ("with-bom.CSV", "\ufeffClass,Label\r\ntruck,vehicle,3\r\ncar,vehicle\r\nsky,\r\npavement,road\r\n"),
        ("map.tsv", "truck\tvehicle\t3\ncar\tvehicle\nsky\t\npavement\troad\n"),
        ("map.tsv", "class\tlabel\tid\ntruck\tvehicle\t3\ncar\tvehicle\t\nsky\t\t\npavement\troad\t\n"),
    ],
    ids=["csv", "csv-header", "csv-header-bom-crlf", "tsv", "tsv-header"],
)
def test_csv_and_tsv(tmp_path, name, text):
    assert LabelMap.load(write(tmp_path, name, text)).rules == EXPECTED_RULES


def test_csv_quoted_names_with_commas(tmp_path):
    path = write(tmp_path, "map.csv", '"car, red",vehicle,2\ntruck,"lorry, heavy",4\n')
    assert LabelMap.load(path).rules == (LabelRule("car, red", "vehicle", 2), LabelRule("truck", "lorry, heavy", 4))
    vocab = Vocabulary([VocabClass("car, red"), VocabClass("truck")])
    mapped, index_map = LabelMap.load(path).mapped_vocabulary(vocab)
    assert mapped.names == ["vehicle", "lorry, heavy"] and index_map.tolist() == [0, 1]
    assert mapped.category_ids() == [2, 4]


def test_a_header_only_counts_as_the_first_row(tmp_path):
    # a later "class,label" row is a mapping of the class named "class"
    path = write(tmp_path, "map.csv", "car,vehicle\nclass,label\n")
    assert LabelMap.load(path).rules == (LabelRule("car", "vehicle"), LabelRule("class", "label"))


def test_to_json_is_the_content_only(tmp_path):
    a = LabelMap.load(write(tmp_path, "a.json", json.dumps(
        {"car": "vehicle", "sky": None, "truck": {"name": "vehicle", "id": 3}, "pavement": "road"})))
    (tmp_path / "moved").mkdir()
    b = LabelMap.load(write(tmp_path / "moved", "b.csv", "sky,\ntruck,vehicle,3\npavement,road\ncar,vehicle\n"))
    expected = [
        {"class": "car", "label": "vehicle", "id": None},
        {"class": "pavement", "label": "road", "id": None},
        {"class": "sky", "label": None, "id": None},
        {"class": "truck", "label": "vehicle", "id": 3},
    ]
    assert a.to_json() == b.to_json() == expected
    assert a == b and hash(a) == hash(b) and a.source != b.source
    assert "a.json" not in json.dumps(a.to_json()) and "b.csv" not in json.dumps(b.to_json())
    assert LabelMap.from_json({"car": "lorry"}).to_json() != LabelMap.from_json({"car": "vehicle"}).to_json()


# --- every error names the file ------------------------------------------------------------------------------------

ERRORS = [
    ("map.txt", "car,vehicle\n", None, r"unknown label map format '\.txt'"),
    ("map", "car,vehicle\n", None, r"unknown label map format '\(no suffix\)'"),
    ("map.json", b"{\"car\": \"v\xe9hicle\"}", 1, r"not UTF-8"),
    ("map.json", '{"car": "vehicle",\n "truck": }', 2, r"invalid JSON"),
    ("map.json", '["car", "vehicle"]', None, r"expected an object of class name -> label, got a list"),
    ("map.json", "{}", None, r"empty label map"),
    ("map.json", '{"car": 5}', None, r"class 'car': expected a label string, .* got a number"),
    ("map.json", '{"car": ["vehicle"]}', None, r"class 'car': expected .* got a list"),
    ("map.json", '{"car": ""}', None, r"class 'car': empty label \(use null to drop the class\)"),
    ("map.json", '{"car": {"id": 3}}', None, r"class 'car': 'name' missing"),
    ("map.json", '{"car": {"name": 3}}', None, r"class 'car': 'name' must be a string, got a number"),
    ("map.json", '{"car": {"name": "v", "colour": 3}}', None, r"class 'car': unknown key\(s\) 'colour'"),
    ("map.json", '{"car": {"name": "v", "id": "3"}}', None, r"class 'car': id must be a positive integer, got '3'"),
    ("map.json", '{"car": {"name": "v", "id": 3.5}}', None, r"class 'car': id must be a positive integer, got 3\.5"),
    ("map.json", '{"car": {"name": "v", "id": true}}', None, r"class 'car': id must be a positive integer, got True"),
    ("map.json", '{"car": {"name": "v", "id": 0}}', None, r"class 'car': id must be a positive integer .*got 0"),
    ("map.json", '{"car": {"name": "v", "id": -4}}', None, r"class 'car': id must be a positive integer .*got -4"),
    ("map.json", '{"car": "a", "truck": "b", "car": "c"}', None, r"class 'car' is mapped twice"),
    ("map.json", '{"car": {"name": "a", "name": "b"}}', None, r"class 'car': key 'name' given twice"),
    ("map.csv", "", None, r"empty label map \(no rows\)"),
    ("map.csv", "class,label\n\n", None, r"empty label map \(no rows\)"),
    ("map.csv", "car,vehicle\n\ntruck\n", 3, r"expected 'class,label' or 'class,label,id', got 1 field"),
    ("map.csv", "car,vehicle,3,x\n", 1, r"got 4 field"),
    ("map.csv", "car,vehicle\ntruck,lorry\ncar,auto\n", 3, r"class 'car' is mapped twice \(first on line 1\)"),
    ("map.csv", " ,vehicle\n", 1, r"empty class name"),
    ("map.csv", "car,vehicle,three\n", 1, r"class 'car': id must be a positive integer, got 'three'"),
    ("map.csv", "car,vehicle,2.0\n", 1, r"class 'car': id must be a positive integer, got '2\.0'"),
    ("map.csv", "truck,lorry\ncar,vehicle,0\n", 2, r"class 'car': id must be a positive integer .*got 0"),
    ("map.csv", "car,vehicle,-2\n", 1, r"class 'car': id must be a positive integer .*got -2"),
    ("map.csv", "car,,5\n", 1, r"class 'car': an id but no label"),
    ("map.csv", 'car,"vehicle\n', 1, r"bad CSV"),
    ("map.tsv", "car\tvehicle\ttruck\tlorry\n", 1, r"got 4 field"),
]


@pytest.mark.parametrize("name, text, line, problem", ERRORS, ids=[f"{e[0]}-{i}" for i, e in enumerate(ERRORS)])
def test_file_errors_name_the_file_and_the_problem(tmp_path, name, text, line, problem):
    path = write(tmp_path, name, text)
    with pytest.raises(ValueError) as info:
        LabelMap.load(path)
    assert isinstance(info.value, LabelMapError)
    message = str(info.value)
    assert "\n" not in message
    where = str(path) if line is None else f"{path}:{line}"
    assert message.startswith(f"{where}: "), message
    assert re.search(problem, message[len(where) + 2:]), message


def test_missing_file_and_directory(tmp_path):
    with pytest.raises(LabelMapError, match=rf"^{tmp_path}/nope\.json: no such label map file$"):
        LabelMap.load(tmp_path / "nope.json")
    (tmp_path / "dir.csv").mkdir()
    with pytest.raises(LabelMapError, match=rf"^{tmp_path}/dir\.csv: is a directory"):
        LabelMap.load(tmp_path / "dir.csv")


def _map_error(tmp_path: Path, mapping: dict, vocab: Vocabulary = VOCAB) -> str:
    path = write(tmp_path, "project.json", json.dumps(mapping))
    label_map = LabelMap.load(path)
    with pytest.raises(LabelMapError) as info:
        label_map.mapped_vocabulary(vocab)
    message = str(info.value)
    assert message.startswith(f"{path}: ") and "\n" not in message, message
    # apply fails the same way (it is the same mapping)
    with pytest.raises(LabelMapError):
        label_map.apply(make_seg(vocab), vocab)
    return message


def test_unknown_keys_are_named(tmp_path):
    message = _map_error(tmp_path, {"persn": "human", "car": "vehicle", "zebra": None})
    assert "classes 'persn' (did you mean 'person'?), 'zebra' not in the vocabulary" in message
    assert "'car'" not in message


def test_thing_stuff_mix_names_the_label(tmp_path):
    message = _map_error(tmp_path, {"car": "ground", "road": "ground"})
    assert "label 'ground' mixes things and stuff: 'car' (thing), 'road' (stuff)" in message
    # an unnamed class with the label's name joins it too: truck -> road mixes with the stuff class road
    assert "label 'road' mixes things and stuff" in _map_error(tmp_path, {"truck": "road"})


def test_dropping_every_class_is_an_error(tmp_path):
    message = _map_error(tmp_path, {c.name: None for c in VOCAB})
    assert "drops every class" in message


# --- ids ------------------------------------------------------------------------------------------------------------

IDS_VOCAB = Vocabulary(
    [
        VocabClass("person", id=1, color=(220, 20, 60), supercategory="human", min_score=0.4),
        VocabClass("car", id=3, color=(0, 0, 142), supercategory="vehicle", min_score=0.5),
        VocabClass("truck", id=8, color=(0, 0, 70), supercategory="vehicle", min_score=0.3),
        VocabClass("road", isthing=False, id=128, color=(128, 64, 128)),
        VocabClass("pavement", isthing=False, id=144, min_score=0.2),
        VocabClass("sky", isthing=False, id=187),
        VocabClass("tree", isthing=False, id=184, synonyms=("bush",)),
    ]
)


def test_ids_are_carried_from_the_first_source():
    mapped, index_map = LabelMap.from_json(MAP).mapped_vocabulary(IDS_VOCAB)
    assert mapped.names == ["person", "vehicle", "road", "tree"]
    assert index_map.tolist() == [0, 1, 1, 2, 2, -1, 3]
    assert mapped.category_ids() == [1, 3, 128, 184]  # vehicle: car's id; road: road's (its first source)
    vehicle, road = mapped[1], mapped[2]
    # the first source's colour and supercategory, the smallest min_score, the sources' prompts
    assert (vehicle.color, vehicle.supercategory, vehicle.min_score) == ((0, 0, 142), "vehicle", 0.3)
    assert (road.color, road.supercategory, road.min_score) == ((128, 64, 128), None, 0.2)
    assert vehicle.prompts == ("car", "truck") and road.prompts == ("road", "pavement")
    assert vehicle.isthing and not road.isthing
    # classes the map does not name are unchanged
    assert mapped[0] == IDS_VOCAB[0] and mapped[3] == IDS_VOCAB[6]
    # min_score: None when no source has one
    sky_tree = LabelMap.from_json({"sky": "background", "tree": "background"}).mapped_vocabulary(IDS_VOCAB).vocab
    assert sky_tree.names[-1] == "background" and sky_tree[-1].min_score is None and sky_tree[-1].id == 187


def test_ids_given_by_the_map():
    mapping = {"car": {"name": "Vehicle", "id": 20}, "truck": "Vehicle", "person": {"name": "Person", "id": 10},
               "road": {"name": "Ground", "id": 30}, "pavement": {"name": "Ground", "id": 30}, "sky": None,
               "tree": {"name": "Vegetation", "id": 40}}
    for vocab in (VOCAB, IDS_VOCAB):
        mapped, _ = LabelMap.from_json(mapping).mapped_vocabulary(vocab)
        assert list(zip(mapped.category_ids(), mapped.names)) == [(10, "Person"), (20, "Vehicle"), (30, "Ground"),
                                                                  (40, "Vegetation")]
    # a vocabulary without ids and a map without ids: numbered 1..M in the mapped order
    plain, _ = LabelMap.from_json(MAP).mapped_vocabulary(VOCAB)
    assert plain.category_ids() == [1, 2, 3, 4] and all(c.id is None for c in plain)


def test_clashing_ids(tmp_path):
    # two labels with one id (a given id against a class's own)
    message = _map_error(tmp_path, {"truck": {"name": "lorry", "id": 1}}, IDS_VOCAB)
    assert "labels 'person' and 'lorry' both get category id 1" in message
    # two labels given one id by the map
    message = _map_error(tmp_path, {"car": {"name": "a", "id": 5}, "truck": {"name": "b", "id": 5}}, IDS_VOCAB)
    assert "labels 'a' and 'b' both get category id 5" in message
    # one label given two ids
    message = _map_error(tmp_path, {"car": {"name": "vehicle", "id": 3}, "truck": {"name": "vehicle", "id": 4}})
    assert "label 'vehicle' is given two ids: 3 from 'car', 4 from 'truck'" in message
    # a vocabulary without ids: some labels with ids and others without would be numbered from 0
    message = _map_error(tmp_path, {"car": {"name": "vehicle", "id": 30}})
    assert "gives ids to some labels but not to 'person', 'truck', 'road', 'pavement', 'sky', ..." in message


# --- one result relabelled -----------------------------------------------------------------------------------------


def test_apply_merges_drops_and_deduplicates():
    seg = make_seg()
    before = (seg.semantic.copy(), seg.panoptic.copy(), seg.segments.class_id.copy(), seg.instances.class_id.copy())
    label_map = LabelMap.from_json(MAP)
    out = label_map.apply(seg, VOCAB)

    mapped = label_map.mapped_vocabulary(VOCAB).vocab
    assert out is not seg and out.vocab == mapped and out.class_names == ["person", "vehicle", "road", "tree"]
    # semantic: by hand
    assert out.semantic.dtype == np.int32 and np.array_equal(out.semantic, SEMANTIC_MAPPED)
    # panoptic, pixel by pixel against the map written by hand
    assert out.panoptic.dtype == np.int32 and np.array_equal(out.panoptic, PANOPTIC_MAPPED)
    s = out.segments
    assert s.id.tolist() == [2, 4, 5, 6, 7]
    assert s.class_id.tolist() == [2, 0, 1, 1, 3]  # car and truck are two vehicle objects, not merged
    assert s.class_name.tolist() == ["road", "person", "vehicle", "vehicle", "tree"]
    assert s.isthing.tolist() == [False, True, True, True, False]
    # the merged road: 9 pavement + 8 road pixels, the union's box, the max score, the smaller id's query
    assert (s.area[0], tuple(s.bbox[0]), s.score[0], s.query[0]) == (17, (0.0, 3.0, 8.0, 3.0), 0.8, 11)
    assert s.area.tolist() == [17, 4, 4, 5, 2] and s.score.tolist() == [0.8, 0.7, 0.5, 0.4, 0.3]
    for row in s:  # every segment's area and box are those of its pixels in the new map
        assert row.area == (out.panoptic == row.id).sum() and row.bbox == _box(out.panoptic == row.id)
    # instances: sky dropped, query 3's car/truck de-duplicated (best: car 0.9), the no-query pair by pixels
    i = out.instances
    assert i.id.tolist() == [1, 3, 4, 6, 7, 9]
    assert i.class_name.tolist() == ["vehicle", "person", "vehicle", "person", "vehicle", "vehicle"]
    assert i.score.tolist() == [0.9, 0.6, 0.5, 0.3, 0.25, 0.15]
    assert [m is seg.instances.masks[k - 1] for k, m in zip(i.id.tolist(), i.masks)] == [True] * 6
    # seg itself is unchanged
    after = (seg.semantic, seg.panoptic, seg.segments.class_id, seg.instances.class_id)
    assert all(np.array_equal(a, b) for a, b in zip(before, after))
    assert seg.vocab == VOCAB and seg.segments.class_name.tolist()[0] == "sky" and len(seg.instances) == 9

    # the COCO panoptic encoding of the result uses the mapped vocabulary's category ids
    _, infos = out.to_panoptic()
    assert [(d["id"], d["category_id"], d["area"]) for d in infos] == [(2, 3, 17), (4, 1, 4), (5, 2, 4), (6, 2, 5),
                                                                       (7, 4, 2)]
    assert np.array_equal(out.to_label_map(), np.where(SEMANTIC_MAPPED >= 0, SEMANTIC_MAPPED + 1, 0))


def test_ties_keep_the_better_rank_and_a_result_without_vocabulary_gets_the_mapped_one():
    m = PANOPTIC == 5
    instances = [Segment(1, TRUCK, 0.5, True, 4, _box(m), mask=m, query=2),
                 Segment(2, CAR, 0.5, True, 4, _box(m), mask=m, query=2)]
    seg = Segmentation((H, W), instances=instances)
    out = LabelMap.from_json(MAP).apply(seg, VOCAB)
    assert out.instances.id.tolist() == [1] and out.instances.class_name.tolist() == ["vehicle"]
    assert out.semantic is None and out.panoptic is None and len(out.segments) == 0
    assert out.vocab == LabelMap.from_json(MAP).mapped_vocabulary(VOCAB).vocab


def test_merging_three_stuff_classes_and_dropping_a_thing():
    # sky, tree and pavement -> background; person dropped; the merged segment takes id 1 (sky's)
    label_map = LabelMap.from_json({"sky": "background", "tree": "background", "pavement": "background",
                                    "person": None})
    out = label_map.apply(make_seg(), VOCAB)
    assert out.class_names == ["car", "truck", "road", "background"]
    expected = np.array(
        [
            [1, 1, 1, 1, 1, 1, 1, 1],
            [1, 1, 1, 1, 1, 1, 1, 1],
            [0, 0, 0, 5, 5, 6, 6, 6],
            [0, 0, 0, 5, 5, 6, 6, 1],
            [3, 3, 3, 3, 1, 1, 1, 1],
            [3, 3, 3, 3, 1, 1, 1, 1],
        ],
        dtype=np.int32,
    )
    assert np.array_equal(out.panoptic, expected)
    s = out.segments
    assert s.id.tolist() == [1, 3, 5, 6] and s.class_name.tolist() == ["background", "road", "car", "truck"]
    assert (s.area[0], tuple(s.bbox[0]), s.score[0], s.query[0]) == (25, (0.0, 0.0, 8.0, 6.0), 0.9, 10)
    assert out.instances.class_name.tolist() == ["car", "truck", "truck", "background", "truck", "car", "car"]
    assert out.instances.id.tolist() == [1, 2, 4, 5, 7, 8, 9]  # nothing brought together: no de-duplication


def test_a_map_that_changes_nothing_gives_an_equal_result():
    for vocab, mapping in ((VOCAB, {"car": "car", "road": {"name": "road"}}),
                           (IDS_VOCAB, {"car": {"name": "car", "id": 3}, "sky": "sky"})):
        label_map = LabelMap.from_json(mapping)
        mapped, index_map = label_map.mapped_vocabulary(vocab)
        assert mapped == vocab and index_map.tolist() == list(range(len(vocab)))
        seg = make_seg(vocab)
        out = label_map.apply(seg, vocab)
        assert out is not seg and out.panoptic is not seg.panoptic
        assert_same(out, seg)


def test_apply_checks_the_vocabulary():
    label_map = LabelMap.from_json(MAP)
    with pytest.raises(ValueError, match="not the one the label map is applied with"):
        label_map.apply(make_seg(), parse_inline("person; car; lorry"))
    bad = Segmentation((H, W), instances=[Segment(1, 7, 0.5, True, 1, (0, 0, 1, 1), mask=MASK_D, query=0)])
    with pytest.raises(ValueError, match=r"instance class index outside the vocabulary \(0..6\)"):
        label_map.apply(bad, VOCAB)


# --- the real COCO writer and pycocotools ------------------------------------------------------------------------


def test_mapped_result_written_by_the_coco_writer_loads_in_pycocotools(tmp_path):
    path = write(tmp_path, "project.csv", "class,label,id\nperson,Person,10\ncar,Vehicle,20\ntruck,Vehicle\n"
                                          "road,Ground,30\npavement,Ground\nsky,\ntree,Vegetation,40\n")
    label_map = LabelMap.load(path)
    mapped_vocab, _ = label_map.mapped_vocabulary(VOCAB)
    mapped = label_map.apply(make_seg(), VOCAB)
    (writer,) = make_writers(["coco"], tmp_path / "out", mapped_vocab)
    item = ItemInfo("a.png", "a.png", W, H)
    (json_path,) = writer.finalize([(item, writer.write_item(item, mapped))])

    coco = COCO(str(json_path))
    cats = coco.loadCats(coco.getCatIds())
    assert [(c["id"], c["name"], c["isthing"]) for c in cats] == [(10, "Person", 1), (20, "Vehicle", 1),
                                                                  (30, "Ground", 0), (40, "Vegetation", 0)]
    anns = coco.loadAnns(coco.getAnnIds())
    # by hand: instances 1 (car 0.9, A), 3 (person, P), 4 (truck, B), 6 (person, A), 7 (truck, C), 9 (car, D)
    expected = [(20, 0.9, MASK_A), (10, 0.6, MASK_P), (20, 0.5, MASK_B), (10, 0.3, MASK_A), (20, 0.25, MASK_C),
                (20, 0.15, MASK_D)]
    assert len(anns) == len(expected)
    for ann, (category_id, score, mask) in zip(anns, expected):
        assert ann["category_id"] == category_id and ann["score"] == score
        assert np.array_equal(coco.annToMask(ann).astype(bool), mask)
        assert ann["area"] == int(mask_util.area(ann["segmentation"])) == mask.sum()
    assert sorted(coco.getAnnIds(catIds=[20])) == [1, 3, 5, 6] and coco.getAnnIds(catIds=[30, 40]) == []
    assert {coco.loadCats(ann["category_id"])[0]["name"] for ann in anns} == {"Person", "Vehicle"}
