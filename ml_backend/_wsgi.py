"""WSGI entry point, after Label Studio's ML backend convention.

``gunicorn --worker-class ml_backend.worker.HeadBufferingWorker ml_backend._wsgi:app`` (what
``python cli.py serve`` runs), or ``python -m ml_backend._wsgi --port 9090`` for the development
server (loopback only without basic auth, never the debugger: :mod:`ml_backend.serving`).
Settings come from ``serve``'s hand-off or the environment (:meth:`BackendSettings.load`);
their ``warm_up`` (``STABLESEG_WARM_UP``) says when the model loads: ``background`` (default: a
thread starts loading it as the server starts), ``sync`` (before serving; what gunicorn's
``--preload`` wants, so forked workers share the weights) or ``off`` (on the first prediction).
"""

from __future__ import annotations

import argparse
import os

from ml_backend.backend_settings import BackendSettings
from ml_backend.logs import configure_logging
from ml_backend.server import create_app

configure_logging(os.environ.get("LOG_LEVEL", "INFO"))


def build_app() -> object:
    """The app, with the model warm-up its settings ask for."""
    settings = BackendSettings.load()
    if settings.warm_up == "sync":
        from ml_backend.cache import get_segmenter

        get_segmenter(settings)
    return create_app(settings, warm_up=settings.warm_up == "background")


app = build_app()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description="StableSeg Label Studio ML backend (dev server)")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("-p", "--port", type=int, default=9090)
    args = parser.parse_args()
    from ml_backend.serving import check_dev_server, run_dev_server

    settings = BackendSettings.load()
    try:
        check_dev_server(args.host, bool(settings.basic_auth_user))
    except ValueError as err:
        parser.error(str(err))
    run_dev_server(app, args.host, args.port, settings.request_timeout)
