"""Video instance tracking: MOTS txt files, and HOTA / CLEAR / Identity metrics computed by TrackEval.

MOTS txt (the MOTS Challenge / KITTI MOTS format): one line per object per frame, space-separated::

    frame track_id class_id height width rle

``rle`` is a COCO compressed RLE string (column-major, as pycocotools writes it) of an ``height`` x ``width`` mask.
Frames are numbered from ``first_frame`` (1 in MOTS Challenge, 0 in KITTI MOTS); :func:`read_mots` and
:func:`write_mots` take and give 0-based frame indices. By convention ``track_id = class_id * 1000 + instance``, and
class 10 marks an *ignore region* in MOTS Challenge / KITTI MOTS (nothing here relies on either: classes and ignore
classes are parameters). MOTS masks of one frame must not overlap: :func:`write_mots` resolves overlaps, by default
giving each contested pixel to the first mask listed for the frame (list them by decreasing confidence) and dropping a
mask left empty.

Evaluation protocol (:func:`evaluate_tracking`). TrackEval (the ``trackeval`` package, the metrics' reference
implementation) is run in its MOTS Challenge mode (``trackeval.datasets.MOTSChallenge``: mask IoU similarity,
Hungarian matching per frame) with the metrics ``HOTA`` (averaged over the localisation thresholds alpha = 0.05 ..
0.95), ``CLEAR`` (MOTA, IDSW, ...: a match needs IoU >= 0.5) and ``Identity`` (IDF1: IoU >= 0.5). That dataset
evaluates one class, ``pedestrian`` (class id 2), with class 10 as crowd-ignore regions (an unmatched prediction more
than half inside one is not counted), so the files are rewritten into a temporary TrackEval layout
(``gt/MOTS-test/<seq>/gt/gt.txt``, ``seqinfo.ini``, ``seqmaps/MOTS-test.txt``, ``trackers/MOTS-test/<tracker>/data/
<seq>.txt``) in one of two ways:

* ``classes="agnostic"`` (default): every evaluated class becomes class 2: tracks are matched whatever their class (a
  prediction of the wrong class still counts), one evaluation over all sequences.
* ``classes="per_class"``: one TrackEval sequence per (sequence, class): the ground truth and the predictions of that
  class (as class 2) and the ignore regions. A prediction of the wrong class is a false positive in its class and the
  object a miss in its own. The headline numbers are TrackEval's combination over all these sequences (sums of the
  counts, i.e. detection-averaged over classes, as its ``cls_comb_det_av``); ``class_averaged`` holds its
  class-averaged combination (``cls_comb_cls_av``) and ``per_class`` each class's numbers.

Ground-truth rows whose class is in ``ignore_class_ids`` become ignore regions (class 10) in every case; rows of a
class not evaluated (``class_ids``) are left out, as are predictions of such a class. Track ids are relabelled
1..n per file (TrackEval allocates arrays as large as the largest id) and sequences renamed ``s000``, ... (any file
name works); neither changes a metric. Frames with neither ground truth nor predictions change no metric, so a
sequence's length defaults to its last frame that has either (``seqinfo.ini`` / ``videos.json`` lengths are used when
present, and then a frame past the end is an error).

Numbers are reported as TrackEval prints them: ratios in percent (the HOTA family as the mean over alpha), counts as
integers. TrackEval prints as it goes and writes result files by default: both are switched off (its printing goes to
a buffer, its outputs to the temporary folder, which is deleted).

numpy 2: TrackEval 1.3.0 (the PyPI release, a maintained fork of the original) no longer uses the aliases numpy 1.24
removed (``np.float``, ``np.int``, ``np.bool``), so numpy is left untouched. Only for an older TrackEval (a version
below 1.3, or a bare git checkout without metadata) under numpy >= 1.24 does :func:`_import_trackeval` put them back
first, pointing at the builtins as they did. On the MOTS path TrackEval imports only numpy, scipy and pycocotools (its
declared opencv-python / matplotlib / tabulate serve other datasets and plots; without ``tabulate`` its BURST datasets
print an import error, which is silenced).
"""

