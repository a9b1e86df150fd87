"""Ultralytics' YOLO segmentation format: one text file of polygons per image, and a
``data.yaml`` naming the classes.

Each line is one object (:mod:`exporters.polygons`: a connected component of one label):
``class x1 y1 x2 y2 ...``, the class 0-based (label k is class k - 1) and every coordinate
divided by the image's width or height. Ultralytics reads one polygon per line and fills it, so
a label in three parts is three lines, and an object with holes is one ring whose holes are
joined to it by zero-width cuts (:func:`exporters.polygons.joined_ring`): filled, the holes stay
empty.
"""

from __future__ import annotations

import json
from collections.abc import Sequence

import numpy as np

from exporters.polygons import MaskObject, joined_ring

COORDINATE_DIGITS = 6  # decimals of the normalised coordinates: 1e-6 of the side


def yolo_lines(objects: Sequence[MaskObject], width: int, height: int) -> list[str]:
    """The label file's lines of one image's objects (one per object, no newline)."""
    if width <= 0 or height <= 0:
        raise ValueError(f"yolo_lines: width and height must be positive, got {width}x{height}")
    scale = np.array([width, height], dtype=np.float64)
    lines = []
    for obj in objects:
        points = np.clip(joined_ring(obj) / scale, 0.0, 1.0).ravel()  # (2 N,) normalised
        # one %-format of the whole line: a few times faster than formatting each number
        template = " ".join([f"%.{COORDINATE_DIGITS}f"] * points.size)
        lines.append(f"{obj.label_id - 1} " + template % tuple(points.tolist()))
    return lines


def yolo_data_yaml(labels: Sequence[str], images: str = "images") -> str:
    """``data.yaml`` of a dataset folder holding ``images/`` and ``labels/``: train and val
    are the same images (pseudo-labels have no split), ``names`` maps class k - 1 to label k.

    No ``path`` key: Ultralytics then takes the folder of the YAML file, so the folder can be
    moved. Names are written as JSON strings, which YAML reads as they are.
    """
    names = "\n".join(f"  {index}: {json.dumps(name)}" for index, name in enumerate(labels))
    return (
        "# StableSeg pseudo-labels in Ultralytics' YOLO segmentation layout\n"
        f"train: {images}\nval: {images}\nnc: {len(labels)}\nnames:\n{names}\n"
    )
