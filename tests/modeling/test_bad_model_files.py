"""Bad model files given to ``--model`` or ``convert`` (issue 17): the kind is decided by content, every failure is
one stderr line with exit 2 that names the file and says what it is, and a pickle of other Python objects is refused
without ever running (``weights_only`` loading), with advice that never says to turn that off."""

from __future__ import annotations

import builtins
import json
import os
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file
from typer.testing import CliRunner

from masqclip_cli.cli import app
from masqclip_cli.modeling.checkpoint import ModelFileError, read_header, sniff_model_file
from masqclip_cli.modeling.convert import ConversionError, read_official_checkpoint
from masqclip_cli.modeling.factory import load_model, save_model
from masqclip_cli.modeling.masqclip import MasQCLIP

runner = CliRunner()


class _WritesMarker:
    """A pickle payload that, when unpickled by a plain pickle loader, writes ``marker`` (through ``exec``)."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (builtins.exec, (f"open({str(self.marker)!r}, 'w').write('ran')",))


class _SystemMarker:
    """The same through ``os.system`` (a module torch blocks outright)."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch '{self.marker}'",))


@pytest.fixture(scope="module")
def tiny_file(tmp_path_factory) -> tuple[Path, dict[str, torch.Tensor]]:
    """(path, state_dict) of the registered tiny-random model saved as our model file."""
    model = load_model("tiny-random")
    path = save_model(model, tmp_path_factory.mktemp("tiny") / "tiny.safetensors")
    return path, {k: v.clone() for k, v in model.state_dict().items()}


