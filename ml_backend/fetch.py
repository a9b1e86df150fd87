"""Outbound HTTP for the backend: one GET that cannot be turned against the backend's network.

Anyone who can reach the backend chooses the image URLs it downloads, so every download goes
through :func:`fetch`, which

* accepts ``http`` and ``https`` URLs only, without ``user:password@``;
* resolves the host once and refuses the URL when ANY of its addresses is loopback, private,
  carrier-grade NAT, link-local (cloud metadata at 169.254.169.254 included), unique-local,
  multicast, unspecified, reserved, benchmarking or documentation space, IPv4 inside IPv6
  (mapped, 6to4, NAT64) included. Every spelling of an address (``2130706433``,
  ``0x7f000001``, ``0177.0.0.1``, ``127.1``, ``0``, ``[::ffff:127.0.0.1]``) is caught because
  the check runs on what the resolver returns, which is also what the socket connects to;
* connects to exactly the address it checked, so a DNS answer that changes between the check
  and the connection (DNS rebinding) changes nothing;
* follows at most :data:`MAX_REDIRECTS` redirects, checking every hop the same way, and sends
  credentials (``auth``) only to ``LABEL_STUDIO_URL``'s origin, on any hop;
* holds one wall-clock deadline for everything (resolution, connection, TLS handshake, request,
  headers, body): before every read the socket's timeout is set to the time left, so a server
  that trickles one byte a second is cut off at the deadline, not after a timeout per read;
* caps the body at ``max_bytes`` and asks for no compression (no decompression bombs).

The allow-list opens the checks: ``LABEL_STUDIO_URL``'s origin (scheme, host and port) is
always allowed; ``STABLESEG_ALLOWED_HOSTS`` names further hosts (any port), IP addresses and
CIDR networks. A host allowed by name is still connected to at the address it resolved to.

Why ``http.client`` on a socket of our own rather than requests or urllib3: both resolve the
host name inside their connection classes, so pinning the checked address there means
overriding private connection-pool internals that differ between urllib3 1.x and 2.x (and
requests adds proxies from the environment, which would resolve names on our behalf and defeat
the check). Here one function resolves, checks and connects; ``http.client`` only formats the
request and parses the response over that socket (it never resolves or connects: its
``connect`` is disabled), the ``Host`` header is the URL's own, and for ``https`` the socket is
wrapped with ``server_hostname`` set to the URL's host name, so SNI and certificate
verification are against the name, not the address. Proxies (``HTTP_PROXY``) are not used.

Besides each download's own deadline, the downloads of one ``/predict`` share a budget
(:class:`DownloadBudget`, ``STABLESEG_DOWNLOAD_BUDGET``): the seconds during which at least one
of them is running or waiting for a slot, so a request of 32 tasks whose servers trickle holds
its thread for the budget, not for 32 deadlines; the model's own time does not count. And a
worker process runs at most ``STABLESEG_MAX_DOWNLOADS`` downloads at once, all requests
together (:func:`download_slots`).

Failures raise :class:`FetchError`: its message, which goes back to whoever sent the URL, is
always :data:`GENERIC_ERROR` (no status codes, no "connection refused": nothing to scan ports
with); the detail is logged as a warning and kept on the exception for the caller's own
settings-related hints (Label Studio refusing ``LABEL_STUDIO_API_KEY``).
"""

from __future__ import annotations

import functools
import http.client
import io
import ipaddress
import logging
import os
import socket
import ssl
import threading
import time
from collections.abc import Iterator, Mapping
from concurrent.futures import ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any
from urllib.parse import urljoin, urlsplit

from labeler.images import ImageError

from .allowed_hosts import parse_allowed_hosts

if TYPE_CHECKING:
    from .backend_settings import BackendSettings

logger = logging.getLogger(__name__)

GENERIC_ERROR = "image URL refused or unreachable"
MAX_REDIRECTS = 5
USER_AGENT = "stableseg-labeler-ml-backend"
_CHUNK = 1 << 16
_REDIRECT_STATUSES = (301, 302, 303, 307, 308)
_DEFAULT_PORTS = {"http": 80, "https": 443}

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network

