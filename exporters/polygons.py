"""Id masks -> objects -> polygons: the one polygon core of the COCO, YOLO and Label Studio
polygon exports.

An *object* is a connected component (8-connected) of one label's pixels (numbered pixel by
pixel by :func:`label_components`, which CVAT's object masks use). Each object has one
outer ring and zero or more holes (4-connected background regions it encloses; an island inside
a hole is an object of its own). Rings run along the pixels' edges, not through their centres:
vertex ``(x, y)`` is the corner shared by pixels ``x - 1 .. x`` and ``y - 1 .. y``, so pixel
``(x, y)`` spans ``[x, x + 1) x [y, y + 1)``, COCO's continuous coordinates. An unsimplified ring
encloses exactly the object's pixels (its shoelace area is their count); rings are then
simplified by Douglas-Peucker with a tolerance in pixels.

OpenCV (``cv2``, from ``opencv-python-headless``) traces the boundaries; each traced chain of
boundary pixel centres becomes the ring of their outer edges here: at every pixel of the chain
the corners between the edge it was entered by and the edge it is left by, on the background's
side, are emitted.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

DEFAULT_TOLERANCE = 0.5  # pixels; below the 0.71 of a one-pixel staircase, so stairs stay
DEFAULT_MIN_AREA = 1  # pixels; every object is kept

# Corners of pixel (x, y) in clockwise order on screen (y down): TL, TR, BR, BL.
_CORNERS = np.array([[0, 0], [1, 0], [1, 1], [0, 1]], dtype=np.int64)
# The first corner on the background's side when a pixel is entered moving (dx, dy), and the
# last when it is left moving (dx, dy); indexed [dx + 1, dy + 1]. For a trace with the
# background on its left (clockwise on screen).
_ENTRY = np.array([[2, 2, 1], [3, -1, 1], [3, 0, 0]], dtype=np.int64)
_EXIT = np.array([[0, 3, 3], [0, -1, 2], [1, 1, 2]], dtype=np.int64)


def _cv2() -> Any:
    try:
        import cv2
    except ImportError as error:  # pragma: no cover - depends on the environment
        raise ImportError(
            "polygon exports need OpenCV: pip install opencv-python-headless"
        ) from error
    return cv2


def label_components(binary: np.ndarray) -> tuple[int, np.ndarray]:
    """The objects of an (H, W) boolean mask as pixels: its 8-connected components.

    Returns:
        ``(count, components)``: ``components`` is (H, W) int32, 0 outside the mask and
        1..count for the components, in OpenCV's order (mostly that of their first pixels in a
        row-major scan; not promised, and it may change when the mask is cropped).
    """
    cv2 = _cv2()
    binary = np.ascontiguousarray(binary, dtype=np.uint8)
    if not binary.any():
        return 0, np.zeros(binary.shape, np.int32)
    count, components = cv2.connectedComponents(binary, connectivity=8, ltype=cv2.CV_32S)
    return int(count) - 1, components


def bounding_box(binary: np.ndarray) -> tuple[int, int, int, int]:
    """``(x, y, w, h)`` of the smallest box holding every True pixel of an (H, W) boolean mask;
    ``(0, 0, 0, 0)`` when it has none."""
    x, y, w, h = _cv2().boundingRect(np.ascontiguousarray(binary).view(np.uint8))
    return int(x), int(y), int(w), int(h)


@dataclass(frozen=True)
class MaskObject:
    """One connected component of one label.

    Attributes:
        label_id: the mask id (1-based label).
        area: pixels the rings enclose: the component's, with the holes too small to keep.
        bbox: ``(x, y, w, h)`` of the component in pixels (COCO's bbox).
        outer: (N, 2) float64 ring of the outline, simplified, in pixel-edge coordinates.
        holes: (M_i, 2) rings of the holes kept (at least ``min_area`` pixels each), simplified.
        seed: ``(x, y)`` of one of its pixels (to find its exact pixels again).
    """

    label_id: int
    area: int
    bbox: tuple[int, int, int, int]
    outer: np.ndarray
    holes: tuple[np.ndarray, ...]
    seed: tuple[int, int]


def ring_area(ring: np.ndarray) -> float:
    """Signed shoelace area of a closed (N, 2) ring; positive when clockwise on screen."""
    x, y = ring[:, 0].astype(np.float64), ring[:, 1].astype(np.float64)
    return 0.5 * float(np.sum(x * np.roll(y, -1) - np.roll(x, -1) * y))


def crack_ring(chain: np.ndarray) -> np.ndarray:
    """The ring along the outer edges of a traced chain of boundary pixels.

    Args:
        chain: (N, 2) integer ``(x, y)`` of boundary pixels, consecutive ones 8-neighbours,
            closed (the last is followed by the first), with the background on the left
            (clockwise on screen for an outline, counter-clockwise around a hole).

    Returns:
        (K, 2) int64 corner coordinates along the edges between the chain's pixels and the
        background on its left (clockwise on screen around an outline, counter-clockwise
        around a hole), without repeated consecutive vertices.
    """
    chain = np.asarray(chain, dtype=np.int64).reshape(-1, 2)
    if len(chain) == 1:
        return chain[0] + _CORNERS  # (4, 2) a lone pixel
    d_in = chain - np.roll(chain, 1, axis=0)  # (N, 2) step into each pixel
    d_out = np.roll(chain, -1, axis=0) - chain  # (N, 2) step out of it
    entry = _ENTRY[d_in[:, 0] + 1, d_in[:, 1] + 1]  # (N,)
    leave = _EXIT[d_out[:, 0] + 1, d_out[:, 1] + 1]  # (N,)
    counts = (leave - entry) % 4 + 1  # corners swept at each pixel
    turned_back = np.all(d_out == -d_in, axis=1) & (leave == entry)  # a diagonal spike's tip
    counts[turned_back] = 5
    visit = np.repeat(np.arange(len(chain)), counts)  # (K,) which pixel each corner is of
    step = np.arange(visit.size) - np.repeat(np.cumsum(counts) - counts, counts)  # (K,)
    corner = (entry[visit] + step) % 4
    points = chain[visit] + _CORNERS[corner]  # (K, 2)
    keep = np.any(points != np.roll(points, 1, axis=0), axis=1)  # drop repeats (cyclic)
    return points[keep]


def simplify_ring(ring: np.ndarray, tolerance: float) -> np.ndarray:
    """Douglas-Peucker simplification of a closed ring (at least 3 vertices are kept: a ring
    that would fall below that is returned as it is)."""
    ring = np.asarray(ring)
    if tolerance <= 0 or len(ring) <= 4:
        return ring.astype(np.float64)
    points = ring.astype(np.float32).reshape(-1, 1, 2)  # (N, 1, 2) as OpenCV wants
    simplified = _cv2().approxPolyDP(points, float(tolerance), True).reshape(-1, 2)
    if len(simplified) < 3:
        return ring.astype(np.float64)
    return simplified.astype(np.float64)


def _traced_rings(binary: np.ndarray) -> Iterator[tuple[np.ndarray, list[np.ndarray]]]:
    """Each 8-connected component of ``binary``: (outline chain, its holes' chains)."""
    cv2 = _cv2()
    contours, hierarchy = cv2.findContours(
        binary.astype(np.uint8), cv2.RETR_CCOMP, cv2.CHAIN_APPROX_NONE
    )
    if hierarchy is None:
        return
    links = hierarchy[0]  # (C, 4) next, previous, first child, parent
    for index, contour in enumerate(contours):
        if links[index, 3] != -1:
            continue  # a hole; taken with its outline
        holes = []
        child = links[index, 2]
        while child != -1:
            holes.append(contours[child].reshape(-1, 2)[::-1])
            child = links[child, 0]
        # OpenCV leaves the background on the right of its traces: reversed, on the left.
        yield contour.reshape(-1, 2)[::-1], holes


def label_objects(
    mask: np.ndarray,
    label_id: int,
    *,
    min_area: int = DEFAULT_MIN_AREA,
    tolerance: float = DEFAULT_TOLERANCE,
) -> list[MaskObject]:
    """The objects of one label of an id mask: its connected components of at least
    ``min_area`` pixels, each with its outline and its holes of at least ``min_area`` pixels
    (smaller holes are left out of the rings, so the polygons fill them).

    Args:
        mask: (H, W) integer ids.
        label_id: the id whose pixels make the objects.
        min_area: the fewest pixels an object (or a hole) must have to be kept.
        tolerance: Douglas-Peucker tolerance in pixels; 0 keeps every corner of the pixel
            outline. The default (0.5) drops the vertices inside straight runs and keeps
            one-pixel stairs, so the rings still enclose exactly the object's pixels.

    Returns:
        Objects in OpenCV's tracing order (outlines found scanning rows from the bottom).
    """
    mask = np.asarray(mask)
    if mask.ndim != 2:
        raise ValueError(f"label_objects: mask must be 2-D (H, W), got shape {mask.shape}")
    objects = []
    for outline, hole_chains in _traced_rings(mask == label_id):
        outer = crack_ring(outline)
        outer_area = ring_area(outer)
        holes, hole_area, kept_area = [], 0.0, 0.0
        for chain in hole_chains:
            ring = crack_ring(chain)
            area = -ring_area(ring)  # counter-clockwise around a hole
            hole_area += area
            if area >= min_area:
                holes.append(ring)
                kept_area += area
        if outer_area - hole_area < min_area:
            continue
        low, high = outer.min(axis=0), outer.max(axis=0)
        objects.append(
            MaskObject(
                label_id=int(label_id),
                area=round(outer_area - kept_area),
                bbox=(int(low[0]), int(low[1]), int(high[0] - low[0]), int(high[1] - low[1])),
                outer=simplify_ring(outer, tolerance),
                holes=tuple(simplify_ring(ring, tolerance) for ring in holes),
                seed=(int(outline[0, 0]), int(outline[0, 1])),
            )
        )
    return objects


def mask_objects(
    mask: np.ndarray,
    label_ids: Sequence[int],
    *,
    min_area: int = DEFAULT_MIN_AREA,
    tolerance: float = DEFAULT_TOLERANCE,
) -> list[MaskObject]:
    """:func:`label_objects` of each of ``label_ids``, in that order."""
    return [
        obj
        for label_id in label_ids
        for obj in label_objects(mask, label_id, min_area=min_area, tolerance=tolerance)
    ]


def object_pixels(mask: np.ndarray, obj: MaskObject) -> np.ndarray:
    """The (H, W) boolean pixels of one object, its holes of every size left out (the
    component of ``obj.seed``)."""
    cv2 = _cv2()
    binary = (np.asarray(mask) == obj.label_id).astype(np.uint8)  # (H, W)
    height, width = binary.shape
    fill = np.zeros((height + 2, width + 2), dtype=np.uint8)  # OpenCV's bordered flood mask
    flags = 8 | cv2.FLOODFILL_MASK_ONLY | (1 << 8)
    cv2.floodFill(binary, fill, obj.seed, 1, 0, 0, flags)
    return fill[1:-1, 1:-1].astype(bool)


def joined_ring(obj: MaskObject) -> np.ndarray:
    """One ring for an object with holes: each hole joined to the ring by a zero-width cut.

    Each hole, nearest first, is spliced in at the pair of vertices (one of the ring built so
    far, one of the hole) closest to each other: the ring goes to the hole's vertex, around the
    hole (the opposite way to the outline), and back along the same segment. Filled by the
    even-odd or the non-zero rule (Ultralytics' ``polygon2mask``, OpenCV's ``fillPoly``,
    Label Studio's canvas, PIL) the hole stays empty; only the pixels along the cut may be
    drawn, and they are the object's own.

    Returns:
        (N, 2) float64 vertices; the outline itself when the object has no hole.
    """
    ring = obj.outer
    pending = list(obj.holes)
    while pending:
        best = None
        for index, hole in enumerate(pending):
            # (R, Hn) squared distances between the ring's and the hole's vertices
            gaps = ((ring[:, None, :] - hole[None, :, :]) ** 2).sum(axis=2)
            at = int(np.argmin(gaps))
            if best is None or gaps.flat[at] < best[0]:
                best = (float(gaps.flat[at]), index, divmod(at, hole.shape[0]))
        assert best is not None
        _, index, (ring_at, hole_at) = best
        hole = pending.pop(index)
        loop = np.concatenate([hole[hole_at:], hole[: hole_at + 1]])  # around, back to start
        ring = np.concatenate([ring[: ring_at + 1], loop, ring[ring_at:]])
    return ring
