"""``python cli.py serve``: the Label Studio ML backend, served by gunicorn.

gunicorn runs the backend's own worker class (:mod:`ml_backend.worker`: gthread whose threads
only take requests whose head has fully arrived, so slow clients cannot starve ``/health``).
Listening beyond loopback without basic auth prints a warning that says what is exposed; the
development server (``--dev-server``) refuses it and never runs Werkzeug's debugger
(:mod:`ml_backend.serving`).

Every setting of the backend is read once, here, from the options and the environment
(:class:`ml_backend.backend_settings.BackendSettings`, its declarations), validated, and handed
to the workers as one JSON object (``STABLESEG_SETTINGS_JSON``): they parse nothing again, and
the learned map weights (``--weights``) are read once, here.

Only click and the settings declarations are imported at module level, so ``--help`` stays fast;
torch, Flask and the backend load inside the command.
"""

from __future__ import annotations

from typing import Any

import click

from ml_backend.backend_settings import BackendSettings

from .common import settings_options


@click.command(context_settings={"show_default": True})
@settings_options(BackendSettings, "backend", environment=True, build=False)
@click.option(
    "--host",
    default="127.0.0.1",
    help="Address to listen on (0.0.0.0 for all: set basic auth then).",
)
@click.option("--port", type=click.IntRange(1, 65535), default=9090)
@click.option(
    "--workers",
    type=click.IntRange(min=1),
    default=1,
    help="Gunicorn worker processes; each holds its own copy of the model.",
)
@click.option(
    "--threads",
    type=click.IntRange(min=1),
    default=4,
    help="Threads a worker; they share the model and run one pass at a time.",
)
@click.option(
    "--dev-server",
    is_flag=True,
    help="Use Flask's development server instead of gunicorn (loopback only without basic "
    "auth; never the debugger).",
)
@click.option(
    "--log-level",
    type=click.Choice(["DEBUG", "INFO", "WARNING", "ERROR"], case_sensitive=False),
    default="INFO",
)
def serve(
    backend: dict[str, Any],
    host: str,
    port: int,
    workers: int,
    threads: int,
    dev_server: bool,
    log_level: str,
) -> None:
    """Label Studio ML backend that pre-annotates tasks with StableSeg brush masks.

    \b
    Connect it in Label Studio: Project > Settings > Model > Connect Model,
    URL http://HOST:PORT. Images are fetched with LABEL_STUDIO_URL and
    LABEL_STUDIO_API_KEY, or read from LOCAL_FILES_DOCUMENT_ROOT.

    \b
    Every option also reads its variable (--image-size: STABLESEG_IMAGE_SIZE,
    ...; --model also MODEL_DIR, Label Studio's Docker convention); an option
    given on the command line wins. The backend's other settings (limits,
    allow-list, Start Training) come from their variables: docs/settings.md.
    """
    from ml_backend.serving import check_dev_server, exposure_warning

    use_dev_server = dev_server or not _has_gunicorn()
    basic_auth = bool(backend.get("basic_auth_user"))
    if use_dev_server:
        try:
            check_dev_server(host, basic_auth)
        except ValueError as err:
            raise click.UsageError(str(err)) from None
    else:
        warning = exposure_warning(host, basic_auth)
        if warning:
            click.echo(warning, err=True)
    settings = _settings(backend)
    if use_dev_server:
        _run_dev_server(settings, host, port, log_level)
    else:
        _exec_gunicorn(settings, host, port, workers, threads, log_level)


def _settings(values: dict[str, Any]) -> BackendSettings:
    """The backend's settings, validated (a usage error otherwise), with the paths made absolute:
    the workers may start elsewhere. The map weights are read here, once."""
    import os
    from dataclasses import replace

    from labeler.jobs.storage import is_url
    from labeler.settings import build

    try:
        settings = build(BackendSettings, values)
    except ValueError as err:
        raise click.UsageError(str(err)) from None
    stableseg = settings.stableseg
    source = os.path.expanduser(stableseg.model.source)
    if os.path.isdir(source):
        stableseg = replace(
            stableseg, model=stableseg.model.replace(source=os.path.abspath(source))
        )
    if stableseg.weights is not None:
        stableseg = replace(stableseg, weights=stableseg.weights.resolve())
    root = settings.local_files_document_root
    return replace(
        settings,
        stableseg=stableseg,
        local_files_document_root=(root if is_url(root) else os.path.abspath(root))
        if root
        else None,
    )


def _has_gunicorn() -> bool:
    import importlib.util

    return importlib.util.find_spec("gunicorn") is not None


def _gunicorn_has_setting(name: str) -> bool:
    from gunicorn.config import KNOWN_SETTINGS

    return any(setting.name == name for setting in KNOWN_SETTINGS)


def _uses_cuda(device: str | None) -> bool:
    if device is not None:
        return device.startswith("cuda")
    import torch

    return torch.cuda.is_available()


def _exec_gunicorn(
    settings: BackendSettings, host: str, port: int, workers: int, threads: int, log_level: str
) -> None:
    """Replace this process with gunicorn, its workers handed ``settings`` as one JSON object.
    With CUDA every worker loads its own model (CUDA does not survive a fork); on a CPU the model
    loads once before forking (``--preload``)."""
    import os
    import sys
    from dataclasses import replace

    from ml_backend import worker
    from ml_backend.backend_settings import SETTINGS_VARIABLE

    preload = not _uses_cuda(settings.model.device)
    settings = replace(settings, warm_up="sync" if preload else "background")
    env = {**os.environ, SETTINGS_VARIABLE: settings.to_json(), "LOG_LEVEL": log_level.upper()}
    worker_class = "ml_backend.worker.HeadBufferingWorker"
    if not worker.supported():
        worker_class = "gthread"
        click.echo(
            "WARNING: this gunicorn's gthread worker lacks what ml_backend.worker builds on "
            "(gunicorn 27): using plain gthread, where clients that send their request slowly "
            "can hold every thread; install gunicorn>=27",
            err=True,
        )
    args = [
        sys.executable,
        "-m",
        "gunicorn",
        "--bind",
        f"[{host}]:{port}" if ":" in host else f"{host}:{port}",
        "--workers",
        str(workers),
        "--worker-class",
        worker_class,
        "--threads",
        str(threads),
        "--timeout",
        "600",
        "--log-level",
        log_level.lower(),
        "--access-logfile",
        "-",
        "--logger-class",
        "ml_backend.worker.SafeGunicornLogger",
    ]
    if preload:
        args.append("--preload")
    if _gunicorn_has_setting("control_socket_disable"):  # gunicorn >= 25.1: one per $HOME
        args.append("--no-control-socket")
    args.append("ml_backend._wsgi:app")
    click.echo(f"serving {settings.model.source} on http://{host}:{port} (gunicorn)", err=True)
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(sys.executable, args, env)


def _run_dev_server(settings: BackendSettings, host: str, port: int, log_level: str) -> None:
    from ml_backend.logs import configure_logging

    configure_logging(log_level)
    from ml_backend.server import create_app
    from ml_backend.serving import run_dev_server

    app = create_app(settings, warm_up=True)
    click.echo(f"serving {settings.model.source} on http://{host}:{port} (dev server)", err=True)
    run_dev_server(app, host, port, settings.request_timeout)
