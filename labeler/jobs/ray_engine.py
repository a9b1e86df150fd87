"""``pseudo-label --engine ray``: the labelling of a run spread over a Ray cluster (Ray Data).

The same three steps as the local engine (:mod:`labeler.jobs.pseudo_label`), each a Ray Data
operator, streaming, with Ray's backpressure between them:

    CPU tasks        the listing of pending images, in chunks of ``TASK_IMAGES``: decode
        |            (:func:`labeler.jobs.reading.read_image`) and bring to the model's input
        |            (:func:`labeler.jobs.stage.prepare_item`), so only the model input and
        |            the preview base travel on
    actor pool       each actor loads the model once (one GPU each when the cluster has
        |            GPUs), and segments its batches with the model stage's own batching
        |            (:func:`labeler.jobs.stage.segment_prepared`)
    CPU tasks        each image's files as the local writers make them
                     (:func:`labeler.jobs.writing.write_image`: mask PNG, export pieces,
                     preview, record last), written as soon as the image is done

The driver only counts what comes back (labelled, skipped and why) and, once the stream is
done, ``run`` assembles ``coco.json``, ``labelstudio.json`` and the rest from the per-image
pieces exactly as after a local run (:func:`labeler.jobs.exports.assemble_exports`): images
and annotations are numbered at assembly, in sorted order, so the ids equal the local
engine's. Resuming is the local rule: an image with a record is done and is not listed again.

Faults: Ray Data restarts an actor that dies (a killed process, a lost node) and runs its
batch again on another one; a task whose worker died is run again. Every file is written
atomically and an image's record comes last, so a batch written twice leaves the same files,
and the driver checks that every pending image came back once.

Where the files are: every node reads IMAGES_DIR and writes OUT_DIR by the same names: object
storage URLs (:mod:`labeler.jobs.storage`; each worker makes its own client, with the
credentials of its node), a shared file system, or on one machine its folders.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import math
import pickle
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from .extras import require_extra
from .io import Failure
from .pipeline import StageClock
from .pseudo_label_options import PseudoLabelOptions
from .reading import ReadPlan, read_image
from .stage import Prepared, Segmented, StageModel, prepare_item, segment_prepared
from .writing import WritePlan, write_image

log = logging.getLogger(__name__)

TASK_IMAGES = 32
"""Images a reading task, an actor call and a writing task handle (rounded up to whole model
batches): fewer, larger tasks cost Ray less scheduling per image, and a chunk's batches are
the local engine's (the same consecutive images)."""

READ_TASK_MEMORY = 256 * 2**20
"""Bytes a reading task declares to the scheduler: its decoded images (the reduced JPEG decode,
the model input and the preview base of each, a few MB at 512 px). Declaring it also keeps
Ray Data from fusing the reading into the model actors (their resources differ), so decoding
runs in tasks of its own beside the model."""


def require_ray() -> Any:
    """Ray with Ray Data (``ray``, ``ray.data`` imported), or
    :class:`~labeler.jobs.extras.MissingExtraError` with the install line (the ``ray`` extra:
    ``ray[data]``, which brings pyarrow)."""
    for module in ("ray", "pyarrow"):
        require_extra(module, "ray", "--engine ray")
    import ray
    import ray.data

    return ray


@dataclass(frozen=True)
class InputRule:
    """The model's input rule, known without its weights: what its ``prepare`` makes, for the
    reading tasks, which run where the model is not loaded.

    ``input_size`` is the model's square input side (StableSeg's ``--image-size``), or None for
    a model that takes images at any size (``--student``). Each actor checks that its model
    has the same ``input_size``.
    """

    input_size: int | None

    @classmethod
    def of(cls, options: PseudoLabelOptions) -> InputRule:
        return cls(None if options.student is not None else options.segmenter.image_size)

    def prepare(self, image: Any, size: tuple[int, int] | None = None) -> Any:
        """As ``StableSeg.prepare`` (a :class:`~labeler.images.PreparedImage` at the input
        side) or, for a model of any input size, the full-size RGB array."""
        from labeler.images import prepare_image, to_rgb_array

        if self.input_size is None:
            return to_rgb_array(image)
        return prepare_image(image, self.input_size, size)


