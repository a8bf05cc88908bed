"""Accepting connections: every listener's connections start on a ``RawTransport``.

Why: a connection only needs a transport of its own until the hand-over to the relay
(PROXY header, TLS handshake, pending bytes; see ``rawtransport.py`` for the rule). A
uvloop transport for it would be created, registered, given its protocol through
``call_soon``, then duplicated (``dup``) for the pump, deregistered and closed. Here the
connection's socket gets a ``RawTransport`` from the start: in the pumps' own epoll set on
a plane that uses the native pump (which later takes the descriptor itself), in the loop
(``loopwatch.py``) on a plane that does not, so that every connection goes through the
same code before the relay whichever relay carries it.

How it works: the listener is still created by ``loop.create_server(...,
start_serving=False)``, so binding (every address of a wildcard host, IPv6-only sockets,
unix paths, the sockets a supervisor hands to its workers) and closing behave as the
loop's. ``Acceptor`` then calls ``listen()`` on each of its sockets and watches them with
the plane's poller (``_pump.Poller``, or ``loopwatch.LoopPoller`` where no native code
runs); a ready listener is drained with ``_pump.accept`` (``accept4`` with
``SOCK_NONBLOCK | SOCK_CLOEXEC``, the peer address included) or, without the native
poller, with ``socket.accept`` (then made non-blocking), at most ``ACCEPT_BATCH``
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
from enforcer.dataplane.loopwatch import LoopPoller
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
    """The listening side of a listener; stands in for its ``asyncio.Server``."""

    def __init__(self, server: asyncio.Server, listener: ListenerRuntime,
                 poller: Any, make_connection: Any) -> None:
        self._server = server
        self._listener = listener
        self._poller = poller
        self._make_connection = make_connection  # ListenerRuntime -> Connection
        self._loop = asyncio.get_running_loop()
        # no native code without the native poller: socket.accept on these objects
        self._listening: dict[int, socket.socket] = {}
        self._accept = (self._accept_python if isinstance(poller, LoopPoller)
                        else native.accept_function())
        self._watches: list[Any] = []
        self._local: dict[int, Any] = {}  # listening fd -> its connections' local address
        self._retry: asyncio.TimerHandle | None = None
        self._closed = False
        try:
            for sock in server.sockets:
                fd, family = sock.fileno(), sock.family
                self._local[fd] = _fixed_local_address(sock)
                listening = socket.socket(family, socket.SOCK_STREAM, 0, fileno=fd)
                self._listening[fd] = listening  # detached by _let_go
                listening.listen(BACKLOG)
                watch = poller.watch(fd, functools.partial(self._ready, fd))
                self._watches.append(watch)
            self._watch_all(True)
        except OSError:
            for watch in self._watches:
                watch.close()
            self._let_go()
            raise
        if not isinstance(poller, LoopPoller):
            self._let_go()  # _pump.accept takes the descriptor only

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
        self._let_go()
        self._server.close()

    def _let_go(self) -> None:
        """The socket objects made here let go of the descriptors the server owns."""
        for listening in self._listening.values():
            listening.detach()
        self._listening.clear()

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

    def _accept_python(self, fd: int) -> tuple[int, int, Any] | None:
        """What ``_pump.accept`` returns, with ``socket.accept``: a non-blocking
        descriptor, its family and the peer address; None when no connection waits."""
        listening = self._listening[fd]
        try:
            conn, peer = listening.accept()
        except (BlockingIOError, InterruptedError):
            return None
        try:
            conn.setblocking(False)
        except OSError:
            conn.close()
            raise
        return conn.detach(), listening.family, peer

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
