"""The pre-relay transport where no native code runs (enforcer/dataplane/loopwatch.py):
``RawTransport``s watched by the event loop, accepted by the same ``Acceptor`` with
``socket.accept``, connected by ``rawtransport.connect`` and raced by the host-name
dialer. Real loopback sockets; descriptors are counted so that nothing leaks."""

from __future__ import annotations

import asyncio
import functools
import hashlib
import os
import socket
from collections.abc import AsyncIterator
from typing import Any

import pytest

from enforcer.config.model import Address
from enforcer.dataplane import dialer, rawtransport
from enforcer.dataplane.acceptor import Acceptor
from enforcer.dataplane.loopwatch import LoopPoller
from enforcer.dataplane.rawtransport import RawTransport, target_of
from tests.e2e.harness import blackhole_listener, random_bytes


def _open_fds() -> set[tuple[str, str]]:
    """This process's descriptors with what they point at. Checks compare them as sets
    (what is new since), not counts: a socket of an earlier test closing meanwhile would
    otherwise look like a descriptor gone missing."""
    fds = set()
    for fd in os.listdir("/proc/self/fd"):
        try:
            fds.add((fd, os.readlink(f"/proc/self/fd/{fd}")))
        except FileNotFoundError:  # the listing's own descriptor, closed since
            continue
    return fds


def _new_since(before: set[tuple[str, str]]) -> int:
    """How many descriptors are open now that were not open before."""
    return len(_open_fds() - before)


async def _warm_loop() -> None:
    """uvloop opens a descriptor of its own (/dev/null) the first time a stream connects:
    let it happen before descriptors are counted."""
    server = await asyncio.get_running_loop().create_server(asyncio.Protocol, "127.0.0.1", 0)
    _reader, writer = await asyncio.open_connection("127.0.0.1",
                                                    server.sockets[0].getsockname()[1])
    writer.close()
    await writer.wait_closed()
    server.close()
    await server.wait_closed()
    await asyncio.sleep(0.1)  # the server's end of it closes on the EOF


class Echo(asyncio.Protocol):
    """Writes back what it reads; ``lost`` resolves on connection_lost."""

    def __init__(self) -> None:
        self.transport: Any = None
        self.lost: asyncio.Future[Exception | None] = (
            asyncio.get_running_loop().create_future())

    def connection_made(self, transport: Any) -> None:
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        self.transport.write(data)

    def eof_received(self) -> bool:
        self.transport.write_eof()
        return True

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.lost.done():
            self.lost.set_result(exc)


class Sink(Echo):
    """Keeps what it reads."""

    def __init__(self) -> None:
        super().__init__()
        self.data = bytearray()

    def data_received(self, data: bytes) -> None:
        self.data += data


class Conn:
    """Stands in for enforcer's Connection: the acceptor only needs ``.client``."""

    made: list[Conn] = []

    def __init__(self, listener: Any) -> None:
        self.client = Echo()
        Conn.made.append(self)


class Listener:
    name = "test"


@pytest.fixture
async def listening() -> AsyncIterator[tuple[Acceptor, int]]:
    loop = asyncio.get_running_loop()
    server = await loop.create_server(asyncio.Protocol, "127.0.0.1", 0, start_serving=False)
    Conn.made = []
    acc = Acceptor(server, Listener(), LoopPoller(loop), Conn)  # type: ignore[arg-type]
    yield acc, int(acc.sockets[0].getsockname()[1])
    acc.close()
    await acc.wait_closed()


async def _exchange(port: int, payload: bytes) -> bytes:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(payload)
    writer.write_eof()
    got = await asyncio.wait_for(reader.read(), 10)
    writer.close()
    await writer.wait_closed()
    return got


async def test_accepted_connections_get_bare_transports_watched_by_the_loop(
        listening: tuple[Acceptor, int]) -> None:
    """The same Acceptor as on a pumped plane, with socket.accept: a non-blocking socket
    with TCP_NODELAY and the peer address; 2 MiB go through and back intact (the write
    buffer and the writer's interest in writability are exercised), half-close included."""
    _acc, port = listening
    payload = random_bytes(2 << 20)
    got = await _exchange(port, payload)
    assert hashlib.sha256(got).hexdigest() == hashlib.sha256(payload).hexdigest()
    (conn,) = Conn.made
    transport = conn.client.transport
    assert isinstance(transport, RawTransport)
    sock = transport.get_extra_info("socket")
    assert sock.getblocking() is False
    assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY) == 1
    assert transport.get_extra_info("sockname") == ("127.0.0.1", port)
    assert transport.get_extra_info("peername")[0] == "127.0.0.1"
    transport.close()
    assert await asyncio.wait_for(conn.client.lost, 5) is None


