"""Tracking evaluation of ``masqclip segment --format mots`` runs, and of a model, on the synthetic video world.

The dataset is a folder :func:`~masqclip_cli.data.synthetic_video.generate_videos` wrote (``videos.json``,
``videos/<name>.mp4``, ``gt/<name>.txt``). A *run* is what the CLI writes for one video::

    masqclip segment root/videos/000000.mp4 --model demo --vocab root/vocab.txt --task panoptic --format mots \\
        --out runs/000000                                   # "iou+embedding" (the default tracker)
    ... --no-track-embeddings                               # "iou": mask IoU and motion only
    ... --no-track                                          # "frame": no tracking, each frame's own segment ids

``segment`` takes one video per run, so :func:`evaluate_video_run` takes either one run folder (it has ``mots/``) or a
folder of run folders (``runs/000000/mots/``, ``runs/000001/mots/``, ..., one per video; the names of the run folders
do not matter). For each video of the dataset it looks, in every run's ``mots/``, for

* ``<video file>.txt`` (``000000.mp4.txt``): a tracked run's file, one line per object per frame, or
* ``<video file>#<frame>.txt`` (``000000.mp4#000005.txt``): a run without tracking writes each frame as a one-frame
  video of its own; these are joined into one file per video (:func:`~masqclip_cli.evaluation.tracking.write_mots`)
  keeping **each frame's own panoptic segment ids** (1, 2, ... in query order, stuff included: the ids today's
  frame-by-frame output carries; nothing links them across frames).

A video found in no run, or in two, is a ValueError naming the run folder. Frames are placed at their true index in
the video (the item id's ``#000005``), read from the run's item records, so a run with ``--every`` / ``--start`` is
scored on all frames of the video (unsampled frames count as misses); ``frames_run`` in the protocol says how many
frames the runs covered.

Scoring (:func:`~masqclip_cli.evaluation.tracking.evaluate_tracking`, TrackEval's MOTS Challenge evaluation): **thing
classes only** (the ground truth has only things, the ``mots`` writer writes only thing segments; the dataset has no
ignore regions). The headline numbers are **class-agnostic** (a track of the wrong class still matches); with
``per_class`` each thing class is also scored on its own (a wrong class is a false positive in its class and a miss
in the object's). Class ids are matched **by name**: a run's class ids are its vocabulary's category ids
(``.masqclip/run.json``), mapped to the dataset's ids of the same names; a run class that is not a dataset thing
becomes class 0 (scored class-agnostically, in no class of its own).

The mode of a run (``frame`` / ``iou`` / ``iou+embedding``, :data:`TRACK_MODES`) and its tracker config are read
from its fingerprint (``.masqclip/run.json``: no ``tracking`` key = no tracking). :func:`evaluate_video_model` runs
a model over every video of the dataset in one mode (through :func:`masqclip_cli.inference.engine.segment`, exactly
as the CLI lines above) and scores the runs, with seconds per frame.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import re
import tempfile
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from masqclip_cli.evaluation.tracking import evaluate_tracking, read_mots, write_mots
from masqclip_cli.inference.tracking import TrackerConfig
from masqclip_cli.io.files import STATE_DIR
from masqclip_cli.vocab import Vocabulary, VocabularyError

if TYPE_CHECKING:  # pragma: no cover - type hints only
    from masqclip_cli.modeling.masqclip import MasQCLIP

__all__ = ["TRACK_MODES", "evaluate_video_model", "evaluate_video_run", "mode_of_fingerprint"]

#: The tracking modes compared: no tracking (per-frame ids), the tracker without embeddings, the default tracker.
TRACK_MODES: tuple[str, ...] = ("frame", "iou", "iou+embedding")

_FRAME_FILE = re.compile(r"^(?P<video>.+)#(?P<frame>\d+)$")
_CODECS = {
    "libx264": "H.264 (libx264, yuv420p, CRF 17)",
    "mpeg4": "MPEG-4 part 2 (yuv420p, about 1.5 bits per pixel)",
}
_FRAME_IDS = (
    "no tracking: each frame's own panoptic segment ids (1, 2, ... in query order, stuff segments included), "
    "nothing links them across frames"
)


# --- the dataset ----------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Dataset:
    root: Path
    manifest: dict[str, Any]
    names: list[str]  # the videos' names (000000, ...)
    video_files: dict[str, str]  # name -> the MP4's file name (000000.mp4)
    lengths: dict[str, int]
    things: dict[str, int]  # thing category name -> id

    @property
    def thing_ids(self) -> list[int]:
        return sorted(self.things.values())


def _dataset(gt_root: str | os.PathLike[str]) -> _Dataset:
    root = Path(gt_root)
    path = root / "videos.json"
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except OSError as err:
        raise ValueError(f"{path}: cannot read the video dataset's manifest ({err.strerror or err})") from None
    except ValueError as err:
        raise ValueError(f"{path}: not JSON ({err})") from None
    try:
        entries = manifest["videos"]
        names = [str(e["name"]) for e in entries]
        video_files = {str(e["name"]): Path(str(e["video"])).name for e in entries}
        lengths = {str(e["name"]): int(e["num_frames"]) for e in entries}
        things = {str(c["name"]): int(c["id"]) for c in manifest["categories"] if c["isthing"]}
        for e in entries:
            if not (root / str(e["gt"])).is_file():
                raise ValueError(f"ground-truth file {e['gt']} is missing")
    except (KeyError, TypeError, ValueError) as err:
        raise ValueError(f"{path}: not a synthetic video manifest ({err})") from None
    if not names:
        raise ValueError(f"{path}: the dataset has no videos")
    return _Dataset(root, manifest, names, video_files, lengths, things)


# --- runs -----------------------------------------------------------------------------------------------------------


def mode_of_fingerprint(fingerprint: Mapping[str, Any]) -> str:
    """The :data:`TRACK_MODES` entry of a run's fingerprint (``.masqclip/run.json``): no ``tracking`` key =
    ``"frame"``; else ``"iou+embedding"`` or ``"iou"`` by its tracker's ``use_embeddings``."""
    tracking = fingerprint.get("tracking")
    if tracking is None:
        return "frame"
    try:
        return "iou+embedding" if bool(tracking["tracker"]["use_embeddings"]) else "iou"
    except (KeyError, TypeError):
        raise ValueError("the run fingerprint's 'tracking' has no tracker.use_embeddings") from None


