"""The synthetic video world: the shapes world (:mod:`.synthetic`) set in motion, with MOTS ground truth.

A video is a textured stuff background (the shapes world's layout and textures, drawn once on a canvas a little wider
than the frame and slowly panned across it) with ``min_objects``..``max_objects`` (2-5) *things* (the shapes world's
coloured shapes) that move with a constant velocity, rotate, grow or shrink, occlude each other and leave and enter
the frame. Every object keeps its category, colour, size law and shading for the whole video; it is one *track*.

Motion. Each track is one of three kinds, drawn at random (a video with at least two tracks always has at least one
of each of the first two):

* ``enter``: starts wholly outside the frame (every pixel of it) and crosses an edge into it at a random frame in the
  first 60 % of the video, then goes on in a straight line (it may cross the frame and leave again);
* ``exit``: crosses an edge out of the frame at a random frame in the last 60 % of the video and is wholly outside at
  the last frame;
* ``stay``: moves in a straight line and bounces off the frame's borders (so it stays mostly inside); half of them
  are aimed to pass through the centre of an earlier track at a random frame, so paths cross.

Speeds are in fractions of ``min(H, W)`` per frame, rotation speeds in degrees per frame (shapes whose image-world
rotation range is limited, e.g. the square, swing back and forth inside that range so a square never turns into a
diamond; circles and rings do not rotate), scale rates in log-size per frame (the radius is ``r0 * exp(g (t - mid))``,
kept within 0.6..1.6 ``r0``).

Occlusion. Tracks are painted in a fixed depth order (their order in :attr:`Video.tracks`: later ones in front), so a
track is partly or wholly hidden whenever a later one passes over it, and comes back with the same id. A track is in
the ground truth of a frame when at least one of its pixels is visible; tracks never visible at all are dropped.

Ids. As in the image world, panoptic segment ids are ``category_id * 1000`` for stuff and ``category_id * 1000 + k``
for the k-th (1-based) track of a thing category in the video. The thing ids are also the MOTS track ids (the MOTS
convention ``class_id * 1000 + instance``), and the MOTS class column holds the category id (1..12, the things of
:data:`~masqclip_cli.data.synthetic.SYNTH_CATEGORIES`). Note: in MOTS Challenge / KITTI MOTS class 10 means "ignore
region"; here 10 is the ``crescent``: there is no ignore class in this dataset (``videos.json`` says so:
``"ignore_class_ids": []``).

Everything is a pure function of ``(seed, index)`` (a :class:`numpy.random.SeedSequence` per video), so a video can be
rebuilt alone (:func:`make_video`) and two runs write byte-identical files (the MP4 too: x264 runs single-threaded).

:func:`generate_videos` writes, under ``root``::

    videos/<name>.mp4                  the video, lossy (H.264 yuv420p, CRF 17, or MPEG-4 part 2), ``fps`` frames/s
    frames/<name>/000000.png           the exact RGB frames (lossless PNG), the pixels the ground truth describes
    panoptic/<name>/000000.png         per-frame COCO panoptic id map (id = R + 256 G + 256^2 B; never 0)
    gt/<name>.txt                      MOTS txt: ``frame track_id class_id height width rle`` (frame 1-based)
    vocab.txt                          the shapes world's vocabulary (things, then stuff)
    videos.json                        manifest: config, categories, MOTS conventions, per video its files and tracks

``<name>`` is the 6-digit video index (``000000``). Which frames to run a model on: the MP4 is the realistic input
(PyAV/x264 decode differs from the PNGs by a mean absolute error of about 4-7 grey levels on these noisy textures,
mostly from the yuv420p chroma subsampling, 1-2 levels after a slight blur; the masks stay exact for it, as nothing
moves in encoding); ``frames/<name>/`` is the exact input, for results that do not depend on a codec build (a folder
source; its frame ids ``000123.png`` are frame index 123, as ``<name>.mp4#000123`` is). Ground truth is the same for
both. PyAV (``av``) is imported only to write the MP4.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import re
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path
from typing import Any

import numpy as np

from masqclip_cli.data.synthetic import (
    _BY_NAME,
    _SEGMENT_STRIDE,
    _SHAPES,
    _TEXTURES,
    GENERATOR_VERSION,
    SYNTH_CATEGORIES,
    THING_NAMES,
    _is_int,
    _jitter_color,
    _layout,
    _paint_object,
    _pick_color,
    draw_shape,
    vocab_text,
)
from masqclip_cli.io.files import atomic_save_png, atomic_write_bytes, atomic_write_json, atomic_write_text
from masqclip_cli.io.writers.mots import mots_line
from masqclip_cli.structures.masks import encode_rle, id_to_rgb

__all__ = [
    "TRACK_KINDS",
    "VIDEO_CODECS",
    "VIDEO_GENERATOR_VERSION",
    "Video",
    "VideoConfig",
    "VideoTrack",
    "generate_videos",
    "make_video",
    "mots_lines",
    "video_name",
]

#: Bumped whenever the same config would draw different videos.
VIDEO_GENERATOR_VERSION = "1"
#: The codecs :func:`generate_videos` can write (both in PyAV's wheels): H.264 (default) or MPEG-4 part 2.
VIDEO_CODECS: tuple[str, ...] = ("libx264", "mpeg4")
#: How a track moves relative to the frame (see the module docstring).
TRACK_KINDS: tuple[str, ...] = ("enter", "exit", "stay")
_KIND_P = (0.3, 0.3, 0.4)
_SCALE_CLIP = (0.6, 1.6)  # the radius stays within these multiples of r0
_OUTSIDE_MARGIN = 2.0  # pixels beyond the shape's extent that count as "wholly outside"
_SENSOR_NOISE = 0.012  # as the image world

# --- config -------------------------------------------------------------------------------------------------------


def _as_pair(value: Any) -> Any:
    return tuple(value) if isinstance(value, list) else value


def _check_range(name: str, value: Any, lo: float, hi: float) -> None:
    ok = (
        isinstance(value, tuple)
        and len(value) == 2
        and all(isinstance(v, (int, float, np.integer, np.floating)) and not isinstance(v, bool) for v in value)
        and all(np.isfinite(v) for v in value)
        and lo <= value[0] <= value[1] <= hi
    )
    if not ok:
        raise ValueError(f"{name} must be a (low, high) pair with {lo} <= low <= high <= {hi}, got {value!r}")


@dataclass(frozen=True)
class VideoConfig:
    """What :func:`generate_videos` draws.

    Attributes:
        seed: base seed (a non-negative integer); with the video index it seeds every video.
        num_videos: number of videos.
        frames: frames per video (2..10000).
        size: frame size ``(height, width)`` in pixels, each even (yuv420p video) and 32..4096.
        min_objects, max_objects: the number of tracks per video is uniform in this range (0..99).
        speed: (low, high) object speed, in fractions of ``min(H, W)`` per frame (enter/exit tracks may be sped up
            so that they start or end wholly outside the frame within the video).
        rotation_speed: (low, high) absolute rotation speed in degrees per frame (the sign is random).
        scale_rate: (low, high) absolute rate of change of log-radius per frame (the sign is random).
        radius: (low, high) radius of a shape at mid-video, in fractions of ``min(H, W)``.
        pan: the largest background pan speed in pixels per frame (horizontal; 0 = a static background).
        fps: frame rate of the written video (1..240).
        codec: ``libx264`` (H.264) or ``mpeg4`` (MPEG-4 part 2), see :data:`VIDEO_CODECS`.
    """

    seed: int = 0
    num_videos: int = 8
    frames: int = 48
    size: tuple[int, int] = (128, 128)
    min_objects: int = 2
    max_objects: int = 5
    speed: tuple[float, float] = (0.005, 0.025)
    rotation_speed: tuple[float, float] = (0.0, 4.0)
    scale_rate: tuple[float, float] = (0.0, 0.01)
    radius: tuple[float, float] = (0.08, 0.16)
    pan: float = 0.5
    fps: int = 10
    codec: str = "libx264"

    def __post_init__(self) -> None:
        for name in ("size", "speed", "rotation_speed", "scale_rate", "radius"):
            object.__setattr__(self, name, _as_pair(getattr(self, name)))
        if not _is_int(self.seed) or self.seed < 0:
            raise ValueError(f"seed must be a non-negative integer, got {self.seed!r}")
        if not _is_int(self.num_videos) or self.num_videos < 0:
            raise ValueError(f"num_videos must be a non-negative integer, got {self.num_videos!r}")
        if not _is_int(self.frames) or not 2 <= self.frames <= 10000:
            raise ValueError(f"frames must be an integer in 2..10000, got {self.frames!r}")
        if (
            not isinstance(self.size, tuple)
            or len(self.size) != 2
            or not all(_is_int(v) and 32 <= v <= 4096 and v % 2 == 0 for v in self.size)
        ):
            raise ValueError(f"size must be (height, width), each even and 32..4096, got {self.size!r}")
        if not (_is_int(self.min_objects) and _is_int(self.max_objects) and 0 <= self.min_objects <= self.max_objects):
            raise ValueError(f"need 0 <= min_objects <= max_objects, got {self.min_objects!r}, {self.max_objects!r}")
        if self.max_objects > 99:
            raise ValueError(f"max_objects must be at most 99, got {self.max_objects}")
        _check_range("speed", self.speed, 0.0, 1.0)
        _check_range("rotation_speed", self.rotation_speed, 0.0, 90.0)
        _check_range("scale_rate", self.scale_rate, 0.0, 0.2)
        _check_range("radius", self.radius, 0.01, 0.5)
        if isinstance(self.pan, bool) or not isinstance(self.pan, (int, float)) or not 0 <= self.pan <= 16:
            raise ValueError(f"pan must be a number of pixels per frame in 0..16, got {self.pan!r}")
        if not _is_int(self.fps) or not 1 <= self.fps <= 240:
            raise ValueError(f"fps must be an integer in 1..240, got {self.fps!r}")
        if self.codec not in VIDEO_CODECS:
            raise ValueError(f"codec must be one of {', '.join(VIDEO_CODECS)}, got {self.codec!r}")

    def to_json(self) -> dict[str, Any]:
        """The config as a JSON object (tuples as lists), in field order."""
        out = dataclasses.asdict(self)
        for name in ("size", "speed", "rotation_speed", "scale_rate", "radius"):
            out[name] = list(getattr(self, name))
        return out


# --- videos -------------------------------------------------------------------------------------------------------


@dataclass(eq=False)
class VideoTrack:
    """One thing of a video, in depth order (later tracks are drawn in front).

    The per-frame arrays have one entry per frame (T,): ``centers`` (T, 2) is the shape's centre (x, y) in pixels
    (pixel centres at integer coordinates; it may lie outside the frame), ``angles`` its rotation in degrees,
    ``radii`` its radius in pixels, ``full_areas`` the pixel count of the whole shape inside the frame before
    occlusion and ``visible_areas`` that of its visible pixels (its ground-truth mask).
    """

    track_id: int
    category: str
    category_id: int
    kind: str
    color_name: str
    rgb: tuple[int, int, int]
    centers: np.ndarray
    angles: np.ndarray
    radii: np.ndarray
    full_areas: np.ndarray
    visible_areas: np.ndarray

    @property
    def frames_visible(self) -> np.ndarray:
        """(T,) bool: the frames in which the track is in the ground truth (at least one visible pixel)."""
        return self.visible_areas > 0

    @property
    def first_frame(self) -> int:
        """The first frame (0-based) in which the track is visible."""
        return int(np.flatnonzero(self.frames_visible)[0])

    @property
    def last_frame(self) -> int:
        """The last frame (0-based) in which the track is visible."""
        return int(np.flatnonzero(self.frames_visible)[-1])


@dataclass(eq=False)
class Video:
    """A drawn video and its full ground truth.

    ``frames`` is (T, H, W, 3) uint8 RGB; ``segment_maps`` (T, H, W) int32 panoptic segment ids of every pixel (never
    0: stuff ``category_id * 1000``, things their track id); ``stuff_names`` the stuff categories of the background
    (some may be out of view in some frames).
    """

    index: int
    name: str
    frames: np.ndarray
    segment_maps: np.ndarray
    tracks: list[VideoTrack]
    stuff_names: list[str]
    pan_speed: float

    @property
    def track_maps(self) -> np.ndarray:
        """(T, H, W) int32: the track id of the visible thing at every pixel, 0 where stuff is visible."""
        return np.where(self.segment_maps % _SEGMENT_STRIDE > 0, self.segment_maps, 0).astype(np.int32)

    @property
    def num_frames(self) -> int:
        return int(self.frames.shape[0])


def video_name(index: int) -> str:
    """The file stem of video ``index``: 6 digits (more when needed)."""
    return f"{int(index):06d}"


def _seed_sequence(config: VideoConfig, index: int) -> np.random.SeedSequence:
    domain = int.from_bytes(hashlib.sha256(b"masqclip-synthetic-video").digest()[:8], "little")
    return np.random.SeedSequence(
        [int(GENERATOR_VERSION), int(VIDEO_GENERATOR_VERSION), domain, int(config.seed), int(index)]
    )


def _reflect(x: np.ndarray, lo: float, hi: float) -> np.ndarray:
    """Fold positions into [lo, hi] as a ball bouncing between two walls (a triangle wave); lo == hi gives lo."""
    span = hi - lo
    if span <= 0:
        return np.full_like(x, lo, dtype=np.float64)
    period = 2.0 * span
    y = np.mod(x - lo, period)
    return lo + np.where(y > span, period - y, y)


def _shape_extent(name: str) -> float:
    """The largest distance from the centre of a category's unit polygons (the radius-1 shape's extent)."""
    filled, _, _ = _SHAPES[name]
    return float(max(np.linalg.norm(p, axis=1).max() for p in filled))


def _shape_mask(name: str, cx: float, cy: float, radius: float, angle_deg: float, h: int, w: int) -> np.ndarray:
    """(h, w) bool: the in-frame pixels of a shape, drawn as the image world draws it (sub-pixel vertices)."""
    return draw_shape(name, cx, cy, radius, np.deg2rad(angle_deg), h, w)


def _edge_crossing(rng: np.random.Generator, h: int, w: int, outward: bool) -> tuple[np.ndarray, np.ndarray, float]:
    """(point on a random edge, unit direction into (or out of) the frame, cosine of its angle to the edge normal)."""
    side = int(rng.integers(4))  # 0 left, 1 right, 2 top, 3 bottom
    along = rng.uniform(0.2, 0.8)
    deviation = np.deg2rad(rng.uniform(-45.0, 45.0))
    # Pixel centres span -0.5 .. size - 0.5: the edge is there.
    if side == 0:
        point, normal = np.array([-0.5, along * h]), np.array([1.0, 0.0])
    elif side == 1:
        point, normal = np.array([w - 0.5, along * h]), np.array([-1.0, 0.0])
    elif side == 2:
        point, normal = np.array([along * w, -0.5]), np.array([0.0, 1.0])
    else:
        point, normal = np.array([along * w, h - 0.5]), np.array([0.0, -1.0])
    c, s = np.cos(deviation), np.sin(deviation)
    direction = np.array([c * normal[0] - s * normal[1], s * normal[0] + c * normal[1]])
    if outward:
        direction = -direction
    return point, direction, float(c)


def _draw_tracks(rng: np.random.Generator, config: VideoConfig) -> list[dict[str, Any]]:
    """The tracks' appearance and kinematics (per-frame centres, angles, radii), in depth order."""
    h, w = config.size
    t_count = config.frames
    t = np.arange(t_count, dtype=np.float64)
    mid = (t_count - 1) / 2.0
    side = float(min(h, w))
    count = int(rng.integers(config.min_objects, config.max_objects + 1))
    kinds = [TRACK_KINDS[int(rng.choice(len(TRACK_KINDS), p=_KIND_P))] for _ in range(count)]
    if count >= 2:  # at least one track enters and one leaves
        if "enter" not in kinds:
            kinds[int(rng.integers(count))] = "enter"
        if "exit" not in kinds:
            candidates = [i for i, k in enumerate(kinds) if k != "enter" or kinds.count("enter") > 1]
            kinds[candidates[int(rng.integers(len(candidates)))]] = "exit"
    tracks: list[dict[str, Any]] = []
    for kind in kinds:
        name = THING_NAMES[int(rng.integers(len(THING_NAMES)))]
        color_name = _pick_color(rng, name)
        rgb = _jitter_color(rng, color_name)
        r0 = rng.uniform(*config.radius) * side
        growth = rng.uniform(*config.scale_rate) * (1.0 if rng.random() < 0.5 else -1.0)
        radii = r0 * np.clip(np.exp(growth * (t - mid)), *_SCALE_CLIP)
        _, _, rotation_range = _SHAPES[name]
        omega = rng.uniform(*config.rotation_speed) * (1.0 if rng.random() < 0.5 else -1.0)
        if rotation_range == 0:
            angles = np.zeros(t_count)
        else:
            start = rng.uniform(-rotation_range, rotation_range)
            angles = start + omega * t
            if rotation_range < 180:
                angles = _reflect(angles, -rotation_range, rotation_range)
        speed = rng.uniform(*config.speed) * side
        paint_seed = int(rng.integers(2**63))
        reach = _shape_extent(name) * r0 * _SCALE_CLIP[1] + _OUTSIDE_MARGIN  # wholly outside beyond this distance
        if kind in ("enter", "exit"):
            point, direction, cos = _edge_crossing(rng, h, w, outward=kind == "exit")
            speed = max(speed, 1e-3)
            # Frames needed to get from the edge to wholly outside; the crossing frame leaves that many before
            # (enter) or after (exit) it.
            need = reach / (speed * cos)
            limit = 0.6 * (t_count - 1)
            if need > limit:
                speed = reach / (cos * limit)
                need = limit
            if kind == "enter":
                crossing = rng.uniform(need, max(need, limit))
            else:
                crossing = rng.uniform(min(t_count - 1 - need, t_count - 1 - limit), t_count - 1 - need)
            centers = point[None, :] + direction[None, :] * speed * (t - crossing)[:, None]
        else:
            theta = rng.uniform(0, 2 * np.pi)
            velocity = speed * np.array([np.cos(theta), np.sin(theta)])
            margin = 0.8 * r0
            lo = np.array([margin, margin])
            hi = np.array([w - 1 - margin, h - 1 - margin])
            anchor_t = rng.uniform(0, t_count - 1)
            anchor = rng.uniform(lo, np.maximum(lo, hi))
            if tracks and rng.random() < 0.5:  # aim at an earlier track: paths cross, one occludes the other
                other = tracks[int(rng.integers(len(tracks)))]
                k = int(round(anchor_t))
                anchor = np.clip(other["centers"][k], lo, np.maximum(lo, hi))
                anchor_t = float(k)
            raw = anchor[None, :] + velocity[None, :] * (t - anchor_t)[:, None]
            centers = np.stack(
                [_reflect(raw[:, 0], lo[0], max(lo[0], hi[0])), _reflect(raw[:, 1], lo[1], max(lo[1], hi[1]))], axis=1
            )
        tracks.append(
            {
                "name": name,
                "kind": kind,
                "color": color_name,
                "rgb": rgb,
                "centers": centers,
                "angles": angles,
                "radii": radii,
                "paint_seed": paint_seed,
            }
        )
    return tracks


