"""`masqclip segment --engine ray` on a local Ray instance (2 CPUs, started once for the module), tiny random model,
the sample scenes plus one truncated image: the same output folder as a local run, byte for byte; a model worker
killed mid-batch costs only that batch; a run over a complete folder computes nothing; without Ray, one line and
exit 2.

Ray starts slowly on 2 cores, so there are few tests and each checks a lot; the local run and the plain Ray run are
module fixtures that the tests share (they only read them).

The truncated image sorts last on purpose: a model batch's composition changes the last bits of its floats (a local
run at batch size 1 and 2 differ there too), and the two engines batch alike (consecutive listed items) except
after an item skipped at decode: a local run fills the batch from the next items, the Ray engine's chunk stays one
short.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from masqclip_cli.cli import app

REPO = Path(__file__).resolve().parents[2]
runner = CliRunner()
# one torch thread on both engines: float sums, hence the last digit of a score, depend on the thread count
BASE = ["--model", "tiny-random", "--vocab", str(REPO / "samples" / "vocab.txt"), "--short-side", "96",
        "--task", "panoptic,semantic,instance", "--format", "coco,panoptic,labels,overlay,jsonl,labelme",
        "--batch-size", "2", "--threads", "1"]
RAY = ["--engine", "ray", "--ray-workers", "1", "--ray-cpus-per-worker", "1"]
SCENES = sorted(p.name for p in (REPO / "samples" / "images").glob("*.png"))


def _tree(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def _run(args: list[str]):
    return runner.invoke(app, ["segment", *args], env={"COLUMNS": "300"})


@pytest.fixture(scope="module")
def module_cache(tmp_path_factory):
    """The module fixtures' text cache (they run before the per-test one is set): never the user's."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MASQCLIP_CACHE_DIR", str(tmp_path_factory.mktemp("cache")))
        yield


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> Path:
    """The six sample scenes and ``zz-cut.png``, a PNG truncated after its header (listed, skipped at decode)."""
    folder = tmp_path_factory.mktemp("in")
    for name in SCENES:
        shutil.copyfile(REPO / "samples" / "images" / name, folder / name)
    data = (REPO / "samples" / "images" / SCENES[0]).read_bytes()
    (folder / "zz-cut.png").write_bytes(data[: len(data) // 3])
    return folder


@pytest.fixture(scope="module")
def cluster(module_cache, tmp_path_factory):
    """A local Ray instance for the module. Every worker process it starts wraps the Ray engine's ``_run_batch``
    (a setup hook; no package code knows about it): each batch's item ids are appended to ``batches.log``, and
    while ``armed`` exists, the first batch of two or more items kills its process (``os._exit(1)``) right after its
    first item was written, once (``fired`` holds that batch's ids, so the restarted worker lives)."""
    ray = pytest.importorskip("ray")
    state = tmp_path_factory.mktemp("ray-hook")
    log, armed, fired = str(state / "batches.log"), str(state / "armed"), str(state / "fired")

    def patch(ray_engine) -> None:  # noqa: ANN001 - the module
        import json as _json
        import os as _os

        original = ray_engine._run_batch

        def run_batch(predictor, batch, *args, **kwargs):  # noqa: ANN001, ANN002, ANN003
            ids = [item.id for item, _, _ in batch]
            with open(log, "a") as f:
                f.write(_json.dumps(ids) + "\n")
            for n, result in enumerate(original(predictor, batch, *args, **kwargs)):
                yield result  # the item's files and record are written by now
                if n == 0 and len(ids) > 1 and _os.path.exists(armed) and not _os.path.exists(fired):
                    with open(fired, "w") as f:
                        f.write(_json.dumps(ids))
                    _os._exit(1)

        ray_engine._run_batch = run_batch

    def setup_hook() -> None:  # patch the Ray engine when a worker imports it (idle workers never import torch)
        import importlib.abc
        import importlib.util
        import sys as _sys

        name = "masqclip_cli.inference.ray_engine"

        class Finder(importlib.abc.MetaPathFinder):
            def find_spec(self, fullname, path, target=None):  # noqa: ANN001, ANN201
                if fullname != name:
                    return None
                _sys.meta_path.remove(self)
                spec = importlib.util.find_spec(fullname)
                run = spec.loader.exec_module

                def exec_module(module):  # noqa: ANN001, ANN202
                    run(module)
                    patch(module)

                spec.loader.exec_module = exec_module
                return spec

        _sys.meta_path.insert(0, Finder())

    ray.init(num_cpus=2, include_dashboard=False, logging_level="ERROR",
             runtime_env={"worker_process_setup_hook": setup_hook})
    yield {"log": Path(log), "armed": Path(armed), "fired": Path(fired)}
    ray.shutdown()


def _batches(log: Path) -> list[list[str]]:
    return [json.loads(line) for line in log.read_text().splitlines()] if log.is_file() else []


@pytest.fixture(scope="module")
def local_run(images, module_cache, tmp_path_factory) -> tuple[Path, str]:
    out = tmp_path_factory.mktemp("local") / "out"
    result = _run([str(images), *BASE, "--out", str(out)])
    assert result.exit_code == 1, result.output  # zz-cut.png is skipped
    return out, result.stderr


@pytest.fixture(scope="module")
def ray_run(images, cluster, tmp_path_factory) -> tuple[Path, str, list[list[str]]]:
    out = tmp_path_factory.mktemp("ray") / "out"
    before = len(_batches(cluster["log"]))
    result = _run([str(images), *BASE, *RAY, "--out", str(out)])
    assert result.exit_code == 1, result.output
    return out, result.stderr, _batches(cluster["log"])[before:]


def _summary_lines(stderr: str) -> list[str]:
    """The summary without its timings, then the skip / fail lines."""
    lines = [ln for ln in stderr.splitlines() if ln.strip()]
    first = next(ln for ln in lines if " done, " in ln)
    return [first.split(" in ")[0], *(ln for ln in lines if ln.startswith(("skipped:", "failed:")))]


def test_ray_output_equals_a_local_run_byte_for_byte(local_run, ray_run):
    (local_out, local_err), (ray_out, ray_err, batches) = local_run, ray_run
    local_tree, ray_tree = _tree(local_out), _tree(ray_out)
    # every file, run-level ones (instances.json, panoptic.json, predictions.jsonl, ...) and the run state included:
    # the fingerprint (run.json: the engine is not in it), records, whole results, the lock (emptied on release)
    assert ray_tree == local_tree
    assert {"instances.json", "panoptic.json", "predictions.jsonl", ".masqclip/run.json",
            ".masqclip/complete.json"} <= set(ray_tree)
    assert len([k for k in ray_tree if k.startswith(".masqclip/items/")]) == len(SCENES)
    # the same summary and exit code (1: zz-cut.png skipped at decode, with the local run's reason)
    assert _summary_lines(ray_err) == _summary_lines(local_err)
    assert _summary_lines(ray_err)[0] == f"{len(SCENES)} done, 1 skipped, 0 failed"
    assert "skipped: zz-cut.png: truncated image file" in ray_err
    # the model ran in the Ray workers, each scene once, in the local run's batches: consecutive pairs
    assert sorted(batches) == [SCENES[k : k + 2] for k in range(0, len(SCENES), 2)]


def test_a_killed_model_worker_costs_only_its_batch(images, cluster, local_run, tmp_path):
    out = tmp_path / "out"
    before = len(_batches(cluster["log"]))
    cluster["armed"].write_text("")
    try:
        result = _run([str(images), *BASE, *RAY, "--out", str(out)])
    finally:
        cluster["armed"].unlink()
    assert result.exit_code == 1, result.output
    assert cluster["fired"].is_file(), "the worker was not killed"
    killed = json.loads(cluster["fired"].read_text())
    computed = [i for b in _batches(cluster["log"])[before:] for i in b]
    # the items of the killed batch ran twice (the first was already written when the process died), no other item
    redone = sorted({i for i in computed if computed.count(i) > 1})
    assert len(killed) == 2 and redone == sorted(killed) and len(computed) == len(SCENES) + len(killed)
    print(f"killed worker cost: {len(redone)} items re-done ({', '.join(redone)}) of {len(SCENES)}")
    # still complete, and identical to the local run; each item counted once
    assert _tree(out) == _tree(local_run[0])
    assert _summary_lines(result.stderr) == _summary_lines(local_run[1])


def test_a_second_run_over_a_complete_folder_computes_nothing(images, cluster, ray_run, local_run):
    out = ray_run[0]
    before_tree = _tree(out)
    before_mtimes = {p: p.stat().st_mtime_ns for p in out.rglob("*") if p.is_file()}
    before = len(_batches(cluster["log"]))
    result = _run([str(images), *BASE, *RAY, "--out", str(out)])
    assert result.exit_code == 1, result.output  # zz-cut.png is still skipped
    assert f"0 done, {len(SCENES)} already done (resumed), 1 skipped, 0 failed" in result.stderr
    assert _batches(cluster["log"])[before:] == []  # no model worker ran a batch
    assert _tree(out) == before_tree
    # nothing rewritten but the lock (this run's holder, emptied again) and the complete marker (rewritten by the
    # shared end of a run, with the same content, as a local run does)
    rewritten = {p.relative_to(out).as_posix() for p in out.rglob("*")
                 if p.is_file() and p.stat().st_mtime_ns != before_mtimes[p]}
    assert rewritten <= {".masqclip/lock", ".masqclip/complete.json"}
    # the engines are interchangeable: a local run over the Ray run's folder resumes it too
    result = _run([str(images), *BASE, "--out", str(out)])
    assert f"0 done, {len(SCENES)} already done (resumed)" in result.stderr, result.output


def test_without_ray_or_on_a_tracked_source_one_line_and_exit_2(images, tmp_path, monkeypatch):
    # importing the package (the CLI, both engines) never imports Ray
    code = ("import sys, masqclip_cli, masqclip_cli.cli, masqclip_cli.inference.engine, "
            "masqclip_cli.inference.ray_engine; print('ray' in sys.modules)")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                          env={**os.environ, "PYTHONPATH": str(REPO)})
    assert done.stdout.strip() == "False"
    # a tracked source: refused before any model or Ray starts
    result = _run([str(images), *BASE, *RAY, "--sequence", "--out", str(tmp_path / "seq")])
    assert result.exit_code == 2
    assert result.stderr.strip().splitlines() == [
        "error: --engine ray runs images only: tracked sequences and videos (--track, --sequence, a video source) "
        "need --engine local"]
    assert not (tmp_path / "seq").exists()
    # Ray not importable
    monkeypatch.setitem(sys.modules, "ray", None)
    result = _run([str(images), *BASE, *RAY, "--out", str(tmp_path / "o")])
    assert result.exit_code == 2
    assert result.stderr.strip().splitlines() == ["error: --engine ray needs Ray: pip install 'masqclip[ray]'"]
    assert not (tmp_path / "o").exists()
