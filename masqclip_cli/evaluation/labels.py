"""Mask-label accuracy: how often the CLIP branch names a proposal's class, independent of post-processing.

Every query whose mask matches a ground-truth segment (MasQ-tuning's own rule: best Dice > 0.6 at the CLIP input
resolution, :func:`~masqclip_cli.training.losses.assign_labels`) is *labelled* with that segment's class; the
accuracy is the share of labelled queries whose ``argmax_c p_clip(c)`` over the vocabulary's classes (background
excluded) is the label, overall and for base / novel labels when the dataset has a split. This isolates what
MasQ-tuning changes (the classifier) from what it does not (the proposals).
"""

from __future__ import annotations

from typing import Any

import torch

from masqclip_cli.data.datasets import DatasetError, EvalDataset
from masqclip_cli.data.targets import sample_targets
from masqclip_cli.evaluation.matching import assign_labels
from masqclip_cli.inference.preprocess import prepare_image
from masqclip_cli.io.sources import SkipItem, SourceItem, decode_item
from masqclip_cli.modeling.masqclip import MasQCLIP

__all__ = ["mask_label_accuracy"]


@torch.no_grad()
def mask_label_accuracy(model: MasQCLIP, dataset: EvalDataset, threshold: float = 0.6,
                        limit: int | None = None) -> dict[str, Any]:
    """Mask-label accuracy (percent) of ``model`` on ``dataset`` with the dataset's vocabulary (see the module
    docstring). Returns ``{"all": %, "base": %, "novel": %, "labelled": {group: count}, "images": n}``."""
    model.set_vocabulary(dataset.vocabulary)
    num_classes = len(dataset.vocabulary)
    novel = dataset.novel or frozenset()
    counts = {"all": [0, 0], "base": [0, 0], "novel": [0, 0]}
    images = 0
    for sample in dataset.samples[:limit] if limit else dataset.samples:
        try:
            rgb = decode_item(SourceItem(sample.id, sample.image_path)).rgb
            masks, classes = sample_targets(dataset, sample)
        except (SkipItem, DatasetError):
            continue
        tensor = prepare_image(rgb, dataset.short_side, dataset.max_size)
        nh, nw = int(tensor.shape[1]), int(tensor.shape[2])
        out = model([tensor])[0]
        images += 1
        if masks.shape[0] == 0:
            continue
        # GT in the padded frame of the network input (resized to the input size, zero-padded like the image).
        gt = torch.from_numpy(masks)[None].float()
        gt = torch.nn.functional.interpolate(gt, size=(nh, nw), mode="nearest")[0] > 0.5
        hp, wp = out.padded_size
        padded = torch.zeros((gt.shape[0], hp, wp), dtype=torch.bool)
        padded[:, :nh, :nw] = gt
        labels = assign_labels(out.mask_logits.cpu(), padded, torch.from_numpy(classes), num_classes,
                               model.masq.image_size, threshold)
        predicted = out.clip_log_probs[:, :num_classes].argmax(-1).cpu()
        for label, guess in zip(labels.tolist(), predicted.tolist()):
            if label >= num_classes:
                continue
            groups = ["all"] + (["novel" if label in novel else "base"] if dataset.novel else [])
            for g in groups:
                counts[g][0] += 1
                counts[g][1] += int(guess == label)
    result: dict[str, Any] = {g: 100.0 * c[1] / c[0] for g, c in counts.items() if c[0]}
    result["labelled"] = {g: c[0] for g, c in counts.items() if c[0]}
    result["images"] = images
    return result
