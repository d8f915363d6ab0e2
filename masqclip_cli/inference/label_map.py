"""Label maps (``--label-map FILE``): a labelling team's mapping from vocabulary class to the annotation project's
label name and id, kept apart from the vocabulary.

The vocabulary says what the model is prompted with (synonyms and all); the label map says what each class is called
in the annotation project and which id it has there. Several classes may map to one label (they become one class of
the mapped vocabulary), a class may be dropped, and classes the map does not name keep their name and id.

File formats, chosen by suffix (any case):

* ``.json``: one object, class name -> ``"label"`` | ``{"name": "label", "id": 7}`` (``id`` optional) | ``null``
  (drop the class)::

      {"car": "vehicle", "truck": {"name": "vehicle", "id": 3}, "sky": null}

* ``.csv`` / ``.tsv``: rows ``class,label[,id]`` (tab-separated for ``.tsv``); an empty label drops the class; a
  first row ``class,label`` or ``class,label,id`` is a header; blank rows are skipped; quoting follows the csv module
  (``"car, red",vehicle``).

Class names and labels are trimmed and inner whitespace collapsed, as vocabulary names are. Ids are positive integers
(0 stays free for "unlabelled"). Every problem is a :class:`LabelMapError` (a ValueError) whose message is one line
naming the file and the line (CSV) or class (JSON) at fault.

:meth:`LabelMap.apply` maps one result: the semantic map by class index, panoptic segments of dropped classes become
void (0), stuff segments that the map brings into one label become one segment, instances of dropped classes go, and
one query's instances under several classes that now share a label keep only the best-scoring one.
"""

from __future__ import annotations

import csv
import dataclasses
import difflib
import functools
import io
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np

from masqclip_cli.structures import Segmentation, Segments
from masqclip_cli.structures.masks import mask_bbox
from masqclip_cli.vocab import VocabClass, Vocabulary, VocabularyError, _read_text_file

__all__ = ["LABEL_MAP_SUFFIXES", "LabelMap", "LabelMapError", "LabelRule", "MappedVocabulary"]

#: The file suffixes :meth:`LabelMap.load` reads (compared in lower case).
LABEL_MAP_SUFFIXES: tuple[str, ...] = (".json", ".csv", ".tsv")
_HEADERS = (["class", "label"], ["class", "label", "id"])


class LabelMapError(ValueError):
    """A label map could not be read, or does not fit the vocabulary it is applied to.

    ``str(error)`` is one line: ``"<source>:<line>: <problem>"``, or ``"<source>: <problem>"`` without a line.
    """

    def __init__(self, problem: str, source: str, line: int | None = None) -> None:
        self.problem = " ".join(str(problem).split())
        self.source = source
        self.line = line
        super().__init__(f"{source}: {self.problem}" if line is None else f"{source}:{line}: {self.problem}")


@dataclass(frozen=True)
class LabelRule:
    """One entry of a label map: vocabulary class ``class_name`` becomes project label ``label`` (None: dropped),
    with project id ``id`` (None: not given, see :meth:`LabelMap.mapped_vocabulary`)."""

    class_name: str
    label: str | None
    id: int | None = None


class MappedVocabulary(NamedTuple):
    """What a label map makes of a vocabulary.

    Attributes:
        vocab: the project's labels as a :class:`Vocabulary` (what the writers are given).
        index_map: (N,) int64, read-only: the mapped class index of each class index of the original vocabulary
            (N classes), -1 for a dropped class.
    """

    vocab: Vocabulary
    index_map: np.ndarray


def _collapse(text: str) -> str:
    return " ".join(text.split())


def _bad_id(value: Any) -> str | None:
    """A problem description when ``value`` is not a positive integer id."""
    if isinstance(value, bool) or not isinstance(value, int):
        return f"id must be a positive integer, got {value!r}"
    if value <= 0:
        return f"id must be a positive integer (0 is 'unlabelled'), got {value}"
    return None


