"""COCO instance-format JSON: compressed RLE masks, one annotation per (image, label), or
polygons, one annotation per object (:func:`polygon_annotations`).

Category ids are the mask ids: the k-th label (1-based) is category k. Background (0) and
ignore (255) pixels produce no annotation. Needs ``pycocotools`` (imported when used).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import PurePosixPath, PureWindowsPath
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    from exporters.polygons import MaskObject
    from labeler.result import SegmentationResult

from exporters.mask_ids import present_ids
from labeler.result import IGNORE, MAX_LABELS


def _mask_api() -> Any:
    try:
        from pycocotools import mask as mask_api
    except ImportError as error:  # pragma: no cover - depends on the environment
        raise ImportError("COCO export needs pycocotools: pip install pycocotools") from error
    return mask_api


def encode_rle(binary: np.ndarray) -> dict[str, Any]:
    """Compressed COCO RLE of an (H, W) boolean mask: ``{"size": [H, W], "counts": str}``."""
    binary = np.asarray(binary)
    if binary.ndim != 2:
        raise ValueError(f"encode_rle: mask must be 2-D (H, W), got shape {binary.shape}")
    mask_api = _mask_api()
    fortran = np.asfortranarray(binary.astype(np.uint8))  # (H, W) uint8, column-major
    rle = mask_api.encode(fortran)
    return {"size": [int(s) for s in rle["size"]], "counts": rle["counts"].decode("ascii")}


def _check_mask_ids(mask: np.ndarray, num_labels: int, where: str) -> np.ndarray:
    """Validate an id mask against ``num_labels``; return the ids it holds (sorted)."""
    mask = np.asarray(mask)
    if mask.ndim != 2:
        raise ValueError(f"{where}: mask must be 2-D (H, W), got shape {mask.shape}")
    if not np.issubdtype(mask.dtype, np.integer):
        raise ValueError(f"{where}: mask must hold integer ids, got dtype {mask.dtype}")
    if not 1 <= num_labels <= MAX_LABELS:
        raise ValueError(f"{where}: num_labels must be in 1..{MAX_LABELS}, got {num_labels}")
    ids = present_ids(mask)
    bad = [int(i) for i in ids if (i < 0 or i > num_labels) and i != IGNORE]
    if bad:
        raise ValueError(
            f"{where}: mask ids {bad} are outside 0..{num_labels} and not {IGNORE} (ignore)"
        )
    return ids


def _column_runs(mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Runs of equal ids in column-major order (COCO's): (R + 1,) bounds and (R,) ids."""
    flat = np.ascontiguousarray(mask.T).reshape(-1)  # (W * H,) column after column
    starts = np.empty(flat.size + 1, dtype=bool)  # does a run start at this index
    starts[0] = starts[-1] = True
    np.not_equal(flat[1:], flat[:-1], out=starts[1:-1])
    bounds = np.flatnonzero(starts)  # (R + 1,) from 0 to H * W
    return bounds, flat[bounds[:-1]]


def _label_counts(bounds: np.ndarray, run_ids: np.ndarray, label_id: int) -> np.ndarray:
    """Uncompressed COCO RLE counts of ``mask == label_id`` from the mask's column runs:
    alternate lengths of outside and inside pixels, starting outside (maybe with 0)."""
    inside = run_ids == label_id  # (R,)
    changes = np.empty(inside.size + 1, dtype=bool)
    changes[0] = changes[-1] = True
    np.not_equal(inside[1:], inside[:-1], out=changes[1:-1])
    counts = np.diff(bounds[np.flatnonzero(changes)])  # lengths of the label's runs
    if inside[0]:
        counts = np.concatenate([[0], counts])
    return counts


