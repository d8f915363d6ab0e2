"""The synthetic "shapes world": a seeded generator of segmentation datasets with ground truth in every format.

No real dataset can be downloaded on the project's machines, so its small models are trained and evaluated on scenes
drawn here. A scene is a background of 1-3 textured *stuff* regions (sky, grass, water, ...) split by straight or
smooth boundaries, with 2-6 *things* (coloured shapes: circle, square, star, ...) painted over it in order, later
ones occluding earlier ones. Everything is a pure function of ``(seed, split, index)``: each scene draws from its
own random generator, so any image can be rebuilt alone (:func:`make_scene`) and two runs write byte-identical files.

:func:`generate` writes, under ``out``::

    images/<split>/000000.png              the RGB image (lossless PNG)
    panoptic_<split>/000000.png            COCO panoptic id map (id = R + 256 G + 256^2 B, 0 = void)
    annotations/panoptic_<split>.json      COCO panoptic JSON (images, annotations/segments_info, categories)
    annotations/instances_<split>.json     COCO instance JSON (things only, RLE masks)
    semantic_<split>/000000.png            uint8 contiguous class index (category id - 1), 255 = ignore
    captions_<split>.jsonl                 {"image", "caption"}: every category present is named
    crops_<split>/000000_<k>.png           64x64 crops of the objects (at least half visible) and of stuff patches
    crops_<split>.jsonl                    {"crop", "image", "caption", "category"}
    vocab.txt                              the categories in the vocabulary text format (things, then stuff)
    meta.json                              categories, base/novel names, generator version, each split's config

Category ids are 1..N, things first then stuff (:data:`SYNTH_CATEGORIES`), so ``vocab.txt`` read by
:func:`masqclip_cli.vocab.load_vocabulary` maps contiguous index i to category id i + 1, as the writers do.

Base/novel split: the categories named in ``SynthConfig.novel`` are *novel*, the others *base*. With
``base_only=True`` (a training split as COCO 48/17) novel categories are still drawn but left unannotated: their
pixels are void in the panoptic PNG (0) and ignore in the semantic PNG (255), and they are absent from
``segments_info`` and from the instance JSON. Captions and crops always name every category, annotated or not
(they stand for the web image-text data a CLIP is pretrained on).

Panoptic segment ids are ``category_id * 1000`` for a stuff region and ``category_id * 1000 + k`` for the k-th
(1-based) instance of a thing category in the image. Image ids are ``index + 1``; instance annotation ids count
from 1 over the split.
"""

from __future__ import annotations

import colorsys
import dataclasses
import hashlib
import json
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from masqclip_cli.io.files import atomic_save_png, atomic_write_json, atomic_write_text, dumps_json
from masqclip_cli.structures.masks import encode_rle, segment_stats

__all__ = [
    "CROP_SIZE",
    "DEFAULT_NOVEL",
    "GENERATOR_VERSION",
    "IGNORE_LABEL",
    "STUFF_NAMES",
    "SYNTH_CATEGORIES",
    "THING_NAMES",
    "Scene",
    "SceneObject",
    "SceneStuff",
    "SynthConfig",
    "category_by_name",
    "generate",
    "make_scene",
    "vocab_text",
]

#: Bumped whenever the same config would draw different scenes.
GENERATOR_VERSION = "1"
#: Side of the square object/stuff crops, in pixels.
CROP_SIZE = 64
#: Semantic label of void/unannotated pixels.
IGNORE_LABEL = 255

THING_NAMES: tuple[str, ...] = (
    "circle",
    "square",
    "triangle",
    "star",
    "hexagon",
    "heart",
    "cross",
    "ring",
    "diamond",
    "crescent",
    "arrow",
    "pentagon",
)
STUFF_NAMES: tuple[str, ...] = ("sky", "grass", "water", "sand", "brick wall", "road", "snow", "wood floor")
#: The default novel categories (three things and one stuff); every other category is base.
DEFAULT_NOVEL: tuple[str, ...] = ("star", "heart", "ring", "water")

# Display colours of the categories (panoptic JSON "color"): distinct, fixed.
_CATEGORY_COLORS: dict[str, tuple[int, int, int]] = {
    "circle": (220, 20, 60),
    "square": (0, 82, 255),
    "triangle": (0, 160, 60),
    "star": (255, 200, 0),
    "hexagon": (140, 60, 200),
    "heart": (255, 105, 180),
    "cross": (255, 255, 255),
    "ring": (0, 200, 200),
    "diamond": (100, 170, 255),
    "crescent": (255, 240, 140),
    "arrow": (60, 60, 60),
    "pentagon": (160, 90, 40),
    "sky": (135, 190, 235),
    "grass": (90, 160, 50),
    "water": (20, 90, 160),
    "sand": (220, 195, 130),
    "brick wall": (160, 60, 45),
    "road": (110, 110, 115),
    "snow": (240, 245, 250),
    "wood floor": (150, 100, 55),
}

#: Every category: ``{"id", "name", "isthing" (1/0), "color" [r, g, b]}``; ids 1..N, things first then stuff.
SYNTH_CATEGORIES: list[dict[str, Any]] = [
    {"id": i, "name": name, "isthing": int(name in THING_NAMES), "color": list(_CATEGORY_COLORS[name])}
    for i, name in enumerate(THING_NAMES + STUFF_NAMES, start=1)
]
_BY_NAME: dict[str, dict[str, Any]] = {c["name"]: c for c in SYNTH_CATEGORIES}
_BY_NAME_ID: dict[int, dict[str, Any]] = {c["id"]: c for c in SYNTH_CATEGORIES}
_SEGMENT_STRIDE = 1000  # segment id = category id * 1000 (+ instance number for things)

# --- colours of things --------------------------------------------------------------------------------------------

