"""The paper's three ablations (Tables 3-5) in miniature on the shapes world, each row run with `masqclip train` /
`masqclip eval` and their flags.

    python scripts/build_demo_model.py                 # first: the demo recipe (shapes CLIP, teacher, students)
    python scripts/ablations.py                        # reuses work/demo; writes work/ablations/ and docs/ablations.md
    python scripts/ablations.py --demo-work /tmp/demo-ci --work /tmp/abl --smoke --no-docs   # the CI smoke run

It reuses the demo recipe's world (base-only training split, held-out validation split with base and novel
categories), its shapes CLIP, its teacher and its distilled students (`--demo-work`, the folder
`scripts/build_demo_model.py` wrote), and runs with the recipe's own sizes and schedules (from its `report.json`):

* **Table 3, the object score**: the demo model (2 rounds + MasQ-tuning `--tune q`) evaluated for instance
  segmentation with p_cls = p_obj * p_clip and with `--no-object-score`.
* **Table 4, progressive distillation**: MasQ-tuning (`--tune q`, the same schedule) on the teacher alone, on the
  1-round student and on the 2-round student (the demo model), and on a teacher trained longer by the same number of
  iterations as the two distillation rounds, at the distillation learning rate, without distillation (`train
  proposals --init teacher`); novel AP50 and proposal recall at IoU 0.5 on the held-out split.
* **Table 5, what to tune**: PQ and mIoU on base and novel categories for frozen CLIP (the 2-round student with
  f_Q' = a copy of CLIP's f_Q, untuned), `--tune q` (the demo model), `--tune v`, `--tune qkv` and `--tune k`.

Each step is skipped when its output exists (the script resumes). `--smoke` shortens every training row to a few
iterations and every evaluation to a few images (it checks that every row runs and writes its numbers).
Results: `<work>/ablations.json`; the tables (with commands, seeds, CPU time and the paper's numbers) go to
`docs/ablations.md` unless `--no-docs`.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]

# The paper's numbers (METHOD.md §5): Table 3 and 4 are COCO 48/17 instance AP50; Table 5 is ADE20K (transfer) and
# COCO (in-domain) PQ / mIoU after training on COCO panoptic.
PAPER_TABLE3 = {"with p_obj": {"base": 53.8, "novel": 22.6, "all": 45.6},
                "without": {"base": 16.9, "novel": 11.3, "all": 15.4}}
PAPER_TABLE4 = {"teacher": {"base": 53.8, "novel": 22.6, "all": 45.6},
                "1 round": {"base": 50.6, "novel": 26.1, "all": 44.2},
                "2 rounds": {"base": 51.0, "novel": 31.9, "all": 46.0},
                "teacher longer": {"base": 54.7, "novel": 18.2, "all": 45.1}}
PAPER_TABLE5 = {"frozen": {"ade_pq": 10.7, "ade_miou": 15.7, "coco_pq": 19.4, "coco_miou": 22.1},
                "q": {"ade_pq": 23.3, "ade_miou": 30.4, "coco_pq": 48.5, "coco_miou": 62.0},
                "v": {"ade_pq": 14.4, "ade_miou": 18.0, "coco_pq": 50.0, "coco_miou": 63.2},
                "qkv": {"ade_pq": 14.9, "ade_miou": 18.6, "coco_pq": 50.5, "coco_miou": 63.5},
                "k": {"ade_pq": 22.5, "ade_miou": 29.8, "coco_pq": 48.3, "coco_miou": 61.6}}

SMOKE = {"masq_iterations": 3, "proposal_iterations": 3, "eval_limit": 3}


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)


class Runner:
    """Runs `masqclip` commands in subprocesses, skipping those whose output exists, and records each command."""

    def __init__(self, work: Path, demo: Path, smoke: bool, threads: int | None) -> None:
        self.work, self.demo, self.smoke, self.threads = work, demo, smoke, threads
        report = json.loads((demo / "report.json").read_text())
        self.preset: dict[str, Any] = report["preset"]
        self.world = demo / "world"
        self.commands: dict[str, str] = {}
        self.seconds: dict[str, float] = {}

    def _masqclip(self, name: str, args: list[str], output: Path) -> None:
        shown = "masqclip " + " ".join(shlex.quote(a) for a in args)
        self.commands[name] = shown.replace(str(self.work), "$WORK").replace(str(self.demo), "$DEMO")
        timing = output.parent / f".{output.name}.seconds"
        if output.exists():
            if timing.exists():
                self.seconds[name] = float(timing.read_text())
            return
        log(f"{name}: {self.commands[name]}")
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join([str(REPO), *filter(None, [env.get("PYTHONPATH")])])
        started = time.perf_counter()
        done = subprocess.run([sys.executable, "-m", "masqclip_cli", *args], env=env, capture_output=True, text=True)
        if done.returncode != 0:
            raise SystemExit(f"ablations: step {name} failed (exit {done.returncode}): {self.commands[name]}\n"
                             f"{done.stderr[-4000:]}")
        self.seconds[name] = round(time.perf_counter() - started, 1)
        timing.write_text(str(self.seconds[name]))

    def _common(self) -> list[str]:
        p = self.preset
        args = ["--dataset", "synthetic", "--root", str(self.world), "--augment", "fixed", "--size",
                str(p["image_size"]), "--batch-size", str(p["batch_size"]), "--workers", "0", "--seed", "0",
                "--set", f"num_points={p['num_points']}", "--checkpoint-every", "500", "--quiet"]
        return args

    def masq(self, name: str, proposals: Path, tune: str) -> Path:
        """MasQ-tuning with the demo recipe's schedule on ``proposals``; returns the model file."""
        out = self.work / f"masq-{name}"
        iterations = SMOKE["masq_iterations"] if self.smoke else self.preset["masq_iterations"]
        self._masqclip(f"train masq ({name})", ["train", "masq", *self._common(), "--proposals", str(proposals),
                                                "--tune", tune, "--iterations", str(iterations), "--lr",
                                                str(self.preset["masq_lr"]), "--out", str(out)],
                       out / "final.safetensors")
        return out / "final.safetensors"

    def teacher_longer(self, teacher: Path) -> Path:
        """The teacher trained on for rounds x distill_iterations more iterations at the distillation learning rate,
        on the ground truth alone (no pseudo-masks)."""
        out = self.work / "teacher-longer"
        p = self.preset
        iterations = SMOKE["proposal_iterations"] if self.smoke else p["rounds"] * p["distill_iterations"]
        self._masqclip("train proposals (teacher longer)",
                       ["train", "proposals", *self._common(), "--init", str(teacher), "--iterations",
                        str(iterations), "--lr", str(p["distill_lr"]), "--out", str(out)], out / "final.safetensors")
        return out / "final.safetensors"

    def evaluate(self, name: str, model: Path, tasks: str, no_object_score: bool = False) -> dict[str, Any]:
        report = self.work / "eval" / f"{name}.json"
        report.parent.mkdir(parents=True, exist_ok=True)
        args = ["eval", "--dataset", "synthetic", "--root", str(self.world), "--split", "val", "--model", str(model),
                "--task", tasks, "--report", str(report)]
        if no_object_score:
            args.append("--no-object-score")
        if self.smoke:
            args += ["--limit", str(SMOKE["eval_limit"])]
        if self.threads:
            args += ["--threads", str(self.threads)]
        self._masqclip(f"eval ({name})", args, report)
        return json.loads(report.read_text())["metrics"]


