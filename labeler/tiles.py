"""Tiles: an image larger than the model's side, segmented window by window.

The paper squeezes every image into the model's square (512 px for SD 1.x), so objects a few
pixels across at that scale are lost. With tiles the image is brought to a working size whose
longer side is ``tiles`` model sides, windows of the model's side slide over it with some
overlap, and each window is one ordinary StableSeg pass. A pass at the model's side over the
whole image comes first: it decides which labels each window may use (a window that sees only a
corner of a scene has no evidence of its own that a label is absent), and the windows' final
scores are blended into one map at the model's score resolution (1/8 of the working pixels for
SD), so nothing at full resolution is kept unless probabilities are asked for.

This module is the pure geometry and arithmetic; :class:`labeler.StableSeg` runs the passes.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from .sar import EPS

EDGE_WEIGHT = 0.05
"""The blend weight of a window's outermost cells relative to its centre: every cell keeps a
positive weight (cells of the image's border are seen by one window only), while a cell seen by
two windows takes most of its value from the one it is nearer the centre of."""


@dataclass(frozen=True)
class Window:
    """One window, in pixels of the working image: its top-left corner and its side."""

    top: int
    left: int
    side: int

    def cells(self, step: int) -> tuple[int, int]:
        """(top, left) in score cells of ``step`` pixels."""
        return self.top // step, self.left // step


def working_size(size: tuple[int, int], side: int, tiles: float, step: int) -> tuple[int, int]:
    """(width, height) of the working image: the longer side ``tiles`` x ``side``, each side a
    multiple of ``step`` (the pixels of one score cell) and at least ``side``.

    Args:
        size: (width, height) of the original image.
        side: the model's side in pixels.
        tiles: model sides along the image's longer side (>= 1).
        step: pixels of one cell of the final scores (``side`` / score side).
    """
    if tiles < 1:
        raise ValueError(f"tiles must be >= 1, got {tiles}")
    width, height = size
    scale = tiles * side / max(width, height)

    def fit(length: int) -> int:
        return max(side, round(length * scale / step) * step)

    return fit(width), fit(height)


def window_origins(length: int, side: int, overlap: float, step: int) -> list[int]:
    """Starts of the windows along one axis of ``length`` pixels.

    Consecutive windows share at least ``overlap`` of their side; the first starts at 0 and the
    last ends at ``length``; the rest are spread evenly between them, each on a multiple of
    ``step`` so the windows' score cells line up.
    """
    if not 0.0 <= overlap < 1.0:
        raise ValueError(f"tile overlap must be in [0, 1), got {overlap}")
    if length <= side:
        return [0]
    stride = max(step, math.floor(side * (1.0 - overlap) / step) * step)
    count = math.ceil((length - side) / stride) + 1
    last = length - side
    return [round(i * last / (count - 1) / step) * step for i in range(count)]


def tile_windows(size: tuple[int, int], side: int, overlap: float, step: int) -> list[Window]:
    """Every window over a working image of (width, height) ``size``, row by row."""
    width, height = size
    return [
        Window(top, left, side)
        for top in window_origins(height, side, overlap, step)
        for left in window_origins(width, side, overlap, step)
    ]


def window_weight(cells: int, edge: float = EDGE_WEIGHT) -> torch.Tensor:
    """(cells, cells) blend weight of a window: 1 at the centre, ``edge`` at the border,
    linear in between along each axis (a product of two tents)."""
    centre = (cells - 1) / 2
    if centre == 0:
        return torch.ones(1, 1)
    distance = (torch.arange(cells, dtype=torch.float32) - centre).abs() / centre  # (cells,)
    tent = 1.0 - (1.0 - edge) * distance  # (cells,)
    return tent[:, None] * tent[None, :]  # (cells, cells)


class TileCanvas:
    """The windows' maps blended into one (C, H, W) map: a weighted mean, cell by cell.

    Args:
        channels: C.
        size: (H, W) of the canvas in score cells.
        device: where the sums live.
    """

    def __init__(self, channels: int, size: tuple[int, int], device: torch.device | str) -> None:
        self.total = torch.zeros((channels, *size), device=device)  # (C, H, W)
        self.weight = torch.zeros(size, device=device)  # (H, W)

    def add(self, maps: torch.Tensor, origins: list[tuple[int, int]]) -> None:
        """Add windows: ``maps`` (N, C, s, s) at their (top, left) cells."""
        cells = maps.shape[-1]
        weight = window_weight(cells).to(self.total.device)  # (s, s)
        for window_map, (top, left) in zip(maps, origins, strict=True):
            rows, cols = slice(top, top + cells), slice(left, left + cells)
            self.total[:, rows, cols] += window_map.float() * weight
            self.weight[rows, cols] += weight

    def result(self) -> torch.Tensor:
        """(C, H, W) weighted mean of the windows at each cell (0 where none was added)."""
        return self.total / self.weight.clamp(min=EPS)


def window_labels(
    probs: torch.Tensor, window: Window, size: tuple[int, int], gate: float, margin: int = 1
) -> torch.Tensor:
    """Which labels a window may use, from the whole-image pass.

    A label takes part in a window where its whole-image probability somewhere in the
    window's region (grown by ``margin`` cells, as the whole-image map is coarse) reaches
    ``gate`` times its peak over the whole image: the same meaning for any number of labels.
    The label strongest in the region on average always takes part. ``gate`` 0 lets every
    label into every window.

    Args:
        probs: (C, h, w) the whole-image pass's normalised probabilities.
        window: the window, in working pixels.
        size: (width, height) of the working image.
        gate: the fraction, in [0, 1].
        margin: cells added around the region.

    Returns:
        (C,) bool.
    """
    rows, cols = probs.shape[1:]
    width, height = size
    top = max(0, math.floor(window.top * rows / height) - margin)
    bottom = min(rows, math.ceil((window.top + window.side) * rows / height) + margin)
    left = max(0, math.floor(window.left * cols / width) - margin)
    right = min(cols, math.ceil((window.left + window.side) * cols / width) + margin)
    region = probs[:, top:bottom, left:right].flatten(1)  # (C, n)
    peak = probs.flatten(1).amax(dim=1)  # (C,)
    allowed = region.amax(dim=1) >= gate * peak  # (C,)
    allowed[region.mean(dim=1).argmax()] = True
    return allowed
