"""A stand-in for StableSeg that measures everything but the UNet.

:class:`StandInSegmenter` has StableSeg's interface to the model stage (``batch_size``,
``input_size``, ``prepare``, ``segment``) and does what StableSeg does around its model pass,
with the pass itself (VAE encoder, text encoder, UNet, attention recording, SAR) replaced by
fixed score maps at model resolution:

1. the model input: with ``prepared=True`` as StableSeg makes it (``prepare`` resizes in the
   stage's reading threads, ``segment`` stacks the pixels); otherwise as a model that takes
   full-size images (``input_size`` None: ``prepare`` gives the full-size RGB array and
   ``segment`` resizes it with ``labeler.images.to_model_input``, on the calling thread);
2. the score maps: (C, 64, 64) per label count, smooth blobs (low-resolution noise, bicubic
   upsampling), fixed for the run;
3. the finishing, by ``finish``:

   * ``"cpu"``: what a CPU run pays. Bilinear upsampling of the (C, 64, 64) maps to the
     original size (align_corners=False, as ``F.interpolate``), in bands of rows so that
     C x H x W float32 is never held, argmax, the winning label's normalised probability, and
     one ``bincount`` for the per-label mean confidences; one uint8 mask per image.
   * ``"device"``: what the host pays when that finishing runs on an accelerator: the same
     result, computed once per (label count, image size) and copied for each image (the
     device-to-host copy of the mask).

The masks are real masks of the size of each image, so everything after the model (PNG, COCO,
Label Studio, previews, records, exports) does its real work.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

SCORE_SIDE = 64  # the score maps' side (SD's 64x64 latent grid at 512 px)
BAND_ELEMENTS = 1 << 22  # float32 elements of one band of upsampled maps (16 MB)


@dataclass
class StandInResult:
    """What ``segment`` returns for one image (the fields the job reads)."""

    mask: np.ndarray  # (H, W) uint8
    labels: list[str]
    scores: dict[str, float]
    probs: np.ndarray | None = None  # (C, H, W) float32 when asked
    background: np.ndarray | None = None  # no background prompt
    evidence: np.ndarray | None = None  # no background threshold


@dataclass(frozen=True)
class _Config:
    image_size: int


def score_maps(num_labels: int, seed: int = 0) -> torch.Tensor:
    """(C, 64, 64) non-negative smooth score maps: blobs of a few dozen model pixels."""
    generator = torch.Generator().manual_seed(seed * 1000 + num_labels)
    low = torch.rand((1, num_labels, 8, 8), generator=generator) ** 3  # (1, C, 8, 8)
    maps = F.interpolate(low, size=(SCORE_SIDE, SCORE_SIDE), mode="bicubic", align_corners=False)
    return maps[0].clamp(min=0)  # (C, 64, 64)


def _source_coords(out_size: int, in_size: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Bilinear (align_corners=False) source indices and weight of each output position."""
    coords = ((torch.arange(out_size, dtype=torch.float32) + 0.5) * in_size / out_size - 0.5).clamp(
        min=0
    )
    low = coords.floor().long().clamp(max=in_size - 1)  # (N,)
    high = (low + 1).clamp(max=in_size - 1)
    return low, high, coords - low.float()