from __future__ import annotations

import configparser
import contextlib
import io
import itertools
import json
import os
import tempfile
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from masqclip_cli.io.files import atomic_write_chunks, atomic_write_text
from masqclip_cli.io.writers.mots import mots_line
from masqclip_cli.structures.masks import claim_pixels, decode_rle, encode_rle

__all__ = [
    "MOTS_IGNORE_CLASS_ID",
    "TRACKING_METRICS",
    "MotsObject",
    "evaluate_tracking",
    "mots_to_id_maps",
    "read_mots",
    "write_mots",
]

#: The class id of ignore regions in MOTS Challenge and KITTI MOTS.
MOTS_IGNORE_CLASS_ID = 10
#: The headline numbers of :func:`evaluate_tracking`, in report order.
TRACKING_METRICS = ("HOTA", "DetA", "AssA", "IDF1", "MOTA", "IDSW")

_TE_CLASS = 2  # TrackEval MOTSChallenge's only class, "pedestrian"
_TE_IGNORE = 10
_TE_SPLIT = "test"
_TE_BENCHMARK = "MOTS"
_TE_TRACKER = "pred"
_RLE_CHARS = frozenset(chr(c) for c in range(48, 48 + 64))
_HOTA_FIELDS = ("HOTA", "DetA", "AssA", "DetRe", "DetPr", "AssRe", "AssPr", "LocA", "OWTA")
_CLEAR_FLOAT = ("MOTA", "MOTP", "MODA", "CLR_Re", "CLR_Pr", "MTR", "PTR", "MLR", "sMOTA")
_CLEAR_INT = ("CLR_TP", "CLR_FN", "CLR_FP", "IDSW", "MT", "PT", "ML", "Frag")
_ID_FLOAT = ("IDF1", "IDR", "IDP")
_ID_INT = ("IDTP", "IDFN", "IDFP")
_COUNT_INT = ("Dets", "GT_Dets", "IDs", "GT_IDs")


# --- MOTS txt -----------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class MotsObject:
    """One row of a MOTS txt file: a 0-based ``frame``, ``track_id``, ``class_id`` and the mask as a COCO compressed
    RLE ``{"size": [height, width], "counts": str}``."""

    frame: int
    track_id: int
    class_id: int
    rle: dict[str, Any]

    @property
    def size(self) -> tuple[int, int]:
        return int(self.rle["size"][0]), int(self.rle["size"][1])

    @property
    def mask(self) -> np.ndarray:
        """(H, W) bool: the decoded mask."""
        return decode_rle(self.rle)


def _is_int(value: Any) -> bool:
    return isinstance(value, (int, np.integer)) and not isinstance(value, bool)


def _as_masks(masks: Any, count: int, where: str) -> tuple[list[np.ndarray], tuple[int, int]]:
    """Decoded (H, W) bool masks from an (N, H, W) array, a sequence of (H, W) arrays or of RLE dicts."""
    if isinstance(masks, np.ndarray):
        if masks.ndim != 3:
            raise ValueError(f"{where}: masks must be an (N, H, W) array, got shape {masks.shape}")
        decoded = [masks[i] != 0 for i in range(masks.shape[0])]
    else:
        decoded = []
        for m in masks:
            if isinstance(m, Mapping):
                try:
                    decoded.append(decode_rle(m))
                except (KeyError, TypeError, ValueError) as err:
                    raise ValueError(f"{where}: a mask is not a valid RLE ({err})") from None
            else:
                m = np.asarray(m)
                if m.ndim != 2:
                    raise ValueError(f"{where}: a mask must be 2-D, got shape {m.shape}")
                decoded.append(m != 0)
    if len(decoded) != count:
        raise ValueError(f"{where}: {count} track ids but {len(decoded)} masks")
    sizes = {m.shape for m in decoded}
    if len(sizes) > 1:
        raise ValueError(f"{where}: masks of different sizes {sorted(sizes)}")
    return decoded, (next(iter(sizes)) if sizes else (0, 0))


