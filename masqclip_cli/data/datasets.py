"""Evaluation datasets: the ground truth ``masqclip eval`` scores against.

:func:`load_dataset` reads a dataset's listing (folders and JSON files) and returns an :class:`EvalDataset`: its
vocabulary, test resolution, task and a sorted list of :class:`EvalSample`. Nothing is decoded when a dataset is
loaded; each sample reads its own ground truth when asked (:meth:`EvalSample.semantic_gt`,
:meth:`EvalSample.panoptic_gt`), and :meth:`EvalDataset.instance_gt_coco` builds the COCO instance ground truth on
demand. Every problem with the files is a :class:`DatasetError` whose message is one line naming the file, folder or
id at fault.

The registry
------------

:data:`DATASETS` is the one table of datasets: one :class:`DatasetInfo` entry per name holds both its description
(task, default layout, vocabulary, ignore convention, test resolution, how to prepare it) and its loader, the
function :func:`load_dataset` calls. :func:`load_dataset` and the docs read it (:func:`datasets_markdown` writes
docs/datasets.md, the page that lists every dataset and how to prepare it).
Adding a dataset is adding one entry there: a dataset in a format already read (COCO panoptic JSON + PNGs,
semantic label maps, a COCO instance JSON) needs only its entry (its default ``paths`` under root, its preset, ignore
value and test size); a new format also needs its loader function.

All default paths are relative to ``root`` (``--root``; default ``$DETECTRON2_DATASETS``, else ``./datasets``,
the detectron2 convention), so one folder prepared for detectron2 / Mask2Former / FC-CLIP / MasQCLIP works as is.
Path options (``images=``, ``panoptic_json=``, ``panoptic_dir=``, ``labels=``, ``annotations=``) replace a default
path and are used as given (relative to the current directory, not to ``root``).

Sample ids
----------

A sample's :attr:`EvalSample.id` is its image path relative to the dataset's image folder, with ``/`` separators:
exactly the item id ``masqclip segment <image folder>`` gives that image, so the files ``segment`` writes
(``labels/<id>.png``, ``panoptic.json`` ``file_name``, COCO ``images``) are matched to the ground truth by id.
Samples are sorted by id. In :meth:`EvalDataset.instance_gt_coco` an image's COCO id is its 1-based rank in that
order, as in the ``coco`` writer's output.

Ground truth conventions
------------------------

* Class indices are contiguous indices into :attr:`EvalDataset.vocabulary`; ``-1`` is "ignore" in every semantic
  map this module returns.
* Panoptic datasets (COCO panoptic format: a JSON with ``images``, ``annotations[].segments_info`` and
  ``categories``, plus one PNG per image whose segment id is ``R + 256 G + 256^2 B``, 0 = void) give all three
  tasks: panoptic; semantic, derived from the panoptic PNG (void and crowd pixels are ignored); and instance, the
  thing segments as COCO annotations (``iscrowd`` kept). A pixel id that the JSON does not list is an error.
* JSON category ids map onto the vocabulary by id when the vocabulary has ids (the COCO presets, or a vocabulary
  read from the JSON's own ``categories``) and by name otherwise. The official ADE20K panoptic JSON (Mask2Former's
  ``prepare_ade20k_pan_seg.py``) numbers its categories 0..149, with names such as ``"road, route"``; the
  ``ade20k-150`` preset has no ids, so those categories map by name (the full synonym list, the display name, or the
  JSON name's first comma-separated part), which works whatever the numbering (0..149 or 1..150). A segment or
  annotation whose category the vocabulary lacks is a :class:`DatasetError` naming the file and the id.
* Semantic label files hold one value per pixel; the value is the contiguous class index except for the original
  ADE20K-150 annotations (``annotations/``: 1..150, 0 = ignore, so index = value - 1). Any other value that is
  neither a class nor the ignore value is an error naming the file and the value.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any

import numpy as np
import pycocotools.mask as mask_util
from PIL import Image, UnidentifiedImageError

from masqclip_cli.io.sources import IMAGE_EXTENSIONS
from masqclip_cli.structures.masks import encode_rle, segment_stats
from masqclip_cli.vocab import Vocabulary, category_ids, load_file, load_preset, load_vocabulary

__all__ = [
    "DATASETS",
    "LABEL_EXTENSIONS",
    "DatasetError",
    "DatasetInfo",
    "EvalDataset",
    "EvalSample",
    "GTSegment",
    "default_root",
    "load_dataset",
]

#: Extensions of semantic label files (case-insensitive).
LABEL_EXTENSIONS: tuple[str, ...] = (".png", ".tif", ".tiff")

# Tasks each kind of ground truth supports.
_TASKS_OF: dict[str, tuple[str, ...]] = {
    "panoptic": ("panoptic", "semantic", "instance"),
    "semantic": ("semantic",),
    "instance": ("instance",),
}


class DatasetError(ValueError):
    """A dataset's files are missing or inconsistent. ``str(error)`` is one line naming the file / folder / id."""

    def __init__(self, message: str) -> None:
        super().__init__(" ".join(str(message).split()))


# --------------------------------------------------------------------------------------------------------------------
# Ground-truth records


@dataclass(frozen=True)
class GTSegment:
    """One ground-truth panoptic segment: its id in the panoptic PNG, its contiguous class index, its crowd flag and
    whether its class is a thing (from the dataset vocabulary)."""

    id: int
    category: int
    iscrowd: bool
    isthing: bool


@dataclass(frozen=True)
class _LabelCodec:
    """How a semantic label file's values become contiguous class indices: ``index = value - offset``; ``ignore``
    (a raw value) becomes -1; anything else outside 0..num_classes-1 is an error."""

    num_classes: int
    offset: int = 0
    ignore: int | None = None

    def decode(self, raw: np.ndarray, source: Path) -> np.ndarray:
        raw = np.asarray(raw)
        values = raw.astype(np.int64)
        out = values - self.offset
        ignored = values == self.ignore if self.ignore is not None else np.zeros(values.shape, dtype=bool)
        bad = ~ignored & ((out < 0) | (out >= self.num_classes))
        if bad.any():
            value = int(values[bad].flat[0])
            allowed = f"{self.offset}..{self.offset + self.num_classes - 1}"
            ignore = f" or the ignore value {self.ignore}" if self.ignore is not None else ""
            raise DatasetError(f"{source}: label value {value} is not a class ({allowed}){ignore}")
        out[ignored] = -1
        return out