@pytest.fixture(scope="module")
def image(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("img") / "a.png"
    Image.fromarray(np.full((40, 60, 3), 128, np.uint8)).save(path)
    return path


def _header_length(path: Path) -> int:
    return int.from_bytes(path.read_bytes()[:8], "little")


def _write_torchscript(path: Path) -> None:
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # torch.jit is deprecated; such files still exist
        torch.jit.save(torch.jit.script(torch.nn.Linear(2, 2)), str(path))


def _write_zip(path: Path, members: dict[str, bytes]) -> None:
    import zipfile

    with zipfile.ZipFile(path, "w") as archive:
        for name, data in members.items():
            archive.writestr(name, data)


def _make_case(name: str, folder: Path, tiny: Path) -> Path:
    """A bad file for case ``name`` (its marker, for payloads, is ``folder / 'MARKER'``)."""
    marker = folder / "MARKER"
    data = tiny.read_bytes()
    header_end = 8 + _header_length(tiny)
    cases = {
        "truncated-header.safetensors": lambda p: p.write_bytes(data[: header_end // 2]),
        "truncated-data.safetensors": lambda p: p.write_bytes(data[: header_end + (len(data) - header_end) // 3]),
        "random.safetensors": lambda p: p.write_bytes(np.random.default_rng(0).bytes(4096)),
        "page.safetensors": lambda p: p.write_bytes(b"<!DOCTYPE html>\n<html><body>Google Drive - quota</body>"),
        "empty.safetensors": lambda p: p.write_bytes(b""),
        "pickle-renamed.safetensors": lambda p: torch.save({"model": {"w": torch.zeros(2)}, "x": _WritesMarker(marker)},
                                                           p),
        "legacy-pickle-renamed.safetensors": lambda p: torch.save({"x": _SystemMarker(marker)}, p,
                                                                  _use_new_zipfile_serialization=False),
        "numpy.pth": lambda p: torch.save({"model": {"w": torch.zeros(2)}, "iteration": np.int64(3)}, p),
        "truncated-zip.pth": lambda p: (torch.save({"model": {"w": torch.zeros(64)}}, p),
                                        p.write_bytes(p.read_bytes()[:300])),
        "truncated-legacy.pth": lambda p: (torch.save({"model": {"w": torch.zeros(64)}}, p,
                                                      _use_new_zipfile_serialization=False),
                                           p.write_bytes(p.read_bytes()[:200])),
        "torchscript.pt": _write_torchscript,
        "photos.zip": lambda p: _write_zip(p, {"a.png": b"not really a png"}),
    }
    path = folder / name
    cases[name](path)
    return path


# (case, what the one line must say for `segment --model`, for `convert`)
CASES = [
    ("truncated-header.safetensors", "truncated safetensors file (its header says", None),
    ("truncated-data.safetensors", "truncated safetensors file (its tensor data ends at byte", None),
    ("random.safetensors", "not a model file (neither safetensors, nor a PyTorch zip or pickle: binary data",
     "not a loadable PyTorch checkpoint (neither safetensors, nor a PyTorch zip or pickle: binary data"),
    ("page.safetensors", "(neither safetensors, nor a PyTorch zip or pickle: text starting with '<!DOCTYPE html>",
     None),
    ("empty.safetensors", "(neither safetensors, nor a PyTorch zip or pickle: an empty file)", None),
    ("pickle-renamed.safetensors",
     "refused to load: the checkpoint contains Python objects other than tensors (builtins.exec)", None),
    ("legacy-pickle-renamed.safetensors",
     "refused to load: the checkpoint contains Python objects other than tensors (posix.system)", None),
    ("numpy.pth", "refused to load: the checkpoint contains Python objects other than tensors (numpy.", None),
    ("truncated-zip.pth", "a zip file (the PyTorch checkpoint format), but truncated or corrupt", None),
    ("truncated-legacy.pth", "a pickle (the legacy PyTorch checkpoint format), but it does not load", None),
    ("torchscript.pt", "a TorchScript archive, not a checkpoint of tensors", None),
    ("photos.zip", "a zip archive, but not a PyTorch checkpoint (no data.pkl inside)", None),
]


def _assert_one_line(result, path: Path, expected: str) -> None:
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert result.exit_code == 2, result.output
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith(f"error: {path}: "), lines[0]
    assert expected in lines[0], lines[0]
    assert "Traceback" not in result.output and "weights_only" not in result.output


@pytest.mark.parametrize(("case", "segment_says", "convert_says"), CASES, ids=[c[0] for c in CASES])
def test_bad_file_is_one_line_exit_2_and_touches_no_output(case, segment_says, convert_says, tiny_file, image,
                                                           tmp_path):
    path = _make_case(case, tmp_path, tiny_file[0])
    out = tmp_path / "o"
    out.mkdir()
    (out / "earlier.json").write_bytes(b'{"kept": true}\n')
    result = runner.invoke(app, ["segment", str(image), "--model", str(path), "--vocab", "a; b", "--out", str(out)],
                           env={"COLUMNS": "400"})
    _assert_one_line(result, path, segment_says)
    converted = tmp_path / "out.safetensors"
    converted.write_bytes(b"an earlier conversion")
    result = runner.invoke(app, ["convert", str(path), "--out", str(converted), "--clip-weights", "none"],
                           env={"COLUMNS": "400"})
    _assert_one_line(result, path, convert_says or segment_says)
    # earlier outputs byte-identical, nothing new next to them (no temp file), no payload ran
    assert sorted(p.name for p in out.iterdir()) == ["earlier.json"]
    assert (out / "earlier.json").read_bytes() == b'{"kept": true}\n'
    assert converted.read_bytes() == b"an earlier conversion"
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([case, "o", "out.safetensors"])


def test_refused_message_says_why_and_what_to_do_without_unsafe_advice(tmp_path):
    path = tmp_path / "model_final.pth"
    torch.save({"model": {"w": torch.zeros(2)}, "x": _WritesMarker(tmp_path / "MARKER")}, path)
    with pytest.raises(ConversionError) as info:
        read_official_checkpoint(path)
    message = str(info.value)
    assert "\n" not in message and message.startswith(f"{path}: refused to load")
    assert "could run code" in message and "if you trust this file" in message
    assert "torch.save(model.state_dict(), 'clean.pth')" in message
    assert "weights_only" not in message and "pickle_module" not in message


@pytest.mark.parametrize("payload", [_WritesMarker, _SystemMarker])
@pytest.mark.parametrize("form", ["zip", "legacy", "plain-pickle"])
@pytest.mark.parametrize("suffix", [".pth", ".safetensors", ".bin"])
def test_malicious_pickle_never_runs(payload, form, suffix, tmp_path):
    marker = tmp_path / "MARKER"
    obj = {"model": {"backbone.stem.conv1.weight": torch.zeros(1)}, "x": payload(marker)}
    # the payload is live: a plain unpickler runs it
    pickle.loads(pickle.dumps(obj))
    assert marker.exists()
    marker.unlink()
    path = tmp_path / f"evil{suffix}"
    if form == "plain-pickle":
        path.write_bytes(pickle.dumps(obj, protocol=4))
    else:
        torch.save(obj, path, _use_new_zipfile_serialization=form == "zip")
    assert sniff_model_file(path) == ("pytorch-zip" if form == "zip" else "pytorch-pickle")
    name = "exec" if payload is _WritesMarker else "posix.system"
    for load in (load_model, read_official_checkpoint):
        with pytest.raises(ConversionError, match=f"refused to load: .*Python objects other than tensors .*{name}"):
            load(path)
    assert not marker.exists()


def test_kind_is_decided_by_content_not_name(tiny_file, tmp_path):
    path, state = tiny_file
    renamed = tmp_path / "weights.pth"  # our model file under another name still loads as our model file
    renamed.write_bytes(path.read_bytes())
    assert sniff_model_file(renamed) == "safetensors"
    model = load_model(renamed)
    assert isinstance(model, MasQCLIP)
    loaded = model.state_dict()
    assert set(loaded) == set(state)
    assert all(torch.equal(loaded[k], state[k]) for k in state)
    # an official state_dict in each container: zip, legacy pickle, safetensors (named .bin), same tensors
    official = {"backbone.stem.conv1.weight": torch.arange(6.0).reshape(1, 2, 3),
                "criterion.empty_weight": torch.ones(3)}
    torch.save({"model": official}, tmp_path / "zip.bin")
    torch.save(official, tmp_path / "legacy.bin", _use_new_zipfile_serialization=False)
    save_file(official, str(tmp_path / "st.bin"))
    for name, kind in (("zip.bin", "pytorch-zip"), ("legacy.bin", "pytorch-pickle"), ("st.bin", "safetensors")):
        assert sniff_model_file(tmp_path / name) == kind
        read = read_official_checkpoint(tmp_path / name)
        assert set(read) == set(official) and all(torch.equal(read[k], official[k]) for k in official)


def test_our_file_to_convert_and_foreign_safetensors_to_segment_are_named(tiny_file, image, tmp_path):
    path, _ = tiny_file
    result = runner.invoke(app, ["convert", str(path), "--out", str(tmp_path / "x.safetensors")],
                           env={"COLUMNS": "400"})
    _assert_one_line(result, path, "already a masqclip model file: nothing to convert")
    foreign = tmp_path / "foreign.safetensors"
    save_file({"text_model.embeddings.weight": torch.zeros(2, 2)}, str(foreign))
    result = runner.invoke(app, ["segment", str(image), "--model", str(foreign), "--vocab", "a; b", "--out",
                                 str(tmp_path / "o")], env={"COLUMNS": "400"})
    _assert_one_line(result, foreign, "a safetensors file without the masqclip header, but neither a masqclip model "
                                      "file nor an official MasQCLIP checkpoint")
    assert not (tmp_path / "x.safetensors").exists()
    # `model info` on a checkpoint says what it is
    ckpt = tmp_path / "model_final.pth"
    torch.save({"model": {"w": torch.zeros(1)}}, ckpt)
    with pytest.raises(ModelFileError, match="not a safetensors model file .it is a PyTorch zip checkpoint"):
        read_header(ckpt)


def test_damaged_header_fields_are_model_file_errors(tiny_file, tmp_path):
    """A header that parses but describes a model that cannot be built: one line, not a traceback."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    path, _ = tiny_file
    with safe_open(str(path), "pt") as f:
        meta = f.metadata()
    tensors = load_file(str(path))
    config = json.loads(meta["config"])
    config["clip"]["model_cfg"]["vision_cfg"]["patch_size"] = 1000  # larger than the image
    bad = tmp_path / "bad.safetensors"
    save_file(tensors, str(bad), metadata={**meta, "config": json.dumps(config)})
    with pytest.raises(ModelFileError) as info:
        load_model(bad)
    assert str(info.value).startswith(f"{bad}: ") and "\n" not in str(info.value)
    save_file(tensors, str(bad), metadata={**meta, "format_version": "one"})
    with pytest.raises(ModelFileError, match="format_version 'one' is not a number"):
        load_model(bad)
    save_file(tensors, str(bad), metadata={**meta, "config": "[1, 2]"})
    with pytest.raises(ModelFileError, match="corrupt model header"):
        load_model(bad)


# -- fuzz: mutated real files through load_model → a model or one of our one-line errors, never anything else --


def _mutate(data: bytes, draw, st, hot_region: int) -> bytes:
    """Truncate, flip bytes (half of them in the first ``hot_region`` bytes: the header), splice a chunk of the file
    over another place, or insert random bytes."""
    how = draw(st.sampled_from(["truncate", "flip", "splice", "insert"]))
    limit = len(data) - 1
    if how == "truncate":
        return data[: draw(st.integers(0, limit))]
    if how == "flip":
        out = bytearray(data)
        for _ in range(draw(st.integers(1, 4))):
            hot = draw(st.booleans())
            i = draw(st.integers(0, min(hot_region, limit) if hot else limit))
            out[i] ^= draw(st.integers(1, 255))
        return bytes(out)
    if how == "splice":
        a, b, c = (draw(st.integers(0, limit)) for _ in range(3))
        lo, hi = min(a, b), max(a, b)
        return data[:c] + data[lo:hi] + data[c + (hi - lo):]
    at = draw(st.integers(0, min(hot_region, limit)))
    return data[:at] + draw(st.binary(min_size=1, max_size=16)) + data[at:]


def _load_or_one_line_error(path: Path) -> str:
    """``loaded`` or the error class's name; anything but our two error types propagates (and fails the test)."""
    try:
        model = load_model(path)
    except (ModelFileError, ConversionError) as exc:
        message = str(exc)
        assert message.startswith(f"{path}: ") and "\n" not in message, message
        assert "weights_only" not in message
        return type(exc).__name__
    assert isinstance(model, MasQCLIP)
    return "loaded"


def test_fuzz_mutated_model_file(tiny_file, tmp_path):
    hypothesis = pytest.importorskip("hypothesis")
    st = hypothesis.strategies
    source = tiny_file[0].read_bytes()
    header_end = 8 + _header_length(tiny_file[0])
    path = tmp_path / "mutated.safetensors"
    outcomes: set[str] = set()

    @hypothesis.settings(max_examples=40, deadline=None, derandomize=True, database=None)
    @hypothesis.given(data=st.data())
    def check(data):
        path.write_bytes(_mutate(source, data.draw, st, header_end))
        outcomes.add(_load_or_one_line_error(path))

    check()
    assert "ModelFileError" in outcomes  # the mutations did reach the error paths


def test_fuzz_mutated_pytorch_checkpoint(tmp_path):
    hypothesis = pytest.importorskip("hypothesis")
    st = hypothesis.strategies
    state = {"model": {"w": torch.arange(16.0), "b": torch.zeros(2, 3, dtype=torch.int64)}, "iteration": 7}
    sources = {}
    for zip_format in (True, False):
        path = tmp_path / f"source-{zip_format}.pth"
        torch.save(state, path, _use_new_zipfile_serialization=zip_format)
        sources[zip_format] = path.read_bytes()
    path = tmp_path / "mutated.pth"
    outcomes: set[str] = set()

    @hypothesis.settings(max_examples=80, deadline=None, derandomize=True, database=None)
    @hypothesis.given(data=st.data(), zip_format=st.booleans())
    def check(data, zip_format):
        source = sources[zip_format]
        path.write_bytes(_mutate(source, data.draw, st, len(source)))
        outcomes.add(_load_or_one_line_error(path))

    check()
    assert "ConversionError" in outcomes