def write_mots(
    path: str | os.PathLike[str],
    frames: Iterable[tuple[int, Sequence[int], Sequence[int], Any]],
    *,
    overlap: str = "first",
    first_frame: int = 1,
) -> int:
    """Write a MOTS txt file (atomically, streamed) and return the number of rows written.

    ``frames`` yields ``(frame_index, track_ids, class_ids, masks)`` per frame, frame indices 0-based and strictly
    increasing (frames without objects may be skipped); ``masks`` is an (N, H, W) array, a sequence of (H, W) arrays
    (nonzero = inside) or of COCO RLE dicts; every mask of the file has the same size. Track ids must be distinct
    within a frame, ids and classes non-negative integers.

    Overlaps (MOTS masks must not overlap): ``overlap="first"`` gives a pixel claimed by several masks of a frame to
    the first of them in the order given (pass them by decreasing score) and drops a mask left empty;
    ``overlap="error"`` raises ValueError instead. Empty masks are never written. The file names frames from
    ``first_frame`` (1: MOTS Challenge, 0: KITTI MOTS).
    """
    if overlap not in ("first", "error"):
        raise ValueError(f"overlap must be 'first' or 'error', got {overlap!r}")
    if not _is_int(first_frame) or first_frame < 0:
        raise ValueError(f"first_frame must be a non-negative integer, got {first_frame!r}")
    path = Path(path)
    rows = 0

    def lines():
        nonlocal rows
        previous = -1
        file_size: tuple[int, int] | None = None
        for item in frames:
            try:
                frame, track_ids, class_ids, masks = item
            except (TypeError, ValueError):
                raise ValueError(f"{path}: each frame must be (frame_index, track_ids, class_ids, masks)") from None
            if not _is_int(frame) or frame < 0:
                raise ValueError(f"{path}: frame index must be a non-negative integer, got {frame!r}")
            if frame <= previous:
                raise ValueError(f"{path}: frame indices must increase, got {frame} after {previous}")
            previous = int(frame)
            where = f"{path}: frame {frame}"
            track_ids, class_ids = list(track_ids), list(class_ids)
            if len(track_ids) != len(class_ids):
                raise ValueError(f"{where}: {len(track_ids)} track ids but {len(class_ids)} class ids")
            if not all(_is_int(v) and v >= 0 for v in track_ids + class_ids):
                raise ValueError(f"{where}: track and class ids must be non-negative integers")
            if len(set(track_ids)) != len(track_ids):
                raise ValueError(f"{where}: a track id occurs twice")
            decoded, size = _as_masks(masks, len(track_ids), where)
            if not decoded:
                continue
            if file_size is None:
                file_size = size
            elif size != file_size:
                raise ValueError(f"{where}: masks are {size[0]}x{size[1]}, earlier ones {file_size[0]}x{file_size[1]}")
            claimed = claim_pixels(decoded)
            out = []
            for track_id, class_id, mask, kept in zip(track_ids, class_ids, decoded, claimed):
                if overlap == "error" and kept.sum() != mask.sum():
                    raise ValueError(f"{where}: the mask of track {track_id} overlaps an earlier one")
                if kept.any():
                    out.append(mots_line(frame + first_frame, track_id, class_id, size[0], size[1],
                                         encode_rle(kept)["counts"]))
            rows += len(out)
            yield "".join(out)

    atomic_write_chunks(path, lines())
    return rows


