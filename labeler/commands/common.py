"""Options and helpers shared by the commands: the options generated from the settings
declarations (:mod:`labeler.settings`), labels, logging, progress bars. Imports click, the
standard library and the declarations (no torch)."""

from __future__ import annotations

import functools
import logging
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import click

_GIVEN = "stableseg.settings"
"""``ctx.meta`` key: the settings given on the command line, {group class: {name: value}}."""


class _SettingType(click.ParamType):
    """Text -> value with a setting's own parser (labeler.settings)."""

    def __init__(self, declaration: Any) -> None:
        self.declaration = declaration
        self.name = declaration.metavar

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> Any:
        if not isinstance(value, str):
            return value
        try:
            return self.declaration.parse(value)
        except ValueError as err:
            self.fail(str(err), param, ctx)


class Location(click.ParamType):
    """A folder on this machine (it must exist) or an object storage URL (``s3://``, ``gs://``,
    ``az://``, ``https://``): a :data:`labeler.jobs.storage.Location`. A URL whose client is not
    installed is a usage error with the install hint."""

    name = "DIR|URL"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> Any:
        from labeler.jobs.storage import parse_location

        if not isinstance(value, str):
            return value
        try:
            location = parse_location(value)
        except ValueError as err:
            self.fail(str(err), param, ctx)
        if isinstance(location, Path) and not location.is_dir():
            self.fail(
                f"{value!r} is not a folder (nor an s3://, gs://, az:// or https:// URL)",
                param,
                ctx,
            )
        return location


class _SettingChoice(click.Choice):
    """One of a setting's choices, then its parser (``--encoder-weights none`` -> None)."""

    def __init__(self, declaration: Any) -> None:
        super().__init__(declaration.choices, case_sensitive=False)
        self.declaration = declaration

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> Any:
        chosen = super().convert(value, param, ctx)
        try:
            return self.declaration.parse(chosen)
        except ValueError as err:
            self.fail(str(err), param, ctx)


def _options_for(
    group: type, item: Any, environment: bool
) -> list[Callable[[Callable[..., Any]], Any]]:
    """The click option of one declared setting (and a hidden one per deprecated flag), storing
    what the command line gives into ``ctx.meta``; the click parameter keeps a reference to the
    setting and its group (``param.setting``, ``param.settings_group``: the docs table and the
    tests read them)."""
    from click.core import ParameterSource

    from labeler.settings import deprecation

    declaration = item.declaration

    def remember(old: str | None) -> Callable[[click.Context, click.Parameter, Any], Any]:
        def store(ctx: click.Context, param: click.Parameter, value: Any) -> Any:
            if ctx.get_parameter_source(param.name or "") is not ParameterSource.COMMANDLINE:
                return value
            if old is not None:
                click.echo(f"Warning: {deprecation(old, item.flag)}", err=True)
            ctx.meta.setdefault(_GIVEN, {}).setdefault(group, {})[item.name] = value
            return value

        return store

    def option(flag: str, old: str | None) -> Callable[[Callable[..., Any]], Any]:
        name = f"{group.__name__}__{item.name}" + ("__old" if old else "")
        common: dict[str, Any] = {
            "default": None,
            "expose_value": False,
            "callback": remember(old),
            "help": item.help_text(variable=environment) if old is None else "",
            "hidden": old is not None,
            "multiple": declaration.multiple,
        }
        if declaration.multiple:
            common["default"] = ()
        if declaration.switch and declaration.negatable:
            decls = [f"{flag}/--no-{flag[2:]}", name]
        else:
            decls = [flag, name]
        if declaration.switch:
            common["is_flag"] = True
            if not declaration.negatable:
                common["flag_value"] = True
        elif declaration.choices:
            common["type"] = _SettingChoice(declaration)
        elif declaration.path:
            common["type"] = click.Path(
                exists=declaration.exists,
                file_okay=declaration.path == "file",
                dir_okay=declaration.path == "dir",
                path_type=Path,
            )
            common["metavar"] = declaration.metavar
        else:
            common["type"] = _SettingType(declaration)
        made = click.option(*decls, **common)

        def attach(func: Callable[..., Any]) -> Any:
            func = made(func)
            made_param = func.__click_params__[-1]  # type: ignore[attr-defined]
            made_param.setting, made_param.settings_group = item, group
            return func

        return attach

    return [option(item.flag, None), *(option(old, old) for old in item.deprecated_flags)]


