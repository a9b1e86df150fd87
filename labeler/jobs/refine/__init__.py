"""The refine job: StableSeg pseudo-masks -> StableSeg+ -> StableSeg++ on an unlabelled pool.

``labeler.jobs.refine_options`` (what a run is asked to do), ``steps`` (the table of steps:
work, outputs, scoring), ``plusplus`` (the StableSeg++ steps: the weight fit and its exact
pseudo-masks), ``run`` (the driver, resumable and distributed), ``report`` (report.json),
``files`` (the pool, per-image labels, masks, ``run.json``), ``background`` (runs in a thread,
for Label Studio's Start Training).
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