@dataclass
class _Run:
    folder: Path
    fingerprint: dict[str, Any] | None
    files: dict[str, Path] = field(default_factory=dict)  # stem (item id or sequence name) -> mots file
    frame_of: dict[str, dict[int, int]] = field(default_factory=dict)  # sequence -> position -> frame index

    @property
    def mode(self) -> str | None:
        return None if self.fingerprint is None else mode_of_fingerprint(self.fingerprint)


def _run_folders(run_dir: Path) -> list[Path]:
    if not run_dir.is_dir():
        raise ValueError(f"{run_dir}: run folder not found")
    if (run_dir / "mots").is_dir():
        return [run_dir]
    folders = sorted(p for p in run_dir.iterdir() if p.is_dir() and (p / "mots").is_dir())
    if not folders:
        raise ValueError(f"{run_dir}: no mots/ folder (neither a `segment --format mots` run nor a folder of runs)")
    return folders


def _read_run(folder: Path) -> _Run:
    fingerprint = None
    run_json = folder / STATE_DIR / "run.json"
    if run_json.is_file():
        try:
            fingerprint = json.loads(run_json.read_text(encoding="utf-8"))
            if not isinstance(fingerprint, dict):
                raise ValueError("not a JSON object")
            mode_of_fingerprint(fingerprint)
        except ValueError as err:
            raise ValueError(f"{run_json}: not a run fingerprint ({err})") from None
    run = _Run(folder, fingerprint)
    mots = folder / "mots"
    for path in sorted(mots.rglob("*.txt")):
        if path.is_file():
            run.files[path.relative_to(mots).as_posix()[: -len(".txt")]] = path
    items = folder / STATE_DIR / "items"
    for path in sorted(items.rglob("*.json")) if items.is_dir() else ():
        try:
            record = json.loads(path.read_text(encoding="utf-8"))
            item_id = str(record["id"])
        except (OSError, ValueError, KeyError, TypeError) as err:
            raise ValueError(f"{path}: not an item record ({err})") from None
        match = _FRAME_FILE.match(item_id)
        if record.get("sequence") is not None and record.get("frame") is not None and match:
            run.frame_of.setdefault(str(record["sequence"]), {})[int(record["frame"])] = int(match["frame"])
    return run


