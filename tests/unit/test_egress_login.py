"""Egress login checks (egress/logincheck.py, Credentials): the verified-logins cache
(TTL, LRU, forgotten on reload), the single flight of identical checks, the bounded
scrypt pool, and a reload while a check runs."""

from __future__ import annotations

import asyncio
import threading
from pathlib import Path

import pytest

from enforcer.egress.credentials import Credentials, hash_password, parse_hash
from enforcer.egress.logincheck import ScryptPool, SingleFlight, VerifiedCache


# ------------------------------------------------------------------------------ pure cores
def test_cache_ttl_and_lru() -> None:
    cache = VerifiedCache(ttl=10.0, limit=2)
    assert not cache.hit(b"a", 0.0)
    cache.add(b"a", "alice", 0.0)
    assert cache.hit(b"a", 9.9) and not cache.hit(b"a", 10.0)  # expired: gone
    assert len(cache) == 0
    cache.add(b"a", "alice", 0.0)
    cache.add(b"b", "bob", 0.0)
    assert cache.hit(b"a", 1.0)  # a is now the most recently used
    cache.add(b"c", "carol", 1.0)  # over the limit: b (least recently used) goes
    assert len(cache) == 2 and not cache.hit(b"b", 1.0)
    assert cache.hit(b"a", 1.0) and cache.hit(b"c", 1.0)


def test_cache_forget_users() -> None:
    cache = VerifiedCache(ttl=10.0, limit=10)
    cache.add(b"a1", "alice", 0.0)
    cache.add(b"a2", "alice", 0.0)
    cache.add(b"b", "bob", 0.0)
    assert cache.forget({"alice", "mallory"}) == 2
    assert not cache.hit(b"a1", 1.0) and not cache.hit(b"a2", 1.0) and cache.hit(b"b", 1.0)


def test_single_flight() -> None:
    flights: SingleFlight[str, object] = SingleFlight()
    first, newer = object(), object()
    assert flights.get("k") is None
    flights.start("k", first)
    assert flights.get("k") is first and len(flights) == 1
    flights.start("k", newer)  # replaced (e.g. the user's hash changed)
    flights.finish("k", first)  # the old one landing must not drop the newer one
    assert flights.get("k") is newer
    flights.finish("k", newer)
    assert flights.get("k") is None and len(flights) == 0


def test_pool_bound() -> None:
    pool = ScryptPool(workers=1, waiting=1)
    gate = threading.Event()

    def slow(_: bytes) -> bool:
        return gate.wait(10)

    running = [pool.submit(slow, b"x"), pool.submit(slow, b"y")]
    assert all(f is not None for f in running) and pool.pending == 2
    assert pool.submit(slow, b"z") is None  # one running, one waiting: full
    gate.set()
    assert all(f is not None and f.result(10) for f in running)
    for _ in range(100):  # the done callback runs just after the result is set
        if pool.pending == 0:
            break
        threading.Event().wait(0.01)
    assert pool.pending == 0
    later = pool.submit(slow, b"z")
    assert later is not None and later.result(10)


# ------------------------------------------------------------------------------ Credentials
class CountingHash:
    """A real scrypt hash that counts its runs and can be held at a gate."""

    def __init__(self, password: bytes) -> None:
        self.inner = parse_hash(hash_password(password, ln=4))
        self.runs = 0
        self.gate = threading.Event()
        self.gate.set()

    def verify(self, password: bytes) -> bool:
        self.runs += 1
        self.gate.wait(10)
        return self.inner.verify(password)


def _creds(tmp_path: Path, users: dict[str, bytes], pool: ScryptPool) -> Credentials:
    path = tmp_path / "users"
    path.write_text("".join(f"{u}:{hash_password(p, ln=4)}\n" for u, p in users.items()))
    return Credentials(str(path), pool)


async def test_check_caches_success_only(tmp_path: Path) -> None:
    creds = _creds(tmp_path, {"alice": b"pw"}, ScryptPool(1, 4))
    loop = asyncio.get_running_loop()
    assert not creds.check(b"alice", b"pw")
    outcome = creds.start_check(b"alice", b"pw", loop)
    assert outcome is not None and await outcome
    assert creds.check(b"alice", b"pw") and len(creds.cache) == 1
    for user, password in [(b"alice", b"nope"), (b"mallory", b"pw"), (b"\xff", b"pw")]:
        outcome = creds.start_check(user, password, loop)
        assert outcome is not None and not await outcome
        assert not creds.check(user, password)
    assert len(creds.cache) == 1  # a wrong login is never cached
    assert b"pw" not in b"".join(creds.cache._entries)  # keyed by an HMAC, not the password


