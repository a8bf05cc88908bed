"""Connecting to an upstream named by a host name: resolve it, then race its addresses.

Why: a name may resolve to several addresses, some of them dead. Trying them one after
the other (as ``loop.create_connection`` does) spends the whole connect timeout on a
first address that silently drops packets, and a name that stops resolving surfaced as an
anonymous "error". Here:

- Resolution is done per connection (``loop.getaddrinfo``: the system resolver, so
  /etc/hosts, DNS and its TTLs apply as for any other program). A failure raises
  ``ResolveError`` (an OSError) naming the host and the resolver's message, which the
  connection reports as ``upstream_resolve_failed``.
- The addresses are tried in the resolver's order, staggered as RFC 8305 ("Happy
  Eyeballs") does: the next attempt starts when the previous one fails or after
  ``ATTEMPT_DELAY`` without an answer, earlier attempts keep going, and the first socket
  to connect wins (the others are cancelled and closed). The connection's
  ``connect_timeout`` bounds the whole race. Each attempt is a bare socket connected by
  ``rawtransport.connect`` (the one transport of every connection before the relay),
  with the upstream's dead-peer detection options unless the address is this host's
  (tcpopts.py); the winner is its ``RawTransport``, not started yet.
- ``AddressBook`` remembers, per upstream, which addresses failed in the last ``DEAD_FOR``
  seconds and tries them last, so that after one failure the next connections go to a
  live address first instead of paying the delay again. A failed attempt is reported to
  ``on_error`` (counted; logged the first time an address fails after it last worked)
  even when another address then succeeds.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import functools
import socket
import time
from collections.abc import Callable, Coroutine
from typing import Any, Final

from enforcer.dataplane import rawtransport, tcpopts
from enforcer.dataplane.rawtransport import RawTransport
from enforcer.dataplane.tasks import spawn

ATTEMPT_DELAY: Final = 0.25  # RFC 8305's recommended Connection Attempt Delay
DEAD_FOR: Final = 30.0  # seconds an address that failed is tried last

Addr = tuple[int, Any]  # (family, sockaddr)
OnError = Callable[[Addr, OSError, bool], None]  # (address, error, newly marked dead)
SockOpts = tuple[tuple[int, int, int], ...]


class ResolveError(OSError):
    """The upstream's host name did not resolve."""


class AddressBook:
    """Which addresses of one upstream failed recently (see the module comment)."""

    __slots__ = ("_dead", "_reported")

    def __init__(self) -> None:
        self._dead: dict[Any, float] = {}  # sockaddr -> until (monotonic)
        self._reported: set[Any] = set()  # failing since it last worked (logged once)

    def order(self, addrs: list[Addr], now: float) -> list[Addr]:
        """Live addresses first (resolver order), then those that failed recently."""
        for key in [k for k, until in self._dead.items() if until <= now]:
            del self._dead[key]
        return sorted(addrs, key=lambda a: a[1] in self._dead)

    def failed(self, addr: Addr, now: float) -> bool:
        """Remember a failure; True for the first one since the address last worked (an
        address that never works, such as a ``localhost`` upstream's ::1 when the app
        listens on 127.0.0.1 only, is then logged once, not every ``DEAD_FOR``)."""
        self._dead[addr[1]] = now + DEAD_FOR
        if addr[1] in self._reported:
            return False
        self._reported.add(addr[1])
        return True

    def succeeded(self, addr: Addr) -> None:
        self._dead.pop(addr[1], None)
        self._reported.discard(addr[1])


async def resolve(loop: asyncio.AbstractEventLoop, host: str, port: int) -> list[Addr]:
    try:
        infos = await loop.getaddrinfo(host, port, type=socket.SOCK_STREAM,
                                       proto=socket.IPPROTO_TCP)
    except socket.gaierror as exc:
        raise ResolveError(exc.errno, f"cannot resolve {host}: {exc.strerror}") from None
    out: list[Addr] = []
    for family, _type, _proto, _name, sockaddr in infos:
        if (family, sockaddr) not in out:
            out.append((family, sockaddr))
    if not out:
        raise ResolveError(0, f"cannot resolve {host}: no addresses")
    return out


