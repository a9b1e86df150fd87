"""Options and helpers shared by the commands. Imports only click and the standard library."""

from __future__ import annotations

import functools
import logging
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import click

_SETTINGS_META = "stableseg.settings"


class _SettingType(click.ParamType):
    """A click type that parses with a settings-table row (labeler.settings)."""

    def __init__(self, setting: Any) -> None:
        self.setting = setting
        self.name = setting.metavar

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> Any:
        if not isinstance(value, str):
            return value
        try:
            return self.setting.parse(value)
        except ValueError as err:
            self.fail(str(err), param, ctx)


def _option_for(setting: Any) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """One click option for one row of the settings table, storing into ``ctx.meta``."""

    def remember(ctx: click.Context, param: click.Parameter, value: Any) -> Any:
        if value is not None:
            ctx.meta.setdefault(_SETTINGS_META, {})[setting.name] = value
        return value

    default = setting.default()
    if setting.flag:
        on = setting.option if default else f"--no-{setting.name}"
        shown = f"  [default: {on}]" if setting.negatable else ""
    elif default is None or "[default:" in setting.help:
        shown = ""
    else:
        shown = f"  [default: {default}]"
    common: dict[str, Any] = {
        "default": None,
        "expose_value": False,
        "callback": remember,
        "help": setting.help + shown,
    }
    if setting.flag and setting.negatable:
        return click.option(f"{setting.option}/--no-{setting.name}", **common)
    if setting.flag:
        return click.option(setting.option, is_flag=True, flag_value=True, **common)
    if setting.choices:
        return click.option(
            setting.option, type=click.Choice(setting.choices, case_sensitive=False), **common
        )
    return click.option(setting.option, type=_SettingType(setting), **common)


def segmenter_options(func: Callable[..., Any] | None = None, *, environment: bool = False) -> Any:
    """Every model and segmenter setting (``labeler.settings.SETTINGS``) as an option.

    The command receives them as one ``settings`` argument, a ``labeler.settings.ModelSettings``
    built (and validated: a bad combination is a usage error, exit 2) before the command runs.
    With ``environment`` an option not given on the command line falls back to its
    ``STABLESEG_*`` variable (``serve``, whose workers read the same variables).
    Use as ``@segmenter_options`` or ``@segmenter_options(environment=True)``.
    """
    if func is None:
        return functools.partial(segmenter_options, environment=environment)
    from labeler.settings import SETTINGS

    @functools.wraps(func)
    def with_settings(*args: Any, **kwargs: Any) -> Any:
        from labeler.settings import build_settings, parse_setting, settings_values_from_env

        ctx = click.get_current_context()
        given = dict(ctx.meta.get(_SETTINGS_META, {}))
        if given.get("dtype") is not None:
            given["dtype"] = parse_setting("dtype", given["dtype"])
        try:
            values = settings_values_from_env() if environment else {}
            values.update(given)
            settings = build_settings(values)
        except ValueError as err:
            raise click.UsageError(str(err)) from None
        return func(*args, settings=settings, **kwargs)

    for setting in reversed(SETTINGS):
        with_settings = _option_for(setting)(with_settings)
    return with_settings


def parse_labels(labels: str | None, labels_file: Path | None) -> list[str]:
    """--labels "a,b" or --labels-file: exactly one of them, validated (labeler.labels)."""
    from labeler.labels import parse_labels_file, split_labels, validate_labels

    if (labels is None) == (labels_file is None):
        raise click.UsageError("give the label names with exactly one of --labels or --labels-file")
    try:
        if labels is not None:
            return validate_labels(split_labels(labels))
        assert labels_file is not None
        lines = labels_file.read_text(encoding="utf-8-sig").splitlines()
        return parse_labels_file(lines, str(labels_file))
    except ValueError as err:
        hint = "--labels" if labels is not None else "--labels-file"
        raise click.BadParameter(str(err), param_hint=hint) from None
    except UnicodeDecodeError as err:
        raise click.BadParameter(
            f"{labels_file} is not UTF-8 text: {err}", param_hint="--labels-file"
        ) from None


def check_model_source(source: str) -> None:
    """--model as a local diffusers folder or a hub id, before anything loads (a usage error
    otherwise: :func:`labeler.jobs.models.resolve_source`)."""
    from labeler.jobs.models import resolve_source

    try:
        resolve_source(source)
    except ValueError as err:
        raise click.BadParameter(str(err), param_hint="--model") from None


def labels_options(func: Callable[..., Any]) -> Callable[..., Any]:
    """--labels and --labels-file."""
    func = click.option(
        "--labels-file",
        type=click.Path(exists=True, dir_okay=False, path_type=Path),
        help="UTF-8 text file, one label name per line; blank lines and lines starting with # "
        "are skipped (a label cannot start with #).",
    )(func)
    func = click.option(
        "--labels",
        help='Comma-separated label names, e.g. "cat,dog,person"; mask value k is the k-th. '
        "Whitespace is collapsed; invisible characters are refused; at most 254.",
    )(func)
    return func


def setup_logging(verbose: bool = False) -> None:
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    for noisy in ("PIL", "urllib3", "filelock", "httpx"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    # The hub client logs each retry of an unreachable host; the final error says it all.
    logging.getLogger("huggingface_hub").setLevel(logging.ERROR)


def progress_bar(desc: str, unit: str = "img") -> Callable[[int, int], Any]:
    """A factory for tqdm bars on stderr: images/s and time left."""

    def make(total: int, initial: int) -> Any:
        from tqdm.auto import tqdm

        return tqdm(
            total=total, initial=initial, desc=desc, unit=unit, dynamic_ncols=True, file=sys.stderr
        )

    return make
