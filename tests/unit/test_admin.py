"""Admin HTTP server over real sockets (TCP on 127.0.0.1 port 0, and unix sockets)."""

from __future__ import annotations

import contextlib
import gzip
import http.client
import json
import os
import socket
import struct
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from prometheus_client.openmetrics.parser import (
    text_string_to_metric_families as openmetrics_families,
)
from prometheus_client.parser import text_string_to_metric_families

from enforcer.config.model import Address
from enforcer.observe.admin import AdminServer
from enforcer.observe.metrics import Metrics, NullMetrics


class State:
    def __init__(self) -> None:
        self.ready = False
        self.fail_status = False

    def status(self) -> dict[str, Any]:
        if self.fail_status:
            raise RuntimeError("status exploded")
        return {"version": "0.1.0", "listeners": [{"name": "inbound", "open": 2}],
                "draining": False}

    def is_ready(self) -> bool:
        return self.ready


class Response:
    def __init__(self, r: http.client.HTTPResponse) -> None:
        self.status = r.status
        self.headers = r.headers
        self.body = r.read()


class UnixHTTPConnection(http.client.HTTPConnection):
    def __init__(self, path: str) -> None:
        super().__init__("localhost", timeout=5)
        self.unix_path = path

    def connect(self) -> None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(5)
        sock.connect(self.unix_path)
        self.sock = sock


def request(server: AdminServer, path: str, method: str = "GET",
            headers: dict[str, str] | None = None) -> Response:
    addr = server.bound
    conn: http.client.HTTPConnection
    if addr.path is not None:
        conn = UnixHTTPConnection(addr.path)
    else:
        conn = http.client.HTTPConnection(addr.host, addr.port, timeout=5)
    try:
        conn.request(method, path, headers=headers or {})
        return Response(conn.getresponse())
    finally:
        conn.close()


@pytest.fixture
def state() -> State:
    return State()


@pytest.fixture
def metrics() -> Metrics:
    m = Metrics()
    m.register_listener("inbound")
    m.connections_total.labels(listener="inbound", action="deny").inc(3)
    return m


@pytest.fixture
def admin(state: State, metrics: Metrics) -> Iterator[AdminServer]:
    server = AdminServer(Address("127.0.0.1", 0), metrics, status=state.status,
                         ready=state.is_ready)
    server.start()
    yield server
    server.close()


def test_bound_resolves_port_zero(admin: AdminServer) -> None:
    assert admin.bound.host == "127.0.0.1"
    assert admin.bound.port > 0


def test_healthz(admin: AdminServer) -> None:
    r = request(admin, "/healthz")
    assert (r.status, r.body) == (200, b"ok\n")
    assert r.headers["Content-Type"].startswith("text/plain")


def test_readyz_follows_the_callable(admin: AdminServer, state: State) -> None:
    r = request(admin, "/readyz")
    assert (r.status, r.body) == (503, b"not ready\n")
    state.ready = True
    r = request(admin, "/readyz")
    assert (r.status, r.body) == (200, b"ready\n")
    state.ready = False  # draining
    assert request(admin, "/readyz").status == 503


def test_status_json(admin: AdminServer) -> None:
    r = request(admin, "/status")
    assert r.status == 200
    assert r.headers["Content-Type"] == "application/json"
    assert json.loads(r.body) == {"version": "0.1.0", "draining": False,
                                  "listeners": [{"name": "inbound", "open": 2}]}


def test_status_error_is_500_json(admin: AdminServer, state: State) -> None:
    state.fail_status = True
    r = request(admin, "/status")
    assert r.status == 500
    assert json.loads(r.body) == {"error": "RuntimeError: status exploded"}
    state.fail_status = False
    assert request(admin, "/status").status == 200  # the server survived


def test_metrics_text_parses(admin: AdminServer) -> None:
    r = request(admin, "/metrics")
    assert r.status == 200
    assert r.headers["Content-Type"].startswith("text/plain; version=0.0.4")
    families = {f.name: f for f in text_string_to_metric_families(r.body.decode())}
    deny = [s for s in families["enforcer_connections"].samples
            if s.labels == {"listener": "inbound", "action": "deny"}]
    assert [s.value for s in deny] == [3.0]


def test_metrics_openmetrics_on_accept(admin: AdminServer) -> None:
    r = request(admin, "/metrics", headers={"Accept": "application/openmetrics-text; "
                                                      "version=1.0.0; charset=utf-8"})
    assert r.status == 200
    assert r.headers["Content-Type"].startswith("application/openmetrics-text")
    assert r.body.endswith(b"# EOF\n")
    names = {f.name for f in openmetrics_families(r.body.decode())}
    assert "enforcer_connections" in names and "enforcer_flowlog_dropped" in names


