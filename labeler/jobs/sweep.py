"""Sweeps over segmenter settings: the ablation grids of the paper's Tables 2, 3 and 4.

A sweep is one or more axes, each written ``key=v1,v2,...``:

    cross=16,32,64      cross-attention map sides (Table 3's rows); a value is one side, a list
                        joined by ``+`` (``8+16``), ``<=32`` (every side up to 32) or ``all``
    self=16,32,64       self-attention sides used by SAR (Table 3's columns), same notation
    timestep=1,50,100   the UNet timestep (Table 4)
    sar=on,off,self-only  SAR on, off (cross-attention alone), or the final map from SAR alone
                        (Table 2)
    presence=off,1,0.9  label presence threshold (off: every label competes everywhere)
    flip=off,on         horizontal-flip ensemble
    timesteps=1,1+50+100  the timesteps averaged (the first is --timestep, the others the
                        ensemble's)
    sar-rounds=1,2,3    rounds of Self-Attention Refinement
    tiles=off,2,4       any other setting of the segmenter, by its name (``--tiles`` ->
                        ``tiles``, ``--tile-overlap`` -> ``tile-overlap``), values as its option
                        reads them

Every combination of the axes' values is one point: the base :class:`SegmenterConfig` with
those fields changed.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from labeler.model_settings import SegmenterConfig, parse_sizes
from labeler.settings import Setting, by_name


def _sizes(field: str) -> Callable[[str], dict[str, Any]]:
    def parse(text: str) -> dict[str, Any]:
        return {field: parse_sizes(text.replace("+", ","))}

    return parse


def _timestep(text: str) -> dict[str, Any]:
    value = int(text)
    if value < 0:
        raise ValueError(f"must be >= 0, got {value}")
    return {"timestep": value}


def _presence(text: str) -> dict[str, Any]:
    key = text.strip().lower()
    if key in ("off", "none"):
        return {"presence_threshold": None}
    value = float(key)
    if not 0.0 <= value <= 1.0:
        raise ValueError(f"must be off or in [0, 1], got {text}")
    return {"presence_threshold": value}


def _flip(text: str) -> dict[str, Any]:
    key = text.strip().lower()
    if key not in ("on", "off"):
        raise ValueError("choose from on, off")
    return {"flip": key == "on"}


def _timesteps(text: str) -> dict[str, Any]:
    steps = [int(part) for part in text.split("+")]
    if any(step < 0 for step in steps):
        raise ValueError(f"must be >= 0, got {text}")
    return {"timestep": steps[0], "ensemble_timesteps": tuple(steps[1:])}


def _rounds(text: str) -> dict[str, Any]:
    value = int(text)
    if value < 1:
        raise ValueError(f"must be >= 1, got {value}")
    return {"sar_rounds": value}


SAR_MODES = {
    "on": {"use_sar": True, "self_only": False},
    "off": {"use_sar": False, "self_only": False},
    "self-only": {"use_sar": True, "self_only": True},
}


def _sar(text: str) -> dict[str, Any]:
    key = text.strip().lower()
    if key not in SAR_MODES:
        raise ValueError(f"choose from {', '.join(SAR_MODES)}")
    return dict(SAR_MODES[key])


@dataclass(frozen=True)
class SweepKey:
    """One sweepable setting: its name, what a value sets, and the paper's table it makes."""

    name: str
    parse: Callable[[str], dict[str, Any]]
    help: str


SWEEP_KEYS: dict[str, SweepKey] = {
    key.name: key
    for key in (
        SweepKey("cross", _sizes("cross_sizes"), "cross-attention sides (Table 3 rows)"),
        SweepKey("self", _sizes("self_sizes"), "self-attention sides for SAR (Table 3 columns)"),
        SweepKey("timestep", _timestep, "UNet timestep (Table 4)"),
        SweepKey("sar", _sar, "on, off or self-only (Table 2)"),
        SweepKey("presence", _presence, "label presence threshold, or off"),
        SweepKey("flip", _flip, "horizontal-flip ensemble, on or off"),
        SweepKey("timesteps", _timesteps, "timesteps averaged, joined by + (1+50+100)"),
        SweepKey("sar-rounds", _rounds, "rounds of Self-Attention Refinement"),
    )
}
SIZE_KEYS = ("cross", "self")


