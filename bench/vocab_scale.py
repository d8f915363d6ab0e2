"""Vocabulary scale: text-bank build time for 10 … 10,000 class names (first run and cached), and what a cached
1,000-class vocabulary adds to a 10-image ``segment`` run.

Part 1, text bank: distinct bare class names (every name and synonym of the shipped presets, then "<modifier>
<name>" combinations) encoded by the ViT-B-16 text tower (random weights; speed does not depend on them) with
:func:`masqclip_cli.modeling.text.build_text_embeddings`: the first run into an empty cache folder (encodes every
name, batches of 256, writes the cache file), then the median of ``--repeats`` cached runs (key + file read).

Part 2, "a cached vocabulary of 1,000 classes adds under 5 % to a 10-image run": ``tiny-random`` on 10 images (the
two sample photos copied; short side 640), with a 10-class and a 1,000-class vocabulary, both already in the cache,
and a third arm that holds the output fixed: with random weights the class probabilities, and so how many segments
pass the thresholds and get written, change with the vocabulary; the third arm keeps the 10 classes' text
embeddings and gives the 990 others one embedding opposite to the model's mask embeddings, which wins no query (the
run writes what the 10-class run writes, checked by counting segments and instances): the vocabulary's own cost.
A run = set the vocabulary (cache hit) + :func:`masqclip_cli.inference.engine.segment` into a fresh folder (model
loading and process start are excluded: they do not depend on the vocabulary). Runs are interleaved, median of
``--repeats``; once with the CLI's default task (panoptic) and once with all three tasks.

    python bench/vocab_scale.py                          # 10, 150, 1000, 10000 names; segment overhead
    python bench/vocab_scale.py --sizes 10,150 --no-segment

Writes bench/results/vocab_scale.json.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from _common import RESULTS, SAMPLE_IMAGES, copy_images, machine_info, median_time, write_json
from PIL import Image

from masqclip_cli.inference.engine import RunOptions, segment
from masqclip_cli.inference.postprocess import PostprocessConfig
from masqclip_cli.modeling.clip_loader import create_open_clip, get_tokenizer
from masqclip_cli.modeling.factory import TINY_CLIP_CONFIG, load_model
from masqclip_cli.modeling.text import TextEmbeddingCache, TextEncoder, build_text_embeddings
from masqclip_cli.vocab import PRESET_NAMES, VocabClass, Vocabulary, load_preset

FORMAT_FOR_TASK = {"instance": "coco", "panoptic": "panoptic", "semantic": "labels"}  # the CLI's defaults
MODIFIERS = (
    "red", "blue", "green", "yellow", "black", "white", "brown", "grey", "orange", "purple", "pink", "golden",
    "wooden", "metal", "plastic", "glass", "stone", "paper", "leather", "woollen", "small", "large", "old", "new",
    "broken", "wet", "dry", "striped", "spotted", "painted", "folded", "open", "closed", "empty", "full", "round",
    "square", "tall", "short", "distant",
)


def class_names(count: int) -> list[str]:
    """``count`` distinct (case-insensitively) bare class names, the same list prefix for every count."""
    base: list[str] = []
    seen: set[str] = set()
    for preset in PRESET_NAMES:
        for cls in load_preset(preset):
            for name in cls.prompts:
                key = name.casefold()
                if key not in seen:
                    seen.add(key)
                    base.append(name)
    names = base[:count]
    for modifier in MODIFIERS:
        for name in base:
            if len(names) >= count:
                return names
            combined = f"{modifier} {name}"
            if combined.casefold() not in seen:
                seen.add(combined.casefold())
                names.append(combined)
    if len(names) < count:
        raise SystemExit(f"only {len(names)} distinct names can be made")
    return names


def make_vocab(count: int) -> Vocabulary:
    return Vocabulary([VocabClass(name) for name in class_names(count)], source=f"<bench {count} names>")


def text_bank_rows(sizes: list[int], text_model: str, repeats: int, tmp: Path) -> tuple[list[dict], float]:
    torch.manual_seed(0)
    t0 = time.perf_counter()
    clip, spec = create_open_clip(TINY_CLIP_CONFIG if text_model == "tiny" else text_model, None)
    encoder = TextEncoder(clip, get_tokenizer(spec), spec.weights_id)
    build_s = time.perf_counter() - t0
    build_text_embeddings(make_vocab(2), encoder)  # warm-up (no cache)
    rows = []
    for size in sizes:
        vocab = make_vocab(size)
        cache = TextEmbeddingCache(tmp / f"text_cache_{size}")  # empty
        calls = encoder.calls
        start = time.perf_counter()
        bank = build_text_embeddings(vocab, encoder, cache=cache)
        first = time.perf_counter() - start
        batches = encoder.calls - calls
        calls = encoder.calls
        cached, _ = median_time(lambda v=vocab, c=cache: build_text_embeddings(v, encoder, cache=c), repeats)
        if encoder.calls != calls:
            raise SystemExit("the cached runs encoded names: the cache did not hit")
        cache_file = next(cache.directory.glob("*.safetensors"))
        rows.append({
            "classes": size,
            "first_run_s": round(first, 3),
            "first_run_ms_per_name": round(1000 * first / (size + 1), 2),
            "encode_batches": batches,
            "cached_run_ms": round(1000 * cached, 2),
            "speedup_cached": round(first / cached, 1),
            "bank_shape": list(bank.shape),
            "cache_file_mib": round(cache_file.stat().st_size / 2**20, 3),
        })
        print(f"{size} names: first {rows[-1]['first_run_s']} s, cached {rows[-1]['cached_run_ms']} ms", flush=True)
    return rows, build_s


def _output_counts(out_dir: Path) -> dict[str, int]:
    """Segments / instances a run wrote (to show whether two runs produced the same output)."""
    counts = {}
    panoptic = out_dir / "panoptic.json"
    if panoptic.is_file():
        annotations = json.loads(panoptic.read_text())["annotations"]
        counts["panoptic_segments"] = sum(len(a["segments_info"]) for a in annotations)
    instances = out_dir / "instances.json"
    if instances.is_file():
        counts["instances"] = len(json.loads(instances.read_text())["annotations"])
    return counts


def segment_overhead(args: argparse.Namespace, tmp: Path) -> dict:
    """Three arms, interleaved: the small vocabulary, the large one as encoded (its own random-model outputs), and
    the large one with its outputs held fixed -- the small vocabulary's classes first, the other classes given one
    embedding opposite to the model's mask embeddings, so that they win no query and the run writes what the small
    run writes (``same_output_as_small`` records whether it did, by counting segments and instances)."""
    model = load_model(args.segment_model)
    cache = TextEmbeddingCache(tmp / "segment_cache")
    images = tmp / "images"
    copy_images(args.images, images, args.segment_images)
    small, large = args.segment_vocabs
    vocab_small, vocab_large = make_vocab(small), make_vocab(large)
    assert [c.name for c in vocab_large][:small] == [c.name for c in vocab_small]
    for vocab in (vocab_small, vocab_large):
        model.set_vocabulary(vocab, cache=cache)  # fill the cache: the runs below are cached runs
    model.set_vocabulary(vocab_small, cache=cache)
    bank_small = model.text_embeddings.clone()  # (small + 1, D), background last
    # The direction opposite to this model's mask embeddings (the mean over the first image's queries): the extra
    # classes' similarity is then far below the real classes' (at CLIP's logit scale of 100, p_clip is small).
    rgb = np.asarray(Image.open(sorted(images.iterdir())[0]).convert("RGB"))
    with torch.inference_mode():
        (out,) = model([torch.from_numpy(rgb.copy()).permute(2, 0, 1)])
    far = torch.nn.functional.normalize(-out.embeddings.float().mean(dim=0), dim=0)
    bank_fixed = torch.cat([bank_small[:small], far.expand(large - small, -1), bank_small[small:]])
    arms = ("small", "large", "large_fixed")
    result: dict = {"model": args.segment_model, "images": args.segment_images, "short_side": args.short_side,
                    "vocabularies": [small, large], "repeats": args.repeats,
                    "arms": {"small": f"{small} classes", "large": f"{large} classes, cached, as encoded",
                             "large_fixed": f"{large} classes, cached bank, the extra classes given one embedding "
                                            "opposite to the mask embeddings (meant to write what 'small' writes: "
                                            "see same_output_as_small)"},
                    "by_tasks": []}
    counter = 0
    for task_spec in args.segment_tasks:
        tasks = tuple(task_spec.split(","))
        options = RunOptions(formats=tuple(FORMAT_FOR_TASK[t] for t in tasks),
                             postprocess=PostprocessConfig(tasks=tasks), short_side=args.short_side)
        walls: dict[str, list[float]] = {arm: [] for arm in arms}
        parts: dict[str, list[dict]] = {arm: [] for arm in arms}
        counts: dict[str, dict[str, int]] = {}
        for rep in range(args.repeats + 1):  # the first round is a warm-up
            for arm in arms:
                counter += 1
                calls = model.text_encoder.calls
                start = time.perf_counter()
                if arm == "large_fixed":
                    model.set_text_embeddings(bank_fixed, vocab_large)
                    vocab = vocab_large
                else:
                    vocab = vocab_small if arm == "small" else vocab_large
                    model.set_vocabulary(vocab, cache=cache)
                vocab_s = time.perf_counter() - start
                out_dir = tmp / f"seg_{counter}"
                summary = segment(model, vocab, str(images), out_dir, options, model_id=f"bench-{arm}")
                wall = time.perf_counter() - start
                if model.text_encoder.calls != calls or summary.done != args.segment_images:
                    raise SystemExit("segment run was not a cached run over every image")
                counts[arm] = _output_counts(out_dir)
                if rep:
                    walls[arm].append(wall)
                    parts[arm].append({"set_vocabulary": vocab_s, **summary.seconds})
        med = {arm: statistics.median(w) for arm, w in walls.items()}
        split = {arm: {k: round(statistics.median(p[k] for p in parts[arm]), 3) for k in parts[arm][0]}
                 for arm in parts}
        added = {arm: (med[arm] - med["small"]) / med["small"] for arm in ("large", "large_fixed")}
        result["by_tasks"].append({
            "tasks": list(tasks),
            **{f"run_{arm}_s": round(med[arm], 3) for arm in arms},
            "runs_s": {arm: [round(w, 3) for w in ws] for arm, ws in walls.items()},
            "seconds_split": split,
            "outputs": counts,
            "same_output_as_small": counts["large_fixed"] == counts["small"],
            "added_fraction": {arm: round(v, 4) for arm, v in added.items()},
            "target_fraction": 0.05,
            "meets_target": added["large_fixed"] < 0.05,
        })
        print(f"segment {args.segment_images} images, tasks {task_spec}: {small} classes {med['small']:.2f} s "
              f"{counts['small']}, {large} classes {med['large']:.2f} s (+{100 * added['large']:.1f} %) "
              f"{counts['large']}, {large} classes same output {med['large_fixed']:.2f} s "
              f"(+{100 * added['large_fixed']:.1f} %) {counts['large_fixed']}", flush=True)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="10,150,1000,10000", help="comma list of class counts")
    parser.add_argument("--text-model", default="ViT-B-16", help="open_clip model name, or 'tiny'")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--no-segment", action="store_true", help="skip part 2 (segment overhead)")
    parser.add_argument("--segment-model", default="tiny-random")
    parser.add_argument("--segment-images", type=int, default=10)
    parser.add_argument("--segment-vocabs", default="10,1000", help="small,large class counts")
    parser.add_argument("--segment-tasks", nargs="+", default=["panoptic", "panoptic,semantic,instance"])
    parser.add_argument("--images", type=Path, default=SAMPLE_IMAGES, help="images copied for part 2")
    parser.add_argument("--short-side", type=int, default=640)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--smoke", action="store_true", help="tiny text tower, few names, 2 small images")
    parser.add_argument("--out", type=Path, default=RESULTS / "vocab_scale.json")
    args = parser.parse_args()
    if args.smoke:
        args.sizes, args.text_model, args.repeats = "10,30", "tiny", 1
        args.segment_images, args.segment_vocabs, args.segment_tasks, args.short_side = 2, "10,30", ["panoptic"], 128
    args.segment_vocabs = [int(v) for v in args.segment_vocabs.split(",")]
    torch.set_num_threads(args.threads)
    sizes = [int(s) for s in args.sizes.split(",") if s.strip()]
    with tempfile.TemporaryDirectory(prefix="masqclip-bench-") as tmp_name:
        tmp = Path(tmp_name)
        rows, build_s = text_bank_rows(sizes, args.text_model, args.repeats, tmp)
        overhead = None if args.no_segment else segment_overhead(args, tmp)
    result = {
        "bench": "vocab_scale",
        **machine_info(torch.get_num_threads()),
        "text_model": args.text_model,
        "text_weights": "random",
        "templates": None,
        "encode_batch_size": 256,
        "build_text_tower_s": round(build_s, 2),
        "rows": rows,
        "segment_overhead": overhead,
    }
    write_json(args.out, result)


if __name__ == "__main__":
    main()
