"""Point sampling, reproducible per-sample random generators and the class-agnostic Hungarian matcher.

The matcher follows METHOD.md §1.1: every ground-truth segment is an "object" (class index 0 of the 2-way head);
the cost of pairing query ``q`` with segment ``g`` is

    cost_class * (-softmax(logits_q)[0]) + cost_mask * BCE(q, g) + cost_dice * Dice(q, g)

where BCE and Dice are computed on the same ``num_points`` uniform random points for predictions and ground truth
(points are in normalised ``[0, 1]`` image coordinates, so predictions at 1/4 resolution and GT masks at full
resolution are compared at the same image locations). The assignment is solved with
:func:`scipy.optimize.linear_sum_assignment` on CPU.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from scipy.optimize import linear_sum_assignment
from torch import Tensor

__all__ = ["HungarianMatcher", "make_generator", "pairwise_costs", "point_sample"]


def point_sample(inputs: Tensor, coords: Tensor) -> Tensor:
    """Bilinearly sample ``inputs`` ``(N, C, H, W)`` at ``coords`` ``(N, P, 2)``, (x, y) in ``[0, 1]``.

    Returns ``(N, C, P)``. Uses ``F.grid_sample(align_corners=False)`` on ``2 * coords - 1`` with zero padding, so
    ``(0, 0)`` is the top-left corner of the top-left pixel and ``(1, 1)`` the bottom-right corner of the last one.
    """
    if inputs.dim() != 4 or coords.dim() != 3 or coords.shape[-1] != 2:
        raise ValueError(
            f"expected inputs (N,C,H,W) and coords (N,P,2), got {tuple(inputs.shape)}, {tuple(coords.shape)}"
        )
    grid = (2.0 * coords - 1.0).unsqueeze(2).to(inputs.dtype)  # (N, P, 1, 2)
    return F.grid_sample(inputs, grid, mode="bilinear", padding_mode="zeros", align_corners=False).squeeze(3)


def make_generator(
    seed: int, iteration: int, sample_index: int, device: torch.device | str | None = None
) -> torch.Generator:
    """A ``torch.Generator`` on ``device`` seeded from ``(seed, iteration, sample_index)`` only.

    The seed is a hash of the triple, so the draws for one training sample do not depend on how many processes
    (or which rank) handle the batch, only on the global sample index.
    """
    key = f"masqclip:{int(seed)}:{int(iteration)}:{int(sample_index)}".encode()
    value = int.from_bytes(hashlib.blake2b(key, digest_size=8).digest(), "little") & ((1 << 63) - 1)
    gen = torch.Generator(device=torch.device(device) if device is not None else "cpu")
    gen.manual_seed(value)
    return gen


def _rand(shape: tuple[int, ...], generator: torch.Generator | None, device: torch.device) -> Tensor:
    """``torch.rand`` drawn on the generator's device (reproducible per generator), then moved to ``device``."""
    gen_device = generator.device if generator is not None else device
    return torch.rand(shape, generator=generator, device=gen_device).to(device)


def pairwise_costs(pred_points: Tensor, gt_points: Tensor) -> tuple[Tensor, Tensor]:
    """Pairwise mask costs from point samples: ``pred_points`` ``(Q, P)`` logits, ``gt_points`` ``(G, P)`` in [0, 1].

    Returns ``(bce, dice)``, each ``(Q, G)``: the sigmoid binary cross-entropy averaged over the points, and
    ``1 - (2 * sum(sigmoid(p) * g) + 1) / (sum(sigmoid(p)) + sum(g) + 1)``.
    """
    p = pred_points.float()
    g = gt_points.float()
    num_points = p.shape[1]
    # BCE(x, y) = y * softplus(-x) + (1 - y) * softplus(x), summed over points as two matrix products.
    bce = (F.softplus(-p) @ g.T + F.softplus(p) @ (1.0 - g).T) / max(num_points, 1)
    prob = p.sigmoid()
    numerator = 2.0 * (prob @ g.T)
    denominator = prob.sum(-1)[:, None] + g.sum(-1)[None, :]
    dice = 1.0 - (numerator + 1.0) / (denominator + 1.0)
    return bce, dice


