"""Objects of a semantic mask: the connected components of each label's pixels."""

from __future__ import annotations

import numpy as np


def label_components(binary: np.ndarray) -> tuple[int, np.ndarray]:
    """The 8-connected components of an (H, W) boolean mask.

    Returns:
        ``(count, components)``: ``components`` is (H, W) int32, 0 outside the mask and
        1..count for the components, numbered in the order their first pixel comes in a
        row-major scan (top to bottom, then left to right).
    """
    import cv2  # opencv-python-headless

    binary = np.ascontiguousarray(binary, dtype=np.uint8)
    if not binary.any():
        return 0, np.zeros(binary.shape, np.int32)
    count, components = cv2.connectedComponents(binary, connectivity=8, ltype=cv2.CV_32S)
    return int(count) - 1, components
