"""The refine report's pieces that need no files: mIoU accumulation and the report's plot.

Uses matplotlib's object API with the Agg canvas (no pyplot state), so it is safe in a
background thread and needs no display.
"""

from __future__ import annotations

import io
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from ..metrics import ConfusionMatrix, ScoreProtocol


class MaskScore(ConfusionMatrix):
    """The confusion matrix of predicted masks against ground truth (--val-gt).

    A ``labeler.metrics.ConfusionMatrix`` whose predictions are resized (nearest) to the ground
    truth's size. Without background (every pixel gets a label) ground-truth background is not
    scored and class 0 is left out of the mean: such a run cannot predict it. Predicted 255
    (a pseudo-mask's uncertain pixels) is left out, so a pseudo-mask is scored on the pixels it
    keeps.
    """

    def __init__(self, labels: Sequence[str], background: bool) -> None:
        super().__init__(labels, ScoreProtocol(exclude_background=not background))
        self.background = background

    def add(self, pred: np.ndarray, gt: np.ndarray) -> None:
        """One image: (h, w) predicted ids (resized nearest to gt's size), (H, W) gt ids."""
        from .data import resize_mask

        super().add(resize_mask(pred, (gt.shape[1], gt.shape[0])), gt)  # pred (H, W)


def _short(layer: str) -> str:
    """``up_blocks.1.attentions.0.transformer_blocks.0.attn2`` -> ``up1.0.0 x``."""
    parts = layer.split(".")
    block = parts[0].replace("_blocks", "").replace("_block", "")
    if block == "mid":
        place = ".".join(parts[2:3] + parts[4:5])
    else:
        place = ".".join(parts[1:2] + parts[3:4] + parts[5:6])
    kind = "x" if parts[-1] == "attn2" else "s"
    return f"{block}{place} {kind}"


def render_report_png(report: Mapping[str, Any]) -> bytes:
    """A three-panel PNG of a report dict (see ``labeler.jobs.refine.report``).

    Panels: the students' training loss per step, the StableSeg++ fitting loss per step,
    and the learned against the uniform weight of every attention layer.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.patches import Patch

    stages = report.get("stages", {})
    figure = Figure(figsize=(15, 4.5), layout="constrained")
    FigureCanvasAgg(figure)
    ax_train, ax_fit, ax_weights = figure.subplots(1, 3, width_ratios=(1, 1, 1.6))

    for stage, title in (("plus", "StableSeg+"), ("plusplus", "StableSeg++")):
        train = stages.get(stage, {}).get("train") or {}
        if train.get("step_loss"):
            ax_train.plot(train["step_loss"], label=title)
    ax_train.set(title="student training loss", xlabel="step", ylabel="cross-entropy")
    if ax_train.lines:
        ax_train.legend()

    fit = stages.get("plusplus", {}).get("fit") or {}
    if fit.get("loss"):
        ax_fit.plot(fit["loss"], color="tab:green")
    ax_fit.set(title="StableSeg++ map-weight fit", xlabel="step", ylabel="cross-entropy")

    weights = stages.get("plusplus", {}).get("weights") or {}
    initial = stages.get("plusplus", {}).get("initial_weights") or {}
    names = list(weights)
    if names:
        positions = range(len(names))
        ax_weights.bar(
            [p - 0.2 for p in positions],
            [initial.get(n, 0.0) for n in names],
            width=0.4,
            color="lightgray",
        )
        colors = ["tab:blue" if n.endswith("attn2") else "tab:orange" for n in names]
        ax_weights.bar([p + 0.2 for p in positions], [weights[n] for n in names], 0.4, color=colors)
        ax_weights.set_xticks(list(positions), [_short(n) for n in names], rotation=90, fontsize=7)
        handles = [
            Patch(color="lightgray", label="uniform (StableSeg)"),
            Patch(color="tab:blue", label="learned, cross-attention"),
            Patch(color="tab:orange", label="learned, self-attention"),
        ]
        ax_weights.legend(handles=handles)
    ax_weights.set(title="weight by attention layer", ylabel="weight")

    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=100)
    return buffer.getvalue()