def read_mots(path: str | os.PathLike[str], *, first_frame: int = 1) -> list[MotsObject]:
    """The rows of a MOTS txt file, in file order, with 0-based frames (the file numbers them from ``first_frame``).

    Blank lines are skipped. A malformed line (not 6 fields, non-integer numbers, a frame before ``first_frame``, a
    bad RLE string), the same track id twice in a frame or masks of different sizes are a ValueError naming the file
    and line. Overlaps are not checked here (:func:`evaluate_tracking` does).
    """
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as err:
        raise ValueError(f"{path}: cannot read MOTS file ({err.strerror or err})") from None
    except UnicodeDecodeError:
        raise ValueError(f"{path}: not a text file") from None
    objects: list[MotsObject] = []
    seen: set[tuple[int, int]] = set()
    size: tuple[int, int] | None = None
    for number, line in enumerate(text.splitlines(), start=1):
        fields = line.split()
        if not fields:
            continue
        where = f"{path}:{number}"
        if len(fields) != 6:
            raise ValueError(
                f"{where}: expected 6 fields (frame track_id class_id height width rle), got {len(fields)}"
            )
        try:
            frame, track_id, class_id, height, width = (int(v) for v in fields[:5])
        except ValueError:
            raise ValueError(f"{where}: frame, track id, class id, height and width must be integers") from None
        if frame < first_frame:
            raise ValueError(f"{where}: frame {frame} is before the first frame {first_frame}")
        if track_id < 0 or class_id < 0:
            raise ValueError(f"{where}: track and class ids must be non-negative")
        if height <= 0 or width <= 0:
            raise ValueError(f"{where}: mask size must be positive, got {height}x{width}")
        if size is None:
            size = (height, width)
        elif (height, width) != size:
            raise ValueError(f"{where}: mask size {height}x{width} differs from the file's {size[0]}x{size[1]}")
        counts = fields[5]
        if not set(counts) <= _RLE_CHARS:
            raise ValueError(f"{where}: not a COCO compressed RLE string")
        key = (frame, track_id)
        if key in seen:
            raise ValueError(f"{where}: track {track_id} occurs twice in frame {frame}")
        seen.add(key)
        objects.append(MotsObject(frame - first_frame, track_id, class_id, {"size": [height, width], "counts": counts}))
    return objects


def mots_to_id_maps(objects: Iterable[MotsObject], num_frames: int, height: int, width: int) -> np.ndarray:
    """(num_frames, height, width) int64 maps of track ids (0 = no object) from MOTS rows; rows of frames past
    ``num_frames``, masks of another size and overlapping masks are a ValueError."""
    out = np.zeros((int(num_frames), int(height), int(width)), dtype=np.int64)
    for obj in objects:
        if not 0 <= obj.frame < num_frames:
            raise ValueError(f"frame {obj.frame} is outside 0..{num_frames - 1}")
        if obj.size != (height, width):
            raise ValueError(f"a mask is {obj.size[0]}x{obj.size[1]}, expected {height}x{width}")
        mask = obj.mask
        if (out[obj.frame][mask] != 0).any():
            raise ValueError(f"frame {obj.frame}: the mask of track {obj.track_id} overlaps another")
        out[obj.frame][mask] = obj.track_id
    return out


# --- TrackEval ----------------------------------------------------------------------------------------------------

# numpy 1.x aliases that numpy 1.24 removed; TrackEval copies older than 1.3.0 (git checkouts) still use them.
_NUMPY_ALIASES = {"float": float, "int": int, "bool": bool, "object": object, "str": str}


def _import_trackeval():
    """``trackeval``, imported with its import-time printing silenced. For a TrackEval older than 1.3.0 under
    numpy >= 1.24 the removed aliases (``np.float`` ...) are first put back, pointing at the builtins as they did;
    1.3.0 needs none, and then numpy is left untouched."""
    version = _trackeval_version()
    if _version_tuple(version) < (1, 3) and _version_tuple(np.__version__) >= (1, 24):
        for name, builtin in _NUMPY_ALIASES.items():
            if name not in np.__dict__:
                setattr(np, name, builtin)
    try:
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
            import trackeval
    except ImportError as err:
        raise ImportError(
            "tracking evaluation needs TrackEval: pip install --no-deps trackeval==1.3.0 (it needs numpy, scipy and "
            f"pycocotools, already installed) ({err})"
        ) from None
    return trackeval


def _version_tuple(version: str) -> tuple[int, ...]:
    parts = []
    for piece in version.split(".")[:3]:
        digits = "".join(itertools.takewhile(str.isdigit, piece))
        if not digits:
            break
        parts.append(int(digits))
    return tuple(parts)


def _trackeval_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("trackeval")
    except PackageNotFoundError:  # not installed (the import then fails), or a bare checkout on sys.path
        return "unknown"


