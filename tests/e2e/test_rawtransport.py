"""Bare-socket upstream connections (enforcer/dataplane/rawtransport.py) on real loopback
sockets and the native poller: connect outcomes, the transport's callback contract
(flow control, half-close, close, abort, resets) and the hand-over of the descriptor."""

from __future__ import annotations

import asyncio
import errno
import hashlib
import socket
import struct
from collections.abc import AsyncIterator
from typing import Any

import pytest

from enforcer.config.model import Address
from enforcer.dataplane import native, rawtransport
from enforcer.dataplane.rawtransport import RawTransport, target_of
from tests.e2e.harness import blackhole_listener, random_bytes

pytestmark = pytest.mark.skipif(not native.available(), reason="needs the native extension")


class Recorder(asyncio.Protocol):
    """Records every callback; ``lost`` resolves on connection_lost."""

    def __init__(self) -> None:
        self.events: list[str] = []
        self.data = bytearray()
        self.transport: Any = None
        self.lost: asyncio.Future[Exception | None] = (
            asyncio.get_running_loop().create_future())
        self.eof = asyncio.Event()

    def connection_made(self, transport: Any) -> None:
        self.transport = transport
        self.events.append("made")

    def data_received(self, data: bytes) -> None:
        self.data += data

    def eof_received(self) -> bool:
        self.events.append("eof")
        self.eof.set()
        return True

    def pause_writing(self) -> None:
        self.events.append("pause")

    def resume_writing(self) -> None:
        self.events.append("resume")

    def connection_lost(self, exc: Exception | None) -> None:
        self.events.append("lost")
        self.lost.set_result(exc)


@pytest.fixture
async def poller() -> AsyncIterator[Any]:
    loop = asyncio.get_running_loop()
    p = native.new_poller(loop)
    yield p
    native.close_poller(loop, p)


async def connected(poller: Any, port: int) -> RawTransport:
    loop = asyncio.get_running_loop()
    done: asyncio.Future[tuple[RawTransport | None, OSError | None]] = loop.create_future()
    target = target_of(Address(host="127.0.0.1", port=port))
    assert target is not None
    rawtransport.connect(loop, poller, target, lambda t, e: done.set_result((t, e)))
    transport, exc = await asyncio.wait_for(done, 10)
    assert exc is None and transport is not None
    return transport


async def opened(poller: Any, server: Server) -> tuple[
        RawTransport, Recorder, asyncio.StreamReader, asyncio.StreamWriter]:
    """A started, reading transport to ``server`` and the server's end of it."""
    transport = await connected(poller, server.port)
    proto = Recorder()
    transport.start(proto)
    transport.start_reading()
    reader, writer = await server.accepted.get()
    return transport, proto, reader, writer


