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
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .backend_settings import BackendSettings

if TYPE_CHECKING:
    from labeler import StableSeg
    from labeler.model_settings import ModelSettings, ModelSpec, SegmenterConfig

logger = logging.getLogger(__name__)

GPU_LOCK = threading.Lock()
"""Held while a model runs: one pass at a time per process."""

_CACHE_LOCK = threading.Lock()
_base_models: dict[tuple[str, str, str], StableSeg] = {}
_views: dict[tuple[str, str, str], tuple[str, StableSeg]] = {}


def _device_and_dtype(model: ModelSpec) -> tuple[Any, Any]:
    import torch

    from labeler.model_settings import torch_dtype
    from labeler.segmenter import default_device, default_dtype

    device = torch.device(model.device) if model.device else default_device()
    return device, torch_dtype(model.dtype) or default_dtype(device)


_weights: dict[str, tuple[tuple[int, int], dict[str, float]]] = {}


def _map_weights(path: Path, stableseg: ModelSettings) -> dict[str, float]:
    """The weights file's contents, read again when the file changes (new mtime or size).

    Weights the settings already hold for this very file (``serve`` read them once for every
    worker: ``stableseg.weights_stamp``) are taken as they are, not read again.
    """
    from labeler import load_map_weights

    try:
        stat = os.stat(path)
    except OSError as err:
        raise ValueError(
            f"STABLESEG_WEIGHTS {str(path)!r} cannot be read: {err.strerror}"
        ) from None
    key, identity = str(Path(path).resolve()), (stat.st_mtime_ns, stat.st_size)
    with _CACHE_LOCK:
        cached = _weights.get(key)
        if cached is not None and cached[0] == identity:
            return cached[1]
    held = stableseg.segmenter.map_weights
    if held is not None and stableseg.weights_stamp == (key, *identity):
        weights = dict(held)
    else:
        weights = load_map_weights(path)
    with _CACHE_LOCK:
        _weights[key] = (identity, weights)
    return weights


def segmenter_config(settings: BackendSettings) -> SegmenterConfig:
    """The settings' segmenter, with the current contents of its weights file (if any)."""
    stableseg = settings.stableseg
    config = stableseg.segmenter
    if stableseg.weights is not None:
        config = config.replace(map_weights=_map_weights(stableseg.weights, stableseg))
    return config


def get_segmenter(settings: BackendSettings) -> StableSeg:
    """The process's StableSeg for these settings, loading it on first use."""
    from labeler.jobs.models import load_stableseg

    device, dtype = _device_and_dtype(settings.model)
    base_key = (settings.model.source, str(device), str(dtype))
    config = segmenter_config(settings)
    view_key = _version(settings, config, dtype)
    with _CACHE_LOCK:
        cached = _views.get(base_key)
        if cached is not None and cached[0] == view_key:
            return cached[1]
        base = _base_models.get(base_key)
        if base is None:
            logger.info(
                "loading StableSeg from %s on %s (%s)", settings.model.source, device, dtype
            )
            spec = settings.model.replace(device=str(device), dtype=_dtype_name(dtype))
            base = load_stableseg(spec)
            _base_models[base_key] = base
        view = base.with_config(config)
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
        _weights.clear()


def _dtype_name(dtype: Any) -> str:
    """torch.float16 -> "fp16" (the spec's spelling)."""
    from labeler.model_settings import parse_dtype

    return parse_dtype(str(dtype).removeprefix("torch."))


def _version(settings: BackendSettings, config: SegmenterConfig, dtype: Any) -> str:
    from labeler import StableSeg

    # A local folder is loaded from its resolved path (labeler.jobs.models.resolve_source), and
    # the loaded model's version names that path: /setup and /versions must name it too.
    source = Path(os.path.expanduser(settings.model.source))
    key = str(source.resolve()) if source.is_dir() else settings.model.source
    return StableSeg.version_for(key, config, dtype)


def model_version(settings: BackendSettings) -> str:
    """The version predictions will carry, without loading the model when it is not loaded yet.

    Label Studio asks for it on every ``/setup`` with a 3 s timeout, too short to load a full
    Stable Diffusion; the version depends on the source, configuration and dtype only.
    """
    _, dtype = _device_and_dtype(settings.model)
    return _version(settings, segmenter_config(settings), dtype)


def is_out_of_memory(err: BaseException) -> bool:
    """A CUDA out-of-memory error (torch is looked at only when it is already imported)."""
    import sys

    torch = sys.modules.get("torch")
    return torch is not None and isinstance(err, torch.cuda.OutOfMemoryError)


def give_back_memory(device_cache: bool = False) -> None:
    """Hand memory back after a request: the C heap's free pages to the system (glibc's
    ``malloc_trim``, where there is one), and with ``device_cache`` the GPU memory PyTorch
    keeps cached (after an out-of-memory error, so the next request finds it free)."""
    import gc
    import sys

    if device_cache:
        gc.collect()  # the failed pass's tensors, held by reference cycles of its frames
        torch = sys.modules.get("torch")
        if torch is not None and torch.cuda.is_available() and torch.cuda.is_initialized():
            torch.cuda.empty_cache()
    trim = _malloc_trim()
    if trim is not None:
        trim(0)


_trim: list[Any] = []


def _malloc_trim() -> Any:
    """glibc's ``malloc_trim``, or None (another C library, another system)."""
    if not _trim:
        import ctypes
        import ctypes.util

        function = None
        try:
            library = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
            function = library.malloc_trim
            function.argtypes = [ctypes.c_size_t]
            function.restype = ctypes.c_int
        except (OSError, AttributeError):
            function = None
        _trim.append(function)
    return _trim[0]
