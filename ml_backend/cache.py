"""One StableSeg per process: loaded on first use, shared by every request, one pass at a time.

Label Studio rebuilds the backend's model class on every ``/setup`` call, so the class keeps no
weights: it asks :func:`get_segmenter`, which loads a model once per (source, device, dtype)
and hands out a configured view of it (sharing the weights) per configuration and learned
weights file. :data:`GPU_LOCK` serialises the passes, so many concurrent requests queue instead
of running out of GPU memory.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from typing import TYPE_CHECKING, Any

from .settings import BackendSettings

if TYPE_CHECKING:
    from labeler import SegmenterConfig, StableSeg

logger = logging.getLogger(__name__)

GPU_LOCK = threading.Lock()
"""Held while a model runs: one pass at a time per process."""

_CACHE_LOCK = threading.Lock()
_base_models: dict[tuple[str, str, str], StableSeg] = {}
_views: dict[tuple[str, str, str], tuple[tuple[Any, ...], StableSeg]] = {}


def _device_and_dtype(settings: BackendSettings) -> tuple[Any, Any]:
    import torch

    from labeler.segmenter import default_device, default_dtype

    device = torch.device(settings.device) if settings.device else default_device()
    if settings.dtype == "auto":
        return device, default_dtype(device)
    return device, getattr(torch, settings.dtype)


def _weights_key(path: str | None) -> tuple[str, int, int] | None:
    """The weights file's identity: a rewritten file (new mtime or size) is loaded again."""
    if path is None:
        return None
    try:
        stat = os.stat(path)
    except OSError as err:
        raise ValueError(f"STABLESEG_WEIGHTS {path!r} cannot be read: {err.strerror}") from None
    return os.path.abspath(path), stat.st_mtime_ns, stat.st_size


def segmenter_config(settings: BackendSettings, base: SegmenterConfig) -> SegmenterConfig:
    """The base configuration with the settings' overrides (size, batch, threshold, weights)."""
    from labeler import load_map_weights

    changes: dict[str, Any] = {}
    if settings.image_size is not None:
        changes["image_size"] = settings.image_size
    if settings.batch_size is not None:
        changes["batch_size"] = settings.batch_size
    if settings.background_threshold is not None:
        changes["background_threshold"] = settings.background_threshold
    if settings.background_prompt is not None:
        changes["background_prompt"] = settings.background_prompt
    if settings.weights is not None:
        changes["map_weights"] = load_map_weights(settings.weights)
    return base.replace(**changes)


def _keys(settings: BackendSettings) -> tuple[Any, Any, tuple[str, str, str], tuple[Any, ...]]:
    """(device, dtype, key of the loaded weights, key of the configured view)."""
    device, dtype = _device_and_dtype(settings)
    base_key = (settings.model, str(device), str(dtype))
    view_key = (
        settings.image_size,
        settings.batch_size,
        settings.background_threshold,
        settings.background_prompt,
        _weights_key(settings.weights),
    )
    return device, dtype, base_key, view_key


def get_segmenter(settings: BackendSettings) -> StableSeg:
    """The process's StableSeg for these settings, loading it on first use."""
    from labeler import SegmenterConfig, StableSeg

    device, dtype, base_key, view_key = _keys(settings)
    with _CACHE_LOCK:
        cached = _views.get(base_key)
        if cached is not None and cached[0] == view_key:
            return cached[1]
        base = _base_models.get(base_key)
        if base is None:
            started = time.monotonic()
            logger.info("loading StableSeg from %s on %s (%s)", settings.model, device, dtype)
            base = StableSeg.from_pretrained(settings.model, device=device, dtype=dtype)
            _base_models[base_key] = base
            logger.info("model loaded in %.1f s", time.monotonic() - started)
        view = base.with_config(segmenter_config(settings, SegmenterConfig()))
        _views[base_key] = (view_key, view)
        logger.info("segmenter ready: %s (%s)", view.model_version, view.config)
        return view


def loaded_models() -> list[str]:
    """Sources of the models this process holds (for /health)."""
    with _CACHE_LOCK:
        return [key[0] for key in _base_models]


def clear() -> None:
    """Forget every cached model (tests; frees memory once no request holds one)."""
    with _CACHE_LOCK:
        _base_models.clear()
        _views.clear()


def model_version(settings: BackendSettings) -> str:
    """The version predictions will carry, without loading the model when it is not loaded yet.

    Label Studio asks for it on every ``/setup`` with a 3 s timeout, too short to load a full
    Stable Diffusion; the version depends on the source, configuration and dtype only.
    """
    from labeler import SegmenterConfig, StableSeg

    _, dtype, _, _ = _keys(settings)
    config = segmenter_config(settings, SegmenterConfig())
    return StableSeg.version_for(settings.model, config, dtype)
