"""Every default of the method in one place: the segmenter's settings and the model to load.

:class:`SegmenterConfig` says how masks are made; :class:`ModelSpec` says which weights run
where; :class:`ModelSettings` carries both, with the learned map-weights file. Every entry point
(``pseudo-label``, ``refine``, ``serve``, Start Training, ``benchmark``, ``label-studio predict``)
carries them unchanged from its options to the model. Each field that a user sets is declared
here once (:func:`labeler.settings.setting`): its flag, its ``STABLESEG_*`` variable, its help
and the docs table are made from that declaration.
"""

from __future__ import annotations

import math
import os
import re
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Any

from .settings import group, integer, number, setting, settings_group

DEFAULT_MODEL = "stable-diffusion-v1-5/stable-diffusion-v1-5"
"""The maintained copy of SD 1.5 (``runwayml/stable-diffusion-v1-5`` left the hub in 2024)."""

DTYPES = {"fp16": "float16", "bf16": "bfloat16", "fp32": "float32"}
"""Canonical dtype names -> torch attribute names; None means fp16 on CUDA, fp32 elsewhere."""
_DTYPE_ALIASES = {
    "auto": None,
    "float16": "fp16",
    "half": "fp16",
    "bfloat16": "bf16",
    "float32": "fp32",
    "float": "fp32",
    **{name: name for name in DTYPES},
}

SizeSelection = tuple[int, ...] | str | None
"""Attention map sizes: explicit sides ``(8, 16)``, ``"<=32"`` (every side up to 32, the
paper's Table 3 notation), ``"all"``, or None (the default of the field)."""
_UP_TO = re.compile(r"^<=\s*(\d+)$")


def parse_dtype(value: str | None) -> str | None:
    """``fp16``/``float16``/``half``, ``bf16``/``bfloat16``, ``fp32``/``float32`` or
    ``auto``/None -> ``"fp16"``, ``"bf16"``, ``"fp32"`` or None (auto)."""
    if value is None:
        return None
    key = str(value).strip().lower()
    if key not in _DTYPE_ALIASES:
        raise ValueError(
            f"unknown dtype {value!r}; choose from auto, {', '.join(DTYPES)} "
            "(float16, half, bfloat16, float32 are accepted too)"
        )
    return _DTYPE_ALIASES[key]


def torch_dtype(name: str | None) -> Any:
    """The torch dtype of a canonical name (None stays None: the model picks)."""
    if name is None:
        return None
    import torch

    return getattr(torch, DTYPES[parse_dtype(name) or "fp32"])


def parse_sizes(value: str | Iterable[int] | None) -> SizeSelection:
    """``"8,16"`` -> ``(8, 16)``; ``"<=32"`` and ``"all"`` stay strings; None stays None."""
    if value is None:
        return None
    if not isinstance(value, str):
        sizes = tuple(int(v) for v in value)
        if not sizes or any(s <= 0 for s in sizes):
            raise ValueError(f"sizes must be positive side lengths, got {value!r}")
        return tuple(sorted(set(sizes)))
    text = value.strip().lower().replace(" ", "")
    if text == "all":
        return "all"
    match = _UP_TO.match(text)
    if match:
        if int(match.group(1)) <= 0:
            raise ValueError(f"sizes {value!r}: the bound must be positive")
        return f"<={int(match.group(1))}"
    try:
        return parse_sizes([int(part) for part in text.split(",") if part])
    except ValueError:
        raise ValueError(
            f"cannot read sizes {value!r}: give side lengths like 8,16, or <=32 for every side "
            "up to 32, or all"
        ) from None


def select_sizes(selection: SizeSelection, available: Iterable[int], default: int | None) -> set:
    """The sides a selection picks among ``available``; None picks the ``default`` smallest
    (all when ``default`` is None). Raises ``ValueError`` for sides the UNet does not offer."""
    offered = sorted(set(available))
    if selection is None:
        return set(offered if default is None else offered[:default])
    if selection == "all":
        return set(offered)
    if isinstance(selection, str):
        bound = int(selection[2:])
        chosen = {side for side in offered if side <= bound}
        if not chosen:
            raise ValueError(f"no attention size is {selection}; valid sizes: {offered}")
        return chosen
    missing = sorted(set(selection) - set(offered))
    if missing:
        raise ValueError(f"sizes {missing} not offered; valid sizes: {offered}")
    return set(selection)


