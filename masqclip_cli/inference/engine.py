"""The batched segmentation pipeline behind ``masqclip segment``.

source items ──(background thread: decode, EXIF, RGB, resize)──► bounded queue ──► batches ──► model (one pass
serves every task) ──► post-processing at the original size ──► writers (per-item files + a per-item record)
──► at the end: run-level files assembled from all records, sorted by item id.

``--out`` is a pure function of the inputs and options: no timestamps, durations or temporary paths are written into
it. Its layout:

- ``<out>/.masqclip/run.json``: the run fingerprint (model, vocabulary, options that change outputs);
- ``<out>/.masqclip/items/<item id>.json``: one record per finished item (what the run-level files are made of);
- ``<out>/.masqclip/results/<item id>.json``: the item's whole result before the pre-annotation controls (lossless),
  what ``masqclip export`` writes other formats from;
- the writers' own files (``instances.json``, ``panoptic/``, ``labels/``, ``overlay/``, ...).

The pieces every engine shares (the local one here, ``inference.ray_engine`` for a Ray cluster): :func:`run_locked`
(the folder's lock), :func:`open_run` (stale temporary files, fingerprint), :func:`plan_run` (listing, shard, resume),
:func:`decode_for_model`, ``_run_batch`` (model, post-processing, each item's files and record), :func:`assemble_run`
(run-level files from the stored records, the complete marker). An engine is not part of the fingerprint: runs of
either engine over one ``--out`` resume each other.

Resume: an item whose record and files all exist is not computed again; a run over a complete ``--out`` rewrites
nothing. A different fingerprint is refused unless ``overwrite``. Sharding: item ``i`` of a run belongs to shard
``int(sha1(id)[:8], 16) % n`` — stable whatever the listing order, so shards are disjoint and cover everything.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import queue
import shutil
import signal
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from masqclip_cli.inference.label_map import LabelMap
from masqclip_cli.inference.postprocess import PostprocessConfig
from masqclip_cli.inference.preannotation import Preannotation
from masqclip_cli.inference.predictor import Predictor
from masqclip_cli.inference.preprocess import prepare_image
from masqclip_cli.inference.tracking import TrackerConfig
from masqclip_cli.inference.video_tracks import SequenceTracking, TrackingOptions, sequence_name
from masqclip_cli.io.files import STATE_DIR, atomic_write_text, dumps_json, remove_stale_temp_files
from masqclip_cli.io.run_lock import RunLock
from masqclip_cli.io.sources import (
    DEFAULT_MAX_PIXELS,
    SkipItem,
    SkippedItem,
    SourceItem,
    decode_item,
    iter_items,
    iter_video_frames,
    spec_kind,
)
from masqclip_cli.io.writers import make_writers
from masqclip_cli.io.writers.base import ItemInfo, Writer
from masqclip_cli.modeling.masqclip import MasQCLIP
from masqclip_cli.structures import Segmentation
from masqclip_cli.structures.segmentation import segmentation_from_record, segmentation_to_record
from masqclip_cli.vocab import Vocabulary

__all__ = [
    "FingerprintMismatchError",
    "RunOptions",
    "RunPlan",
    "RunSummary",
    "assemble_run",
    "decode_for_model",
    "mark_incomplete",
    "open_run",
    "plan_run",
    "run_locked",
    "in_shard",
    "resolve_shard",
    "merge_outputs",
    "run_fingerprint",
    "segment",
    "writer_view",
]

#: Written at the end of a run that finished (not interrupted, no I/O failure): what `merge` checks a shard by.
COMPLETE_FILE = "complete.json"


class FingerprintMismatchError(RuntimeError):
    """The output folder holds the outputs of a run with another model, vocabulary or options."""


@dataclass(frozen=True)
class RunOptions:
    """Options of a ``segment`` run (those in :meth:`fingerprint_fields` change the outputs)."""

    formats: tuple[str, ...] = ("coco",)
    postprocess: PostprocessConfig = field(default_factory=PostprocessConfig)
    batch_size: int = 1
    short_side: int = 640
    max_size: int = 2560
    shard: tuple[int, int] = (0, 1)
    overwrite: bool = False
    recursive: bool = False
    extensions: tuple[str, ...] | None = None
    every: int = 1
    start: float | None = None
    end: float | None = None
    prefetch: int = 4
    writer_options: dict[str, Any] = field(default_factory=dict)
    preannotation: Preannotation = field(default_factory=Preannotation)
    label_map: LabelMap | None = None
    tracking: TrackingOptions = field(default_factory=TrackingOptions)
    #: Pixel budget: images larger than this (width x height) are skipped from their header (None: no budget).
    max_pixels: int | None = DEFAULT_MAX_PIXELS
    #: Decoding threads (None: min(4, CPU count)); items reach the model in listing order whatever the number, so
    #: outputs do not depend on it (video frames are read in order by one of them). Not in the fingerprint.
    workers: int | None = None
    #: ``torch.compile`` the model's forwards: applied to the model by whoever loads it
    #: (:func:`~masqclip_cli.modeling.runtime.compile_model`; the CLI does for ``--compile``), falling back to eager
    #: with a warning. Not in the fingerprint (outputs equal eager within float rounding).
    compile: bool = False

    def tracks(self, source: str) -> bool:
        """Whether a run over ``source`` tracks: ``--sequence``, ``--track``, or (by default) a video source."""
        t = self.tracking
        return t.sequence or t.track is True or (t.track is None and spec_kind(source) == "video")

    def writer_vocabulary(self, vocab: Vocabulary) -> Vocabulary:
        """The vocabulary the writers see: ``vocab`` mapped by the label map, if any."""
        return vocab if self.label_map is None else self.label_map.mapped_vocabulary(vocab).vocab

    def fingerprint_fields(self) -> dict[str, Any]:
        fields = {
            "formats": sorted(self.formats),
            "postprocess": asdict(self.postprocess) | {"chunk_size": None, "max_chunk_bytes": None},
            "short_side": self.short_side,
            "max_size": self.max_size,
            "shard": list(self.shard),
            "writer_options": {k: v for k, v in sorted(self.writer_options.items()) if k != "stream"},
        }
        if self.preannotation != Preannotation():  # only when set: earlier runs keep their fingerprints
            fields["preannotation"] = self.preannotation.to_json()
        if self.label_map is not None:  # likewise
            fields["label_map"] = self.label_map.to_json()
        return fields


@dataclass
class RunSummary:
    """What a run did (reported on stderr by the CLI)."""

    done: int = 0
    reused: int = 0
    skipped: list[tuple[str, str]] = field(default_factory=list)
    failed: list[tuple[str, str]] = field(default_factory=list)
    interrupted: bool = False
    wall_s: float = 0.0
    seconds: dict[str, float] = field(default_factory=lambda: {"decode": 0.0, "model": 0.0, "postprocess": 0.0,
                                                               "write": 0.0})
    written: list[Path] = field(default_factory=list)
    #: The I/O failure that stopped the run (no space, read-only, no permission), as one line; None when none.
    fatal: str | None = None
    #: Formats whose run-level files could not be assembled (an I/O failure or Ctrl-C during assembly).
    unassembled: list[str] = field(default_factory=list)

    @property
    def items_per_s(self) -> float:
        return self.done / self.wall_s if self.wall_s > 0 else 0.0

    @property
    def exit_code(self) -> int:
        if self.interrupted:
            return 130
        if self.fatal is not None:
            return 1 if self.done else 2
        return 1 if (self.failed or self.skipped) else 0


#: errno values that stop a run: no item can be written after them (no space, quota, read-only, no permission).
FATAL_IO_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM})


def io_failure(exc: OSError) -> str:
    """One line for an I/O failure: the path and the cause."""
    where = exc.filename if exc.filename is not None else "the output folder"
    return f"cannot write {where}: {exc.strerror or exc}"


def resolve_shard(spec: str | None, environ: dict[str, str] | None = None) -> tuple[int, int]:
    """``(index, count)`` of a shard spec ``"i/n"`` (``0 <= i < n``); None: under torchrun (``RANK`` /
    ``WORLD_SIZE`` > 1 in ``environ``, default ``os.environ``) one shard per process, else ``(0, 1)``. ValueError
    for a malformed spec."""
    if spec is None:
        env = os.environ if environ is None else environ
        rank, world = env.get("RANK"), env.get("WORLD_SIZE")
        if rank is not None and world is not None and int(world) > 1:
            return int(rank), int(world)
        return 0, 1
    try:
        index, count = (int(x) for x in spec.split("/"))
    except ValueError:
        raise ValueError(f"expected i/n (e.g. 0/4), got '{spec}'") from None
    if count < 1:
        raise ValueError(f"expected i/n with n >= 1 shards, got '{spec}'")
    if not 0 <= index < count:
        raise ValueError(f"index {index} is not in 0..{count - 1} (expected i/n with 0 <= i < n)")
    return index, count


def in_shard(item_id: str, shard: tuple[int, int]) -> bool:
    """Whether an item belongs to shard ``(index, count)`` (stable hash of its id)."""
    index, count = shard
    return count <= 1 or int(hashlib.sha1(item_id.encode()).hexdigest()[:8], 16) % count == index


def run_fingerprint(model_id: str, vocab: Vocabulary, templates: list[str] | None, options: RunOptions,
                    use_object_score: bool, precision: str, tracks: bool = False) -> dict[str, Any]:
    """Everything that changes what a run writes (JSON); ``tracks``: the run tracks sequences."""
    fingerprint = {
        "model": model_id,
        "vocabulary": vocab.to_json(),
        "templates": templates,
        "object_score": use_object_score,
        "precision": precision,
        **options.fingerprint_fields(),
    }
    if tracks:  # only when tracking: runs over images keep their fingerprints
        fingerprint["tracking"] = options.tracking.to_json()
    return fingerprint


def _state_path(out_dir: Path, kind: str, item_id: str) -> Path:
    safe = "/".join(p for p in item_id.replace("\\", "/").split("/") if p not in ("", ".", ".."))
    return out_dir / STATE_DIR / kind / f"{safe}.json"


def _record_path(out_dir: Path, item_id: str) -> Path:
    return _state_path(out_dir, "items", item_id)


def result_path(out_dir: Path, item_id: str) -> Path:
    """Where a run keeps an item's whole result (``.masqclip/results/<item id>.json``)."""
    return _state_path(out_dir, "results", item_id)