def make_video(config: VideoConfig, index: int) -> Video:
    """Draw video ``index`` of the dataset described by ``config`` (independent of every other video and of
    ``config.num_videos``, ``fps`` and ``codec``)."""
    if not isinstance(config, VideoConfig):
        raise TypeError(f"config must be a VideoConfig, got {type(config).__name__}")
    background_seq, track_seq, noise_seq = _seed_sequence(config, index).spawn(3)
    h, w = config.size
    t_count = config.frames
    scale = min(h, w) / 256.0

    # Background: the image world's layout on a canvas wide enough to pan across.
    bg_rng = np.random.default_rng(background_seq)
    pan_speed = float(bg_rng.uniform(-config.pan, config.pan)) if config.pan > 0 else 0.0
    travel = int(np.ceil(abs(pan_speed) * (t_count - 1)))
    canvas_w = w + travel
    region_ids, stuff_names = _layout(bg_rng, h, canvas_w)
    background = np.zeros((h, canvas_w, 3), dtype=np.float64)
    bg_segments = np.zeros((h, canvas_w), dtype=np.int32)
    for r, name in enumerate(stuff_names):
        region = region_ids == r
        texture = _TEXTURES[name](bg_rng, h, canvas_w, scale)
        background[region] = texture[region]
        bg_segments[region] = _BY_NAME[name]["id"] * _SEGMENT_STRIDE
    start = 0 if pan_speed >= 0 else travel
    offsets = [int(np.clip(round(start + pan_speed * k), 0, travel)) for k in range(t_count)]

    drawn = _draw_tracks(np.random.default_rng(track_seq), config)
    noise_rng = np.random.default_rng(noise_seq)

    frames = np.empty((t_count, h, w, 3), dtype=np.uint8)
    owners = np.zeros((t_count, h, w), dtype=np.int32)  # 1 + index into ``drawn`` of the top track, 0 = stuff
    full_areas = np.zeros((len(drawn), t_count), dtype=np.int64)
    for k in range(t_count):
        x0 = offsets[k]
        image = background[:, x0 : x0 + w].copy()
        owner = owners[k]
        for j, d in enumerate(drawn):
            cx, cy = d["centers"][k]
            shape = _shape_mask(d["name"], cx, cy, d["radii"][k], d["angles"][k], h, w)
            area = int(np.count_nonzero(shape))
            full_areas[j, k] = area
            if area:
                # The same generator every frame: the track keeps its light direction.
                _paint_object(np.random.default_rng(d["paint_seed"]), image, shape, d["rgb"], scale)
                owner[shape] = j + 1
        image += noise_rng.normal(0.0, _SENSOR_NOISE, size=image.shape)
        frames[k] = np.clip(np.rint(image * 255.0), 0, 255).astype(np.uint8)

    visible_areas = (
        np.stack([np.count_nonzero(owners == j + 1, axis=(1, 2)) for j in range(len(drawn))])
        if drawn
        else (np.zeros((0, t_count), dtype=np.int64))
    )
    # Track ids: k-th visible track of its category (in depth order); never-visible tracks are dropped.
    tracks: list[VideoTrack] = []
    lut = np.zeros(len(drawn) + 1, dtype=np.int32)
    numbers: dict[str, int] = {}
    for j, d in enumerate(drawn):
        if not visible_areas[j].any():
            continue
        numbers[d["name"]] = numbers.get(d["name"], 0) + 1
        category_id = _BY_NAME[d["name"]]["id"]
        track_id = category_id * _SEGMENT_STRIDE + numbers[d["name"]]
        lut[j + 1] = track_id
        tracks.append(
            VideoTrack(
                track_id=track_id,
                category=d["name"],
                category_id=category_id,
                kind=d["kind"],
                color_name=d["color"],
                rgb=d["rgb"],
                centers=d["centers"],
                angles=d["angles"],
                radii=d["radii"],
                full_areas=full_areas[j],
                visible_areas=visible_areas[j].astype(np.int64),
            )
        )
    segment_maps = np.stack([bg_segments[:, x0 : x0 + w] for x0 in offsets])
    segment_maps = np.where(owners > 0, lut[owners], segment_maps).astype(np.int32)
    return Video(index, video_name(index), frames, segment_maps, tracks, list(stuff_names), pan_speed)


