"""The host-name dialer's race (dialer.py) on loopback: a silent address (a listener whose
accept queue is full: the kernel drops the SYNs), a refusing one and a live one."""

from __future__ import annotations

import asyncio
import functools
import socket
from typing import Any

from enforcer.dataplane import dialer
from enforcer.dataplane.loopwatch import LoopPoller
from tests.e2e.harness import blackhole_listener


async def _race(loop: asyncio.AbstractEventLoop, addrs: list[dialer.Addr],
                book: dialer.AddressBook, on_error: dialer.OnError) -> socket.socket:
    """The dialer's race with its own attempts (bare sockets, watched by the loop); the
    winner as a connected socket."""
    transport = await dialer._race(loop, addrs, book, on_error,
                                   functools.partial(dialer._attempt, loop, LoopPoller(loop), ()))
    return socket.socket(fileno=transport.release())


def _refusing() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def test_the_live_address_wins_and_the_others_are_tried_last() -> None:
    blackhole, silent_port, fillers = blackhole_listener()
    live = socket.create_server(("127.0.0.1", 0))
    silent = (socket.AF_INET, ("127.0.0.1", silent_port))
    refusing = (socket.AF_INET, ("127.0.0.1", _refusing()))
    good = (socket.AF_INET, live.getsockname())
    book = dialer.AddressBook()
    errors: list[tuple[Any, int | None, bool]] = []
    loop = asyncio.get_running_loop()
    try:
        sock = await _race(loop, [silent, refusing, good], book,
                                  lambda a, e, fresh: errors.append((a, e.errno, fresh)))
        with sock:
            assert sock.getpeername() == good[1]
        assert sorted(errors) == sorted([(silent, 110, True), (refusing, 111, True)])
        assert book.order([silent, refusing, good], 0.0) == [good, silent, refusing]
        errors.clear()
        sock = await _race(loop, book.order([silent, refusing, good], 0), book,
                                  lambda a, e, fresh: errors.append((a, e.errno, fresh)))
        sock.close()
        assert errors == []  # straight to the live one
    finally:
        live.close()
        blackhole.close()
        for f in fillers:
            f.close()


async def test_every_address_failing_raises_the_first_error() -> None:
    refusing = (socket.AF_INET, ("127.0.0.1", _refusing()))
    book = dialer.AddressBook()
    seen: list[bool] = []
    try:
        await _race(asyncio.get_running_loop(), [refusing, refusing], book,
                           lambda a, e, fresh: seen.append(fresh))
    except ConnectionRefusedError:
        pass
    else:
        raise AssertionError("no error")
    assert seen == [True, False]  # logged once per address until it works again


async def test_a_name_that_does_not_resolve() -> None:
    try:
        await dialer.resolve(asyncio.get_running_loop(), "no-such-host.invalid", 80)
    except dialer.ResolveError as exc:
        assert str(exc.strerror).startswith("cannot resolve no-such-host.invalid")
    else:
        raise AssertionError("resolved")
