"""A gunicorn worker whose threads never wait for a slow client's request head.

Why: gunicorn's ``gthread`` worker accepts a connection in its event loop and hands it to a
thread of its pool, which then reads the request head with a blocking socket and no deadline
(gunicorn 27 first waits up to 5 s for a first byte, but a client that sends one byte a second
gets past that and holds the thread for as long as it likes). Four such connections, as many as
the default ``--threads``, and ``/health`` stops answering. More threads only raise the number
of connections an attacker needs.

What :class:`HeadBufferingWorker` does instead: a connection goes to the thread pool only once
its whole request head (request line and headers, up to the blank line) is there. Until then
the event loop reads whatever bytes have arrived, without blocking, and keeps them; the thread
then parses them as if it had read them itself (they are put back into gunicorn's parser). So a
thread is only ever busy with a request that is complete up to its body, and the body has its
own wall-clock deadline (:mod:`ml_backend.guard`). A head that is not complete within
``STABLESEG_REQUEST_TIMEOUT`` seconds closes the connection, so slow clients cannot hold the
worker's connection slots either; a head larger than gunicorn's own header limits goes to the
parser at once, which refuses it.

``/health`` has threads of its own: a head whose request line is ``GET /health`` (or ``HEAD``)
goes to a small pool of :data:`HEALTH_THREADS` threads that nothing else uses, so Label
Studio's health check is answered at once while every thread of the main pool is busy with
predictions (a request's downloads are bounded by ``STABLESEG_DOWNLOAD_BUDGET``, its model time
by the GPU). It goes through the same app, basic auth included.

The same holds for the next request on a kept-alive connection. TLS connections (gunicorn's
``--certfile``) and HTTP/2 are passed to gthread unchanged: their bytes cannot be read before
the handshake, which happens in the thread.

Written against gunicorn 27's ``gthread.ThreadWorker`` (its ``enqueue_req``,
``murder_keepalived``, poller and main-thread callbacks); :func:`supported` says whether the
installed gunicorn has them, and ``stableseg serve`` falls back to plain ``gthread`` with a
warning where it does not. Used as ``gunicorn --worker-class
ml_backend.worker.HeadBufferingWorker``.
"""

from __future__ import annotations

import contextlib
import selectors
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from functools import partial
from typing import Any

from gunicorn import glogging
from gunicorn.workers import gthread

from .backend_settings import BackendSettings
from .logs import SafeFormatter

HEAD_END = b"\r\n\r\n"
_RECV_SIZE = 1 << 16
_DEFAULT_FIELD_SIZE = 8190  # gunicorn's, when limit_request_field_size is 0 (no limit)
_MAX_FIELDS = 32768  # gunicorn's ceiling of limit_request_fields
HEALTH_THREADS = 2
"""Threads of a worker that answer ``/health`` only (see the module)."""


def supported() -> bool:
    """Whether the installed gunicorn's gthread worker has what this worker builds on."""
    try:
        from gunicorn.http.unreader import Unreader
        from gunicorn.http2 import negotiation
    except ImportError:
        return False
    return (
        all(hasattr(gthread.ThreadWorker, name) for name in _WORKER_HOOKS)
        and all(hasattr(gthread.TConn, name) for name in ("init", "close", "wait_for_data"))
        and hasattr(Unreader, "take_buffered")
        and hasattr(negotiation, "prior_knowledge_allowed")
    )


_WORKER_HOOKS = ("enqueue_req", "murder_keepalived", "handle", "finish_request")


def request_timeout() -> float:
    """STABLESEG_REQUEST_TIMEOUT of the settings (the worker starts before the app)."""
    return BackendSettings.load().request_timeout


@dataclass
class _Head:
    """The bytes of a request head that have arrived so far, and when it must be complete."""

    deadline: float
    data: bytearray = field(default_factory=bytearray)


