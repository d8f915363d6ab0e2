"""The synthetic video world: determinism, motion (moves, rotates, scales, enters, leaves, occludes) checked from the
ground truth, MOTS ground truth round trip, panoptic/frame PNGs and the written video."""

from __future__ import annotations

import dataclasses
import hashlib
import json
from pathlib import Path

import av
import cv2
import numpy as np
import pytest
from PIL import Image
from pycocotools import mask as mask_util

from masqclip_cli.data.synthetic import SYNTH_CATEGORIES, vocab_text
from masqclip_cli.data.synthetic_video import (
    VideoConfig,
    _shape_mask,
    generate_videos,
    make_video,
)
from masqclip_cli.evaluation.tracking import mots_to_id_maps, read_mots
from masqclip_cli.io.sources import iter_video_frames
from masqclip_cli.structures.masks import rgb_to_id

# Non-square frames, so that a height/width mix-up shows.
CFG = VideoConfig(seed=5, num_videos=3, frames=24, size=(96, 128))
THING_IDS = {c["id"] for c in SYNTH_CATEGORIES if c["isthing"]}

# pycocotools' RLE decode trips a numpy 2 deprecation warning inside pycocotools itself.
pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")


def _digest(root: Path) -> dict[str, str]:
    return {
        p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("videos")
    generate_videos(CFG, root)
    return root


@pytest.fixture(scope="module")
def videos():
    return [make_video(CFG, i) for i in range(CFG.num_videos)]


# --- config ---------------------------------------------------------------------------------------------------------


def test_config_round_trips_and_validates():
    assert VideoConfig(**CFG.to_json()) == CFG
    assert json.loads(json.dumps(CFG.to_json()))["size"] == [96, 128]
    for bad in (
        {"size": (95, 128)},  # odd: yuv420p needs even sizes
        {"size": (16, 16)},
        {"frames": 1},
        {"min_objects": 4, "max_objects": 2},
        {"speed": (0.3, 0.1)},
        {"radius": (0.0, 0.1)},
        {"codec": "h265"},
        {"fps": 0},
        {"seed": -1},
        {"pan": -1.0},
    ):
        with pytest.raises(ValueError):
            VideoConfig(**{**CFG.to_json(), **bad})


# --- determinism ----------------------------------------------------------------------------------------------------


def test_same_seed_same_bytes_other_seed_differs(dataset, tmp_path):
    again = tmp_path / "again"
    generate_videos(CFG, again)
    first, second = _digest(dataset), _digest(again)
    assert first == second
    assert any(k.startswith("videos/") for k in first) and any(k.startswith("frames/") for k in first)

    other = tmp_path / "other"
    generate_videos(dataclasses.replace(CFG, seed=CFG.seed + 1), other)
    third = _digest(other)
    assert set(third) == set(first)  # same layout
    for kind in ("videos/", "gt/", "frames/000000/"):
        names = [k for k in first if k.startswith(kind)]
        assert all(first[k] != third[k] for k in names), kind


def test_a_video_does_not_depend_on_the_others():
    alone = make_video(dataclasses.replace(CFG, num_videos=50, fps=25, codec="mpeg4"), 2)
    ref = make_video(CFG, 2)
    assert np.array_equal(alone.frames, ref.frames)
    assert np.array_equal(alone.segment_maps, ref.segment_maps)
    assert not np.array_equal(make_video(CFG, 1).frames, ref.frames)


# --- motion, from the ground truth ------------------------------------------------------------------------------------


def _touches_border(mask: np.ndarray) -> bool:
    return bool(mask[0].any() or mask[-1].any() or mask[:, 0].any() or mask[:, -1].any())


def _gt_maps(dataset: Path, name: str) -> np.ndarray:
    h, w = CFG.size
    return mots_to_id_maps(read_mots(dataset / "gt" / f"{name}.txt"), CFG.frames, h, w)


def test_tracks_enter_and_leave_the_frame(dataset, videos):
    for video in videos:
        gt = _gt_maps(dataset, video.name)
        present = {
            tr.track_id: np.array([(gt[k] == tr.track_id).any() for k in range(CFG.frames)]) for tr in video.tracks
        }
        assert len(video.tracks) >= 2
        entered = [tid for tid, p in present.items() if not p[0] and p.any()]
        left = [tid for tid, p in present.items() if p.any() and not p[-1]]
        assert entered and left, video.name
        for tr in video.tracks:
            p = present[tr.track_id]
            if tr.kind == "enter":
                assert not p[0]
                k = int(np.flatnonzero(p)[0])
                first = gt[k] == tr.track_id
                if tr.visible_areas[k] == tr.full_areas[k]:  # not hidden as it comes in: it comes through an edge
                    assert _touches_border(first)
            if tr.kind == "exit":
                assert not p[-1]


def test_tracks_move_rotate_and_scale_as_declared(dataset, videos):
    """The GT mask of a track at a later frame is its mask at an earlier frame moved, rotated and scaled by the
    track's declared motion (warped with OpenCV, independently of how the shapes are drawn)."""
    moved = rotated = scaled = 0
    checked = 0
    for video in videos:
        gt = _gt_maps(dataset, video.name)
        for tr in video.tracks:
            whole = [
                k
                for k in range(CFG.frames)
                if tr.visible_areas[k] == tr.full_areas[k] > 0 and not _touches_border(gt[k] == tr.track_id)
            ]
            if len(whole) < 2:
                continue
            a, b = whole[0], whole[-1]
            mask_a = (gt[a] == tr.track_id).astype(np.uint8)
            mask_b = gt[b] == tr.track_id
            (xa, ya), (xb, yb) = tr.centers[a], tr.centers[b]
            turn = tr.angles[b] - tr.angles[a]
            ratio = tr.radii[b] / tr.radii[a]
            warp = cv2.getRotationMatrix2D((xa - 0.5, ya - 0.5), -turn, ratio)
            warp[:, 2] += (xb - xa, yb - ya)
            h, w = mask_b.shape
            predicted = cv2.warpAffine(mask_a, warp, (w, h), flags=cv2.INTER_NEAREST).astype(bool)
            iou = (predicted & mask_b).sum() / (predicted | mask_b).sum()
            assert iou > 0.8, (video.name, tr.track_id, iou)
            ys_a, xs_a = np.nonzero(mask_a)
            ys_b, xs_b = np.nonzero(mask_b)
            moved += np.hypot(xs_b.mean() - xs_a.mean(), ys_b.mean() - ys_a.mean()) > 5
            rotated += abs(turn) > 15 and tr.category not in ("circle", "ring")
            scaled += abs(mask_b.sum() / mask_a.sum() - 1) > 0.1
            checked += 1
    assert checked >= 3
    assert moved and rotated and scaled


def test_occlusion_follows_the_depth_order(dataset, videos):
    """Where a track's whole shape (in frame) is not visible, the hidden pixels belong to tracks drawn after it."""
    h, w = CFG.size
    occluded = 0
    for video in videos:
        gt = _gt_maps(dataset, video.name)
        depth = {tr.track_id: d for d, tr in enumerate(video.tracks)}
        for tr in video.tracks:
            for k in range(CFG.frames):
                cx, cy = tr.centers[k]
                shape = _shape_mask(tr.category, cx, cy, tr.radii[k], tr.angles[k], h, w)
                assert shape.sum() == tr.full_areas[k]
                visible = gt[k] == tr.track_id
                assert not (visible & ~shape).any()
                hidden = shape & ~visible
                if hidden.any():
                    owners = np.unique(gt[k][hidden])
                    assert all(o in depth and depth[o] > depth[tr.track_id] for o in owners), (video.name, k)
                    occluded += 1
    assert occluded > 0


# --- ground truth files ---------------------------------------------------------------------------------------------


def test_mots_gt_round_trips_to_the_id_maps(dataset, videos):
    for video in videos:
        rows = read_mots(dataset / "gt" / f"{video.name}.txt")
        assert rows, video.name
        assert [r.frame for r in rows] == sorted(r.frame for r in rows)
        for r in rows:
            assert r.class_id in THING_IDS
            assert r.track_id // 1000 == r.class_id and r.track_id % 1000 >= 1  # MOTS: class_id * 1000 + instance
            assert r.size == CFG.size
        assert np.array_equal(_gt_maps(dataset, video.name), video.track_maps)
        # Every frame's masks, decoded by pycocotools, are disjoint and the same as the id map.
        raw = (dataset / "gt" / f"{video.name}.txt").read_text().splitlines()
        first = raw[0].split()
        decoded = mask_util.decode({"size": [int(first[3]), int(first[4])], "counts": first[5].encode()})
        assert np.array_equal(decoded.astype(bool), video.track_maps[int(first[0]) - 1] == int(first[1]))


def test_frames_and_panoptic_pngs(dataset, videos):
    for video in videos:
        for k in (0, CFG.frames // 2, CFG.frames - 1):
            png = np.asarray(Image.open(dataset / "frames" / video.name / f"{k:06d}.png").convert("RGB"))
            assert np.array_equal(png, video.frames[k])
            pan = rgb_to_id(np.asarray(Image.open(dataset / "panoptic" / video.name / f"{k:06d}.png").convert("RGB")))
            assert np.array_equal(pan, video.segment_maps[k])
            assert (pan > 0).all()
            stuff = pan[pan % 1000 == 0] // 1000
            assert set(np.unique(stuff)) <= {c["id"] for c in SYNTH_CATEGORIES if not c["isthing"]}


def test_gt_masks_cover_the_painted_objects(videos):
    """The pixels of a track's GT mask (away from its darker rim) have the track's colour."""
    for video in videos:
        for tr in video.tracks:
            k = int(np.argmax(tr.visible_areas))
            mask = (video.track_maps[k] == tr.track_id).astype(np.uint8)
            inner = cv2.erode(mask, np.ones((3, 3), np.uint8), iterations=2).astype(bool)
            if inner.sum() < 20:
                continue
            median = np.median(video.frames[k][inner].astype(float), axis=0)
            assert np.abs(median - np.array(tr.rgb)).max() < 30, (video.name, tr.track_id, median, tr.rgb)


def test_manifest_and_vocabulary(dataset, videos):
    manifest = json.loads((dataset / "videos.json").read_text())
    assert manifest["config"] == CFG.to_json()
    assert manifest["mots"]["ignore_class_ids"] == []
    assert (dataset / "vocab.txt").read_text() == vocab_text()
    assert [e["name"] for e in manifest["videos"]] == [v.name for v in videos]
    for entry, video in zip(manifest["videos"], videos):
        gt = _gt_maps(dataset, video.name)
        assert entry["num_frames"] == CFG.frames and (entry["height"], entry["width"]) == CFG.size
        for t in entry["tracks"]:
            frames = [k for k in range(CFG.frames) if (gt[k] == t["track_id"]).any()]
            assert (t["first_frame"], t["last_frame"], t["frames_visible"]) == (frames[0], frames[-1], len(frames))
        for key in ("video", "gt", "frames_dir", "panoptic_dir"):
            assert (dataset / entry[key]).exists()


# --- the video file -------------------------------------------------------------------------------------------------


def test_video_opens_with_pyav_and_the_project_reader(dataset, videos):
    h, w = CFG.size
    video = videos[0]
    path = dataset / "videos" / f"{video.name}.mp4"
    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        assert (stream.codec_context.name, stream.width, stream.height) == ("h264", w, h)
        assert stream.average_rate == CFG.fps
        decoded = np.stack([f.to_ndarray(format="rgb24") for f in container.decode(video=0)])
    assert decoded.shape == (CFG.frames, h, w, 3)

    # Lossy (mostly the yuv420p chroma subsampling, on noisy textures), but the same pictures in the same order and
    # colour channels: smoothed, the frames agree to a grey level or two, each with its own frame.
    def smooth(frames: np.ndarray) -> np.ndarray:
        return np.stack([cv2.GaussianBlur(f.astype(np.float32), (0, 0), 2.0) for f in frames])

    error = np.abs(smooth(decoded) - smooth(video.frames)).mean(axis=(1, 2))  # (T, 3)
    assert error.max() < 3, error.max()
    assert np.abs(decoded.astype(int) - video.frames.astype(int)).mean() < 10
    a, b = smooth(decoded), smooth(video.frames)
    distance = np.abs(a[:, None] - b[None, :]).mean(axis=(2, 3, 4))  # (T decoded, T drawn)
    assert np.array_equal(distance.argmin(axis=1), np.arange(CFG.frames))  # each frame is closest to its own
    items = list(iter_video_frames(path))
    assert [item.id for item, _ in items] == [f"{path.name}#{k:06d}" for k in range(CFG.frames)]
    assert np.abs(smooth(items[5][1][None]) - smooth(video.frames[5][None])).mean() < 3


def test_mpeg4_codec_and_stale_files(tmp_path):
    small = VideoConfig(seed=1, num_videos=2, frames=6, size=(64, 64), codec="mpeg4")
    generate_videos(dataclasses.replace(small, num_videos=3, frames=8), tmp_path)
    generate_videos(small, tmp_path)
    assert sorted(p.name for p in (tmp_path / "videos").iterdir()) == ["000000.mp4", "000001.mp4"]
    assert sorted(p.name for p in (tmp_path / "gt").iterdir()) == ["000000.txt", "000001.txt"]
    assert sorted(p.name for p in (tmp_path / "frames").iterdir()) == ["000000", "000001"]
    assert len(list((tmp_path / "frames" / "000000").iterdir())) == 6
    assert len(list((tmp_path / "panoptic" / "000001").iterdir())) == 6
    with av.open(str(tmp_path / "videos" / "000001.mp4")) as container:
        assert container.streams.video[0].codec_context.name == "mpeg4"
        assert sum(1 for _ in container.decode(video=0)) == 6
