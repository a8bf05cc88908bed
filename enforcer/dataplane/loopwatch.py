"""The event loop's readiness callbacks in the shape of the native poller's ``Watch``.

Why: every socket of a connection, before the relay, is a ``RawTransport``
(``rawtransport.py``) that asks a *watch* to call it back when its socket is readable or
writable. On a plane that relays with the native pump the watch is an entry in the pumps'
own epoll set (``_pump.Poller.watch``: C, one ``epoll_wait`` for many sockets). A plane
without the pump (``relay: python``, or no extension) runs no native code, so its watches
are these: the same interface (``set``, ``set_callback``, ``close``; ``LoopPoller.watch``)
over ``loop.add_reader``/``add_writer``.

How: ``set(readable, writable)`` registers or removes the loop's reader and writer only
where the interest changed; the callback is called ``(True, False)`` from the reader and
``(False, True)`` from the writer. uvloop (0.23) calls both of a descriptor's callbacks
when either condition holds, so a callback may come for a condition that does not hold
yet: ``RawTransport`` and the acceptor then get ``EAGAIN`` and wait again (a connect in
progress watches writability alone, so it is never woken early). ``close()`` removes both
before the caller closes the descriptor.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable

Callback = Callable[[bool, bool], object]


def _unset(readable: bool, writable: bool) -> None:
    """A closed watch's callback."""


class LoopWatch:
    """One descriptor's interest, kept in the loop (see the module comment)."""

    __slots__ = ("_callback", "_closed", "_fd", "_loop", "_reading", "_writing")

    # what a RawTransport watched by the loop reads at a time: on such a plane it carries
    # the Python relay too, and reads as much as uvloop's own transports (rawtransport.py)
    read_size = 256 * 1024

    def __init__(self, loop: asyncio.AbstractEventLoop, fd: int, callback: Callback) -> None:
        self._loop = loop
        self._fd = fd
        self._callback = callback
        self._reading = False
        self._writing = False
        self._closed = False

    def set(self, readable: bool, writable: bool) -> None:
        """Be called back for exactly these conditions from now on (OSError if the loop
        refuses the descriptor; ValueError once closed, as the native watch)."""
        if self._closed:
            if readable or writable:
                raise ValueError("the watch is closed")
            return
        loop, fd = self._loop, self._fd
        if readable != self._reading:
            if readable:
                loop.add_reader(fd, self._readable)
            else:
                loop.remove_reader(fd)
            self._reading = readable
        if writable != self._writing:
            if writable:
                loop.add_writer(fd, self._writable)
            else:
                loop.remove_writer(fd)
            self._writing = writable

    def set_callback(self, callback: Callback) -> None:
        if self._closed:
            raise ValueError("the watch is closed")
        self._callback = callback

    def close(self) -> None:
        """Leave the loop (before the descriptor is closed) and drop the callback."""
        if self._closed:
            return
        self.set(False, False)
        self._closed = True
        self._callback = _unset

    def _readable(self) -> None:
        self._callback(True, False)

    def _writable(self) -> None:
        self._callback(False, True)


class LoopPoller:
    """Makes ``LoopWatch``es: stands in for ``_pump.Poller`` where no native code runs."""

    __slots__ = ("_loop",)

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop

    def watch(self, fd: int, callback: Callback) -> LoopWatch:
        return LoopWatch(self._loop, fd, callback)

    def close(self) -> None:
        """Nothing to release: each watch left the loop when it was closed."""