# Named colours as (hue degrees, saturation, value); captions use these names.
_COLOR_HSV: dict[str, tuple[float, float, float]] = {
    "red": (0.0, 0.85, 0.85),
    "orange": (28.0, 0.9, 0.95),
    "yellow": (54.0, 0.85, 0.95),
    "green": (125.0, 0.7, 0.7),
    "cyan": (185.0, 0.75, 0.85),
    "blue": (222.0, 0.8, 0.85),
    "purple": (278.0, 0.6, 0.7),
    "pink": (330.0, 0.45, 0.97),
    "brown": (24.0, 0.7, 0.45),
    "white": (0.0, 0.03, 0.97),
    "gray": (0.0, 0.04, 0.55),
    "black": (0.0, 0.1, 0.13),
}
_COLOR_NAMES: tuple[str, ...] = tuple(_COLOR_HSV)
# Per thing category: its typical colours and their weights. Hue ranges overlap between categories, and any colour
# can occur (_ANY_COLOR_P), so colour is informative but never decides the category.
_THING_PALETTES: dict[str, tuple[tuple[str, float], ...]] = {
    "circle": (("red", 0.5), ("orange", 0.3), ("yellow", 0.2)),
    "square": (("blue", 0.5), ("green", 0.3), ("red", 0.2)),
    "triangle": (("green", 0.5), ("yellow", 0.3), ("orange", 0.2)),
    "star": (("yellow", 0.5), ("orange", 0.3), ("white", 0.2)),
    "hexagon": (("purple", 0.5), ("blue", 0.3), ("cyan", 0.2)),
    "heart": (("red", 0.5), ("pink", 0.3), ("purple", 0.2)),
    "cross": (("red", 0.4), ("white", 0.4), ("blue", 0.2)),
    "ring": (("yellow", 0.4), ("gray", 0.3), ("cyan", 0.3)),
    "diamond": (("cyan", 0.5), ("blue", 0.3), ("white", 0.2)),
    "crescent": (("yellow", 0.5), ("white", 0.3), ("orange", 0.2)),
    "arrow": (("black", 0.4), ("gray", 0.3), ("green", 0.3)),
    "pentagon": (("brown", 0.5), ("orange", 0.3), ("purple", 0.2)),
}
_ANY_COLOR_P = 0.12

# --- shapes -------------------------------------------------------------------------------------------------------


def _regular(n: int, radius: float = 1.0, start: float = -90.0) -> np.ndarray:
    angles = np.deg2rad(start + np.arange(n) * 360.0 / n)
    return np.stack([radius * np.cos(angles), radius * np.sin(angles)], axis=1)


def _star(points: int = 5, inner: float = 0.42) -> np.ndarray:
    outer = _regular(points)
    inner_pts = _regular(points, inner, -90.0 + 180.0 / points)
    return np.stack([outer, inner_pts], axis=1).reshape(-1, 2)


def _heart() -> np.ndarray:
    t = np.linspace(0.0, 2 * np.pi, 72, endpoint=False)
    x = 16 * np.sin(t) ** 3
    y = -(13 * np.cos(t) - 5 * np.cos(2 * t) - 2 * np.cos(3 * t) - np.cos(4 * t))
    pts = np.stack([x, y], axis=1) / 16.5
    return pts - (pts.max(axis=0) + pts.min(axis=0)) / 2


def _cross(half: float = 0.3) -> np.ndarray:
    a = half
    return np.array(
        [(-a, -1), (a, -1), (a, -a), (1, -a), (1, a), (a, a), (a, 1), (-a, 1), (-a, a), (-1, a), (-1, -a), (-a, -a)],
        dtype=np.float64,
    )


# Per category: (filled polygons, cut-out polygons) in unit coordinates (about radius 1), and the rotation range in
# degrees (+-). A square stays within 30 degrees of upright so that it never looks like a diamond (a tall rhombus).
_CIRCLE = _regular(64)
_SHAPES: dict[str, tuple[tuple[np.ndarray, ...], tuple[np.ndarray, ...], float]] = {
    "circle": ((_CIRCLE,), (), 0.0),
    "square": ((np.array([(-0.8, -0.8), (0.8, -0.8), (0.8, 0.8), (-0.8, 0.8)]),), (), 30.0),
    "triangle": ((_regular(3),), (), 180.0),
    "star": ((_star(),), (), 180.0),
    "hexagon": ((_regular(6),), (), 180.0),
    "heart": ((_heart(),), (), 30.0),
    "cross": ((_cross(),), (), 45.0),
    "ring": ((_CIRCLE,), (_CIRCLE * 0.55,), 0.0),
    "diamond": ((np.array([(0.0, -1.0), (0.6, 0.0), (0.0, 1.0), (-0.6, 0.0)]),), (), 25.0),
    "crescent": ((_CIRCLE,), (_CIRCLE * 0.85 + np.array([0.42, -0.18]),), 180.0),
    "arrow": (
        (np.array([(-1, -0.22), (0.2, -0.22), (0.2, -0.6), (1, 0), (0.2, 0.6), (0.2, 0.22), (-1, 0.22)]),),
        (),
        180.0,
    ),
    "pentagon": ((_regular(5),), (), 180.0),
}
assert set(_SHAPES) == set(THING_NAMES) == set(_THING_PALETTES)

# --- stuff: how captions name it ----------------------------------------------------------------------------------

# (noun phrase, prepositional phrase) per stuff category.
_STUFF_PHRASES: dict[str, tuple[str, str]] = {
    "sky": ("the sky", "under the sky"),
    "grass": ("grass", "on grass"),
    "water": ("water", "on water"),
    "sand": ("sand", "on sand"),
    "brick wall": ("a brick wall", "in front of a brick wall"),
    "road": ("a road", "on a road"),
    "snow": ("snow", "on snow"),
    "wood floor": ("a wood floor", "on a wood floor"),
}
assert set(_STUFF_PHRASES) == set(STUFF_NAMES)

_NUMBER_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten")
_SPLIT_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")

