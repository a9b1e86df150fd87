"""Who can reach the backend, and the rules of its development server.

* Listening on a non-loopback address without basic auth lets anyone who reaches the port ask
  for predictions of any image URL the allow-list permits and start refine runs: gunicorn
  serves it with :func:`exposure_warning` printed, the development server refuses
  (:func:`check_dev_server`), as it was never meant to face a network.
* The development server never runs Werkzeug's debugger (its console executes Python for
  whoever opens it, outside basic auth), whatever ``FLASK_DEBUG`` or ``FLASK_ENV`` say.
* The development server bounds slow clients as gunicorn does: a read of the request line or
  the headers gives up after ``STABLESEG_REQUEST_TIMEOUT`` seconds without a byte, and the
  body must arrive within that many seconds of wall clock (the guard's deadline gets the
  connection's socket through :data:`ml_backend.guard.SOCKET_KEY`).
"""

from __future__ import annotations

import ipaddress
from typing import Any

AUTH_HINT = (
    "set --basic-auth-user and --basic-auth-pass (BASIC_AUTH_USER, BASIC_AUTH_PASS), "
    "or listen on 127.0.0.1"
)


def is_loopback(host: str) -> bool:
    """Whether ``host`` (an address to listen on) is reachable from this machine only."""
    name = host.strip().strip("[]").lower()
    if name == "localhost":
        return True
    try:
        return ipaddress.ip_address(name).is_loopback
    except ValueError:  # a host name: it may resolve to any interface
        return False


def exposure_warning(host: str, basic_auth: bool) -> str | None:
    """What a network can do with a backend listening on ``host``, or None when nothing."""
    if basic_auth or is_loopback(host):
        return None
    return (
        f"WARNING: listening on {host} without basic auth: anyone who can reach this port can "
        "request predictions for any image URL the allow-list permits (public addresses, "
        "LABEL_STUDIO_URL and STABLESEG_ALLOWED_HOSTS) and can start refine runs (Start "
        "Training), which write under STABLESEG_REFINE_DIR and hold the GPU for a long time; "
        f"{AUTH_HINT}."
    )


def check_dev_server(host: str, basic_auth: bool) -> None:
    """Refuse to run the development server on a network without basic auth.

    Raises:
        ValueError: naming the host and what to do instead.
    """
    if not basic_auth and not is_loopback(host):
        raise ValueError(
            f"the development server listens on loopback addresses only unless basic auth is "
            f"on (got --host {host}); {AUTH_HINT}, or serve with gunicorn (without "
            "--dev-server)"
        )


def run_dev_server(app: Any, host: str, port: int, request_timeout: float) -> None:
    """Flask's development server, threaded, with the debugger and reloader off, and
    ``request_timeout`` seconds for a request to arrive (see the module)."""
    app.debug = False
    app.run(
        host=host,
        port=port,
        debug=False,
        load_dotenv=False,
        threaded=True,
        use_debugger=False,
        use_evalex=False,
        use_reloader=False,
        request_handler=_deadline_handler(request_timeout),
    )


def _deadline_handler(seconds: float) -> type:
    """Werkzeug's request handler with a socket timeout and the socket in the environ."""
    from werkzeug.serving import WSGIRequestHandler

    from .guard import SOCKET_KEY

    class DeadlineRequestHandler(WSGIRequestHandler):
        timeout = seconds  # socketserver sets it on the connection: no read waits longer

        def make_environ(self) -> dict[str, Any]:
            environ = super().make_environ()
            environ[SOCKET_KEY] = self.connection
            return environ

    return DeadlineRequestHandler
