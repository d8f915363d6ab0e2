"""Streaming memory: peak RSS of ``masqclip segment`` over 200 vs 2000 images (it should not grow with the count).

Small generated images (64×64 PNG, 16 distinct pictures copied; ``--short-side 0`` keeps them at that size so the
run measures the pipeline, not the model), ``tiny-random``, all three tasks with their default formats (COCO JSON,
panoptic PNGs + JSON, label maps), so every writer's run-level accumulation is exercised. Each run is a fresh
``python -m masqclip_cli segment`` process started by a fresh helper process; its peak RSS is the helper's
``getrusage(RUSAGE_CHILDREN).ru_maxrss``. The text-embedding cache (a temporary folder) is filled by a 1-image
warm-up run first, whose peak is reported too.

    python bench/streaming_memory.py                     # 200 and 2000 images
    python bench/streaming_memory.py --counts 200,2000,5000 --size 128

Writes bench/results/streaming_memory.json.
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
from pathlib import Path

from _common import RESULTS, child_env, machine_info, masqclip_command, run_peak_rss, write_images, write_json


def segment_run(images: Path, out: Path, args: argparse.Namespace, env: dict[str, str]) -> dict:
    command = masqclip_command(
        "segment", str(images), "--model", args.model, "--vocab", args.vocab, "--task", args.tasks,
        "--out", str(out), "--threads", str(args.threads), "--short-side", str(args.short_side),
        "--device", "cpu",
    )
    measured = run_peak_rss(command, env=env)
    if measured["rc"] != 0:
        raise SystemExit(f"masqclip segment exited {measured['rc']}: {' '.join(command)}")
    return measured


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--counts", default="200,2000", help="comma list of image counts")
    parser.add_argument("--size", type=int, default=64, help="image side in pixels")
    parser.add_argument("--short-side", type=int, default=0, help="segment --short-side (0: keep the size)")
    parser.add_argument("--model", default="tiny-random")
    parser.add_argument("--vocab", default="ade20k-150")
    parser.add_argument("--tasks", default="panoptic,semantic,instance")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--smoke", action="store_true", help="tiny setting for the smoke test (3 and 6 images)")
    parser.add_argument("--out", type=Path, default=RESULTS / "streaming_memory.json")
    args = parser.parse_args()
    if args.smoke:
        args.counts, args.size, args.tasks = "3,6", 32, "panoptic"
    counts = sorted({int(c) for c in args.counts.split(",") if c.strip()})
    with tempfile.TemporaryDirectory(prefix="masqclip-bench-") as tmp_name:
        tmp = Path(tmp_name)
        env = child_env(MASQCLIP_CACHE_DIR=str(tmp / "cache"))
        write_images(tmp / "images", max(counts), args.size)
        rows = []
        for count in [1, *counts]:
            folder = tmp / f"images_{count}"
            folder.mkdir()
            for path in sorted((tmp / "images").iterdir())[:count]:
                (folder / path.name).hardlink_to(path)
            measured = segment_run(folder, tmp / f"out_{count}", args, env)
            outputs = sum(p.stat().st_size for p in (tmp / f"out_{count}").rglob("*") if p.is_file())
            rows.append({
                "images": count,
                "warmup": count == 1,
                "peak_rss_mib": round(measured["maxrss_kib"] / 1024, 1),
                "wall_s": round(measured["wall_s"], 2),
                "items_per_s_incl_startup": round(count / measured["wall_s"], 2),
                "output_mib": round(outputs / 2**20, 2),
            })
            print(f"{count} images: peak RSS {rows[-1]['peak_rss_mib']} MiB, {rows[-1]['wall_s']} s", flush=True)
            shutil.rmtree(tmp / f"out_{count}")
    measured_rows = [r for r in rows if not r["warmup"]]
    result = {
        "bench": "streaming_memory",
        **machine_info(args.threads),
        "model": args.model,
        "vocab": args.vocab,
        "tasks": args.tasks.split(","),
        "image_size": [args.size, args.size],
        "short_side": args.short_side,
        "rows": rows,
        "peak_rss_ratio": round(measured_rows[-1]["peak_rss_mib"] / measured_rows[0]["peak_rss_mib"], 3),
        "ratio_of": [measured_rows[-1]["images"], measured_rows[0]["images"]],
    }
    write_json(args.out, result)
    print(f"peak RSS ratio {result['ratio_of'][0]} / {result['ratio_of'][1]} images: {result['peak_rss_ratio']}")


if __name__ == "__main__":
    main()