# --- config -------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class SynthConfig:
    """What :func:`generate` draws.

    Attributes:
        images: number of images of the split.
        seed: base seed (a non-negative integer); with ``split`` and the image index it seeds every scene.
        split: the split name, used in file names (``images/<split>/``, ``panoptic_<split>.json``, ...).
        size: image size ``(height, width)`` in pixels.
        min_objects, max_objects: the number of things drawn per image is uniform in this range (an object that
            cannot be placed visibly enough in a few tries is left out, so rarely fewer).
        novel: the novel category names (things and/or stuff); every other category is base.
        base_only: leave the novel categories unannotated (void / ignore, absent from the JSON files) while still
            drawing them, as a base-only training split.
        crops: also write the 64x64 object and stuff crops and ``crops_<split>.jsonl`` (objects less than half
            visible get no crop).
    """

    images: int = 200
    seed: int = 0
    split: str = "val"
    size: tuple[int, int] = (256, 256)
    min_objects: int = 2
    max_objects: int = 6
    novel: tuple[str, ...] = DEFAULT_NOVEL
    base_only: bool = False
    crops: bool = True

    def __post_init__(self) -> None:
        if isinstance(self.size, list):
            object.__setattr__(self, "size", tuple(self.size))
        if isinstance(self.novel, (list, str)):
            object.__setattr__(self, "novel", (self.novel,) if isinstance(self.novel, str) else tuple(self.novel))
        if not _is_int(self.images) or self.images < 0:
            raise ValueError(f"images must be a non-negative integer, got {self.images!r}")
        if not _is_int(self.seed) or self.seed < 0:
            raise ValueError(f"seed must be a non-negative integer, got {self.seed!r}")
        if not isinstance(self.split, str) or not _SPLIT_RE.match(self.split):
            raise ValueError(f"split must be a simple name (letters, digits, '_', '-', '.'), got {self.split!r}")
        if (
            not isinstance(self.size, tuple)
            or len(self.size) != 2
            or not all(_is_int(v) and 32 <= v <= 4096 for v in self.size)
        ):
            raise ValueError(f"size must be (height, width), each 32..4096, got {self.size!r}")
        if not (_is_int(self.min_objects) and _is_int(self.max_objects) and 0 <= self.min_objects <= self.max_objects):
            raise ValueError(f"need 0 <= min_objects <= max_objects, got {self.min_objects!r}, {self.max_objects!r}")
        if self.max_objects > 99:
            raise ValueError(f"max_objects must be at most 99, got {self.max_objects}")
        unknown = [n for n in self.novel if n not in _BY_NAME]
        if unknown:
            raise ValueError(
                f"unknown novel categor{'y' if len(unknown) == 1 else 'ies'} {', '.join(map(repr, unknown))}"
            )
        if len(set(self.novel)) != len(self.novel):
            raise ValueError(f"duplicate novel categories in {self.novel!r}")

    def to_json(self) -> dict[str, Any]:
        """The config as a JSON object (tuples as lists), in field order."""
        out = dataclasses.asdict(self)
        out["size"] = list(self.size)
        out["novel"] = list(self.novel)
        return out


def _is_int(value: Any) -> bool:
    return isinstance(value, (int, np.integer)) and not isinstance(value, bool)


def category_by_name(name: str) -> dict[str, Any]:
    """The :data:`SYNTH_CATEGORIES` entry of a category name (KeyError when unknown)."""
    return _BY_NAME[name]


def vocab_text() -> str:
    """The categories in the vocabulary text format (one a line, ``[thing]``/``[stuff]``), in id order."""
    lines = ["# masqclip synthetic shapes world: category id = line number among the classes (1-based)"]
    for c in SYNTH_CATEGORIES:
        lines.append(f"{c['name']} [{'thing' if c['isthing'] else 'stuff'}]")
    return "\n".join(lines) + "\n"


# --- scenes -------------------------------------------------------------------------------------------------------


@dataclass(eq=False)
class SceneObject:
    """One thing of a scene, in drawing order."""

    category: str
    category_id: int
    segment_id: int
    color_name: str
    rgb: tuple[int, int, int]
    shape_mask: np.ndarray  # (H, W) bool: the whole shape inside the frame, before occlusion
    mask: np.ndarray  # (H, W) bool: its visible pixels


@dataclass(eq=False)
class SceneStuff:
    """One stuff region of a scene (one per category; visible = not covered by things)."""

    category: str
    category_id: int
    segment_id: int
    region_mask: np.ndarray  # (H, W) bool: the region before things are drawn
    mask: np.ndarray  # (H, W) bool: its visible pixels


@dataclass(eq=False)
class Scene:
    """A drawn scene: the image and its full ground truth (every category, annotated or not)."""

    index: int
    image: np.ndarray  # (H, W, 3) uint8
    segment_map: np.ndarray  # (H, W) int32 panoptic segment ids of every pixel (never 0)
    objects: list[SceneObject]
    stuff: list[SceneStuff]
    caption: str

    @property
    def categories(self) -> list[str]:
        """The names of the categories present (visible), in id order."""
        present = {o.category for o in self.objects} | {s.category for s in self.stuff}
        return [c["name"] for c in SYNTH_CATEGORIES if c["name"] in present]


def _seed_sequence(config: SynthConfig, index: int) -> np.random.SeedSequence:
    split_key = int.from_bytes(hashlib.sha256(config.split.encode("utf-8")).digest()[:8], "little")
    version_key = int(GENERATOR_VERSION)
    return np.random.SeedSequence([version_key, int(config.seed), split_key, int(index)])


