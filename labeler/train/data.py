"""Pseudo-mask training data: resizing, augmentation (random scale, crop, flip), the Dataset.

The dataset reads nothing itself: each sample is a callable that returns ``(rgb, mask)``
arrays, supplied by the job that owns the files.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
import torch
from PIL import Image

from ..result import IGNORE

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

SampleSource = Callable[[], tuple[np.ndarray, np.ndarray]]


def work_size(width: int, height: int, max_side: int) -> tuple[int, int]:
    """(width, height) scaled down so the longer side is at most ``max_side``."""
    longest = max(width, height)
    if longest <= max_side:
        return width, height
    scale = max_side / longest
    return max(1, round(width * scale)), max(1, round(height * scale))


def resize_rgb(rgb: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """(H, W, 3) uint8 -> (size[1], size[0], 3), bilinear (antialiased when shrinking)."""
    if (rgb.shape[1], rgb.shape[0]) == tuple(size):
        return rgb
    return np.asarray(Image.fromarray(rgb).resize(size, Image.Resampling.BILINEAR))


def resize_mask(mask: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """(H, W) id mask -> (size[1], size[0]), nearest neighbour (ids stay ids)."""
    if (mask.shape[1], mask.shape[0]) == tuple(size):
        return mask
    image = Image.fromarray(mask.astype(np.uint8))
    return np.asarray(image.resize(size, Image.Resampling.NEAREST))


def to_tensor(rgb: np.ndarray) -> torch.Tensor:
    """(H, W, 3) uint8 -> (3, H, W) float32, ImageNet-normalised."""
    pixels = torch.from_numpy(np.array(rgb, dtype=np.float32))  # (H, W, 3), a writable copy
    pixels = pixels.permute(2, 0, 1).contiguous() / 255.0  # (3, H, W), NCHW strides
    mean = torch.tensor(IMAGENET_MEAN)[:, None, None]
    std = torch.tensor(IMAGENET_STD)[:, None, None]
    return (pixels - mean) / std  # (3, H, W)


def augment(
    rgb: np.ndarray,
    mask: np.ndarray,
    crop: int,
    scale_range: tuple[float, float],
    flip: bool,
    rng: np.random.Generator,
) -> tuple[np.ndarray, np.ndarray]:
    """Random scale, pad, crop and flip of an (H, W, 3) image and its (H, W) mask.

    The base scale fits the longer side to ``crop`` (as inference does); a factor drawn from
    ``scale_range`` multiplies it. Padding is mean grey for the image and 255 for the mask.

    Returns:
        (crop, crop, 3) uint8 image and (crop, crop) uint8 mask.
    """
    height, width = mask.shape
    scale = crop / max(height, width) * rng.uniform(*scale_range)
    size = (max(1, round(width * scale)), max(1, round(height * scale)))
    rgb = resize_rgb(rgb, size)  # (h, w, 3)
    mask = resize_mask(mask, size)  # (h, w)
    height, width = mask.shape
    pad_h, pad_w = max(crop - height, 0), max(crop - width, 0)
    if pad_h or pad_w:
        grey = np.array([round(255 * m) for m in IMAGENET_MEAN], dtype=np.uint8)
        padded = np.empty((height + pad_h, width + pad_w, 3), dtype=np.uint8)
        padded[:] = grey
        padded[:height, :width] = rgb
        rgb = padded
        mask = np.pad(mask, ((0, pad_h), (0, pad_w)), constant_values=IGNORE)
        height, width = mask.shape
    top = int(rng.integers(0, height - crop + 1))
    left = int(rng.integers(0, width - crop + 1))
    rgb = rgb[top : top + crop, left : left + crop]
    mask = mask[top : top + crop, left : left + crop]
    if flip and rng.random() < 0.5:
        rgb, mask = rgb[:, ::-1], mask[:, ::-1]
    return np.ascontiguousarray(rgb), np.ascontiguousarray(mask)


class PseudoMaskDataset(torch.utils.data.Dataset):
    """Augmented (image, pseudo-mask) crops for the student.

    Augmentation randomness comes from ``(seed, epoch, index)`` alone, so an epoch is the same
    whether the run was resumed or not, and whichever worker loads the sample.
    """

    def __init__(
        self,
        sources: Sequence[SampleSource],
        crop: int,
        scale_range: tuple[float, float] = (0.5, 2.0),
        flip: bool = True,
        seed: int = 0,
    ) -> None:
        if not sources:
            raise ValueError("the pseudo-mask dataset is empty: no image to train on")
        self.sources = list(sources)
        self.crop = crop
        self.scale_range = scale_range
        self.flip = flip
        self.seed = seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.sources)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        rgb, mask = self.sources[index]()
        if rgb.shape[:2] != mask.shape:  # pseudo-masks live at the working size
            rgb = resize_rgb(rgb, (mask.shape[1], mask.shape[0]))
        rng = np.random.default_rng([self.seed, self.epoch, index])
        rgb, mask = augment(rgb, mask, self.crop, self.scale_range, self.flip, rng)
        return to_tensor(rgb), torch.from_numpy(mask.astype(np.int64))  # (3, S, S), (S, S)
