"""The one result type: :class:`Segmentation` (one image, original size) and its columnar :class:`Segments` table.

A ``Segmentation`` holds what the requested tasks produced for one image: the panoptic map and its segments, the
semantic map, and the instances. It carries its vocabulary (``vocab``), so every segment has a class name, and it
converts itself to what other tools read (COCO annotation dicts, a COCO panoptic PNG array + ``segments_info``, a
category-id label map, a ``supervision.Detections``). Writers consume only this type.

:class:`Segments` is columnar in the supervision style: ``seg.instances.score`` is a ``(K,)`` array, and indexing with
a boolean array, an index array or a slice gives another table (``seg.instances[seg.instances.score > 0.5]``), while
an integer index or iteration gives :class:`Segment` rows.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any, Protocol, runtime_checkable

import numpy as np

from masqclip_cli.structures.masks import (
    MAX_SEGMENT_ID,
    decode_rle,
    encode_rle,
    id_to_rgb,
    mask_stats,
    round_score,
    segment_stats,
)

__all__ = [
    "TASKS",
    "ClassList",
    "Segment",
    "Segmentation",
    "Segments",
    "segmentation_from_record",
    "segmentation_to_record",
]

#: The tasks, each a field of :class:`Segmentation`: the one list every module (post-processing, writers, datasets,
#: the command line) reads.
TASKS: tuple[str, ...] = ("panoptic", "semantic", "instance")


@runtime_checkable
class ClassList(Protocol):
    """What a result needs of a vocabulary (:class:`masqclip_cli.vocab.Vocabulary` is one): class names, thing /
    stuff per class, and the category ids written to outputs."""

    @property
    def names(self) -> list[str]: ...

    @property
    def isthing(self) -> list[bool]: ...

    def __len__(self) -> int: ...


def output_category_ids(vocab: ClassList) -> list[int]:
    """Per class, the category id written to every output: the vocabulary's ids when it gives any, else 1..N in
    vocabulary order (0 stays free for "unlabelled")."""
    given = getattr(vocab, "category_ids", None)
    if callable(given):
        return list(given())
    return list(range(1, len(vocab) + 1))


@dataclass
class Segment:
    """One panoptic segment or one instance (a row of :class:`Segments`).

    Attributes:
        id: panoptic segment id (1-based, the value in ``Segmentation.panoptic``); for instances, 1-based rank.
        category: contiguous class index into the vocabulary (0..N-1), not the dataset id.
        score: confidence in [0, 1].
        isthing: thing or stuff, from the vocabulary.
        area: pixel count.
        bbox: COCO (x, y, width, height).
        mask: (H, W) bool for instances (they may overlap); None for panoptic segments (read them from the map).
        query: index of the proposal query it came from.
        name: class name ("" when the result carries no vocabulary).
    """

    id: int
    category: int
    score: float
    isthing: bool
    area: int
    bbox: tuple[float, float, float, float]
    mask: np.ndarray | None = field(default=None, repr=False)
    query: int = -1
    name: str = ""


class Segments:
    """A columnar table of K segments (panoptic segments or instances).

    Columns (numpy arrays, row k = segment k): ``id`` (K,) int64, ``class_id`` (K,) int64 (contiguous vocabulary
    index; ``category`` is the same array), ``score`` (K,) float64, ``isthing`` (K,) bool, ``area`` (K,) int64,
    ``bbox`` (K, 4) float64 COCO boxes, ``query`` (K,) int64; ``class_name`` (K,) str when the table has class names;
    ``masks``: a list of K (H, W) bool arrays (instances; rows of one query share one array) or None (panoptic
    segments, whose pixels are in the panoptic map).
    """

    __slots__ = ("id", "class_id", "score", "isthing", "area", "bbox", "query", "masks", "class_names")

    def __init__(
        self,
        id: Sequence[int] | np.ndarray = (),  # noqa: A002 - the column's name
        class_id: Sequence[int] | np.ndarray = (),
        score: Sequence[float] | np.ndarray = (),
        isthing: Sequence[bool] | np.ndarray = (),
        area: Sequence[int] | np.ndarray = (),
        bbox: Sequence[Sequence[float]] | np.ndarray = (),
        query: Sequence[int] | np.ndarray | None = None,
        masks: Sequence[np.ndarray] | None = None,
        class_names: Sequence[str] | None = None,
    ) -> None:
        self.id = np.asarray(id, dtype=np.int64).reshape(-1)
        k = self.id.size
        self.class_id = np.asarray(class_id, dtype=np.int64).reshape(-1)
        self.score = np.asarray(score, dtype=np.float64).reshape(-1)
        self.isthing = np.asarray(isthing, dtype=bool).reshape(-1)
        self.area = np.asarray(area, dtype=np.int64).reshape(-1)
        self.bbox = np.asarray(bbox, dtype=np.float64).reshape(k, 4) if k else np.zeros((0, 4), np.float64)
        self.query = np.full(k, -1, np.int64) if query is None else np.asarray(query, dtype=np.int64).reshape(-1)
        self.masks = None if masks is None else list(masks)
        self.class_names = None if class_names is None else list(class_names)
        for name in ("class_id", "score", "isthing", "area", "query"):
            if getattr(self, name).size != k:
                raise ValueError(f"Segments: column {name} has {getattr(self, name).size} rows, id has {k}")
        if self.masks is not None and len(self.masks) != k:
            raise ValueError(f"Segments: {len(self.masks)} masks for {k} rows")

    # --- construction ------------------------------------------------------------------------------------------
    @classmethod
    def from_rows(cls, rows: Iterable[Segment], class_names: Sequence[str] | None = None) -> Segments:
        """A table of :class:`Segment` rows (masks kept when every row has one)."""
        rows = list(rows)
        masks = [r.mask for r in rows]
        return cls(
            id=[r.id for r in rows],
            class_id=[r.category for r in rows],
            score=[r.score for r in rows],
            isthing=[r.isthing for r in rows],
            area=[r.area for r in rows],
            bbox=[tuple(r.bbox) for r in rows],
            query=[r.query for r in rows],
            masks=masks if rows and all(m is not None for m in masks) else None,
            class_names=class_names,
        )

    def with_class_names(self, class_names: Sequence[str] | None) -> Segments:
        """The same rows, naming classes from ``class_names`` (indexed by ``class_id``)."""
        out = self[np.arange(len(self))]
        out.class_names = None if class_names is None else list(class_names)
        return out

    # --- columns -----------------------------------------------------------------------------------------------
    @property
    def category(self) -> np.ndarray:
        """(K,) int64 contiguous class index (the same array as ``class_id``)."""
        return self.class_id

    @property
    def class_name(self) -> np.ndarray:
        """(K,) class names (str objects); "" for every row when the table has no names."""
        if self.class_names is None:
            return np.array([""] * len(self), dtype=object)
        return np.array([self.class_names[c] for c in self.class_id.tolist()], dtype=object)

    # --- sequence protocol -------------------------------------------------------------------------------------
    def __len__(self) -> int:
        return int(self.id.size)

    def _row(self, k: int) -> Segment:
        c = int(self.class_id[k])
        return Segment(
            id=int(self.id[k]),
            category=c,
            score=float(self.score[k]),
            isthing=bool(self.isthing[k]),
            area=int(self.area[k]),
            bbox=tuple(float(v) for v in self.bbox[k]),
            mask=None if self.masks is None else self.masks[k],
            query=int(self.query[k]),
            name="" if self.class_names is None else self.class_names[c],
        )

    def __iter__(self) -> Iterator[Segment]:
        for k in range(len(self)):
            yield self._row(k)

    def __getitem__(self, index: Any) -> Any:
        """``table[k]`` (int): a :class:`Segment`; a bool mask, an index array or a slice: a new table."""
        if isinstance(index, (int, np.integer)):
            k = int(index)
            if not -len(self) <= k < len(self):
                raise IndexError(f"segment index {k} out of range ({len(self)} rows)")
            return self._row(k % len(self))
        if isinstance(index, slice):
            rows = np.arange(len(self))[index]
        else:
            arr = np.asarray(index)
            if arr.dtype == bool:
                if arr.shape != (len(self),):
                    raise IndexError(f"boolean index of shape {arr.shape} for {len(self)} rows")
                rows = np.flatnonzero(arr)
            else:
                rows = arr.astype(np.int64).reshape(-1)
        return Segments(
            id=self.id[rows],
            class_id=self.class_id[rows],
            score=self.score[rows],
            isthing=self.isthing[rows],
            area=self.area[rows],
            bbox=self.bbox[rows],
            query=self.query[rows],
            masks=None if self.masks is None else [self.masks[k] for k in rows.tolist()],
            class_names=self.class_names,
        )

    def __eq__(self, other: object) -> bool:
        if isinstance(other, (list, tuple)):
            other = Segments.from_rows(other, self.class_names) if other else Segments(class_names=self.class_names)
        if not isinstance(other, Segments):
            return NotImplemented
        same_columns = all(
            np.array_equal(getattr(self, c), getattr(other, c))
            for c in ("id", "class_id", "score", "isthing", "area", "bbox", "query")
        )
        if not same_columns or (self.masks is None) != (other.masks is None):
            return False
        return self.masks is None or all(np.array_equal(a, b) for a, b in zip(self.masks, other.masks))

    __hash__ = None  # type: ignore[assignment] - mutable

    def __repr__(self) -> str:
        return f"Segments({len(self)} rows{', with masks' if self.masks is not None else ''})"


def _best_label_per_mask(table: Segments) -> np.ndarray:
    """Row indices (in table order) of the best-scoring row of each distinct mask: rows of one query share one mask;
    rows without a query (-1) are compared by their pixels."""
    best: dict[Any, int] = {}
    for k in range(len(table)):
        q = int(table.query[k])
        key = ("q", q) if q >= 0 else ("m", np.packbits(np.asarray(table.masks[k], bool)).tobytes())
        if key not in best or table.score[k] > table.score[best[key]]:
            best[key] = k
    return np.array(sorted(best.values()), dtype=np.int64)


def _as_table(value: Segments | Iterable[Segment] | None, class_names: Sequence[str] | None) -> Segments | None:
    if value is None:
        return None
    if isinstance(value, Segments):
        return value if class_names is None or value.class_names is not None else value.with_class_names(class_names)
    return Segments.from_rows(value, class_names)


@dataclass
class Segmentation:
    """Everything the requested tasks produced for one image, at its original size (H, W).

    Attributes:
        image_size: (H, W).
        semantic: (H, W) int32 class index (0..N-1) of the per-pixel argmax (-1 = none), or None when not requested.
        panoptic: (H, W) int32 segment ids, 0 = unlabelled, or None.
        segments: panoptic segments (ids match ``panoptic``), in id order, as a :class:`Segments` table (a list of
            :class:`Segment` is accepted and converted).
        instances: instances sorted by descending score, each with its own mask, as a table, or None when not
            requested.
        vocab: the vocabulary the class indices refer to (anything with ``names`` and ``isthing``), or None.
    """

    image_size: tuple[int, int]
    semantic: np.ndarray | None = field(default=None, repr=False)
    panoptic: np.ndarray | None = field(default=None, repr=False)
    segments: Segments = field(default_factory=Segments)
    instances: Segments | None = None
    vocab: ClassList | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        names = None if self.vocab is None else list(self.vocab.names)
        self.segments = _as_table(self.segments, names)
        self.instances = _as_table(self.instances, names)

    def __setattr__(self, name: str, value: Any) -> None:
        # segments / instances are always tables: a list of Segment rows assigned to them is converted
        if name in ("segments", "instances") and value is not None and not isinstance(value, Segments):
            vocab = self.__dict__.get("vocab")
            value = Segments.from_rows(value, None if vocab is None else list(vocab.names))
        object.__setattr__(self, name, value)

    # --- vocabulary --------------------------------------------------------------------------------------------
    @property
    def class_names(self) -> list[str] | None:
        """The vocabulary's class names (index = class index), or None without a vocabulary."""
        return None if self.vocab is None else list(self.vocab.names)

    def with_vocabulary(self, vocab: ClassList) -> Segmentation:
        """The same result, carrying ``vocab`` (so every segment is named)."""
        names = list(vocab.names)
        return replace(
            self,
            segments=self.segments.with_class_names(names),
            instances=None if self.instances is None else self.instances.with_class_names(names),
            vocab=vocab,
        )

    def _class_index(self, classes: Iterable[int | str]) -> set[int]:
        wanted: set[int] = set()
        names = self.class_names
        for c in classes:
            if isinstance(c, str):
                if names is None or c not in names:
                    raise ValueError(f"class {c!r} is not in the result's vocabulary")
                wanted.add(names.index(c))
            else:
                wanted.add(int(c))
        return wanted

    # --- filtering ---------------------------------------------------------------------------------------------
    def filter(
        self,
        min_score: float | Mapping[int | str, float] | None = None,
        min_area: float | None = None,
        classes: Iterable[int | str] | None = None,
        max_per_image: int | None = None,
        one_label_per_mask: bool = False,
    ) -> Segmentation:
        """A new result keeping only what passes every given control.

        Args:
            min_score: keep ``score >= min_score``; a mapping gives a floor per class (index or name; classes it
                does not name are kept).
            min_area: keep ``area >= min_area`` pixels; a value below 1 is a fraction of the image area.
            classes: keep these classes (indices or names).
            max_per_image: keep the best-scoring ``max_per_image`` instances (panoptic segments are a partition of
                the image and are not capped).
            one_label_per_mask: instances that share one mask (the same query under several classes, as the
                top-k over query x class pairs gives) keep only their best-scoring class.

        Instances and panoptic segments are filtered (pixels of a dropped panoptic segment become 0, unlabelled);
        the semantic map, which has no scores, only by ``classes`` (other pixels become -1). Instance ids are kept
        (they are ranks in the unfiltered result).
        """
        h, w = self.image_size
        area_floor = None if min_area is None else (min_area * h * w if 0 < min_area < 1 else min_area)
        wanted = None if classes is None else self._class_index(classes)
        floors = None
        if isinstance(min_score, Mapping):
            floors = {next(iter(self._class_index([c]))): float(v) for c, v in min_score.items()}

        def keep(table: Segments) -> np.ndarray:
            ok = np.ones(len(table), dtype=bool)
            if floors is not None:
                floor = np.array([floors.get(c, -np.inf) for c in table.class_id.tolist()], dtype=np.float64)
                ok &= table.score >= floor
            elif min_score is not None:
                ok &= table.score >= float(min_score)
            if area_floor is not None:
                ok &= table.area >= area_floor
            if wanted is not None:
                ok &= np.isin(table.class_id, list(wanted))
            return ok

        segments = self.segments[keep(self.segments)]
        panoptic = self.panoptic
        if panoptic is not None and len(segments) < len(self.segments):
            panoptic = np.where(np.isin(panoptic, segments.id), panoptic, 0).astype(self.panoptic.dtype)
        semantic = self.semantic
        if semantic is not None and wanted is not None:
            semantic = np.where(np.isin(semantic, list(wanted)), semantic, -1).astype(semantic.dtype)
        instances = None if self.instances is None else self.instances[keep(self.instances)]
        if instances is not None and one_label_per_mask:
            instances = instances[_best_label_per_mask(instances)]
        if instances is not None and max_per_image is not None:
            order = np.argsort(-instances.score, kind="stable")[: max(0, int(max_per_image))]
            instances = instances[np.sort(order)]
        return replace(self, semantic=semantic, panoptic=panoptic, segments=segments, instances=instances)

    # --- conversions -------------------------------------------------------------------------------------------
    def _category_ids(self, category_ids: Sequence[int] | None) -> list[int]:
        if category_ids is not None:
            return list(category_ids)
        if self.vocab is None:
            n = 1 + max([*self.segments.class_id.tolist(), *([] if self.instances is None else
                                                             self.instances.class_id.tolist()), -1])
            return list(range(1, n + 1))
        return output_category_ids(self.vocab)

    def to_coco(self, image_id: int | None = None, category_ids: Sequence[int] | None = None) -> list[dict[str, Any]]:
        """The instances as COCO result annotations: ``category_id``, ``segmentation`` (compressed RLE), ``area``,
        integer ``bbox``, ``score`` (rounded as written), plus ``image_id`` when given; instances with no pixels are
        left out. ``category_ids[c]`` is the id of class index c (default: the vocabulary's, else 1..N)."""
        return [ann for _, ann in self.coco_instances(image_id, category_ids)]

    def instance_masks(self) -> list[tuple[Segment, np.ndarray]]:
        """Every instance with its mask as an (H, W) bool array, checked: ValueError for an instance without a mask
        or with one of another size than the image."""
        if self.instances is None:
            raise ValueError("this result has no instances (task 'instance')")
        size = tuple(int(v) for v in self.image_size)
        out = []
        for inst in self.instances:
            if inst.mask is None:
                raise ValueError(f"instance {inst.id} has no mask")
            mask = np.asarray(inst.mask, dtype=bool)
            if mask.shape != size:
                raise ValueError(f"instance {inst.id} mask is {mask.shape}, the image {size}")
            out.append((inst, mask))
        return out

    def coco_instances(self, image_id: int | None = None, category_ids: Sequence[int] | None = None
                       ) -> list[tuple[Segment, dict[str, Any]]]:
        """:meth:`to_coco`'s annotations, each with the instance row it came from."""
        if self.instances is None:
            raise ValueError("this result has no instances (task 'instance')")
        ids = self._category_ids(category_ids)
        pairs: list[tuple[Segment, dict[str, Any]]] = []
        for inst, mask in self.instance_masks():
            area, bbox = mask_stats(mask)
            if area == 0:
                continue
            ann: dict[str, Any] = {} if image_id is None else {"image_id": int(image_id)}
            ann.update(category_id=ids[inst.category], segmentation=encode_rle(mask), area=area, bbox=bbox,
                       score=round_score(inst.score))
            pairs.append((inst, ann))
        return pairs

    def to_panoptic(self, category_ids: Sequence[int] | None = None) -> tuple[np.ndarray, list[dict[str, Any]]]:
        """The COCO panoptic encoding: ``(png, segments_info)``; ``png`` (H, W, 3) uint8 with id = R + 256 G +
        256^2 B (pixels whose id is no segment's are 0), ``segments_info`` with id, category_id, iscrowd, bbox and
        area measured on the map, and score; segments with no pixels are left out."""
        if self.panoptic is None:
            raise ValueError("this result has no panoptic map (task 'panoptic')")
        ids_of = self._category_ids(category_ids)
        order = np.argsort(self.segments.id, kind="stable")
        table = self.segments[order]
        seg_ids = table.id.tolist()
        if any(not 0 < i <= MAX_SEGMENT_ID for i in seg_ids) or len(set(seg_ids)) != len(seg_ids):
            raise ValueError(f"segment ids must be distinct and in 1..{MAX_SEGMENT_ID}")
        cleaned, areas, bboxes = segment_stats(np.asarray(self.panoptic), seg_ids)
        infos = [
            {"id": int(s.id), "category_id": ids_of[s.category], "iscrowd": 0, "bbox": bbox, "area": area,
             "score": round_score(s.score)}
            for s, area, bbox in zip(table, areas, bboxes)
            if area > 0
        ]
        return id_to_rgb(cleaned), infos

    def to_label_map(self, category_ids: Sequence[int] | None = None, unlabelled: int = 0) -> np.ndarray:
        """The semantic map as category ids: (H, W) int64, ``unlabelled`` where no class (index outside the
        vocabulary)."""
        if self.semantic is None:
            raise ValueError("this result has no semantic map (task 'semantic')")
        ids = np.asarray([unlabelled, *self._category_ids(category_ids)], dtype=np.int64)
        sem = np.asarray(self.semantic).astype(np.int64, copy=False)
        index = np.where((sem >= 0) & (sem < ids.size - 1), sem + 1, 0)
        return ids[index]

    def to_detections(self, source: str = "instances") -> Any:
        """A ``supervision.Detections`` of the instances (``source="instances"``) or of the panoptic segments
        (``"panoptic"``): xyxy boxes, masks (K, H, W), confidence, class_id (contiguous index) and
        ``data["class_name"]``. Needs the optional ``supervision`` package."""
        try:
            import supervision as sv
        except ImportError as exc:  # pragma: no cover - depends on the environment
            raise ImportError("to_detections() needs the supervision package: pip install supervision") from exc
        h, w = self.image_size
        if source == "instances":
            if self.instances is None:
                raise ValueError("this result has no instances (task 'instance')")
            table = self.instances
            masks = np.stack([np.asarray(m, bool) for m in table.masks]) if len(table) else np.zeros((0, h, w), bool)
        elif source == "panoptic":
            if self.panoptic is None:
                raise ValueError("this result has no panoptic map (task 'panoptic')")
            table = self.segments
            masks = np.stack([self.panoptic == i for i in table.id.tolist()]) if len(table) else np.zeros((0, h, w),
                                                                                                          bool)
        else:
            raise ValueError(f"source must be 'instances' or 'panoptic', got {source!r}")
        xyxy = table.bbox.copy()
        xyxy[:, 2:] += xyxy[:, :2]
        return sv.Detections(
            xyxy=xyxy.astype(np.float32),
            mask=masks,
            confidence=table.score.astype(np.float32),
            class_id=table.class_id.astype(int),
            data={"class_name": np.array(table.class_name.tolist(), dtype=str)},
        )


