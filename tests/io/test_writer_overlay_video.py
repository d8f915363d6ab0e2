"""The ``overlay`` writer on tracked sequences: one MP4 per sequence, read back with PyAV (and OpenCV, and ffprobe
when installed): frame count, size (padded to even), codec, rate; the colour of a track is the same in every frame
(exactly in the per-frame images, up to codec loss in the video) and does not follow the per-frame class; a run
written by two writer instances (a restart) gives the same video bytes; non-sequence items are unchanged."""

from __future__ import annotations

import json
import shutil
import subprocess
from fractions import Fraction

import cv2
import numpy as np
import pytest
from PIL import Image

from masqclip_cli.io.writers import ItemInfo
from masqclip_cli.io.writers import overlay as overlay_module
from masqclip_cli.io.writers.overlay import OverlayWriter, encode_video, track_color, video_codec
from masqclip_cli.structures import Segment, Segmentation
from masqclip_cli.structures.masks import mask_bbox
from masqclip_cli.vocab import VocabClass, Vocabulary

av = pytest.importorskip("av")

COLORS = [(220, 20, 60), (0, 0, 142), (128, 64, 128)]
VOCAB = Vocabulary(
    [VocabClass("person", isthing=True, color=COLORS[0]), VocabClass("car", isthing=True, color=COLORS[1]),
     VocabClass("road", isthing=False, color=COLORS[2])]
)
H, W = 91, 121  # odd on purpose: the video is 92 x 122
BACKGROUND = 128
SEQ = "clip.mp4"
N_FRAMES = 5


def rect(top: int, left: int, h: int = 34, w: int = 30) -> np.ndarray:
    m = np.zeros((H, W), bool)
    m[top : top + h, left : left + w] = True
    return m


def frame_objects(f: int) -> list[tuple[int, int, float, np.ndarray]]:
    """(track id, class index, score, mask) of frame ``f``: track 3 moves right and is a car on frame 2 (a person
    elsewhere), track 7 moves down, track 8 appears on frame 3."""
    objects = [(3, 1 if f == 2 else 0, 0.9, rect(5, 4 + 4 * f)), (7, 1, 0.8, rect(45 + 2 * f, 70))]
    if f >= 3:
        objects.append((8, 0, 0.7, rect(50, 5, 34, 28)))
    return objects


def corner(mask: np.ndarray) -> tuple[int, int]:
    """A pixel inside the mask near its top-left corner: away from the outline (and the chroma blocks it touches)
    and above the label, which sits in the middle."""
    rows, cols = np.nonzero(mask)
    return int(rows.min()) + 5, int(cols.min()) + 8


def make_seg(f: int) -> Segmentation:
    rows = [Segment(t, c, s, True, int(m.sum()), mask_bbox(m), mask=m) for t, c, s, m in frame_objects(f)]
    return Segmentation((H, W), instances=rows, vocab=VOCAB)


def frame_info(f: int, *, source: str | None = None, number: int | None = None, seq: str = SEQ) -> ItemInfo:
    number = f if number is None else number
    return ItemInfo(f"{seq}#{number:06d}", seq, W, H, source=source, sequence=seq, frame=f)


def background() -> np.ndarray:
    return np.full((H, W, 3), BACKGROUND, np.uint8)


def write_frames(writer: OverlayWriter, frames, **info_kw) -> list[tuple[ItemInfo, dict | None]]:
    records = []
    for f in frames:
        info = frame_info(f, **info_kw)
        record = writer.write_item(info, make_seg(f), background())
        records.append((info, json.loads(json.dumps(record))))  # the engine keeps records as JSON
    return records


def decode(path) -> tuple[list[np.ndarray], dict]:
    """Every frame of the video as RGB, and its stream's properties, with PyAV."""
    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        props = {
            "codec": stream.codec_context.name,
            "width": stream.codec_context.width,
            "height": stream.codec_context.height,
            "pix_fmt": stream.codec_context.pix_fmt,
            "rate": stream.average_rate,
        }
        frames = [frame.to_ndarray(format="rgb24") for frame in container.decode(video=0)]
    return frames, props


def blend(color: tuple[int, int, int], alpha: float = 0.5) -> np.ndarray:
    """The colour a mask pixel gets over the uniform background (what render_overlay computes, by hand)."""
    return np.rint(BACKGROUND * (1 - alpha) + np.asarray(color, float) * alpha).astype(np.uint8)


# --- the video ------------------------------------------------------------------------------------------------------


