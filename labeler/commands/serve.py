"""``python cli.py serve``: the Label Studio ML backend, served by gunicorn.

gunicorn runs the backend's own worker class (:mod:`ml_backend.worker`: gthread whose threads
only take requests whose head has fully arrived, so slow clients cannot starve ``/health``).
Listening beyond loopback without basic auth prints a warning that says what is exposed; the
development server (``--dev-server``) refuses it and never runs Werkzeug's debugger
(:mod:`ml_backend.serving`).

Only click is imported at module level, so ``python cli.py --help`` stays fast; torch, Flask
and the backend load inside the command.
"""

from __future__ import annotations

import click

from labeler.model_settings import ModelSettings

from .common import segmenter_options


@click.command(context_settings={"show_default": True})
@segmenter_options(environment=True)
@click.option(
    "--host",
    default="127.0.0.1",
    help="Address to listen on (0.0.0.0 for all: set basic auth then).",
)
@click.option("--port", type=click.IntRange(1, 65535), default=9090)
@click.option(
    "--basic-auth-user", envvar="BASIC_AUTH_USER", default=None, help="Require basic auth."
)
@click.option("--basic-auth-pass", envvar="BASIC_AUTH_PASS", default=None, help="Its password.")
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
    settings: ModelSettings,
    host: str,
    port: int,
    basic_auth_user: str | None,
    basic_auth_pass: str | None,
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
    Every model and segmenter option also reads its STABLESEG_* variable
    (--image-size: STABLESEG_IMAGE_SIZE, ...; --model also MODEL_DIR, Label
    Studio's Docker convention); an option given on the command line wins.
    """
    import os

    env = dict(os.environ)
    model = settings.model
    if os.path.isdir(os.path.expanduser(model.source)):  # the workers may start elsewhere
        model = model.replace(source=os.path.abspath(os.path.expanduser(model.source)))
    root = env.get("LOCAL_FILES_DOCUMENT_ROOT")
    if root:
        env["LOCAL_FILES_DOCUMENT_ROOT"] = os.path.abspath(root)
    for variable in _setting_variables():  # replaced by the settings in effect
        env.pop(variable, None)
    from labeler.settings import to_env

    env.update(to_env(ModelSettings(model, settings.segmenter, settings.weights)))
    extra = {
        "BASIC_AUTH_USER": basic_auth_user,
        "BASIC_AUTH_PASS": basic_auth_pass,
        "LOG_LEVEL": log_level.upper(),
    }
    env.update({name: str(value) for name, value in extra.items() if value is not None})
    from ml_backend.serving import check_dev_server, exposure_warning

    use_dev_server = dev_server or not _has_gunicorn()
    basic_auth = bool(env.get("BASIC_AUTH_USER"))
    if use_dev_server:
        try:
            check_dev_server(host, basic_auth)
        except ValueError as err:
            raise click.UsageError(str(err)) from None
    else:
        warning = exposure_warning(host, basic_auth)
        if warning:
            click.echo(warning, err=True)
    _check_settings(env)
    if use_dev_server:
        _run_dev_server(env, host, port)
    else:
        _exec_gunicorn(env, host, port, workers, threads, model.device)


def _setting_variables() -> list[str]:
    from labeler.settings import settings_of

    return [setting.env for setting in settings_of(ModelSettings)]


def _check_settings(env: dict[str, str]) -> None:
    from ml_backend.backend_settings import BackendSettings

    try:
        BackendSettings.from_env(env)
    except ValueError as err:
        raise click.UsageError(str(err)) from None


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
    env: dict[str, str], host: str, port: int, workers: int, threads: int, device: str | None
) -> None:
    """Replace this process with gunicorn. With CUDA every worker loads its own model (CUDA
    does not survive a fork); on a CPU the model loads once before forking (``--preload``)."""
    import os
    import sys

    from ml_backend import worker

    preload = not _uses_cuda(device)
    env["STABLESEG_WARM_UP"] = "sync" if preload else "background"
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
        env["LOG_LEVEL"].lower(),
        "--access-logfile",
        "-",
    ]
    if preload:
        args.append("--preload")
    if _gunicorn_has_setting("control_socket_disable"):  # gunicorn >= 25.1: one per $HOME
        args.append("--no-control-socket")
    args.append("ml_backend._wsgi:app")
    click.echo(f"serving {env['STABLESEG_MODEL']} on http://{host}:{port} (gunicorn)", err=True)
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(sys.executable, args, env)


def _run_dev_server(env: dict[str, str], host: str, port: int) -> None:
    import logging
    import os

    os.environ.update(env)
    logging.basicConfig(
        level=env["LOG_LEVEL"],
        format="[%(asctime)s] [%(levelname)s] [%(name)s] %(message)s",
    )
    from ml_backend.backend_settings import BackendSettings
    from ml_backend.server import create_app
    from ml_backend.serving import run_dev_server

    settings = BackendSettings.from_env()
    app = create_app(settings, warm_up=True)
    click.echo(f"serving {env['STABLESEG_MODEL']} on http://{host}:{port} (dev server)", err=True)
    run_dev_server(app, host, port, settings.request_timeout)
