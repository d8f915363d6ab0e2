#!/usr/bin/env python
"""Train a small open_clip CLIP on the synthetic shapes world (CPU, minutes) and report zero-shot crop accuracy.

    python scripts/train_shapes_clip.py --out models/shapes-clip.safetensors --data shapes-data \
        --images 1500 --time-budget 420

writes ``shapes-clip.safetensors`` (an open_clip state_dict), ``shapes-clip.json`` (its open_clip config) and
``shapes-clip.report.json`` (loss curve, time, zero-shot accuracy on a held-out split: base and novel). Load it with
``create_open_clip(json.load(open("shapes-clip.json")), "shapes-clip.safetensors")`` or
``load_shapes_clip(path)`` of ``scripts/shapes_clip.py`` (next to this script), which holds the trainer.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import sys
import time
from pathlib import Path

try:
    import masqclip_cli  # noqa: F401
except ImportError:  # run from a clone without `pip install -e .`
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch
from shapes_clip import (  # scripts/shapes_clip.py: this script's folder is sys.path[0]
    SHAPES_CLIP_CONFIG,
    TrainConfig,
    ensure_split,
    load_shapes_clip,
    load_split,
    save_clip,
    train_clip,
    zero_shot_eval,
)

from masqclip_cli.data.synthetic import DEFAULT_NOVEL


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--out", required=True, type=Path, help="weights file (.safetensors or .pt); the config JSON and "
                   "the report go next to it")
    p.add_argument("--data", type=Path, default=None, help="synthetic dataset folder (default: shapes-data/ next to "
                   "--out); splits that are absent are drawn with masqclip_cli.data.synthetic.generate")
    p.add_argument("--images", type=int, default=None, help="training scenes to draw (default 1500 when the split is "
                   "absent; when given, an existing split must match)")
    p.add_argument("--train-split", default="clip_train")
    p.add_argument("--eval-split", default="clip_val")
    p.add_argument("--eval-images", type=int, default=200, help="held-out scenes to draw for the evaluation")
    p.add_argument("--eval-seed", type=int, default=1000, help="seed of the held-out split (its own seed)")
    p.add_argument("--no-scenes", action="store_true", help="train on crops only (not the whole scenes)")
    p.add_argument("--epochs", type=float, default=10.0)
    p.add_argument("--steps", type=int, default=None, help="optimiser steps (overrides --epochs)")
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--weight-decay", type=float, default=0.1)
    p.add_argument("--seed", type=int, default=0, help="seeds the training split, the initialisation and sampling")
    p.add_argument("--time-budget", type=float, default=None, help="seconds for the training loop (the LR "
                   "schedule follows the time spent; data drawing and evaluation are not counted)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: all cores on an idle "
                   "machine, 1 when other processes already keep a core busy: two threads contending with another "
                   "job run several times slower than one)")
    p.add_argument("--no-caption-aug", action="store_true", help="always use the generator's caption")
    p.add_argument("--no-dedup-targets", action="store_true", help="plain InfoNCE (equal captions are negatives)")
    p.add_argument("--config", type=Path, default=None, help="an open_clip config JSON replacing the default")
    p.add_argument("--image-size", type=int, default=None)
    p.add_argument("--patch-size", type=int, default=None)
    p.add_argument("--width", type=int, default=None, help="vision width")
    p.add_argument("--layers", type=int, default=None, help="vision layers")
    p.add_argument("--text-width", type=int, default=None)
    p.add_argument("--text-layers", type=int, default=None)
    p.add_argument("--embed-dim", type=int, default=None)
    p.add_argument("--report", type=Path, default=None, help="report JSON (default: <out stem>.report.json)")
    return p.parse_args(argv)


def clip_config_from(args: argparse.Namespace) -> dict:
    cfg = json.loads(args.config.read_text()) if args.config else copy.deepcopy(SHAPES_CLIP_CONFIG)
    v, t = cfg["vision_cfg"], cfg["text_cfg"]
    for key, section, name in [("image_size", v, "image_size"), ("patch_size", v, "patch_size"),
                               ("width", v, "width"), ("layers", v, "layers"), ("text_width", t, "width"),
                               ("text_layers", t, "layers"), ("embed_dim", cfg, "embed_dim")]:
        value = getattr(args, key)
        if value is not None:
            section[name] = value
    return cfg


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    load = os.getloadavg()[0]
    threads = args.threads or (1 if load >= 0.75 else torch.get_num_threads())
    torch.set_num_threads(threads)
    out = args.out
    data_dir = args.data or out.parent / "shapes-data"
    report_path = args.report or out.with_name(out.stem + ".report.json")
    clip_config = clip_config_from(args)
    size = int(clip_config["vision_cfg"]["image_size"])

    def log(msg: str) -> None:
        print(msg, file=sys.stderr, flush=True)

    t0 = time.perf_counter()
    train_images = args.images
    if train_images is None and not (data_dir / f"crops_{args.train_split}.jsonl").is_file():
        train_images = 1500
    train_meta = ensure_split(data_dir, args.train_split, train_images, args.seed, log=log)
    eval_meta = ensure_split(data_dir, args.eval_split, args.eval_images, args.eval_seed, log=log)
    novel = tuple(train_meta.get("novel", DEFAULT_NOVEL))
    train = load_split(data_dir, args.train_split, size, scenes=not args.no_scenes)
    held_out = load_split(data_dir, args.eval_split, size, scenes=True)
    data_seconds = time.perf_counter() - t0
    log(f"data: {train.n_crops} crops + {train.n_scenes} scenes for training, {held_out.n_crops} held-out crops "
        f"({data_seconds:.0f}s)")

    cfg = TrainConfig(steps=args.steps, epochs=args.epochs, batch_size=args.batch, lr=args.lr,
                      weight_decay=args.weight_decay, seed=args.seed, time_budget=args.time_budget,
                      caption_aug=not args.no_caption_aug, dedup_targets=not args.no_dedup_targets)
    model, spec, record = train_clip(train, clip_config, cfg, log=log)

    t1 = time.perf_counter()
    evaluation = zero_shot_eval(model, spec, held_out, novel=novel)
    eval_seconds = time.perf_counter() - t1
    saved = save_clip(model, clip_config, out)
    reloaded, _ = load_shapes_clip(out)  # the file must give back the same model
    with torch.no_grad():
        x = torch.randn(4, 3, size, size, generator=torch.Generator().manual_seed(0))
        same = torch.equal(model.encode_image(x), reloaded.encode_image(x))
    n_params = sum(p.numel() for p in model.parameters())

    report = {
        "clip_config": clip_config,
        "parameters": n_params,
        "files": saved,
        "reload_identical": same,
        "data": {"folder": str(data_dir), "train_split": args.train_split, "train": train_meta,
                 "eval_split": args.eval_split, "eval": eval_meta, "novel": list(novel),
                 "train_crops": train.n_crops, "train_scenes": train.n_scenes, "eval_crops": held_out.n_crops},
        "training": record,
        "zero_shot_held_out": evaluation,
        "seconds": {"data": round(data_seconds, 2), "train": record["seconds"], "eval": round(eval_seconds, 2),
                    "total": round(time.perf_counter() - t0, 2)},
        "machine": {"torch": torch.__version__, "threads": torch.get_num_threads(), "cpu_count": os.cpu_count(),
                    "load_average_at_start": round(load, 2), "load_average_at_end": round(os.getloadavg()[0], 2),
                    "cpu": platform.processor() or platform.machine()},
    }
    report_path.parent.mkdir(parents=True, exist_ok=True)
    report_path.write_text(json.dumps(report, indent=1) + "\n", encoding="utf-8")
    summary = {k: evaluation[k] for k in ("photo", "bare")}
    lines = [f"loss {record['loss_first']:.3f} -> {record['loss_last']:.3f} in {record['steps']} steps "
             f"({record['seconds']:.0f}s); {n_params / 1e6:.2f}M parameters, {saved['bytes'] / 1e6:.1f} MB"]
    for entry in summary.values():
        lines.append(f"zero-shot held-out crops [{entry['template']}]: all {entry['accuracy']:.3f} base "
                     f"{entry['base']:.3f} novel {entry['novel']:.3f} (chance {evaluation['chance']:.3f}); "
                     f"scene recall@k {entry.get('scene_recall_at_k')}")
    lines.append(f"wrote {out}, {saved['config']}, {report_path}")
    print("\n".join(lines))
    return 0 if same else 1


if __name__ == "__main__":
    raise SystemExit(main())
