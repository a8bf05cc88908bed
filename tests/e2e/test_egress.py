"""Egress proxies end to end: curl through ``protocol: socks5`` and ``protocol:
http_connect`` listeners (plain and TLS-wrapped), rules on the requested host and port,
logins, upstream failures, and malformed handshakes.

Names under ``.egress.test`` resolve only through the test's resolver (``FakeResolver``),
which records every name asked: a denied name must never be among them."""

from __future__ import annotations

import asyncio
import hashlib
import os
import socket
import ssl
import struct
from pathlib import Path
from typing import Any

import pytest
import trustme

from tests.conftest import require_tool
from tests.e2e.egress_util import (
    FakeResolver,
    credentials_file,
    egress_cfg,
    egress_errors,
    raw_session,
)
from tests.e2e.harness import Enforcer, running, wait_until
from tests.e2e.test_real_clients import HttpBackend
from tests.e2e.tls_util import run_tool

pytestmark = [pytest.mark.needs_tool, pytest.mark.usefixtures("relay_mode")]


def _allow(port: int, hosts: list[str] | None = None) -> list[dict[str, Any]]:
    to: dict[str, Any] = {"hosts": hosts or ["*.egress.test"], "ports": [port]}
    return [{"name": "backends", "action": "allow", "to": to}]


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


async def _curl(*args: str) -> tuple[int, bytes, str]:
    curl = require_tool("curl")
    code, out, err = await run_tool(curl, "-sS", "--max-time", "20", *args)
    return code, out, err.decode(errors="replace")


async def _upload(tmp_path: Path, backend: HttpBackend, url: str, *proxy: str) -> None:
    """POST a random body through the proxy; the backend echoes it plus its tail."""
    body = os.urandom(200_000)
    (tmp_path / "body").write_bytes(body)
    code, _, err = await _curl(*proxy, "--fail", "--data-binary", f"@{tmp_path / 'body'}",
                               "-o", str(tmp_path / "out"), url)
    assert code == 0, err
    assert _sha((tmp_path / "out").read_bytes()) == _sha(body + backend.tail)
    assert _sha(backend.bodies[-1]) == _sha(body)


@pytest.fixture
def resolver(monkeypatch: pytest.MonkeyPatch) -> FakeResolver:
    return FakeResolver(monkeypatch)


# ------------------------------------------------------------------------------ SOCKS5
async def test_socks5_hostname(tmp_path: Path, resolver: FakeResolver) -> None:
    backend = await HttpBackend(os.urandom(300_000)).start()
    enforcer = await Enforcer(egress_cfg("socks5", _allow(backend.port))).start()
    async with running(enforcer, backend):
        await _upload(tmp_path, backend, f"http://app.egress.test:{backend.port}/",
                      "--socks5-hostname", f"127.0.0.1:{enforcer.port()}")
        rec = (await enforcer.wait_flows(1))[0]
        assert rec["action"] == "allow" and rec["rule"] == "backends"
        assert rec["egress"] == {"protocol": "socks5", "host": "app.egress.test",
                                 "port": backend.port, "user": None}
        assert rec["upstream"]["address"] == f"app.egress.test:{backend.port}"
        assert resolver.asked == ["app.egress.test"]


async def test_socks5_ip_address(tmp_path: Path, resolver: FakeResolver) -> None:
    backend = await HttpBackend(os.urandom(100_000)).start()
    rules = [{"name": "loopback", "action": "allow",
              "to": {"cidrs": ["127.0.0.0/8"], "ports": [backend.port]}}]
    enforcer = await Enforcer(egress_cfg("socks5", rules)).start()
    async with running(enforcer, backend):
        await _upload(tmp_path, backend, f"http://127.0.0.1:{backend.port}/",
                      "--socks5", f"127.0.0.1:{enforcer.port()}")
        rec = (await enforcer.wait_flows(1))[0]
        assert rec["action"] == "allow" and rec["egress"]["host"] == "127.0.0.1"
        assert resolver.asked == []  # an address needs no resolver