@dataclass
class EvalSample:
    """One image of an evaluation dataset and where its ground truth is (read only when asked).

    ``id`` is the image path relative to the dataset's image folder (POSIX separators), the item id
    ``masqclip segment <image folder>`` gives it; ``image_id`` is the dataset's own id (the COCO image id, or the file
    stem when the dataset has none). ``label_path`` is the semantic label file or the panoptic PNG; ``segments`` the
    panoptic segments listed in the JSON (panoptic datasets only); ``height`` / ``width`` the size the annotation file
    states, when it states one.
    """

    id: str
    image_path: Path
    image_id: int | str
    label_path: Path | None = None
    segments: tuple[GTSegment, ...] | None = None
    height: int | None = None
    width: int | None = None
    codec: _LabelCodec | None = field(default=None, repr=False, compare=False)

    # --- ground truth ------------------------------------------------------------------------------------------------
    def panoptic_gt(self) -> tuple[np.ndarray, list[GTSegment]]:
        """``(ids, segments)``: the (H, W) int64 segment-id map of the panoptic PNG (0 = void) and the segments the
        JSON lists for it. A pixel id the JSON does not list is a :class:`DatasetError`."""
        if self.segments is None or self.label_path is None:
            raise DatasetError(f"sample {self.id!r}: this dataset has no panoptic ground truth")
        arr = _read_array(self.label_path, "panoptic PNG").astype(np.int64)
        if arr.ndim != 3 or arr.shape[2] != 3:
            raise DatasetError(f"{self.label_path}: a panoptic PNG must be RGB")
        ids = arr[..., 0] + 256 * arr[..., 1] + 65536 * arr[..., 2]
        self._check_size(ids.shape, self.label_path)
        listed = {s.id for s in self.segments}
        present = np.unique(ids)
        unknown = [int(v) for v in present if v != 0 and int(v) not in listed]
        if unknown:
            raise DatasetError(
                f"{self.label_path}: segment id {unknown[0]} is in the PNG but not in the JSON's "
                f"segments_info for image {self.image_id!r}"
            )
        return ids, list(self.segments)

    def semantic_gt(self) -> np.ndarray:
        """(H, W) int64 contiguous class index, -1 = ignore. Panoptic datasets derive it from the panoptic ground
        truth (void and crowd pixels are ignored); semantic datasets read the label file."""
        if self.segments is not None:
            ids, segments = self.panoptic_gt()
            lut = {s.id: (-1 if s.iscrowd else s.category) for s in segments}
            present, inverse = np.unique(ids, return_inverse=True)
            classes = np.array([lut.get(int(v), -1) for v in present], dtype=np.int64)
            return classes[inverse.reshape(ids.shape)]
        if self.codec is None or self.label_path is None:
            raise DatasetError(f"sample {self.id!r}: this dataset has no semantic ground truth")
        raw = _read_array(self.label_path, "label file")
        if raw.ndim != 2:
            raise DatasetError(f"{self.label_path}: a label file must be single-channel (got {raw.shape[2]} channels)")
        self._check_size(raw.shape, self.label_path)
        return self.codec.decode(raw, self.label_path)

    def image_size(self) -> tuple[int, int]:
        """(H, W) of the image: from the annotation file when it states it, else from the image header (no
        decoding)."""
        if self.height is not None and self.width is not None:
            return int(self.height), int(self.width)
        try:
            with Image.open(self.image_path) as im:
                width, height = im.size
        except FileNotFoundError:
            raise DatasetError(f"{self.image_path}: image file is missing") from None
        except (OSError, UnidentifiedImageError) as exc:
            raise DatasetError(f"{self.image_path}: cannot read the image ({exc})") from None
        return int(height), int(width)

    def _check_size(self, shape: tuple[int, ...], path: Path) -> None:
        if self.height is not None and self.width is not None and tuple(shape[:2]) != (self.height, self.width):
            raise DatasetError(
                f"{path}: size {shape[0]}x{shape[1]} (HxW) does not match the image size "
                f"{self.height}x{self.width} stated for image {self.image_id!r}"
            )


def _read_array(path: Path, what: str) -> np.ndarray:
    """The pixels of a label / panoptic file as stored: (H, W) for single-channel modes (``L``, ``P`` as palette
    indices, ``I;16``, ``I``, ``1``), (H, W, 3) for RGB (an alpha channel is dropped)."""
    try:
        with Image.open(path) as image:
            if image.mode in ("RGBA", "LA", "PA"):
                image = image.convert("RGB" if image.mode == "RGBA" else image.mode[0])
            if image.mode not in ("L", "P", "I", "1", "RGB") and not image.mode.startswith("I;16"):
                raise DatasetError(f"{path}: unsupported {what} mode {image.mode}")
            return np.asarray(image)
    except FileNotFoundError:
        raise DatasetError(f"{path}: {what} is missing") from None
    except DatasetError:
        raise
    except (OSError, UnidentifiedImageError, ValueError) as exc:
        raise DatasetError(f"{path}: cannot read the {what} ({exc})") from None


# --------------------------------------------------------------------------------------------------------------------
# Dataset


@dataclass
class EvalDataset:
    """An evaluation dataset: vocabulary, test resolution, ground-truth kind and samples (sorted by id).

    ``task`` is the kind of ground truth (``panoptic``, ``semantic`` or ``instance``); :meth:`tasks` lists what can
    be scored with it. ``ignore_label`` is the raw ignore value of the label files (semantic), 0 (the void id of the
    panoptic PNGs) or None (instance). ``novel`` holds the contiguous indices of the novel classes when the dataset
    defines a base/novel split with classes on both sides (coco-instance-65, a synthetic dataset's meta.json), else
    None.
    """

    name: str
    task: str
    vocabulary: Vocabulary
    ignore_label: int | None
    short_side: int
    max_size: int
    image_dir: Path
    samples: list[EvalSample]
    instances_json: Path | None = None
    novel: frozenset[int] | None = None
    panoptic_json: Path | None = None
    _instances: dict | None = field(default=None, repr=False, compare=False)
    _category_map: dict[int, int] | None = field(default=None, repr=False, compare=False)

    def __len__(self) -> int:
        return len(self.samples)

    def tasks(self) -> tuple[str, ...]:
        """The tasks this ground truth supports: panoptic datasets -> panoptic, semantic, instance (instance from the
        thing segments); semantic -> semantic; instance -> instance."""
        return _TASKS_OF[self.task]

    def instance_gt_coco(self) -> dict[str, Any]:
        """The COCO instance-segmentation ground truth of the samples (a dict ``pycocotools.coco.COCO`` indexes).

        ``images``: one per sample, ``id`` = 1-based rank of the sample id, ``file_name`` = the sample id, with
        ``height`` / ``width``. ``categories``: every vocabulary class with the category id the writers use
        (:func:`~masqclip_cli.vocab.category_ids`). ``annotations``: compressed RLE ``segmentation``,
        ``area``, ``bbox``, ``iscrowd``, ids 1..N. Panoptic datasets derive them from the thing segments (reads every
        panoptic PNG; crowd flags kept, empty segments left out); instance datasets convert their JSON (polygons and
        uncompressed RLE become compressed RLE; area, bbox and iscrowd kept).
        """
        if "instance" not in self.tasks():
            raise DatasetError(f"dataset {self.name}: no instance ground truth (task {self.task})")
        cat_ids = category_ids(self.vocabulary)
        categories = [
            {"id": cat_ids[i], "name": c.name, "supercategory": "", "isthing": int(c.isthing)}
            for i, c in enumerate(self.vocabulary)
        ]
        images: list[dict[str, Any]] = []
        annotations: list[dict[str, Any]] = []
        if self.task == "panoptic":
            for rank, sample in enumerate(self.samples, start=1):
                ids, segments = sample.panoptic_gt()
                h, w = ids.shape
                images.append({"id": rank, "file_name": sample.id, "height": int(h), "width": int(w)})
                things = [s for s in segments if s.isthing]
                if not things:
                    continue
                _, areas, boxes = segment_stats(ids, [s.id for s in things])
                for seg, area, box in zip(things, areas, boxes):
                    if area == 0:
                        continue
                    annotations.append(
                        {
                            "id": len(annotations) + 1,
                            "image_id": rank,
                            "category_id": cat_ids[seg.category],
                            "segmentation": encode_rle(ids == seg.id),
                            "area": int(area),
                            "bbox": [int(v) for v in box],
                            "iscrowd": int(seg.iscrowd),
                        }
                    )
            return {"images": images, "annotations": annotations, "categories": categories}
        # instance task: convert the JSON
        assert self._instances is not None and self._category_map is not None
        source = self.instances_json
        rank_of: dict[Any, int] = {}
        size_of: dict[Any, tuple[int, int]] = {}
        for rank, sample in enumerate(self.samples, start=1):
            h, w = sample.image_size()
            rank_of[sample.image_id] = rank
            size_of[sample.image_id] = (h, w)
            images.append({"id": rank, "file_name": sample.id, "height": h, "width": w})
        for ann in self._instances.get("annotations", []):
            image_id = ann.get("image_id")
            if image_id not in rank_of:  # checked at load; an image whose file was not listed cannot happen
                raise DatasetError(
                    f"{source}: annotation {ann.get('id')!r} names image id {image_id!r}, which is not in its 'images'"
                )
            index = self._category_map[ann["category_id"]]
            h, w = size_of[image_id]
            rle = _to_rle(ann.get("segmentation"), h, w, source, ann.get("id"))
            bbox = ann.get("bbox")
            if bbox is None:
                bbox = [float(v) for v in mask_util.toBbox(rle)]
            area = ann.get("area")
            if area is None:
                area = int(mask_util.area(rle))
            annotations.append(
                {
                    "id": len(annotations) + 1,
                    "image_id": rank_of[image_id],
                    "category_id": cat_ids[index],
                    "segmentation": {
                        "size": [int(rle["size"][0]), int(rle["size"][1])],
                        "counts": rle["counts"].decode("ascii") if isinstance(rle["counts"], bytes) else rle["counts"],
                    },
                    "area": area,
                    "bbox": list(bbox),
                    "iscrowd": int(bool(ann.get("iscrowd", 0))),
                }
            )
        return {"images": images, "annotations": annotations, "categories": categories}