def _parse_tiles(value: str | float | None) -> float | None:
    """``"2"`` / ``2.5`` -> model sides along the image's longer side (>= 1); ``"off"`` /
    ``"none"`` / None -> None (no tiles)."""
    if value is None or (isinstance(value, str) and value.strip().lower() in ("off", "none")):
        return None
    try:
        tiles = float(value)
    except ValueError:
        raise ValueError(f"tiles must be a number >= 1 or off, got {value!r}") from None
    if not tiles >= 1.0 or math.isinf(tiles):
        raise ValueError(f"tiles must be a number >= 1 or off, got {value!r}")
    return tiles


ENV_PREFIX = "STABLESEG_"
"""The prefix of the model's and segmenter's variables (``STABLESEG_IMAGE_SIZE``)."""


def _format_sizes(value: Any) -> str:
    return value if isinstance(value, str) else ",".join(str(v) for v in value)


def _parse_timesteps(value: str | Iterable[int]) -> tuple[int, ...]:
    """``"50,100"`` -> ``(50, 100)`` (an empty text: none)."""
    parts = value.replace(" ", "").split(",") if isinstance(value, str) else list(value)
    try:
        steps = tuple(int(part) for part in parts if part != "")
    except ValueError:
        raise ValueError(f"cannot read timesteps {value!r}: give integers like 50,100") from None
    if any(step < 0 for step in steps):
        raise ValueError(f"timesteps must be >= 0, got {value!r}")
    return steps


def _parse_templates(value: str | Iterable[str]) -> tuple[str, ...]:
    """``"a photo of {}|a picture of {}"`` -> the templates (an empty text: none)."""
    parts = value.split("|") if isinstance(value, str) else list(value)
    return tuple(part for part in parts if part.strip())


_ADDITIONS = (
    "presence_threshold",
    "reprompt",
    "flip",
    "ensemble_timesteps",
    "ensemble_templates",
    "sar_rounds",
)
"""The test-time additions: at their declared defaults they leave the paper's method as it is."""


