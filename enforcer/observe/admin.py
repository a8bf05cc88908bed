"""Admin HTTP server: /metrics, /healthz, /readyz, /status, in a daemon thread.

A ``ThreadingHTTPServer`` (one short-lived thread per request, HTTP/1.0, connection closed
after each response) serves from its own thread, so the data plane's event loop never
handles admin traffic. A client gets REQUEST_TIMEOUT for its whole exchange (the serving
loop shuts down the sockets of late ones, so a client trickling a byte at a time cannot
hold a thread), at most MAX_CLIENTS are served at once (more are closed at once: the admin
endpoint shares the process's descriptors with the data plane), and a client that resets
or times out is not an error worth a traceback. ``start()`` binds synchronously, so a bind failure raises
``OSError`` to the caller (the CLI exits 3). ``unix:/path`` addresses get an ``AF_UNIX``
server; a stale socket file left by a dead process is removed first, but a socket someone
still answers on, or a path that is not a socket, is an error.

The ``status``, ``ready`` and ``health`` callables run on admin threads: they must only
read state (the data plane should keep what they read consistent without the event loop's help).

Endpoints (GET and HEAD; other methods get 405, unknown paths 404):

- ``/metrics``  Prometheus text 0.0.4, or OpenMetrics when ``Accept`` asks for
  ``application/openmetrics-text``; gzip when ``Accept-Encoding`` allows it.
- ``/healthz``  200 ``ok`` while ``health()`` says the data plane's event loop (every
  worker's, under a supervisor) keeps turning, else 503 with what stalled
  (``observe.heartbeat``); 200 ``ok`` without a ``health`` callable.
- ``/readyz``   200 ``ready`` when ``ready()`` is true, else 503 ``not ready``.
- ``/status``   200 with ``status()`` as JSON; 500 with ``{"error": ...}`` if it raises.
"""

from __future__ import annotations

import contextlib
import errno
import gzip
import json
import logging
import os
import socket
import stat
import sys
import threading
import time
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, cast
from urllib.parse import urlsplit

from enforcer.config.model import Address
from enforcer.dataplane.sockets import set_v6only
from enforcer.observe.metrics import AggregatedMetrics, Metrics, NullMetrics

log = logging.getLogger("enforcer.admin")

POLL_INTERVAL = 0.1  # how long close() may wait for the serving loop to notice
REQUEST_TIMEOUT = 10.0  # seconds a client has for its whole exchange
MAX_CLIENTS = 64  # admin clients served at once
TEXT = "text/plain; charset=utf-8"


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    request_queue_size = 64
    metrics: Metrics | NullMetrics | AggregatedMetrics
    status_fn: Callable[[], dict[str, Any]]
    ready_fn: Callable[[], bool]
    health_fn: Callable[[], tuple[bool, str]]

    def server_activate(self) -> None:
        super().server_activate()
        self._slots = threading.BoundedSemaphore(MAX_CLIENTS)
        self._deadlines: dict[socket.socket, float] = {}
        self._lock = threading.Lock()

    def process_request(self, request: Any, client_address: Any) -> None:
        if not self._slots.acquire(blocking=False):
            self.shutdown_request(request)  # too many at once
            return
        with self._lock:
            self._deadlines[request] = time.monotonic() + REQUEST_TIMEOUT
        try:
            super().process_request(request, client_address)  # starts its thread
        except BaseException:
            self._done(request)
            raise

    def process_request_thread(self, request: Any, client_address: Any) -> None:
        try:
            super().process_request_thread(request, client_address)
        finally:
            self._done(request)

    def _done(self, request: socket.socket) -> None:
        with self._lock:
            self._deadlines.pop(request, None)
        self._slots.release()

    def service_actions(self) -> None:
        """Called by serve_forever every POLL_INTERVAL: cut the clients past their time
        (their thread's blocked read or write then fails, and the thread ends)."""
        now = time.monotonic()
        with self._lock:
            late = [sock for sock, deadline in self._deadlines.items() if deadline <= now]
            for sock in late:
                del self._deadlines[sock]
        for sock in late:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)

    def handle_error(self, request: Any, client_address: Any) -> None:
        exc = sys.exc_info()[1]
        if isinstance(exc, OSError):  # the client reset, went away or ran out of time
            return
        log.error("admin: request from %s failed", client_address, exc_info=exc)


class _Server6(_Server):
    address_family = socket.AF_INET6

    def server_bind(self) -> None:
        set_v6only(self.socket, str(self.server_address[0]))  # [::]: IPv4 too
        super().server_bind()


class _UnixServer(_Server):
    address_family = socket.AF_UNIX
    allow_reuse_address = False

    def server_bind(self) -> None:
        # HTTPServer.server_bind expects (host, port); a unix path has neither.
        self.socket.bind(self.server_address)
        self.server_address = self.socket.getsockname()
        self.server_name = "localhost"
        self.server_port = 0