def mask_annotations(
    mask: np.ndarray,
    num_labels: int,
    *,
    scores: Sequence[float] | None = None,
    label_ids: Sequence[int] | None = None,
) -> list[dict[str, Any]]:
    """COCO annotations of one mask without their ``id`` and ``image_id``, one per label
    present, in label order: the pieces a streamed ``coco.json`` numbers when it assembles.

    The RLE of every label comes from the mask's runs in column-major order, found once;
    each equals ``pycocotools.mask.encode`` of ``mask == label``.

    Args:
        mask: (H, W) integer ids; 0 = background, k = label k (1..num_labels), 255 = ignore.
        num_labels: how many labels the mask's ids refer to.
        scores: optional per-label scores, ``scores[k - 1]`` for label k.
        label_ids: the labels present, when the caller already knows them (validated
            against the mask by the caller); found from the mask otherwise.

    Returns:
        Dicts with ``category_id, segmentation`` (compressed RLE, counts as str), ``area,
        bbox`` ([x, y, w, h]), ``iscrowd: 0`` and, with ``scores``, ``score``.
    """
    if label_ids is None:
        ids = _check_mask_ids(mask, num_labels, "mask_annotations")
        label_ids = [int(i) for i in ids if 1 <= i <= num_labels]
    if scores is not None and len(scores) != num_labels:
        raise ValueError(f"mask_annotations: got {len(scores)} scores for num_labels={num_labels}")
    if not label_ids:
        return []
    mask = np.asarray(mask)
    height, width = mask.shape
    mask_api = _mask_api()
    bounds, run_ids = _column_runs(mask)
    annotations = []
    for label_id in label_ids:
        counts = _label_counts(bounds, run_ids, label_id)
        rle = mask_api.frPyObjects({"size": [height, width], "counts": counts}, height, width)
        annotation: dict[str, Any] = {
            "category_id": int(label_id),
            "segmentation": {
                "size": [int(v) for v in rle["size"]],
                "counts": rle["counts"].decode("ascii"),
            },
            "area": int(mask_api.area(rle)),
            "bbox": [float(v) for v in mask_api.toBbox(rle)],
            "iscrowd": 0,
        }
        if scores is not None:
            annotation["score"] = float(scores[label_id - 1])
        annotations.append(annotation)
    return annotations


def coco_annotations(
    mask: np.ndarray,
    image_id: int,
    first_ann_id: int,
    num_labels: int,
    *,
    probs: np.ndarray | None = None,
    scores: Sequence[float] | None = None,
) -> list[dict[str, Any]]:
    """COCO annotations of one image's mask, one per label present, in label order.

    Args:
        mask: (H, W) integer ids; 0 = background, k = label k (1..num_labels), 255 = ignore.
        image_id: the ``id`` of the image entry these annotations belong to.
        first_ann_id: the ``id`` of the first annotation; the following ones count up by 1.
        num_labels: how many labels the mask's ids refer to (its categories are 1..num_labels).
        probs: optional (num_labels, H, W) probabilities; an annotation's ``score`` is the mean
            probability of its label over its pixels.
        scores: optional per-label scores, ``scores[k - 1]`` for label k, used when ``probs``
            is not given. With neither, annotations carry no ``score``.

    Returns:
        Dicts with ``id, image_id, category_id, segmentation`` (compressed RLE, counts as str),
        ``area, bbox`` ([x, y, w, h]), ``iscrowd: 0`` and, when known, ``score``.
    """
    mask = np.asarray(mask)
    ids = _check_mask_ids(mask, num_labels, "coco_annotations")
    present = [int(i) for i in ids if 1 <= i <= num_labels]
    if probs is not None:
        probs = np.asarray(probs)
        if probs.shape != (num_labels, *mask.shape):
            raise ValueError(
                f"coco_annotations: probs shape {probs.shape} does not match "
                f"(num_labels, H, W) = {(num_labels, *mask.shape)}"
            )
        scores = [0.0] * num_labels
        for label_id in present:
            scores[label_id - 1] = float(probs[label_id - 1][mask == label_id].mean())
    elif scores is not None and len(scores) != num_labels:
        raise ValueError(f"coco_annotations: got {len(scores)} scores for num_labels={num_labels}")
    pieces = mask_annotations(mask, num_labels, scores=scores, label_ids=present)
    return [
        {"id": first_ann_id + index, "image_id": image_id, **piece}
        for index, piece in enumerate(pieces)
    ]


def result_to_coco_annotations(
    result: SegmentationResult, image_id: int, first_ann_id: int
) -> list[dict[str, Any]]:
    """``coco_annotations`` of a ``SegmentationResult``: scores from its probs, else its scores."""
    num_labels = len(result.labels)
    probs = result.probs if result.probs is not None and np.size(result.probs) else None
    scores = None
    if probs is None and result.scores:
        scores = [float(result.scores.get(name, 0.0)) for name in result.labels]
    return coco_annotations(
        result.mask, image_id, first_ann_id, num_labels, probs=probs, scores=scores
    )


def coco_image(image_id: int, file_name: str, width: int, height: int) -> dict[str, Any]:
    """One ``images`` entry; ``file_name`` is a relative posix path (to the images folder)."""
    if PurePosixPath(file_name).is_absolute() or PureWindowsPath(file_name).is_absolute():
        raise ValueError(f"coco_image: file_name must be a relative path, got {file_name!r}")
    if width <= 0 or height <= 0:
        raise ValueError(f"coco_image: width and height must be positive, got {width}x{height}")
    return {
        "id": int(image_id),
        "file_name": str(file_name),
        "width": int(width),
        "height": int(height),
    }


