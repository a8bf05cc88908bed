"""Draining (a stop signal, a reload's old worker): open connections move to DRAINING and
relay on to their own end; a connection still reading its PROXY header when the drain
begins finishes it and relays as DRAINING; the deadline closes what is left (``drain``)."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from enforcer.dataplane.lifecycle_types import Stage
from tests.e2e.harness import Backend, Enforcer, inbound_cfg, random_bytes, sha, wait_until

RELAYS = ["python", "native"]


def _cfg(pki: Any, port: int, relay: str, **listener: Any) -> dict[str, Any]:
    cfg = inbound_cfg(pki, port, default="allow", rules=[], mode="off",
                      listener_extra=listener)
    return {**cfg, "relay": relay}


async def _stage(enforcer: Enforcer, stage: Stage) -> None:
    await wait_until(lambda: [c.stage for c in enforcer.plane.active] == [stage])


@pytest.mark.parametrize("relay", RELAYS)
async def test_a_relaying_connection_drains_to_its_own_end(pki: Any, relay: str) -> None:
    backend = await Backend(mode="echo").start()
    enforcer = await Enforcer(_cfg(pki, backend.port, relay)).start()
    try:
        reader, writer = await asyncio.open_connection("127.0.0.1", enforcer.port())
        writer.write(b"ping")
        assert await asyncio.wait_for(reader.readexactly(4), 5) == b"ping"
        await _stage(enforcer, Stage.RELAY)
        drain = asyncio.ensure_future(enforcer.plane.drain(30.0))
        await _stage(enforcer, Stage.DRAINING)
        payload = random_bytes(300_000)
        writer.write(payload)
        writer.write_eof()
        got = await asyncio.wait_for(reader.read(), 10)
        writer.close()
        assert sha(got) == sha(payload)
        assert await asyncio.wait_for(drain, 10) == 0  # none left for the deadline
        rec = (await enforcer.wait_flows(1))[0]
        assert (rec["action"], rec["close"], rec["relay"]) == ("allow", "client_fin", relay)
        assert rec["bytes"] == {"from_client": 4 + len(payload), "to_client": 4 + len(payload)}
        await backend.done.wait()
        assert sha(backend.received[0]) == sha(b"ping" + payload)
    finally:
        await enforcer.stop()
        await backend.close()


@pytest.mark.parametrize("relay", RELAYS)
async def test_drain_during_the_proxy_header_then_relay_then_the_deadline(pki: Any,
                                                                          relay: str) -> None:
    backend = await Backend(mode="echo").start()
    enforcer = await Enforcer(_cfg(pki, backend.port, relay, proxy_protocol={
        "accept": "required", "trusted_sources": ["127.0.0.1/32"]})).start()
    try:
        reader, writer = await asyncio.open_connection("127.0.0.1", enforcer.port())
        writer.write(b"PROXY TCP4 192.0.2.7 ")  # half a header
        await _stage(enforcer, Stage.PROXY)
        drain = asyncio.ensure_future(enforcer.plane.drain(1.0))
        await wait_until(lambda: enforcer.plane.draining)
        await asyncio.sleep(0.05)
        assert [c.stage for c in enforcer.plane.active] == [Stage.PROXY]  # not cut short
        writer.write(b"127.0.0.1 40000 80\r\nping")
        assert await asyncio.wait_for(reader.readexactly(4), 5) == b"ping"
        await _stage(enforcer, Stage.DRAINING)
        assert await asyncio.wait_for(drain, 10) == 1  # still open at the deadline
        assert await asyncio.wait_for(reader.read(), 5) == b""
        writer.close()
        rec = (await enforcer.wait_flows(1))[0]
        assert (rec["action"], rec["close"], rec["relay"]) == ("allow", "drain", relay)
        assert rec["client"] == {"ip": "192.0.2.7", "port": 40000}
    finally:
        await enforcer.stop()
        await backend.close()