def make_scene(config: SynthConfig, index: int) -> Scene:
    """Draw scene ``index`` of the split described by ``config`` (independent of every other scene and of
    ``config.images``, ``base_only`` and ``crops``)."""
    scene_seq, _ = _seed_sequence(config, index).spawn(2)
    rng = np.random.default_rng(scene_seq)
    h, w = config.size
    scale = min(h, w) / 256.0

    # Background: 1-3 stuff regions.
    region_ids, stuff_names = _layout(rng, h, w)
    image = np.zeros((h, w, 3), dtype=np.float64)
    segment_map = np.zeros((h, w), dtype=np.int32)
    regions: list[tuple[str, np.ndarray]] = []
    for r, name in enumerate(stuff_names):
        region = region_ids == r
        texture = _TEXTURES[name](rng, h, w, scale)
        image[region] = texture[region]
        segment_map[region] = _BY_NAME[name]["id"] * _SEGMENT_STRIDE
        regions.append((name, region))

    # Things, painted in order; an object is placed only where every object keeps enough visible pixels.
    min_area = max(16, round(0.002 * h * w))
    count = int(rng.integers(config.min_objects, config.max_objects + 1))
    drawn: list[dict[str, Any]] = []
    owner = np.full((h, w), -1, dtype=np.int32)  # index into ``drawn`` of the top object, -1 = stuff
    for _ in range(count):
        name = THING_NAMES[int(rng.integers(len(THING_NAMES)))]
        color_name = _pick_color(rng, name)
        rgb = _jitter_color(rng, color_name)
        for _attempt in range(12):
            shape = _place_shape(rng, name, h, w, scale)
            if shape is None:
                continue
            candidate = owner.copy()
            candidate[shape] = len(drawn)
            areas = np.bincount((candidate + 1).ravel(), minlength=len(drawn) + 2)[1:]
            full = [d["area"] for d in drawn] + [int(np.count_nonzero(shape))]
            if all(a >= min_area and a >= 0.3 * f for a, f in zip(areas, full)):
                owner = candidate
                drawn.append({"name": name, "color": color_name, "rgb": rgb, "shape": shape, "area": full[-1]})
                _paint_object(rng, image, shape, rgb, scale)
                break

    # Per-category instance numbers and the final segment map.
    objects: list[SceneObject] = []
    numbers: dict[str, int] = {}
    for k, d in enumerate(drawn):
        numbers[d["name"]] = numbers.get(d["name"], 0) + 1
        cat_id = _BY_NAME[d["name"]]["id"]
        segment_id = cat_id * _SEGMENT_STRIDE + numbers[d["name"]]
        mask = owner == k
        segment_map[mask] = segment_id
        objects.append(SceneObject(d["name"], cat_id, segment_id, d["color"], d["rgb"], d["shape"], mask))
    covered = owner >= 0
    stuff = [
        SceneStuff(name, _BY_NAME[name]["id"], _BY_NAME[name]["id"] * _SEGMENT_STRIDE, region, region & ~covered)
        for name, region in regions
    ]
    stuff = [s for s in stuff if s.mask.any()]

    # A little sensor noise over everything, then quantise.
    image += rng.normal(0.0, 0.012, size=image.shape)
    image_u8 = np.clip(np.rint(image * 255.0), 0, 255).astype(np.uint8)
    return Scene(index, image_u8, segment_map, objects, stuff, _caption(objects, stuff))


def _layout(rng: np.random.Generator, h: int, w: int) -> tuple[np.ndarray, list[str]]:
    """(region index map, stuff name per region): 1-3 regions split by straight or smooth boundaries; the sky, when
    drawn, is the top region."""
    k = int(rng.choice(3, p=[0.2, 0.5, 0.3])) + 1
    names = [STUFF_NAMES[i] for i in rng.permutation(len(STUFF_NAMES))[:k]]
    if "sky" in names:  # the sky goes on top (region 0 is the top region in every top-first layout below)
        names.remove("sky")
        names.insert(0, "sky")
    yy = np.arange(h, dtype=np.float64)[:, None]
    xx = np.arange(w, dtype=np.float64)[None, :]
    regions = np.zeros((h, w), dtype=np.int32)
    if k == 1:
        return regions, names
    vertical = "sky" not in names and rng.random() < 0.35
    if k == 2:
        if vertical:
            regions[xx >= _boundary(rng, h, w, 0.3, 0.7)[:, None]] = 1
        else:
            regions[yy >= _boundary(rng, w, h, 0.3, 0.7)[None, :]] = 1
        return regions, names
    # k == 3: two horizontal bands, or a top band and a bottom split left/right.
    first = _boundary(rng, w, h, 0.22, 0.45)[None, :]
    regions[yy >= first] = 1
    if rng.random() < 0.5:
        second = np.maximum(_boundary(rng, w, h, 0.6, 0.8), first[0] + 0.12 * h)[None, :]
        regions[yy >= second] = 2
    else:
        split = _boundary(rng, h, w, 0.3, 0.7)[:, None]
        regions[(yy >= first) & (xx >= split)] = 2
    return regions, names


def _boundary(rng: np.random.Generator, length: int, extent: int, lo: float, hi: float) -> np.ndarray:
    """Positions (in ``extent``) of a boundary along ``length`` samples: a line with a random tilt, sometimes with a
    smooth wave on it."""
    t = np.arange(length, dtype=np.float64) / max(length - 1, 1) - 0.5
    base = rng.uniform(lo, hi)
    slope = rng.uniform(-0.25, 0.25)
    if rng.random() < 0.6:
        amplitude = rng.uniform(0.02, 0.07)
        freq = rng.uniform(0.6, 2.5)
        phase = rng.uniform(0, 2 * np.pi)
        wave = amplitude * np.sin(2 * np.pi * freq * t + phase)
    else:
        wave = 0.0
    return (base + slope * t + wave) * extent


def _pick_color(rng: np.random.Generator, name: str) -> str:
    if rng.random() < _ANY_COLOR_P:
        return _COLOR_NAMES[int(rng.integers(len(_COLOR_NAMES)))]
    options = _THING_PALETTES[name]
    weights = np.array([p for _, p in options])
    return options[int(rng.choice(len(options), p=weights / weights.sum()))][0]