async def test_single_flight_one_scrypt_for_a_burst(tmp_path: Path) -> None:
    creds = _creds(tmp_path, {"alice": b"pw"}, ScryptPool(1, 0))
    counting = CountingHash(b"pw")
    counting.gate.clear()
    creds.users["alice"] = counting  # type: ignore[assignment]
    loop = asyncio.get_running_loop()
    outcomes = [creds.start_check(b"alice", b"pw", loop) for _ in range(40)]
    assert all(o is outcomes[0] for o in outcomes) and outcomes[0] is not None
    # the pool (1 worker, no queue) is full, yet identical logins joined the flight;
    # a different login is refused at once
    assert creds.start_check(b"alice", b"other", loop) is None
    counting.gate.set()
    results = await asyncio.gather(*(asyncio.shield(o) for o in outcomes if o is not None))
    assert results == [True] * 40 and counting.runs == 1
    assert len(creds.flights) == 0 and creds.check(b"alice", b"pw")


async def test_cancelled_waiter_does_not_cancel_the_flight(tmp_path: Path) -> None:
    creds = _creds(tmp_path, {"alice": b"pw"}, ScryptPool(1, 1))
    counting = CountingHash(b"pw")
    counting.gate.clear()
    creds.users["alice"] = counting  # type: ignore[assignment]
    loop = asyncio.get_running_loop()
    outcome = creds.start_check(b"alice", b"pw", loop)
    assert outcome is not None
    waiter = asyncio.ensure_future(asyncio.shield(outcome))
    await asyncio.sleep(0)
    waiter.cancel()
    counting.gate.set()
    assert await outcome and creds.check(b"alice", b"pw")


async def test_reload_forgets_changed_and_removed_users(tmp_path: Path,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    from enforcer.egress import credentials as mod

    monkeypatch.setattr(mod, "RECHECK_EVERY", 0.0)
    path = tmp_path / "users"
    alice, bob, carol = (hash_password(p, ln=4) for p in (b"a1", b"b1", b"c1"))
    path.write_text(f"alice:{alice}\nbob:{bob}\ncarol:{carol}\n")
    creds = Credentials(str(path), ScryptPool(1, 4))
    loop = asyncio.get_running_loop()
    for user, password in [(b"alice", b"a1"), (b"bob", b"b1"), (b"carol", b"c1")]:
        outcome = creds.start_check(user, password, loop)
        assert outcome is not None and await outcome
        assert creds.check(user, password)
    # alice gets a new password, bob is removed, carol stays as she was
    path.write_text(f"alice:{hash_password(b'a2', ln=4)}\ncarol:{carol}\n# changed\n")
    assert creds.current() is creds and set(creds.users) == {"alice", "carol"}
    assert not creds.check(b"alice", b"a1") and not creds.check(b"bob", b"b1")
    assert creds.check(b"carol", b"c1")  # unchanged: still cached
    for user, password, want in [(b"alice", b"a1", False), (b"bob", b"b1", False),
                                 (b"alice", b"a2", True)]:
        outcome = creds.start_check(user, password, loop)
        assert outcome is not None and await outcome is want


async def test_reload_during_a_check_is_not_cached(tmp_path: Path) -> None:
    creds = _creds(tmp_path, {"alice": b"pw"}, ScryptPool(1, 4))
    counting = CountingHash(b"pw")
    counting.gate.clear()
    creds.users["alice"] = counting  # type: ignore[assignment]
    loop = asyncio.get_running_loop()
    outcome = creds.start_check(b"alice", b"pw", loop)
    assert outcome is not None
    creds.replace({"alice": parse_hash(hash_password(b"new", ln=4))})  # rotated meanwhile
    counting.gate.set()
    assert not await outcome  # checked against a hash that is no longer the user's
    assert not creds.check(b"alice", b"pw")
