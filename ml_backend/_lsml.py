"""label-studio-ml's base class, imported without its side effect on multiprocessing.

Importing ``label_studio_ml.model`` (1.0.9) calls ``multiprocessing.set_start_method("spawn")``
for the whole process, for the job manager this backend does not use. That would change how
every other part of a process that imports the backend starts worker processes (data loaders,
the refine trainer, the test suite), so the previous start method is put back.
"""

from __future__ import annotations

import multiprocessing
from typing import Any


def _import_base() -> Any:
    before = multiprocessing.get_start_method(allow_none=True)
    try:
        from label_studio_ml.model import LabelStudioMLBase
    finally:
        multiprocessing.set_start_method(before, force=True)
    return LabelStudioMLBase


LabelStudioMLBase = _import_base()