@dataclass(frozen=True)
class LabelMap:
    """A mapping from vocabulary class name to project label (and id), applied to results before the writers.

    Attributes:
        rules: one :class:`LabelRule` per class named by the map, sorted by class name (the constructor sorts them).
        source: where the map came from (the file), for messages only: it takes no part in equality nor in
            :meth:`to_json`, so moving the file does not change a run's fingerprint.
    """

    rules: tuple[LabelRule, ...]
    source: str = dataclasses.field(default="<memory>", compare=False)

    def __post_init__(self) -> None:
        rules = tuple(self.rules)
        seen: set[str] = set()
        for rule in rules:
            if not isinstance(rule, LabelRule):
                raise LabelMapError(f"expected LabelRule entries, got {type(rule).__name__}", self.source)
            if not isinstance(rule.class_name, str) or not rule.class_name.strip():
                raise LabelMapError("empty class name", self.source)
            if rule.class_name in seen:
                raise LabelMapError(f"class '{rule.class_name}' is mapped twice", self.source)
            seen.add(rule.class_name)
            if rule.label is not None and (not isinstance(rule.label, str) or not rule.label.strip()):
                raise LabelMapError(f"class '{rule.class_name}': empty label (None drops the class)", self.source)
            if rule.label is None and rule.id is not None:
                raise LabelMapError(f"class '{rule.class_name}': an id for a dropped class", self.source)
            if rule.id is not None and (problem := _bad_id(rule.id)):
                raise LabelMapError(f"class '{rule.class_name}': {problem}", self.source)
        object.__setattr__(self, "rules", tuple(sorted(rules, key=lambda r: r.class_name)))

    # --- reading -------------------------------------------------------------------------------------------------
    @classmethod
    def load(cls, path: str | Path) -> LabelMap:
        """Read a label map file: ``.json``, ``.csv`` or ``.tsv`` (see the module docstring)."""
        path = Path(path)
        source = str(path)
        suffix = path.suffix.lower()
        if suffix not in LABEL_MAP_SUFFIXES:
            raise LabelMapError(
                f"unknown label map format '{path.suffix or '(no suffix)'}' (use .json, .csv or .tsv)", source
            )
        text = _read_text(path)
        if suffix == ".json":
            return cls.from_json(_decode_json(text, source), source)
        return cls.from_rows(_parse_rows(text, "\t" if suffix == ".tsv" else ",", source), source)

    @classmethod
    def from_json(cls, obj: Any, source: str = "<json>") -> LabelMap:
        """A map from decoded JSON: an object of class name -> ``"label"`` | ``{"name": label, "id": int}`` |
        ``None`` (see the module docstring)."""
        if not isinstance(obj, Mapping):
            raise LabelMapError(f"expected an object of class name -> label, got {_json_type(obj)}", source)
        for key in getattr(obj, "duplicates", ()):
            raise LabelMapError(f"class '{_collapse(str(key))}' is mapped twice", source)
        if not obj:
            raise LabelMapError("empty label map (no classes)", source)
        rules: list[LabelRule] = []
        seen: set[str] = set()
        for key, value in obj.items():
            name = _collapse(str(key))
            where = f"class '{name}'"
            if not name:
                raise LabelMapError("empty class name (key \"\")", source)
            if name in seen:
                raise LabelMapError(f"{where} is mapped twice", source)
            seen.add(name)
            label_id = None
            if value is None:
                label = None
            elif isinstance(value, str):
                label = value
            elif isinstance(value, Mapping):
                for twice in getattr(value, "duplicates", ()):
                    raise LabelMapError(f"{where}: key '{twice}' given twice", source)
                stray = sorted(set(value) - {"name", "id"})
                if stray:
                    raise LabelMapError(f"{where}: unknown key(s) {', '.join(map(repr, stray))} (use name, id)",
                                        source)
                if "name" not in value:
                    raise LabelMapError(f"{where}: 'name' missing", source)
                label = value["name"]
                if not isinstance(label, str):
                    raise LabelMapError(f"{where}: 'name' must be a string, got {_json_type(label)}", source)
                label_id = value.get("id")
                if label_id is not None and (problem := _bad_id(label_id)):
                    raise LabelMapError(f"{where}: {problem}", source)
            else:
                raise LabelMapError(
                    f"{where}: expected a label string, an object with 'name' (and 'id') or null, got "
                    f"{_json_type(value)}",
                    source,
                )
            if label is not None:
                label = _collapse(label)
                if not label:
                    raise LabelMapError(f"{where}: empty label (use null to drop the class)", source)
            rules.append(LabelRule(name, label, label_id))
        return cls(tuple(rules), source)

    @classmethod
    def from_rows(cls, rows: Sequence[tuple[int, Sequence[str]]], source: str = "<rows>") -> LabelMap:
        """A map from ``(line number, cells)`` rows ``class, label[, id]`` (the CSV form; an empty label drops the
        class; a header row must already be removed)."""
        rules: list[LabelRule] = []
        lines: dict[str, int] = {}
        for line, cells in rows:
            if len(cells) not in (2, 3):
                raise LabelMapError(
                    f"expected 'class,label' or 'class,label,id', got {len(cells)} field(s) (an empty label drops "
                    "the class: 'name,')",
                    source,
                    line,
                )
            name, label = _collapse(cells[0]), _collapse(cells[1])
            raw_id = _collapse(cells[2]) if len(cells) == 3 else ""
            if not name:
                raise LabelMapError("empty class name", source, line)
            if name in lines:
                raise LabelMapError(f"class '{name}' is mapped twice (first on line {lines[name]})", source, line)
            lines[name] = line
            label_id = None
            if raw_id:
                if not label:
                    raise LabelMapError(f"class '{name}': an id but no label (an empty label drops the class)",
                                        source, line)
                try:
                    label_id = int(raw_id)
                except ValueError:
                    raise LabelMapError(f"class '{name}': id must be a positive integer, got {raw_id!r}",
                                        source, line) from None
                if problem := _bad_id(label_id):
                    raise LabelMapError(f"class '{name}': {problem}", source, line)
            rules.append(LabelRule(name, label or None, label_id))
        if not rules:
            raise LabelMapError("empty label map (no rows)", source)
        return cls(tuple(rules), source)

    # --- the run fingerprint -------------------------------------------------------------------------------------
    @classmethod
    def from_canonical(cls, rules: Sequence[Mapping[str, Any]], source: str = "<run>") -> LabelMap:
        """The map back from :meth:`to_json` (as a run fingerprint keeps it)."""
        try:
            return cls(tuple(sorted((LabelRule(str(r["class"]), None if r["label"] is None else str(r["label"]),
                                               None if r["id"] is None else int(r["id"])) for r in rules),
                                    key=lambda r: r.class_name)), source=source)
        except (KeyError, TypeError, ValueError) as exc:
            raise LabelMapError(f"not a label map as to_json() writes it ({exc})", source) from None

    def to_json(self) -> list[dict[str, Any]]:
        """The mapping's content, canonical: one ``{"class", "label", "id"}`` per rule, sorted by class (the same
        for every file form of one mapping; the file's name is not part of it)."""
        return [{"class": r.class_name, "label": r.label, "id": r.id} for r in self.rules]

    # --- the mapping ---------------------------------------------------------------------------------------------
    def mapped_vocabulary(self, vocab: Vocabulary) -> MappedVocabulary:
        """The project's labels as a vocabulary, and the class index map.

        * Classes the map does not name keep their name and id (their :class:`VocabClass` unchanged, unless another
          class is mapped to their name: a label is a name, so the two then become one class); a class the map
          sends to a label is that label; several classes with one label become one class.
        * Labels are listed in order of first appearance over ``vocab``'s order.
        * A merged label (or a renamed class) keeps its sources' prompts (as the ``"label: a, b"`` vocabulary form
          does), the first source's colour and supercategory, and the smallest of its sources' ``min_score``
          (None if none has one). Its sources must agree on thing / stuff.
        * A label's id: the one the map gives (all rules of one label must agree), else its first source's id.
          Category ids then follow :meth:`Vocabulary.category_ids`: a mapped vocabulary without any id is numbered
          1..M, one with ids uses them (a class without an id takes its contiguous index there). For a vocabulary
          without ids the map gives every label an id, or none (a mix would number the rest from 0, "unlabelled").
          Two labels with one category id are an error.

        Raises :class:`LabelMapError` (naming the map's file) for map keys that name no class of ``vocab`` (with the
        closest class name), a thing / stuff mix, clashing ids, ids for only some labels of a vocabulary without
        ids, or a map that drops every class.
        """
        return _mapping(self, vocab)

    def apply(self, seg: Segmentation, vocab: Vocabulary) -> Segmentation:
        """``seg`` (class indices into ``vocab``) relabelled with the map; a new result carrying the mapped
        vocabulary (``seg`` is not changed).

        * semantic (H, W): class index -> mapped index; dropped classes -> -1.
        * panoptic (H, W) and ``segments``: segments of dropped classes are removed and their pixels become 0
          (void). Stuff segments of different source classes that now share a label become one segment: the
          smallest of their ids (on every pixel), the area summed, the box of the union, the query of the
          smallest-id segment, and the **maximum** score (the rule post-processing uses for stuff merged from
          several queries). Thing segments keep their ids (each is its own object).
        * instances: those of dropped classes are removed; rows of one query (rows without a query: of one mask,
          pixel for pixel) under different source classes that now share a label keep only the best-scoring one
          (the first on a tie). Instance ids and order are kept.

        A map that changes nothing gives a result equal to ``seg``.
        """
        if seg.vocab is not None and list(seg.vocab.names) != vocab.names:
            raise ValueError("the result's vocabulary is not the one the label map is applied with")
        mapped, index_map = _mapping(self, vocab)
        n = len(vocab)
        names = mapped.names
        for what, table in (("segment", seg.segments), ("instance", seg.instances)):
            if table is not None and len(table) and (table.class_id.min() < 0 or table.class_id.max() >= n):
                raise ValueError(f"{what} class index outside the vocabulary (0..{n - 1})")

        semantic = None
        if seg.semantic is not None:
            sem = np.asarray(seg.semantic)
            lut = np.append(index_map, -1)  # index n: anything outside the vocabulary (-1 included) stays "none"
            inside = (sem >= 0) & (sem < n)
            semantic = lut[np.where(inside, sem, n)].astype(sem.dtype)

        panoptic, segments = _map_segments(seg.panoptic, seg.segments, index_map, names)
        instances = None if seg.instances is None else _map_instances(seg.instances, index_map, names)
        return Segmentation(
            tuple(seg.image_size), semantic=semantic, panoptic=panoptic, segments=segments, instances=instances,
            vocab=mapped,
        )


