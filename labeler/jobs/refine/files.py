"""The refine job's files: the pool of images, mask and image I/O, and the check that a work dir
holds this run (``run.json``)."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from ..io import (
    RunMismatchError,
    atomic_write_bytes,
    check_run_file,
    image_bytes,
    list_images,
    open_image,
)
from ..pseudo_label import stem_path
from .options import RefineOptions

RUN_FORMAT = "stableseg-refine/2"

RefineMismatchError = RunMismatchError
"""The work dir holds a run with other settings or another pool."""


@dataclass(frozen=True)
class PoolItem:
    """One pool image: ``key`` names its outputs (``a/b`` for ``a/b.jpg``)."""

    key: str
    path: Path


def pool_from_folder(images_dir: str | os.PathLike[str]) -> list[PoolItem]:
    """Every image under the folder; keys are relative paths without the extension."""
    root = Path(images_dir)
    items: dict[str, PoolItem] = {}
    for relative in list_images(root):
        key = str(stem_path(relative))
        if key in items:
            raise ValueError(
                f"{relative.as_posix()} and {items[key].path.relative_to(root).as_posix()} would "
                f"share the output name {key}.png; rename one of them"
            )
        items[key] = PoolItem(key, root / relative)
    if not items:
        raise ValueError(f"no images under {root} (extensions: jpg, jpeg, png, bmp, webp, tif)")
    return list(items.values())


def read_mask(path: Path) -> np.ndarray:
    """An indexed mask PNG as (H, W) uint8 ids."""
    from exporters.png import png_to_mask

    with Image.open(path) as image:
        return png_to_mask(image)


def write_mask(path: Path, mask: np.ndarray) -> None:
    """(H, W) ids to an indexed PNG (VOC palette), atomically."""
    from exporters.png import mask_to_png

    atomic_write_bytes(path, image_bytes(mask_to_png(mask)))


def load_rgb(path: Path, max_side: int) -> np.ndarray:
    """(H, W, 3) uint8 at the working size (longer side at most ``max_side``)."""
    from labeler.images import to_rgb_array
    from labeler.train.data import resize_rgb, work_size

    rgb = to_rgb_array(open_image(path))
    return resize_rgb(rgb, work_size(rgb.shape[1], rgb.shape[0], max_side))


def load_pair(path: Path, mask_path: Path, max_side: int) -> tuple[np.ndarray, np.ndarray]:
    """(image at the working size, its pseudo-mask): one training sample."""
    return load_rgb(path, max_side), read_mask(mask_path)


def check_work_dir(work_dir: Path, options: RefineOptions, pool: list[PoolItem]) -> dict:
    """Compare with W/run.json (raises RefineMismatchError); returns what to write."""
    record = {
        "format": RUN_FORMAT,
        "settings": options.settings(),
        "pool": sorted(item.key for item in pool),
    }
    check_run_file(
        work_dir / "run.json",
        record,
        "Use another --work-dir, or delete it to start again.",
    )
    return record
