"""Vocabularies: the list of classes a user segments an image into.

A vocabulary is an ordered list of :class:`VocabClass`. Each class has a display name, the names
that are encoded by the CLIP text tower (their embeddings are averaged), a thing/stuff flag, an
optional numeric id and an optional colour.

Vocabularies come from four places, all reachable through :func:`load_vocabulary` (the single
``--vocab`` option):

* a text file, one class per line (:func:`parse_text`)::

      # comment
      person                                    <- thing by default
      car, automobile                           <- display name "car"; both names encoded
      tree-merged: branch, tree, bush [stuff]   <- display label only; the names after ':' encoded

* a JSON file: a list of ``{"name", "synonyms", "isthing", "id", "color", "encode_name"}`` objects,
  or an object with a ``"categories"`` list of them (a COCO categories list works as is);
* a preset shipped in ``masqclip_cli/presets`` (:data:`PRESET_NAMES`);
* an inline list: classes separated by ``;`` (``"person; car, automobile; road [stuff]"``).

Every error is a :class:`VocabularyError` whose message is one line naming the source, and the line
(text files), class (inline) or item (JSON) at fault.
"""

from __future__ import annotations

import collections.abc
import colorsys
import dataclasses
import difflib
import functools
import hashlib
import json
import operator
import re
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

__all__ = [
    "category_ids",
    "PRESETS_DIR",
    "PRESET_NAMES",
    "PresetInfo",
    "VocabClass",
    "Vocabulary",
    "VocabularyError",
    "list_presets",
    "load_file",
    "load_preset",
    "load_vocabulary",
    "parse_inline",
    "parse_text",
    "read_templates",
    "short_name",
    "FIRST_PALETTE_SIZE",
    "LATER_PALETTE_SIZE",
]

#: Directory holding the preset data files. A module attribute so that tests can monkeypatch it;
#: every function reads it at call time.
PRESETS_DIR: Path = Path(__file__).resolve().parent / "presets"

#: The shipped presets, in the order :func:`list_presets` reports them.
PRESET_NAMES: tuple[str, ...] = (
    "coco-panoptic",
    "ade20k-150",
    "ade20k-847",
    "pascal-context-59",
    "pascal-context-459",
    "coco-instance-65",
    "coco-base-48",
    "coco-novel-17",
)

_VILD_TEMPLATES_FILE = "templates-vild.txt"
_PATH_SUFFIXES = (".txt", ".json", ".csv", ".vocab")
_PATH_LIMIT = 200  # characters of a (missing) path quoted in a message
_MARKER_RE = re.compile(r"\[([^\[\]]*)\]\s*$")


class VocabularyError(ValueError):
    """A vocabulary (or template list) could not be read or is invalid.

    ``str(error)`` is one line: ``"<source>:<line>: <problem>"``, ``"<source>: <problem>"`` when there
    is no line, or just ``"<problem>"`` when there is no source either.
    """

    def __init__(self, problem: str, source: str | None = None, line: int | None = None) -> None:
        self.problem = " ".join(str(problem).split())
        self.source = source
        self.line = line
        if source is None:
            message = self.problem
        elif line is None:
            message = f"{source}: {self.problem}"
        else:
            message = f"{source}:{line}: {self.problem}"
        super().__init__(message)


class _ClassSyntaxError(Exception):
    """Internal: a problem in one class spec; the caller adds where it happened."""


@dataclass(frozen=True)
class VocabClass:
    """One class of a vocabulary.

    ``name`` is what is shown. ``prompts`` are the names given to the CLIP text tower (their
    embeddings are averaged): ``(name, *synonyms)``, or only ``synonyms`` when ``encode_name`` is
    False (the ``"label: a, b"`` form, where the display name is a label only). ``line`` is where the
    class was read from (1-based) and does not take part in equality.
    """

    name: str
    synonyms: tuple[str, ...] = ()
    isthing: bool = True
    id: int | None = None
    color: tuple[int, int, int] | None = None
    encode_name: bool = True
    line: int | None = field(default=None, compare=False)
    min_score: float | None = None
    supercategory: str | None = None

    def __post_init__(self) -> None:
        # Accept lists for the tuple fields; the dataclass stays hashable.
        if not isinstance(self.synonyms, tuple) and isinstance(self.synonyms, collections.abc.Iterable):
            if isinstance(self.synonyms, str):
                object.__setattr__(self, "synonyms", (self.synonyms,))
            else:
                object.__setattr__(self, "synonyms", tuple(self.synonyms))
        if self.color is not None and not isinstance(self.color, tuple):
            object.__setattr__(self, "color", tuple(self.color))

    @property
    def prompts(self) -> tuple[str, ...]:
        """The names to encode: ``(name, *synonyms)``, or ``synonyms`` when ``encode_name`` is False."""
        return (self.name, *self.synonyms) if self.encode_name else tuple(self.synonyms)


