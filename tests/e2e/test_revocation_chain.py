"""Revocation and expiry of an intermediate CA close the connections of the leaves under it
(``tls.close_on_revocation``, ``tls.close_on_expiry``, dataplane.certwatch), on a real
in-process ``Server`` with the real file watcher and real mTLS clients that send their
intermediate (root -> intermediate A/B -> client leaves; the trust bundle holds the root
only), with the native pump and the Python relay.

A CRL of the root revoking intermediate A closes the connection of A's client with
``close: revoked`` and a detail naming the intermediate, counted in
``enforcer_certificate_closes_total``; B's client keeps moving bytes (sha256 checked).
An intermediate that expires closes its leaves' connections although the leaves are valid
for days."""

from __future__ import annotations

import asyncio
import datetime as dt
import hashlib
import os
import socket
import ssl
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from enforcer.config.loader import load_config
from enforcer.observe.flowlog import MemoryFlowLog
from enforcer.observe.metrics import Metrics
from enforcer.runtime.server import Server
from tests.e2e.harness import Backend, wait_until
from tests.e2e.live_util import LiveStream, closes
from tests.e2e.proc import write_config
from tests.e2e.tls_util import Issued, make_cert, make_crl, mtls_client, tls_reloads, write

CLIENT_A = "spiffe://enforcer.demo/ns/demo/sa/through-a"
CLIENT_B = "spiffe://enforcer.demo/ns/demo/sa/through-b"


@dataclass
class TwoIntermediates:
    root: Issued
    inter_a: Issued
    inter_b: Issued
    server: Issued
    client_a: Issued
    client_b: Issued

    @classmethod
    def create(cls, *, a_not_before: dt.datetime | None = None,
               a_days: float = 30) -> TwoIntermediates:
        root = make_cert("chain root CA", ca=True, path_length=1)
        inter_a = make_cert("intermediate CA A", issuer=root, ca=True, path_length=0,
                            not_before=a_not_before, days=a_days)
        inter_b = make_cert("intermediate CA B", issuer=root, ca=True, path_length=0)
        server = make_cert("server", issuer=root, dns=("localhost",))
        client_a = make_cert("client a", issuer=inter_a, uri=(CLIENT_A,))
        client_b = make_cert("client b", issuer=inter_b, uri=(CLIENT_B,))
        return cls(root, inter_a, inter_b, server, client_a, client_b)

    def crl(self, *revoked_intermediates: int) -> bytes:
        """A CRL per CA (OpenSSL checks the whole chain): the root's lists the serials."""
        return (make_crl(self.root, revoked_intermediates) + make_crl(self.inter_a)
                + make_crl(self.inter_b))

    def client(self, tmp: Path, leaf: Issued, inter: Issued) -> Any:
        name = leaf.cert.subject.rfc4514_string().replace("CN=", "").replace(" ", "-")
        chain = write(tmp / f"{name}.crt", leaf.cert_pem + inter.cert_pem)
        key = write(tmp / f"{name}.key", leaf.key_pem)
        return mtls_client(tmp / "root.crt", chain, key)


@asynccontextmanager
async def serving(pki: TwoIntermediates, tmp: Path, relay: str, **tls: bool
                  ) -> AsyncIterator[tuple[Server, Path]]:
    write(tmp / "root.crt", pki.root.cert_pem)
    crl = tmp / "crl.pem"
    write(crl, pki.crl())
    backend = await Backend(mode="echo").start()
    cfg: dict[str, Any] = {
        "version": 1, "relay": relay, "limits": {"drain_timeout": "1s"},
        "tls": {"mesh": {"cert": write(tmp / "server.crt", pki.server.cert_pem),
                         "key": write(tmp / "server.key", pki.server.key_pem),
                         "ca": str(tmp / "root.crt"), "crl": str(crl)}},
        "listeners": [{"name": "inbound", "listen": "127.0.0.1:0",
                       "tls": {"mode": "terminate", "material": "mesh",
                               "client_auth": "required", **tls},
                       "ruleset": "inbound", "upstream": "app"}],
        "upstreams": {"app": {"address": f"127.0.0.1:{backend.port}"}},
        "rulesets": {"inbound": {"default": "allow"}},
    }
    server = Server(load_config(str(write_config(tmp / "enforcer.yaml", cfg))),
                    metrics=Metrics(), flowlog=MemoryFlowLog())
    await server.start()  # the real watcher, polling every second
    try:
        yield server, crl
    finally:
        await server.shutdown()
        await backend.close()


