"""Mask <-> polygon conversion (masqclip_cli.structures.masks): hand-built masks with hand-computed expectations."""

from __future__ import annotations

import numpy as np
import pytest

from masqclip_cli.structures.masks import Polygon, mask_to_polygons, polygons_to_mask


def _round_trip(mask: np.ndarray, **kwargs: float) -> tuple[list[Polygon], np.ndarray]:
    """(polygons, rasterised back) of an (H, W) bool mask."""
    polygons = mask_to_polygons(mask, **kwargs)
    return polygons, polygons_to_mask(polygons, *mask.shape)


def _iou(a: np.ndarray, b: np.ndarray) -> float:
    union = np.logical_or(a, b).sum()
    return float(np.logical_and(a, b).sum() / union) if union else 1.0


def _n_points(polygons: list[Polygon]) -> int:
    return sum(p.exterior.shape[0] + sum(h.shape[0] for h in p.holes) for p in polygons)


def _disc(h: int, w: int, cy: float, cx: float, r: float) -> np.ndarray:
    """(h, w) bool: pixels whose centre is within r of (cx, cy)."""
    yy, xx = np.mgrid[:h, :w]
    return (yy - cy) ** 2 + (xx - cx) ** 2 <= r**2


def test_filled_rectangle() -> None:
    mask = np.zeros((10, 12), dtype=bool)
    mask[2:7, 3:11] = True  # 5 rows x 8 columns: columns 3..10, rows 2..6
    polygons, back = _round_trip(mask)
    assert len(polygons) == 1
    (poly,) = polygons
    assert poly.holes == ()
    np.testing.assert_array_equal(back, mask)
    # The polygon through the pixel centres is the rectangle (3, 2)-(10, 6): area (8 - 1) * (5 - 1).
    assert poly.area == pytest.approx(7 * 4)
    assert poly.exterior.dtype == np.float64 and poly.exterior.shape[1] == 2
    assert poly.exterior[:, 0].min() == 3 and poly.exterior[:, 0].max() == 10
    assert poly.exterior[:, 1].min() == 2 and poly.exterior[:, 1].max() == 6
    coco = poly.to_coco()
    assert len(coco) == 2 * poly.exterior.shape[0] and all(isinstance(v, float) for v in coco)
    assert coco[:2] == [3.0, 2.0]  # starts at the top-left pixel


def test_ring_has_one_hole() -> None:
    mask = np.zeros((12, 12), dtype=bool)
    mask[1:11, 1:11] = True  # 10 x 10 square, columns/rows 1..10
    mask[4:7, 3:8] = False  # 3 rows x 5 columns hole: columns 3..7, rows 4..6
    polygons, back = _round_trip(mask)
    assert len(polygons) == 1
    (poly,) = polygons
    assert len(poly.holes) == 1
    np.testing.assert_array_equal(back, mask)
    # The hole ring goes through the hole's own pixels, so rasterising it alone gives exactly the hole.
    hole_alone = polygons_to_mask([Polygon(poly.holes[0])], 12, 12)
    expected_hole = np.zeros((12, 12), dtype=bool)
    expected_hole[4:7, 3:8] = True
    np.testing.assert_array_equal(hole_alone, expected_hole)
    # Exterior (1, 1)-(10, 10) minus the hole (3, 4)-(7, 6): 9 * 9 - 4 * 2.
    assert poly.area == pytest.approx(81 - 8)


def test_hole_around_a_diagonally_attached_pixel() -> None:
    # A 6 x 6 ring (rows/columns 1..6) with a 4 x 4 hole; pixel (2, 2) juts into the hole from the corner and pixel
    # (3, 3) hangs off it by a diagonal only. The hole wraps around (3, 3) on all 4 sides but it is still the part's
    # (8-connected) pixel, so the hole ring must not enclose it (an 8-connected trace of the hole would).
    mask = np.zeros((8, 8), dtype=bool)
    mask[1:7, 1:7] = True
    mask[2:6, 2:6] = False
    mask[2, 2] = mask[3, 3] = True
    polygons, back = _round_trip(mask)
    assert len(polygons) == 1 and len(polygons[0].holes) == 1
    np.testing.assert_array_equal(back, mask)
    expected_hole = np.zeros((8, 8), dtype=bool)
    expected_hole[2:6, 2:6] = True
    expected_hole[2, 2] = expected_hole[3, 3] = False
    np.testing.assert_array_equal(polygons_to_mask([Polygon(polygons[0].holes[0])], 8, 8), expected_hole)


def test_ring_with_island_and_separate_blob() -> None:
    mask = np.zeros((16, 20), dtype=bool)
    mask[1:12, 1:12] = True  # outer square
    mask[3:10, 3:10] = False  # its hole
    mask[5:8, 5:8] = True  # island inside the hole
    mask[2:5, 15:19] = True  # separate blob to the right
    polygons, back = _round_trip(mask)
    assert len(polygons) == 3
    np.testing.assert_array_equal(back, mask)
    # Raster order of each part's top-left pixel: ring (row 1), blob (row 2), island (row 5).
    firsts = [tuple(p.exterior[0]) for p in polygons]
    assert firsts == [(1.0, 1.0), (15.0, 2.0), (5.0, 5.0)]
    ring, blob, island = polygons
    assert len(ring.holes) == 1 and blob.holes == () and island.holes == ()
    # The ring alone keeps its hole empty; the island survives the OR of the parts.
    ring_alone = polygons_to_mask([ring], 16, 20)
    assert not ring_alone[3:10, 3:10].any() and ring_alone[1:12, 1:12].sum() == 11 * 11 - 7 * 7
    assert polygons_to_mask([island], 16, 20).sum() == 9