def _class_key(cls: VocabClass) -> tuple[str, tuple[str, ...]]:
    """Identity used for duplicate detection: display name and prompts, case-insensitive."""
    return cls.name.casefold(), tuple(p.casefold() for p in cls.prompts)


def _default_locate(index: int, cls: VocabClass) -> tuple[int | None, str]:
    """Where a class is, for messages: its source line when known, else ``class <n>`` (1-based)."""
    if cls.line is not None:
        return cls.line, f"line {cls.line}"
    return None, f"class {index + 1}"


def _located(problem: str, source: str, line: int | None, where: str) -> VocabularyError:
    if line is not None:
        return VocabularyError(problem, source, line)
    return VocabularyError(f"{where}: {problem}", source)


def _check_color(value: Any) -> str | None:
    """Return a problem description when ``value`` is not an ``(r, g, b)`` triple of ints 0-255."""
    if (
        not isinstance(value, (tuple, list))
        or len(value) != 3
        or not all(isinstance(c, int) and not isinstance(c, bool) and 0 <= c <= 255 for c in value)
    ):
        return f"bad color {_quoted(value)} (need 3 integers 0-255)"
    return None


def _validate_classes(
    classes: Sequence[VocabClass],
    source: str,
    locate: Callable[[int, VocabClass], tuple[int | None, str]] = _default_locate,
) -> None:
    """Check a class list; raise :class:`VocabularyError` located with ``locate``."""
    if len(classes) == 0:
        raise VocabularyError("empty vocabulary (no classes)", source)
    seen: dict[tuple[str, tuple[str, ...]], str] = {}
    seen_ids: dict[int, str] = {}
    for index, cls in enumerate(classes):
        if not isinstance(cls, VocabClass):
            raise VocabularyError(f"class {index + 1}: expected a VocabClass, got {type(cls).__name__}", source)
        line, where = locate(index, cls)
        if not isinstance(cls.name, str) or not cls.name.strip():
            raise _located("empty class name", source, line, where)
        if not all(isinstance(s, str) and s.strip() for s in cls.synonyms):
            raise _located(f"class '{short_name(cls.name)}': empty or non-string synonym", source, line, where)
        if not cls.prompts:
            raise _located(f"class '{short_name(cls.name)}' has no names to encode", source, line, where)
        if cls.color is not None and (problem := _check_color(cls.color)):
            raise _located(problem, source, line, where)
        if cls.id is not None and (not isinstance(cls.id, int) or isinstance(cls.id, bool) or cls.id < 0):
            raise _located(f"bad id {_quoted(cls.id)} (need a non-negative integer)", source, line, where)
        key = _class_key(cls)
        if key in seen:
            first = seen[key]
            first_text = f"first on {first}" if first.startswith("line") else f"first is {first}"
            raise _located(f"duplicate class '{short_name(cls.name)}' ({first_text})", source, line, where)
        seen[key] = where
        class_id = index if cls.id is None else cls.id
        if class_id in seen_ids:
            raise _located(f"duplicate id {class_id} (also used by {seen_ids[class_id]})", source, line, where)
        seen_ids[class_id] = where


_GOLDEN = 0.6180339887498949

#: (saturation, value) levels of the first palette colours; hues step by the golden ratio.
_FIRST_LEVELS = ((0.85, 0.95), (0.55, 0.80), (0.95, 0.65))

#: How many distinct colours the first scheme has: at a fixed (saturation, value) every rounded colour has the same
#: largest and smallest component, so each level is one "ring" of colours (``(max, min)`` = (242, 36), (204, 92),
#: (166, 8): 6 * (max - min) colours each, 1,236 + 672 + 948).
FIRST_PALETTE_SIZE = 2856

#: The first scheme finds its last new colour at step 17,382; this cap only guarantees that the loop ends.
_FIRST_PALETTE_MAX_STEPS = 50_000

#: The ``(largest, smallest)`` components of the first scheme's colours (one pair per level), which the later colours
#: never have: so no later colour equals a first one.
_FIRST_RINGS = frozenset({(242, 36), (204, 92), (166, 8)})

#: Later colours have a largest component of at least this (never dark) ...
_LATER_MIN_BRIGHTNESS = 128
#: ... and a largest minus smallest component of at least this (never grey).
_LATER_MIN_CHROMA = 64


