"""``vis``: the tracked objects of every video in one YouTube-VIS JSON, ``out/vis.json``.

A video is a tracked sequence (``ItemInfo.sequence``, e.g. ``"clip.mp4"``): its frames are its items in frame order
(``ItemInfo.frame``, which the engine numbers 0, 1, ...; frame k of the video is its k-th item in that order, two
items with the same frame are refused). An item that is not part of a tracked sequence (``sequence`` None: a run
without tracking, or a plain image) is written as **a one-frame video of its own**, named after its item id.

The JSON, top-level keys in this order:

* ``info``: ``{"description": "masqclip pre-annotations", "version": <masqclip version>, "contributor":
  "masqclip"}`` (no date, so the file stays a pure function of the inputs); ``licenses``: ``[]``;
* ``videos``: ``id`` (the 1-based rank of the video's name among the run's video names, sorted; a video none of whose
  items has a record is left out and keeps its rank), ``file_names`` (its frames' ``ItemInfo.file_name``, in frame
  order: the item ids, ``clip.mp4#000000``, ...), ``width``, ``height`` (every frame of a video has the same size, else
  ValueError) and ``length`` (the number of frames);
* ``categories``: the vocabulary, as in the COCO files (``id``, ``name``, ``supercategory``, ``isthing``);
* ``annotations``: one per thing track of a video, ordered by video id then track id: ``id`` (1, 2, ... over the
  file), ``video_id``, ``category_id`` (the category id of the track's class as decided over the whole video,
  :attr:`~masqclip_cli.io.writers.base.Writer.track_classes`; for a track it does not list, and for one-frame
  videos, the most common per-frame class of the track, ties to the smallest class index), ``segmentations`` (a list
  of ``length`` entries: the frame's mask as a compressed COCO RLE ``{"size": [H, W], "counts": str}``, or None
  where the track is absent), ``areas`` (pixel counts, None where absent), ``bboxes`` (integer ``[x, y, w, h]``, None
  where absent), ``score`` (**the mean of the track's per-frame scores over the frames where it is present**),
  ``iscrowd`` 0, ``height``, ``width`` and ``length`` 1 (as in the YouTube-VIS ground-truth files).

The tracks are the instances when the run has them (task ``instance``; in a tracked frame ``instances.id`` is the
track id), else the thing segments of the panoptic map (task ``panoptic``; ``segments.id`` is the track id, stuff
segments are left out). Several instance rows of one track in one frame (the same query kept under several classes)
give one mask: the best-scoring row's (its score and class are the frame's). Rows with an empty mask are left out: the
track is absent from that frame. Instance masks of different tracks may overlap (YouTube-VIS allows it; the ``mots``
writer does not).

The keys are those of the YouTube-VIS 2019/2021 ground-truth files (plus ``score``), and each ``annotations`` entry
also carries what a YouTube-VIS results entry has (``video_id``, ``category_id``, ``segmentations``, ``score``); every
segmentation decodes with pycocotools (``pycocotools.mask.decode``). Nothing is written per item: an item's record
holds its tracks (id, class index, score, area, box and RLE counts; an item whose record is None is a frame without
objects), and :meth:`finalize` groups them by video, holding the run's RLE strings in memory (about the size of the
JSON). The JSON is byte-deterministic and written atomically.
"""

from __future__ import annotations

import itertools
import math
from collections import Counter
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from masqclip_cli import __version__
from masqclip_cli.io.files import atomic_write_json_stream
from masqclip_cli.structures import Segmentation
from masqclip_cli.structures.masks import encode_rle, mask_stats, round_score, segment_stats

from .base import ItemInfo, Writer, check_size, ranked_records

__all__ = ["FrameTrack", "VisWriter", "decided_category", "decided_classes", "frame_tracks", "group_sequences"]

#: The ``info`` object of the file (no date: the output is a pure function of the inputs).
INFO = {"description": "masqclip pre-annotations", "version": __version__, "contributor": "masqclip"}


@dataclass(frozen=True)
class FrameTrack:
    """One track in one frame.

    Attributes:
        track_id: the track id (>= 1; in an untracked item, the instance's or segment's id).
        category: contiguous class index (0..N-1) of the frame's row (not the class decided over the video).
        score: the row's score.
        mask: (H, W) bool, at least one pixel.
    """

    track_id: int
    category: int
    score: float
    mask: np.ndarray


