"""Video tracking: peak RSS of ``masqclip segment`` over a short vs a long video, and what tracking adds per frame.

The video: one video of the synthetic video world (:func:`masqclip_cli.data.synthetic_video.make_video`, 48 frames,
128×128, video 23 by default: three shapes that stay in view, one that leaves and one that enters, over a panned
textured background) played forwards and backwards in a loop ("ping-pong", so motion stays continuous) up to
``--long`` frames (3000), encoded frame by frame with PyAV (H.264 yuv420p, CRF 17, as the generator writes its
MP4s), so neither this script nor the run ever holds the long video's frames. The objects that leave and come back
start new tracks each cycle, so the number of tracks grows with the video's length, as in real footage.

(a) Memory. ``masqclip segment VIDEO --task panoptic --format panoptic,mots,vis`` (every tracked format; tracking on,
the default for videos), the real CLI in a fresh process, over the first ``--short`` frames (300, ``--end``
seconds) and over all ``--long`` frames; the peak RSS of each process is its helper's
``getrusage(RUSAGE_CHILDREN).ru_maxrss`` (as ``streaming_memory.py``); target: long / short <= 1.10. A warm-up run over
the first second fills the text-embedding cache (a temporary folder) first.

(b) Tracking overhead. In one fresh worker process (model loaded once, as the CLI builds its options), the engine's
:func:`~masqclip_cli.inference.engine.segment` over the first ``--overhead-frames`` frames (120), tracking on
(``TrackingOptions(track=True)``) and off (``track=False``), same formats, each run into a fresh output folder: one
warm-up run of each, then ``--alternations`` pairs in alternating order (on/off, off/on, ...). Per-frame time =
the run's wall time / frames (everything the run does: decode, model, post-process, writers, run-level files); the
reported ratio is median(on) / median(off) (target < 1.05), with the per-pair ratios and the run-to-run spread of
the untracked runs beside it (on a shared machine the spread can exceed 5 %: then the wall ratio does not resolve
the target). Two steadier measures go with it: the same ratio in process CPU time (``time.process_time``, all
threads of the worker: other work on the cores inflates it less than wall time, though not to nothing), and the
tracker's own time: what the engine reports as ``RunSummary.seconds["track"]`` (:meth:`SequenceTracking.assign`:
matching and relabelling) plus building the tracker state each frame's record keeps
(:meth:`SequenceTracking.state_json`, timed by wrapping it here; writing it is part of the record's write), as a
fraction of the untracked per-frame time (``tracker_time_ratio`` = 1 + that fraction). The time target
counts as met when all three ratios are under 1.05.

Threads: 1 torch thread by default. The bench machine has 2 cores shared with other work; 2 torch threads on busy
cores degrade by an order of magnitude (tiny-random at 64 px: 0.43 s/frame with 2 threads vs 0.02 s with 1 at a
load average of 3.9), which would hide the tracker's cost behind stalls. The tracker's cost per frame does not
depend on the torch threads, its share does: a faster model (2 threads on an idle machine) makes it larger.

    python bench/video_tracking.py                          # 300 vs 3000 frames; 120 frames x 3 alternations
    python bench/video_tracking.py --memory-model tiny-random --short-side 64

Writes bench/results/video_tracking.json.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import io
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from fractions import Fraction
from pathlib import Path
from typing import Any

from _common import RESULTS, child_env, machine_info, masqclip_command, run_peak_rss, write_json

MEMORY_RATIO_TARGET = 1.10  # peak RSS long / short: at most
TIME_RATIO_TARGET = 1.05  # per-frame time tracked / untracked: under
TASKS = ("panoptic",)
FORMATS = ("panoptic", "mots", "vis")  # every format that writes tracks (mots, vis) + the panoptic PNGs they come from


def _loadavg() -> float:
    return round(os.getloadavg()[0], 2)


def versions() -> dict[str, str]:
    """Versions of the packages the run's numbers depend on (without importing them)."""
    from masqclip_cli import __version__

    out = {"masqclip_cli": __version__}
    for name in ("numpy", "scipy", "pycocotools", "av", "opencv-python-headless", "opencv-python"):
        try:
            out[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            continue
    return out


# --- the video --------------------------------------------------------------------------------------------------


def pingpong_index(k: int, base_frames: int) -> int:
    """Frame of the base video shown at frame ``k`` of the loop 0, 1, ..., T-1, T-2, ..., 1, 0, 1, ... (T >= 2)."""
    period = 2 * base_frames - 2
    j = k % period
    return j if j < base_frames else period - j


def write_looped_video(path: Path, size: int, base_frames: int, frames: int, index: int, fps: int,
                       seed: int = 0) -> dict[str, Any]:
    """Write a ``frames``-frame MP4 of synthetic video ``index`` (``base_frames`` frames, ``size``² pixels) played
    ping-pong; one base frame at a time goes to the encoder. Returns a description of the video (for the JSON)."""
    import av
    import numpy as np

    from masqclip_cli.data.synthetic_video import VideoConfig, make_video
    from masqclip_cli.io.files import atomic_write_bytes

    config = VideoConfig(seed=seed, num_videos=1, frames=base_frames, size=(size, size), fps=fps)
    base = make_video(config, index)  # (T, H, W, 3): 48 small frames, not the long video
    buffer = io.BytesIO()  # the encoded MP4 (a few MB for 3000 frames at 128 px); the frames are never all held
    with av.open(buffer, mode="w", format="mp4") as container:
        stream = container.add_stream("libx264", rate=Fraction(fps, 1))
        stream.width, stream.height, stream.pix_fmt = size, size, "yuv420p"
        stream.options = {"crf": "17", "preset": "medium", "threads": "1"}
        for k in range(frames):
            frame = av.VideoFrame.from_ndarray(np.ascontiguousarray(base.frames[pingpong_index(k, base_frames)]),
                                               format="rgb24")
            frame.pts = k
            for packet in stream.encode(frame):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    atomic_write_bytes(path, buffer.getvalue())
    return {
        "generator": "masqclip_cli.data.synthetic_video.make_video, played ping-pong",
        "seed": seed,
        "index": index,
        "base_frames": base_frames,
        "frames": frames,
        "size": [size, size],
        "fps": fps,
        "codec": "libx264 yuv420p crf 17",
        "mp4_mib": round(path.stat().st_size / 2**20, 2),
        "base_tracks": [{"category": t.category, "kind": t.kind, "frames_visible": int(t.frames_visible.sum())}
                        for t in base.tracks],
    }


# --- (a) memory -------------------------------------------------------------------------------------------------


def _frames_done(out: Path) -> int:
    items = out / ".masqclip" / "items"
    return sum(1 for _ in items.rglob("*.json")) if items.is_dir() else 0


def _tracks_written(out: Path) -> dict[str, int]:
    vis = json.loads((out / "vis.json").read_text())
    mots_lines = sum(len(p.read_text().splitlines()) for p in (out / "mots").rglob("*.txt"))
    return {"vis_tracks": len(vis["annotations"]), "mots_lines": mots_lines}


def memory_run(video: Path, frames: int | None, out: Path, args: argparse.Namespace, env: dict[str, str]) -> dict:
    """One ``masqclip segment`` process over the first ``frames`` frames (None: all); its peak RSS and what it
    wrote."""
    command = masqclip_command(
        "segment", str(video), "--model", args.memory_model, "--vocab", str(args.vocab_file), "--task", ",".join(TASKS),
        "--format", ",".join(FORMATS), "--out", str(out), "--threads", str(args.threads), "--device", "cpu",
        *(["--short-side", str(args.short_side)] if args.short_side is not None else []),
        *(["--end", f"{frames / args.fps:g}"] if frames is not None else []),
    )
    load_before = _loadavg()
    measured = run_peak_rss(command, env=env)
    if measured["rc"] != 0:
        raise SystemExit(f"masqclip segment exited {measured['rc']}: {' '.join(command)}")
    done = _frames_done(out)
    if frames is not None and done != frames:
        raise SystemExit(f"{video}: expected {frames} frames segmented, the run finished {done}")
    outputs = sum(p.stat().st_size for p in out.rglob("*") if p.is_file())
    return {
        "frames": done,
        "peak_rss_mib": round(measured["maxrss_kib"] / 1024, 1),
        "wall_s": round(measured["wall_s"], 2),
        "frames_per_s_incl_startup": round(done / measured["wall_s"], 2),
        "output_mib": round(outputs / 2**20, 2),
        **_tracks_written(out),
        "loadavg_1m": [load_before, _loadavg()],
    }


def memory_part(video: Path, tmp: Path, args: argparse.Namespace, env: dict[str, str]) -> dict:
    rows = []
    for label, frames in (("warmup", min(args.fps, args.short)), ("short", args.short), ("long", None)):
        out = tmp / f"memory_{label}"
        row = memory_run(video, frames, out, args, env)
        shutil.rmtree(out)
        rows.append({"run": label, **row})
        print(f"memory {label}: {row['frames']} frames, peak RSS {row['peak_rss_mib']} MiB, {row['wall_s']} s, "
              f"{row['vis_tracks']} tracks (load {row['loadavg_1m'][1]})", flush=True)
    short, long = rows[1], rows[2]
    ratio = long["peak_rss_mib"] / short["peak_rss_mib"]
    return {
        "model": args.memory_model,
        "command": "masqclip segment VIDEO --model M --vocab shapes.txt --task panoptic --format panoptic,mots,vis "
                   "--threads N --device cpu [--short-side S] [--end SHORT/FPS]",
        "rows": rows,
        "peak_rss_ratio": round(ratio, 3),
        "ratio_of": [long["frames"], short["frames"]],
        "target_max": MEMORY_RATIO_TARGET,
        "meets_target": ratio <= MEMORY_RATIO_TARGET,
    }


# --- (b) tracking overhead (worker process) ---------------------------------------------------------------------


def _alternation_order(alternations: int) -> Iterator[tuple[int, bool]]:
    """(pair index, track) in the order run: on/off, off/on, on/off, ... (drift cancels out of the pairs)."""
    for pair in range(alternations):
        first = pair % 2 == 0
        yield pair, first
        yield pair, not first


def overhead_worker(args: argparse.Namespace) -> dict:
    """Runs in a fresh process: the model once, then warm-up and alternating tracked / untracked engine runs."""
    import torch

    from masqclip_cli.inference import video_tracks
    from masqclip_cli.inference.engine import RunOptions, segment
    from masqclip_cli.inference.predictor import postprocess_config
    from masqclip_cli.inference.preprocess import test_size_of
    from masqclip_cli.inference.tracking import TrackerConfig
    from masqclip_cli.inference.video_tracks import TrackingOptions
    from masqclip_cli.modeling.factory import load_model, model_identity
    from masqclip_cli.modeling.text import TextEmbeddingCache
    from masqclip_cli.vocab import load_vocabulary

    torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    model = load_model(args.overhead_model)
    load_s = time.perf_counter() - t0
    vocab = load_vocabulary(str(args.vocab_file))
    model.set_vocabulary(vocab, cache=TextEmbeddingCache(Path(args.cache_dir) / "text"))
    own = test_size_of(model)
    short_side = args.short_side if args.short_side is not None else own["short_side"]

    save_seconds = [0.0]  # the per-frame tracker state for the record: timed by wrapping SequenceTracking.state_json
    original_state = video_tracks.SequenceTracking.state_json

    def timed_state(self, sequence: str) -> dict:  # noqa: ANN001
        start = time.perf_counter()
        try:
            return original_state(self, sequence)
        finally:
            save_seconds[0] += time.perf_counter() - start

    video_tracks.SequenceTracking.state_json = timed_state

    def options(track: bool) -> RunOptions:
        return RunOptions(formats=FORMATS, postprocess=postprocess_config(model, TASKS), short_side=short_side,
                          max_size=own["max_size"], end=args.overhead_frames / args.fps,
                          tracking=TrackingOptions(track=track, config=TrackerConfig()))

    work = Path(args.work_dir)
    model_id = model_identity(args.overhead_model)

    def run(track: bool, label: str) -> dict:
        out = work / f"overhead_{label}_{'track' if track else 'notrack'}"
        save_seconds[0] = 0.0
        load_before = _loadavg()
        cpu_start = time.process_time()
        summary = segment(model, vocab, args.video, out, options(track), model_id=model_id)
        cpu_s = time.process_time() - cpu_start
        shutil.rmtree(out)
        if summary.failed or summary.skipped or summary.done != args.overhead_frames:
            raise SystemExit(f"segment: {summary.done} of {args.overhead_frames} frames done, "
                             f"failed {summary.failed[:2]}, skipped {summary.skipped[:2]}")
        done = summary.done
        return {
            "track": track,
            "frames": done,
            "wall_s": round(summary.wall_s, 4),
            "per_frame_ms": round(1000 * summary.wall_s / done, 3),
            "cpu_ms_per_frame": round(1000 * cpu_s / done, 3),  # this process, all threads: less hit by other work
            "model_ms_per_frame": round(1000 * summary.seconds["model"] / done, 3),
            "postprocess_ms_per_frame": round(1000 * summary.seconds["postprocess"] / done, 3),
            "write_ms_per_frame": round(1000 * summary.seconds["write"] / done, 3),  # includes the tracker's parts
            "track_assign_ms_per_frame": round(1000 * summary.seconds.get("track", 0.0) / done, 3),
            "track_state_save_ms_per_frame": round(1000 * save_seconds[0] / done, 3),
            "loadavg_1m": [load_before, _loadavg()],
        }

    warmup = [run(True, "warmup"), run(False, "warmup")]
    runs = []
    for pair, track in _alternation_order(args.alternations):
        row = {"pair": pair, **run(track, f"pair{pair}")}
        runs.append(row)
        print(f"overhead pair {pair} track={track}: {row['per_frame_ms']} ms/frame "
              f"(assign {row['track_assign_ms_per_frame']}, state {row['track_state_save_ms_per_frame']})",
              file=sys.stderr, flush=True)
    return {"model": args.overhead_model, "short_side": short_side, "max_size": own["max_size"],
            "threads": torch.get_num_threads(), "load_model_s": round(load_s, 2), "warmup": warmup, "runs": runs}


def overhead_part(video: Path, tmp: Path, args: argparse.Namespace) -> dict:
    command = [sys.executable, __file__, "--worker", "--video", str(video), "--vocab-file", str(args.vocab_file),
               "--overhead-model", args.overhead_model, "--overhead-frames", str(args.overhead_frames),
               "--alternations", str(args.alternations), "--threads", str(args.threads), "--fps", str(args.fps),
               "--cache-dir", str(tmp / "cache"), "--work-dir", str(tmp),
               *(["--short-side", str(args.short_side)] if args.short_side is not None else [])]
    done = subprocess.run(command, env=child_env(), capture_output=True, text=True, check=False)
    sys.stderr.write(done.stderr[-3000:] if done.returncode else "")
    lines = [ln[4:] for ln in done.stdout.splitlines() if ln.startswith("ROW ")]
    if done.returncode != 0 or not lines:
        raise SystemExit(f"overhead worker failed ({done.returncode})")
    worker = json.loads(lines[-1])
    runs = worker["runs"]
    on = [r["per_frame_ms"] for r in runs if r["track"]]
    off = [r["per_frame_ms"] for r in runs if not r["track"]]
    pairs = []
    for pair in sorted({r["pair"] for r in runs}):
        tracked = next(r for r in runs if r["pair"] == pair and r["track"])
        untracked = next(r for r in runs if r["pair"] == pair and not r["track"])
        pairs.append(round(tracked["per_frame_ms"] / untracked["per_frame_ms"], 4))
    off_median = statistics.median(off)
    ratio = statistics.median(on) / off_median
    cpu_on = [r["cpu_ms_per_frame"] for r in runs if r["track"]]
    cpu_off = [r["cpu_ms_per_frame"] for r in runs if not r["track"]]
    cpu_ratio = statistics.median(cpu_on) / statistics.median(cpu_off)
    assign = statistics.median(r["track_assign_ms_per_frame"] for r in runs if r["track"])
    save = statistics.median(r["track_state_save_ms_per_frame"] for r in runs if r["track"])
    tracker_ratio = 1 + (assign + save) / off_median
    result = {
        **{k: v for k, v in worker.items() if k not in ("warmup", "runs")},
        "frames": args.overhead_frames,
        "alternations": args.alternations,
        "warmup_runs": worker["warmup"],
        "runs": runs,
        "per_frame_ms": {"track": round(statistics.median(on), 3), "no_track": round(off_median, 3),
                         "track_all": on, "no_track_all": off},
        "per_frame_ratio": round(ratio, 4),
        "pair_ratios": pairs,
        "per_frame_ratio_of_minima": round(min(on) / min(off), 4),
        # run-to-run spread of the untracked per-frame time: a wall ratio closer to 1 than this is not resolved
        "no_track_spread": round((max(off) - min(off)) / off_median, 4),
        "cpu_ms_per_frame": {"track": round(statistics.median(cpu_on), 3),
                             "no_track": round(statistics.median(cpu_off), 3),
                             "track_all": cpu_on, "no_track_all": cpu_off},
        "cpu_per_frame_ratio": round(cpu_ratio, 4),
        "tracker_ms_per_frame": {"assign": round(assign, 3), "state_save": round(save, 3),
                                 "total": round(assign + save, 3)},
        "tracker_fraction_of_untracked_frame": {"assign": round(assign / off_median, 4),
                                                "state_save": round(save / off_median, 4),
                                                "total": round((assign + save) / off_median, 4)},
        # 1 + the tracker's own time over the untracked per-frame time: the ratio without the noise
        "tracker_time_ratio": round(tracker_ratio, 4),
        "target_max_exclusive": TIME_RATIO_TARGET,
        "meets_target": {"wall": ratio < TIME_RATIO_TARGET, "cpu": cpu_ratio < TIME_RATIO_TARGET,
                         "tracker_time": tracker_ratio < TIME_RATIO_TARGET},
    }
    print(f"overhead: {result['per_frame_ms']['track']} vs {result['per_frame_ms']['no_track']} ms/frame, ratio "
          f"{result['per_frame_ratio']} (pairs {pairs}, untracked spread {result['no_track_spread']:.1%}); CPU ratio "
          f"{result['cpu_per_frame_ratio']}; tracker {result['tracker_ms_per_frame']['total']} ms/frame "
          f"= {result['tracker_fraction_of_untracked_frame']['total']:.1%} of an untracked frame", flush=True)
    return result


# --- main -------------------------------------------------------------------------------------------------------


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--short", type=int, default=300, help="frames of the short memory run")
    parser.add_argument("--long", type=int, default=3000, help="frames of the long memory run (the video's length)")
    parser.add_argument("--overhead-frames", type=int, default=120, help="frames of each tracking-overhead run")
    parser.add_argument("--alternations", type=int, default=3, help="tracked/untracked pairs (after one warm-up each)")
    parser.add_argument("--size", type=int, default=128, help="frame side in pixels (even, 32..4096)")
    parser.add_argument("--base-frames", type=int, default=48, help="frames of the synthetic video that is looped")
    parser.add_argument("--video-index", type=int, default=23, help="which synthetic video (seed 0)")
    parser.add_argument("--fps", type=int, default=10)
    parser.add_argument("--memory-model", default="demo")
    parser.add_argument("--overhead-model", default="demo")
    parser.add_argument("--short-side", type=int, default=None, help="segment --short-side (default: the model's)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (see the module docstring)")
    parser.add_argument("--smoke", action="store_true", help="tiny setting for the smoke test (seconds)")
    parser.add_argument("--out", type=Path, default=RESULTS / "video_tracking.json")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)  # internal: the overhead runs
    parser.add_argument("--video", help=argparse.SUPPRESS)
    parser.add_argument("--vocab-file", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--cache-dir", help=argparse.SUPPRESS)
    parser.add_argument("--work-dir", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print("ROW " + json.dumps(overhead_worker(args)), flush=True)
        return
    if args.smoke:
        args.short, args.long, args.overhead_frames, args.alternations = 6, 12, 6, 1
        args.size, args.base_frames = 64, 8
    if not 0 < args.short < args.long:
        raise SystemExit(f"--short ({args.short}) must be positive and below --long ({args.long})")
    if not 0 < args.overhead_frames <= args.long:
        raise SystemExit(f"--overhead-frames ({args.overhead_frames}) must be in 1..--long ({args.long})")
    if args.base_frames < 2:
        raise SystemExit(f"--base-frames must be at least 2, got {args.base_frames}")
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="masqclip-bench-") as tmp_name:
        tmp = Path(tmp_name)
        from masqclip_cli.data.synthetic_video import vocab_text
        from masqclip_cli.io.files import atomic_write_text

        args.vocab_file = atomic_write_text(tmp / "shapes_vocab.txt", vocab_text())
        video_path = tmp / "looped.mp4"
        t0 = time.perf_counter()
        video = write_looped_video(video_path, args.size, args.base_frames, args.long, args.video_index, args.fps)
        video["write_s"] = round(time.perf_counter() - t0, 2)
        print(f"video: {args.long} frames {args.size}x{args.size}, {video['mp4_mib']} MiB in {video['write_s']} s",
              flush=True)
        env = child_env(MASQCLIP_CACHE_DIR=str(tmp / "cache"))
        memory = memory_part(video_path, tmp, args, env)
        overhead = overhead_part(video_path, tmp, args)
    result = {
        "bench": "video_tracking",
        **machine_info(args.threads),
        "versions": versions(),
        "smoke": args.smoke,
        "tasks": list(TASKS),
        "formats": list(FORMATS),
        "short_side": args.short_side,
        "video": video,
        "memory": memory,
        "overhead": overhead,
        "targets": {
            "memory_peak_rss_ratio": {"max": MEMORY_RATIO_TARGET, "measured": memory["peak_rss_ratio"],
                                      "met": memory["meets_target"]},
            "tracking_per_frame_ratio": {"max_exclusive": TIME_RATIO_TARGET, "measured": overhead["per_frame_ratio"],
                                         "measured_cpu": overhead["cpu_per_frame_ratio"],
                                         "tracker_time_ratio": overhead["tracker_time_ratio"],
                                         "met": all(overhead["meets_target"].values())},
        },
        "total_s": round(time.perf_counter() - started, 1),
    }
    write_json(args.out, result)
    print(f"peak RSS ratio {memory['ratio_of'][0]} / {memory['ratio_of'][1]} frames: {memory['peak_rss_ratio']} "
          f"(target <= {MEMORY_RATIO_TARGET}); tracked / untracked per-frame time: {overhead['per_frame_ratio']} wall, "
          f"{overhead['cpu_per_frame_ratio']} CPU, {overhead['tracker_time_ratio']} from the tracker's own time "
          f"(target < {TIME_RATIO_TARGET}); {result['total_s']} s")


if __name__ == "__main__":
    main()
