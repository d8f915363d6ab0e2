"""Training losses (METHOD.md §1.1, §1.6).

* Proposal network (Mask2Former, class-agnostic): :class:`SetCriterion` = Hungarian matching per decoder layer
  (deep supervision), 2-way cross-entropy with a down-weighted no-object class, and sigmoid-BCE + dice mask losses on
  importance-sampled points (:func:`uncertain_point_coords`).
* MasQ-Tuning: :func:`assign_labels` (Dice > 0.6 on binarised masks, not Hungarian; many queries may take one GT;
  defined in :mod:`masqclip_cli.evaluation.matching`, which the mask-label metric shares, and re-exported here) and
  :func:`masq_loss` (weighted NLL over N classes + background, times 2).

All random draws of one training sample come from :func:`~masqclip_cli.training.matcher.make_generator`
``(seed, iteration, sample_offset + b)``, so a step is reproducible whatever the process count.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor

from masqclip_cli.evaluation.matching import assign_labels
from masqclip_cli.training.matcher import HungarianMatcher, _rand, make_generator, point_sample

__all__ = [
    "SetCriterion",
    "assign_labels",
    "dice_loss",
    "masq_loss",
    "object_ce_loss",
    "sigmoid_ce_loss",
    "uncertain_point_coords",
]


def _upcast(x: Tensor) -> Tensor:
    """Losses are computed in float32, or in float64 when given float64 (exact-equality checks)."""
    return x if x.dtype == torch.float64 else x.float()


def sigmoid_ce_loss(logits: Tensor, labels: Tensor, num_masks: float | Tensor) -> Tensor:
    """Sigmoid BCE of ``logits`` ``(M, P)`` vs ``labels`` ``(M, P)``: mean over points, sum over masks / num_masks."""
    logits = _upcast(logits)
    loss = F.binary_cross_entropy_with_logits(logits, labels.to(logits.dtype), reduction="none")
    return loss.mean(1).sum() / num_masks


def dice_loss(logits: Tensor, labels: Tensor, num_masks: float | Tensor) -> Tensor:
    """``1 - (2 Σ σ(x)·y + 1) / (Σ σ(x) + Σ y + 1)`` per mask (sums over points), summed over masks / num_masks."""
    prob = _upcast(logits).sigmoid()
    labels = labels.to(prob.dtype)
    numerator = 2.0 * (prob * labels).sum(-1)
    denominator = prob.sum(-1) + labels.sum(-1)
    loss = 1.0 - (numerator + 1.0) / (denominator + 1.0)
    return loss.sum() / num_masks


@torch.no_grad()
def uncertain_point_coords(
    mask_logits: Tensor,
    num_points: int = 12544,
    oversample_ratio: float = 3.0,
    importance_sample_ratio: float = 0.75,
    generator: torch.Generator | None = None,
) -> Tensor:
    """Importance-sampled points ``(M, num_points, 2)`` (x, y in [0, 1]) for ``mask_logits`` ``(M, 1, h, w)``.

    Draws ``int(num_points * oversample_ratio)`` uniform candidates per mask (``torch.rand((M, S, 2))``), scores each by
    its uncertainty ``-|logit|`` (bilinear point sample), keeps the ``int(importance_sample_ratio * num_points)`` most
    uncertain ones (first, by decreasing uncertainty), then appends ``num_points - that`` fresh uniform points
    (a second ``torch.rand((M, R, 2))``). No gradient flows through the choice.
    """
    if mask_logits.dim() != 4 or mask_logits.shape[1] != 1:
        raise ValueError(f"expected mask_logits (M, 1, h, w), got {tuple(mask_logits.shape)}")
    if oversample_ratio < 1:
        raise ValueError(f"oversample_ratio must be >= 1, got {oversample_ratio}")
    if not 0 <= importance_sample_ratio <= 1:
        raise ValueError(f"importance_sample_ratio must be in [0, 1], got {importance_sample_ratio}")
    device = mask_logits.device
    num_masks = mask_logits.shape[0]
    num_sampled = int(num_points * oversample_ratio)
    num_uncertain = int(importance_sample_ratio * num_points)
    num_random = num_points - num_uncertain
    candidates = _rand((num_masks, num_sampled, 2), generator, device)
    parts = []
    if num_uncertain > 0:
        logits = point_sample(mask_logits.float(), candidates)[:, 0]  # (M, S)
        uncertainty = -logits.abs()
        idx = torch.topk(uncertainty, k=num_uncertain, dim=1).indices  # (M, K)
        parts.append(torch.gather(candidates, 1, idx[..., None].expand(-1, -1, 2)))
    if num_random > 0:
        parts.append(_rand((num_masks, num_random, 2), generator, device))
    return torch.cat(parts, dim=1)


def object_ce_loss(pred_logits: Tensor, matched: Sequence[Tensor], no_object_weight: float = 0.1) -> Tensor:
    """2-way cross-entropy over all queries of ``pred_logits`` ``(B, Q, 2)``.

    ``matched[b]`` holds the matched query indices of image ``b`` (target 0 = object); all other queries have target
    1 (no-object). Class weights ``[1, no_object_weight]``, weighted mean as ``F.cross_entropy(weight=...)``. Under
    torch.distributed the weight sum is averaged over processes (like ``num_masks``), so averaging the processes'
    gradients gives exactly the single-process gradient of the same global batch.
    """
    batch, num_queries, num_cls = pred_logits.shape
    if num_cls != 2:
        raise ValueError(f"expected 2-way logits (object, no-object), got {num_cls}")
    target = torch.ones((batch, num_queries), dtype=torch.int64, device=pred_logits.device)
    for b, idx in enumerate(matched):
        target[b, idx.to(pred_logits.device)] = 0
    logits = _upcast(pred_logits)
    weight = torch.tensor([1.0, float(no_object_weight)], device=pred_logits.device, dtype=logits.dtype)
    losses = F.cross_entropy(logits.transpose(1, 2), target, weight=weight, reduction="none")
    denominator = weight[target].sum().detach()
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(denominator)
        denominator = denominator / dist.get_world_size()
    return losses.sum() / denominator


def _num_masks(targets: Sequence[Tensor], device: torch.device) -> float:
    """Total GT masks of the batch, averaged over processes under torch.distributed, clamped to >= 1."""
    total = torch.tensor(float(sum(int(t.shape[0]) for t in targets)), device=device)
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(total)
        total = total / dist.get_world_size()
    return max(float(total.item()), 1.0)


def _as_dict(outputs: Any) -> Mapping[str, Any]:
    """Accept the documented dict or a ``ProposalOutput``-like object (``pred_logits``, ``pred_masks``, ``aux``)."""
    if isinstance(outputs, Mapping):
        return outputs
    return {
        "pred_logits": outputs.pred_logits,
        "pred_masks": outputs.pred_masks,
        "aux_outputs": list(getattr(outputs, "aux", None) or []),
    }


class SetCriterion:
    """Mask2Former losses of the class-agnostic proposal network, with deep supervision.

    ``criterion(outputs, targets, seed, iteration, sample_offset=0)`` with ``outputs`` a dict
    ``{"pred_logits": (B, Q, 2), "pred_masks": (B, Q, h, w) logits, "aux_outputs": [same keys, ...]}`` (``"aux"``
    or a :class:`ProposalOutput` are accepted too) and ``targets`` a list of B ``(G_i, H_i, W_i)`` binary masks covering
    the same (padded) image frame as the predictions. Returns ``loss_ce``, ``loss_mask``, ``loss_dice``,
    ``loss_{ce,mask,dice}_{i}`` for aux output ``i`` (each layer re-matched) and ``total`` = the weighted sum.
    """

    def __init__(
        self,
        matcher: HungarianMatcher,
        *,
        class_weight: float = 2.0,
        mask_weight: float = 5.0,
        dice_weight: float = 5.0,
        no_object_weight: float = 0.1,
        num_points: int = 12544,
        oversample_ratio: float = 3.0,
        importance_sample_ratio: float = 0.75,
    ) -> None:
        self.matcher = matcher
        self.class_weight = float(class_weight)
        self.mask_weight = float(mask_weight)
        self.dice_weight = float(dice_weight)
        self.no_object_weight = float(no_object_weight)
        self.num_points = int(num_points)
        self.oversample_ratio = float(oversample_ratio)
        self.importance_sample_ratio = float(importance_sample_ratio)
        self.weights = {"loss_ce": self.class_weight, "loss_mask": self.mask_weight, "loss_dice": self.dice_weight}

    def _layer_losses(
        self,
        pred_logits: Tensor,
        pred_masks: Tensor,
        targets: Sequence[Tensor],
        generators: Sequence[torch.Generator],
        num_masks: float,
    ) -> dict[str, Tensor]:
        indices = self.matcher.match_batch(pred_logits, pred_masks, targets, generators)
        loss_ce = object_ce_loss(pred_logits, [p for p, _ in indices], self.no_object_weight)

        point_logits, point_labels = [], []
        for b, (pred_idx, gt_idx) in enumerate(indices):
            if pred_idx.numel() == 0:
                continue
            src = pred_masks[b][pred_idx][:, None]  # (M, 1, h, w) logits
            tgt = targets[b][gt_idx.to(targets[b].device)].to(device=pred_masks.device,
                                                              dtype=_upcast(pred_masks).dtype)[:, None]
            coords = uncertain_point_coords(
                src.detach(), self.num_points, self.oversample_ratio, self.importance_sample_ratio, generators[b]
            )
            with torch.no_grad():
                point_labels.append(point_sample(tgt, coords)[:, 0])
            point_logits.append(point_sample(_upcast(src), coords)[:, 0])
        if point_logits:
            logits = torch.cat(point_logits)
            labels = torch.cat(point_labels)
            loss_mask = sigmoid_ce_loss(logits, labels, num_masks)
            loss_dice = dice_loss(logits, labels, num_masks)
        else:  # no GT in the whole batch: zero losses that keep the graph
            zero = _upcast(pred_masks).sum() * 0.0
            loss_mask, loss_dice = zero, zero.clone()
        return {"loss_ce": loss_ce, "loss_mask": loss_mask, "loss_dice": loss_dice}

    def __call__(
        self,
        outputs: Mapping[str, Any] | Any,
        targets: Sequence[Tensor],
        seed: int,
        iteration: int,
        sample_offset: int = 0,
    ) -> dict[str, Tensor]:
        out = _as_dict(outputs)
        pred_logits, pred_masks = out["pred_logits"], out["pred_masks"]
        if len(targets) != pred_masks.shape[0]:
            raise ValueError(f"{pred_masks.shape[0]} predictions but {len(targets)} targets")
        device = pred_masks.device
        # One generator per sample, consumed in a fixed order: final layer first, then the aux layers in order.
        generators = [make_generator(seed, iteration, sample_offset + b, device) for b in range(len(targets))]
        num_masks = _num_masks(targets, device)

        losses = self._layer_losses(pred_logits, pred_masks, targets, generators, num_masks)
        aux = out.get("aux_outputs", out.get("aux")) or []
        for i, layer in enumerate(aux):
            layer_losses = self._layer_losses(layer["pred_logits"], layer["pred_masks"], targets, generators, num_masks)
            losses.update({f"{k}_{i}": v for k, v in layer_losses.items()})
        total = sum(self.weights["_".join(k.split("_")[:2])] * v for k, v in losses.items())
        losses["total"] = total
        return losses

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(matcher={self.matcher!r}, class_weight={self.class_weight}, "
            f"mask_weight={self.mask_weight}, dice_weight={self.dice_weight}, "
            f"no_object_weight={self.no_object_weight}, num_points={self.num_points}, "
            f"oversample_ratio={self.oversample_ratio}, importance_sample_ratio={self.importance_sample_ratio})"
        )


# ----------------------------------------------------------------------------------------------------------------
# MasQ-Tuning (METHOD.md §1.6)


def masq_loss(log_probs: Tensor, labels: Tensor, background_weight: float = 0.1, weight: float = 2.0) -> Tensor:
    """Weighted NLL of ``log_probs`` ``(..., N + 1)`` (last column = background) vs ``labels`` ``(...)``, times
    ``weight``. Class weights 1 for the N classes and ``background_weight`` for background; weighted mean as
    ``F.nll_loss(weight=...)`` (under torch.distributed the weight sum is averaged over processes, as in
    :func:`object_ce_loss`). Zero (graph kept) when there are no queries."""
    num_cls = log_probs.shape[-1]
    flat = _upcast(log_probs.reshape(-1, num_cls))
    flat_labels = labels.reshape(-1).to(device=log_probs.device, dtype=torch.int64)
    if flat.shape[0] == 0:
        return _upcast(log_probs).sum() * 0.0
    class_weight = torch.ones(num_cls, device=log_probs.device, dtype=flat.dtype)
    class_weight[-1] = float(background_weight)
    losses = F.nll_loss(flat, flat_labels, weight=class_weight, reduction="none")
    denominator = class_weight[flat_labels].sum().detach()
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(denominator)
        denominator = denominator / dist.get_world_size()
    return losses.sum() / denominator * float(weight)
