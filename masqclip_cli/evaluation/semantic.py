"""Semantic segmentation metrics with detectron2's ``SemSegEvaluator`` definitions.

A confusion matrix over the evaluated pixels is accumulated, ground truth in rows, prediction in columns, plus one
extra column for predictions outside ``0..N-1`` (counted as wrong for the pixel's ground-truth class, as mmseg's
``intersect_and_union`` does; detectron2's argmax never produces them). Pixels whose ground truth equals
``ignore_index`` or lies outside ``0..N-1`` are not evaluated.

With ``tp_c`` the diagonal, ``gt_c`` the row sums (all evaluated pixels of class ``c``, the extra column included) and
``pred_c`` the column sums (extra column excluded):

* ``IoU_c = tp_c / (gt_c + pred_c - tp_c)`` and ``ACC_c = tp_c / gt_c``, defined only for classes with ``gt_c > 0``
  (otherwise NaN);
* ``mIoU`` / ``mACC``: plain means over the classes with ``gt_c > 0`` — detectron2's rule. A class that is only
  predicted (``gt_c == 0 < pred_c``) is left out of the mean; its wrong pixels still lower the IoU of the classes they
  belong to. (mmseg's ``nanmean`` would instead count such a class with IoU 0: the two tools differ there.)
* ``fwIoU = Σ_c IoU_c · gt_c / Σ gt``; ``pACC = Σ tp / Σ gt``.

Everything is in percent (×100). With no evaluated pixel at all, the averages are NaN (as detectron2's).
``subsets`` (name → class indices) report ``mIoU`` / ``mACC`` over their classes with ``gt_c > 0`` (``n`` of them).

Data-parallel use: :meth:`SemanticAccumulator.merge`, or ``state()`` → ``all_reduce`` (float64; pixel counts are
exact up to 2**53) → ``load_state()``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

__all__ = ["SemanticAccumulator"]

_RESERVED = frozenset({"mIoU", "fwIoU", "pACC", "mACC", "n", "per_class"})


def _as_label_map(arr: Any, name: str) -> np.ndarray:
    a = np.asarray(arr)
    if not np.issubdtype(a.dtype, np.integer):
        raise ValueError(f"{name} must be an integer label map, got dtype {a.dtype}")
    return a.astype(np.int64, copy=False)


class SemanticAccumulator:
    """Confusion-matrix accumulator for semantic segmentation (see the module docstring)."""

    def __init__(self, num_classes: int, ignore_index: int | None = 255) -> None:
        if int(num_classes) <= 0:
            raise ValueError(f"num_classes must be positive, got {num_classes}")
        self.num_classes = int(num_classes)
        self.ignore_index = None if ignore_index is None else int(ignore_index)
        self._conf = np.zeros((self.num_classes, self.num_classes + 1), dtype=np.int64)

    @property
    def confusion(self) -> np.ndarray:
        """``(N, N)`` int64 pixel counts, ground truth rows, prediction columns (a copy)."""
        return self._conf[:, : self.num_classes].copy()

    @property
    def confusion_full(self) -> np.ndarray:
        """``(N, N + 1)`` int64: :attr:`confusion` plus the column of predictions outside ``0..N-1`` (a copy)."""
        return self._conf.copy()

    def add(self, gt: np.ndarray, pred: np.ndarray) -> None:
        """Accumulate one image: ``gt`` and ``pred`` are integer class maps of the same shape."""
        g = _as_label_map(gt, "gt")
        p = _as_label_map(pred, "pred")
        if g.shape != p.shape:
            raise ValueError(f"gt {g.shape} and pred {p.shape} differ in shape")
        n = self.num_classes
        g = g.ravel()
        p = p.ravel()
        keep = (g >= 0) & (g < n)
        if self.ignore_index is not None:
            keep &= g != self.ignore_index
        g = g[keep]
        p = p[keep]
        p = np.where((p >= 0) & (p < n), p, n)
        self._conf += np.bincount(g * (n + 1) + p, minlength=n * (n + 1)).reshape(n, n + 1)

    def merge(self, other: SemanticAccumulator) -> None:
        """Add ``other``'s confusion matrix (data-parallel evaluation)."""
        if other.num_classes != self.num_classes:
            raise ValueError(f"cannot merge {other.num_classes} classes into {self.num_classes}")
        self._conf += other._conf

    def state(self) -> np.ndarray:
        """``(N, N + 1)`` float64 copy of the full confusion matrix (sum these across processes)."""
        return self._conf.astype(np.float64)

    def load_state(self, state: Any) -> None:
        """Replace the counts with a :meth:`state` array (e.g. after ``all_reduce``)."""
        arr = np.asarray(state, dtype=np.float64).reshape(self.num_classes, self.num_classes + 1)
        if np.any(arr < 0) or np.any(arr != np.round(arr)):
            raise ValueError("semantic state: counts must be non-negative integers")
        self._conf = arr.astype(np.int64)

    def to_dict(self) -> dict[str, Any]:
        return {"num_classes": self.num_classes, "ignore_index": self.ignore_index, "confusion": self._conf.tolist()}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> SemanticAccumulator:
        acc = cls(int(data["num_classes"]), data.get("ignore_index", 255))
        acc.load_state(np.asarray(data["confusion"], dtype=np.float64))
        return acc

    def result(self, subsets: Mapping[str, Sequence[int]] | None = None) -> dict[str, Any]:
        """``{"mIoU", "fwIoU", "pACC", "mACC", "n", <subset>: {"mIoU", "mACC", "n"}, "per_class": [...]}``.

        ``per_class`` entries: ``{"class", "IoU", "ACC", "gt_pixels", "pred_pixels"}`` (IoU / ACC NaN where the class
        has no ground-truth pixel). ``n``: classes averaged.
        """
        n_cls = self.num_classes
        tp = np.diagonal(self._conf[:, :n_cls]).astype(np.float64)
        pos_gt = self._conf.sum(axis=1).astype(np.float64)
        pos_pred = self._conf[:, :n_cls].sum(axis=0).astype(np.float64)
        acc = np.full(n_cls, np.nan)
        iou = np.full(n_cls, np.nan)
        with np.errstate(divide="ignore", invalid="ignore"):
            class_weights = pos_gt / np.sum(pos_gt)
            acc_valid = pos_gt > 0
            acc[acc_valid] = tp[acc_valid] / pos_gt[acc_valid]
            union = pos_gt + pos_pred - tp
            iou_valid = np.logical_and(acc_valid, union > 0)
            iou[iou_valid] = tp[iou_valid] / union[iou_valid]
            macc = np.sum(acc[acc_valid]) / np.sum(acc_valid)
            miou = np.sum(iou[iou_valid]) / np.sum(iou_valid)
            fiou = np.sum(iou[iou_valid] * class_weights[iou_valid])
            pacc = np.sum(tp) / np.sum(pos_gt)
            if not iou_valid.any():
                fiou = np.nan
        out: dict[str, Any] = {
            "mIoU": float(100 * miou),
            "fwIoU": float(100 * fiou),
            "pACC": float(100 * pacc),
            "mACC": float(100 * macc),
            "n": int(iou_valid.sum()),
        }
        for name, members in (subsets or {}).items():
            if name in _RESERVED:
                raise ValueError(f"subset name {name!r} is reserved")
            members = sorted({int(c) for c in members})
            bad = [c for c in members if not 0 <= c < n_cls]
            if bad:
                raise ValueError(f"subset {name!r}: class indices {bad} outside 0..{n_cls - 1}")
            sel = np.zeros(n_cls, dtype=bool)
            sel[members] = True
            v_iou = sel & iou_valid
            v_acc = sel & acc_valid
            with np.errstate(divide="ignore", invalid="ignore"):
                out[name] = {
                    "mIoU": float(100 * (np.sum(iou[v_iou]) / np.sum(v_iou))),
                    "mACC": float(100 * (np.sum(acc[v_acc]) / np.sum(v_acc))),
                    "n": int(v_iou.sum()),
                }
        out["per_class"] = [
            {
                "class": c,
                "IoU": float(100 * iou[c]),
                "ACC": float(100 * acc[c]),
                "gt_pixels": int(pos_gt[c]),
                "pred_pixels": int(pos_pred[c]),
            }
            for c in range(n_cls)
        ]
        return out