def _jitter_color(rng: np.random.Generator, color_name: str) -> tuple[int, int, int]:
    hue, sat, val = _COLOR_HSV[color_name]
    hue = (hue + rng.uniform(-10.0, 10.0)) % 360.0
    sat = float(np.clip(sat + rng.uniform(-0.1, 0.1), 0.0, 1.0))
    val = float(np.clip(val + rng.uniform(-0.08, 0.08), 0.0, 1.0))
    r, g, b = colorsys.hsv_to_rgb(hue / 360.0, sat, val)
    return round(r * 255), round(g * 255), round(b * 255)


def _place_shape(rng: np.random.Generator, name: str, h: int, w: int, scale: float) -> np.ndarray | None:
    """The in-frame mask of one randomly placed, sized and rotated shape (None when nothing lands in the frame)."""
    rotation = _SHAPES[name][2]
    radius = rng.uniform(0.07, 0.18) * min(h, w)
    cx = rng.uniform(0.08, 0.92) * w
    cy = rng.uniform(0.08, 0.92) * h
    angle = np.deg2rad(rng.uniform(-rotation, rotation)) if rotation else 0.0
    mask = draw_shape(name, cx, cy, radius, angle, h, w)
    return mask if mask.any() else None


def draw_shape(name: str, cx: float, cy: float, radius: float, angle: float, h: int, w: int) -> np.ndarray:
    """(h, w) bool: the in-frame pixels of shape ``name`` centred at (cx, cy) pixels, of ``radius`` pixels, rotated by
    ``angle`` radians: sub-pixel vertices (4 fractional bits), pixel centres at integer coordinates, holes cut."""
    filled, cut, _ = _SHAPES[name]
    rot = np.array([[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]])

    def polys(parts: Sequence[np.ndarray]) -> list[np.ndarray]:
        return [np.rint(((p @ rot.T) * radius + (cx - 0.5, cy - 0.5)) * 16).astype(np.int32) for p in parts]

    canvas = np.zeros((h, w), dtype=np.uint8)
    cv2.fillPoly(canvas, polys(filled), 1, lineType=cv2.LINE_8, shift=4)
    if cut:
        cv2.fillPoly(canvas, polys(cut), 0, lineType=cv2.LINE_8, shift=4)
    return canvas.astype(bool)


def _paint_object(rng: np.random.Generator, image: np.ndarray, shape: np.ndarray, rgb: Sequence[int], scale: float):
    """Paint a thing: its colour with a soft directional shading, fine noise and a darker rim."""
    ys, xs = np.nonzero(shape)
    cy, cx = ys.mean(), xs.mean()
    extent = max(ys.max() - ys.min(), xs.max() - xs.min(), 1) / 2.0
    light = rng.uniform(0, 2 * np.pi)
    shade = 1.0 + 0.16 * ((xs - cx) * np.cos(light) + (ys - cy) * np.sin(light)) / extent
    pixels = np.asarray(rgb, dtype=np.float64)[None, :] / 255.0 * shade[:, None]
    pixels *= 1.0 + rng.normal(0.0, 0.025, size=(len(ys), 1))
    rim_width = max(1, round(1.5 * scale))
    inner = cv2.erode(shape.astype(np.uint8), np.ones((3, 3), np.uint8), iterations=rim_width).astype(bool)
    pixels[~inner[ys, xs]] *= 0.55
    image[ys, xs] = np.clip(pixels, 0.0, 1.0)


# --- textures -----------------------------------------------------------------------------------------------------


def _noise(rng: np.random.Generator, h: int, w: int, cells_y: float, cells_x: float) -> np.ndarray:
    """Smooth value noise in [0, 1]: a random lattice of about ``cells_y`` x ``cells_x`` cells, smoothed."""
    gy, gx = max(1, int(round(cells_y))), max(1, int(round(cells_x)))
    grid = rng.random((gy + 2, gx + 2))
    y = (np.arange(h) + 0.5) * (gy / h) + rng.random()
    x = (np.arange(w) + 0.5) * (gx / w) + rng.random()
    y0, x0 = y.astype(np.intp), x.astype(np.intp)
    fy, fx = y - y0, x - x0
    fy, fx = (fy * fy * (3 - 2 * fy))[:, None], (fx * fx * (3 - 2 * fx))[None, :]
    top = grid[y0][:, x0] * (1 - fx) + grid[y0][:, x0 + 1] * fx
    bottom = grid[y0 + 1][:, x0] * (1 - fx) + grid[y0 + 1][:, x0 + 1] * fx
    return top * (1 - fy) + bottom * fy


def _fractal(rng: np.random.Generator, h: int, w: int, cells: float, octaves: int) -> np.ndarray:
    total = np.zeros((h, w))
    norm = 0.0
    for o in range(octaves):
        amp = 0.5**o
        total += amp * _noise(rng, h, w, cells * 2**o, cells * 2**o * w / h)
        norm += amp
    return total / norm


def _base(rng: np.random.Generator, rgb: Sequence[float], jitter: float = 0.05) -> np.ndarray:
    return np.clip(np.asarray(rgb, dtype=np.float64) + rng.uniform(-jitter, jitter, size=3), 0.0, 1.0)


def _grid(h: int, w: int) -> tuple[np.ndarray, np.ndarray]:
    return np.arange(h, dtype=np.float64)[:, None], np.arange(w, dtype=np.float64)[None, :]


def _tex_sky(rng, h, w, s):
    top = _base(rng, (0.34, 0.56, 0.9), 0.04)
    bottom = _base(rng, (0.72, 0.84, 0.97), 0.03)
    t = (np.arange(h, dtype=np.float64) / max(h - 1, 1))[:, None, None]
    img = top * (1 - t) + bottom * t + np.zeros((1, w, 1))
    clouds = _fractal(rng, h, w, 2.5, 3)
    amount = rng.uniform(0.0, 0.9)
    c = (np.clip((clouds - 0.52) / 0.18, 0, 1) * amount)[..., None]
    return img * (1 - c) + 0.97 * c


