"""The refine job: StableSeg pseudo-masks -> StableSeg+ -> StableSeg++ on an unlabelled pool.

``labeler.jobs.refine_options`` (what a run is asked to do), ``files`` (the pool, per-image
labels, masks, ``run.json``), ``workdir`` (the work dir's layout and :class:`RefineRun`, what
every step gets), the steps (``first_stage``: StableSeg masks and the attention cache;
``cached_maps``: pseudo-masks from the cache; ``students``: train and predict; ``plusplus``: the
StableSeg++ weight fit and its exact pseudo-masks), ``steps`` (the table of steps: work,
outputs, scoring), ``run`` (the driver, resumable and distributed), ``report`` (report.json),
``threaded`` (a run in a background thread, for Label Studio's Start Training).

Imports run one way: ``refine_options``/``files`` <- ``workdir`` <- the steps <- ``steps`` <-
``report`` <- ``run`` <- ``threaded``.
"""

from __future__ import annotations

from ..refine_options import RefineOptions
from .files import PoolItem, RefineMismatchError, pool_from_folder
from .run import RefineResult, run_refine

__all__ = [
    "PoolItem",
    "RefineMismatchError",
    "RefineOptions",
    "RefineResult",
    "pool_from_folder",
    "run_refine",
]
