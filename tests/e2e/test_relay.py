"""The sidecar pair end to end: bytes, half-close, refusals, upstream failures, limits."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import os
import socket
import ssl
import struct

import pytest

from tests.e2e import harness
from tests.e2e.harness import (
    Backend,
    Enforcer,
    blackhole_listener,
    client_ctx,
    exchange,
    inbound_cfg,
    outbound_cfg,
    random_bytes,
    running,
    sha,
)

pytestmark = pytest.mark.usefixtures("relay_mode")

MiB = 1024 * 1024


async def pair(pki, backend: Backend, **inbound_kw):  # type: ignore[no-untyped-def]
    inbound = await Enforcer(inbound_cfg(pki, backend.port, **inbound_kw)).start()
    outbound = await Enforcer(outbound_cfg(pki, inbound.port())).start()
    return inbound, outbound


async def test_64mib_each_way_at_once_through_the_pair(pki) -> None:  # type: ignore[no-untyped-def]
    down = random_bytes(64 * MiB)
    up = random_bytes(64 * MiB)
    backend = await Backend(mode="swap", payload=down).start()
    inbound, outbound = await pair(pki, backend)
    async with running(outbound, inbound, backend):
        got = await exchange(outbound.port(), up, timeout=240)
        await backend.done.wait()
        assert sha(got) == sha(down), "bytes to the client differ"
        assert sha(backend.received[0]) == sha(up), "bytes to the backend differ"
        flows = await outbound.wait_flows(1)
        rec = flows[0]
        assert rec["action"] == "allow"
        assert rec["bytes"] == {"from_client": 64 * MiB, "to_client": 64 * MiB}
        in_rec = (await inbound.wait_flows(1))[0]
        assert in_rec["tls"]["peer"]["spiffe_id"] == "spiffe://enforcer.demo/ns/demo/sa/outbound"
        assert in_rec["rule"] == "outbound-may-call"
        assert in_rec["bytes"] == {"from_client": 64 * MiB, "to_client": 64 * MiB}
        assert rec["relay"] == in_rec["relay"] == harness.RELAY


async def test_half_close_client_still_gets_the_full_response(pki) -> None:  # type: ignore[no-untyped-def]
    response = random_bytes(3 * MiB + 17)
    backend = await Backend(mode="respond", payload=response).start()
    inbound, outbound = await pair(pki, backend)
    async with running(outbound, inbound, backend):
        request = random_bytes(200_000)
        got = await exchange(outbound.port(), request)
        assert sha(got) == sha(response)
        await backend.done.wait()
        assert sha(backend.received[0]) == sha(request)
        rec = (await outbound.wait_flows(1))[0]
        assert rec["close"] == "client_fin"
        assert rec["bytes"] == {"from_client": len(request), "to_client": len(response)}


async def test_mtls_client_straight_to_inbound_and_echo(pki) -> None:  # type: ignore[no-untyped-def]
    backend = await Backend(mode="echo").start()
    inbound = await Enforcer(inbound_cfg(pki, backend.port)).start()
    async with running(inbound, backend):
        payload = random_bytes(MiB)
        ctx = client_ctx(pki.ca, pki.client.cert, pki.client.key)
        reader, writer = await asyncio.open_connection(
            "127.0.0.1", inbound.port(), ssl=ctx, server_hostname="localhost")
        writer.write(payload)
        got = await asyncio.wait_for(reader.readexactly(len(payload)), 30)
        writer.close()
        assert sha(got) == sha(payload)
        rec = (await inbound.wait_flows(1))[0]
        assert rec["action"] == "allow"
        assert rec["tls"]["version"] in ("TLSv1.2", "TLSv1.3")
        assert rec["bytes"]["from_client"] == len(payload)


@pytest.mark.parametrize("who", ["no_cert", "other_ca"])
async def test_untrusted_clients_are_refused(pki, who: str) -> None:  # type: ignore[no-untyped-def]
    backend = await Backend(mode="echo").start()
    inbound = await Enforcer(inbound_cfg(pki, backend.port)).start()
    async with running(inbound, backend):
        ctx = (client_ctx(pki.ca) if who == "no_cert"
               else client_ctx(pki.ca, pki.rogue_client.cert, pki.rogue_client.key))
        with pytest.raises((ssl.SSLError, ConnectionError, AssertionError)):
            got = await exchange(inbound.port(), b"hello", ssl_ctx=ctx,
                                 server_hostname="localhost", half_close=False, timeout=5)
            assert got, "refused connections return nothing"
        rec = (await inbound.wait_flows(1))[0]
        assert rec["action"] == "error"
        assert rec["close"] == "handshake_failed"
        assert rec["upstream"] is None
        assert backend.connections == 0, "no upstream connection before authentication"


async def test_authenticated_but_not_allowed_is_denied_before_connect(pki) -> None:  # type: ignore[no-untyped-def]
    backend = await Backend(mode="echo").start()
    inbound = await Enforcer(inbound_cfg(pki, backend.port)).start()
    async with running(inbound, backend):
        ctx = client_ctx(pki.ca, pki.other.cert, pki.other.key)
        with pytest.raises((ssl.SSLError, ConnectionError, AssertionError)):
            got = await exchange(inbound.port(), b"hello", ssl_ctx=ctx,
                                 server_hostname="localhost", half_close=False, timeout=5)
            assert got
        rec = (await inbound.wait_flows(1))[0]
        assert rec["action"] == "deny"
        assert rec["reason"] == "default"
        assert rec["tls"]["peer"]["spiffe_id"] == "spiffe://enforcer.demo/ns/other/sa/intruder"
        assert backend.connections == 0


async def test_upstream_identity_mismatch_is_refused(pki) -> None:  # type: ignore[no-untyped-def]
    backend = await Backend(mode="echo").start()
    inbound = await Enforcer(inbound_cfg(pki, backend.port)).start()
    outbound = await Enforcer(outbound_cfg(
        pki, inbound.port(), verify_uri="spiffe://enforcer.demo/ns/demo/sa/someone-else")).start()
    async with running(outbound, inbound, backend):
        got = await exchange(outbound.port(), b"secret", timeout=10, reset_ok=True)
        assert got == b""
        rec = (await outbound.wait_flows(1))[0]
        assert rec["action"] == "error"
        assert rec["close"] == "upstream_identity_mismatch"
        assert "someone-else" in rec["detail"]
        await asyncio.sleep(0.1)
        assert backend.received in ([], [b""]), "nothing reached the app"


async def test_upstream_down(pki) -> None:  # type: ignore[no-untyped-def]
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    dead_port = sock.getsockname()[1]
    sock.close()  # nothing listens there now
    inbound = await Enforcer(inbound_cfg(pki, dead_port)).start()
    outbound = await Enforcer(outbound_cfg(pki, inbound.port())).start()
    async with running(outbound, inbound):
        got = await exchange(outbound.port(), b"anyone there?", timeout=10, reset_ok=True)
        assert got == b""
        rec = (await inbound.wait_flows(1))[0]
        assert rec["action"] == "error"
        assert rec["close"] == "upstream_connect_failed"
        assert "refused" in rec["detail"].lower()
        out = (await outbound.wait_flows(1))[0]
        assert out["action"] == "allow"  # the outbound did its job: the inbound closed on it
        assert out["bytes"]["to_client"] == 0


async def blackholed_listener(pki, connect_timeout: str):  # type: ignore[no-untyped-def]
    """A plaintext listener whose upstream never answers a connect."""
    blackhole, port, fillers = blackhole_listener()
    await asyncio.sleep(0.1)
    cfg = inbound_cfg(pki, port, default="allow", rules=[], client_auth="none", mode="off",
                      limits={"connect_timeout": connect_timeout})
    return await Enforcer(cfg).start(), blackhole, port, fillers


async def test_upstream_connect_timeout(pki) -> None:  # type: ignore[no-untyped-def]
    enforcer, blackhole, port, fillers = await blackholed_listener(pki, "300ms")
    try:
        async with running(enforcer):
            got = await exchange(enforcer.port(), b"hello?", timeout=10, reset_ok=True)
            assert got == b""
            rec = (await enforcer.wait_flows(1))[0]
            assert (rec["action"], rec["close"]) == ("error", "upstream_connect_timeout")
            assert rec["detail"] == f"connect to 127.0.0.1:{port} timed out"
            assert 0.25 <= rec["duration_s"] < 5  # the loop's timers have 1 ms resolution
            assert enforcer.plane.active == set()
            errors = enforcer.metrics.registry.get_sample_value(
                "enforcer_upstream_errors_total", {"upstream": "app", "reason": "connect_timeout"})
            assert errors == 1
    finally:
        for s in [*fillers, blackhole]:
            s.close()


async def test_client_resetting_during_connect_leaves_no_upstream(pki) -> None:  # type: ignore[no-untyped-def]
    enforcer, blackhole, _port, fillers = await blackholed_listener(pki, "30s")
    async with running(enforcer):
        client = socket.create_connection(("127.0.0.1", enforcer.port()))
        await asyncio.sleep(0.3)  # the enforcer is now connecting upstream
        assert len(enforcer.plane.active) == 1
        client.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        client.close()  # RST: certainly gone (a FIN may be a half-close, see below)
        rec = (await enforcer.wait_flows(1))[0]
        assert rec["action"] == "error"
        assert rec["close"] == "client_reset"
        conn_tasks = [c.connect_task for c in enforcer.plane.active]
        assert conn_tasks == []
    # Drain the accept queue: only the fillers ever reached it.
    blackhole.setblocking(False)
    accepted = 0
    for _ in range(20):
        try:
            c, _ = blackhole.accept()
            c.close()
            accepted += 1
        except BlockingIOError:
            await asyncio.sleep(0.05)
    assert accepted <= len(fillers)
    for s in fillers:
        s.close()
    blackhole.close()


async def test_a_client_half_close_during_connect_lets_the_connect_go_on(pki) -> None:  # type: ignore[no-untyped-def]
    """FIN is all a client that has nothing to say sends (`nc -N`, reading a banner): the
    upstream is still reached, here until the connect times out."""
    enforcer, blackhole, port, fillers = await blackholed_listener(pki, "500ms")
    try:
        async with running(enforcer):
            reader, writer = await asyncio.open_connection("127.0.0.1", enforcer.port())
            await asyncio.sleep(0.2)  # connecting upstream
            writer.write_eof()
            assert await asyncio.wait_for(reader.read(), 10) == b""
            writer.close()
            rec = (await enforcer.wait_flows(1))[0]
            assert (rec["action"], rec["close"]) == ("error", "upstream_connect_timeout")
            assert rec["detail"] == f"connect to 127.0.0.1:{port} timed out"
    finally:
        for s in [*fillers, blackhole]:
            s.close()


async def test_idle_timeout_closes_both_sides(pki) -> None:  # type: ignore[no-untyped-def]
    backend = await Backend(mode="hold").start()
    cfg = inbound_cfg(pki, backend.port, default="allow", rules=[], mode="off",
                      limits={"idle_timeout": "300ms"})
    enforcer = await Enforcer(cfg).start()
    async with running(enforcer, backend):
        reader, writer = await asyncio.open_connection("127.0.0.1", enforcer.port())
        writer.write(b"ping")
        await writer.drain()
        async with asyncio.timeout(5):
            assert await reader.read() == b""  # closed by the enforcer
        writer.close()
        rec = (await enforcer.wait_flows(1))[0]
        assert rec["close"] == "idle_timeout"
        assert rec["bytes"]["from_client"] == 4
        await asyncio.wait_for(backend.done.wait(), 5)
        assert backend.received == [b"ping"]


async def test_max_connections(pki) -> None:  # type: ignore[no-untyped-def]
    backend = await Backend(mode="hold").start()
    cfg = inbound_cfg(pki, backend.port, default="allow", rules=[], mode="off",
                      limits={"max_connections": 2})
    enforcer = await Enforcer(cfg).start()
    async with running(enforcer, backend):
        held = [await asyncio.open_connection("127.0.0.1", enforcer.port()) for _ in range(2)]
        await asyncio.sleep(0.2)
        reader, writer = await asyncio.open_connection("127.0.0.1", enforcer.port())
        async with asyncio.timeout(5):
            with contextlib.suppress(ConnectionResetError):
                assert await reader.read() == b""
        recs = await enforcer.wait_flows(1)
        assert recs[0]["close"] == "max_connections"
        assert recs[0]["action"] == "error"
        assert len(enforcer.plane.active) == 2
        for _, w in [*held, (reader, writer)]:
            w.close()


async def test_plain_both_sides_over_unix_sockets(pki, tmp_path) -> None:  # type: ignore[no-untyped-def]
    app_path = str(tmp_path / "app.sock")
    payload = random_bytes(2 * MiB)

    async def echo(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        while data := await r.read(65536):
            w.write(data)
            await w.drain()
        w.write_eof()
        w.close()

    app = await asyncio.start_unix_server(echo, app_path)
    cfg = inbound_cfg(pki, 1, default="allow", rules=[], mode="off",
                      listener_extra={"listen": f"unix:{tmp_path / 'enf.sock'}"},
                      upstream_extra={"address": f"unix:{app_path}"})
    enforcer = await Enforcer(cfg).start()
    try:
        reader, writer = await asyncio.open_unix_connection(str(tmp_path / "enf.sock"))
        writer.write(payload)
        writer.write_eof()
        got = bytearray()
        async with asyncio.timeout(30):
            while data := await reader.read(65536):
                got += data
        writer.close()
        assert sha(bytes(got)) == sha(payload)
        rec = (await enforcer.wait_flows(1))[0]
        assert rec["upstream"]["address"] == f"unix:{app_path}"
        assert rec["bytes"]["from_client"] == len(payload)
    finally:
        await enforcer.stop()
        app.close()


async def test_tests_run_on_uvloop() -> None:
    import uvloop

    assert isinstance(asyncio.get_running_loop(), uvloop.Loop)


async def test_handshake_timeout(pki) -> None:  # type: ignore[no-untyped-def]
    backend = await Backend(mode="echo").start()
    cfg = inbound_cfg(pki, backend.port, limits={"handshake_timeout": "300ms"})
    enforcer = await Enforcer(cfg).start()
    async with running(enforcer, backend):
        reader, writer = await asyncio.open_connection("127.0.0.1", enforcer.port())
        writer.write(b"\x16\x03\x01")  # the start of a ClientHello, then silence
        async with asyncio.timeout(5):
            assert await reader.read() == b""
        writer.close()
        rec = (await enforcer.wait_flows(1))[0]
        assert rec["close"] == "handshake_timeout"
        assert rec["action"] == "error"
        assert backend.connections == 0
        assert enforcer.metrics.registry.get_sample_value(
            "enforcer_tls_handshake_errors_total",
            {"listener": "inbound", "reason": "timeout"}) == 1


async def test_close_timeout_after_one_side_finished(pki) -> None:  # type: ignore[no-untyped-def]
    got = bytearray()
    seen_eof = asyncio.Event()

    async def never_closes(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        while data := await r.read(65536):
            got.extend(data)
        seen_eof.set()
        await asyncio.sleep(30)  # keeps its own side open

    backend = await Backend.serving(never_closes)
    cfg = inbound_cfg(pki, backend.port, default="allow", rules=[], mode="off",
                      limits={"close_timeout": "300ms"})
    enforcer = await Enforcer(cfg).start()
    async with running(enforcer, backend):
        reader, writer = await asyncio.open_connection("127.0.0.1", enforcer.port())
        writer.write(b"last words")
        writer.write_eof()
        async with asyncio.timeout(5):
            assert await reader.read() == b""
        writer.close()
        rec = (await enforcer.wait_flows(1))[0]
        assert rec["close"] == "close_timeout"
        assert rec["action"] == "allow"
        await asyncio.wait_for(seen_eof.wait(), 5)
        assert bytes(got) == b"last words"


async def test_max_lifetime(pki) -> None:  # type: ignore[no-untyped-def]
    backend = await Backend(mode="echo").start()
    cfg = inbound_cfg(pki, backend.port, default="allow", rules=[], mode="off",
                      limits={"max_lifetime": "400ms", "idle_timeout": "1h"})
    enforcer = await Enforcer(cfg).start()
    async with running(enforcer, backend):
        reader, writer = await asyncio.open_connection("127.0.0.1", enforcer.port())
        sent = received = b""
        with contextlib.suppress(ConnectionError):
            async with asyncio.timeout(5):
                while True:  # keep it busy: only the lifetime cap can end it
                    chunk = os.urandom(1000)
                    writer.write(chunk)
                    sent += chunk
                    data = await reader.read(65536)
                    if not data:
                        break
                    received += data
                    await asyncio.sleep(0.02)
        writer.close()
        assert received == sent[: len(received)]
        rec = (await enforcer.wait_flows(1))[0]
        assert rec["close"] == "max_lifetime"
        assert rec["bytes"]["to_client"] == len(received)


async def test_auto_mode_detects_tls_and_plaintext_per_connection(pki) -> None:  # type: ignore[no-untyped-def]
    backend = await Backend(mode="echo").start()
    rules = [{"name": "mesh-peers", "action": "allow",
              "from": {"identities": ["spiffe://enforcer.demo/ns/demo/sa/outbound"]}},
             {"name": "plain-from-localhost", "action": "allow",
              "from": {"tls": "none", "cidrs": ["127.0.0.0/8"]}}]
    enforcer = await Enforcer(inbound_cfg(pki, backend.port, mode="auto", rules=rules)).start()
    async with running(enforcer, backend):
        plain = random_bytes(300_000)
        assert sha(await exchange(enforcer.port(), plain)) == sha(plain)
        ctx = client_ctx(pki.ca, pki.client.cert, pki.client.key)
        reader, writer = await asyncio.open_connection(
            "127.0.0.1", enforcer.port(), ssl=ctx, server_hostname="localhost")
        secret = random_bytes(300_000)
        writer.write(secret)
        assert sha(await asyncio.wait_for(reader.readexactly(len(secret)), 30)) == sha(secret)
        writer.close()
        recs = await enforcer.wait_flows(2)
        by_rule = {r["rule"]: r for r in recs}
        assert by_rule["plain-from-localhost"]["tls"] is None
        assert by_rule["mesh-peers"]["tls"]["peer"]["spiffe_id"].endswith("/sa/outbound")
        assert by_rule["mesh-peers"]["bytes"]["from_client"] == len(secret)


async def test_upstream_tls_mode_checks_the_host_name(pki) -> None:  # type: ignore[no-untyped-def]
    """`tls.mode: tls` (no client certificate): SNI and host-name verification."""
    backend = await Backend(mode="echo").start()
    server = await Enforcer(inbound_cfg(pki, backend.port, default="allow", rules=[],
                                        client_auth="none")).start()
    ok_cfg = outbound_cfg(pki, server.port())
    ok_cfg["upstreams"]["peer"]["tls"] = {"mode": "tls", "material": "mesh",
                                          "server_name": "localhost"}
    bad_cfg = outbound_cfg(pki, server.port())
    bad_cfg["upstreams"]["peer"]["tls"] = {"mode": "tls", "material": "mesh",
                                           "server_name": "not-this-host.example"}
    good, bad = await Enforcer(ok_cfg).start(), await Enforcer(bad_cfg).start()
    async with running(good, bad, server, backend):
        payload = random_bytes(500_000)
        assert sha(await exchange(good.port(), payload)) == sha(payload)
        rec = (await server.wait_flows(1))[0]
        assert rec["tls"]["sni"] == "localhost"
        assert rec["tls"]["peer"] is None  # no client certificate in mode tls
        assert await exchange(bad.port(), b"secret", reset_ok=True) == b""
        bad_rec = (await bad.wait_flows(1))[0]
        assert bad_rec["close"] == "upstream_tls_failed"
        assert "hostname mismatch" in bad_rec["detail"].lower()
        assert backend.connections == 1


async def test_slow_plain_reader_behind_tls_gets_every_byte(pki) -> None:  # type: ignore[no-untyped-def]
    """Decrypted bytes are handed to the upstream as views of a shared buffer; a slow
    reader makes the transport keep them, which must never let a later read reuse them."""
    received = bytearray()
    done = asyncio.Event()

    async def slow(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        while data := await r.read(32768):
            received.extend(data)
            await asyncio.sleep(0.001)
        w.write(hashlib.sha256(received).hexdigest().encode())
        await w.drain()
        w.close()
        done.set()

    backend = await Backend.serving(slow)
    inbound = await Enforcer(inbound_cfg(pki, backend.port)).start()
    outbound = await Enforcer(outbound_cfg(pki, inbound.port())).start()
    async with running(outbound, inbound, backend):
        payload = random_bytes(24 * MiB)
        answer = await exchange(outbound.port(), payload, timeout=120)
        await asyncio.wait_for(done.wait(), 30)
        assert sha(bytes(received)) == sha(payload)
        assert answer.decode() == hashlib.sha256(payload).hexdigest()


async def test_a_finished_connection_is_freed_without_the_garbage_collector(pki) -> None:  # type: ignore[no-untyped-def]
    """Closed connections break their reference cycles, so their sockets' objects and the
    OpenSSL state go at once (memory under churn), not at the next collection."""
    import gc

    from enforcer.dataplane.connection import Connection
    from enforcer.dataplane.side import Side
    from enforcer.dataplane.tlsengine import TlsEngine

    def alive() -> list[str]:
        return sorted(type(o).__name__ for o in gc.get_objects()
                      if isinstance(o, Connection | Side | TlsEngine))

    payload = random_bytes(300_000)
    backend = await Backend(mode="echo").start()
    inbound, outbound = await pair(pki, backend)
    async with running(outbound, inbound, backend):
        gc.collect()
        gc.disable()
        try:
            reader, writer = await asyncio.open_connection("127.0.0.1", outbound.port())
            writer.write(payload)
            got = await reader.readexactly(len(payload))
            # both enforcers' connections, each with two sides; TLS on the mTLS leg only
            assert alive() == ["Connection"] * 2 + ["Side"] * 4 + ["TlsEngine"] * 2
            writer.write_eof()
            assert await reader.read() == b""  # the backend's FIN came back through the pair
            writer.close()
            await writer.wait_closed()
            await inbound.wait_flows(1)
            await outbound.wait_flows(1)
            for _ in range(100):
                if not alive():
                    break
                await asyncio.sleep(0.01)
            left = alive()
        finally:
            gc.enable()
        assert left == []
        assert sha(got) == sha(payload)
        assert [f["bytes"] for f in outbound.flows.records] == [
            {"from_client": len(payload), "to_client": len(payload)}]


async def test_a_server_that_speaks_first_through_the_pair(pki) -> None:  # type: ignore[no-untyped-def]
    """The outbound's last handshake flight waits for the client's first bytes so that both
    leave together; with a client that sends nothing until the server has spoken (SMTP,
    MySQL, SSH banners), it must still leave at once, or the inbound never completes the
    handshake and the banner never comes."""
    banner = random_bytes(3000)

    async def speaks_first(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(banner)
        await writer.drain()
        while data := await reader.read(65536):
            writer.write(data)
        writer.write_eof()
        writer.close()

    backend = await Backend.serving(speaks_first)
    inbound, outbound = await pair(pki, backend)
    async with running(outbound, inbound, backend):
        reader, writer = await asyncio.open_connection("127.0.0.1", outbound.port())
        try:
            got = await asyncio.wait_for(reader.readexactly(len(banner)), 10)
            assert sha(got) == sha(banner)
            payload = random_bytes(200_000)
            writer.write(payload)
            writer.write_eof()
            echoed = await asyncio.wait_for(reader.read(), 10)
            assert sha(echoed) == sha(payload)
        finally:
            writer.close()
        records = await inbound.wait_flows(1)
    assert records[0]["bytes"] == {"from_client": len(payload),
                                   "to_client": len(banner) + len(payload)}
