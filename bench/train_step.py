"""Seconds per training iteration of each `masqclip train` stage, and FLOPs per iteration (for GPU-hour estimates).

    python bench/train_step.py                                   # tiny + full-size geometries (about 10 min on 2 cores)
    python bench/train_step.py --geometries tiny --iterations 5
    python bench/train_step.py --smoke --out /tmp/x.json         # tiny, 2 iterations per stage (smoke test)

Each stage runs through the real loop (`masqclip_cli.training.loop.train`) on a synthetic dataset generated in a
temporary folder; the seconds are the loop's own per-iteration wall time after a warm-up iteration (data, forward,
losses, backward, optimiser step). Geometries:

* ``tiny``: the `tiny` proposal network + the tiny test CLIP (112 px ViT), images 128², batch 2;
* ``full``: the official geometry (Mask2Former R50, 100 queries, 12,544 points; ViT-L/14@336 for MasQ-tuning), random
  weights, images 1024² (the official augmentation size), batch 1 (the official per-GPU batch is 2 for the teacher,
  1 for the student and MasQ-tuning).

FLOPs are counted by ``torch.utils.flop_counter.FlopCounterMode`` on one forward + backward (grid_sample, the
deformable attention's sampling, and the losses are not counted, so they are a lower bound); docs/training.md turns
them into GPU-hour estimates for the official recipe.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import RESULTS, machine_info, write_json  # noqa: E402

from masqclip_cli.data.synthetic import SynthConfig, generate  # noqa: E402
from masqclip_cli.training.config import load_config  # noqa: E402
from masqclip_cli.training.loop import train  # noqa: E402

GEOMETRIES = {
    "tiny": {"proposals": "tiny", "clip": "tiny", "size": 128, "batch_size": 2, "num_points": 12544},
    "full": {"proposals": "m2f-r50", "clip": "ViT-L-14-336-quickgelu", "size": 1024, "batch_size": 1,
             "num_points": 12544},
}


def _stage_times(stage: str, geometry: dict, root: Path, out: Path, iterations: int, teacher: Path | None) -> dict:
    times: list[float] = []
    options = {
        "dataset": "synthetic", "root": str(root), "out": str(out), "iterations": iterations, "workers": 0,
        "checkpoint_every": 0, "log_every": 1, "augment": "fixed", "size": geometry["size"],
        "batch_size": geometry["batch_size"], "num_points": geometry["num_points"], "resume": False,
    }
    if stage == "proposals":
        options.update(proposals=geometry["proposals"], clip=geometry["clip"])
    elif stage == "distill":
        options.update(teacher=str(teacher), rounds=1)
    else:
        options.update(init=str(teacher))

    last = [time.perf_counter()]

    def on_step(phase: str, done: int) -> None:
        now = time.perf_counter()
        times.append(now - last[0])
        last[0] = now

    start = time.perf_counter()
    result = train(load_config(stage, options=options), on_step=on_step)
    steady = times[1:] if len(times) > 1 else times
    return {"seconds_per_iteration": statistics.median(steady), "all": [round(t, 3) for t in times],
            "wall_seconds": round(time.perf_counter() - start, 2), "final": str(result.final)}


def _flops(stage: str, geometry: dict, final: Path) -> float | None:
    """FLOPs of one forward + backward of the trained module on one image of the geometry's size."""
    from torch.utils.flop_counter import FlopCounterMode

    from masqclip_cli.modeling.factory import load_model

    model = load_model(final)
    size = geometry["size"]
    image = torch.randint(0, 255, (3, size, size), dtype=torch.uint8)
    counter = FlopCounterMode(display=False)
    if stage in ("proposals", "distill"):
        network = model.proposals.train()
        x = network.normalize_and_pad([image])
        with counter:
            out = network(x)
            loss = out.pred_masks.float().mean() + sum(a["pred_masks"].float().mean() for a in out.aux)
            loss.backward()
            if stage == "distill":  # the frozen teacher's forward on the same batch (counted with autograd on:
                network(x)          # FlopCounterMode's module hooks fail under no_grad; the FLOPs are the same)
    else:
        masq = model.masq
        for p in masq.trainable_parameters():
            p.requires_grad_(True)
        with torch.no_grad():
            network = model.proposals.eval()
            x = network.normalize_and_pad([image])
            logits = network(x).pred_masks.float()
            pixels = masq.preprocess(image[None].float())
            allowed = masq.attention_masks(logits)
        with counter:
            masq(pixels, allowed).float().sum().backward()
    return float(counter.get_total_flops())


