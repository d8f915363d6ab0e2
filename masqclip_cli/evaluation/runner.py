"""``masqclip eval``: score a model, or the files ``masqclip segment`` wrote, on a dataset.

With a model, images go through the same decoding, resizing, model and post-processing as ``segment`` (at the
dataset's test sizes unless overridden); with ``predictions``, the ``--out`` folder of a ``segment`` run is read
(``panoptic.json`` + PNGs, ``labels/*.png``, ``instances.json``) and no model is needed. Metrics: PQ/SQ/RQ (COCO
panoptic definitions), mIoU/fwIoU/pixel and mean accuracy, COCO mask AP through pycocotools, with base/novel/all
breakdowns when the dataset defines a split.

Data-parallel: under ``torchrun`` each process takes every WORLD_SIZE-th sample; the metric states are summed in
float64 (panoptic, semantic) and the instance results gathered before scoring, so the numbers equal one process's.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from masqclip_cli.data.datasets import EvalDataset
from masqclip_cli.evaluation.instance import coco_mask_ap
from masqclip_cli.evaluation.panoptic import PanopticAccumulator, PanopticSegmentInfo
from masqclip_cli.evaluation.semantic import SemanticAccumulator
from masqclip_cli.inference.postprocess import PostprocessConfig
from masqclip_cli.inference.predictor import Predictor
from masqclip_cli.inference.preprocess import prepare_image
from masqclip_cli.io.sources import SkipItem, SourceItem, decode_item
from masqclip_cli.modeling.masqclip import MasQCLIP
from masqclip_cli.structures.masks import encode_rle
from masqclip_cli.vocab import category_ids

__all__ = ["EvalOptions", "EvalError", "evaluate"]


class EvalError(ValueError):
    """Predictions or options that cannot be scored against the dataset (one line)."""


@dataclass(frozen=True)
class EvalOptions:
    tasks: tuple[str, ...]
    postprocess: PostprocessConfig
    short_side: int | None = None   # None: the dataset's test size
    max_size: int | None = None
    batch_size: int = 1
    limit: int | None = None        # first N samples only (quick checks)


@dataclass
class _State:
    panoptic: PanopticAccumulator | None = None
    semantic: SemanticAccumulator | None = None
    instance_results: list[dict] = field(default_factory=list)
    images: int = 0
    model_seconds: float = 0.0
    skipped: list[str] = field(default_factory=list)


def _distributed() -> tuple[int, int]:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


def _instance_records(seg, image_id: int, cat_ids: list[int]) -> list[dict]:
    out = []
    for inst in seg.instances or []:
        out.append({"image_id": image_id, "category_id": cat_ids[inst.category],
                    "segmentation": encode_rle(inst.mask), "score": float(inst.score)})
    return out


def _accumulate(state: _State, dataset: EvalDataset, sample, seg, image_id: int | None, cat_ids) -> None:
    if state.panoptic is not None:
        gt_ids, gt_segments = sample.panoptic_gt()
        state.panoptic.add(
            gt_ids, [PanopticSegmentInfo(s.id, s.category, s.iscrowd) for s in gt_segments],
            seg.panoptic, [PanopticSegmentInfo(s.id, s.category) for s in seg.segments],
        )
    if state.semantic is not None:
        state.semantic.add(sample.semantic_gt(), seg.semantic)
    if image_id is not None and seg.instances is not None:
        state.instance_results += _instance_records(seg, image_id, cat_ids)


def _new_state(dataset: EvalDataset, tasks: tuple[str, ...]) -> _State:
    n = len(dataset.vocabulary)
    return _State(
        panoptic=PanopticAccumulator(n) if "panoptic" in tasks else None,
        semantic=SemanticAccumulator(n, ignore_index=-1) if "semantic" in tasks else None,
    )


def _gt_image_ids(dataset: EvalDataset, tasks) -> tuple[dict | None, dict[str, int]]:
    if "instance" not in tasks:
        return None, {}
    gt = dataset.instance_gt_coco()
    return gt, {img["file_name"]: int(img["id"]) for img in gt["images"]}


def _run_model(model: MasQCLIP, dataset: EvalDataset, samples, options: EvalOptions, state: _State,
               image_ids: dict[str, int], on_item) -> None:
    short = options.short_side if options.short_side is not None else dataset.short_side
    longest = options.max_size if options.max_size is not None else dataset.max_size
    predictor = Predictor.for_encoded(model, dataset.vocabulary, options.postprocess, short, longest)
    cat_ids = category_ids(dataset.vocabulary)
    batch: list[tuple[Any, np.ndarray, torch.Tensor]] = []

    def flush() -> None:
        t0 = time.perf_counter()
        outputs = predictor.forward([tensor for _, _, tensor in batch])
        state.model_seconds += time.perf_counter() - t0
        for (sample, rgb, _), out in zip(batch, outputs):
            seg = predictor.postprocess(out, rgb.shape[:2])
            _accumulate(state, dataset, sample, seg, image_ids.get(sample.id), cat_ids)
            state.images += 1
            if on_item:
                on_item(sample.id)
        batch.clear()

    for sample in samples:
        try:
            rgb = decode_item(SourceItem(sample.id, sample.image_path)).rgb
        except SkipItem as exc:
            state.skipped.append(str(exc))
            continue
        batch.append((sample, rgb, prepare_image(rgb, predictor.short_side, predictor.max_size)))
        if len(batch) >= options.batch_size:
            flush()
    if batch:
        flush()


def _read_predictions(pred_dir: Path, dataset: EvalDataset, samples, tasks, state: _State,
                      image_ids: dict[str, int], on_item) -> None:
    """Score the files of a ``segment`` run; its vocabulary must be the dataset's (same names, in order)."""
    from masqclip_cli.structures import Segment, Segmentation
    from masqclip_cli.vocab import Vocabulary

    run_file = pred_dir / ".masqclip" / "run.json"
    if not run_file.is_file():
        raise EvalError(f"{pred_dir}: not a masqclip segment output (no .masqclip/run.json)")
    run_vocab = Vocabulary.from_json(json.loads(run_file.read_text())["vocabulary"], source=str(run_file))
    if run_vocab.names != dataset.vocabulary.names:
        raise EvalError(f"{pred_dir}: predicted with another vocabulary ({len(run_vocab)} classes) than the dataset's "
                        f"({len(dataset.vocabulary)}); segment with the dataset's vocabulary")
    pred_cat = {cid: i for i, cid in enumerate(category_ids(run_vocab))}
    pan_by_file: dict[str, dict] = {}
    if "panoptic" in tasks:
        pan_json = pred_dir / "panoptic.json"
        if not pan_json.is_file():
            raise EvalError(f"{pan_json}: missing (segment with the panoptic task and format)")
        for ann in json.loads(pan_json.read_text())["annotations"]:
            pan_by_file[ann["file_name"][: -len(".png")]] = ann
    inst_by_file: dict[str, list[dict]] = {}
    if "instance" in tasks:
        inst_json = pred_dir / "instances.json"
        if not inst_json.is_file():
            raise EvalError(f"{inst_json}: missing (segment with the instance task and the coco format)")
        coco = json.loads(inst_json.read_text())
        names = {img["id"]: img["file_name"] for img in coco["images"]}
        for ann in coco["annotations"]:
            inst_by_file.setdefault(names[ann["image_id"]], []).append(ann)
    cat_ids = category_ids(dataset.vocabulary)
    for sample in samples:
        seg = Segmentation(image_size=(0, 0))
        if "panoptic" in tasks:
            ann = pan_by_file.get(sample.id)
            if ann is None:
                raise EvalError(f"{pred_dir}/panoptic.json: no prediction for image '{sample.id}'")
            rgb = np.asarray(Image.open(pred_dir / "panoptic" / ann["file_name"]).convert("RGB")).astype(np.int64)
            seg.panoptic = rgb[..., 0] + 256 * rgb[..., 1] + 65536 * rgb[..., 2]
            seg.segments = [Segment(s["id"], pred_cat[s["category_id"]], s.get("score", 1.0), True, s["area"],
                                    tuple(s["bbox"])) for s in ann["segments_info"]]
        if "semantic" in tasks:
            path = pred_dir / "labels" / f"{sample.id}.png"
            if not path.is_file():
                raise EvalError(f"{path}: missing (segment with the semantic task and the labels format)")
            values = np.asarray(Image.open(path)).astype(np.int64)
            lut = np.full(max(pred_cat) + 1, -1, np.int64)
            for cid, index in pred_cat.items():
                lut[cid] = index
            seg.semantic = np.where(values < len(lut), lut[np.minimum(values, len(lut) - 1)], -1)
        _accumulate(state, dataset, sample, seg, None, cat_ids)
        if "instance" in tasks and sample.id in image_ids:
            for ann in inst_by_file.get(sample.id, []):
                state.instance_results.append({
                    "image_id": image_ids[sample.id],
                    "category_id": cat_ids[pred_cat[ann["category_id"]]],
                    "segmentation": ann["segmentation"], "score": ann["score"],
                })
        state.images += 1
        if on_item:
            on_item(sample.id)