@dataclass
class _Prediction:
    run: _Run
    tracked: Path | None = None  # the tracked file
    frames: dict[int, Path] = field(default_factory=dict)  # frame index -> one-frame file (no tracking)
    sequence: str = ""


def _find_predictions(dataset: _Dataset, runs: Sequence[_Run]) -> dict[str, _Prediction]:
    found: dict[str, _Prediction] = {}
    for run in runs:
        by_video: dict[str, _Prediction] = {}
        for name in dataset.names:
            video = dataset.video_files[name]
            for sequence in (video, name):  # the MP4's item id, or a --sequence run over frames/<name>/
                if sequence in run.files:
                    by_video[name] = _Prediction(run, tracked=run.files[sequence], sequence=sequence)
                    break
        for stem, path in run.files.items():
            match = _FRAME_FILE.match(stem)
            if not match:
                continue
            for name in dataset.names:
                if match["video"] == dataset.video_files[name]:
                    pred = by_video.setdefault(name, _Prediction(run, sequence=match["video"]))
                    if pred.tracked is not None:
                        raise ValueError(
                            f"{run.folder}: both a tracked file and per-frame files for video {name}: mixed runs"
                        )
                    pred.frames[int(match["frame"])] = path
        for name, pred in by_video.items():
            if name in found:
                raise ValueError(f"{run.folder}: video {name} is also in the run {found[name].run.folder}")
            found[name] = pred
    missing = [n for n in dataset.names if n not in found]
    if missing:
        shown = ", ".join(missing[:5]) + (" ..." if len(missing) > 5 else "")
        where = runs[0].folder if len(runs) == 1 else runs[0].folder.parent
        raise ValueError(f"{where}: no mots prediction for {len(missing)} video(s) of the dataset: {shown}")
    return found


def _class_map(run: _Run, dataset: _Dataset) -> dict[int, int] | None:
    """Run class id -> dataset class id (by name; 0 = not a dataset thing); None: ids taken as they are (no
    fingerprint)."""
    if run.fingerprint is None or "vocabulary" not in run.fingerprint:
        return None
    try:
        vocab = Vocabulary.from_json(run.fingerprint["vocabulary"], source=str(run.folder / STATE_DIR / "run.json"))
    except VocabularyError as err:
        raise ValueError(str(err)) from None
    return {cid: dataset.things.get(name, 0) for name, cid in zip(vocab.names, vocab.category_ids())}


def _write_prediction(pred: _Prediction, name: str, dataset: _Dataset, path: Path) -> int:
    """Write the video's predictions, frames at their true index and classes as the dataset's, to ``path``;
    returns the number of frames the run covered."""
    class_map = _class_map(pred.run, dataset)
    length = dataset.lengths[name]

    def mapped(class_id: int, where: Path) -> int:
        if class_map is None:
            return class_id
        if class_id not in class_map:
            raise ValueError(f"{where}: class id {class_id} is not a category id of the run's vocabulary")
        return class_map[class_id]

    frames: list[tuple[int, list[int], list[int], list[dict[str, Any]]]] = []
    if pred.tracked is not None:
        positions = pred.run.frame_of.get(pred.sequence, {})
        ordered = [positions[p] for p in sorted(positions)]
        if any(b <= a for a, b in zip(ordered, ordered[1:])):
            raise ValueError(f"{pred.run.folder}: the item records of {pred.sequence} number its frames out of order")
        by_frame: dict[int, list[Any]] = {}
        for obj in read_mots(pred.tracked):
            by_frame.setdefault(positions.get(obj.frame, obj.frame) if positions else obj.frame, []).append(obj)
        for frame in sorted(by_frame):
            objs = by_frame[frame]
            frames.append((frame, [o.track_id for o in objs], [mapped(o.class_id, pred.tracked) for o in objs],
                           [o.rle for o in objs]))
        covered = len(positions) if positions else len(by_frame)
    else:
        for frame in sorted(pred.frames):
            file = pred.frames[frame]
            objs = read_mots(file)
            if any(o.frame != 0 for o in objs):
                raise ValueError(f"{file}: a one-frame file of a run without tracking has a frame other than 1")
            frames.append((frame, [o.track_id for o in objs], [mapped(o.class_id, file) for o in objs],
                           [o.rle for o in objs]))
        covered = len(pred.frames)
    late = [f for f, *_ in frames if f >= length]
    if late:
        raise ValueError(f"{pred.run.folder}: frame index {late[-1]} is past video {name}'s {length} frames")
    write_mots(path, frames, overlap="error")
    return covered