@settings_group("Segmenter", env_prefix=ENV_PREFIX)
@dataclass(frozen=True)
class SegmenterConfig:
    """How StableSeg turns one UNet pass into masks.

    Attributes:
        image_size: side of the square the image is resized to before the VAE; ``None`` (the
            default) is the model's own resolution, the UNet's sample size times the VAE's
            factor (512 for SD 1.x and 2.x base, 768 for SD 2.x v-models, 64 for demo/model),
            resolved by the model (:attr:`labeler.StableSeg.input_size`). Settings, run files
            and model versions keep ``None``: "the model's own" is a setting of its own. Masks
            come back at the original size.
        timestep: the UNet timestep of the single pass (the paper uses 1). No noise is added.
        cross_sizes: side lengths of the cross-attention maps averaged into the class map (CAPM):
            a tuple such as ``(8, 16)``, ``"<=32"`` or ``"all"`` (see :func:`parse_sizes`).
            ``None`` takes the two smallest the UNet offers (8 and 16 at 512 px).
        self_sizes: side lengths of the self-attention layers used by Self-Attention Refinement,
            in the same notation. ``None`` takes all of them.
        use_sar: add the self-attention probability map (SAPM) to the CAPM.
        self_only: use the CAPM only to seed SAR, and take the final map from the SAPM alone.
        prompt_template: the prompt, with ``{}`` standing for the joined label names.
        label_separator: text between label names in the prompt.
        background_threshold: ``None`` gives every pixel a label; otherwise a pixel becomes
            background (0) where the cross-attention of the label it would get is below this
            fraction of that label's strongest cross-attention in the image
            (:mod:`labeler.background`), a rule whose meaning does not change with the number
            of labels.
        background_prompt: a word (e.g. ``"background"``) prompted after the labels as one more
            class; pixels it wins become background (0). ``None``: no such class.
        presence_threshold: ``None`` lets every label compete everywhere; otherwise a label
            whose presence evidence (:mod:`labeler.presence`) is below this value is judged
            absent from the image: it takes no part in SAR's class vectors or the argmax.
        reprompt: prompt each image again with only the labels that take part (judged present
            with ``presence_threshold``; a tile window's own labels with ``tiles``), so the
            absent labels leave the prompt too, not only SAR and the argmax. An image whose
            labels all take part keeps its first pass; any other costs one more pass per
            member of the ensemble, with fewer prompt rows.
        flip: also segment the horizontally flipped image and average the two final maps
            (flipped back): two VAE encodes and two UNet passes per image.
        ensemble_timesteps: further UNet timesteps whose final maps are averaged with
            ``timestep``'s (one more pass each).
        ensemble_templates: further prompt templates whose final maps are averaged with
            ``prompt_template``'s (one more pass each).
        sar_rounds: rounds of Self-Attention Refinement; each round after the first takes its
            class vectors from the previous round's final map (no further UNet pass).
        batch_size: images per UNet pass (windows per pass with tiles).
        tiles: ``None`` for the paper's single pass over the image squeezed to ``image_size``;
            otherwise the image is brought to a working size whose longer side is this many
            model sides and segmented in overlapping windows of ``image_size``, each window
            using only the labels a whole-image pass finds near it (:mod:`labeler.tiles`).
        tile_overlap: the fraction of a window's side its neighbours share, at least.
        tile_gate: a label takes part in a window where the whole-image pass gives it at least
            this fraction of its peak probability in the image, near the window.
        map_weights: learned weight per attention layer (layer name -> weight), as written by
            the StableSeg++ trainer. ``None`` means uniform: the CAPM is the mean of the chosen
            cross-attention layers and the SAPM the mean of the chosen self-attention layers.
            When given, the weights are used as they are (layers not named get 0) and the size
            selections above are ignored.
    """

    image_size: int | None = field(
        default=None,
        metadata=setting(
            "Side the model sees, a multiple of the VAE factor; by default the model's own "
            "(UNet sample size x VAE factor: 512 for SD 1.x/2.x base, 768 for SD 2.x v-models, "
            "64 for demo/model).",
            parse=integer(minimum=1),
            metavar="PX",
            default_text="the model's own",
        ),
    )
    timestep: int = field(
        default=1,
        metadata=setting(
            "UNet timestep of the single pass; no noise is added (the paper's Table 4).",
            parse=integer(minimum=0),
            metavar="T",
        ),
    )
    cross_sizes: SizeSelection = field(
        default=None,
        metadata=setting(
            "Cross-attention map sides averaged into the class map: a list like 8,16, <=32 for "
            "every side up to 32 (the paper's Table 3), or all.",
            parse=parse_sizes,
            format=_format_sizes,
            metavar="SIZES",
            default_text="the two smallest",
        ),
    )
    self_sizes: SizeSelection = field(
        default=None,
        metadata=setting(
            "Self-attention sides used by Self-Attention Refinement, same notation.",
            parse=parse_sizes,
            format=_format_sizes,
            metavar="SIZES",
            default_text="all",
        ),
    )
    use_sar: bool = field(
        default=True,
        metadata=setting(
            "Self-Attention Refinement; --no-sar uses the cross-attention map alone (Table 2).",
            name="sar",  # the field keeps its name: run files and model versions store it
            switch=True,
            negatable=True,
        ),
    )
    self_only: bool = field(
        default=False,
        metadata=setting(
            "Take the final map from SAR alone (the cross-attention map only seeds it; Table 2).",
            switch=True,
        ),
    )
    prompt_template: str = field(
        default="{}",
        metadata=setting("The prompt, with {} where the label names go, e.g. 'a photo of {}'."),
    )
    label_separator: str = ", "
    background_threshold: float | None = field(
        default=None,
        metadata=setting(
            "Pixels where their label's cross-attention is below this fraction of the label's "
            "strongest in the image are background (0): the same meaning for any number of "
            "labels.",
            parse=number(0.0, 1.0),
            metavar="0..1",
            default_text="every pixel gets a label",
        ),
    )
    background_prompt: str | None = field(
        default=None,
        metadata=setting(
            'A word prompted after the labels as one more class (e.g. "background"); the pixels '
            "it wins are background (0).",
            metavar="WORD",
            default_text="none",
        ),
    )
    presence_threshold: float | None = field(
        default=None,
        metadata=setting(
            "Judge which labels are in each image (every label prompted): a label whose "
            "presence evidence is below this value takes no part in SAR or the argmax; the "
            "same meaning for any number of labels (docs/benchmark.md).",
            parse=number(0.0, 1.0),
            metavar="0..1",
            default_text="every label competes",
        ),
    )
    reprompt: bool = field(
        default=False,
        metadata=setting(
            "Prompt each image again with only the labels judged present (--presence-threshold), "
            "and each tile window with only its own labels (--tiles): absent labels leave the "
            "prompt too. One more UNet pass per image that has an absent label, with fewer "
            "prompt rows.",
            switch=True,
        ),
    )
    flip: bool = field(
        default=False,
        metadata=setting(
            "Average the final maps of the image and its horizontal mirror (2 UNet passes).",
            switch=True,
        ),
    )
    ensemble_timesteps: tuple[int, ...] = field(
        default=(),
        metadata=setting(
            "Further UNet timesteps, e.g. 50,100, whose maps are averaged with --timestep's "
            "(one more UNet pass each).",
            parse=_parse_timesteps,
            format=_format_sizes,
            metavar="T,T",
            default_text="none",
        ),
    )
    ensemble_templates: tuple[str, ...] = field(
        default=(),
        metadata=setting(
            "Further prompt templates separated by |, e.g. 'a photo of {}|a picture of {}', "
            "whose maps are averaged with --prompt-template's (one more UNet pass each).",
            parse=_parse_templates,
            format="|".join,
            metavar="TEMPLATES",
            default_text="none",
        ),
    )
    sar_rounds: int = field(
        default=1,
        metadata=setting(
            "Rounds of Self-Attention Refinement; each further round takes its class vectors "
            "from the previous round's map (no further UNet pass).",
            parse=integer(minimum=1),
            metavar="N",
        ),
    )
    batch_size: int = field(
        default=4,
        metadata=setting("Images per UNet pass.", parse=integer(minimum=1), metavar="N"),
    )
    tiles: float | None = field(
        default=None,
        metadata=setting(
            "Tiles for images larger than the model's side: the image is resized so its longer "
            "side is TILES x image_size and segmented in overlapping windows of image_size "
            "(labels chosen per window by a whole-image pass); e.g. 2 = about 4-9 windows.",
            parse=_parse_tiles,
            metavar="N",
            default_text="off: one pass over the whole image (the paper)",
        ),
    )
    tile_overlap: float = field(
        default=0.25,
        metadata=setting(
            "With --tiles: the fraction of a window's side its neighbours share, at least.",
            parse=number(0.0, 0.9),
            metavar="0..0.9",
        ),
    )
    tile_gate: float = field(
        default=0.3,
        metadata=setting(
            "With --tiles: a label takes part in a window where the whole-image pass gives it "
            "at least this fraction of its peak in the image, near the window (0: every label "
            "in every window).",
            parse=number(0.0, 1.0),
            metavar="0..1",
        ),
    )
    map_weights: Mapping[str, float] | None = field(default=None, compare=True)

    def __post_init__(self) -> None:
        if self.image_size is not None and (self.image_size < 8 or self.image_size % 8):
            raise ValueError(f"image_size must be a positive multiple of 8, got {self.image_size}")
        if self.timestep < 0:
            raise ValueError(f"timestep must be >= 0, got {self.timestep}")
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {self.batch_size}")
        if self.prompt_template.count("{}") != 1:
            raise ValueError(
                "prompt_template must contain '{}' exactly once (where the label names go), "
                f"got {self.prompt_template!r}"
            )
        object.__setattr__(self, "ensemble_timesteps", _parse_timesteps(self.ensemble_timesteps))
        object.__setattr__(self, "ensemble_templates", _parse_templates(self.ensemble_templates))
        for template in self.ensemble_templates:
            if template.count("{}") != 1:
                raise ValueError(
                    "every ensemble template must contain '{}' exactly once (where the label "
                    f"names go), got {template!r}"
                )
        if self.sar_rounds < 1:
            raise ValueError(f"sar_rounds must be >= 1, got {self.sar_rounds}")
        presence = self.presence_threshold
        if presence is not None and not 0.0 <= presence <= 1.0:
            raise ValueError(f"presence_threshold must be in [0, 1] or None, got {presence}")
        if self.reprompt and presence is None and self.tiles is None:
            raise ValueError(
                "reprompt needs presence_threshold or tiles (it prompts the labels they keep)"
            )
        thr = self.background_threshold
        if thr is not None and not 0.0 <= thr <= 1.0:
            raise ValueError(f"background_threshold must be in [0, 1] or None, got {thr}")
        if self.background_prompt is not None:
            from .labels import normalise_label

            prompt = normalise_label(self.background_prompt, "background_prompt")
            object.__setattr__(self, "background_prompt", prompt)
        if self.tiles is not None:
            object.__setattr__(self, "tiles", _parse_tiles(self.tiles))
        if not 0.0 <= self.tile_overlap <= 0.9:
            raise ValueError(f"tile_overlap must be in [0, 0.9], got {self.tile_overlap}")
        if not 0.0 <= self.tile_gate <= 1.0:
            raise ValueError(f"tile_gate must be in [0, 1], got {self.tile_gate}")
        if self.self_only and not self.use_sar:
            raise ValueError("self_only=True needs use_sar=True (the final map comes from SAR)")
        for name in ("cross_sizes", "self_sizes"):
            try:
                object.__setattr__(self, name, parse_sizes(getattr(self, name)))
            except ValueError as err:
                raise ValueError(f"{name}: {err}") from None
        if self.map_weights is not None:
            bad = {k: v for k, v in self.map_weights.items() if not v >= 0.0}
            if bad:
                raise ValueError(f"map_weights must be non-negative, got {bad}")
            object.__setattr__(self, "map_weights", dict(self.map_weights))

    def replace(self, **changes: Any) -> SegmenterConfig:
        """A copy with some fields changed (validated again)."""
        return replace(self, **changes)

    def mask_settings(self) -> dict[str, Any]:
        """The fields that decide the masks, as JSON-ready data (``batch_size`` changes speed
        only and is left out). Run files, cache keys and model versions derive from it."""
        data = asdict(self)
        data.pop("batch_size")
        # Settings at their paper defaults are left out: the keys of runs (and model versions)
        # made before they existed stay the same.
        if data["tiles"] is None:
            del data["tiles"], data["tile_overlap"], data["tile_gate"]
        for name in _ADDITIONS:
            if data[name] == _DEFAULTS[name]:
                del data[name]
        for name in ("cross_sizes", "self_sizes", "ensemble_timesteps", "ensemble_templates"):
            if isinstance(data.get(name), tuple):
                data[name] = list(data[name])
        return data