def write_result(out_dir: Path, item: SourceItem, seg: Segmentation) -> Path:
    """Keep an item's whole result (every task, before the pre-annotation controls) and its source, losslessly
    (:func:`~masqclip_cli.structures.segmentation.segmentation_to_record`), so that any format can be written from
    the run later without the model."""
    body = {"source": str(Path(item.path).resolve()), "frame": item.frame, **segmentation_to_record(seg)}
    return atomic_write_text(result_path(out_dir, item.id), dumps_json(body) + "\n")


def read_result(out_dir: Path, item_id: str, vocab: Vocabulary) -> tuple[Segmentation, str, int | None]:
    """``(result, source path, frame)`` of an item that a run kept (OSError / ValueError when it cannot)."""
    body = json.loads(result_path(out_dir, item_id).read_text())
    return segmentation_from_record(body, vocab), str(body["source"]), body.get("frame")


def _read_record(out_dir: Path, item_id: str) -> dict | None:
    path = _record_path(out_dir, item_id)
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return None


def _tracker_state(out_dir: Path | None, item_id: str) -> dict | None:
    """The tracker state a frame's record keeps (None without one)."""
    record = _read_record(out_dir, item_id) if out_dir is not None else None
    return None if record is None else record.get("tracker")


def _last_tracker_state(out_dir: Path | None, frame_ids: Sequence[str]) -> dict | None:
    """The tracker state of the last of ``frame_ids`` whose record keeps one (a failed last frame has none)."""
    for item_id in reversed(frame_ids):
        state = _tracker_state(out_dir, item_id)
        if state is not None:
            return state
    return None