def build_coco(
    images: Sequence[Mapping[str, Any]],
    annotations: Sequence[Mapping[str, Any]],
    labels: Sequence[str],
    info: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """A COCO dataset dict: ``info, images, annotations, categories``.

    Args:
        images: entries with ``id``, ``file_name`` (relative), ``width`` and ``height``
            (see ``coco_image``).
        annotations: from ``coco_annotations``; each must name an image given here, and its
            RLE size must be that image's (height, width).
        labels: label names; category k (1-based) is ``labels[k - 1]``.
        info: optional ``info`` block (a default description is used otherwise).
    """
    names = list(labels)
    if len(set(names)) != len(names):
        raise ValueError(f"build_coco: duplicate label names in {names}")
    image_sizes: dict[int, tuple[int, int]] = {}
    image_entries = []
    for image in images:
        missing = [key for key in ("id", "file_name", "width", "height") if key not in image]
        if missing:
            raise ValueError(f"build_coco: image entry {dict(image)} lacks {missing}")
        entry = coco_image(image["id"], image["file_name"], image["width"], image["height"])
        if entry["id"] in image_sizes:
            raise ValueError(f"build_coco: duplicate image id {entry['id']}")
        image_sizes[entry["id"]] = (entry["height"], entry["width"])
        image_entries.append({**image, **entry})

    seen_ids: set[int] = set()
    for annotation in annotations:
        ann_id, image_id = annotation["id"], annotation["image_id"]
        if ann_id in seen_ids:
            raise ValueError(f"build_coco: duplicate annotation id {ann_id}")
        seen_ids.add(ann_id)
        if image_id not in image_sizes:
            raise ValueError(f"build_coco: annotation {ann_id} names unknown image {image_id}")
        if not 1 <= annotation["category_id"] <= len(names):
            raise ValueError(
                f"build_coco: annotation {ann_id} has category_id {annotation['category_id']}, "
                f"valid ids are 1..{len(names)}"
            )
        segmentation = annotation["segmentation"]
        size = tuple(segmentation["size"]) if isinstance(segmentation, Mapping) else None
        if size is not None and size != image_sizes[image_id]:
            raise ValueError(
                f"build_coco: annotation {ann_id} mask size {size} (H, W) differs from image "
                f"{image_id}'s {image_sizes[image_id]}"
            )

    categories = [
        {"id": index, "name": name, "supercategory": ""}
        for index, name in enumerate(names, start=1)
    ]
    return {
        "info": dict(info) if info is not None else {"description": "StableSeg pseudo-labels"},
        "images": image_entries,
        "annotations": [dict(annotation) for annotation in annotations],
        "categories": categories,
    }


def polygon_annotations(
    mask: np.ndarray,
    objects: Sequence[MaskObject],
    *,
    scores: Sequence[float] | None = None,
) -> list[dict[str, Any]]:
    """COCO annotations of one mask's objects (see :mod:`exporters.polygons`), one per object,
    without their ``id`` and ``image_id``.

    An object without holes is one polygon (``segmentation: [[x1, y1, x2, y2, ...]]``, pixel
    edge coordinates). pycocotools fills every polygon of an annotation and takes their union,
    so a polygon cannot leave a hole empty: an object with holes is written as compressed RLE
    of its exact pixels instead (``segmentation: {"size": [H, W], "counts": str}``).

    Args:
        mask: (H, W) ids the objects were found in.
        objects: from :func:`exporters.polygons.mask_objects`.
        scores: optional per-label scores, ``scores[k - 1]`` for label k.

    Returns:
        Dicts with ``category_id, segmentation, area`` (the pixels the segmentation holds),
        ``bbox`` ([x, y, w, h]), ``iscrowd: 0`` and, with ``scores``, ``score``.
    """
    from exporters.polygons import object_pixels

    annotations = []
    for obj in objects:
        segmentation: Any
        if obj.holes:
            pixels = object_pixels(mask, obj)  # (H, W) bool
            segmentation = encode_rle(pixels)
            area = int(np.count_nonzero(pixels))
        else:
            segmentation = [np.rint(obj.outer).astype(np.int64).ravel().tolist()]
            area = obj.area
        annotation: dict[str, Any] = {
            "category_id": obj.label_id,
            "segmentation": segmentation,
            "area": area,
            "bbox": [float(v) for v in obj.bbox],
            "iscrowd": 0,
        }
        if scores is not None:
            annotation["score"] = float(scores[obj.label_id - 1])
        annotations.append(annotation)
    return annotations