async def test_close_stops_accepting_and_leaves_no_descriptor() -> None:
    loop = asyncio.get_running_loop()
    await _warm_loop()
    before = _open_fds()
    server = await loop.create_server(asyncio.Protocol, "127.0.0.1", 0, start_serving=False)
    Conn.made = []
    acc = Acceptor(server, Listener(), LoopPoller(loop), Conn)  # type: ignore[arg-type]
    port = int(acc.sockets[0].getsockname()[1])
    payload = random_bytes(1000)
    assert await _exchange(port, payload) == payload
    Conn.made[0].client.transport.close()
    await Conn.made[0].client.lost
    acc.close()
    await acc.wait_closed()
    with pytest.raises(ConnectionRefusedError):
        await asyncio.open_connection("127.0.0.1", port)
    assert _new_since(before) == 0


async def _connect(poller: Any, target: rawtransport.Target
                   ) -> tuple[RawTransport | None, OSError | None]:
    loop = asyncio.get_running_loop()
    done: asyncio.Future[tuple[RawTransport | None, OSError | None]] = loop.create_future()
    rawtransport.connect(loop, poller, target, lambda t, e: done.set_result((t, e)))
    return await asyncio.wait_for(done, 5)


async def test_connect_outcomes_with_the_loop_watching(
        listening: tuple[Acceptor, int]) -> None:
    """Connected (and bytes both ways), refused, and cancelled while the peer is silent:
    the cancelled socket is closed at once."""
    _acc, port = listening
    poller = LoopPoller(asyncio.get_running_loop())
    target = target_of(Address(host="127.0.0.1", port=port))
    assert target is not None
    transport, exc = await _connect(poller, target)
    assert exc is None and transport is not None
    client = Sink()
    transport.start(client)
    transport.start_reading()
    payload = random_bytes(300_000)
    transport.write(payload)
    async with asyncio.timeout(10):
        while len(client.data) < len(payload):
            await asyncio.sleep(0.01)
    assert hashlib.sha256(client.data).digest() == hashlib.sha256(payload).digest()
    transport.close()
    await client.lost

    with socket.socket() as unused:
        unused.bind(("127.0.0.1", 0))
        refused = (socket.AF_INET, unused.getsockname())
        transport, exc = await _connect(poller, refused)
    assert transport is None and isinstance(exc, ConnectionRefusedError)

    blackhole, silent_port, fillers = blackhole_listener()
    try:
        before = _open_fds()
        results: list[Any] = []
        pending = rawtransport.connect(asyncio.get_running_loop(), poller,
                                       (socket.AF_INET, ("127.0.0.1", silent_port)),
                                       lambda t, e: results.append((t, e)))
        assert pending is not None and _new_since(before) == 1
        await asyncio.sleep(0.1)
        pending.cancel()
        assert _new_since(before) == 0
        await asyncio.sleep(0.05)
        assert results == []  # a cancelled connect never calls back
    finally:
        blackhole.close()
        for f in fillers:
            f.close()


async def test_the_dialer_races_bare_sockets_and_closes_the_losers(
        listening: tuple[Acceptor, int]) -> None:
    """dialer.dial's race with each attempt a RawTransport: the live address wins, the
    refusing one is reported, the silent one is reported once the live one answered, and
    no socket of the race is left open; a race cancelled midway closes its attempts."""
    _acc, port = listening
    loop = asyncio.get_running_loop()
    poller = LoopPoller(loop)
    blackhole, silent_port, fillers = blackhole_listener()
    with socket.socket() as unused:
        unused.bind(("127.0.0.1", 0))
        refusing = (socket.AF_INET, unused.getsockname())
    silent = (socket.AF_INET, ("127.0.0.1", silent_port))
    good = (socket.AF_INET, ("127.0.0.1", port))
    attempt = functools.partial(dialer._attempt, loop, poller, ())
    try:
        before = _open_fds()
        errors: list[tuple[Any, int | None]] = []
        transport = await dialer._race(loop, [silent, refusing, good], dialer.AddressBook(),
                                       lambda a, e, fresh: errors.append((a, e.errno)),
                                       attempt)
        assert isinstance(transport, RawTransport)
        assert transport.get_extra_info("peername") == good[1]
        assert sorted(errors) == sorted([(silent, 110), (refusing, 111)])
        transport.abort()
        (accepted,) = Conn.made
        accepted.client.transport.close()
        await accepted.client.lost
        await asyncio.sleep(0.05)  # the cancelled silent attempt closes its socket
        assert _new_since(before) == 0

        race = asyncio.ensure_future(dialer._race(loop, [silent, silent], dialer.AddressBook(),
                                                  lambda a, e, fresh: None, attempt))
        await asyncio.sleep(0.4)  # both attempts started (ATTEMPT_DELAY is 0.25 s)
        assert _new_since(before) == 2
        race.cancel()
        with pytest.raises(asyncio.CancelledError):
            await race
        await asyncio.sleep(0.05)
        assert _new_since(before) == 0
    finally:
        blackhole.close()
        for f in fillers:
            f.close()