# --- building the mapped vocabulary ------------------------------------------------------------------------------


@functools.lru_cache(maxsize=16)
def _mapping(label_map: LabelMap, vocab: Vocabulary) -> MappedVocabulary:
    """:meth:`LabelMap.mapped_vocabulary`, computed once per (map, vocabulary): ``apply`` runs once per image."""
    source = label_map.source
    rules = {r.class_name: r for r in label_map.rules}
    unknown = sorted(set(rules) - set(vocab.names))
    if unknown:
        described = []
        for key in unknown:
            close = difflib.get_close_matches(key, vocab.names, n=1)
            described.append(f"'{key}'" + (f" (did you mean '{close[0]}'?)" if close else ""))
        raise LabelMapError(
            f"{'class' if len(unknown) == 1 else 'classes'} {', '.join(described)} not in the vocabulary "
            f"({vocab.source})",
            source,
        )

    # label -> the source class indices, in vocabulary order (dict order = first appearance)
    sources: dict[str, list[int]] = {}
    position: dict[str, int] = {}  # label -> its index in the mapped vocabulary
    given_ids: dict[str, dict[int, str]] = {}  # label -> {id given by the map: the class that gave it}
    index_map = np.full(len(vocab), -1, dtype=np.int64)
    for i, cls in enumerate(vocab):
        rule = rules.get(cls.name)
        if rule is not None and rule.label is None:
            continue
        label = cls.name if rule is None else rule.label
        sources.setdefault(label, []).append(i)
        position.setdefault(label, len(position))
        if rule is not None and rule.id is not None:
            given_ids.setdefault(label, {}).setdefault(rule.id, cls.name)
        index_map[i] = position[label]
    if not sources:
        raise LabelMapError(f"the label map drops every class of the vocabulary ({vocab.source})", source)

    classes: list[VocabClass] = []
    for label, members in sources.items():
        first = vocab[members[0]]
        things = {vocab[i].isthing for i in members}
        if len(things) > 1:
            kinds = ", ".join(f"'{vocab[i].name}' ({'thing' if vocab[i].isthing else 'stuff'})" for i in members)
            raise LabelMapError(f"label '{label}' mixes things and stuff: {kinds}", source)
        ids = given_ids.get(label, {})
        if len(ids) > 1:
            pairs = ", ".join(f"{v} from '{c}'" for v, c in ids.items())
            raise LabelMapError(f"label '{label}' is given two ids: {pairs}", source)
        label_id = next(iter(ids)) if ids else first.id
        if len(members) == 1 and label == first.name:
            classes.append(dataclasses.replace(first, id=label_id))
            continue
        prompts: list[str] = []
        for i in members:
            for prompt in vocab[i].prompts:
                if prompt.casefold() not in {p.casefold() for p in prompts}:
                    prompts.append(prompt)
        floors = [vocab[i].min_score for i in members if vocab[i].min_score is not None]
        classes.append(
            VocabClass(
                label,
                tuple(prompts),
                first.isthing,
                label_id,
                first.color,
                encode_name=False,
                min_score=min(floors) if floors else None,
                supercategory=first.supercategory,
            )
        )

    without_id = [c.name for c in classes if c.id is None]
    if all(c.id is None for c in vocab) and 0 < len(without_id) < len(classes):
        # Vocabulary.category_ids would number these by their contiguous index (the first one 0, "unlabelled")
        shown = ", ".join(f"'{name}'" for name in without_id[:5]) + (", ..." if len(without_id) > 5 else "")
        raise LabelMapError(
            f"the map gives ids to some labels but not to {shown}; the vocabulary has no ids, so give every label "
            "an id, or none",
            source,
        )
    if any(c.id is not None for c in classes):  # Vocabulary.category_ids: given id, else the contiguous index
        owner: dict[int, str] = {}
        for index, c in enumerate(classes):
            category_id = index if c.id is None else c.id
            if category_id in owner:
                why = "" if c.id is not None else f" (it has no id, so it takes its index {index})"
                raise LabelMapError(
                    f"labels '{owner[category_id]}' and '{c.name}' both get category id {category_id}{why}", source
                )
            owner[category_id] = c.name
    try:
        mapped = Vocabulary(classes, f"{vocab.source} mapped by {source}")
    except VocabularyError as exc:
        raise LabelMapError(f"the mapped vocabulary is invalid: {exc.problem}", source) from None
    index_map.setflags(write=False)
    return MappedVocabulary(mapped, index_map)


