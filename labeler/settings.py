"""One declaration per setting: metadata on the frozen dataclasses that hold the settings.

A setting is a dataclass field whose metadata comes from :func:`setting`: its help, how text
becomes a value (``parse``) and a value text again (``format``), its choices and metavar. Its
name (the field's, unless the group adds a prefix or a stored name must stay) is its one
spelling everywhere: the flag ``--image-size``, the variable ``STABLESEG_IMAGE_SIZE`` (the
group's variable prefix and the name), the docs table. A field whose metadata comes from
:func:`group` holds another declared dataclass (``BackendSettings.stableseg`` holds the model
and segmenter settings), whose settings join its parent's.

Everything else is generated from the declarations:

* :func:`settings_of`: a group's settings, nested groups included;
* :func:`read_env`: the values of the variables that are set (an old spelling warns);
* :func:`build`: the dataclass from parsed values keyed by setting name, validated by its own
  ``__post_init__`` (a group may define ``from_settings`` to load what a setting names);
* :func:`to_env`, :func:`to_json` and :func:`from_json`: a built object written back, to hand it
  to another process (``serve`` gives its workers one JSON object);
* :func:`markdown_table`: a group's table in ``docs/settings.md``;
* the click options: ``labeler.commands.common.settings_options``.

Imports no torch, numpy or click: ``--help`` stays fast.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import os
import typing
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, TypeVar

T = TypeVar("T")
log = logging.getLogger(__name__)
REQUIRED: Any = dataclasses.MISSING
"""The default of a setting that has none (the command must be given it)."""
_SETTING = "stableseg.setting"
_GROUP = "stableseg.group"
_GROUP_INFO = "__settings_group__"
_UnionType = type(int | None)


# ---------------------------------------------------------------------------- parsers
def text(value: str) -> str:
    """Text as it is given."""
    return value


def boolean(value: str) -> bool:
    """``1``/``true``/``yes``/``on`` or ``0``/``false``/``no``/``off``."""
    key = value.strip().lower()
    if key in ("1", "true", "yes", "on"):
        return True
    if key in ("0", "false", "no", "off"):
        return False
    raise ValueError(f"expected on/off (1, true, yes or 0, false, no), got {value!r}")


def format_boolean(value: Any) -> str:
    return "1" if value else "0"


def integer(minimum: int | None = None, maximum: int | None = None) -> Callable[[str], int]:
    """A parser of whole numbers in ``[minimum, maximum]``."""

    def parse(value: str) -> int:
        try:
            number = int(value)
        except ValueError:
            raise ValueError(f"{value!r} is not a whole number") from None
        _check_range(number, minimum, maximum)
        return number

    return parse


def number(
    minimum: float | None = None, maximum: float | None = None, *, above: float | None = None
) -> Callable[[str], float]:
    """A parser of numbers in ``[minimum, maximum]`` (and ``> above`` when given)."""

    def parse(value: str) -> float:
        try:
            result = float(value)
        except ValueError:
            raise ValueError(f"{value!r} is not a number") from None
        if above is not None and not result > above:
            raise ValueError(f"must be > {above:g}, got {result:g}")
        _check_range(result, minimum, maximum)
        return result

    return parse


def _check_range(value: float, minimum: float | None, maximum: float | None) -> None:
    if minimum is not None and maximum is not None and not minimum <= value <= maximum:
        raise ValueError(f"must be between {minimum:g} and {maximum:g}, got {value:g}")
    if minimum is not None and not value >= minimum:
        raise ValueError(f"must be >= {minimum:g}, got {value:g}")
    if maximum is not None and not value <= maximum:
        raise ValueError(f"must be <= {maximum:g}, got {value:g}")


def path(value: str) -> Path:
    """A path, ``~`` expanded."""
    return Path(os.path.expanduser(value))


# ---------------------------------------------------------------------------- declarations
@dataclass(frozen=True)
class Declaration:
    """What :func:`setting` stores in a field's metadata.

    Attributes:
        help: one or two sentences for ``--help`` and the docs, without the default (added from
            the field's default, or ``default_text``).
        name: the setting's name when it is not the field's (a field whose name is stored in
            run files, such as ``SegmenterConfig.use_sar``, keeps it).
        parse: text -> value; raises ``ValueError`` saying what was wrong.
        format: value -> text that ``parse`` reads back.
        metavar: shown in ``--help`` after the flag.
        choices: the valid texts (``--help`` lists them; ``parse`` gets the chosen one).
        switch: a boolean flag, ``--name`` alone; ``negatable`` adds ``--no-name``.
        multiple: the flag may be repeated; the value is a tuple.
        path: ``"dir"`` or ``"file"``: a path option, checked to exist when ``exists``.
        option: a command-line option; False: a variable only (secrets, backend limits).
        env_prefix: the variable's prefix when it is not the group's (``""`` for the names other
            tools use: ``LABEL_STUDIO_URL``, ``BASIC_AUTH_USER``).
        aliases: further variables read, in order, when the setting's own is unset (other
            tools' conventions, e.g. ``MODEL_DIR``).
        deprecated: old spellings, flags (``--old-name``) or variables, still read for one
            release with a warning that names the new one.
        default_text: how ``--help`` and the docs show the default when the value alone would
            not say it (``None`` meaning "every pixel gets a label").
    """

    help: str
    name: str | None = None
    parse: Callable[[str], Any] = text
    format: Callable[[Any], str] = str
    metavar: str = "TEXT"
    choices: tuple[str, ...] = ()
    switch: bool = False
    negatable: bool = False
    multiple: bool = False
    path: str | None = None
    exists: bool = False
    option: bool = True
    env_prefix: str | None = None
    aliases: tuple[str, ...] = ()
    deprecated: tuple[str, ...] = ()
    default_text: str | None = None

    def __post_init__(self) -> None:
        if self.path not in (None, "dir", "file"):
            raise ValueError(f"path must be 'dir', 'file' or None, got {self.path!r}")
        if self.negatable and not self.switch:
            raise ValueError("negatable applies to switches only")


def setting(help: str, **details: Any) -> dict[str, Declaration]:
    """A field's metadata declaring it a setting: ``field(default=..., metadata=setting(...))``.

    ``details`` are the other attributes of :class:`Declaration`. A switch parses and formats as
    a boolean, a path option as a path, unless told otherwise.
    """
    if details.get("switch"):
        details.setdefault("parse", boolean)
        details.setdefault("format", format_boolean)
    if details.get("path"):
        details.setdefault("parse", path)
        details.setdefault("metavar", details["path"].upper())
    return {_SETTING: Declaration(help=help, **details)}


@dataclass(frozen=True)
class _Nested:
    options: bool


def group(*, options: bool = True) -> dict[str, _Nested]:
    """A field's metadata declaring that it holds a declared dataclass (its ``default_factory``),
    whose settings join this one's. ``options=False`` keeps them off the command line here
    (variables only: the backend's Start Training student)."""
    return {_GROUP: _Nested(options)}


@dataclass(frozen=True)
class GroupInfo:
    """A declared dataclass's title (the docs' heading), its variables' prefix (None: its
    settings have no variable unless one declares its own prefix) and its names' prefix."""

    title: str
    env_prefix: str | None = None
    name_prefix: str = ""


def settings_group(
    title: str, *, env_prefix: str | None = None, name_prefix: str = ""
) -> Callable[[type[T]], type[T]]:
    """Class decorator (above ``@dataclass``): the group's title and prefixes (see
    :class:`GroupInfo`); ``name_prefix`` qualifies every setting name of the group (the weight
    fit's ``steps`` is ``map_steps``, ``--map-steps``)."""

    def mark(cls: type[T]) -> type[T]:
        setattr(cls, _GROUP_INFO, GroupInfo(title, env_prefix, name_prefix))
        return cls

    return mark


def group_info(cls: type) -> GroupInfo:
    info = cls.__dict__.get(_GROUP_INFO)
    if info is None:
        raise TypeError(f"{cls.__name__} is not a declared settings group (@settings_group)")
    return info


# ---------------------------------------------------------------------------- resolved settings
@dataclass(frozen=True)
class Setting:
    """One declared setting as a group holds it.

    Attributes:
        owner: the dataclass whose field it is.
        field: that field's name.
        name: the one name (``image_size``): flag, variable and docs derive from it.
        path: field names from the group :func:`settings_of` was asked about down to it
            (``("stableseg", "segmenter", "image_size")``).
        declaration: what the field's metadata says.
        default: the field's default (:data:`REQUIRED` when it has none).
        option: whether it is a command-line option in this group.
    """

    owner: type
    field: str
    name: str
    path: tuple[str, ...]
    declaration: Declaration
    default: Any
    option: bool

    @property
    def flag(self) -> str | None:
        """``--image-size``, or None for a variable-only setting."""
        return f"--{self.name.replace('_', '-')}" if self.option else None

    @property
    def env(self) -> str | None:
        """``STABLESEG_IMAGE_SIZE``, or None for a setting without a variable."""
        prefix = self.declaration.env_prefix
        if prefix is None:
            prefix = group_info(self.owner).env_prefix
        return None if prefix is None else prefix + self.name.upper()

    @property
    def required(self) -> bool:
        return self.default is REQUIRED

    @property
    def deprecated_flags(self) -> tuple[str, ...]:
        return tuple(d for d in self.declaration.deprecated if d.startswith("--"))

    @property
    def deprecated_env(self) -> tuple[str, ...]:
        return tuple(d for d in self.declaration.deprecated if not d.startswith("--"))

    def parse(self, value: str, source: str | None = None) -> Any:
        """Text -> value (choices checked); the ``ValueError`` names ``source`` (a flag or a
        variable, default the flag or variable of the setting)."""
        choices = self.declaration.choices
        try:
            if choices and value.strip().lower() not in [c.lower() for c in choices]:
                raise ValueError(f"choose from {', '.join(choices)}")
            return self.declaration.parse(value.strip() if choices else value)
        except ValueError as err:
            where = source or self.flag or self.env or self.name
            raise ValueError(f"{where} {value!r}: {err}") from None

    def format(self, value: Any) -> str | list[str]:
        """Value -> text that :meth:`parse` reads back (a list of texts when ``multiple``)."""
        if self.declaration.multiple:
            return [self.declaration.format(item) for item in value]
        return value if isinstance(value, str) else self.declaration.format(value)

    def shown_default(self) -> str | None:
        """The default as ``--help`` and the docs show it, or None when there is nothing to
        show (no default, or a switch that is off)."""
        declaration = self.declaration
        if declaration.default_text is not None:
            return declaration.default_text
        if self.required or self.default is None:
            return None
        if declaration.switch:
            if declaration.negatable:
                return self.flag if self.default else f"--no-{self.name.replace('_', '-')}"
            return None
        shown = self.format(self.default)
        shown = ", ".join(shown) if isinstance(shown, list) else shown
        return shown or None

    def help_text(self, variable: bool = False) -> str:
        """The help with its default, and its variable when ``variable`` (``--help`` of a
        command that reads the environment), as click shows them."""
        shown = self.shown_default()
        notes = [f"env var: {self.env}"] if variable and self.env else []
        notes += [f"default: {shown}"] if shown is not None else []
        notes += ["required"] if self.required else []
        return self.declaration.help + (f"  [{'; '.join(notes)}]" if notes else "")


@functools.cache
def settings_of(cls: type) -> tuple[Setting, ...]:
    """Every setting of the group ``cls``, nested groups' included, in field order.

    Raises:
        ValueError: two settings of the group share a name (their flags and variables would).
    """
    found = tuple(_walk(cls, (), True))
    seen: dict[str, Setting] = {}
    for item in found:
        other = seen.setdefault(item.name, item)
        if other is not item:
            raise ValueError(
                f"{cls.__name__}: the setting name {item.name!r} is declared twice "
                f"({'.'.join(other.path)} and {'.'.join(item.path)})"
            )
    return found


def own_settings(cls: type) -> tuple[Setting, ...]:
    """The settings declared on ``cls`` itself (not in its nested groups)."""
    return tuple(s for s in settings_of(cls) if len(s.path) == 1)


def nested_groups(cls: type) -> Iterator[tuple[str, type, bool]]:
    """(field name, declared dataclass, options) of each nested group field of ``cls``."""
    for item in fields(cls):
        nested = item.metadata.get(_GROUP)
        if nested is None:
            continue
        factory = item.default_factory
        if factory is dataclasses.MISSING or not isinstance(factory, type):
            raise TypeError(
                f"{cls.__name__}.{item.name}: a group field needs default_factory=<its dataclass>"
            )
        yield item.name, factory, nested.options


def _walk(cls: type, path: tuple[str, ...], options: bool) -> Iterator[Setting]:
    info = group_info(cls)
    nested = {name: (kind, nested_options) for name, kind, nested_options in nested_groups(cls)}
    for item in fields(cls):
        if item.name in nested:
            kind, nested_options = nested[item.name]
            yield from _walk(kind, (*path, item.name), options and nested_options)
            continue
        declaration = item.metadata.get(_SETTING)
        if declaration is None:
            continue
        default = item.default
        if default is dataclasses.MISSING and item.default_factory is not dataclasses.MISSING:
            default = item.default_factory()
        yield Setting(
            owner=cls,
            field=item.name,
            name=info.name_prefix + (declaration.name or item.name),
            path=(*path, item.name),
            declaration=declaration,
            default=default,
            option=options and declaration.option,
        )


def by_name(cls: type) -> dict[str, Setting]:
    return {item.name: item for item in settings_of(cls)}


# ---------------------------------------------------------------------------- reading, building
def deprecation(old: str, new: str) -> str:
    return f"{old} is deprecated and goes in the next release; use {new}"


def warn_deprecated(old: str, new: str) -> None:
    """A logged warning that names the new spelling (a command line without logging set up
    still shows it: Python prints warnings of an unconfigured logger)."""
    log.warning(deprecation(old, new))


def read_env(cls: type, env: Mapping[str, str] | None = None) -> dict[str, Any]:
    """Parsed values of the group's variables that are set, keyed by setting name.

    An empty variable counts as unset; a setting's own variable wins over its aliases, and
    those over its deprecated spellings (which warn). Raises ``ValueError`` naming the variable.
    """
    env = os.environ if env is None else env
    values: dict[str, Any] = {}
    for item in settings_of(cls):
        if item.env is None:
            continue
        for variable in (item.env, *item.declaration.aliases, *item.deprecated_env):
            value = env.get(variable, "").strip()
            if value:
                if variable in item.deprecated_env:
                    warn_deprecated(variable, item.env)
                values[item.name] = item.parse(value, variable)
                break
    return values


def build(cls: type[T], values: Mapping[str, Any], **fields_: Any) -> T:
    """The group ``cls`` from parsed values keyed by setting name (a setting not in ``values``
    keeps its dataclass default; None is a value), and ``fields_``: more constructor arguments of
    ``cls`` by field name (a command's inputs that are no settings, such as its folders).

    Raises:
        KeyError: an unknown setting name, listing the valid ones.
        ValueError: what the dataclasses refuse (a bad value or combination), or what
            ``from_settings`` cannot load.
    """
    known = by_name(cls)
    unknown = sorted(set(values) - set(known))
    if unknown:
        raise KeyError(f"unknown settings {unknown}; valid: {sorted(known)}")
    by_path = {known[name].path: value for name, value in values.items()}
    by_path.update({(name,): value for name, value in fields_.items()})
    return _build(cls, by_path, ())


def _build(cls: type[T], by_path: Mapping[tuple[str, ...], Any], prefix: tuple[str, ...]) -> T:
    kwargs: dict[str, Any] = {}
    for item in fields(cls):
        key = (*prefix, item.name)
        if key in by_path:
            kwargs[item.name] = by_path[key]
    for name, nested, _ in nested_groups(cls):
        key = (*prefix, name)
        if any(path[: len(key)] == key for path in by_path):
            kwargs[name] = _build(nested, by_path, key)
    factory = getattr(cls, "from_settings", cls)
    return factory(**kwargs)


def _value(obj: Any, path: tuple[str, ...]) -> Any:
    for name in path:
        obj = getattr(obj, name)
    return obj


def to_env(obj: Any) -> dict[str, str]:
    """Every setting of ``obj`` that has a variable and a value, as :func:`read_env` reads it."""
    env: dict[str, str] = {}
    for item in settings_of(type(obj)):
        value = _value(obj, item.path)
        if item.env is not None and value is not None:
            shown = item.format(value)
            env[item.env] = ",".join(shown) if isinstance(shown, list) else shown
    return env


def to_json(obj: Any) -> dict[str, Any]:
    """A built group as JSON-ready data that :func:`from_json` turns back into an equal object:
    settings as their text, nested groups as objects, other fields as plain data (the loaded map
    weights travel as numbers, so nothing is read from disk again)."""
    cls = type(obj)
    declared = {item.field: item for item in own_settings(cls)}
    nested = {name for name, _, _ in nested_groups(cls)}
    data: dict[str, Any] = {}
    for item in fields(cls):
        value = getattr(obj, item.name)
        if item.name in nested:
            data[item.name] = to_json(value)
        elif item.name in declared:
            data[item.name] = None if value is None else declared[item.name].format(value)
        else:
            data[item.name] = _plain(value, f"{cls.__name__}.{item.name}")
    return data


def from_json(cls: type[T], data: Mapping[str, Any]) -> T:
    """The object :func:`to_json` wrote, validated again by the dataclasses (no ``from_settings``:
    what it loaded is in the data)."""
    declared = {item.field: item for item in own_settings(cls)}
    nested = {name: kind for name, kind, _ in nested_groups(cls)}
    hints = typing.get_type_hints(cls)
    kwargs: dict[str, Any] = {}
    for name, value in data.items():
        if name in nested:
            kwargs[name] = from_json(nested[name], value)
        elif name in declared and value is not None:
            item = declared[name]
            if item.declaration.multiple:
                kwargs[name] = tuple(item.declaration.parse(v) for v in value)
            else:
                kwargs[name] = item.parse(value, f"{cls.__name__}.{name}")
        else:
            kwargs[name] = _typed(value, hints.get(name))
    return cls(**kwargs)


def _plain(value: Any, where: str) -> Any:
    if value is None or isinstance(value, str | int | float | bool):
        return value
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, tuple | list):
        return [_plain(v, where) for v in value]
    if isinstance(value, Mapping):
        return {str(k): _plain(v, where) for k, v in value.items()}
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: _plain(getattr(value, f.name), where) for f in fields(value)}
    raise TypeError(f"{where}: cannot write {type(value).__name__} {value!r} as JSON")


