"""SIGHUP and SIGUSR1 before the process serves.

Their default action ends a process, and a config reloader or logrotate may send them in the
first moments after a start, before the event loop has installed its handlers (or, with
workers, before a worker has). ``hold()`` blocks them from the first line of ``enforcer
run``; the kernel keeps one of each pending. ``release()``, called once the handlers are
installed, unblocks them, and what came meanwhile is delivered to those handlers then: a
reload asked for during startup happens, once, right after it.

The mask is inherited by threads started in between (they then never take these signals,
as Python wants: its handlers run in the main thread) and across fork and exec by the
supervisor's workers, which ``spawning()`` starts with the signals held so that a signal
forwarded to a worker still importing waits for that worker's handlers.
"""

from __future__ import annotations

import contextlib
import signal
from collections.abc import Iterator

HELD = (signal.SIGHUP, signal.SIGUSR1)


def hold() -> None:
    signal.pthread_sigmask(signal.SIG_BLOCK, HELD)


def release() -> None:
    signal.pthread_sigmask(signal.SIG_UNBLOCK, HELD)


@contextlib.contextmanager
def spawning() -> Iterator[None]:
    """Start child processes with HELD blocked (they release it themselves)."""
    before = signal.pthread_sigmask(signal.SIG_BLOCK, HELD)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, before)
