"""``mots``: one MOTS Challenge text file per video, ``out/mots/<sequence>.txt``.

A video is a tracked sequence (``ItemInfo.sequence``); its frames are its items in frame order, as for the ``vis``
writer (:func:`~masqclip_cli.io.writers.vis.group_sequences`). An item outside any tracked sequence is written as
**a one-frame video of its own**, named after its item id. The file name is the sequence name with ``.txt`` appended
(``clip.mp4`` -> ``out/mots/clip.mp4.txt``; nested names keep their folders, ``sub/clip.mp4`` ->
``out/mots/sub/clip.mp4.txt``, and ``..`` / absolute parts are neutralised as in
:func:`~masqclip_cli.io.files.output_path`); two sequences that would share a file are refused. A video none of
whose items has a record gets no file; one with no object is an empty file (a tracker that found nothing).

One line per object per frame, space-separated, frames in order and objects by track id within a frame::

    frame track_id class_id height width rle

* ``frame``: 1-based (the video's first frame is 1), as TrackEval's ``MOTSChallenge`` dataset reads its time keys
  (``str(t + 1)``) and as :func:`masqclip_cli.evaluation.tracking.read_mots` reads by default (``first_frame=1``);
* ``track_id``: the engine's track id as is (>= 1, unique within the sequence whatever the class, the same object
  keeping it across frames). **Not** the ``class_id * 1000 + instance`` numbering of the MOTS Challenge ground truth:
  TrackEval and :mod:`masqclip_cli.evaluation.tracking` read the class from the third column and relabel ids, so
  that convention buys nothing and would cap tracks at 999 per class;
* ``class_id``: the category id of the track's class decided over the whole video
  (:attr:`~masqclip_cli.io.writers.base.Writer.track_classes`; for a track it does not list, and in one-frame
  videos, the most common per-frame class, ties to the smallest class index) -- the same on every line of a track.
  These are the vocabulary's category ids: TrackEval's own ``MOTSChallenge`` class scores only class 2
  ("pedestrian") and reads class 10 of a *ground-truth* file as ignore regions, so a vocabulary where 10 is a real
  class must not be fed to it raw; :func:`masqclip_cli.evaluation.tracking.evaluate_tracking` maps arbitrary classes
  onto TrackEval's (class-agnostic or per class) and has no ignore class unless asked;
* ``height width``: the frame size; ``rle``: the mask's COCO compressed RLE string (column-major, as pycocotools
  writes it).

MOTS masks must not overlap within a frame. The objects are the **thing segments of the panoptic map** when the run
has one (task ``panoptic``, preferred: non-overlapping by construction; stuff segments are left out), else the
instances (task ``instance``; one per track, the best-scoring row of rows sharing a track id) with overlaps resolved
by descending score: a pixel claimed by several tracks goes to the best-scoring one (ties: the smaller track id), and
**a track left with no pixel in that frame is dropped from the frame**. Empty masks are never written.

No ``seqmap`` or ``seqinfo.ini`` is written: ``out/mots/`` is laid out as a TrackEval tracker's ``data`` folder
(``<seq>.txt``), which needs neither; the ground-truth side (``gt/<split>/<seq>/gt/gt.txt``, ``seqinfo.ini``,
``seqmaps/``) is laid out by :func:`~masqclip_cli.evaluation.tracking.evaluate_tracking`. The files are read by
TrackEval's ``MOTSChallenge`` dataset (as tracker output and as ground truth) and by
:func:`~masqclip_cli.evaluation.tracking.read_mots`. (CVAT imports MOTS as "MOTS PNG 1.0", instance PNGs, not this
text format.) An item's record holds its objects after overlap resolution (track id, class index, RLE
counts); each file is byte-deterministic and written atomically.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from masqclip_cli.io.files import atomic_write_chunks, output_path
from masqclip_cli.structures import Segmentation
from masqclip_cli.structures.masks import claim_pixels, encode_rle

from .base import ItemInfo, Writer

__all__ = ["MotsWriter", "mots_line"]


def mots_line(frame: int, track_id: int, class_id: int, height: int, width: int, counts: str) -> str:
    """One MOTS txt line (with its newline): ``frame`` is the 1-based frame number written as is."""
    return f"{int(frame)} {int(track_id)} {int(class_id)} {int(height)} {int(width)} {counts}\n"


class MotsWriter(Writer):
    """MOTS Challenge txt (see the module docstring): ``out/mots/<sequence>.txt``, lines ``frame track_id class_id
    height width rle`` with 1-based frames, the engine's track ids, the decided class's category id and
    non-overlapping masks (panoptic thing segments, else instances resolved by descending score). No options.
    """

    name = "mots"
    any_of_tasks = ("panoptic", "instance")
    kind = "mots"

    def sequence_path(self, sequence: str) -> Path:
        """``out/mots/<sequence>.txt`` (see :func:`~masqclip_cli.io.files.output_path`)."""
        assert self.out_dir is not None
        return output_path(self.out_dir, self.kind, sequence, ".txt")

    def write_item(self, item: ItemInfo, seg: Segmentation, image: np.ndarray | None = None) -> dict:
        """The record ``{"objects": [{"id", "category", "counts"}, ...]}``: the frame's non-overlapping objects by
        track id (class index of the frame's row, compressed RLE counts of the mask left after overlap resolution)."""
        from .vis import frame_tracks  # here, not at the top: importing a format module registers its writer

        source, tracks = frame_tracks(item, seg, self.any_of_tasks, self.name)
        for track in tracks:
            self._category(track.category)
        if source == "instance":  # instances may overlap: the best-scoring track takes a contested pixel
            ranked = sorted(tracks, key=lambda t: (-t.score, t.track_id))
            kept = [(t.track_id, t.category, mask) for t, mask in zip(ranked, claim_pixels(t.mask for t in ranked))
                    if mask.any()]
        else:
            kept = [(t.track_id, t.category, t.mask) for t in tracks]
        kept.sort(key=lambda obj: obj[0])
        return {"objects": [{"id": tid, "category": cat, "counts": encode_rle(mask)["counts"]}
                            for tid, cat, mask in kept]}

    def finalize(self, records) -> list[Path]:
        from .vis import decided_category, decided_classes, group_sequences  # see write_item

        assert self.out_dir is not None
        written: list[Path] = []
        owners: dict[Path, str] = {}
        for name, tracked, frames in group_sequences(records, self.name):
            if all(record is None for _, record in frames):
                continue
            path = self.sequence_path(name)
            other = owners.setdefault(path, name)
            if other != name:
                raise ValueError(f"mots: sequences {other!r} and {name!r} would both be written to {path}; rename one")
            objects = self._frame_objects(frames)
            classes: dict[int, list[int]] = {}
            for _, rows in objects:
                for track_id, category, _ in rows:
                    classes.setdefault(track_id, []).append(category)
            decided = decided_classes(self, name, tracked)
            class_ids = {
                track_id: self.category_ids[self._category(decided_category(decided, track_id, cats))]
                for track_id, cats in classes.items()
            }
            height, width = int(frames[0][0].height), int(frames[0][0].width)

            def lines(objects=objects, class_ids=class_ids, height=height, width=width) -> Iterator[str]:
                for position, rows in objects:
                    yield "".join(
                        mots_line(position + 1, track_id, class_ids[track_id], height, width, counts)
                        for track_id, _, counts in rows
                    )

            written.append(atomic_write_chunks(path, lines()))
        return written

    @staticmethod
    def _frame_objects(frames: list[tuple[ItemInfo, dict | None]]) -> list[tuple[int, list[tuple[int, int, str]]]]:
        """Per frame with a record, ``(position, [(track id, class index, counts), ...] by track id)``."""
        out: list[tuple[int, list[tuple[int, int, str]]]] = []
        for position, (item, record) in enumerate(frames):
            if record is None:
                continue
            try:
                rows: list[Any] = record["objects"]
                parsed = sorted((int(r["id"]), int(r["category"]), str(r["counts"])) for r in rows)
            except (KeyError, TypeError, ValueError):
                raise ValueError(f"mots: the record of item {item.id!r} is not a mots record") from None
            ids = [tid for tid, _, _ in parsed]
            if len(set(ids)) != len(ids):
                raise ValueError(f"mots: item {item.id!r}: a track occurs twice in its record")
            out.append((position, parsed))
        return out
