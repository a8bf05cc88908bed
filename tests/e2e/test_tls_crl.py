"""CRL end to end on a real in-process ``Server`` with the real file watcher: a revoked
client is refused; a new CRL without it lets it in without a restart; revoking it again
also ends TLS session resumption (the new context has new ticket keys)."""

from __future__ import annotations

import asyncio
import os
import ssl
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from enforcer.config.loader import load_config
from enforcer.observe.flowlog import MemoryFlowLog
from enforcer.observe.metrics import Metrics
from enforcer.runtime.server import Server
from enforcer.tlsconf.certs import write_crl
from tests.e2e.harness import Backend, inbound_cfg, wait_until
from tests.e2e.proc import write_config
from tests.e2e.tls_util import (
    blocking_echo,
    echo_once,
    mtls_client,
    serial_of_file,
    sha,
    tls_reloads,
)


@pytest.fixture
async def crl_server(pki: Any, tmp_path: Path) -> AsyncIterator[tuple[Server, Path]]:
    crl = write_crl(pki.base, tmp_path / "crl.pem", [serial_of_file(pki.client.cert)])
    backend = await Backend(mode="echo").start()
    cfg = inbound_cfg(pki, backend.port, default="allow", limits={"drain_timeout": "1s"})
    cfg["tls"]["mesh"]["crl"] = str(crl)
    server = Server(load_config(str(write_config(tmp_path / "enforcer.yaml", cfg))),
                    metrics=Metrics(), flowlog=MemoryFlowLog())
    await server.start()  # the real watcher, polling every second
    try:
        yield server, crl
    finally:
        await server.shutdown()
        await backend.close()


async def test_revoked_client_refused_then_unrevoked_without_restart(
        crl_server: tuple[Server, Path], pki: Any) -> None:
    server, crl = crl_server
    port = server.plane.listeners[0].local_port
    client = mtls_client(pki.ca, pki.client.cert, pki.client.key)
    other = mtls_client(pki.ca, pki.other.cert, pki.other.key)
    payload = os.urandom(30_000)

    # revoked: refused during the handshake (TLS 1.3 reports it at the first read)
    with pytest.raises(ssl.SSLError, match="CERTIFICATE_REVOKED"):
        await echo_once(port, client, payload)
    got, _ = await echo_once(port, other, payload)  # same CA, not revoked
    assert sha(got) == sha(payload)
    refused = server.flowlog.records[0]
    assert refused["close"] == "handshake_failed"
    assert "CERTIFICATE_VERIFY_FAILED" in refused["detail"]
    assert server.metrics.registry.get_sample_value(
        "enforcer_tls_handshake_errors_total",
        {"listener": "inbound", "reason": "bad_certificate"}) == 1

    # a new CRL without the serial: picked up by the watcher, no restart
    write_crl(pki.base, crl, [])
    await wait_until(lambda: tls_reloads(server, "ok") >= 1)
    got, _ = await echo_once(port, client, payload)
    assert sha(got) == sha(payload)
    assert server.flowlog.records[-1]["action"] == "allow"
    assert tls_reloads(server, "error") == 0


async def test_revocation_also_ends_resumption(crl_server: tuple[Server, Path], pki: Any) -> None:
    server, crl = crl_server
    port = server.plane.listeners[0].local_port
    write_crl(pki.base, crl, [])  # start with the client in good standing
    await wait_until(lambda: tls_reloads(server, "ok") >= 1)
    ctx = mtls_client(pki.ca, pki.client.cert, pki.client.key)
    payload = os.urandom(10_000)
    got, session, _ = await asyncio.to_thread(blocking_echo, port, ctx, payload, None)
    assert sha(got) == sha(payload) and session is not None and session.has_ticket
    got, _, reused = await asyncio.to_thread(blocking_echo, port, ctx, payload, session)
    assert sha(got) == sha(payload) and reused, "resumption should work on this listener"

    write_crl(pki.base, crl, [serial_of_file(pki.client.cert)])
    await wait_until(lambda: tls_reloads(server, "ok") >= 2)
    with pytest.raises(ssl.SSLError, match="CERTIFICATE_REVOKED"):
        await asyncio.to_thread(blocking_echo, port, ctx, payload, session)
    assert server.flowlog.records[-1]["close"] == "handshake_failed"
