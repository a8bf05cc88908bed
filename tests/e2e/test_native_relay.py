"""The native relay pump (enforcer/dataplane/_pump.c) end to end: it is built and used,
half-closes both ways, keeps memory bounded under back-pressure, counts bytes while a
transfer runs, times out idle connections, and reports resets and TLS errors the way the
Python relay does (the tests marked with ``relay_mode`` run on both)."""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import ssl
import struct
from typing import Any

import pytest

from enforcer.dataplane import connection, lifecycle, native
from tests.e2e import harness
from tests.e2e.harness import (
    Backend,
    Enforcer,
    client_ctx,
    inbound_cfg,
    outbound_cfg,
    random_bytes,
    running,
    sha,
    wait_until,
)

MiB = 1024 * 1024

# every test runs with the pump's own TLS 1.3 records and with OpenSSL's (see conftest)
pytestmark = pytest.mark.usefixtures("tls_records")


def test_the_native_pump_is_built_and_bound() -> None:
    assert native.available(), native.unavailable_reason()


@pytest.mark.parametrize(("version", "frees"), [
    (0x300000D0, False), (0x300000E0, True), (0x30000160, True),  # 3.0.13, 3.0.14, 3.0.22
    (0x30100050, False), (0x30100060, True),  # 3.1.5, 3.1.6
    (0x30200010, False), (0x30200020, True),  # 3.2.1, 3.2.2
    (0x30300000, False), (0x30300010, True),  # 3.3.0, 3.3.1
    (0x30400000, True), (0x40000000, True),  # 3.4.0, 4.0.0
    (0x1010118F, False), (0x1010119F, True),  # 1.1.1x, 1.1.1y
])
def test_record_buffers_are_freed_only_where_cve_2024_4741_is_fixed(
        version: int, frees: bool) -> None:
    ext = native.module()
    assert ext is not None
    assert ext.frees_tls_buffers(version) is frees
    assert native.frees_tls_buffers() is ext.frees_tls_buffers(ssl.OPENSSL_VERSION_NUMBER)


