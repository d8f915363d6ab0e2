"""Time of one whole image (model forward + post-processing) split into stages, against plain CLIP, and peak memory.

The published geometry (m2f-r50 proposals + ViT-L-14-336-quickgelu) with random weights (speed does not depend on
them), one 480×640 image at its own size (``--height/--width``; 640×853 is what ``segment`` feeds the network for
a 640×480 photo at short side 640), 100 queries, a 150-class vocabulary, fp32, 2 threads. The image goes through
``MasQCLIP.forward`` itself (stages timed by wrapping module forwards, as in ``segment_e2e.py``), then the
post-processing of all three tasks (semantic, panoptic, instance) at the image size. In the same run, interleaved
with it, the model's own CLIP tower runs open_clip's plain ``encode_image`` (``visual(pixels)``) on one 336² input;
the issue's target is ``full / encode_image ≤ 2.0`` (the official code: 8.95 / 3.34 = 2.68). Warm-up once, then the
median of repetitions.

    python bench/model_stages.py                   # full size
    python bench/model_stages.py --model tiny-random
    python bench/model_stages.py --smoke --out /tmp/x.json   # tiny-random, small image, one repetition (smoke test)

Writes bench/results/model_stages_<model>.json.
"""

from __future__ import annotations

import argparse
import resource
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import MODEL_STAGES, RESULTS, install_stage_timers, machine_info, write_json  # noqa: E402

from masqclip_cli.inference.postprocess import PostprocessConfig, postprocess_output  # noqa: E402
from masqclip_cli.modeling.factory import load_model  # noqa: E402
from masqclip_cli.modeling.text import build_text_embeddings  # noqa: E402
from masqclip_cli.vocab import load_vocabulary  # noqa: E402

FULL_OVER_CLIP_TARGET = 2.0
ALL_TASKS = PostprocessConfig(tasks=("semantic", "panoptic", "instance"))


def _timed(fn):
    start = time.perf_counter()
    value = fn()
    return value, time.perf_counter() - start


def median(values) -> float:  # noqa: ANN001 - any iterable of numbers
    return round(statistics.median(values), 3)


def run_once(model, acc: dict[str, float], image: torch.Tensor, isthing, clip_pixels: torch.Tensor) -> dict:
    """One image through the model + post-processing, then one plain ``encode_image``: seconds per stage."""
    for key in acc:
        acc[key] = 0.0
    (out,), model_s = _timed(lambda: model([image]))
    _, post_s = _timed(lambda: postprocess_output(out, isthing, out.image_size, ALL_TASKS))
    _, encode_s = _timed(lambda: model.masq.visual(clip_pixels))
    times = dict(acc)
    times["model_other"] = model_s - sum(acc.values())
    times["postprocess"] = post_s
    return {"stages": times, "model_s": model_s, "full_s": model_s + post_s, "encode_image_s": encode_s,
            "queries": int(out.mask_logits.shape[0])}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="full-random")
    parser.add_argument("--height", type=int, default=480)
    parser.add_argument("--width", type=int, default=640)
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--smoke", action="store_true", help="tiny-random, a 128x160 image, one repetition")
    parser.add_argument("--out", type=Path, default=None, help="default bench/results/model_stages_<model>.json")
    args = parser.parse_args()
    if args.smoke:
        args.model, args.height, args.width, args.reps = "tiny-random", 128, 160, 1
    torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    model = load_model(args.model)
    build_s = time.perf_counter() - t0
    text_times = {}
    for count in (5, 150):
        vocab = load_vocabulary("; ".join(f"class {i}" for i in range(count)) + ";")
        bank, text_times[f"text_{count}_names_s"] = _timed(lambda v=vocab: build_text_embeddings(v, model.text_encoder))
    model.set_text_embeddings(bank, vocab)
    isthing = vocab.isthing
    image = torch.randint(0, 256, (3, args.height, args.width), generator=torch.Generator().manual_seed(0),
                          dtype=torch.uint8)
    size = model.masq.image_size
    clip_pixels = torch.randn(1, 3, size, size, generator=torch.Generator().manual_seed(1))
    acc = install_stage_timers(model)
    with torch.inference_mode():
        run_once(model, acc, image, isthing, clip_pixels)
        runs = [run_once(model, acc, image, isthing, clip_pixels) for _ in range(args.reps)]
    stages = {k: median(r["stages"][k] for r in runs) for k in (*MODEL_STAGES, "model_other", "postprocess")}
    full_s, encode_s = median(r["full_s"] for r in runs), median(r["encode_image_s"] for r in runs)
    ratios = [r["full_s"] / r["encode_image_s"] for r in runs]
    result = {
        "bench": "model_stages",
        **machine_info(torch.get_num_threads()),
        "model": args.model,
        "image": [args.height, args.width],
        "queries": runs[0]["queries"],
        "classes": len(vocab),
        "tasks": list(ALL_TASKS.tasks),
        "repeats": args.reps,
        "build_model_s": round(build_s, 2),
        "stages_s": stages,
        "model_s": median(r["model_s"] for r in runs),
        "full_s": full_s,
        "full_s_all": [round(r["full_s"], 3) for r in runs],
        "encode_image_s": encode_s,
        "encode_image_s_all": [round(r["encode_image_s"], 3) for r in runs],
        "full_over_encode_image": round(statistics.median(ratios), 3),
        "full_over_encode_image_target": FULL_OVER_CLIP_TARGET,
        **{k: round(v, 3) for k, v in text_times.items()},
        "peak_rss_gib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 2),
    }
    out = args.out or RESULTS / f"model_stages_{args.model}.json"
    write_json(out, result)
    print(f"{args.model} {args.height}x{args.width}: full {full_s} s (model {result['model_s']}, post-process "
          f"{stages['postprocess']}), encode_image {encode_s} s, ratio {result['full_over_encode_image']} "
          f"(target <= {FULL_OVER_CLIP_TARGET}); " + ", ".join(f"{k} {v}" for k, v in stages.items()))


if __name__ == "__main__":
    main()