def _recall(model_file: Path, world: Path, limit: int | None) -> dict[str, float]:
    from masqclip_cli.data.datasets import load_dataset
    from masqclip_cli.evaluation.proposals import proposal_recall
    from masqclip_cli.modeling.factory import load_model

    val = load_dataset("synthetic", world, split="val")
    result = proposal_recall(load_model(model_file).proposals, val, limit=limit)
    return {k: round(v, 2) for k, v in result["recall@0.5"].items()}


def _split(block: dict[str, Any], key: str) -> dict[str, float | None]:
    def value(d: dict[str, Any] | None) -> float | None:
        v = None if d is None else d.get(key)
        return None if v is None or v != v else round(float(v), 2)  # NaN (no such objects) -> None

    overall = block["all"] if isinstance(block.get("all"), dict) else block  # panoptic nests "all"; the others not
    return {"all": value(overall), "base": value(block.get("base")), "novel": value(block.get("novel"))}


def run(demo: Path, work: Path, smoke: bool, threads: int | None) -> dict[str, Any]:
    work.mkdir(parents=True, exist_ok=True)
    runner = Runner(work, demo, smoke, threads)
    started = time.perf_counter()
    teacher = demo / "teacher" / "final.safetensors"
    round1 = demo / "student" / "round-1" / "final.safetensors"
    round2 = demo / "student" / "final.safetensors"
    final = demo / "masq" / "final.safetensors"  # the demo model: 2 rounds + MasQ-tuning --tune q
    for path in (teacher, round1, round2, final):
        if not path.exists():
            raise SystemExit(f"ablations: {path} is missing: run scripts/build_demo_model.py --work {demo} first")
    limit = SMOKE["eval_limit"] if smoke else None

    # --- Table 3: the object score
    log("Table 3: the object score")
    with_obj = runner.evaluate("q-2rounds", final, "panoptic,semantic,instance")
    without_obj = runner.evaluate("q-2rounds-no-object-score", final, "instance", no_object_score=True)
    table3 = {"with p_obj": {"AP": _split(with_obj["instance"], "AP"), "AP50": _split(with_obj["instance"], "AP50")},
              "without": {"AP": _split(without_obj["instance"], "AP"),
                          "AP50": _split(without_obj["instance"], "AP50")}}

    # --- Table 4: progressive distillation
    log("Table 4: progressive distillation")
    longer = runner.teacher_longer(teacher)
    table4: dict[str, Any] = {}
    for row, proposals in (("teacher", teacher), ("1 round", round1), ("2 rounds", None),
                           ("teacher longer", longer)):
        name = {"teacher": "teacher", "1 round": "1round", "2 rounds": "2rounds", "teacher longer": "longer"}[row]
        if proposals is None:
            metrics, recall_file = with_obj, round2
        else:
            metrics = runner.evaluate(f"q-{name}", runner.masq(name, proposals, "q"), "instance")
            recall_file = proposals
        table4[row] = {"AP50": _split(metrics["instance"], "AP50"), "AP": _split(metrics["instance"], "AP"),
                       "recall@0.5": _recall(recall_file, runner.world, limit)}

    # --- Table 5: what to tune
    log("Table 5: what to tune")
    table5: dict[str, Any] = {}
    for tune in ("frozen", "q", "v", "qkv", "k"):
        if tune == "frozen":  # the student file carries CLIP with f_Q' = f_Q copy: CLIP's own masked class token
            metrics = runner.evaluate("frozen", round2, "panoptic,semantic")
        elif tune == "q":
            metrics = with_obj
        else:
            metrics = runner.evaluate(f"{tune}-2rounds", runner.masq(f"tune-{tune}", round2, tune),
                                      "panoptic,semantic")
        table5[tune] = {"PQ": _split(metrics["panoptic"], "pq"), "mIoU": _split(metrics["semantic"], "mIoU")}

    result = {
        "smoke": smoke,
        "demo_preset": runner.preset,
        "seeds": {"world": "scripts/build_demo_model.py SEEDS", "training": 0},
        "table3_object_score": table3,
        "table4_distillation": table4,
        "table5_tuning": table5,
        "commands": runner.commands,
        "seconds": {"this_run": round(time.perf_counter() - started, 1), "steps": runner.seconds,
                    "all_steps": round(sum(runner.seconds.values()), 1)},
        "trends": _trends(table3, table4, table5),
    }
    out = work / "ablations.json"
    tmp = out.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(result, indent=1) + "\n")
    os.replace(tmp, out)
    log(f"wrote {out} ({result['seconds']['this_run'] / 60:.1f} min)")
    return result


