"""The first thing every request meets: basic auth, then the body's size and deadline.

:class:`RequestGuard` wraps the Flask app's WSGI callable, so it runs before Flask builds a
request and before any ``before_request`` hook (label-studio-ml 1.0.9 registers one that reads
and logs the whole body). For each request, in this order:

1. **Basic auth** (when ``BASIC_AUTH_USER`` is set): user and password compared in constant
   time; a request without them gets 401 and its body is never read.
2. **Body size**: a ``Content-Length`` over ``STABLESEG_MAX_BODY_BYTES`` gets 413 at once; a
   body without one (chunked) is read up to the limit plus one byte, and 413 when there is more.
3. **Body deadline**: the body must arrive within ``STABLESEG_REQUEST_TIMEOUT`` seconds of wall
   time, trickles included (408). The connection's socket (gunicorn's, or the development
   server's under :data:`SOCKET_KEY`) is shut for reading when the deadline passes, which ends
   a read that is waiting for the next byte.

The body the app then sees is the bytes read here (at most the limit). A refusal closes the
connection, so gunicorn does not read the unread body to keep the connection alive.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import hmac
import io
import logging
import socket
import threading
from collections.abc import Callable, Iterable
from typing import Any

from .backend_settings import BackendSettings
from .limits import RequestError, body_too_large, body_too_slow, json_error

logger = logging.getLogger(__name__)

_READ_SIZE = 1 << 16
SOCKET_KEY = "stableseg.socket"  # the development server's connection, in the WSGI environ
WSGIApp = Callable[[dict[str, Any], Callable[..., Any]], Iterable[bytes]]


def authorised(header: str | None, settings: BackendSettings) -> bool:
    """Whether an ``Authorization`` header carries the configured basic-auth user and password.

    Both are compared in constant time, so the reply time does not tell how much matched.
    """
    if not settings.basic_auth_user:
        return True
    user, password = _basic_credentials(header or "")
    user_ok = hmac.compare_digest(user.encode(), settings.basic_auth_user.encode())
    pass_ok = hmac.compare_digest(password.encode(), (settings.basic_auth_pass or "").encode())
    return user_ok and pass_ok


def _basic_credentials(header: str) -> tuple[str, str]:
    scheme, _, encoded = header.strip().partition(" ")
    if scheme.lower() != "basic":
        return "", ""
    try:
        decoded = base64.b64decode(encoded.strip(), validate=True).decode("utf-8")
    except (binascii.Error, UnicodeDecodeError):
        return "", ""
    user, _, password = decoded.partition(":")
    return user, password


class RequestGuard:
    """WSGI middleware: auth, then a bounded body read within a deadline (see the module).

    ``settings`` is called for every request, so the app can be reconfigured (the tests and
    :func:`ml_backend.server.create_app` do) without wrapping it again.
    """

    def __init__(self, app: WSGIApp, settings: Callable[[], BackendSettings]) -> None:
        self.app = app
        self.settings = settings

    def __call__(self, environ: dict[str, Any], start_response: Callable[..., Any]) -> Any:
        settings = self.settings()
        if not authorised(environ.get("HTTP_AUTHORIZATION"), settings):
            response = json_error(
                401,
                "basic authentication required",
                WWW_Authenticate='Basic realm="stableseg-ml-backend"',
                Connection="close",
            )
            return response(environ, start_response)
        try:
            body = read_body(environ, settings)
        except RequestError as err:
            logger.warning("%s %s refused: %s", _method(environ), _path(environ), err.detail)
            return err.response(Connection="close")(environ, start_response)
        environ["wsgi.input"] = io.BytesIO(body)
        environ["CONTENT_LENGTH"] = str(len(body))
        return self.app(environ, start_response)


def read_body(environ: dict[str, Any], settings: BackendSettings) -> bytes:
    """The request body, at most ``max_body_bytes``, read within ``request_timeout`` seconds.

    Raises:
        RequestError: 400 for a malformed or cut-off body, 408 past the deadline, 413 too large.
    """
    limit = settings.max_body_bytes
    length_text = (environ.get("CONTENT_LENGTH") or "").strip()
    if length_text:
        if not length_text.isdigit():
            raise RequestError(400, f"Content-Length {length_text!r} is not a number")
        length = int(length_text)
        if length > limit:
            raise body_too_large(length, settings)
        wanted = length
    elif environ.get("wsgi.input_terminated"):  # chunked: read until the end, or past the limit
        wanted = limit + 1
    else:  # WSGI: no length and no terminated stream means no body
        return b""
    if wanted == 0:
        return b""
    stream = environ["wsgi.input"]
    body = bytearray()
    ended = False  # the stream said it had no more
    sock = environ.get("gunicorn.socket") or environ.get(SOCKET_KEY)
    with _Deadline(sock, settings.request_timeout) as deadline:
        while len(body) < wanted:
            try:
                chunk = stream.read(min(_READ_SIZE, wanted - len(body)))
            except Exception as err:  # the server's reader: timeouts, resets, bad chunking
                if deadline.expired or isinstance(err, TimeoutError):  # a socket timeout
                    raise body_too_slow(settings) from None
                raise RequestError(400, f"the request body could not be read: {err}") from None
            if not chunk:
                ended = True
                break
            body += chunk
    if len(body) > limit:
        raise body_too_large(None, settings)
    if len(body) < wanted and (length_text or not ended or deadline.expired):
        if deadline.expired:
            raise body_too_slow(settings)
        raise RequestError(400, f"the request body ended after {len(body)} of {wanted} bytes")
    return bytes(body)


class _Deadline:
    """Shuts ``sock`` for reading when ``seconds`` have passed (a blocked read then returns)."""

    def __init__(self, sock: socket.socket | None, seconds: float) -> None:
        self.sock = sock
        self.seconds = seconds
        self.expired = False
        self._timer: threading.Timer | None = None

    def __enter__(self) -> _Deadline:
        if self.sock is not None:
            self._timer = threading.Timer(self.seconds, self._expire)
            self._timer.daemon = True
            self._timer.start()
        return self

    def __exit__(self, *exc: object) -> None:
        if self._timer is not None:
            self._timer.cancel()

    def _expire(self) -> None:
        self.expired = True
        with contextlib.suppress(OSError):  # already closed
            self.sock.shutdown(socket.SHUT_RD)


def _method(environ: dict[str, Any]) -> str:
    return str(environ.get("REQUEST_METHOD", ""))


def _path(environ: dict[str, Any]) -> str:
    return str(environ.get("PATH_INFO", ""))