def short_name(name: str, limit: int = 60) -> str:
    """``name`` on one line (whitespace runs collapsed) and at most ``limit`` characters: a longer name keeps its
    start and ends with ``...``. For quoting user-given names and values in one-line messages."""
    text = " ".join(str(name).split())
    if len(text) <= limit:
        return text
    return text[: max(limit - 3, 1)].rstrip() + "..."


def _quoted(value: Any, limit: int = 60) -> str:
    """``repr(value)`` for a message, at most about ``limit`` characters: a long string is cut inside its quotes
    (``'abc'...``), any other long value like :func:`short_name`."""
    text = repr(value)
    if len(text) <= limit:
        return text
    if not isinstance(value, str):
        return short_name(text, limit)
    head = value[: max(limit - 5, 1)]
    while len(head) > 1 and len(repr(head)) > limit - 3:  # escapes (\x00, \n) make a repr longer than its string
        head = head[:-1]
    return repr(head) + "..."


def _first_palette(n: int) -> list[tuple[int, int, int]]:
    """The first ``min(n, FIRST_PALETTE_SIZE)`` palette colours (the original scheme, unchanged).

    Hues step by the golden ratio (neighbouring classes get very different hues) and saturation / value cycle through
    three levels; colours are bright enough never to be black. A colour that rounds to one already produced is
    skipped, so all are distinct.
    """
    wanted = min(n, FIRST_PALETTE_SIZE)
    out: list[tuple[int, int, int]] = []
    seen: set[tuple[int, int, int]] = set()
    i = 0
    while len(out) < wanted and i < _FIRST_PALETTE_MAX_STEPS:
        s, v = _FIRST_LEVELS[i % len(_FIRST_LEVELS)]
        r, g, b = colorsys.hsv_to_rgb((i * _GOLDEN) % 1.0, s, v)
        color = (round(r * 255), round(g * 255), round(b * 255))
        if color not in seen:
            seen.add(color)
            out.append(color)
        i += 1
    return out