class Server:
    """A plain asyncio server keeping its accepted streams."""

    def __init__(self) -> None:
        self.accepted: asyncio.Queue[tuple[asyncio.StreamReader, asyncio.StreamWriter]] = (
            asyncio.Queue())

    async def start(self) -> int:
        async def on_client(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
            await self.accepted.put((r, w))
        self.server = await asyncio.start_server(on_client, "127.0.0.1", 0)
        self.port = int(self.server.sockets[0].getsockname()[1])
        return self.port

    async def close(self) -> None:
        self.server.close()
        await self.server.wait_closed()


def test_targets_need_no_name_resolution() -> None:
    assert target_of(Address(host="10.0.0.7", port=80)) == (socket.AF_INET, ("10.0.0.7", 80))
    assert target_of(Address(host="::1", port=443)) == (socket.AF_INET6, ("::1", 443, 0, 0))
    assert target_of(Address(path="/run/app.sock")) == (socket.AF_UNIX, "/run/app.sock")
    assert target_of(Address(host="app.default.svc", port=80)) is None
    assert target_of(Address(host="10.0.0.256", port=80)) is None  # a name to the resolver
    assert target_of(Address(host="2001:db8::7", port=443)) == (
        socket.AF_INET6, ("2001:db8::7", 443, 0, 0))


async def test_bytes_both_ways_with_flow_control_and_half_close(poller: Any) -> None:
    server = Server()
    await server.start()
    transport, proto, reader, writer = await opened(poller, server)
    transport.set_write_buffer_limits(64 * 1024, 16 * 1024)
    up, down = random_bytes(8 * 1024 * 1024), random_bytes(3 * 1024 * 1024 + 7)
    transport.write(up)  # far more than the socket buffers: most of it is queued
    assert transport.get_write_buffer_size() > 64 * 1024 and proto.events[-1] == "pause"
    transport.write_eof()
    writer.write(down)
    writer.write_eof()
    got = await asyncio.wait_for(reader.read(), 30)  # until our FIN, after every byte
    await asyncio.wait_for(proto.eof.wait(), 30)
    assert hashlib.sha256(got).digest() == hashlib.sha256(up).digest()
    assert hashlib.sha256(proto.data).digest() == hashlib.sha256(down).digest()
    assert transport.get_write_buffer_size() == 0
    assert proto.events == ["made", "pause", "resume", "eof"]
    transport.close()
    assert await asyncio.wait_for(proto.lost, 5) is None
    assert proto.events[-1] == "lost" and proto.events.count("lost") == 1
    assert transport.is_closing()
    writer.close()
    await server.close()


async def test_connect_refused_is_reported_and_nothing_leaks(poller: Any) -> None:
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    sock.close()  # nothing listens there
    loop = asyncio.get_running_loop()
    done: asyncio.Future[tuple[Any, OSError | None]] = loop.create_future()
    target = target_of(Address(host="127.0.0.1", port=port))
    assert target is not None
    rawtransport.connect(loop, poller, target, lambda t, e: done.set_result((t, e)))
    transport, exc = await asyncio.wait_for(done, 10)
    assert transport is None and exc is not None and exc.errno == errno.ECONNREFUSED
    assert _watched(poller.fileno()) == 0


async def test_a_cancelled_connect_never_reports(poller: Any) -> None:
    blackhole, port, fillers = blackhole_listener()
    await asyncio.sleep(0.1)
    calls: list[Any] = []
    target = target_of(Address(host="127.0.0.1", port=port))
    assert target is not None
    pending = rawtransport.connect(asyncio.get_running_loop(), poller, target,
                                   lambda t, e: calls.append((t, e)))
    assert pending is not None and _watched(poller.fileno()) == 1
    pending.cancel()
    assert _watched(poller.fileno()) == 0
    await asyncio.sleep(0.2)
    assert calls == []
    for s in [*fillers, blackhole]:
        s.close()


async def test_a_reset_is_reported_once(poller: Any) -> None:
    server = Server()
    await server.start()
    transport, proto, _reader, writer = await opened(poller, server)
    sock = writer.get_extra_info("socket")
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    writer.transport.abort()  # RST
    exc = await asyncio.wait_for(proto.lost, 5)
    assert isinstance(exc, ConnectionResetError)
    assert proto.events == ["made", "lost"]
    transport.write(b"after the end")  # ignored, no second callback
    transport.close()
    await asyncio.sleep(0.05)
    assert proto.events == ["made", "lost"]
    await server.close()


async def test_close_sends_what_is_buffered_first_and_abort_does_not(poller: Any) -> None:
    server = Server()
    await server.start()
    payload = random_bytes(4 * 1024 * 1024)
    for how in ("close", "abort"):
        transport, proto, reader, writer = await opened(poller, server)
        transport.write(payload)
        assert transport.get_write_buffer_size() > 0
        getattr(transport, how)()
        try:
            got = await asyncio.wait_for(reader.read(), 30)
        except ConnectionResetError:
            got = b""
        assert await asyncio.wait_for(proto.lost, 5) is None
        if how == "close":
            assert hashlib.sha256(got).digest() == hashlib.sha256(payload).digest()
        else:
            assert len(got) < len(payload)
        writer.close()
    assert _watched(poller.fileno()) == 0
    await server.close()


async def test_release_hands_over_the_descriptor_without_callbacks(poller: Any) -> None:
    server = Server()
    await server.start()
    transport, proto, reader, writer = await opened(poller, server)
    assert _watched(poller.fileno()) == 1
    fd = transport.release()
    assert _watched(poller.fileno()) == 0
    writer.write(b"for the new owner")
    await writer.drain()
    await asyncio.sleep(0.1)
    assert proto.data == b"" and proto.events == ["made"]
    with socket.socket(fileno=fd) as sock:  # the descriptor is open and still connected
        assert sock.recv(100) == b"for the new owner"
        sock.sendall(b"from the new owner")
    assert await asyncio.wait_for(reader.read(), 5) == b"from the new owner"
    with pytest.raises(RuntimeError):
        transport.release()
    writer.close()
    await server.close()


def _watched(epfd: int) -> int:
    """How many descriptors the epoll set holds (from /proc)."""
    with open(f"/proc/self/fdinfo/{epfd}") as f:
        return sum(1 for line in f if line.startswith("tfd:"))


async def test_the_pump_takes_over_a_watched_socket_and_relays(poller: Any) -> None:
    """Pump(..., client_watch=) takes the socket's epoll entry over (one MOD instead of the
    watch's DEL and its own ADD): the watch calls nothing any more, the epoll set keeps one
    entry per socket, and the pump relays both ways."""
    ext = native.module()
    a_near, a_far = socket.socketpair()
    b_near, b_far = socket.socketpair()
    for s in (a_near, b_near, a_far, b_far):
        s.setblocking(False)
    calls: list[tuple[bool, bool]] = []
    watch = poller.watch(a_near.fileno(), lambda r, w: calls.append((r, w)))
    watch.set(True, False)
    other = poller.watch(b_near.fileno(), lambda r, w: None)
    with pytest.raises(TypeError):  # a watch of another socket
        ext.Pump(a_near.fileno(), None, b_near.fileno(), None, poller, lambda *a: None, other)
    other.close()
    events: list[str] = []
    pump = ext.Pump(a_near.detach(), None, b_near.detach(), None, poller,
                    lambda kind, side, detail: events.append(kind), watch, None)
    pump.start()
    assert _watched(poller.fileno()) == 2
    up, down = random_bytes(300_000), random_bytes(200_000)
    got_b, got_a = bytearray(), bytearray()
    loop = asyncio.get_running_loop()
    await asyncio.gather(loop.sock_sendall(a_far, up), loop.sock_sendall(b_far, down))
    while len(got_b) < len(up) or len(got_a) < len(down):
        if len(got_b) < len(up):
            got_b += await asyncio.wait_for(loop.sock_recv(b_far, 65536), 5)
        if len(got_a) < len(down):
            got_a += await asyncio.wait_for(loop.sock_recv(a_far, 65536), 5)
    assert hashlib.sha256(got_b).digest() == hashlib.sha256(up).digest()
    assert hashlib.sha256(got_a).digest() == hashlib.sha256(down).digest()
    assert calls == []  # every event went to the pump
    pump.close()
    assert _watched(poller.fileno()) == 0
    a_far.close()
    b_far.close()


async def test_a_unix_listener_with_a_full_backlog_is_a_failed_connect(
        poller: Any, tmp_path: Any) -> None:
    """A unix socket's connect does not stay in progress: EAGAIN (backlog full) fails at
    once, with the error, instead of waiting for a writability that means nothing."""
    path = str(tmp_path / "app.sock")
    listener = socket.socket(socket.AF_UNIX)
    listener.bind(path)
    listener.listen(0)
    fillers = []
    while True:  # fill the backlog
        s = socket.socket(socket.AF_UNIX)
        s.setblocking(False)
        try:
            s.connect(path)
        except BlockingIOError:
            s.close()
            break
        fillers.append(s)
    results: list[tuple[Any, OSError | None]] = []
    target = target_of(Address(path=path))
    assert target is not None
    pending = rawtransport.connect(asyncio.get_running_loop(), poller, target,
                                   lambda t, e: results.append((t, e)))
    assert pending is None
    ((transport, exc),) = results
    assert transport is None and exc is not None and exc.errno == errno.EAGAIN
    assert _watched(poller.fileno()) == 0
    for s in [*fillers, listener]:
        s.close()


async def test_a_connect_that_completes_at_once_skips_the_writability_wait(
        poller: Any) -> None:
    """On loopback, connect() completes inside the call (EINPROGRESS notwithstanding): no
    epoll entry is made for writability, done() comes on the next loop turn (never from
    inside connect()), and the transport then carries bytes both ways."""
    server = Server()
    await server.start()
    loop = asyncio.get_running_loop()
    results: list[tuple[Any, OSError | None]] = []
    target = target_of(Address(host="127.0.0.1", port=server.port))
    assert target is not None
    pending = rawtransport.connect(loop, poller, target, lambda t, e: results.append((t, e)))
    assert pending is not None and results == [] and _watched(poller.fileno()) == 0
    await asyncio.sleep(0)
    ((transport, exc),) = results
    assert exc is None and transport is not None
    proto = Recorder()
    transport.start(proto)
    transport.start_reading()
    assert _watched(poller.fileno()) == 1  # now for reading
    reader, writer = await server.accepted.get()
    up, down = random_bytes(600_000), random_bytes(400_000)
    transport.write(up)
    transport.write_eof()
    writer.write(down)
    writer.write_eof()
    got = await asyncio.wait_for(reader.read(), 30)
    await asyncio.wait_for(proto.eof.wait(), 30)
    assert hashlib.sha256(got).digest() == hashlib.sha256(up).digest()
    assert hashlib.sha256(proto.data).digest() == hashlib.sha256(down).digest()
    transport.close()
    assert await asyncio.wait_for(proto.lost, 5) is None
    writer.close()
    await server.close()


async def test_a_connect_cancelled_before_its_loop_turn_never_reports(poller: Any) -> None:
    server = Server()
    await server.start()
    calls: list[Any] = []
    target = target_of(Address(host="127.0.0.1", port=server.port))
    assert target is not None
    pending = rawtransport.connect(asyncio.get_running_loop(), poller, target,
                                   lambda t, e: calls.append((t, e)))
    assert pending is not None
    pending.cancel()  # the client left before the connect's loop turn
    reader, writer = await asyncio.wait_for(server.accepted.get(), 5)
    assert await asyncio.wait_for(reader.read(), 5) == b""  # our socket was closed
    assert calls == [] and _watched(poller.fileno()) == 0
    writer.close()
    await server.close()


async def test_read_now_takes_bytes_that_arrived_with_the_connection(poller: Any) -> None:
    """``read_now`` (called by the acceptor) delivers what is already there at once, and is
    a no-op on a socket with nothing to read; later bytes still come through the poller."""
    near, far = socket.socketpair()
    near.setblocking(False)
    far.sendall(b"first bytes")
    watch = poller.watch(near.fileno(), lambda r, w: None)
    transport = RawTransport(asyncio.get_running_loop(), near, watch)
    proto = Recorder()
    transport.start(proto)
    transport.start_reading()
    transport.read_now()
    assert bytes(proto.data) == b"first bytes"  # delivered synchronously
    transport.read_now()  # nothing more: no callback, no error
    assert bytes(proto.data) == b"first bytes" and proto.events == ["made"]
    payload = random_bytes(300_000)
    far.setblocking(False)
    await asyncio.get_running_loop().sock_sendall(far, payload)
    far.shutdown(socket.SHUT_WR)
    await asyncio.wait_for(proto.eof.wait(), 10)
    assert hashlib.sha256(bytes(proto.data)).digest() == hashlib.sha256(
        b"first bytes" + payload).digest()
    transport.close()
    assert await asyncio.wait_for(proto.lost, 5) is None
    far.close()
