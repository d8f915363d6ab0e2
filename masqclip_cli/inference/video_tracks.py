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

State: after each frame the tracker's state goes to ``<out>/.masqclip/tracks/<sequence>/<frame>.json`` (atomically,
before the frame's record), and the state two frames back is removed, so disk use stays flat. On resume a sequence
restarts from the latest frame whose state and record both exist, with all frames before it finished; later frames
are computed again.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from masqclip_cli.inference.tracking import Tracker, TrackerConfig
from masqclip_cli.io.files import atomic_write_text, output_path
from masqclip_cli.io.sources import SourceItem
from masqclip_cli.structures import Segmentation, Segments

__all__ = ["TRACKS_DIR", "SequenceTracking", "TrackingOptions", "sequence_name"]

#: Under the run's state folder: one folder of tracker states per sequence.
TRACKS_DIR = "tracks"


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
    """The trackers of a run's sequences and their states on disk (``out_dir`` None: in memory only)."""

    def __init__(self, out_dir: Path | None, config: TrackerConfig) -> None:
        self.out_dir = out_dir
        self.config = config
        self.trackers: dict[str, Tracker] = {}

    # --- state on disk ----------------------------------------------------------------------------------------
    def _state_path(self, sequence: str, frame: int) -> Path:
        assert self.out_dir is not None
        return output_path(self.out_dir / ".masqclip", TRACKS_DIR, sequence, "") / f"{frame:08d}.json"

    def saved_frames(self, sequence: str) -> list[int]:
        """Frames of ``sequence`` whose tracker state is on disk, ascending."""
        if self.out_dir is None:
            return []
        folder = self._state_path(sequence, 0).parent
        frames = []
        for path in folder.glob("*.json") if folder.is_dir() else ():
            if path.stem.isdigit():
                frames.append(int(path.stem))
        return sorted(frames)

    def restore(self, sequence: str, frame: int) -> None:
        """Load the tracker of ``sequence`` as it was after ``frame``."""
        state = json.loads(self._state_path(sequence, frame).read_text())
        self.trackers[sequence] = Tracker.from_state(state)

    def resume_point(self, sequence: str, finished: Sequence[bool]) -> int:
        """How many leading frames of ``sequence`` are finished and can be kept: the latest frame ``f`` whose state
        is on disk and whose record exists with every frame before it finished gives ``f + 1`` (its tracker is
        restored); 0 when none (the sequence starts over)."""
        prefix = 0
        while prefix < len(finished) and finished[prefix]:
            prefix += 1
        for frame in reversed(self.saved_frames(sequence)):
            if frame < prefix:
                self.restore(sequence, frame)
                return frame + 1
        return 0

    def save(self, sequence: str, frame: int) -> None:
        """Write the state after ``frame`` (before the frame's record), then drop the one two frames back."""
        if self.out_dir is None:
            return
        path = self._state_path(sequence, frame)
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(path, json.dumps(self.trackers[sequence].state_dict(), sort_keys=True,
                                           separators=(",", ":")) + "\n")
        for old in self.saved_frames(sequence):
            if old < frame - 1:
                self._state_path(sequence, old).unlink(missing_ok=True)

    def track_classes(self) -> dict[str, dict[int, int]]:
        """Per sequence, each thing track's class decided over its frames (and each stuff id's class)."""
        out: dict[str, dict[int, int]] = {}
        for sequence, tracker in sorted(self.trackers.items()):
            classes = tracker.track_categories()
            classes.update({sid: cls for cls, sid in tracker.stuff_ids.items()})
            out[sequence] = dict(sorted(classes.items()))
        return out

    def load_final_states(self, sequences: Sequence[str]) -> None:
        """Restore, for sequences this run did not touch (all reused), the tracker after their last saved frame."""
        for sequence in sequences:
            if sequence not in self.trackers:
                frames = self.saved_frames(sequence)
                if frames:
                    self.restore(sequence, frames[-1])

    # --- one frame --------------------------------------------------------------------------------------------
    def assign(self, sequence: str, frame: int, seg: Segmentation, embeddings: np.ndarray | None) -> Segmentation:
        """``seg`` with track ids (see the module docstring); ``embeddings`` (Q, D) of the frame's queries."""
        tracker = self.trackers.setdefault(sequence, Tracker(self.config))
        h, w = (int(v) for v in seg.image_size)
        instances = seg.instances
        segments = seg.segments
        # one row per object: key = query (or ("row", k) for a row without one)
        keys: list[object] = []
        masks: list[np.ndarray] = []
        classes: list[int] = []
        scores: list[float] = []
        things: list[bool] = []
        queries: list[int] = []
        seen: dict[object, int] = {}
        if instances is not None and len(instances):
            order = np.argsort(-instances.score, kind="stable")
            for k in order.tolist():
                q = int(instances.query[k])
                key: object = q if q >= 0 else ("instance", k)
                if key in seen:
                    continue
                seen[key] = len(keys)
                keys.append(key)
                masks.append(np.asarray(instances.masks[k], bool))
                classes.append(int(instances.class_id[k]))
                scores.append(float(instances.score[k]))
                things.append(True)
                queries.append(q)
        panoptic = seg.panoptic
        if panoptic is not None and len(segments):
            for k in range(len(segments)):
                q = int(segments.query[k])
                is_thing = bool(segments.isthing[k])
                key = q if (is_thing and q >= 0) else ("segment", k)
                if key in seen:
                    continue
                seen[key] = len(keys)
                keys.append(key)
                masks.append(panoptic == int(segments.id[k]))
                classes.append(int(segments.class_id[k]))
                scores.append(float(segments.score[k]))
                things.append(is_thing)
                queries.append(q if is_thing else -1)
        mask_stack = np.stack(masks) if masks else np.zeros((0, h, w), bool)
        emb = None
        if embeddings is not None and self.config.use_embeddings and keys:
            bank = np.asarray(embeddings, dtype=np.float32)
            if all(q >= 0 for q, t in zip(queries, things) if t):
                emb = np.stack([bank[q] if q >= 0 else np.zeros(bank.shape[1], np.float32) for q in queries])
        ids = tracker.update(frame, mask_stack, np.asarray(classes, np.int64), np.asarray(scores, np.float64),
                             emb, np.asarray(things, bool))
        track_of = {key: int(i) for key, i in zip(keys, ids.tolist())}

        new_instances = instances
        if instances is not None and len(instances):
            inst_ids = [track_of[q if q >= 0 else ("instance", k)] for k, q in enumerate(instances.query.tolist())]
            new_instances = _with_ids(instances, np.asarray(inst_ids, np.int64))
        new_panoptic, new_segments = panoptic, segments
        if panoptic is not None and len(segments):
            seg_ids = np.asarray([track_of[int(segments.query[k]) if (segments.isthing[k] and segments.query[k] >= 0)
                                           else ("segment", k)] for k in range(len(segments))], np.int64)
            new_panoptic = np.zeros_like(panoptic)
            for old, new in zip(segments.id.tolist(), seg_ids.tolist()):
                new_panoptic[panoptic == old] = new
            relabelled = _with_ids(segments, seg_ids)
            new_segments = relabelled[np.argsort(seg_ids, kind="stable")]
        return Segmentation(seg.image_size, semantic=seg.semantic, panoptic=new_panoptic, segments=new_segments,
                            instances=new_instances, vocab=seg.vocab)


def _with_ids(table: Segments, ids: np.ndarray) -> Segments:
    """``table`` with its ``id`` column replaced."""
    return Segments(ids, table.class_id, table.score, table.isthing, table.area, table.bbox, table.query,
                    table.masks, table.class_names)