@functools.lru_cache(maxsize=1)
def _lattice_tables() -> tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]]:
    """Per byte of a 24-bit candidate number (low, middle, high), the packed ``0xRRGGBB`` bits it sets.

    Bit ``i`` of the candidate number goes to channel ``i mod 3`` (red, green, blue) at bit ``7 - i div 3``: the low
    bits of the number are the high bits of the channels (see :func:`_later_palette`).
    """
    tables = []
    for byte_index in range(3):
        table = []
        for byte in range(256):
            packed = 0
            for bit in range(8):
                if byte >> bit & 1:
                    i = 8 * byte_index + bit
                    packed |= 1 << (8 * (2 - i % 3) + 7 - i // 3)
            table.append(packed)
        tables.append(tuple(table))
    return tables[0], tables[1], tables[2]


#: How many colours :func:`_later_palette` gives before it repeats (all 2**24 candidates minus the dark, grey and
#: first-scheme ones), measured once: tests check it.
LATER_PALETTE_SIZE = 13_128_792


def _later_palette(count: int) -> Iterator[tuple[int, int, int]]:
    """The ``count`` palette colours after the first scheme's.

    Candidate ``k`` = 0, 1, 2, ... is the colour whose channels are ``255 -`` the bits of ``k`` dealt out in turn to
    red, green and blue from the highest bit down (bit-reversed Morton order). The first 8 candidates are the corners
    of a lattice of spacing 128 in the RGB cube, the first 64 those of spacing 64, and so on: each step of 8x more
    classes halves the spacing (coarse to fine, over the whole cube), and consecutive candidates differ in the high
    bit of some channel. A candidate is skipped when it is dark (largest component below 128), grey (largest minus
    smallest below 64) or has the largest and smallest components of a first-scheme colour (at most 5 in a row are).
    Over the whole sequence two consecutive colours differ by at least 64 in some channel (by 128 or more in all but
    60 of the 13 million pairs). The candidates are all 2**24 colours, once each: no later colour equals another or a
    first one until :data:`LATER_PALETTE_SIZE` of them have been given; then the sequence starts again.
    """
    low, middle, high = _lattice_tables()
    first_rings = _FIRST_RINGS
    given = 0
    while given < count:
        for k in range(1 << 24):
            packed = low[k & 255] | middle[k >> 8 & 255] | high[k >> 16]
            r, g, b = 255 - (packed >> 16), 255 - (packed >> 8 & 255), 255 - (packed & 255)
            brightest, darkest = max(r, g, b), min(r, g, b)
            if brightest < _LATER_MIN_BRIGHTNESS or brightest - darkest < _LATER_MIN_CHROMA:
                continue
            if (brightest, darkest) in first_rings:
                continue
            yield (r, g, b)
            given += 1
            if given >= count:
                return


@functools.lru_cache(maxsize=8)
def _palette(n: int) -> tuple[tuple[int, int, int], ...]:
    """``n`` well-spread colours, the same on every run; the palette of ``n`` classes is a prefix of that of more.

    The first :data:`FIRST_PALETTE_SIZE` are the original golden-ratio / three-level colours (:func:`_first_palette`,
    all distinct); the rest come from :func:`_later_palette` (distinct from those and from each other up to
    :data:`LATER_PALETTE_SIZE` more).
    """
    first = _first_palette(n)
    return (*first, *_later_palette(n - len(first)))


class Vocabulary(collections.abc.Sequence[VocabClass]):
    """An ordered, immutable list of :class:`VocabClass` (index = contiguous class index).

    Validates on construction: at least one class, no duplicates (same display name and same
    prompts, case-insensitively), valid colours and ids, and distinct effective ids.
    Equality compares the classes only, not the source.
    """

    def __init__(self, classes: Sequence[VocabClass], source: str = "<memory>") -> None:
        classes = tuple(classes)
        _validate_classes(classes, source)
        self._classes: tuple[VocabClass, ...] = classes
        self.source: str = source

    # --- sequence protocol -------------------------------------------------------------------
    def __len__(self) -> int:
        return len(self._classes)

    def __getitem__(self, index: int) -> VocabClass:  # type: ignore[override]
        """The class at a contiguous index (negative indices count from the end)."""
        return self._classes[operator.index(index)]

    def __iter__(self) -> Iterator[VocabClass]:
        return iter(self._classes)

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Vocabulary):
            return NotImplemented
        return self._classes == other._classes

    def __hash__(self) -> int:
        return hash(self._classes)

    def __repr__(self) -> str:
        return f"Vocabulary({len(self)} classes from {self.source!r})"

    # --- views -----------------------------------------------------------------------------
    @property
    def classes(self) -> tuple[VocabClass, ...]:
        """All classes, in order."""
        return self._classes

    @property
    def names(self) -> list[str]:
        """Display names, in order."""
        return [c.name for c in self._classes]

    @property
    def prompts(self) -> list[tuple[str, ...]]:
        """Per class, the names to encode (see :attr:`VocabClass.prompts`)."""
        return [c.prompts for c in self._classes]

    @property
    def isthing(self) -> list[bool]:
        """Per class, True for things (countable objects), False for stuff."""
        return [c.isthing for c in self._classes]

    @property
    def thing_indices(self) -> list[int]:
        """Contiguous indices of the thing classes."""
        return [i for i, c in enumerate(self._classes) if c.isthing]

    @property
    def stuff_indices(self) -> list[int]:
        """Contiguous indices of the stuff classes."""
        return [i for i, c in enumerate(self._classes) if not c.isthing]

    @property
    def ids(self) -> list[int]:
        """Per class, its id if given, else its contiguous index."""
        return [i if c.id is None else c.id for i, c in enumerate(self._classes)]

    def category_ids(self) -> list[int]:
        """Per class, the category id written to every output: the vocabulary's ids when it gives any, else 1..N
        in vocabulary order (0 stays free for "unlabelled"). A vocabulary that gives some ids but not all uses
        :attr:`ids` (given id, else contiguous index)."""
        if all(c.id is None for c in self):
            return list(range(1, len(self) + 1))
        return list(self.ids)

    def colors(self) -> list[tuple[int, int, int]]:
        """Per class, its given colour, else a deterministic palette colour for its index."""
        palette = _palette(len(self._classes))
        return [c.color if c.color is not None else palette[i] for i, c in enumerate(self._classes)]

    def fingerprint(self) -> str:
        """SHA-256 hex digest of the prompts only (order-sensitive); a text-embedding cache key."""
        payload = json.dumps([list(p) for p in self.prompts], ensure_ascii=False, separators=(",", ":"))
        return hashlib.sha256(payload.encode("utf-8")).hexdigest()

    # --- JSON --------------------------------------------------------------------------------
    def to_json(self) -> list[dict[str, Any]]:
        """A JSON-serialisable list of class objects; :meth:`from_json` reads it back equal."""
        out: list[dict[str, Any]] = []
        for c in self._classes:
            item: dict[str, Any] = {"name": c.name, "synonyms": list(c.synonyms), "isthing": c.isthing}
            if c.id is not None:
                item["id"] = c.id
            if c.color is not None:
                item["color"] = list(c.color)
            if not c.encode_name:
                item["encode_name"] = False
            if c.min_score is not None:
                item["min_score"] = c.min_score
            if c.supercategory is not None:
                item["supercategory"] = c.supercategory
            out.append(item)
        return out

    @classmethod
    def from_json(cls, obj: Any, source: str = "<json>") -> Vocabulary:
        """Build a vocabulary from decoded JSON.

        ``obj`` is a list of class objects, or an object with a ``"categories"`` list of them (so a
        COCO categories list works; unknown keys are ignored). Each class
        object needs ``name`` (str) and may have ``synonyms`` ([str]), ``isthing`` (bool or 0/1),
        ``id`` (int >= 0), ``color`` ([r, g, b], ints 0-255), ``encode_name`` (bool), ``min_score`` (a number
        in [0, 1]: the class's own pre-annotation score floor) and ``supercategory`` (str, written to COCO
        categories). A bare string item is a class with just that name. Errors name ``source`` and the 1-based
        item.
        """
        items = obj
        if isinstance(obj, dict):
            if "categories" not in obj:
                raise VocabularyError("expected a list of classes or an object with a 'categories' list", source)
            items = obj["categories"]
            if not isinstance(items, list):
                raise VocabularyError(f"'categories' must be a list, got {_json_type(items)}", source)
        elif not isinstance(obj, list):
            raise VocabularyError(
                f"expected a list of classes or an object with a 'categories' list, got {_json_type(obj)}", source
            )
        classes = [_class_from_json(item, source, i + 1) for i, item in enumerate(items)]
        _validate_classes(classes, source, lambda i, c: (None, f"item {i + 1}"))
        return cls(classes, source)