async def dial(loop: asyncio.AbstractEventLoop, poller: Any, host: str, port: int,
               book: AddressBook, on_error: OnError,
               admit: Callable[[list[Addr]], list[Addr]] | None = None,
               options: SockOpts = ()) -> RawTransport:
    """A connected ``RawTransport`` (not started) to one of ``host``'s addresses, watched
    by ``poller``; raises ``ResolveError``, or the first attempt's OSError when every
    address failed. ``admit`` (egress listeners: egress/resolved.py) keeps the addresses
    that may be connected to, or raises: it runs after resolving, before any connect.
    ``options``: setsockopt triples for sockets to other hosts (tcpopts.py)."""
    addrs = await resolve(loop, host, port)
    if admit is not None:
        addrs = admit(addrs)
    addrs = book.order(addrs, time.monotonic())
    return await _race(loop, addrs, book, on_error,
                       functools.partial(_attempt, loop, poller, options))


async def _attempt(loop: asyncio.AbstractEventLoop, poller: Any, options: SockOpts,
                   addr: Addr) -> RawTransport:
    """One address on a bare socket; cancelling the attempt closes it."""
    got: asyncio.Future[RawTransport] = loop.create_future()

    def done(transport: RawTransport | None, exc: OSError | None) -> None:
        if got.done():  # cancelled meanwhile
            if transport is not None:
                transport.abort()
        elif transport is not None:
            got.set_result(transport)
        else:
            got.set_exception(exc or OSError("connect failed"))

    if options and (addr[0] == socket.AF_UNIX or tcpopts.is_local_host(str(addr[1][0]))):
        options = ()  # a peer on this host gets no dead-peer detection (tcpopts.py)
    pending = rawtransport.connect(loop, poller, addr, done, options)
    try:
        return await got
    except BaseException:
        if pending is not None:
            pending.cancel()
        if got.done() and not got.cancelled() and got.exception() is None:
            got.result().abort()  # connected as the attempt was cancelled
        raise


async def _race(loop: asyncio.AbstractEventLoop, addrs: list[Addr], book: AddressBook,
                on_error: OnError, attempt: Callable[[Addr], Coroutine[Any, Any, RawTransport]]
                ) -> RawTransport:
    """The race of the module comment; ``attempt`` connects one address, the winner's
    transport is returned and the others closed."""
    pending: dict[asyncio.Task[RawTransport], tuple[Addr, float]] = {}
    first_error: OSError | None = None
    started = 0
    try:
        while True:
            if started < len(addrs):
                task = spawn(attempt(addrs[started]), name="upstream-attempt")
                pending[task] = (addrs[started], time.monotonic())
                started += 1
            if not pending:
                assert first_error is not None
                raise first_error
            more = started < len(addrs)
            done, _ = await asyncio.wait(pending, timeout=ATTEMPT_DELAY if more else None,
                                         return_when=asyncio.FIRST_COMPLETED)
            for task in done:
                addr, _since = pending.pop(task)
                exc = task.exception()
                if exc is None:
                    book.succeeded(addr)
                    _silent_losers(pending, book, on_error)
                    return task.result()
                if not isinstance(exc, OSError):
                    raise exc
                first_error = first_error or exc
                on_error(addr, exc, book.failed(addr, time.monotonic()))
    finally:
        for task in pending:
            task.cancel()
            if task.done() and not task.cancelled() and task.exception() is None:
                with contextlib.suppress(OSError):
                    task.result().close()  # connected too, but another one won


def _silent_losers(pending: dict[asyncio.Task[RawTransport], tuple[Addr, float]],
                   book: AddressBook, on_error: OnError) -> None:
    """Attempts still unanswered after ``ATTEMPT_DELAY`` when another address connected
    (a host that drops packets: no refusal ever comes) count as failed, so the next
    connections try them last instead of waiting for them again."""
    now = time.monotonic()
    for task, (addr, since) in pending.items():
        if not task.done() and now - since >= ATTEMPT_DELAY:
            exc = TimeoutError(errno.ETIMEDOUT, f"no answer within {now - since:.2f} s while "
                               "another address answered")
            on_error(addr, exc, book.failed(addr, now))
