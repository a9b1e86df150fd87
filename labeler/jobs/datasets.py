"""Read a dataset preset's files: find its images and ground truth under a root, decode them.

    dataset = open_dataset("voc", "/data/VOCdevkit", split="val")
    for image_path, key, gt in dataset.iter(limit=100):
        labels = dataset.preset.names_of(dataset.preset.classes_present(gt))  # paper protocol
        ...
    score = dataset.preset.new_score()  # ConfusionMatrix by the dataset's protocol

Each finder accepts the folder as released (and mmsegmentation's converted layout where that is
how the dataset is kept) at ``root`` or one of the folders a download usually nests it in, and
fails with the layout it expected when nothing matches.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path, PurePosixPath

import numpy as np
from PIL import Image

from labeler.datasets import DatasetPreset, get_preset

from .io import list_images

Root = str | os.PathLike[str]


@dataclass(frozen=True)
class Sample:
    """One image and its ground truth. ``key`` is the relative name without extension (posix),
    the name a prediction of this image is written under; ``kind`` names the ground truth's
    encoding in ``DatasetPreset.encodings``."""

    key: str
    image: Path
    gt: Path
    kind: str = "default"


@dataclass
class Dataset:
    """The samples of one split of a preset, in a stable (sorted) order.

    Attributes:
        preset: class names, decoding and background rule.
        root: the folder the layout was found in.
        split: the split read.
        samples: the images with ground truth.
        unmatched: (folder preset only) relative names found with an image but no ground truth,
            or the reverse; left out of ``samples``.
    """

    preset: DatasetPreset
    root: Path
    split: str
    samples: list[Sample]
    unmatched: list[str] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.samples)

    def read_gt(self, sample: Sample) -> np.ndarray:
        """(H, W) uint8 ground truth of ``sample`` in project ids (0 background, k = class k,
        255 ignore). Raises ValueError naming the file when it cannot be decoded."""
        channel = self.preset.encodings[sample.kind].channel
        try:
            raw = read_raw_mask(sample.gt, channel)
            return self.preset.decode(raw, sample.kind)
        except (OSError, ValueError) as err:
            raise ValueError(f"{sample.gt}: {err}") from None

    def iter(self, limit: int | None = None) -> Iterator[tuple[Path, str, np.ndarray]]:
        """(image path, key, decoded ground truth) of the first ``limit`` samples (all: None)."""
        if limit is not None and limit < 0:
            raise ValueError(f"limit must be >= 0, got {limit}")
        for sample in self.samples[:limit]:
            yield sample.image, sample.key, self.read_gt(sample)


def read_raw_mask(path: Path, channel: str) -> np.ndarray:
    """A ground-truth PNG as stored: (H, W) ids of a palette / grey PNG ("index"), or the
    (H, W, 3) RGB array of a mask that keeps its id in a colour channel ("red")."""
    with Image.open(path) as image:
        if channel == "red":
            if image.mode not in ("RGB", "RGBA"):
                raise ValueError(
                    f"expected an RGB mask with the class id in the red channel, got mode "
                    f"{image.mode!r}"
                )
            return np.array(image.convert("RGB"))  # (H, W, 3)
        if image.mode not in ("P", "L", "I", "I;16"):
            raise ValueError(
                f"expected a single-channel id mask (palette 'P' or grey 'L'), got mode "
                f"{image.mode!r}; a colour rendering cannot be mapped back to ids"
            )
        return np.array(image)  # (H, W) palette indices / grey values


# -- layouts ----------------------------------------------------------------------------------


def _find_base(
    preset: DatasetPreset, root: Path, candidates: Sequence[str], needs: Sequence[str]
) -> Path:
    """The first ``root / candidate`` that holds every path of ``needs``.

    Raises:
        ValueError: none does (:func:`_layout_error`).
    """
    for candidate in candidates:
        base = root / candidate if candidate else root
        if all((base / need).exists() for need in needs):
            return base
    raise _layout_error(preset, root)


def _layout_error(preset: DatasetPreset, root: Path, detail: str = "") -> ValueError:
    extra = f" ({detail})" if detail else ""
    return ValueError(
        f"no {preset.title} layout under {root}{extra}; expected {preset.layout}. "
        f"Download: {preset.download}"
    )


def _read_ids(path: Path) -> list[str]:
    return [line.strip().split()[0] for line in path.read_text().splitlines() if line.strip()]


def _from_list(
    base: Path, ids: Sequence[str], image: str, gt: str, kind: str = "default"
) -> list[Sample]:
    """Samples of a split list; every listed image and ground truth must exist."""
    samples, missing = [], []
    for name in ids:
        sample = Sample(name, base / image.format(name), base / gt.format(name), kind)
        if not sample.image.is_file() or not sample.gt.is_file():
            missing.append(name)
            continue
        samples.append(sample)
    if missing:
        raise ValueError(
            f"{len(missing)} of the {len(ids)} listed images lack {image} or {gt} under {base} "
            f"(first: {', '.join(missing[:5])}); is the download complete?"
        )
    return samples


def _pair_by_stem(image_dir: Path, gt_dir: Path, image_suffix: str, gt_suffix: str) -> list[Sample]:
    """Samples from a ground-truth folder and an image folder of the same file stems."""
    gts = sorted(gt_dir.glob(f"*{gt_suffix}"))
    samples, missing = [], []
    for gt in gts:
        stem = gt.name[: -len(gt_suffix)]
        image = image_dir / f"{stem}{image_suffix}"
        if not image.is_file():
            missing.append(stem)
            continue
        samples.append(Sample(stem, image, gt))
    if missing:
        raise ValueError(
            f"{len(missing)} ground-truth files under {gt_dir} have no {image_suffix} image in "
            f"{image_dir} (first: {', '.join(missing[:5])})"
        )
    return samples


def _pascal(
    preset: DatasetPreset, root: Path, split: str, year: str, masks: str, sets: str
) -> tuple[Path, list[Sample]]:
    """A VOCdevkit-style layout: ``JPEGImages``, a mask folder and ``ImageSets/<sets>`` lists,
    under ``root``, ``root/VOC<year>`` or ``root/VOCdevkit/VOC<year>``."""
    needs = ("JPEGImages", masks, f"ImageSets/{sets}")
    base = _find_base(preset, root, ("", f"VOC{year}", f"VOCdevkit/VOC{year}"), needs)
    listing = base / "ImageSets" / sets / f"{split}.txt"
    if not listing.is_file():
        raise _layout_error(preset, root, f"{listing} is missing")
    ids = _read_ids(listing)
    return base, _from_list(base, ids, "JPEGImages/{}.jpg", masks + "/{}.png")


_voc = partial(_pascal, year="2012", masks="SegmentationClass", sets="Segmentation")
_context = partial(
    _pascal, year="2010", masks="SegmentationClassContext", sets="SegmentationContext"
)


def _ade(preset: DatasetPreset, root: Path, split: str) -> tuple[Path, list[Sample]]:
    folder = {"train": "training", "val": "validation"}[split]
    needs = (f"images/{folder}", f"annotations/{folder}")
    base = _find_base(preset, root, ("", "ADEChallengeData2016"), needs)
    samples = _pair_by_stem(base / "images" / folder, base / "annotations" / folder, ".jpg", ".png")
    return base, samples


def _cityscapes(preset: DatasetPreset, root: Path, split: str) -> tuple[Path, list[Sample]]:
    needs = (f"leftImg8bit/{split}", f"gtFine/{split}")
    base = _find_base(preset, root, ("", "cityscapes", "Cityscapes"), needs)
    image_suffix = "_leftImg8bit.png"
    samples, missing = [], []
    for image in sorted((base / "leftImg8bit" / split).glob(f"*/*{image_suffix}")):
        city, stem = image.parent.name, image.name[: -len(image_suffix)]
        gt_dir = base / "gtFine" / split / city
        for kind in ("labelTrainIds", "labelIds"):  # the converted trainIds first, as mmseg
            gt = gt_dir / f"{stem}_gtFine_{kind}.png"
            if gt.is_file():
                samples.append(Sample(f"{city}/{stem}", image, gt, kind))
                break
        else:
            missing.append(f"{city}/{stem}")
    if missing:
        raise ValueError(
            f"{len(missing)} images under {base / 'leftImg8bit' / split} have neither "
            f"_gtFine_labelTrainIds.png nor _gtFine_labelIds.png (first: {', '.join(missing[:5])})"
        )
    return base, samples


def _foodseg(preset: DatasetPreset, root: Path, split: str) -> tuple[Path, list[Sample]]:
    needs = (f"img_dir/{split}", f"ann_dir/{split}")
    base = _find_base(preset, root, ("Images", "FoodSeg103/Images", ""), needs)
    samples = _pair_by_stem(base / "img_dir" / split, base / "ann_dir" / split, ".jpg", ".png")
    return base, samples


def _uecfoodpix(preset: DatasetPreset, root: Path, split: str) -> tuple[Path, list[Sample]]:
    candidates = ("", "data", "UECFoodPIXCOMPLETE", "data/UECFoodPIXCOMPLETE")
    candidates += tuple(f"UECFOODPIXCOMPLETE/{c}".rstrip("/") for c in candidates)
    base = _find_base(preset, root, candidates, (f"{split}/img", f"{split}/mask"))
    samples = _pair_by_stem(base / split / "img", base / split / "mask", ".jpg", ".png")
    return base, samples


def _camvid(preset: DatasetPreset, root: Path, split: str) -> tuple[Path, list[Sample]]:
    base = _find_base(preset, root, ("", "CamVid", "SegNet/CamVid"), (split, f"{split}annot"))
    samples = _pair_by_stem(base / split, base / f"{split}annot", ".png", ".png")
    return base, samples


FINDERS: dict[str, Callable[[DatasetPreset, Path, str], tuple[Path, list[Sample]]]] = {
    "voc": _voc,
    "voc21": _voc,
    "context59": _context,
    "context60": _context,
    "ade150": _ade,
    "cityscapes": _cityscapes,
    "foodseg103": _foodseg,
    "uecfoodpix": _uecfoodpix,
    "camvid": _camvid,
}


def _folder(preset: DatasetPreset, images: Path, gt_dir: Path) -> Dataset:
    """Images under ``images`` and indexed PNGs under ``gt_dir``, matched by relative path
    without extension (as ``evaluate`` matches predictions)."""
    if not gt_dir.is_dir():
        raise ValueError(f"ground-truth folder {gt_dir} is not a folder")
    by_key = {
        PurePosixPath(p.as_posix()).with_suffix("").as_posix(): p for p in list_images(images)
    }
    gts = {
        PurePosixPath(p.relative_to(gt_dir).as_posix()).with_suffix("").as_posix(): p
        for p in sorted(gt_dir.rglob("*.png"))
        if not any(part.startswith(".") for part in p.relative_to(gt_dir).parts)
    }
    samples = [Sample(key, images / by_key[key], gts[key]) for key in sorted(gts) if key in by_key]
    unmatched = sorted(set(by_key) ^ set(gts))
    if not samples:
        raise ValueError(
            f"no image under {images} has a ground-truth PNG of the same relative name under "
            f"{gt_dir}"
        )
    return Dataset(preset, images, "all", samples, unmatched)


def open_dataset(
    name: str,
    root: Root,
    split: str | None = None,
    *,
    background: bool | None = None,
    labels: Sequence[str] | None = None,
    gt_dir: Root | None = None,
    ignore_index: Sequence[int] = (),
) -> Dataset:
    """One split of dataset preset ``name`` found under ``root``.

    Args:
        name: a name of ``labeler.datasets.preset_names()``.
        root: the dataset's folder (or a folder above it, as the preset's layout says); for
            ``folder``, the images folder.
        split: one of the preset's splits; None takes the one papers report.
        background: score ground-truth background as a class (True) or not (False); None keeps
            the preset's rule.
        labels, gt_dir, ignore_index: ``folder`` only: the class names (ground-truth id order),
            the ground-truth folder, and raw ids that are not scored (255 always is).

    Raises:
        KeyError: an unknown preset name. ValueError: an unknown split, a layout not found, or
        files missing (the message names what was expected).
    """
    preset = get_preset(name, background=background, labels=labels, ignore_index=ignore_index)
    root = Path(root)
    if not root.is_dir():
        raise ValueError(f"dataset root {root} is not a folder")
    if name == "folder":
        if gt_dir is None:
            raise ValueError("dataset 'folder' needs the ground-truth folder (gt_dir)")
        if split not in (None, "all"):
            raise ValueError(f"dataset 'folder' has no split {split!r}; it has one split, all")
        return _folder(preset, root, Path(gt_dir))
    if gt_dir is not None:
        raise ValueError(f"dataset {name!r} finds its ground truth itself; gt_dir is for 'folder'")
    split = preset.check_split(split)
    base, samples = FINDERS[name](preset, root, split)
    if not samples:
        raise _layout_error(preset, root, f"split {split!r} has no images")
    return Dataset(preset, base, split, sorted(samples, key=lambda s: s.key))