# --- MOTS lines ---------------------------------------------------------------------------------------------------


def mots_lines(video: Video) -> list[str]:
    """The video's ground truth as MOTS txt lines (no newline): ``frame track_id class_id height width rle`` with
    1-based frames, ids ``category_id * 1000 + k``, class = category id, COCO compressed RLE (masks never overlap),
    tracks in depth order within a frame. (:func:`masqclip_cli.evaluation.tracking.read_mots` reads them back.)"""
    h, w = video.frames.shape[1:3]
    by_id = {tr.track_id: tr for tr in video.tracks}
    lines = []
    for k in range(video.num_frames):
        seg = video.segment_maps[k]
        for track_id, tr in by_id.items():
            if not tr.visible_areas[k]:
                continue
            lines.append(mots_line(k + 1, track_id, tr.category_id, h, w, encode_rle(seg == track_id)["counts"])[:-1])
    return lines


# --- writing ------------------------------------------------------------------------------------------------------


def _encode_video(frames: np.ndarray, fps: int, codec: str) -> bytes:
    """MP4 bytes of (T, H, W, 3) uint8 RGB frames (PyAV; yuv420p; deterministic: single-threaded encoder)."""
    import av

    if codec not in av.codecs_available:
        raise ValueError(f"the installed PyAV has no {codec!r} encoder; use one of {', '.join(VIDEO_CODECS)}")
    t_count, h, w = frames.shape[:3]
    buffer = io.BytesIO()
    with av.open(buffer, mode="w", format="mp4") as container:
        stream = container.add_stream(codec, rate=Fraction(int(fps), 1))
        stream.width, stream.height, stream.pix_fmt = w, h, "yuv420p"
        if codec == "libx264":
            stream.options = {"crf": "17", "preset": "medium", "threads": "1"}
        else:  # mpeg4 has no CRF: about 1.5 bits per pixel
            stream.bit_rate = max(200_000, int(1.5 * h * w * fps))
            stream.options = {"threads": "1"}
        for k in range(t_count):
            frame = av.VideoFrame.from_ndarray(np.ascontiguousarray(frames[k]), format="rgb24")
            frame.pts = k
            for packet in stream.encode(frame):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return buffer.getvalue()


