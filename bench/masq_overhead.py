"""Mask-token overhead: MasQ visual forward with Q mask tokens vs open_clip ``encode_image``.

Same model, threads, dtype and attention kernel (both use torch SDPA); random weights (speed does not depend on
them). Warm-up, then the median of interleaved repetitions; the ratio is measured within one run. Also prints the
theoretical FLOP ratio from the geometry (multiply-adds of the transformer blocks).

    python bench/masq_overhead.py                      # ViT-B-16 @224, Q = 100
    python bench/masq_overhead.py --models ViT-B-16 ViT-L-14-336-quickgelu --reps 5
    python bench/masq_overhead.py --smoke --out /tmp/x.json   # the tiny CLIP, one repetition (smoke test)

Writes bench/results/masq_overhead.json.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from pathlib import Path

import torch

from masqclip_cli.modeling.clip_loader import create_open_clip
from masqclip_cli.modeling.factory import TINY_CLIP_CONFIG
from masqclip_cli.modeling.masq_visual import MasQVisual


def theoretical_ratio(width: int, tokens: int, queries: int) -> float:
    """FLOPs of (image path + mask tokens) / image path, per block (patch embedding and heads are negligible).

    Image tokens: q, k, v, out projections 4·N·d², MLP 8·N·d², attention scores and mixing 2·N²·d.
    Mask tokens: f_Q' and out projection 2·Q·d², MLP 8·Q·d², attention on the image tokens' K/V 2·Q·N·d
    (K and V are shared with the image path, so they cost nothing extra).
    """
    image = 12 * tokens * width**2 + 2 * tokens**2 * width
    mask = 10 * queries * width**2 + 2 * queries * tokens * width
    return (image + mask) / image


def _median_ms(fn, reps: int) -> float:
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1000)
    return statistics.median(times)


def measure(model_name: str, queries: int, reps: int, warmup: int) -> dict:
    torch.manual_seed(0)
    clip, spec = create_open_clip(TINY_CLIP_CONFIG if model_name == "tiny" else model_name, pretrained=None)
    visual = clip.visual.eval()
    masq = MasQVisual(visual).eval()
    size = masq.image_size
    pixels = torch.randn(1, 3, size, size)
    allowed = masq.attention_masks(torch.randn(1, queries, size // 4, size // 4))
    with torch.inference_mode():
        for _ in range(warmup):
            visual(pixels)
            masq(pixels, allowed)
        plain, masked = [], []
        for _ in range(reps):  # interleaved, so drift in machine load hits both alike
            plain.append(_median_ms(lambda: visual(pixels), 1))
            masked.append(_median_ms(lambda: masq(pixels, allowed), 1))
    plain_ms, masq_ms = statistics.median(plain), statistics.median(masked)
    return {
        "model": model_name,
        "image_size": size,
        "queries": queries,
        "encode_image_ms": round(plain_ms, 2),
        "masq_forward_ms": round(masq_ms, 2),
        "measured_ratio": round(masq_ms / plain_ms, 3),
        "theoretical_flop_ratio": round(theoretical_ratio(masq.width, masq.num_tokens, queries), 3),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["ViT-B-16"], help="open_clip model names, or 'tiny'")
    parser.add_argument("--queries", type=int, default=100)
    parser.add_argument("--reps", type=int, default=7)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "masq_overhead.json")
    parser.add_argument("--smoke", action="store_true", help="the tiny CLIP, one repetition (for the smoke test)")
    args = parser.parse_args()
    if args.smoke:
        args.models, args.reps, args.warmup = ["tiny"], 1, 1
    torch.set_num_threads(args.threads)
    rows = [measure(m, args.queries, args.reps, args.warmup) for m in args.models]
    result = {
        "bench": "masq_overhead",
        "machine": platform.machine(),
        "processor": platform.processor() or platform.platform(),
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "dtype": "float32",
        "rows": rows,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    tmp = args.out.with_suffix(".tmp")
    tmp.write_text(json.dumps(result, indent=1) + "\n")
    tmp.replace(args.out)
    for row in rows:
        print(
            f"{row['model']} @{row['image_size']} Q={row['queries']}: encode_image {row['encode_image_ms']} ms, "
            f"MasQ forward {row['masq_forward_ms']} ms, ratio {row['measured_ratio']} "
            f"(theory {row['theoretical_flop_ratio']})"
        )


if __name__ == "__main__":
    main()