def _to_rle(segmentation: Any, h: int, w: int, source: Path | None, ann_id: Any) -> dict:
    """A COCO ``segmentation`` (polygons, uncompressed or compressed RLE) as one compressed RLE of an (h, w) image."""
    try:
        if isinstance(segmentation, list):
            if not segmentation:
                return mask_util.encode(np.zeros((h, w), dtype=np.uint8, order="F"))
            return mask_util.merge(mask_util.frPyObjects(segmentation, h, w))
        if isinstance(segmentation, dict) and "counts" in segmentation:
            if isinstance(segmentation["counts"], list):
                return mask_util.frPyObjects(segmentation, h, w)
            counts = segmentation["counts"]
            rle = {
                "size": list(segmentation["size"]),
                "counts": counts.encode("ascii") if isinstance(counts, str) else counts,
            }
            if tuple(rle["size"]) != (h, w):
                raise DatasetError(
                    f"{source}: annotation {ann_id!r}: RLE size {tuple(rle['size'])} does not match "
                    f"the image size {(h, w)}"
                )
            return rle
    except DatasetError:
        raise
    except Exception as exc:  # pycocotools raises bare Exceptions / TypeErrors on malformed input
        raise DatasetError(f"{source}: annotation {ann_id!r}: bad segmentation ({exc})") from None
    raise DatasetError(f"{source}: annotation {ann_id!r}: no usable segmentation")


# --------------------------------------------------------------------------------------------------------------------
# Registry entries (the registry itself, DATASETS, is at the end of the module, after the loaders it names)

#: A dataset's loader: ``loader(info, root, options)`` -> the dataset; ``root`` is None when not given.
Loader = Callable[["DatasetInfo", Path | None, dict], EvalDataset]


@dataclass(frozen=True)
class DatasetInfo:
    """One dataset of the registry (:data:`DATASETS`): its description, for :func:`load_dataset` and the docs, and
    its loader."""

    name: str
    task: str  # the kind of ground truth: panoptic, semantic or instance
    layout: str  # the default paths under root (or the options it needs), one line
    preset: str | None  # the vocabulary preset, None when the vocabulary comes from the data or vocab=
    vocabulary: str  # where the vocabulary comes from, in words
    ignore_label: int | None  # the default ignore value (panoptic: the void id 0; instance: None)
    ignore: str  # the ignore convention, in words
    short_side: int  # test resolution: shorter side
    max_size: int  # test resolution: cap on the longer side
    options: tuple[str, ...]  # the path options load_dataset accepts
    summary: str
    how_to_prepare: str
    loader: Loader = field(repr=False, compare=False)  # reads the dataset (see Loader)
    # the default paths under root the loader reads, by option name (images, labels, panoptic_json, panoptic_dir,
    # annotations; ade20k-150 adds original_labels); empty when the loader takes them from the options or root
    paths: Mapping[str, str] = field(default_factory=dict, compare=False)
    novel_preset: str | None = None  # a preset of the novel classes (by id) that defines the base/novel split


def default_root() -> Path:
    """``$DETECTRON2_DATASETS`` when set, else ``./datasets`` (the detectron2 convention)."""
    return Path(os.environ.get("DETECTRON2_DATASETS") or "datasets")


# --------------------------------------------------------------------------------------------------------------------
# Loading


def load_dataset(name: str, root: str | os.PathLike[str] | None = None, **paths: Any) -> EvalDataset:
    """Load a dataset's listing (no image or label is decoded).

    ``name`` is a key of :data:`DATASETS`; ``root`` the folder holding the datasets in their standard layouts
    (default :func:`default_root`; for ``synthetic``, the folder ``masqclip synth`` wrote). ``paths`` override the
    defaults: ``images``, ``panoptic_json``, ``panoptic_dir``, ``labels``, ``annotations`` (paths, used as given),
    ``vocab`` (a ``--vocab`` spec or a :class:`Vocabulary`), ``ignore_label`` (semantic datasets) and ``split``
    (synthetic). Options set to None are ignored. Raises :class:`DatasetError` for an unknown name or option, a
    missing file or folder, and inconsistent annotations.
    """
    info = DATASETS.get(name)
    if info is None:
        raise DatasetError(f"unknown dataset '{name}'; known datasets: {', '.join(DATASETS)}")
    opts = {k: v for k, v in paths.items() if v is not None}
    unknown = sorted(set(opts) - set(info.options))
    if unknown:
        raise DatasetError(f"dataset {name} does not take {', '.join(unknown)} (it takes {', '.join(info.options)})")
    base = Path(os.path.expanduser(os.fspath(root))) if root is not None else None
    return info.loader(info, base, opts)


def _path(opts: Mapping[str, Any], key: str, default: Path | None, info: DatasetInfo) -> Path:
    value = opts.get(key)
    if value is not None:
        return Path(os.path.expanduser(os.fspath(value)))
    if default is None:
        raise DatasetError(f"dataset {info.name} needs {key}=")
    return default