def _video_entry(video: Video, config: VideoConfig) -> dict[str, Any]:
    h, w = config.size
    name = video.name
    return {
        "name": name,
        "index": video.index,
        "video": f"videos/{name}.mp4",
        "frames_dir": f"frames/{name}",
        "panoptic_dir": f"panoptic/{name}",
        "gt": f"gt/{name}.txt",
        "num_frames": video.num_frames,
        "height": h,
        "width": w,
        "fps": config.fps,
        "stuff": list(video.stuff_names),
        "pan_speed": round(video.pan_speed, 6),
        "tracks": [
            {
                "track_id": tr.track_id,
                "category_id": tr.category_id,
                "category": tr.category,
                "color": tr.color_name,
                "kind": tr.kind,
                "first_frame": tr.first_frame,
                "last_frame": tr.last_frame,
                "frames_visible": int(np.count_nonzero(tr.frames_visible)),
            }
            for tr in video.tracks
        ],
    }


_OUR_NAME = re.compile(r"^\d{6,}$")


def _remove_stale(root: Path, names: set[str], frame_files: set[str]) -> None:
    """Delete generator-named files a previous, larger run left (more videos, or more frames per video)."""
    for folder, suffix in (("videos", ".mp4"), ("gt", ".txt")):
        path = root / folder
        if path.is_dir():
            for file in sorted(path.iterdir()):
                if file.is_file() and file.suffix == suffix and _OUR_NAME.match(file.stem) and file.stem not in names:
                    file.unlink()
    for folder in ("frames", "panoptic"):
        base = root / folder
        if not base.is_dir():
            continue
        for sub in sorted(base.iterdir()):
            if not (sub.is_dir() and _OUR_NAME.match(sub.name)):
                continue
            for file in sorted(sub.iterdir()):
                stale_video = sub.name not in names
                ours = file.is_file() and file.suffix == ".png" and _OUR_NAME.match(file.stem)
                if ours and (stale_video or file.name not in frame_files):
                    file.unlink()
            if sub.name not in names and not any(sub.iterdir()):
                sub.rmdir()


