"""The model stage: read -> prepare -> batch -> segment -> global ids, for every product.

``pseudo-label``, ``benchmark``, ``refine`` (both of its StableSeg passes), ``label-studio
predict`` and the backend's ``/predict`` all do the same thing with a model: read many images,
bring each to the model's input, put them in full batches, segment, and map each mask from the
labels it was prompted with back to the run's label ids. :func:`segment_stream` is that loop,
once:

    reading threads   ``load(item)`` (decode; a consumer's own extras) and ``model.prepare``
        | at most ``batch_size + workers`` items ahead of the model
    calling thread    full batches of items that share a label subset, one ``segment`` call
        |             each; a batch that fails is retried image by image
    consumer          :class:`Segmented` items: the mask in global ids, every label's score

The caller owns files, network and threads of its own; this module owns the batching rule and
the model's batch size (``model.batch_size``, read here and nowhere else). Items come out in
input order when every item is prompted with every label; with per-item label subsets an item
waits for a full batch of its subset (or until ``max_waiting`` items are held), so items of a
rare subset may come out after later ones: consumers key their outputs by ``Segmented.key``.

The two halves are functions of their own, for engines that run them in other processes
(``pseudo-label --engine ray``: reading in CPU tasks, the model in an actor pool):
:func:`prepare_item` is the reading threads' step for one item, :func:`segment_prepared` the
calling thread's batching and segmenting of prepared items.

A model is anything with the :class:`StageModel` protocol: :class:`labeler.StableSeg`, or the
trained student of ``refine`` (``labeler.jobs.models``); or a function that returns one, called
when the first item that needs the model has been read (the backend loads its weights only for a
request with a readable image).
"""

from __future__ import annotations

import contextlib
import logging
import threading
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, Generic, Protocol, TypeVar, cast

import numpy as np

from labeler.images import ImageError
from labeler.result import BACKGROUND
from labeler.subsets import LabelSubset

from .pipeline import StageClock, ordered_map

log = logging.getLogger(__name__)

K = TypeVar("K")


class StageModel(Protocol):
    """What the stage needs of a model.

    ``input_size`` is the side of the model's square input, or None for a model that takes
    images at any size (then ``prepare`` returns the full-size image and readers decode at full
    size). ``prepare(image, size)`` runs in reading threads (``size``: the original's
    (width, height) when ``image`` is a reduced decode); ``segment`` on the calling thread.
    A model may also have ``segment_pending`` (same arguments, results with a ``finish()``):
    the stage then finishes each result outside ``model_lock`` (see :func:`segment_stream`).
    """

    model_version: str

    @property
    def batch_size(self) -> int: ...

    @property
    def input_size(self) -> int | None: ...

    def prepare(self, image: Any, size: tuple[int, int] | None = None) -> Any: ...

    def segment(self, images: Any, labels: Sequence[str], **kwargs: Any) -> list[Any]: ...


@dataclass
class Loaded:
    """What a consumer's ``load`` returns for one item (in a reading thread).

    Attributes:
        image: the decoded image (PIL image or array, any mode and size), handed to
            ``model.prepare`` in the same thread. None only with ``subset=()``.
        subset: 1-based ids of the labels this item is prompted with (ascending, unique); None
            for every label of the run; ``()`` for none: the item is not segmented and gets an
            all-background mask of ``size``.
        size: (width, height) of the original image when ``image`` is a reduced decode of it
            (the mask comes out at this size; see ``model.prepare``), and the size of the
            all-background mask of an item with ``subset=()``. None: the image's own size.
        extra: anything the consumer wants back with the result (ground truth, a preview
            picture, the path); the stage does not look at it.
    """

    image: Any = None
    subset: tuple[int, ...] | None = None
    size: tuple[int, int] | None = None
    extra: Any = None


@dataclass
class Segmented(Generic[K]):
    """One item out of the stage.

    Attributes:
        key: the item as the consumer gave it.
        mask: (H, W) uint8 over the run's labels (0 background, k = k-th label, 255 ignore);
            None when ``error`` is set.
        scores: every label of the run -> confidence (0.0 for a label it was not prompted with).
        result: the model's own result, over its prompted labels (``subset``'s, or all): for
            consumers that need probabilities, layer maps or evidence. None for ``subset=()``.
        subset: the prompted labels (``LabelSubset.every`` when all were).
        extra: the ``Loaded.extra`` of the item.
        error: why the item could not be segmented (unreadable image, failed segmentation).
    """

    key: K
    mask: np.ndarray | None = None
    scores: dict[str, float] = field(default_factory=dict)
    result: Any = None
    subset: LabelSubset | None = None
    extra: Any = None
    error: str | None = None


@dataclass
class Prepared(Generic[K]):
    """An item after its reading step (:func:`prepare_item`): brought to the model's input
    (``model_input``), or failed (``error``); what :func:`segment_prepared` batches."""

    key: K
    model_input: Any = None
    subset: tuple[int, ...] | None = None
    size: tuple[int, int] | None = None
    extra: Any = None
    error: str | None = None


