"""Sources: listing specs (stdin, folders, globs, list files, videos) and decoding rules."""

from __future__ import annotations

import io
import os
import struct
import warnings
import zlib
from pathlib import Path

import cv2
import numpy as np
import pytest
from PIL import Image

from masqclip_cli.io import sources
from masqclip_cli.io.sources import (
    DecodedImage,
    SkipItem,
    SkippedItem,
    SourceError,
    SourceItem,
    decode_item,
    iter_items,
    iter_video_frames,
    spec_kind,
)

# --------------------------------------------------------------------------------------------------
# helpers


def _png(path: Path, size=(4, 3), color=(10, 20, 30)) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, color).save(path, format="PNG")
    return path


def _ids(items) -> list[str]:
    return [x.id for x in items]


def _decode(path: Path, item_id: str | None = None) -> np.ndarray:
    out = decode_item(SourceItem(item_id or path.name, path))
    assert isinstance(out, DecodedImage)
    assert out.rgb.dtype == np.uint8 and out.rgb.ndim == 3 and out.rgb.shape[2] == 3
    assert out.rgb.flags.c_contiguous
    return out.rgb


def _skip_reason(path: Path, item_id: str) -> str:
    with pytest.raises(SkipItem) as info:
        decode_item(SourceItem(item_id, path))
    msg = str(info.value)
    assert "\n" not in msg
    assert msg.startswith(f"{item_id}: ")
    assert info.value.item_id == item_id
    return info.value.reason


# --------------------------------------------------------------------------------------------------
# stdin


