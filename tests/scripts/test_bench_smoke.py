"""Smoke test of the benchmark scripts: each ``bench/*.py`` runs on its smallest setting (``--smoke``) in a
subprocess, exits 0 and writes a result JSON with the expected keys and positive timings. Results go to a temporary
folder, never to ``bench/results``."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
BENCH = REPO / "bench"
SCRIPTS = sorted(p.name for p in BENCH.glob("*.py") if not p.name.startswith("_"))  # _common.py is a helper
COMMON_KEYS = {"bench", "machine", "threads", "torch"}


def _positive(*values) -> bool:  # noqa: ANN002
    return all(isinstance(v, (int, float)) and v > 0 for v in values)


def check_masq_overhead(r: dict) -> None:
    assert r["rows"]
    for row in r["rows"]:
        assert _positive(row["encode_image_ms"], row["masq_forward_ms"], row["measured_ratio"],
                         row["theoretical_flop_ratio"])


def check_model_stages(r: dict) -> None:
    assert set(r["stages_s"]) == {"preprocess", "backbone", "pixel_decoder", "transformer_decoder", "clip",
                                  "classifier", "model_other", "postprocess"}
    assert all(v >= 0 for k, v in r["stages_s"].items() if k != "model_other")  # rounded: a tiny stage may read 0.0
    assert _positive(r["full_s"], r["model_s"], r["encode_image_s"], r["full_over_encode_image"], r["build_model_s"],
                     r["peak_rss_gib"], r["text_150_names_s"])
    assert r["full_s"] >= r["model_s"] and r["queries"] > 0 and r["classes"] == 150


def check_crop_classify(r: dict) -> None:
    assert r["rows"]
    for row in r["rows"]:
        assert row["masks"] > 0 and row["crop_batch_size"] > 0
        assert _positive(row["masq_s"], row["crop_s"], row["speedup"], row["crop_ms_per_mask"])


def check_vocab_scale(r: dict) -> None:
    assert [row["classes"] for row in r["rows"]] == sorted(row["classes"] for row in r["rows"]) and r["rows"]
    for row in r["rows"]:
        assert _positive(row["first_run_s"], row["cached_run_ms"]) and row["encode_batches"] >= 1
        assert row["bank_shape"][0] == row["classes"] + 1
    overhead = r["segment_overhead"]
    assert overhead["vocabularies"][0] < overhead["vocabularies"][1]
    for entry in overhead["by_tasks"]:
        assert _positive(entry["run_small_s"], entry["run_large_s"], entry["run_large_fixed_s"])
        assert set(entry["added_fraction"]) == {"large", "large_fixed"}
        assert isinstance(entry["meets_target"], bool) and isinstance(entry["same_output_as_small"], bool)


def check_streaming_memory(r: dict) -> None:
    assert len([row for row in r["rows"] if not row["warmup"]]) >= 2
    for row in r["rows"]:
        assert _positive(row["peak_rss_mib"], row["wall_s"], row["images"])
    assert _positive(r["peak_rss_ratio"])


def check_segment_e2e(r: dict) -> None:
    assert r["rows"]
    for row in r["rows"]:
        assert set(row["seconds"]) == {"decode", "preprocess", "backbone", "pixel_decoder", "transformer_decoder",
                                       "clip", "classifier", "model_other", "postprocess", "write", "other"}
        assert _positive(row["items_per_s"], row["wall_s"], row["model_s"], row["peak_rss_gib"],
                         row["seconds"]["backbone"], row["seconds"]["clip"], row["seconds"]["postprocess"])
        assert 0 < row["model_share_of_wall"] <= 1


def check_train_step(r: dict) -> None:
    assert r["geometries"]
    for entry in r["geometries"].values():
        for stage in ("proposals", "distill", "masq"):
            assert _positive(entry[stage]["seconds_per_iteration"], entry[stage]["wall_seconds"])


def check_video_tracking(r: dict) -> None:
    memory = r["memory"]
    assert [row["run"] for row in memory["rows"]] == ["warmup", "short", "long"]
    short, long = memory["rows"][1], memory["rows"][2]
    assert 0 < short["frames"] < long["frames"] == r["video"]["frames"]
    for row in memory["rows"]:
        assert _positive(row["peak_rss_mib"], row["wall_s"], row["frames"])
    assert long["mots_lines"] > 0 and long["vis_tracks"] > 0  # the run tracked objects and wrote them
    assert abs(memory["peak_rss_ratio"] - long["peak_rss_mib"] / short["peak_rss_mib"]) < 1e-2
    overhead = r["overhead"]
    assert len(overhead["runs"]) == 2 * overhead["alternations"]
    for run in overhead["runs"]:
        assert run["frames"] == overhead["frames"] and _positive(run["per_frame_ms"], run["cpu_ms_per_frame"])
        assert (run["track_assign_ms_per_frame"] > 0) == run["track"]  # only the tracked runs ran the tracker
    assert _positive(overhead["per_frame_ratio"], overhead["cpu_per_frame_ratio"], overhead["tracker_time_ratio"])
    assert isinstance(r["targets"]["tracking_per_frame_ratio"]["met"], bool)


def check_ray_overhead(r: dict) -> None:
    assert r["ray"] and _positive(r["cluster_start_s"])
    for row in r["rows"]:
        assert row["by_count"]
        for entry in row["by_count"]:
            assert _positive(entry["local_wall_s"], entry["ray_wall_s"], entry["ratio"], entry["images"])
            assert entry["same_output"] is True  # the two engines wrote the same bytes
            assert isinstance(entry["meets_target"], bool)
            for run in entry["runs"]["local"] + entry["runs"]["ray"]:
                assert run["summary"] == f"{entry['images']} done, 0 skipped, 0 failed"
    assert isinstance(r["targets"]["ray_over_local_wall"]["met"], bool)


def check_gpu(r: dict) -> None:
    assert r["smoke"] is True and r["status"].startswith("complete") and r["gpu"]["device"] == "cpu"
    acc = r["accuracy"]
    on_device = acc["device_vs_cpu_fp32"]["default_tf32"]
    assert on_device["mask_logits_max_abs"] == 0.0 and on_device["p_cls_max_abs"] == 0.0  # CPU against CPU here
    assert all(v == 1.0 for k, v in on_device["pixel_agreement"].items() if k in ("semantic", "panoptic", "instance"))
    bf16 = acc["precision_vs_fp32"]["bf16"]
    assert bf16["finite"] and 0 < bf16["p_cls_max_abs"] < 1
    assert all(0 <= bf16["pixel_agreement"][k] <= 1 for k in ("semantic", "panoptic", "instance"))
    assert 0 <= bf16["pq_against_fp32"]["pq"] <= 100
    assert set(acc["sdpa_mask_attention"]) == {"fp32", "bf16"}
    rows = r["throughput"]
    assert [(row["precision"], row["batch"], row["compile"]) for row in rows] == [
        ("fp32", 1, False), ("fp32", 2, False), ("bf16", 1, False), ("bf16", 2, False)]
    for row in rows:
        assert set(row["images_per_s"]) == {"model", "panoptic", "all_tasks", "all_tasks_with_decode"}
        assert _positive(*row["images_per_s"].values(), *row["seconds_per_pass"].values())
        assert row["peak_gpu_mib"] is None  # no GPU in the smoke run
    assert len(r["clip_vs_encode_image"]) == len(rows)
    for clip in r["clip_vs_encode_image"]:
        assert _positive(clip["masq_forward_s"], clip["encode_image_s"], clip["ratio"]) and clip["queries"] > 0


CHECKS = {
    "masq_overhead.py": check_masq_overhead,
    "model_stages.py": check_model_stages,
    "crop_classify.py": check_crop_classify,
    "vocab_scale.py": check_vocab_scale,
    "streaming_memory.py": check_streaming_memory,
    "segment_e2e.py": check_segment_e2e,
    "train_step.py": check_train_step,
    "video_tracking.py": check_video_tracking,
    "ray_overhead.py": check_ray_overhead,
    "gpu.py": check_gpu,
}


def _results_state() -> dict[str, int]:
    results = BENCH / "results"
    return {p.name: p.stat().st_mtime_ns for p in results.iterdir()} if results.is_dir() else {}


def test_every_script_is_checked_and_in_run_all():
    assert set(SCRIPTS) == set(CHECKS), "a new bench script needs a check here"
    run_all = (BENCH / "run_all.sh").read_text()
    for name in SCRIPTS:
        assert f"bench/{name}" in run_all, f"{name} is not in bench/run_all.sh"


@pytest.mark.parametrize("script", SCRIPTS)
def test_bench_script_smoke(script, tmp_path):
    out = tmp_path / "result.json"
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), *filter(None, [env.get("PYTHONPATH")])])
    env["MASQCLIP_CACHE_DIR"] = str(tmp_path / "cache")
    before = _results_state()
    done = subprocess.run([sys.executable, str(BENCH / script), "--smoke", "--out", str(out)], cwd=tmp_path,
                          env=env, capture_output=True, text=True, timeout=300, check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    assert _results_state() == before, "a smoke run wrote into bench/results"
    result = json.loads(out.read_text())
    assert COMMON_KEYS <= set(result), set(result)
    assert result["bench"] == script.removesuffix(".py") and result["threads"] >= 1
    CHECKS[script](result)
