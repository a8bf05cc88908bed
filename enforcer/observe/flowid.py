"""Flow ids: ULIDs (26 chars of Crockford base32, sortable by creation time).

A ULID is 128 bits: a 48-bit Unix time in milliseconds followed by 80 random bits. Two ids
made in the same millisecond by this process keep their order: the second one reuses the
timestamp and adds one to the random part (the ULID "monotonic" rule). If the wall clock
steps back, the last timestamp is kept, so ids from one process never go backwards.

Encoding: the 48-bit time is 10 characters (its top two bits are zero) and the 80 random
bits are 16, so both parts split evenly into 10-bit groups; each group is one lookup in a
1024-entry table of two-character strings. The time part is cached while the millisecond
stays the same, so a new id costs a lock, eight lookups and two concatenations (~1 µs).
"""

from __future__ import annotations

import os
import threading
import time

_CROCKFORD = "0123456789ABCDEFGHJKMNPQRSTVWXYZ"
_PAIRS = tuple(a + b for a in _CROCKFORD for b in _CROCKFORD)  # 10 bits -> 2 characters
_RANDOM_LIMIT = 1 << 80
_TIME_MASK = (1 << 48) - 1

_lock = threading.Lock()
_last_ms = -1
_last_rand = 0
_last_prefix = ""


def _encode_time(ms: int) -> str:
    p = _PAIRS
    return p[ms >> 40] + p[(ms >> 30) & 1023] + p[(ms >> 20) & 1023] + p[(ms >> 10) & 1023] + p[ms & 1023]


def _encode_random(r: int) -> str:
    p = _PAIRS
    return (p[r >> 70] + p[(r >> 60) & 1023] + p[(r >> 50) & 1023] + p[(r >> 40) & 1023]
            + p[(r >> 30) & 1023] + p[(r >> 20) & 1023] + p[(r >> 10) & 1023] + p[r & 1023])


def encode_ulid(ms: int, rand: int) -> str:
    """Encode a 48-bit millisecond time and 80 random bits as a 26-character ULID."""
    return _encode_time(ms & _TIME_MASK) + _encode_random(rand & (_RANDOM_LIMIT - 1))


def new_flow_id() -> str:
    """A new unique flow id, lexicographically sortable by creation time."""
    global _last_ms, _last_rand, _last_prefix
    ms = time.time_ns() // 1_000_000
    with _lock:
        if ms > _last_ms:
            _last_ms = ms
            _last_rand = int.from_bytes(os.urandom(10), "big")
            _last_prefix = _encode_time(ms & _TIME_MASK)
        else:  # same ms (or the clock stepped back): keep the time, count up
            _last_rand += 1
            if _last_rand >= _RANDOM_LIMIT:  # 2**80 ids in one ms: borrow the next ms
                _last_ms += 1
                _last_rand = 0
                _last_prefix = _encode_time(_last_ms & _TIME_MASK)
        return _last_prefix + _encode_random(_last_rand)


def flow_id_time(flow_id: str) -> float:
    """The creation time (Unix seconds, ms resolution) encoded in a flow id."""
    ms = 0
    for ch in flow_id[:10].upper():
        ms = ms * 32 + _CROCKFORD.index(ch)
    return ms / 1000.0


def _reset_after_fork() -> None:
    """A forked worker must not continue the parent's sequence (ids would collide)."""
    global _lock, _last_ms, _last_rand, _last_prefix
    _lock = threading.Lock()
    _last_ms = -1
    _last_rand = 0
    _last_prefix = ""


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_reset_after_fork)