def _json_type(value: Any) -> str:
    names = {dict: "an object", list: "a list", str: "a string", bool: "a boolean", int: "a number"}
    if value is None:
        return "null"
    return names.get(type(value), "a number" if isinstance(value, float) else type(value).__name__)


def _class_from_json(item: Any, source: str, number: int) -> VocabClass:
    def fail(problem: str) -> VocabularyError:
        return VocabularyError(f"item {number}: {problem}", source)

    if isinstance(item, str):
        item = {"name": item}
    if not isinstance(item, dict):
        raise fail(f"expected an object with a 'name', got {_json_type(item)}")
    if "name" not in item:
        raise fail("'name' missing")
    name = item["name"]
    if not isinstance(name, str):
        raise fail(f"'name' must be a string, got {_json_type(name)}")
    name = _collapse(name)
    if not name:
        raise fail("empty 'name'")

    synonyms_raw = item.get("synonyms", [])
    if synonyms_raw is None:
        synonyms_raw = []
    if not isinstance(synonyms_raw, list) or not all(isinstance(s, str) for s in synonyms_raw):
        raise fail("'synonyms' must be a list of strings")
    synonyms = tuple(_collapse(s) for s in synonyms_raw)
    if not all(synonyms):
        raise fail("empty name in 'synonyms'")

    isthing_raw = item.get("isthing", True)
    if isinstance(isthing_raw, bool):
        isthing = isthing_raw
    elif isinstance(isthing_raw, int) and isthing_raw in (0, 1):
        isthing = bool(isthing_raw)
    else:
        raise fail(f"'isthing' must be true/false or 0/1, got {_quoted(isthing_raw)}")

    class_id = item.get("id")
    if class_id is not None and (not isinstance(class_id, int) or isinstance(class_id, bool)):
        raise fail(f"'id' must be an integer, got {_json_type(class_id)} {_quoted(class_id)}")
    if class_id is not None and class_id < 0:
        raise fail(f"'id' must be non-negative, got {class_id}")

    color = item.get("color")
    if color is not None:
        if problem := _check_color(color):
            raise fail(f"'color': {problem}")
        color = tuple(color)

    encode_name = item.get("encode_name", True)
    if not isinstance(encode_name, bool):
        raise fail(f"'encode_name' must be true or false, got {_quoted(encode_name)}")
    if not encode_name and not synonyms:
        raise fail("'encode_name' is false but there are no 'synonyms' to encode")

    min_score = item.get("min_score")
    if min_score is not None:
        if isinstance(min_score, bool) or not isinstance(min_score, (int, float)) or not 0 <= min_score <= 1:
            raise fail(f"'min_score' must be a number in [0, 1], got {_quoted(min_score)}")
        min_score = float(min_score)
    supercategory = item.get("supercategory")
    if supercategory is not None and not isinstance(supercategory, str):
        raise fail(f"'supercategory' must be a string, got {_json_type(supercategory)}")

    return VocabClass(name, synonyms, isthing, class_id, color, encode_name, min_score=min_score,
                      supercategory=supercategory)


