"""The one table of model and segmenter settings, shared by every entry point.

Each row names a field of :class:`~labeler.model_settings.ModelSpec` or
:class:`~labeler.model_settings.SegmenterConfig` (or the learned weights file), how to read it
from text and write it back, and its help. ``labeler.commands`` builds the options of
``pseudo-label``, ``refine``, ``serve`` and ``benchmark`` from it; the Label Studio backend reads
the same settings from ``STABLESEG_IMAGE_SIZE``, ...; and ``serve`` hands its options to its
workers through those variables. Nothing else lists the fields, so a new setting is one new row.

Imports no torch: ``--help`` stays fast.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

from .model_settings import DTYPES, ModelSpec, SegmenterConfig, parse_dtype, parse_sizes

ENV_PREFIX = "STABLESEG_"
ENV_ALIASES = {"model": ("MODEL_DIR",)}
"""Other variables read for a setting (Label Studio's Docker convention), after ours."""


def _boolean(text: str) -> bool:
    key = text.strip().lower()
    if key in ("1", "true", "yes", "on"):
        return True
    if key in ("0", "false", "no", "off"):
        return False
    raise ValueError(f"expected on/off (1, true, yes or 0, false, no), got {text!r}")


def _threshold(text: str) -> float:
    value = float(text)
    if not 0.0 <= value <= 1.0:
        raise ValueError(f"must be between 0 and 1, got {value}")
    return value


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise ValueError(f"must be a positive integer, got {value}")
    return value


def _non_negative(text: str) -> int:
    value = int(text)
    if value < 0:
        raise ValueError(f"must be >= 0, got {value}")
    return value


def _text(text: str) -> str:
    return text


def _format_sizes(value: Any) -> str:
    return value if isinstance(value, str) else ",".join(str(v) for v in value)


def _format_bool(value: Any) -> str:
    return "1" if value else "0"


@dataclass(frozen=True)
class Setting:
    """One row of the table.

    Attributes:
        name: option name without dashes (``image-size`` -> ``--image-size``,
            ``STABLESEG_IMAGE_SIZE``).
        owner: ``"model"`` (a :class:`ModelSpec` field), ``"segmenter"`` (a
            :class:`SegmenterConfig` field) or ``"weights"`` (the learned map-weights file,
            loaded into ``SegmenterConfig.map_weights``).
        field: the dataclass field.
        parse: text -> value; raises ``ValueError`` with what was wrong.
        help: the option's help, without its default (added from the dataclass).
        metavar: shown in ``--help``.
        flag: a boolean: ``--name/--no-name`` when ``negatable``, else ``--name`` alone.
        negatable: see ``flag``.
        choices: valid values, shown in ``--help`` (``parse`` still decides).
        format: value -> text, for handing a setting on through the environment.
    """

    name: str
    owner: str
    field: str
    parse: Callable[[str], Any]
    help: str
    metavar: str = "TEXT"
    flag: bool = False
    negatable: bool = False
    choices: tuple[str, ...] = ()
    format: Callable[[Any], str] = str

    @property
    def option(self) -> str:
        return f"--{self.name}"

    @property
    def env(self) -> str:
        return ENV_PREFIX + self.name.upper().replace("-", "_")

    def default(self) -> Any:
        """The dataclass default of the field (None for the weights file)."""
        owner = {"model": ModelSpec, "segmenter": SegmenterConfig}.get(self.owner)
        if owner is None:
            return None
        return next(f.default for f in fields(owner) if f.name == self.field)


SETTINGS: tuple[Setting, ...] = (
    Setting(
        "model",
        "model",
        "source",
        _text,
        "Stable Diffusion 1.x/2.x in diffusers format: a hub id or a local folder with "
        "model_index.json (demo/model is the offline demo).",
        metavar="ID|DIR",
    ),
    Setting(
        "device",
        "model",
        "device",
        _text,
        "torch device, e.g. cuda, cuda:1, cpu. [default: cuda when present, else cpu]",
        metavar="DEVICE",
    ),
    Setting(
        "dtype",
        "model",
        "dtype",
        parse_dtype,
        "Weights and activations dtype. [default: auto = fp16 on CUDA, fp32 on CPU]",
        metavar="|".join(("auto", *DTYPES)),
        choices=("auto", *DTYPES),
    ),
    Setting(
        "compile",
        "model",
        "compile",
        _boolean,
        "torch.compile the UNet (slower start, faster long runs on a GPU).",
        flag=True,
        format=_format_bool,
    ),
    Setting(
        "image-size",
        "segmenter",
        "image_size",
        _positive,
        "Side the model sees, a multiple of the VAE factor (512 for SD 1.x/2.x base, 768 for "
        "SD 2.x v-models, 64 for demo/model).",
        metavar="PX",
    ),
    Setting(
        "batch-size",
        "segmenter",
        "batch_size",
        _positive,
        "Images per UNet pass.",
        metavar="N",
    ),
    Setting(
        "timestep",
        "segmenter",
        "timestep",
        _non_negative,
        "UNet timestep of the single pass; no noise is added (the paper's Table 4).",
        metavar="T",
    ),
    Setting(
        "cross-sizes",
        "segmenter",
        "cross_sizes",
        parse_sizes,
        "Cross-attention map sides averaged into the class map: a list like 8,16, <=32 for "
        "every side up to 32 (the paper's Table 3), or all. [default: the two smallest]",
        metavar="SIZES",
        format=_format_sizes,
    ),
    Setting(
        "self-sizes",
        "segmenter",
        "self_sizes",
        parse_sizes,
        "Self-attention sides used by Self-Attention Refinement, same notation. [default: all]",
        metavar="SIZES",
        format=_format_sizes,
    ),
    Setting(
        "sar",
        "segmenter",
        "use_sar",
        _boolean,
        "Self-Attention Refinement; --no-sar uses the cross-attention map alone (Table 2).",
        flag=True,
        negatable=True,
        format=_format_bool,
    ),
    Setting(
        "self-only",
        "segmenter",
        "self_only",
        _boolean,
        "Take the final map from SAR alone (the cross-attention map only seeds it; Table 2).",
        flag=True,
        format=_format_bool,
    ),
    Setting(
        "prompt-template",
        "segmenter",
        "prompt_template",
        _text,
        "The prompt, with {} where the label names go, e.g. 'a photo of {}'.",
        metavar="TEXT",
    ),
    Setting(
        "background-prompt",
        "segmenter",
        "background_prompt",
        _text,
        'A word prompted after the labels as one more class (e.g. "background"); the pixels '
        "it wins are background (0). [default: none]",
        metavar="WORD",
    ),
    Setting(
        "background-threshold",
        "segmenter",
        "background_threshold",
        _threshold,
        "Pixels where their label's cross-attention is below this fraction of the label's "
        "strongest in the image are background (0): the same meaning for any number of labels. "
        "[default: every pixel gets a label]",
        metavar="0..1",
    ),
    Setting(
        "weights",
        "weights",
        "map_weights",
        _text,
        "Learned attention-map weights from `refine` (W/plusplus/weights.safetensors).",
        metavar="FILE",
    ),
)
BY_NAME = {setting.name: setting for setting in SETTINGS}


@dataclass(frozen=True)
class ModelSettings:
    """What every entry point that runs StableSeg carries: the model and the segmenter.

    Attributes:
        model: which weights run where.
        segmenter: how masks are made (with the learned map weights, when given).
        weights: the map-weights file the segmenter's ``map_weights`` came from, or None.
    """

    model: ModelSpec
    segmenter: SegmenterConfig
    weights: Path | None = None

    def to_env(self) -> dict[str, str]:
        """Every setting as ``STABLESEG_*`` variables (what :func:`settings_from_env` reads)."""
        env: dict[str, str] = {}
        for setting in SETTINGS:
            if setting.owner == "weights":
                value: Any = str(self.weights.resolve()) if self.weights else None
            else:
                owner = self.model if setting.owner == "model" else self.segmenter
                value = getattr(owner, setting.field)
            if value is not None:
                env[setting.env] = value if isinstance(value, str) else setting.format(value)
        return env


def build_settings(values: Mapping[str, Any]) -> ModelSettings:
    """Settings from parsed values keyed by setting name; a missing or None value keeps the
    dataclass default. Raises ``ValueError`` naming the option for any invalid combination."""
    unknown = sorted(set(values) - set(BY_NAME))
    if unknown:
        raise KeyError(f"unknown settings {unknown}; valid: {sorted(BY_NAME)}")
    model: dict[str, Any] = {}
    segmenter: dict[str, Any] = {}
    weights = None
    for name, value in values.items():
        if value is None:
            continue
        setting = BY_NAME[name]
        if setting.owner == "model":
            model[setting.field] = value
        elif setting.owner == "segmenter":
            segmenter[setting.field] = value
        else:
            weights = Path(os.path.expanduser(str(value)))
    if weights is not None:
        from .weights import load_map_weights

        try:
            segmenter["map_weights"] = load_map_weights(weights)
        except OSError as err:
            raise ValueError(f"--weights {weights}: {err.strerror or err}") from None
    return ModelSettings(ModelSpec(**model), SegmenterConfig(**segmenter), weights)


def parse_setting(name: str, text: str, source: str | None = None) -> Any:
    """Parse one setting's text; the ``ValueError`` names ``source`` (an option or variable)."""
    setting = BY_NAME[name]
    try:
        return setting.parse(text)
    except ValueError as err:
        raise ValueError(f"{source or setting.option} {text!r}: {err}") from None


def settings_values_from_env(env: Mapping[str, str] | None = None) -> dict[str, Any]:
    """Parsed values of the ``STABLESEG_*`` variables that are set (empty counts as unset)."""
    env = os.environ if env is None else env
    values: dict[str, Any] = {}
    for setting in SETTINGS:
        for variable in (setting.env, *ENV_ALIASES.get(setting.name, ())):
            text = env.get(variable, "").strip()
            if text:
                values[setting.name] = parse_setting(setting.name, text, variable)
                break
    return values


def settings_from_env(env: Mapping[str, str] | None = None) -> ModelSettings:
    """The settings of ``STABLESEG_*`` variables (empty values count as unset)."""
    values = settings_values_from_env(env)
    try:
        return build_settings(values)
    except ValueError as err:
        raise ValueError(f"STABLESEG_* settings: {err}") from None