def settings_options(
    group: type, param: str, *, environment: bool = False, build: bool = True
) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Every command-line setting of the declared dataclass ``group`` as an option.

    The command receives them as one argument named ``param``: the dataclass built from them
    (validated before the command runs; a bad value or combination is a usage error, exit 2),
    or with ``build=False`` the given values keyed by setting name, for the command to build
    (:func:`labeler.settings.build`) with its own inputs. With ``environment`` a setting not
    given on the command line falls back to its variable (``serve``, ``label-studio predict``:
    one environment configures them and the backend). A required setting that is missing is a
    usage error naming its flag (or its variable).
    """
    from labeler.settings import settings_of

    declared = settings_of(group)

    def decorate(func: Callable[..., Any]) -> Callable[..., Any]:
        @functools.wraps(func)
        def with_settings(*args: Any, **kwargs: Any) -> Any:
            from labeler.settings import build as build_group
            from labeler.settings import read_env

            ctx = click.get_current_context()
            try:
                values = read_env(group) if environment else {}
            except ValueError as err:
                raise click.UsageError(str(err)) from None
            values.update(ctx.meta.get(_GIVEN, {}).get(group, {}))
            for item in declared:
                if item.required and item.name not in values:
                    raise click.UsageError(_missing(item, environment))
            if not build:
                return func(*args, **{param: values}, **kwargs)
            try:
                built = build_group(group, values)
            except ValueError as err:
                raise click.UsageError(str(err)) from None
            return func(*args, **{param: built}, **kwargs)

        for item in reversed(declared):
            if item.option:
                for option in _options_for(group, item, environment):
                    with_settings = option(with_settings)
        return with_settings

    return decorate


def _missing(item: Any, environment: bool) -> str:
    if item.flag is None:
        return f"set {item.env}: {item.declaration.help}"
    also = f" (or {item.env})" if environment and item.env else ""
    return f"Missing option '{item.flag}'{also}."


def segmenter_options(func: Callable[..., Any] | None = None, *, environment: bool = False) -> Any:
    """The model and segmenter settings (:class:`labeler.model_settings.ModelSettings`) as
    options; the command receives them as ``settings``. Use as ``@segmenter_options`` or
    ``@segmenter_options(environment=True)`` (see :func:`settings_options`)."""
    from labeler.model_settings import ModelSettings

    decorate = settings_options(ModelSettings, "settings", environment=environment)
    return decorate if func is None else decorate(func)


def parse_labels(labels: str | None, labels_file: Path | None) -> list[str]:
    """--labels "a,b" or --labels-file: exactly one of them, validated (labeler.labels)."""
    from labeler.labels import parse_labels_file, parse_labels_text

    if (labels is None) == (labels_file is None):
        raise click.UsageError("give the label names with exactly one of --labels or --labels-file")
    try:
        if labels is not None:
            return parse_labels_text(labels)
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
    from ml_backend.logs import configure_logging  # one line a record (labels, paths, URLs)

    configure_logging(
        logging.DEBUG if verbose else logging.INFO,
        "%(asctime)s %(levelname)s %(name)s: %(message)s",
        sys.stderr,
    )
    for noisy in ("PIL", "urllib3", "filelock", "httpx"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    # Object storage clients: at DEBUG they log signed requests (the access key id, signatures);
    # credentials are never logged, even with -v.
    for client in ("botocore", "aiobotocore", "s3fs", "fsspec", "gcsfs", "adlfs", "azure"):
        logging.getLogger(client).setLevel(logging.WARNING)
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
