"""The backend's settings, read from environment variables (Label Studio's convention).

``python cli.py serve`` turns its options into these variables, so gunicorn workers, the
development server and a Docker container are all configured the same way.

Model and segmenter: every row of :data:`labeler.settings.SETTINGS`, as ``STABLESEG_<OPTION>``:
``STABLESEG_MODEL`` (or ``MODEL_DIR``; hub id or local diffusers folder), ``STABLESEG_DEVICE``,
``STABLESEG_DTYPE``, ``STABLESEG_COMPILE``, ``STABLESEG_IMAGE_SIZE``, ``STABLESEG_BATCH_SIZE``,
``STABLESEG_TIMESTEP``, ``STABLESEG_CROSS_SIZES``, ``STABLESEG_SELF_SIZES``, ``STABLESEG_SAR``,
``STABLESEG_SELF_ONLY``, ``STABLESEG_PROMPT_TEMPLATE``, ``STABLESEG_BACKGROUND_PROMPT``,
``STABLESEG_BACKGROUND_THRESHOLD`` and ``STABLESEG_WEIGHTS`` (learned map weights, StableSeg++),
with the defaults of ``pseudo-label``.

Images: ``LABEL_STUDIO_URL`` and ``LABEL_STUDIO_API_KEY`` (legacy token or personal access
token) for ``/data/upload/...`` and co., ``LOCAL_FILES_DOCUMENT_ROOT`` to read
``/data/local-files/?d=...`` from disk, ``STABLESEG_MAX_IMAGE_BYTES`` (50 MB),
``STABLESEG_MAX_PIXELS`` (100 MP), ``STABLESEG_HTTP_TIMEOUT`` (30 s a download, all in all),
``STABLESEG_ALLOWED_HOSTS`` (hosts, IPs, CIDRs image URLs may reach besides public addresses).

Server: ``BASIC_AUTH_USER`` and ``BASIC_AUTH_PASS`` require HTTP basic auth on every route.

Limits on one request (each refused with a 4xx JSON error naming the limit and its variable;
see :mod:`ml_backend.limits`): ``STABLESEG_MAX_BODY_BYTES`` (8 MB of request body),
``STABLESEG_MAX_LABELS`` (254 labels a project, the most a mask holds; may only be lowered),
``STABLESEG_MAX_TASKS`` (32 tasks a ``/predict``), ``STABLESEG_REQUEST_TIMEOUT`` (30 s for a
client to send a request's head, and again for its body).

Training (Start Training in Label Studio runs ``refine`` on the project's images, with the same
model and segmenter settings as the predictions): ``STABLESEG_REFINE_DIR`` (where runs go;
default ``~/.cache/stableseg/refine``), ``STABLESEG_REFINE_ENCODER`` (resnet50),
``STABLESEG_REFINE_ENCODER_WEIGHTS`` (imagenet or none; imagenet needs the weights downloadable
or cached), ``STABLESEG_REFINE_EPOCHS`` (20), ``STABLESEG_REFINE_IMAGE_SIZE`` (512, the
student's crop side).
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field

from labeler.model_settings import ModelSettings, ModelSpec, SegmenterConfig
from labeler.result import MAX_LABELS
from labeler.settings import build, read_env
from labeler.train.trainer_settings import StudentConfig

from .allowed_hosts import parse_allowed_hosts

DEFAULT_MAX_IMAGE_BYTES = 50_000_000
DEFAULT_MAX_PIXELS = 100_000_000
DEFAULT_HTTP_TIMEOUT = 30.0
DEFAULT_REFINE_DIR = os.path.join("~", ".cache", "stableseg", "refine")
DEFAULT_MAX_BODY_BYTES = 8_000_000
DEFAULT_MAX_TASKS = 32
DEFAULT_REQUEST_TIMEOUT = 30.0


def _default_stableseg() -> ModelSettings:
    return ModelSettings(ModelSpec(), SegmenterConfig())


@dataclass(frozen=True)
class BackendSettings:
    """Everything the backend reads from its environment, validated.

    Attributes:
        stableseg: the model and the segmenter, exactly as ``pseudo-label`` takes them.
    """

    stableseg: ModelSettings = field(default_factory=_default_stableseg)
    label_studio_url: str | None = None
    api_key: str | None = None
    local_files_root: str | None = None
    max_image_bytes: int = DEFAULT_MAX_IMAGE_BYTES
    max_pixels: int = DEFAULT_MAX_PIXELS
    http_timeout: float = DEFAULT_HTTP_TIMEOUT
    allowed_hosts: tuple[str, ...] = ()
    basic_auth_user: str | None = None
    basic_auth_pass: str | None = None
    refine_dir: str = DEFAULT_REFINE_DIR
    student: StudentConfig = field(default_factory=StudentConfig)
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES
    max_labels: int = MAX_LABELS
    max_tasks: int = DEFAULT_MAX_TASKS
    request_timeout: float = DEFAULT_REQUEST_TIMEOUT

    def __post_init__(self) -> None:
        object.__setattr__(self, "allowed_hosts", parse_allowed_hosts(self.allowed_hosts))
        if bool(self.basic_auth_user) != bool(self.basic_auth_pass):
            raise ValueError("BASIC_AUTH_USER and BASIC_AUTH_PASS must be set together")
        for name in ("max_image_bytes", "max_pixels", "http_timeout"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")
        for name, variable in _LIMIT_VARIABLES.items():
            if getattr(self, name) <= 0:
                raise ValueError(f"{variable} must be positive, got {getattr(self, name)}")
        if self.max_labels > MAX_LABELS:
            raise ValueError(
                f"STABLESEG_MAX_LABELS is {self.max_labels}; it may only lower the limit of "
                f"{MAX_LABELS} labels (the most an 8-bit mask holds next to background and ignore)"
            )

    @property
    def model(self) -> ModelSpec:
        return self.stableseg.model

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
            stableseg=_model_settings(env),
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
            allowed_hosts=parse_allowed_hosts(get("STABLESEG_ALLOWED_HOSTS")),
            basic_auth_user=get("BASIC_AUTH_USER"),
            basic_auth_pass=get("BASIC_AUTH_PASS"),
            refine_dir=get("STABLESEG_REFINE_DIR") or DEFAULT_REFINE_DIR,
            student=_student(env),
            max_body_bytes=_number(get("STABLESEG_MAX_BODY_BYTES"), int, "STABLESEG_MAX_BODY_BYTES")
            or DEFAULT_MAX_BODY_BYTES,
            max_labels=_number(get("STABLESEG_MAX_LABELS"), int, "STABLESEG_MAX_LABELS")
            or MAX_LABELS,
            max_tasks=_number(get("STABLESEG_MAX_TASKS"), int, "STABLESEG_MAX_TASKS")
            or DEFAULT_MAX_TASKS,
            request_timeout=_number(
                get("STABLESEG_REQUEST_TIMEOUT"), float, "STABLESEG_REQUEST_TIMEOUT"
            )
            or DEFAULT_REQUEST_TIMEOUT,
        )


_LIMIT_VARIABLES = {
    "max_body_bytes": "STABLESEG_MAX_BODY_BYTES",
    "max_labels": "STABLESEG_MAX_LABELS",
    "max_tasks": "STABLESEG_MAX_TASKS",
    "request_timeout": "STABLESEG_REQUEST_TIMEOUT",
}
"""The request limits (see :mod:`ml_backend.limits`) and the variables that set them."""


def _student(env: Mapping[str, str]) -> StudentConfig:
    try:
        return build(StudentConfig, read_env(StudentConfig, env))
    except ValueError as err:
        raise ValueError(f"STABLESEG_REFINE_* settings: {err}") from None


def _number(value: str | None, kind: type, name: str) -> int | float | None:
    if value is None:
        return None
    try:
        return kind(value)
    except ValueError:
        raise ValueError(f"{name} must be {kind.__name__}, got {value!r}") from None


def _model_settings(env: Mapping[str, str]) -> ModelSettings:
    try:
        return build(ModelSettings, read_env(ModelSettings, env))
    except ValueError as err:
        raise ValueError(f"STABLESEG_* settings: {err}") from None