def finish_on_cpu(scores: torch.Tensor, height: int, width: int) -> tuple[np.ndarray, np.ndarray]:
    """Mask and per-label mean confidence of (C, h, w) scores upsampled to (height, width).

    Returns (mask (H, W) uint8 with k = label k, confidences (C,) float64).
    """
    num_labels = scores.shape[0]
    rows = F.interpolate(
        scores[None], size=(scores.shape[1], width), mode="bilinear", align_corners=False
    )[0]  # (C, h, W): interpolated along x at the source rows
    low, high, weight = _source_coords(height, scores.shape[1])
    row_sums = rows.sum(dim=0)  # (h, W): the normaliser is linear too
    mask = np.empty((height, width), dtype=np.uint8)
    totals = torch.zeros(num_labels + 1, dtype=torch.float64)
    band = max(1, BAND_ELEMENTS // (num_labels * width))
    for top in range(0, height, band):
        part = slice(top, min(height, top + band))
        w = weight[part][None, :, None]  # (1, b, 1)
        upsampled = torch.lerp(rows[:, low[part]], rows[:, high[part]], w)  # (C, b, W)
        best, index = upsampled.max(dim=0)  # (b, W)
        sums = torch.lerp(row_sums[low[part]], row_sums[high[part]], w[0])  # (b, W)
        winning = best / sums.clamp(min=1e-8)
        ids = (index + 1).to(torch.uint8)
        mask[part] = ids.numpy()
        totals += torch.bincount(
            ids.flatten().long(), weights=winning.flatten().double(), minlength=num_labels + 1
        )
    counts = np.bincount(mask.reshape(-1), minlength=num_labels + 1)
    confidences = totals.numpy()[1:] / np.maximum(counts[1:], 1)
    return mask, confidences


class StandInSegmenter:
    """StableSeg's ``segment`` with fixed score maps in place of the model pass.

    Args:
        image_size: the model input side S.
        finish: ``"cpu"`` or ``"device"`` (see the module).
        prepared: ``prepare`` makes :class:`labeler.images.PreparedImage` items at S, as
            StableSeg does (``input_size`` S); otherwise full-size arrays (``input_size`` None).
        delay: seconds to sleep in each ``segment`` call (a slow model, for tests).
        batch_size: images per ``segment`` call (the stage reads it).
    """

    model_version = "stand-in"

    def __init__(
        self,
        image_size: int = 512,
        finish: str = "cpu",
        prepared: bool = False,
        delay: float = 0,
        batch_size: int = 8,
    ) -> None:
        if finish not in ("cpu", "device"):
            raise ValueError(f"finish must be 'cpu' or 'device', got {finish!r}")
        self.config = _Config(image_size)
        self.finish = finish
        self.prepared = prepared
        self.batch_size = batch_size
        self.delay = delay
        self.calls = 0
        self._maps: dict[int, torch.Tensor] = {}
        self._finished: dict[tuple[int, int, int], tuple[np.ndarray, np.ndarray]] = {}
        self._lock = threading.Lock()

    @property
    def input_size(self) -> int | None:
        return self.config.image_size if self.prepared else None

    def prepare(self, image: Any, size: tuple[int, int] | None = None) -> Any:
        """What StableSeg's ``prepare`` makes (``prepared``), or the full-size RGB array."""
        from labeler.images import prepare_image, to_rgb_array

        if self.prepared:
            return prepare_image(image, self.config.image_size, size)
        return to_rgb_array(image)

    def _model_input(self, images: Sequence[Any]) -> tuple[torch.Tensor, list[tuple[int, int]]]:
        from labeler.images import PreparedImage, to_model_input, to_rgb_array

        if images and isinstance(images[0], PreparedImage):
            pixels = torch.from_numpy(np.stack([image.pixels for image in images]))
            batch = pixels.permute(0, 3, 1, 2).float().div_(127.5).sub_(1.0)  # (B, 3, S, S)
            return batch, [image.size for image in images]
        rgbs = [to_rgb_array(image, index=i) for i, image in enumerate(images)]
        batch = to_model_input(rgbs, self.config.image_size)  # (B, 3, S, S)
        return batch, [(rgb.shape[1], rgb.shape[0]) for rgb in rgbs]

    def _finish(self, num_labels: int, width: int, height: int) -> tuple[np.ndarray, np.ndarray]:
        if num_labels not in self._maps:
            self._maps[num_labels] = score_maps(num_labels)
        maps = self._maps[num_labels]
        if self.finish == "cpu":
            return finish_on_cpu(maps, height, width)
        key = (num_labels, height, width)
        with self._lock:
            if key not in self._finished:
                self._finished[key] = finish_on_cpu(maps, height, width)
        mask, confidences = self._finished[key]
        return mask.copy(), confidences

    def segment(
        self, images: Any, labels: Sequence[str], *, return_probs: bool = False
    ) -> list[StandInResult]:
        images = images if isinstance(images, (list, tuple)) else [images]
        labels = list(labels)
        self.calls += 1
        if self.delay:
            time.sleep(self.delay)
        _, sizes = self._model_input(images)
        results = []
        for width, height in sizes:
            mask, confidences = self._finish(len(labels), width, height)
            scores = {label: float(c) for label, c in zip(labels, confidences, strict=True)}
            probs = None
            if return_probs:
                maps = self._maps[len(labels)][None]
                up = F.interpolate(maps, size=(height, width), mode="bilinear")[0]
                probs = (up / up.sum(dim=0, keepdim=True).clamp(min=1e-8)).numpy()
            results.append(StandInResult(mask, labels, scores, probs))
        return results
