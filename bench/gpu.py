"""GPU: CUDA against CPU, bf16 / fp16 against fp32, and throughput of the full-size model on one CUDA device.

Run on the GPU machine, from a clone of the repository (one line; about 8 minutes at most on an H200, the script
budgets its own time):

    pip install -e . && python bench/gpu.py --out bench/results/gpu.json

What it does, in order of priority (what does not fit in ``--time-budget`` seconds, default 420, is skipped with a
note; the result file is rewritten after every measurement, so a killed run still leaves what was measured, and a
watchdog stops the run 50 s after the budget):

(a) accuracy, on ``full-random`` (the published geometry: m2f-r50 proposals + ViT-L-14-336-quickgelu, random
    weights, seeded) with the ``ade20k-150`` vocabulary (one text bank for every run, so the visual path alone is
    compared) and object threshold 0 (random weights put every query below the usual 0.3; with 0 every query takes
    part, the hardest case for agreement and the most post-processing work):

    - CUDA fp32 against CPU fp32 on one photo (640 short side): max abs diff of the mask logits and p_cls, then the
      share of pixels where the semantic map, the panoptic map (as (class, query) per pixel) and the instance masks
      (matched by (query, class)) agree; target >= 99.9 %. Once with torch's default TF32 settings (what ``segment``
      runs with: cuDNN convolutions in TF32) and once with TF32 off;
    - bf16 and fp16 on CUDA against CUDA fp32: the same diffs and pixel agreement (target >= 99 %), and the PQ of the
      reduced-precision panoptic results scored against the fp32 ones as ground truth on a small synthetic batch
      (``masqclip_cli.evaluation.panoptic``; target >= 95);
    - the mask tokens' attention (``masked_attention``: SDPA with an additive float mask) at the model's own shapes
      with only the fused memory-efficient kernel allowed, float mask and (for comparison) the former boolean mask,
      against the math kernel; and the attention kernels one CLIP pass launches (profiler).

(b) throughput of full-random at 640 short side, 150 classes, 100 queries, on same-size photos (two COCO photos as
    640x480 JPEGs, repeated): batch 1 / 4 / 16 / 32 x fp32 / bf16 / fp16, eager, then with ``torch.compile``
    (:func:`masqclip_cli.modeling.runtime.compile_model`, what ``segment --compile`` does; the first call of each
    new shape compiles, so compiled rows have their own warm-up and cost more budget). Per row, images/s of

    - ``model``: the forward alone (inputs already prepared, on the host, staged by ``Predictor.forward``);
    - ``panoptic`` / ``all_tasks``: forward + post-processing of panoptic / semantic+panoptic+instance on the GPU at
      the photo's size, decode excluded (what the model side of ``segment`` does);
    - ``all_tasks_with_decode``: from the JPEG files: decoding and resizing in ``--workers`` threads ahead of the
      model (as ``segment --workers``), forward, all three tasks (no writers);

    and the peak GPU memory of the row (``torch.cuda.max_memory_allocated``). For eager rows also the CLIP pass
    (``MasQVisual.forward`` with the 100 mask tokens) against plain open_clip ``visual(pixels)`` (= ``encode_image``
    un-normalised) at the same batch; target ratio <= 1.3.

``--smoke`` runs every step on the CPU with tiny-random (batch 1 / 2, fp32 + bf16, 64 short side, one repetition,
no compiled rows) in well under a minute and writes only to ``--out``. Without a CUDA device and without ``--smoke``
it says so in one line and exits 2.

Writes bench/results/gpu.json (``--out`` elsewhere).
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import RESULTS, SAMPLE_IMAGES, machine_info, write_json  # noqa: E402

TASKS_ALL = ("panoptic", "semantic", "instance")
TARGETS = {"cuda_vs_cpu_pixel_agreement": 0.999, "reduced_precision_pixel_agreement": 0.99,
           "reduced_precision_pq": 95.0, "clip_over_encode_image": 1.3}
WATCHDOG_GRACE_S = 50.0


# ---------------------------------------------------------------------------------------------------- helpers
class Budget:
    """Seconds left of ``--time-budget``; a measurement runs only when its estimate fits."""

    def __init__(self, seconds: float) -> None:
        self.start = time.perf_counter()
        self.seconds = float(seconds)

    def left(self) -> float:
        return self.seconds - (time.perf_counter() - self.start)

    def fits(self, estimate: float) -> bool:
        return self.left() >= estimate


class Results:
    """The result dict, written atomically after every measurement."""

    def __init__(self, path: Path, data: dict[str, Any]) -> None:
        self.path, self.data = path, data
        self.lock = threading.Lock()

    def save(self) -> None:
        with self.lock:
            self.data["elapsed_s"] = round(time.perf_counter() - STARTED, 1)
            write_json(self.path, self.data)

    def note(self, text: str) -> None:
        self.data.setdefault("notes", []).append(text)
        print(f"note: {text}", flush=True)
        self.save()


STARTED = time.perf_counter()


def _sync(device: str) -> None:
    import torch

    if device.startswith("cuda"):
        torch.cuda.synchronize()


def _timed(fn, device: str) -> tuple[Any, float]:  # noqa: ANN001
    _sync(device)
    start = time.perf_counter()
    value = fn()
    _sync(device)
    return value, time.perf_counter() - start


def _err(a, b) -> float:  # noqa: ANN001
    return float((a.double().cpu() - b.double().cpu()).abs().max()) if a.numel() else 0.0


def _photos(folder: Path, count: int, height: int, width: int) -> list[Path]:
    """``count`` JPEGs of one size (the sample photos resized to ``width`` x ``height``, repeated)."""
    from PIL import Image

    sources = sorted(p for p in SAMPLE_IMAGES.iterdir() if p.suffix.lower() in (".jpg", ".jpeg", ".png"))
    encoded = []
    for src in sources:
        with Image.open(src) as im:
            out = folder / f"src_{src.stem}.jpg"
            im.convert("RGB").resize((width, height), Image.BILINEAR).save(out, quality=90)
            encoded.append(out.read_bytes())
    paths = []
    for i in range(count):
        path = folder / f"{i:04d}.jpg"
        path.write_bytes(encoded[i % len(encoded)])
        paths.append(path)
    return paths


def _synthetic_images(count: int, height: int, width: int, seed: int = 0) -> list[np.ndarray]:
    """Random-blob RGB pictures (the synthetic batch of the PQ check)."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:height, 0:width]
    images = []
    for _ in range(count):
        img = np.full((height, width, 3), rng.integers(0, 256, 3), dtype=np.uint8)
        for _ in range(6):
            cy, cx = rng.uniform(0, height), rng.uniform(0, width)
            ry, rx = rng.uniform(height / 10, height / 2), rng.uniform(width / 10, width / 2)
            img[((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2 <= 1] = rng.integers(0, 256, 3)
        images.append(img)
    return images


def _gpu_info(device: str) -> dict[str, Any]:
    import torch

    if not device.startswith("cuda"):
        return {"device": device}
    props = torch.cuda.get_device_properties(device)
    return {
        "device": device,
        "name": props.name,
        "capability": list(torch.cuda.get_device_capability(device)),
        "total_memory_gib": round(props.total_memory / 2**30, 1),
        "cuda": torch.version.cuda,
        "cudnn": torch.backends.cudnn.version(),
        "matmul_allow_tf32": torch.backends.cuda.matmul.allow_tf32,
        "cudnn_allow_tf32": torch.backends.cudnn.allow_tf32,
    }


# ---------------------------------------------------------------------------------------------------- models
def _on(base, device: str, precision: str):  # noqa: ANN001, ANN202
    """A copy of ``base`` (CPU fp32) on ``device`` in ``precision``, as ``load_model`` applies it."""
    from masqclip_cli.modeling.factory import PRECISIONS

    encoder, base.text_encoder = base.text_encoder, None  # the copies need no text tower (the bank is shared)
    try:
        model = copy.deepcopy(base).to(device)
    finally:
        base.text_encoder = encoder
    model.proposals.to(PRECISIONS[precision])
    model.masq.to(PRECISIONS[precision])
    model.set_text_embeddings(base.text_embeddings, base.vocabulary)
    return model.eval()


def _predictor(model, config, short_side: int):  # noqa: ANN001, ANN202
    from masqclip_cli.inference.predictor import Predictor

    return Predictor.for_encoded(model, model.vocabulary, config, short_side, 100_000)


def _segment_all(predictor, prepared) -> tuple[list, list]:  # noqa: ANN001
    outputs = predictor.forward([t for _, t in prepared])
    return [predictor.postprocess(out, rgb.shape[:2]) for (rgb, _), out in zip(prepared, outputs)], outputs


# ---------------------------------------------------------------------------------------------------- agreement
def _panoptic_keys(seg) -> np.ndarray:  # noqa: ANN001
    """(H, W) int64: each pixel's (class, query) of its panoptic segment, -1 on void."""
    lut = np.full(int(seg.panoptic.max()) + 1 if seg.panoptic.size else 1, -1, dtype=np.int64)
    for sid, cls, query in zip(seg.segments.id, seg.segments.class_id, seg.segments.query):
        lut[int(sid)] = int(cls) * 100_000 + int(query)
    return lut[seg.panoptic]


def _instance_disagreement(a, b) -> float:  # noqa: ANN001
    """Share of (instance, pixel) pairs that differ, instances matched by (query, class); one missing on either
    side counts as all-zero there."""
    ma = {(int(q), int(c)): m for q, c, m in zip(a.instances.query, a.instances.class_id, a.instances.masks)}
    mb = {(int(q), int(c)): m for q, c, m in zip(b.instances.query, b.instances.class_id, b.instances.masks)}
    keys = set(ma) | set(mb)
    if not keys:
        return 0.0
    h, w = a.image_size
    zero = np.zeros((h, w), dtype=bool)
    wrong = sum(int(np.count_nonzero(ma.get(k, zero) ^ mb.get(k, zero))) for k in keys)
    return wrong / (len(keys) * h * w)


def _agreement(a, b) -> dict[str, Any]:  # noqa: ANN001
    return {
        "semantic": float(np.mean(a.semantic == b.semantic)),
        "panoptic": float(np.mean(_panoptic_keys(a) == _panoptic_keys(b))),
        "instance": 1.0 - _instance_disagreement(a, b),
        "segments": [len(a.segments), len(b.segments)],
        "instances": [len(a.instances), len(b.instances)],
    }


def _output_diffs(x, y) -> dict[str, float]:  # noqa: ANN001
    finite = bool(x.p_cls.isfinite().all() and x.mask_logits.isfinite().all())
    return {"mask_logits_max_abs": _err(x.mask_logits, y.mask_logits), "p_cls_max_abs": _err(x.p_cls, y.p_cls),
            "p_cls_max": float(y.p_cls.max()), "finite": finite}


def _pq(pred_segs, gt_segs, isthing) -> dict[str, Any]:  # noqa: ANN001
    from masqclip_cli.evaluation.panoptic import PanopticAccumulator, PanopticSegmentInfo

    acc = PanopticAccumulator(len(isthing))
    for p, g in zip(pred_segs, gt_segs):
        acc.add(g.panoptic, [PanopticSegmentInfo(int(i), int(c)) for i, c in zip(g.segments.id, g.segments.class_id)],
                p.panoptic, [PanopticSegmentInfo(int(i), int(c)) for i, c in zip(p.segments.id, p.segments.class_id)])
    res = acc.result(isthing)["all"]
    return {k: (round(v, 3) if isinstance(v, float) else v) for k, v in res.items()}


def sdpa_kernels(device: str, dtypes: list[str], queries: int, tokens: int, heads: int, head_dim: int
                 ) -> dict[str, Any]:
    """The mask-token attention at the model's shapes with only the fused memory-efficient kernel allowed."""
    import torch
    import torch.nn.functional as F
    from torch.nn.attention import SDPBackend, sdpa_kernel

    from masqclip_cli.modeling.factory import PRECISIONS
    from masqclip_cli.modeling.masq_visual import attention_bias, masked_attention

    out: dict[str, Any] = {}
    g = torch.Generator().manual_seed(0)
    for name in dtypes:
        dtype = PRECISIONS[name]
        q = torch.randn(2, heads, queries, head_dim, generator=g).to(device, dtype)
        k = torch.randn(2, heads, tokens, head_dim, generator=g).to(device, dtype)
        v = torch.randn(2, heads, tokens, head_dim, generator=g).to(device, dtype)
        allowed = (torch.rand(2, 1, queries, tokens, generator=g) < 0.3).to(device)
        allowed[..., 0] = True
        with sdpa_kernel([SDPBackend.MATH]):
            reference = masked_attention(q, k, v, allowed)
        row: dict[str, Any] = {}
        for label, mask in (("float_mask", attention_bias(allowed, dtype)), ("bool_mask", allowed)):
            try:
                with sdpa_kernel([SDPBackend.EFFICIENT_ATTENTION]):
                    fused = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
                row[label] = {"efficient_kernel": True, "max_abs_vs_math": _err(fused, reference)}
            except RuntimeError as exc:
                row[label] = {"efficient_kernel": False, "error": str(exc).splitlines()[0][:200]}
        out[name] = row
    return out


def attention_kernel_names(model, device: str, pixels, allowed) -> list[str]:  # noqa: ANN001
    """CUDA kernels of one MasQ CLIP pass whose names look like attention / softmax (profiler)."""
    if not device.startswith("cuda"):
        return []
    import torch
    from torch.profiler import ProfilerActivity, profile

    with torch.no_grad(), profile(activities=[ProfilerActivity.CUDA]) as prof:
        model.masq(pixels, allowed)
        torch.cuda.synchronize()
    names = {e.name for e in prof.events() if e.device_type.name == "CUDA"}
    wanted = ("fmha", "attention", "flash", "efficient", "softmax", "mem_eff")
    return sorted(n[:160] for n in names if any(w in n.lower() for w in wanted))[:20]


def accuracy(args, base, device: str, results: Results, budget: Budget) -> dict[str, Any]:  # noqa: ANN001, C901
    """Section (a); returns the models it made on the device, by precision (reused for section (b))."""
    import torch

    from masqclip_cli.inference.postprocess import PostprocessConfig

    acc: dict[str, Any] = results.data.setdefault("accuracy", {})
    config = PostprocessConfig(tasks=TASKS_ALL, object_mask_threshold=0.0)
    acc["postprocess"] = {"tasks": list(TASKS_ALL), "object_mask_threshold": 0.0}
    photo = args.photos[0]
    cpu_pred = _predictor(base, config, args.short_side)
    prepared = [cpu_pred.preprocess(photo)]
    acc["image"] = {"file": photo.name, "model_input": list(prepared[0][1].shape[1:])}
    (cpu_segs, cpu_outs), cpu_s = _timed(lambda: _segment_all(cpu_pred, prepared), "cpu")
    acc["cpu_fp32_s"] = round(cpu_s, 3)
    results.save()

    runs: dict[str, Any] = {}
    tf32 = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
    variants = [("fp32", True)] + ([("fp32", False)] if device.startswith("cuda") else [])
    for precision, default_tf32 in variants:
        model = _on(base, device, precision)
        if not default_tf32:
            torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
        try:
            segs, outs = _segment_all(_predictor(model, config, args.short_side), prepared)
        finally:
            torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = tf32
        label = "default_tf32" if default_tf32 else "tf32_off"
        acc.setdefault("device_vs_cpu_fp32", {})[label] = {**_output_diffs(outs[0], cpu_outs[0]),
                                                           "pixel_agreement": _agreement(segs[0], cpu_segs[0])}
        if default_tf32:
            runs["fp32"], ref_photo, ref_photo_outs = model, segs, outs  # the reference of the reduced precisions
        else:
            del model
        results.save()

    # reduced precisions against fp32 on the device, one photo + the synthetic batch for PQ
    synth = [_predictor(runs["fp32"], config, args.short_side).preprocess(img)
             for img in _synthetic_images(args.pq_images, *args.image_size)]
    ref_synth, _ = _segment_all(_predictor(runs["fp32"], config, args.short_side), synth)
    isthing = base.vocabulary.isthing
    acc["pq_batch"] = {"images": len(synth), "size": list(args.image_size)}
    for precision in [p for p in args.precisions if p != "fp32"]:
        if not budget.fits(30):
            results.note(f"accuracy {precision}: skipped (time budget, {budget.left():.0f} s left)")
            continue
        model = _on(base, device, precision)
        pred = _predictor(model, config, args.short_side)
        segs, outs = _segment_all(pred, prepared)
        synth_segs, _ = _segment_all(pred, synth)
        agreement = [_agreement(s, r) for s, r in zip(synth_segs, ref_synth)]
        acc.setdefault("precision_vs_fp32", {})[precision] = {
            **_output_diffs(outs[0], ref_photo_outs[0]),
            "pixel_agreement": _agreement(segs[0], ref_photo[0]),
            "synthetic_pixel_agreement_min": {k: min(a[k] for a in agreement)
                                              for k in ("semantic", "panoptic", "instance")},
            "pq_against_fp32": _pq(synth_segs, ref_synth, isthing),
        }
        runs[precision] = model
        results.save()

    masq = base.masq
    try:
        acc["sdpa_mask_attention"] = sdpa_kernels(device, args.precisions, int(cpu_outs[0].p_cls.shape[0]),
                                                  masq.num_tokens, masq.num_heads, masq.head_dim)
    except Exception as exc:  # noqa: BLE001 - a diagnostic never stops the run
        acc["sdpa_mask_attention"] = {"error": f"{type(exc).__name__}: {str(exc).splitlines()[0][:200]}"}
    results.save()
    return runs


# ---------------------------------------------------------------------------------------------------- throughput
def _passes(fn, warmup: int, repeats: int, device: str) -> tuple[float, list[float]]:  # noqa: ANN001
    for _ in range(warmup):
        fn()
    times = [_timed(fn, device)[1] for _ in range(max(1, repeats))]
    return statistics.median(times), times


def throughput_row(args, model, precision: str, batch: int, compiled: bool, device: str, prepared, files  # noqa: ANN001, C901
                   ) -> dict[str, Any]:
    """One row of section (b)."""
    import torch

    from masqclip_cli.inference.postprocess import PostprocessConfig

    pan_cfg = PostprocessConfig(tasks=("panoptic",), object_mask_threshold=0.0)
    all_cfg = PostprocessConfig(tasks=TASKS_ALL, object_mask_threshold=0.0)
    pan, full = _predictor(model, pan_cfg, args.short_side), _predictor(model, all_cfg, args.short_side)
    n = len(prepared)
    chunks = [prepared[i : i + batch] for i in range(0, n, batch)]
    split = {"model": 0.0, "panoptic": 0.0, "all_tasks": 0.0}

    def one_pass() -> None:
        for chunk in chunks:
            outs, s = _timed(lambda c=chunk: full.forward([t for _, t in c]), device)
            split["model"] += s
            _, s = _timed(lambda c=chunk, o=outs: [pan.postprocess(x, r.shape[:2]) for (r, _), x in zip(c, o)], device)
            split["panoptic"] += s
            _, s = _timed(lambda c=chunk, o=outs: [full.postprocess(x, r.shape[:2]) for (r, _), x in zip(c, o)],
                          device)
            split["all_tasks"] += s

    if device.startswith("cuda"):
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    t0 = time.perf_counter()
    for _ in range(args.warmup + (1 if compiled else 0)):  # compiled: one more pass (compilation of the shapes)
        one_pass()
    warm_s = time.perf_counter() - t0
    per_pass = []
    for _ in range(args.repeats):
        for key in split:
            split[key] = 0.0
        one_pass()
        per_pass.append(dict(split))
    med = {k: statistics.median(p[k] for p in per_pass) for k in split}

    def with_decode() -> None:
        with ThreadPoolExecutor(args.workers) as pool:
            batch_items: list = []
            for item in pool.map(full.preprocess, files):
                batch_items.append(item)
                if len(batch_items) == batch:
                    outs = full.forward([t for _, t in batch_items])
                    for (rgb, _), out in zip(batch_items, outs):
                        full.postprocess(out, rgb.shape[:2])
                    batch_items = []
            if batch_items:
                outs = full.forward([t for _, t in batch_items])
                for (rgb, _), out in zip(batch_items, outs):
                    full.postprocess(out, rgb.shape[:2])

    decode_s, decode_all = _passes(with_decode, 0, args.repeats, device)
    row = {
        "precision": precision, "batch": batch, "compile": compiled, "images": n,
        "images_per_s": {
            "model": round(n / med["model"], 3),
            "panoptic": round(n / (med["model"] + med["panoptic"]), 3),
            "all_tasks": round(n / (med["model"] + med["all_tasks"]), 3),
            "all_tasks_with_decode": round(len(files) / decode_s, 3),
        },
        "seconds_per_pass": {k: round(v, 4) for k, v in med.items()} | {"all_tasks_with_decode": round(decode_s, 4)},
        "warmup_s": round(warm_s, 2),
        "peak_gpu_mib": (round(torch.cuda.max_memory_allocated(device) / 2**20, 1)
                         if device.startswith("cuda") else None),
    }
    state = getattr(model, "_masqclip_compile_state", None)
    if compiled and state is not None and state.failed:
        row["compile_fallback"] = state.failed
    return row


def clip_ratio(model, device: str, prepared, batch: int, reps: int) -> dict[str, Any]:  # noqa: ANN001
    """MasQ CLIP pass (Q mask tokens) against plain open_clip ``visual(pixels)`` at one batch, same model."""
    import torch

    images = [t for _, t in prepared[:batch]]
    while len(images) < batch:
        images += images[: batch - len(images)]
    dtype = model.masq.visual.conv1.weight.dtype
    with torch.no_grad():
        imgs = [im.to(device) for im in images]
        padded = model.padded_size(imgs[0].shape[1], imgs[0].shape[2])
        normalized = model.proposals.normalize_and_pad(imgs).to(dtype)
        raw = torch.zeros(len(imgs), 3, *padded, device=device)
        for i, im in enumerate(imgs):
            raw[i, :, : im.shape[1], : im.shape[2]] = im.float()
        pixels = model.masq.preprocess(raw)
        allowed = model.masq.attention_masks(model.proposals(normalized).pred_masks.float())
        masq_s, masq_all = _passes(lambda: model.masq(pixels, allowed), 1, reps, device)
        plain_s, plain_all = _passes(lambda: model.masq.visual(pixels.to(dtype)), 1, reps, device)
        masks_s, _ = _passes(lambda: model.masq.attention_masks(model.proposals(normalized).pred_masks.float()), 0,
                             1, device)
    kernels = None
    if batch == 1:
        try:
            kernels = attention_kernel_names(model, device, pixels, allowed)
        except Exception as exc:  # noqa: BLE001 - a diagnostic never stops the run
            kernels = [f"profiler failed: {type(exc).__name__}: {str(exc).splitlines()[0][:200]}"]
    row = {"batch": batch, "queries": int(allowed.shape[1]), "masq_forward_s": round(masq_s, 5),
           "encode_image_s": round(plain_s, 5), "ratio": round(masq_s / plain_s, 3),
           "masq_forward_s_all": [round(t, 5) for t in masq_all],
           "encode_image_s_all": [round(t, 5) for t in plain_all],
           "proposals_and_attention_masks_s": round(masks_s, 5)}
    if kernels is not None:
        row["attention_kernels"] = kernels
    return row


def _row_order(compile_modes: list[bool], precisions: list[str], batches: list[int]) -> list[tuple[bool, str, int]]:
    """Eager rows first, in the order given; then compiled rows by priority (each new shape or dtype compiles
    again, so what the budget cuts should be the least telling): batch 16, 32, 4, 1 (others after), bf16 before
    fp16 before fp32."""
    rows = [(False, p, b) for p in precisions for b in batches] if False in compile_modes else []
    if True in compile_modes:
        batch_rank = {b: i for i, b in enumerate((16, 32, 4, 1))}
        prec_rank = {p: i for i, p in enumerate(("bf16", "fp16", "fp32"))}
        rows += sorted(((True, p, b) for p in precisions for b in batches),
                       key=lambda r: (batch_rank.get(r[2], 9), r[2], prec_rank.get(r[1], 9)))
    return rows


# ---------------------------------------------------------------------------------------------------- main
def main() -> int:  # noqa: C901
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="full-random")
    parser.add_argument("--vocab", default="ade20k-150")
    parser.add_argument("--short-side", type=int, default=640)
    parser.add_argument("--batches", default="1,4,16,32")
    parser.add_argument("--precisions", default="fp32,bf16,fp16")
    parser.add_argument("--compile", default="off,on", help="off, on or off,on (compiled rows after all eager ones)")
    parser.add_argument("--images", type=int, default=32, help="images per throughput pass")
    parser.add_argument("--pq-images", type=int, default=4, help="the synthetic batch of the PQ check")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--clip-repeats", type=int, default=5, help="repetitions of the CLIP pass timing")
    parser.add_argument("--workers", type=int, default=min(4, os.cpu_count() or 1), help="decoding threads")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--time-budget", type=float, default=420.0, help="seconds for the measurements")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--smoke", action="store_true", help="CPU, tiny-random, batch 1/2, fp32+bf16, 64 short side")
    parser.add_argument("--out", type=Path, default=RESULTS / "gpu.json")
    args = parser.parse_args()

    import torch

    if args.smoke:
        args.model, args.short_side, args.batches, args.precisions = "tiny-random", 64, "1,2", "fp32,bf16"
        args.compile, args.images, args.pq_images, args.repeats, args.warmup = "off", 2, 2, 1, 0
        args.clip_repeats = 1
        args.device, args.time_budget = "cpu", min(args.time_budget, 120.0)
        args.threads = args.threads or 2
    elif not torch.cuda.is_available():
        print("no CUDA device: bench/gpu.py measures a CUDA GPU (run it on a GPU machine; --smoke runs it on the CPU)",
              file=sys.stderr)
        return 2
    if args.threads:
        torch.set_num_threads(args.threads)
    device = args.device
    batches = [int(b) for b in args.batches.split(",")]
    args.precisions = [p.strip() for p in args.precisions.split(",") if p.strip()]
    compile_modes = [c.strip() == "on" for c in args.compile.split(",") if c.strip()]
    budget = Budget(args.time_budget)
    results = Results(args.out, {
        "bench": "gpu",
        **machine_info(torch.get_num_threads()),
        "gpu": _gpu_info(device),
        "model": args.model, "vocab": args.vocab, "short_side": args.short_side, "batches": batches,
        "precisions": args.precisions, "compile": compile_modes, "images_per_pass": args.images,
        "repeats": args.repeats, "warmup": args.warmup, "workers": args.workers, "time_budget_s": args.time_budget,
        "smoke": args.smoke, "targets": TARGETS, "status": "running",
    })

    def watchdog() -> None:
        results.data["status"] = "stopped by the watchdog (time budget + grace exceeded); results are partial"
        results.save()
        print("gpu.py: " + results.data["status"], file=sys.stderr, flush=True)
        os._exit(3)

    timer = threading.Timer(args.time_budget + WATCHDOG_GRACE_S, watchdog)
    timer.daemon = True
    timer.start()

    from masqclip_cli.inference.postprocess import PostprocessConfig
    from masqclip_cli.modeling.factory import load_model
    from masqclip_cli.vocab import load_vocabulary

    if True in compile_modes:  # rows of three precisions and four batches: more than dynamo's 8 graphs per code
        import torch._dynamo.config as dynamo_config

        for name in ("cache_size_limit", "recompile_limit"):
            if hasattr(dynamo_config, name):
                setattr(dynamo_config, name, 64)
                results.data[f"dynamo_{name}"] = 64

    with tempfile.TemporaryDirectory(prefix="masqclip-gpu-") as tmp:
        args.image_size = (480, 640) if not args.smoke else (48, 64)
        files = _photos(Path(tmp), args.images, *args.image_size)
        args.photos = files
        t0 = time.perf_counter()
        base = load_model(args.model)  # CPU fp32, seeded random weights
        vocab = load_vocabulary(args.vocab)
        base.set_vocabulary(vocab)  # one text bank (encoded on the CPU) for every copy
        results.data["setup_s"] = round(time.perf_counter() - t0, 2)
        results.data["classes"] = len(vocab)
        results.save()

        with torch.no_grad():  # as segment runs the model (Predictor.forward, MasQCLIP.forward)
            runs = accuracy(args, base, device, results, budget)
        print(f"accuracy done in {time.perf_counter() - STARTED:.0f} s", flush=True)

        prepared = [_predictor(runs["fp32"], PostprocessConfig(), args.short_side).preprocess(f) for f in files]
        rows: list[dict[str, Any]] = results.data.setdefault("throughput", [])
        clips: list[dict[str, Any]] = results.data.setdefault("clip_vs_encode_image", [])
        estimates: dict[bool, float] = {False: 10.0, True: 150.0}
        for compiled, precision, batch in _row_order(compile_modes, args.precisions, batches):
            label = f"{precision} batch {batch} {'compiled' if compiled else 'eager'}"
            if precision not in runs:
                results.note(f"{label}: skipped (no {precision} model: skipped in the accuracy section)")
                continue
            model = runs[precision]
            if compiled:
                from masqclip_cli.modeling.runtime import compile_model

                compile_model(model, on_fallback=lambda m, p=precision: results.note(f"compile {p}: {m}"))
            if not budget.fits(estimates[compiled]):
                results.note(f"{label}: skipped (time budget: {budget.left():.0f} s left, ~"
                             f"{estimates[compiled]:.0f} s needed)")
                continue
            t1 = time.perf_counter()
            try:
                with torch.no_grad():
                    row = throughput_row(args, model, precision, batch, compiled, device, prepared, files)
            except Exception as exc:  # noqa: BLE001 - out of memory at a large batch: say so, go on
                rows.append({"precision": precision, "batch": batch, "compile": compiled,
                             "error": f"{type(exc).__name__}: {str(exc).splitlines()[0][:300]}"})
                results.note(f"{label}: failed ({rows[-1]['error']})")
                if device.startswith("cuda"):
                    torch.cuda.empty_cache()
                continue
            rows.append(row)
            results.save()
            if not compiled and budget.fits(5):
                try:
                    with torch.no_grad():
                        clips.append({"precision": precision, **clip_ratio(model, device, prepared, batch,
                                                                           args.clip_repeats)})
                except Exception as exc:  # noqa: BLE001
                    clips.append({"precision": precision, "batch": batch,
                                  "error": f"{type(exc).__name__}: {str(exc).splitlines()[0][:300]}"})
                results.save()
            estimates[compiled] = max(5.0, (time.perf_counter() - t1) * (1.0 if not compiled else 1.2))
            ips = row["images_per_s"]
            print(f"{label}: model {ips['model']}, panoptic {ips['panoptic']}, all tasks {ips['all_tasks']}, with "
                  f"decode {ips['all_tasks_with_decode']} images/s; peak {row['peak_gpu_mib']} MiB", flush=True)
    timer.cancel()
    results.data["status"] = "complete" if not results.data.get("notes") else "complete with skipped parts (notes)"
    results.save()
    print(json.dumps({"out": str(args.out), "status": results.data["status"]}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
