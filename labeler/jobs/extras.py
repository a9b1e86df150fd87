"""Optional parts of the install (``pip install "stableseg-labeler[EXTRA]"``): imported when a
run asks for them, and a clear error at once, with the install line, when they are missing."""

from __future__ import annotations

import importlib
from types import ModuleType

from .storage import MissingExtraError

PACKAGE = "stableseg-labeler"


def install_hint(extra: str) -> str:
    """The commands that add ``extra`` to an install (a release, or a checkout)."""
    return f'pip install "{PACKAGE}[{extra}]"  (from a checkout: pip install -e ".[{extra}]")'


def require(module: str, extra: str, wanted_by: str) -> ModuleType:
    """Import ``module`` of the optional ``extra``.

    Args:
        wanted_by: what needs it, for the message (``"--engine ray"``).

    Raises:
        MissingExtraError: (:mod:`labeler.jobs.storage`'s, a ``ValueError`` too: the
            commands report it as a bad value) the module cannot be imported; says which extra
            installs it.
    """
    try:
        return importlib.import_module(module)
    except ImportError as err:
        raise MissingExtraError(
            f"{wanted_by} needs the optional '{extra}' dependencies ({module} cannot be "
            f"imported: {err}). Install them with: {install_hint(extra)}"
        ) from None
