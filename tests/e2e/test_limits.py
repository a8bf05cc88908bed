"""Rule limits end to end (in-process enforcer, real TLS clients, both relays): over
``max_connections`` or ``rate`` a connection is refused before any upstream connect, with
``close``/``reason`` ``concurrency_limited``/``rate_limited`` and
``enforcer_limited_total``; keys per identity and per PROXY-preserved client network;
counters survive a ruleset swap; no lease leaks on any way a connection ends."""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import signal
import socket
from pathlib import Path
from typing import Any

import pytest

from enforcer.config.loader import parse_config
from enforcer.policy import compile_rulesets
from enforcer.proxyproto import build_v2
from tests.e2e.harness import Backend, Enforcer, inbound_cfg, running, wait_until
from tests.e2e.live_util import LiveStream
from tests.e2e.proc import EchoServer, EnforcerProcess, write_config
from tests.e2e.test_workers import _get, _wait
from tests.e2e.tls_util import mtls_client

CLIENT_ID = "spiffe://enforcer.demo/ns/demo/sa/outbound"  # pki.client; pki.other differs


def limited(limits: dict[str, Any], name: str = "mesh-peers") -> list[dict[str, Any]]:
    return [{"name": name, "action": "allow", "from": {"trust_domains": ["enforcer.demo"]},
             "limits": limits}]


def limited_total(enf: Enforcer, reason: str) -> float:
    value = enf.metrics.registry.get_sample_value(
        "enforcer_limited_total", {"listener": "inbound", "reason": reason})
    return float(value or 0.0)


def no_leases(enf: Enforcer) -> bool:
    return not enf.plane.limit_gate.leases and not enf.plane.active


async def test_max_connections_per_identity(pki: Any, relay_mode: str) -> None:
    backend = await Backend(mode="echo").start()
    enf = await Enforcer(inbound_cfg(pki, backend.port, rules=limited(
        {"per": "identity", "max_connections": 2}))).start()
    client = mtls_client(pki.ca, pki.client.cert, pki.client.key)
    other = mtls_client(pki.ca, pki.other.cert, pki.other.key)
    async with running(enf, backend):
        first = [await LiveStream.open(enf.port(), client) for _ in range(2)]
        for s in first:
            await s.roundtrip()
        third = await LiveStream.open(enf.port(), client)
        assert await third.ended()
        rec = (await enf.wait_flows(1))[0]
        assert rec["action"] == "deny"
        assert rec["close"] == rec["reason"] == "concurrency_limited"
        assert rec["rule"] == "mesh-peers"
        assert rec["upstream"] is None, "refused before any upstream connect"
        assert rec["tls"]["peer"]["spiffe_id"] == CLIENT_ID
        assert backend.connections == 2
        assert limited_total(enf, "concurrency_limited") == 1
        # another identity has its own counter
        stranger = await LiveStream.open(enf.port(), other)
        await stranger.roundtrip()
        # the open ones kept moving bytes; closing one frees a slot
        for s in first:
            await s.roundtrip()
        await first[0].close()
        await enf.wait_flows(2)
        again = await LiveStream.open(enf.port(), client)
        await again.roundtrip()
        assert enf.plane.limit_gate.limiter.open_count("inbound", "mesh-peers", CLIENT_ID) == 2
        for s in (first[1], again, stranger, third):
            await s.close()
        await wait_until(lambda: no_leases(enf))


async def test_rate_per_proxy_client_network(pki: Any, relay_mode: str) -> None:
    """Plaintext listener behind a PROXY v2 sender: the real clients 203.0.113.5 and .77
    share a /24 bucket of burst 2; 198.51.100.1 has its own."""
    backend = await Backend(mode="echo").start()
    cfg = inbound_cfg(pki, backend.port, rules=[
        {"name": "per-net", "action": "allow",
         "limits": {"per": "client", "rate": "1/h", "burst": 2, "ipv4_prefix": 24}}],
        listener_extra={"tls": {"mode": "off"},
                        "proxy_protocol": {"accept": "required",
                                           "trusted_sources": ["127.0.0.1/32"]}})
    enf = await Enforcer(cfg).start()

    def header(ip: str) -> bytes:
        return build_v2((ip, 40000), ("10.0.0.1", 443))

    async with running(enf, backend):
        streams = []
        for ip in ("203.0.113.5", "203.0.113.77"):
            s = await LiveStream.open(enf.port(), prefix=header(ip))
            await s.roundtrip()
            streams.append(s)
        refused = await LiveStream.open(enf.port(), prefix=header("203.0.113.200"))
        assert await refused.ended()
        rec = next(r for r in await enf.wait_flows(1) if r["close"] == "rate_limited")
        assert rec["reason"] == "rate_limited" and rec["action"] == "deny"
        assert rec["client"]["ip"] == "203.0.113.200" and rec["upstream"] is None
        elsewhere = await LiveStream.open(enf.port(), prefix=header("198.51.100.1"))
        await elsewhere.roundtrip()
        assert backend.connections == 3
        assert limited_total(enf, "rate_limited") == 1
        for s in (*streams, elsewhere, refused):
            await s.close()
        await wait_until(lambda: no_leases(enf))


