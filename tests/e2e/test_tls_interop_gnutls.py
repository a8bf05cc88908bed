"""Interop with a second TLS implementation, GnuTLS (Debian's gnutls-bin), on all three
TLS 1.3 suites, in both record modes (``tls_records``: the pump's own records, and
OpenSSL keeping them):

- gnutls-cli as the client of an inbound (mutual TLS), changing keys mid-stream with its
  inline commands: ``^rekey1^`` (a KeyUpdate of its own) and ``^rekey^`` (one asking for
  ours: enforcer's KeyUpdate goes back), four times in all (gnutls-cli reports each), data
  echoed after each and sha256-checked;
- gnutls-serv (``--echo``) as the upstream of an outbound.

OpenSSL's s_client/s_server and Python's ``ssl`` are the other peers of the same paths
(test_tls_records*.py, test_tls_close_semantics.py, test_native_relay.py).
"""

from __future__ import annotations

import asyncio
import socket
from typing import Any

import pytest

from enforcer.dataplane import native
from tests.conftest import require_tool
from tests.e2e.harness import (
    Backend,
    Enforcer,
    inbound_cfg,
    outbound_cfg,
    random_bytes,
    running,
    sha,
    wait_until,
)

pytestmark = [
    pytest.mark.skipif(not native.available(), reason=native.unavailable_reason()),
    pytest.mark.usefixtures("tls_records"),
]

SUITES = {"TLS_AES_128_GCM_SHA256": "AES-128-GCM",
          "TLS_AES_256_GCM_SHA384": "AES-256-GCM",
          "TLS_CHACHA20_POLY1305_SHA256": "CHACHA20-POLY1305"}


def _priority(suite: str) -> str:
    return f"NORMAL:-VERS-ALL:+VERS-TLS1.3:-CIPHER-ALL:+{SUITES[suite]}"


def _lines(n: int) -> list[bytes]:
    """Lines of digits (no inline command can start one)."""
    return ["".join(str(b % 10) for b in random_bytes(60)).encode() + b"\n" for _ in range(n)]


async def _read_lines(stream: asyncio.StreamReader, want: int, said: list[bytes]) -> bytes:
    """``want`` bytes of our lines from gnutls-cli's output; its own lines go to ``said``."""
    got = bytearray()
    while len(got) < want:
        line = await asyncio.wait_for(stream.readline(), 10)
        assert line, "gnutls-cli ended"
        if len(line) == 61 and line[:-1].isdigit():
            got += line
        else:
            said.append(line)
    return bytes(got)


@pytest.mark.parametrize("suite", list(SUITES))
async def test_gnutls_cli_key_updates_both_ways_through_an_inbound(pki: Any, suite: str) -> None:
    gnutls_cli = require_tool("gnutls-cli")
    backend = await Backend(mode="echo").start()
    inbound = await Enforcer({**inbound_cfg(pki, backend.port), "relay": "native"}).start()
    async with running(inbound, backend):
        proc = await asyncio.create_subprocess_exec(
            gnutls_cli, "--inline-commands", "--priority", _priority(suite),
            "--x509cafile", str(pki.ca), "--x509certfile", str(pki.client.cert),
            "--x509keyfile", str(pki.client.key), "-p", str(inbound.port()), "localhost",
            stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE)
        assert proc.stdin is not None and proc.stdout is not None
        try:
            sent, said = bytearray(), []
            for command in (b"", b"^rekey1^\n", b"^rekey^\n", b"^rekey^\n", b"^rekey1^\n"):
                if command:
                    proc.stdin.write(command)
                    await asyncio.sleep(0.2)  # gnutls-cli reads a command line on its own
                batch = b"".join(_lines(50))
                proc.stdin.write(batch)
                sent += batch
                assert sha(await _read_lines(proc.stdout, len(batch), said)) == sha(batch)
                if not command:
                    await wait_until(lambda: bool(inbound.plane.pumped))
            pumps = [c.pump for c in inbound.plane.pumped if c.pump is not None]
            expected = 1 if native.own_records() else 0
            assert [p.own_records for p in pumps] == [expected]
            proc.stdin.close()
            await asyncio.wait_for(proc.wait(), 10)
        finally:
            if proc.returncode is None:
                proc.kill()
                await proc.wait()
        rec = (await inbound.wait_flows(1))[0]
    assert said.count(b"- Rekey was completed\n") == 4, said
    assert rec["tls"]["cipher"] == suite
    assert rec["bytes"] == {"from_client": len(sent), "to_client": len(sent)}
    assert sha(b"".join(backend.received)) == sha(bytes(sent))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.mark.parametrize("suite", list(SUITES))
async def test_gnutls_serv_as_the_upstream_of_an_outbound(pki: Any, suite: str) -> None:
    gnutls_serv = require_tool("gnutls-serv")
    port = _free_port()
    proc = await asyncio.create_subprocess_exec(
        gnutls_serv, "--echo", "--priority", _priority(suite), "-p", str(port),
        "--x509cafile", str(pki.ca), "--x509certfile", str(pki.server.cert),
        "--x509keyfile", str(pki.server.key), "--require-client-cert",
        stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.DEVNULL)
    outbound = await Enforcer({**outbound_cfg(pki, port), "relay": "native"}).start()
    try:
        async with running(outbound):
            for _ in range(50):  # gnutls-serv binds
                try:
                    socket.create_connection(("127.0.0.1", port), 0.1).close()
                    break
                except OSError:
                    await asyncio.sleep(0.1)
            reader, writer = await asyncio.open_connection("127.0.0.1", outbound.port())
            data = b"".join(_lines(4000))  # ~240 KB, echoed line by line
            writer.write(data)
            got = await asyncio.wait_for(reader.readexactly(len(data)), 20)
            assert sha(got) == sha(data)
            writer.close()
            rec = (await outbound.wait_flows(1))[0]
    finally:
        proc.kill()
        await proc.wait()
    assert rec["relay"] == "native"
    assert rec["bytes"] == {"from_client": len(data), "to_client": len(data)}