# The official recipe (METHOD.md §3.2): (stage, bench stage, iterations, global batch)
OFFICIAL_RECIPE = (
    ("teacher, cross-dataset (COCO panoptic)", "proposals", 200_000, 16),
    ("teacher, base-novel (COCO-48)", "proposals", 100_000, 16),
    ("distillation, 2 rounds", "distill", 2 * 30_000, 4),
    ("MasQ-tuning", "masq", 10_000, 4),
)
SUSTAINED_TFLOPS = 40.0  # per GPU: AMP on an A100-class GPU at ~13 % of its 312 TFLOP/s fp16 peak


def gpu_hour_estimates(full: dict) -> list[dict]:
    """GPU hours of the official recipe from the full geometry's FLOPs per training image.

    MasQ-tuning's counted FLOPs cover the CLIP branch (forward + backward); the frozen proposal network's forward,
    which every MasQ-tuning image also pays, is the distillation count minus the teacher count (distillation =
    the student's forward + backward + the frozen teacher's forward of the same network)."""
    flops = {stage: full[stage]["flops_per_image"] for stage in ("proposals", "distill", "masq") if stage in full}
    if "masq" in flops and "distill" in flops and "proposals" in flops:
        flops["masq"] += flops["distill"] - flops["proposals"]
    rows = []
    for name, stage, iterations, batch in OFFICIAL_RECIPE:
        if flops.get(stage) is None:
            continue
        total = flops[stage] * iterations * batch
        hours = total / (SUSTAINED_TFLOPS * 1e12) / 3600
        rows.append({"stage": name, "iterations": iterations, "global_batch": batch,
                     "tflop_per_image": round(flops[stage] / 1e12, 3), "total_pflop": round(total / 1e15, 1),
                     "gpu_hours_at_40_tflops": round(hours, 1)})
    return rows


def _add_estimates(results: dict) -> None:
    """Add the official-recipe GPU-hour estimates (and how they are made) when the full geometry was measured."""
    if "full" not in results["geometries"]:
        return
    results["official_recipe_estimate"] = gpu_hour_estimates(results["geometries"]["full"])
    results["official_recipe_estimate_basis"] = (
        f"FLOPs per training image x iterations x global batch / {SUSTAINED_TFLOPS:g} TFLOP/s sustained per GPU; "
        "FlopCounterMode counts (grid_sample, matching and losses not counted): a lower bound"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--geometries", default="tiny,full")
    parser.add_argument("--iterations", type=int, default=4, help="iterations per stage (the first is warm-up)")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--smoke", action="store_true", help="tiny geometry, 2 iterations, small images")
    parser.add_argument("--out", type=Path, default=RESULTS / "train_step.json")
    parser.add_argument("--estimate-only", action="store_true",
                        help="recompute the GPU-hour estimates of an existing --out file, measure nothing")
    args = parser.parse_args()
    if args.estimate_only:
        results = json.loads(args.out.read_text())
        _add_estimates(results)
        write_json(args.out, results)
        print(json.dumps(results["official_recipe_estimate"], indent=1))
        return
    torch.set_num_threads(args.threads)
    geometries = ["tiny"] if args.smoke else [g.strip() for g in args.geometries.split(",") if g.strip()]
    iterations = 2 if args.smoke else max(2, args.iterations)
    results: dict = {"bench": "train_step", **machine_info(args.threads), "iterations": iterations,
                     "geometries": {}}
    with tempfile.TemporaryDirectory() as tmp:
        tmp_path = Path(tmp)
        for name in geometries:
            geometry = dict(GEOMETRIES[name])
            if args.smoke:
                geometry.update(size=64, num_points=256)
            root = tmp_path / f"synth-{name}"
            generate(root, SynthConfig(images=4, seed=0, split="train", size=(256, 256), base_only=True,
                                       crops=False))
            entry: dict = {"config": geometry}
            results["geometries"][name] = entry
            teacher = None
            for stage in ("proposals", "distill", "masq"):
                t = _stage_times(stage, geometry, root, tmp_path / f"{name}-{stage}", iterations, teacher)
                if stage == "proposals":
                    teacher = Path(t["final"])
                t.pop("final")
                if not args.smoke:
                    t["flops_per_image"] = _flops(stage, geometry, teacher)
                entry[stage] = t
                print(name, stage, json.dumps(t), flush=True)
                write_json(args.out, results)  # after every stage: a run cut off keeps what it measured
    _add_estimates(results)
    write_json(args.out, results)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
