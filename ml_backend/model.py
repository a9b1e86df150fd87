"""The Label Studio ML backend model: StableSeg brush masks for the project's labels.

Label Studio builds this class for every ``/setup`` and the server builds it for every
``/predict``, so construction only parses the labeling config; the weights come from the
process-wide cache (:mod:`ml_backend.cache`). A prediction is exactly what ``cli.py
pseudo-label`` writes for the same image and labels: ``StableSeg.segment`` on the image opened
by ``labeler.images.open_image``, encoded by ``exporters.brush_results`` and
``exporters.prediction`` (:mod:`ml_backend.predictions`, shared with ``label-studio predict``).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from labeler.jobs.io import Failure

from . import cache, training
from ._lsml import LabelStudioMLBase
from .backend_settings import BackendSettings
from .fetch import DownloadBudget
from .images import ImageLoader
from .label_config import BrushTarget, LabelConfigError, parse_label_config
from .predictions import build_prediction, segment_tasks

if TYPE_CHECKING:
    from labeler import StableSeg

logger = logging.getLogger(__name__)

READ_WORKERS = 4
"""Threads reading one request's images (downloads have their own limits: ``ml_backend.fetch``)."""


@dataclass
class Outcome:
    """What one /predict produced: predictions aligned with the tasks, and the failures."""

    predictions: list[Any]
    errors: list[Failure]
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
        self.settings = settings or BackendSettings.from_env()
        self.target: BrushTarget | None = None
        self.config_error: str | None = None
        try:  # ours first: the base class's parser (lxml) never sees a config ours refuses
            self.target = parse_label_config(label_config, self.settings.max_labels)
        except LabelConfigError as err:
            self.config_error = str(err)
        try:
            accepted = label_config if self.config_error is None else None
            super().__init__(label_config=accepted, train_output=train_output, **kwargs)
        except Exception:  # the base class parses the XML too; ours has the say
            self.parsed_label_config = {}
            self.train_output = train_output or {}
            self.hostname = kwargs.get("hostname", "")
            self.access_token = kwargs.get("access_token", "")
        self.label_config = label_config

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

        The tasks go through the model stage (``labeler.jobs.stage``): ``READ_WORKERS``
        threads read the images a few batches ahead (so a request for thousands of tasks
        does not hold all their images in memory), StableSeg segments them in full batches
        while holding the GPU lock (a failing batch image by image), and each result is
        encoded as brush results. The model is loaded when the first image has been read: a
        request whose images all fail loads nothing. The downloads share one
        ``STABLESEG_DOWNLOAD_BUDGET``: a task it cuts off gets a failure naming it.
        """
        target = self.require_target()
        ids = [task_id(task, index) for index, task in enumerate(tasks)]
        budget = DownloadBudget(self.settings.download_budget, self.settings.max_downloads)
        loader = ImageLoader(self.settings, budget)  # never /setup's hostname or token
        outcome = Outcome(predictions=[[] for _ in tasks], errors=[], model_version="")
        opened: list[StableSeg] = []

        def open_model() -> StableSeg:  # called once, by the stage, on the first readable image
            opened.append(cache.get_segmenter(self.settings))
            return opened[0]

        for item in segment_tasks(
            range(len(tasks)),
            lambda index: (tasks[index], ids[index]),
            target,
            loader,
            open_model,
            READ_WORKERS,
        ):
            if item.error is not None:
                outcome.errors.append(Failure(ids[item.key], item.error, "task"))
            else:
                version = opened[0].model_version
                outcome.predictions[item.key] = build_prediction(item.result, target, version)
        outcome.model_version = opened[0].model_version if opened else self.model_version
        for error in outcome.errors:
            logger.warning("task %s gets no prediction: %s", error.item, error.reason)
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


def task_id(task: Any, index: int) -> Any:
    """The task's Label Studio id (its position in the request when it has none)."""
    return task.get("id", index) if isinstance(task, dict) else index
