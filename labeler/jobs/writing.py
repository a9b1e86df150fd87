"""The writing step of ``pseudo-label``: one image out of the model stage -> its files, in a
writer thread.

In order, each written atomically: the mask PNG (:data:`~labeler.jobs.io.PNG_OPTIONS`), the
object PNG for CVAT (``--format cvat-mask``), the export pieces (COCO annotations, Label
Studio predictions, YOLO lines, see :mod:`labeler.jobs.exports`), the preview, and last the
record, whose presence means "done". With ``--crf`` DenseCRF runs here first, on the full-size
image.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from .dataset_exports import write_cvat_files
from .exports import make_pieces
from .io import (
    PNG_OPTIONS,
    atomic_write_bytes,
    atomic_write_json,
    atomic_write_text,
    image_bytes,
)
from .layout import mask_path, pieces_path, preview_path, record_path
from .pipeline import StageClock
from .pseudo_label_options import PseudoLabelOptions
from .reading import Pictures
from .stage import Segmented
from .storage import Location

PREVIEW_MIN_SIDE = 256  # smaller previews are enlarged (nearest) so the legend stays readable
PREVIEW_QUALITY = 88  # JPEG quality of the previews
SCORE_DIGITS = 6  # scores are stored rounded


@dataclass(frozen=True)
class WritePlan:
    """What the writers make for each image."""

    out_dir: Location
    labels: Sequence[str]
    formats: Sequence[str]
    preview: bool
    crf: bool
    background_threshold: float | None
    model_version: str
    polygons: dict[str, Any] | None = None  # PseudoLabelOptions.polygon_settings()

    @classmethod
    def for_run(cls, options: PseudoLabelOptions, model_version: str) -> WritePlan:
        """The writing of a ``pseudo-label`` run, whichever engine runs it."""
        return cls(
            out_dir=options.out_dir,
            labels=list(options.labels),
            formats=tuple(options.formats),
            preview=options.preview,
            crf=options.crf,
            background_threshold=options.segmenter.background_threshold,
            model_version=model_version,
            polygons=options.polygon_settings(),
        )


def apply_crf(
    item: Segmented[Path], rgb: np.ndarray, labels: Sequence[str], threshold: float | None
) -> tuple[np.ndarray, dict[str, float]]:
    """DenseCRF over the segmenter's result (:func:`labeler.crf.crf_segmentation`: the
    background prompt's channel and the threshold's background are refined like the labels),
    mapped back to the run's ids; the scores follow the refined maps.

    Returns:
        The (H, W) mask over the run's labels and every label's score.
    """
    from labeler.crf import crf_segmentation

    if item.result is None or item.subset is None:  # nothing was prompted: nothing to refine
        assert item.mask is not None
        return item.mask, item.scores
    refined = crf_segmentation(item.result, rgb, threshold)
    scores = dict.fromkeys(labels, 0.0)
    scores.update(refined.scores)
    return item.subset.to_global(refined.mask), scores


def _present(mask: np.ndarray, num_labels: int) -> tuple[list[int], np.ndarray]:
    """The label ids in ``mask`` and the pixels of each id, checked: ids other than
    0..num_labels and 255 are a bug."""
    from exporters.mask_ids import id_counts
    from labeler.result import IGNORE

    counts = id_counts(mask)
    ids = np.flatnonzero(counts)
    bad = [int(i) for i in ids if i > num_labels and i != IGNORE]
    if bad:
        raise ValueError(f"mask ids {bad} are outside 0..{num_labels} and not {IGNORE}")
    return [int(i) for i in ids if 1 <= i <= num_labels], counts


def _shrink(mask: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Nearest-neighbour (pixel centres) resize of an (H, W) mask to ``size`` = (w, h)."""
    width, height = size
    if (height, width) == mask.shape:
        return mask
    rows = ((np.arange(height) + 0.5) * mask.shape[0] / height).astype(np.intp)
    cols = ((np.arange(width) + 0.5) * mask.shape[1] / width).astype(np.intp)
    return mask[rows[:, None], cols[None, :]]  # (h, w)


def preview_bytes(picture: Any, mask: np.ndarray, labels: Sequence[str]) -> bytes:
    """The JPEG overlay of ``mask`` on ``picture`` (a PIL RGB image, at most the mask's size);
    small pictures are enlarged by a whole factor so the legend stays readable."""
    from PIL import Image

    from exporters import overlay

    mask = _shrink(mask, picture.size)
    factor = -(-PREVIEW_MIN_SIDE // max(picture.size))  # ceil
    if factor > 1:
        size = (picture.width * factor, picture.height * factor)
        picture = picture.resize(size, Image.Resampling.NEAREST)
        mask = np.kron(mask, np.ones((factor, factor), mask.dtype))
    return image_bytes(overlay(picture, mask, labels), "JPEG", quality=PREVIEW_QUALITY)


def write_image(plan: WritePlan, item: Segmented[Path], clock: StageClock) -> None:
    """Write every output of one image (``item.key``: its path under the images folder, and
    ``item.extra``: its :class:`~labeler.jobs.reading.Pictures`); the record last."""
    from exporters import mask_to_png

    out, labels, relative = plan.out_dir, plan.labels, item.key
    pictures: Pictures = item.extra
    mask, scores = item.mask, item.scores
    if plan.crf:
        with clock.measure("crf"):
            assert pictures.rgb is not None
            mask, scores = apply_crf(item, pictures.rgb, labels, plan.background_threshold)
        pictures.rgb = None
    assert mask is not None
    with clock.measure("mask ids"):
        present, counts = _present(mask, len(labels))
    scores = {k: round(float(v), SCORE_DIGITS) for k, v in scores.items()}
    with clock.measure("png"):
        png = image_bytes(mask_to_png(mask), "PNG", **PNG_OPTIONS)
        atomic_write_bytes(mask_path(out, relative), png)
    if "cvat-mask" in plan.formats:
        with clock.measure("cvat-mask"):
            write_cvat_files(out, relative, mask, present)
    pieces = make_pieces(
        mask,
        present,
        labels,
        scores,
        plan.model_version,
        plan.formats,
        clock,
        counts,
        plan.polygons,
    )
    if plan.preview:
        with clock.measure("preview"):
            data = preview_bytes(pictures.preview, mask, labels)
            atomic_write_bytes(preview_path(out, relative), data)
    with clock.measure("record"):
        atomic_write_text(pieces_path(out, relative), pieces.text())
        record = {
            "file": relative.as_posix(),
            "width": int(mask.shape[1]),
            "height": int(mask.shape[0]),
            "labels_present": [labels[i - 1] for i in present],
            "scores": scores,
            "model_version": plan.model_version,
        }
        atomic_write_json(record_path(out, relative), record)