# --- text format ---------------------------------------------------------------------------------


def _collapse(name: str) -> str:
    """Trim and collapse inner whitespace to single spaces."""
    return " ".join(name.split())


def _parse_class(spec: str) -> VocabClass | None:
    """Parse one class spec (comment already removed). None for a blank spec.

    Raises :class:`_ClassSyntaxError` with the problem (without location).
    """
    text = spec.strip()
    if not text:
        return None
    isthing = True
    match = _MARKER_RE.search(text)
    if match:
        marker = match.group(1).strip().lower()
        if marker not in ("thing", "stuff"):
            raise _ClassSyntaxError(f"unknown marker '[{short_name(match.group(1))}]' (use [thing] or [stuff])")
        isthing = marker == "thing"
        text = text[: match.start()].strip()
        if _MARKER_RE.search(text):
            raise _ClassSyntaxError("more than one [thing]/[stuff] marker")
    if "[" in text or "]" in text:
        raise _ClassSyntaxError(
            f"unexpected '[' or ']' in {_quoted(text)} (a [thing] or [stuff] marker goes at the end)"
        )
    if not text:
        raise _ClassSyntaxError("empty class name (only a marker)")

    colon, comma = text.find(":"), text.find(",")
    if colon >= 0 and (comma < 0 or colon < comma):
        label = _collapse(text[:colon])
        rest = text[colon + 1 :]
        if not label:
            raise _ClassSyntaxError("empty display label before ':'")
        if not rest.strip():
            raise _ClassSyntaxError(f"label '{short_name(label)}:' has no names after the ':'")
        names = [_collapse(n) for n in rest.split(",")]
        if not all(names):
            raise _ClassSyntaxError(f"empty name in {_quoted(text)} (doubled or trailing comma?)")
        return VocabClass(label, tuple(names), isthing, encode_name=False)

    names = [_collapse(n) for n in text.split(",")]
    if not all(names):
        raise _ClassSyntaxError(f"empty name in {_quoted(text)} (doubled or trailing comma?)")
    return VocabClass(names[0], tuple(names[1:]), isthing)


def parse_text(text: str, source: str = "<text>") -> Vocabulary:
    """Parse the text format: one class per line.

    ``name, synonym, ... [thing|stuff]`` (every name encoded, the first shown), or
    ``label: name, name ... [thing|stuff]`` (the label is shown only). ``#`` starts a comment;
    blank lines are ignored; the marker defaults to ``[thing]``. Errors name ``source`` and line.
    """
    classes: list[VocabClass] = []
    for number, raw in enumerate(text.splitlines(), start=1):
        content = raw.split("#", 1)[0]
        try:
            cls = _parse_class(content)
        except _ClassSyntaxError as e:
            raise VocabularyError(str(e), source, number) from None
        if cls is not None:
            classes.append(_with_line(cls, number))
    return Vocabulary(classes, source)


def _with_line(cls: VocabClass, line: int) -> VocabClass:
    return dataclasses.replace(cls, line=line)


def parse_inline(spec: str) -> Vocabulary:
    """Parse an inline list: classes separated by ``;`` with the per-class text syntax.

    ``"person; car, automobile; road [stuff]"``. Empty segments are ignored; ``#`` is not a comment
    here. Errors read ``<inline>: class N: ...`` with N counting the non-empty segments from 1.
    """
    source = "<inline>"
    classes: list[VocabClass] = []
    for segment in spec.split(";"):
        if not segment.strip():
            continue
        try:
            cls = _parse_class(segment)
        except _ClassSyntaxError as e:
            raise VocabularyError(f"class {len(classes) + 1}: {e}", source) from None
        assert cls is not None
        classes.append(cls)
    return Vocabulary(classes, source)


# --- files and presets ---------------------------------------------------------------------------


def _read_text_file(path: Path, what: str = "vocabulary file") -> str:
    """Read a UTF-8 text file (a BOM is allowed); any failure is a VocabularyError naming it."""
    source = str(path)
    if path.is_dir():
        raise VocabularyError(f"is a directory, not a {what}", source)
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise VocabularyError(f"no such {what}", source) from None
    except OSError as e:
        raise VocabularyError(f"cannot read {what}: {e.strerror or e}", source) from None
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = data[: e.start].count(b"\n") + 1
        bad = data[e.start : e.start + 1].hex()
        raise VocabularyError(f"not UTF-8 text (byte 0x{bad} at offset {e.start})", source, line) from None