def generate_videos(config: VideoConfig, root: str | Path) -> dict[str, Any]:
    """Draw ``config.num_videos`` videos and write them with their ground truth under ``root`` (see the module
    docstring for the layout). Files a previous, larger run left are removed. Returns the manifest written to
    ``videos.json``."""
    if not isinstance(config, VideoConfig):
        raise TypeError(f"config must be a VideoConfig, got {type(config).__name__}")
    root = Path(root)
    digits = max(6, len(str(config.frames - 1)))
    frame_files = {f"{k:0{digits}d}.png" for k in range(config.frames)}
    entries = []
    for index in range(config.num_videos):
        video = make_video(config, index)
        name = video.name
        atomic_write_bytes(root / "videos" / f"{name}.mp4", _encode_video(video.frames, config.fps, config.codec))
        for k in range(video.num_frames):
            file_name = f"{k:0{digits}d}.png"
            atomic_save_png(root / "frames" / name / file_name, video.frames[k])
            atomic_save_png(root / "panoptic" / name / file_name, id_to_rgb(video.segment_maps[k]))
        atomic_write_text(root / "gt" / f"{name}.txt", "".join(line + "\n" for line in mots_lines(video)))
        entries.append(_video_entry(video, config))
    atomic_write_text(root / "vocab.txt", vocab_text())
    manifest = {
        "generator": "masqclip-synthetic-video",
        "version": VIDEO_GENERATOR_VERSION,
        "image_generator_version": GENERATOR_VERSION,
        "config": config.to_json(),
        "categories": [{"id": c["id"], "name": c["name"], "isthing": c["isthing"]} for c in SYNTH_CATEGORIES],
        "mots": {
            "format": "frame track_id class_id height width rle",
            "first_frame": 1,
            "track_id": "category_id * 1000 + k (k-th track of the category in the video)",
            "class_id": "category id (things 1..12)",
            "ignore_class_ids": [],
            "rle": "COCO compressed RLE, column-major; masks never overlap",
        },
        "frame_files": f"{digits}-digit 0-based frame index + .png",
        "videos": entries,
    }
    atomic_write_json(root / "videos.json", manifest, indent=1)
    _remove_stale(root, {e["name"] for e in entries}, frame_files)
    return manifest
