"""Real TLS clients (openssl s_client, curl) against a server-mode listener."""

from __future__ import annotations

import asyncio
import hashlib
import os
from pathlib import Path
from typing import Any

from tests.conftest import require_tool
from tests.e2e.harness import Enforcer, LocalServer, inbound_cfg, running
from tests.e2e.tls_util import run_tool

MiB = 1024 * 1024


class FixedBackend(LocalServer):
    """Reads exactly ``expect`` bytes, answers with sha256(received) + ``extra``, closes."""

    def __init__(self, expect: int, extra: bytes = b"") -> None:
        self.expect = expect
        self.extra = extra
        self.server: asyncio.Server | None = None
        self.received = b""

    async def _handle(self, r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        self.received = await r.readexactly(self.expect)
        w.write(hashlib.sha256(self.received).hexdigest().encode() + b"\n" + self.extra)
        await w.drain()
        w.close()


class HttpBackend(LocalServer):
    """A tiny HTTP/1.1 server: echoes the request body, then a fixed random tail."""

    def __init__(self, tail: bytes) -> None:
        self.tail = tail
        self.server: asyncio.Server | None = None
        self.bodies: list[bytes] = []

    async def _handle(self, r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        head = await r.readuntil(b"\r\n\r\n")
        length = 0
        for line in head.split(b"\r\n"):
            if line.lower().startswith(b"content-length:"):
                length = int(line.split(b":", 1)[1])
        body = await r.readexactly(length) if length else b""
        self.bodies.append(body)
        out = body + self.tail
        w.write(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\nConnection: close\r\n\r\n" % len(out))
        w.write(out)
        await w.drain()
        w.close()


async def test_openssl_s_client_with_client_cert(pki: Any) -> None:
    openssl = require_tool("openssl")
    payload = os.urandom(256 * 1024)
    tail = os.urandom(100_000)
    backend = await FixedBackend(len(payload), tail).start()
    enforcer = await Enforcer(inbound_cfg(pki, backend.port)).start()
    async with running(enforcer, backend):
        code, out, err = await run_tool(
            openssl, "s_client", "-connect", f"127.0.0.1:{enforcer.port()}", "-quiet",
            "-ign_eof", "-verify_return_error", "-CAfile", str(pki.ca),
            "-cert", str(pki.client.cert), "-key", str(pki.client.key),
            "-servername", "localhost", stdin=payload)
        assert code == 0, err.decode()
        digest, _, rest = out.partition(b"\n")
        assert digest.decode() == hashlib.sha256(payload).hexdigest()
        assert hashlib.sha256(rest).digest() == hashlib.sha256(tail).digest()
        rec = (await enforcer.wait_flows(1))[0]
        assert rec["action"] == "allow"
        assert rec["tls"]["sni"] == "localhost"
        assert rec["close"] == "upstream_fin"
        assert rec["bytes"] == {"from_client": len(payload), "to_client": 65 + len(tail)}


async def test_openssl_s_client_without_cert_is_refused(pki: Any) -> None:
    openssl = require_tool("openssl")
    backend = await FixedBackend(4).start()
    enforcer = await Enforcer(inbound_cfg(pki, backend.port)).start()
    async with running(enforcer, backend):
        _code, out, _err = await run_tool(
            openssl, "s_client", "-connect", f"127.0.0.1:{enforcer.port()}", "-quiet",
            "-CAfile", str(pki.ca), stdin=b"ping")
        assert out == b""
        rec = (await enforcer.wait_flows(1))[0]
        assert rec["action"] == "error" and rec["close"] == "handshake_failed"
        assert "certificate" in rec["detail"].lower()


async def test_openssl_s_client_tls11_is_refused(pki: Any) -> None:
    openssl = require_tool("openssl")
    backend = await FixedBackend(4).start()
    enforcer = await Enforcer(inbound_cfg(pki, backend.port)).start()
    async with running(enforcer, backend):
        code, _out, _ = await run_tool(
            openssl, "s_client", "-connect", f"127.0.0.1:{enforcer.port()}", "-tls1_1",
            "-CAfile", str(pki.ca), "-cert", str(pki.client.cert), "-key", str(pki.client.key),
            stdin=b"")
        assert code != 0
        rec = (await enforcer.wait_flows(1))[0]
        assert rec["close"] == "handshake_failed"


async def test_curl_through_server_mode(pki: Any, tmp_path: Path) -> None:
    curl = require_tool("curl")
    tail = os.urandom(2 * MiB)
    body = os.urandom(300_000)
    (tmp_path / "body").write_bytes(body)
    backend = await HttpBackend(tail).start()
    enforcer = await Enforcer(inbound_cfg(pki, backend.port)).start()
    async with running(enforcer, backend):
        code, _, err = await run_tool(
            curl, "-sS", "--fail", "--cacert", str(pki.ca), "--cert", str(pki.client.cert),
            "--key", str(pki.client.key), "--data-binary", f"@{tmp_path / 'body'}",
            "-H", "Content-Type: application/octet-stream",
            "-o", str(tmp_path / "out"), f"https://localhost:{enforcer.port()}/upload")
        assert code == 0, err.decode()
        got = (tmp_path / "out").read_bytes()
        assert hashlib.sha256(got).digest() == hashlib.sha256(body + tail).digest()
        assert hashlib.sha256(backend.bodies[0]).digest() == hashlib.sha256(body).digest()
        rec = (await enforcer.wait_flows(1))[0]
        assert rec["action"] == "allow"
        assert rec["tls"]["peer"]["spiffe_id"] == "spiffe://enforcer.demo/ns/demo/sa/outbound"
