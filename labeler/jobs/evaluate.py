"""Compare predicted masks with ground-truth masks: confusion-matrix mIoU."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any

import numpy as np
from PIL import Image

from labeler.metrics import ScoreProtocol

from .io import Failure


@dataclass
class Evaluation:
    metrics: dict[str, Any]
    evaluated: int
    skipped: list[Failure] = field(default_factory=list)

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
    protocol: ScoreProtocol | None = None,
) -> Evaluation:
    """mIoU of the masks under ``pred_dir`` against those under ``gt_dir``, by ``protocol``.

    Files are matched by relative path without extension; a pseudo-label output folder (with
    ``masks/``) can be given as ``pred_dir``. Which pixels are scored is decided by
    ``labeler.metrics.ScoreProtocol`` (by default: ground-truth 255 is not scored, background is
    class 0, a predicted 255 is left out). Missing predictions, size mismatches and masks with
    ids outside the label list are skipped and reported.
    """
    from labeler.metrics import ConfusionMatrix

    if (pred_dir / "masks").is_dir() and (pred_dir / "run.json").exists():
        pred_dir = pred_dir / "masks"
    gts = _masks(gt_dir)
    if not gts:
        raise ValueError(f"no PNG ground-truth masks under {gt_dir}")
    preds = _masks(pred_dir)
    score = ConfusionMatrix(labels, protocol)
    skipped = []
    for key, gt_path in gts.items():
        if key not in preds:
            skipped.append(Failure(f"{key}.png", f"no prediction under {pred_dir}"))
            continue
        gt, pred = _read(gt_path), _read(preds[key])
        if gt.shape != pred.shape:
            skipped.append(
                Failure(
                    f"{key}.png",
                    f"size mismatch: prediction {pred.shape}, ground truth {gt.shape} (H, W)",
                )
            )
            continue
        try:
            score.add(pred, gt)
        except ValueError as err:
            skipped.append(Failure(f"{key}.png", str(err)))
    if not score.images:
        raise ValueError(
            f"no mask could be evaluated ({len(skipped)} skipped; first: "
            f"{skipped[0].item}: {skipped[0].reason})"
        )
    metrics = score.summary()
    return Evaluation(metrics=metrics, evaluated=score.images, skipped=skipped)


def format_table(evaluation: Evaluation) -> str:
    """A plain-text per-class IoU table with the summary lines."""
    metrics = evaluation.metrics
    protocol = ScoreProtocol(**metrics["protocol"])
    width = max(12, *(len(name) for name in metrics["per_class"]))
    lines = [f"{'class':<{width}}  IoU %"]
    for index, (name, value) in enumerate(metrics["per_class"].items()):
        note = "  (not scored)" if index == 0 and protocol.exclude_background else ""
        lines.append(f"{name:<{width}}  {'-' if value is None else f'{value:6.2f}'}{note}")
    lines.append("")

    def show(value: float | None) -> str:
        return "-" if value is None else f"{value:.2f}"

    lines.append(f"mIoU            {show(metrics['mIoU'])} %")
    lines.append(f"pixel accuracy  {show(metrics['pixel_accuracy'])} %")
    lines.append(
        f"images          {evaluation.evaluated} evaluated, {len(evaluation.skipped)} skipped"
    )
    lines.append(f"protocol        {protocol.describe()}")
    return "\n".join(lines)
