"""The reading stage of ``pseudo-label``: one image file -> what the model and the writers need.

Runs in worker threads (decoding and resizing release the GIL). For each image it produces:

* ``model_input``: what ``segment()`` is given. For a segmenter that takes prepared images
  (``accepts_prepared_images``), a :class:`labeler.images.PreparedImage`: the (S, S, 3) model
  input resized here plus the original size, so that the main thread never touches the
  full-size pixels. Otherwise the full-size RGB array (``segment()`` resizes it on the main
  thread, and the mask comes out at its size).
* ``preview``: the overlay's base picture, its long side capped at ``preview_cap`` (1024 px):
  only that copy travels to the writers, never the full image.
* ``rgb``: the full-size RGB array, kept only for ``--crf`` (DenseCRF works at full size).
* ``gt_ids``: with ``--labels-from-gt``, the labels of the image's ground truth.

**Reduced JPEG decoding.** A JPEG can be decoded at 1/2, 1/4 or 1/8 scale for a fraction of
the cost (PIL's draft mode). The mask must come out at the original size, so this is used only
when nothing needs the full-size pixels: the segmenter takes prepared images (the model input
and the preview are then made from the reduced decode, which is kept at least as large as
each of them, and the original size comes from the file's header), and ``--crf`` is off. In
every other case the image is decoded at full size, as before.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from labeler.images import ImageError, decode_image, open_image

from .layout import stem_path

PREVIEW_CAP = 1024  # long side of a preview, in pixels


def preview_size(size: tuple[int, int], cap: int = PREVIEW_CAP) -> tuple[int, int]:
    """(width, height) of the preview of an image of ``size``: the long side at most ``cap``."""
    width, height = size
    longest = max(width, height)
    if longest <= cap:
        return width, height
    scale = cap / longest
    return max(1, round(width * scale)), max(1, round(height * scale))


@dataclass(frozen=True)
class ReadPlan:
    """What the reading stage makes of each image.

    Attributes:
        images_dir: the folder the relative paths are in.
        max_pixels: larger images are refused (skipped).
        prepared_size: the model input side S when the segmenter takes prepared images;
            None when it takes full-size images.
        preview: make the preview base picture.
        keep_rgb: keep the full-size RGB array (for ``--crf``).
        gt_dir: ``--labels-from-gt``'s folder, or None.
        num_labels: how many labels the run has (ids of ``gt_dir``'s masks above are ignored).
    """

    images_dir: Path
    max_pixels: int
    prepared_size: int | None = None
    preview: bool = False
    keep_rgb: bool = False
    gt_dir: Path | None = None
    num_labels: int = 0

    @property
    def reduce(self) -> bool:
        """Whether a JPEG may be decoded at a reduced scale (see the module's docstring)."""
        return self.prepared_size is not None and not self.keep_rgb


@dataclass
class ImageItem:
    """One image after the reading stage; ``error`` says why it cannot be labelled."""

    relative: Path
    size: tuple[int, int] = (0, 0)  # (width, height) of the original, EXIF applied
    model_input: Any = None  # PreparedImage, or (H, W, 3) uint8
    preview: Any = None  # PIL RGB image, long side <= PREVIEW_CAP
    rgb: np.ndarray | None = None  # (H, W, 3) uint8, only for --crf
    gt_ids: tuple[int, ...] | None = None  # --labels-from-gt: 1-based ids in its ground truth
    error: str | None = None


def ground_truth_ids(gt_dir: Path, relative: Path, num_labels: int) -> tuple[int, ...]:
    """1-based ids of the labels present in an image's ground-truth mask (paper's protocol).

    Raises:
        ImageError: no mask ``gt_dir/<rel>.png``, or one that cannot be read.
    """
    from exporters import png_to_mask
    from exporters.mask_ids import present_ids

    path = gt_dir / f"{stem_path(relative)}.png"
    if not path.exists():
        raise ImageError(f"no ground-truth mask {path} for --labels-from-gt")
    try:
        gt = png_to_mask(open_image(path))
    except ValueError as err:
        raise ImageError(f"ground-truth mask {path}: {err}") from None
    return tuple(int(i) for i in present_ids(gt) if 1 <= i <= num_labels)


def _rgb(image: Any) -> Any:
    """An RGB PIL image as it is; anything else as the RGB array the model would see."""
    from labeler.images import to_rgb_array

    return image if image.mode == "RGB" else to_rgb_array(image)


def read_image(plan: ReadPlan, relative: Path) -> ImageItem:
    """Decode one image and prepare it for the model and the writers (see the module)."""
    from PIL import Image

    from labeler.images import PreparedImage, resize_for_model, to_rgb_array

    item = ImageItem(relative)
    try:
        if plan.gt_dir is not None:
            item.gt_ids = ground_truth_ids(plan.gt_dir, relative, plan.num_labels)
        at_least = None
        if plan.reduce:
            side = plan.prepared_size

            def at_least(size: tuple[int, int]) -> tuple[int, int]:
                wanted = preview_size(size) if plan.preview else (1, 1)
                return max(side, wanted[0]), max(side, wanted[1])

        image, item.size = decode_image(plan.images_dir / relative, plan.max_pixels, at_least)
    except ImageError as err:
        item.error = str(err)
        return item

    picture = _rgb(image)  # PIL RGB image or (h, w, 3) uint8 array
    if plan.prepared_size is not None:
        pixels = resize_for_model(picture, plan.prepared_size)  # (S, S, 3) uint8
        item.model_input = PreparedImage(pixels, item.size)
    if plan.prepared_size is None or plan.keep_rgb:
        rgb = to_rgb_array(picture)  # (H, W, 3) uint8 at full size
        if plan.keep_rgb:
            item.rgb = rgb
        if plan.prepared_size is None:
            item.model_input = rgb
    if plan.preview:
        base = picture if isinstance(picture, Image.Image) else Image.fromarray(picture)
        target = preview_size(item.size)
        if base.size != target:
            base = base.resize(target, Image.Resampling.BILINEAR, reducing_gap=2.0)
        item.preview = base
    return item
