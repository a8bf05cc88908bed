"""Peers that misbehave: garbage, truncated handshakes, resets. Never a crash or a leak."""

from __future__ import annotations

import asyncio
import os
import random
import socket
import struct
from typing import Any

import pytest

from tests.e2e.harness import (
    Backend,
    Enforcer,
    client_ctx,
    exchange,
    inbound_cfg,
    random_bytes,
    running,
    sha,
)

pytestmark = pytest.mark.usefixtures("relay_mode")


def _open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


async def _send_and_close(port: int, data: bytes, *, reset: bool = False) -> bytes:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(data)
    got = b""
    try:
        if reset:
            sock = writer.get_extra_info("socket")
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        else:
            writer.write_eof()
            async with asyncio.timeout(5):
                got = await reader.read()
    except (ConnectionError, TimeoutError):
        pass
    finally:
        writer.close()
    return got


async def test_garbage_to_a_tls_listener_is_closed_and_recorded(pki: Any) -> None:
    backend = await Backend(mode="echo").start()
    enforcer = await Enforcer(inbound_cfg(pki, backend.port,
                                          limits={"handshake_timeout": "1s"})).start()
    rng = random.Random(7)
    inputs = [b"GET / HTTP/1.1\r\nHost: x\r\n\r\n", b"\x16\x03\x01\xff\xff" + b"A" * 300,
              b"\x16\x03\x03\x00\x05hello", b"\x15\x03\x03\x00\x02\x02\x28", b"\x00" * 64]
    inputs += [rng.randbytes(rng.randrange(1, 2000)) for _ in range(25)]
    async with running(enforcer, backend):
        await asyncio.sleep(0.05)
        fds_before = _open_fds()
        for i, data in enumerate(inputs):
            await _send_and_close(enforcer.port(), data, reset=i % 3 == 0)
        records = await enforcer.wait_flows(len(inputs), timeout=20)
        assert all(r["action"] == "error" for r in records)
        assert {r["close"] for r in records} <= {"handshake_failed", "client_closed",
                                                 "client_reset", "handshake_timeout"}
        assert backend.connections == 0
        await asyncio.sleep(0.2)
        assert not enforcer.plane.active
        assert _open_fds() <= fds_before + 2
        # and it still serves a good client afterwards
        good = random_bytes(100_000)
        ctx = client_ctx(pki.ca, pki.client.cert, pki.client.key)
        reader, writer = await asyncio.open_connection(
            "127.0.0.1", enforcer.port(), ssl=ctx, server_hostname="localhost")
        writer.write(good)
        assert sha(await asyncio.wait_for(reader.readexactly(len(good)), 10)) == sha(good)
        writer.close()


async def test_resets_mid_relay_release_both_sockets(pki: Any) -> None:
    backend = await Backend(mode="echo").start()
    enforcer = await Enforcer(inbound_cfg(pki, backend.port, default="allow", rules=[],
                                          mode="off")).start()
    async with running(enforcer, backend):
        await asyncio.sleep(0.05)
        fds_before = _open_fds()
        for _ in range(20):
            await _send_and_close(enforcer.port(), random_bytes(50_000), reset=True)
        records = await enforcer.wait_flows(20, timeout=20)
        assert all(r["close"] in ("client_reset", "client_closed", "client_fin", "upstream_fin")
                   for r in records)
        await asyncio.sleep(0.3)
        assert not enforcer.plane.active
        assert _open_fds() <= fds_before + 2
        payload = random_bytes(200_000)
        assert sha(await exchange(enforcer.port(), payload)) == sha(payload)
