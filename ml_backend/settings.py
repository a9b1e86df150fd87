"""The backend's settings, read from environment variables (Label Studio's convention).

``python cli.py serve`` turns its options into these variables, so gunicorn workers, the
development server and a Docker container are all configured the same way.

Model: ``STABLESEG_MODEL`` or ``MODEL_DIR`` (hub id or local diffusers folder; the first wins;
default ``runwayml/stable-diffusion-v1-5``), ``STABLESEG_DEVICE`` (default CUDA when present),
``STABLESEG_DTYPE`` (auto, float32, float16, bfloat16; auto = fp16 on CUDA),
``STABLESEG_IMAGE_SIZE`` (512), ``STABLESEG_BATCH_SIZE`` (4), ``STABLESEG_BACKGROUND_THRESHOLD``
(none: every pixel gets a label), ``STABLESEG_WEIGHTS`` (learned map weights, StableSeg++).

Images: ``LABEL_STUDIO_URL`` and ``LABEL_STUDIO_API_KEY`` (legacy token or personal access
token) for ``/data/upload/...`` and co., ``LOCAL_FILES_DOCUMENT_ROOT`` to read
``/data/local-files/?d=...`` from disk, ``STABLESEG_MAX_IMAGE_BYTES`` (50 MB),
``STABLESEG_MAX_PIXELS`` (100 MP), ``STABLESEG_HTTP_TIMEOUT`` (30 s a download).

Server: ``BASIC_AUTH_USER`` and ``BASIC_AUTH_PASS`` require HTTP basic auth on every route.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass

DEFAULT_MODEL = "runwayml/stable-diffusion-v1-5"
DTYPES = ("auto", "float32", "float16", "bfloat16")
DEFAULT_MAX_IMAGE_BYTES = 50_000_000
DEFAULT_MAX_PIXELS = 100_000_000
DEFAULT_HTTP_TIMEOUT = 30.0


@dataclass(frozen=True)
class BackendSettings:
    """Everything the backend reads from its environment, validated."""

    model: str = DEFAULT_MODEL
    device: str | None = None
    dtype: str = "auto"
    image_size: int | None = None
    batch_size: int | None = None
    background_threshold: float | None = None
    weights: str | None = None
    label_studio_url: str | None = None
    api_key: str | None = None
    local_files_root: str | None = None
    max_image_bytes: int = DEFAULT_MAX_IMAGE_BYTES
    max_pixels: int = DEFAULT_MAX_PIXELS
    http_timeout: float = DEFAULT_HTTP_TIMEOUT
    basic_auth_user: str | None = None
    basic_auth_pass: str | None = None

    def __post_init__(self) -> None:
        if self.dtype not in DTYPES:
            raise ValueError(f"STABLESEG_DTYPE must be one of {DTYPES}, got {self.dtype!r}")
        if bool(self.basic_auth_user) != bool(self.basic_auth_pass):
            raise ValueError("BASIC_AUTH_USER and BASIC_AUTH_PASS must be set together")
        for name in ("max_image_bytes", "max_pixels", "http_timeout"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> BackendSettings:
        """Read the settings from ``env`` (default ``os.environ``); empty values count as unset."""
        env = os.environ if env is None else env

        def get(*names: str) -> str | None:
            for name in names:
                value = env.get(name, "").strip()
                if value:
                    return value
            return None

        return cls(
            model=get("STABLESEG_MODEL", "MODEL_DIR") or DEFAULT_MODEL,
            device=get("STABLESEG_DEVICE"),
            dtype=(get("STABLESEG_DTYPE") or "auto").lower(),
            image_size=_number(get("STABLESEG_IMAGE_SIZE"), int, "STABLESEG_IMAGE_SIZE"),
            batch_size=_number(get("STABLESEG_BATCH_SIZE"), int, "STABLESEG_BATCH_SIZE"),
            background_threshold=_number(
                get("STABLESEG_BACKGROUND_THRESHOLD"), float, "STABLESEG_BACKGROUND_THRESHOLD"
            ),
            weights=get("STABLESEG_WEIGHTS"),
            label_studio_url=get("LABEL_STUDIO_URL", "LABEL_STUDIO_HOST"),
            api_key=get("LABEL_STUDIO_API_KEY", "LABEL_STUDIO_ACCESS_TOKEN"),
            local_files_root=get(
                "LOCAL_FILES_DOCUMENT_ROOT", "LABEL_STUDIO_LOCAL_FILES_DOCUMENT_ROOT"
            ),
            max_image_bytes=_number(
                get("STABLESEG_MAX_IMAGE_BYTES"), int, "STABLESEG_MAX_IMAGE_BYTES"
            )
            or DEFAULT_MAX_IMAGE_BYTES,
            max_pixels=_number(get("STABLESEG_MAX_PIXELS"), int, "STABLESEG_MAX_PIXELS")
            or DEFAULT_MAX_PIXELS,
            http_timeout=_number(get("STABLESEG_HTTP_TIMEOUT"), float, "STABLESEG_HTTP_TIMEOUT")
            or DEFAULT_HTTP_TIMEOUT,
            basic_auth_user=get("BASIC_AUTH_USER"),
            basic_auth_pass=get("BASIC_AUTH_PASS"),
        )


def _number(value: str | None, kind: type, name: str) -> int | float | None:
    if value is None:
        return None
    try:
        return kind(value)
    except ValueError:
        raise ValueError(f"{name} must be {kind.__name__}, got {value!r}") from None