def test_one_video_per_sequence_read_back_with_pyav_and_opencv(tmp_path):
    writer = OverlayWriter(tmp_path, VOCAB)
    records = write_frames(writer, range(N_FRAMES))
    assert all(r == {"fps": None} for _, r in records)
    written = writer.finalize(records)
    video = tmp_path / "overlay" / "clip.mp4.mp4"
    assert written == [video]
    frames, props = decode(video)
    assert len(frames) == N_FRAMES
    assert (props["width"], props["height"]) == (W + 1, H + 1)  # padded to even
    assert all(f.shape == (H + 1, W + 1, 3) for f in frames)
    assert props["codec"] == ("h264" if "libx264" in av.codecs_available else "mpeg4")
    assert props["pix_fmt"] == "yuv420p"
    assert props["rate"] == Fraction(25)  # no source video: the default rate
    # the padding (last column and row) is black
    assert max(int(f[:, W:].max()) for f in frames) <= 16 and max(int(f[H:, :].max()) for f in frames) <= 16
    # OpenCV, an independent demuxer/decoder, agrees on count and size
    capture = cv2.VideoCapture(str(video))
    count = 0
    while True:
        ok, frame = capture.read()
        if not ok:
            break
        assert frame.shape == (H + 1, W + 1, 3)
        count += 1
    capture.release()
    assert count == N_FRAMES
    # the frames are in the run's state folder, not under out/overlay
    assert sorted(p.name for p in (tmp_path / "overlay").iterdir()) == ["clip.mp4.mp4"]
    hidden = tmp_path / ".masqclip" / "overlay-frames" / "clip.mp4.frames"
    assert sorted(p.name for p in hidden.iterdir()) == [f"{f:06d}.jpg" for f in range(N_FRAMES)]
    assert writer.item_files(frame_info(2)) == [hidden / "000002.jpg"]
    assert not list((tmp_path / ".masqclip" / "overlay-encode").glob("*.mp4"))  # the encoder's file is gone


@pytest.mark.skipif(shutil.which("ffprobe") is None, reason="ffprobe is not installed")
def test_ffprobe_reads_the_video(tmp_path):
    writer = OverlayWriter(tmp_path, VOCAB)
    writer.finalize(write_frames(writer, range(N_FRAMES)))
    out = subprocess.run(
        ["ffprobe", "-v", "error", "-count_frames", "-select_streams", "v:0", "-show_entries",
         "stream=width,height,nb_read_frames,pix_fmt", "-of", "json", str(tmp_path / "overlay" / "clip.mp4.mp4")],
        check=True, capture_output=True, text=True,
    )
    (stream,) = json.loads(out.stdout)["streams"]
    assert (stream["width"], stream["height"], int(stream["nb_read_frames"])) == (W + 1, H + 1, N_FRAMES)
    assert stream["pix_fmt"] == "yuv420p"


def test_track_colour_is_stable_across_frames_and_ignores_the_frame_class(tmp_path):
    writer = OverlayWriter(tmp_path, VOCAB, overlay_format="png", overlay_frames=True)
    records = write_frames(writer, range(N_FRAMES))
    writer.finalize(records)
    frames, _ = decode(tmp_path / "overlay" / "clip.mp4.mp4")
    seen: dict[int, set[tuple[int, ...]]] = {}
    for f in range(N_FRAMES):
        png = tmp_path / "overlay" / SEQ / f"{f:06d}.png"
        assert writer.item_files(frame_info(f)) == [png]
        drawn = np.asarray(Image.open(png).convert("RGB"))
        assert drawn.shape == (H, W, 3)
        for track, _, _, mask in frame_objects(f):
            y, x = corner(mask)
            pixel = drawn[y, x]
            seen.setdefault(track, set()).add(tuple(int(v) for v in pixel))
            assert np.array_equal(pixel, blend(track_color(track))), (f, track)
            # the video, up to codec loss (3 x 3 patch mean): near this track's colour, nearer than to any other's
            patch = frames[f][y - 1 : y + 2, x - 1 : x + 2].reshape(-1, 3).astype(float).mean(axis=0)
            assert np.abs(patch - pixel.astype(float)).max() <= 25, (f, track, patch, pixel)
            distances = {t: np.linalg.norm(patch - blend(track_color(t))) for t in (3, 7, 8)}
            assert min(distances, key=distances.get) == track, (f, track, distances)
    assert all(len(colours) == 1 for colours in seen.values())  # one colour per track, every frame
    assert len({next(iter(c)) for c in seen.values()}) == 3  # three tracks, three colours
    # track 3 is a car on frame 2 and a person elsewhere: its colour is neither class colour
    assert next(iter(seen[3])) not in {tuple(blend(c)) for c in COLORS}


