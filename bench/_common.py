"""Helpers shared by the bench scripts (not a benchmark itself; the smoke test skips ``_*.py``).

Torch-free on purpose: scripts that only drive ``masqclip segment`` in subprocesses import this without paying for
torch. ``python bench/x.py`` puts ``bench/`` on ``sys.path``, so the scripts import it as ``_common``.
"""

from __future__ import annotations

import importlib.metadata
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
RESULTS = Path(__file__).resolve().parent / "results"
SAMPLE_IMAGES = REPO / "samples" / "photos"  # the two COCO photos: real-photo sizes
MODEL_STAGES = ("preprocess", "backbone", "pixel_decoder", "transformer_decoder", "clip", "classifier")
LOADAVG_AT_START = os.getloadavg()[0]  # when the script started (this module is imported first thing)

# Runs a command as its only child and prints, as one JSON line, its exit code, wall time and peak RSS (KiB on
# Linux): RUSAGE_CHILDREN of a fresh process covers exactly that one child (and its own waited-for children).
_PEAK_RSS_HELPER = (
    "import json, resource, subprocess, sys, time\n"
    "start = time.perf_counter()\n"
    "rc = subprocess.call(sys.argv[1:], stdout=subprocess.DEVNULL)\n"
    "wall = time.perf_counter() - start\n"
    "rss = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss\n"
    "print(json.dumps({'rc': rc, 'wall_s': wall, 'maxrss_kib': rss}))\n"
)


def median_time(fn: Callable[[], Any], reps: int) -> tuple[float, list[float]]:
    """Median wall seconds of ``reps`` calls of ``fn`` (and all of them)."""
    times = []
    for _ in range(max(1, reps)):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times), times


def torch_version() -> str:
    """The installed torch version, without importing torch."""
    try:
        return importlib.metadata.version("torch")
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


def machine_info(threads: int) -> dict[str, Any]:
    """The fields every result file carries."""
    return {
        "machine": platform.machine(),
        "processor": platform.processor() or platform.platform(),
        "cpus": os.cpu_count(),
        "threads": threads,
        "torch": torch_version(),
        "python": platform.python_version(),
        # other work on the machine skews every timing (2 torch threads on 2 busy cores degrade badly)
        "loadavg_1m": {"start": round(LOADAVG_AT_START, 2), "end": round(os.getloadavg()[0], 2)},
    }


def write_json(path: Path, result: dict[str, Any]) -> None:
    """Write ``result`` atomically (a killed run never leaves half a file)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(result, indent=1) + "\n")
    tmp.replace(path)


def child_env(**extra: str) -> dict[str, str]:
    """The environment for child Python processes: this checkout first on ``PYTHONPATH`` (so ``masqclip_cli`` is
    the one in this repository whether or not the package is installed), plus ``extra``."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), *filter(None, [env.get("PYTHONPATH")])])
    env.update(extra)
    return env


def masqclip_command(*args: str) -> list[str]:
    """``masqclip ARGS`` run by this interpreter from this checkout (``python -m masqclip_cli``)."""
    return [sys.executable, "-m", "masqclip_cli", *args]


def run_peak_rss(command: Sequence[str], env: dict[str, str] | None = None, cwd: Path | None = None) -> dict:
    """Run ``command`` under a fresh helper process; return ``{rc, wall_s, maxrss_kib}`` of that command alone."""
    out = subprocess.run([sys.executable, "-c", _PEAK_RSS_HELPER, *command], env=env, cwd=cwd,
                         capture_output=True, text=True, check=False)
    lines = [ln for ln in out.stdout.splitlines() if ln.startswith("{")]
    if out.returncode != 0 or not lines:
        raise RuntimeError(f"peak-RSS helper failed ({out.returncode}): {out.stderr[-2000:]}")
    return json.loads(lines[-1])


def write_images(directory: Path, count: int, size: int, variants: int = 16, ext: str = ".png",
                 seed: int = 0) -> list[Path]:
    """``count`` small RGB images (``variants`` distinct random-blob pictures, encoded once, copied)."""
    import io

    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    encoded = []
    yy, xx = np.mgrid[0:size, 0:size]
    for _ in range(variants):
        img = np.full((size, size, 3), rng.integers(0, 256, 3), dtype=np.uint8)
        for _ in range(4):
            cy, cx = rng.uniform(0, size, 2)
            ry, rx = rng.uniform(size / 8, size / 2, 2)
            img[((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2 <= 1] = rng.integers(0, 256, 3)
        buf = io.BytesIO()
        Image.fromarray(img).save(buf, format="PNG" if ext == ".png" else "JPEG")
        encoded.append(buf.getvalue())
    directory.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(count):
        path = directory / f"img_{i:06d}{ext}"
        path.write_bytes(encoded[i % variants])
        paths.append(path)
    return paths


def copy_images(source: Path, directory: Path, count: int) -> list[Path]:
    """``count`` files in ``directory``, the images of ``source`` repeated in order (distinct names)."""
    files = sorted(p for p in source.iterdir() if p.suffix.lower() in (".jpg", ".jpeg", ".png", ".bmp", ".webp"))
    if not files:
        raise SystemExit(f"{source}: no images")
    directory.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(count):
        src = files[i % len(files)]
        path = directory / f"{i:04d}_{src.name}"
        path.write_bytes(src.read_bytes())
        paths.append(path)
    return paths


def install_stage_timers(model) -> dict[str, float]:  # noqa: ANN001 - a MasQCLIP (torch-free import here)
    """Wrap the model's stage entry points so that each call adds its wall time to ``acc[stage]``."""
    import masqclip_cli.modeling.masqclip as masqclip_module

    acc = dict.fromkeys(MODEL_STAGES, 0.0)

    def wrap(owner, attr: str, stage: str) -> None:  # noqa: ANN001
        original = getattr(owner, attr)

        def timed(*args, **kwargs):  # noqa: ANN002, ANN003
            start = time.perf_counter()
            try:
                return original(*args, **kwargs)
            finally:
                acc[stage] += time.perf_counter() - start

        setattr(owner, attr, timed)  # an instance attribute shadows the method (nn.Module calls self.forward)

    wrap(model.proposals, "normalize_and_pad", "preprocess")
    wrap(model.masq, "preprocess", "preprocess")
    wrap(model.proposals.backbone, "forward", "backbone")
    wrap(model.proposals.pixel_decoder, "forward", "pixel_decoder")
    wrap(model.proposals.predictor, "forward", "transformer_decoder")
    wrap(model.masq, "attention_masks", "clip")
    wrap(model.masq, "forward", "clip")
    wrap(masqclip_module, "classify", "classifier")  # looked up as a module global by MasQCLIP.forward_padded
    return acc
