"""Video instance tracking: an id per thing instance that stays the same across the frames of a video.

:class:`Tracker` sees the frames of one video in order (``update`` once per frame) and gives each instance a track
id. Each frame, the instances are matched one-to-one to the live tracks (:func:`scipy.optimize.linear_sum_assignment`
maximising a score) by two cues:

* mask IoU between the instance and the track's last mask, shifted by the track's centroid velocity times the frames
  elapsed (motion compensation: it carries a track through fast motion and short gaps);
* cosine similarity between the instance's MasQCLIP mask-token embedding (``ImageOutput.embeddings`` row of its
  query) and the track's embedding (an exponential moving average of its instances' embeddings): the appearance cue
  that tells apart two overlapping instances, as when two objects cross.

A pair may be matched when its IoU reaches ``min_iou``, or when its similarity reaches ``min_similarity`` and the
instance lies near the track's predicted place (its box meets the predicted box grown by its own size on every side:
re-identification after a gap the motion model did not bridge, never across the image). The score of a pair is
``iou_weight * IoU + embedding_weight * max(similarity, 0)``. Instances left unmatched start new tracks; ids start
at 1, grow by one per new track and are never reused. A track unseen for more than ``max_gap`` frames is dropped
(its id stays retired). The class of an instance does not gate matching (a thing's class may flicker); the class of a
track is decided over its frames by a score-weighted vote (:meth:`Tracker.track_category`). Stuff is not tracked:
each stuff class keeps one id for the whole video, drawn from the same counter the first time the class is seen.

The tracker holds only its state, never the frames: per live track its last mask as COCO RLE, centroid, velocity and
embedding, per track ever its class votes. :meth:`Tracker.state_dict` is JSON-able and exact (floats as Python
floats, which JSON writes as their shortest round-trip repr; embeddings as base64 float32, the precision they are
kept in), so a tracker restored from the state after frame t (:meth:`Tracker.from_state`) gives exactly the ids of
one that never stopped.
"""

from __future__ import annotations

import base64
import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field, fields
from typing import Any

import numpy as np
from pycocotools import mask as mask_util
from scipy.optimize import linear_sum_assignment

from masqclip_cli.structures.masks import decode_rle

__all__ = ["STATE_FORMAT", "STATE_VERSION", "Tracker", "TrackerConfig"]

#: ``format`` and ``version`` of :meth:`Tracker.state_dict`.
STATE_FORMAT = "masqclip-tracker"
STATE_VERSION = 1


def _is_int(value: Any) -> bool:
    return isinstance(value, (int, np.integer)) and not isinstance(value, (bool, np.bool_))


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(value, (bool, np.bool_))


