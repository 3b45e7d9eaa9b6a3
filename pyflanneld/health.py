"""/healthz, /readyz and /peers on --healthz-ip:--healthz-port: a small HTTP/1.1 server that
takes abuse without harming the daemon (it listens on 0.0.0.0 by default).

Upstream serves ``GET /healthz`` ("flanneld is running") and ``/readyz`` ("flanneld is ready" /
503 "flanneld is not ready yet") with Go's net/http; ``/peers`` (the remote leases this host
programmed, as JSON) is pyflanneld's. Routes are a table: ``add_route("/metrics", handler)``.

What keeps a client from hurting the daemon:

* **one request per connection**, GET and HEAD only (405 with ``Allow`` otherwise), no body read;
* **a bounded request head**: request line and headers of at most ``MAX_HEAD_BYTES`` (431 beyond;
  a 100 KB request line is one 431, not an exception);
* **a deadline per request** (``request_timeout_s``, from accept to the last byte written): a
  client sending a header every 3 s (slowloris) is closed when it runs out;
* **a connection cap** (``max_connections``, default ``min(64, RLIMIT_NOFILE soft / 8)``): at the
  cap, the oldest unfinished connection with no whole request to answer (read, or waiting in its
  socket) is closed for each new one, so a flood of idle connections neither locks out a probe
  (answered within milliseconds of its request arriving, however many connect after it) nor eats
  the descriptors the daemon's etcd, netlink and iptables work needs;
* **an own accept loop**: running out of descriptors anyway (EMFILE/ENFILE) frees the oldest
  connection and pauses accepting briefly, with one warning a minute — asyncio's server would log
  ``socket.accept() out of system resource`` with a traceback each time;
* **no traceback, ever**: protocol errors are status codes or closed connections; a failing route
  handler is a 500 and one warning line.

Why not a library: aiohttp's server costs ~16 MB of RSS to import (~100 ms), more than the rest of
the daemon's health needs by far; the stdlib's http.server is thread-per-connection (threads and
descriptors are what a flood exhausts) and still needs every limit above; a parser such as h11
(0.3 MB) would replace only the dozen lines that split the request line — the limits, which are
the point, are the same code either way.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import inspect
import json
import re
import resource
import socket
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from http import HTTPStatus

import structlog

log = structlog.get_logger()

MAX_HEAD_BYTES = 8192
REQUEST_TIMEOUT_S = 5.0
MAX_CONNECTIONS = 64
FD_SHARE = 8  # at most 1/FD_SHARE of RLIMIT_NOFILE goes to health connections
LISTEN_BACKLOG = 128
ACCEPT_PAUSE_S = 0.5
WARN_EVERY_S = 60.0
_OUT_OF_RESOURCES = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM})
_ABSOLUTE_RE = re.compile(rb"(?i:https?)://[^/?#\s]+(/\S*)?")  # absolute-form: scheme://authority[/path]
_TOKEN = frozenset(b"!#$%&'*+-.^_`|~0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz")


@dataclass(frozen=True)
class Response:
    """What a route handler returns: status code, body bytes, Content-Type."""

    status: int
    body: bytes = b""
    content_type: str = "text/plain; charset=utf-8"

    @classmethod
    def text(cls, status: int, text: str) -> Response:
        """A response with ``status`` (an HTTP status code) and ``text`` as its UTF-8 body."""
        return cls(status, text.encode())


Handler = Callable[[], "Response | Awaitable[Response]"]


class BadRequest(Exception):
    """The request cannot be served; ``status`` is the answer (400, 405, 431)."""

    def __init__(self, status: int, why: str) -> None:
        super().__init__(why)
        self.status = status


def parse_request_head(head: bytes) -> tuple[str, str]:
    """``(method, path)`` from a request head (request line + headers, CRLF or LF line ends).

    The path is the target without its query string; an absolute-form target
    (``http://host:8081/healthz``, what a client sends through a proxy, and which RFC 9112 says a
    server must accept, as Go's net/http does) is reduced to its path. Raises BadRequest(400) for a
    malformed request line, BadRequest(405) for a method other than GET or HEAD. Headers are not
    interpreted.
    """
    line = head.split(b"\n", 1)[0].rstrip(b"\r")
    parts = line.split(b" ")
    if len(parts) == 3:
        m = _ABSOLUTE_RE.fullmatch(parts[1])
        if m:
            parts[1] = m[1] or b"/"
    if len(parts) != 3 or not parts[0] or not set(parts[0]) <= _TOKEN \
            or not parts[1].startswith(b"/") or parts[2] not in (b"HTTP/1.0", b"HTTP/1.1"):
        raise BadRequest(400, "malformed request line")
    method = parts[0].decode("ascii")
    if method not in ("GET", "HEAD"):
        raise BadRequest(405, f"method {method} not allowed")
    return method, parts[1].split(b"?", 1)[0].decode("latin-1")


def render(resp: Response, head_only: bool = False, extra: str = "") -> bytes:
    """The bytes of an HTTP/1.1 response that closes the connection (no body for HEAD)."""
    try:
        reason = HTTPStatus(resp.status).phrase
    except ValueError:
        reason = "Status"
    head = (f"HTTP/1.1 {resp.status} {reason}\r\nContent-Type: {resp.content_type}\r\n"
            f"Content-Length: {len(resp.body)}\r\n{extra}Connection: close\r\n\r\n").encode("latin-1")
    return head if head_only else head + resp.body


def _head_waiting(conn: socket.socket) -> bool:
    """Does ``conn``'s receive buffer already hold a whole request head (peeked, not read)?"""
    try:
        data = conn.recv(MAX_HEAD_BYTES, socket.MSG_PEEK | socket.MSG_DONTWAIT)
    except OSError:  # nothing there yet (EAGAIN), or the connection is gone
        return False
    return b"\r\n\r\n" in data or b"\n\n" in data


def default_max_connections() -> int:
    """``min(MAX_CONNECTIONS, RLIMIT_NOFILE soft limit / FD_SHARE)``, at least 4."""
    soft, _hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY:
        return MAX_CONNECTIONS
    return max(4, min(MAX_CONNECTIONS, soft // FD_SHARE))


class HealthServer:
    """The health port. ``readiness() -> (ready, why)``; ``peers() -> list of JSON-able dicts``
    (``/peers`` exists only with it). ``await start()`` binds (OSError if it cannot),
    ``await close()`` stops it; ``add_route(path, handler)`` adds a route, before or after start."""

    def __init__(self, host: str, port: int, readiness: Callable[[], tuple[bool, str]],
                 peers: Callable[[], list[dict]] | None = None, *, max_connections: int | None = None,
                 request_timeout_s: float = REQUEST_TIMEOUT_S) -> None:
        self.host, self.port, self.readiness, self.peers = host, port, readiness, peers
        self.max_connections = max_connections or default_max_connections()
        self.request_timeout_s = request_timeout_s
        self.routes: dict[str, Handler] = {"/healthz": self._healthz, "/readyz": self._readyz}
        if peers is not None:
            self.routes["/peers"] = self._peers
        self._sock: socket.socket | None = None
        self._accepting: asyncio.Task | None = None
        self._conns: dict[asyncio.Task, socket.socket] = {}  # insertion order = oldest first
        self._answering: set[asyncio.Task] = set()  # connections whose whole request was read
        self._last_warning: dict[str, float] = {}

    def add_route(self, path: str, handler: Handler) -> None:
        """Serve ``path`` (exact match, query ignored) with ``handler()`` → Response (or an
        awaitable of one), for GET and HEAD. A handler's exception is a 500 and one warning."""
        self.routes[path] = handler

    # --- the routes -----------------------------------------------------------------------------
    def _healthz(self) -> Response:
        return Response.text(200, "flanneld is running")

    def _readyz(self) -> Response:
        ok, why = self.readiness()
        if ok:  # a ready host may still report something (e.g. rejected lease entries)
            return Response.text(200, "flanneld is ready" + (f"\n{why}" if why else ""))
        return Response.text(503, f"flanneld is not ready yet: {why}")

    def _peers(self) -> Response:
        assert self.peers is not None
        return Response(200, json.dumps(self.peers(), indent=1).encode(), "application/json")

    # --- life cycle -----------------------------------------------------------------------------
    async def start(self) -> None:
        """Bind and listen. An empty host is every address, IPv6 and IPv4 (Go's ``:port``, what
        upstream listens on for ``--healthz-ip=``), or every IPv4 one where IPv6 is off. Raises
        OSError when it cannot bind (gaierror for a host that does not resolve)."""
        try:
            sock = self._bind(self.host or "::")
        except OSError:
            if self.host:
                raise
            sock = self._bind("0.0.0.0")
        self._sock = sock
        self._accepting = asyncio.create_task(self._accept_loop(), name="health-accept")
        shown = f"[{self.host}]" if ":" in self.host else self.host
        log.info("health server listening", address=f"{shown}:{self.port}", max_connections=self.max_connections)

    def _bind(self, host: str) -> socket.socket:
        family, kind, proto, _name, addr = socket.getaddrinfo(
            host, self.port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)[0]
        sock = socket.socket(family, kind, proto)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if family == socket.AF_INET6 and host == "::":
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)  # IPv4 too, as Go does
            sock.bind(addr)
            sock.listen(LISTEN_BACKLOG)
            sock.setblocking(False)
        except OSError:
            sock.close()
            raise
        return sock

    async def close(self) -> None:
        """Stop accepting, cancel the open connections and close the listening socket. Idempotent."""
        tasks = [t for t in (self._accepting, *self._conns) if t is not None]
        for t in tasks:
            t.cancel()
        for t in tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await t
        if self._sock is not None:
            self._sock.close()
            self._sock = None

    # --- connections ----------------------------------------------------------------------------
    async def _accept_loop(self) -> None:
        loop = asyncio.get_running_loop()
        assert self._sock is not None
        while True:
            try:
                conn, _peer = await loop.sock_accept(self._sock)
            except OSError as e:
                if e.errno in _OUT_OF_RESOURCES:
                    self._warn("no file descriptor left", "health server: out of file descriptors; closing "
                               "the oldest connection and pausing accepts (raise LimitNOFILE?)",
                               error=e.strerror, connections=len(self._conns))
                    self._evict_oldest()
                    await asyncio.sleep(ACCEPT_PAUSE_S)
                elif e.errno not in (errno.ECONNABORTED, errno.EPROTO, errno.EINTR):
                    self._warn(f"accept {e.errno}", "health server: accept failed", error=e.strerror)
                    await asyncio.sleep(ACCEPT_PAUSE_S)
                continue
            conn.setblocking(False)
            if len(self._conns) >= self.max_connections:
                self._warn("cap", "health server: connection limit reached; closing the oldest unfinished "
                           "connections for new ones (slow or idle clients?)", max_connections=self.max_connections)
                self._evict_oldest()
            task = asyncio.create_task(self._serve(conn))
            self._conns[task] = conn
            task.add_done_callback(self._forget)
            await asyncio.sleep(0)  # a full backlog must not keep the loop from everything else

    def _forget(self, task: asyncio.Task) -> None:
        self._answering.discard(task)
        conn = self._conns.pop(task, None)
        if conn is not None:
            conn.close()

    def _evict_oldest(self) -> None:
        """Cancel the oldest unfinished connection that has no whole request to answer (one read
        already, or waiting in its socket: a probe is answered within milliseconds, even when a
        flood of new connections arrives before its turn); if every one has, the oldest. Its socket
        is closed when the task has let go of it (closing it under a pending sock_recv would confuse
        the loop's selector)."""
        victim = None
        for task, conn in self._conns.items():
            if task.done():
                continue
            if task in self._answering or _head_waiting(conn):
                victim = victim or task
                continue
            victim = task
            break
        if victim is not None:
            victim.cancel()

    def _warn(self, key: str, message: str, **fields: object) -> None:
        now = time.monotonic()
        if now - self._last_warning.get(key, -WARN_EVERY_S) >= WARN_EVERY_S:
            self._last_warning[key] = now
            log.warning(message, **fields)

    async def _serve(self, conn: socket.socket) -> None:
        loop = asyncio.get_running_loop()
        try:
            async with asyncio.timeout(self.request_timeout_s):
                method = "GET"
                extra = ""
                try:
                    head = await self._read_head(conn)
                    if head is None:
                        return  # the client left before sending a whole request
                    self._answering.add(asyncio.current_task())
                    method, path = parse_request_head(head)
                    resp = await self._respond(path)
                except BadRequest as e:
                    resp = Response.text(e.status, HTTPStatus(e.status).phrase.lower())
                    extra = "Allow: GET, HEAD\r\n" if e.status == 405 else ""
                await loop.sock_sendall(conn, render(resp, head_only=method == "HEAD", extra=extra))
                with contextlib.suppress(OSError):
                    conn.shutdown(socket.SHUT_WR)
        except (TimeoutError, OSError):
            pass  # too slow, or gone: the connection is closed either way
        except Exception as e:  # noqa: BLE001 - a client must never produce a traceback
            log.warning("health server: request failed", error=repr(e))

    async def _read_head(self, conn: socket.socket) -> bytes | None:
        """The request head (up to and including the blank line); None when the client closes
        first. Raises BadRequest(431) beyond MAX_HEAD_BYTES."""
        loop = asyncio.get_running_loop()
        buf = bytearray()
        while True:
            chunk = await loop.sock_recv(conn, 4096)
            if not chunk:
                return None
            start = max(0, len(buf) - 3)
            buf += chunk
            for end in (b"\r\n\r\n", b"\n\n"):
                i = buf.find(end, start)
                if i >= 0 and i + len(end) <= MAX_HEAD_BYTES:
                    return bytes(buf[:i + len(end)])
            if len(buf) >= MAX_HEAD_BYTES:
                raise BadRequest(431, "request head too large")

    async def _respond(self, path: str) -> Response:
        handler = self.routes.get(path)
        if handler is None:
            return Response.text(404, "not found")
        try:
            result = handler()
            if inspect.isawaitable(result):
                result = await result
            return result
        except Exception as e:  # noqa: BLE001 - a broken handler is a 500, not a dead server
            log.warning("health server: handler failed", path=path, error=repr(e))
            return Response.text(500, "internal error")
