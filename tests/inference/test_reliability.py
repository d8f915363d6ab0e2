"""Hostile conditions for `masqclip segment` and `merge` (issue 17): an unwritable --out, a complete output made
read-only, a full disk, options out of range, a stuff-only vocabulary with --task instance, Ctrl-C during assembly,
and merging a shard whose run was killed. Each case asserts the exit code, the one error line, and that what was
written before is intact.

Permissions are tested in a subprocess without CAP_DAC_OVERRIDE (`setpriv`; the suite runs as root, where chmod alone
stops nothing); the full disk on a 1 MiB tmpfs (needs mount rights: skipped with the reason otherwise)."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from masqclip_cli.cli import app

pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")  # pycocotools
runner = CliRunner()
VOCAB = "person; car; road [stuff]; sky [stuff]"
FORMATS = "coco,panoptic,labels,jsonl,overlay"
BASE = ["--model", "tiny-random", "--vocab", VOCAB, "--short-side", "64", "--threads", "1",
        "--task", "panoptic,semantic,instance", "--format", FORMATS]
NO_DAC = ["setpriv", "--bounding-set=-dac_override,-dac_read_search", "--"]


def _images(folder: Path, n: int, size: tuple[int, int] = (40, 56)) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for i in range(n):
        Image.fromarray(rng.integers(0, 255, (*size, 3), dtype=np.uint8)).save(folder / f"img{i:03d}.png")
    return folder


def _snapshot(root: Path) -> dict[str, tuple[str, int]]:
    """sha256 and mtime of every file under root (the run state included)."""
    return {str(p.relative_to(root)): (hashlib.sha256(p.read_bytes()).hexdigest(), p.stat().st_mtime_ns)
            for p in sorted(root.rglob("*")) if p.is_file()}


def _cli(*args: str, prefix: list[str] | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([*(prefix or []), sys.executable, "-m", "masqclip_cli", *args], capture_output=True,
                          text=True, timeout=600, check=False)


def _error_lines(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.startswith("error:")]


needs_setpriv = pytest.mark.skipif(shutil.which("setpriv") is None or os.geteuid() != 0,
                                   reason="needs root and setpriv to drop CAP_DAC_OVERRIDE")


@needs_setpriv
def test_unwritable_out_is_one_line_exit_2(tmp_path):
    src = _images(tmp_path / "in", 2)
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o555)
    try:
        done = _cli("segment", str(src), *BASE, "--out", str(locked / "out"), prefix=NO_DAC)
    finally:
        locked.chmod(0o755)
    assert done.returncode == 2, done.stderr
    (line,) = _error_lines(done.stderr)
    assert str(locked / "out") in line and "Permission denied" in line
    assert "Traceback" not in done.stderr and "0 done" in done.stderr  # the summary is still printed
    assert not (locked / "out").exists()


@needs_setpriv
def test_rerun_over_a_complete_read_only_out_succeeds_without_writing(tmp_path):
    src = _images(tmp_path / "in", 3)
    out = tmp_path / "out"
    first = _cli("segment", str(src), *BASE, "--out", str(out))
    assert first.returncode == 0, first.stderr
    before = _snapshot(out)
    for path in [out, *out.rglob("*")]:
        path.chmod(0o555 if path.is_dir() else 0o444)
    try:
        again = _cli("segment", str(src), *BASE, "--out", str(out), prefix=NO_DAC)
    finally:
        for path in [out, *out.rglob("*")]:
            path.chmod(0o755 if path.is_dir() else 0o644)
    assert again.returncode == 0, again.stderr
    assert "3 already done (resumed)" in again.stderr and not _error_lines(again.stderr)
    assert _snapshot(out) == before  # not a byte, not a timestamp changed


@pytest.fixture
def tiny_disk(tmp_path):
    mount = tmp_path / "disk"
    mount.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mount)], capture_output=True,
                          text=True, check=False)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here ({done.stderr.strip()[:80]})")
    yield mount
    subprocess.run(["umount", "-l", str(mount)], check=False)


def test_disk_full_stops_with_one_line_and_keeps_what_was_written(tmp_path, tiny_disk):
    src = _images(tmp_path / "in", 60, size=(96, 128))
    out = tiny_disk / "out"
    first = tmp_path / "first"  # a first run over 3 of the images fits on the disk
    first.mkdir()
    for name in sorted(p.name for p in src.iterdir())[:3]:
        shutil.copyfile(src / name, first / name)
    assert _cli("segment", str(first), *BASE, "--out", str(out)).returncode == 0
    earlier = _snapshot(out)
    done = _cli("segment", str(src), *BASE, "--out", str(out))
    assert done.returncode in (1, 2), done.stderr
    (line,) = _error_lines(done.stderr)
    assert "No space left on device" in line and str(out) in line
    assert "Traceback" not in done.stderr and " done, " in done.stderr  # the summary is still printed
    # nothing half-written: every record, result and JSON file there is whole, every PNG decodes
    for path in out.rglob("*"):
        if path.is_file() and path.suffix == ".json":
            json.loads(path.read_text())
        elif path.is_file() and path.suffix == ".png":
            Image.open(path).load()
    assert not [p for p in out.rglob(".*.tmp")]  # no temporary file left behind
    # the first run's item files are untouched; its run-level files were replaced whole or not at all
    now = _snapshot(out)
    for name, (digest, _) in earlier.items():
        if ".masqclip" in Path(name).parts or "/" in name:
            if Path(name).name not in ("lock", "inflight.log", "complete.json"):
                assert now[name][0] == digest, name
    records = list((out / ".masqclip" / "items").rglob("*.json")) if (out / ".masqclip" / "items").is_dir() else []
    assert len(records) < 60
    assert not (out / ".masqclip" / "complete.json").exists()


@pytest.mark.parametrize(("args", "expected"), [
    (["--device", "cuda:7"], "--device cuda:7: not available on this machine"),
    (["--device", "tpu"], "--device: unknown device 'tpu'"),
    (["--topk", "-1"], "--topk must be >= 1, got -1"),
    (["--object-threshold", "nan"], "--object-threshold must be a number in [0, 1], got nan"),
    (["--overlap-threshold", "1.5"], "--overlap-threshold must be a number in [0, 1], got 1.5"),
    (["--max-size", "0"], "--max-size must be >= 1, got 0"),
    (["--short-side", "-5"], "--short-side must be >= 0 (0 keeps the image size), got -5"),
    (["--shard", "0/0"], "--shard: expected i/n with n >= 1 shards, got '0/0'"),
    (["--shard", "3/2"], "--shard: index 3 is not in 0..1"),
])
def test_bad_options_exit_2_before_the_model_loads(tmp_path, args, expected):
    src = _images(tmp_path / "in", 1)
    # a model file that does not exist: were it loaded first, its error would show instead
    result = runner.invoke(app, ["segment", str(src), "--model", str(tmp_path / "none.safetensors"), "--vocab",
                                 VOCAB, *args, "--out", str(tmp_path / "o")])
    assert result.exit_code == 2, result.output
    (line,) = _error_lines(result.stderr)
    assert expected in line
    assert not (tmp_path / "o").exists()


def test_stuff_only_vocabulary_with_instance_task_says_why(tmp_path):
    src = _images(tmp_path / "in", 1)
    result = runner.invoke(app, ["segment", str(src), "--model", "tiny-random", "--vocab", "road [stuff]; sky [stuff]",
                                 "--short-side", "64", "--task", "instance", "--format", "coco",
                                 "--out", str(tmp_path / "o")])
    assert result.exit_code == 0, result.output
    assert "only stuff classes" in result.stderr and "--instance-keep-stuff" in result.stderr
    assert json.loads((tmp_path / "o" / "instances.json").read_text())["annotations"] == []


def test_ctrl_c_during_assembly_says_what_was_not_assembled(tmp_path, monkeypatch):
    from masqclip_cli.io.writers.panoptic import PanopticWriter

    src = _images(tmp_path / "in", 2)

    def interrupted(self, records):  # noqa: ANN001
        raise KeyboardInterrupt

    monkeypatch.setattr(PanopticWriter, "finalize", interrupted)
    result = runner.invoke(app, ["segment", str(src), *BASE, "--out", str(tmp_path / "o")])
    assert result.exit_code == 130, result.output
    assert "interrupted during assembly" in result.stderr and "not assembled: panoptic, labels, jsonl" in result.stderr
    assert (tmp_path / "o" / "instances.json").is_file()  # coco came first and was assembled
    assert not (tmp_path / "o" / ".masqclip" / "complete.json").exists()
    monkeypatch.undo()
    again = runner.invoke(app, ["segment", str(src), *BASE, "--out", str(tmp_path / "o")])  # assembles the rest
    assert again.exit_code == 0 and (tmp_path / "o" / "panoptic.json").is_file()


def test_merge_refuses_a_shard_whose_run_did_not_finish(tmp_path):
    src = _images(tmp_path / "in", 6)
    shards = []
    for i in range(2):
        done = runner.invoke(app, ["segment", str(src), *BASE, "--shard", f"{i}/2", "--out", str(tmp_path / f"s{i}")])
        assert done.exit_code == 0, done.output
        shards.append(tmp_path / f"s{i}")
    (shards[1] / ".masqclip" / "complete.json").unlink()  # as a run killed part-way leaves it
    refused = runner.invoke(app, ["merge", *map(str, shards), "--out", str(tmp_path / "m")])
    assert refused.exit_code == 2
    assert f"{shards[1]}: its run did not finish" in refused.stderr and "--allow-partial" in refused.stderr
    assert not (tmp_path / "m").exists()
    partial = runner.invoke(app, ["merge", *map(str, shards), "--out", str(tmp_path / "m"), "--allow-partial"])
    assert partial.exit_code == 0, partial.output
    assert "warning:" in partial.stderr
    # a record deleted from a finished shard is named as missing
    next((shards[0] / ".masqclip" / "items").rglob("*.json")).unlink()
    (shards[1] / ".masqclip" / "complete.json").write_text('{"recorded": 0}\n')
    missing = runner.invoke(app, ["merge", *map(str, shards), "--out", str(tmp_path / "m2")])
    assert missing.exit_code == 2 and "item records are missing" in missing.stderr


def test_a_second_run_on_a_locked_out_is_refused_naming_the_holder(tmp_path):
    from masqclip_cli.io.run_lock import RunLock

    src = _images(tmp_path / "in", 2)
    out = tmp_path / "o"
    first = runner.invoke(app, ["segment", str(src), *BASE, "--out", str(out)])
    assert first.exit_code == 0, first.output
    before = _snapshot(out)
    (tmp_path / "e").mkdir()
    with RunLock(out), RunLock(tmp_path / "e"):  # other runs hold the folders
        for command in (["segment", str(src), *BASE, "--out", str(out)],
                        ["export", str(out), "--format", "coco", "--out", str(tmp_path / "e")]):
            refused = runner.invoke(app, command)
            assert refused.exit_code == 2, refused.output
            (line,) = _error_lines(refused.stderr)
            assert f"another masqclip run (pid {os.getpid()}" in line and "is writing here" in line
    assert {k: v for k, v in _snapshot(out).items() if k != ".masqclip/lock"} == {
        k: v for k, v in before.items() if k != ".masqclip/lock"}
    again = runner.invoke(app, ["segment", str(src), *BASE, "--out", str(out)])  # released: runs (all reused)
    assert again.exit_code == 0 and "2 already done" in again.stderr


def test_labels_ids_over_65535_refused_before_the_model_loads(tmp_path):
    src = _images(tmp_path / "in", 1)
    vocab = tmp_path / "big-ids.json"
    vocab.write_text(json.dumps([{"name": "dog", "id": 70000}, {"name": "cat", "id": 3}]))
    result = runner.invoke(app, ["segment", str(src), "--model", str(tmp_path / "none.safetensors"), "--vocab",
                                 str(vocab), "--task", "semantic", "--format", "labels", "--out", str(tmp_path / "o")])
    assert result.exit_code == 2, result.output
    (line,) = _error_lines(result.stderr)
    assert "class 'dog' has category id 70000" in line and "16-bit" in line
    assert not (tmp_path / "o").exists()


def test_an_image_over_the_pixel_budget_is_skipped_from_its_header(tmp_path):
    import zlib

    src = _images(tmp_path / "in", 2)
    # a valid 1-bit 20000 x 20000 PNG of about 50 KB: decoding it would need gigabytes
    width = height = 20000

    def chunk(kind: bytes, data: bytes) -> bytes:
        return len(data).to_bytes(4, "big") + kind + data + zlib.crc32(kind + data).to_bytes(4, "big")

    row = b"\x00" + bytes((width + 7) // 8)
    packer = zlib.compressobj(9)
    idat = b"".join(packer.compress(row) for _ in range(height)) + packer.flush()
    ihdr = width.to_bytes(4, "big") + height.to_bytes(4, "big") + bytes([1, 0, 0, 0, 0])
    (src / "huge.png").write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat)
                                   + chunk(b"IEND", b""))
    result = runner.invoke(app, ["segment", str(src), *BASE, "--out", str(tmp_path / "o")])
    assert result.exit_code == 1, result.output
    assert "skipped: huge.png: 20000x20000 = 400.0 megapixels is over the pixel budget of 64.0 megapixels" in (
        result.stderr)
    assert "2 done, 1 skipped" in result.stderr


def test_an_item_that_kills_the_process_is_skipped_after_its_second_crash(tmp_path):
    src = _images(tmp_path / "in", 4)
    (src / "img002.png").rename(src / "crash.png")
    shim = tmp_path / "shim"
    shim.mkdir()
    # decoding crash.png kills the process outright (as the kernel's OOM killer would): no Python error to catch
    (shim / "sitecustomize.py").write_text(
        "import os\n"
        "import masqclip_cli.io.sources as sources\n"
        "_decode = sources.decode_item\n"
        "def decode_item(item, **kw):\n"
        "    if item.id == 'crash.png':\n"
        "        os._exit(137)\n"
        "    return _decode(item, **kw)\n"
        "sources.decode_item = decode_item\n")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(shim), *filter(None, [os.environ.get("PYTHONPATH")])]))
    cmd = [sys.executable, "-m", "masqclip_cli", "segment", str(src), *BASE, "--out", str(tmp_path / "o")]
    for _ in range(2):  # the first crash, then the retry (alone) that crashes again
        died = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600, check=False)
        assert died.returncode == 137, died.stderr
    # each start counts the crash of the run before it: one so far, the second is counted by the next run
    assert json.loads((tmp_path / "o" / ".masqclip" / "crashed.json").read_text()) == {"crash.png": 1}
    third = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600, check=False)
    assert third.returncode == 1, third.stderr
    assert "skipped: crash.png: the process died twice while working on it" in third.stderr
    assert "3 done" in third.stderr or "already done" in third.stderr
    names = {im["file_name"] for im in json.loads((tmp_path / "o" / "instances.json").read_text())["images"]}
    assert names == {"img000.png", "img001.png", "img003.png"}
    assert json.loads((tmp_path / "o" / ".masqclip" / "crashed.json").read_text()) == {"crash.png": 2}


def test_skips_found_while_listing_name_the_file(tmp_path):
    src = _images(tmp_path / "in", 1)
    missing = tmp_path / "nothere.png"
    result = runner.invoke(app, ["segment", "-", *BASE, "--out", str(tmp_path / "o")],
                           input=f"{src / 'img000.png'}\n{missing}\n")
    assert result.exit_code == 1, result.output
    assert f"skipped: {missing}: no such file or directory" in result.stderr