# --- mapping one result ------------------------------------------------------------------------------------------


def _map_segments(
    panoptic: np.ndarray | None, table: Segments, index_map: np.ndarray, names: list[str]
) -> tuple[np.ndarray | None, Segments]:
    """The panoptic (H, W) id map and its segments, relabelled (see :meth:`LabelMap.apply`)."""
    new_class = index_map[table.class_id] if len(table) else np.zeros(0, np.int64)
    keep = new_class >= 0
    id_changes: dict[int, int] = {int(i): 0 for i in table.id[~keep].tolist()}
    area, score, bbox = table.area.copy(), table.score.copy(), table.bbox.copy()

    groups: dict[int, list[int]] = {}  # stuff label -> its rows, in table order
    for k in np.flatnonzero(keep & ~table.isthing).tolist():
        groups.setdefault(int(new_class[k]), []).append(k)
    merged: list[tuple[int, int]] = []  # (kept row, its id)
    for rows in groups.values():
        if len({int(table.class_id[k]) for k in rows}) < 2:
            continue  # nothing the map brought together
        target = min(rows, key=lambda k: int(table.id[k]))
        target_id = int(table.id[target])
        for k in rows:
            if k != target:
                keep[k] = False
                id_changes[int(table.id[k])] = target_id
        area[target] = int(table.area[rows].sum())
        score[target] = float(table.score[rows].max())
        bbox[target] = _union_box(table.bbox[rows], table.area[rows])
        merged.append((target, target_id))

    new_panoptic = panoptic
    if panoptic is not None:
        pan = np.asarray(panoptic)
        new_panoptic = pan.copy()
        if id_changes:
            old_ids = np.array(sorted(id_changes), dtype=np.int64)
            new_ids = np.array([id_changes[i] for i in old_ids.tolist()], dtype=np.int64)
            pos = np.searchsorted(old_ids, pan).clip(0, old_ids.size - 1)
            hit = old_ids[pos] == pan
            new_panoptic[hit] = new_ids[pos[hit]].astype(pan.dtype)
        for target, target_id in merged:  # the box measured on the map, where there is one
            bbox[target] = mask_bbox(new_panoptic == target_id)

    rows = np.flatnonzero(keep)
    segments = Segments(
        id=table.id[rows],
        class_id=new_class[rows],
        score=score[rows],
        isthing=table.isthing[rows],
        area=area[rows],
        bbox=bbox[rows],
        query=table.query[rows],
        masks=None if table.masks is None else [table.masks[k] for k in rows.tolist()],
        class_names=names,
    )
    return new_panoptic, segments