def load_file(path: str | Path) -> Vocabulary:
    """Load a vocabulary file: ``.json`` (any case) as JSON, anything else as the text format."""
    path = Path(path)
    text = _read_text_file(path)
    source = str(path)
    if path.suffix.lower() == ".json":
        try:
            obj = json.loads(text)
        except json.JSONDecodeError as e:
            raise VocabularyError(f"invalid JSON: {e.msg} (column {e.colno})", source, e.lineno) from None
        except RecursionError:
            raise VocabularyError("invalid JSON: nested too deeply", source) from None
        except ValueError as e:  # e.g. an integer of more than sys.get_int_max_str_digits() digits
            raise VocabularyError(f"invalid JSON: {short_name(str(e), 120)}", source) from None
        return Vocabulary.from_json(obj, source)
    return parse_text(text, source)


def _read_preset_column(path: Path, count: int, parse: Callable[[str], Any], what: str) -> list[Any]:
    """Read a preset's per-class side file (``.ids``/``.colors``): one value per non-blank line."""
    text = _read_text_file(path, f"preset {what} file")
    values: list[Any] = []
    for number, raw in enumerate(text.splitlines(), start=1):
        if not raw.strip():
            continue
        try:
            values.append(parse(raw))
        except ValueError as e:
            problem = f"bad {what} {_quoted(raw.strip())}: {short_name(str(e))}"
            raise VocabularyError(problem, str(path), number) from None
    if len(values) != count:
        raise VocabularyError(f"{len(values)} {what}s for {count} classes", str(path))
    return values


def _parse_id(raw: str) -> int:
    value = int(raw.strip())
    if value < 0:
        raise ValueError("ids must be non-negative")
    return value


def _parse_color(raw: str) -> tuple[int, int, int]:
    parts = raw.split()
    if len(parts) != 3:
        raise ValueError("need 'R G B'")
    color = tuple(int(p) for p in parts)
    if not all(0 <= c <= 255 for c in color):
        raise ValueError("components must be 0-255")
    return color  # type: ignore[return-value]


def _unknown_preset(name: str) -> VocabularyError:
    return VocabularyError(f"unknown preset '{short_name(name)}'; known presets: {', '.join(PRESET_NAMES)}")


def load_preset(name: str) -> Vocabulary:
    """Load a shipped preset (``name`` from :data:`PRESET_NAMES`; a ``preset:`` prefix is accepted).

    Reads ``<name>.txt`` from :data:`PRESETS_DIR`, plus ``<name>.ids`` (class ids) and
    ``<name>.colors`` (``R G B`` per line) when present. The source is ``preset:<name>``.
    """
    name = name.strip()
    if name.startswith("preset:"):
        name = name[len("preset:") :].strip()
    if name not in PRESET_NAMES:
        lowered = name.lower()
        if lowered not in PRESET_NAMES:
            raise _unknown_preset(name)
        name = lowered
    directory = Path(PRESETS_DIR)
    txt = directory / f"{name}.txt"
    source = f"preset:{name}"
    if not txt.is_file():
        raise VocabularyError(f"the preset's data file is missing: {txt} (reinstall masqclip)", source)
    vocab = parse_text(_read_text_file(txt, "preset data file"), source)
    ids_path, colors_path = directory / f"{name}.ids", directory / f"{name}.colors"
    ids = _read_preset_column(ids_path, len(vocab), _parse_id, "id") if ids_path.exists() else None
    colors = _read_preset_column(colors_path, len(vocab), _parse_color, "color") if colors_path.exists() else None
    if ids is None and colors is None:
        return vocab
    classes = [
        VocabClass(
            c.name,
            c.synonyms,
            c.isthing,
            ids[i] if ids is not None else c.id,
            colors[i] if colors is not None else c.color,
            c.encode_name,
            c.line,
        )
        for i, c in enumerate(vocab)
    ]
    return Vocabulary(classes, source)


@dataclass(frozen=True)
class PresetInfo:
    """Summary of one preset, for ``masqclip vocab list``-style listings."""

    name: str
    num_classes: int
    num_things: int
    num_stuff: int
    has_ids: bool


def list_presets() -> list[PresetInfo]:
    """Summaries of every preset in :data:`PRESET_NAMES`, in that order (loads each one)."""
    infos = []
    for name in PRESET_NAMES:
        vocab = load_preset(name)
        infos.append(
            PresetInfo(
                name=name,
                num_classes=len(vocab),
                num_things=len(vocab.thing_indices),
                num_stuff=len(vocab.stuff_indices),
                has_ids=any(c.id is not None for c in vocab),
            )
        )
    return infos


