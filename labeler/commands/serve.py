"""``python cli.py serve``: the Label Studio ML backend, served by gunicorn.

Only click is imported at module level, so ``python cli.py --help`` stays fast; torch, Flask
and the backend load inside the command.
"""

from __future__ import annotations

import click

from .common import DEFAULT_MODEL, background_options, model_options

# --dtype of every command -> STABLESEG_DTYPE
DTYPES = {None: "auto", "fp16": "float16", "bf16": "bfloat16", "fp32": "float32"}


@click.command(context_settings={"show_default": True})
@model_options
@click.option("--host", default="127.0.0.1", help="Address to listen on (0.0.0.0 for all).")
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
@click.option("--image-size", type=click.IntRange(min=8), default=None, help="[default: 512]")
@click.option("--batch-size", type=click.IntRange(min=1), default=None, help="[default: 4]")
@background_options("left unlabeled in the predictions")
@click.option(
    "--weights",
    type=click.Path(exists=True, dir_okay=False),
    default=None,
    help="Learned map weights (StableSeg++) from `cli.py refine`.",
)
@click.option(
    "--dev-server",
    is_flag=True,
    help="Use Flask's development server instead of gunicorn.",
)
@click.option(
    "--log-level",
    type=click.Choice(["DEBUG", "INFO", "WARNING", "ERROR"], case_sensitive=False),
    default="INFO",
)
def serve(
    model: str,
    device: str | None,
    dtype: str | None,
    host: str,
    port: int,
    basic_auth_user: str | None,
    basic_auth_pass: str | None,
    workers: int,
    threads: int,
    image_size: int | None,
    batch_size: int | None,
    background_threshold: float | None,
    background_prompt: str | None,
    weights: str | None,
    dev_server: bool,
    log_level: str,
) -> None:
    """Label Studio ML backend that pre-annotates tasks with StableSeg brush masks.

    \b
    Connect it in Label Studio: Project > Settings > Model > Connect Model,
    URL http://HOST:PORT. Images are fetched with LABEL_STUDIO_URL and
    LABEL_STUDIO_API_KEY, or read from LOCAL_FILES_DOCUMENT_ROOT.
    --model defaults to $MODEL_DIR when set (Label Studio's Docker convention).
    """
    import os

    env = dict(os.environ)
    source = click.get_current_context().get_parameter_source("model")
    if source == click.core.ParameterSource.DEFAULT:
        model = env.get("STABLESEG_MODEL") or env.get("MODEL_DIR") or DEFAULT_MODEL
    if os.path.isdir(model):  # gunicorn runs from the repository root: keep the path valid
        model = os.path.abspath(model)
    root = env.get("LOCAL_FILES_DOCUMENT_ROOT")
    if root:
        env["LOCAL_FILES_DOCUMENT_ROOT"] = os.path.abspath(root)
    options = {
        "STABLESEG_MODEL": model,
        "STABLESEG_DEVICE": device,
        "STABLESEG_DTYPE": DTYPES[dtype],
        "STABLESEG_IMAGE_SIZE": image_size,
        "STABLESEG_BATCH_SIZE": batch_size,
        "STABLESEG_BACKGROUND_THRESHOLD": background_threshold,
        "STABLESEG_BACKGROUND_PROMPT": background_prompt,
        "STABLESEG_WEIGHTS": os.path.abspath(weights) if weights else None,
        "BASIC_AUTH_USER": basic_auth_user,
        "BASIC_AUTH_PASS": basic_auth_pass,
        "LOG_LEVEL": log_level.upper(),
    }
    env.update({name: str(value) for name, value in options.items() if value is not None})
    _check_settings(env)
    if dev_server or not _has_gunicorn():
        _run_dev_server(env, host, port)
    else:
        _exec_gunicorn(env, host, port, workers, threads, device)


def _check_settings(env: dict[str, str]) -> None:
    from ml_backend.settings import BackendSettings

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
    preload = not _uses_cuda(device)
    env["STABLESEG_WARM_UP"] = "sync" if preload else "background"
    args = [
        sys.executable,
        "-m",
        "gunicorn",
        "--bind",
        f"[{host}]:{port}" if ":" in host else f"{host}:{port}",
        "--workers",
        str(workers),
        "--worker-class",
        "gthread",
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
    from ml_backend.server import create_app
    from ml_backend.settings import BackendSettings

    app = create_app(BackendSettings.from_env(), warm_up=True)
    click.echo(f"serving {env['STABLESEG_MODEL']} on http://{host}:{port} (dev server)", err=True)
    app.run(host=host, port=port, threaded=True)