def _sequence_files(source: Any, what: str) -> tuple[dict[str, Path], dict[str, int]]:
    """(sequence name -> MOTS file, sequence name -> length where a seqinfo.ini / videos.json gives it)."""
    lengths: dict[str, int] = {}
    if isinstance(source, Mapping):
        files = {str(k): Path(v) for k, v in source.items()}
    elif isinstance(source, (str, os.PathLike)):
        folder = Path(source)
        if folder.is_file():
            raise ValueError(f"{folder}: {what} must be a folder of MOTS files or a mapping sequence -> file")
        if not folder.is_dir():
            raise ValueError(f"{folder}: {what} folder not found")
        manifest = folder / "videos.json"
        if manifest.is_file() and (folder / "gt").is_dir():  # a synthetic video dataset's root
            try:
                entries = json.loads(manifest.read_text(encoding="utf-8"))["videos"]
                files = {str(e["name"]): folder / e["gt"] for e in entries}
                lengths = {str(e["name"]): int(e["num_frames"]) for e in entries}
            except (OSError, ValueError, KeyError, TypeError) as err:
                raise ValueError(f"{manifest}: not a synthetic video manifest ({err})") from None
        else:
            files = {p.stem: p for p in sorted(folder.glob("*.txt")) if p.is_file()}
            if not files:  # MOTS Challenge layout: <seq>/gt/gt.txt (+ <seq>/seqinfo.ini)
                for sub in sorted(p for p in folder.iterdir() if p.is_dir()):
                    if (sub / "gt" / "gt.txt").is_file():
                        files[sub.name] = sub / "gt" / "gt.txt"
                        ini = sub / "seqinfo.ini"
                        if ini.is_file():
                            parser = configparser.ConfigParser()
                            try:
                                parser.read(ini, encoding="utf-8")
                                lengths[sub.name] = int(parser["Sequence"]["seqLength"])
                            except (configparser.Error, KeyError, ValueError):
                                raise ValueError(f"{ini}: no [Sequence] seqLength") from None
        if not files:
            raise ValueError(f"{folder}: no MOTS files (<seq>.txt or <seq>/gt/gt.txt) in the {what} folder")
    else:
        raise TypeError(f"{what} must be a folder or a mapping sequence -> file, got {type(source).__name__}")
    return files, lengths


def _prediction_files(folder: Path, gt_files: Mapping[str, Path]) -> dict[str, Path]:
    """Ground-truth sequence -> prediction file in ``folder``: ``<seq>.txt``, or else ``<seq><video ext>.txt`` as the
    ``mots`` writer names a video's file (``000000.mp4.txt``); files in subfolders count by their relative path."""
    from masqclip_cli.io.sources import VIDEO_EXTENSIONS

    if not folder.is_dir():
        raise ValueError(f"{folder}: predictions folder not found")
    found = {p.relative_to(folder).as_posix()[: -len(".txt")]: p for p in sorted(folder.rglob("*.txt")) if p.is_file()}
    out: dict[str, Path] = {}
    for seq in gt_files:
        if seq in found:
            out[seq] = found[seq]
            continue
        candidates = [found[seq + ext] for ext in VIDEO_EXTENSIONS if seq + ext in found]
        if len(candidates) > 1:
            names = ", ".join(p.name for p in candidates)
            raise ValueError(f"{folder}: several prediction files for sequence {seq}: {names}")
        if candidates:
            out[seq] = candidates[0]
    return out


def _check_overlaps(objects: Sequence[MotsObject], where: Path) -> None:
    from pycocotools import mask as mask_util

    by_frame: dict[int, list[MotsObject]] = {}
    for obj in objects:
        by_frame.setdefault(obj.frame, []).append(obj)
    for frame, objs in sorted(by_frame.items()):
        if len(objs) < 2:
            continue
        rles = [{"size": o.rle["size"], "counts": o.rle["counts"].encode("ascii")} for o in objs]
        total = float(np.sum(mask_util.area(rles)))
        union = float(mask_util.area(mask_util.merge(rles, intersect=False)))
        if union != total:
            raise ValueError(f"{where}: masks overlap in frame {frame} (MOTS masks must not overlap)")