# --- a lossless, deterministic JSON form (what a run keeps per item, so that it can be exported again) ---------
_COLUMNS = ("id", "class_id", "score", "isthing", "area", "bbox", "query")


def _table_record(table: Segments, with_masks: bool) -> dict[str, Any]:
    record: dict[str, Any] = {c: getattr(table, c).tolist() for c in _COLUMNS}
    if with_masks and table.masks is not None:
        # rows of one query share one mask: each distinct mask array is stored once
        index: dict[int, int] = {}
        rles: list[dict[str, Any]] = []
        refs: list[int] = []
        for mask in table.masks:
            key = id(mask)
            if key not in index:
                index[key] = len(rles)
                rles.append(encode_rle(np.asarray(mask, dtype=bool)))
            refs.append(index[key])
        record["masks"], record["mask_index"] = rles, refs
    return record


def _table_from_record(obj: dict[str, Any], class_names: Sequence[str] | None) -> Segments:
    masks = None
    if "masks" in obj:
        planes = [decode_rle(r) for r in obj["masks"]]
        masks = [planes[i] for i in obj["mask_index"]]
    bbox = obj["bbox"] if obj["bbox"] else np.zeros((0, 4))
    return Segments(obj["id"], obj["class_id"], obj["score"], obj["isthing"], obj["area"], bbox, obj["query"],
                    masks=masks, class_names=class_names)


