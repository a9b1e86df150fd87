"""A task's image and a result's prediction: what the backend's ``/predict`` and ``stableseg
label-studio predict`` share, so their predictions are the same, byte for byte, for the same
settings.

Kept apart from :mod:`ml_backend.model` (Label Studio's model class, which imports
label-studio-ml and torch) so ``label-studio predict`` reports a usage error without loading
either.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from typing import Any, TypeVar

from PIL import Image

from exporters import brush_prediction, id_counts, mask_objects, polygon_prediction
from labeler.images import ImageError
from labeler.jobs.stage import Loaded, Segmented, StageModel, segment_stream

from . import cache
from .images import ImageLoader
from .label_config import BrushTarget

K = TypeVar("K")


def load_task_image(
    task: Any, task_id: Any, target: BrushTarget, loader: ImageLoader
) -> tuple[Image.Image, Any]:
    """The image of one task, read from its ``$`` field by ``loader`` and decoded for the
    model (:meth:`ImageLoader.load_for_model`), and its full (width, height).

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
    return loader.load_for_model(task["data"][target.data_key], number)


def segment_tasks(
    keys: Iterable[K],
    task_of: Callable[[K], tuple[Any, Any]],
    target: BrushTarget,
    loader: ImageLoader,
    model: StageModel | Callable[[], StageModel],
    workers: int,
) -> Iterator[Segmented[K]]:
    """Each task's image, read by ``loader``, through the model stage with the project's prompts.

    ``task_of(key)`` gives the task (a dict with its ``data``) and its id. ``workers`` threads
    read the images ahead of the model; ``model.batch_size`` images go into each ``segment``
    call under the backend's GPU lock, a failing batch image by image. ``model`` may be a
    function that loads it on the first readable image (see :func:`segment_stream`). Every
    task is prompted with the same labels, so they come out in order, but for one whose image
    cannot be read: it comes out with its ``error`` at once.
    """

    def load(key: K) -> Loaded:
        task, task_id = task_of(key)
        image, size = load_task_image(task, task_id, target, loader)
        return Loaded(image, size=size)

    return segment_stream(
        keys, load, model, target.prompts, workers=workers, model_lock=cache.GPU_LOCK
    )


def build_prediction(result: Any, target: BrushTarget, version: str) -> dict[str, Any]:
    """The Label Studio prediction of one SegmentationResult under the labels' values, each
    result with its label's score, and the task score (``exporters.task_score``): brush
    results (one per label), or for a PolygonLabels target polygon results (one per object,
    :mod:`exporters.polygons` with its default minimum area and tolerance)."""
    labels = list(target.labels)
    scores = {
        label: result.scores[prompt]
        for label, prompt in zip(labels, target.prompts, strict=True)
        if prompt in result.scores
    }
    if target.kind == "polygonlabels":
        counts = id_counts(result.mask)
        present = [k for k in range(1, len(labels) + 1) if k < counts.size and counts[k]]
        objects = mask_objects(result.mask, present)
        return polygon_prediction(
            result.mask,
            objects,
            labels,
            scores,
            version,
            target.from_name,
            target.to_name,
            counts=counts,
        )
    return brush_prediction(result.mask, labels, scores, version, target.from_name, target.to_name)