def _tex_grass(rng, h, w, s):
    base = _base(rng, (0.26, 0.52, 0.14))
    blades = _noise(rng, h, w, h / (7 * s), w / (1.3 * s))
    patches = _fractal(rng, h, w, 3, 2)
    img = base * (0.65 + 0.55 * blades[..., None]) * (0.85 + 0.3 * patches[..., None])
    img[..., 0] += 0.07 * (patches - 0.5)
    return img


def _tex_water(rng, h, w, s):
    base = _base(rng, (0.1, 0.36, 0.62))
    yy, xx = _grid(h, w)
    lam = rng.uniform(7, 14) * s
    warp = _fractal(rng, h, w, 3, 2)
    waves = np.sin(2 * np.pi * (yy / lam + xx / (lam * rng.uniform(5, 9)) + 1.4 * warp))
    img = base * (0.86 + 0.16 * waves[..., None])
    glint = (np.clip((waves - 0.8) / 0.2, 0, 1) * 0.45)[..., None]
    return img * (1 - glint) + np.array([0.85, 0.93, 1.0]) * glint


def _tex_sand(rng, h, w, s):
    base = _base(rng, (0.86, 0.76, 0.52), 0.04)
    yy, xx = _grid(h, w)
    angle = rng.uniform(0, np.pi)
    lam = rng.uniform(10, 18) * s
    warp = _fractal(rng, h, w, 2, 2)
    ripples = np.sin(2 * np.pi * ((xx * np.cos(angle) + yy * np.sin(angle)) / lam + 0.8 * warp))
    speckle = rng.random((h, w))
    return base * (0.9 + 0.06 * ripples + 0.14 * (speckle - 0.5))[..., None]


def _tex_brick(rng, h, w, s):
    brick = _base(rng, (0.6, 0.24, 0.17))
    mortar = _base(rng, (0.76, 0.73, 0.68), 0.03)
    yy, xx = _grid(h, w)
    bh = rng.uniform(9, 16) * s
    bw = bh * rng.uniform(2.0, 2.6)
    m = max(1.0, 1.6 * s)
    row = np.floor(yy / bh)
    xo = xx + (row % 2) * bw / 2
    col = np.floor(xo / bw)
    table = rng.uniform(0.8, 1.15, size=(int(h / bh) + 2, int((w + bw) / bw) + 2))
    shade = table[row.astype(np.intp), col.astype(np.intp)]
    fine = 0.92 + 0.16 * rng.random((h, w))
    is_mortar = ((yy - row * bh) < m) | ((xo - col * bw) < m)
    img = brick * (shade * fine)[..., None]
    return np.where(is_mortar[..., None], mortar * fine[..., None], img)


def _tex_road(rng, h, w, s):
    v = rng.uniform(0.26, 0.36)
    base = np.array([v, v, v * 1.06])
    fine = rng.random((h, w))
    coarse = _fractal(rng, h, w, 4, 2)
    img = base * (0.78 + 0.22 * fine + 0.25 * coarse)[..., None]
    pebbles = (fine > 0.985)[..., None]
    return np.where(pebbles, img * 1.6, img)


def _tex_snow(rng, h, w, s):
    base = _base(rng, (0.93, 0.95, 0.98), 0.02)
    shade = _fractal(rng, h, w, 3, 3)
    img = base * (0.86 + 0.14 * shade[..., None])
    img[..., 2] += 0.04 * (1 - shade)
    sparkle = (rng.random((h, w)) > 0.994)[..., None]
    return np.where(sparkle, 1.0, img)


def _tex_wood(rng, h, w, s):
    base = _base(rng, (0.58, 0.38, 0.2))
    yy, xx = _grid(h, w)
    pw = rng.uniform(12, 22) * s
    row = np.floor(yy / pw).astype(np.intp)
    rows = row.max() + 2
    plank = rng.uniform(0.8, 1.18, size=rows)[row]
    length = rng.uniform(60, 130) * s
    offset = rng.uniform(0, length, size=rows)[row]
    stretch = _noise(rng, h, w, h / (2.5 * s), max(2.0, w / (45 * s)))
    grain = np.sin(2 * np.pi * (yy / (pw * rng.uniform(0.18, 0.3)) + 2.5 * stretch))
    img = base * (plank * (0.9 + 0.1 * grain))[..., None]
    gap = max(1.0, 1.3 * s)
    joint = ((yy - row * pw) < gap) | (((xx + offset) % length) < gap)
    return np.where(joint[..., None], img * 0.45, img)


_TEXTURES = {
    "sky": _tex_sky,
    "grass": _tex_grass,
    "water": _tex_water,
    "sand": _tex_sand,
    "brick wall": _tex_brick,
    "road": _tex_road,
    "snow": _tex_snow,
    "wood floor": _tex_wood,
}
assert set(_TEXTURES) == set(STUFF_NAMES)

# --- captions -----------------------------------------------------------------------------------------------------


def _plural(name: str) -> str:
    return name + ("es" if name.endswith(("s", "x", "sh", "ch")) else "s")


def _article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def _join(items: Sequence[str]) -> str:
    if len(items) <= 1:
        return "".join(items)
    return ", ".join(items[:-1]) + " and " + items[-1]


def _thing_phrase(color: str, name: str, count: int = 1) -> str:
    if count == 1:
        return f"{_article(color)} {color} {name}"
    number = _NUMBER_WORDS[count] if count < len(_NUMBER_WORDS) else str(count)
    return f"{number} {color} {_plural(name)}"