def test_labels_carry_the_track_id_and_the_frame_class(tmp_path):
    writer = OverlayWriter(tmp_path, VOCAB)
    texts = [r.text for r in writer.regions(make_seg(2), tracked=True)]
    assert sorted(texts) == ["#3 car 0.90", "#7 car 0.80"]
    assert sorted(r.text for r in writer.regions(make_seg(3), tracked=True)) == [
        "#3 person 0.90", "#7 car 0.80", "#8 person 0.70"
    ]
    # untracked: class colours and names, as for images
    plain = writer.regions(make_seg(3))
    assert sorted(r.text for r in plain) == ["car 0.80", "person 0.70", "person 0.90"]
    assert {r.color for r in plain} == {COLORS[0], COLORS[1]}


def test_stuff_keeps_its_class_colour_in_a_sequence(tmp_path):
    pan = np.zeros((H, W), np.int32)
    pan[:, :] = 9  # stuff: one id per class for the whole sequence
    pan[rect(5, 4)] = 3
    segments = [Segment(3, 0, 0.9, True, 0, (0, 0, 0, 0)), Segment(9, 2, 1.0, False, 0, (0, 0, 0, 0))]
    seg = Segmentation((H, W), panoptic=pan, segments=segments, vocab=VOCAB)
    writer = OverlayWriter(tmp_path, VOCAB)
    regions = {r.text: r.color for r in writer.regions(seg, tracked=True)}
    assert regions == {"road": COLORS[2], "#3 person 0.90": track_color(3)}


def test_palette_is_deterministic_and_neighbouring_ids_differ():
    colours = [track_color(k) for k in range(1, 301)]
    assert colours == [track_color(k) for k in range(1, 301)]
    assert all(0 <= c <= 255 for colour in colours for c in colour)
    distances = [np.linalg.norm(np.subtract(a, b, dtype=float)) for a, b in zip(colours, colours[1:])]
    assert min(distances) > 60, min(distances)
    assert len(set(colours[:50])) == 50


# --- resume, re-runs, gaps ------------------------------------------------------------------------------------------


def test_a_restarted_run_gives_the_same_video_bytes(tmp_path):
    single = OverlayWriter(tmp_path / "one", VOCAB)
    single.finalize(write_frames(single, range(N_FRAMES)))
    # killed after frame 2: a new writer (no memory of the first) writes the rest and finalizes over all records
    first = OverlayWriter(tmp_path / "two", VOCAB)
    records = write_frames(first, range(3))
    second = OverlayWriter(tmp_path / "two", VOCAB)
    records += write_frames(second, range(3, N_FRAMES))
    second.finalize(records)
    a = (tmp_path / "one" / "overlay" / "clip.mp4.mp4").read_bytes()
    b = (tmp_path / "two" / "overlay" / "clip.mp4.mp4").read_bytes()
    assert a == b


def test_finalize_again_skips_an_up_to_date_video_and_redoes_a_changed_one(tmp_path):
    writer = OverlayWriter(tmp_path, VOCAB)
    records = write_frames(writer, range(N_FRAMES))
    (video,) = writer.finalize(records)
    before = (video.read_bytes(), video.stat().st_mtime_ns)
    assert OverlayWriter(tmp_path, VOCAB).finalize(records) == [video]
    assert (video.read_bytes(), video.stat().st_mtime_ns) == before  # not encoded again, not rewritten
    # a frame drawn anew with other content (say another alpha): the video is made again
    other = OverlayWriter(tmp_path, VOCAB, overlay_alpha=1.0)
    info = frame_info(1)
    other.write_item(info, make_seg(1), background())
    other.finalize(records)
    frames, _ = decode(video)
    y, x = corner(frame_objects(1)[0][3])
    assert np.abs(frames[1][y, x].astype(int) - np.asarray(track_color(3))).max() <= 16  # alpha 1: the pure colour
    assert video.read_bytes() != before[0]


def test_a_failed_frame_repeats_the_previous_one(tmp_path):
    writer = OverlayWriter(tmp_path, VOCAB)
    records = write_frames(writer, [0, 1, 3, 4])
    records.insert(2, (frame_info(2), None))  # the item failed: no record, no image
    writer.finalize(records)
    frames, props = decode(tmp_path / "overlay" / "clip.mp4.mp4")
    assert len(frames) == N_FRAMES and props["rate"] == Fraction(25)
    assert np.abs(frames[2].astype(int) - frames[1].astype(int)).mean() < 1.0
    assert np.abs(frames[3].astype(int) - frames[1].astype(int)).mean() > 1.0  # frame 3 moved on