def _all_reduce(state: _State) -> _State:
    rank, world = _distributed()
    if world == 1:
        return state
    import torch.distributed as dist

    for acc in (state.panoptic, state.semantic):
        if acc is None:
            continue
        flat = torch.from_numpy(np.ascontiguousarray(acc.state(), dtype=np.float64))
        dist.all_reduce(flat)
        acc.load_state(flat.numpy())
    gathered: list[Any] = [None] * world
    dist.all_gather_object(gathered, (state.instance_results, state.images, state.model_seconds, state.skipped))
    state.instance_results = [r for part in gathered for r in part[0]]
    state.images = sum(part[1] for part in gathered)
    state.model_seconds = sum(part[2] for part in gathered)
    state.skipped = [s for part in gathered for s in part[3]]
    return state


def evaluate(
    dataset: EvalDataset,
    options: EvalOptions,
    model: MasQCLIP | None = None,
    predictions: Path | None = None,
    on_item=None,  # noqa: ANN001 - callable(sample id)
) -> dict[str, Any]:
    """Score ``model`` (its vocabulary must be set to the dataset's) or a ``segment`` output folder on a dataset.

    Returns the metrics per task (percent), with base/novel breakdowns when the dataset has a split, and counts and
    timings; the caller adds the protocol.
    """
    unsupported = [t for t in options.tasks if t not in dataset.tasks()]
    if unsupported:
        raise EvalError(f"dataset {dataset.name} has no ground truth for {', '.join(unsupported)} "
                        f"(it supports {', '.join(dataset.tasks())})")
    if (model is None) == (predictions is None):
        raise EvalError("give either a model or a predictions folder")
    rank, world = _distributed()
    samples = dataset.samples[: options.limit] if options.limit else dataset.samples
    mine = samples[rank::world]
    state = _new_state(dataset, options.tasks)
    gt_coco, image_ids = _gt_image_ids(dataset, options.tasks)
    t0 = time.perf_counter()
    if model is not None:
        _run_model(model, dataset, mine, options, state, image_ids, on_item)
    else:
        _read_predictions(predictions, dataset, mine, options.tasks, state, image_ids, on_item)
    state = _all_reduce(state)
    wall = time.perf_counter() - t0
    n = len(dataset.vocabulary)
    subsets = None
    if dataset.novel is not None:
        novel = sorted(dataset.novel)
        subsets = {"base": [c for c in range(n) if c not in dataset.novel], "novel": novel}
    metrics: dict[str, Any] = {}
    if state.panoptic is not None:
        metrics["panoptic"] = state.panoptic.result(list(dataset.vocabulary.isthing), subsets)
    if state.semantic is not None:
        metrics["semantic"] = state.semantic.result(subsets)
    if gt_coco is not None:
        cat_ids = category_ids(dataset.vocabulary)
        id_subsets = {k: [cat_ids[c] for c in v] for k, v in subsets.items()} if subsets else None
        used_ids = {image_ids[s.id] for s in samples if s.id in image_ids}
        metrics["instance"] = coco_mask_ap(gt_coco, state.instance_results, image_ids=sorted(used_ids),
                                           subsets=id_subsets)
    return {
        "metrics": metrics,
        "images": state.images,
        "skipped": state.skipped,
        "processes": world,
        "seconds_total": round(wall, 3),
        "seconds_model_per_image": round(state.model_seconds / max(state.images, 1), 4) if model else None,
    }


