"""Panoptic quality (PQ, SQ, RQ) with the COCO panoptic API's definitions (``panopticapi`` ``pq_compute``).

Per image, for ground truth and prediction id maps of the same shape (id 0 = void / unlabelled in both):

* areas and intersections are pixel counts over the **whole** image (a predicted segment's area includes the
  pixels it puts on void);
* a ground-truth segment and a predicted segment of the **same category** match iff ``IoU > 0.5`` (strictly), where
  ``IoU = inter / (gt_area + pred_area - inter - pred∩void)``: only the prediction's pixels on **void** are taken out
  of the union. Pixels on a crowd region are *not* taken out of the union (that is what ``pq_compute`` does; crowd
  regions only matter for false positives, below). Crowd segments never match and are never false negatives;
* every listed non-crowd ground-truth segment left unmatched is a false negative (FN) of its category;
* an unmatched predicted segment is a false positive (FP) of its category unless
  ``(pred∩void + pred∩crowd) / pred_area > 0.5``, where ``crowd`` is the crowd segment of the prediction's own
  category. As in ``pq_compute``, when an image lists several crowd segments of one category, the **last** one
  listed is the one used;
* each TP adds its IoU to the category's ``iou_sum``.

Per category ``SQ = iou_sum / tp`` (0 when ``tp == 0``), ``RQ = tp / (tp + fp/2 + fn/2)``, ``PQ = SQ · RQ``.
Averages (all / things / stuff / any subset) weight the categories equally and skip those with
``tp + fp + fn == 0``; ``n`` is the number averaged. Results are in percent (×100), like detectron2 reports
``pq_compute``'s numbers. A group with ``n == 0`` reports 0.0 (``pq_compute`` would divide by zero).

Differences from feeding PNGs to ``pq_compute``, none of which changes a number on a consistent dataset:

* a ground-truth id present in the map but not listed in ``gt_segments`` is treated as void (``pq_compute`` would
  neither match it nor count it as void; COCO/ADE/Cityscapes panoptic annotations list every non-zero id);
* ground-truth areas are counted from the map (``pq_compute`` reads them from the JSON ``area``, which COCO sets to
  the same pixel count);
* a listed predicted segment with no pixels is skipped (``pq_compute`` refuses such a file); a predicted id present
  in the map but not listed is an error, as in ``pq_compute``.

Data-parallel use: each process accumulates its share, then the per-category sums are added —
:meth:`PanopticAccumulator.merge`, or ``state()`` → ``torch.distributed.all_reduce`` (float64) → ``load_state()``.
The counts are integers (exact in float64 up to 2**53); ``iou_sum`` is a float sum, as in ``pq_compute``'s
multi-process mode.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

__all__ = ["PanopticSegmentInfo", "PanopticAccumulator", "pq_from_counts"]

_GROUPS = ("all", "things", "stuff")
_RESERVED = frozenset(_GROUPS) | {"per_class"}


@dataclass
class PanopticSegmentInfo:
    """One segment of an id map: its id (non-zero), contiguous class index ``0..N-1``, crowd flag (ground truth)."""

    id: int
    category: int
    iscrowd: bool = False


def pq_from_counts(tp: float, fp: float, fn: float, iou_sum: float) -> tuple[float, float, float]:
    """``(pq, sq, rq)`` of one category (fractions, not percent), as ``pq_compute``: all 0 when nothing was seen."""
    if tp + fp + fn == 0:
        return 0.0, 0.0, 0.0
    denom = tp + 0.5 * fp + 0.5 * fn
    pq = iou_sum / denom
    sq = iou_sum / tp if tp != 0 else 0.0
    rq = tp / denom
    return float(pq), float(sq), float(rq)


def _as_id_map(arr: Any, name: str) -> np.ndarray:
    a = np.asarray(arr)
    if not (np.issubdtype(a.dtype, np.integer) or a.dtype == np.bool_):
        raise ValueError(f"{name} must be an integer id map, got dtype {a.dtype}")
    return a.astype(np.int64, copy=False)


def _factorize(values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``(uniques sorted, index of each value in uniques)`` of a flat int64 array (``np.unique``'s inverse, faster)."""
    if values.size == 0:
        return np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.int64)
    lo, hi = int(values.min()), int(values.max())
    if hi - lo < (1 << 20):  # small id range: a lookup table, O(n)
        present = np.bincount(values - lo, minlength=hi - lo + 1) > 0
        uniques = np.flatnonzero(present) + lo
        lut = np.cumsum(present) - 1
        return uniques, lut[values - lo]
    uniques = np.unique(values)
    return uniques, np.searchsorted(uniques, values)