def _root(base: Path | None) -> Path:
    return base if base is not None else default_root()


def _default(info: DatasetInfo, key: str, root: Path) -> Path:
    """The entry's default path ``key`` under ``root``."""
    return root / info.paths[key]


def _need_dir(path: Path, what: str, name: str) -> Path:
    if not path.is_dir():
        state = "is not a folder" if path.exists() else "is missing"
        raise DatasetError(f"{name}: {what} {path} {state}")
    return path


def _need_file(path: Path, what: str, name: str) -> Path:
    if not path.is_file():
        state = "is not a file" if path.exists() else "is missing"
        raise DatasetError(f"{name}: {what} {path} {state}")
    return path


def _read_json(path: Path, what: str, name: str) -> Any:
    _need_file(path, what, name)
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise DatasetError(f"{path}: cannot read the {what} ({exc})") from None


def _vocabulary(opts: Mapping[str, Any], default: Vocabulary | str | None, info: DatasetInfo) -> Vocabulary:
    spec = opts.get("vocab")
    if isinstance(spec, Vocabulary):
        return spec
    if spec is not None:
        return load_vocabulary(spec if isinstance(spec, (str, Path)) else str(spec))
    if isinstance(default, Vocabulary):
        return default
    if default is None:
        raise DatasetError(f"dataset {info.name} needs vocab=")
    return load_preset(default)


def _ignore_option(opts: Mapping[str, Any], info: DatasetInfo) -> int | None:
    value = opts.get("ignore_label")
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, np.integer, str)):
        raise DatasetError(f"dataset {info.name}: ignore_label must be an integer, got {value!r}")
    try:
        value = int(value)
    except ValueError:
        raise DatasetError(f"dataset {info.name}: ignore_label must be an integer, got {value!r}") from None
    if value < 0:
        raise DatasetError(f"dataset {info.name}: ignore_label must be >= 0, got {value}")
    return value


def _sample_id(file_name: Any, source: Path, what: str) -> str:
    if not isinstance(file_name, str) or not file_name.strip():
        raise DatasetError(f"{source}: {what} has no file_name")
    posix = PurePosixPath(file_name.replace("\\", "/"))
    if posix.is_absolute() or ".." in posix.parts:
        raise DatasetError(f"{source}: {what}: file_name {file_name!r} is not inside the image folder")
    return str(posix)


def _check_unique_ids(samples: list[EvalSample], source: Path) -> list[EvalSample]:
    samples.sort(key=lambda s: s.id)
    for a, b in zip(samples, samples[1:]):
        if a.id == b.id:
            raise DatasetError(f"{source}: image file {a.id!r} is listed twice")
    return samples


def _int_size(entry: Mapping[str, Any], key: str) -> int | None:
    value = entry.get(key)
    return int(value) if isinstance(value, (int, float)) and not isinstance(value, bool) and value > 0 else None


# --- category mapping ---------------------------------------------------------------------------------------------


def _norm(name: str) -> str:
    return " ".join(str(name).split()).casefold()


class _CategoryMapper:
    """JSON category id -> contiguous vocabulary index: by id when the vocabulary has ids, else by name (the full
    synonym list, the display name, or the JSON name's first comma-separated part)."""

    def __init__(self, vocab: Vocabulary, categories: Any, source: Path) -> None:
        self.vocab = vocab
        self.source = source
        self.by_id = any(c.id is not None for c in vocab)
        self.names: dict[int, str] = {}
        if categories is not None and not isinstance(categories, list):
            raise DatasetError(f"{source}: 'categories' must be a list")
        for item in categories or []:
            if isinstance(item, dict) and isinstance(item.get("id"), int):
                self.names[item["id"]] = str(item.get("name", ""))
        self.mapping: dict[int, int] = {}
        if self.by_id:
            self.mapping = {cid: i for i, cid in enumerate(vocab.ids)}
        else:
            full: dict[str, list[int]] = {}
            display: dict[str, list[int]] = {}
            for i, c in enumerate(vocab):
                full.setdefault(_norm(", ".join(c.prompts)), []).append(i)
                full.setdefault(_norm(", ".join((c.name, *c.synonyms))), []).append(i)
                display.setdefault(_norm(c.name), []).append(i)
            for cid, raw in self.names.items():
                for key, table in ((_norm(raw), full), (_norm(raw), display), (_norm(raw.split(",")[0]), display)):
                    hits = sorted(set(table.get(key, [])))
                    if len(hits) == 1:
                        self.mapping[cid] = hits[0]
                        break

    def __call__(self, category_id: Any, where: str) -> int:
        index = self.mapping.get(category_id) if isinstance(category_id, int) else None
        if index is None:
            name = self.names.get(category_id) if isinstance(category_id, int) else None
            named = f" ('{name}')" if name else ""
            how = "id" if self.by_id else "name"
            raise DatasetError(
                f"{self.source}: {where}: category id {category_id!r}{named} is not in the vocabulary "
                f"{self.vocab.source} (matched by {how})"
            )
        return index


# --- panoptic -------------------------------------------------------------------------------------------------------


def _load_panoptic(
    info: DatasetInfo,
    vocab: Vocabulary,
    image_dir: Path,
    pan_json: Path,
    pan_dir: Path,
    *,
    novel: frozenset[int] | None = None,
    data: Any = None,
) -> EvalDataset:
    name = info.name
    _need_dir(image_dir, "image folder", name)
    _need_dir(pan_dir, "panoptic PNG folder", name)
    if data is None:
        data = _read_json(pan_json, "panoptic JSON", name)
    if (
        not isinstance(data, dict)
        or not isinstance(data.get("images"), list)
        or not isinstance(data.get("annotations"), list)
    ):
        raise DatasetError(f"{pan_json}: not a COCO panoptic JSON (needs 'images' and 'annotations' lists)")
    mapper = _CategoryMapper(vocab, data.get("categories"), pan_json)
    isthing = vocab.isthing
    images: dict[Any, dict] = {}
    for entry in data["images"]:
        if not isinstance(entry, dict) or "id" not in entry:
            raise DatasetError(f"{pan_json}: an 'images' entry has no id")
        if entry["id"] in images:
            raise DatasetError(f"{pan_json}: image id {entry['id']!r} is listed twice")
        images[entry["id"]] = entry
    samples: list[EvalSample] = []
    annotated: set[Any] = set()
    for ann in data["annotations"]:
        if not isinstance(ann, dict):
            raise DatasetError(f"{pan_json}: an 'annotations' entry is not an object")
        image_id = ann.get("image_id")
        if image_id not in images:
            raise DatasetError(f"{pan_json}: annotation names image id {image_id!r}, which is not in its 'images'")
        if image_id in annotated:
            raise DatasetError(f"{pan_json}: image id {image_id!r} has two annotations")
        annotated.add(image_id)
        entry = images[image_id]
        sample_id = _sample_id(entry.get("file_name"), pan_json, f"image {image_id!r}")
        image_path = image_dir / sample_id
        if not image_path.is_file():
            raise DatasetError(f"{name}: image file {image_path} (image id {image_id!r} of {pan_json}) is missing")
        png_name = ann.get("file_name")
        if not isinstance(png_name, str) or not png_name:
            png_name = str(PurePosixPath(sample_id).with_suffix(".png"))
        png_path = pan_dir / png_name
        if not png_path.is_file():
            raise DatasetError(f"{name}: panoptic PNG {png_path} (image id {image_id!r} of {pan_json}) is missing")
        segments: list[GTSegment] = []
        seen: set[int] = set()
        for seg in ann.get("segments_info") or []:
            seg_id = seg.get("id") if isinstance(seg, dict) else None
            if not isinstance(seg_id, int) or isinstance(seg_id, bool) or seg_id <= 0:
                raise DatasetError(
                    f"{pan_json}: image id {image_id!r}: bad segment id {seg_id!r} (need an integer > 0)"
                )
            if seg_id in seen:
                raise DatasetError(f"{pan_json}: image id {image_id!r}: segment id {seg_id} is listed twice")
            seen.add(seg_id)
            index = mapper(seg.get("category_id"), f"image id {image_id!r} segment {seg_id}")
            segments.append(GTSegment(seg_id, index, bool(seg.get("iscrowd", 0)), bool(isthing[index])))
        samples.append(
            EvalSample(
                id=sample_id,
                image_path=image_path,
                image_id=image_id,
                label_path=png_path,
                segments=tuple(segments),
                height=_int_size(entry, "height"),
                width=_int_size(entry, "width"),
            )
        )
    missing = [i for i in images if i not in annotated]
    if missing:
        raise DatasetError(f"{pan_json}: image id {missing[0]!r} has no annotation")
    if not samples:
        raise DatasetError(f"{pan_json}: no images")
    return EvalDataset(
        name=name,
        task="panoptic",
        vocabulary=vocab,
        ignore_label=0,
        short_side=info.short_side,
        max_size=info.max_size,
        image_dir=image_dir,
        samples=_check_unique_ids(samples, pan_json),
        novel=novel,
        panoptic_json=pan_json,
    )


