"""The refine job's files: the pool of images, mask and image I/O, and the check that a work dir
holds this run (``run.json``)."""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from labeler.images import open_image
from labeler.result import BACKGROUND, IGNORE

from ..io import (
    RunMismatchError,
    atomic_write_bytes,
    check_run_file,
    image_bytes,
    image_input,
    list_images,
)
from ..pseudo_label import stem_path
from ..refine_options import ImageLabels, RefineOptions
from ..storage import Location, RemotePath, as_location, relative_posix

RUN_FORMAT = "stableseg-refine/3"

RefineMismatchError = RunMismatchError
"""The work dir holds a run with other settings or another pool."""


@dataclass(frozen=True)
class PoolItem:
    """One pool image: ``key`` names its outputs (``a/b`` for ``a/b.jpg``); ``path`` is a local
    file or an object in storage (:mod:`labeler.jobs.storage`)."""

    key: str
    path: Location


def pool_from_folder(images_dir: str | os.PathLike[str] | RemotePath) -> list[PoolItem]:
    """Every image under the folder (or object storage prefix); keys are relative paths
    without the extension."""
    root = as_location(images_dir)
    items: dict[str, PoolItem] = {}
    for relative in list_images(root):
        key = str(stem_path(relative))
        if key in items:
            raise ValueError(
                f"{relative.as_posix()} and {relative_posix(items[key].path, root)} would "
                f"share the output name {key}.png; rename one of them"
            )
        items[key] = PoolItem(key, root / relative)
    if not items:
        raise ValueError(f"no images under {root} (extensions: jpg, jpeg, png, bmp, webp, tif)")
    return list(items.values())


def labels_from_gt(
    pool: Sequence[PoolItem], gt_dir: str | os.PathLike[str], labels: Sequence[str]
) -> ImageLabels:
    """Each pool image's labels: the ids present in its ground truth ``<gt_dir>/<key>.png``.

    Ids stay global (label k of ``labels`` is mask id k); 0 and 255 are not labels. An image
    without a ground-truth mask gets no entry (stage 1 skips it, saying why).

    Raises:
        ValueError: no pool image has a mask, or a mask holds ids beyond the labels.
    """
    root = Path(gt_dir)
    ids: dict[str, tuple[int, ...]] = {}
    for item in pool:
        path = root / f"{item.key}.png"
        if not path.is_file():
            continue
        try:
            mask = read_mask(path)
        except (OSError, ValueError) as err:
            raise ValueError(f"--labels-from-gt {path}: {err}") from None
        present = [int(i) for i in np.unique(mask) if i != IGNORE]
        beyond = [i for i in present if i > len(labels)]
        if beyond:
            raise ValueError(
                f"--labels-from-gt {path}: ids {beyond[:10]} beyond the {len(labels)} labels "
                "(masks hold 0 background, k = k-th label, 255 ignore)"
            )
        ids[item.key] = tuple(i for i in present if i != BACKGROUND)
    if not ids:
        raise ValueError(
            f"--labels-from-gt {root}: no pool image has a mask there (expected "
            f"<relative path without extension>.png, e.g. {pool[0].key}.png)"
        )
    return ImageLabels(f"--labels-from-gt {root}", ids)


def labels_from_jsonl(
    pool: Sequence[PoolItem],
    images_dir: str | os.PathLike[str] | RemotePath,
    path: str | os.PathLike[str],
    labels: Sequence[str],
) -> ImageLabels:
    """Each pool image's labels from a JSON-lines file of
    ``{"image": "<path relative to images_dir>", "labels": ["cat", ...]}``.

    Names are matched to ``labels`` by the label rule (normalised, ignoring case); an image
    may be named with or without its extension. Images not listed get no entry (stage 1
    skips them, saying why).

    Raises:
        ValueError: naming the line: bad JSON, an image not in the pool, a name not among the
            labels, an image listed twice.
    """
    from labeler.labels import normalise_label

    root = as_location(images_dir)
    by_name: dict[str, str] = {}
    for item in pool:
        by_name[item.key] = item.key
        relative = relative_posix(item.path, root)
        if relative is not None:
            by_name[relative] = item.key
    label_ids = {label.casefold(): k for k, label in enumerate(labels, start=1)}
    ids: dict[str, tuple[int, ...]] = {}
    source = f"--image-labels {path}"
    lines = Path(path).read_text(encoding="utf-8-sig").splitlines()
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        where = f"{source} line {number}"
        try:
            record = json.loads(line)
        except json.JSONDecodeError as err:
            raise ValueError(f"{where}: not JSON ({err.msg})") from None
        if not isinstance(record, dict) or not isinstance(record.get("labels"), list):
            raise ValueError(f'{where}: expected {{"image": "...", "labels": ["...", ...]}}')
        image = str(record.get("image", "")).replace("\\", "/").removeprefix("./")
        key = by_name.get(image)
        if key is None:
            raise ValueError(f"{where}: image {image!r} is not in the pool under {root}")
        if key in ids:
            raise ValueError(f"{where}: image {image!r} is listed twice")
        found = []
        for name in record["labels"]:
            text = normalise_label(name, f"{where} label")
            if text.casefold() not in label_ids:
                raise ValueError(
                    f"{where}: label {text!r} is not one of the labels "
                    f"({', '.join(labels[:10])}{', ...' if len(labels) > 10 else ''})"
                )
            found.append(label_ids[text.casefold()])
        ids[key] = tuple(sorted(set(found)))
    if not ids:
        raise ValueError(f"{source}: no image listed")
    return ImageLabels(source, ids)


def read_mask(path: Path) -> np.ndarray:
    """An indexed mask PNG as (H, W) uint8 ids."""
    from exporters.png import png_to_mask

    with Image.open(path) as image:
        return png_to_mask(image)


def write_mask(path: Path, mask: np.ndarray) -> None:
    """(H, W) ids to an indexed PNG (VOC palette), atomically."""
    from exporters.png import mask_to_png

    atomic_write_bytes(path, image_bytes(mask_to_png(mask)))


def working_rgb(image: Image.Image, max_side: int) -> np.ndarray:
    """(H, W, 3) uint8 of an opened image at the working size (longer side <= ``max_side``)."""
    from labeler.images import to_rgb_array
    from labeler.train.data import resize_rgb, work_size

    rgb = to_rgb_array(image)
    return resize_rgb(rgb, work_size(rgb.shape[1], rgb.shape[0], max_side))


def load_rgb(path: Location, max_side: int) -> np.ndarray:
    """(H, W, 3) uint8 at the working size (longer side at most ``max_side``)."""
    return working_rgb(open_image(image_input(path)), max_side)


def load_pair(path: Location, mask_path: Path, max_side: int) -> tuple[np.ndarray, np.ndarray]:
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