async def test_ruleset_swap_keeps_counters_of_unchanged_rules(pki: Any) -> None:
    backend = await Backend(mode="echo").start()
    cfg = inbound_cfg(pki, backend.port, rules=limited({"per": "identity",
                                                         "max_connections": 1}))
    enf = await Enforcer(cfg).start()
    client = mtls_client(pki.ca, pki.client.cert, pki.client.key)

    def swap(rules: list[dict[str, Any]]) -> None:
        new = parse_config({**cfg, "rulesets": {"inbound": {"default": "deny",
                                                             "rules": rules}}})
        enf.plane.swap_rulesets(compile_rulesets(new.rulesets))

    async with running(enf, backend):
        held = await LiveStream.open(enf.port(), client)
        await held.roundtrip()
        swap(limited({"per": "identity", "max_connections": 1, "rate": "100/s"}))
        refused = await LiveStream.open(enf.port(), client)
        assert await refused.ended()
        assert (await enf.wait_flows(1))[0]["close"] == "concurrency_limited"
        swap(limited({"per": "identity", "max_connections": 1}, name="renamed"))
        fresh = await LiveStream.open(enf.port(), client)  # a new rule: its own counter
        await fresh.roundtrip()
        await held.roundtrip()
        for s in (held, refused, fresh):
            await s.close()
        await wait_until(lambda: no_leases(enf))
        assert enf.plane.limit_gate.limiter.open_count("inbound", "mesh-peers", CLIENT_ID) == 0


async def _close_at_once(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    await reader.read(1)
    writer.close()


@pytest.mark.parametrize("ending", ["client_reset", "upstream_closes", "upstream_refuses",
                                    "drain"])
async def test_no_lease_leaks_on_any_ending(pki: Any, relay_mode: str, ending: str) -> None:
    """An admitted connection gives its slot back however it ends: the client resets in
    the middle of the relay, the upstream closes, the upstream refuses the connect, or it
    is still open at the drain deadline."""
    if ending == "upstream_closes":
        backend = await Backend.serving(_close_at_once)
    else:
        backend = await Backend(mode="echo").start()
    port = backend.port
    if ending == "upstream_refuses":
        await backend.close()
        assert backend.server is not None
        await backend.server.wait_closed()
    cfg = inbound_cfg(pki, port, rules=limited({"per": "listener", "max_connections": 3}),
                      limits={"drain_timeout": "1s"})
    enf = await Enforcer(cfg).start()
    client = mtls_client(pki.ca, pki.client.cert, pki.client.key)
    limiter = enf.plane.limit_gate.limiter
    streams: list[LiveStream] = []
    try:
        for _ in range(3):
            s = await LiveStream.open(enf.port(), client)
            streams.append(s)
            if ending in ("client_reset", "drain"):
                await s.roundtrip()
            else:
                s.writer.write(b"x")
        if ending == "client_reset":
            assert limiter.open_count("inbound", "mesh-peers", "inbound") == 3
            for s in streams:
                s.writer.transport.abort()
        elif ending != "drain":
            for s in streams:
                assert await s.ended()
        if ending != "drain":
            await wait_until(lambda: no_leases(enf))
            assert len(enf.flows.records) == 3
    finally:
        await enf.stop()
        await backend.close()
        for s in streams:
            await s.close()
    assert no_leases(enf)
    assert limiter.open_count("inbound", "mesh-peers", "inbound") == 0
    closes = {r["close"] for r in enf.flows.records}
    expected = {"client_reset": {"client_reset", "client_eof_without_close_notify"}, "upstream_closes": {"upstream_fin"},
                "upstream_refuses": {"upstream_connect_failed"}, "drain": {"drain"}}[ending]
    assert closes <= expected | {"client_closed", "upstream_closed", "upstream_reset"}, closes
    assert closes & expected or ending == "upstream_closes", closes
    assert limited_total(enf, "concurrency_limited") == 0


def test_workers_count_per_worker(tmp_path: Path, pki: Any) -> None:
    """``workers: 2`` with ``max_connections: 1`` per listener: each worker admits one, so
    of six connections held open at least one and at most two are relayed (bytes checked),
    the rest are refused as concurrency_limited (docs/limits-and-revocation.md)."""
    echo = EchoServer()
    cfg = inbound_cfg(pki, echo.port, mode="off", rules=[
        {"name": "one-each", "action": "allow",
         "limits": {"per": "listener", "max_connections": 1}}])
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        admin = int(s.getsockname()[1])
    cfg.update({"workers": 2, "admin": {"listen": f"127.0.0.1:{admin}"}})
    proc = EnforcerProcess(write_config(tmp_path / "w.yaml", cfg))
    held: list[socket.socket] = []
    try:
        port = proc.wait_bound()["inbound"]
        _wait(lambda: _get(admin, "/readyz")[0] == 200)  # both workers serve
        admitted = refused = 0
        for _ in range(6):
            c = socket.create_connection(("127.0.0.1", port), timeout=10)
            held.append(c)
            payload = os.urandom(20_000)
            try:
                c.sendall(payload)
                got = b""
                while len(got) < len(payload) and (data := c.recv(65536)):
                    got += data
            except ConnectionError:
                got = b""
            if got:
                assert hashlib.sha256(got).digest() == hashlib.sha256(payload).digest()
                admitted += 1
            else:
                refused += 1
        assert 1 <= admitted <= 2 and refused == 6 - admitted
        for c in held:
            c.close()
        proc.proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 0, "\n".join(proc.stderr_lines)
        records = [json.loads(line) for line in proc.stdout_lines if line.startswith("{")]
        limited = [r for r in records if r["close"] == "concurrency_limited"]
        assert len(limited) == refused and len(records) == 6
        assert all(r["rule"] == "one-each" and r["upstream"] is None for r in limited)
    finally:
        for c in held:
            c.close()
        proc.stop()
        echo.close()