@dataclass(frozen=True)
class TrackerConfig:
    """How :class:`Tracker` matches instances to tracks.

    Attributes:
        max_gap: frames a track survives unseen (``--track-max-gap``): a track last seen at frame ``l`` can still be
            matched at frame ``f`` when ``f - l - 1 <= max_gap``; 0 = only in the next frame.
        use_embeddings: match by mask-token embedding similarity too (False: IoU and motion only).
        iou_weight: weight of the mask IoU in a pair's score (> 0).
        embedding_weight: weight of the cosine similarity (clipped at 0) in a pair's score (>= 0).
        min_iou: a pair whose (motion-compensated) IoU reaches this may be matched, in (0, 1].
        min_similarity: a pair whose embedding similarity reaches this may be matched without IoU, when the instance
            is near the track's predicted place, in (0, 1] (1 all but turns this path off).
        embedding_momentum: a track's embedding becomes ``m * old + (1 - m) * new``, renormalised, in [0, 1).
        motion_compensation: shift a track's last mask by its velocity times the frames elapsed before the IoU.
        velocity_momentum: a track's centroid velocity (pixels per frame) becomes ``m * old + (1 - m) * observed``,
            in [0, 1).
    """

    max_gap: int = 5
    use_embeddings: bool = True
    iou_weight: float = 1.0
    embedding_weight: float = 1.0
    min_iou: float = 0.1
    min_similarity: float = 0.8
    embedding_momentum: float = 0.8
    motion_compensation: bool = True
    velocity_momentum: float = 0.5

    def __post_init__(self) -> None:
        if not _is_int(self.max_gap) or self.max_gap < 0:
            raise ValueError(f"tracker max_gap must be an integer >= 0 (frames), got {self.max_gap!r}")
        for name in ("use_embeddings", "motion_compensation"):
            if not isinstance(getattr(self, name), (bool, np.bool_)):
                raise ValueError(f"tracker {name} must be true or false, got {getattr(self, name)!r}")
        for name in ("iou_weight", "embedding_weight", "min_iou", "min_similarity", "embedding_momentum",
                     "velocity_momentum"):
            value = getattr(self, name)
            if not _is_number(value) or not math.isfinite(value):
                raise ValueError(f"tracker {name} must be a finite number, got {value!r}")
        if self.iou_weight <= 0:
            raise ValueError(f"tracker iou_weight must be > 0, got {self.iou_weight}")
        if self.embedding_weight < 0:
            raise ValueError(f"tracker embedding_weight must be >= 0, got {self.embedding_weight}")
        for name in ("min_iou", "min_similarity"):
            if not 0 < getattr(self, name) <= 1:
                raise ValueError(f"tracker {name} must be in (0, 1], got {getattr(self, name)}")
        for name in ("embedding_momentum", "velocity_momentum"):
            if not 0 <= getattr(self, name) < 1:
                raise ValueError(f"tracker {name} must be in [0, 1), got {getattr(self, name)}")

    def to_json(self) -> dict[str, Any]:
        """The config as JSON-able data (what :meth:`from_json` reads back equal)."""
        data = asdict(self)
        data["max_gap"] = int(self.max_gap)
        for name in ("use_embeddings", "motion_compensation"):
            data[name] = bool(data[name])
        for name in ("iou_weight", "embedding_weight", "min_iou", "min_similarity", "embedding_momentum",
                     "velocity_momentum"):
            data[name] = float(data[name])
        return data

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> TrackerConfig:
        """A config from :meth:`to_json` data (unknown keys are a ValueError)."""
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"tracker config: unknown field(s) {', '.join(unknown)}; "
                             f"known: {', '.join(sorted(known))}")
        return cls(**dict(data))


@dataclass
class _Track:
    """A live track: its last instance (frame, mask as COCO RLE with str counts, centroid (y, x)), its velocity
    (dy, dx pixels per frame) and its embedding ((D,) float32, unit norm, or None)."""

    id: int
    first_frame: int
    last_frame: int
    hits: int
    rle: dict[str, Any]
    centroid: tuple[float, float] | None
    velocity: tuple[float, float] = (0.0, 0.0)
    embedding: np.ndarray | None = field(default=None, repr=False)

    def to_json(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "first_frame": self.first_frame,
            "last_frame": self.last_frame,
            "hits": self.hits,
            "mask": {"size": list(self.rle["size"]), "counts": self.rle["counts"]},
            "centroid": None if self.centroid is None else [float(v) for v in self.centroid],
            "velocity": [float(v) for v in self.velocity],
            "embedding": None if self.embedding is None else _encode_vector(self.embedding),
        }

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> _Track:
        return cls(
            id=int(data["id"]),
            first_frame=int(data["first_frame"]),
            last_frame=int(data["last_frame"]),
            hits=int(data["hits"]),
            rle={"size": [int(v) for v in data["mask"]["size"]], "counts": str(data["mask"]["counts"])},
            centroid=None if data["centroid"] is None else (float(data["centroid"][0]), float(data["centroid"][1])),
            velocity=(float(data["velocity"][0]), float(data["velocity"][1])),
            embedding=None if data["embedding"] is None else _decode_vector(data["embedding"]),
        )


def _encode_vector(vector: np.ndarray) -> str:
    """A (D,) float32 vector as base64 of its little-endian bytes (exact)."""
    return base64.b64encode(np.ascontiguousarray(vector, dtype="<f4").tobytes()).decode("ascii")


def _decode_vector(text: str) -> np.ndarray:
    return np.frombuffer(base64.b64decode(text.encode("ascii")), dtype="<f4").astype(np.float32)