def test_metrics_gzip_and_query_string(admin: AdminServer) -> None:
    r = request(admin, "/metrics?name[]=x", headers={"Accept-Encoding": "gzip"})
    assert r.status == 200
    assert r.headers["Content-Encoding"] == "gzip"
    assert b"enforcer_connections_total" in gzip.decompress(r.body)


def test_head_has_headers_and_no_body(admin: AdminServer) -> None:
    r = request(admin, "/healthz", method="HEAD")
    assert r.status == 200
    assert r.headers["Content-Length"] == "3"
    assert r.body == b""


def test_unknown_path_404(admin: AdminServer) -> None:
    assert request(admin, "/nope").status == 404
    assert request(admin, "/").status == 404


def test_other_methods_405(admin: AdminServer) -> None:
    for method in ("POST", "PUT", "DELETE"):
        r = request(admin, "/metrics", method=method)
        assert r.status == 405, method
        assert r.headers["Allow"] == "GET, HEAD"


def test_any_other_method_is_405_too(admin: AdminServer) -> None:
    for method in ("PROPFIND", "FOO"):
        r = request(admin, "/metrics", method=method)
        assert (r.status, r.headers["Allow"]) == (405, "GET, HEAD"), method


def _resetting_client(server: AdminServer, data: bytes) -> None:
    sock = socket.create_connection((server.bound.host, server.bound.port))
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    sock.sendall(data)
    sock.close()  # RST, before (or while) the answer is written


def test_clients_that_reset_leave_no_traceback(admin: AdminServer,
                                               capfd: pytest.CaptureFixture[str]) -> None:
    for i in range(20):
        _resetting_client(admin, b"GET /status HTTP/1.1\r\n\r\n" if i % 2 else b"GET /me")
    time.sleep(0.5)
    assert request(admin, "/healthz").status == 200
    out, err = capfd.readouterr()
    assert (out, err) == ("", "")


def _threads_named_for_requests() -> int:
    return sum(1 for t in threading.enumerate() if t.name.startswith("Thread-"))


def test_a_client_trickling_its_request_is_cut_at_the_deadline(
        state: State, monkeypatch: pytest.MonkeyPatch) -> None:
    """REQUEST_TIMEOUT bounds the whole exchange, not each read: a byte every 0.1 s would
    otherwise hold a thread (and a descriptor) for as long as the client likes."""
    from enforcer.observe import admin as admin_module

    monkeypatch.setattr(admin_module, "REQUEST_TIMEOUT", 0.6)
    server = AdminServer(Address("127.0.0.1", 0), NullMetrics(), status=state.status,
                         ready=state.is_ready)
    server.start()
    before = _threads_named_for_requests()
    socks = [socket.create_connection((server.bound.host, server.bound.port)) for _ in range(5)]
    try:
        started = time.monotonic()
        cut = 0
        while cut < len(socks) and time.monotonic() - started < 5:
            time.sleep(0.1)
            for sock in socks:
                try:
                    sock.send(b"G")
                except OSError:
                    continue
            cut = sum(_closed_by_peer(sock) for sock in socks)
        assert cut == len(socks), "trickling clients still served after the deadline"
        assert 0.5 < time.monotonic() - started < 3
        time.sleep(0.2)
        assert _threads_named_for_requests() == before
        assert request(server, "/healthz").status == 200
    finally:
        for sock in socks:
            sock.close()
        server.close()


def _closed_by_peer(sock: socket.socket) -> bool:
    sock.setblocking(False)
    try:
        return sock.recv(1) == b""
    except BlockingIOError:
        return False
    except OSError:
        return True
    finally:
        sock.setblocking(True)


def test_clients_beyond_max_clients_are_closed_at_once(
        state: State, monkeypatch: pytest.MonkeyPatch) -> None:
    from enforcer.observe import admin as admin_module

    monkeypatch.setattr(admin_module, "MAX_CLIENTS", 3)
    monkeypatch.setattr(admin_module, "REQUEST_TIMEOUT", 30.0)
    server = AdminServer(Address("127.0.0.1", 0), NullMetrics(), status=state.status,
                         ready=state.is_ready)
    server.start()
    addr = (server.bound.host, server.bound.port)
    held = [socket.create_connection(addr) for _ in range(3)]  # silent: holding their slots
    try:
        time.sleep(0.3)
        extra = socket.create_connection(addr)
        extra.settimeout(5)
        assert extra.recv(100) == b""  # closed without an answer
        extra.close()
        for sock in held:
            sock.close()
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline:  # slots come back as the held ones end
            with contextlib.suppress(OSError):
                if request(server, "/healthz").status == 200:
                    break
            time.sleep(0.05)
        assert request(server, "/healthz").status == 200
    finally:
        server.close()