def _gt(a: float | None, b: float | None) -> bool | None:
    return None if a is None or b is None else a > b


def _trends(table3: dict, table4: dict, table5: dict) -> dict[str, bool | None]:
    """The paper's trends, checked on these numbers (None where a number is missing)."""
    t3 = {split: _gt(table3["with p_obj"]["AP"][split], table3["without"]["AP"][split])
          for split in ("all", "base", "novel")}
    novel50 = {row: table4[row]["AP50"]["novel"] for row in table4}
    recall_novel = {row: table4[row]["recall@0.5"].get("novel") for row in table4}
    return {
        "p_obj raises AP (all)": t3["all"], "p_obj raises AP (base)": t3["base"],
        "p_obj raises AP (novel)": t3["novel"],
        "distillation raises novel AP50 over the teacher": _gt(novel50["2 rounds"], novel50["teacher"]),
        "distillation raises novel recall over the teacher": _gt(recall_novel["2 rounds"], recall_novel["teacher"]),
        "distillation beats a longer teacher (novel AP50)": _gt(novel50["2 rounds"], novel50["teacher longer"]),
        "distillation beats a longer teacher (novel recall)": _gt(recall_novel["2 rounds"],
                                                                   recall_novel["teacher longer"]),
        "tune q beats frozen (novel PQ)": _gt(table5["q"]["PQ"]["novel"], table5["frozen"]["PQ"]["novel"]),
        "tune q beats tune v (novel PQ)": _gt(table5["q"]["PQ"]["novel"], table5["v"]["PQ"]["novel"]),
        "tune q beats tune qkv (novel PQ)": _gt(table5["q"]["PQ"]["novel"], table5["qkv"]["PQ"]["novel"]),
    }


def _fmt(v: float | None) -> str:
    return "–" if v is None else f"{v:.1f}"