def _unit_rows(vectors: np.ndarray) -> np.ndarray:
    """(K, D) float64 rows scaled to unit norm (zero rows stay zero)."""
    norms = np.linalg.norm(vectors, axis=1, keepdims=True)
    return np.divide(vectors, norms, out=np.zeros_like(vectors), where=norms > 0)


def _centroid(mask: np.ndarray) -> tuple[float, float] | None:
    """(y, x) mean pixel position of an (H, W) bool mask; None when empty."""
    ys, xs = np.nonzero(mask)
    if ys.size == 0:
        return None
    return float(ys.mean()), float(xs.mean())


def _shift(mask: np.ndarray, dy: int, dx: int) -> np.ndarray:
    """(H, W) bool mask moved by (dy, dx) pixels; what leaves the image is lost, what enters is False."""
    h, w = mask.shape
    out = np.zeros_like(mask)
    if abs(dy) >= h or abs(dx) >= w:
        return out
    out[max(dy, 0) : h + min(dy, 0), max(dx, 0) : w + min(dx, 0)] = mask[
        max(-dy, 0) : h + min(-dy, 0), max(-dx, 0) : w + min(-dx, 0)
    ]
    return out


def _as_coco_rle(rle: Mapping[str, Any]) -> dict[str, Any]:
    """A stored RLE (str counts) as pycocotools takes it (bytes counts)."""
    return {"size": list(rle["size"]), "counts": rle["counts"].encode("ascii")}


def _boxes_near(predicted: np.ndarray, detected: np.ndarray) -> np.ndarray:
    """(K, T) bool: detection box k meets predicted box t grown by its own width and height on every side.

    ``predicted`` (T, 4) and ``detected`` (K, 4) are COCO boxes (x, y, w, h) as pycocotools' ``toBbox`` gives.
    """
    px, py, pw, ph = (predicted[:, i][None, :] for i in range(4))
    dx, dy, dw, dh = (detected[:, i][:, None] for i in range(4))
    return (dx <= px + 2 * pw) & (dx + dw >= px - pw) & (dy <= py + 2 * ph) & (dy + dh >= py - ph)


