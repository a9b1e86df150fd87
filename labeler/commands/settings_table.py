"""The table of every setting in ``docs/settings.md``, generated from the declarations.

``python -m labeler.commands.settings_table`` prints it; ``--write docs/settings.md`` puts it
between the page's ``<!-- settings-table:start -->`` and ``<!-- settings-table:end -->`` markers
(tests/test_settings.py checks that the page holds what this prints). ``--write
docs/security.md`` writes the backend's request limits (``ml_backend.limits.REQUEST_LIMITS``)
between ``<!-- limits-table:start -->`` and ``<!-- limits-table:end -->`` the same way, so
every default is written once, in its declaration. Not a command: it imports every command to
say which one takes which options.
"""

from __future__ import annotations

import argparse
import importlib
from collections.abc import Iterator, Sequence
from pathlib import Path

import click

START = "<!-- settings-table:start -->"
END = "<!-- settings-table:end -->"
LIMITS_START = "<!-- limits-table:start -->"
LIMITS_END = "<!-- limits-table:end -->"


def groups() -> tuple[type, ...]:
    """Every declared group, in the order the page lists them."""
    from labeler.jobs.pseudo_label_options import PseudoLabelOptions
    from labeler.jobs.refine_options import RefineOptions
    from labeler.model_settings import ModelSettings, ModelSpec, SegmenterConfig
    from labeler.train.trainer_settings import MapFitConfig, PseudoConfig, StudentConfig
    from ml_backend.backend_settings import BackendSettings
    from ml_backend.project import PredictOptions

    return (
        ModelSpec,
        SegmenterConfig,
        ModelSettings,
        PseudoLabelOptions,
        RefineOptions,
        PseudoConfig,
        StudentConfig,
        MapFitConfig,
        PredictOptions,
        BackendSettings,
    )


def commands() -> Iterator[tuple[str, click.Command]]:
    """(name, click command) of every command, subcommands of groups included."""
    from labeler.commands import COMMANDS

    for name, target in COMMANDS.items():
        module, attribute = target.split(":")
        command = getattr(importlib.import_module(module), attribute)
        if isinstance(command, click.Group):
            for sub, subcommand in sorted(command.commands.items()):
                yield f"{name} {sub}", subcommand
        else:
            yield name, command


def _takers() -> dict[type, list[str]]:
    """Declared class -> the commands that have options of its settings."""
    takers: dict[type, list[str]] = {}
    for name, command in commands():
        for param in command.params:
            setting = getattr(param, "setting", None)
            if setting is not None and name not in takers.setdefault(setting.owner, []):
                takers[setting.owner].append(name)
    return takers


def settings_markdown() -> str:
    """Every group's table, under a heading with the commands that take its options."""
    from labeler.settings import group_info, markdown_table

    takers = _takers()
    parts = []
    for group in groups():
        parts.append(f"### {group_info(group).title}\n")
        if takers.get(group):
            parts.append("Options of " + ", ".join(f"`{c}`" for c in takers[group]) + ".\n")
        parts.append(markdown_table(group))
    return "\n".join(parts)


def limits_markdown() -> str:
    """The backend's request limits: variable, default, what each bounds."""
    from labeler.settings import limits_table
    from ml_backend.backend_settings import BackendSettings
    from ml_backend.limits import REQUEST_LIMITS

    return limits_table(BackendSettings, REQUEST_LIMITS)


def with_table(page: str) -> str:
    """``page`` with the generated tables between their markers (the settings, the limits).

    Raises:
        ValueError: the page has neither pair of markers.
    """
    tables = ((START, END, settings_markdown), (LIMITS_START, LIMITS_END, limits_markdown))
    found = False
    for start, end, markdown in tables:
        if start in page and end in page:
            head, rest = page.split(start, 1)
            _, tail = rest.split(end, 1)
            page = f"{head}{start}\n\n{markdown()}\n{end}{tail}"
            found = True
    if not found:
        raise ValueError(f"the page has no {START} ... {END} or {LIMITS_START} ... markers")
    return page


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--write", type=Path, help="rewrite the table of this page in place")
    args = parser.parse_args(argv)
    if args.write is None:
        print(settings_markdown(), end="")
        return
    page = args.write.read_text(encoding="utf-8")
    args.write.write_text(with_table(page), encoding="utf-8")


if __name__ == "__main__":
    main()
