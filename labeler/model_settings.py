"""Every default of the method in one place: the segmenter's settings and the model to load.

:class:`SegmenterConfig` says how masks are made; :class:`ModelSpec` says which weights run
where. Every entry point (``pseudo-label``, ``refine``, ``serve``, Start Training, ``benchmark``)
carries these two objects unchanged from its options to the model; :mod:`labeler.settings` is the
one table that exposes their fields as command-line options and environment variables.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass, field, replace
from typing import Any

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


@dataclass(frozen=True)
class SegmenterConfig:
    """How StableSeg turns one UNet pass into masks.

    Attributes:
        image_size: side of the square the image is resized to before the VAE (512 for SD 1.x
            and 2.x base; 768 for SD 2.x v-models). Masks come back at the original size.
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
        background_threshold: ``None`` gives every pixel a label; otherwise pixels whose best
            normalised probability is below this value become background (0).
        background_prompt: a word (e.g. ``"background"``) prompted after the labels as one more
            class; pixels it wins become background (0). ``None``: no such class.
        batch_size: images per UNet pass.
        map_weights: learned weight per attention layer (layer name -> weight), as written by
            the StableSeg++ trainer. ``None`` means uniform: the CAPM is the mean of the chosen
            cross-attention layers and the SAPM the mean of the chosen self-attention layers.
            When given, the weights are used as they are (layers not named get 0) and the size
            selections above are ignored.
    """

    image_size: int = 512
    timestep: int = 1
    cross_sizes: SizeSelection = None
    self_sizes: SizeSelection = None
    use_sar: bool = True
    self_only: bool = False
    prompt_template: str = "{}"
    label_separator: str = ", "
    background_threshold: float | None = None
    background_prompt: str | None = None
    batch_size: int = 4
    map_weights: Mapping[str, float] | None = field(default=None, compare=True)

    def __post_init__(self) -> None:
        if self.image_size < 8 or self.image_size % 8:
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
        thr = self.background_threshold
        if thr is not None and not 0.0 <= thr <= 1.0:
            raise ValueError(f"background_threshold must be in [0, 1] or None, got {thr}")
        if self.background_prompt is not None:
            from .labels import normalise_label

            prompt = normalise_label(self.background_prompt, "background_prompt")
            object.__setattr__(self, "background_prompt", prompt)
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
        for name in ("cross_sizes", "self_sizes"):
            if isinstance(data[name], tuple):
                data[name] = list(data[name])
        return data


@dataclass(frozen=True)
class ModelSpec:
    """Which Stable Diffusion to load, and where and how it runs.

    Attributes:
        source: a hub id or a local diffusers folder (with ``model_index.json``).
        device: a torch device string; None: CUDA when present, else CPU.
        dtype: ``"fp16"``, ``"bf16"``, ``"fp32"`` or None (fp16 on CUDA, fp32 elsewhere);
            other spellings are normalised by :func:`parse_dtype`.
        compile: ``torch.compile`` the UNet (worth it for long runs on a GPU).
    """

    source: str = DEFAULT_MODEL
    device: str | None = None
    dtype: str | None = None
    compile: bool = False

    def __post_init__(self) -> None:
        if not isinstance(self.source, str) or not self.source.strip():
            raise ValueError(f"model must be a hub id or a folder, got {self.source!r}")
        object.__setattr__(self, "source", self.source.strip())
        object.__setattr__(self, "dtype", parse_dtype(self.dtype))
        if self.device is not None:
            object.__setattr__(self, "device", str(self.device).strip() or None)

    def replace(self, **changes: Any) -> ModelSpec:
        return replace(self, **changes)
