"""Learned per-attention-map weights (StableSeg++): a safetensors tensor and a JSON header.

The trainer writes the bytes (the CLI owns files); ``StableSeg`` reads them back through
``load_map_weights`` and ``SegmenterConfig(map_weights=...)``.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from os import PathLike
from pathlib import Path
from typing import Any

import torch

FORMAT = "stableseg-map-weights/1"


def map_weights_to_bytes(
    weights: Mapping[str, float], metadata: Mapping[str, Any] | None = None
) -> bytes:
    """Serialise layer -> weight as safetensors; ``metadata`` goes into the header as JSON."""
    from safetensors.torch import save

    names = sorted(weights)
    values = torch.tensor([float(weights[n]) for n in names], dtype=torch.float32)
    header = {
        "format": FORMAT,
        "layers": json.dumps(names),
        "metadata": json.dumps(dict(metadata or {})),
    }
    return save({"weights": values}, metadata=header)


def _parse(
    tensors: Mapping[str, torch.Tensor], header: Mapping[str, str] | None, where: str
) -> dict[str, float]:
    header = header or {}
    if header.get("format") != FORMAT or "weights" not in tensors:
        raise ValueError(f"{where} is not a StableSeg map-weights file (format {FORMAT})")
    names = json.loads(header["layers"])
    values = tensors["weights"].tolist()
    if len(names) != len(values):
        raise ValueError(f"{where}: {len(names)} layer names for {len(values)} weights")
    return dict(zip(names, (float(v) for v in values), strict=True))


def map_weights_from_bytes(data: bytes, where: str = "the given bytes") -> dict[str, float]:
    """Inverse of :func:`map_weights_to_bytes`."""
    from safetensors.torch import load

    if len(data) < 8:
        raise ValueError(f"{where} is not a StableSeg map-weights file (too short)")
    # safetensors.torch.load drops the header's metadata; read it from the raw bytes.
    header_len = int.from_bytes(data[:8], "little")
    try:
        header = json.loads(data[8 : 8 + header_len]).get("__metadata__")
        tensors = load(data)
    except Exception as err:  # safetensors raises its own error types
        raise ValueError(f"{where} is not a readable safetensors file: {err}") from None
    return _parse(tensors, header, where)


def load_map_weights(path: str | PathLike[str]) -> dict[str, float]:
    """Read a map-weights file written from :func:`map_weights_to_bytes` bytes."""
    return map_weights_from_bytes(Path(path).read_bytes(), where=str(path))
