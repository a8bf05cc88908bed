"""How egress logins are checked without letting a burst (or a flood of wrong passwords)
take the proxy down.

A password check is a scrypt run: tens of milliseconds of CPU, more on a busy machine.
Three parts keep that bounded:

- ``VerifiedCache`` (pure, time passed in): logins that passed scrypt, for ``TTL``
  seconds, at most ``CACHE_LIMIT`` of them (least recently used dropped first). The key is
  an HMAC-SHA256 of user and password under a random key made per process, never the
  password; each entry also names its user, so a credentials reload can forget exactly the
  users whose hash changed or who were removed. A wrong password is never cached.
- ``SingleFlight`` (pure): the checks in progress by key, so that concurrent logins with
  the same user and password wait for one scrypt run instead of starting one each.
- ``ScryptPool``: one process-wide thread pool of ``WORKERS`` threads that runs nothing but
  scrypt checks (never the loop's default executor, which DNS and file reads share), with
  a bound: while ``WORKERS + WAITING_LIMIT`` checks are unfinished, ``submit`` refuses at
  once (returns None) and the login is answered as failed (close ``egress_login_busy``).
  The count is kept under a lock and lowered by the pool's own done callback, so it is
  right whichever thread or event loop asked.

A login that is in the cache costs one HMAC; a burst of one user's first logins costs one
scrypt; a flood of distinct wrong passwords costs at most ``WORKERS`` busy threads and a
queue of ``WAITING_LIMIT``, while users already verified keep logging in from the cache.
"""

from __future__ import annotations

import concurrent.futures
import os
import threading
from collections import OrderedDict
from collections.abc import Callable
from typing import Final, Generic, TypeVar

TTL: Final = 300.0  # seconds a verified login is remembered
CACHE_LIMIT: Final = 4096
WORKERS: Final = max(1, min(4, (os.cpu_count() or 2) // 2))
WAITING_LIMIT: Final = 32

K = TypeVar("K")
V = TypeVar("V")


class VerifiedCache:
    """Logins that passed scrypt: key -> (user, expiry); see the module comment."""

    __slots__ = ("_entries", "limit", "ttl")

    def __init__(self, ttl: float = TTL, limit: int = CACHE_LIMIT) -> None:
        self.ttl = ttl
        self.limit = limit
        self._entries: OrderedDict[bytes, tuple[str, float]] = OrderedDict()

    def __len__(self) -> int:
        return len(self._entries)

    def hit(self, key: bytes, now: float) -> bool:
        entry = self._entries.get(key)
        if entry is None:
            return False
        if now >= entry[1]:
            del self._entries[key]
            return False
        self._entries.move_to_end(key)
        return True

    def add(self, key: bytes, user: str, now: float) -> None:
        self._entries[key] = (user, now + self.ttl)
        self._entries.move_to_end(key)
        while len(self._entries) > self.limit:
            self._entries.popitem(last=False)

    def forget(self, users: set[str]) -> int:
        """Drop every entry of these users; how many were dropped."""
        gone = [key for key, (user, _) in self._entries.items() if user in users]
        for key in gone:
            del self._entries[key]
        return len(gone)


class SingleFlight(Generic[K, V]):
    """The checks in progress: the first login with a key starts one, others join it."""

    __slots__ = ("_flights",)

    def __init__(self) -> None:
        self._flights: dict[K, V] = {}

    def __len__(self) -> int:
        return len(self._flights)

    def get(self, key: K) -> V | None:
        return self._flights.get(key)

    def start(self, key: K, flight: V) -> None:
        self._flights[key] = flight

    def finish(self, key: K, flight: V) -> None:
        """Forget ``flight`` (not a newer one started for the same key meanwhile)."""
        if self._flights.get(key) is flight:
            del self._flights[key]


class ScryptPool:
    """The process's bounded pool of scrypt checks (see the module comment)."""

    __slots__ = ("_executor", "_lock", "limit", "pending", "workers")

    def __init__(self, workers: int = WORKERS, waiting: int = WAITING_LIMIT) -> None:
        self.workers = workers
        self.limit = workers + waiting
        self.pending = 0
        self._lock = threading.Lock()
        self._executor: concurrent.futures.ThreadPoolExecutor | None = None

    def submit(self, check: Callable[[bytes], bool],
               password: bytes) -> concurrent.futures.Future[bool] | None:
        """The running check, or None when ``limit`` checks are unfinished already."""
        with self._lock:
            if self.pending >= self.limit:
                return None
            self.pending += 1
            if self._executor is None:
                self._executor = concurrent.futures.ThreadPoolExecutor(
                    self.workers, thread_name_prefix="enforcer-scrypt")
            executor = self._executor
        try:
            future = executor.submit(check, password)
        except RuntimeError:  # the interpreter is shutting down
            self._done(None)
            return None
        future.add_done_callback(self._done)
        return future

    def _done(self, _: concurrent.futures.Future[bool] | None) -> None:
        with self._lock:
            self.pending -= 1


POOL: Final = ScryptPool()