def segment_stream(
    items: Iterable[K],
    load: Callable[[K], Loaded],
    model: StageModel | Callable[[], StageModel],
    labels: Sequence[str],
    *,
    workers: int,
    return_probs: bool = False,
    return_layer_maps: bool = False,
    model_lock: contextlib.AbstractContextManager[Any] | None = None,
    clock: StageClock | None = None,
    max_waiting: int | None = None,
) -> Iterator[Segmented[K]]:
    """Every item through the model, yielded as it is segmented (see the module).

    Args:
        items: what to read, in order (paths, dataset samples, tasks).
        load: item -> :class:`Loaded`, in a reading thread; raise
            :class:`~labeler.images.ImageError` (or ``ValueError``) for an item that cannot be
            used: it comes out with ``error`` set and the stream goes on.
        model: see :class:`StageModel`; ``model.batch_size`` images go into each call. Or a
            function returning the model (anything without ``segment``): called once, in a
            reading thread, when the first item that needs the model has been read, so a stream
            whose items all fail or need no model never loads one; an error it raises ends the
            stream. Until then the readers keep ``workers`` items ahead.
        labels: the run's labels (mask id k = ``labels[k - 1]``).
        workers: reading threads.
        return_probs, return_layer_maps: passed to ``segment``.
        model_lock: held around each ``segment`` call (the backend's GPU lock).
        clock: adds the CPU time of "read" and "model" (per item).
        max_waiting: the most prepared items held back waiting for a full batch of their
            subset (default ``4 * batch_size``); past it, the fullest waiting batch runs.
    """
    opened = _Opened(model)
    clock = clock or StageClock()

    def read(key: K) -> Prepared[K]:
        return prepare_item(key, load, opened, clock)

    def ahead() -> int:  # the model's batch size once it is open, and the readers
        return (_batch_size(opened.model) if opened.model is not None else 0) + workers

    reads = ordered_map(read, items, workers, ahead=ahead)
    with contextlib.closing(reads):  # on an error: stop the readers now, not when collected
        yield from segment_prepared(
            reads,
            opened,
            labels,
            return_probs=return_probs,
            return_layer_maps=return_layer_maps,
            model_lock=model_lock,
            clock=clock,
            max_waiting=max_waiting,
        )


def prepare_item(
    key: K,
    load: Callable[[K], Loaded],
    model: StageModel | Callable[[], StageModel],
    clock: StageClock | None = None,
) -> Prepared[K]:
    """One item's reading step: ``load(key)``, then ``model.prepare`` (see
    :func:`segment_stream`). An unreadable item comes back with ``error`` set.

    ``model`` needs only ``prepare`` here: the model, or (an engine that reads in other
    processes than the model's) an object with the model's input rule; or a function that
    returns one, called for each item that needs it (:func:`segment_stream` gives one that
    opens the model once).
    """
    clock = clock or StageClock()
    with clock.measure("read"):
        try:
            loaded = load(key)
        except (ImageError, ValueError) as err:
            return Prepared(key, error=str(err) or type(err).__name__)
        read = Prepared(key, subset=loaded.subset, size=loaded.size, extra=loaded.extra)
        if loaded.subset == ():
            return read
        ready = model() if not hasattr(model, "prepare") else model
        ready = cast(StageModel, ready)  # outside the try: a model that cannot load ends it
        try:
            read.model_input = ready.prepare(loaded.image, loaded.size)
        except (ImageError, ValueError) as err:
            return Prepared(key, error=str(err) or type(err).__name__)
        read.size = _size_of(read.model_input)
        return read


def segment_prepared(
    reads: Iterable[Prepared[K]],
    model: StageModel | Callable[[], StageModel],
    labels: Sequence[str],
    *,
    return_probs: bool = False,
    return_layer_maps: bool = False,
    model_lock: contextlib.AbstractContextManager[Any] | None = None,
    clock: StageClock | None = None,
    max_waiting: int | None = None,
) -> Iterator[Segmented[K]]:
    """Prepared items in full batches through the model, yielded as they are segmented: the
    calling thread's half of :func:`segment_stream` (its arguments); what is still waiting
    for a full batch runs when ``reads`` ends."""
    labels = list(labels)
    opened = model if isinstance(model, _Opened) else _Opened(model)
    clock = clock or StageClock()
    every = LabelSubset.every(len(labels)) if labels else None
    batch_size = _batch_size(opened.model) if opened.model is not None else 0

    def run(group: list[Prepared[K]]) -> list[Segmented[K]]:
        subset = every if group[0].subset is None else LabelSubset(group[0].subset)
        assert subset is not None
        names = subset.names(labels)
        inputs = [item.model_input for item in group]
        for item in group:
            item.model_input = None  # the batch holds them; nothing else needs them
        kwargs = {"return_probs": return_probs, "return_layer_maps": return_layer_maps}
        kwargs = {name: value for name, value in kwargs.items() if value}
        with clock.measure("model", len(group)):
            results = _segment_batch(opened(), inputs, names, kwargs, model_lock)
        return [
            _finish(item, result, subset, labels, every)
            for item, result in zip(group, results, strict=True)
        ]

    waiting: dict[tuple[int, ...] | None, list[Prepared[K]]] = {}
    held = 0
    for item in reads:
        if item.error is not None:
            yield Segmented(item.key, extra=item.extra, error=item.error)
            continue
        if item.subset == ():
            yield _background(item, labels)
            continue
        if not batch_size:  # a deferred model, opened for this item
            batch_size = _batch_size(opened())
        group = waiting.setdefault(item.subset, [])
        group.append(item)
        held += 1
        if len(group) >= batch_size:
            held -= len(group)
            yield from run(waiting.pop(item.subset))
        elif held > (max_waiting or 4 * batch_size):
            fullest = max(waiting, key=lambda subset: len(waiting[subset]))
            held -= len(waiting[fullest])
            yield from run(waiting.pop(fullest))
    for subset in list(waiting):
        yield from run(waiting.pop(subset))


