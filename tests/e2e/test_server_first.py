"""Upstreams that speak first (SMTP, MySQL, SSH banners) and clients with nothing to say.

A plaintext upstream may send its banner before enforcer has finished connecting to it
(the connect's completion and the banner can come in one loop turn): those bytes wait and
reach the client once the relay starts, never dropped. A client that half-closes at once
(`nc -N host port </dev/null`) still gets the answer. Real processes and a threaded
backend: within one event loop the ordering that lost the bytes does not happen.
"""

from __future__ import annotations

import asyncio
import socket
import ssl
from pathlib import Path
from typing import Any

import pytest

from tests.e2e.harness import (
    Backend,
    Enforcer,
    inbound_cfg,
    outbound_cfg,
    random_bytes,
    running,
    sha,
)
from tests.e2e.proc import EchoServer, EnforcerProcess, write_config

BANNER = b"220 mail.example ESMTP ready\r\n"




def _read_exactly(sock: socket.socket, n: int) -> bytes:
    got = b""
    while len(got) < n and (data := sock.recv(n - len(got))):
        got += data
    return got


@pytest.mark.parametrize("relay", ["python", "native"])
@pytest.mark.parametrize("mode", ["off", "terminate"])
def test_a_banner_sent_at_accept_reaches_every_client(tmp_path: Path, pki: Any,
                                                      relay: str, mode: str) -> None:
    backend = EchoServer(banner=BANNER)
    cfg = inbound_cfg(pki, backend.port, default="allow", rules=[], mode=mode)
    proc = EnforcerProcess(write_config(tmp_path / "e.yaml", {"relay": relay, **cfg}))
    ctx = None
    if mode == "terminate":
        ctx = ssl.create_default_context(cafile=str(pki.ca))
        ctx.load_cert_chain(str(pki.client.cert), str(pki.client.key))
    rounds, sent_total = 40, 0
    try:
        port = proc.wait_bound()["inbound"]
        for _ in range(rounds):
            sock = socket.create_connection(("127.0.0.1", port))
            if ctx is not None:
                sock = ctx.wrap_socket(sock, server_hostname="localhost")
            sock.settimeout(5)
            with sock:
                assert _read_exactly(sock, len(BANNER)) == BANNER
                payload = random_bytes(2000)
                sock.sendall(payload)
                assert sha(_read_exactly(sock, len(payload))) == sha(payload)
                sent_total += len(payload)
        records = proc.flow_records(rounds)
    finally:
        proc.stop()
        backend.close()
    assert {r["action"] for r in records} == {"allow"}
    assert sum(r["bytes"]["to_client"] for r in records) == sent_total + rounds * len(BANNER)
    assert sum(r["bytes"]["from_client"] for r in records) == sent_total


@pytest.mark.parametrize("relay", ["python", "native"])
def test_a_client_that_half_closes_at_once_gets_the_answer(tmp_path: Path, pki: Any,
                                                           relay: str) -> None:
    backend = EchoServer(banner=BANNER)
    cfg = inbound_cfg(pki, backend.port, default="allow", rules=[], mode="off")
    proc = EnforcerProcess(write_config(tmp_path / "e.yaml", {"relay": relay, **cfg}))
    try:
        port = proc.wait_bound()["inbound"]
        sock = socket.create_connection(("127.0.0.1", port))
        sock.shutdown(socket.SHUT_WR)  # nothing to say: only read what the server has
        sock.settimeout(5)
        got = b""
        while data := sock.recv(100):
            got += data
        sock.close()
        record = proc.flow_records(1)[0]
    finally:
        proc.stop()
        backend.close()
    assert got == BANNER
    assert (record["action"], record["bytes"]) == (
        "allow", {"from_client": 0, "to_client": len(BANNER)})


@pytest.mark.parametrize("relay", ["python", "native"])
async def test_a_tls_upstream_that_speaks_before_the_handshake_fails_closed(
        pki: Any, relay: str) -> None:
    """Plaintext from an upstream that should speak TLS never reaches the client."""
    garbage = b"220 not TLS at all\r\n" * 10

    async def plaintext(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(garbage)
        await writer.drain()
        await reader.read()
        writer.close()

    backend = await Backend.serving(plaintext)
    outbound = await Enforcer({**outbound_cfg(pki, backend.port), "relay": relay}).start()
    async with running(outbound, backend):
        reader, writer = await asyncio.open_connection("127.0.0.1", outbound.port())
        writer.write(b"hello")
        got = await asyncio.wait_for(reader.read(), 10)
        writer.close()
        record = (await outbound.wait_flows(1))[0]
    assert got == b""
    assert (record["action"], record["close"]) == ("error", "upstream_tls_failed")
    assert record["bytes"] == {"from_client": 5, "to_client": 0}