def _load_standard_panoptic(info: DatasetInfo, base: Path | None, opts: dict) -> EvalDataset:
    """A COCO-format panoptic dataset at the entry's default ``paths`` (images, panoptic_json, panoptic_dir)."""
    root = _root(base)
    vocab = _vocabulary(opts, info.preset, info)
    return _load_panoptic(
        info,
        vocab,
        _path(opts, "images", _default(info, "images", root), info),
        _path(opts, "panoptic_json", _default(info, "panoptic_json", root), info),
        _path(opts, "panoptic_dir", _default(info, "panoptic_dir", root), info),
    )


def _load_generic_panoptic(info: DatasetInfo, base: Path | None, opts: dict) -> EvalDataset:
    pan_json = _path(opts, "panoptic_json", None, info)
    pan_dir = _path(opts, "panoptic_dir", None, info)
    images = _path(opts, "images", None, info)
    data = _read_json(pan_json, "panoptic JSON", info.name)
    if "vocab" in opts:
        vocab = _vocabulary(opts, None, info)
    else:
        vocab = _json_vocabulary(data, pan_json)
    return _load_panoptic(info, vocab, images, pan_json, pan_dir, data=data)


def _json_vocabulary(data: Any, source: Path) -> Vocabulary:
    if not isinstance(data, dict) or not isinstance(data.get("categories"), list) or not data["categories"]:
        raise DatasetError(f"{source}: no 'categories' to take the vocabulary from (give vocab=)")
    return Vocabulary.from_json({"categories": data["categories"]}, source=str(source))


def _load_synthetic(info: DatasetInfo, base: Path | None, opts: dict) -> EvalDataset:
    if base is None:
        raise DatasetError("dataset synthetic needs root= (the folder `masqclip synth` wrote)")
    split = str(opts.get("split") or "val")
    if not split or "/" in split or "\\" in split or split in (".", ".."):
        raise DatasetError(f"dataset synthetic: bad split {split!r}")
    _need_dir(base, "dataset folder", info.name)
    if "vocab" in opts:
        vocab = _vocabulary(opts, None, info)
    else:
        vocab_path = _need_file(base / "vocab.txt", "vocabulary file", info.name)
        vocab = load_file(vocab_path)
    novel = None
    meta_path = base / "meta.json"
    if meta_path.exists():
        meta = _read_json(meta_path, "meta.json", info.name)
        novel = _novel_from_names(meta, vocab, meta_path)
    return _load_panoptic(
        info,
        vocab,
        _path(opts, "images", base / "images" / split, info),
        _path(opts, "panoptic_json", base / "annotations" / f"panoptic_{split}.json", info),
        _path(opts, "panoptic_dir", base / f"panoptic_{split}", info),
        novel=novel,
    )


def _novel_from_names(meta: Any, vocab: Vocabulary, source: Path) -> frozenset[int] | None:
    if not isinstance(meta, dict):
        raise DatasetError(f"{source}: expected a JSON object")
    index = {}
    for i, c in enumerate(vocab):
        index.setdefault(_norm(c.name), i)
    out: dict[str, set[int]] = {}
    for key in ("base", "novel"):
        names = meta.get(key)
        if names is None:
            continue
        if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
            raise DatasetError(f"{source}: '{key}' must be a list of class names")
        found = set()
        for n in names:
            if _norm(n) not in index:
                raise DatasetError(f"{source}: {key} class '{n}' is not in the vocabulary {vocab.source}")
            found.add(index[_norm(n)])
        out[key] = found
    novel = out.get("novel")
    if novel is None:
        return None
    return _split_or_none(frozenset(novel), len(vocab))


def _split_or_none(novel: frozenset[int], n: int) -> frozenset[int] | None:
    """A base/novel split only when both sides have classes."""
    return novel if 0 < len(novel) < n else None


# --- semantic -------------------------------------------------------------------------------------------------------


def _list_files(folder: Path, extensions: tuple[str, ...]) -> list[Path]:
    try:
        entries = sorted(folder.iterdir())
    except OSError as exc:
        raise DatasetError(f"{folder}: cannot list the folder ({exc})") from None
    return [p for p in entries if not p.name.startswith(".") and p.suffix.lower() in extensions and p.is_file()]


def _load_semantic(
    info: DatasetInfo, vocab: Vocabulary, image_dir: Path, label_dir: Path, codec: _LabelCodec
) -> EvalDataset:
    name = info.name
    _need_dir(image_dir, "image folder", name)
    _need_dir(label_dir, "label folder", name)
    labels: dict[str, Path] = {}
    for path in _list_files(label_dir, LABEL_EXTENSIONS):
        if path.stem in labels:
            raise DatasetError(f"{name}: two label files for '{path.stem}': {labels[path.stem]} and {path}")
        labels[path.stem] = path
    images = _list_files(image_dir, IMAGE_EXTENSIONS)
    if not images:
        raise DatasetError(f"{name}: no images in {image_dir}")
    samples = []
    seen: dict[str, Path] = {}
    for path in images:
        if path.stem in seen:
            raise DatasetError(f"{name}: two images with the stem '{path.stem}': {seen[path.stem]} and {path}")
        seen[path.stem] = path
        label = labels.get(path.stem)
        if label is None:
            raise DatasetError(f"{name}: image {path} has no label file {label_dir / path.stem}.png (or .tif)")
        samples.append(EvalSample(id=path.name, image_path=path, image_id=path.stem, label_path=label, codec=codec))
    orphans = sorted(set(labels) - set(seen))
    if orphans:
        raise DatasetError(f"{name}: label file {labels[orphans[0]]} has no image in {image_dir}")
    ignore = codec.ignore
    return EvalDataset(
        name=name,
        task="semantic",
        vocabulary=vocab,
        ignore_label=ignore,
        short_side=info.short_side,
        max_size=info.max_size,
        image_dir=image_dir,
        samples=_check_unique_ids(samples, image_dir),
    )


