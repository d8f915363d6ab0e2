"""Class-agnostic proposal quality: recall of ground-truth segments by the proposal network's masks.

A ground-truth segment (non-crowd panoptic segment, instance annotation, or semantic class region) is *recalled*
when one of the network's ``Q`` binary masks (logit > 0, upsampled to the image as in inference) has IoU ≥ the
threshold with it. Recall is reported over all segments, things, stuff, and base / novel classes when the dataset
has a split; ``mean_best_iou`` is the average over segments of the best IoU any proposal reaches. Under
torch.distributed every process scores its share of the images and the counts are summed.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.distributed as dist

from masqclip_cli.data.datasets import DatasetError, EvalDataset
from masqclip_cli.data.targets import sample_targets
from masqclip_cli.inference.preprocess import prepare_image
from masqclip_cli.io.sources import SkipItem, SourceItem, decode_item
from masqclip_cli.modeling.proposals.network import ProposalNetwork, postprocess_masks

__all__ = ["mask_iou_matrix", "proposal_recall"]

_GROUPS = ("all", "things", "stuff", "base", "novel")


def mask_iou_matrix(pred: torch.Tensor, gt: torch.Tensor) -> torch.Tensor:
    """IoU ``(P, G)`` float32 between bool masks ``pred`` ``(P, H, W)`` and ``gt`` ``(G, H, W)`` (0 for an empty
    union)."""
    p = pred.flatten(1).float()
    g = gt.flatten(1).float()
    inter = p @ g.T
    union = p.sum(1)[:, None] + g.sum(1)[None, :] - inter
    return torch.where(union > 0, inter / union.clamp(min=1), torch.zeros_like(inter))


@torch.no_grad()
def proposal_recall(
    network: ProposalNetwork,
    dataset: EvalDataset,
    iou_thresholds: Sequence[float] = (0.5,),
    short_side: int | None = None,
    max_size: int | None = None,
    limit: int | None = None,
) -> dict[str, Any]:
    """Recall of the dataset's ground-truth segments by ``network``'s masks (see the module docstring).

    Returns ``{"recall@0.5": {"all": %, "things": %, ...}, "mean_best_iou": {...}, "segments": {group: count},
    "images": n}`` (percent; groups with no segment are left out).
    """
    was_training = network.training
    network.eval()
    dtype = next(network.parameters()).dtype
    short = dataset.short_side if short_side is None else short_side
    longest = dataset.max_size if max_size is None else max_size
    rank, world = (dist.get_rank(), dist.get_world_size()) if dist.is_available() and dist.is_initialized() else (0, 1)
    samples = dataset.samples[:limit] if limit else dataset.samples
    thresholds = [float(t) for t in iou_thresholds]
    # counts[group] = [segments, hits per threshold..., sum of best IoU]
    counts = torch.zeros(len(_GROUPS), len(thresholds) + 2, dtype=torch.float64)
    isthing = list(dataset.vocabulary.isthing)
    novel = dataset.novel
    instances = None
    if dataset.task == "instance":
        gt = dataset.instance_gt_coco()
        names = {int(img["id"]): img["file_name"] for img in gt["images"]}
        instances = {}
        for ann in gt["annotations"]:
            instances.setdefault(names[int(ann["image_id"])], []).append(ann)
    images = 0
    for sample in samples[rank::world]:
        try:
            rgb = decode_item(SourceItem(sample.id, sample.image_path)).rgb
            masks, classes = sample_targets(dataset, sample, instances)
        except (SkipItem, DatasetError):
            continue
        h, w = rgb.shape[:2]
        tensor = prepare_image(rgb, short, longest)
        nh, nw = int(tensor.shape[1]), int(tensor.shape[2])
        normalized = network.normalize_and_pad([tensor]).to(dtype)
        out = network(normalized)
        logits = postprocess_masks(out.pred_masks[0].float(), tuple(normalized.shape[-2:]), (nh, nw), (h, w))
        images += 1
        if masks.shape[0] == 0:
            continue
        gt_masks = torch.from_numpy(masks).to(logits.device)
        best = mask_iou_matrix(logits > 0, gt_masks).max(dim=0).values.cpu().double()  # (G,)
        for g, cls in enumerate(classes.tolist()):
            groups = ["all", "things" if isthing[cls] else "stuff"]
            if novel is not None:
                groups.append("novel" if cls in novel else "base")
            for name in groups:
                row = counts[_GROUPS.index(name)]
                row[0] += 1
                for t, thr in enumerate(thresholds):
                    row[1 + t] += float(best[g] >= thr)
                row[-1] += best[g]
    totals = torch.tensor([float(images)], dtype=torch.float64)
    if world > 1:
        dist.all_reduce(counts)
        dist.all_reduce(totals)
    network.train(was_training)
    result: dict[str, Any] = {f"recall@{t:g}": {} for t in thresholds}
    result["mean_best_iou"] = {}
    result["segments"] = {}
    for i, name in enumerate(_GROUPS):
        n = float(counts[i, 0])
        if n == 0:
            continue
        result["segments"][name] = int(n)
        for t, thr in enumerate(thresholds):
            result[f"recall@{thr:g}"][name] = 100.0 * float(counts[i, 1 + t]) / n
        result["mean_best_iou"][name] = 100.0 * float(counts[i, -1]) / n
    result["images"] = int(totals.item())
    return result