def _item_info(record: dict) -> ItemInfo:
    return ItemInfo(id=record["id"], file_name=record["file_name"], width=record["width"], height=record["height"],
                    source=record.get("source"), sequence=record.get("sequence"), frame=record.get("frame"))


class _StoredRecords(Sequence):
    """One writer's ``(ItemInfo, record)`` of every item, in item-id order, read from the records on disk when
    iterated: run-level files are assembled with one item's record in memory at a time, so memory stays flat however
    many items a run has. ``sorted_by_id`` tells :func:`ranked_records` not to sort (and so not to load) them."""

    sorted_by_id = True

    def __init__(self, out_dir: Path, infos: Sequence[ItemInfo], writer_name: str) -> None:
        self.out_dir, self.infos, self.writer_name = out_dir, sorted(infos, key=lambda i: i.id), writer_name

    def __len__(self) -> int:
        return len(self.infos)

    def __getitem__(self, index):  # noqa: ANN001, ANN204 - int or slice, as Sequence
        if isinstance(index, slice):
            return [self[i] for i in range(*index.indices(len(self)))]
        info = self.infos[index]
        record = _read_record(self.out_dir, info.id)
        if record is None:
            raise RuntimeError(f"{_record_path(self.out_dir, info.id)}: item record missing or unreadable")
        return info, record["writers"].get(self.writer_name)


def _check_fingerprint(out_dir: Path, fingerprint: dict, overwrite: bool) -> None:
    run_file = out_dir / STATE_DIR / "run.json"
    text = json.dumps(fingerprint, indent=1) + "\n"
    if run_file.is_file():
        if run_file.read_text() == text:
            return
        if not overwrite:
            raise FingerprintMismatchError(
                f"{out_dir}: holds outputs of a run with another model, vocabulary or options "
                "(overwrite=True replaces them; or use another output folder)"
            )
        shutil.rmtree(out_dir / STATE_DIR / "items", ignore_errors=True)
        shutil.rmtree(out_dir / STATE_DIR / "results", ignore_errors=True)
    atomic_write_text(run_file, text)


def open_run(out_dir: Path, fingerprint: dict, overwrite: bool, read_only: bool = False) -> None:
    """Start a run in ``out_dir`` (under its lock): create it, remove the temporary files a killed run left (only
    under the lock: never a live run's), check the fingerprint (another one: :class:`FingerprintMismatchError`
    unless ``overwrite``, which drops the old records). OSError on an I/O failure."""
    out_dir.mkdir(parents=True, exist_ok=True)
    if not read_only:
        remove_stale_temp_files(out_dir)
    _check_fingerprint(out_dir, fingerprint, overwrite)


def mark_incomplete(out_dir: Path) -> None:
    """A run with work to do: the folder is not complete until it finishes (OSError on an I/O failure)."""
    (out_dir / STATE_DIR / COMPLETE_FILE).unlink(missing_ok=True)


@dataclass
class RunPlan:
    """What a run over a source has to do (:func:`plan_run`), whichever engine computes it."""

    #: The items to compute, in listing order (this shard's, minus the finished ones).
    todo: list[SourceItem]
    #: Items listed in this shard (finished or not, listing skips excluded).
    total: int
    #: Items with a record on disk, by id: the finished ones; an engine adds each item it finishes
    #: (:func:`assemble_run` assembles the run-level files from these).
    infos: dict[str, ItemInfo]
    #: ``(sequence, frame index)`` of each frame of a tracked sequence, by item id (empty when not tracking).
    frames: dict[str, tuple[str, int]]
    #: The frame ids of each tracked sequence, in order.
    by_sequence: dict[str, list[str]]
    tracking: SequenceTracking | None