def _load_standard_semantic(info: DatasetInfo, base: Path | None, opts: dict) -> EvalDataset:
    """Label maps of contiguous class indices (ignore = the entry's ``ignore_label``) at the entry's default
    ``paths`` (images, labels)."""
    root = _root(base)
    vocab = _vocabulary(opts, info.preset, info)
    given = _ignore_option(opts, info)
    codec = _LabelCodec(len(vocab), 0, info.ignore_label if given is None else given)
    return _load_semantic(
        info,
        vocab,
        _path(opts, "images", _default(info, "images", root), info),
        _path(opts, "labels", _default(info, "labels", root), info),
        codec,
    )


def _load_ade20k_150(info: DatasetInfo, base: Path | None, opts: dict) -> EvalDataset:
    """ADE20K-150: ``annotations_detectron2`` (0..149, 255 = ignore) when present, else the original ``annotations``
    (1..150, 0 = ignore). With ``labels=`` the convention follows the folder: original when it sits in a folder named
    ``annotations``, detectron2 otherwise. ``ignore_label=0`` forces the original convention, any other value the
    detectron2 one with that ignore value."""
    root = _root(base)
    vocab = _vocabulary(opts, info.preset, info)
    if "labels" in opts:
        labels = _path(opts, "labels", None, info)
        original = labels.parent.name == "annotations" or labels.name == "annotations"
    else:
        d2 = _default(info, "labels", root)
        original = not d2.is_dir()
        labels = _default(info, "original_labels", root) if original else d2
    given = _ignore_option(opts, info)
    if given is not None:
        original = given == 0
    codec = _LabelCodec(len(vocab), 1, 0) if original else _LabelCodec(len(vocab), 0, 255 if given is None else given)
    return _load_semantic(info, vocab, _path(opts, "images", _default(info, "images", root), info), labels, codec)


def _load_generic_semantic(info: DatasetInfo, base: Path | None, opts: dict) -> EvalDataset:
    images = _path(opts, "images", None, info)
    labels = _path(opts, "labels", None, info)
    vocab = _vocabulary(opts, None, info)
    given = _ignore_option(opts, info)
    codec = _LabelCodec(len(vocab), 0, 255 if given is None else given)
    return _load_semantic(info, vocab, images, labels, codec)


# --- instance -------------------------------------------------------------------------------------------------------


def _load_instance(
    info: DatasetInfo,
    vocab: Vocabulary,
    image_dir: Path,
    ann_json: Path,
    *,
    novel: frozenset[int] | None = None,
    data: Any = None,
) -> EvalDataset:
    name = info.name
    _need_dir(image_dir, "image folder", name)
    if data is None:
        data = _read_json(ann_json, "instance JSON", name)
        if not isinstance(data, dict):
            raise DatasetError(f"{ann_json}: not a COCO instance JSON")
    if not isinstance(data.get("images"), list) or not isinstance(data.get("annotations", []), list):
        raise DatasetError(f"{ann_json}: not a COCO instance JSON (needs an 'images' list)")
    mapper = _CategoryMapper(vocab, data.get("categories"), ann_json)
    samples: list[EvalSample] = []
    ids: set[Any] = set()
    for entry in data["images"]:
        if not isinstance(entry, dict) or "id" not in entry:
            raise DatasetError(f"{ann_json}: an 'images' entry has no id")
        image_id = entry["id"]
        if image_id in ids:
            raise DatasetError(f"{ann_json}: image id {image_id!r} is listed twice")
        ids.add(image_id)
        sample_id = _sample_id(entry.get("file_name"), ann_json, f"image {image_id!r}")
        path = image_dir / sample_id
        if not path.is_file():
            raise DatasetError(f"{name}: image file {path} (image id {image_id!r} of {ann_json}) is missing")
        samples.append(
            EvalSample(
                id=sample_id,
                image_path=path,
                image_id=image_id,
                height=_int_size(entry, "height"),
                width=_int_size(entry, "width"),
            )
        )
    if not samples:
        raise DatasetError(f"{ann_json}: no images")
    category_map: dict[int, int] = {}
    for ann in data.get("annotations", []):
        if not isinstance(ann, dict):
            raise DatasetError(f"{ann_json}: an 'annotations' entry is not an object")
        if ann.get("image_id") not in ids:
            raise DatasetError(
                f"{ann_json}: annotation {ann.get('id')!r} names image id {ann.get('image_id')!r}, "
                "which is not in its 'images'"
            )
        cid = ann.get("category_id")
        if cid not in category_map:
            category_map[cid] = mapper(cid, f"annotation {ann.get('id')!r}")
    return EvalDataset(
        name=name,
        task="instance",
        vocabulary=vocab,
        ignore_label=None,
        short_side=info.short_side,
        max_size=info.max_size,
        image_dir=image_dir,
        samples=_check_unique_ids(samples, ann_json),
        instances_json=ann_json,
        novel=novel,
        _instances=data,
        _category_map=category_map,
    )


def _load_coco_ov_instance(info: DatasetInfo, base: Path | None, opts: dict) -> EvalDataset:
    """A COCO open-vocabulary instance split at the entry's default ``paths`` (images, annotations); the entry's
    ``novel_preset`` (when the vocabulary has ids) defines its base/novel split."""
    root = _root(base)
    ann_json = _path(opts, "annotations", _default(info, "annotations", root), info)
    if "annotations" not in opts and not ann_json.is_file():
        raise DatasetError(
            f"{info.name}: instance JSON {ann_json} is missing (prepare the open-vocabulary split or give annotations=)"
        )
    vocab = _vocabulary(opts, info.preset, info)
    novel = None
    if info.novel_preset is not None and any(c.id is not None for c in vocab):
        novel_ids = set(load_preset(info.novel_preset).ids)
        novel = _split_or_none(frozenset(i for i, cid in enumerate(vocab.ids) if cid in novel_ids), len(vocab))
    images = _path(opts, "images", _default(info, "images", root), info)
    return _load_instance(info, vocab, images, ann_json, novel=novel)


def _load_generic_instance(info: DatasetInfo, base: Path | None, opts: dict) -> EvalDataset:
    ann_json = _path(opts, "annotations", None, info)
    images = _path(opts, "images", None, info)
    data = _read_json(ann_json, "instance JSON", info.name)
    if not isinstance(data, dict):
        raise DatasetError(f"{ann_json}: not a COCO instance JSON")
    vocab = _vocabulary(opts, None, info) if "vocab" in opts else _json_vocabulary(data, ann_json)
    return _load_instance(info, vocab, images, ann_json, data=data)


