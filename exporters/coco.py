"""COCO instance-format JSON with compressed RLE masks, one annotation per (image, label).

Category ids are the mask ids: the k-th label (1-based) is category k. Background (0) and
ignore (255) pixels produce no annotation. Needs ``pycocotools`` (imported when used).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import PurePosixPath, PureWindowsPath
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    from labeler.result import SegmentationResult

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
    if mask.ndim != 2:
        raise ValueError(f"coco_annotations: mask must be 2-D (H, W), got shape {mask.shape}")
    if not np.issubdtype(mask.dtype, np.integer):
        raise ValueError(f"coco_annotations: mask must hold integer ids, got dtype {mask.dtype}")
    if not 1 <= num_labels <= MAX_LABELS:
        raise ValueError(
            f"coco_annotations: num_labels must be in 1..{MAX_LABELS}, got {num_labels}"
        )
    ids = np.unique(mask)
    bad = [int(i) for i in ids if (i < 0 or i > num_labels) and i != IGNORE]
    if bad:
        raise ValueError(
            f"coco_annotations: mask ids {bad} are outside 0..{num_labels} and not "
            f"{IGNORE} (ignore)"
        )
    if probs is not None:
        probs = np.asarray(probs)
        if probs.shape != (num_labels, *mask.shape):
            raise ValueError(
                f"coco_annotations: probs shape {probs.shape} does not match "
                f"(num_labels, H, W) = {(num_labels, *mask.shape)}"
            )
    if scores is not None and len(scores) != num_labels:
        raise ValueError(f"coco_annotations: got {len(scores)} scores for num_labels={num_labels}")

    mask_api = _mask_api()
    annotations = []
    for label_id in (int(i) for i in ids if 1 <= i <= num_labels):
        pixels = mask == label_id  # (H, W) bool
        rle = encode_rle(pixels)
        api_rle = {"size": rle["size"], "counts": rle["counts"].encode("ascii")}
        annotation: dict[str, Any] = {
            "id": first_ann_id + len(annotations),
            "image_id": image_id,
            "category_id": label_id,
            "segmentation": rle,
            "area": int(mask_api.area(api_rle)),
            "bbox": [float(v) for v in mask_api.toBbox(api_rle)],
            "iscrowd": 0,
        }
        if probs is not None:
            annotation["score"] = float(probs[label_id - 1][pixels].mean())
        elif scores is not None:
            annotation["score"] = float(scores[label_id - 1])
        annotations.append(annotation)
    return annotations


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
        size = tuple(annotation["segmentation"]["size"])
        if size != image_sizes[image_id]:
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