async def test_socks5_denied_host_and_port_never_resolved(resolver: FakeResolver) -> None:
    backend = await HttpBackend(b"tail").start()
    rules = [*_allow(backend.port, ["app.egress.test"]),
             {"name": "no-secret", "action": "deny", "to": {"hosts": ["*.secret.egress.test"]}}]
    enforcer = await Enforcer(egress_cfg("socks5", rules)).start()
    async with running(enforcer, backend):
        proxy = ["--socks5-hostname", f"127.0.0.1:{enforcer.port()}"]
        code, _, err = await _curl(*proxy, f"http://db.secret.egress.test:{backend.port}/")
        assert code != 0 and "(2)" in err, err  # SOCKS5 reply 0x02: not allowed by ruleset
        code, _, _ = await _curl(*proxy, f"http://app.egress.test:{backend.port + 1}/")
        assert code != 0  # the port is not allowed: default deny
        recs = await enforcer.wait_flows(2)
        assert [r["action"] for r in recs] == ["deny", "deny"]
        assert recs[0]["rule"] == "no-secret" and recs[1]["reason"] == "default"
        assert recs[0]["egress"]["host"] == "db.secret.egress.test"
        assert resolver.asked == []
        name = b"x.secret.egress.test"
        got, _ = await raw_session(enforcer.port(), [
            b"\x05\x01\x00",
            b"\x05\x01\x00\x03" + bytes([len(name)]) + name + struct.pack(">H", 80)])
        assert got[:2] == b"\x05\x00" and got[2:4] == b"\x05\x02", got
        assert resolver.asked == []


async def test_socks5_login(tmp_path: Path, resolver: FakeResolver) -> None:
    backend = await HttpBackend(os.urandom(50_000)).start()
    creds = credentials_file(tmp_path / "users", {"alice": "s3cret", "bob": "other"})
    cfg = egress_cfg("socks5", _allow(backend.port), egress={"credentials": creds})
    enforcer = await Enforcer(cfg).start()
    async with running(enforcer, backend):
        proxy = ["--socks5-hostname", f"127.0.0.1:{enforcer.port()}"]
        url = f"http://app.egress.test:{backend.port}/"
        await _upload(tmp_path, backend, url, *proxy, "--proxy-user", "alice:s3cret")
        await _upload(tmp_path, backend, url, *proxy, "--proxy-user", "alice:s3cret")  # cached
        code, _, _ = await _curl(*proxy, "--proxy-user", "alice:hunter2x", url)
        assert code != 0
        code, _, _ = await _curl(*proxy, url)  # no login offered
        assert code != 0
        recs = await enforcer.wait_flows(4)
        assert [r["egress"]["user"] for r in recs[:2]] == ["alice", "alice"]
        assert recs[2]["close"] == "egress_bad_credentials" and recs[2]["egress"]["user"] is None
        assert recs[3]["close"] == "egress_no_acceptable_method"
        assert egress_errors(enforcer, "bad_credentials") == 1
        assert all("s3cret" not in str(r) and "hunter2x" not in str(r) for r in recs)
        assert resolver.asked == ["app.egress.test"] * 2


async def test_socks5_upstream_failures(resolver: FakeResolver) -> None:
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        closed = s.getsockname()[1]
    rules = [{"name": "any", "action": "allow", "to": {"ports": [closed]}}]
    enforcer = await Enforcer(egress_cfg("socks5", rules)).start()
    async with running(enforcer):
        def request(host: bytes) -> list[bytes]:
            return [b"\x05\x01\x00",
                    b"\x05\x01\x00\x03" + bytes([len(host)]) + host + struct.pack(">H", closed)]
        got, ended = await raw_session(enforcer.port(), request(b"app.egress.test"))
        assert got[2:4] == b"\x05\x05" and ended == "eof", got  # connection refused
        got, _ = await raw_session(enforcer.port(), request(b"nowhere.invalid"))
        assert got[2:4] == b"\x05\x04", got  # host unreachable (no such name)
        recs = await enforcer.wait_flows(2)
        assert [r["close"] for r in recs] == ["upstream_connect_failed",
                                              "upstream_resolve_failed"]