def record_of(server: Server, spiffe_id: str) -> dict[str, Any] | None:
    return next((r for r in server.flowlog.records
                 if (r.get("tls") or {}).get("peer", {}).get("spiffe_id") == spiffe_id), None)


@pytest.fixture(params=["native", "python"])
def relay(request: pytest.FixtureRequest) -> str:
    return str(request.param)


async def _other_keeps_flowing(server: Server, kept: LiveStream, closed: LiveStream) -> None:
    for _ in range(3):
        await kept.roundtrip()
    assert kept.moved == 4 * 64 * 1024
    await kept.close()
    await closed.close()
    await wait_until(lambda: record_of(server, CLIENT_B) is not None)
    other = record_of(server, CLIENT_B)
    assert other is not None
    assert other["action"] == "allow" and other["close"] not in ("revoked",
                                                                  "peer_certificate_expired")
    assert other["bytes"]["from_client"] == other["bytes"]["to_client"] == kept.moved


async def test_revoked_intermediate_closes_its_leaves_connections(
        tmp_path: Path, relay: str) -> None:
    pki = TwoIntermediates.create()
    async with serving(pki, tmp_path, relay, close_on_revocation=True) as (server, crl):
        port = server.plane.listeners[0].local_port
        through_a = await LiveStream.open(port, pki.client(tmp_path, pki.client_a, pki.inter_a))
        through_b = await LiveStream.open(port, pki.client(tmp_path, pki.client_b, pki.inter_b))
        for s in (through_a, through_b):
            await s.roundtrip()

        write(crl, pki.crl(pki.inter_a.cert.serial_number))  # the root revokes A
        await wait_until(lambda: tls_reloads(server, "ok") >= 1)
        assert await through_a.ended()
        await wait_until(lambda: record_of(server, CLIENT_A) is not None)
        rec = record_of(server, CLIENT_A)
        assert rec is not None
        assert rec["action"] == "deny" and rec["close"] == "revoked", rec
        assert "intermediate CA A" in rec["detail"], rec["detail"]
        assert format(pki.inter_a.cert.serial_number, "x") in rec["detail"]
        assert rec["tls"]["peer"]["serial"] == format(pki.client_a.cert.serial_number, "x")
        assert rec["relay"] == relay
        assert rec["bytes"]["to_client"] == through_a.moved
        assert closes(server, "revoked") == 1

        await _other_keeps_flowing(server, through_b, through_a)
        assert closes(server, "revoked") == 1
        assert server.plane.cert_watch.by_chain == {}

        # a new handshake through A is refused by OpenSSL itself (the CRL is in use)
        with pytest.raises((ssl.SSLError, OSError, asyncio.IncompleteReadError)):
            late = await LiveStream.open(port, pki.client(tmp_path, pki.client_a,
                                                          pki.inter_a))
            await late.roundtrip()