def segmentation_to_record(seg: Segmentation) -> dict[str, Any]:
    """``seg`` as JSON-able data that :func:`segmentation_from_record` reads back equal: maps as RLE (one per
    segment id of the panoptic map, one per class of the semantic map), tables as columns (scores as float64 reprs,
    exact), each distinct instance mask once. About the size of the COCO RLE of its masks."""
    h, w = (int(v) for v in seg.image_size)
    record: dict[str, Any] = {"image_size": [h, w], "semantic": None, "panoptic": None}
    if seg.semantic is not None:
        sem = np.asarray(seg.semantic)
        values = [int(v) for v in np.unique(sem)]
        record["semantic"] = {"dtype": sem.dtype.name, "values": values,
                              "rle": [encode_rle(sem == v) for v in values]}
    if seg.panoptic is not None:
        pan = np.asarray(seg.panoptic)
        values = [int(v) for v in np.unique(pan) if v != 0]
        record["panoptic"] = {"dtype": pan.dtype.name, "values": values, "rle": [encode_rle(pan == v) for v in values]}
    record["segments"] = _table_record(seg.segments, with_masks=False)
    record["instances"] = None if seg.instances is None else _table_record(seg.instances, with_masks=True)
    return record


def segmentation_from_record(obj: dict[str, Any], vocab: ClassList | None = None) -> Segmentation:
    """The :class:`Segmentation` a :func:`segmentation_to_record` record holds, carrying ``vocab``."""
    h, w = (int(v) for v in obj["image_size"])
    names = None if vocab is None else list(vocab.names)

    def id_map(part: dict[str, Any] | None, fill: int) -> np.ndarray | None:
        if part is None:
            return None
        out = np.full((h, w), fill, dtype=np.dtype(part["dtype"]))
        for value, rle in zip(part["values"], part["rle"]):
            out[decode_rle(rle)] = value
        return out

    return Segmentation(
        (h, w),
        semantic=id_map(obj["semantic"], 0),
        panoptic=id_map(obj["panoptic"], 0),
        segments=_table_from_record(obj["segments"], names),
        instances=None if obj["instances"] is None else _table_from_record(obj["instances"], names),
        vocab=vocab,
    )
