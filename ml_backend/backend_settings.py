"""The backend's settings: one frozen dataclass whose fields declare their variables.

Every field a user sets is declared here (:func:`labeler.settings.setting`) with its variable:
``STABLESEG_*`` for our own, and the names Label Studio's tools already use
(``LABEL_STUDIO_URL``, ``LABEL_STUDIO_API_KEY``, ``LOCAL_FILES_DOCUMENT_ROOT``, ``BASIC_AUTH_USER``,
``BASIC_AUTH_PASS``, ``MODEL_DIR``). The model and segmenter are the settings of
:class:`labeler.model_settings.ModelSettings`, exactly as ``pseudo-label`` takes them; Start
Training's student is :class:`labeler.train.trainer_settings.StudentConfig`
(``STABLESEG_REFINE_*``). ``docs/settings.md`` lists every variable with its default, generated
from these declarations.

:meth:`BackendSettings.from_env` reads the variables (a Docker container, ``gunicorn
ml_backend._wsgi:app``, label-studio-ml's launcher). ``stableseg serve`` reads them once, with
its options, validates them and hands its workers the result as one JSON object
(:data:`SETTINGS_VARIABLE`); :meth:`BackendSettings.load` takes that object when it is there.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from dataclasses import dataclass, field

from labeler.images import DEFAULT_MAX_PIXELS
from labeler.model_settings import ModelSettings, ModelSpec
from labeler.result import MAX_LABELS
from labeler.settings import (
    build,
    from_json,
    group,
    integer,
    number,
    own_settings,
    read_env,
    setting,
    settings_group,
)
from labeler.settings import to_json as settings_to_json
from labeler.train.trainer_settings import StudentConfig

from .allowed_hosts import parse_allowed_hosts

SETTINGS_VARIABLE = "STABLESEG_SETTINGS_JSON"
"""The variable through which ``serve`` hands its workers their settings, validated, as JSON."""
WARM_UP_MODES = ("background", "sync", "off")


@settings_group("Backend (serve, Docker)", env_prefix="STABLESEG_")
@dataclass(frozen=True)
class BackendSettings:
    """Everything the backend reads from its environment, validated (see the module).

    Attributes:
        stableseg: the model and the segmenter, exactly as ``pseudo-label`` takes them.
        student: the DeepLabV3+ students of Start Training's refine runs.
    """

    stableseg: ModelSettings = field(default_factory=ModelSettings, metadata=group())
    label_studio_url: str | None = field(
        default=None,
        metadata=setting(
            "Label Studio's address, as its task URLs name it: /data/upload/... images are "
            "downloaded from it (with the API key), and it is always on the allow-list.",
            env_prefix="",
            aliases=("LABEL_STUDIO_HOST",),
            option=False,
            metavar="URL",
        ),
    )
    label_studio_api_key: str | None = field(
        default=None,
        metadata=setting(
            "A Label Studio personal access token or legacy token; sent to LABEL_STUDIO_URL only.",
            env_prefix="",
            aliases=("LABEL_STUDIO_ACCESS_TOKEN",),
            option=False,
        ),
        repr=False,
    )
    local_files_document_root: str | None = field(
        default=None,
        metadata=setting(
            "Read /data/local-files/?d=... from this folder (or object storage URL, "
            "s3://bucket/prefix: docs/storage.md) instead of downloading; paths that leave it "
            "are refused.",
            env_prefix="",
            aliases=("LABEL_STUDIO_LOCAL_FILES_DOCUMENT_ROOT",),
            option=False,
            metavar="DIR",
        ),
    )
    max_image_bytes: int = field(
        default=50_000_000,
        metadata=setting(
            "Largest image download accepted, in bytes (the task fails).",
            parse=integer(minimum=1),
            option=False,
            metavar="BYTES",
        ),
    )
    max_pixels: int = field(
        default=DEFAULT_MAX_PIXELS,
        metadata=setting(
            "Largest image accepted, in pixels.",
            parse=integer(minimum=1),
            option=False,
            metavar="PIXELS",
        ),
    )
    http_timeout: float = field(
        default=30.0,
        metadata=setting(
            "Seconds for one image download, all in all.",
            parse=number(above=0.0),
            option=False,
            metavar="S",
        ),
    )
    allowed_hosts: tuple[str, ...] = field(
        default=(),
        metadata=setting(
            "Hosts, IP addresses and CIDR networks image URLs may reach besides public "
            "addresses, comma-separated (e.g. 10.0.0.0/8,images.local).",
            parse=parse_allowed_hosts,
            format=",".join,
            option=False,
            metavar="HOSTS",
            default_text="none",
        ),
    )
    basic_auth_user: str | None = field(
        default=None,
        metadata=setting("Require HTTP basic auth on every route: its user name.", env_prefix=""),
    )
    basic_auth_pass: str | None = field(
        default=None,
        metadata=setting("Its password.", env_prefix=""),
        repr=False,
    )
    refine_dir: str = field(
        default=os.path.join("~", ".cache", "stableseg", "refine"),
        metadata=setting("Where Start Training's refine runs go.", option=False, metavar="DIR"),
    )
    student: StudentConfig = field(default_factory=StudentConfig, metadata=group(options=False))
    max_body_bytes: int = field(
        default=8_000_000,
        metadata=setting(
            "Largest request body, in bytes (413, checked after basic auth and before anything "
            "reads the body).",
            parse=integer(minimum=1),
            option=False,
            metavar="BYTES",
        ),
    )
    max_labels: int = field(
        default=MAX_LABELS,
        metadata=setting(
            "Labels a project may have (400 at /setup and /predict; may only be lowered: the "
            "most an 8-bit mask holds next to background and ignore).",
            parse=integer(minimum=1),
            option=False,
            metavar="N",
        ),
    )
    max_tasks: int = field(
        default=32,
        metadata=setting(
            "Tasks one /predict may carry (413): what fits Label Studio's 100 s "
            "ML_TIMEOUT_PREDICT on a GPU; pre-annotate larger selections with `stableseg "
            "label-studio predict`.",
            parse=integer(minimum=1),
            option=False,
            metavar="N",
        ),
    )
    request_timeout: float = field(
        default=30.0,
        metadata=setting(
            "Seconds a client has to send a request's head (else the connection is closed), "
            "and again its body (else 408).",
            parse=number(above=0.0),
            option=False,
            metavar="S",
        ),
    )
    download_budget: float = field(
        default=60.0,
        metadata=setting(
            "Seconds the image downloads of one /predict may take together (while any of them "
            "runs or waits for a slot; the model's time does not count). A task whose image it "
            "cuts off gets no prediction and an error naming this variable; the others are "
            "predicted.",
            parse=number(above=0.0),
            option=False,
            metavar="S",
        ),
    )
    max_downloads: int = field(
        default=8,
        metadata=setting(
            "Image downloads a worker process runs at once, all requests together; the others "
            "wait for a slot within their request's download budget.",
            parse=integer(minimum=1),
            option=False,
            metavar="N",
        ),
    )
    warm_up: str = field(
        default=WARM_UP_MODES[0],
        metadata=setting(
            "When the model loads: background (a thread starts loading it as the server "
            "starts), sync (before serving; what gunicorn's --preload wants) or off (on the "
            "first prediction). serve sets it.",
            choices=WARM_UP_MODES,
            option=False,
        ),
    )

    def __post_init__(self) -> None:
        variable = {item.field: item.env for item in own_settings(type(self))}
        object.__setattr__(self, "allowed_hosts", parse_allowed_hosts(self.allowed_hosts))
        if bool(self.basic_auth_user) != bool(self.basic_auth_pass):
            raise ValueError(
                f"{variable['basic_auth_user']} and {variable['basic_auth_pass']} must be set "
                "together"
            )
        for name in (
            "max_image_bytes",
            "max_pixels",
            "http_timeout",
            "max_body_bytes",
            "max_labels",
            "max_tasks",
            "request_timeout",
            "download_budget",
            "max_downloads",
        ):
            if getattr(self, name) <= 0:
                raise ValueError(f"{variable[name]} must be positive, got {getattr(self, name)}")
        if self.max_labels > MAX_LABELS:
            raise ValueError(
                f"{variable['max_labels']} is {self.max_labels}; it may only lower the limit of "
                f"{MAX_LABELS} labels (the most an 8-bit mask holds next to background and ignore)"
            )
        if self.warm_up not in WARM_UP_MODES:
            raise ValueError(
                f"{variable['warm_up']} must be one of {', '.join(WARM_UP_MODES)}, "
                f"got {self.warm_up!r}"
            )

    @property
    def model(self) -> ModelSpec:
        return self.stableseg.model

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> BackendSettings:
        """The settings of the variables in ``env`` (default ``os.environ``); empty values count
        as unset. Raises ``ValueError`` naming the variable that is wrong."""
        return build(cls, read_env(cls, env))

    @classmethod
    def load(cls, env: Mapping[str, str] | None = None) -> BackendSettings:
        """This process's settings: the object ``serve`` handed over (:data:`SETTINGS_VARIABLE`,
        read and validated once by ``serve``; the map weights it loaded included), or else
        :meth:`from_env`."""
        env = os.environ if env is None else env
        handed = env.get(SETTINGS_VARIABLE, "").strip()
        if not handed:
            return cls.from_env(env)
        try:
            return from_json(cls, json.loads(handed))
        except (ValueError, TypeError) as err:
            raise ValueError(f"{SETTINGS_VARIABLE}: {err}") from None

    def to_json(self) -> str:
        """The settings as one JSON text that :meth:`load` reads back (``serve`` -> workers)."""
        return json.dumps(settings_to_json(self), sort_keys=True)