def write_docs(result: dict[str, Any], path: Path, machine_note: str) -> None:
    """docs/ablations.md: the three tables next to the paper's numbers, with commands and times."""
    t3, t4, t5 = result["table3_object_score"], result["table4_distillation"], result["table5_tuning"]
    lines = [
        "# The paper's ablations in miniature (shapes world)",
        "",
        "Written by `python scripts/ablations.py` (after `python scripts/build_demo_model.py`); numbers on the",
        "held-out synthetic validation split of the demo recipe (its own seed; base and novel categories; novel =",
        "star, heart, ring, water, never annotated in segmentation training). Every row is a `masqclip train` /",
        "`masqclip eval` command (listed below), seed 0, with the demo recipe's sizes and schedules. "
        + machine_note,
        "",
        "## Table 3 — the object score (instance segmentation)",
        "",
        "| scores | AP base | AP novel | AP all | AP50 base | AP50 novel | AP50 all | paper AP50 base / novel / all |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for row in ("with p_obj", "without"):
        r, p = t3[row], PAPER_TABLE3[row]
        lines.append(f"| {row} | {_fmt(r['AP']['base'])} | {_fmt(r['AP']['novel'])} | {_fmt(r['AP']['all'])} | "
                     f"{_fmt(r['AP50']['base'])} | {_fmt(r['AP50']['novel'])} | {_fmt(r['AP50']['all'])} | "
                     f"{p['base']} / {p['novel']} / {p['all']} |")
    lines += [
        "",
        "## Table 4 — progressive distillation (each row followed by the same MasQ-tuning)",
        "",
        "| proposals | AP50 base | AP50 novel | AP50 all | recall@0.5 base | recall@0.5 novel | recall@0.5 all | "
        "paper AP50 base / novel / all |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for row in ("teacher", "1 round", "2 rounds", "teacher longer"):
        r, p = t4[row], PAPER_TABLE4[row]
        rec = r["recall@0.5"]
        lines.append(f"| {row} | {_fmt(r['AP50']['base'])} | {_fmt(r['AP50']['novel'])} | {_fmt(r['AP50']['all'])} "
                     f"| {_fmt(rec.get('base'))} | {_fmt(rec.get('novel'))} | {_fmt(rec.get('all'))} | "
                     f"{p['base']} / {p['novel']} / {p['all']} |")
    lines += [
        "",
        "## Table 5 — what to tune (panoptic PQ, semantic mIoU)",
        "",
        "| tuned | PQ base | PQ novel | PQ all | mIoU base | mIoU novel | mIoU all | paper ADE PQ / mIoU | "
        "paper COCO PQ / mIoU |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    names = {"frozen": "frozen CLIP (f_Q' = f_Q)", "q": "**Q (MasQCLIP)**", "v": "V", "qkv": "QKV", "k": "K"}
    for row in ("frozen", "q", "v", "qkv", "k"):
        r, p = t5[row], PAPER_TABLE5[row]
        lines.append(f"| {names[row]} | {_fmt(r['PQ']['base'])} | {_fmt(r['PQ']['novel'])} | {_fmt(r['PQ']['all'])} "
                     f"| {_fmt(r['mIoU']['base'])} | {_fmt(r['mIoU']['novel'])} | {_fmt(r['mIoU']['all'])} | "
                     f"{p['ade_pq']} / {p['ade_miou']} | {p['coco_pq']} / {p['coco_miou']} |")
    lines += ["", "## The paper's trends on these numbers", ""]
    lines += [f"- {name}: {'yes' if held else ('no' if held is False else 'n/a')}"
              for name, held in result["trends"].items()]
    lines += ["", "## Commands", "", "`$DEMO` is the demo recipe's work folder, `$WORK` this script's.", "",
              "```bash"]
    lines += [f"{cmd}   # {name}" for name, cmd in result["commands"].items()]
    lines += ["```", ""]
    marker = "<!-- hand-written below: kept when this file is written again -->"
    kept = path.read_text().split(marker, 1)[1] if path.exists() and marker in path.read_text() else "\n"
    tmp = path.with_suffix(".md.tmp")
    tmp.write_text("\n".join(lines) + "\n" + marker + kept)
    os.replace(tmp, path)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--demo-work", type=Path, default=REPO / "work" / "demo",
                        help="the folder scripts/build_demo_model.py wrote")
    parser.add_argument("--work", type=Path, default=REPO / "work" / "ablations", help="working folder (resumable)")
    parser.add_argument("--smoke", action="store_true", help="a few iterations per row, a few images per eval")
    parser.add_argument("--threads", type=int, default=None, help="torch threads of the eval commands")
    parser.add_argument("--no-docs", action="store_true", help="do not write docs/ablations.md")
    args = parser.parse_args()
    result = run(args.demo_work, args.work, args.smoke, args.threads)
    if not args.no_docs:
        import platform

        import torch

        note = (f"Measured on {platform.machine()} with {torch.get_num_threads()} threads, torch {torch.__version__}; "
                f"the rows' commands took {result['seconds']['all_steps'] / 60:.1f} min of wall time in all (each "
                "step's seconds are in ablations.json).")
        write_docs(result, REPO / "docs" / "ablations.md", note)
    print(json.dumps({"trends": result["trends"], "seconds": result["seconds"]["this_run"]}, indent=1))


if __name__ == "__main__":
    main()
