"""Time of one whole-model forward split into stages, and peak memory.

The published geometry (m2f-r50 proposals + ViT-L-14-336-quickgelu) with random weights (speed does not depend on
them), one image of 640×480 (short side 640 → 640×853 with --short-side; default is the 480×640 image as it is), fp32,
2 threads. Stages run exactly as ``MasQCLIP.forward`` runs them; warm-up once, then the median of repetitions.

    python bench/model_stages.py                   # full size
    python bench/model_stages.py --model tiny-random
    python bench/model_stages.py --smoke --out /tmp/x.json   # tiny-random, small image, one repetition (smoke test)

Writes bench/results/model_stages_<model>.json.
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import statistics
import time
from pathlib import Path

import torch

from masqclip_cli.modeling.classifier import classify
from masqclip_cli.modeling.factory import load_model
from masqclip_cli.modeling.text import build_text_embeddings
from masqclip_cli.vocab import load_vocabulary


def _timed(fn):
    start = time.perf_counter()
    value = fn()
    return value, time.perf_counter() - start


def run_once(model, image: torch.Tensor) -> dict[str, float]:
    times: dict[str, float] = {}
    proposals = model.proposals
    normalized, times["preprocess"] = _timed(lambda: proposals.normalize_and_pad([image]))
    feats, times["backbone"] = _timed(lambda: proposals.backbone(normalized))
    (mask_features, multi_scale, *_), times["pixel_decoder"] = _timed(lambda: proposals.pixel_decoder(feats))
    preds, times["transformer_decoder"] = _timed(lambda: proposals.predictor(multi_scale, mask_features))

    def clip_side():
        raw = torch.zeros(1, 3, *normalized.shape[-2:])
        raw[0, :, : image.shape[1], : image.shape[2]] = image.float()
        allowed = model.masq.attention_masks(preds["pred_masks"].float())
        return model.masq(model.masq.preprocess(raw), allowed)

    embeddings, times["clip"] = _timed(clip_side)
    log_p_obj = torch.log_softmax(preds["pred_logits"].float(), -1)[..., 0]
    _, times["classifier"] = _timed(lambda: classify(embeddings, model.text_embeddings, log_p_obj))
    return times


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
    image = torch.randint(0, 256, (3, args.height, args.width), generator=torch.Generator().manual_seed(0),
                          dtype=torch.uint8)
    with torch.inference_mode():
        run_once(model, image)
        runs = [run_once(model, image) for _ in range(args.reps)]
    stages = {k: round(statistics.median(r[k] for r in runs), 3) for k in runs[0]}
    result = {
        "bench": "model_stages",
        "model": args.model,
        "image": [args.height, args.width],
        "machine": platform.machine(),
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "build_model_s": round(build_s, 2),
        "stages_s": stages,
        "total_s": round(sum(stages.values()), 3),
        **{k: round(v, 3) for k, v in text_times.items()},
        "peak_rss_gib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 2),
    }
    out = args.out or Path(__file__).parent / "results" / f"model_stages_{args.model}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
