"""loopwatch.LoopWatch keeps the native Watch's contract (a socketpair, the real loop):
calls for exactly the conditions asked, none after set(False, False) or close(), and a
closed watch refuses new interest as the native one does."""

from __future__ import annotations

import asyncio
import socket

import pytest

from enforcer.dataplane.loopwatch import LoopPoller


async def test_called_for_what_was_asked_and_nothing_after_close() -> None:
    a, b = socket.socketpair()
    a.setblocking(False)
    calls: list[tuple[bool, bool]] = []
    watch = LoopPoller(asyncio.get_running_loop()).watch(a.fileno(),
                                                         lambda r, w: calls.append((r, w)))
    try:
        await asyncio.sleep(0.02)
        assert calls == []  # nothing asked yet
        watch.set(False, True)  # an idle socket can be written to
        await asyncio.sleep(0.02)
        assert calls and set(calls) == {(False, True)}
        watch.set(True, False)
        calls.clear()
        await asyncio.sleep(0.02)
        assert calls == []  # nothing to read yet
        b.send(b"x")
        await asyncio.sleep(0.02)
        assert calls and set(calls) == {(True, False)}
        replaced: list[tuple[bool, bool]] = []
        watch.set_callback(lambda r, w: replaced.append((r, w)))
        await asyncio.sleep(0.02)
        assert replaced  # the byte is still unread: level-triggered, as epoll is
        watch.set(False, False)
        replaced.clear()
        await asyncio.sleep(0.02)
        assert replaced == []
        watch.set(True, True)
        watch.close()
        await asyncio.sleep(0.02)
        assert replaced == []
        watch.set(False, False)  # still allowed, as on the native watch
        with pytest.raises(ValueError):
            watch.set(True, False)
        with pytest.raises(ValueError):
            watch.set_callback(lambda r, w: None)
        watch.close()  # twice: a no-op
    finally:
        a.close()
        b.close()