def report_protocol(dataset: EvalDataset, options: EvalOptions, **extra: Any) -> dict[str, Any]:
    """How the numbers were measured (recorded next to them in the JSON report)."""
    return {
        "dataset": dataset.name,
        "task_of_ground_truth": dataset.task,
        "image_dir": str(dataset.image_dir),
        "images_in_dataset": len(dataset.samples),
        "short_side": options.short_side if options.short_side is not None else dataset.short_side,
        "max_size": options.max_size if options.max_size is not None else dataset.max_size,
        "tasks": list(options.tasks),
        "object_mask_threshold": options.postprocess.object_mask_threshold,
        "overlap_threshold": options.postprocess.overlap_threshold,
        "detections_per_image": options.postprocess.detections_per_image,
        "semantic_order": options.postprocess.semantic_order,
        "instance_keep_stuff": options.postprocess.instance_keep_stuff,
        "vocabulary": {"source": dataset.vocabulary.source, "classes": len(dataset.vocabulary),
                       "fingerprint": dataset.vocabulary.fingerprint()},
        "novel_classes": sorted(dataset.vocabulary.names[c] for c in dataset.novel) if dataset.novel else None,
        "limit": options.limit,
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        **extra,
    }


def _finite(value: Any) -> Any:
    """NaN (a metric with nothing to average) as JSON null, so the report is strict JSON."""
    if isinstance(value, float) and value != value:
        return None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(v) for v in value]
    return value


def write_report(path: Path, report: dict[str, Any]) -> None:
    """Write the report atomically as strict JSON (NaN → null)."""
    from masqclip_cli.io.files import atomic_write_text

    atomic_write_text(path, json.dumps(_finite(report), indent=1, allow_nan=False) + "\n")