async def test_socks5_malformed(resolver: FakeResolver) -> None:
    cfg = egress_cfg("socks5", [], default="allow", egress={"request_timeout": "0.5s"})
    enforcer = await Enforcer(cfg).start()
    fds = len(os.listdir("/proc/self/fd"))
    async with running(enforcer):
        port = enforcer.port()
        cases: list[tuple[list[bytes], bytes, str]] = [
            ([b"\x05"], b"", "truncated"),  # a truncated greeting, then FIN
            ([b"\x04\x01\x00\x50\x7f\x00\x00\x01\x00"], b"", "bad_version"),  # SOCKS4
            ([b"\x05\x00"], b"\x05\xff", "no_methods"),
            ([b"\x05\x01\x00", b"\x05\x02\x00\x01\x7f\x00\x00\x01\x00\x50"],
             b"\x05\x00\x05\x07", "command_not_supported"),  # BIND
            ([b"\x05\x01\x00", b"\x05\x03\x00\x01\x7f\x00\x00\x01\x00\x50"],
             b"\x05\x00\x05\x07", "command_not_supported"),  # UDP ASSOCIATE
            ([b"\x05\x01\x00", b"\x05\x01\x00\x09"], b"\x05\x00\x05\x08", "bad_address_type"),
            ([b"\x05\x01\x00", b"\x05\x01\x00\x03\xff" + b"a" * 255 + b"\x00\x50"],
             b"\x05\x00\x05\x01", "bad_address"),  # a 255-byte name (over 253)
            ([b"\x05\x01\x00", b"\x05\x01\x00\x03\x05a..bc\x00\x50"],
             b"\x05\x00\x05\x01", "bad_address"),
            ([b"\x05\x01\x00", b"\x05\x01\x00"], b"\x05\x00", "timeout"),  # slow request
        ]
        for chunks, expect, reason in cases:
            got, ended = await raw_session(port, chunks, half_close=reason == "truncated")
            assert ended != "timeout", reason
            assert got[:4] == expect, (reason, got)
        recs = await enforcer.wait_flows(len(cases))
        for rec, (_, _, reason) in zip(recs, cases, strict=True):
            assert rec["close"] == f"egress_{reason}" if reason != "truncated" \
                else rec["close"] == "client_closed", rec
            assert rec["upstream"] is None and rec["action"] == "error"
        assert egress_errors(enforcer, "command_not_supported") == 2
        assert egress_errors(enforcer, "truncated") == 1
        assert egress_errors(enforcer, "timeout") == 1
        assert resolver.asked == []
    await wait_until(lambda: len(os.listdir("/proc/self/fd")) <= fds + 2)


# ------------------------------------------------------------------------------ HTTP CONNECT
class TlsHttpBackend(HttpBackend):
    """HttpBackend behind TLS with a certificate for app.egress.test."""

    def __init__(self, tail: bytes, ca: trustme.CA) -> None:
        super().__init__(tail)
        self.ssl = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        ca.issue_cert("app.egress.test").configure_cert(self.ssl)

    async def start(self) -> TlsHttpBackend:
        self.server = await asyncio.start_server(self._handle, "127.0.0.1", 0, ssl=self.ssl)
        return self