def _caption(objects: Sequence[SceneObject], stuff: Sequence[SceneStuff]) -> str:
    """Name every thing (grouped by colour and category, in drawing order) and every stuff region."""
    groups: dict[tuple[str, str], int] = {}
    for o in objects:
        groups[(o.color_name, o.category)] = groups.get((o.color_name, o.category), 0) + 1
    things = [_thing_phrase(color, name, n) for (color, name), n in groups.items()]
    if not things:
        return "an empty scene of " + _join([_STUFF_PHRASES[s.category][0] for s in stuff])
    places = [_STUFF_PHRASES[s.category][1] for s in stuff]
    return _join(things) + (" " + _join(places) if places else "")


# --- crops --------------------------------------------------------------------------------------------------------


def _crops(scene: Scene, rng: np.random.Generator) -> list[tuple[np.ndarray, str, str]]:
    """(64x64 RGB crop, caption, category) for every object at least half visible (its visible box with a margin) and
    every stuff region (a square patch mostly inside its visible part)."""
    h, w = scene.image.shape[:2]
    out = []
    for o in scene.objects:
        if np.count_nonzero(o.mask) < 0.5 * np.count_nonzero(o.shape_mask):
            continue  # mostly hidden: the crop would show its occluders more than itself
        ys, xs = np.nonzero(o.mask)
        y0, y1, x0, x1 = ys.min(), ys.max() + 1, xs.min(), xs.max() + 1
        side = max(y1 - y0, x1 - x0)
        side = min(int(round(side * 1.3)) + 4, h, w)
        top = _clamp(int(round((y0 + y1 - side) / 2)), 0, h - side)
        left = _clamp(int(round((x0 + x1 - side) / 2)), 0, w - side)
        crop = scene.image[top : top + side, left : left + side]
        out.append((_resize(crop), f"a photo of {_thing_phrase(o.color_name, o.category)}", o.category))
    side = max(8, round(0.3 * min(h, w)))
    for s in scene.stuff:
        integral = cv2.integral(s.mask.astype(np.uint8))
        best, best_cover = None, -1.0
        for _ in range(24):
            top, left = int(rng.integers(0, h - side + 1)), int(rng.integers(0, w - side + 1))
            inside = integral[top + side, left + side] - integral[top, left + side]
            inside -= integral[top + side, left] - integral[top, left]
            cover = inside / (side * side)
            if cover > best_cover:
                best, best_cover = (top, left), cover
            if cover >= 0.85:
                break
        if best is None or best_cover < 0.5:
            continue
        top, left = best
        crop = scene.image[top : top + side, left : left + side]
        out.append((_resize(crop), f"a photo of {_STUFF_PHRASES[s.category][0]}", s.category))
    return out


def _clamp(v: int, lo: int, hi: int) -> int:
    return max(lo, min(hi, v))


def _resize(crop: np.ndarray) -> np.ndarray:
    return cv2.resize(np.ascontiguousarray(crop), (CROP_SIZE, CROP_SIZE), interpolation=cv2.INTER_AREA)


# --- generate -----------------------------------------------------------------------------------------------------


def _image_json(image_id: int, file_name: str, h: int, w: int) -> dict[str, Any]:
    return {"id": image_id, "file_name": file_name, "width": w, "height": h}


def _panoptic_png(id_map: np.ndarray) -> np.ndarray:
    ids = id_map.astype(np.uint32)
    return np.stack([ids & 255, (ids >> 8) & 255, (ids >> 16) & 255], axis=-1).astype(np.uint8)


