"""Query ↔ ground-truth matching by mask Dice (METHOD.md §1.6): which class each proposal stands for.

:func:`assign_labels` is MasQ-tuning's labelling rule (Dice > 0.6 on binarised masks at the CLIP input resolution,
not a bipartite matching: several queries may take one ground-truth segment). It lives here, below training, because
both MasQ-tuning (:mod:`masqclip_cli.training.losses`) and the mask-label accuracy metric
(:mod:`masqclip_cli.evaluation.labels`) use it.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["assign_labels"]


@torch.no_grad()
def assign_labels(
    pred_masks: Tensor,
    gt_masks: Tensor,
    gt_classes: Tensor,
    num_classes: int,
    size: int,
    threshold: float = 0.6,
) -> Tensor:
    """Per-query class labels for MasQ-Tuning: ``(Q,)`` int64 in ``[0, num_classes]`` (``num_classes`` = background).

    ``pred_masks`` ``(Q, h, w)`` logits are bilinearly resized to ``size × size`` and binarised (logit > 0 ⇔ σ > 0.5);
    ``gt_masks`` ``(G, H, W)`` are nearest-resized to ``size × size``. Dice = ``(2|P∩G| + 1) / (|P| + |G| + 1)``; each
    query takes the class of its highest-Dice GT if that Dice > ``threshold``, else background. Not a bipartite
    matching: several queries may take the same GT.
    """
    num_queries = pred_masks.shape[0]
    device = pred_masks.device
    labels = torch.full((num_queries,), int(num_classes), dtype=torch.int64, device=device)
    if gt_masks.shape[0] == 0 or num_queries == 0:
        return labels
    pred = F.interpolate(pred_masks[None].float(), size=(size, size), mode="bilinear", align_corners=False)[0] > 0
    gt = F.interpolate(gt_masks[None].to(device=device, dtype=torch.float32), size=(size, size), mode="nearest")[0]
    pred = pred.flatten(1).float()
    gt = (gt > 0.5).flatten(1).float()
    intersection = pred @ gt.T  # (Q, G)
    dice = (2.0 * intersection + 1.0) / (pred.sum(1)[:, None] + gt.sum(1)[None, :] + 1.0)
    best, best_gt = dice.max(dim=1)
    classes = gt_classes.to(device=device, dtype=torch.int64)[best_gt]
    return torch.where(best > threshold, classes, labels)