def _typed(value: Any, hint: Any) -> Any:
    """JSON data back into the field's type: tuples and dataclasses (the rest is as JSON has it)."""
    if value is None or hint is None:
        return value
    options = typing.get_args(hint) if typing.get_origin(hint) in (typing.Union, _UnionType) else ()
    for kind in options or (hint,):
        origin = typing.get_origin(kind) or kind
        if isinstance(value, list) and origin is tuple:
            return tuple(value)
        if isinstance(value, dict) and dataclasses.is_dataclass(origin):
            return origin(**value)
    return value


# ---------------------------------------------------------------------------- docs
def markdown_table(cls: type) -> str:
    """The group's own settings as a Markdown table: option, variable, default, meaning."""
    rows = [
        "| Option | Variable | Default | Meaning |",
        "| --- | --- | --- | --- |",
    ]
    for item in own_settings(cls):
        declaration = item.declaration
        option = "—"
        if item.flag:
            option = f"`{item.flag}`"
            if declaration.negatable:
                option += f" / `--no-{item.name.replace('_', '-')}`"
        variable = f"`{item.env}`" if item.env else "—"
        if declaration.aliases:
            variable += " (or " + ", ".join(f"`{a}`" for a in declaration.aliases) + ")"
        default = default_cell(item)
        meaning = _prose(declaration.help)
        if declaration.choices:
            meaning += " One of " + ", ".join(f"`{c}`" for c in declaration.choices) + "."
        if declaration.deprecated:
            old = ", ".join(f"`{d}`" for d in declaration.deprecated)
            meaning += f" Formerly {old} (deprecated, still read until the next release)."
        cells = [option, variable, default, meaning]
        rows.append("| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |")
    return "\n".join(rows) + "\n"


def default_cell(item: Setting) -> str:
    """A setting's default as a Markdown table cell shows it."""
    shown = item.shown_default()
    if shown is None:
        return "required" if item.required else ("off" if item.declaration.switch else "none")
    return _prose(shown) if item.declaration.default_text is not None else f"`{shown}`"


def limits_table(cls: type, names: Sequence[str]) -> str:
    """The settings ``names`` of ``cls``, in that order, as a Markdown table: variable, default,
    what each bounds (``docs/security.md``'s limits)."""
    found = {item.name: item for item in own_settings(cls)}
    rows = ["| Variable | Default | Bounds |", "| --- | --- | --- |"]
    for name in names:
        item = found[name]
        cells = [f"`{item.env}`", default_cell(item), _prose(item.declaration.help)]
        rows.append("| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |")
    return "\n".join(rows) + "\n"


def _prose(text: str) -> str:
    """Text for a Markdown cell outside code: ``<name>`` would be taken for an HTML tag."""
    return text.replace("<", "&lt;")