async def test_http_connect_to_tls_backend(tmp_path: Path, resolver: FakeResolver) -> None:
    ca = trustme.CA()
    ca.cert_pem.write_to_path(str(tmp_path / "ca.pem"))
    backend = await TlsHttpBackend(os.urandom(300_000), ca).start()
    enforcer = await Enforcer(egress_cfg("http_connect", _allow(backend.port))).start()
    async with running(enforcer, backend):
        await _upload(tmp_path, backend, f"https://app.egress.test:{backend.port}/",
                      "-x", f"http://127.0.0.1:{enforcer.port()}", "--proxytunnel",
                      "--cacert", str(tmp_path / "ca.pem"))
        rec = (await enforcer.wait_flows(1))[0]
        assert rec["action"] == "allow"
        assert rec["egress"] == {"protocol": "http_connect", "host": "app.egress.test",
                                 "port": backend.port, "user": None}
        assert resolver.asked == ["app.egress.test"]


async def test_http_connect_login_and_refusals(tmp_path: Path,
                                               resolver: FakeResolver) -> None:
    backend = await HttpBackend(os.urandom(80_000)).start()
    creds = credentials_file(tmp_path / "users", {"alice": "s3cret"})
    cfg = egress_cfg("http_connect", _allow(backend.port, ["app.egress.test"]),
                     egress={"credentials": creds})
    enforcer = await Enforcer(cfg).start()
    async with running(enforcer, backend):
        proxy = ["-x", f"http://127.0.0.1:{enforcer.port()}", "--proxytunnel"]
        url = f"http://app.egress.test:{backend.port}/"
        await _upload(tmp_path, backend, url, *proxy, "--proxy-user", "alice:s3cret")
        port = enforcer.port()
        connect = f"CONNECT app.egress.test:{backend.port} HTTP/1.1\r\n".encode()
        got, _ = await raw_session(port, [connect + b"\r\n"])
        assert got.startswith(b"HTTP/1.1 407 ") and b'Proxy-Authenticate: Basic realm="egress"' \
            in got, got
        bad = b"Proxy-Authorization: Basic YWxpY2U6d3Jvbmc=\r\n"  # alice:wrong
        got, _ = await raw_session(port, [connect + bad + b"\r\n"])
        assert got.startswith(b"HTTP/1.1 407 "), got
        good = b"Proxy-Authorization: Basic YWxpY2U6czNjcmV0\r\n"  # alice:s3cret
        denied = b"CONNECT db.egress.test:443 HTTP/1.1\r\n" + good + b"\r\n"
        got, _ = await raw_session(port, [denied])
        assert got.startswith(b"HTTP/1.1 403 "), got
        got, _ = await raw_session(port, [b"GET http://app.egress.test/ HTTP/1.1\r\n\r\n"])
        assert got.startswith(b"HTTP/1.1 405 ") and b"Allow: CONNECT" in got, got
        recs = await enforcer.wait_flows(5)
        assert recs[0]["egress"]["user"] == "alice" and recs[0]["action"] == "allow"
        assert [r["close"] for r in recs[1:]] == ["egress_auth_required",
                                                  "egress_bad_credentials", "denied",
                                                  "egress_bad_method"]
        assert recs[3]["egress"]["user"] == "alice" and recs[3]["action"] == "deny"
        assert resolver.asked == ["app.egress.test"]


async def test_http_connect_upstream_failures_and_malformed(resolver: FakeResolver) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        closed = s.getsockname()[1]
    cfg = egress_cfg("http_connect", [], default="allow",
                     egress={"request_timeout": "0.5s", "max_request_bytes": 1024})
    enforcer = await Enforcer(cfg).start()
    fds = len(os.listdir("/proc/self/fd"))
    async with running(enforcer):
        port = enforcer.port()
        cases = [
            ([f"CONNECT app.egress.test:{closed} HTTP/1.1\r\n\r\n".encode()], b"502"),
            ([b"CONNECT nowhere.invalid:443 HTTP/1.1\r\n\r\n"], b"502"),
            ([b"CONNECT app.egress.test HTTP/1.1\r\n\r\n"], b"400"),  # no port
            ([b"CONNECT [::1:443 HTTP/1.1\r\n\r\n"], b"400"),
            ([b"CONNECT a.egress.test:443 HTTP/1.1\r\nbad header\r\n\r\n"], b"400"),
            ([b"CONNECT a.egress.test:443 HTTP/1.1\r\n" + b"X-Flood: " + b"a" * 2000], b"431"),
            ([b"CONNECT a.egress.test:443 HTTP/1.1\r\n"], b"408"),  # slow header
        ]
        for chunks, status in cases:
            got, ended = await raw_session(port, chunks)
            assert ended != "timeout", chunks
            assert got.startswith(b"HTTP/1.1 " + status + b" ") or (
                status == b"431" and ended == "reset"), (chunks, got)
        recs = await enforcer.wait_flows(len(cases))
        assert [r["close"] for r in recs] == [
            "upstream_connect_failed", "upstream_resolve_failed", "egress_bad_request",
            "egress_bad_request", "egress_bad_request", "egress_too_long", "egress_timeout"]
        assert resolver.asked == ["app.egress.test", "nowhere.invalid"]
    await wait_until(lambda: len(os.listdir("/proc/self/fd")) <= fds + 2)