async def test_expiring_intermediate_closes_its_leaves_connections(
        tmp_path: Path, relay: str) -> None:
    now = dt.datetime.now(dt.UTC)
    pki = TwoIntermediates.create(a_not_before=now - dt.timedelta(minutes=1),
                                  a_days=(60 + 10) / 86400)  # A expires in about 10 s
    assert pki.client_a.cert.not_valid_after_utc > now + dt.timedelta(days=1)
    async with serving(pki, tmp_path, relay, close_on_expiry=True) as (server, _crl):
        port = server.plane.listeners[0].local_port
        through_a = await LiveStream.open(port, pki.client(tmp_path, pki.client_a, pki.inter_a))
        through_b = await LiveStream.open(port, pki.client(tmp_path, pki.client_b, pki.inter_b))
        for s in (through_a, through_b):
            await s.roundtrip()
        watch = server.plane.cert_watch
        assert watch.timer_at == pki.inter_a.cert.not_valid_after_utc.timestamp()
        assert await through_a.ended(timeout=30)
        await wait_until(lambda: record_of(server, CLIENT_A) is not None)
        rec = record_of(server, CLIENT_A)
        assert rec is not None
        assert rec["action"] == "deny" and rec["close"] == "peer_certificate_expired", rec
        assert "intermediate CA A" in rec["detail"], rec["detail"]
        assert dt.datetime.now(dt.UTC) >= pki.inter_a.cert.not_valid_after_utc
        assert closes(server, "peer_certificate_expired") == 1
        await _other_keeps_flowing(server, through_b, through_a)


class BlockingStream:
    """A TLS connection that can resume a session (asyncio's streams cannot), driven from
    a thread: round trips checked by sha256."""

    def __init__(self, port: int, ctx: ssl.SSLContext, session: ssl.SSLSession | None) -> None:
        raw = socket.create_connection(("127.0.0.1", port), timeout=20)
        self.tls = ctx.wrap_socket(raw, server_hostname="localhost", session=session)
        self.moved = 0

    def roundtrip(self, n: int = 32 * 1024) -> None:
        payload = os.urandom(n)
        self.tls.sendall(payload)
        got = bytearray()
        while len(got) < n:
            data = self.tls.recv(65536)
            assert data, "closed early"
            got += data
        assert hashlib.sha256(got).digest() == hashlib.sha256(payload).digest()
        self.moved += n

    def ended(self) -> bool:
        try:
            while self.tls.recv(65536):
                pass
        except (ssl.SSLError, OSError):
            pass
        return True

    def close(self) -> None:
        self.tls.close()


@pytest.mark.parametrize("forget", [False, True])
async def test_a_resumed_session_is_closed_by_its_revoked_intermediate(
        tmp_path: Path, relay: str, forget: bool) -> None:
    """A resumed TLS session verifies no chain: the chain remembered from the full
    handshake is used, or (``forget``, native relay: the server-side session cache kept
    the certificates the client sent) it is rebuilt from them and the trust bundle."""
    if forget and relay == "python":
        pytest.skip("stateless tickets keep no chain (docs/limits-and-revocation.md)")
    pki = TwoIntermediates.create()
    async with serving(pki, tmp_path, relay, close_on_revocation=True) as (server, crl):
        port = server.plane.listeners[0].local_port
        ctx = pki.client(tmp_path, pki.client_a, pki.inter_a)
        first = await asyncio.to_thread(BlockingStream, port, ctx, None)
        await asyncio.to_thread(first.roundtrip)
        session = first.tls.session
        await asyncio.to_thread(first.close)
        assert session is not None
        await wait_until(lambda: len(server.flowlog.records) == 1)
        watch = server.plane.cert_watch
        if forget:
            watch.recent.clear()
        resumed = await asyncio.to_thread(BlockingStream, port, ctx, session)
        await asyncio.to_thread(resumed.roundtrip)
        assert resumed.tls.session_reused
        (chain,) = watch.by_chain
        assert chain.complete and len(chain.certs) == 3

        write(crl, pki.crl(pki.inter_a.cert.serial_number))
        await wait_until(lambda: tls_reloads(server, "ok") >= 1)
        assert await asyncio.to_thread(resumed.ended)
        await wait_until(lambda: len(server.flowlog.records) == 2)
        rec = server.flowlog.records[1]
        assert rec["close"] == "revoked" and rec["tls"]["resumed"] is True, rec
        assert "intermediate CA A" in rec["detail"]
        assert rec["bytes"]["to_client"] == resumed.moved
        assert closes(server, "revoked") == 1
        await asyncio.to_thread(resumed.close)