def test_relay_native_refuses_to_start_without_the_extension(
        pki: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    """What a host without a C compiler at install time sees (simulated: the extension is
    built here); ``auto`` falls back to the Python relay instead."""
    from enforcer.dataplane.plane import StartupError

    monkeypatch.setattr(native, "_bound", (None, "the native extension is not built (test)"))
    with pytest.raises(StartupError) as info:
        Enforcer({**inbound_cfg(pki, 1), "relay": "native"}).plane.build()
    assert info.value.kind == "config"
    assert str(info.value) == "relay: native, but the native extension is not built (test)"
    auto = Enforcer({**inbound_cfg(pki, 1), "relay": "auto"}).plane
    auto.build()
    assert auto.native_relay is False


def test_a_stale_build_of_the_extension_is_refused_with_the_reason(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """setup.py keeps an old ``_pump`` when a compile fails (the extension is optional):
    one that does not offer what this enforcer calls is reported instead of half used."""
    assert native.module() is not None  # the real build passes
    monkeypatch.setattr(native, "API_VERSION", native.API_VERSION + 1)
    monkeypatch.setattr(native, "_bound", None)
    assert native.module() is None
    reason = native.unavailable_reason()
    assert "out of date" in reason and f"needs {native.API_VERSION}" in reason


async def _pair(pki: Any, backend_port: int, **inbound_kw: Any) -> tuple[Enforcer, Enforcer]:
    inbound = await Enforcer({**inbound_cfg(pki, backend_port, **inbound_kw),
                              "relay": "native"}).start()
    outbound = await Enforcer({**outbound_cfg(pki, inbound.port()), "relay": "native"}).start()
    return inbound, outbound


async def test_client_half_close_after_handover_gets_the_whole_response(pki: Any) -> None:
    response = random_bytes(5 * MiB + 3)
    backend = await Backend(mode="respond", payload=response).start()
    inbound, outbound = await _pair(pki, backend.port)
    async with running(outbound, inbound, backend):
        reader, writer = await asyncio.open_connection("127.0.0.1", outbound.port())
        first, rest = random_bytes(1000), random_bytes(2 * MiB)
        writer.write(first)
        await wait_until(lambda: outbound.plane.pumped and inbound.plane.pumped)
        writer.write(rest)
        writer.write_eof()
        got = await asyncio.wait_for(reader.read(), 30)
        writer.close()
        assert sha(got) == sha(response)
        await backend.done.wait()
        assert sha(backend.received[0]) == sha(first + rest)
        for enforcer in (outbound, inbound):
            rec = (await enforcer.wait_flows(1))[0]
            assert rec["relay"] == "native"
            assert rec["close"] == "client_fin"
            assert rec["bytes"] == {"from_client": len(first + rest), "to_client": len(response)}


async def test_upstream_half_close_first_and_the_client_keeps_sending(pki: Any) -> None:
    greeting = random_bytes(3 * MiB)
    received = bytearray()
    done = asyncio.Event()

    async def speaks_first(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        w.write(greeting)
        w.write_eof()  # the upstream finishes first
        while data := await r.read(65536):
            received.extend(data)
        w.close()
        done.set()

    backend = await Backend.serving(speaks_first)
    inbound, outbound = await _pair(pki, backend.port)
    async with running(outbound, inbound, backend):
        reader, writer = await asyncio.open_connection("127.0.0.1", outbound.port())
        writer.write(b"hello")
        got = await asyncio.wait_for(reader.read(), 30)  # EOF: the upstream's FIN came through
        assert sha(got) == sha(greeting)
        later = random_bytes(4 * MiB)
        writer.write(later)  # the other direction still flows
        await writer.drain()
        writer.write_eof()
        await asyncio.wait_for(done.wait(), 30)
        writer.close()
        assert sha(bytes(received)) == sha(b"hello" + later)
        for enforcer in (outbound, inbound):
            rec = (await enforcer.wait_flows(1))[0]
            assert (rec["relay"], rec["close"]) == ("native", "upstream_fin")
            assert rec["bytes"] == {"from_client": len(later) + 5, "to_client": len(greeting)}


async def test_the_pump_passes_an_eof_on_only_when_told_after_the_bytes_before_it() -> None:
    """The pump owns no policy (the lifecycle core does): an end of stream is reported
    (("eof", side, None) for a plaintext FIN) and nothing is passed on until
    shut_write(other side), whose FIN follows every byte still waiting for that socket;
    once both directions have ended and all is sent, it reports done."""
    ext = native.module()
    assert ext is not None
    loop = asyncio.get_running_loop()
    poller = native.new_poller(loop)
    a_near, a_far = socket.socketpair()
    b_near, b_far = socket.socketpair()
    for s in (a_near, a_far, b_near, b_far):
        s.setblocking(False)
    events: list[tuple[str, int, object]] = []
    pump: Any = None

    def on_event(kind: str, side: int, detail: object) -> None:
        events.append((kind, side, detail))
        if (kind, side) == ("eof", 0):
            pump.shut_write(1)  # what the core answers to the first EOF, at once

    pump = ext.Pump(a_near.detach(), None, b_near.detach(), None, poller, on_event)
    with pytest.raises(RuntimeError, match="not started"):
        pump.shut_write(1)
    pump.start()
    with pytest.raises(ValueError, match="0 or 1"):
        pump.shut_write(2)
    data = random_bytes(3 * MiB)  # more than the socket buffers: some waits in the pump

    async def send() -> None:
        await loop.sock_sendall(a_far, data)
        a_far.shutdown(socket.SHUT_WR)

    try:
        sender = asyncio.ensure_future(send())
        got = bytearray()
        while chunk := await asyncio.wait_for(loop.sock_recv(b_far, 65536), 10):
            got += chunk
        await sender
        assert sha(bytes(got)) == sha(data)  # every byte, then the FIN
        assert events == [("eof", 0, None)]
        b_far.shutdown(socket.SHUT_WR)
        await wait_until(lambda: len(events) == 2)
        assert events[1] == ("eof", 1, None)
        with pytest.raises(BlockingIOError):  # reported, not passed on: no FIN yet
            a_far.recv(1)
        pump.shut_write(0)
        assert await asyncio.wait_for(loop.sock_recv(a_far, 1), 5) == b""
        assert events[2:] == [("done", -1, None)]
    finally:
        pump.close()
        native.close_poller(loop, poller)
        a_far.close()
        b_far.close()


async def test_a_stalled_upstream_bounds_memory_then_gets_every_byte(pki: Any) -> None:
    """Flow control: while the upstream reads nothing, the pump holds at most one read's
    worth and stops reading the client; once it reads, every byte arrives."""
    go = asyncio.Event()
    received = bytearray()
    done = asyncio.Event()

    async def stalled(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        await go.wait()
        while data := await r.read(262144):
            received.extend(data)
        w.write(sha(bytes(received)).encode())
        await w.drain()
        w.close()
        done.set()

    backend = await Backend.serving(stalled)
    inbound, outbound = await _pair(pki, backend.port)
    async with running(outbound, inbound, backend):
        payload = random_bytes(48 * MiB)
        reader, writer = await asyncio.open_connection("127.0.0.1", outbound.port())

        async def send() -> None:
            writer.write(payload)
            await writer.drain()
            writer.write_eof()

        sender = asyncio.ensure_future(send())
        await wait_until(lambda: inbound.plane.pumped)
        await asyncio.sleep(1.0)
        assert not sender.done(), "48 MiB cannot fit in socket buffers: the client must wait"
        for enforcer in (outbound, inbound):
            for conn in enforcer.plane.pumped:
                assert conn.pump is not None
                assert conn.pump.buffered <= 1 * MiB
        go.set()
        await asyncio.wait_for(sender, 60)
        answer = await asyncio.wait_for(reader.read(), 60)
        writer.close()
        assert answer.decode() == sha(payload)
        assert sha(bytes(received)) == sha(payload)


async def test_bytes_are_counted_while_a_pumped_connection_is_open(pki: Any) -> None:
    backend = await Backend(mode="echo").start()
    inbound, outbound = await _pair(pki, backend.port)
    async with running(outbound, inbound, backend):
        payload = random_bytes(1 * MiB)
        reader, writer = await asyncio.open_connection("127.0.0.1", outbound.port())
        writer.write(payload)
        got = await asyncio.wait_for(reader.readexactly(len(payload)), 30)
        assert sha(got) == sha(payload)

        def counted(direction: str) -> float | None:
            value = outbound.metrics.registry.get_sample_value(
                "enforcer_bytes_total", {"listener": "outbound", "direction": direction})
            return value

        await wait_until(lambda: counted("to_client") == len(payload), timeout=5)
        assert counted("from_client") == len(payload)
        assert outbound.plane.pumped, "still open, and still relayed by the pump"
        writer.close()
        rec = (await outbound.wait_flows(1))[0]
        assert rec["bytes"] == {"from_client": len(payload), "to_client": len(payload)}
        assert counted("to_client") == len(payload)


def _tls_buffers_held(*proxies: Enforcer) -> int:
    pumps = [conn.pump for proxy in proxies for conn in proxy.plane.pumped]
    assert len(pumps) == len(proxies) and None not in pumps
    return sum(p.bio_bytes + p.buffered + p.cipher_contexts for p in pumps if p is not None)


async def test_an_idle_pumped_connection_holds_no_tls_buffers(pki: Any) -> None:
    """After a bulk transfer, the memory BIOs (which only ever grow by themselves) are back
    to empty on both TLS ends, and the connection still relays every byte afterwards."""
    backend = await Backend(mode="echo").start()
    inbound, outbound = await _pair(pki, backend.port)
    async with running(outbound, inbound, backend):
        reader, writer = await asyncio.open_connection("127.0.0.1", outbound.port())
        for size in (1 * MiB, 100, 300 * 1024):
            payload = random_bytes(size)
            writer.write(payload)
            got = await asyncio.wait_for(reader.readexactly(len(payload)), 30)
            assert sha(got) == sha(payload)
            await wait_until(lambda: _tls_buffers_held(outbound, inbound) == 0, timeout=5)
        writer.close()
        rec = (await outbound.wait_flows(1))[0]
        total = 1 * MiB + 100 + 300 * 1024
        assert rec["bytes"] == {"from_client": total, "to_client": total}


async def test_an_idle_pumped_connection_keeps_no_timer_map_or_held_list(pki: Any) -> None:
    """Memory per held connection: once the pump relays, nothing is armed or held in
    Python, and neither the connection nor its lifecycle core keeps a dict or a list of
    its own for that (the shared empty ones), on both sidecars."""
    backend = await Backend(mode="echo").start()
    inbound, outbound = await _pair(pki, backend.port)
    async with running(outbound, inbound, backend):
        reader, writer = await asyncio.open_connection("127.0.0.1", outbound.port())
        payload = random_bytes(1000)
        writer.write(payload)
        assert sha(await asyncio.wait_for(reader.readexactly(len(payload)), 30)) == sha(payload)
        await wait_until(lambda: outbound.plane.pumped and inbound.plane.pumped)
        for conn in (*outbound.plane.pumped, *inbound.plane.pumped):
            assert conn.timers is connection._NO_TIMERS and conn.timers == {}
            assert conn.pending is connection._NOTHING_HELD and conn.pending == []
            assert conn.core.timers == {} and conn.core.out == []
            assert conn.core.timers is lifecycle._NO_TIMERS
        writer.close()
        rec = (await outbound.wait_flows(1))[0]
        assert rec["bytes"] == {"from_client": len(payload), "to_client": len(payload)}


def _keeping(*proxies: Enforcer) -> int:
    return sum(c.pump.keeping for proxy in proxies for c in proxy.plane.pumped if c.pump)


async def _exchanges(reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                     count: int, sent: bytearray) -> None:
    """Small echoes back to back, as a keep-alive client makes requests."""
    for _ in range(count):
        chunk = random_bytes(300)
        sent += chunk
        writer.write(chunk)
        assert sha(await asyncio.wait_for(reader.readexactly(len(chunk)), 5)) == sha(chunk)


async def test_a_busy_tls_end_keeps_its_buffers_until_a_quiet_tick(pki: Any) -> None:
    """Requests back to back do not free and allocate the TLS buffers each time: the busy
    ends keep them while traffic flows and give them back once a tick finds them quiet."""
    backend = await Backend(mode="echo").start()
    inbound, outbound = await _pair(pki, backend.port, limits={"idle_timeout": "20s"})
    async with running(outbound, inbound, backend):
        reader, writer = await asyncio.open_connection("127.0.0.1", outbound.port())
        sent = bytearray()
        await _exchanges(reader, writer, 40, sent)
        assert _keeping(outbound) == 1 and _keeping(inbound) == 1  # their one TLS end each
        assert _tls_buffers_held(outbound, inbound) > 0
        assert native.module().busy_limits()[2] == 2  # the process-wide count
        await wait_until(lambda: _keeping(outbound, inbound) == 0
                         and _tls_buffers_held(outbound, inbound) == 0, timeout=5)
        await _exchanges(reader, writer, 3, sent)  # a few again: given back at once
        await wait_until(lambda: _tls_buffers_held(outbound, inbound) == 0, timeout=1)
        assert _keeping(outbound, inbound) == 0
        writer.close()
        rec = (await inbound.wait_flows(1))[0]
        assert rec["bytes"] == {"from_client": len(sent), "to_client": len(sent)}
        assert sha(backend.received[0]) == sha(bytes(sent))
    assert native.module().busy_limits()[2] == 0


async def test_busy_ends_beyond_the_limit_give_their_buffers_back_at_once(pki: Any) -> None:
    ext = native.module()
    bursts, ends, _ = ext.busy_limits()
    backend = await Backend(mode="echo").start()
    inbound, outbound = await _pair(pki, backend.port)
    try:
        ext.busy_limits(bursts, 1)  # one end in the process may keep its buffers
        async with running(outbound, inbound, backend):
            streams = [await asyncio.open_connection("127.0.0.1", outbound.port())
                       for _ in range(2)]
            sent = [bytearray(), bytearray()]
            for (reader, writer), out in zip(streams, sent, strict=True):
                await _exchanges(reader, writer, 40, out)
            assert _keeping(outbound, inbound) == 1 == ext.busy_limits()[2]
            for _, writer in streams:
                writer.close()
            records = await inbound.wait_flows(2)
            assert sorted(r["bytes"]["to_client"] for r in records) == [len(sent[0])] * 2
            assert sorted(sha(b) for b in backend.received) == sorted(sha(bytes(b))
                                                                      for b in sent)
        assert ext.busy_limits()[2] == 0  # closed pumps stop counting
    finally:
        ext.busy_limits(bursts, ends)


async def test_idle_timeout_closes_a_pumped_connection_and_activity_defers_it(pki: Any) -> None:
    backend = await Backend(mode="echo").start()
    inbound, outbound = await _pair(pki, backend.port, limits={"idle_timeout": "400ms"})
    async with running(outbound, inbound, backend):
        reader, writer = await asyncio.open_connection("127.0.0.1", outbound.port())
        sent = bytearray()
        for _ in range(8):  # 1.2 s of traffic, never idle for 400 ms
            chunk = random_bytes(1000)
            sent += chunk
            writer.write(chunk)
            assert await asyncio.wait_for(reader.readexactly(len(chunk)), 5) == chunk
            await asyncio.sleep(0.15)
        assert inbound.plane.pumped and not inbound.flows.records
        # then idle: the inbound aborts (no close_notify), which the outbound passes on to
        # its client as a reset, not as a clean end
        with pytest.raises(ConnectionResetError):
            await asyncio.wait_for(reader.read(), 5)
        writer.close()
        rec = (await inbound.wait_flows(1))[0]
        assert (rec["relay"], rec["close"]) == ("native", "idle_timeout")
        out = (await outbound.wait_flows(1))[0]
        assert out["close"] == "upstream_eof_without_close_notify"
        assert rec["bytes"] == {"from_client": len(sent), "to_client": len(sent)}
        assert sha(backend.received[0]) == sha(bytes(sent))


@pytest.mark.usefixtures("relay_mode")
async def test_an_upstream_reset_mid_relay_is_recorded(pki: Any) -> None:
    got_some = asyncio.Event()

    async def resets(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        await r.readexactly(1000)
        w.write(b"partial answer")
        await w.drain()
        got_some.set()
        await asyncio.sleep(0.2)
        sock = w.get_extra_info("socket")
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        w.transport.abort()  # RST

    backend = await Backend.serving(resets)
    enforcer = await Enforcer(inbound_cfg(pki, backend.port, default="allow", rules=[],
                                          mode="off")).start()
    async with running(enforcer, backend):
        reader, writer = await asyncio.open_connection("127.0.0.1", enforcer.port())
        writer.write(random_bytes(1000))
        assert await asyncio.wait_for(reader.readexactly(14), 5) == b"partial answer"
        with contextlib.suppress(ConnectionError):
            assert await asyncio.wait_for(reader.read(), 5) == b""
        writer.close()
        rec = (await enforcer.wait_flows(1))[0]
        assert rec["relay"] == harness.RELAY
        assert rec["close"] == "upstream_reset"
        assert rec["detail"] == "[Errno 104] Connection reset by peer"
        assert rec["bytes"] == {"from_client": 1000, "to_client": 14}


@pytest.mark.usefixtures("relay_mode")
async def test_a_corrupt_tls_record_mid_relay_is_a_client_tls_error(pki: Any) -> None:
    backend = await Backend(mode="hold").start()
    enforcer = await Enforcer(inbound_cfg(pki, backend.port)).start()
    async with running(enforcer, backend):
        ctx = client_ctx(pki.ca, pki.client.cert, pki.client.key)
        incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
        tls = ctx.wrap_bio(incoming, outgoing, server_hostname="localhost")
        sock = socket.create_connection(("127.0.0.1", enforcer.port()))
        sock.setblocking(False)
        loop = asyncio.get_running_loop()
        try:
            while True:
                try:
                    tls.do_handshake()
                    break
                except ssl.SSLWantReadError:
                    await loop.sock_sendall(sock, outgoing.read())
                    incoming.write(await loop.sock_recv(sock, 65536))
            tls.write(b"a real request")
            await loop.sock_sendall(sock, outgoing.read())
            await wait_until(lambda: any(c.relay == harness.RELAY for c in enforcer.plane.active))
            await asyncio.sleep(0.1)
            # an application-data record of the right shape whose contents are garbage
            await loop.sock_sendall(sock, b"\x17\x03\x03\x00\x40" + random_bytes(64))
            rec = (await enforcer.wait_flows(1))[0]
        finally:
            sock.close()
        assert rec["relay"] == harness.RELAY
        assert rec["close"] == "client_tls_error"
        assert rec["detail"] == "TLS error from the client: " + harness.relay_reason(
            "DECRYPTION_FAILED_OR_BAD_RECORD_MAC")
        await asyncio.wait_for(backend.done.wait(), 5)
        assert backend.received == [b"a real request"]


async def test_a_reset_while_bytes_wait_for_a_stalled_upstream_releases_everything(
        pki: Any) -> None:
    """The pump holds unsent bytes for a stalled upstream, which then resets: the flow ends
    as upstream_reset, the client is closed, and no descriptor or buffer is left behind."""
    reset_now = asyncio.Event()

    async def stalls_then_resets(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        await reset_now.wait()
        sock = w.get_extra_info("socket")
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        w.transport.abort()

    backend = await Backend.serving(stalls_then_resets)
    enforcer = await Enforcer({**inbound_cfg(pki, backend.port, default="allow", rules=[],
                                             mode="off"), "relay": "native"}).start()
    async with running(enforcer, backend):
        fds_before = len(os.listdir("/proc/self/fd"))
        reader, writer = await asyncio.open_connection("127.0.0.1", enforcer.port())

        async def flood() -> None:
            with contextlib.suppress(ConnectionError):
                while True:
                    writer.write(random_bytes(1 * MiB))
                    await writer.drain()

        flooding = asyncio.ensure_future(flood())
        await wait_until(lambda: any(c.pump is not None and c.pump.buffered > 0
                                 for c in enforcer.plane.pumped))
        reset_now.set()
        rec = (await enforcer.wait_flows(1))[0]
        assert (rec["relay"], rec["close"]) == ("native", "upstream_reset")
        assert rec["bytes"]["from_client"] > 0
        with contextlib.suppress(ConnectionError):
            assert await asyncio.wait_for(reader.read(), 5) == b""
        flooding.cancel()
        with contextlib.suppress(asyncio.CancelledError, ConnectionError):
            await flooding
        writer.close()
        assert not enforcer.plane.pumped and not enforcer.plane.active
        await asyncio.sleep(0.2)
        assert len(os.listdir("/proc/self/fd")) <= fds_before


@pytest.mark.usefixtures("relay_mode")
async def test_tls13_key_updates_from_openssl_mid_relay(pki: Any) -> None:
    """openssl s_client's K command sends a KeyUpdate that asks for ours: both directions
    change keys mid-relay, and the bytes after it still arrive intact both ways."""
    from tests.conftest import require_tool

    openssl = require_tool("openssl")
    backend = await Backend(mode="echo").start()
    enforcer = await Enforcer(inbound_cfg(pki, backend.port)).start()
    async with running(enforcer, backend):
        proc = await asyncio.create_subprocess_exec(
            openssl, "s_client", "-connect", f"127.0.0.1:{enforcer.port()}", "-servername",
            "localhost", "-tls1_3", "-brief", "-msg", "-cert", str(pki.client.cert), "-key",
            str(pki.client.key), "-CAfile", str(pki.ca), stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
        assert proc.stdin is not None and proc.stdout is not None
        try:
            lines = [f"line {i} {random_bytes(24).hex()}\n".encode() for i in range(3)]
            trace: list[bytes] = []  # s_client's -msg lines: the TLS messages either way

            async def echoed(line: bytes) -> None:
                proc.stdin.write(line)  # type: ignore[union-attr]
                while (got := await asyncio.wait_for(proc.stdout.readline(), 10)) != line:  # type: ignore[union-attr]
                    assert got, "s_client ended before the echo came back"
                    trace.append(got)

            async def key_update() -> None:
                # s_client reads a whole stdin chunk as one command: wait until it has sent
                # the KeyUpdate before typing the next line
                proc.stdin.write(b"K\n")  # type: ignore[union-attr]
                while (got := await asyncio.wait_for(proc.stderr.readline(), 10)) != b"KEYUPDATE\n":  # type: ignore[union-attr]
                    assert got, "s_client ended before its key update"

            await echoed(lines[0])
            await wait_until(lambda: any(c.relay == harness.RELAY for c in enforcer.plane.active))
            await key_update()  # update_requested: our side must update its keys too
            await echoed(lines[1])
            await key_update()
            await echoed(lines[2])
            # ours, in answer to each update_requested (its own says update_not_requested)
            received_updates = [t for t in trace if t.startswith(b"<<<") and b"KeyUpdate" in t]
            assert len(received_updates) == 2, b"".join(trace).decode(errors="replace")
            proc.stdin.close()
            await asyncio.wait_for(proc.wait(), 10)
        finally:
            if proc.returncode is None:
                proc.kill()
                await proc.wait()
        rec = (await enforcer.wait_flows(1))[0]
        assert rec["relay"] == harness.RELAY and rec["action"] == "allow"
        sent = b"".join(lines)
        assert rec["bytes"] == {"from_client": len(sent), "to_client": len(sent)}
        await asyncio.wait_for(backend.done.wait(), 5)
        assert sha(backend.received[0]) == sha(sent)


async def test_pumps_share_one_epoll_set_closed_at_drain(pki: Any) -> None:
    """Pumped sockets (and the listening socket) live in one epoll set per data plane
    (the loop watches its fd only); drain closes it after the last connection."""
    backend = await Backend(mode="echo").start()
    enforcer = await Enforcer({**inbound_cfg(pki, backend.port, default="allow", rules=[],
                                             mode="off"), "relay": "native"}).start()
    poller = enforcer.plane.poller
    assert poller is not None
    epfd = poller.fileno()
    assert os.readlink(f"/proc/self/fd/{epfd}") == "anon_inode:[eventpoll]"
    assert _watched(epfd) == 1  # the listening socket (acceptor.py)
    streams = []
    for _ in range(5):
        reader, writer = await asyncio.open_connection("127.0.0.1", enforcer.port())
        writer.write(b"ping")
        assert await asyncio.wait_for(reader.readexactly(4), 5) == b"ping"
        streams.append((reader, writer))
    assert len(enforcer.plane.pumped) == 5
    assert _watched(epfd) == 1 + 10  # both sockets of each connection
    for _, writer in streams:
        writer.close()
    await enforcer.wait_flows(5)
    assert _watched(epfd) == 1
    await enforcer.stop()
    await backend.close()
    assert enforcer.plane.poller is None and poller.fileno() == -1


def _watched(epfd: int) -> int:
    """How many descriptors an epoll set in this process watches (from /proc)."""
    with open(f"/proc/self/fdinfo/{epfd}") as info:
        return sum(line.startswith("tfd:") for line in info)