def plan_run(source: str, out_dir: Path | None, options: RunOptions, writers: Sequence[Writer],
             summary: RunSummary, stdin: Any = None) -> RunPlan:
    """List ``source`` (paths only, never decoded images), keep this shard's items and split off the finished ones
    (their record and every file exist; a tracked sequence resumes after its finished leading frames). Listing
    skips go to ``summary.skipped``, finished items count in ``summary.reused``. Writes nothing."""
    tracks = options.tracks(source)
    tracking = SequenceTracking(options.tracking.config) if tracks else None
    sequence_label = Path(source).name if source != "-" else "stdin"
    listed: list[SourceItem] = []
    for entry in iter_items(source, recursive=options.recursive,
                            **({"extensions": options.extensions} if options.extensions else {}),
                            every=options.every, start=options.start, end=options.end, stdin=stdin,
                            max_pixels=options.max_pixels):
        sequence = (sequence_name(entry, options.tracking, sequence_label)
                    if tracks and isinstance(entry, SourceItem) else None)
        if not in_shard(entry.id if sequence is None else sequence, options.shard):  # a sequence stays in one shard
            continue
        if isinstance(entry, SkippedItem):
            summary.skipped.append((entry.id, entry.message))  # the reason, naming the file
        else:
            listed.append(entry)
    # frames of each tracked sequence, in order: (sequence, frame index) per item id
    frames: dict[str, tuple[str, int]] = {}
    if tracking is not None:
        if options.tracking.sequence:
            listed.sort(key=lambda it: it.id)
        counts: dict[str, int] = {}
        for item in listed:
            sequence = sequence_name(item, options.tracking, sequence_label)
            if sequence is not None:
                frames[item.id] = (sequence, counts.get(sequence, 0))
                counts[sequence] = counts.get(sequence, 0) + 1
    infos: dict[str, ItemInfo] = {}  # items with a record on disk (records themselves are not kept in memory)
    finished: dict[str, ItemInfo] = {}
    for item in listed:
        record = _read_record(out_dir, item.id) if out_dir is not None else None
        if record is not None:
            info = _item_info(record)
            files = [result_path(out_dir, item.id), *(p for w in writers for p in w.item_files(info))]
            if all(p.is_file() for p in files):
                finished[item.id] = info
    by_sequence: dict[str, list[str]] = {}
    for item_id, (sequence, _) in frames.items():
        by_sequence.setdefault(sequence, []).append(item_id)
    if tracking is not None:  # a sequence resumes after its finished leading frames; later frames run again
        for sequence, ids in by_sequence.items():
            keep = tracking.resume_point(sequence, [i in finished for i in ids],
                                         lambda k, ids=ids: _tracker_state(out_dir, ids[k]))
            for item_id in ids[keep:]:
                finished.pop(item_id, None)
    todo: list[SourceItem] = []
    for item in listed:
        if item.id in finished:
            infos[item.id] = finished[item.id]
            summary.reused += 1
        else:
            todo.append(item)
    return RunPlan(todo=todo, total=len(listed), infos=infos, frames=frames, by_sequence=by_sequence,
                   tracking=tracking)


def assemble_run(out_dir: Path | None, writers: Sequence[Writer], plan: RunPlan, summary: RunSummary) -> None:
    """The end of a run, whichever engine computed its items: the run-level files of every writer assembled from
    the records of ``plan.infos`` (streamed from disk, in item-id order), then the complete marker when nothing
    went wrong. An I/O failure goes to ``summary.fatal`` (and the writer to ``unassembled``), Ctrl-C during
    assembly to ``summary.interrupted``."""
    tracking, infos = plan.tracking, plan.infos
    if tracking is not None:
        tracking.load_final_states({seq: _last_tracker_state(out_dir, ids) for seq, ids in plan.by_sequence.items()
                                    if seq not in tracking.trackers})
        for writer in writers:
            writer.track_classes = tracking.track_classes()
    if out_dir is None:
        for writer in writers:
            writer.finalize([])
        return
    t0 = time.perf_counter()
    for k, writer in enumerate(writers):
        try:
            summary.written += writer.finalize(_StoredRecords(out_dir, list(infos.values()), writer.name))
        except OSError as exc:  # each file is atomic: what was there before stays whole
            summary.fatal = summary.fatal or io_failure(exc)
            summary.unassembled.append(writer.name)
        except KeyboardInterrupt:  # Ctrl-C during assembly: say what was not assembled
            summary.interrupted = True
            summary.unassembled += [w.name for w in writers[k:]]
            break
    summary.seconds["write"] += time.perf_counter() - t0
    if not (summary.interrupted or summary.fatal or summary.unassembled):
        complete = {"listed": plan.total, "recorded": len(infos), "skipped": len(summary.skipped),
                    "failed": len(summary.failed)}
        try:
            atomic_write_text(out_dir / STATE_DIR / COMPLETE_FILE, json.dumps(complete) + "\n")
        except OSError as exc:
            summary.fatal = io_failure(exc)


def decode_for_model(decode: Callable[[SourceItem], np.ndarray], item: SourceItem, options: RunOptions
                     ) -> tuple[np.ndarray, torch.Tensor] | SkipItem:
    """One item decoded and prepared for the model: ``(rgb (H, W, 3) uint8, tensor (3, H', W') uint8)``, or the
    :class:`SkipItem` saying why it cannot be (one bad item never stops a run)."""
    try:
        rgb = decode(item)
        return rgb, prepare_image(rgb, options.short_side, options.max_size)
    except SkipItem as exc:
        return exc
    except Exception as exc:  # noqa: BLE001 - one bad item never kills the run
        return SkipItem(f"{item.id}: cannot decode ({type(exc).__name__}: {exc})".splitlines()[0])


