"""Progressive distillation: choosing the teacher's pseudo masks for the student (METHOD.md §2).

Per training image the frozen teacher (a class-agnostic Mask2Former) predicts ``Q`` masks. A teacher mask becomes an
extra "object" target for the student when

1. its instance score (``p_obj`` × mean sigmoid inside its binary mask, :func:`teacher_instance_scores`) is strictly
   above ``score_threshold`` (α = 0.8);
2. it does not overlap any ground-truth mask: max overlap with every GT mask < ``overlap_threshold`` (β = 0.1);
   with no GT mask every candidate passes;
3. it survives greedy NMS among the candidates left after step 2, in descending score order (ties: lower query index
   first): a candidate is kept iff its overlap with every already-kept one is < ``overlap_threshold``.

Overlap measures (:func:`overlap_matrix`):

* ``"dice"`` (default): ``(2|A∩B| + 1) / (|A| + |B| + 1)`` on the full binary masks;
* ``"iou"``: ``|A∩B| / |A∪B|``, 0 when the union is empty (the paper's wording);
* ``"dice-points"``: the same smoothed Dice counted on ``num_points`` random points shared by all masks (the official
  code's estimate, 12,544 points). Points are drawn uniformly in normalised ``[0, 1)²`` image coordinates and read
  by **nearest pixel** (pixel ``floor(y·H), floor(x·W)``, i.e. the pixel that contains the point), not bilinearly;
  because the coordinates are normalised, masks of different resolutions can be compared.

The targets of the student are then GT masks ∪ the kept teacher masks, all labelled "object".
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor

__all__ = [
    "OverlapKind",
    "overlap_matrix",
    "sample_points",
    "select_pseudo_masks",
    "teacher_instance_scores",
]

OverlapKind = Literal["dice", "iou", "dice-points"]
_KINDS = ("dice", "iou", "dice-points")


def teacher_instance_scores(pred_logits: Tensor, pred_masks: Tensor) -> tuple[Tensor, Tensor]:
    """Mask2Former instance scores of a class-agnostic teacher.

    Args:
        pred_logits: ``(Q, 2)`` class logits, column 0 = "object", column 1 = "no object".
        pred_masks: ``(Q, H, W)`` mask logits (at the resolution the masks are wanted).

    Returns:
        ``scores`` ``(Q,)`` float32 = ``softmax(pred_logits)[:, 0] · (Σ σ(m)·b) / (Σ b + 1e-6)`` with ``b = m > 0``
        (0 for an empty mask), and ``masks`` ``(Q, H, W)`` bool = ``pred_masks > 0``.
    """
    if pred_logits.ndim != 2 or pred_logits.shape[1] != 2:
        raise ValueError(f"pred_logits must be (Q, 2), got {tuple(pred_logits.shape)}")
    if pred_masks.ndim != 3 or pred_masks.shape[0] != pred_logits.shape[0]:
        raise ValueError(f"pred_masks must be (Q={pred_logits.shape[0]}, H, W), got {tuple(pred_masks.shape)}")
    p_obj = pred_logits.float().softmax(dim=-1)[:, 0]
    masks = pred_masks > 0
    inside = masks.flatten(1).float()
    sig = pred_masks.float().sigmoid().flatten(1)
    mask_score = (sig * inside).sum(dim=1) / (inside.sum(dim=1) + 1e-6)
    return p_obj * mask_score, masks


def sample_points(
    num_points: int, generator: torch.Generator | None = None, device: torch.device | str | None = None
) -> Tensor:
    """``(num_points, 2)`` float32 ``(y, x)`` points uniform in ``[0, 1)²`` drawn with ``generator`` (on the
    generator's device), returned on ``device``."""
    if num_points < 1:
        raise ValueError(f"num_points must be >= 1, got {num_points}")
    gen_device = generator.device if generator is not None else device
    pts = torch.rand(num_points, 2, generator=generator, device=gen_device)
    return pts.to(device) if device is not None else pts


def _read_points(masks: Tensor, points: Tensor) -> Tensor:
    """Nearest-pixel read of ``(M, H, W)`` bool masks at normalised ``(P, 2)`` ``(y, x)`` points -> ``(M, P)``."""
    h, w = masks.shape[-2:]
    pts = points.to(masks.device)
    ys = (pts[:, 0] * h).floor().long().clamp_(0, h - 1)
    xs = (pts[:, 1] * w).floor().long().clamp_(0, w - 1)
    return masks[:, ys, xs]


def _counts(a: Tensor, b: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Intersections ``(A, B)`` and areas ``(A,)``, ``(B,)`` of flattened bool masks (exact integer counts)."""
    # float32 sums of 0/1 are exact up to 2**24 elements; use float64 beyond that.
    dtype = torch.float32 if a.shape[1] <= 2**24 else torch.float64
    af, bf = a.to(dtype), b.to(dtype)
    return af @ bf.T, af.sum(dim=1), bf.sum(dim=1)


def overlap_matrix(a: Tensor, b: Tensor, kind: OverlapKind = "dice", points: Tensor | None = None) -> Tensor:
    """Pairwise overlap of two sets of binary masks.

    Args:
        a: ``(A, H, W)`` bool masks.
        b: ``(B, H, W)`` bool masks (for ``"dice-points"`` any ``(B, H2, W2)``).
        kind: ``"dice"`` = ``(2|A∩B|+1)/(|A|+|B|+1)``; ``"iou"`` = ``|A∩B|/|A∪B|`` (0 for an empty union);
            ``"dice-points"`` = the smoothed Dice counted at ``points`` only (nearest-pixel reads).
        points: ``(P, 2)`` normalised ``(y, x)`` in ``[0, 1)``, required for ``"dice-points"``
            (:func:`sample_points`).

    Returns:
        ``(A, B)`` float32.
    """
    if kind not in _KINDS:
        raise ValueError(f"overlap kind must be one of {_KINDS}, got {kind!r}")
    if a.ndim != 3 or b.ndim != 3:
        raise ValueError(f"masks must be (N, H, W), got {tuple(a.shape)} and {tuple(b.shape)}")
    a, b = a.bool(), b.bool().to(a.device)
    if kind == "dice-points":
        if points is None or points.ndim != 2 or points.shape[1] != 2:
            raise ValueError("overlap kind 'dice-points' needs points of shape (P, 2)")
        fa, fb = _read_points(a, points), _read_points(b, points)
    else:
        if a.shape[1:] != b.shape[1:]:
            raise ValueError(f"masks must have the same size for {kind!r}: {tuple(a.shape)} vs {tuple(b.shape)}")
        fa, fb = a.flatten(1), b.flatten(1)
    inter, area_a, area_b = _counts(fa, fb)
    total = area_a[:, None] + area_b[None, :]
    if kind == "iou":
        union = total - inter
        out = torch.where(union > 0, inter / union.clamp(min=1), torch.zeros_like(inter))
    else:
        out = (2 * inter + 1) / (total + 1)
    return out.float()


def select_pseudo_masks(
    teacher_scores: Tensor,
    teacher_masks: Tensor,
    gt_masks: Tensor,
    *,
    score_threshold: float = 0.8,
    overlap_threshold: float = 0.1,
    overlap: OverlapKind = "dice",
    num_points: int = 12544,
    generator: torch.Generator | None = None,
) -> Tensor:
    """Indices of the teacher masks kept as pseudo labels (see the module docstring for the three rules).

    Args:
        teacher_scores: ``(Q,)`` instance scores (:func:`teacher_instance_scores`).
        teacher_masks: ``(Q, H, W)`` bool binary teacher masks.
        gt_masks: ``(G, H, W)`` bool ground-truth masks (G may be 0; for ``"dice-points"`` any resolution).
        score_threshold: α; a candidate needs ``score > α`` (strict).
        overlap_threshold: β; kept iff max overlap with the GT masks ``< β`` and with every kept mask ``< β``.
        overlap: ``"dice"``, ``"iou"`` or ``"dice-points"`` (:func:`overlap_matrix`).
        num_points: points for ``"dice-points"``, drawn once per call with ``generator`` and shared by every
            teacher and GT mask.
        generator: random generator for the points (only ``"dice-points"`` uses it).

    Returns:
        ``(K,)`` int64 indices into the teacher queries, in descending score order (ties: lower index first), on
        ``teacher_scores``' device.
    """
    if teacher_scores.ndim != 1:
        raise ValueError(f"teacher_scores must be (Q,), got {tuple(teacher_scores.shape)}")
    q = teacher_scores.shape[0]
    if teacher_masks.ndim != 3 or teacher_masks.shape[0] != q:
        raise ValueError(f"teacher_masks must be (Q={q}, H, W), got {tuple(teacher_masks.shape)}")
    if gt_masks.ndim != 3:
        raise ValueError(f"gt_masks must be (G, H, W), got {tuple(gt_masks.shape)}")
    if overlap not in _KINDS:
        raise ValueError(f"overlap must be one of {_KINDS}, got {overlap!r}")
    device = teacher_scores.device

    cand = torch.nonzero(teacher_scores > score_threshold).flatten()
    if cand.numel() == 0:
        return cand.to(torch.long)
    order = torch.sort(teacher_scores[cand], descending=True, stable=True).indices
    cand = cand[order]  # descending score, ties keep ascending index
    masks = teacher_masks[cand.to(teacher_masks.device)].bool()

    points = None
    if overlap == "dice-points":
        points = sample_points(num_points, generator, device=teacher_masks.device)

    if gt_masks.shape[0] > 0:
        with_gt = overlap_matrix(masks, gt_masks, overlap, points)  # (C, G)
        free = (with_gt.max(dim=1).values < overlap_threshold).to(device)
        cand, masks = cand[free], masks[free.to(masks.device)]
    if cand.numel() == 0:
        return cand

    mutual = overlap_matrix(masks, masks, overlap, points).cpu()  # (S, S)
    kept: list[int] = []
    for i in range(cand.numel()):
        if all(mutual[i, j].item() < overlap_threshold for j in kept):
            kept.append(i)
    return cand[torch.tensor(kept, dtype=torch.long, device=cand.device)]
