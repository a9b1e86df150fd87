"""A task's image and a result's prediction: what the backend's ``/predict`` and ``stableseg
label-studio predict`` share, so their predictions are the same, byte for byte, for the same
settings.

Kept apart from :mod:`ml_backend.model` (Label Studio's model class, which imports
label-studio-ml and torch) so ``label-studio predict`` reports a usage error without loading
either.
"""

from __future__ import annotations

from typing import Any

from PIL import Image

from exporters import brush_prediction
from labeler.images import ImageError

from .images import ImageLoader
from .label_config import BrushTarget


def load_task_image(
    task: Any, task_id: Any, target: BrushTarget, loader: ImageLoader
) -> Image.Image:
    """The decoded image of one task, read from its ``$`` field by ``loader``.

    Raises:
        ImageError: no data, no such field, or an image that cannot be read (see ImageLoader).
    """
    if not isinstance(task, dict) or not isinstance(task.get("data"), dict):
        raise ImageError("task has no 'data' object")
    if target.data_key not in task["data"]:
        raise ImageError(
            f"task data has no {target.data_key!r} field (the <Image> tag reads "
            f"${target.data_key}); its fields are {sorted(task['data'])}"
        )
    number = task_id if isinstance(task_id, int) else None
    return loader.load(task["data"][target.data_key], number)


def build_prediction(result: Any, target: BrushTarget, version: str) -> dict[str, Any]:
    """The Label Studio prediction of one SegmentationResult: brush results under the labels'
    values, each with its label's score, and the task score (``exporters.task_score``)."""
    labels = list(target.labels)
    scores = {
        label: result.scores[prompt]
        for label, prompt in zip(labels, target.prompts, strict=True)
        if prompt in result.scores
    }
    return brush_prediction(result.mask, labels, scores, version, target.from_name, target.to_name)