def test_discs_simplified() -> None:
    mask = _disc(64, 128, 31.5, 30, 25)
    with_hole = _disc(64, 128, 31.5, 95, 26) & ~_disc(64, 128, 31.5, 95, 12)
    mask |= with_hole
    exact, back0 = _round_trip(mask)
    np.testing.assert_array_equal(back0, mask)
    simple, back1 = _round_trip(mask, tolerance=1.0)
    assert len(simple) == 2
    assert [len(p.holes) for p in simple] == [1, 0]  # the larger disc (with the hole) starts on a higher row
    assert _iou(back1, mask) >= 0.95
    assert _iou(polygons_to_mask([simple[0]], 64, 128), with_hole) >= 0.95
    assert _n_points(simple) < _n_points(exact)
    assert all(p.exterior.shape[0] >= 3 and all(h.shape[0] >= 3 for h in p.holes) for p in simple)


def test_thin_diagonal_line_and_single_pixels() -> None:
    mask = np.zeros((16, 16), dtype=bool)
    idx = np.arange(2, 10)
    mask[idx, idx] = True  # diagonal line (2, 2)..(9, 9)
    mask[np.arange(5), 15 - np.arange(5)] = True  # anti-diagonal line (15, 0)..(11, 4)
    mask[13, 8:15] = True  # horizontal line
    mask[0, 0] = True  # single pixels, one in a corner
    mask[15, 5] = True
    polygons, back = _round_trip(mask)
    # Exact at tolerance 0: degenerate 1- and 2-point rings rasterise as their point / segment.
    np.testing.assert_array_equal(back, mask)
    assert [p.exterior.shape[0] for p in polygons] == [1, 2, 2, 2, 1]  # raster order of the first pixels
    assert [tuple(p.exterior[0]) for p in polygons] == [(0.0, 0.0), (15.0, 0.0), (2.0, 2.0), (8.0, 13.0), (5.0, 15.0)]
    assert all(p.area == 0 for p in polygons)
    # With a tolerance, rings below 3 points are dropped: nothing here survives.
    assert mask_to_polygons(mask, tolerance=1.0) == []
    # Two one-pixel lines crossing (one 8-connected part with a diagonal "hole" that is not 4-connected-enclosed).
    cross = np.eye(9, dtype=bool) | np.eye(9, dtype=bool)[::-1]
    (x_part,) = mask_to_polygons(cross)
    assert x_part.holes == ()
    np.testing.assert_array_equal(polygons_to_mask([x_part], 9, 9), cross)


def test_empty() -> None:
    assert mask_to_polygons(np.zeros((5, 7), dtype=bool)) == []
    out = polygons_to_mask([], 5, 7)
    assert out.shape == (5, 7) and out.dtype == bool and not out.any()
    assert polygons_to_mask([], 0, 0).shape == (0, 0)


def test_min_area_drops_small_part() -> None:
    mask = np.zeros((20, 20), dtype=bool)
    mask[1:11, 1:11] = True  # polygon area 9 * 9 = 81
    mask[14:17, 14:17] = True  # polygon area 2 * 2 = 4
    assert len(mask_to_polygons(mask)) == 2
    (kept,) = mask_to_polygons(mask, min_area=10)
    np.testing.assert_array_equal(polygons_to_mask([kept], 20, 20), mask & (np.arange(20)[:, None] < 12))
    assert mask_to_polygons(mask, min_area=100) == []
    assert len(mask_to_polygons(mask, min_area=4)) == 2  # "below" is strict


def test_random_masks_round_trip_exactly() -> None:
    rng = np.random.default_rng(0)
    for _ in range(300):  # noisy masks: many holes, islands and diagonal-only contacts
        h, w = (int(v) for v in rng.integers(1, 24, size=2))
        mask = rng.random((h, w)) < rng.uniform(0.1, 0.9)
        _, back = _round_trip(mask)
        np.testing.assert_array_equal(back, mask)


def test_non_bool_input_and_order_is_deterministic() -> None:
    mask = np.zeros((8, 8), dtype=np.uint8)
    mask[1:4, 1:4] = 255
    mask[5:7, 2:7] = 3
    a = mask_to_polygons(mask)
    assert a == mask_to_polygons(mask.astype(bool))
    np.testing.assert_array_equal(polygons_to_mask(a, 8, 8), mask != 0)


def test_polygon_value_semantics_and_clipping() -> None:
    square = Polygon([[0, 0], [3, 0], [3, 3], [0, 3]])
    assert square.exterior.dtype == np.float64 and not square.exterior.flags.writeable
    assert square == Polygon(np.array([[0.0, 0.0], [3.0, 0.0], [3.0, 3.0], [0.0, 3.0]]))
    assert hash(square) == hash(Polygon([[0, 0], [3, 0], [3, 3], [0, 3]]))
    assert square != Polygon([[0, 0], [3, 0], [3, 3]])
    assert square.area == 9.0
    # A part reaching outside the image is clipped.
    big = Polygon([[-5, -5], [2, -5], [2, 1], [-5, 1]])
    expected = np.zeros((4, 4), dtype=bool)
    expected[:2, :3] = True
    np.testing.assert_array_equal(polygons_to_mask([big], 4, 4), expected)
    assert not polygons_to_mask([Polygon([[10, 10], [12, 10], [12, 12]])], 4, 4).any()
    with pytest.raises(ValueError):
        Polygon(np.zeros((0, 2)))
    with pytest.raises(ValueError):
        Polygon([[0, 0, 0]])
    with pytest.raises(ValueError):
        mask_to_polygons(np.zeros((2, 2, 2)))
    with pytest.raises(ValueError):
        mask_to_polygons(np.zeros((2, 2)), tolerance=-1)