class Tracker:
    """Track ids for the thing instances of one video, frame by frame (see the module docstring).

    Use::

        tracker = Tracker(TrackerConfig(max_gap=5))
        ids = tracker.update(0, masks, categories, scores, embeddings)  # (K,) int64 ids of frame 0's instances
        state = tracker.state_dict()                                    # saved with frame 0's record
        tracker = Tracker.from_state(state)                             # a resumed run goes on from there
    """

    def __init__(self, config: TrackerConfig | None = None) -> None:
        self.config = TrackerConfig() if config is None else config
        if not isinstance(self.config, TrackerConfig):
            raise ValueError(f"tracker config must be a TrackerConfig, got {type(self.config).__name__}")
        self._next_id = 1
        self._last_frame: int | None = None
        self._image_size: tuple[int, int] | None = None
        self._embedding_dim: int | None = None
        self._tracks: list[_Track] = []
        self._votes: dict[int, dict[int, float]] = {}
        self._stuff_ids: dict[int, int] = {}

    # --- the per-frame step ------------------------------------------------------------------------------------
    def update(
        self,
        frame_index: int,
        masks: np.ndarray,
        categories: np.ndarray,
        scores: np.ndarray,
        embeddings: np.ndarray | None = None,
        isthing: np.ndarray | None = None,
    ) -> np.ndarray:
        """Assign track ids to one frame's instances.

        Args:
            frame_index: the frame's index in the video; strictly greater than the previous frame's (gaps count in
                these units).
            masks: (K, H, W) bool instance masks (K may be 0: the frame only ages the tracks).
            categories: (K,) int contiguous class index of each instance.
            scores: (K,) float confidence of each instance (its weight in the class vote).
            embeddings: (K, D) float mask-token embedding of each instance (``ImageOutput.embeddings[query]``), or
                None (IoU and motion only for this frame).
            isthing: (K,) bool, False for stuff rows (they get their class's stuff id and are not tracked); None =
                all things.

        Returns:
            (K,) int64 track ids, in the order of the rows.
        """
        frame = self._check_frame(frame_index)
        masks = np.asarray(masks)
        if masks.ndim != 3:
            raise ValueError(f"tracker frame {frame}: masks must be (K, H, W), got shape {masks.shape}")
        masks = masks.astype(bool, copy=False)
        k = masks.shape[0]
        categories_arr = self._column(frame, "categories", categories, k)
        if categories_arr.size and not all(_is_int(v) or float(v).is_integer() for v in categories_arr.tolist()):
            raise ValueError(f"tracker frame {frame}: categories must be integers")
        categories_arr = categories_arr.astype(np.int64)
        scores_arr = self._column(frame, "scores", scores, k).astype(np.float64)
        if not np.isfinite(scores_arr).all():
            raise ValueError(f"tracker frame {frame}: scores must be finite")
        thing = np.ones(k, bool) if isthing is None else self._column(frame, "isthing", isthing, k).astype(bool)
        emb = self._embeddings(frame, embeddings, k)
        size = (int(masks.shape[1]), int(masks.shape[2]))
        if k and self._image_size is not None and size != self._image_size:
            raise ValueError(f"tracker frame {frame}: masks are {size[0]}x{size[1]}, earlier frames "
                             f"{self._image_size[0]}x{self._image_size[1]}")
        # every check passed: from here on the frame is taken
        if k and self._image_size is None:
            self._image_size = size
        if emb is not None and self._embedding_dim is None:
            self._embedding_dim = int(emb.shape[1])

        max_gap = self.config.max_gap
        self._tracks = [t for t in self._tracks if frame - t.last_frame - 1 <= max_gap]
        ids = np.zeros(k, np.int64)
        rows = np.flatnonzero(thing)
        det_rles = (mask_util.encode(np.asfortranarray(masks[rows].transpose(1, 2, 0), dtype=np.uint8))
                    if rows.size else [])
        matched = self._match(frame, det_rles, None if emb is None else emb[rows])
        for j, row in enumerate(rows.tolist()):
            track = matched.get(j)
            det_emb = None if emb is None else emb[row]
            rle = {"size": [int(v) for v in det_rles[j]["size"]], "counts": det_rles[j]["counts"].decode("ascii")}
            if track is None:
                track = _Track(id=self._new_id(), first_frame=frame, last_frame=frame, hits=1, rle=rle,
                               centroid=_centroid(masks[row]),
                               embedding=None if det_emb is None else det_emb.astype(np.float32))
                self._tracks.append(track)
                self._votes[track.id] = {}
            else:
                self._advance(track, frame, masks[row], rle, det_emb)
            votes = self._votes[track.id]
            category = int(categories_arr[row])
            votes[category] = votes.get(category, 0.0) + float(scores_arr[row])
            ids[row] = track.id
        for row in np.flatnonzero(~thing).tolist():
            category = int(categories_arr[row])
            if category not in self._stuff_ids:
                self._stuff_ids[category] = self._new_id()
            ids[row] = self._stuff_ids[category]
        self._tracks.sort(key=lambda t: t.id)
        self._last_frame = frame
        return ids

    def _check_frame(self, frame_index: Any) -> int:
        if not _is_int(frame_index):
            raise ValueError(f"tracker frame index must be an integer, got {frame_index!r}")
        frame = int(frame_index)
        if self._last_frame is not None and frame <= self._last_frame:
            raise ValueError(f"tracker frame {frame} comes after frame {self._last_frame}: frames must be given in "
                             "increasing order")
        return frame

    @staticmethod
    def _column(frame: int, name: str, values: Any, k: int) -> np.ndarray:
        arr = np.asarray(values).reshape(-1)
        if arr.size != k:
            raise ValueError(f"tracker frame {frame}: {arr.size} {name} for {k} masks")
        return arr

    def _embeddings(self, frame: int, embeddings: Any, k: int) -> np.ndarray | None:
        """(K, D) unit float64 rows, or None when embeddings are not given or not used."""
        if embeddings is None or not self.config.use_embeddings or k == 0:
            return None
        emb = np.asarray(embeddings, dtype=np.float64)
        if emb.ndim != 2 or emb.shape[0] != k:
            raise ValueError(f"tracker frame {frame}: embeddings must be ({k}, D), got shape {emb.shape}")
        if not np.isfinite(emb).all():
            raise ValueError(f"tracker frame {frame}: embeddings must be finite")
        if self._embedding_dim is not None and emb.shape[1] != self._embedding_dim:
            raise ValueError(f"tracker frame {frame}: embeddings have {emb.shape[1]} dimensions, earlier frames "
                             f"{self._embedding_dim}")
        return _unit_rows(emb)

    def _new_id(self) -> int:
        new = self._next_id
        self._next_id += 1
        return new

    def _predicted_rle(self, track: _Track, frame: int) -> dict[str, Any]:
        """The track's last mask moved by its velocity over the frames elapsed (pycocotools RLE, bytes counts)."""
        elapsed = frame - track.last_frame
        dy = int(np.rint(track.velocity[0] * elapsed)) if self.config.motion_compensation else 0
        dx = int(np.rint(track.velocity[1] * elapsed)) if self.config.motion_compensation else 0
        if dy == 0 and dx == 0:
            return _as_coco_rle(track.rle)
        moved = _shift(decode_rle(track.rle), dy, dx)
        return mask_util.encode(np.asfortranarray(moved, dtype=np.uint8))

    def _match(self, frame: int, det_rles: list[dict[str, Any]], emb: np.ndarray | None) -> dict[int, _Track]:
        """Detection row -> matched live track, one-to-one, maximising the summed pair score over allowed pairs.

        ``det_rles``: the K detections' masks as pycocotools RLEs; ``emb``: their (K, D) unit embeddings or None.
        """
        k, tracks = len(det_rles), self._tracks
        if k == 0 or not tracks:
            return {}
        track_rles = [self._predicted_rle(t, frame) for t in tracks]
        iou = np.asarray(mask_util.iou(det_rles, track_rles, [0] * len(tracks)), dtype=np.float64).reshape(k, -1)
        cfg = self.config
        allowed = iou >= cfg.min_iou
        score = cfg.iou_weight * iou
        have = [i for i, t in enumerate(tracks) if t.embedding is not None]
        if emb is not None and have:
            bank = np.stack([tracks[i].embedding for i in have]).astype(np.float64)
            sim = np.full((k, len(tracks)), -1.0)
            sim[:, have] = emb @ bank.T
            near = _boxes_near(np.asarray(mask_util.toBbox(track_rles), np.float64).reshape(-1, 4),
                               np.asarray(mask_util.toBbox(det_rles), np.float64).reshape(-1, 4))
            allowed |= (sim >= cfg.min_similarity) & near
            score = score + cfg.embedding_weight * np.maximum(sim, 0.0)
        # forbidden pairs weigh 0 and every allowed one > 0, so the best full assignment minus its forbidden pairs is
        # a best assignment over the allowed pairs
        weight = np.where(allowed, score, 0.0)
        det_rows, track_cols = linear_sum_assignment(weight, maximize=True)
        return {int(r): tracks[int(c)] for r, c in zip(det_rows, track_cols) if allowed[r, c]}

    def _advance(self, track: _Track, frame: int, mask: np.ndarray, rle: dict[str, Any],
                 det_emb: np.ndarray | None) -> None:
        """Move a matched track to this frame's instance (its (H, W) mask, that mask's RLE, its (D,) embedding)."""
        centroid = _centroid(mask)
        if centroid is not None and track.centroid is not None:
            elapsed = frame - track.last_frame
            observed = ((centroid[0] - track.centroid[0]) / elapsed, (centroid[1] - track.centroid[1]) / elapsed)
            if track.hits == 1:
                track.velocity = observed
            else:
                m = self.config.velocity_momentum
                track.velocity = (m * track.velocity[0] + (1 - m) * observed[0],
                                  m * track.velocity[1] + (1 - m) * observed[1])
        if centroid is not None:
            track.centroid = centroid
        if det_emb is not None:
            if track.embedding is None:
                track.embedding = det_emb.astype(np.float32)
            else:
                m = self.config.embedding_momentum
                mixed = m * track.embedding.astype(np.float64) + (1 - m) * det_emb
                track.embedding = _unit_rows(mixed[None, :])[0].astype(np.float32)
        track.rle = rle
        track.last_frame = frame
        track.hits += 1

    # --- classes and ids ---------------------------------------------------------------------------------------
    def track_category(self, track_id: int) -> int:
        """The class of a track, decided over all its frames so far: the class with the largest sum of instance
        scores (ties: the smallest class index). A stuff id gives its class. Works for dead tracks too."""
        tid = int(track_id)
        if tid in self._votes:
            votes = self._votes[tid]
            if not votes:
                raise ValueError(f"track {tid} has no class votes")
            return min(votes, key=lambda c: (-votes[c], c))
        for category, stuff_id in self._stuff_ids.items():
            if stuff_id == tid:
                return category
        raise ValueError(f"track id {tid} was never given by this tracker")

    def track_categories(self) -> dict[int, int]:
        """Every thing track ever started (live or dead) -> its decided class (:meth:`track_category`)."""
        return {tid: self.track_category(tid) for tid in sorted(self._votes)}

    @property
    def active_track_ids(self) -> list[int]:
        """Ids of the live thing tracks (those that may still be matched), ascending."""
        return [t.id for t in self._tracks]

    @property
    def last_frame(self) -> int | None:
        """The index of the last frame given to :meth:`update` (None before the first)."""
        return self._last_frame

    @property
    def stuff_ids(self) -> dict[int, int]:
        """Stuff class -> its id, for the stuff classes seen so far."""
        return dict(self._stuff_ids)

    # --- state -------------------------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """The whole state as JSON-able data: ``json.dumps(state, sort_keys=True)`` of the restored tracker's
        state equals this one's, and it gives the same ids for every later frame."""
        return {
            "format": STATE_FORMAT,
            "version": STATE_VERSION,
            "config": self.config.to_json(),
            "next_id": self._next_id,
            "last_frame": self._last_frame,
            "image_size": None if self._image_size is None else list(self._image_size),
            "embedding_dim": self._embedding_dim,
            "tracks": [t.to_json() for t in self._tracks],
            "votes": {str(tid): {str(c): float(v) for c, v in sorted(votes.items())}
                      for tid, votes in sorted(self._votes.items())},
            "stuff_ids": {str(c): sid for c, sid in sorted(self._stuff_ids.items())},
        }

    @classmethod
    def from_state(cls, state: Mapping[str, Any]) -> Tracker:
        """The tracker whose :meth:`state_dict` is ``state``."""
        if not isinstance(state, Mapping) or state.get("format") != STATE_FORMAT:
            raise ValueError(f"not a tracker state (format must be {STATE_FORMAT!r})")
        if state.get("version") != STATE_VERSION:
            raise ValueError(f"tracker state version {state.get('version')!r} is not supported "
                             f"(this version reads {STATE_VERSION})")
        try:
            tracker = cls(TrackerConfig.from_json(state["config"]))
            tracker._next_id = int(state["next_id"])
            tracker._last_frame = None if state["last_frame"] is None else int(state["last_frame"])
            size = state["image_size"]
            tracker._image_size = None if size is None else (int(size[0]), int(size[1]))
            tracker._embedding_dim = None if state["embedding_dim"] is None else int(state["embedding_dim"])
            tracker._tracks = sorted((_Track.from_json(t) for t in state["tracks"]), key=lambda t: t.id)
            tracker._votes = {int(tid): {int(c): float(v) for c, v in votes.items()}
                              for tid, votes in state["votes"].items()}
            tracker._stuff_ids = {int(c): int(sid) for c, sid in state["stuff_ids"].items()}
        except (KeyError, TypeError, IndexError, AttributeError) as exc:
            raise ValueError(f"tracker state is incomplete or malformed: {type(exc).__name__}: {exc}") from None
        return tracker

    def __repr__(self) -> str:
        return (f"Tracker({len(self._tracks)} live tracks, next id {self._next_id}, last frame {self._last_frame}, "
                f"max_gap {self.config.max_gap})")