# --- the --vocab option --------------------------------------------------------------------------


def _exists(path: Path) -> bool:
    """``path.exists()`` that treats unusable names (too long, NUL byte) as not existing."""
    try:
        return path.exists()
    except (OSError, ValueError):
        return False


def _looks_like_path(spec: str) -> bool:
    return "/" in spec or "\\" in spec or spec.lower().endswith(_PATH_SUFFIXES)


def load_vocabulary(spec: str | Path) -> Vocabulary:
    """Resolve the ``--vocab`` option: an existing file, then a preset, then an inline list.

    1. ``spec`` names an existing path: :func:`load_file` (a directory is an error). A
       :class:`~pathlib.Path` is always a file.
    2. ``preset:NAME`` is always a preset; a bare preset name (any case) is that preset.
    3. Without a ``;``, a spec that looks like a path (has ``/`` or ``\\``, or ends with ``.txt``,
       ``.json``, ``.csv``, ``.vocab``) is a missing file, and a spec close to a preset name is an
       unknown preset: both are errors (add a trailing ``;`` to force a one-class inline list).
    4. Otherwise: :func:`parse_inline`.
    """
    if isinstance(spec, Path):
        if not _exists(spec):
            raise VocabularyError("no such vocabulary file", short_name(str(spec), _PATH_LIMIT))
        return load_file(spec)
    if not isinstance(spec, str):
        raise TypeError(f"vocabulary spec must be str or Path, got {type(spec).__name__}")
    if not spec.strip():
        raise VocabularyError("empty vocabulary spec (give a file, a preset name or 'class; class; ...')")
    if _exists(Path(spec)):
        return load_file(spec)
    stripped = spec.strip()
    if stripped != spec and _exists(Path(stripped)):
        return load_file(stripped)
    if stripped.startswith("preset:"):
        return load_preset(stripped[len("preset:") :])
    if stripped.lower() in PRESET_NAMES:
        return load_preset(stripped.lower())
    if ";" not in stripped:
        if _looks_like_path(stripped):
            raise VocabularyError("no such vocabulary file", short_name(stripped, _PATH_LIMIT))
        if difflib.get_close_matches(stripped.lower(), PRESET_NAMES, n=1, cutoff=0.75):
            raise VocabularyError(
                f"unknown preset '{stripped}'; known presets: {', '.join(PRESET_NAMES)} "
                f"(for a one-class inline vocabulary add a trailing ';': '{stripped};')"
            )
    return parse_inline(stripped)


# --- prompt templates ----------------------------------------------------------------------------


def _parse_templates(text: str, source: str) -> list[str]:
    templates: list[str] = []
    for number, raw in enumerate(text.splitlines(), start=1):
        template = raw.strip()
        if not template or template.startswith("#"):
            continue
        placeholders = template.count("{}")
        if placeholders != 1:
            raise VocabularyError(
                f"template {_quoted(template)} has {placeholders} '{{}}' placeholders (need exactly one)",
                source,
                number,
            )
        if "{" in template.replace("{}", "") or "}" in template.replace("{}", ""):
            raise VocabularyError(
                f"template {_quoted(template)} has a stray '{{' or '}}' (only one '{{}}' placeholder is allowed)",
                source,
                number,
            )
        templates.append(template)
    if not templates:
        raise VocabularyError("no templates in file (empty)", source)
    return templates


def read_templates(spec: str | Path | None) -> list[str] | None:
    """Resolve the prompt-template option.

    ``None`` or ``"none"`` -> None (bare class names, as the official MasQCLIP does). ``"vild"`` ->
    the 14 ViLD templates shipped with the presets. Anything else is a file with one template per
    line (blank lines and ``#`` comment lines skipped), each with exactly one ``{}`` placeholder.
    """
    if spec is None:
        return None
    if isinstance(spec, str):
        keyword = spec.strip().lower()
        if keyword == "none":
            return None
        if keyword == "vild":
            path = Path(PRESETS_DIR) / _VILD_TEMPLATES_FILE
            return _parse_templates(_read_text_file(path, "templates file"), str(path))
        if not keyword:
            raise VocabularyError("empty templates spec (use 'none', 'vild' or a templates file)")
    path = Path(spec)
    if not _exists(path):
        raise VocabularyError(
            "no such templates file (use 'none', 'vild' or a file with one template per line)", str(path)
        )
    return _parse_templates(_read_text_file(path, "templates file"), str(path))


def category_ids(vocab: Vocabulary) -> list[int]:
    """:meth:`Vocabulary.category_ids` of ``vocab`` (the ids every output writes)."""
    return vocab.category_ids()