_DEFAULTS = {f.name: f.default for f in fields(SegmenterConfig)}
"""Each segmenter setting's default, as declared on its field."""


@settings_group("Model", env_prefix=ENV_PREFIX)
@dataclass(frozen=True)
class ModelSpec:
    """Which Stable Diffusion to load, and where and how it runs.

    Attributes:
        source: a hub id or a local diffusers folder (with ``model_index.json``).
        device: a torch device string; None: CUDA when present, else CPU.
        dtype: ``"fp16"``, ``"bf16"``, ``"fp32"`` or None (fp16 on CUDA, fp32 elsewhere);
            other spellings are normalised by :func:`parse_dtype`.
        compile: ``torch.compile`` the UNet (worth it for long runs on a GPU).
        unet_memory: MiB one UNet call's prompt rows may take (their recorded attention and
            activations); None: derived from the device (``StableSeg.unet_memory``).
    """

    source: str = field(
        default=DEFAULT_MODEL,
        metadata=setting(
            "Stable Diffusion 1.x/2.x in diffusers format: a hub id or a local folder with "
            "model_index.json (demo/model is the offline demo).",
            name="model",  # every command's --model (DESIGN.md); the field says what it holds
            metavar="ID|DIR",
            aliases=("MODEL_DIR",),  # Label Studio's Docker convention
        ),
    )
    device: str | None = field(
        default=None,
        metadata=setting(
            "torch device, e.g. cuda, cuda:1, cpu.",
            metavar="DEVICE",
            default_text="cuda when present, else cpu",
        ),
    )
    dtype: str | None = field(
        default=None,
        metadata=setting(
            "Weights and activations dtype.",
            parse=parse_dtype,
            choices=("auto", *DTYPES),
            metavar="|".join(("auto", *DTYPES)),
            default_text="auto = fp16 on CUDA, fp32 on CPU",
        ),
    )
    compile: bool = field(
        default=False,
        metadata=setting(
            "torch.compile the UNet (slower start, faster long runs on a GPU).",
            switch=True,
        ),
    )
    unet_memory: int | None = field(
        default=None,
        metadata=setting(
            "MiB one UNet call's prompt rows x images may take (recorded attention and "
            "activations); more rows go in several calls with the same masks.",
            parse=integer(minimum=1),
            metavar="MIB",
            default_text="half the free GPU memory on CUDA, 2048 on CPU",
        ),
    )

    def __post_init__(self) -> None:
        if not isinstance(self.source, str) or not self.source.strip():
            raise ValueError(f"model must be a hub id or a folder, got {self.source!r}")
        object.__setattr__(self, "source", self.source.strip())
        object.__setattr__(self, "dtype", parse_dtype(self.dtype))
        if self.device is not None:
            object.__setattr__(self, "device", str(self.device).strip() or None)

    def replace(self, **changes: Any) -> ModelSpec:
        return replace(self, **changes)