def test_stdin_list(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    _png(tmp_path / "a.png")
    _png(tmp_path / "sub" / "b.png")
    outside = tmp_path.parent / f"{tmp_path.name}_outside.png"
    _png(outside)
    (tmp_path / "dir.jpg").mkdir()
    text = "\n".join(
        [
            "# a comment",
            "a.png",
            "",
            "   ",
            f"{tmp_path / 'sub' / 'b.png'}",  # absolute under cwd -> relative id
            "./sub/b.png",
            str(outside),  # outside cwd -> the path as given
            "missing.jpg",
            "dir.jpg",
            "  # indented comment",
        ]
    )
    items = list(iter_items("-", stdin=io.StringIO(text + "\n")))
    assert _ids(items) == ["a.png", "sub/b.png", "sub/b.png", outside.as_posix(), "missing.jpg", "dir.jpg"]
    assert all(isinstance(x, SourceItem) for x in items[:4])
    assert items[0].path == Path("a.png") and items[0].frame is None
    assert isinstance(items[4], SkippedItem) and items[4].reason == "no such file or directory"
    assert isinstance(items[5], SkippedItem) and items[5].reason == "is a directory"
    assert str(items[5]) == "dir.jpg: is a directory"
    assert _decode(items[3].path).shape == (3, 4, 3)


def test_stdin_empty_is_an_error():
    with pytest.raises(SourceError, match="no paths on stdin"):
        iter_items("-", stdin=io.StringIO("# nothing\n\n"))


# --------------------------------------------------------------------------------------------------
# directories


@pytest.fixture
def tree(tmp_path):
    root = tmp_path / "shots"
    for rel in ["b.jpg", "a.png", "C.JPEG", "notes.txt", ".hidden.jpg", "sub/d.jpg", "sub/deeper/e.webp",
                ".hid/f.jpg", "z/g.bmp"]:  # fmt: skip
        _png(root / rel)
    return root


def test_directory_flat(tree, monkeypatch):
    monkeypatch.chdir(tree.parent)
    items = list(iter_items("shots"))
    assert _ids(items) == ["C.JPEG", "a.png", "b.jpg"]  # sorted by id, hidden and .txt left out
    assert all(isinstance(x, SourceItem) for x in items)
    assert items[1].path == Path("shots") / "a.png"
    assert spec_kind("shots") == "directory"


def test_directory_recursive(tree):
    items = list(iter_items(str(tree), recursive=True))
    assert _ids(items) == ["C.JPEG", "a.png", "b.jpg", "sub/d.jpg", "sub/deeper/e.webp", "z/g.bmp"]
    assert items[4].path == tree / "sub" / "deeper" / "e.webp"
    # stable: listing again gives the same ids in the same order
    assert _ids(iter_items(str(tree), recursive=True)) == _ids(items)


def test_directory_extension_filter(tree):
    assert _ids(iter_items(str(tree), extensions=["PNG"])) == ["a.png"]
    assert _ids(iter_items(str(tree), recursive=True, extensions=(".jpg", "webp"))) == [
        "b.jpg",
        "sub/d.jpg",
        "sub/deeper/e.webp",
    ]


def test_directory_skipped_entries(tmp_path):
    root = tmp_path / "imgs"
    _png(root / "ok.png")
    (root / "folder.jpg").mkdir()
    os.symlink(root / "gone.png", root / "dangling.png")
    items = list(iter_items(str(root)))
    assert _ids(items) == ["dangling.png", "folder.jpg", "ok.png"]
    assert isinstance(items[0], SkippedItem) and items[0].reason == "dangling symlink"
    assert isinstance(items[1], SkippedItem) and items[1].reason == "is a directory"
    assert isinstance(items[2], SourceItem)


def test_directory_symlink_loop_is_cut(tmp_path):
    root = tmp_path / "r"
    _png(root / "a" / "x.png")
    os.symlink(root, root / "a" / "loop")
    assert _ids(iter_items(str(root), recursive=True)) == ["a/x.png"]


def test_unreadable_subfolder_is_reported(tmp_path, monkeypatch):
    root = tmp_path / "r"
    _png(root / "a.png")
    _png(root / "locked" / "b.png")
    real_scandir = os.scandir

    def scandir(path):
        if Path(path).name == "locked":
            raise PermissionError(13, "Permission denied", str(path))
        return real_scandir(path)

    monkeypatch.setattr(sources.os, "scandir", scandir)
    items = list(iter_items(str(root), recursive=True))
    assert _ids(items) == ["a.png", "locked"]
    assert items[1] == SkippedItem("locked", "cannot list folder: permission denied")
    monkeypatch.setattr(sources.os, "scandir", lambda path: scandir(root / "locked"))
    with pytest.raises(SourceError, match=r"^.*r: cannot list folder: permission denied$"):
        iter_items(str(root))


def test_empty_directory_is_an_error(tmp_path):
    (tmp_path / "e" / "sub").mkdir(parents=True)
    _png(tmp_path / "e" / "sub" / "x.png")
    with pytest.raises(SourceError, match=r"no images in '.*e' \(use recursive"):
        iter_items(str(tmp_path / "e"))


# --------------------------------------------------------------------------------------------------
# globs, lists, single files, missing specs


def test_glob(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    for i in (3, 1, 2):
        _png(tmp_path / "frames" / f"f{i:03d}.png")
    _png(tmp_path / "frames" / "sub" / "f100.png")
    (tmp_path / "frames" / "notes.txt").write_text("x")
    assert spec_kind("frames/*.png") == "glob"
    assert _ids(iter_items("frames/*.png")) == ["f001.png", "f002.png", "f003.png"]
    assert _ids(iter_items("./frames/f00[12].png")) == ["f001.png", "f002.png"]
    assert _ids(iter_items("frames/*")) == ["f001.png", "f002.png", "f003.png"]  # image extensions only
    assert _ids(iter_items("frames/**/*.png")) == ["f001.png", "f002.png", "f003.png", "sub/f100.png"]
    assert _ids(iter_items("*/f001.png")) == ["frames/f001.png"]
    items = list(iter_items(str(tmp_path / "frames" / "*.png")))
    assert items[0].path == tmp_path / "frames" / "f001.png"
    with pytest.raises(SourceError, match=r"^no images match 'frames/\*\.jpg'$"):
        iter_items("frames/*.jpg")


def test_list_file_relative_entries(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    _png(tmp_path / "data" / "a.png")
    _png(tmp_path / "data" / "sub" / "b.png")
    _png(tmp_path / "top.png")
    lst = tmp_path / "lists" / "set.lst"
    lst.parent.mkdir()
    lst.write_text(f"# my set\n../data/a.png\n\n../data/sub/b.png\n{tmp_path / 'top.png'}\n../data/missing.png\n")
    assert spec_kind("lists/set.lst") == "list"
    items = list(iter_items("lists/set.lst"))
    assert _ids(items) == ["data/a.png", "data/sub/b.png", "top.png", "data/missing.png"]
    assert items[0].path == Path("lists/../data/a.png")
    assert _decode(items[1].path).shape == (3, 4, 3)
    assert isinstance(items[3], SkippedItem) and items[3].reason == "no such file or directory"
    # a .txt list works too; an empty one is an error naming it
    (tmp_path / "empty.txt").write_text("# nothing\n")
    with pytest.raises(SourceError, match="empty.txt"):
        iter_items("empty.txt")


def test_single_file(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    _png(tmp_path / "pics" / "a.png")
    _png(tmp_path / "odd[1].png")
    assert spec_kind("pics/a.png") == "file"
    # a single file's id is its file name, wherever it is given from
    assert list(iter_items("pics/a.png")) == [SourceItem("a.png", Path("pics/a.png"))]
    assert _ids(iter_items(str(tmp_path / "pics" / "a.png"))) == ["a.png"]
    assert _ids(iter_items("odd[1].png")) == ["odd[1].png"]  # an existing file wins over glob reading
    monkeypatch.chdir(tmp_path / "pics")
    assert _ids(iter_items("../odd[1].png")) == ["odd[1].png"]


def test_missing_spec(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SourceError, match=r"^x: no such file or directory$"):
        iter_items("x")
    os.symlink("nowhere.png", "link.png")
    with pytest.raises(SourceError, match=r"^link.png: dangling symlink$"):
        iter_items("link.png")
    with pytest.raises(SourceError, match="every"):
        iter_items(".", every=0)
    with pytest.raises(SourceError, match="end"):
        iter_items(".", start=2, end=1)


# --------------------------------------------------------------------------------------------------
# video

FPS = 4.0


def _frame_color(i: int) -> tuple[int, int, int]:
    """RGB of frame i."""
    return (i * 20, 255 - i * 20, (i * 67) % 256)


@pytest.fixture
def video(tmp_path) -> Path:
    path = tmp_path / "clip.avi"
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"MJPG"), FPS, (32, 24))
    assert writer.isOpened()
    for i in range(12):
        frame = np.zeros((24, 32, 3), np.uint8)
        frame[:] = _frame_color(i)[::-1]  # BGR
        writer.write(frame)
    writer.release()
    return path


def _assert_color(rgb: np.ndarray, i: int) -> None:
    assert rgb.shape == (24, 32, 3)
    assert np.abs(rgb.reshape(-1, 3).mean(0) - np.array(_frame_color(i))).max() < 8


def test_video_listing(video, monkeypatch):
    monkeypatch.chdir(video.parent)
    assert spec_kind("clip.avi") == "video"
    items = list(iter_items("clip.avi"))
    assert _ids(items) == [f"clip.avi#{i:06d}" for i in range(12)]
    assert items[5] == SourceItem("clip.avi#000005", Path("clip.avi"), 5)
    assert _ids(iter_items("clip.avi", every=3)) == ["clip.avi#000000", "clip.avi#000003", "clip.avi#000006",
                                                     "clip.avi#000009"]  # fmt: skip
    # start inclusive, end exclusive: 1 s .. 2 s at 4 fps -> frames 4..7
    assert [x.frame for x in iter_items("clip.avi", start=1, end=2)] == [4, 5, 6, 7]
    assert [x.frame for x in iter_items("clip.avi", start=1.1, every=3)] == [5, 8, 11]
    with pytest.raises(SourceError, match=r"no frames in 'clip.avi' between 5 s"):
        iter_items("clip.avi", start=5)


def test_video_decoding(video, monkeypatch):
    monkeypatch.chdir(video.parent)
    frames = list(iter_video_frames("clip.avi", every=3))
    assert [item.id for item, _ in frames] == _ids(iter_items("clip.avi", every=3))
    for item, rgb in frames:
        _assert_color(rgb, item.frame)
    frames = list(iter_video_frames(video, start=1, end=2))
    assert [item.frame for item, _ in frames] == [4, 5, 6, 7]
    assert frames[0][0].id == "clip.avi#000004"
    for item, rgb in frames:
        _assert_color(rgb, item.frame)
    # random access through decode_item (seeks)
    _assert_color(decode_item(SourceItem("clip.avi#000010", video, 10)).rgb, 10)
    with pytest.raises(SkipItem, match=r"^clip.avi#000040: cannot read frame 40$"):
        decode_item(SourceItem("clip.avi#000040", video, 40))


def test_video_seeking_start(video, monkeypatch):
    monkeypatch.setattr(sources, "_SEEK_MIN_FRAMES", 0)
    frames = list(iter_video_frames(video, every=2, start=1.5))
    assert [item.frame for item, _ in frames] == [6, 8, 10]
    for item, rgb in frames:
        _assert_color(rgb, item.frame)


def test_video_not_a_video(tmp_path):
    bad = tmp_path / "bad.mp4"
    bad.write_bytes(b"not a video at all")
    with pytest.raises(SourceError, match="bad.mp4: cannot open video"):
        iter_items(str(bad))
    with pytest.raises(SourceError, match="bad.mp4: cannot open video"):
        iter_video_frames(bad)


# --------------------------------------------------------------------------------------------------
# decoding rules


def test_png_named_jpg(tmp_path):
    path = _png(tmp_path / "really_a.jpg", size=(5, 2), color=(1, 2, 3))
    rgb = _decode(path)
    assert rgb.shape == (2, 5, 3) and (rgb == [1, 2, 3]).all()


def test_exif_orientation_6(tmp_path):
    # stored 64x32 in quadrants; orientation 6 = display rotated 90 degrees clockwise
    red, green, blue, white = (255, 0, 0), (0, 255, 0), (0, 0, 255), (255, 255, 255)
    stored = np.zeros((32, 64, 3), np.uint8)
    stored[:16, :32], stored[:16, 32:], stored[16:, :32], stored[16:, 32:] = red, green, blue, white
    im = Image.fromarray(stored)
    exif = im.getexif()
    exif[0x0112] = 6
    path = tmp_path / "rot.jpg"
    im.save(path, quality=98, exif=exif)
    rgb = _decode(path).astype(int)
    assert rgb.shape == (64, 32, 3)  # size after rotation
    quads = {"top-left": rgb[8, 8], "top-right": rgb[8, 24], "bottom-left": rgb[56, 8], "bottom-right": rgb[56, 24]}
    expected = {"top-left": blue, "top-right": red, "bottom-left": white, "bottom-right": green}
    for where, color in expected.items():
        assert np.abs(quads[where] - np.array(color)).max() < 30, where


def test_mode_L(tmp_path):
    path = tmp_path / "gray.png"
    Image.fromarray(np.array([[0, 100, 255]], np.uint8)).save(path)
    assert Image.open(path).mode == "L"
    rgb = _decode(path)
    assert rgb.tolist() == [[[0, 0, 0], [100, 100, 100], [255, 255, 255]]]


def test_mode_P(tmp_path):
    im = Image.new("P", (2, 1))
    im.putpalette([255, 0, 0, 0, 0, 255] + [0] * 762)
    im.putdata([0, 1])
    path = tmp_path / "pal.png"
    im.save(path)
    assert _decode(path).tolist() == [[[255, 0, 0], [0, 0, 255]]]
    path_t = tmp_path / "pal_t.png"
    im.save(path_t, transparency=0)  # palette transparency: alpha dropped, colour kept
    assert Image.open(path_t).mode == "P"
    assert _decode(path_t).tolist() == [[[255, 0, 0], [0, 0, 255]]]


def test_mode_RGBA_drops_alpha(tmp_path):
    arr = np.array([[[10, 20, 30, 255], [40, 50, 60, 0], [70, 80, 90, 128]]], np.uint8)
    path = tmp_path / "rgba.png"
    Image.fromarray(arr, "RGBA").save(path)
    assert _decode(path).tolist() == [[[10, 20, 30], [40, 50, 60], [70, 80, 90]]]
    path_la = tmp_path / "la.png"
    Image.fromarray(np.array([[[7, 0], [200, 255]]], np.uint8), "LA").save(path_la)
    assert _decode(path_la).tolist() == [[[7, 7, 7], [200, 200, 200]]]


def test_mode_CMYK(tmp_path):
    path = tmp_path / "cmyk.jpg"
    Image.new("CMYK", (8, 8), (0, 255, 255, 0)).save(path, quality=100)  # pure red
    assert Image.open(path).mode == "CMYK"
    rgb = _decode(path).astype(int)
    assert np.abs(rgb[4, 4] - [255, 0, 0]).max() < 8


def test_16_bit(tmp_path):
    values = np.array([[0, 257, 65535, 128, 129, 32896]], np.uint16)
    path = tmp_path / "deep.png"
    Image.fromarray(values).save(path)
    assert Image.open(path).mode == "I;16"
    rgb = _decode(path)
    assert rgb[0, :, 0].tolist() == [0, 1, 255, 0, 1, 128]
    assert (rgb[..., 0] == rgb[..., 2]).all()
    # a 16-bit PGM opens as mode I: same scaling
    pgm = tmp_path / "deep.pgm"
    pgm.write_bytes(b"P5\n6 1\n65535\n" + values.astype(">u2").tobytes())
    assert Image.open(pgm).mode == "I"
    assert _decode(pgm)[0, :, 1].tolist() == [0, 1, 255, 0, 1, 128]


def test_float_image(tmp_path):
    path = tmp_path / "f.tif"
    Image.fromarray(np.array([[0.0, 0.5, 1.0]], np.float32)).save(path)
    assert Image.open(path).mode == "F"
    assert _decode(path)[0, :, 0].tolist() == [0, 128, 255]


def test_multiframe_gif_first_frame(tmp_path):
    path = tmp_path / "anim.gif"
    frames = [Image.new("RGB", (4, 4), c) for c in [(255, 0, 0), (0, 255, 0), (0, 0, 255)]]
    frames[0].save(path, save_all=True, append_images=frames[1:])
    assert Image.open(path).n_frames == 3
    assert (_decode(path) == [255, 0, 0]).all()


def test_tiny_and_thin_images(tmp_path):
    assert _decode(_png(tmp_path / "one.png", size=(1, 1), color=(9, 8, 7))).tolist() == [[[9, 8, 7]]]
    assert _decode(_png(tmp_path / "thin.png", size=(4000, 12))).shape == (12, 4000, 3)


def test_truncated_jpeg(tmp_path):
    rng = np.random.default_rng(0)
    full = tmp_path / "full.jpg"
    Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(full, quality=95)
    data = full.read_bytes()
    cut = tmp_path / "shots" / "a.jpg"
    cut.parent.mkdir()
    cut.write_bytes(data[: len(data) // 2])
    assert _skip_reason(cut, "shots/a.jpg") == "truncated image file"
    assert str(pytest.raises(SkipItem, decode_item, SourceItem("shots/a.jpg", cut)).value) == (
        "shots/a.jpg: truncated image file"
    )


def test_zero_byte_file(tmp_path):
    path = tmp_path / "empty.jpg"
    path.touch()
    assert _skip_reason(path, "empty.jpg") == "empty file (0 bytes)"


def test_text_named_png(tmp_path):
    path = tmp_path / "fake.png"
    path.write_text("hello, I am text\nwith two lines\n")
    assert _skip_reason(path, "fake.png") == "not a recognised image format"


@pytest.mark.skipif(not hasattr(os, "geteuid") or os.geteuid() == 0, reason="root reads any file")
def test_unreadable_file(tmp_path):
    path = _png(tmp_path / "locked.png")
    path.chmod(0)
    try:
        assert _skip_reason(path, "locked.png") == "permission denied"
    finally:
        path.chmod(0o644)


def test_unreadable_file_simulated(tmp_path, monkeypatch):
    """Same path as a chmod 000 file, but also runs as root."""
    path = _png(tmp_path / "locked.png")

    def deny(*args, **kwargs):
        raise PermissionError(13, "Permission denied", str(path))

    monkeypatch.setattr(sources.Image, "open", deny)
    assert _skip_reason(path, "locked.png") == "permission denied"


def test_dangling_symlink(tmp_path):
    link = tmp_path / "link.jpg"
    os.symlink(tmp_path / "nowhere.jpg", link)
    assert _skip_reason(link, "link.jpg") == "dangling symlink"


def test_directory_named_like_image(tmp_path):
    folder = tmp_path / "x.jpg"
    folder.mkdir()
    assert _skip_reason(folder, "x.jpg") == "is a directory"


def test_skip_item_forms_and_pickling():
    import pickle

    two = SkipItem("a/b.jpg", "truncated\nimage file")
    assert (
        str(two) == "a/b.jpg: truncated image file"
        and two.item_id == "a/b.jpg"
        and two.reason == "truncated image file"
    )
    one = SkipItem("a/b.jpg: frame could not be read")
    assert str(one) == "a/b.jpg: frame could not be read" and one.item_id is None
    for exc in (one, two):
        back = pickle.loads(pickle.dumps(exc))
        assert type(back) is SkipItem and str(back) == str(exc) and back.item_id == exc.item_id
    item = SourceItem("v.mp4#000003", Path("v.mp4"), 3)
    assert pickle.loads(pickle.dumps(item)) == item
    assert pickle.loads(pickle.dumps(SkippedItem("x", "y"))) == SkippedItem("x", "y")


def _png_header_only(path: Path, width: int, height: int) -> Path:
    """A PNG claiming width x height with (almost) no pixel data: a decompression bomb's header."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0")) +
                     chunk(b"IEND", b""))  # fmt: skip
    return path


def test_decompression_bomb_is_skipped(tmp_path):
    before = Image.MAX_IMAGE_PIXELS
    bomb = _png_header_only(tmp_path / "bomb.png", 50_000, 40_000)  # 2e9 > 40k x 40k
    with warnings.catch_warnings(record=True) as log:
        warnings.simplefilter("always")
        reason = _skip_reason(bomb, "bomb.png")
        # between PIL's default limit and ours: the header is accepted (then the missing data fails)
        big = _png_header_only(tmp_path / "big.png", 14_000, 14_000)  # 196 Mpx: PIL alone refuses it
        assert _skip_reason(big, "big.png") == "truncated image file"
    assert reason.startswith("image too large (50000x40000 pixels")
    assert Image.MAX_IMAGE_PIXELS == before  # PIL's limit is only switched off while decoding
    assert not [w for w in log if issubclass(w.category, Image.DecompressionBombWarning)]


def test_lowered_limit(tmp_path, monkeypatch):
    monkeypatch.setattr(sources, "MAX_IMAGE_PIXELS", 100)
    assert _skip_reason(_png(tmp_path / "a.png", size=(11, 10)), "a.png") == "image too large (11x10 pixels, limit 100)"
    assert _decode(_png(tmp_path / "b.png", size=(10, 10))).shape == (10, 10, 3)