class _Decoder:
    """Decodes items in order (one background thread), video frames sequentially."""

    def __init__(self, options: RunOptions):
        self.options = options
        self._video: tuple[Path, Iterator] | None = None

    def frame(self, item: SourceItem) -> np.ndarray:
        if self._video is None or self._video[0] != item.path:
            self._video = (item.path, iter_video_frames(item.path, self.options.every, self.options.start,
                                                        self.options.end, max_pixels=self.options.max_pixels))
        for frame_item, rgb in self._video[1]:
            if frame_item.frame == item.frame:
                return rgb
            if frame_item.frame is not None and item.frame is not None and frame_item.frame > item.frame:
                break
        raise SkipItem(f"{item.id}: frame could not be read")

    def __call__(self, item: SourceItem) -> np.ndarray:
        if item.frame is not None:
            return self.frame(item)
        return decode_item(item, max_pixels=self.options.max_pixels).rgb


class _InFlight:
    """What a run is working on, logged as it goes (``.masqclip/inflight.log``: ``decode`` / ``decoded`` /
    ``model`` / ``done`` lines), so that an item that kills the whole process (out of memory, a crashing decoder)
    can be told apart on the next run: an item the log shows in decoding or in the model when the process died
    counts one crash (``.masqclip/crashed.json``). An item with one crash is tried again, alone; after a second one
    it is skipped with the reason (delete ``crashed.json`` to try it again). A run killed by hand therefore resumes
    to the same outputs, while an item that crashes every time costs two runs, not every resume."""

    LOG = "inflight.log"
    CRASHED = "crashed.json"

    def __init__(self, out_dir: Path | None, read_only: bool) -> None:
        self._file = None
        self._lock = threading.Lock()
        self._writable = False
        self._dirty = False
        self.crashed: dict[str, int] = {}
        if out_dir is None:
            return
        state = out_dir / STATE_DIR
        self._crashed_path = state / self.CRASHED
        try:
            self.crashed = {str(k): int(v) for k, v in json.loads(self._crashed_path.read_text()).items()}
        except (OSError, ValueError, AttributeError):
            self.crashed = {}
        before = dict(self.crashed)
        for item_id in self._in_flight(state / self.LOG):  # the previous run died with these in hand
            self.crashed[item_id] = self.crashed.get(item_id, 0) + 1
        self._dirty = self.crashed != before
        self._log_path = state / self.LOG
        if not read_only and self._dirty:
            atomic_write_text(self._crashed_path, dumps_json(dict(sorted(self.crashed.items()))) + "\n")
            self._dirty = False
        self._writable = not read_only

    def open(self) -> None:
        """Start this run's log (only when there is work: a run that computes nothing writes nothing)."""
        if self._writable and self._file is None:
            self._file = open(self._log_path, "w", encoding="utf-8")  # noqa: SIM115 - held for the run

    @staticmethod
    def _in_flight(log: Path) -> list[str]:
        try:
            lines = log.read_text(encoding="utf-8").splitlines()
        except OSError:
            return []
        decoding: set[str] = set()
        in_model: set[str] = set()
        for line in lines:
            kind, _, raw = line.partition(" ")
            try:
                item_id = json.loads(raw)
            except ValueError:  # a line cut short by the crash
                continue
            if kind == "decode":
                decoding.add(item_id)
            elif kind == "decoded":
                decoding.discard(item_id)
            elif kind == "model":
                in_model.add(item_id)
            elif kind == "done":
                decoding.discard(item_id)
                in_model.discard(item_id)
        return sorted(decoding | in_model)

    def skip_reason(self, item_id: str) -> str | None:
        if self.crashed.get(item_id, 0) >= 2:
            return (f"{item_id}: the process died twice while working on it (out of memory, or a crash in a "
                    f"decoder): skipped; delete {STATE_DIR}/{self.CRASHED} to try it again")
        return None

    def suspect(self, item_id: str) -> bool:
        """Whether the item took the process down once already (it is then run alone)."""
        return self.crashed.get(item_id, 0) >= 1

    def log(self, kind: str, item_id: str) -> None:
        if self._file is not None:
            with self._lock:
                self._file.write(f"{kind} {json.dumps(item_id)}\n")
                self._file.flush()  # in the kernel's hands: survives the process being killed

    def finished(self, item_id: str) -> None:
        self.log("done", item_id)
        if self.crashed.pop(item_id, None) is not None:
            self._dirty = True

    def close(self) -> None:
        """End of the run (the process lived): nothing was in flight, the log goes."""
        if self._file is not None:
            self._file.close()
            self._file = None
            self._log_path.unlink(missing_ok=True)
            if self._dirty:
                if self.crashed:
                    atomic_write_text(self._crashed_path, dumps_json(dict(sorted(self.crashed.items()))) + "\n")
                else:
                    self._crashed_path.unlink(missing_ok=True)