# ---------------------------------------------------------------------------- the rows
# Each row carries one image: "path", "item" (the pickled stage item, Prepared and then
# Segmented: numpy arrays pickle as their bytes, protocol 5) and "extra" (the pickled pictures
# for the writers: the preview base, the full-size RGB for --crf), which the actors pass on
# without unpickling it.
def _pack(item: Any) -> bytes:
    return pickle.dumps(item, protocol=5)


def _split(item: Any) -> tuple[bytes, bytes]:
    """A stage item and its ``extra``, pickled apart."""
    extra, item.extra = item.extra, None
    return _pack(item), _pack(extra)


def _column(values: Sequence[Any]) -> np.ndarray:
    column = np.empty(len(values), dtype=object)
    column[:] = list(values)
    return column


def read_batch(batch: dict[str, np.ndarray], plan: ReadPlan, rule: InputRule) -> dict[str, Any]:
    """The reading tasks: each image of the listed chunks (a row each) decoded and brought to
    the model's input, a row each."""
    load = functools.partial(read_image, plan)
    paths = [str(path) for chunk in batch["paths"] for path in chunk]
    rows = [_split(prepare_item(Path(path), load, rule)) for path in paths]
    return {
        "path": _column(paths),
        "item": _column([item for item, _ in rows]),
        "extra": _column([extra for _, extra in rows]),
    }


class ModelActor:
    """One model of the actor pool: loaded once, when the actor starts.

    Args:
        load_model: returns the model (called in the actor's process, on its GPU if it has
            one).
        labels: the run's labels.
        input_size: what the reading tasks prepared for (:class:`InputRule`).
        return_probs: keep the model's probabilities for the writers (``--crf``).
    """

    def __init__(
        self,
        load_model: Callable[[], StageModel],
        labels: Sequence[str],
        input_size: int | None,
        return_probs: bool,
    ) -> None:
        self.model = load_model()
        if self.model.input_size != input_size:
            raise ValueError(
                f"the model takes inputs of side {self.model.input_size}, the readers prepared "
                f"{input_size}"
            )
        self.labels = list(labels)
        self.return_probs = return_probs
        self.clock = StageClock()

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, Any]:
        reads: list[Prepared[Path]] = [pickle.loads(data) for data in batch["item"]]
        extras = dict(zip(batch["path"], batch["extra"], strict=True))
        done: list[Segmented[Path]] = []
        for item in segment_prepared(
            reads, self.model, self.labels, return_probs=self.return_probs, clock=self.clock
        ):
            if not self.return_probs:
                item.result = None  # the writers need the mask, the scores and the pictures
            done.append(item)
        paths = [item.key.as_posix() for item in done]  # the stage's order
        return {
            "path": _column(paths),
            "item": _column([_pack(item) for item in done]),
            "extra": _column([extras[path] for path in paths]),
            "model_version": _column([self.model.model_version] * len(done)),
        }


def write_batch(batch: dict[str, np.ndarray], plan: WritePlan) -> dict[str, Any]:
    """The writing tasks: each image's files (see :func:`labeler.jobs.writing.write_image`);
    returns every image's path and error (empty when written)."""
    clock = StageClock()
    errors = []
    rows = zip(batch["item"], batch["extra"], batch["model_version"], strict=True)
    for data, extra, version in rows:
        item: Segmented[Path] = pickle.loads(data)
        if item.error is not None:
            errors.append(item.error)
            continue
        item.extra = pickle.loads(extra)
        write_image(dataclasses.replace(plan, model_version=str(version)), item, clock)
        errors.append("")
    return {"path": batch["path"], "error": _column(errors)}


# ---------------------------------------------------------------------------- the run
@dataclass(frozen=True)
class ActorPlan:
    """How many model actors, and what each reserves (``--ray-actor-cpus``)."""

    min_actors: int
    max_actors: int
    num_gpus: float
    num_cpus: float


def actor_plan(options: PseudoLabelOptions, cluster_gpus: float) -> ActorPlan:
    """One GPU per actor when the cluster has GPUs (and ``--device`` is not the CPU); the most
    actors: ``--ray-max-actors``, else one per GPU, else one."""
    device = options.model.device
    gpus = cluster_gpus >= 1 and (device is None or device.startswith("cuda"))
    default = max(1, int(cluster_gpus)) if gpus else 1
    most = options.ray_max_actors or max(default, options.ray_min_actors)
    return ActorPlan(
        min(options.ray_min_actors, most), most, 1.0 if gpus else 0.0, options.ray_actor_cpus
    )


