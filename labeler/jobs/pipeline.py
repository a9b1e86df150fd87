"""A bounded pipeline of thread pools: readers ahead of one consumer, writers behind it.

Bulk jobs read many files, run a model on one thread, and write many files. Two primitives
keep memory independent of the number of inputs while every stage stays busy:

* :func:`ordered_map`: ``fn`` over the items in a pool of threads, results in input order, with
  at most ``ahead`` results computed (or being computed) that the consumer has not taken yet;
* :class:`WriterPool`: tasks run in a pool of threads; :meth:`WriterPool.submit` blocks while
  ``max_pending`` tasks are queued or running, so the producer waits for the writers only when
  they are the bottleneck, and the first error of a task is raised in the producer.

The heavy work of each stage (image decoding and resizing, zlib, numpy) releases the GIL, so
threads run it in parallel. :class:`StageClock` adds up the CPU time of named stages across
threads (the benchmark prints it), and :class:`Backlog` tracks how many items a stage holds.
"""

from __future__ import annotations

import contextlib
import os
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, TypeVar

T = TypeVar("T")
R = TypeVar("R")

MAX_DEFAULT_WORKERS = 16


def default_workers() -> int:
    """Threads per pool when ``--workers`` is not given: the CPUs this process may use
    (``os.sched_getaffinity``), shared by the processes of a ``torchrun`` node, at most 16."""
    try:
        cpus = len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - macOS, Windows
        cpus = os.cpu_count() or 1
    per_node = max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1")))
    return max(1, min(MAX_DEFAULT_WORKERS, cpus // per_node))


class Backlog:
    """A thread-safe count of items held by a stage, with its high-water mark."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.current = 0
        self.peak = 0

    def add(self, n: int = 1) -> None:
        with self._lock:
            self.current += n
            self.peak = max(self.peak, self.current)

    def remove(self, n: int = 1) -> None:
        with self._lock:
            self.current -= n


class StageClock:
    """CPU seconds (``time.thread_time``), wall seconds and item counts of named stages, added
    up across threads."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.cpu: dict[str, float] = {}
        self.wall: dict[str, float] = {}
        self.count: dict[str, int] = {}

    @contextlib.contextmanager
    def measure(self, stage: str, items: int = 1) -> Iterator[None]:
        """Time the block on this thread's CPU clock and the wall clock, and count ``items``
        for ``stage``."""
        start, wall_start = time.thread_time(), time.perf_counter()
        try:
            yield
        finally:
            spent, wall = time.thread_time() - start, time.perf_counter() - wall_start
            with self._lock:
                self.cpu[stage] = self.cpu.get(stage, 0.0) + spent
                self.wall[stage] = self.wall.get(stage, 0.0) + wall
                self.count[stage] = self.count.get(stage, 0) + items

    def cpu_ms_per_item(self) -> dict[str, float]:
        """Stage -> CPU milliseconds per item it handled."""
        with self._lock:
            return {
                stage: 1000.0 * seconds / max(1, self.count[stage])
                for stage, seconds in self.cpu.items()
            }


def ordered_map(
    fn: Callable[[T], R],
    items: Iterable[T],
    workers: int,
    ahead: int | Callable[[], int],
) -> Iterator[R]:
    """``fn(item)`` for every item, computed by ``workers`` threads, yielded in input order.

    At most ``ahead`` items are submitted and not yet yielded: a slow consumer stops the
    workers instead of letting finished results pile up. ``ahead`` may be a function, asked
    again at each refill: a window that grows once the consumer knows more (the model stage's
    batch size, known when its model is loaded).

    An exception raised by ``fn`` is raised here when its item's turn comes. When the consumer
    stops early (closes the generator, or raises), queued items are cancelled and running ones
    are waited for.
    """
    window = ahead if callable(ahead) else lambda: ahead
    if workers < 1 or window() < 1:
        raise ValueError(f"ordered_map: workers and ahead must be >= 1, got {workers}, {window()}")

    source = iter(items)
    pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="reader")
    pending: deque[Future[R]] = deque()
    try:
        for item in source:
            pending.append(pool.submit(fn, item))
            if len(pending) >= window():
                break
        while pending:
            result = pending.popleft().result()
            for item in source:  # refill the slot the consumer is about to take (more if grown)
                pending.append(pool.submit(fn, item))
                if len(pending) >= window():
                    break
            yield result
    finally:
        for future in pending:
            future.cancel()
        pool.shutdown(wait=True, cancel_futures=True)


class WriterPool:
    """Run tasks in ``workers`` threads, with at most ``max_pending`` queued or running.

    Use as a context manager: leaving the block waits for every task, and raises the first
    error a task raised (if the block itself did not raise). :meth:`submit` raises it too, as
    soon as it is known, so the producer stops early.
    """

    def __init__(self, workers: int, max_pending: int, backlog: Backlog | None = None) -> None:
        if workers < 1 or max_pending < 1:
            raise ValueError(
                f"WriterPool: workers and max_pending must be >= 1, got {workers}, {max_pending}"
            )
        self._pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="writer")
        self._slots = threading.BoundedSemaphore(max_pending)
        self._lock = threading.Lock()
        self._error: BaseException | None = None
        self.backlog = backlog or Backlog()

    def submit(self, fn: Callable[..., Any], *args: Any) -> None:
        """Queue ``fn(*args)``; blocks while ``max_pending`` tasks are queued or running."""
        self._raise_error()
        self._slots.acquire()
        self.backlog.add()
        try:
            future = self._pool.submit(fn, *args)
        except BaseException:
            self._release(None)
            raise
        future.add_done_callback(self._release)

    def _release(self, future: Future[Any] | None) -> None:
        if future is not None and not future.cancelled() and future.exception() is not None:
            with self._lock:
                self._error = self._error or future.exception()
        self.backlog.remove()
        self._slots.release()

    def _raise_error(self) -> None:
        with self._lock:
            error = self._error
        if error is not None:
            raise error

    def close(self) -> None:
        """Wait for every queued task; raise the first error one raised."""
        self._pool.shutdown(wait=True)
        self._raise_error()

    def __enter__(self) -> WriterPool:
        return self

    def __exit__(self, kind: Any, value: Any, traceback: Any) -> None:
        if kind is None:
            self.close()
        else:  # already failing: finish what runs (each file is written atomically), no more
            self._pool.shutdown(wait=True, cancel_futures=True)
