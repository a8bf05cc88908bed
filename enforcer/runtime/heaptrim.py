"""Giving freed heap memory back to the operating system after a burst of connections.

glibc's malloc hands memory back to the kernel by itself only from the top of its heap.
After a burst of connections (each TLS connection holds ~15 KiB of OpenSSL state in the C
heap), the chunks freed when the burst ends lie scattered between chunks still in use, so a
sidecar that once held 10,000 connections keeps ~100 MB more RSS than it needs until it
restarts, which counts against a container's memory limit.

Every ``TRIM_INTERVAL`` seconds the server asks malloc how much of its heap is free
(``mallinfo2``: a walk over the free lists) and how much the process holds (RSS, from
``/proc/self/statm``). When at least ``TRIM_MIN_FREE`` bytes are free and RSS has grown by at
least that much since the last trim, it calls ``malloc_trim(0)``, which gives back every whole
free page inside the heap (``madvise``), not just the top. The RSS condition keeps it from
trimming again and again while free memory stays high but is already given back (malloc
still counts madvised chunks as free). haproxy trims the same way when it releases its
memory pools.

Only with glibc >= 2.33 (``mallinfo2``) on Linux and glibc's own malloc; elsewhere (musl,
macOS, a preloaded jemalloc or tcmalloc, AddressSanitizer) it is off and says so once in
the log. Python's own small-object arenas are returned by CPython when empty.
"""

from __future__ import annotations

import asyncio
import ctypes
import logging
import os
import time
from typing import Final

log = logging.getLogger("enforcer.runtime")

TRIM_INTERVAL: Final = 10.0  # seconds between checks
TRIM_MIN_FREE: Final = 8 * 1024 * 1024  # free heap bytes (and RSS growth) worth a trim
LOG_MIN_RETURNED: Final = 16 * 1024 * 1024  # trims that returned this much are logged

_FIELDS: Final = ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks",
                  "uordblks", "fordblks", "keepcost")


class _MallInfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in _FIELDS]


def resident_bytes() -> int:
    """This process's RSS, or 0 where /proc is missing."""
    try:
        with open("/proc/self/statm", "rb") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return 0


class HeapTrimmer:
    """Calls ``malloc_trim(0)`` when enough freed heap has piled up (module comment)."""

    def __init__(self, min_free: int | None = None) -> None:
        self.min_free = TRIM_MIN_FREE if min_free is None else min_free
        self.returned_bytes = 0  # RSS given back by all trims so far
        self.trims = 0
        self.unavailable_reason: str | None = None
        self._rss_after_last = 0
        try:
            libc = ctypes.CDLL(None)  # the process's own symbols: libc's, without a lookup
            self._mallinfo2 = libc.mallinfo2
            self._malloc_trim = libc.malloc_trim
        except (OSError, AttributeError, TypeError) as exc:
            self.unavailable_reason = f"no glibc malloc_trim/mallinfo2 here ({exc})"
            return
        self._mallinfo2.restype = _MallInfo2
        self._mallinfo2.argtypes = []
        self._malloc_trim.restype = ctypes.c_int
        self._malloc_trim.argtypes = [ctypes.c_size_t]
        if self._mallinfo2().arena == 0:  # a running Python always has a glibc main arena
            self.unavailable_reason = "malloc is not glibc's (preloaded allocator?)"

    @property
    def available(self) -> bool:
        return self.unavailable_reason is None

    def free_heap_bytes(self) -> int:
        """Bytes malloc holds free in its heaps (given back to the kernel or not)."""
        return int(self._mallinfo2().fordblks) if self.available else 0

    def maybe_trim(self) -> int:
        """Trim if it is worth it; the RSS given back (0 if it did not trim)."""
        if not self.available:
            return 0
        rss = resident_bytes()
        if rss - self._rss_after_last < self.min_free or self.free_heap_bytes() < self.min_free:
            return 0
        started = time.perf_counter()
        self._malloc_trim(0)
        after = resident_bytes()
        self._rss_after_last = after
        returned = max(0, rss - after)
        self.trims += 1
        self.returned_bytes += returned
        level = logging.INFO if returned >= LOG_MIN_RETURNED else logging.DEBUG
        log.log(level, "gave %.1f MiB of freed heap back to the system (RSS %.1f -> %.1f MiB, "
                "%.1f ms)", returned / 2**20, rss / 2**20, after / 2**20,
                (time.perf_counter() - started) * 1000)
        return returned

    def status(self) -> dict[str, int | bool]:
        """For /status (read from the admin thread: a statm read and a locked malloc walk)."""
        return {"rss_bytes": resident_bytes(), "heap_free_bytes": self.free_heap_bytes(),
                "heap_trim": self.available, "heap_trims": self.trims,
                "heap_returned_bytes": self.returned_bytes}

    async def run(self, interval: float | None = None) -> None:
        """Check every ``interval`` seconds (``TRIM_INTERVAL``) until cancelled."""
        interval = TRIM_INTERVAL if interval is None else interval
        if not self.available:
            log.info("heap trimming is off: %s", self.unavailable_reason)
            return
        while True:
            await asyncio.sleep(interval)
            self.maybe_trim()
