"""The reading step of ``pseudo-label``: one image file -> what the model stage and the writers
need (the stage's ``load``, :class:`labeler.jobs.stage.Loaded`).

Runs in the stage's reading threads (decoding and resizing release the GIL), which then bring
the image to the model's input (``model.prepare``), so that the main thread never touches the
full-size pixels. For each image it produces:

* ``image``: the decoded picture (an RGB PIL image or (H, W, 3) uint8 array), given to
  ``model.prepare``; ``size``: the original's (width, height), EXIF applied, the mask's size.
* ``subset``: with ``--labels-from-gt``, the labels of the image's ground truth (``()`` when it
  holds none: the image is all background, not segmented); None otherwise (every label).
* ``extra`` (:class:`Pictures`): what the writers need besides the labels: the overlay's base
  picture, its long side capped at ``PREVIEW_CAP`` (1024 px), so that only that copy travels to
  the writers, never the full image; and the full-size RGB array, kept only for ``--crf``
  (DenseCRF works at full size).

**Reduced JPEG decoding.** A JPEG can be decoded at 1/2, 1/4 or 1/8 scale for a fraction of
the cost (PIL's draft mode). The mask must come out at the original size, so this is used only
when nothing needs the full-size pixels: the model takes inputs of a fixed side
(``model.input_size``: the model input and the preview are then made from the reduced decode,
which is kept at least as large as each of them, and the original size comes from the file's
header), and ``--crf`` is off. In every other case the image is decoded at full size.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from labeler.images import ImageError, decode_image, open_image

from .io import image_input
from .layout import stem_path
from .pseudo_label_options import PseudoLabelOptions
from .stage import Loaded
from .storage import Location

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
    """What the reading step makes of each image.

    Attributes:
        images_dir: the folder (or object storage prefix) the relative paths are in.
        max_pixels: larger images are refused (skipped).
        input_size: the model's input side (``model.input_size``); None for a model that takes
            images at any size.
        preview: make the preview base picture.
        keep_rgb: keep the full-size RGB array (for ``--crf``).
        gt_dir: ``--labels-from-gt``'s folder, or None.
        num_labels: how many labels the run has (ids of ``gt_dir``'s masks above are ignored).
    """

    images_dir: Location
    max_pixels: int
    input_size: int | None = None
    preview: bool = False
    keep_rgb: bool = False
    gt_dir: Path | None = None
    num_labels: int = 0

    @property
    def reduce(self) -> bool:
        """Whether a JPEG may be decoded at a reduced scale (see the module's docstring)."""
        return self.input_size is not None and not self.keep_rgb

    @classmethod
    def for_run(cls, options: PseudoLabelOptions, input_size: int | None) -> ReadPlan:
        """The reading of a ``pseudo-label`` run, whichever engine runs it."""
        return cls(
            images_dir=options.images_dir,
            max_pixels=options.max_pixels,
            input_size=input_size,
            preview=options.preview,
            keep_rgb=options.crf,
            gt_dir=options.labels_from_gt,
            num_labels=len(options.labels),
        )


@dataclass
class Pictures:
    """What the writers need of an image besides its labels (the stage's ``extra``)."""

    preview: Any = None  # PIL RGB image, long side <= PREVIEW_CAP; only with --preview
    rgb: np.ndarray | None = None  # (H, W, 3) uint8 at full size; only for --crf


def ground_truth_ids(gt_dir: Path, relative: Path, num_labels: int) -> tuple[int, ...]:
    """1-based ids of the labels present in an image's ground-truth mask (paper's protocol),
    ascending.

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


def read_image(plan: ReadPlan, relative: Path) -> Loaded:
    """Decode one image for the model stage and the writers (see the module).

    Raises:
        ImageError: an unreadable or too large image, or (``--labels-from-gt``) no readable
            ground truth: the image is skipped with this reason.
    """
    from PIL import Image

    from labeler.images import to_rgb_array

    subset = None
    if plan.gt_dir is not None:
        subset = ground_truth_ids(plan.gt_dir, relative, plan.num_labels)
    at_least = None
    if plan.reduce:
        side = plan.input_size
        assert side is not None

        def at_least(size: tuple[int, int]) -> tuple[int, int]:
            wanted = preview_size(size) if plan.preview else (1, 1)
            return max(side, wanted[0]), max(side, wanted[1])

    source = image_input(plan.images_dir / relative)  # a path, or the object's bytes
    image, size = decode_image(source, plan.max_pixels, at_least)
    picture = _rgb(image)  # PIL RGB image or (h, w, 3) uint8 array
    pictures = Pictures()
    if plan.keep_rgb:
        pictures.rgb = to_rgb_array(picture)  # (H, W, 3) uint8 at full size
    if plan.preview:
        base = picture if isinstance(picture, Image.Image) else Image.fromarray(picture)
        target = preview_size(size)
        if base.size != target:
            base = base.resize(target, Image.Resampling.BILINEAR, reducing_gap=2.0)
        pictures.preview = base
    return Loaded(picture, subset, size, pictures)