@settings_group("Learned map weights", env_prefix=ENV_PREFIX)
@dataclass(frozen=True)
class ModelSettings:
    """What every entry point that runs StableSeg carries: the model and the segmenter.

    Attributes:
        model: which weights run where.
        segmenter: how masks are made (with the learned map weights, when given).
        weights: the map-weights file the segmenter's ``map_weights`` came from, or None.
        weights_stamp: (resolved path, mtime in ns, size) of that file when it was read, so a
            process handed these settings knows whether the file changed since (the backend's
            model cache reads it again then, and only then).
    """

    model: ModelSpec = field(default_factory=ModelSpec, metadata=group())
    segmenter: SegmenterConfig = field(default_factory=SegmenterConfig, metadata=group())
    weights: Path | None = field(
        default=None,
        metadata=setting(
            "Learned attention-map weights from `refine` (W/plusplus/weights.safetensors).",
            path="file",
            exists=True,
        ),
    )
    weights_stamp: tuple[str, int, int] | None = field(default=None, compare=False, repr=False)

    @classmethod
    def from_settings(
        cls,
        model: ModelSpec | None = None,
        segmenter: SegmenterConfig | None = None,
        weights: str | os.PathLike[str] | None = None,
    ) -> ModelSettings:
        """The settings with the weights file, when given, read into ``segmenter.map_weights``.

        Raises:
            ValueError: the file cannot be read, naming it.
        """
        model = model or ModelSpec()
        segmenter = segmenter or SegmenterConfig()
        if weights is None:
            return cls(model, segmenter)
        from .weights import load_map_weights

        weights = Path(os.path.expanduser(str(weights)))
        try:
            stat = os.stat(weights)
            loaded = load_map_weights(weights)
        except OSError as err:
            raise ValueError(f"weights {str(weights)!r}: {err.strerror or err}") from None
        stamp = (str(weights.resolve()), stat.st_mtime_ns, stat.st_size)
        return cls(model, segmenter.replace(map_weights=loaded), weights, stamp)