def test_quiet_no_request_lines(admin: AdminServer, capfd: pytest.CaptureFixture[str]) -> None:
    request(admin, "/healthz")
    request(admin, "/nope")
    out, err = capfd.readouterr()
    assert (out, err) == ("", "")


def test_bind_failure_raises_oserror(admin: AdminServer, state: State) -> None:
    other = AdminServer(admin.bound, NullMetrics(), status=state.status, ready=state.is_ready)
    with pytest.raises(OSError):
        other.start()


def test_close_releases_the_port(state: State) -> None:
    server = AdminServer(Address("127.0.0.1", 0), NullMetrics(), status=state.status,
                         ready=state.is_ready)
    server.start()
    port = server.bound.port
    server.close()
    server.close()  # idempotent
    again = AdminServer(Address("127.0.0.1", port), NullMetrics(), status=state.status,
                        ready=state.is_ready)
    again.start()
    try:
        assert request(again, "/healthz").status == 200
    finally:
        again.close()


def test_null_metrics_render_empty_exposition(state: State) -> None:
    server = AdminServer(Address("127.0.0.1", 0), NullMetrics(), status=state.status,
                         ready=state.is_ready)
    server.start()
    try:
        r = request(server, "/metrics")
        assert (r.status, r.body) == (200, b"")
    finally:
        server.close()


def ipv6_loopback() -> bool:
    if not socket.has_ipv6:
        return False
    try:
        with socket.socket(socket.AF_INET6) as s:
            s.bind(("::1", 0))
    except OSError:
        return False
    return True


@pytest.mark.skipif(not ipv6_loopback(), reason="no IPv6 loopback")
def test_ipv6(state: State) -> None:
    server = AdminServer(Address("::1", 0), NullMetrics(), status=state.status,
                         ready=state.is_ready)
    server.start()
    try:
        assert server.bound.host == "::1"
        assert request(server, "/healthz").status == 200
    finally:
        server.close()


# -- unix sockets -----------------------------------------------------------------------


@pytest.fixture
def sock_dir() -> Iterator[Path]:
    # Short path: AF_UNIX paths are limited to ~108 bytes, pytest's tmp_path can be longer.
    with tempfile.TemporaryDirectory(prefix="enf-") as d:
        yield Path(d)


def test_unix_socket(sock_dir: Path, state: State, metrics: Metrics) -> None:
    path = str(sock_dir / "admin.sock")
    server = AdminServer(Address(path=path), metrics, status=state.status, ready=state.is_ready)
    server.start()
    try:
        assert server.bound == Address(path=path)
        assert request(server, "/healthz").status == 200
        state.ready = True
        assert request(server, "/readyz").status == 200
        assert json.loads(request(server, "/status").body)["version"] == "0.1.0"
        assert b"enforcer_connections_total" in request(server, "/metrics").body
    finally:
        server.close()
    assert not os.path.exists(path)


def test_unix_stale_socket_is_replaced(sock_dir: Path, state: State) -> None:
    path = str(sock_dir / "admin.sock")
    dead = socket.socket(socket.AF_UNIX)
    dead.bind(path)
    dead.close()  # the file stays, nobody listens: a crashed process's leftover
    assert os.path.exists(path)
    server = AdminServer(Address(path=path), NullMetrics(), status=state.status,
                         ready=state.is_ready)
    server.start()
    try:
        assert request(server, "/healthz").status == 200
    finally:
        server.close()


def test_unix_socket_in_use_is_an_error(sock_dir: Path, state: State) -> None:
    path = str(sock_dir / "admin.sock")
    live = socket.socket(socket.AF_UNIX)
    live.bind(path)
    live.listen(1)
    try:
        server = AdminServer(Address(path=path), NullMetrics(), status=state.status,
                             ready=state.is_ready)
        with pytest.raises(OSError, match="in use"):
            server.start()
        assert os.path.exists(path)  # the other process's socket is left alone
    finally:
        live.close()


def test_unix_path_that_is_not_a_socket(sock_dir: Path, state: State) -> None:
    path = sock_dir / "admin.sock"
    path.write_text("precious")
    server = AdminServer(Address(path=str(path)), NullMetrics(), status=state.status,
                         ready=state.is_ready)
    with pytest.raises(OSError, match="not a socket"):
        server.start()
    assert path.read_text() == "precious"
