"""Mask arithmetic, in one place: COCO RLE encode / decode, pixel area, boxes, per-id statistics of an id map, the
COCO panoptic RGB encoding, scores as written, and mask <-> polygon conversion.

Everything here works on numpy arrays and imports nothing else of masqclip: it is the bottom layer.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np
from pycocotools import mask as mask_util

__all__ = [
    "MAX_SEGMENT_ID",
    "SCORE_DECIMALS",
    "Polygon",
    "claim_pixels",
    "decode_rle",
    "encode_rle",
    "id_to_rgb",
    "mask_area",
    "mask_bbox",
    "mask_stats",
    "mask_to_polygons",
    "polygons_to_mask",
    "rgb_to_id",
    "round_score",
    "segment_stats",
]

#: Scores are rounded to this many decimals in every output.
SCORE_DECIMALS = 6
#: Largest segment id of a COCO panoptic PNG (id = R + 256 G + 256^2 B).
MAX_SEGMENT_ID = 256**3 - 1
_LUT_LIMIT = 1 << 22  # id maps whose ids are all below this are indexed through a lookup table


def round_score(score: float) -> float:
    """A score as written: a Python float rounded to :data:`SCORE_DECIMALS` decimals (finite, or ValueError)."""
    value = float(score)
    if not np.isfinite(value):
        raise ValueError(f"score is not finite: {score!r}")
    return round(value, SCORE_DECIMALS) + 0.0  # + 0.0 turns -0.0 into 0.0


def encode_rle(mask: np.ndarray) -> dict[str, Any]:
    """COCO compressed RLE of a boolean (H, W) mask: ``{"size": [H, W], "counts": str}`` (pycocotools)."""
    mask = np.asarray(mask)
    if mask.ndim != 2:
        raise ValueError(f"a mask must be 2-D, got shape {mask.shape}")
    rle = mask_util.encode(np.asfortranarray(mask, dtype=np.uint8))
    counts = rle["counts"]
    return {"size": [int(rle["size"][0]), int(rle["size"][1])], "counts": counts.decode("ascii")}


def decode_rle(rle: dict[str, Any]) -> np.ndarray:
    """The (H, W) bool mask of a COCO RLE, compressed (``counts`` a string or bytes) or uncompressed (a list)."""
    size = [int(v) for v in rle["size"]]
    counts = rle["counts"]
    if isinstance(counts, list):
        compressed = mask_util.frPyObjects({"size": size, "counts": counts}, size[0], size[1])
    else:
        compressed = {"size": size, "counts": counts.encode("ascii") if isinstance(counts, str) else counts}
    return mask_util.decode(compressed).astype(bool)


def mask_area(mask: np.ndarray) -> int:
    """Pixel count of a boolean (H, W) mask."""
    return int(np.count_nonzero(mask))


def mask_stats(mask: np.ndarray) -> tuple[int, list[int]]:
    """(pixel count, integer COCO bbox [x, y, w, h]) of a boolean (H, W) mask; (0, [0, 0, 0, 0]) when empty."""
    mask = np.asarray(mask, dtype=bool)
    rows = np.flatnonzero(mask.any(axis=1))
    if rows.size == 0:
        return 0, [0, 0, 0, 0]
    cols = np.flatnonzero(mask.any(axis=0))
    return mask_area(mask), [int(cols[0]), int(rows[0]), int(cols[-1] - cols[0] + 1), int(rows[-1] - rows[0] + 1)]


def mask_bbox(mask: np.ndarray) -> tuple[float, float, float, float]:
    """COCO box (x, y, width, height) of a boolean (H, W) mask as floats; (0, 0, 0, 0) when empty."""
    _, box = mask_stats(mask)
    return (float(box[0]), float(box[1]), float(box[2]), float(box[3]))


def segment_stats(id_map: np.ndarray, ids: Sequence[int]) -> tuple[np.ndarray, list[int], list[list[int]]]:
    """Pixel counts and boxes of the given segment ids in an (H, W) id map, in one pass over the map.

    Returns ``(cleaned, areas, bboxes)``: ``cleaned`` is the map with every id not in ``ids`` set to 0 (int64),
    ``areas[k]`` the pixel count of ``ids[k]`` and ``bboxes[k]`` its integer COCO box ([0, 0, 0, 0] when absent).
    ``ids`` must be distinct positive integers.
    """
    id_map = np.asarray(id_map)
    if id_map.ndim != 2 or not np.issubdtype(id_map.dtype, np.integer):
        raise ValueError(f"an id map must be a 2-D integer array, got {id_map.dtype} {id_map.shape}")
    ids_arr = np.asarray(list(ids), dtype=np.int64)
    k = ids_arr.size
    if k and (ids_arr.min() <= 0 or np.unique(ids_arr).size != k):
        raise ValueError("segment ids must be distinct positive integers")
    h, w = id_map.shape
    # Index of each pixel's segment in ``ids`` (k = not one of them).
    lo, hi = (int(id_map.min()), int(id_map.max())) if id_map.size else (0, 0)
    if k == 0:
        index = np.zeros((h, w), dtype=np.intp)
    elif lo >= 0 and hi <= _LUT_LIMIT:
        lut = np.full(hi + 1, k, dtype=np.intp)
        small = ids_arr <= hi
        lut[ids_arr[small]] = np.flatnonzero(small)
        index = lut[id_map]
    else:
        flat = id_map.astype(np.int64, copy=False)
        order = np.argsort(ids_arr, kind="stable")
        sorted_ids = ids_arr[order]
        pos = np.searchsorted(sorted_ids, flat).clip(0, k - 1)
        index = np.where(sorted_ids[pos] == flat, order[pos], k)
    areas = np.bincount(index.ravel(), minlength=k + 1)[:k]
    rows = np.zeros((h, k + 1), dtype=bool)
    cols = np.zeros((w, k + 1), dtype=bool)
    rows[np.arange(h)[:, None], index] = True
    cols[np.arange(w)[None, :], index] = True
    y0 = rows.argmax(axis=0)
    y1 = h - 1 - rows[::-1].argmax(axis=0)
    x0 = cols.argmax(axis=0)
    x1 = w - 1 - cols[::-1].argmax(axis=0)
    bboxes = [
        [int(x0[j]), int(y0[j]), int(x1[j] - x0[j] + 1), int(y1[j] - y0[j] + 1)] if areas[j] else [0, 0, 0, 0]
        for j in range(k)
    ]
    cleaned = np.append(ids_arr, 0)[index]
    return cleaned, [int(a) for a in areas], bboxes


def id_to_rgb(id_map: np.ndarray) -> np.ndarray:
    """(H, W) segment ids -> (H, W, 3) uint8 with id = R + 256 G + 256^2 B (the COCO panoptic encoding)."""
    id_map = np.asarray(id_map, dtype=np.int64)
    if id_map.size and (id_map.min() < 0 or id_map.max() > MAX_SEGMENT_ID):
        raise ValueError(f"panoptic segment ids must be in 0..{MAX_SEGMENT_ID}")
    return np.stack([id_map & 255, (id_map >> 8) & 255, (id_map >> 16) & 255], axis=-1).astype(np.uint8)


def rgb_to_id(rgb: np.ndarray) -> np.ndarray:
    """(H, W, 3) COCO panoptic PNG pixels -> (H, W) int64 segment ids."""
    rgb = np.asarray(rgb, dtype=np.int64)
    return rgb[..., 0] + 256 * rgb[..., 1] + 256 * 256 * rgb[..., 2]


# --- polygons ------------------------------------------------------------------------------------------------------
#
# Coordinates are pixel centres: the pixel at column c, row r is the point (x, y) = (c, r). A ring is an (N, 2)
# float64 array of such points, closed implicitly (the last point joins the first). OpenCV is imported lazily, inside
# the functions, so that importing this bottom layer stays cheap.

from dataclasses import dataclass  # noqa: E402

_INT32_LIMIT = 2**31 - 1


def _as_ring(points: Any, what: str) -> np.ndarray:
    """A read-only (N, 2) float64 copy of ``points`` (N >= 1, finite), or ValueError."""
    ring = np.array(points, dtype=np.float64)
    if ring.ndim != 2 or ring.shape[1] != 2 or ring.shape[0] == 0:
        raise ValueError(f"{what} must be an (N, 2) array of x, y points with N >= 1, got shape {ring.shape}")
    if not np.isfinite(ring).all():
        raise ValueError(f"{what} has non-finite coordinates")
    ring.setflags(write=False)
    return ring


def _ring_area(ring: np.ndarray) -> float:
    """Unsigned shoelace area of a closed (N, 2) ring; 0 for fewer than 3 points."""
    if ring.shape[0] < 3:
        return 0.0
    x, y = ring[:, 0], ring[:, 1]
    return 0.5 * abs(float(np.dot(x, np.roll(y, -1)) - np.dot(np.roll(x, -1), y)))


@dataclass(frozen=True, eq=False)
class Polygon:
    """One connected part of a mask: an exterior ring and the rings of its holes, in pixel-centre coordinates.

    ``exterior`` is an (N, 2) float64 array of x, y points (the pixel at column c, row r is (c, r)); ``holes`` is a
    tuple of (M, 2) arrays, one per hole, each ring passing through the centres of the hole's own boundary pixels
    (so clearing the filled hole ring removes exactly the hole's pixels). Rings are closed implicitly. Inputs are
    copied into read-only float64 arrays; equality and hashing compare the coordinates.

    Rings straight from :func:`mask_to_polygons` at ``tolerance=0`` can be degenerate: a single pixel is a 1-point
    ring and a one-pixel-wide straight line a 2-point ring. They still rasterise back exactly with
    :func:`polygons_to_mask`, but have zero area and are not valid COCO polygons (fewer than 3 points).

    COCO note: a COCO ``segmentation`` polygon list has no holes (pycocotools unions the polygons of an annotation),
    so :meth:`to_coco` writes the exterior only and a part written that way has its holes filled in. A caller whose
    polygons have holes (``any(p.holes for p in polygons)``) should write the mask as RLE (:func:`encode_rle`) to be
    exact, or carry the ``holes`` rings in a field of its own next to the COCO polygon. Note too that pycocotools
    rasterises polygon coordinates as continuous positions, not pixel centres, so its decoding of :meth:`to_coco`
    output misses the right-most column and bottom row of a part; RLE is the exact format.
    """

    exterior: np.ndarray
    holes: tuple[np.ndarray, ...] = ()

    def __post_init__(self) -> None:
        object.__setattr__(self, "exterior", _as_ring(self.exterior, "a polygon's exterior"))
        object.__setattr__(self, "holes", tuple(_as_ring(h, "a polygon's hole") for h in self.holes))

    @property
    def area(self) -> float:
        """Shoelace area of the exterior ring minus that of each hole ring, in pixels^2 (not the pixel count: the
        polygon through the centres of a w x h rectangle of pixels has area (w - 1) * (h - 1))."""
        return _ring_area(self.exterior) - sum(_ring_area(h) for h in self.holes)

    def to_coco(self) -> list[float]:
        """The exterior as a flat COCO polygon ``[x0, y0, x1, y1, ...]`` (2 N floats); the holes are not in it (see
        the class docstring)."""
        return [float(v) for v in self.exterior.ravel()]

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Polygon):
            return NotImplemented
        return (
            np.array_equal(self.exterior, other.exterior)
            and len(self.holes) == len(other.holes)
            and all(np.array_equal(a, b) for a, b in zip(self.holes, other.holes))
        )

    def __hash__(self) -> int:
        return hash((self.exterior.shape, self.exterior.tobytes(), tuple(h.tobytes() for h in self.holes)))


def _trace_outer(region: np.ndarray) -> np.ndarray:
    """Outer boundary of the single 8-connected region of an (h, w) uint8 0/1 array whose border rows and columns
    are all 0: an (N, 1, 2) int32 OpenCV contour through boundary pixel centres, starting at the region's top-most,
    left-most pixel. Filling it (cv2.fillPoly) gives back the region with everything it 8-encloses, exactly."""
    import cv2

    contours, _ = cv2.findContours(region, cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
    if len(contours) != 1:  # cannot happen for one 8-connected region; guard against a silent wrong answer
        raise RuntimeError(f"expected one outer contour, got {len(contours)}")
    return contours[0]


# Crack-following directions as (d_row, d_col), counter-clockwise on screen: W, S, E, N (index + 1 = turn left).
_STEPS = ((0, -1), (1, 0), (0, 1), (-1, 0))
# The cells left and right of the grid edge leaving corner (i, j) in each direction, as (row, col) offsets from
# (i, j); corner (i, j) is the top-left corner of pixel (i, j).
_LEFT = ((0, -1), (0, 0), (-1, 0), (-1, -1))
_RIGHT = ((-1, -1), (0, -1), (0, 0), (-1, 0))


def _trace_outer_4(region: np.ndarray) -> np.ndarray:
    """Like :func:`_trace_outer`, for a 4-connected region traced with 4-connectivity: where two of its pixels touch
    only diagonally the ring does not step between them, so filling it gives back the region with only what it
    4-encloses (OpenCV traces 8-connected only). Pure Python, one step per boundary edge: the slow path."""
    rows, cols = np.nonzero(region)
    r0, c0 = int(rows[0]), int(cols[0])  # top-most, then left-most pixel: nothing above it
    inside = region.astype(bool)
    i, j, d = r0, c0 + 1, 0  # the top edge of that pixel, walked west, the region on the left
    start = (i, j, d)
    ring: list[tuple[int, int]] = []
    while True:
        li, lj = _LEFT[d]
        cell = (j + lj, i + li)  # (x, y) of the pixel left of the edge being walked
        if not ring or ring[-1] != cell:
            ring.append(cell)
        i, j = i + _STEPS[d][0], j + _STEPS[d][1]
        ahead_left = inside[i + _LEFT[d][0], j + _LEFT[d][1]]
        ahead_right = inside[i + _RIGHT[d][0], j + _RIGHT[d][1]]
        if not ahead_left:  # convex corner, or a diagonal-only touch (4-connectivity: keep around this pixel)
            d = (d + 1) % 4
        elif ahead_right:  # concave corner
            d = (d - 1) % 4
        if (i, j, d) == start:
            break
    if len(ring) > 1 and ring[-1] == ring[0]:
        ring.pop()
    points = np.array(ring, dtype=np.int32)
    if len(points) > 2:  # drop points in the middle of straight runs (as CHAIN_APPROX_SIMPLE does)
        step_in = points - np.roll(points, 1, axis=0)
        step_out = np.roll(points, -1, axis=0) - points
        points = points[(step_in != step_out).any(axis=1)]
    return points.reshape(-1, 1, 2)


def _trace_hole(hole: np.ndarray, part: np.ndarray) -> np.ndarray:
    """Outer boundary of a hole (a 4-connected region of the (h, w) uint8 0/1 array ``hole``, border all 0) of a
    part (``part``, the part's pixels over the same window): an (N, 1, 2) int32 contour that fills back to exactly
    the hole. OpenCV's 8-connected trace is used when it does (no pixel of the part touches the hole's outside only
    through a diagonal gap of the hole), the 4-connected trace otherwise."""
    import cv2

    contour = _trace_outer(hole)
    filled = np.zeros_like(hole)
    cv2.fillPoly(filled, [contour], 1, cv2.LINE_8)
    if not (filled & part).any():
        return contour
    return _trace_outer_4(hole)


def _simplify(contour: np.ndarray, tolerance: float) -> np.ndarray | None:
    """A (N, 1, 2) int32 contour as an (N', 2) float64 ring, simplified with Douglas-Peucker (cv2.approxPolyDP,
    epsilon = ``tolerance`` pixels) when ``tolerance`` > 0; None when a simplified ring has fewer than 3 points."""
    if tolerance > 0:
        import cv2

        contour = cv2.approxPolyDP(contour, float(tolerance), True)
        if contour.shape[0] < 3:
            return None
    return contour.reshape(-1, 2).astype(np.float64)


def mask_to_polygons(mask: np.ndarray, tolerance: float = 0.0, min_area: float = 0.0) -> list[Polygon]:
    """The polygons of an (H, W) mask (nonzero = foreground): one :class:`Polygon` per 8-connected foreground part.

    A part lying inside a hole of another part (an island) is a part of its own. Each part's holes are the bounded
    4-connected components of the part's complement (whatever lies inside such a hole, islands included, belongs to
    other parts); a hole ring traces the hole's own boundary pixels, not the part's pixels around it, so
    ``polygons_to_mask(mask_to_polygons(mask), H, W) == mask`` exactly at ``tolerance=0``.

    ``tolerance`` > 0 simplifies every ring with cv2.approxPolyDP (epsilon = ``tolerance`` pixels); a ring left with
    fewer than 3 points is dropped (a dropped exterior drops the part, with its holes), so every ring of a
    simplified result has at least 3 points (6 COCO numbers), but single pixels and one-pixel-wide lines vanish and
    a dropped hole is filled in. Parts whose
    :attr:`Polygon.area` (shoelace, after simplification; smaller than the pixel count) is below ``min_area`` are
    dropped. Parts are ordered by the top-most, then left-most pixel of each (raster order of the traced exterior's
    first point), holes within a part likewise. See :class:`Polygon` for why COCO polygons cannot hold the holes.
    """
    import cv2

    mask = np.asarray(mask)
    if mask.ndim != 2:
        raise ValueError(f"a mask must be 2-D, got shape {mask.shape}")
    if not (tolerance >= 0 and np.isfinite(tolerance)):
        raise ValueError(f"tolerance must be a finite number >= 0, got {tolerance!r}")
    if not min_area >= 0:
        raise ValueError(f"min_area must be >= 0, got {min_area!r}")
    fg = (mask != 0).astype(np.uint8)
    if not fg.any():
        return []
    n_parts, labels, stats, _ = cv2.connectedComponentsWithStats(fg, connectivity=8, ltype=cv2.CV_32S)
    found: list[tuple[tuple[int, int], Polygon]] = []
    for part in range(1, n_parts):
        x, y, w, h = (int(v) for v in stats[part, :4])
        # The part alone, with a one-pixel frame of background so that the frame is all "outside".
        region = np.zeros((h + 2, w + 2), dtype=np.uint8)
        region[1:-1, 1:-1] = labels[y : y + h, x : x + w] == part
        traced = _trace_outer(region) + np.array([x - 1, y - 1], dtype=np.int32)
        exterior = _simplify(traced, tolerance)
        if exterior is None:
            continue
        holes: list[tuple[tuple[int, int], np.ndarray]] = []
        # Components of the part's complement (label 0 = the part itself); the one holding the frame is outside.
        n_comp, comp, comp_stats, _ = cv2.connectedComponentsWithStats(1 - region, connectivity=4, ltype=cv2.CV_32S)
        outside = int(comp[0, 0])
        for hole in range(1, n_comp):
            if hole == outside:
                continue
            hx, hy, hw, hh = (int(v) for v in comp_stats[hole, :4])
            hole_region = np.zeros((hh + 2, hw + 2), dtype=np.uint8)
            hole_region[1:-1, 1:-1] = comp[hy : hy + hh, hx : hx + hw] == hole
            window = region[hy - 1 : hy + hh + 1, hx - 1 : hx + hw + 1]  # inside the frame: holes never touch it
            hole_traced = _trace_hole(hole_region, window) + np.array([x + hx - 2, y + hy - 2], dtype=np.int32)
            ring = _simplify(hole_traced, tolerance)
            if ring is not None:
                first = hole_traced[0, 0]
                holes.append(((int(first[1]), int(first[0])), ring))
        holes.sort(key=lambda item: item[0])
        polygon = Polygon(exterior, tuple(ring for _, ring in holes))
        if polygon.area < min_area:
            continue
        first = traced[0, 0]
        found.append(((int(first[1]), int(first[0])), polygon))
    found.sort(key=lambda item: item[0])
    return [polygon for _, polygon in found]


def polygons_to_mask(polygons: Sequence[Polygon], height: int, width: int) -> np.ndarray:
    """Rasterise polygons into an (height, width) bool mask.

    Each polygon is drawn on its own (cv2.fillPoly: the exterior filled, then each hole ring cleared) and the parts
    are OR-ed together, so an island inside another part's hole survives. Coordinates are pixel centres, rounded to
    the nearest integer; a pixel is set when it lies inside or on the exterior ring and neither inside nor on a hole
    ring (degenerate 1- and 2-point rings draw their point / segment). Parts reaching outside the image are clipped.
    """
    import cv2

    height, width = int(height), int(width)
    if height < 0 or width < 0:
        raise ValueError(f"mask size must be >= 0, got {height} x {width}")
    out = np.zeros((height, width), dtype=bool)
    if height == 0 or width == 0:
        return out
    for polygon in polygons:
        exterior = np.rint(polygon.exterior)
        if np.abs(exterior).max() > _INT32_LIMIT or any(np.abs(h).max() > _INT32_LIMIT for h in polygon.holes):
            raise ValueError("polygon coordinates must lie within the int32 range")
        # Draw on a canvas covering the exterior's box clipped to the image (fillPoly clips the rest).
        x0, y0 = (max(int(v), 0) for v in exterior.min(axis=0))
        x1, y1 = (min(int(v), lim - 1) for v, lim in zip(exterior.max(axis=0), (width, height)))
        if x0 > x1 or y0 > y1:
            continue
        canvas = np.zeros((y1 - y0 + 1, x1 - x0 + 1), dtype=np.uint8)
        offset = (-x0, -y0)
        cv2.fillPoly(canvas, [exterior.astype(np.int32).reshape(-1, 1, 2)], 1, cv2.LINE_8, 0, offset)
        for hole in polygon.holes:  # one at a time: fillPoly with several rings fills by parity
            ring = np.rint(hole).astype(np.int32).reshape(-1, 1, 2)
            cv2.fillPoly(canvas, [ring], 0, cv2.LINE_8, 0, offset)
        out[y0 : y1 + 1, x0 : x1 + 1] |= canvas.astype(bool)
    return out


def claim_pixels(masks: Iterable[np.ndarray]) -> list[np.ndarray]:
    """Non-overlapping masks from overlapping ones, in priority order: each (H, W) bool mask keeps only the pixels
    that no earlier mask took (the first listed wins a contested pixel); a mask may come out empty."""
    out: list[np.ndarray] = []
    taken: np.ndarray | None = None
    for mask in masks:
        mask = np.asarray(mask, dtype=bool)
        if taken is None:
            taken = np.zeros(mask.shape, dtype=bool)
        kept = mask & ~taken
        taken |= kept
        out.append(kept)
    return out