# --------------------------------------------------------------------------------------------------------------------
# The registry: one entry per dataset, its description and its loader. Adding a dataset = adding its entry here
# (plus a loader function above when its format is new); load_dataset and docs/datasets.md follow.

_COCO_PREP = (
    "Download the 2017 Val images (val2017.zip) and the 2017 panoptic annotations "
    "(panoptic_annotations_trainval2017.zip) from https://cocodataset.org/#download. Unzip the images into "
    "coco/val2017/; from the panoptic archive put annotations/panoptic_val2017.json into coco/annotations/ and unzip "
    "the inner panoptic_val2017.zip into coco/panoptic_val2017/."
)
_COCO_OV_PREP = (
    "Download val2017.zip and the 2017 instance annotations (annotations_trainval2017.zip, instances_val2017.json) "
    "from https://cocodataset.org/#download; unzip the images into coco/val2017/ and the JSON into coco/annotations/. "
    "Then run the MasQCLIP repository's datasets/prepare_coco_ovsplit.py, which filters instances_val2017.json into "
    "coco/annotations/ov_split_48_17/instances_val2017_{instances65,seen48,unseen17}.json (65 classes = 48 seen + 17 "
    "unseen)."
)
_ADE_PREP = (
    "Download ADEChallengeData2016.zip from the MIT scene parsing benchmark (http://sceneparsing.csail.mit.edu/) and "
    "unzip it into root."
)
_ADE_SEM_PREP = _ADE_PREP + (
    " The original annotations/validation/ PNGs (1..150, 0 = unlabelled) are read as they are; detectron2's "
    "datasets/prepare_ade20k_sem_seg.py (also in Mask2Former and FC-CLIP) writes annotations_detectron2/validation/ "
    "(0..149, 255 = ignore), which is used instead when present."
)
_ADE_PAN_PREP = _ADE_PREP + (
    " Also download the instance annotations (annotations_instance.tar, same site) into ADEChallengeData2016/, "
    "install panopticapi and run Mask2Former's datasets/prepare_ade20k_pan_seg.py: it combines the semantic and "
    "instance annotations into ade20k_panoptic_val/ (PNGs) and ade20k_panoptic_val.json (categories 0..149, matched "
    "to the ade20k-150 vocabulary by name)."
)
_ADE847_PREP = (
    "Register at https://groups.csail.mit.edu/vision/datasets/ADE20K/ and download the full ADE20K release "
    "(ADE20K_2021_17_01); unzip it into root and run datasets/prepare_ade20k_full_sem_seg.py from FC-CLIP (the same "
    "script ships with MaskCLIP / ODISE): it writes ADE20K_2021_17_01/images_detectron2/validation/ (JPEG) and "
    "annotations_detectron2/validation/ (16-bit TIFF, classes 0..846, 65535 = ignore)."
)
_PASCAL_PREP = (
    "Download the VOC2010 train/val tar from http://host.robots.ox.ac.uk/pascal/VOC/ (VOCdevkit/VOC2010/), the "
    "PASCAL-Context trainval.tar.gz from https://www.cs.stanford.edu/~roozbeh/pascal-context/ (unpacked into "
    "VOCdevkit/VOC2010/trainval/) and trainval_merged.json (into VOCdevkit/VOC2010/); install the Detail API "
    "(https://github.com/zhanghang1989/detail-api). FC-CLIP's datasets/prepare_pascal_ctx_sem_seg.py writes "
    "pascal_ctx_d2/images/validation/ and annotations_ctx59/validation/ (PNG, 0..58, 255 = ignore); "
    "datasets/prepare_pascal_ctx_full_sem_seg.py writes annotations_ctx459/validation/ (16-bit TIFF, 0..458, "
    "65535 = ignore)."
)

_SEM_OPTS = ("images", "labels", "vocab", "ignore_label")
_PAN_OPTS = ("images", "panoptic_json", "panoptic_dir", "vocab")
_INS_OPTS = ("images", "annotations", "vocab")


def _standard_layout(task: str, paths: Mapping[str, str]) -> str:
    """The ``layout`` line of a standard layout, from its default paths."""
    if task == "panoptic":
        return f"{paths['images']}/, {paths['panoptic_dir']}/, {paths['panoptic_json']}"
    if task == "semantic":
        return f"{paths['images']}/ + {paths['labels']}/"
    return f"{paths['images']}/ + {paths['annotations']}"


def _entry(name: str, task: str, preset: str | None, loader: Loader, **kw: Any) -> DatasetInfo:
    """One registry entry, with the defaults of its task (options, ignore value and convention, vocabulary in words,
    and the layout line derived from ``paths``)."""
    defaults: dict[str, Any] = {
        "panoptic": {"ignore_label": 0, "ignore": "0 (void segment id)", "options": _PAN_OPTS},
        "semantic": {"options": _SEM_OPTS},
        "instance": {"ignore_label": None, "ignore": "none", "options": _INS_OPTS},
    }[task]
    kw = {**defaults, **kw}
    kw.setdefault("vocabulary", f"preset {preset}" if preset else "")
    if "layout" not in kw:
        kw["layout"] = _standard_layout(task, kw["paths"])
    return DatasetInfo(name=name, task=task, preset=preset, loader=loader, **kw)


def _registry(*entries: DatasetInfo) -> dict[str, DatasetInfo]:
    table: dict[str, DatasetInfo] = {}
    for info in entries:
        if info.name in table:
            raise ValueError(f"dataset {info.name} is registered twice")
        if info.task not in _TASKS_OF:
            raise ValueError(f"dataset {info.name}: unknown task {info.task!r}")
        table[info.name] = info
    return table


_COCO_OV = "coco/annotations/ov_split_48_17"