def frame_tracks(
    item: ItemInfo, seg: Segmentation, sources: Sequence[str], writer: str
) -> tuple[str, list[FrameTrack]]:
    """The thing tracks of one frame, from the first of ``sources`` (``"instance"``, ``"panoptic"``) that ``seg``
    has: ``(source used, tracks sorted by track id)``, one per track id, each with a non-empty mask.

    ``"instance"``: every instance row; rows sharing an id are one track, whose mask, score and class are its
    best-scoring row's (ties: the first row); rows with an empty mask are skipped. ``"panoptic"``: the thing segments
    of ``seg.segments`` with their pixels on the panoptic map (stuff left out; ids are distinct by construction).
    Track ids must be positive integers. ValueError names the item and ``writer``."""
    size = check_size(item, seg)
    for source in sources:
        if source == "instance" and seg.instances is not None:
            try:
                rows = seg.instance_masks()
            except ValueError as exc:
                raise ValueError(f"{writer}: item {item.id!r}: {exc}") from None
            best: dict[int, FrameTrack] = {}
            for inst, mask in rows:
                track_id = _track_id(inst.id, item, writer)
                if not mask.any():
                    continue
                current = best.get(track_id)
                if current is None or float(inst.score) > current.score:
                    best[track_id] = FrameTrack(track_id, int(inst.category), float(inst.score), mask)
            return source, [best[t] for t in sorted(best)]
        if source == "panoptic" and seg.panoptic is not None:
            pan = np.asarray(seg.panoptic)
            if pan.shape != size:
                raise ValueError(f"{writer}: item {item.id!r}: panoptic map is {pan.shape}, the image {size}")
            things = sorted((s for s in seg.segments if s.isthing), key=lambda s: int(s.id))
            ids = [_track_id(s.id, item, writer) for s in things]
            try:
                cleaned, areas, bboxes = segment_stats(pan, ids)
            except ValueError as exc:
                raise ValueError(f"{writer}: item {item.id!r}: {exc}") from None
            tracks = []
            for s, track_id, area, (x, y, w, h) in zip(things, ids, areas, bboxes):
                if area:
                    mask = np.zeros(size, dtype=bool)
                    mask[y : y + h, x : x + w] = cleaned[y : y + h, x : x + w] == track_id
                    tracks.append(FrameTrack(track_id, int(s.category), float(s.score), mask))
            return source, tracks
    wanted = " or ".join(sources)
    raise ValueError(f"item {item.id!r}: the {writer} writer needs {wanted} results (task {wanted})")


def _track_id(value: Any, item: ItemInfo, writer: str) -> int:
    track_id = int(value)
    if track_id < 1:
        raise ValueError(f"{writer}: item {item.id!r}: track ids must be positive integers, got {track_id}")
    return track_id


def group_sequences(
    records: Iterable[tuple[ItemInfo, dict | None]], writer: str
) -> list[tuple[str, bool, list[tuple[ItemInfo, dict | None]]]]:
    """The run's videos, sorted by name: ``(name, tracked, frames)`` with ``frames`` the video's ``(item, record)``
    pairs in frame order. A tracked sequence's name is ``ItemInfo.sequence``; an item outside any sequence is a
    one-frame video named after its id (``tracked`` False).

    ValueError: a sequence frame without ``ItemInfo.frame``, two items at one frame of a sequence, frames of
    different sizes, or a one-frame video named like a tracked sequence."""
    groups: dict[str, list[tuple[ItemInfo, dict | None]]] = {}
    tracked_by_name: dict[str, bool] = {}
    for _, item, record in ranked_records(records):
        tracked = item.sequence is not None
        name = str(item.sequence) if tracked else item.id
        if tracked_by_name.setdefault(name, tracked) != tracked:
            raise ValueError(f"{writer}: item {name!r} has the name of a tracked sequence; rename one of them")
        if tracked and item.frame is None:
            raise ValueError(f"{writer}: item {item.id!r} of sequence {name!r} has no frame index")
        groups.setdefault(name, []).append((item, record))
    out = []
    for name in sorted(groups):
        frames = groups[name]
        if tracked_by_name[name]:
            frames.sort(key=lambda pair: int(pair[0].frame))  # type: ignore[arg-type] - checked above
            for (a, _), (b, _) in zip(frames, frames[1:]):
                if int(a.frame) == int(b.frame):  # type: ignore[arg-type]
                    raise ValueError(f"{writer}: items {a.id!r} and {b.id!r} are both frame {a.frame} of {name!r}")
        sizes = sorted({(int(item.height), int(item.width)) for item, _ in frames})
        if len(sizes) > 1:
            raise ValueError(f"{writer}: the frames of sequence {name!r} have different sizes {sizes} (H, W)")
        out.append((name, tracked_by_name[name], frames))
    return out


def decided_category(decided: Mapping[int, int], track_id: int, frame_categories: Iterable[int]) -> int:
    """A track's class index: ``decided[track_id]`` (the engine's decision over the whole sequence) when given, else
    the most common of its per-frame classes (ties: the smallest class index)."""
    if track_id in decided:
        return int(decided[track_id])
    counts = Counter(int(c) for c in frame_categories)
    if not counts:
        raise ValueError(f"track {track_id} has no frames")
    return min(counts, key=lambda c: (-counts[c], c))


