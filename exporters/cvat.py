"""CVAT's "Segmentation mask 1.1" format: a zip of Pascal VOC-style folders.

    labelmap.txt                          label:r,g,b:: per class, background first
    ImageSets/Segmentation/default.txt    one image name (no extension) per line
    SegmentationClass/<name>.png          the class mask, coloured by labelmap.txt
    SegmentationObject/<name>.png         the object mask: object k in the k-th VOC colour

The class masks are this project's mask PNGs as they are: indexed PNGs whose palette is the
VOC palette, which is also what ``labelmap.txt`` (:func:`exporters.labelmap_text`) gives each
id, so a reader that maps colours through the label map gets the ids back. Objects are the
connected components (8-connected) of each label's pixels, numbered in label order, then
top-to-bottom; pixels a mask marks 255 ("ignore") are void (255) in both masks.
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np
from PIL import Image

from .png import voc_palette
from .polygons import bounding_box, label_components

MAX_OBJECTS = 254  # ids 1..254 of a VOC object PNG; 255 is void
VOID = 255


def object_mask(mask: np.ndarray, label_ids: Iterable[int]) -> np.ndarray:
    """The (H, W) uint8 object ids of ``mask``: 0 background, 1.. one per connected component
    of each label in ``label_ids`` (in label order), 255 where ``mask`` is 255.

    A mask with more than :data:`MAX_OBJECTS` components keeps the first 253 and gives every
    component after them the last id, 254 (the VOC object format has no more colours); the class
    mask still tells their labels apart.
    """
    objects = np.zeros(mask.shape, np.uint8)
    objects[mask == VOID] = VOID
    next_id = 1
    for label_id in label_ids:
        # Each label's components are found in the box around its pixels: a small label costs
        # its box, not the image.
        binary = mask == label_id
        left, top, width, height = bounding_box(binary)
        if not width:
            continue
        box = (slice(top, top + height), slice(left, left + width))
        count, components = label_components(binary[box])
        inside = components > 0
        objects[box][inside] = np.minimum(components[inside] + (next_id - 1), MAX_OBJECTS)
        next_id += count
    return objects


def object_png(objects: np.ndarray) -> Image.Image:
    """The object mask as an indexed PNG with the VOC palette (the format's object colours)."""
    image = Image.fromarray(objects, mode="P")
    image.putpalette(voc_palette())
    return image


def image_set_text(names: Iterable[str]) -> str:
    """``ImageSets/Segmentation/default.txt``: one name per line."""
    return "".join(f"{name}\n" for name in names)
