"""Event-loop heartbeat behind ``/healthz``.

How it works. The data plane's event loop runs ``Heartbeat.run()`` as a task: it stamps
``time.monotonic()`` every ``interval`` (a quarter of the stall time, at most a second).
The admin endpoint answers from its own thread, so it keeps answering when the loop is
wedged (a blocking call, a busy loop, a deadlock); it compares the last stamp with the
clock and answers 503 once the loop has not turned for ``admin.stall_timeout``. A process
that is merely busy still turns its loop between callbacks, so only a loop that stopped
turning (what a restart fixes) fails the check.

With ``workers`` each worker publishes its stamps to a file (8 bytes, the monotonic time
as a little-endian double, written in place with ``pwrite``); ``CLOCK_MONOTONIC`` is one
clock for every process of the machine, so the supervisor compares every worker's stamp
with its own clock. The file is made under a temporary name and renamed into place with
its first stamp, so a reader never sees it empty.

``verdict`` is the pure part: stamps and a clock in, (healthy, one-line body) out.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import struct
import time
from collections.abc import Callable, Mapping
from pathlib import Path

STAMP = struct.Struct("<d")
MAX_INTERVAL = 1.0


class Heartbeat:
    """The loop's last turn, read by the admin thread (a float attribute: atomic)."""

    def __init__(self, stall: float, clock: Callable[[], float] = time.monotonic) -> None:
        self.stall = stall
        self.clock = clock
        self.last = clock()
        self._fd: int | None = None

    @property
    def interval(self) -> float:
        return min(MAX_INTERVAL, self.stall / 4)

    def beat(self) -> None:
        self.last = self.clock()
        if self._fd is not None:
            with contextlib.suppress(OSError):  # the supervisor's directory went away
                os.pwrite(self._fd, STAMP.pack(self.last), 0)

    async def run(self) -> None:
        while True:
            self.beat()
            await asyncio.sleep(self.interval)

    def publish_to(self, path: Path) -> None:
        """Write every stamp to ``path`` from now on (a worker, for its supervisor)."""
        tmp = path.with_name(path.name + ".tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
        try:
            os.pwrite(fd, STAMP.pack(self.clock()), 0)
            os.rename(tmp, path)
        except OSError:
            os.close(fd)
            raise
        self._fd = fd
        self.beat()

    def close(self) -> None:
        fd, self._fd = self._fd, None
        if fd is not None:
            os.close(fd)

    def check(self) -> tuple[bool, str]:
        return verdict({"the event loop": self.last}, self.clock(), self.stall)


def read_stamp(path: Path) -> float | None:
    """A worker's last stamp, or None when its file is missing or short."""
    try:
        data = path.read_bytes()
    except OSError:
        return None
    if len(data) < STAMP.size:
        return None
    return float(STAMP.unpack_from(data)[0])


def verdict(stamps: Mapping[str, float | None], now: float, stall: float) -> tuple[bool, str]:
    """Healthy when every named loop turned within ``stall`` seconds of ``now``; a missing
    stamp (None) is a loop that never turned. The body names every loop that did not."""
    stalled = []
    for name, stamp in stamps.items():
        if stamp is None:
            stalled.append(f"{name} has not turned yet")
        elif now - stamp > stall:
            stalled.append(f"{name} has not turned for {now - stamp:.1f}s")
    if not stalled:
        return True, "ok"
    return False, f"stalled: {'; '.join(stalled)} (admin.stall_timeout {stall:g}s)"