#: The registry: dataset name -> its :class:`DatasetInfo` (description and loader), in the order the docs list them.
DATASETS: dict[str, DatasetInfo] = _registry(
    _entry(
        "coco-panoptic",
        "panoptic",
        "coco-panoptic",
        _load_standard_panoptic,
        paths={
            "images": "coco/val2017",
            "panoptic_dir": "coco/panoptic_val2017",
            "panoptic_json": "coco/annotations/panoptic_val2017.json",
        },
        short_side=800,
        max_size=1333,
        summary="COCO panoptic val2017: 5000 images, 133 classes (80 things, 53 stuff).",
        how_to_prepare=_COCO_PREP,
    ),
    _entry(
        "ade20k-panoptic",
        "panoptic",
        "ade20k-150",
        _load_standard_panoptic,
        paths={
            "images": "ADEChallengeData2016/images/validation",
            "panoptic_dir": "ADEChallengeData2016/ade20k_panoptic_val",
            "panoptic_json": "ADEChallengeData2016/ade20k_panoptic_val.json",
        },
        short_side=640,
        max_size=2560,
        summary="ADE20K-150 panoptic val: 2000 images, 150 classes (100 things, 50 stuff); JSON categories are "
        "matched to the preset by name.",
        how_to_prepare=_ADE_PAN_PREP,
    ),
    _entry(
        "ade20k-150",
        "semantic",
        "ade20k-150",
        _load_ade20k_150,
        paths={
            "images": "ADEChallengeData2016/images/validation",
            "labels": "ADEChallengeData2016/annotations_detectron2/validation",
            "original_labels": "ADEChallengeData2016/annotations/validation",  # when the labels above are absent
        },
        layout="ADEChallengeData2016/images/validation/ + ADEChallengeData2016/annotations_detectron2/validation/ "
        "(else ADEChallengeData2016/annotations/validation/)",
        ignore_label=255,
        ignore="255 (annotations_detectron2: classes 0..149) or 0 (original annotations: classes 1..150)",
        short_side=512,
        max_size=2048,
        summary="ADE20K-150 semantic val: 2000 images, 150 classes.",
        how_to_prepare=_ADE_SEM_PREP,
    ),
    _entry(
        "ade20k-847",
        "semantic",
        "ade20k-847",
        _load_standard_semantic,
        paths={
            "images": "ADE20K_2021_17_01/images_detectron2/validation",
            "labels": "ADE20K_2021_17_01/annotations_detectron2/validation",
        },
        ignore_label=65535,
        ignore="65535 (16-bit TIFF labels, classes 0..846)",
        short_side=512,
        max_size=2048,
        summary="ADE20K-Full (847 classes) semantic val: 2000 images.",
        how_to_prepare=_ADE847_PREP,
    ),
    _entry(
        "pascal-context-59",
        "semantic",
        "pascal-context-59",
        _load_standard_semantic,
        paths={"images": "pascal_ctx_d2/images/validation", "labels": "pascal_ctx_d2/annotations_ctx59/validation"},
        ignore_label=255,
        ignore="255 (PNG labels, classes 0..58)",
        short_side=512,
        max_size=2048,
        summary="PASCAL Context 59 semantic val: 5105 images.",
        how_to_prepare=_PASCAL_PREP,
    ),
    _entry(
        "pascal-context-459",
        "semantic",
        "pascal-context-459",
        _load_standard_semantic,
        paths={"images": "pascal_ctx_d2/images/validation", "labels": "pascal_ctx_d2/annotations_ctx459/validation"},
        ignore_label=65535,
        ignore="65535 (16-bit TIFF labels, classes 0..458)",
        short_side=512,
        max_size=2048,
        summary="PASCAL Context 459 semantic val: 5105 images.",
        how_to_prepare=_PASCAL_PREP,
    ),
    _entry(
        "coco-instance-65",
        "instance",
        "coco-instance-65",
        _load_coco_ov_instance,
        paths={"images": "coco/val2017", "annotations": f"{_COCO_OV}/instances_val2017_instances65.json"},
        novel_preset="coco-novel-17",
        short_side=800,
        max_size=1333,
        summary="COCO open-vocabulary instance split, all 65 classes (48 base + 17 novel: base / novel AP).",
        how_to_prepare=_COCO_OV_PREP,
    ),
    _entry(
        "coco-instance-48",
        "instance",
        "coco-base-48",
        _load_coco_ov_instance,
        paths={"images": "coco/val2017", "annotations": f"{_COCO_OV}/instances_val2017_seen48.json"},
        short_side=800,
        max_size=1333,
        summary="COCO open-vocabulary instance split, the 48 base (seen) classes only.",
        how_to_prepare=_COCO_OV_PREP,
    ),
    _entry(
        "coco-instance-17",
        "instance",
        "coco-novel-17",
        _load_coco_ov_instance,
        paths={"images": "coco/val2017", "annotations": f"{_COCO_OV}/instances_val2017_unseen17.json"},
        short_side=800,
        max_size=1333,
        summary="COCO open-vocabulary instance split, the 17 novel (unseen) classes only.",
        how_to_prepare=_COCO_OV_PREP,
    ),
    _entry(
        "synthetic",
        "panoptic",
        None,
        _load_synthetic,
        layout="<root>/images/<split>/, <root>/panoptic_<split>/, <root>/annotations/panoptic_<split>.json, "
        "<root>/vocab.txt, <root>/meta.json",
        vocabulary="its vocab.txt",
        options=(*_PAN_OPTS, "split"),
        short_side=0,
        max_size=4096,
        summary="The synthetic shapes world written by `masqclip synth` (root = its folder, split= default val; "
        "base / novel classes from meta.json). Evaluated at its native size (the scale it was drawn and trained "
        "at): no resize unless --short-side is given.",
        how_to_prepare="Run `masqclip synth --out DIR` (nothing to download) and pass DIR as root.",
    ),
    _entry(
        "generic-semantic",
        "semantic",
        None,
        _load_generic_semantic,
        layout="images=DIR labels=DIR vocab=V [ignore_label=255]",
        vocabulary="vocab= (required)",
        ignore_label=255,
        ignore="ignore_label= (default 255)",
        short_side=640,
        max_size=2560,
        summary="Any images with label maps of the same file stem (PNG / TIFF, value = contiguous class index).",
        how_to_prepare="Put the images in one folder and one single-channel PNG or TIFF per image, with the same "
        "file stem, in another; pixel value = the class's index (line) in the vocabulary, ignore_label where "
        "unlabelled.",
    ),
    _entry(
        "generic-panoptic",
        "panoptic",
        None,
        _load_generic_panoptic,
        layout="panoptic_json=F panoptic_dir=D images=DIR [vocab=V]",
        vocabulary="the JSON categories, or vocab=",
        short_side=640,
        max_size=2560,
        summary="Any dataset in the COCO panoptic format.",
        how_to_prepare="Write a COCO panoptic JSON (images, annotations with segments_info, categories) and one "
        "RGB PNG per image (segment id = R + 256 G + 256^2 B, 0 = void).",
    ),
    _entry(
        "generic-instance",
        "instance",
        None,
        _load_generic_instance,
        layout="annotations=F images=DIR [vocab=V]",
        vocabulary="the JSON categories, or vocab=",
        short_side=800,
        max_size=1333,
        summary="Any dataset in the COCO instance-segmentation format.",
        how_to_prepare="Write a COCO instance JSON (images, annotations with polygon or RLE segmentation, categories).",
    ),
)


def datasets_markdown() -> str:
    """The text of docs/datasets.md: the dataset table and how to prepare each (a test keeps the page in step)."""
    lines = [
        "# Datasets for `masqclip eval`",
        "",
        "Generated from `masqclip_cli.data.datasets.DATASETS` (a test checks that this page matches it). Give "
        "`--root DIR`",
        "with the datasets in the layouts below, or override any path with `--images`, `--labels`, `--panoptic-json`,",
        "`--panoptic-dir`, `--annotations`. A missing file or an id that does not match is a one-line error naming it.",
        "",
        "| name | task | layout under `--root` | ignore | vocabulary | test short / long side |",
        "|---|---|---|---|---|---|",
    ]
    for name, info in DATASETS.items():
        lines.append(
            f"| `{name}` | {info.task} | {info.layout} | {info.ignore} | {info.vocabulary} | "
            f"{f'{info.short_side} / {info.max_size}' if info.short_side > 0 else 'native size'} |"
        )
    lines.append("")
    for name, info in DATASETS.items():
        lines += [f"## {name}", "", info.summary, "", info.how_to_prepare, ""]
    return "\n".join(lines)