def _batch_size(model: StageModel) -> int:
    """Images per ``segment`` call: the model's batch size (read here and nowhere else)."""
    return max(1, int(model.batch_size))


class _Opened:
    """The stream's model: the one given, or the one its function returns, called once (by
    whichever reading thread needs it first)."""

    def __init__(self, model: StageModel | Callable[[], StageModel]) -> None:
        self._lock = threading.Lock()
        self.model: StageModel | None = None
        self._open: Callable[[], StageModel] | None = None
        if hasattr(model, "segment"):
            self.model = cast(StageModel, model)
        else:
            self._open = cast(Callable[[], StageModel], model)

    def __call__(self) -> StageModel:
        if self.model is None:
            with self._lock:
                if self.model is None:
                    assert self._open is not None
                    self.model = self._open()
        return self.model


def queue_behind(model: StageModel, workers: int) -> int:
    """The bound of a queue behind the stage (a consumer's writer pool): one batch of results
    plus one per worker, so the model goes on to its next batch while ``workers`` threads
    write this one, and waits for them only when they are the bottleneck."""
    return _batch_size(model) + workers


def _segment_batch(
    model: StageModel,
    inputs: list[Any],
    names: list[str],
    kwargs: dict[str, Any],
    model_lock: contextlib.AbstractContextManager[Any] | None,
) -> list[Any]:
    """One ``segment`` call; when it fails, one call per image. A failed image's result is the
    error's text (a ``str``).

    A model with ``segment_pending`` (:class:`labeler.StableSeg`) does only its model part
    under ``model_lock``; each image's full-size finish runs after the lock is let go, so a
    large image's upsampling does not keep other requests from the model.
    """
    segment = getattr(model, "segment_pending", None) or model.segment
    lock = model_lock if model_lock is not None else contextlib.nullcontext()
    with lock:
        try:
            results = list(segment(inputs, names, **kwargs))
        except (ValueError, TypeError) as err:
            if len(inputs) == 1:
                return [f"segmentation failed: {err}"]
            log.warning("a batch failed (%s); segmenting its images one by one", err)
            results = []
            for model_input in inputs:
                try:
                    results.append(segment([model_input], names, **kwargs)[0])
                except (ValueError, TypeError) as err:
                    results.append(f"segmentation failed: {err}")
    return [_finished(result) for result in results]


def _finished(result: Any) -> Any:
    """A result, its pending finish done (outside the model lock); an error's text stays."""
    finish = getattr(result, "finish", None)
    if isinstance(result, str) or finish is None:
        return result
    try:
        return finish()
    except (ValueError, TypeError) as err:
        return f"segmentation failed: {err}"


def _finish(
    item: Prepared[K],
    result: Any,
    subset: LabelSubset,
    labels: list[str],
    every: LabelSubset | None,
) -> Segmented[K]:
    """A model result -> the stage's item, mask in the run's ids."""
    if isinstance(result, str):
        return Segmented(item.key, subset=subset, extra=item.extra, error=result)
    mask = result.mask if subset == every else subset.to_global(result.mask)
    scores = dict.fromkeys(labels, 0.0)
    scores.update(result.scores)
    return Segmented(item.key, mask, scores, result, subset, item.extra)


def _background(item: Prepared[K], labels: list[str]) -> Segmented[K]:
    """An item prompted with no label: all background, every score 0."""
    if item.size is None:
        raise ValueError("Loaded(subset=()) needs the mask's size")
    width, height = item.size
    mask = np.full((height, width), BACKGROUND, np.uint8)
    return Segmented(item.key, mask, dict.fromkeys(labels, 0.0), None, None, item.extra)


def _size_of(model_input: Any) -> tuple[int, int]:
    """(width, height) of the image a prepared model input stands for."""
    size = getattr(model_input, "size", None)
    if isinstance(size, tuple):
        return size  # PreparedImage, PIL image
    height, width = np.asarray(model_input).shape[:2]
    return width, height
