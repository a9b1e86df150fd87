"""The StableSeg++ cache of one image: every attention layer's class map, fp16, as safetensors.

Bytes in, bytes out; the job writes them atomically under ``W/cache``.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

CACHE_FORMAT = "stableseg-map-cache/1"


def maps_to_bytes(
    layer_maps: Mapping[str, np.ndarray],
    labels: Sequence[str],
    image_size: tuple[int, int],
    extra: Mapping[str, Any] | None = None,
) -> bytes:
    """Serialise layer -> (C, h, w) maps (stored as float16) with the labels and image size."""
    from safetensors.numpy import save

    tensors = {name: np.ascontiguousarray(m, dtype=np.float16) for name, m in layer_maps.items()}
    header = {
        "format": CACHE_FORMAT,
        "labels": json.dumps(list(labels)),
        "image_size": json.dumps(list(image_size)),
        "extra": json.dumps(dict(extra or {})),
    }
    return save(tensors, metadata=header)


def maps_from_bytes(
    data: bytes, where: str = "the cache entry"
) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    """Inverse of :func:`maps_to_bytes`: (layer -> (C, h, w) float16, header dict)."""
    from safetensors.numpy import load

    if len(data) < 8:
        raise ValueError(f"{where} is not a map cache file (too short)")
    header_len = int.from_bytes(data[:8], "little")
    try:
        header = json.loads(data[8 : 8 + header_len]).get("__metadata__") or {}
        maps = load(data)
    except Exception as err:  # safetensors raises its own error types
        raise ValueError(f"{where} is not a readable safetensors file: {err}") from None
    if header.get("format") != CACHE_FORMAT:
        raise ValueError(f"{where} is not a map cache file (format {CACHE_FORMAT})")
    info = {
        "labels": json.loads(header["labels"]),
        "image_size": tuple(json.loads(header["image_size"])),
        "extra": json.loads(header.get("extra", "{}")),
    }
    return maps, info