class HeadBufferingWorker(gthread.ThreadWorker):
    """gthread, except that a connection reaches a thread only with its request head complete.

    See the module docstring. Everything here runs on the worker's main thread (the event
    loop), as gthread's own poller callbacks do.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.head_timeout = request_timeout()
        self._heads: dict[Any, _Head] = {}
        self.health_pool: ThreadPoolExecutor | None = None

    def init_process(self) -> None:
        """gthread's start, with the ``/health`` pool made in the worker process."""
        self.health_pool = ThreadPoolExecutor(HEALTH_THREADS, thread_name_prefix="health")
        super().init_process()

    # ------------------------------------------------------------------ gthread hooks
    def enqueue_req(self, conn: Any) -> None:
        """Hand ``conn`` to a thread if its head is complete, else read it in the event loop."""
        if not self._can_buffer(conn):
            super().enqueue_req(conn)
            return
        held = conn.parser.unreader.take_buffered() if conn.parser is not None else b""
        if self._head_ready(held):
            self._hand_over(conn, held)
            return
        conn.sock.setblocking(False)
        self._heads[conn] = _Head(time.monotonic() + self.head_timeout, bytearray(held))
        self.poller.register(conn.sock, selectors.EVENT_READ, partial(self._on_readable, conn))

    def murder_keepalived(self, *args: Any, **kwargs: Any) -> None:
        """gthread's clean-up of idle connections, and of heads past their deadline."""
        super().murder_keepalived(*args, **kwargs)
        force = bool(kwargs.get("force", args[0] if args else False))
        now = time.monotonic()
        for conn, head in list(self._heads.items()):
            if force or head.deadline <= now:
                self.log.info(
                    "closing a connection from %s: no complete request head in %g s "
                    "(STABLESEG_REQUEST_TIMEOUT)",
                    _peer(conn),
                    self.head_timeout,
                )
                self._drop(conn)

    # ------------------------------------------------------------------ steps
    def _can_buffer(self, conn: Any) -> bool:
        """Plain HTTP/1 connections only (see the module docstring)."""
        if self.cfg.is_ssl or getattr(conn, "is_http2", False):
            return False
        if conn.initialized:
            return conn.parser is not None
        from gunicorn.http2 import negotiation

        return not negotiation.prior_knowledge_allowed(self.cfg, conn.client)

    def _head_ready(self, data: bytes | bytearray) -> bool:
        """Whether gunicorn's parser can take ``data`` without reading more before it answers:
        the head is complete, holds a bare LF (refused at once), or is over its limits."""
        return (
            HEAD_END in data
            or data.count(b"\n") != data.count(b"\r\n")
            or len(data) > self._max_head()
        )

    def _max_head(self) -> int:
        """The largest head gunicorn's parser reads before refusing it."""
        field_size = self.cfg.limit_request_field_size or _DEFAULT_FIELD_SIZE
        line = self.cfg.limit_request_line or _DEFAULT_FIELD_SIZE
        fields = self.cfg.limit_request_fields or _MAX_FIELDS
        return line + fields * (field_size + 2) + 4

    def _on_readable(self, conn: Any, _sock: Any) -> None:
        head = self._heads.get(conn)
        if head is None:
            return
        try:
            data = conn.sock.recv(_RECV_SIZE)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            data = b""
        if not data:  # the client went away
            self._drop(conn)
            return
        head.data += data
        if self._head_ready(head.data):
            self._forget(conn)
            self._hand_over(conn, bytes(head.data))

    def _hand_over(self, conn: Any, data: bytes) -> None:
        """Give ``conn`` to a thread with ``data`` put back in front of its parser."""
        conn.init()  # plain HTTP/1 (checked by _can_buffer): makes the parser, reads nothing
        if data:
            conn.parser.unreader.unread(data)
        conn.data_ready = True
        if self.health_pool is not None and is_health_check(data):
            future = self.health_pool.submit(self.handle, conn)
            future.add_done_callback(
                lambda done: self.method_queue.defer(self.finish_request, conn, done)
            )
            return
        super().enqueue_req(conn)

    def _forget(self, conn: Any) -> None:
        self._heads.pop(conn, None)
        with contextlib.suppress(KeyError, ValueError, OSError):  # not registered, or closed
            self.poller.unregister(conn.sock)

    def _drop(self, conn: Any) -> None:
        self._forget(conn)
        self.nr_conns -= 1
        conn.close()


def is_health_check(head: bytes) -> bool:
    """Whether a request head asks for ``/health`` (its request line, exactly)."""
    parts = head.split(b"\r\n", 1)[0].split(b" ")
    return (
        len(parts) == 3 and parts[0] in (b"GET", b"HEAD") and parts[1].split(b"?")[0] == b"/health"
    )


class SafeGunicornLogger(glogging.Logger):
    """gunicorn's logger whose error and access logs write one line a record
    (:class:`ml_backend.logs.SafeFormatter` around gunicorn's own layouts): the access log
    carries the request line, the referrer and the user agent, all the caller's. Used as
    ``gunicorn --logger-class ml_backend.worker.SafeGunicornLogger``."""

    def setup(self, cfg: Any) -> None:
        super().setup(cfg)
        for log in (self.error_log, self.access_log):
            for handler in log.handlers:
                handler.setFormatter(SafeFormatter.wrapping(handler.formatter))


def _peer(conn: Any) -> str:
    client = getattr(conn, "client", None)
    if isinstance(client, tuple) and client:
        return str(client[0])
    return str(client)