def _declared(key: str) -> Setting | None:
    """The segmenter setting a sweep key names (``tile-overlap`` or ``tile_overlap``), if any:
    every declared setting of :class:`SegmenterConfig` is sweepable by its name."""
    return by_name(SegmenterConfig).get(key.replace("-", "_"))


def _setting_value(setting: Setting) -> Callable[[str], dict[str, Any]]:
    def parse(text: str) -> dict[str, Any]:
        return {setting.field: setting.parse(text, source=setting.name.replace("_", "-"))}

    return parse


@dataclass(frozen=True)
class SweepAxis:
    """One axis: a key and its values as written, with the config changes of each value."""

    key: str
    values: tuple[str, ...]
    changes: tuple[Mapping[str, Any], ...]


@dataclass(frozen=True)
class SweepPoint:
    """One combination: key -> value as written, and the segmenter configuration it makes."""

    values: Mapping[str, str]
    config: SegmenterConfig

    def label(self) -> str:
        """``cross=16 self=32`` (empty for a run without a sweep)."""
        return " ".join(f"{key}={value}" for key, value in self.values.items())


def parse_axis(text: str) -> SweepAxis:
    """``key=v1,v2`` -> a :class:`SweepAxis`; ``ValueError`` names the bad part."""
    key, sep, rest = text.partition("=")
    key = key.strip().lower()
    if not sep or not key:
        raise ValueError(f"sweep {text!r}: write key=v1,v2 (keys: {', '.join(SWEEP_KEYS)})")
    declared = None if key in SWEEP_KEYS else _declared(key)
    if key not in SWEEP_KEYS and declared is None:
        keys = ", ".join(SWEEP_KEYS)
        raise ValueError(
            f"sweep {text!r}: unknown key {key!r}; choose from {keys}, or a segmenter setting "
            "by its option's name (e.g. tiles)"
        )
    parse_value = SWEEP_KEYS[key].parse if declared is None else _setting_value(declared)
    # "<=16,<=32" splits into "<=16" and "<=32"; a list inside one value is joined by "+".
    values = tuple(v.strip() for v in rest.split(",") if v.strip())
    if not values:
        raise ValueError(f"sweep {text!r}: no values after '='")
    if len({v.lower() for v in values}) != len(values):
        raise ValueError(f"sweep {text!r}: a value is repeated")
    changes = []
    for value in values:
        try:
            changes.append(parse_value(value))
        except ValueError as err:
            raise ValueError(f"sweep {key}={value!r}: {err}") from None
    return SweepAxis(key, values, tuple(changes))


def parse_sweep(items: Sequence[str]) -> list[SweepAxis]:
    """Axes from ``--sweep`` items; an item may hold several space-separated axes."""
    axes: list[SweepAxis] = []
    for item in items:
        for part in item.split():
            axis = parse_axis(part)
            if any(other.key == axis.key for other in axes):
                raise ValueError(f"sweep key {axis.key!r} is given twice")
            axes.append(axis)
    return axes


def sweep_points(base: SegmenterConfig, axes: Sequence[SweepAxis]) -> list[SweepPoint]:
    """Every combination of the axes' values (first axis slowest), as configurations.

    No axes: the base configuration alone. Raises ``ValueError`` for a combination the
    configuration refuses, and for size axes with learned map weights (which replace the size
    selection, so the sweep would measure one configuration several times).
    """
    if base.map_weights is not None:
        sized = [axis.key for axis in axes if axis.key in SIZE_KEYS]
        if sized:
            raise ValueError(
                f"sweep {', '.join(sized)}: learned map weights (--weights) replace the size "
                "selection, so these values would all measure the same thing"
            )
    points = []
    for combination in itertools.product(*(range(len(axis.values)) for axis in axes)):
        values: dict[str, str] = {}
        changes: dict[str, Any] = {}
        for axis, index in zip(axes, combination, strict=True):
            values[axis.key] = axis.values[index]
            changes.update(axis.changes[index])
        try:
            config = base.replace(**changes)
        except ValueError as err:
            shown = " ".join(f"{k}={v}" for k, v in values.items())
            raise ValueError(f"sweep point {shown}: {err}") from None
        points.append(SweepPoint(values, config))
    return points
