"""Listeners of natively relayed connections accept into bare sockets
(enforcer/dataplane/acceptor.py): connections get a RawTransport with the peer address
from accept(), running out of descriptors pauses accepting instead of spinning, and
closing stops accepting. Real sockets, the real poller, a real descriptor limit."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import resource
import socket
from collections.abc import AsyncIterator, Iterator
from typing import Any

import pytest

from enforcer.dataplane import acceptor, native
from enforcer.dataplane.acceptor import Acceptor, _fixed_local_address
from enforcer.dataplane.rawtransport import RawTransport

pytestmark = pytest.mark.skipif(not native.available(), reason="needs the native extension")


class Accepted(asyncio.Protocol):
    def __init__(self) -> None:
        self.transport: Any = None
        self.data = bytearray()

    def connection_made(self, transport: Any) -> None:
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        self.data += data
        self.transport.write(data.upper())


class Conn:
    """Stands in for enforcer's Connection: the acceptor only needs ``.client``."""

    made: list[Conn] = []

    def __init__(self, listener: Any) -> None:
        self.client = Accepted()
        Conn.made.append(self)


class Listener:
    name = "test"


@pytest.fixture
async def listening() -> AsyncIterator[tuple[Acceptor, Any, int]]:
    loop = asyncio.get_running_loop()
    poller = native.new_poller(loop)
    server = await loop.create_server(asyncio.Protocol, "127.0.0.1", 0, start_serving=False)
    Conn.made = []
    acc = Acceptor(server, Listener(), poller, Conn)  # type: ignore[arg-type]
    yield acc, poller, int(acc.sockets[0].getsockname()[1])
    acc.close()
    await acc.wait_closed()
    native.close_poller(loop, poller)


async def test_connections_get_bare_transports_with_the_peer_address(
        listening: tuple[Acceptor, Any, int]) -> None:
    _acc, poller, port = listening
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(b"hello")
    assert await asyncio.wait_for(reader.readexactly(5), 5) == b"HELLO"
    (conn,) = Conn.made
    transport = conn.client.transport
    assert isinstance(transport, RawTransport)
    assert transport.get_extra_info("peername") == writer.get_extra_info("sockname")
    assert transport.get_extra_info("sockname") == ("127.0.0.1", port)
    sock = transport.get_extra_info("socket")
    assert sock.getblocking() is False
    assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY) == 1
    assert _watched(poller.fileno()) == 2  # the listener and the connection
    transport.close()
    writer.close()


def test_the_local_address_is_known_only_for_a_listener_on_one_address() -> None:
    """Connections to a wildcard listener ask the kernel for their local address (it
    depends on the interface); a listener on one address gives it without a syscall.
    (Bound without listen(): nothing is reachable from outside.)"""
    with socket.socket() as one, socket.socket() as wildcard, \
            socket.socket(socket.AF_UNIX) as unix:
        one.bind(("127.0.0.1", 0))
        wildcard.bind(("0.0.0.0", 0))
        assert _fixed_local_address(one) == one.getsockname()
        assert _fixed_local_address(wildcard) is None
        assert _fixed_local_address(unix) is None


async def test_running_out_of_descriptors_pauses_accepting_then_recovers(
        listening: tuple[Acceptor, Any, int], monkeypatch: pytest.MonkeyPatch,
        caplog: pytest.LogCaptureFixture) -> None:
    _acc, poller, port = listening
    monkeypatch.setattr(acceptor, "ACCEPT_RETRY", 0.3)
    client = socket.socket()
    client.setblocking(False)
    with caplog.at_level(logging.WARNING, logger="enforcer.dataplane"), fd_limit_reached():
        with contextlib.suppress(BlockingIOError):
            client.connect(("127.0.0.1", port))  # completes in the kernel's accept queue
        await asyncio.sleep(0.1)  # the acceptor tried, got EMFILE and paused
    assert Conn.made == []
    assert _watched(poller.fileno()) == 0  # paused, not spinning on a ready listener
    assert "cannot accept connections (Too many open files)" in caplog.text
    await asyncio.sleep(0.5)  # the retry: the waiting connection is accepted now
    assert len(Conn.made) == 1 and _watched(poller.fileno()) == 2
    client.close()
    Conn.made[0].client.transport.close()


async def test_an_accept_error_that_is_not_about_one_connection_pauses(
        listening: tuple[Acceptor, Any, int], caplog: pytest.LogCaptureFixture) -> None:
    """A listening socket shut down under the acceptor is always ready and accept() fails
    with EINVAL: the listener pauses instead of spinning."""
    acc, poller, _port = listening
    fd = acc.sockets[0].fileno()
    with caplog.at_level(logging.WARNING, logger="enforcer.dataplane"):
        listening_sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM, 0, fileno=fd)
        try:
            listening_sock.shutdown(socket.SHUT_RDWR)
        finally:
            listening_sock.detach()
        await asyncio.sleep(0.1)
    assert _watched(poller.fileno()) == 0
    assert "cannot accept connections (Invalid argument)" in caplog.text
    assert Conn.made == []


async def test_close_stops_accepting(listening: tuple[Acceptor, Any, int]) -> None:
    acc, poller, port = listening
    acc.close()
    await acc.wait_closed()
    assert _watched(poller.fileno()) == 0
    with pytest.raises(ConnectionRefusedError):
        await asyncio.open_connection("127.0.0.1", port)


@contextlib.contextmanager
def fd_limit_reached() -> Iterator[None]:
    """The soft descriptor limit at the lowest free descriptor: the next one fails."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    probe = os.dup(0)
    os.close(probe)
    # one spare for the connecting client socket already open; nothing else is opened
    resource.setrlimit(resource.RLIMIT_NOFILE, (probe, hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


def _watched(epfd: int) -> int:
    with open(f"/proc/self/fdinfo/{epfd}") as f:
        return sum(1 for line in f if line.startswith("tfd:"))
