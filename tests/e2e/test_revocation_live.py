"""Revocation and expiry that act on open connections (``tls.close_on_revocation``,
``tls.close_on_expiry``), on a real in-process ``Server`` with the real file watcher and
real mTLS clients, with the native pump and the Python relay.

A CRL rewritten to revoke one client's certificate closes that client's open connection
(``close: revoked``) while a connection with another certificate keeps moving bytes; a
certificate valid for a few seconds has its connection closed when it expires
(``close: peer_certificate_expired``). Without the keys, open connections are left alone."""

from __future__ import annotations

import asyncio
import datetime as dt
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest

from enforcer.config.loader import load_config
from enforcer.observe.flowlog import MemoryFlowLog
from enforcer.observe.metrics import Metrics
from enforcer.runtime.server import Server
from enforcer.tlsconf.certs import issue, write_crl
from tests.e2e.harness import Backend, inbound_cfg, wait_until
from tests.e2e.live_util import LiveStream, closes
from tests.e2e.proc import write_config
from tests.e2e.tls_util import mtls_client, serial_of_file, tls_reloads

CLIENT_ID = "spiffe://enforcer.demo/ns/demo/sa/outbound"


@asynccontextmanager
async def serving(pki: Any, tmp_path: Path, relay: str, **tls: bool
                  ) -> AsyncIterator[tuple[Server, Path]]:
    crl = write_crl(pki.base, tmp_path / "crl.pem", [])
    backend = await Backend(mode="echo").start()
    cfg = inbound_cfg(pki, backend.port, default="allow", limits={"drain_timeout": "1s"})
    cfg["tls"]["mesh"]["crl"] = str(crl)
    cfg["listeners"][0]["tls"].update(tls)
    cfg["relay"] = relay
    server = Server(load_config(str(write_config(tmp_path / "enforcer.yaml", cfg))),
                    metrics=Metrics(), flowlog=MemoryFlowLog())
    await server.start()  # the real watcher, polling every second
    try:
        yield server, crl
    finally:
        await server.shutdown()
        await backend.close()


def record_where(server: Server, pred: Callable[[dict[str, Any]], bool]) -> dict[str, Any] | None:
    return next((r for r in server.flowlog.records if pred(r)), None)


@pytest.fixture(params=["native", "python"])
def relay(request: pytest.FixtureRequest) -> str:
    return str(request.param)


async def test_crl_reload_closes_the_revoked_connection_only(
        pki: Any, tmp_path: Path, relay: str) -> None:
    async with serving(pki, tmp_path, relay, close_on_revocation=True) as (server, crl):
        port = server.plane.listeners[0].local_port
        revoked = await LiveStream.open(port, mtls_client(pki.ca, pki.client.cert,
                                                          pki.client.key))
        kept = await LiveStream.open(port, mtls_client(pki.ca, pki.other.cert, pki.other.key))
        for s in (revoked, kept):
            await s.roundtrip()

        write_crl(pki.base, crl, [serial_of_file(pki.client.cert)])
        await wait_until(lambda: tls_reloads(server, "ok") >= 1)
        assert await revoked.ended()
        rec = record_where(server, lambda r: r["close"] == "revoked")
        assert rec is not None, server.flowlog.records
        assert rec["action"] == "deny"
        assert rec["tls"]["peer"]["spiffe_id"] == CLIENT_ID
        assert rec["tls"]["peer"]["serial"] == format(serial_of_file(pki.client.cert), "x")
        assert rec["relay"] == relay
        assert rec["bytes"]["to_client"] == revoked.moved
        assert closes(server, "revoked") == 1

        for _ in range(3):  # the other certificate's connection is untouched
            await kept.roundtrip()
        assert kept.moved == 4 * 64 * 1024
        await kept.close()
        await revoked.close()
        await wait_until(lambda: len(server.flowlog.records) == 2)
        other = next(r for r in server.flowlog.records if r is not rec)
        assert other["action"] == "allow" and other["close"] != "revoked"
        assert other["bytes"]["from_client"] == other["bytes"]["to_client"] == kept.moved


async def test_without_the_key_open_connections_survive_a_revocation(
        pki: Any, tmp_path: Path) -> None:
    async with serving(pki, tmp_path, "auto") as (server, crl):
        port = server.plane.listeners[0].local_port
        s = await LiveStream.open(port, mtls_client(pki.ca, pki.client.cert, pki.client.key))
        await s.roundtrip()
        write_crl(pki.base, crl, [serial_of_file(pki.client.cert)])
        await wait_until(lambda: tls_reloads(server, "ok") >= 1)
        await s.roundtrip()  # still relaying (the documented default)
        assert closes(server, "revoked") == 0
        await s.close()


async def test_expired_certificate_closes_its_connection(
        pki: Any, tmp_path: Path, relay: str) -> None:
    now = dt.datetime.now(dt.UTC)
    short = issue(pki.base, tmp_path, name="short-lived", spiffe_id=CLIENT_ID,
                  not_before=now - dt.timedelta(minutes=1),
                  not_after=now + dt.timedelta(seconds=4))
    async with serving(pki, tmp_path, relay, close_on_expiry=True) as (server, _crl):
        port = server.plane.listeners[0].local_port
        expiring = await LiveStream.open(port, mtls_client(pki.ca, short.cert, short.key))
        kept = await LiveStream.open(port, mtls_client(pki.ca, pki.other.cert, pki.other.key))
        await expiring.roundtrip()
        await kept.roundtrip()
        assert server.plane.cert_watch.timer is not None, "one timer, set for the expiry"
        assert await expiring.ended(timeout=30)
        rec = record_where(server, lambda r: r["close"] == "peer_certificate_expired")
        assert rec is not None, server.flowlog.records
        assert rec["action"] == "deny" and rec["relay"] == relay
        not_after = dt.datetime.fromisoformat(rec["tls"]["peer"]["not_after"])
        assert dt.datetime.now(dt.UTC) >= not_after, "closed when it expired, not before"
        assert closes(server, "peer_certificate_expired") == 1
        await kept.roundtrip()
        await kept.close()
        await expiring.close()
        await wait_until(lambda: len(server.flowlog.records) == 2)
        await asyncio.sleep(0)
        assert server.plane.cert_watch.by_chain == {} and not server.plane.cert_watch.chain_of
        assert server.plane.cert_watch.timer is None