# Address space an image URL must not reach unless allow-listed, with the name the log uses.
# Python's is_global is checked as well (its tables differ between versions; these do not).
_REFUSED_NETWORKS: tuple[tuple[IPNetwork, str], ...] = tuple(
    (ipaddress.ip_network(network), name)
    for network, name in (
        ("0.0.0.0/8", "unspecified ('this network')"),
        ("10.0.0.0/8", "private"),
        ("100.64.0.0/10", "carrier-grade NAT"),
        ("127.0.0.0/8", "loopback"),
        ("169.254.0.0/16", "link-local (cloud metadata)"),
        ("172.16.0.0/12", "private"),
        ("192.0.0.0/24", "IETF protocol assignments"),
        ("192.0.2.0/24", "documentation"),
        ("192.88.99.0/24", "6to4 relay anycast"),
        ("192.168.0.0/16", "private"),
        ("198.18.0.0/15", "benchmarking"),
        ("198.51.100.0/24", "documentation"),
        ("203.0.113.0/24", "documentation"),
        ("224.0.0.0/4", "multicast"),
        ("240.0.0.0/4", "reserved"),
        ("::/128", "unspecified"),
        ("::1/128", "loopback"),
        ("::/96", "IPv4-compatible (deprecated)"),
        ("64:ff9b:1::/48", "NAT64 local use"),
        ("100::/64", "discard-only"),
        ("2001::/23", "IETF protocol assignments (Teredo included)"),
        ("2001:db8::/32", "documentation"),
        ("3fff::/20", "documentation"),
        ("fc00::/7", "unique-local"),
        ("fe80::/10", "link-local"),
        ("fec0::/10", "site-local (deprecated)"),
        ("ff00::/8", "multicast"),
    )
)
_NAT64 = ipaddress.ip_network("64:ff9b::/96")


class FetchError(ImageError):
    """A download that was refused or failed.

    ``str(error)`` is always :data:`GENERIC_ERROR`; ``detail`` says what happened (for the log),
    ``url`` is the hop that failed and ``status`` its HTTP status, when it answered one.
    """

    def __init__(self, detail: str, url: str, status: int | None = None) -> None:
        super().__init__(GENERIC_ERROR)
        self.detail = detail
        self.url = url
        self.status = status


# ---------------------------------------------------------------------- policy
def origin(url: str) -> tuple[str, str, int] | None:
    """(scheme, host, port) of an http(s) URL, ports made explicit; None for anything else."""
    try:
        parts = urlsplit(url.strip())
        scheme = parts.scheme.lower()
        if scheme not in _DEFAULT_PORTS or not parts.hostname:
            return None
        return scheme, _ascii_host(parts.hostname), parts.port or _DEFAULT_PORTS[scheme]
    except (ValueError, UnicodeError):
        return None


def refusal_reason(address: IPAddress) -> str | None:
    """Why an image URL must not reach ``address`` (None: a public address)."""
    if isinstance(address, ipaddress.IPv6Address):
        mapped = address.ipv4_mapped
        if mapped is not None:
            reason = refusal_reason(mapped)
            return f"IPv4-mapped {reason}" if reason else None
    for network, name in _REFUSED_NETWORKS:
        if address in network:
            return name
    embedded = _embedded_ipv4(address)
    if embedded is not None:
        reason = refusal_reason(embedded)
        if reason:
            return f"{reason} IPv4 {embedded} inside IPv6"
    if address.is_multicast:
        return "multicast"
    if not address.is_global:
        return "not globally routable"
    return None


def _embedded_ipv4(address: IPAddress) -> ipaddress.IPv4Address | None:
    """The IPv4 address a 6to4 or NAT64 address leads to, if it is one."""
    if not isinstance(address, ipaddress.IPv6Address):
        return None
    if address.sixtofour is not None:
        return address.sixtofour
    if address in _NAT64:
        return ipaddress.IPv4Address(int(address) & 0xFFFFFFFF)
    return None


