"""Indexed PNG masks with the Pascal VOC colour map, and the label files that go with them.

Mask convention (see ``labeler.result``): 0 = background / unlabeled, k = the k-th label
(1-based), 255 = ignore. A mask PNG stores these ids as palette indices, so any image viewer
shows colours while ``png_to_mask`` reads the ids back unchanged.

Why the mask PNGs keep the VOC palette while the previews colour "blue" blue
(:func:`exporters.preview.label_colours`): in a mask file the pixel values are the ids and the
palette is part of the format. Pascal VOC's colour map is what segmentation tools expect of an
indexed mask (VOC-style loaders, CVAT's "Segmentation mask" and datumaro read class colours
from it; some convert the colours back to ids), and it gives id k the same colour in every run
and for every label list, so two mask folders can be compared by eye. Colours that follow the
label names would differ between runs whose labels differ, and the files would stop matching
those tools' colour map.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from PIL import Image

from labeler.result import IGNORE, MAX_LABELS

_PALETTE_SIZE = 256


def voc_palette(n: int = _PALETTE_SIZE) -> list[int]:
    """The Pascal VOC colour map as a flat ``[r0, g0, b0, r1, g1, b1, ...]`` list of ``3 * n`` ints.

    Colour i spreads the bits of i over the three channels, most significant bit first:
    bit 0 of each 3-bit group goes to red, bit 1 to green, bit 2 to blue. Index 0 is black,
    1 is (128, 0, 0) and 255 is (224, 224, 192), the VOC ignore colour.
    """
    if not 1 <= n <= _PALETTE_SIZE:
        raise ValueError(f"voc_palette: n must be in 1..{_PALETTE_SIZE}, got {n!r}")
    return list(_VOC_PALETTE[: 3 * n])


def _build_voc_palette(n: int) -> list[int]:
    palette: list[int] = []
    for index in range(n):
        red = green = blue = 0
        bits = index
        for shift in range(7, -1, -1):  # fill each channel from its top bit down
            red |= (bits & 1) << shift
            green |= ((bits >> 1) & 1) << shift
            blue |= ((bits >> 2) & 1) << shift
            bits >>= 3
        palette.extend((red, green, blue))
    return palette


_VOC_PALETTE = tuple(_build_voc_palette(_PALETTE_SIZE))  # built once: every PNG needs it


def label_color(index: int) -> tuple[int, int, int]:
    """The VOC colour (r, g, b) of one mask id (0..255)."""
    if not 0 <= index < _PALETTE_SIZE:
        raise ValueError(f"label_color: index must be in 0..255, got {index!r}")
    palette = voc_palette(index + 1)
    return palette[-3], palette[-2], palette[-1]


def _check_mask(mask: np.ndarray, where: str) -> np.ndarray:
    """Validate an (H, W) integer mask with ids in 0..255 and return it as uint8."""
    mask = np.asarray(mask)
    if mask.ndim != 2:
        raise ValueError(f"{where}: mask must be 2-D (H, W), got shape {mask.shape}")
    if mask.dtype == np.bool_:
        return mask.astype(np.uint8)
    if mask.dtype == np.uint8:
        return mask  # every uint8 value is a valid id
    if not np.issubdtype(mask.dtype, np.integer):
        raise ValueError(f"{where}: mask must hold integer ids, got dtype {mask.dtype}")
    if mask.size:
        low, high = int(mask.min()), int(mask.max())
        if low < 0 or high > IGNORE:
            bad = low if low < 0 else high
            raise ValueError(
                f"{where}: mask value {bad} does not fit an 8-bit PNG; ids must be in 0..255 "
                f"(at most {MAX_LABELS} labels, 255 = ignore)"
            )
    return mask.astype(np.uint8)


def mask_to_png(mask: np.ndarray) -> Image.Image:
    """An (H, W) id mask as a single-channel mode "P" image with the VOC palette."""
    ids = _check_mask(mask, "mask_to_png")  # (H, W) uint8
    height, width = ids.shape
    image = Image.frombytes("P", (width, height), np.ascontiguousarray(ids))
    image.putpalette(voc_palette())
    return image


def png_to_mask(image: Image.Image) -> np.ndarray:
    """The (H, W) uint8 id mask stored in a mode "P" (palette) or "L" (grey) image."""
    if image.mode not in ("P", "L"):
        raise ValueError(
            f"png_to_mask: expected a palette ('P') or greyscale ('L') mask image, got mode "
            f"{image.mode!r}; an RGB rendering of a mask cannot be mapped back to ids reliably"
        )
    return np.array(image, dtype=np.uint8)  # (H, W)


def _check_labels(labels: Sequence[str], where: str) -> list[str]:
    """The labels as given, checked by the project's one label rule (labeler.labels)."""
    from labeler.labels import validate_labels

    names = list(labels)
    try:
        validate_labels(names)
    except ValueError as err:
        raise ValueError(f"{where}: {err}") from None
    return names


def escape_labelmap_name(name: str) -> str:
    """A label as a ``labelmap.txt`` field: ``%`` -> ``%25`` and ``:`` -> ``%3A``.

    The CVAT format separates fields with ``:``, so a label holding one would shift every
    field after it; ``classes.json`` and ``coco.json`` keep the exact names.
    """
    return name.replace("%", "%25").replace(":", "%3A")


def labelmap_text(labels: Sequence[str], background: str = "background") -> str:
    """A ``labelmap.txt`` (CVAT / "Segmentation mask 1.1" format), background first.

    One line per id: ``name:r,g,b::`` with the VOC colour of that id, after a header comment::

        # label:color_rgb:parts:actions
        background:0,0,0::
        cat:128,0,0::

    Names are escaped by :func:`escape_labelmap_name` (``a:b`` is written ``a%3Ab``).
    """
    names = _check_labels(labels, "labelmap_text")
    lines = ["# label:color_rgb:parts:actions"]
    for index, name in enumerate([background, *names]):
        red, green, blue = label_color(index)
        lines.append(f"{escape_labelmap_name(name)}:{red},{green},{blue}::")
    return "\n".join(lines) + "\n"


def classes_json(labels: Sequence[str]) -> dict[str, str]:
    """The id -> name map of a mask, keyed by the id as a string (JSON keys are strings).

    ``{"0": "background", "1": labels[0], ..., str(len(labels)): labels[-1], "255": "ignore"}``.
    """
    names = _check_labels(labels, "classes_json")
    classes = {"0": "background"}
    classes.update({str(index): name for index, name in enumerate(names, start=1)})
    classes[str(IGNORE)] = "ignore"
    return classes