class HungarianMatcher:
    """Class-agnostic bipartite matching between queries and ground-truth masks (all GTs are "object", index 0).

    Args:
        cost_class: weight of ``-softmax(pred_logits)[:, 0]``.
        cost_mask: weight of the point-sampled sigmoid BCE.
        cost_dice: weight of the point-sampled dice cost.
        num_points: uniform random points shared by predictions and ground truth (12,544 = 112²).
    """

    def __init__(
        self, cost_class: float = 2.0, cost_mask: float = 5.0, cost_dice: float = 5.0, num_points: int = 12544
    ) -> None:
        if cost_class == 0 and cost_mask == 0 and cost_dice == 0:
            raise ValueError("all matching costs are 0")
        self.cost_class = float(cost_class)
        self.cost_mask = float(cost_mask)
        self.cost_dice = float(cost_dice)
        self.num_points = int(num_points)

    def sample_coords(self, generator: torch.Generator | None, device: torch.device) -> Tensor:
        """The ``(num_points, 2)`` uniform points of one match: exactly ``torch.rand((num_points, 2), generator)``."""
        return _rand((self.num_points, 2), generator, device)

    def cost_matrix(self, pred_logits: Tensor, pred_masks: Tensor, gt_masks: Tensor, coords: Tensor) -> Tensor:
        """``(Q, G)`` matching cost for one image, with the points ``coords`` ``(P, 2)`` given."""
        num_queries, num_gt = pred_masks.shape[0], gt_masks.shape[0]
        device = pred_masks.device
        prob_obj = pred_logits.float().softmax(-1)[:, 0]
        cost_class = -prob_obj[:, None].expand(num_queries, num_gt)
        coords = coords.to(device)
        pred_points = point_sample(pred_masks[:, None].float(), coords[None].expand(num_queries, -1, -1))[:, 0]
        gt = gt_masks.to(device=device, dtype=torch.float32)[:, None]
        gt_points = point_sample(gt, coords[None].expand(num_gt, -1, -1))[:, 0]
        cost_bce, cost_dice = pairwise_costs(pred_points, gt_points)
        return self.cost_class * cost_class + self.cost_mask * cost_bce + self.cost_dice * cost_dice

    @torch.no_grad()
    def match(
        self,
        pred_logits: Tensor,
        pred_masks: Tensor,
        gt_masks: Tensor,
        generator: torch.Generator | None = None,
    ) -> tuple[Tensor, Tensor]:
        """Match one image: ``pred_logits`` ``(Q, 2)``, ``pred_masks`` ``(Q, h, w)`` logits, ``gt_masks`` ``(G, H, W)``.

        Returns ``(pred_idx, gt_idx)``, int64 tensors of length ``min(Q, G)`` on ``pred_masks.device``, sorted by
        ``pred_idx``. With ``G == 0`` nothing is drawn from ``generator`` and both are empty.
        """
        device = pred_masks.device
        if pred_logits.dim() != 2 or pred_masks.dim() != 3 or gt_masks.dim() != 3:
            raise ValueError(
                f"expected pred_logits (Q,2), pred_masks (Q,h,w), gt_masks (G,H,W); got {tuple(pred_logits.shape)}, "
                f"{tuple(pred_masks.shape)}, {tuple(gt_masks.shape)}"
            )
        if gt_masks.shape[0] == 0 or pred_masks.shape[0] == 0:
            empty = torch.empty(0, dtype=torch.int64, device=device)
            return empty, empty.clone()
        coords = self.sample_coords(generator, device)
        cost = self.cost_matrix(pred_logits, pred_masks, gt_masks, coords)
        cost = torch.nan_to_num(cost.cpu(), nan=1e8, posinf=1e8, neginf=-1e8)
        rows, cols = linear_sum_assignment(cost.numpy())
        return (
            torch.as_tensor(rows, dtype=torch.int64, device=device),
            torch.as_tensor(cols, dtype=torch.int64, device=device),
        )

    def match_batch(
        self,
        pred_logits: Tensor,
        pred_masks: Tensor,
        gt_masks: Sequence[Tensor],
        generators: Sequence[torch.Generator | None] | None = None,
    ) -> list[tuple[Tensor, Tensor]]:
        """:meth:`match` for every image of a batch: ``pred_logits`` ``(B, Q, 2)``, ``pred_masks`` ``(B, Q, h, w)``
        (or lists of per-image tensors), ``gt_masks`` a list of ``(G_i, H_i, W_i)``, one generator per image."""
        if len(gt_masks) != len(pred_masks):
            raise ValueError(f"{len(pred_masks)} predictions but {len(gt_masks)} targets")
        if generators is None:
            generators = [None] * len(gt_masks)
        return [self.match(pred_logits[b], pred_masks[b], gt_masks[b], generators[b]) for b in range(len(gt_masks))]

    __call__ = match_batch

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(cost_class={self.cost_class}, cost_mask={self.cost_mask}, "
            f"cost_dice={self.cost_dice}, num_points={self.num_points})"
        )