@dataclass(frozen=True)
class FetchPolicy:
    """Where downloads may go and where credentials may be sent.

    ``label_studio`` is ``LABEL_STUDIO_URL``'s origin: always allowed, and the only origin that
    ever gets credentials. ``names`` and ``networks`` come from ``STABLESEG_ALLOWED_HOSTS``.
    """

    label_studio: tuple[str, str, int] | None = None
    names: frozenset[str] = frozenset()
    networks: tuple[IPNetwork, ...] = ()

    @classmethod
    def from_settings(cls, settings: BackendSettings) -> FetchPolicy:
        """The policy of ``LABEL_STUDIO_URL`` and ``STABLESEG_ALLOWED_HOSTS``."""
        names, networks = set(), []
        for entry in parse_allowed_hosts(settings.allowed_hosts):
            try:
                networks.append(ipaddress.ip_network(entry))
            except ValueError:
                names.add(entry)
        label_studio = origin(settings.label_studio_url) if settings.label_studio_url else None
        return cls(label_studio, frozenset(names), tuple(networks))

    def is_label_studio(self, url: str) -> bool:
        """Whether ``url`` is on ``LABEL_STUDIO_URL``'s origin (the only one with credentials)."""
        return self.label_studio is not None and origin(url) == self.label_studio

    def address_refusal(self, address: IPAddress) -> str | None:
        """Why ``address`` is refused under this policy (None: allowed)."""
        candidates = [address]
        if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
            candidates.append(address.ipv4_mapped)
        for candidate in candidates:
            if any(candidate in network for network in self.networks):
                return None
        return refusal_reason(address)


# ---------------------------------------------------------------------- fetch
@dataclass(frozen=True)
class _Target:
    """One checked hop: where to connect and what to send."""

    url: str
    scheme: str
    host: str  # ASCII (IDNA), no brackets
    port: int
    host_header: str
    path: str


def fetch(
    url: str,
    policy: FetchPolicy,
    *,
    max_bytes: int,
    timeout: float,
    auth: Mapping[str, str] | None = None,
) -> bytes:
    """GET ``url`` under ``policy``: the body, at most ``max_bytes``, within ``timeout`` seconds.

    ``auth`` (e.g. ``{"Authorization": "Token ..."}``) is sent on the hops whose origin is
    ``LABEL_STUDIO_URL``'s, never on any other. Raises:
        FetchError: refused, unreachable, too slow, too big, or not HTTP 200 in the end; its
            message is generic, the detail goes to the log.
    """
    deadline = time.monotonic() + timeout
    current = url
    try:
        for _ in range(MAX_REDIRECTS + 1):
            target = _check_url(current, policy)
            headers = dict(auth) if auth and policy.is_label_studio(current) else {}
            status, location, body = _get_once(target, policy, headers, deadline, max_bytes)
            if location is None:
                return body
            current = _requote(urljoin(current, location))
            logger.debug(
                "%s redirects (HTTP %d) to %s", redact(target.url), status, redact(current)
            )
        raise FetchError(f"more than {MAX_REDIRECTS} redirects", current)
    except FetchError as err:
        logger.warning(
            "image URL %s refused or unreachable at %s: %s",
            redact(url),
            redact(err.url),
            err.detail,
        )
        raise


# ---------------------------------------------------------------------- budgets
class BudgetSpent(Exception):
    """The request's download budget ran out before this download could finish (or start);
    ``waiting``: while it waited for a download slot."""

    def __init__(self, waiting: bool = False) -> None:
        super().__init__("download budget spent" + (" waiting for a slot" if waiting else ""))
        self.waiting = waiting


