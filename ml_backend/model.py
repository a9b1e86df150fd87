"""The Label Studio ML backend model: StableSeg brush masks for the project's labels.

Label Studio builds this class for every ``/setup`` and the server builds it for every
``/predict``, so construction only parses the labeling config; the weights come from the
process-wide cache (:mod:`ml_backend.cache`). A prediction is exactly what ``cli.py
pseudo-label`` writes for the same image and labels: ``StableSeg.segment`` on the image opened
by ``labeler.images.open_image``, encoded by ``exporters.brush_results`` and
``exporters.prediction``.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from PIL import Image

from labeler.images import ImageError

from . import cache, training
from ._lsml import LabelStudioMLBase
from .backend_settings import BackendSettings
from .images import ImageLoader
from .label_config import BrushTarget, LabelConfigError, parse_label_config

logger = logging.getLogger(__name__)


MIN_TASKS_PER_CHUNK = 16


@dataclass(frozen=True)
class TaskError:
    """A task that got no prediction, and why."""

    task: Any
    reason: str

    def to_dict(self) -> dict[str, Any]:
        return {"task": self.task, "reason": self.reason}


@dataclass
class Outcome:
    """What one /predict produced: predictions aligned with the tasks, and the failures."""

    predictions: list[Any]
    errors: list[TaskError]
    model_version: str


class StableSegBackend(LabelStudioMLBase):
    """Pre-annotates image tasks with one ``brushlabels`` result per label StableSeg finds."""

    def __init__(
        self,
        label_config: str | None = None,
        train_output: dict[str, Any] | None = None,
        settings: BackendSettings | None = None,
        **kwargs: Any,
    ) -> None:
        try:
            super().__init__(label_config=label_config, train_output=train_output, **kwargs)
        except Exception:  # the base class parses the XML too; ours reports the error below
            self.label_config, self.parsed_label_config = label_config, {}
            self.train_output = train_output or {}
            self.hostname = kwargs.get("hostname", "")
            self.access_token = kwargs.get("access_token", "")
        self.settings = settings or BackendSettings.from_env()
        self.target: BrushTarget | None = None
        self.config_error: str | None = None
        try:
            self.target = parse_label_config(label_config, self.settings.max_labels)
        except LabelConfigError as err:
            self.config_error = str(err)

    # ------------------------------------------------------------------ Label Studio hooks
    @property
    def model_version(self) -> str:
        """Changes with the model, its configuration and learned weights."""
        return cache.model_version(self.settings)

    def require_target(self) -> BrushTarget:
        """The BrushLabels target, or the config error (logged) as a :class:`LabelConfigError`."""
        if self.target is None:
            logger.error("cannot predict: %s", self.config_error)
            raise LabelConfigError(self.config_error or "no labeling config")
        return self.target

    def predict(self, tasks: Sequence[dict[str, Any]], **kwargs: Any) -> list[Any]:
        """One prediction per task, in order; ``[]`` (no prediction) for a task that failed."""
        return self.predict_tasks(tasks).predictions

    def predict_tasks(self, tasks: Sequence[dict[str, Any]]) -> Outcome:
        """Predictions aligned with ``tasks``, and the reasons of the tasks left without one.

        Steps, a chunk of tasks at a time (so a request for thousands of tasks does not hold
        all their images in memory): load the images, run them through StableSeg in UNet
        batches while holding the GPU lock, encode brush results.
        """
        target = self.require_target()
        ids = [_task_id(task, index) for index, task in enumerate(tasks)]
        loader = ImageLoader(self.settings)  # never /setup's hostname or token
        outcome = Outcome(predictions=[[] for _ in tasks], errors=[], model_version="")
        segmenter = None
        step = self._tasks_per_chunk()
        for start in range(0, len(tasks), step):
            indices = range(start, min(start + step, len(tasks)))
            images = self._load_images(tasks, ids, indices, target, loader, outcome.errors)
            if not images:
                continue
            segmenter = segmenter or cache.get_segmenter(self.settings)
            results = segment_images(segmenter, images, ids, target, outcome.errors)
            for index, result in results.items():
                outcome.predictions[index] = build_prediction(
                    result, target, segmenter.model_version
                )
        outcome.model_version = (
            segmenter.model_version if segmenter is not None else self.model_version
        )
        for error in outcome.errors:
            logger.warning("task %s gets no prediction: %s", error.task, error.reason)
        return outcome

    def start_training(self, project_id: int) -> tuple[int, dict[str, Any]]:
        """``START_TRAINING``: run ``refine`` on the project's images, listed through Label
        Studio (one run at a time); the HTTP status and the reply."""
        try:
            target = self.require_target()
        except LabelConfigError as err:
            return 400, {"status": "error", "project": project_id, "detail": str(err)}
        loader = ImageLoader(self.settings)  # never /setup's hostname or token
        return training.start_training(project_id, target, self.settings, loader)

    # ------------------------------------------------------------------ steps
    def _tasks_per_chunk(self) -> int:
        return max(MIN_TASKS_PER_CHUNK, 4 * self.settings.stableseg.segmenter.batch_size)

    def _load_images(
        self,
        tasks: Sequence[Any],
        ids: list[Any],
        indices: range,
        target: BrushTarget,
        loader: ImageLoader,
        errors: list[TaskError],
    ) -> dict[int, Image.Image]:
        """Task index -> decoded image, for the tasks whose image can be used."""
        images: dict[int, Image.Image] = {}
        for index in indices:
            try:
                images[index] = load_task_image(tasks[index], ids[index], target, loader)
            except ImageError as err:
                errors.append(TaskError(ids[index], str(err)))
        return images


# ---------------------------------------------------------------------- shared with the CLI
# ``stableseg label-studio predict`` segments and encodes with these, so its predictions are the
# backend's, byte for byte, for the same settings.
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


def segment_images(
    segmenter: Any,
    images: dict[int, Image.Image],
    ids: list[Any],
    target: BrushTarget,
    errors: list[TaskError],
) -> dict[int, Any]:
    """Task index -> SegmentationResult: one ``segment`` call, image by image if it fails."""
    order = sorted(images)
    prompts = list(target.prompts)
    with cache.GPU_LOCK:
        try:
            results = segmenter.segment([images[i] for i in order], prompts)
            return dict(zip(order, results, strict=True))
        except (ValueError, TypeError) as err:
            logger.warning("batch failed (%s); segmenting the images one by one", err)
        found = {}
        for index in order:
            try:
                found[index] = segmenter.segment([images[index]], prompts)[0]
            except (ValueError, TypeError) as err:
                errors.append(TaskError(ids[index], f"segmentation failed: {err}"))
        return found


def build_prediction(result: Any, target: BrushTarget, version: str) -> dict[str, Any]:
    """The Label Studio prediction of one SegmentationResult: brush results under the labels'
    values, each with its label's score, and the task score (``exporters.task_score``)."""
    from exporters import brush_prediction

    labels = list(target.labels)
    scores = {
        label: result.scores[prompt]
        for label, prompt in zip(labels, target.prompts, strict=True)
        if prompt in result.scores
    }
    return brush_prediction(result.mask, labels, scores, version, target.from_name, target.to_name)


def _task_id(task: Any, index: int) -> Any:
    """The task's Label Studio id (its position in the request when it has none)."""
    return task.get("id", index) if isinstance(task, dict) else index