def _te_lines(objects: Iterable[MotsObject], class_of: Mapping[int, int]) -> list[str]:
    """TrackEval MOTS lines (1-based frames) of the objects whose class maps to a TrackEval class, ids relabelled
    1..n in order of first appearance (ignore regions: id 0)."""
    ids: dict[int, int] = {}
    lines = []
    for obj in objects:
        te_class = class_of.get(obj.class_id)
        if te_class is None:
            continue
        if te_class == _TE_IGNORE:
            te_id = 0
        else:
            te_id = ids.setdefault(obj.track_id, len(ids) + 1)
        h, w = obj.size
        lines.append(f"{obj.frame + 1} {te_id} {te_class} {h} {w} {obj.rle['counts']}\n")
    return lines


def _summary(results: Mapping[str, Mapping[str, Any]]) -> dict[str, Any]:
    """The reported numbers of one TrackEval result (HOTA, CLEAR, Identity, Count): percent / integers."""
    hota, clear, ident, count = results["HOTA"], results["CLEAR"], results["Identity"], results["Count"]
    out: dict[str, Any] = {}
    for name in _HOTA_FIELDS:
        out[name] = float(100.0 * np.mean(hota[name]))
    out["HOTA(0)"] = float(100.0 * hota["HOTA(0)"])
    for name in _ID_FLOAT:
        out[name] = float(100.0 * ident[name])
    for name in _CLEAR_FLOAT:
        out[name] = float(100.0 * clear[name])
    for name in _CLEAR_INT:
        out[name] = int(clear[name])
    for name in _ID_INT:
        out[name] = int(ident[name])
    for name in _COUNT_INT:
        out[name] = int(count[name])
    return out


