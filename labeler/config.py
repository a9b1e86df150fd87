"""Every default of the method in one place."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from typing import Any


@dataclass(frozen=True)
class SegmenterConfig:
    """How StableSeg turns one UNet pass into masks.

    Attributes:
        image_size: side of the square the image is resized to before the VAE (512 for SD 1.x
            and 2.x base; 768 for SD 2.x v-models). Masks come back at the original size.
        timestep: the UNet timestep of the single pass (the paper uses 1). No noise is added.
        cross_sizes: side lengths of the cross-attention maps averaged into the class map (CAPM).
            ``None`` takes the two smallest the UNet offers (8 and 16 at 512 px).
        self_sizes: side lengths of the self-attention layers used by Self-Attention Refinement.
            ``None`` takes all of them.
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
    cross_sizes: tuple[int, ...] | None = None
    self_sizes: tuple[int, ...] | None = None
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
        if self.background_prompt is not None and not self.background_prompt.strip():
            raise ValueError("background_prompt must be a word or None, got a blank string")
        if self.self_only and not self.use_sar:
            raise ValueError("self_only=True needs use_sar=True (the final map comes from SAR)")
        for name in ("cross_sizes", "self_sizes"):
            sizes = getattr(self, name)
            if sizes is not None:
                if not sizes or any(int(s) <= 0 for s in sizes):
                    raise ValueError(f"{name} must be None or positive sizes, got {sizes!r}")
                object.__setattr__(self, name, tuple(int(s) for s in sizes))
        if self.map_weights is not None:
            bad = {k: v for k, v in self.map_weights.items() if not v >= 0.0}
            if bad:
                raise ValueError(f"map_weights must be non-negative, got {bad}")
            object.__setattr__(self, "map_weights", dict(self.map_weights))

    def replace(self, **changes: Any) -> SegmenterConfig:
        """A copy with some fields changed (validated again)."""
        return replace(self, **changes)
