"""Build the demo model: the whole MasQCLIP recipe on the synthetic shapes world, from a fixed seed, on a CPU.

    python scripts/build_demo_model.py                      # the shipped model (about an hour on 2 cores)
    python scripts/build_demo_model.py --preset ci --work /tmp/demo-ci --no-install   # minutes: the CI check

Steps (each with `masqclip`'s own library calls, exactly as on COCO):

1. draw the worlds: a base-only training split (novel categories drawn but unannotated), a held-out validation
   split (its own seed, every category annotated) and a CLIP split (object crops + scene captions naming every
   category, base and novel: the role of CLIP's web pre-training);
2. train a small CLIP contrastively on the CLIP split (open_clip's own model classes, `scripts/train_shapes_clip.py`);
3. `train proposals`: the class-agnostic teacher on the base-only split;
4. `train distill`: 2 rounds of progressive distillation;
5. `train masq`: MasQ-tuning (`--tune q`) on the base classes;
6. evaluate on the held-out split (PQ / mIoU / mask AP, all / base / novel), proposal recall of the teacher and of an
   untrained network, mask-label accuracy of the tuned and the untuned (f_Q' = f_Q copy) model;
7. write the report (`<work>/report.json`, `docs/demo-model.md`) and install the model as
   `masqclip_cli/models/demo.safetensors` (package data) with the full shapes vocabulary, and sample scenes into
   `samples/images`.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
#: Where the shipped demo model lives: package data of masqclip_cli (BUNDLED_MODELS_DIR of the model registry).
DEMO_MODEL_PATH = REPO / "masqclip_cli" / "models" / "demo.safetensors"


@dataclass
class Preset:
    """Sizes and schedules of a recipe run."""

    image_size: int = 128
    train_images: int = 1500
    val_images: int = 150
    clip_images: int = 2400
    clip_val_images: int = 200
    clip_seconds: float | None = None  # a wall-clock budget makes the CLIP depend on the machine's load: off
    clip_steps: int | None = 1500
    clip_lr: float = 1e-3
    clip_eval_every: int = 100
    clip_patience: int | None = None  # the best validation step is kept; stopping early would cut the cosine
    clip_checkpoint_every: int = 50
    clip_semantic_targets: bool = True  # a bare name is a positive of every crop it is true of
    proposals: str = "demo"
    batch_size: int = 8
    teacher_iterations: int = 2500
    teacher_lr: float = 4e-4
    distill_iterations: int = 300
    distill_lr: float = 1e-4
    rounds: int = 2
    masq_iterations: int = 1200  # the longest MasQ-tuning tried; the length is chosen on the recipe validation split
    masq_lr: float = 1e-4  # the official recipe's (constant: lr_steps [] so that the candidates are one run's prefixes)
    masq_eval_every: int = 200  # candidate lengths: every this many iterations up to masq_iterations
    recipe_val_images: int = 100  # the recipe's validation split (seed 5): MasQ-tuning's length is chosen on it
    masq_untuned_candidate: bool = True  # 0 iterations (f_Q' = f_Q) competes too; the ci preset checks tuning itself
    num_points: int = 1024
    eval_limit: int | None = None
    sample_scenes: int = 6
    extra: dict[str, Any] = field(default_factory=dict)


PRESETS = {
    "full": Preset(),
    "ci": Preset(image_size=64, train_images=24, val_images=24, clip_images=60, clip_val_images=12, clip_steps=10,
                 clip_eval_every=0, clip_patience=None, clip_checkpoint_every=5, clip_semantic_targets=False,
                 proposals="tiny", batch_size=4, teacher_iterations=150, teacher_lr=1e-3, distill_iterations=4,
                 rounds=2, masq_iterations=300, masq_lr=1e-3, masq_eval_every=300, recipe_val_images=12,
                 masq_untuned_candidate=False,
                 num_points=256, sample_scenes=2),
}

SEEDS = {"train": 0, "val": 1, "clip": 2, "samples": 3, "clip_val": 4, "recipe_val": 5}


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)


def _synth(root: Path, split: str, images: int, size: int, base_only: bool, crops: bool) -> None:
    from masqclip_cli.data.synthetic import SynthConfig, generate

    if (root / "annotations" / f"panoptic_{split}.json").exists():
        return
    generate(root, SynthConfig(images=images, seed=SEEDS[split], split=split, size=(size, size), base_only=base_only,
                               crops=crops))


def _train_stage(stage: str, options: dict[str, Any]) -> dict[str, Any]:
    from masqclip_cli.training.config import load_config
    from masqclip_cli.training.loop import train

    t0 = time.perf_counter()
    result = train(load_config(stage, options=options))
    return {"final": str(result.final), "seconds": round(time.perf_counter() - t0, 1),
            "iterations_run": result.iterations_run,
            "seconds_per_iteration": result.seconds_per_iteration, "last_losses": result.last_losses,
            "evaluations": result.evaluations}


def _metrics(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def build(preset: Preset, work: Path, install: bool) -> dict[str, Any]:
    import torch

    from masqclip_cli.data.datasets import load_dataset
    from masqclip_cli.evaluation.labels import mask_label_accuracy
    from masqclip_cli.evaluation.proposals import proposal_recall
    from masqclip_cli.evaluation.runner import EvalOptions, evaluate
    from masqclip_cli.inference.postprocess import PostprocessConfig
    from masqclip_cli.modeling.factory import load_model, save_model
    from masqclip_cli.modeling.proposals.network import build_proposal_network
    if str(REPO / "scripts") not in sys.path:  # also when this file is loaded by path (the tests do)
        sys.path.insert(0, str(REPO / "scripts"))
    import shapes_clip  # scripts/shapes_clip.py: not part of the installed package

    torch.manual_seed(0)
    timings: dict[str, float] = {}
    report: dict[str, Any] = {"preset": asdict(preset), "seeds": SEEDS, "threads": torch.get_num_threads()}
    world = work / "world"
    clip_dir = work / "clip-data"

    t = time.perf_counter()
    log("drawing the synthetic worlds")
    _synth(world, "train", preset.train_images, preset.image_size, base_only=True, crops=False)
    _synth(world, "val", preset.val_images, preset.image_size, base_only=False, crops=True)
    _synth(world, "recipe_val", preset.recipe_val_images, preset.image_size, base_only=False, crops=False)
    shapes_clip.ensure_split(clip_dir, "clip", preset.clip_images, SEEDS["clip"],
                             size=(preset.image_size, preset.image_size))
    shapes_clip.ensure_split(clip_dir, "clip_val", preset.clip_val_images, SEEDS["clip_val"],
                             size=(preset.image_size, preset.image_size))
    timings["data"] = time.perf_counter() - t

    # --- 2. CLIP
    t = time.perf_counter()
    clip_file = work / "shapes-clip.safetensors"
    clip_config = dict(shapes_clip.SHAPES_CLIP_CONFIG)
    if not clip_file.exists():
        log("training the shapes CLIP")
        resolution = clip_config["vision_cfg"]["image_size"]
        data = shapes_clip.load_split(clip_dir, "clip", resolution)
        # The CLIP's own validation split (seed 4) picks its training length: never the reported held-out split.
        clip_val = shapes_clip.load_split(clip_dir, "clip_val", resolution, scenes=False)
        cfg = shapes_clip.TrainConfig(steps=preset.clip_steps, time_budget=preset.clip_seconds, seed=0,
                                      lr=preset.clip_lr, eval_every=preset.clip_eval_every,
                                      patience=preset.clip_patience, checkpoint_every=preset.clip_checkpoint_every,
                                      semantic_targets=preset.clip_semantic_targets)

        def validate(model: Any, spec: Any) -> float:
            bare = shapes_clip.zero_shot_eval(model, spec, clip_val, templates={"bare": "{}"})["bare"]
            return (bare["accuracy"] + bare["novel"]) / 2  # all and novel weigh alike: both have a target

        model, spec, record = shapes_clip.train_clip(data, clip_config, cfg, log=log, validate=validate,
                                                     checkpoint=work / "shapes-clip.checkpoint.pt")
        shapes_clip.save_clip(model, clip_config, clip_file)
        held_out = shapes_clip.load_split(world, "val", resolution, scenes=False)
        report["clip"] = {"training": {k: v for k, v in record.items() if k != "curve"},
                          "zero_shot_on_validation_crops": shapes_clip.zero_shot_eval(model, spec, clip_val),
                          "zero_shot_on_held_out_crops": shapes_clip.zero_shot_eval(model, spec, held_out)}
        (work / "clip-report.json").write_text(json.dumps(report["clip"], indent=1, default=str))
    else:
        report["clip"] = json.loads((work / "clip-report.json").read_text())
    timings["clip"] = time.perf_counter() - t
    clip_json = shapes_clip.sidecar_path(clip_file)

    common = {"dataset": "synthetic", "root": str(world), "augment": "fixed", "size": preset.image_size,
              "batch_size": preset.batch_size, "num_points": preset.num_points, "workers": 0, "seed": 0,
              "checkpoint_every": 500, "log_every": 25}

    # --- 3. teacher
    t = time.perf_counter()
    log("stage 1: the class-agnostic teacher")
    report["teacher"] = _train_stage("proposals", {
        **common, "out": str(work / "teacher"), "proposals": preset.proposals, "clip": str(clip_json),
        "clip_weights": str(clip_file), "iterations": preset.teacher_iterations, "lr": preset.teacher_lr})
    timings["teacher"] = time.perf_counter() - t

    # --- 4. distillation
    t = time.perf_counter()
    log("stage 2: progressive distillation")
    report["distill"] = _train_stage("distill", {
        **common, "out": str(work / "student"), "teacher": report["teacher"]["final"], "rounds": preset.rounds,
        "iterations": preset.distill_iterations, "lr": preset.distill_lr})
    report["distill"]["pseudo_masks_per_image"] = [
        [r["pseudo_masks"] for r in _metrics(work / "student" / f"round-{k}" / "metrics.jsonl") if "pseudo_masks" in r]
        for k in range(1, preset.rounds + 1)]
    timings["distill"] = time.perf_counter() - t

    # --- 5. MasQ-tuning
    t = time.perf_counter()
    log("stage 3: MasQ-tuning")
    report["masq"] = _masq_tuning(preset, common, work, report["distill"]["final"])
    timings["masq"] = time.perf_counter() - t

    # --- 6. evaluation
    t = time.perf_counter()
    log("evaluating on the held-out split")
    val = load_dataset("synthetic", world, split="val")
    train_set = load_dataset("synthetic", world, split="train")
    # The model ships with half-precision storage: round the weights to float16 first, so that what is evaluated
    # here is exactly what the shipped file computes.
    final = _round_to_half(load_model(report["masq"]["final"]))
    untuned = _round_to_half(load_model(report["distill"]["final"]))  # f_Q' = f_Q copy: CLIP's own class token
    tasks = ("panoptic", "semantic", "instance")
    options = EvalOptions(tasks=tasks, postprocess=PostprocessConfig(tasks=tasks), limit=preset.eval_limit)
    evaluation = {}
    for name, model in (("masqclip", final), ("untuned", untuned)):
        model.set_vocabulary(val.vocabulary)
        evaluation[name] = evaluate(val, options, model=model)["metrics"]
    torch.manual_seed(0)
    untrained = build_proposal_network(final.proposals_config).eval()
    teacher = load_model(report["teacher"]["final"])
    report["proposal_recall"] = {
        "train": {"untrained": proposal_recall(untrained, train_set, limit=preset.eval_limit),
                  "teacher": proposal_recall(teacher.proposals, train_set, limit=preset.eval_limit),
                  "student": proposal_recall(final.proposals, train_set, limit=preset.eval_limit)},
        "val": {"untrained": proposal_recall(untrained, val, limit=preset.eval_limit),
                "teacher": proposal_recall(teacher.proposals, val, limit=preset.eval_limit),
                "student": proposal_recall(final.proposals, val, limit=preset.eval_limit)},
    }
    report["mask_label_accuracy"] = {"untuned": mask_label_accuracy(untuned, val, limit=preset.eval_limit),
                                     "masqclip": mask_label_accuracy(final, val, limit=preset.eval_limit)}
    report["evaluation"] = evaluation
    timings["evaluation"] = time.perf_counter() - t
    # A rerun resumes finished steps in no time: keep the seconds of the run that did each step's work.
    timings_file = work / "timings.json"
    stored = json.loads(timings_file.read_text()) if timings_file.exists() else {}
    skipped = {"data": timings["data"] < 5, "clip": timings["clip"] < 5}
    skipped.update({stage: report[stage].get("iterations_run", 1) == 0 for stage in ("teacher", "distill", "masq")})
    for step, was_skipped in skipped.items():
        if was_skipped and step in stored:
            timings[step] = stored[step]
    timings.pop("total", None)
    timings_file.write_text(json.dumps({k: round(v, 1) for k, v in timings.items()}, indent=1))
    timings["total"] = sum(timings.values())
    report["seconds"] = {k: round(v, 1) for k, v in timings.items()}

    # --- 7. the model and the samples
    final.set_vocabulary(val.vocabulary)
    # `segment` resizes inputs to the size the model was trained at (a 256² scene is the same world at 128²).
    final.test_size = {"short_side": preset.image_size, "max_size": 4 * preset.image_size}
    model_path = work / "demo.safetensors"
    save_model(final, model_path, storage_dtype=torch.float16, extra={"demo": {"preset": asdict(preset), "seeds": SEEDS,
                                                  "recipe": "scripts/build_demo_model.py"}})
    report["model"] = {"path": str(model_path), "bytes": model_path.stat().st_size}
    (work / "report.json").write_text(json.dumps(report, indent=1, default=str))
    if install:
        target = DEMO_MODEL_PATH
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = target.with_name(target.name + ".tmp")
        shutil.copyfile(model_path, tmp)
        os.replace(tmp, target)
        _write_samples(preset)
        (REPO / "docs" / "demo-model-report.json").write_text(json.dumps(_public(report), indent=1, default=str) + "\n")
        write_docs(report, REPO / "docs" / "demo-model.md")
        log(f"installed {target}")
    log(f"done in {timings['total'] / 60:.1f} min; report: {work / 'report.json'}")
    return report


def _masq_tuning(preset: Preset, common: dict[str, Any], work: Path, init: str) -> dict[str, Any]:
    """MasQ-tuning at a constant learning rate, its length chosen on the recipe validation split (seed 5).

    One run is trained in segments of ``masq_eval_every`` iterations (each resumes the last one's checkpoint, so the
    segments are one run's prefixes); after each, a copy of the model is scored by mask-label accuracy on the
    recipe validation split -- the mean of base and novel, so that tuning may not trade novel classes for base ones
    -- and the best length, the untuned model (0 iterations) included, is the stage's result.
    """
    from masqclip_cli.data.datasets import load_dataset
    from masqclip_cli.evaluation.labels import mask_label_accuracy
    from masqclip_cli.modeling.factory import load_model

    recipe_val = load_dataset("synthetic", common["root"], split="recipe_val")
    folder = work / "masq"
    selection_file = work / "masq-selection.json"
    selection: dict[str, Any] = json.loads(selection_file.read_text()) if selection_file.exists() else {}

    def score(model_file: Path, key: str) -> dict[str, Any]:
        if key not in selection:
            accuracy = mask_label_accuracy(_round_to_half(load_model(model_file)), recipe_val)
            selection[key] = {"file": str(model_file), "accuracy": accuracy,
                              "score": _mean([accuracy.get("base"), accuracy.get("novel")])}
            selection_file.write_text(json.dumps(selection, indent=1))
            log(f"MasQ-tuning {key} iterations: validation mask-label accuracy base "
                f"{_v(accuracy.get('base'))} novel {_v(accuracy.get('novel'))}")
        return selection[key]

    score(Path(init), "0")
    runs: list[dict[str, Any]] = []
    lengths = list(range(preset.masq_eval_every, preset.masq_iterations + 1, preset.masq_eval_every))
    for iterations in lengths:
        run = _train_stage("masq", {**common, "out": str(folder), "init": init, "tune": "q", "lr_steps": [],
                                    "iterations": iterations, "lr": preset.masq_lr})
        runs.append(run)
        snapshot = folder / f"after-{iterations}.safetensors"
        if not snapshot.exists():
            shutil.copyfile(run["final"], snapshot.with_name(snapshot.name + ".tmp"))
            os.replace(snapshot.with_name(snapshot.name + ".tmp"), snapshot)
        score(snapshot, str(iterations))
    candidates = [k for k in selection if k != "0" or preset.masq_untuned_candidate]
    best = max(candidates, key=lambda k: (selection[k]["score"] if selection[k]["score"] is not None else -1, -int(k)))
    result = {
        "seconds": round(sum(r["seconds"] for r in runs), 1),
        "iterations_run": sum(r["iterations_run"] for r in runs),
        "seconds_per_iteration": runs[-1]["seconds_per_iteration"] if runs else None,
        "last_losses": runs[-1]["last_losses"] if runs else None,
        "evaluations": [],
        "chosen_iterations": int(best),
        "final": selection[best]["file"],
        "selection": {k: {"accuracy": v["accuracy"], "score": v["score"]} for k, v in selection.items()},
    }
    log(f"MasQ-tuning: {best} iterations chosen on the recipe validation split")
    return result


def _mean(values: list[float | None]) -> float | None:
    present = [v for v in values if v is not None]
    return sum(present) / len(present) if present else None


def _round_to_half(model: Any) -> Any:
    """Round every floating-point parameter and buffer of ``model`` to the nearest float16 value (kept float32)."""
    import torch

    with torch.no_grad():
        for tensor in [*model.parameters(), *model.buffers()]:
            if tensor.is_floating_point() and tensor.numel():
                tensor.copy_(tensor.half().float())
    if model.vocabulary is not None:  # re-encode the stored vocabulary with the rounded text tower
        model.set_vocabulary(model.vocabulary)
    return model


def _v(x: Any) -> str:
    return "–" if x is None or x != x else f"{x:.1f}"


def quality_table(metrics: dict[str, Any]) -> list[str]:
    """Markdown rows: PQ / PQ-things / PQ-stuff, mIoU, mask AP and AP50 for all, base and novel categories."""
    pan, sem, ins = metrics["panoptic"], metrics["semantic"], metrics["instance"]
    rows = ["| categories | PQ | PQ things | PQ stuff | SQ | RQ | mIoU | mask AP | AP50 |",
            "|---|---|---|---|---|---|---|---|---|"]
    for split in ("all", "base", "novel"):
        p = pan[split]
        things = pan["things"]["pq"] if split == "all" else None
        stuff = pan["stuff"]["pq"] if split == "all" else None
        m = sem["mIoU"] if split == "all" else sem.get(split, {}).get("mIoU")
        a = ins if split == "all" else ins.get(split, {})
        rows.append(f"| {split} ({p['n']}) | {_v(p['pq'])} | {_v(things)} | {_v(stuff)} | {_v(p['sq'])} | "
                    f"{_v(p['rq'])} | {_v(m)} | {_v(a.get('AP'))} | {_v(a.get('AP50'))} |")
    return rows


def write_docs(report: dict[str, Any], path: Path) -> None:
    """docs/demo-model.md: how the demo model was made and how good it is (from the build report)."""
    p, ev, sec = report["preset"], report["evaluation"], report["seconds"]
    rec, acc = report["proposal_recall"], report["mask_label_accuracy"]
    zs = report["clip"]["zero_shot_on_held_out_crops"]
    clip_train = report["clip"]["training"]
    lines = [
        "# The demo model",
        "",
        f"`--model demo` (`masqclip_cli/models/demo.safetensors`, {report['model']['bytes'] / 2**20:.1f} MiB) is "
        "the whole MasQCLIP recipe trained by `python scripts/build_demo_model.py` on the synthetic shapes world "
        f"(`masqclip synth`), from fixed seeds, on the project's 2-core CPU in {sec['total'] / 60:.0f} minutes. It "
        "knows only that world: 12 shapes (things) over 8 textured backgrounds (stuff); real photos give nonsense. "
        "This page is written by the build script.",
        "",
        "## Recipe",
        "",
        f"1. **Worlds** (seeds {report['seeds']}): a base-only training split of {p['train_images']} scenes at "
        f"{p['image_size']}² (the novel categories star, heart, ring and water are drawn but never annotated), a "
        f"held-out validation split of {p['val_images']} scenes with every category annotated, and a CLIP split of "
        f"{p['clip_images']} scenes whose object crops and scene captions name every category, base and novel.",
        f"2. **Shapes CLIP** (the role of CLIP's web pre-training): open_clip's own `CLIP` class from a small config "
        f"(ViT 64 px / patch 8, 3-layer text tower, open_clip's BPE tokenizer), contrastive, {clip_train['steps']} "
        f"steps of batch {clip_train['batch_size']} ({clip_train['seconds']:.0f} s)"
        + (f"; the step kept ({clip_train['best_step']}) is the best on the CLIP's own validation split "
           f"({p.get('clip_val_images')} scenes, seed {report['seeds'].get('clip_val')}: mean of all and novel "
           "bare-name accuracy, scored every "
           f"{p.get('clip_eval_every')} steps)" if clip_train.get("best_step") is not None else "")
        + f". Zero-shot accuracy on held-out crops with bare names: {100 * zs['bare']['accuracy']:.1f} % (base "
        f"{100 * zs['bare']['base']:.1f}, novel {100 * zs['bare']['novel']:.1f}; chance {100 * zs['chance']:.0f} %).",
        f"3. **Teacher** (`masqclip train proposals`, geometry `{p['proposals']}`): {p['teacher_iterations']} "
        f"iterations, batch {p['batch_size']}, lr {p['teacher_lr']}, {p['num_points']} points, base classes only.",
        f"4. **Progressive distillation** (`masqclip train distill`): {p['rounds']} rounds of "
        f"{p['distill_iterations']} iterations at lr {p['distill_lr']}; pseudo-masks per image per logged window: "
        f"{report['distill']['pseudo_masks_per_image']}.",
        f"5. **MasQ-tuning** (`masqclip train masq --tune q`): "
        f"{report['masq'].get('chosen_iterations', p['masq_iterations'])} iterations at lr {p['masq_lr']} on the "
        "base classes; only f_Q' (and the mask position embedding) train"
        + (f". The length was chosen on the recipe validation split ({p.get('recipe_val_images')} scenes, seed "
           f"{report['seeds'].get('recipe_val')}) by the mean of base and novel mask-label accuracy, among "
           "0 (untuned) to "
           f"{p['masq_iterations']} iterations in steps of {p.get('masq_eval_every')} (table below)."
           if report["masq"].get("selection") else "."),
        "",
        *_selection_table(report["masq"].get("selection")),
        *_confusion_table(zs["bare"].get("confusion_matrix")),
        "## Quality on the held-out split",
        "",
        "```bash",
        f"masqclip synth --out work/demo-val --split val --images {p['val_images']} --seed {report['seeds']['val']} "
        f"--size {p['image_size']}",
        "masqclip eval --dataset synthetic --root work/demo-val --model demo --task panoptic,semantic,instance",
        "```",
        "",
        *quality_table(ev["masqclip"]),
        "",
        "The same proposals with f_Q' = a copy of CLIP's f_Q (untuned, the frozen-CLIP baseline):",
        "",
        *quality_table(ev["untuned"]),
        "",
        "Proposal recall at IoU 0.5 (share of ground-truth segments some query's mask covers), percent:",
        "",
        "| proposals | train scenes | held-out all | held-out base | held-out novel |",
        "|---|---|---|---|---|",
    ]
    for name in ("untrained", "teacher", "student"):
        t, v = rec["train"][name]["recall@0.5"], rec["val"][name]["recall@0.5"]
        lines.append(f"| {name} | {_v(t['all'])} | {_v(v['all'])} | {_v(v.get('base'))} | {_v(v.get('novel'))} |")
    lines += [
        "",
        "Mask-label accuracy on the held-out split (queries matched to a ground-truth segment, CLIP argmax = its "
        "class), percent:",
        "",
        "| model | all | base | novel | labelled queries |",
        "|---|---|---|---|---|",
    ]
    for name in ("untuned", "masqclip"):
        a = acc[name]
        lines.append(f"| {name} | {_v(a.get('all'))} | {_v(a.get('base'))} | {_v(a.get('novel'))} | "
                     f"{a['labelled'].get('all', 0)} |")
    lines += [
        "",
        "## Cost",
        "",
        "| step | seconds |",
        "|---|---|",
        *[f"| {k} | {v:.0f} |" for k, v in sec.items()],
        "",
        f"Threads: {report['threads']}. The full report (loss curves, per-class numbers) is "
        "`docs/demo-model-report.json`.",
        "",
    ]
    tmp = path.with_suffix(".md.tmp")
    tmp.write_text("\n".join(lines) + "\n")
    os.replace(tmp, path)


def _selection_table(selection: dict[str, Any] | None) -> list[str]:
    """Markdown rows: validation mask-label accuracy per MasQ-tuning length."""
    if not selection:
        return []
    rows = ["MasQ-tuning length on the recipe validation split (mask-label accuracy, percent):", "",
            "| iterations | base | novel | mean (the choice) | labelled queries |", "|---|---|---|---|---|"]
    for key in sorted(selection, key=int):
        a = selection[key]["accuracy"]
        rows.append(f"| {key} | {_v(a.get('base'))} | {_v(a.get('novel'))} | {_v(selection[key]['score'])} | "
                    f"{a['labelled'].get('all', 0)} |")
    return [*rows, ""]


def _confusion_table(matrix: dict[str, dict[str, int]] | None) -> list[str]:
    """Markdown rows: the shapes CLIP's bare-name confusions on the held-out crops (true class per row)."""
    if not matrix:
        return []
    rows = ["The shapes CLIP on the held-out crops with bare names: per true class, the share named right and its "
            "most common wrong names (counts):", "", "| class | crops | right | most common wrong names |",
            "|---|---|---|---|"]
    for name, row in matrix.items():
        total = sum(row.values())
        wrong = sorted(((c, q) for q, c in row.items() if q != name), reverse=True)[:3]
        rows.append(f"| {name} | {total} | {100 * row.get(name, 0) / total:.1f} % | "
                    + (", ".join(f"{q} {c}" for c, q in wrong) or "–") + " |")
    return [*rows, ""]


def _public(report: dict[str, Any]) -> dict[str, Any]:
    """The report without machine-local paths."""
    out = json.loads(json.dumps(report, default=str))
    for stage in ("teacher", "distill", "masq"):
        out.get(stage, {}).pop("final", None)
    out.get("model", {}).pop("path", None)
    return out


def _write_samples(preset: Preset) -> None:
    """Held-out sample scenes (their own seed) that include novel categories, into samples/images."""
    import tempfile

    from masqclip_cli.data.synthetic import SynthConfig, generate

    with tempfile.TemporaryDirectory() as tmp:
        summary_dir = Path(tmp)
        generate(summary_dir, SynthConfig(images=preset.sample_scenes * 4, seed=SEEDS["samples"], split="samples",
                                          size=(256, 256), crops=False))
        meta = json.loads((summary_dir / "annotations" / "panoptic_samples.json").read_text())
        cats = {c["id"]: c["name"] for c in meta["categories"]}
        novel = set(json.loads((summary_dir / "meta.json").read_text()).get("novel", []))
        chosen = []
        for ann in meta["annotations"]:
            names = {cats[s["category_id"]] for s in ann["segments_info"]}
            if names & novel:
                chosen.append(ann["file_name"].replace(".png", ""))
            if len(chosen) == preset.sample_scenes:
                break
        out = REPO / "samples" / "images"
        out.mkdir(parents=True, exist_ok=True)
        for old in out.glob("scene-*"):
            old.unlink()
        for stem in chosen:
            source = next((summary_dir / "images" / "samples").glob(f"{stem}.*"))
            shutil.copyfile(source, out / f"scene-{source.name}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", choices=sorted(PRESETS), default="full")
    parser.add_argument("--work", type=Path, default=REPO / "work" / "demo", help="working folder (resumable)")
    parser.add_argument("--no-install", action="store_true", help="do not install the model and the samples")
    parser.add_argument("--set", action="append", default=[], help="override a preset field: name=value")
    args = parser.parse_args()
    preset = Preset(**asdict(PRESETS[args.preset]))
    for item in args.set:
        key, value = item.split("=", 1)
        current = getattr(preset, key)
        setattr(preset, key, type(current)(value) if current is not None else json.loads(value))
    args.work.mkdir(parents=True, exist_ok=True)
    report = build(preset, args.work, install=not args.no_install)
    summary = {"seconds": report["seconds"], "evaluation": report["evaluation"]["masqclip"]}
    print(json.dumps(summary, default=str)[:3000])


if __name__ == "__main__":
    sys.exit(main())