def connect(address: str | None) -> bool:
    """Join the cluster at ``address`` (None: ``RAY_ADDRESS``, else start Ray on this
    machine), unless this process is connected already. Returns whether it connected here
    (and should disconnect when done)."""
    ray = require_ray()
    if ray.is_initialized():
        return False
    ray.init(address=address, logging_level=logging.WARNING, log_to_driver=False)
    return True


def label_with_ray(
    options: PseudoLabelOptions,
    pending: Sequence[Path],
    load_model: Callable[[], StageModel],
    on_progress: Callable[[int], None] | None = None,
) -> tuple[int, list[Failure]]:
    """Label ``pending`` images on the Ray cluster (see the module); returns (labelled count,
    skipped), as the local engine's ``label_images``.

    Args:
        load_model: how each actor gets its model (picklable: a module-level function or a
            ``functools.partial`` of one).
        on_progress: called with the number of images done, as they come back.

    Raises:
        RuntimeError: an image did not come back from the cluster (a rerun resumes).
    """
    ray = require_ray()
    started = connect(options.ray_address)
    try:
        context = ray.data.DataContext.get_current()
        context.enable_progress_bars = False  # the command shows its own
        plan = actor_plan(options, ray.cluster_resources().get("GPU", 0.0))
        dataset = _dataset(ray, options, pending, load_model, plan)
        labelled, skipped, seen = 0, [], set()
        for batch in dataset.iter_batches(batch_size=None, batch_format="numpy"):
            for path, error in zip(batch["path"], batch["error"], strict=True):
                path = str(path)
                if path in seen:  # a batch run twice after a fault: its files are the same
                    continue
                seen.add(path)
                if error:
                    skipped.append(Failure(path, str(error)))
                else:
                    labelled += 1
                if on_progress is not None:
                    on_progress(1)
        missing = len(pending) - len(seen)
        if missing:
            raise RuntimeError(
                f"{missing} images did not come back from the Ray cluster; rerun the command "
                "to label them (the run resumes)"
            )
        return labelled, skipped
    finally:
        if started:
            ray.shutdown()


def _dataset(
    ray: Any,
    options: PseudoLabelOptions,
    pending: Sequence[Path],
    load_model: Callable[[], StageModel],
    plan: ActorPlan,
) -> Any:
    """The Ray Data pipeline of the run: listing -> read tasks -> model actors -> write tasks."""
    rule = InputRule.of(options)
    batch_size = max(1, options.segmenter.batch_size)
    read_plan = ReadPlan.for_run(options, rule.input_size)
    write_plan = WritePlan.for_run(options, "")  # each image's version: its actor's
    # The listing in chunks of whole model batches, one block each: each actor call segments
    # one chunk, batched by the stage as the local engine batches (the same images together).
    task_images = batch_size * math.ceil(TASK_IMAGES / batch_size)
    names = [relative.as_posix() for relative in pending]
    chunks = [
        {"paths": names[start : start + task_images]} for start in range(0, len(names), task_images)
    ]
    dataset = ray.data.from_items(chunks, override_num_blocks=max(1, len(chunks)))
    dataset = dataset.map_batches(
        read_batch,
        fn_kwargs={"plan": read_plan, "rule": rule},
        batch_size=None,
        batch_format="numpy",
        num_cpus=1,
        memory=READ_TASK_MEMORY,
    )
    dataset = dataset.map_batches(
        ModelActor,
        fn_constructor_kwargs={
            "load_model": load_model,
            "labels": list(options.labels),
            "input_size": rule.input_size,
            "return_probs": options.crf,
        },
        batch_size=None,  # a whole chunk a call
        batch_format="numpy",
        compute=ray.data.ActorPoolStrategy(min_size=plan.min_actors, max_size=plan.max_actors),
        num_cpus=plan.num_cpus,
        num_gpus=plan.num_gpus,
    )
    return dataset.map_batches(
        write_batch,
        fn_kwargs={"plan": write_plan},
        batch_size=None,
        batch_format="numpy",
        num_cpus=1,
    )
