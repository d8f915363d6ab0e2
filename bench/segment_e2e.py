"""End-to-end ``segment``: items/s, peak RSS and where the wall time goes, per model.

Runs :func:`masqclip_cli.inference.engine.segment` (what ``masqclip segment`` runs) on a few images with a 150-class
vocabulary (``ade20k-150``) and all three tasks (panoptic, semantic, instance, written in their default formats:
panoptic PNGs + JSON, label maps, COCO JSON). Each model runs in a fresh worker process (so its peak RSS is its own):
load the model, encode the vocabulary once (cache in a temporary folder, timed apart), one warm-up run, then
``--repeats`` runs, each into a fresh output folder; the repetition with the median wall time is reported.

The wall time is split as the engine reports it (decode, model, post-process, write) and the model time further,
by wrapping module forwards with ``time.perf_counter`` (no package code is changed):

- preprocess: ``proposals.normalize_and_pad`` + ``masq.preprocess`` (both branches' input normalisation/resizing);
- backbone / pixel_decoder / transformer_decoder: the proposal network's three modules;
- clip: ``masq.attention_masks`` + the MasQ visual forward (Q mask tokens);
- classifier: text-bank classification; model_other: the rest of ``MasQCLIP.forward`` (padding copies, bucketing).

Decode (reading, EXIF, resize to the short side) runs in a background thread, overlapped with the model: it is
reported but is not part of the wall-time sum. ``other`` = wall − model − post-process − write (listing, run
fingerprint, waiting for the decoder). "Model share of wall time" = model / wall (target ≥ 0.85 for full-random).

    python bench/segment_e2e.py                                  # tiny-random, full-random (and demo if registered)
    python bench/segment_e2e.py --models tiny-random --images my_photos/

Writes bench/results/segment_e2e.json.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from _common import RESULTS, SAMPLE_IMAGES, child_env, install_stage_timers, machine_info, write_json

FORMAT_FOR_TASK = {"instance": "coco", "panoptic": "panoptic", "semantic": "labels"}  # the CLI's defaults
SHARE_TARGET = 0.85


def worker(args: argparse.Namespace) -> dict:
    """One model, in this (fresh) process."""
    import resource

    import torch

    from masqclip_cli.inference.engine import RunOptions, segment
    from masqclip_cli.inference.postprocess import PostprocessConfig
    from masqclip_cli.modeling.factory import MODEL_REGISTRY, ModelNotAvailableError, load_model
    from masqclip_cli.modeling.text import TextEmbeddingCache
    from masqclip_cli.vocab import load_vocabulary

    torch.set_num_threads(args.threads)
    name = args.worker
    if name not in MODEL_REGISTRY and not Path(name).is_file():
        return {"model": name, "skipped": f"'{name}' is not a registered model (registered: "
                f"{', '.join(MODEL_REGISTRY)})"}
    t0 = time.perf_counter()
    try:
        model = load_model(name)
    except ModelNotAvailableError as exc:
        return {"model": name, "skipped": f"weights not on this machine: {str(exc).splitlines()[0][:300]}"}
    load_s = time.perf_counter() - t0
    vocab = load_vocabulary(args.vocab)
    t0 = time.perf_counter()
    model.set_vocabulary(vocab, cache=TextEmbeddingCache(args.cache_dir))
    text_s = time.perf_counter() - t0
    tasks = tuple(args.tasks.split(","))
    options = RunOptions(formats=tuple(FORMAT_FOR_TASK[t] for t in tasks), postprocess=PostprocessConfig(tasks=tasks),
                         short_side=args.short_side, batch_size=args.batch_size)
    acc = install_stage_timers(model)
    work = Path(args.work_dir)
    runs = []
    for rep in range(args.warmup + args.repeats):
        for key in acc:
            acc[key] = 0.0
        summary = segment(model, vocab, str(args.images), work / f"out_{name}_{rep}", options, model_id=name)
        if summary.failed or summary.skipped or summary.done == 0:
            raise SystemExit(f"{name}: segment failed or skipped items: {summary.failed or summary.skipped}")
        if rep < args.warmup:
            continue
        seconds = {"decode": summary.seconds["decode"], **acc}
        seconds["model_other"] = summary.seconds["model"] - sum(acc.values())
        seconds["postprocess"] = summary.seconds["postprocess"]
        seconds["write"] = summary.seconds["write"]
        seconds["other"] = summary.wall_s - summary.seconds["model"] - seconds["postprocess"] - seconds["write"]
        runs.append({"wall_s": summary.wall_s, "done": summary.done, "model_s": summary.seconds["model"],
                     "seconds": seconds})
    walls = [r["wall_s"] for r in runs]
    chosen = sorted(runs, key=lambda r: r["wall_s"])[(len(runs) - 1) // 2]  # the median run (lower median)
    wall = chosen["wall_s"]
    return {
        "model": name,
        "tasks": list(tasks),
        "formats": list(options.formats),
        "vocab": args.vocab,
        "classes": len(vocab),
        "images": chosen["done"],
        "short_side": args.short_side,
        "batch_size": args.batch_size,
        "threads": torch.get_num_threads(),
        "load_model_s": round(load_s, 2),
        "text_bank_first_s": round(text_s, 2),
        "repeats": len(runs),
        "wall_s_all": [round(w, 3) for w in walls],
        "wall_s": round(wall, 3),
        "items_per_s": round(chosen["done"] / wall, 3),
        "s_per_item": round(wall / chosen["done"], 3),
        "seconds": {k: round(v, 4) for k, v in chosen["seconds"].items()},
        "model_s": round(chosen["model_s"], 3),
        "model_share_of_wall": round(chosen["model_s"] / wall, 3),
        "share_of_wall": {k: round(v / wall, 3) for k, v in chosen["seconds"].items() if k != "decode"},
        "median_wall_s": round(statistics.median(walls), 3),
        "peak_rss_gib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 3),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="tiny-random,full-random,demo", help="comma list")
    parser.add_argument("--images", type=Path, default=SAMPLE_IMAGES, help="folder of images")
    parser.add_argument("--vocab", default="ade20k-150")
    parser.add_argument("--tasks", default="panoptic,semantic,instance")
    parser.add_argument("--short-side", type=int, default=640)
    parser.add_argument("--batch-size", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--smoke", action="store_true", help="tiny-random only, small images, one run")
    parser.add_argument("--out", type=Path, default=RESULTS / "segment_e2e.json")
    parser.add_argument("--worker", help=argparse.SUPPRESS)  # internal: run one model, print its row as JSON
    parser.add_argument("--cache-dir", help=argparse.SUPPRESS)
    parser.add_argument("--work-dir", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print("ROW " + json.dumps(worker(args)), flush=True)
        return
    if args.smoke:
        args.models, args.short_side, args.repeats, args.warmup = "tiny-random", 128, 1, 0
    rows, skipped = [], []
    with tempfile.TemporaryDirectory(prefix="masqclip-bench-") as tmp:
        for name in [m.strip() for m in args.models.split(",") if m.strip()]:
            command = [sys.executable, __file__, "--worker", name, "--images", str(args.images),
                       "--vocab", args.vocab, "--tasks", args.tasks, "--short-side", str(args.short_side),
                       "--batch-size", str(args.batch_size), "--repeats", str(args.repeats),
                       "--warmup", str(args.warmup), "--threads", str(args.threads),
                       "--cache-dir", str(Path(tmp) / "cache"), "--work-dir", tmp]
            done = subprocess.run(command, env=child_env(), capture_output=True, text=True, check=False)
            lines = [ln[4:] for ln in done.stdout.splitlines() if ln.startswith("ROW ")]
            if done.returncode != 0 or not lines:
                sys.stderr.write(done.stderr[-4000:])
                raise SystemExit(f"worker for {name} failed ({done.returncode})")
            row = json.loads(lines[-1])
            if "skipped" in row:
                skipped.append(row)
                print(f"{name}: skipped ({row['skipped']})", flush=True)
                continue
            rows.append(row)
            s = row["seconds"]
            print(f"{name}: {row['items_per_s']} items/s, model share {row['model_share_of_wall']}, peak RSS "
                  f"{row['peak_rss_gib']} GiB; " + ", ".join(f"{k} {v:.3f}" for k, v in s.items()), flush=True)
    if not rows:
        raise SystemExit("no model ran")
    result = {
        "bench": "segment_e2e",
        **machine_info(args.threads),
        "image_folder": str(args.images),
        "model_share_target": SHARE_TARGET,
        "stage_definitions": {
            "decode": "read + EXIF + RGB + resize to the short side, in a background thread (overlaps the model)",
            "preprocess": "proposals.normalize_and_pad + masq.preprocess",
            "backbone": "proposals.backbone", "pixel_decoder": "proposals.pixel_decoder",
            "transformer_decoder": "proposals.predictor", "clip": "masq.attention_masks + MasQ visual forward",
            "classifier": "text-bank classification", "model_other": "rest of MasQCLIP.forward",
            "postprocess": "engine postprocess (all tasks)", "write": "writers, item records and run-level files",
            "other": "wall - model - postprocess - write",
        },
        "rows": rows,
        "skipped": skipped,
    }
    write_json(args.out, result)


if __name__ == "__main__":
    main()
