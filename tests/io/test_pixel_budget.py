"""The pixel budget (``max_pixels``, ``--max-pixels``), checked on the image header before decoding, and a
bounded fuzz test of the decoder: :func:`decode_item` returns an image or raises :class:`SkipItem`, nothing else."""

from __future__ import annotations

import io
import os
import re
import struct
import subprocess
import sys
import time
import warnings
import zlib
from pathlib import Path
from unittest import mock

import cv2
import numpy as np
import pytest
from PIL import Image, ImageFile

import masqclip_cli
from masqclip_cli.io import sources
from masqclip_cli.io.sources import (
    DEFAULT_MAX_PIXELS,
    DecodedImage,
    SkipItem,
    SourceError,
    SourceItem,
    decode_item,
    iter_items,
    iter_video_frames,
)

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

# --------------------------------------------------------------------------------------------------
# helpers


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def _black_png_bytes(width: int, height: int) -> bytes:
    """A complete, valid 1-bit greyscale PNG of ``width x height`` black pixels, streamed row by row through
    zlib (a 20000x20000 one is 48 KB and takes a fraction of a second to build)."""
    compressor = zlib.compressobj(9)
    row = bytes(1 + (width + 7) // 8)  # filter byte 0 + the packed bits of one row, all 0
    idat = b"".join([compressor.compress(row) for _ in range(height)] + [compressor.flush()])
    ihdr = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)  # bit depth 1, greyscale
    return b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", ihdr) + _chunk(b"IDAT", idat) + _chunk(b"IEND", b"")


def _header_only_png(path: Path, width: int, height: int) -> Path:
    """A PNG whose IHDR claims ``width x height`` (8-bit grey) with almost no pixel data."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", ihdr) + _chunk(b"IDAT", zlib.compress(b"\0")) +
                     _chunk(b"IEND", b""))  # fmt: skip
    return path


def _png(path: Path, size: tuple[int, int], color=(10, 20, 30)) -> Path:
    Image.new("RGB", size, color).save(path, format="PNG")
    return path


def _skip(path: Path, item_id: str, max_pixels: int | None) -> SkipItem:
    with pytest.raises(SkipItem) as info:
        decode_item(SourceItem(item_id, path), max_pixels=max_pixels)
    assert "\n" not in str(info.value) and str(info.value).startswith(f"{item_id}: ")
    assert info.value.item_id == item_id
    return info.value


@pytest.fixture(scope="module")
def huge_png(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("huge") / "huge.png"
    path.write_bytes(_black_png_bytes(20_000, 20_000))
    return path


# --------------------------------------------------------------------------------------------------
# the budget on images


def test_black_png_generator_makes_valid_images(tmp_path, huge_png, monkeypatch):
    small = tmp_path / "small.png"
    small.write_bytes(_black_png_bytes(37, 5))
    out = decode_item(SourceItem("small.png", small))
    assert out.rgb.shape == (5, 37, 3) and not out.rgb.any()
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", None)  # PIL refuses to open it otherwise
    with Image.open(huge_png) as im:  # the 20000x20000 file is a well-formed PNG (chunk CRCs), not truncated
        assert im.size == (20_000, 20_000) and im.mode == "1"
        im.verify()
    assert huge_png.stat().st_size < 200_000


def test_huge_png_is_skipped_from_its_header_without_decoding(huge_png):
    loads: list[object] = []
    real_load = ImageFile.ImageFile.load

    def counting_load(self):
        loads.append(self)
        return real_load(self)

    with mock.patch.object(ImageFile.ImageFile, "load", counting_load):
        start = time.perf_counter()
        exc = _skip(huge_png, "shots/huge.png", 64_000_000)
        elapsed = time.perf_counter() - start
        # the spy works: a small PNG does go through ImageFile.load
        decode_item(SourceItem("small", _png(huge_png.parent / "small.png", (3, 2))), max_pixels=64_000_000)
    assert str(exc) == ("shots/huge.png: 20000x20000 = 400.0 megapixels is over the pixel budget of 64.0 megapixels "
                        "(--max-pixels)")  # fmt: skip
    assert loads and all(im.size == (3, 2) for im in loads)  # only the small one was decoded
    assert elapsed < 2.0


_RSS_SCRIPT = """
import sys
from pathlib import Path
from masqclip_cli.io.sources import SkipItem, SourceItem, decode_item
def peak_mb():  # this process's peak RSS (ru_maxrss would include the parent's, from before exec)
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmHWM:")) / 1024
base = peak_mb()
try:
    decode_item(SourceItem("huge.png", Path(sys.argv[1])), max_pixels=int(sys.argv[3]))
