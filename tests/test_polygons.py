"""The polygon core (exporters.polygons) and the polygon formats, on hand-made masks: a mask
with a hole, a mask in three parts, random masks against OpenCV's components and pycocotools'
rasteriser."""

from __future__ import annotations

import numpy as np
import pytest
from pycocotools import mask as mask_api

from exporters.polygons import joined_ring, label_objects, mask_objects, object_pixels

HOLED, PARTS = 1, 2  # label 1: a square with a square hole; label 2: three blobs


def hand_mask() -> np.ndarray:
    """(40, 48) ids: label 1 a 16 x 16 square with a 6 x 6 hole, label 2 in three parts
    (a bar, a diagonal staircase, a lone pixel), 255 somewhere."""
    mask = np.zeros((40, 48), dtype=np.uint8)
    mask[4:20, 4:20] = HOLED
    mask[9:15, 9:15] = 0
    mask[26:30, 2:30] = PARTS  # a bar
    for step in range(10):  # a staircase, 8-connected only through corners
        mask[24 + step, 34 + step] = PARTS
    mask[2, 40] = PARTS  # a lone pixel
    mask[35:38, 5:8] = 255
    return mask


def polygon_pixels(rings: list[np.ndarray], height: int, width: int) -> np.ndarray:
    """pycocotools' union of the filled rings (edge coordinates), (H, W) bool."""
    flat = [ring.ravel().tolist() for ring in rings]
    return mask_api.decode(mask_api.merge(mask_api.frPyObjects(flat, height, width))) > 0


def object_raster(obj, height: int, width: int) -> np.ndarray:
    pixels = polygon_pixels([obj.outer], height, width)
    for hole in obj.holes:
        pixels &= ~polygon_pixels([hole], height, width)
    return pixels


def test_hole_and_three_parts():
    mask = hand_mask()
    (square,) = label_objects(mask, HOLED)
    assert square.area == 16 * 16 - 6 * 6
    assert square.bbox == (4, 4, 16, 16)
    assert len(square.holes) == 1 and len(square.outer) == 4
    assert sorted(map(tuple, square.holes[0].astype(int))) == [(9, 9), (9, 15), (15, 9), (15, 15)]
    parts = label_objects(mask, PARTS)
    assert sorted(p.area for p in parts) == [1, 10, 4 * 28]
    for obj in [square, *parts]:
        assert (object_raster(obj, *mask.shape) == object_pixels(mask, obj)).all()
    assert [o.label_id for o in mask_objects(mask, [1, 2])] == [1, 2, 2, 2]


def test_min_area_drops_objects_and_fills_small_holes():
    mask = hand_mask()
    assert sorted(p.area for p in label_objects(mask, PARTS, min_area=10)) == [10, 112]
    (square,) = label_objects(mask, HOLED, min_area=37)  # the 36-pixel hole is filled
    assert square.holes == () and square.area == 16 * 16
    assert label_objects(mask, HOLED, min_area=16 * 16 + 1) == []


def test_random_masks_round_trip_exactly():
    """Unsimplified and at the default tolerance, rings rasterise back to the pixels."""
    import cv2

    rng = np.random.default_rng(0)
    for _ in range(60):
        height, width = (int(v) for v in rng.integers(3, 24, 2))
        binary = (rng.random((height, width)) < rng.uniform(0.2, 0.8)).astype(np.uint8)
        components = cv2.connectedComponents(binary, connectivity=8)[0] - 1
        for tolerance in (0.0, 0.5):
            objects = label_objects(binary, 1, tolerance=tolerance)
            assert len(objects) == components
            assert sum(o.area for o in objects) == binary.sum()
            union = np.zeros(binary.shape, bool)
            for obj in objects:
                pixels = object_pixels(binary, obj)
                assert (object_raster(obj, height, width) == pixels).all()
                union |= pixels
            assert (union == binary.astype(bool)).all()


def test_joined_ring_keeps_the_hole_when_filled():
    import cv2

    mask = hand_mask()
    (square,) = label_objects(mask, HOLED)
    ring = joined_ring(square)
    assert len(ring) == len(square.outer) + len(square.holes[0]) + 2
    # filled at 10x (pixel centres), as Ultralytics rasterises its polygons
    scale = 10
    canvas = np.zeros((mask.shape[0] * scale, mask.shape[1] * scale), np.uint8)
    cv2.fillPoly(canvas, [np.round(ring * scale).astype(np.int32)], 1)
    small = canvas[scale // 2 :: scale, scale // 2 :: scale].astype(bool)
    expected = mask == HOLED
    assert (small & expected).sum() / (small | expected).sum() > 0.95
    assert not small[10:14, 10:14].any()  # the hole stays empty


@pytest.mark.parametrize("bad", [np.zeros((2, 2, 2), np.uint8)])
def test_bad_mask(bad):
    with pytest.raises(ValueError, match="2-D"):
        label_objects(bad, 1)