class DownloadBudget:
    """The seconds the downloads of one request may take together (None: no bound).

    The clock runs while at least one of the request's downloads is running or waiting for a
    slot, and stops while none is (the model's time is not the downloads'). A download that
    starts when ``left`` seconds remain must end by ``now + left``: while it runs the clock runs,
    so that moment is exact whatever the others do.
    """

    def __init__(self, seconds: float | None, slots: int | None = None) -> None:
        self.seconds = seconds
        self.slots = slots
        self._lock = threading.Lock()
        self._spent = 0.0  # closed busy periods
        self._active = 0
        self._since = 0.0  # start of the busy period now open (when _active > 0)

    def _deadline(self, now: float) -> float:
        """Open one download; when it must end."""
        with self._lock:
            if self._active == 0:
                self._since = now
            self._active += 1
            if self.seconds is None:
                return float("inf")
            return now + self.seconds - self._spent - (now - self._since)

    def _close(self) -> None:
        with self._lock:
            self._active -= 1
            if self._active == 0:
                self._spent += time.monotonic() - self._since

    @contextmanager
    def download(self) -> Iterator[Slot]:
        """A download within the budget and a slot: yields when it must end, and whether it
        had to wait for its slot.

        Raises:
            BudgetSpent: the budget is spent, or ran out while waiting for a slot.
        """
        slot = Slot(self._deadline(time.monotonic()))
        try:
            slots = download_slots(self.slots) if self.slots else None
            if slot.deadline <= time.monotonic():
                raise BudgetSpent()
            if slots is not None and not slots.acquire(blocking=False):
                slot.waited = True
                wait = slot.deadline - time.monotonic()
                if wait <= 0 or not slots.acquire(timeout=min(wait, threading.TIMEOUT_MAX)):
                    raise BudgetSpent(waiting=True)
            try:
                yield slot
            finally:
                if slots is not None:
                    slots.release()
        finally:
            self._close()


@dataclass
class Slot:
    """A download's place in its budget: when it must end (``time.monotonic``), and whether it
    waited for one of the process's download slots."""

    deadline: float
    waited: bool = False


_slots: tuple[int, int, threading.BoundedSemaphore] | None = None
_slots_lock = threading.Lock()


def download_slots(count: int) -> threading.BoundedSemaphore:
    """The process's ``count`` download slots (one set per process and count, made after a
    fork: gunicorn's workers each have their own)."""
    global _slots
    with _slots_lock:
        if _slots is None or _slots[:2] != (os.getpid(), count):
            _slots = (os.getpid(), count, threading.BoundedSemaphore(count))
        return _slots[2]


def redact(url: str) -> str:
    """``url`` for logs: no ``user:password@``, no query (pre-signed URLs carry keys there),
    except Label Studio's local-files URLs, whose query is the file's path (the one rule,
    :func:`labeler.jobs.storage.redact_url`, which the jobs' object storage uses too)."""
    from labeler.jobs.storage import redact_url

    return redact_url(url)


def _requote(url: str) -> str:
    from requests.utils import requote_uri

    return requote_uri(url)


def _ascii_host(host: str) -> str:
    host = host.lower().rstrip(".")
    return host if host.isascii() else host.encode("idna").decode("ascii")


def _check_url(url: str, policy: FetchPolicy) -> _Target:
    """The URL's parts, or FetchError for a scheme, userinfo, host or port that is not allowed."""
    try:
        parts = urlsplit(_requote(url.strip()))
        scheme = parts.scheme.lower()
        if scheme not in _DEFAULT_PORTS:
            raise FetchError(f"refused: scheme {scheme!r} (http and https only)", url)
        if "@" in parts.netloc:
            raise FetchError("refused: user:password@ in the URL", url)
        if not parts.hostname:
            raise FetchError("refused: no host", url)
        host = _ascii_host(parts.hostname)
        port = parts.port or _DEFAULT_PORTS[scheme]
    except (ValueError, UnicodeError) as err:
        raise FetchError(f"refused: malformed URL ({err})", url) from None
    shown_host = f"[{host}]" if ":" in host else host
    host_header = shown_host if parts.port is None else f"{shown_host}:{parts.port}"
    path = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
    return _Target(url, scheme, host, port, host_header, path)