def decided_classes(writer: Writer, name: str, tracked: bool) -> dict[int, int]:
    """``writer.track_classes[name]`` with int keys and values (they may come back from JSON as strings); ``{}`` for
    a one-frame video of an untracked item (``tracked`` False) or a sequence it does not list."""
    if not tracked:
        return {}
    given = writer.track_classes.get(name) or {}
    try:
        return {int(k): int(v) for k, v in given.items()}
    except (TypeError, ValueError):
        raise ValueError(f"{writer.name}: track_classes[{name!r}] must map track ids to class indices") from None


def _mean_score(scores: Sequence[float]) -> float:
    return round_score(math.fsum(scores) / len(scores))


class VisWriter(Writer):
    """YouTube-VIS JSON (see the module docstring): ``out/vis.json`` with ``videos`` (id = 1-based rank of the
    video name), ``categories`` and one annotation per thing track (per-frame RLE / area / box lists with None where
    the track is absent, the decided class, the mean score). No options.
    """

    name = "vis"
    any_of_tasks = ("instance", "panoptic")
    file_name = "vis.json"

    def json_path(self) -> Path:
        """Where :meth:`finalize` writes the JSON."""
        assert self.out_dir is not None
        return self.out_dir / self.file_name

    def write_item(self, item: ItemInfo, seg: Segmentation, image: np.ndarray | None = None) -> dict:
        """The record ``{"tracks": [{"id", "category", "score", "area", "bbox", "counts"}, ...]}``: the frame's
        tracks (:func:`frame_tracks`) by track id, ``counts`` the compressed RLE string of the mask."""
        _, tracks = frame_tracks(item, seg, self.any_of_tasks, self.name)
        rows = []
        for track in tracks:
            self._category(track.category)
            area, bbox = mask_stats(track.mask)
            rows.append(
                {
                    "id": track.track_id,
                    "category": track.category,
                    "score": float(track.score),
                    "area": area,
                    "bbox": bbox,
                    "counts": encode_rle(track.mask)["counts"],
                }
            )
        return {"tracks": rows}

    def finalize(self, records) -> list[Path]:
        assert self.out_dir is not None
        videos = [
            (video_id, name, tracked, frames)
            for video_id, (name, tracked, frames) in enumerate(group_sequences(records, self.name), start=1)
            if any(record is not None for _, record in frames)
        ]
        counter = itertools.count(1)

        def annotations() -> Iterator[dict[str, Any]]:
            for video_id, name, tracked, frames in videos:
                yield from self._video_annotations(video_id, name, tracked, frames, counter)

        data = {
            "info": dict(INFO),
            "licenses": [],
            "videos": [
                {
                    "id": video_id,
                    "file_names": [item.file_name for item, _ in frames],
                    "width": int(frames[0][0].width),
                    "height": int(frames[0][0].height),
                    "length": len(frames),
                }
                for video_id, _, _, frames in videos
            ],
            "categories": self._coco_categories(color=False),
            "annotations": annotations(),
        }
        return [atomic_write_json_stream(self.json_path(), data)]

    def _video_annotations(
        self,
        video_id: int,
        name: str,
        tracked: bool,
        frames: list[tuple[ItemInfo, dict | None]],
        counter: Iterator[int],
    ) -> Iterator[dict[str, Any]]:
        height, width, length = int(frames[0][0].height), int(frames[0][0].width), len(frames)
        by_track: dict[int, dict[int, dict[str, Any]]] = {}
        for position, (item, record) in enumerate(frames):
            if record is None:
                continue
            try:
                rows = record["tracks"]
                for row in rows:
                    track_id = int(row["id"])
                    if position in by_track.setdefault(track_id, {}):
                        raise ValueError(f"vis: item {item.id!r}: track {track_id} occurs twice in its record")
                    by_track[track_id][position] = row
            except (KeyError, TypeError):
                raise ValueError(f"vis: the record of item {item.id!r} is not a vis record") from None
        decided = decided_classes(self, name, tracked)
        for track_id in sorted(by_track):
            rows = by_track[track_id]
            category = self._category(decided_category(decided, track_id, (rows[p]["category"] for p in sorted(rows))))
            segmentations: list[dict[str, Any] | None] = [None] * length
            areas: list[int | None] = [None] * length
            bboxes: list[list[int] | None] = [None] * length
            for position in sorted(rows):
                row = rows[position]
                segmentations[position] = {"size": [height, width], "counts": str(row["counts"])}
                areas[position] = int(row["area"])
                bboxes[position] = [int(v) for v in row["bbox"]]
            yield {
                "id": next(counter),
                "video_id": video_id,
                "category_id": self.category_ids[category],
                "segmentations": segmentations,
                "areas": areas,
                "bboxes": bboxes,
                "score": _mean_score([float(rows[p]["score"]) for p in sorted(rows)]),
                "iscrowd": 0,
                "height": height,
                "width": width,
                "length": 1,
            }
