"""Compare predicted masks with ground-truth masks: confusion-matrix mIoU."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any

import numpy as np
from PIL import Image

from .io import Skipped


@dataclass
class Evaluation:
    metrics: dict[str, Any]
    evaluated: int
    skipped: list[Skipped] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {
            **self.metrics,
            "images_evaluated": self.evaluated,
            "skipped": [s.to_dict() for s in self.skipped],
        }


def _masks(folder: Path) -> dict[PurePosixPath, Path]:
    """Relative path without extension -> PNG file, for every PNG under ``folder``."""
    return {
        PurePosixPath(p.relative_to(folder).as_posix()).with_suffix(""): p
        for p in sorted(folder.rglob("*.png"))
        if not any(part.startswith(".") for part in p.relative_to(folder).parts)
    }


def _read(path: Path) -> np.ndarray:
    from exporters.png import png_to_mask

    with Image.open(path) as image:
        return png_to_mask(image)


def evaluate_folders(
    pred_dir: Path,
    gt_dir: Path,
    labels: list[str],
    include_background: bool = True,
) -> Evaluation:
    """mIoU of the masks under ``pred_dir`` against those under ``gt_dir``.

    Files are matched by relative path without extension; a pseudo-label output folder (with
    ``masks/``) can be given as ``pred_dir``. 255 is ignored in either mask. Missing
    predictions and size mismatches are skipped and reported.
    """
    from labeler.metrics import confusion_matrix, summarize

    if (pred_dir / "masks").is_dir() and (pred_dir / "run.json").exists():
        pred_dir = pred_dir / "masks"
    gts = _masks(gt_dir)
    if not gts:
        raise ValueError(f"no PNG ground-truth masks under {gt_dir}")
    preds = _masks(pred_dir)
    classes = ["background", *labels]
    total = np.zeros((len(classes), len(classes)), dtype=np.int64)
    skipped, evaluated = [], 0
    for key, gt_path in gts.items():
        if key not in preds:
            skipped.append(Skipped(f"{key}.png", f"no prediction under {pred_dir}"))
            continue
        gt, pred = _read(gt_path), _read(preds[key])
        if gt.shape != pred.shape:
            skipped.append(
                Skipped(
                    f"{key}.png",
                    f"size mismatch: prediction {pred.shape}, ground truth {gt.shape} (H, W)",
                )
            )
            continue
        try:
            total += confusion_matrix(pred, gt, len(classes))
        except ValueError as err:
            skipped.append(Skipped(f"{key}.png", str(err)))
            continue
        evaluated += 1
    if not evaluated:
        raise ValueError(
            f"no mask could be evaluated ({len(skipped)} skipped; first: "
            f"{skipped[0].path}: {skipped[0].reason})"
        )
    metrics = summarize(total, classes, include_background=include_background)
    return Evaluation(metrics=metrics, evaluated=evaluated, skipped=skipped)


def format_table(evaluation: Evaluation) -> str:
    """A plain-text per-class IoU table with the summary lines."""
    metrics = evaluation.metrics
    width = max(12, *(len(name) for name in metrics["per_class"]))
    lines = [f"{'class':<{width}}  IoU %"]
    for name, value in metrics["per_class"].items():
        lines.append(f"{name:<{width}}  {'-' if value is None else f'{value:6.2f}'}")
    lines.append("")

    def show(value: float | None) -> str:
        return "-" if value is None else f"{value:.2f}"

    lines.append(f"mIoU            {show(metrics['mIoU'])} %")
    lines.append(f"pixel accuracy  {show(metrics['pixel_accuracy'])} %")
    lines.append(
        f"images          {evaluation.evaluated} evaluated, {len(evaluation.skipped)} skipped"
    )
    return "\n".join(lines)
