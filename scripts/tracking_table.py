"""What tracking is worth on the synthetic videos: the demo model run frame by frame, with the IoU tracker and with
the default IoU + embedding tracker, scored with TrackEval (HOTA, DetA, AssA, IDF1, MOTA, ID switches).

    python scripts/tracking_table.py                       # writes docs/tracking-results.json, prints the table
    python scripts/tracking_table.py --work /tmp/tt        # keep the dataset and the runs (a re-run resumes them)

It generates a held-out synthetic video set with its own seed (default seed 7, 8 videos x 48 frames, 128x128, H.264
MP4s; :mod:`masqclip_cli.data.synthetic_video`), runs the packaged demo model over every MP4 in the three modes of
:data:`masqclip_cli.evaluation.video.TRACK_MODES` exactly as these CLI lines do (one run per video)::

    masqclip segment root/videos/000000.mp4 --model demo --vocab root/vocab.txt --task panoptic --format mots \\
        --out run/000000 [--no-track | --no-track-embeddings]

and scores them (:func:`masqclip_cli.evaluation.video.evaluate_video_run`: thing classes, class-agnostic; per class
too). The JSON holds the numbers and the protocol; everything in it but ``timing`` is deterministic (same machine
type and library versions). ``--batch-size`` changes no number (the engine's results equal batch 1), only speed.
The markdown table goes to stdout (progress to stderr).
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
METRICS = (("HOTA", "HOTA"), ("DetA", "DetA"), ("AssA", "AssA"), ("IDF1", "IDF1"), ("MOTA", "MOTA"),
           ("IDSW", "ID switches"))
KEPT = ("HOTA", "DetA", "AssA", "IDF1", "MOTA", "IDSW", "DetRe", "DetPr", "AssRe", "AssPr", "LocA", "IDR", "IDP",
        "CLR_TP", "CLR_FN", "CLR_FP", "Frag", "MT", "PT", "ML", "Dets", "GT_Dets", "IDs", "GT_IDs")
CLI = {
    "frame": "--no-track",
    "iou": "--no-track-embeddings",
    "iou+embedding": "(default)",
}


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def markdown_table(modes: dict[str, dict[str, Any]]) -> str:
    """``mode | HOTA | DetA | AssA | IDF1 | MOTA | ID switches`` rows, ratios with one decimal."""
    header = "| mode | " + " | ".join(title for _, title in METRICS) + " |"
    rule = "|" + "---|" * (len(METRICS) + 1)
    rows = [header, rule]
    for mode, numbers in modes.items():
        cells = []
        for key, _ in METRICS:
            value = numbers[key]
            cells.append("n/a" if value is None else (str(int(value)) if key == "IDSW" else f"{value:.1f}"))
        rows.append(f"| {mode} | " + " | ".join(cells) + " |")
    return "\n".join(rows)


def run(args: argparse.Namespace, work: Path) -> dict[str, Any]:
    import torch

    from masqclip_cli.data.synthetic_video import VideoConfig, generate_videos
    from masqclip_cli.evaluation.video import TRACK_MODES, evaluate_video_model
    from masqclip_cli.inference.tracking import TrackerConfig
    from masqclip_cli.modeling.factory import load_model, model_identity
    from masqclip_cli.vocab import load_vocabulary

    if args.threads:
        torch.set_num_threads(args.threads)
    config = VideoConfig(seed=args.seed, num_videos=args.videos, frames=args.frames, size=(args.size, args.size))
    data = work / "data"
    t0 = time.perf_counter()
    manifest = generate_videos(config, data)
    log(f"generated {config.num_videos} videos x {config.frames} frames in {time.perf_counter() - t0:.1f} s")
    model = load_model("demo", device=torch.device("cpu"))
    model_id = model_identity("demo")
    vocab = load_vocabulary(str(data / "vocab.txt"))
    model.set_vocabulary(vocab, progress=False)
    tracker = TrackerConfig()
    modes: dict[str, dict[str, Any]] = {}
    timing: dict[str, Any] = {}
    for mode in TRACK_MODES:
        t0 = time.perf_counter()
        report = evaluate_video_model(
            data, model, vocab, mode, work / "runs" / mode.replace("+", "-"), tracker_config=tracker,
            model_id=model_id, batch_size=args.batch_size,
            on_video=lambda name, done, total, mode=mode: log(f"{mode}: video {name} ({done}/{total})"),
        )
        timing[mode] = {**report["timing"], "mode_wall_s": round(time.perf_counter() - t0, 2)}
        modes[mode] = {
            **{k: report[k] for k in KEPT},
            "cli": CLI[mode],
            "per_class": {name: {k: numbers[k] for k in ("class_id", "HOTA", "DetA", "AssA", "IDF1", "MOTA", "IDSW",
                                                          "GT_IDs", "IDs")}
                          for name, numbers in report["per_class"].items()},
            "class_mean": report["class_mean"],
            "per_video": {seq: {k: numbers[k] for k in ("HOTA", "DetA", "AssA", "IDF1", "MOTA", "IDSW")}
                          for seq, numbers in report["per_sequence"].items()},
            "protocol": report["protocol"],
        }
        log(f"{mode}: HOTA {report['HOTA']:.1f}, AssA {report['AssA']:.1f}, IDSW {report['IDSW']} "
            f"({timing[mode]['seconds_per_frame'] or 0:.3f} s/frame)")
    tracks = [t for v in manifest["videos"] for t in v["tracks"]]
    return {
        "title": "Tracking on the synthetic videos: demo model, frame-by-frame ids vs the IoU tracker vs IoU + "
                 "embeddings (TrackEval MOTS Challenge, class-agnostic, thing classes)",
        "script": "python scripts/tracking_table.py " + " ".join(
            f"--{k.replace('_', '-')} {v}" for k, v in (("seed", args.seed), ("videos", args.videos),
                                                          ("frames", args.frames), ("size", args.size))),
        "dataset": {
            "config": config.to_json(),
            "videos": len(manifest["videos"]),
            "frames": sum(v["num_frames"] for v in manifest["videos"]),
            "tracks": len(tracks),
            "track_kinds": {k: sum(t["kind"] == k for t in tracks) for k in ("enter", "exit", "stay")},
            "note": "held out: its own seed, not a seed the demo model was trained or tuned on",
        },
        "model": {"name": "demo", "identity": model_id},
        "cli": "masqclip segment root/videos/<name>.mp4 --model demo --vocab root/vocab.txt --task panoptic "
               "--format mots --out run/<name> [--no-track | --no-track-embeddings]",
        "modes": modes,
        "timing": {
            "note": "wall-clock, machine-dependent (not deterministic); seconds per frame of the segment runs",
            "cpu_count": os.cpu_count(),
            **timing,
        },
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", type=Path, default=None, help="Keep the dataset and runs here (default: a temporary "
                        "folder, deleted at the end). An existing folder resumes.")
    parser.add_argument("--out", type=Path, default=REPO / "docs" / "tracking-results.json", help="The result JSON.")
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--videos", type=int, default=8)
    parser.add_argument("--frames", type=int, default=48)
    parser.add_argument("--size", type=int, default=128, help="Frame height and width (even).")
    parser.add_argument("--batch-size", type=int, default=4, help="Frames per model call (changes no number).")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice).")
    args = parser.parse_args()
    sys.path.insert(0, str(REPO))
    from masqclip_cli.io.files import atomic_write_json

    started = time.perf_counter()
    if args.work is None:
        with tempfile.TemporaryDirectory(prefix="masqclip-tracking-table-") as tmp:
            result = run(args, Path(tmp))
    else:
        result = run(args, args.work)
    result["timing"]["total_wall_s"] = round(time.perf_counter() - started, 2)
    atomic_write_json(args.out, result, indent=1)
    log(f"wrote {args.out} in {result['timing']['total_wall_s']:.0f} s")
    print(markdown_table(result["modes"]))


if __name__ == "__main__":
    main()