def _union_box(boxes: np.ndarray, areas: np.ndarray) -> tuple[float, float, float, float]:
    """The COCO box (x, y, w, h) covering ``boxes`` (K, 4), leaving out empty segments; zeros when all are empty."""
    boxes = boxes[(areas > 0) & (boxes[:, 2] > 0) & (boxes[:, 3] > 0)]
    if not len(boxes):
        return (0.0, 0.0, 0.0, 0.0)
    x0, y0 = boxes[:, 0].min(), boxes[:, 1].min()
    x1, y1 = (boxes[:, 0] + boxes[:, 2]).max(), (boxes[:, 1] + boxes[:, 3]).max()
    return (float(x0), float(y0), float(x1 - x0), float(y1 - y0))


def _map_instances(table: Segments, index_map: np.ndarray, names: list[str]) -> Segments:
    """The instances relabelled, dropped ones removed, one query's rows under one new label de-duplicated."""
    new_class = index_map[table.class_id] if len(table) else np.zeros(0, np.int64)
    groups: dict[tuple[Any, int], list[int]] = {}
    for k in np.flatnonzero(new_class >= 0).tolist():
        q = int(table.query[k])
        if q >= 0:
            key: Any = ("q", q)
        else:
            mask = np.asarray(table.masks[k], bool) if table.masks is not None else None
            key = ("row", k) if mask is None else ("m", mask.shape, np.packbits(mask).tobytes())
        groups.setdefault((key, int(new_class[k])), []).append(k)
    kept: list[int] = []
    for rows in groups.values():
        if len({int(table.class_id[k]) for k in rows}) < 2:
            kept.extend(rows)
        else:  # the best score; on a tie the first row (the better rank)
            kept.append(max(rows, key=lambda k: (float(table.score[k]), -k)))
    rows = np.array(sorted(kept), dtype=np.int64)
    out = table[rows]
    out.class_id = new_class[rows]
    out.class_names = list(names)
    return out


