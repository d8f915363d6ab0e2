"""Tracking in a ``segment`` run: which items form sequences, track ids put into each frame's result, and the
trackers' state on disk so a resumed run gives exactly the ids of an uninterrupted one.

A *sequence* is the frames of one video (``--track``, on by default for video sources) or every image of a
``--sequence`` run (in item-id order). Each sequence has its own :class:`~masqclip_cli.inference.tracking.Tracker`;
frame ``i`` of a sequence is its ``i``-th listed item (after ``--every``), so ``--track-max-gap`` counts sampled
frames.

What is tracked: one row per query (object) of the frame as the writers get it (after the label map and the
pre-annotation controls): the query's instance mask when the run has instances (the best-scoring row of the query:
one query may stand under several classes), else its panoptic segment's pixels, with the query's mask-token
embedding. The track id then becomes the ``id`` of every instance row of that query and of its panoptic segment
(the panoptic map relabelled); stuff segments take their class's one id per sequence. See
:class:`~masqclip_cli.io.writers.base.ItemInfo`.

State: each frame's record (``<out>/.masqclip/items/<frame id>.json``) keeps the tracker's state after that frame
(key ``tracker``, :meth:`~masqclip_cli.inference.tracking.Tracker.state_dict`), written with the record, atomically,
as the last step of the frame. On resume a sequence restarts after its longest run of finished leading frames, from
the state in the last one's record; later frames are computed again.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from masqclip_cli.inference.tracking import Tracker, TrackerConfig
from masqclip_cli.io.sources import SourceItem
from masqclip_cli.structures import Segmentation, Segments

__all__ = ["SequenceTracking", "TrackingOptions", "sequence_name"]


@dataclass(frozen=True)
class TrackingOptions:
    """How a run tracks.

    Attributes:
        track: True / False, or None: on for video sources, off for images (unless ``sequence``).
        sequence: treat every image of the run as one sequence (frames in item-id order).
        config: the tracker's matching rules (``--track-max-gap``, ``--track-embeddings``).
    """

    track: bool | None = None
    sequence: bool = False
    config: TrackerConfig = TrackerConfig()

    def to_json(self) -> dict:
        return {"sequence": self.sequence, "tracker": self.config.to_json()}


def sequence_name(item: SourceItem, options: TrackingOptions, sequence_label: str) -> str | None:
    """The sequence ``item`` is a frame of, or None when it is not tracked: a video frame's video id
    (``clip.mp4#000005`` -> ``clip.mp4``) unless tracking is off; any item with ``--sequence``."""
    if options.track is False:
        return None
    if options.sequence:
        return item.id.rsplit("#", 1)[0] if item.frame is not None else sequence_label
    if item.frame is not None:
        return item.id.rsplit("#", 1)[0]
    return None


class SequenceTracking:
    """The trackers of a run's sequences."""

    def __init__(self, config: TrackerConfig) -> None:
        self.config = config
        self.trackers: dict[str, Tracker] = {}

    # --- state ------------------------------------------------------------------------------------------------
    def state_json(self, sequence: str) -> dict:
        """The state of ``sequence``'s tracker after its latest frame: what the frame's record keeps."""
        return self.trackers[sequence].state_dict()

    def resume_point(self, sequence: str, finished: Sequence[bool],
                     state_of: Callable[[int], Mapping | None]) -> int:
        """How many leading frames of ``sequence`` are finished and can be kept (their tracker restored from the last
        one's record, ``state_of(frame)``); 0 when none, or when that record holds no state (the sequence starts
        over). Frames after them are computed again."""
        prefix = 0
        while prefix < len(finished) and finished[prefix]:
            prefix += 1
        if prefix == 0:
            return 0
        state = state_of(prefix - 1)
        if not state:
            return 0
        self.trackers[sequence] = Tracker.from_state(state)
        return prefix

    def track_classes(self) -> dict[str, dict[int, int]]:
        """Per sequence, each thing track's class decided over its frames (and each stuff id's class)."""
        out: dict[str, dict[int, int]] = {}
        for sequence, tracker in sorted(self.trackers.items()):
            classes = tracker.track_categories()
            classes.update({sid: cls for cls, sid in tracker.stuff_ids.items()})
            out[sequence] = dict(sorted(classes.items()))
        return out

    def load_final_states(self, last_states: Mapping[str, Mapping | None]) -> None:
        """Restore, for sequences this run did not touch (all frames reused), the tracker after their last frame
        (``last_states``: sequence -> the state in its last frame's record)."""
        for sequence, state in last_states.items():
            if sequence not in self.trackers and state:
                self.trackers[sequence] = Tracker.from_state(state)

    # --- one frame --------------------------------------------------------------------------------------------
    def assign(self, sequence: str, frame: int, seg: Segmentation, embeddings: np.ndarray | None) -> Segmentation:
        """``seg`` with track ids (see the module docstring); ``embeddings`` (Q, D) of the frame's queries."""
        tracker = self.trackers.setdefault(sequence, Tracker(self.config))
        h, w = (int(v) for v in seg.image_size)
        instances, segments, panoptic = seg.instances, seg.segments, seg.panoptic
        if panoptic is None:
            segments = Segments()
        # one object per query (a row without one is its own object): its instance rows and panoptic segment
        inst_keys: list[object] = [] if instances is None else [
            q if q >= 0 else ("instance", k) for k, q in enumerate(instances.query.tolist())]
        seg_keys: list[object] = [
            q if (thing and q >= 0) else ("segment", k)
            for k, (q, thing) in enumerate(zip(segments.query.tolist(), segments.isthing.tolist()))]
        # key -> (mask, class, score, is thing, query)
        objects: dict[object, tuple[np.ndarray, int, float, bool, int]] = {}
        for k in np.argsort(-instances.score, kind="stable").tolist() if inst_keys else ():
            if inst_keys[k] not in objects:  # the best-scoring row of the query
                objects[inst_keys[k]] = (np.asarray(instances.masks[k], bool), int(instances.class_id[k]),
                                         float(instances.score[k]), True, int(instances.query[k]))
        for k, key in enumerate(seg_keys):
            if key not in objects:
                thing = bool(segments.isthing[k])
                objects[key] = (panoptic == int(segments.id[k]), int(segments.class_id[k]), float(segments.score[k]),
                                thing, int(segments.query[k]) if thing else -1)
        keys = list(objects)
        masks, classes, scores, things, queries = (list(col) for col in zip(*objects.values())) if keys else (
            [], [], [], [], [])
        emb = None
        if embeddings is not None and self.config.use_embeddings and keys:
            bank = np.asarray(embeddings, dtype=np.float32)
            if all(q >= 0 for q, t in zip(queries, things) if t):
                emb = np.stack([bank[q] if q >= 0 else np.zeros(bank.shape[1], np.float32) for q in queries])
        ids = tracker.update(frame, np.stack(masks) if masks else np.zeros((0, h, w), bool),
                             np.asarray(classes, np.int64), np.asarray(scores, np.float64), emb,
                             np.asarray(things, bool))
        track_of = dict(zip(keys, ids.tolist()))

        new_instances = instances
        if inst_keys:
            new_instances = _with_ids(instances, np.asarray([track_of[key] for key in inst_keys], np.int64))
        new_panoptic, new_segments = seg.panoptic, seg.segments
        if seg_keys:
            seg_ids = np.asarray([track_of[key] for key in seg_keys], np.int64)
            order = np.argsort(segments.id, kind="stable")  # relabel the map in one pass: old id -> track id
            old_sorted = segments.id[order]
            pos = np.minimum(np.searchsorted(old_sorted, panoptic), len(old_sorted) - 1)
            new_panoptic = np.where(old_sorted[pos] == panoptic, seg_ids[order][pos], 0).astype(panoptic.dtype)
            new_segments = _with_ids(segments, seg_ids)[np.argsort(seg_ids, kind="stable")]
        return Segmentation(seg.image_size, semantic=seg.semantic, panoptic=new_panoptic, segments=new_segments,
                            instances=new_instances, vocab=seg.vocab)


def _with_ids(table: Segments, ids: np.ndarray) -> Segments:
    """``table`` with its ``id`` column replaced."""
    return Segments(ids, table.class_id, table.score, table.isthing, table.area, table.bbox, table.query,
                    table.masks, table.class_names)
