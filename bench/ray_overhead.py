"""The Ray engine's overhead: ``masqclip segment --engine ray`` against the local engine, same work, one machine.

Both engines run the real command (``python -m masqclip_cli segment``, a fresh process each run, as a user runs it)
on the same images -- synthetic scenes drawn with :func:`masqclip_cli.data.synthetic.generate` -- with the same model,
vocabulary (the shapes world's), tasks (panoptic + instance), formats (panoptic + coco), batch size 1 and torch
threads. Equal worker counts: the local engine is one process (a decode thread + the model); the Ray engine gets a
Ray instance of this machine's CPUs, started once by this script (what ``ray start --head`` gives; its start-up time
is reported apart), and runs one model worker (1 CPU reserved, the same torch threads) plus decode tasks of 1 CPU.
The runs alternate local / Ray, ``--repeats`` of each per model and image count; medians are compared:

- ``ratio``: Ray wall / local wall of the whole command (target <= 1.15);
- ``marginal_ratio`` (with two image counts): (wall(N2) - wall(N1)) of Ray over that of local: the per-item cost
  once everything has started, i.e. what the overhead tends to on long runs;
- ``same_output``: the two output folders hold the same bytes (every file).

Fixed costs dominate small runs: the Ray worker is a new process that imports torch and loads the model, and Ray Data
schedules decode tasks and the actor pool; the local command pays its import and model load too (also measured).

One torch thread by default: on this shared 2-core machine, 2-thread torch under other load can be many times slower
(the demo model's 24 scenes: 1.8 s at 1 thread, 97 s at 2 threads with one other busy process), and how badly
differs between the local process and a Ray worker, which would make the ratio measure that, not the engine.

    python bench/ray_overhead.py                         # tiny-random and demo, 24 and 48 scenes, 2 repeats
    python bench/ray_overhead.py --models demo --counts 48 --repeats 3

Writes bench/results/ray_overhead.json; ``--smoke``: tiny-random, 3 small scenes, one run each, to ``--out`` only.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from _common import RESULTS, child_env, machine_info, masqclip_command, write_json

TARGET = 1.15
TASKS, FORMATS = "panoptic,instance", "panoptic,coco"


def _tree(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def _run(command: list[str], env: dict[str, str]) -> dict:
    load = round(os.getloadavg()[0], 2)
    start = time.perf_counter()
    done = subprocess.run(command, env=env, capture_output=True, text=True, check=False)
    wall = time.perf_counter() - start
    if done.returncode != 0:
        sys.stderr.write(done.stderr[-4000:])
        raise SystemExit(f"failed ({done.returncode}): {' '.join(command)}")
    summary = next((ln for ln in done.stderr.splitlines() if " done, " in ln), "")
    engine = re.search(r" in ([0-9.]+) s ", summary)
    return {"wall_s": round(wall, 3), "engine_wall_s": float(engine.group(1)) if engine else None,
            "loadavg_1m": [load, round(os.getloadavg()[0], 2)], "summary": summary.split(" in ")[0]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="tiny-random,demo", help="comma list")
    parser.add_argument("--counts", default="24,48", help="comma list of scene counts (two give the marginal ratio)")
    parser.add_argument("--size", type=int, default=256, help="scene size in pixels (square)")
    parser.add_argument("--short-side", type=int, default=None, help="default: each model's own test size")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--threads", type=int, default=1, help="torch threads of either engine's model (1: see "
                        "the module docstring)")
    parser.add_argument("--smoke", action="store_true", help="tiny-random, 3 scenes of 96 px, one run each")
    parser.add_argument("--out", type=Path, default=RESULTS / "ray_overhead.json")
    args = parser.parse_args()
    if args.smoke:
        args.models, args.counts, args.size, args.repeats, args.short_side = "tiny-random", "3", 96, 1, 64
    counts = sorted({int(c) for c in args.counts.split(",")})
    models = [m.strip() for m in args.models.split(",") if m.strip()]

    import ray

    from masqclip_cli.data.synthetic import SynthConfig, generate

    t_all = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="masqclip-bench-ray-") as tmp:
        work = Path(tmp)
        # RAY_AUTH_MODE=token: a driver given the address (not "auto") uses the token the local instance made
        env = child_env(MASQCLIP_CACHE_DIR=str(work / "cache"), RAY_AUTH_MODE="token")
        os.environ["MASQCLIP_CACHE_DIR"] = env["MASQCLIP_CACHE_DIR"]  # the cluster's workers inherit it
        generate(work / "world", SynthConfig(images=max(counts), size=(args.size, args.size), crops=False))
        scenes = sorted((work / "world" / "images" / "val").iterdir())
        folders = {}
        for n in counts:
            folder = work / f"scenes-{n}"
            folder.mkdir()
            for path in scenes[:n]:
                os.link(path, folder / path.name)
            folders[n] = folder
        vocab = str(work / "world" / "vocab.txt")

        t0 = time.perf_counter()
        ray.init(num_cpus=os.cpu_count(), include_dashboard=False, logging_level="ERROR")
        cluster_start_s = time.perf_counter() - t0
        address = ray.get_runtime_context().gcs_address
        rows = []
        try:
            for model in models:
                base = ["segment", "--model", model, "--vocab", vocab, "--task", TASKS, "--format", FORMATS,
                        "--batch-size", "1", "--threads", str(args.threads)]
                if args.short_side is not None:
                    base += ["--short-side", str(args.short_side)]
                ray_flags = ["--engine", "ray", "--ray-address", address, "--ray-workers", "1",
                             "--ray-cpus-per-worker", "1"]
                row: dict = {"model": model, "by_count": []}
                for n in counts:
                    runs: dict[str, list[dict]] = {"local": [], "ray": []}
                    same = True
                    for rep in range(args.repeats):
                        outs = {}
                        for engine in ("local", "ray"):  # alternating, so a change in load hits both
                            out = work / f"out-{model}-{n}-{rep}-{engine}"
                            command = masqclip_command(*base, str(folders[n]), "--out", str(out),
                                                       *(ray_flags if engine == "ray" else []))
                            runs[engine].append(_run(command, env))
                            outs[engine] = out
                        same = same and _tree(outs["local"]) == _tree(outs["ray"])
                    local_s = statistics.median(r["wall_s"] for r in runs["local"])
                    ray_s = statistics.median(r["wall_s"] for r in runs["ray"])
                    entry = {
                        "images": n,
                        "local_wall_s": round(local_s, 3),
                        "ray_wall_s": round(ray_s, 3),
                        "ratio": round(ray_s / local_s, 3),
                        "local_engine_wall_s": statistics.median(r["engine_wall_s"] for r in runs["local"]),
                        "ray_engine_wall_s": statistics.median(r["engine_wall_s"] for r in runs["ray"]),
                        "same_output": same,
                        "runs": runs,
                    }
                    entry["meets_target"] = entry["ratio"] <= TARGET
                    row["by_count"].append(entry)
                    print(f"{model}, {n} scenes: local {local_s:.1f} s, ray {ray_s:.1f} s, ratio {entry['ratio']}"
                          f" (same output: {same}; load {os.getloadavg()[0]:.2f})", flush=True)
                if len(counts) >= 2:
                    first, last = row["by_count"][0], row["by_count"][-1]
                    extra = last["images"] - first["images"]
                    local_item = (last["local_wall_s"] - first["local_wall_s"]) / extra
                    ray_item = (last["ray_wall_s"] - first["ray_wall_s"]) / extra
                    row["marginal"] = {
                        "local_s_per_item": round(local_item, 4),
                        "ray_s_per_item": round(ray_item, 4),
                        "marginal_ratio": round(ray_item / local_item, 3) if local_item > 0 else None,
                    }
                    print(f"{model}: per extra item local {local_item:.3f} s, ray {ray_item:.3f} s", flush=True)
                rows.append(row)
        finally:
            ray.shutdown()

    ratios = [e["ratio"] for row in rows for e in row["by_count"]]
    marginal = [row["marginal"]["marginal_ratio"] for row in rows if row.get("marginal")]
    result = {
        "bench": "ray_overhead",
        **machine_info(args.threads),
        "ray": ray.__version__,
        "smoke": args.smoke,
        "scenes": {"generator": "masqclip_cli.data.synthetic.generate", "size": [args.size, args.size],
                   "counts": counts},
        "tasks": TASKS.split(","),
        "formats": FORMATS.split(","),
        "batch_size": 1,
        "workers": {"local": "1 process: a decode thread + the model", "ray": "1 model worker (1 CPU reserved) + "
                    f"decode tasks of 1 CPU, on a Ray instance of {os.cpu_count()} CPUs"},
        "cluster_start_s": round(cluster_start_s, 2),
        "rows": rows,
        "targets": {"ray_over_local_wall": {"max": TARGET, "measured": ratios,
                                            "measured_marginal": marginal,
                                            "met": all(r <= TARGET for r in ratios)}},
        "total_s": round(time.perf_counter() - t_all, 1),
    }
    write_json(args.out, result)


if __name__ == "__main__":
    main()