def _segment_table(segments: Sequence[PanopticSegmentInfo], num_classes: int, name: str) -> dict[int, tuple[int, bool]]:
    table: dict[int, tuple[int, bool]] = {}
    for s in segments:
        sid, cat = int(s.id), int(s.category)
        if sid == 0:
            raise ValueError(f"{name}: segment id 0 is reserved for void / unlabelled pixels")
        if sid in table:
            raise ValueError(f"{name}: segment id {sid} is listed twice")
        if not 0 <= cat < num_classes:
            raise ValueError(f"{name}: segment {sid} has category {cat}, outside 0..{num_classes - 1}")
        table[sid] = (cat, bool(getattr(s, "iscrowd", False)))
    return table


class PanopticAccumulator:
    """Per-category TP / FP / FN counts and IoU sums over a stream of images (see the module docstring)."""

    def __init__(self, num_classes: int) -> None:
        if int(num_classes) <= 0:
            raise ValueError(f"num_classes must be positive, got {num_classes}")
        self.num_classes = int(num_classes)
        self.tp = np.zeros(self.num_classes, dtype=np.int64)
        self.fp = np.zeros(self.num_classes, dtype=np.int64)
        self.fn = np.zeros(self.num_classes, dtype=np.int64)
        self.iou_sum = np.zeros(self.num_classes, dtype=np.float64)

    # ------------------------------------------------------------------ accumulation

    def add(
        self,
        gt_ids: np.ndarray,
        gt_segments: Sequence[PanopticSegmentInfo],
        pred_ids: np.ndarray,
        pred_segments: Sequence[PanopticSegmentInfo],
    ) -> None:
        """Score one image: ``gt_ids`` / ``pred_ids`` are (H, W) integer id maps (0 = void / unlabelled)."""
        gt = _as_id_map(gt_ids, "gt_ids")
        pred = _as_id_map(pred_ids, "pred_ids")
        if gt.shape != pred.shape:
            raise ValueError(f"gt_ids {gt.shape} and pred_ids {pred.shape} differ in shape")
        gt_table = _segment_table(gt_segments, self.num_classes, "gt_segments")
        pred_table = _segment_table(pred_segments, self.num_classes, "pred_segments")

        pred_u, pred_inv = _factorize(pred.ravel())
        unknown = [int(v) for v in pred_u if v != 0 and int(v) not in pred_table]
        if unknown:
            raise ValueError(f"pred_ids contains segment id(s) {unknown} not listed in pred_segments")
        gt_u, gt_inv = _factorize(gt.ravel())
        # (gt value, pred value) pixel counts
        joint = np.bincount(gt_inv * len(pred_u) + pred_inv, minlength=len(gt_u) * len(pred_u))
        joint = joint.reshape(len(gt_u), len(pred_u))
        pred_area = joint.sum(axis=0)
        listed_gt = np.array([int(v) in gt_table for v in gt_u], dtype=bool)
        void = joint[~listed_gt].sum(axis=0)  # pred pixels on void (id 0 or unlisted gt ids)

        gt_row = {int(v): r for r, v in enumerate(gt_u) if listed_gt[r]}
        pred_col = {int(v): c for c, v in enumerate(pred_u) if v != 0}
        gt_area = joint.sum(axis=1)

        # matching, over the overlapping pairs in (gt id, pred id) order like pq_compute's sorted map
        gt_matched: set[int] = set()
        pred_matched: set[int] = set()
        for r, c in zip(*np.nonzero(joint)):
            gid, pid = int(gt_u[r]), int(pred_u[c])
            if not listed_gt[r] or pid == 0:
                continue
            gcat, gcrowd = gt_table[gid]
            if gcrowd or pred_table[pid][0] != gcat:
                continue
            inter = joint[r, c]
            union = gt_area[r] + pred_area[c] - inter - void[c]
            iou = inter / union
            if iou > 0.5:
                self.tp[gcat] += 1
                self.iou_sum[gcat] += iou
                gt_matched.add(gid)
                pred_matched.add(pid)

        crowd_of: dict[int, int] = {}
        for gid, (gcat, gcrowd) in gt_table.items():  # listing order: the last crowd segment of a category wins
            if gid in gt_matched:
                continue
            if gcrowd:
                crowd_of[gcat] = gid
                continue
            self.fn[gcat] += 1

        for pid, (pcat, _) in pred_table.items():
            if pid in pred_matched or pid not in pred_col:  # matched, or listed without pixels
                continue
            c = pred_col[pid]
            ignored = void[c]
            crowd = crowd_of.get(pcat)
            if crowd is not None and crowd in gt_row:
                ignored += joint[gt_row[crowd], c]
            if ignored / pred_area[c] > 0.5:
                continue
            self.fp[pcat] += 1

    # ------------------------------------------------------------------ combining

    def merge(self, other: PanopticAccumulator) -> None:
        """Add ``other``'s sums into this accumulator (data-parallel evaluation)."""
        if other.num_classes != self.num_classes:
            raise ValueError(f"cannot merge {other.num_classes} classes into {self.num_classes}")
        self.tp += other.tp
        self.fp += other.fp
        self.fn += other.fn
        self.iou_sum += other.iou_sum

    def state(self) -> np.ndarray:
        """``(num_classes, 4)`` float64: columns tp, fp, fn, iou_sum (sum these across processes)."""
        return np.stack([self.tp, self.fp, self.fn, self.iou_sum], axis=1).astype(np.float64)

    def load_state(self, state: Any) -> None:
        """Replace the sums with a :meth:`state` array (e.g. after ``all_reduce``)."""
        arr = np.asarray(state, dtype=np.float64).reshape(self.num_classes, 4)
        counts = arr[:, :3]
        if np.any(counts < 0) or np.any(counts != np.round(counts)):
            raise ValueError("panoptic state: tp / fp / fn must be non-negative integers")
        self.tp, self.fp, self.fn = (counts[:, i].astype(np.int64) for i in range(3))
        self.iou_sum = arr[:, 3].copy()

    @classmethod
    def from_state(cls, state: Any) -> PanopticAccumulator:
        arr = np.asarray(state, dtype=np.float64)
        acc = cls(arr.reshape(-1, 4).shape[0])
        acc.load_state(arr)
        return acc

    def to_dict(self) -> dict[str, Any]:
        """JSON-friendly sums (lossless: floats round-trip through ``json``)."""
        return {
            "num_classes": self.num_classes,
            "tp": self.tp.tolist(),
            "fp": self.fp.tolist(),
            "fn": self.fn.tolist(),
            "iou_sum": self.iou_sum.tolist(),
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> PanopticAccumulator:
        acc = cls(int(data["num_classes"]))
        acc.load_state(np.stack([np.asarray(data[k], dtype=np.float64) for k in ("tp", "fp", "fn", "iou_sum")], 1))
        return acc

    # ------------------------------------------------------------------ scoring

    def _average(self, classes: Sequence[int]) -> dict[str, float | int]:
        pq = sq = rq = 0.0
        n = 0
        for c in classes:
            if self.tp[c] + self.fp[c] + self.fn[c] == 0:
                continue
            n += 1
            p, s, r = pq_from_counts(int(self.tp[c]), int(self.fp[c]), int(self.fn[c]), float(self.iou_sum[c]))
            pq += p
            sq += s
            rq += r
        if n == 0:
            return {"pq": 0.0, "sq": 0.0, "rq": 0.0, "n": 0}
        return {"pq": 100 * (pq / n), "sq": 100 * (sq / n), "rq": 100 * (rq / n), "n": n}

    def result(self, isthing: Sequence[bool], subsets: Mapping[str, Sequence[int]] | None = None) -> dict[str, Any]:
        """PQ / SQ / RQ in percent for all, things, stuff, each subset (class indices), and per class.

        Returns ``{"all": {"pq", "sq", "rq", "n"}, "things": {...}, "stuff": {...}, <subset name>: {...},
        "per_class": [{"class", "pq", "sq", "rq", "tp", "fp", "fn", "iou_sum"}, ...]}``.
        """
        isthing = [bool(t) for t in isthing]
        if len(isthing) != self.num_classes:
            raise ValueError(f"isthing has {len(isthing)} entries for {self.num_classes} classes")
        classes = range(self.num_classes)
        out: dict[str, Any] = {
            "all": self._average(classes),
            "things": self._average([c for c in classes if isthing[c]]),
            "stuff": self._average([c for c in classes if not isthing[c]]),
        }
        for name, members in (subsets or {}).items():
            if name in _RESERVED:
                raise ValueError(f"subset name {name!r} is reserved")
            members = sorted({int(c) for c in members})
            bad = [c for c in members if not 0 <= c < self.num_classes]
            if bad:
                raise ValueError(f"subset {name!r}: class indices {bad} outside 0..{self.num_classes - 1}")
            out[name] = self._average(members)
        per_class = []
        for c in classes:
            tp, fp, fn, iou = int(self.tp[c]), int(self.fp[c]), int(self.fn[c]), float(self.iou_sum[c])
            pq, sq, rq = pq_from_counts(tp, fp, fn, iou)
            per_class.append(
                {
                    "class": c,
                    "pq": 100 * pq,
                    "sq": 100 * sq,
                    "rq": 100 * rq,
                    "tp": tp,
                    "fp": fp,
                    "fn": fn,
                    "iou_sum": iou,
                }
            )
        out["per_class"] = per_class
        return out
