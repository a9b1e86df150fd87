"""Which ids an id mask holds, and how many pixels each: a histogram instead of a sort.

``np.unique`` sorts every pixel: about 200 ms for a 12 MP mask. A mask's ids are small
unsigned integers, so counting them (``np.bincount``) gives the same answer in a pass. The count
runs over slices of the mask, so that its int64 copy stays small and in cache (16 ms at 12 MP,
instead of 45 ms and a 96 MB temporary for one call on the whole mask).
"""

from __future__ import annotations

import numpy as np

_SLICE = 1 << 18  # pixels counted at a time


def id_counts(mask: np.ndarray) -> np.ndarray:
    """Pixels of each id of an unsigned (or bool) integer mask: (max_id + 1,) int64.

    Index i holds the number of pixels equal to i; at least 256 entries for uint8 and bool
    masks.

    Raises:
        ValueError: a mask of signed or non-integer values (use :func:`present_ids`).
    """
    flat = np.asarray(mask).reshape(-1)
    if flat.dtype == np.bool_:
        flat = flat.view(np.uint8)
    if not np.issubdtype(flat.dtype, np.unsignedinteger):
        raise ValueError(f"id_counts: mask must hold unsigned integer ids, got dtype {flat.dtype}")
    bins = 256 if flat.dtype == np.uint8 else int(flat.max(initial=0)) + 1
    counts = np.zeros(bins, dtype=np.int64)
    for start in range(0, flat.size, _SLICE):
        counts += np.bincount(flat[start : start + _SLICE], minlength=bins)
    return counts


def present_ids(mask: np.ndarray) -> np.ndarray:
    """The sorted distinct ids of an integer mask, as ``np.unique(mask)`` gives them.

    Counted (:func:`id_counts`) for unsigned masks up to 16 bits; other integer masks (signed
    ones may hold negative ids) are sorted with ``np.unique``.
    """
    mask = np.asarray(mask)
    if mask.dtype in (np.uint8, np.uint16, np.bool_):
        return np.flatnonzero(id_counts(mask)).astype(mask.dtype)
    return np.unique(mask)