def test_a_missing_frame_image_is_a_clear_error(tmp_path):
    writer = OverlayWriter(tmp_path, VOCAB)
    records = write_frames(writer, range(3))
    missing = writer.frame_path(frame_info(1))
    missing.unlink()
    with pytest.raises(ValueError, match=r"clip\.mp4.*000001\.jpg.*missing"):
        writer.finalize(records)


def test_frame_rate_from_the_source_video_and_every(tmp_path):
    source = tmp_path / "src.mp4"
    out = cv2.VideoWriter(str(source), cv2.VideoWriter_fourcc(*"mp4v"), 10.0, (32, 24))
    for _ in range(3):
        out.write(np.zeros((24, 32, 3), np.uint8))
    out.release()
    every1 = OverlayWriter(tmp_path / "a", VOCAB)
    records = write_frames(every1, range(3), source=str(source))
    assert [r["fps"] for _, r in records] == [10.0, 10.0, 10.0]
    every1.finalize(records)
    assert decode(tmp_path / "a" / "overlay" / "clip.mp4.mp4")[1]["rate"] == Fraction(10)
    # --every 2: the items are source frames 0, 2, 4, shown at 5 per second
    every2 = OverlayWriter(tmp_path / "b", VOCAB)
    records = []
    for f in range(3):
        info = frame_info(f, source=str(source), number=2 * f)
        records.append((info, every2.write_item(info, make_seg(f), background())))
    every2.finalize(records)
    frames, props = decode(tmp_path / "b" / "overlay" / "clip.mp4.mp4")
    assert props["rate"] == Fraction(5) and len(frames) == 3


def test_images_keep_their_files_and_sequences_are_separate(tmp_path):
    writer = OverlayWriter(tmp_path, VOCAB)
    image = ItemInfo("a.jpg", "a.jpg", W, H)
    assert writer.write_item(image, make_seg(0), background()) is None
    assert writer.item_files(image) == [tmp_path / "overlay" / "a.jpg.jpg"]
    records = [(image, None)]
    records += write_frames(writer, range(2), seq="sub/b.mp4")
    records += write_frames(writer, range(3))
    written = writer.finalize(sorted(records, key=lambda r: r[0].id))
    assert written == [tmp_path / "overlay" / "clip.mp4.mp4", tmp_path / "overlay" / "sub" / "b.mp4.mp4"]
    assert [len(decode(p)[0]) for p in written] == [3, 2]
    assert (tmp_path / "overlay" / "a.jpg.jpg").is_file()


def test_bad_options_and_items(tmp_path):
    with pytest.raises(ValueError, match="overlay_frames"):
        OverlayWriter(tmp_path, VOCAB, overlay_frames="yes")
    writer = OverlayWriter(tmp_path, VOCAB)
    with pytest.raises(ValueError, match="frame number"):
        writer.write_item(ItemInfo("x.mp4#000001", "x.mp4", W, H, sequence="x.mp4"), make_seg(0), background())


# --- encoders -------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("codec", ["mpeg4", "mp4v"])
def test_the_fallback_encoders_write_playable_videos(tmp_path, codec):
    rng = np.random.default_rng(0)
    frames = [np.repeat(rng.integers(0, 255, (1, 1, 3), dtype=np.uint8), 64 * 48, axis=0).reshape(48, 64, 3)
              for _ in range(4)]
    path = tmp_path / f"{codec}.mp4"
    assert encode_video(path, iter(frames), (48, 64), Fraction(30000, 1001), codec) == codec
    decoded, props = decode(path)
    assert len(decoded) == 4 and (props["width"], props["height"]) == (64, 48)
    for got, want in zip(decoded, frames):
        assert np.abs(got.astype(int).mean(axis=(0, 1)) - want[0, 0].astype(int)).max() <= 12
    with pytest.raises(ValueError, match="even"):
        encode_video(tmp_path / "odd.mp4", iter(frames), (47, 64), Fraction(25), codec)
    with pytest.raises(ValueError, match=r"frame 1 is uint8 \(48, 62, 3\)"):
        encode_video(tmp_path / "bad.mp4", iter([frames[0], frames[1][:, :62]]), (48, 64), Fraction(25), codec)


def test_without_pyav_the_writer_uses_opencv(tmp_path, monkeypatch):
    monkeypatch.setattr(overlay_module, "_pyav", lambda: None)
    assert video_codec() == "mp4v"
    writer = OverlayWriter(tmp_path, VOCAB)
    writer.finalize(write_frames(writer, range(3)))
    monkeypatch.undo()
    frames, props = decode(tmp_path / "overlay" / "clip.mp4.mp4")
    assert len(frames) == 3 and (props["width"], props["height"]) == (W + 1, H + 1)
    assert props["codec"] == "mpeg4"