def _finite(value: Any) -> Any:
    """NaN / inf -> None, recursively (JSON has neither)."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_finite(v) for v in value]
    return value


def _trackeval_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("trackeval")
    except PackageNotFoundError:
        return "unknown"


def evaluate_video_run(
    gt_root: str | os.PathLike[str], run_dir: str | os.PathLike[str], *, per_class: bool = True
) -> dict[str, Any]:
    """Score finished ``segment --format mots`` run(s) against the synthetic video dataset at ``gt_root``.

    ``run_dir`` is one run folder (with ``mots/``) or a folder of run folders, one per video (see the module
    docstring: tracked files and the per-frame files of runs without tracking are both read; every video of the
    dataset needs a prediction, and all runs must be of one mode).

    Returns the class-agnostic numbers of :func:`~masqclip_cli.evaluation.tracking.evaluate_tracking` (``HOTA``,
    ``DetA``, ``AssA``, ``IDF1``, ``MOTA``, ``IDSW``, the rest of TrackEval's HOTA / CLEAR / Identity / Count numbers,
    ``per_sequence``), plus with ``per_class`` ``"per_class": {category name: {"class_id", numbers...}}`` (the
    classes with ground truth or predictions) and ``"class_mean"`` (HOTA, DetA, AssA, IDF1, MOTA averaged over the
    classes with ground truth, and their number ``classes``), and ``"protocol"``: a dict (dataset and its
    config, input video, mode, tracker config, the run's model and options, frames run, TrackEval version and mode,
    class handling). Ratios in percent, counts as integers; a number TrackEval leaves undefined is None.
    """
    dataset = _dataset(gt_root)
    runs = [_read_run(folder) for folder in _run_folders(Path(run_dir))]
    predictions = _find_predictions(dataset, runs)
    used = sorted({id(p.run): p.run for p in predictions.values()}.values(), key=lambda r: r.folder)
    modes = {r.mode for r in used}
    if len(modes) > 1:
        shown = ", ".join(sorted(str(m) for m in modes))
        raise ValueError(f"{run_dir}: the runs are of different modes ({shown}); score each mode on its own")
    fingerprints = {json.dumps({k: v for k, v in (r.fingerprint or {}).items()}, sort_keys=True) for r in used}
    if len(fingerprints) > 1:
        raise ValueError(f"{run_dir}: the runs differ in model, vocabulary or options; score them apart")
    mode = modes.pop()
    per_frame = [p.tracked is None for p in predictions.values()]
    if mode is None:  # no fingerprint: from the files
        if any(per_frame) and not all(per_frame):
            raise ValueError(f"{run_dir}: some videos have tracked files, some per-frame files: mixed runs")
        mode = "frame" if all(per_frame) else "tracked (unknown tracker)"
    elif any(per_frame) != (mode == "frame") or all(per_frame) != (mode == "frame"):
        kind = "per-frame" if any(per_frame) else "tracked"
        raise ValueError(f"{run_dir}: {kind} mots files in runs of mode {mode!r}")

    with tempfile.TemporaryDirectory(prefix="masqclip-video-eval-") as tmp:
        files: dict[str, Path] = {}
        frames_run = 0
        for name in dataset.names:
            files[name] = Path(tmp, f"{name}.txt")
            frames_run += _write_prediction(predictions[name], name, dataset, files[name])
        report = evaluate_tracking(dataset.root, files, classes="agnostic", class_ids=dataset.thing_ids + [0])
        if per_class:
            by_class = evaluate_tracking(dataset.root, files, classes="per_class", class_ids=dataset.thing_ids)
    out: dict[str, Any] = {k: v for k, v in report.items() if k != "protocol"}
    if per_class:
        names = {cid: n for n, cid in dataset.things.items()}
        out["per_class"] = {
            names[cid]: {"class_id": cid, **numbers}
            for cid, numbers in sorted(by_class["per_class"].items())
            if numbers["GT_IDs"] or numbers["Dets"]
        }
        with_gt = [numbers for numbers in out["per_class"].values() if numbers["GT_IDs"]]
        out["class_mean"] = {
            metric: (sum(n[metric] for n in with_gt) / len(with_gt) if with_gt else None)
            for metric in ("HOTA", "DetA", "AssA", "IDF1", "MOTA")
        }
        out["class_mean"]["classes"] = len(with_gt)
    fingerprint = used[0].fingerprint
    config = dataset.manifest.get("config", {})
    mp4 = all(p.sequence == dataset.video_files[n] for n, p in predictions.items())
    codec = _CODECS.get(str(config.get("codec")), str(config.get("codec")))
    out["protocol"] = {
        "dataset": {
            "generator": dataset.manifest.get("generator"),
            "version": dataset.manifest.get("version"),
            "image_generator_version": dataset.manifest.get("image_generator_version"),
            "config": config,
            "videos": len(dataset.names),
            "frames": int(sum(dataset.lengths.values())),
            "tracks": int(sum(len(e.get("tracks", [])) for e in dataset.manifest["videos"])),
        },
        "input": (f"videos/<name>.mp4: {codec}, decoded by PyAV: lossy (the ground truth describes the exact PNG "
                  "frames)") if mp4 else "frames/<name>/ PNG frames (exact), a --sequence run",
        "mode": mode,
        "frame_ids": _FRAME_IDS if mode == "frame" else "track ids of the run's tracker",
        "tracker": (fingerprint or {}).get("tracking", {}).get("tracker") if mode != "frame" else None,
        "run": None if fingerprint is None else {
            k: fingerprint.get(k) for k in ("model", "precision", "object_score", "short_side", "max_size",
                                            "postprocess", "templates")
        },
        "runs": len(used),
        "frames_run": frames_run,
        "trackeval": {
            "version": _trackeval_version(),
            "dataset": "MOTSChallenge (mask IoU, Hungarian matching per frame)",
            "metrics": "HOTA averaged over alpha 0.05..0.95; CLEAR (MOTA, IDSW) and Identity (IDF1) at IoU >= 0.5",
            "protocol": report["protocol"],
        },
        "classes": (
            "thing classes only (the ground truth has only things, no ignore regions; the mots writer writes thing "
            "segments); headline numbers class-agnostic (a track of the wrong class still matches)"
            + ("; per_class: each thing class scored alone (a TrackEval sequence per video and class), class_mean "
               "the mean over the classes with ground truth" if per_class else "")
            + "; run class ids mapped to the dataset's by name (0: not a dataset thing)"
        ),
    }
    return _finite(out)


# --- a model --------------------------------------------------------------------------------------------------------


def _weights_identity(model: Any) -> str:
    """``weights:<sha256>`` of a model's state dict (names, dtypes, shapes, values): a fingerprint model id."""
    import torch

    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        values = tensor.detach().cpu().contiguous()
        digest.update(f"{name}:{values.dtype}:{tuple(values.shape)};".encode())
        digest.update(values.reshape(-1).view(torch.uint8).numpy().tobytes())
    return f"weights:{digest.hexdigest()}"


