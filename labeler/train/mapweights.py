"""StableSeg++: learn one non-negative weight per attention map from the student's predictions.

Model. For pixel i with per-layer class maps ``m_l[i]`` (each a distribution over the C labels,
upsampled to the common size), StableSeg's probabilities with weights ``w`` are
``P[i] = normalise(sum_l w_l * m_l[i])``, the CAPM + SAPM of the segmenter with no softmax.
The weights are ``w_l = exp(theta_l)`` (non-negative by construction) and the loss is the
cross-entropy ``-log P[i, y_i]`` against the StableSeg+ student's label ``y_i``. The loss does
not change when all weights are scaled together, so the result is rescaled to the total of the
starting (uniform) weights, which keeps it comparable with the uniform plan.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F

from ..result import BACKGROUND, IGNORE
from ..sar import EPS, at_common_size, normalise
from .data import resize_mask
from .trainer_settings import MapFitConfig


@dataclass
class MapFit:
    """Result of :func:`fit_map_weights`.

    Attributes:
        weights: layer -> learned weight (summing to the starting weights' total).
        initial: layer -> starting weight.
        loss: the mini-batch loss of every step.
        initial_loss, final_loss: the loss over all sampled pixels before and after.
        pixels: how many pixels were fitted.
    """

    weights: dict[str, float]
    initial: dict[str, float]
    loss: list[float] = field(default_factory=list)
    initial_loss: float = float("nan")
    final_loss: float = float("nan")
    pixels: int = 0


def pixels_per_image(config: MapFitConfig, num_images: int) -> int:
    """How many pixels to sample from each image so all fit in ``config.max_pixels``."""
    return max(1, min(config.pixels_per_image, config.max_pixels // max(num_images, 1)))


def stack_maps(
    layer_maps: Mapping[str, np.ndarray], names: Sequence[str], size: tuple[int, int]
) -> torch.Tensor:
    """(L, C, S, S) float32: the named layers' (C, h, w) maps, bilinear to ``size``."""
    stacked = []
    for name in names:
        if name not in layer_maps:
            raise KeyError(f"layer {name!r} is missing from the cached maps")
        layer_map = torch.from_numpy(np.asarray(layer_maps[name])).float()[None]  # (1, C, h, w)
        stacked.append(at_common_size(layer_map, size)[0])  # (C, S, S)
    return torch.stack(stacked)  # (L, C, S, S)


def targets_at(
    mask: np.ndarray,
    size: tuple[int, int],
    background_index: int | None = None,
    label_ids: Sequence[int] | None = None,
) -> np.ndarray:
    """(S, S) int64 fitting targets from an (H, W) id mask: the channel of each pixel's label.

    The attention maps see the image squashed to a square, so the mask is resized (nearest)
    to the common size the same way. ``label_ids`` are the mask ids of the maps' label channels
    in channel order (an image prompted with its own labels); None means every label, id k in
    channel k - 1. A label without a channel (not prompted in this image) and 255 map to -1
    (left out). Background (0) maps to ``background_index``, the channel of a background
    prompt, when there is one; otherwise it has no map and is left out (-1).
    """
    from ..subsets import LabelSubset

    small = resize_mask(mask, (size[1], size[0])).astype(np.int64)  # (S, S)
    if label_ids is None:
        table = np.full(IGNORE + 1, -1, dtype=np.int64)  # mask id -> channel
        table[1:IGNORE] = np.arange(IGNORE - 1)
    else:
        table = LabelSubset(tuple(label_ids)).channel_table()
    table[BACKGROUND] = -1 if background_index is None else background_index
    table[IGNORE] = -1
    return table[small]


def sample_pixels(
    stacked: torch.Tensor, targets: np.ndarray, count: int, rng: np.random.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """Up to ``count`` pixels with a target: features (n, L, C) float16, labels (n,) int64."""
    num_layers, num_classes = stacked.shape[:2]
    flat_targets = targets.reshape(-1)  # (S*S,)
    valid = np.flatnonzero(flat_targets >= 0)
    if valid.size > count:
        valid = np.sort(rng.choice(valid, size=count, replace=False))
    features = stacked.reshape(num_layers, num_classes, -1)[:, :, valid]  # (L, C, n)
    features = features.permute(2, 0, 1).to(torch.float16)  # (n, L, C)
    return features, torch.from_numpy(flat_targets[valid])


class PixelSampler:
    """Collects fitting pixels image by image: (maps, student mask) -> features and labels."""

    def __init__(
        self,
        names: Sequence[str],
        common_size: tuple[int, int],
        config: MapFitConfig,
        num_images: int,
        background_index: int | None = None,
    ) -> None:
        self.names = list(names)
        self.background_index = background_index
        self.common_size = common_size
        self.count = pixels_per_image(config, num_images)
        self.rng = np.random.default_rng(config.seed)
        self.features: list[torch.Tensor] = []
        self.labels: list[torch.Tensor] = []
        self.label_pixels = 0  # sampled pixels whose target is a label, not background

    def add(
        self,
        layer_maps: Mapping[str, np.ndarray],
        student_mask: np.ndarray,
        label_ids: Sequence[int] | None = None,
    ) -> None:
        """Sample one image: its cached layer maps and the student's (H, W) predicted ids.

        ``label_ids``: the mask ids of the maps' label channels, for an image prompted with its
        own labels (its background prompt's map, if any, is the channel after them); pixels the
        student gives another label are left out. None: the maps hold every label.
        """
        background = self.background_index
        if label_ids is not None and background is not None:
            background = len(label_ids)
        targets = targets_at(student_mask, self.common_size, background, label_ids)  # (S, S)
        stacked = stack_maps(layer_maps, self.names, self.common_size)  # (L, C, S, S)
        features, labels = sample_pixels(stacked, targets, self.count, self.rng)
        self.features.append(features)  # (n, L, C)
        self.labels.append(labels)  # (n,)
        if background is None:
            self.label_pixels += len(labels)
        else:
            self.label_pixels += int((labels != background).sum())

    def background_only(self) -> str | None:
        """A warning when the student's masks give every fitted pixel to background (with a
        background prompt, whose pixels are fitted too): the weights would then be learned
        from background alone and cannot teach the labels anything. None otherwise."""
        if self.label_pixels or not sum(len(labels) for labels in self.labels):
            return None
        return (
            "the StableSeg+ student predicted only background on the pool: the map weights "
            "are fitted to background pixels alone and will not improve the labels (train "
            "the student longer, or look at its predictions in plus/pred)"
        )

    def samples(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(N, L, C) features and (N,) labels of every image added.

        Images prompted with different label sets have different channel counts; the features
        are padded with zero channels to the largest. A zero channel adds nothing to a pixel's
        normalised scores and is never a target, so the fit is the same as without padding.
        """
        if not sum(len(labels) for labels in self.labels):
            raise ValueError(
                "the StableSeg+ student predicted only background (or nothing): no pixel to fit "
                "the map weights on"
            )
        channels = max(f.shape[2] for f in self.features)
        padded = [F.pad(f, (0, channels - f.shape[2])) for f in self.features]  # (n, L, C)
        return torch.cat(padded), torch.cat(self.labels)


def weights_summary(
    fit: MapFit,
    cross: Sequence[str],
    selfs: Sequence[str],
    metadata: Mapping[str, object],
) -> dict[str, object]:
    """The human-readable weights.json written beside weights.safetensors."""
    return {
        "format": "stableseg-map-weights/1",
        "usage": "SegmenterConfig(map_weights=load_map_weights('weights.safetensors'))",
        "cross": {name: fit.weights[name] for name in cross if name in fit.weights},
        "self": {name: fit.weights[name] for name in selfs if name in fit.weights},
        "initial": fit.initial,
        **metadata,
    }


def _nll(features: torch.Tensor, labels: torch.Tensor, theta: torch.Tensor) -> torch.Tensor:
    """Mean -log P[label] with P = normalise(sum_l exp(theta_l) * features[:, l])."""
    scores = torch.einsum("nlc,l->nc", features.float(), theta.exp())  # (n, C)
    probs = normalise(scores, dim=1)  # (n, C) as the segmenter's final probabilities
    return F.nll_loss(probs.clamp(min=EPS).log(), labels)


@torch.no_grad()
def _full_loss(features: torch.Tensor, labels: torch.Tensor, theta: torch.Tensor) -> float:
    total, chunk = 0.0, 65536
    for start in range(0, len(labels), chunk):
        part = slice(start, start + chunk)
        total += float(_nll(features[part], labels[part], theta)) * len(labels[part])
    return total / max(len(labels), 1)


def fit_map_weights(
    features: torch.Tensor,
    labels: torch.Tensor,
    names: Sequence[str],
    initial: Mapping[str, float],
    config: MapFitConfig | None = None,
    on_step: Callable[[int, float], None] | None = None,
) -> MapFit:
    """Fit one non-negative weight per layer (see the module docstring).

    Args:
        features: (N, L, C) per-layer class probabilities of N sampled pixels.
        labels: (N,) 0-based label of each pixel.
        names: the L layer names, in the order of ``features``' second axis.
        initial: layer -> starting weight (the uniform plan); zeros are raised to
            ``config.init_floor`` times the mean non-zero weight.
        on_step: called with (step, loss) after every step (progress bars).
    """
    config = config or MapFitConfig()
    if features.ndim != 3 or features.shape[1] != len(names):
        raise ValueError(
            f"features must be (N, L={len(names)}, C), got shape {tuple(features.shape)}"
        )
    if len(labels) != len(features) or len(labels) == 0:
        raise ValueError(
            f"need one label per pixel and at least one pixel, got {len(labels)} labels "
            f"for {len(features)} pixels"
        )
    start = torch.tensor([float(initial.get(name, 0.0)) for name in names])  # (L,)
    nonzero = start[start > 0]
    floor = config.init_floor * (float(nonzero.mean()) if len(nonzero) else 1.0)
    total = float(start.sum()) if float(start.sum()) > 0 else float(len(names))
    theta = start.clamp(min=floor).log().clone().requires_grad_(True)  # (L,)
    optimizer = torch.optim.Adam([theta], lr=config.lr)
    generator = torch.Generator().manual_seed(config.seed)
    fit = MapFit(
        weights={},
        initial={name: float(w) for name, w in zip(names, start.tolist(), strict=True)},
        initial_loss=_full_loss(features, labels, theta.detach()),
        pixels=len(labels),
    )
    batch = min(config.batch_pixels, len(labels))
    for step in range(config.steps):
        index = torch.randint(len(labels), (batch,), generator=generator)  # (b,)
        loss = _nll(features[index], labels[index], theta)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        fit.loss.append(loss.item())
        if on_step is not None:
            on_step(step, fit.loss[-1])
    final = theta.detach()
    fit.final_loss = _full_loss(features, labels, final)
    weights = final.exp() * (total / float(final.exp().sum()))  # (L,)
    fit.weights = {name: float(w) for name, w in zip(names, weights.tolist(), strict=True)}
    return fit