# ------------------------------------------------------------------------------ TLS-wrapped
@pytest.mark.parametrize("protocol", ["socks5", "http_connect"])
async def test_tls_wrapped_with_client_identity(pki: Any, tmp_path: Path, protocol: str,
                                                resolver: FakeResolver) -> None:
    backend = await HttpBackend(os.urandom(120_000)).start()
    rules = [{"name": "outbound-only", "action": "allow",
              "from": {"identities": ["spiffe://enforcer.demo/ns/demo/sa/outbound"]},
              "to": {"hosts": ["app.egress.test"], "ports": [backend.port]}}]
    materials = {"edge": {"cert": str(pki.server.cert), "key": str(pki.server.key),
                          "ca": str(pki.ca)}}
    cfg = egress_cfg(protocol, rules, materials=materials,
                     tls={"mode": "terminate", "material": "edge", "client_auth": "required"})
    enforcer = await Enforcer(cfg).start()
    async with running(enforcer, backend):
        url = f"http://app.egress.test:{backend.port}/"
        proxy = ["--proxy", f"https://localhost:{enforcer.port()}", "--proxy-cacert",
                 str(pki.ca), "--proxy-cert", str(pki.client.cert), "--proxy-key",
                 str(pki.client.key)]
        if protocol == "socks5":  # curl 7.88 has no SOCKS over TLS: a raw TLS client then
            await _socks_over_tls(pki, enforcer.port(), backend)
        else:
            await _upload(tmp_path, backend, url, *proxy, "--proxytunnel")
        rec = (await enforcer.wait_flows(1))[0]
        assert rec["action"] == "allow" and rec["rule"] == "outbound-only"
        assert rec["tls"]["peer"]["spiffe_id"] == "spiffe://enforcer.demo/ns/demo/sa/outbound"
        assert rec["egress"]["host"] == "app.egress.test"


async def _socks_over_tls(pki: Any, port: int, backend: HttpBackend) -> None:
    ctx = ssl.create_default_context(cafile=str(pki.ca))
    ctx.load_cert_chain(str(pki.client.cert), str(pki.client.key))
    reader, writer = await asyncio.open_connection("127.0.0.1", port, ssl=ctx,
                                                   server_hostname="localhost")
    try:
        host = b"app.egress.test"
        writer.write(b"\x05\x01\x00")
        assert await reader.readexactly(2) == b"\x05\x00"
        writer.write(b"\x05\x01\x00\x03" + bytes([len(host)]) + host
                     + struct.pack(">H", backend.port))
        reply = await reader.readexactly(10)
        assert reply[:4] == b"\x05\x00\x00\x01", reply
        body = os.urandom(100_000)
        writer.write(b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: %d\r\n\r\n" % len(body)
                     + body)
        got = await asyncio.wait_for(reader.read(-1), 20)
        payload = got.split(b"\r\n\r\n", 1)[1]
        assert _sha(payload) == _sha(body + backend.tail)
    finally:
        writer.close()