def _producer(items: Iterable[SourceItem], options: RunOptions, out: queue.Queue, stop: threading.Event,
              inflight: _InFlight | None = None) -> None:
    """Decode ``items`` for the model and put ``(item, payload, seconds)`` on ``out`` in listing order, then None.

    ``options.workers`` threads decode (None: min(4, CPU count)), at most ``2 x workers`` items ahead of ``out``;
    results are handed on in submission order, so the order (and so every output) does not depend on the number.
    Video frames go to one thread of their own, in order (a video is read as one stream by one decoder). After
    ``stop`` nothing new starts; items not started are dropped unlogged (the in-flight log shows only items being
    decoded, so they never count as crashes)."""
    from collections import deque
    from concurrent.futures import Future, ThreadPoolExecutor

    decode = _Decoder(options)
    workers = max(1, int(options.workers or min(4, os.cpu_count() or 1)))

    def work(item: SourceItem) -> tuple[SourceItem, Any, float]:
        start = time.perf_counter()
        if inflight is not None:
            inflight.log("decode", item.id)
        payload = decode_for_model(decode, item, options)
        if inflight is not None:
            inflight.log("decoded", item.id)
        return item, payload, time.perf_counter() - start

    if workers == 1:
        for item in items:
            if stop.is_set():
                break
            out.put(work(item))
        out.put(None)
        return
    images = ThreadPoolExecutor(workers, thread_name_prefix="masqclip-decode")
    frames = ThreadPoolExecutor(1, thread_name_prefix="masqclip-frames")  # one decoder per video stream, in order
    pending: deque[Future] = deque()
    try:
        for item in items:
            if stop.is_set():
                break
            pending.append((frames if item.frame is not None else images).submit(work, item))
            if len(pending) >= 2 * workers:
                out.put(pending.popleft().result())
        while pending and not stop.is_set():
            out.put(pending.popleft().result())
    finally:
        for future in pending:
            future.cancel()
        images.shutdown(wait=True, cancel_futures=True)
        frames.shutdown(wait=True, cancel_futures=True)
    out.put(None)


def segment(
    model: MasQCLIP,
    vocab: Vocabulary,
    source: str,
    out_dir: Path | None,
    options: RunOptions,
    model_id: str,
    templates: list[str] | None = None,
    precision: str = "fp32",
    on_item: Callable[[str, int, int | None], None] | None = None,
    stdin: Any = None,
) -> RunSummary:
    """Segment every item of ``source`` and write the requested formats.

    Args:
        model: a loaded model whose vocabulary is already set (``model.set_vocabulary(vocab)``).
        vocab: the vocabulary (category ids, thing/stuff).
        source: a path, directory, glob, list file, video or ``-`` (stdin).
        out_dir: the output folder; None only for streaming formats (``jsonl`` to stdout).
        options: run options.
        model_id: identity of the model for the fingerprint.
        on_item: progress callback (item id, items finished so far, total or None).

    Returns:
        A :class:`RunSummary` (an I/O failure is its ``fatal`` line). Raises :class:`FingerprintMismatchError`,
        :class:`~masqclip_cli.io.run_lock.RunLockedError` when another run holds ``out_dir``, or ``SourceError``
        for a source that cannot be read at all.
    """
    if out_dir is None:
        return _segment(model, vocab, source, None, options, model_id, templates, precision, on_item, stdin)
    return run_locked(out_dir, lambda read_only: _segment(model, vocab, source, out_dir, options, model_id, templates,
                                                          precision, on_item, stdin, read_only=read_only))


def run_locked(out_dir: Path, run: Callable[[bool], RunSummary]) -> RunSummary:
    """``run(read_only)`` under ``out_dir``'s :class:`RunLock` (one run per output folder, for the whole run;
    ``read_only``: the folder cannot be written, so nothing must be). Every engine runs through here."""
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
        lock = RunLock(out_dir).acquire()
    except OSError as exc:
        summary = RunSummary()
        summary.fatal = io_failure(exc)
        return summary
    try:
        return run(lock.read_only)
    finally:
        lock.release()


def _segment(model: MasQCLIP, vocab: Vocabulary, source: str, out_dir: Path | None, options: RunOptions,
             model_id: str, templates: list[str] | None, precision: str,
             on_item: Callable[[str, int, int | None], None] | None, stdin: Any, read_only: bool = False
             ) -> RunSummary:
    """:func:`segment` under the folder's lock (``read_only``: the folder cannot be written: nothing is)."""
    t_start = time.perf_counter()
    summary = RunSummary()
    writers: list[Writer] = make_writers(options.formats, out_dir, options.writer_vocabulary(vocab),
                                         **options.writer_options)
    predictor = Predictor.for_encoded(model, vocab, options.postprocess, options.short_side, options.max_size)
    if out_dir is not None:
        try:
            open_run(out_dir, run_fingerprint(model_id, vocab, templates, options, model.use_object_score, precision,
                                              tracks=options.tracks(source)), options.overwrite, read_only)
        except OSError as exc:
            summary.fatal = io_failure(exc)
            summary.wall_s = time.perf_counter() - t_start
            return summary

    plan = plan_run(source, out_dir, options, writers, summary, stdin)
    todo, total, infos, frames, tracking = plan.todo, plan.total, plan.infos, plan.frames, plan.tracking
    finished = summary.reused
    if todo and out_dir is not None:  # work to do: the folder is not complete until this run finishes
        try:
            mark_incomplete(out_dir)
        except OSError as exc:
            summary.fatal = io_failure(exc)
            summary.wall_s = time.perf_counter() - t_start
            return summary

    # Ctrl-C: finish the batch in flight, assemble what is done, exit 130; a second Ctrl-C stops at once
    stop = threading.Event()
    previous_handler = None
    if threading.current_thread() is threading.main_thread():
        def _on_sigint(signum, frame):  # noqa: ANN001
            if stop.is_set():
                raise KeyboardInterrupt
            stop.set()

        previous_handler = signal.signal(signal.SIGINT, _on_sigint)

    inflight = _InFlight(out_dir, read_only)
    crashers = [item for item in todo if inflight.skip_reason(item.id)]
    for item in crashers:
        summary.skipped.append((item.id, inflight.skip_reason(item.id)))
    todo = [item for item in todo if not inflight.skip_reason(item.id)]
    if todo:
        inflight.open()
    decoded: queue.Queue = queue.Queue(maxsize=max(options.prefetch, options.batch_size) * 2)
    producer = threading.Thread(target=_producer, args=(todo, options, decoded, stop, inflight), daemon=True)
    producer.start()
    try:
        batch: list[tuple[SourceItem, np.ndarray, torch.Tensor]] = []
        exhausted = False
        while not exhausted:
            entry = decoded.get()
            if entry is None:
                exhausted = True
            else:
                item, payload, seconds = entry
                summary.seconds["decode"] += seconds
                if isinstance(payload, SkipItem):
                    summary.skipped.append((item.id, str(payload)))
                    inflight.finished(item.id)
                    finished += 1
                    if on_item:
                        on_item(item.id, finished, total)
                else:
                    batch.append((item, *payload))
            alone = bool(batch) and inflight.suspect(batch[-1][0].id)  # it crashed the process once: run it alone
            if batch and (len(batch) >= options.batch_size or exhausted or stop.is_set() or alone):
                groups = [batch[:-1], batch[-1:]] if alone and len(batch) > 1 else [batch]
                for group in groups:
                    for queued, _, _ in group:
                        inflight.log("model", queued.id)
                    for item_id, record in _run_batch(predictor, group, writers, out_dir, summary, options,
                                                      tracking, frames):
                        inflight.finished(item_id)
                        finished += 1
                        if record is not None and out_dir is not None:
                            infos[item_id] = _item_info(record)
                        if on_item:
                            on_item(item_id, finished, total)
                batch = []
            if summary.fatal is not None:
                break
            if stop.is_set():
                summary.interrupted = True
                break
    finally:
        stop.set()
        while producer.is_alive():  # unblock the producer if it waits on a full queue
            try:
                decoded.get_nowait()
            except queue.Empty:
                producer.join(0.05)
        try:
            inflight.close()
        except OSError as exc:
            summary.fatal = summary.fatal or io_failure(exc)
        if previous_handler is not None:
            signal.signal(signal.SIGINT, previous_handler)

    assemble_run(out_dir, writers, plan, summary)
    summary.wall_s = time.perf_counter() - t_start
    return summary