class _Handler(BaseHTTPRequestHandler):
    server_version = "enforcer-admin"
    sys_version = ""
    timeout = REQUEST_TIMEOUT

    @property
    def admin(self) -> _Server:
        return cast(_Server, self.server)

    # -- dispatch ------------------------------------------------------------------------
    def do_GET(self) -> None:
        self._dispatch(head=False)

    def do_HEAD(self) -> None:
        self._dispatch(head=True)

    def _not_allowed(self) -> None:
        self._send(405, b"method not allowed\n", TEXT, head=False, extra={"Allow": "GET, HEAD"})

    def __getattr__(self, name: str) -> Any:
        if name.startswith("do_"):  # any method but GET and HEAD: 405 (not http.server's 501)
            return self._not_allowed
        raise AttributeError(name)

    def _dispatch(self, head: bool) -> None:
        path = urlsplit(self.path).path
        route = _ROUTES.get(path)
        if route is None:
            self._send(404, b"not found\n", TEXT, head)
            return
        code, body, ctype, extra = route(self)
        self._send(code, body, ctype, head, extra)

    # -- endpoints -----------------------------------------------------------------------
    def _metrics(self) -> _Response:
        body, ctype = self.admin.metrics.render_for(self.headers.get("Accept"))
        extra: dict[str, str] = {}
        if "gzip" in (self.headers.get("Accept-Encoding") or ""):
            body = gzip.compress(body, compresslevel=1)
            extra["Content-Encoding"] = "gzip"
        return 200, body, ctype, extra

    def _healthz(self) -> _Response:
        try:
            healthy, text = self.admin.health_fn()
        except Exception as exc:
            log.exception("admin: the health check raised")
            healthy, text = False, f"health check failed: {type(exc).__name__}: {exc}"
        if healthy:
            return 200, text.encode("utf-8") + b"\n", TEXT, {}
        log.error("admin: /healthz answers 503: %s", text)
        return 503, text.encode("utf-8") + b"\n", TEXT, {}

    def _readyz(self) -> _Response:
        try:
            ready = bool(self.admin.ready_fn())
        except Exception:
            log.exception("admin: the readiness check raised")
            ready = False
        if ready:
            return 200, b"ready\n", TEXT, {}
        return 503, b"not ready\n", TEXT, {}

    def _status(self) -> _Response:
        try:
            body = json.dumps(self.admin.status_fn(), indent=2, default=str) + "\n"
            code = 200
        except Exception as exc:
            log.exception("admin: building /status failed")
            body = json.dumps({"error": f"{type(exc).__name__}: {exc}"}) + "\n"
            code = 500
        return code, body.encode("utf-8"), "application/json", {}

    # -- plumbing ------------------------------------------------------------------------
    def _send(self, code: int, body: bytes, ctype: str, head: bool,
              extra: dict[str, str] | None = None) -> None:
        self.send_response(code)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Cache-Control", "no-store")
        for name, value in (extra or {}).items():
            self.send_header(name, value)
        self.end_headers()
        if not head:
            with contextlib.suppress(OSError):  # the client went away
                self.wfile.write(body)

    def address_string(self) -> str:
        return str(self.client_address[0]) if self.client_address else "unix"

    def log_message(self, format: str, *args: Any) -> None:
        pass  # quiet: no per-request lines on stderr


_Response = tuple[int, bytes, str, dict[str, str]]
_ROUTES: dict[str, Callable[[_Handler], _Response]] = {
    "/metrics": _Handler._metrics,
    "/healthz": _Handler._healthz,
    "/readyz": _Handler._readyz,
    "/status": _Handler._status,
}


class AdminServer:
    """The admin HTTP listener. ``start()`` binds (raising ``OSError``) and serves."""

    def __init__(self, address: Address, metrics: Metrics | NullMetrics | AggregatedMetrics, *,
                 status: Callable[[], dict[str, Any]], ready: Callable[[], bool],
                 health: Callable[[], tuple[bool, str]] | None = None) -> None:
        self._address = address
        self._health = health or _always_healthy
        self._metrics = metrics
        self._status = status
        self._ready = ready
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None
        self._unix_ident: tuple[int, int] | None = None

    def start(self) -> None:
        server = self._bind()
        server.metrics = self._metrics
        server.status_fn = self._status
        server.ready_fn = self._ready
        server.health_fn = self._health
        self._server = server
        self._thread = threading.Thread(target=server.serve_forever, args=(POLL_INTERVAL,),
                                        name="enforcer-admin", daemon=True)
        self._thread.start()

    def _bind(self) -> _Server:
        addr = self._address
        if addr.path is not None:
            remove_stale_socket(addr.path)
            server: _Server = _UnixServer(cast(Any, addr.path), _Handler)
            st = os.stat(addr.path)
            self._unix_ident = (st.st_dev, st.st_ino)
            return server
        cls = _Server6 if ":" in addr.host else _Server
        return cls((addr.host, addr.port), _Handler)

    @property
    def bound(self) -> Address:
        """The address actually bound (port 0 resolved)."""
        if self._server is None:
            return self._address
        if self._address.path is not None:
            return Address(path=self._address.path)
        sockname = self._server.socket.getsockname()
        return Address(host=str(sockname[0]), port=int(sockname[1]))

    def close(self) -> None:
        """Stop serving and release the socket (and the unix socket file). Idempotent."""
        server, self._server = self._server, None
        if server is None:
            return
        server.shutdown()
        server.server_close()
        if self._thread is not None:
            self._thread.join(timeout=5.0)
        path = self._address.path
        if path is not None and self._unix_ident is not None:
            _unlink_if_same(path, self._unix_ident)


def _always_healthy() -> tuple[bool, str]:
    return True, "ok"


def remove_stale_socket(path: str) -> None:
    """Remove a unix socket file nobody listens on; refuse anything else at ``path``."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(st.st_mode):
        raise FileExistsError(errno.EEXIST, f"{path} exists and is not a socket", path)
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    probe.settimeout(1.0)
    try:
        probe.connect(path)
    except (ConnectionRefusedError, FileNotFoundError):
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)
        return
    finally:
        probe.close()
    raise OSError(errno.EADDRINUSE, f"{path} is in use by another process", path)


def _unlink_if_same(path: str, ident: tuple[int, int]) -> None:
    with contextlib.suppress(OSError):
        st = os.lstat(path)
        if (st.st_dev, st.st_ino) == ident:
            os.unlink(path)