def _get_once(
    target: _Target,
    policy: FetchPolicy,
    headers: dict[str, str],
    deadline: float,
    max_bytes: int,
) -> tuple[int, str | None, bytes]:
    """One request: (status, redirect location or None, body when not a redirect)."""
    addresses = _resolve_checked(target, policy, deadline)
    try:
        sock = _connect(target, addresses, deadline)
    except (OSError, ssl.SSLError) as err:
        raise FetchError(f"cannot connect: {_describe(err)}", target.url) from None
    connection = _PinnedConnection(target.host, target.port, _DeadlineSocket(sock, deadline))
    try:
        connection.putrequest("GET", target.path, skip_host=True, skip_accept_encoding=True)
        for name, value in {
            "Host": target.host_header,
            "User-Agent": USER_AGENT,
            "Accept": "image/*, */*;q=0.5",
            "Accept-Encoding": "identity",
            **headers,
        }.items():
            connection.putheader(name, value)
        connection.endheaders()
        response = connection.getresponse()
        status = response.status
        if status in _REDIRECT_STATUSES:
            location = response.getheader("Location")
            if not location:
                raise FetchError(f"HTTP {status} without a Location", target.url, status)
            return status, location, b""
        if status != 200:
            raise FetchError(f"HTTP {status}", target.url, status)
        return status, None, _read_body(response, target, max_bytes)
    except (OSError, http.client.HTTPException, ValueError) as err:
        raise FetchError(f"request failed: {_describe(err)}", target.url) from None
    finally:
        connection.close()
        sock.close()


def _read_body(response: http.client.HTTPResponse, target: _Target, max_bytes: int) -> bytes:
    length = response.getheader("Content-Length", "")
    if length.isdigit() and int(length) > max_bytes:
        raise FetchError(
            f"{int(length)} bytes announced, more than the limit of {max_bytes} "
            "(STABLESEG_MAX_IMAGE_BYTES)",
            target.url,
        )
    body = bytearray()
    while chunk := response.read(_CHUNK):
        body += chunk
        if len(body) > max_bytes:
            raise FetchError(
                f"more than the limit of {max_bytes} bytes (STABLESEG_MAX_IMAGE_BYTES)",
                target.url,
            )
    return bytes(body)


def _describe(err: BaseException) -> str:
    if isinstance(err, TimeoutError):
        return "took longer than STABLESEG_HTTP_TIMEOUT"
    return f"{type(err).__name__}: {err}"


# ---------------------------------------------------------------------- resolve and connect
# Name resolution has no timeout of its own: it runs in a pool so the caller can stop waiting
# at the deadline (a stuck lookup keeps a pool thread until the system resolver gives up).
_resolver: tuple[int, ThreadPoolExecutor] | None = None


def _resolver_pool() -> ThreadPoolExecutor:
    """The process's resolver pool (one per process: a pool inherited through fork, as in
    gunicorn workers, has no threads)."""
    global _resolver
    if _resolver is None or _resolver[0] != os.getpid():
        pool = ThreadPoolExecutor(max_workers=8, thread_name_prefix="stableseg-resolve")
        _resolver = (os.getpid(), pool)
    return _resolver[1]


Sockaddr = tuple[Any, ...]


def _resolve_checked(
    target: _Target, policy: FetchPolicy, deadline: float
) -> list[tuple[int, Sockaddr]]:
    """(family, socket address) for every address of the host, once; FetchError if any is
    refused (hosts allowed by name or LABEL_STUDIO_URL's origin skip the address check)."""
    remaining = deadline - time.monotonic()
    if remaining <= 0:
        raise FetchError("took longer than STABLESEG_HTTP_TIMEOUT", target.url)
    future = _resolver_pool().submit(
        socket.getaddrinfo, target.host, target.port, type=socket.SOCK_STREAM
    )
    try:
        infos = future.result(timeout=remaining)
    except FutureTimeout:
        future.cancel()
        raise FetchError("name resolution took longer than the deadline", target.url) from None
    except (OSError, UnicodeError) as err:
        raise FetchError(f"cannot resolve {target.host!r}: {err}", target.url) from None
    addresses = [(family, sockaddr) for family, _, _, _, sockaddr in infos]
    if not addresses:
        raise FetchError(f"{target.host!r} resolves to no address", target.url)
    trusted = target.host in policy.names or policy.is_label_studio(target.url)
    if not trusted:
        for _, sockaddr in addresses:
            address = ipaddress.ip_address(sockaddr[0])
            reason = policy.address_refusal(address)
            if reason:
                raise FetchError(
                    f"refused: {target.host} resolves to {address}, {reason} (open it with "
                    "STABLESEG_ALLOWED_HOSTS)",
                    target.url,
                )
    return addresses


