"""The per-label confidence rule, in one place.

A label's confidence is the mean probability of that label over the pixels the mask gives it;
a label that owns no pixel has confidence 0.0. The segmenter accumulates it over row bands of
the mask; the trained student and the CRF step compute it on a whole mask.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch


class LabelScores:
    """Accumulates per-label confidences over one mask, whole or in pieces.

    ``add`` may be called on any split of the mask (row bands, tiles); the sums live on the
    tensors' device and nothing is copied to the host until :meth:`result`, which makes one
    transfer. Mask ids outside ``1..len(labels)`` (background, ignore) count for no label.
    """

    def __init__(self, labels: Sequence[str], device: torch.device | str | None = None) -> None:
        self.labels = list(labels)
        device = torch.device(device) if device is not None else torch.device("cpu")
        # float64 sums keep 12 MP of float32 probabilities exact enough; MPS has no float64.
        dtype = torch.float32 if device.type == "mps" else torch.float64
        bins = len(self.labels) + 1  # bin 0 collects the pixels of no label
        self._sums = torch.zeros(bins, dtype=dtype, device=device)
        self._counts = torch.zeros(bins, dtype=torch.int64, device=device)

    def add(self, mask: Any, probs: Any) -> LabelScores:
        """Count one piece: ``mask`` (...) integer ids, ``probs`` (C', ...) with C' >= labels.

        Returns self, so ``LabelScores(labels).add(mask, probs).result()`` reads as one call.
        """
        mask = torch.as_tensor(mask, device=self._sums.device)
        probs = torch.as_tensor(probs, device=self._sums.device)
        if probs.shape[1:] != mask.shape or probs.shape[0] < len(self.labels):
            raise ValueError(
                f"LabelScores.add: probs {tuple(probs.shape)} must be (C, *{tuple(mask.shape)}) "
                f"with C >= {len(self.labels)} labels"
            )
        bins = self._bins(mask)  # (N,)
        channel = (bins - 1).clamp(min=0)[None]  # (1, N)
        won = probs.flatten(1).gather(0, channel)[0]  # (N,) probability of the pixel's label
        return self._accumulate(bins, won)

    def add_winners(self, mask: torch.Tensor, won: torch.Tensor) -> LabelScores:
        """Count one piece given, per pixel, the probability of its own label (the best one).

        ``won`` (...) has the shape of ``mask``; where the mask holds no label it is ignored.
        """
        if won.shape != mask.shape:
            raise ValueError(
                f"LabelScores.add_winners: won {tuple(won.shape)} must match the mask "
                f"{tuple(mask.shape)}"
            )
        return self._accumulate(self._bins(mask), won.flatten())

    def _bins(self, mask: torch.Tensor) -> torch.Tensor:
        """(N,) the label of every pixel, 0 where it has none."""
        ids = mask.long()
        owned = (ids >= 1) & (ids <= len(self.labels))
        return torch.where(owned, ids, 0).flatten()

    def _accumulate(self, bins: torch.Tensor, won: torch.Tensor) -> LabelScores:
        self._sums.scatter_add_(0, bins, won.to(self._sums.dtype))
        self._counts.scatter_add_(0, bins, torch.ones_like(bins))
        return self

    def result(self) -> dict[str, float]:
        """label -> confidence, as float32 values (one device-to-host copy)."""
        sums, counts = self._sums[1:], self._counts[1:]
        means = torch.where(counts > 0, sums / counts.clamp(min=1), 0.0).float()  # (C,)
        values = means.cpu().numpy()
        return {label: float(np.float32(v)) for label, v in zip(self.labels, values, strict=True)}


def label_scores(mask: Any, probs: Any, labels: Sequence[str]) -> dict[str, float]:
    """The confidences of a whole mask: ``mask`` (H, W) ids, ``probs`` (C, H, W)."""
    device = probs.device if isinstance(probs, torch.Tensor) else None
    return LabelScores(labels, device).add(mask, probs).result()