def _run_batch(predictor: Predictor, batch: list[tuple[SourceItem, np.ndarray, torch.Tensor]], writers: list[Writer],
               out_dir: Path | None, summary: RunSummary, options: RunOptions,
               tracking: SequenceTracking | None = None, frames: dict[str, tuple[str, int]] | None = None
               ) -> Iterator[tuple[str, dict | None]]:
    t0 = time.perf_counter()
    try:
        outputs = predictor.forward([tensor for _, _, tensor in batch])
    except Exception as exc:  # noqa: BLE001 - a failing batch is retried image by image
        if len(batch) == 1:
            item = batch[0][0]
            summary.failed.append((item.id, f"{item.id}: model failed ({type(exc).__name__}: {exc})".splitlines()[0]))
            yield item.id, None
            return
        for single in batch:
            yield from _run_batch(predictor, [single], writers, out_dir, summary, options, tracking, frames)
        return
    summary.seconds["model"] += time.perf_counter() - t0
    for (item, rgb, _), out in zip(batch, outputs):
        try:
            t1 = time.perf_counter()
            height, width = rgb.shape[:2]
            seg = predictor.postprocess(out, (height, width))
            t2 = time.perf_counter()
            summary.seconds["postprocess"] += t2 - t1
            source = str(item.path.resolve()) if any(w.needs_source for w in writers) else None
            sequence, frame = (frames or {}).get(item.id, (None, None))
            info = ItemInfo(id=item.id, file_name=item.id, width=width, height=height, source=source,
                            sequence=sequence, frame=frame)
            record = {"id": item.id, "file_name": item.id, "width": width, "height": height, "writers": {}}
            if source is not None:  # only when a writer needs it: other runs' records stay as they were
                record["source"] = source
            if sequence is not None:
                record.update(sequence=sequence, frame=frame)
            if out_dir is not None:  # the whole result, before any control: what `export` re-writes from
                write_result(out_dir, item, seg)
            kept = writer_view(seg, predictor.vocabulary, options.preannotation, options.label_map)
            if tracking is not None and sequence is not None:
                t_track = time.perf_counter()
                kept = tracking.assign(sequence, frame, kept, out.embeddings.float().cpu().numpy())
                summary.seconds["track"] = summary.seconds.get("track", 0.0) + time.perf_counter() - t_track
            for writer in writers:
                record["writers"][writer.name] = writer.write_item(info, kept, rgb if writer.needs_image else None)
            if tracking is not None and sequence is not None:
                record["tracker"] = tracking.state_json(sequence)  # the state after this frame, for resume
            if out_dir is not None:  # the record last: an item is finished when its record exists
                atomic_write_text(_record_path(out_dir, item.id), json.dumps(record, separators=(",", ":")) + "\n")
            summary.seconds["write"] += time.perf_counter() - t2
            summary.done += 1
            yield item.id, record
        except OSError as exc:
            if exc.errno in FATAL_IO_ERRNOS:  # no later item could be written either: stop the run
                summary.fatal = summary.fatal or io_failure(exc)
            else:
                summary.failed.append((item.id, f"{item.id}: {type(exc).__name__}: {exc}".splitlines()[0]))
            yield item.id, None
        except Exception as exc:  # noqa: BLE001 - one bad item is reported, never kills the run
            summary.failed.append((item.id, f"{item.id}: {type(exc).__name__}: {exc}".splitlines()[0]))
            yield item.id, None