def _connect(
    target: _Target, addresses: list[tuple[int, Sockaddr]], deadline: float
) -> socket.socket:
    """A socket connected to one of the checked addresses (TLS for https), by the deadline."""
    last: OSError = OSError("no address")
    for family, sockaddr in addresses:
        sock = socket.socket(family, socket.SOCK_STREAM)
        try:
            sock.settimeout(_remaining(deadline))
            sock.connect(sockaddr)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            if target.scheme == "https":
                return _tls(sock, target.host, deadline)
            return sock
        except OSError as err:
            sock.close()
            last = err
            if isinstance(err, TimeoutError):
                break
    raise last


def _tls(sock: socket.socket, host: str, deadline: float) -> ssl.SSLSocket:
    """TLS over a connected socket, verified against ``host`` (SNI too). The socket's timeout,
    the time left, bounds the whole handshake (Python >= 3.5 counts it in total, not per read),
    so a server that trickles its handshake is cut off at the deadline as well."""
    sock.settimeout(_remaining(deadline))
    return _tls_context().wrap_socket(sock, server_hostname=host)


@functools.cache
def _tls_context() -> ssl.SSLContext:
    """Certificate verification as requests does it: ``REQUESTS_CA_BUNDLE`` when set, else the
    system's store and certifi's."""
    bundle = os.environ.get("REQUESTS_CA_BUNDLE") or os.environ.get("CURL_CA_BUNDLE")
    context = ssl.create_default_context(cafile=bundle or None)
    if not bundle:
        try:
            import certifi

            context.load_verify_locations(certifi.where())
        except (ImportError, OSError):
            pass
    return context


def _remaining(deadline: float) -> float:
    left = deadline - time.monotonic()
    if left <= 0:
        raise TimeoutError("deadline passed")
    return left


class _DeadlineSocket:
    """The connected socket as ``http.client`` uses it: every send and read first sets the
    socket's timeout to the time left before the deadline (TimeoutError once it has passed)."""

    def __init__(self, sock: socket.socket, deadline: float) -> None:
        self._sock = sock
        self._deadline = deadline

    def sendall(self, data: bytes) -> None:
        self._sock.settimeout(_remaining(self._deadline))
        self._sock.sendall(data)

    def recv_into(self, buffer: Any) -> int:
        self._sock.settimeout(_remaining(self._deadline))
        return self._sock.recv_into(buffer)

    def makefile(self, mode: str = "rb", *args: Any, **kwargs: Any) -> io.BufferedReader:
        if mode != "rb":
            raise ValueError(f"only 'rb' is supported, got {mode!r}")
        return io.BufferedReader(_DeadlineReader(self))

    def close(self) -> None:
        """Nothing: ``http.client`` closes the connection as soon as it has the headers of a
        ``Connection: close`` response, while the body is still to be read; the socket is
        closed by whoever connected it."""


class _DeadlineReader(io.RawIOBase):
    def __init__(self, sock: _DeadlineSocket) -> None:
        self._sock = sock

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        return self._sock.recv_into(buffer)


class _PinnedConnection(http.client.HTTPConnection):
    """``http.client`` over a socket that is already connected; it never resolves or connects."""

    def __init__(self, host: str, port: int, sock: _DeadlineSocket) -> None:
        super().__init__(host, port)
        self.sock = sock  # type: ignore[assignment]

    def connect(self) -> None:
        raise http.client.NotConnected("a pinned connection does not reconnect")