except SkipItem:
    pass
skipped = peak_mb()
rgb = decode_item(SourceItem("control.png", Path(sys.argv[2]))).rgb  # 4000x4000, no budget: decoded
print(skipped - base, peak_mb() - skipped, rgb.shape)
"""


@pytest.mark.skipif(not Path("/proc/self/status").is_file(), reason="VmHWM is Linux's")
def test_huge_png_skip_costs_no_memory(huge_png):
    control = huge_png.parent / "control.png"
    control.write_bytes(_black_png_bytes(4000, 4000))
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(Path(masqclip_cli.__file__).parents[1]),
                                                       os.environ.get("PYTHONPATH", "")]))  # fmt: skip
    run = subprocess.run([sys.executable, "-c", _RSS_SCRIPT, str(huge_png), str(control), str(DEFAULT_MAX_PIXELS)],
                         capture_output=True, text=True, env=env, timeout=120)  # fmt: skip
    assert run.returncode == 0, run.stderr
    skip_mb, control_mb, shape = run.stdout.split(maxsplit=2)
    assert shape.strip() == "(4000, 4000, 3)"
    # decoding the 20000x20000 image would take >= 400 MB (1 byte a pixel) and 1.2 GB as RGB; the 16 Mpx
    # control shows the measurement sees a decode (48 MB of RGB at least)
    assert float(control_mb) > 40
    assert float(skip_mb) < 20


def test_budget_fires_before_pils_own_bomb_check(tmp_path, monkeypatch):
    over_warn = _header_only_png(tmp_path / "warn.png", 10_000, 10_000)  # 100 Mpx: PIL warns (> 89.5 Mpx)
    over_error = _header_only_png(tmp_path / "error.png", 15_000, 15_000)  # 225 Mpx: PIL refuses (> 179 Mpx)
    # PIL's default limit (another library imported earlier in the session may have changed the global)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", int(1024 * 1024 * 1024 // 4 // 3))
    before = Image.MAX_IMAGE_PIXELS
    # the reference: PIL alone, with its default limit
    with pytest.warns(Image.DecompressionBombWarning):
        Image.open(over_warn).close()
    with pytest.raises(Image.DecompressionBombError):
        Image.open(over_error)
    with warnings.catch_warnings(record=True) as log:
        warnings.simplefilter("always")
        warn_skip = _skip(over_warn, "warn.png", 64_000_000)
        error_skip = _skip(over_error, "error.png", 64_000_000)
    tail = "megapixels is over the pixel budget of 64.0 megapixels (--max-pixels)"
    assert warn_skip.reason == f"10000x10000 = 100.0 {tail}"
    assert error_skip.reason == f"15000x15000 = 225.0 {tail}"
    assert log == []
    assert Image.MAX_IMAGE_PIXELS == before


def test_budget_boundary_and_message_precision(tmp_path):
    assert _decode_ok(_png(tmp_path / "at.png", (4, 3)), max_pixels=12).shape == (3, 4, 3)
    assert _skip(_png(tmp_path / "over.png", (13, 1)), "over.png", 12).reason == (
        "13x1 = 0.000013 megapixels is over the pixel budget of 0.000012 megapixels (--max-pixels)"
    )
    # 8000 * 8001 = 64,008,000: "64.0" would not read as over 64.0, so one more decimal
    assert _skip(_header_only_png(tmp_path / "b.png", 8000, 8001), "b.png", 64_000_000).reason == (
        "8000x8001 = 64.01 megapixels is over the pixel budget of 64.0 megapixels (--max-pixels)"
    )
    # 8000 x 8000 is exactly the budget: allowed through to the decoder (which finds the data missing)
    assert _skip(_header_only_png(tmp_path / "c.png", 8000, 8000), "c.png", 64_000_000).reason == "truncated image file"
    # a budget that is not a round number of megapixels is shown exactly
    assert _skip(_png(tmp_path / "d.png", (300, 200)), "d.png", 2**15).reason == (
        "300x200 = 0.06 megapixels is over the pixel budget of 0.032768 megapixels (--max-pixels)"
    )


def _decode_ok(path: Path, max_pixels: int | None) -> np.ndarray:
    out = decode_item(SourceItem(path.name, path), max_pixels=max_pixels)
    assert isinstance(out, DecodedImage)
    return out.rgb


def test_no_budget_keeps_the_bomb_limit(tmp_path, monkeypatch):
    big = _header_only_png(tmp_path / "big.png", 10_000, 10_000)
    assert _skip(big, "big.png", None).reason == "truncated image file"  # no budget: decoding is attempted
    monkeypatch.setattr(sources, "MAX_IMAGE_PIXELS", 100)
    # a budget above the bomb limit: the bomb limit still applies, with its own reason
    over_limit = _skip(_png(tmp_path / "a.png", (11, 10)), "a.png", 1000)
    assert over_limit.reason == "image too large (11x10 pixels, limit 100)"
    assert _skip(_png(tmp_path / "b.png", (11, 10)), "b.png", 50).reason == (
        "11x10 = 0.00011 megapixels is over the pixel budget of 0.00005 megapixels (--max-pixels)"
    )


def test_budget_is_checked_on_the_stored_size_before_exif_rotation(tmp_path):
    path = tmp_path / "rot.jpg"
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees: 40x10 stored, 10x40 shown
    Image.new("RGB", (40, 10), (200, 10, 10)).save(path, format="JPEG", exif=exif.tobytes())
    assert _decode_ok(path, max_pixels=400).shape == (40, 10, 3)
    assert _skip(path, "rot.jpg", 399).reason.startswith("40x10 = 0.0004 megapixels is over")


@pytest.mark.parametrize("bad", [0, -5, True, 2.5, "64"])
def test_bad_budget_is_a_value_error(tmp_path, bad):
    image = _png(tmp_path / "a.png", (2, 2))
    with pytest.raises(ValueError, match=r"^max_pixels must be a whole number of pixels >= 1") as info:
        decode_item(SourceItem("a.png", image), max_pixels=bad)
    assert "\n" not in str(info.value)
    with pytest.raises(ValueError, match="max_pixels"):
        iter_items(str(image), max_pixels=bad)
    with pytest.raises(ValueError, match="max_pixels"):
        iter_video_frames(image, max_pixels=bad)


# --------------------------------------------------------------------------------------------------
# the budget on videos (32x24 = 768 pixels a frame)


@pytest.fixture()
def video(tmp_path, monkeypatch) -> Path:
    monkeypatch.chdir(tmp_path)
    path = tmp_path / "clip.avi"
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"MJPG"), 10, (32, 24))
    assert writer.isOpened()
    for i in range(6):
        writer.write(np.full((24, 32, 3), 40 * i, np.uint8))
    writer.release()
    return path


_VIDEO_OVER = "32x24 = 0.00077 megapixels is over the pixel budget of 0.000767 megapixels (--max-pixels)"


def test_video_over_budget_is_refused_when_listed(video):
    with pytest.raises(SourceError) as info:
        iter_items("clip.avi", max_pixels=767)
    assert str(info.value) == f"clip.avi: video frame size {_VIDEO_OVER}"
    assert [x.id for x in iter_items("clip.avi", max_pixels=768)] == [f"clip.avi#{i:06d}" for i in range(6)]
    with pytest.raises(SourceError) as info:
        iter_video_frames("clip.avi", max_pixels=767)  # when called, not when iterated
    assert str(info.value) == f"clip.avi: video frame size {_VIDEO_OVER}"
    frames = list(iter_video_frames("clip.avi", every=2, max_pixels=768))
    assert [item.frame for item, _ in frames] == [0, 2, 4] and frames[0][1].shape == (24, 32, 3)


def test_video_frame_over_budget_is_skipped_when_decoded(video):
    item = SourceItem("clip.avi#000003", video, 3)
    with pytest.raises(SkipItem) as info:
        decode_item(item, max_pixels=767)
    assert str(info.value) == f"clip.avi#000003: {_VIDEO_OVER}"
    assert decode_item(item, max_pixels=768).rgb.shape == (24, 32, 3)


def test_video_without_a_size_in_its_container_is_checked_on_its_first_frame(video, monkeypatch):
    monkeypatch.setattr(sources, "_video_size", lambda cap: None)
    frames = iter_video_frames("clip.avi", max_pixels=767)  # nothing to check yet
    with pytest.raises(SourceError) as info:
        next(frames)
    assert str(info.value) == f"clip.avi: video frame size {_VIDEO_OVER}"
    assert len(list(iter_video_frames("clip.avi", max_pixels=768))) == 6
    with pytest.raises(SkipItem) as skip:
        decode_item(SourceItem("clip.avi#000001", video, 1), max_pixels=767)
    assert str(skip.value) == f"clip.avi#000001: {_VIDEO_OVER}"


# --------------------------------------------------------------------------------------------------
# fuzz: mutated samples of every format decode or are skipped, with no traceback and no warning

FUZZ_BUDGET = 1_000_000  # keeps every decode small: a mutated header may claim any size


def _encoded_samples() -> dict[str, bytes]:
    rng = np.random.default_rng(17)
    pixels = rng.integers(0, 256, (12, 16, 3), dtype=np.uint8)
    rgb, inverse = Image.fromarray(pixels), Image.fromarray(255 - pixels)
    exif = Image.Exif()
    exif[0x0112] = 6

    def encode(im: Image.Image, fmt: str, **kwargs) -> bytes:
        buffer = io.BytesIO()
        im.save(buffer, format=fmt, **kwargs)
        return buffer.getvalue()

    palette = rgb.convert("P")
    return {
        "rgb.png": encode(rgb, "PNG"),
        "rgba.png": encode(rgb.convert("RGBA"), "PNG"),
        "grey16.png": encode(Image.fromarray(pixels[:, :, 0].astype(np.uint16) * 257), "PNG"),
        "palette.png": encode(palette, "PNG", transparency=0),
        "exif.jpg": encode(rgb, "JPEG", exif=exif.tobytes(), quality=80),
        "progressive.jpg": encode(rgb, "JPEG", progressive=True),
        "anim.gif": encode(palette, "GIF", save_all=True, append_images=[inverse.convert("P")], duration=50),
        "lossy.webp": encode(rgb, "WEBP", quality=70),
        "lossless.webp": encode(rgb.convert("RGBA"), "WEBP", lossless=True),
        "anim.webp": encode(rgb, "WEBP", save_all=True, append_images=[inverse], duration=50),
        "deflate.tif": encode(rgb, "TIFF", compression="tiff_deflate"),
        "a.bmp": encode(rgb, "BMP"),
    }


SAMPLES = _encoded_samples()

# one mutation: (kind, position as a fraction of the length, payload)
_MUTATION = st.tuples(
    st.sampled_from(["set", "truncate", "insert", "overwrite", "duplicate"]),
    st.floats(0, 1, allow_nan=False),
    st.binary(min_size=1, max_size=8) | st.sampled_from([b"\xff\xff\xff\xff", b"\0\0\0\0", b"\x7f\xff\xff\xff"]),
)


def _mutate(data: bytes, mutations: list[tuple[str, float, bytes]]) -> bytes:
    out = bytearray(data)
    for kind, where, payload in mutations:
        at = min(int(where * len(out)), max(len(out) - 1, 0))
        if kind == "set" and out:
            out[at] = payload[0]
        elif kind == "truncate":
            del out[at:]
        elif kind == "insert":
            out[at:at] = payload
        elif kind == "overwrite":
            out[at : at + len(payload)] = payload
        elif kind == "duplicate":
            out[at:at] = out[at : at + 4 * len(payload)]
    return bytes(out)


def _decode_or_skip(path: Path, item_id: str) -> DecodedImage | None:
    """decode_item must return an image within the budget or raise a one-line SkipItem, and let no warning out."""
    with warnings.catch_warnings(record=True) as log:
        warnings.simplefilter("always")
        try:
            out = decode_item(SourceItem(item_id, path), max_pixels=FUZZ_BUDGET)
        except SkipItem as exc:
            assert str(exc).startswith(f"{item_id}: ") and "\n" not in str(exc) and exc.reason
            out = None
    assert [str(w.message) for w in log] == []
    if out is not None:
        rgb = out.rgb
        assert rgb.dtype == np.uint8 and rgb.ndim == 3 and rgb.shape[2] == 3 and rgb.flags.c_contiguous
        assert 0 < rgb.shape[0] * rgb.shape[1] <= FUZZ_BUDGET
    return out


@pytest.fixture(scope="module")
def fuzz_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("fuzz")


def test_unmutated_samples_decode(fuzz_dir):
    for name, data in SAMPLES.items():
        (fuzz_dir / name).write_bytes(data)
        out = _decode_or_skip(fuzz_dir / name, name)
        assert out is not None, name
        assert out.rgb.shape == ((16, 12, 3) if name == "exif.jpg" else (12, 16, 3)), name


@settings(max_examples=400, deadline=None, database=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(name=st.sampled_from(sorted(SAMPLES)), mutations=st.lists(_MUTATION, min_size=1, max_size=6))
def test_fuzz_mutated_samples_decode_or_skip(fuzz_dir, name, mutations):
    path = fuzz_dir / f"mutated-{name}"
    path.write_bytes(_mutate(SAMPLES[name], mutations))
    _decode_or_skip(path, f"mutated/{name}")


def _with_size(fmt: str, width: int, height: int) -> bytes:
    """A 16x12 sample of ``fmt`` whose header claims ``width x height`` (the pixel data is unchanged)."""
    data = bytearray(SAMPLES[{"png": "rgb.png", "jpeg": "progressive.jpg", "bmp": "a.bmp", "gif": "anim.gif"}[fmt]])
    if fmt == "png":
        data[16:24] = struct.pack(">II", width, height)
        data[29:33] = struct.pack(">I", zlib.crc32(bytes(data[12:29])))  # keep the IHDR CRC valid
    elif fmt == "bmp":
        data[18:26] = struct.pack("<ii", width, height)
    elif fmt == "jpeg":
        sof = data.find(b"\xff\xc2")  # progressive start of frame: length, precision, height, width
        assert sof > 0
        data[sof + 5 : sof + 9] = struct.pack(">HH", height, width)
    else:  # gif: the logical screen and the first image descriptor
        data[6:10] = struct.pack("<HH", width, height)
        at = 13 + 3 * 2 ** ((data[10] & 7) + 1) if data[10] & 0x80 else 13
        while data[at] == 0x21:  # skip extension blocks
            at += 2
            while data[at]:
                at += data[at] + 1
            at += 1
        assert data[at] == 0x2C
        data[at + 5 : at + 9] = struct.pack("<HH", width, height)
    return bytes(data)


_SIDE = st.integers(1, 3000) | st.integers(1, 65_535)


@settings(max_examples=150, deadline=None, database=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(fmt=st.sampled_from(["png", "jpeg", "bmp", "gif"]), width=_SIDE, height=_SIDE)
def test_fuzz_header_sizes_are_held_to_the_budget(fuzz_dir, fmt, width, height):
    path = fuzz_dir / f"sized.{fmt}"
    path.write_bytes(_with_size(fmt, width, height))
    pixels = width * height
    if pixels > FUZZ_BUDGET:
        with pytest.raises(SkipItem) as info:
            decode_item(SourceItem("sized", path), max_pixels=FUZZ_BUDGET)
        match = re.fullmatch(rf"{width}x{height} = ([0-9.]+) megapixels is over the pixel budget of 1\.0 megapixels "
                             r"\(--max-pixels\)", info.value.reason)  # fmt: skip
        assert match is not None, info.value.reason
        shown = float(match.group(1))
        assert shown > 1.0 and abs(shown - pixels / 1e6) <= 0.05 + 1e-9
    else:
        out = _decode_or_skip(path, "sized")
        assert out is None or out.rgb.shape == (height, width, 3)
