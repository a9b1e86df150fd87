"""Optional extras: a feature whose package is not installed fails at once, with the command
that installs it, before any work starts."""

from __future__ import annotations

import importlib.util


class MissingExtraError(RuntimeError):
    """A feature needs a package of an optional extra that is not installed."""


def require_extra(module: str, extra: str, feature: str) -> None:
    """Raise :class:`MissingExtraError` when ``module`` cannot be imported.

    Args:
        module: the top-level module the feature imports (``"datasets"``).
        extra: the project's extra that installs it (``"hf"``).
        feature: what needs it, as the user asked for it (``"--format hf"``).
    """
    if importlib.util.find_spec(module) is None:
        raise MissingExtraError(
            f"{feature} needs the {module!r} package, which is not installed: "
            f'pip install "stableseg-labeler[{extra}]" (from a checkout: '
            f'pip install -e ".[{extra}]")'
        )