def writer_view(seg: Segmentation, vocab: Vocabulary, controls: Preannotation,
                label_map: LabelMap | None) -> Segmentation:
    """What the writers get of a whole result: mapped to the project's labels first (so the controls count final
    labels, and a merged label's floor is the lowest of its classes'), then the pre-annotation controls."""
    if label_map is not None:
        seg = label_map.apply(seg, vocab)
        vocab = label_map.mapped_vocabulary(vocab).vocab
    return controls.apply(seg, vocab)


def incomplete_shards(shard_dirs: Sequence[Path]) -> list[str]:
    """One line per shard folder whose run did not finish (no complete marker, or fewer records than it kept)."""
    problems = []
    for d in shard_dirs:
        items = d / STATE_DIR / "items"
        recorded = sum(1 for _ in items.rglob("*.json")) if items.is_dir() else 0
        try:
            complete = json.loads((d / STATE_DIR / COMPLETE_FILE).read_text())
        except (OSError, ValueError):
            problems.append(f"{d}: its run did not finish (killed or interrupted; {recorded} items recorded): run the "
                            "same segment command on it again to complete it")
            continue
        if recorded < int(complete.get("recorded", 0)):
            problems.append(f"{d}: {int(complete['recorded']) - recorded} of {complete['recorded']} item records "
                            "are missing")
    return problems


def merge_outputs(shard_dirs: list[Path], out_dir: Path, vocab: Vocabulary, formats: tuple[str, ...],
                  writer_options: dict[str, Any] | None = None) -> list[Path]:
    """Join the output folders of shards into one, equal to what a single run would have written.

    All shards must share one fingerprint apart from the shard; per-item files and records are copied, the
    run-level files are assembled again from all records.
    """
    fingerprints = []
    for d in shard_dirs:
        run_file = d / STATE_DIR / "run.json"
        if not run_file.is_file():
            raise FingerprintMismatchError(f"{d}: not a masqclip segment output (no {STATE_DIR}/run.json)")
        fp = json.loads(run_file.read_text())
        fingerprints.append(fp)
    shards = [tuple(fp["shard"]) for fp in fingerprints]
    base = [{k: v for k, v in fp.items() if k != "shard"} for fp in fingerprints]
    if any(b != base[0] for b in base):
        raise FingerprintMismatchError("shard outputs come from runs with different models, vocabularies or options")
    if sorted(s[0] for s in shards) != list(range(shards[0][1])) or any(s[1] != shards[0][1] for s in shards):
        raise FingerprintMismatchError(f"shards {shards} do not make one complete set")
    if fingerprints[0].get("label_map") is not None:  # the writers wrote the project's labels
        label_map = LabelMap.from_canonical(fingerprints[0]["label_map"], source=str(shard_dirs[0]))
        vocab = label_map.mapped_vocabulary(vocab).vocab
    writers = make_writers(formats, out_dir, vocab, **(writer_options or {}))
    out_dir.mkdir(parents=True, exist_ok=True)
    with RunLock(out_dir):
        return _merge_locked(shard_dirs, out_dir, writers, fingerprints)


def _merge_locked(shard_dirs: list[Path], out_dir: Path, writers: list[Writer], fingerprints: list[dict]
                  ) -> list[Path]:
    merged_fp = dict(fingerprints[0], shard=[0, 1])
    atomic_write_text(out_dir / STATE_DIR / "run.json", json.dumps(merged_fp, indent=1) + "\n")
    infos: dict[str, ItemInfo] = {}
    for d in shard_dirs:
        for record_file in sorted((d / STATE_DIR / "items").rglob("*.json")):
            record = json.loads(record_file.read_text())
            info = _item_info(record)
            for writer in writers:
                for src in writer.item_files(info):
                    rel = src.relative_to(out_dir)
                    target = out_dir / rel
                    target.parent.mkdir(parents=True, exist_ok=True)
                    shutil.copyfile(d / rel, target)
            kept = result_path(d, info.id)
            if kept.is_file():
                target = result_path(out_dir, info.id)
                target.parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(kept, target)
            target = _record_path(out_dir, info.id)
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(record_file, target)
            infos[info.id] = info
    last_frames: dict[str, ItemInfo] = {}  # a sequence lives in one shard: its last frame's record has its state
    for info in infos.values():
        if info.sequence is not None and (info.sequence not in last_frames
                                          or info.frame > last_frames[info.sequence].frame):
            last_frames[info.sequence] = info
    if last_frames:
        tracking = SequenceTracking(TrackerConfig())
        tracking.load_final_states({seq: _tracker_state(out_dir, info.id) for seq, info in last_frames.items()})
        for writer in writers:
            writer.track_classes = tracking.track_classes()
    written = []
    for writer in writers:
        written += writer.finalize(_StoredRecords(out_dir, list(infos.values()), writer.name))
    marker = {"listed": 0, "recorded": len(infos), "skipped": 0, "failed": 0}  # as one run over all shards' items
    for d in shard_dirs:
        try:
            shard_marker = json.loads((d / STATE_DIR / COMPLETE_FILE).read_text())
        except (OSError, ValueError):  # a partial shard (merge --allow-partial): its records are what it has
            shard_marker = {"listed": sum(1 for _ in (d / STATE_DIR / "items").rglob("*.json"))}
        for key in ("listed", "skipped", "failed"):
            marker[key] += int(shard_marker.get(key, 0))
    atomic_write_text(out_dir / STATE_DIR / COMPLETE_FILE, json.dumps(marker) + "\n")
    return written