def generate(out: str | Path, config: SynthConfig = SynthConfig()) -> dict[str, Any]:
    """Draw ``config.images`` scenes and write the split's dataset under ``out`` (see the module docstring).

    Several splits may share ``out`` (e.g. a ``base_only`` "train" and a "val"): ``vocab.txt`` is the same for all
    and ``meta.json`` keeps one config per split, but they must agree on the novel categories (ValueError). Files a
    previous, larger run of the same split left in its folders are removed. Returns a summary: split, images,
    instances, segments (panoptic, annotated), crops, and the paths written (relative to ``out``).
    """
    if not isinstance(config, SynthConfig):
        raise TypeError(f"config must be a SynthConfig, got {type(config).__name__}")
    out = Path(out)
    split = config.split
    h, w = config.size
    novel = set(config.novel)
    annotated = [c for c in SYNTH_CATEGORIES if not (config.base_only and c["name"] in novel)]
    annotated_ids = {c["id"] for c in annotated}
    meta = _merged_meta(out, config)

    semantic_lut = np.full(len(SYNTH_CATEGORIES) + 1, IGNORE_LABEL, dtype=np.uint8)
    for c in annotated:
        semantic_lut[c["id"]] = c["id"] - 1

    digits = max(6, len(str(max(config.images - 1, 0))))
    images_json: list[dict[str, Any]] = []
    panoptic_anns: list[dict[str, Any]] = []
    instance_anns: list[dict[str, Any]] = []
    caption_lines: list[str] = []
    crop_lines: list[str] = []
    written: dict[str, set[str]] = {"images": set(), "panoptic": set(), "semantic": set(), "crops": set()}
    n_segments = 0
    for index in range(config.images):
        scene = make_scene(config, index)
        stem = f"{index:0{digits}d}"
        file_name = f"{stem}.png"
        image_id = index + 1
        images_json.append(_image_json(image_id, file_name, h, w))
        atomic_save_png(out / "images" / split / file_name, scene.image)

        # Annotated segments, in segment-map order: stuff regions first (as drawn), then things (as drawn).
        segments = [(s.segment_id, s.category_id) for s in scene.stuff if s.category_id in annotated_ids]
        segments += [(o.segment_id, o.category_id) for o in scene.objects if o.category_id in annotated_ids]
        id_map, areas, boxes = segment_stats(scene.segment_map, [sid for sid, _ in segments])
        atomic_save_png(out / f"panoptic_{split}" / file_name, _panoptic_png(id_map))
        categories_map = (id_map // _SEGMENT_STRIDE).astype(np.intp)
        semantic = np.where(id_map > 0, semantic_lut[categories_map], IGNORE_LABEL).astype(np.uint8)
        atomic_save_png(out / f"semantic_{split}" / file_name, semantic)
        segments_info = [
            {"id": sid, "category_id": cid, "iscrowd": 0, "bbox": box, "area": area}
            for (sid, cid), area, box in zip(segments, areas, boxes)
        ]
        n_segments += len(segments_info)
        panoptic_anns.append({"image_id": image_id, "file_name": file_name, "segments_info": segments_info})
        for (sid, cid), area, box in zip(segments, areas, boxes):
            if not _BY_NAME_ID[cid]["isthing"]:
                continue
            instance_anns.append(
                {
                    "id": len(instance_anns) + 1,
                    "image_id": image_id,
                    "category_id": cid,
                    "segmentation": encode_rle(id_map == sid),
                    "area": area,
                    "bbox": box,
                    "iscrowd": 0,
                }
            )
        caption_lines.append(dumps_json({"image": file_name, "caption": scene.caption}))
        for kind in ("images", "panoptic", "semantic"):
            written[kind].add(file_name)

        if config.crops:
            _, crop_seq = _seed_sequence(config, index).spawn(2)
            for k, (crop, caption, category) in enumerate(_crops(scene, np.random.default_rng(crop_seq))):
                crop_name = f"{stem}_{k}.png"
                atomic_save_png(out / f"crops_{split}" / crop_name, crop)
                written["crops"].add(crop_name)
                crop_lines.append(
                    dumps_json({"crop": crop_name, "image": file_name, "caption": caption, "category": category})
                )

    panoptic_categories = [
        {
            "id": c["id"],
            "name": c["name"],
            "isthing": c["isthing"],
            "color": list(c["color"]),
            "supercategory": "shape" if c["isthing"] else "background",
        }
        for c in SYNTH_CATEGORIES
    ]
    instance_categories = [
        {"id": c["id"], "name": c["name"], "supercategory": "shape"} for c in SYNTH_CATEGORIES if c["isthing"]
    ]
    info = {"description": f"masqclip synthetic shapes world, split {split}", "version": GENERATOR_VERSION}
    paths = {
        "images": f"images/{split}",
        "panoptic": f"panoptic_{split}",
        "panoptic_json": f"annotations/panoptic_{split}.json",
        "instances_json": f"annotations/instances_{split}.json",
        "semantic": f"semantic_{split}",
        "captions": f"captions_{split}.jsonl",
        "vocab": "vocab.txt",
        "meta": "meta.json",
    }
    atomic_write_json(
        out / paths["panoptic_json"],
        {"info": info, "images": images_json, "annotations": panoptic_anns, "categories": panoptic_categories},
    )
    atomic_write_json(
        out / paths["instances_json"],
        {"info": info, "images": images_json, "annotations": instance_anns, "categories": instance_categories},
    )
    atomic_write_text(out / paths["captions"], "".join(line + "\n" for line in caption_lines))
    if config.crops:
        paths["crops"] = f"crops_{split}"
        paths["crops_jsonl"] = f"crops_{split}.jsonl"
        atomic_write_text(out / paths["crops_jsonl"], "".join(line + "\n" for line in crop_lines))
    atomic_write_text(out / paths["vocab"], vocab_text())
    atomic_write_json(out / paths["meta"], meta, indent=1)
    _remove_stale(out, split, written, crops=config.crops)
    return {
        "split": split,
        "images": config.images,
        "instances": len(instance_anns),
        "segments": n_segments,
        "crops": len(crop_lines),
        "paths": paths,
    }


def _merged_meta(out: Path, config: SynthConfig) -> dict[str, Any]:
    """meta.json content: the shared fields, plus this split's config merged into any splits already there."""
    novel = [c["name"] for c in SYNTH_CATEGORIES if c["name"] in set(config.novel)]
    base = [c["name"] for c in SYNTH_CATEGORIES if c["name"] not in set(config.novel)]
    categories = [{"id": c["id"], "name": c["name"], "isthing": c["isthing"]} for c in SYNTH_CATEGORIES]
    splits: dict[str, Any] = {}
    path = out / "meta.json"
    if path.is_file():
        try:
            old = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            old = None
        if isinstance(old, dict) and old.get("generator") == "masqclip-synthetic":
            if old.get("version") != GENERATOR_VERSION or old.get("categories") != categories:
                old = None  # another generator version: start over
            elif old.get("novel") != novel:
                raise ValueError(
                    f"{out} already holds splits with novel categories {old.get('novel')}; "
                    f"this split has {novel} (use another folder)"
                )
            if old is not None and isinstance(old.get("splits"), dict):
                splits = dict(old["splits"])
    entry = config.to_json()
    entry["annotated"] = [c["name"] for c in SYNTH_CATEGORIES if not (config.base_only and c["name"] in set(novel))]
    splits[config.split] = entry
    return {
        "generator": "masqclip-synthetic",
        "version": GENERATOR_VERSION,
        "categories": categories,
        "base": base,
        "novel": novel,
        "ignore_label": IGNORE_LABEL,
        "splits": {k: splits[k] for k in sorted(splits)},
    }


_OUR_FILE = re.compile(r"^\d{6,}(_\d+)?\.png$")


def _remove_stale(out: Path, split: str, written: dict[str, set[str]], *, crops: bool) -> None:
    """Delete generator-named files of this split that this run did not write (left by a larger earlier run)."""
    folders = {
        "images": out / "images" / split,
        "panoptic": out / f"panoptic_{split}",
        "semantic": out / f"semantic_{split}",
        "crops": out / f"crops_{split}",
    }
    for kind, folder in folders.items():
        if not folder.is_dir():
            continue
        for path in sorted(folder.iterdir()):
            if path.is_file() and _OUR_FILE.match(path.name) and path.name not in written[kind]:
                path.unlink()
    if not crops:
        stale = out / f"crops_{split}.jsonl"
        if stale.is_file():
            stale.unlink()