# --- reading files -----------------------------------------------------------------------------------------------


class _JsonObject(dict):
    """A decoded JSON object that remembers its repeated keys (json keeps the last value silently; a label map
    refuses them)."""

    duplicates: tuple[str, ...] = ()


def _pairs_hook(pairs: list[tuple[str, Any]]) -> _JsonObject:
    out = _JsonObject()
    duplicates: list[str] = []
    for key, value in pairs:
        if key in out and key not in duplicates:
            duplicates.append(key)
        out[key] = value
    out.duplicates = tuple(duplicates)
    return out


def _decode_json(text: str, source: str) -> Any:
    try:
        return json.loads(text, object_pairs_hook=_pairs_hook)
    except json.JSONDecodeError as e:
        raise LabelMapError(f"invalid JSON: {e.msg} (column {e.colno})", source, e.lineno) from None


def _parse_rows(text: str, delimiter: str, source: str) -> list[tuple[int, list[str]]]:
    """``(line, cells)`` of every non-blank CSV / TSV row; a first row ``class,label[,id]`` (the header) left out."""
    reader = csv.reader(io.StringIO(text), delimiter=delimiter, strict=True)
    rows: list[tuple[int, list[str]]] = []
    first = True
    try:
        for cells in reader:
            if not any(c.strip() for c in cells):
                continue
            if first and [c.strip().lower() for c in cells] in _HEADERS:
                first = False
                continue
            first = False
            rows.append((reader.line_num, cells))
    except csv.Error as e:
        kind = "TSV" if delimiter == "\t" else "CSV"
        raise LabelMapError(f"bad {kind}: {e}", source, reader.line_num) from None
    return rows


def _read_text(path: Path) -> str:
    """A UTF-8 text file (a BOM is allowed); any failure is a LabelMapError naming it (the vocabulary's reader)."""
    try:
        return _read_text_file(path, what="label map file")
    except VocabularyError as exc:
        raise LabelMapError(exc.problem, str(path), exc.line) from None


def _json_type(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, (int, float)):
        return "a number"
    names = {str: "a string", list: "a list"}
    return names.get(type(value), "an object" if isinstance(value, Mapping) else type(value).__name__)
