"""Accepting connections on listeners whose connections the native pump relays.

Why: an accepted connection that the pump will relay only needs a transport until the
hand-over (PROXY header, TLS handshake, pending bytes). A uvloop transport for it is
created, registered, given its protocol through ``call_soon``, then duplicated (``dup``)
for the pump, deregistered and closed. Here the connection's socket gets a
``RawTransport`` (``rawtransport.py``) in the pumps' own epoll set from the start, and
the pump later takes the descriptor itself.

How it works: the listener is still created by ``loop.create_server(...,
start_serving=False)``, so binding (every address of a wildcard host, IPv6-only sockets,
unix paths, the sockets a supervisor hands to its workers) and closing behave as before.
``Acceptor`` then calls ``listen()`` on each of its sockets and watches them in the
poller; a ready listener is drained with ``_pump.accept`` (``accept4`` with
``SOCK_NONBLOCK | SOCK_CLOEXEC``, the peer address included), at most ``ACCEPT_BATCH``
connections per wake-up so that one busy listener cannot starve the rest. When the
process runs out of descriptors or memory (EMFILE, ENFILE, ENOBUFS, ENOMEM), or accept
fails in a way that says nothing about one connection, accepting pauses for
``ACCEPT_RETRY`` seconds instead of spinning on a listener that stays ready, and that is
logged once per pause; errors about one connection (reset before it was accepted, refused
by a firewall) skip that connection.
"""

from __future__ import annotations

import asyncio
import errno
import functools
import logging
import socket
from typing import TYPE_CHECKING, Any, Final

from enforcer.dataplane import native
from enforcer.dataplane.rawtransport import RawTransport

if TYPE_CHECKING:
    from enforcer.dataplane.context import ListenerRuntime

log = logging.getLogger("enforcer.dataplane")

ACCEPT_BATCH: Final = 64
ACCEPT_RETRY: Final = 1.0
BACKLOG: Final = 1024
# accept(2): errors about the one connection being accepted; the next one may be fine.
# Anything else (EMFILE, ENFILE, ENOBUFS, ENOMEM, or an error nobody expects) pauses.
CONNECTION_ERRORS: Final = frozenset({
    errno.ECONNABORTED, errno.EPROTO, errno.EPERM, errno.ENETDOWN, errno.ENOPROTOOPT,
    errno.EHOSTDOWN, errno.ENONET, errno.EHOSTUNREACH, errno.EOPNOTSUPP, errno.ENETUNREACH})


def _unset(readable: bool, writable: bool) -> None:
    """A new connection's watch callback until its transport takes over."""


class Acceptor:
    """The listening side of a pumped listener; stands in for its ``asyncio.Server``."""

    def __init__(self, server: asyncio.Server, listener: ListenerRuntime,
                 poller: Any, make_connection: Any) -> None:
        self._server = server
        self._listener = listener
        self._poller = poller
        self._make_connection = make_connection  # ListenerRuntime -> Connection
        self._loop = asyncio.get_running_loop()
        self._accept = native.accept_function()
        self._watches: list[Any] = []
        self._local: dict[int, Any] = {}  # listening fd -> its connections' local address
        self._retry: asyncio.TimerHandle | None = None
        self._closed = False
        try:
            for sock in server.sockets:
                fd, family = sock.fileno(), sock.family
                self._local[fd] = _fixed_local_address(sock)
                listening = socket.socket(family, socket.SOCK_STREAM, 0, fileno=fd)
                try:
                    listening.listen(BACKLOG)
                finally:
                    listening.detach()  # the server still owns the descriptor
                watch = poller.watch(fd, functools.partial(self._ready, fd))
                self._watches.append(watch)
            self._watch_all(True)
        except OSError:
            for watch in self._watches:
                watch.close()
            raise

    # -- the asyncio.Server surface the plane uses -------------------------------------------
    @property
    def sockets(self) -> tuple[Any, ...]:
        return tuple(self._server.sockets)

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        if self._retry is not None:
            self._retry.cancel()
            self._retry = None
        for watch in self._watches:
            watch.close()  # before the server closes the descriptors
        self._server.close()

    async def wait_closed(self) -> None:
        await self._server.wait_closed()

    # -- accepting ---------------------------------------------------------------------------
    def _watch_all(self, on: bool) -> None:
        for watch in self._watches:
            watch.set(on, False)

    def _ready(self, fd: int, readable: bool, writable: bool) -> None:
        accept = self._accept
        for _ in range(ACCEPT_BATCH):
            try:
                got = accept(fd)
            except OSError as exc:
                if exc.errno in CONNECTION_ERRORS:
                    continue  # that connection is gone (reset, refused by a firewall)
                self._pause(exc)
                return
            if got is None:
                return
            conn_fd, family, peer = got
            try:
                self._open(conn_fd, family, peer, self._local[fd])
            except Exception:  # a bug: this connection fails, the listener goes on
                log.exception("listener %s: accepting a connection failed", self._listener.name)

    def _open(self, fd: int, family: int, peer: Any, local: Any) -> None:
        # SOCK_NONBLOCK in the type: non-blocking in Python's view too, with no syscall
        sock = socket.socket(family, socket.SOCK_STREAM | socket.SOCK_NONBLOCK, 0, fileno=fd)
        try:
            if family != socket.AF_UNIX:
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            watch = self._poller.watch(fd, _unset)
        except OSError:
            sock.close()
            return
        transport = RawTransport(self._loop, sock, watch, peername=peer, sockname=local)
        conn = self._make_connection(self._listener)
        transport.start(conn.client)
        transport.start_reading()
        transport.read_now()

    def _pause(self, exc: OSError) -> None:
        if self._retry is not None:  # another of its sockets paused it in the same round
            return
        log.warning("listener %s: cannot accept connections (%s); retrying in %.0f s",
                    self._listener.name, exc.strerror or exc, ACCEPT_RETRY)
        self._watch_all(False)
        self._retry = self._loop.call_later(ACCEPT_RETRY, self._resume)

    def _resume(self) -> None:
        self._retry = None
        if not self._closed:
            self._watch_all(True)


def _fixed_local_address(sock: Any) -> Any:
    """The local address of every connection a listener accepts, when it is the same for
    all (a listener bound to one IP address); None for a wildcard address, where it depends
    on the interface a connection came in on (then getsockname() tells, per connection)."""
    if sock.family not in (socket.AF_INET, socket.AF_INET6):
        return None
    local = sock.getsockname()
    return None if local[0] in ("0.0.0.0", "::") else local