def evaluate_tracking(
    gt: str | os.PathLike[str] | Mapping[str, str | os.PathLike[str]],
    predictions: str | os.PathLike[str] | Mapping[str, str | os.PathLike[str]],
    *,
    classes: str = "agnostic",
    class_ids: Iterable[int] | None = None,
    ignore_class_ids: Iterable[int] = (),
    seq_lengths: Mapping[str, int] | None = None,
    first_frame: int = 1,
) -> dict[str, Any]:
    """HOTA, DetA, AssA, IDF1, MOTA, IDSW (and the rest of TrackEval's HOTA / CLEAR / Identity numbers) of predicted
    MOTS files against ground-truth MOTS files, computed by TrackEval's MOTS Challenge evaluation (see the module
    docstring for the protocol).

    ``gt`` is a folder of ``<seq>.txt`` MOTS files, a MOTS Challenge folder (``<seq>/gt/gt.txt`` with
    ``<seq>/seqinfo.ini``), a synthetic video dataset's root (``videos.json`` + ``gt/``), or a mapping sequence ->
    file; ``predictions`` a folder of ``<seq>.txt`` files (or ``<seq>.mp4.txt``, as the ``mots`` writer names a
    video's file; subfolders count by relative path) or a mapping. Every ground-truth sequence needs a prediction
    file (an empty file is a tracker that found nothing); extra prediction files are ignored. ``class_ids``: the
    classes evaluated (default: every class in the ground truth or the predictions but the ignore classes);
    ``ignore_class_ids``: ground-truth classes that are ignore regions (``(10,)`` for MOTS Challenge / KITTI MOTS, none
    for the synthetic videos); ``seq_lengths`` overrides the sequence lengths; ``first_frame`` is how the files number
    their first frame (1, or 0 for KITTI MOTS).

    Returns ``{"HOTA", "DetA", "AssA", "IDF1", "MOTA", "IDSW", <the other numbers>, "sequences", "frames",
    "per_sequence": {seq: {...}}, "protocol": str}``, plus ``"per_class": {class_id: {...}}`` and
    ``"class_averaged": {...}`` with ``classes="per_class"``. Bad files are a ValueError naming the file.
    """
    if classes not in ("agnostic", "per_class"):
        raise ValueError(f"classes must be 'agnostic' or 'per_class', got {classes!r}")
    ignore = {int(c) for c in ignore_class_ids}
    gt_files, known_lengths = _sequence_files(gt, "ground-truth")
    if isinstance(predictions, Mapping):
        pred_files = {str(k): Path(v) for k, v in predictions.items()}
    else:
        pred_files = _prediction_files(Path(predictions), gt_files)
    missing = sorted(set(gt_files) - set(pred_files))
    if missing:
        shown = ", ".join(missing[:5]) + (" ..." if len(missing) > 5 else "")
        raise ValueError(f"no prediction file for {len(missing)} ground-truth sequence(s): {shown}")
    if seq_lengths:
        known_lengths = {**known_lengths, **{str(k): int(v) for k, v in seq_lengths.items()}}

    sequences = sorted(gt_files)
    gt_rows = {s: read_mots(gt_files[s], first_frame=first_frame) for s in sequences}
    pred_rows = {s: read_mots(pred_files[s], first_frame=first_frame) for s in sequences}
    lengths: dict[str, int] = {}
    for s in sequences:
        _check_overlaps(gt_rows[s], gt_files[s])
        _check_overlaps(pred_rows[s], pred_files[s])
        sizes = {o.size for o in gt_rows[s]} | {o.size for o in pred_rows[s]}
        if len(sizes) > 1:
            raise ValueError(f"{pred_files[s]}: mask size {sorted(sizes)} differs from the ground truth's")
        last = max((o.frame for o in gt_rows[s] + pred_rows[s]), default=-1)
        if s in known_lengths:
            lengths[s] = known_lengths[s]
            for rows, file in ((gt_rows[s], gt_files[s]), (pred_rows[s], pred_files[s])):
                late = max((o.frame for o in rows), default=-1)
                if late >= lengths[s]:
                    raise ValueError(f"{file}: frame index {late} is past the sequence's {lengths[s]} frames")
        else:
            lengths[s] = max(last + 1, 1)

    present = {o.class_id for s in sequences for o in gt_rows[s] + pred_rows[s]} - ignore
    evaluated = sorted(present if class_ids is None else {int(c) for c in class_ids} - ignore)

    # TrackEval sequences: (name, source sequence, class id or None, gt map, prediction map).
    plans: list[tuple[str, str, int | None]] = []
    for i, s in enumerate(sequences):
        if classes == "agnostic":
            plans.append((f"s{i:04d}", s, None))
        else:
            plans.extend((f"s{i:04d}c{c}", s, c) for c in evaluated)

    trackeval = _import_trackeval()
    with tempfile.TemporaryDirectory(prefix="masqclip-trackeval-") as tmp:
        gt_root = Path(tmp, "gt")
        split_dir = gt_root / f"{_TE_BENCHMARK}-{_TE_SPLIT}"
        tracker_dir = Path(tmp, "trackers", f"{_TE_BENCHMARK}-{_TE_SPLIT}", _TE_TRACKER, "data")
        for name, s, c in plans:
            wanted = set(evaluated) if c is None else {c}
            gt_map = {k: _TE_CLASS for k in wanted} | {k: _TE_IGNORE for k in ignore}
            pred_map = {k: _TE_CLASS for k in wanted}
            atomic_write_chunks(split_dir / name / "gt" / "gt.txt", _te_lines(gt_rows[s], gt_map))
            atomic_write_chunks(tracker_dir / f"{name}.txt", _te_lines(pred_rows[s], pred_map))
            h, w = next((o.size for o in gt_rows[s] + pred_rows[s]), (0, 0))
            atomic_write_text(
                split_dir / name / "seqinfo.ini",
                f"[Sequence]\nname={name}\nseqLength={lengths[s]}\nimWidth={w}\nimHeight={h}\n",
            )
        atomic_write_text(
            gt_root / "seqmaps" / f"{_TE_BENCHMARK}-{_TE_SPLIT}.txt", "name\n" + "".join(f"{n}\n" for n, _, _ in plans)
        )
        eval_config = {
            "USE_PARALLEL": False,
            "BREAK_ON_ERROR": True,
            "RETURN_ON_ERROR": False,
            "LOG_ON_ERROR": None,
            "PRINT_RESULTS": False,
            "PRINT_ONLY_COMBINED": False,
            "PRINT_CONFIG": False,
            "TIME_PROGRESS": False,
            "DISPLAY_LESS_PROGRESS": True,
            "OUTPUT_SUMMARY": False,
            "OUTPUT_EMPTY_CLASSES": False,
            "OUTPUT_DETAILED": False,
            "PLOT_CURVES": False,
        }
        dataset_config = {
            "GT_FOLDER": str(gt_root),
            "TRACKERS_FOLDER": str(Path(tmp, "trackers")),
            "OUTPUT_FOLDER": str(Path(tmp, "output")),
            "TRACKERS_TO_EVAL": [_TE_TRACKER],
            "CLASSES_TO_EVAL": ["pedestrian"],
            "SPLIT_TO_EVAL": _TE_SPLIT,
            "INPUT_AS_ZIP": False,
            "PRINT_CONFIG": False,
            "TRACKER_SUB_FOLDER": "data",
            "OUTPUT_SUB_FOLDER": "",
            "SKIP_SPLIT_FOL": False,
        }
        log = io.StringIO()
        try:
            with contextlib.redirect_stdout(log), contextlib.redirect_stderr(log):
                trackeval._timing.DO_TIMING = False
                evaluator = trackeval.Evaluator(eval_config)
                dataset = trackeval.datasets.MOTSChallenge(dataset_config)
                metrics = [
                    trackeval.metrics.HOTA(),
                    trackeval.metrics.CLEAR({"THRESHOLD": 0.5, "PRINT_CONFIG": False}),
                    trackeval.metrics.Identity({"THRESHOLD": 0.5, "PRINT_CONFIG": False}),
                ]
                output, messages = evaluator.evaluate([dataset], metrics)
        except trackeval.utils.TrackEvalException as err:
            raise ValueError(f"TrackEval could not evaluate the files: {err}") from None
        result = output["MOTSChallenge"][_TE_TRACKER]
        if result is None:  # pragma: no cover - BREAK_ON_ERROR raises first
            raise ValueError(f"TrackEval could not evaluate the files: {messages['MOTSChallenge'][_TE_TRACKER]}")

    metric_objs = {m.get_name(): m for m in metrics + [trackeval.metrics.Count()]}

    def combine(names: Sequence[str]) -> dict[str, Any]:
        return {
            metric: obj.combine_sequences({n: result[n]["pedestrian"][metric] for n in names})
            for metric, obj in metric_objs.items()
        }

    report: dict[str, Any] = _summary(result["COMBINED_SEQ"]["pedestrian"])
    report["sequences"] = len(sequences)
    report["frames"] = int(sum(lengths.values()))
    report["per_sequence"] = {s: _summary(combine([n for n, src, _ in plans if src == s])) for s in sequences}
    if classes == "per_class":
        by_class = {c: combine([n for n, _, cc in plans if cc == c]) for c in evaluated}
        report["per_class"] = {c: _summary(r) for c, r in by_class.items()}
        if by_class:
            report["class_averaged"] = _summary(
                {
                    m: obj.combine_classes_class_averaged({c: r[m] for c, r in by_class.items()})
                    for m, obj in metric_objs.items()
                }
            )
    report["protocol"] = _protocol(classes, evaluated, sorted(ignore), len(sequences), report["frames"])
    return report


def _protocol(classes: str, evaluated: Sequence[int], ignore: Sequence[int], sequences: int, frames: int) -> str:
    mode = (
        "class-agnostic (every evaluated class scored as TrackEval's single MOTS class)"
        if classes == "agnostic"
        else "per class (one TrackEval sequence per sequence and class; headline numbers summed over classes, "
        "class_averaged = mean over classes)"
    )
    return (
        f"TrackEval {_trackeval_version()} MOTSChallenge: mask IoU, HOTA averaged over alpha 0.05..0.95, CLEAR and "
        f"Identity at IoU >= 0.5; {mode}; classes {list(evaluated)}; ignore-region classes {list(ignore) or 'none'}; "
        f"{sequences} sequence(s), {frames} frame(s); track ids relabelled per file"
    )