def _mode_tracking(mode: str, tracker_config: TrackerConfig | None):  # noqa: ANN202 - TrackingOptions
    from masqclip_cli.inference.video_tracks import TrackingOptions

    if mode not in TRACK_MODES:
        raise ValueError(f"mode must be one of {', '.join(TRACK_MODES)}, got {mode!r}")
    if tracker_config is not None and not isinstance(tracker_config, TrackerConfig):
        raise TypeError(f"tracker_config must be a TrackerConfig, got {type(tracker_config).__name__}")
    if mode == "frame":
        return TrackingOptions(track=False)
    config = dataclasses.replace(tracker_config or TrackerConfig(), use_embeddings=mode == "iou+embedding")
    return TrackingOptions(track=True, config=config)


def evaluate_video_model(
    gt_root: str | os.PathLike[str],
    model: MasQCLIP,
    vocab: Vocabulary | str | os.PathLike[str] | None,
    mode: str,
    work_dir: str | os.PathLike[str],
    *,
    tracker_config: TrackerConfig | None = None,
    model_id: str | None = None,
    batch_size: int = 1,
    short_side: int | None = None,
    max_size: int | None = None,
    overwrite: bool = False,
    per_class: bool = True,
    on_video: Callable[[str, int, int], None] | None = None,
) -> dict[str, Any]:
    """Run ``model`` over every video of the dataset at ``gt_root`` in ``mode`` and score the runs.

    Each video ``videos/<name>.mp4`` (the lossy MP4, as a user would run it) is one
    :func:`~masqclip_cli.inference.engine.segment` run into ``work_dir/<name>/`` with task ``panoptic``, format
    ``mots``, the model's stored thresholds and test size (``short_side`` / ``max_size`` override it) and tracking
    per ``mode``: ``"frame"`` off (``--no-track``), ``"iou"`` the tracker with ``use_embeddings=False``
    (``--no-track-embeddings``), ``"iou+embedding"`` the tracker as configured (``tracker_config``, default
    :class:`~masqclip_cli.inference.tracking.TrackerConfig`; its ``use_embeddings`` is set by the mode). Finished runs
    in ``work_dir`` are reused (resume); one of other options is refused unless ``overwrite``.

    Args:
        vocab: the vocabulary (a :class:`Vocabulary` or a file / preset spec); None: the dataset's ``vocab.txt``. It
            is set on the model when the model's differs.
        model_id: the model's identity in the runs' fingerprints (the CLI's ``model_identity(name)``); None: a
            SHA-256 of its weights.
        on_video: progress callback ``(name, videos done, videos)``.

    Returns:
        :func:`evaluate_video_run`'s report plus ``"timing"``: ``seconds_per_frame`` (the runs' wall time per
        frame computed), ``model_seconds_per_frame``, ``track_seconds_per_frame``, ``frames_computed``,
        ``frames_reused``, ``batch_size``, ``torch_threads`` (wall-clock numbers: they vary between machines and
        runs; everything else is deterministic). A frame that failed or was skipped is a ValueError naming the video.
    """
    import torch

    from masqclip_cli.inference.engine import RunOptions, segment
    from masqclip_cli.inference.predictor import as_vocabulary, postprocess_config
    from masqclip_cli.inference.preprocess import test_size_of

    tracking = _mode_tracking(mode, tracker_config)
    if not isinstance(batch_size, int) or isinstance(batch_size, bool) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
    dataset = _dataset(gt_root)
    vocabulary = as_vocabulary(dataset.root / "vocab.txt" if vocab is None else vocab)
    if model.vocabulary != vocabulary:
        model.set_vocabulary(vocabulary, progress=False)
    own_size = test_size_of(model)
    options = RunOptions(
        formats=("mots",),
        postprocess=postprocess_config(model, ("panoptic",)),
        batch_size=batch_size,
        short_side=own_size["short_side"] if short_side is None else int(short_side),
        max_size=own_size["max_size"] if max_size is None else int(max_size),
        overwrite=overwrite,
        tracking=tracking,
    )
    identity = model_id if model_id is not None else _weights_identity(model)
    work = Path(work_dir)
    wall = model_s = track_s = 0.0
    computed = reused = 0
    for done, name in enumerate(dataset.names):
        entry = next(e for e in dataset.manifest["videos"] if str(e["name"]) == name)
        source = dataset.root / str(entry["video"])
        if not source.is_file():
            raise ValueError(f"{source}: the video of {name} is missing")
        summary = segment(model, vocabulary, str(source), work / name, options, identity)
        problems = summary.failed + summary.skipped
        if problems or summary.interrupted:
            reason = problems[0][1] if problems else "interrupted"
            raise ValueError(f"{source}: {len(problems)} frame(s) failed or were skipped ({reason})")
        wall += summary.wall_s
        model_s += summary.seconds.get("model", 0.0)
        track_s += summary.seconds.get("track", 0.0)
        computed += summary.done
        reused += summary.reused
        if on_video:
            on_video(name, done + 1, len(dataset.names))
    report = evaluate_video_run(dataset.root, work, per_class=per_class)
    if report["protocol"]["mode"] != mode:  # pragma: no cover - the run folders are ours
        raise ValueError(f"{work}: the runs are of mode {report['protocol']['mode']!r}, not {mode!r}")
    report["timing"] = {
        "seconds_per_frame": wall / computed if computed else None,
        "model_seconds_per_frame": model_s / computed if computed else None,
        "track_seconds_per_frame": track_s / computed if computed else None,
        "frames_computed": computed,
        "frames_reused": reused,
        "batch_size": batch_size,
        "torch_threads": torch.get_num_threads(),
    }
    return report
