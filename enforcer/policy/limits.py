"""Per-key connection limits of a rule (``limits:``): pure, no I/O, time passed in.

A rule's ``limits`` count per *key*: the peer identity, the client's network, or the
listener (``limit_key``). For each (ruleset, rule, key) the ``Limiter`` keeps one
``_Entry``: how many admitted connections are still open, and a token bucket.

``admit`` checks, in this order:

1. ``max_connections``: refused (``concurrency_limited``) when that many are open; no
   token is taken, so a client held back by concurrency keeps its rate budget;
2. ``rate``/``burst``: a token bucket of ``burst`` tokens refilled at ``rate`` per second
   (the bucket starts full; ``now`` is a monotonic clock in seconds); refused
   (``rate_limited``) when less than one token is left.

An admitted connection gets a ``Lease``; ``Lease.release()`` gives the concurrency slot
back, once however often it is called. The caller releases when the connection ends.

Reload: entries are keyed by ruleset, rule and key, not by the limits' values, and the
limits are passed to every ``admit``. A reloaded ruleset that keeps a rule's name keeps its
counters (open connections and the bucket's level, clamped to a smaller new burst); a
renamed or removed rule's entries are forgotten once their connections end.

Memory: an entry with no open connection and a full bucket says nothing the default does
not, so ``admit`` drops such entries in a sweep whenever the table has doubled since the
last one (amortised O(1) per connection). What stays is bounded by the open connections
plus the keys whose buckets are still refilling.
"""

from __future__ import annotations

import functools
import ipaddress
from dataclasses import dataclass
from typing import Literal

from enforcer.config.rulesets import LimitsConfig
from enforcer.tlsconf.identity import PeerIdentity

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
Refusal = Literal["rate_limited", "concurrency_limited"]
NO_KEY = "-"  # no certificate (per: identity) or no IP address (per: client, a unix socket)
SWEEP_MIN = 1024


def limit_key(limits: LimitsConfig, listener: str, client_ip: IPAddress | None,
              identity: PeerIdentity | None) -> str:
    """What one counter counts. ``identity``: the SPIFFE ID, else ``cn:`` + the subject CN,
    else ``spki:`` + the public-key pin; connections without a certificate share one key.
    ``client``: the real client address (after PROXY protocol) cut to ``ipv4_prefix`` /
    ``ipv6_prefix`` bits (an IPv4-mapped IPv6 address counts as IPv4). ``listener``: one
    counter for the listener (per rule)."""
    if limits.per == "identity":
        if identity is None:
            return NO_KEY
        if identity.spiffe_id is not None:
            return identity.spiffe_id
        return f"cn:{identity.cn}" if identity.cn else f"spki:{identity.spki_sha256}"
    if limits.per == "client":
        return client_network(client_ip, limits.ipv4_prefix, limits.ipv6_prefix)
    return listener


@functools.lru_cache(maxsize=4096)
def client_network(ip: IPAddress | None, v4: int, v6: int) -> str:
    """``203.0.113.0/24``: the client's network as text, cached per distinct address."""
    if ip is None:
        return NO_KEY
    if ip.version == 6 and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    bits = v4 if ip.version == 4 else v6
    drop = ip.max_prefixlen - bits
    return f"{type(ip)(int(ip) >> drop << drop)}/{bits}"


class _Entry:
    __slots__ = ("active", "stamp", "tokens")

    def __init__(self, tokens: float, now: float) -> None:
        self.active = 0
        self.tokens = tokens
        self.stamp = now

    def refill(self, limits: LimitsConfig, now: float) -> None:
        if limits.rate is None:
            return
        elapsed = max(0.0, now - self.stamp)
        self.tokens = min(float(limits.burst), self.tokens + elapsed * limits.rate)
        self.stamp = now


class Lease:
    """One admitted connection's slot; ``release`` it when the connection ends."""

    __slots__ = ("_entry",)

    def __init__(self, entry: _Entry) -> None:
        self._entry: _Entry | None = entry

    def release(self) -> None:
        entry, self._entry = self._entry, None
        if entry is not None:
            entry.active -= 1

    @property
    def held(self) -> bool:
        return self._entry is not None


@dataclass(frozen=True, slots=True)
class Refused:
    reason: Refusal
    key: str
    detail: str


class Limiter:
    """The counters of every limited rule of one process (one worker)."""

    __slots__ = ("_entries", "_limits", "_next_sweep")

    def __init__(self) -> None:
        self._entries: dict[tuple[str, str, str], _Entry] = {}
        self._limits: dict[tuple[str, str, str], LimitsConfig] = {}
        self._next_sweep = SWEEP_MIN

    def __len__(self) -> int:
        return len(self._entries)

    def admit(self, ruleset: str, rule: str, limits: LimitsConfig, key: str,
              now: float) -> Lease | Refused:
        ident = (ruleset, rule, key)
        entry = self._entries.get(ident)
        if entry is None:
            if len(self._entries) >= self._next_sweep:
                self.sweep(now)
            entry = self._entries[ident] = _Entry(float(limits.burst), now)
        else:
            entry.refill(limits, now)
        self._limits[ident] = limits
        if limits.max_connections is not None and entry.active >= limits.max_connections:
            return Refused("concurrency_limited", key,
                           f"{entry.active} connections of {key} open (max_connections "
                           f"{limits.max_connections} of rule {rule})")
        if limits.rate is not None:
            if entry.tokens < 1.0:
                return Refused("rate_limited", key,
                               f"new connections of {key} over {_rate_text(limits.rate)} "
                               f"(burst {limits.burst}) of rule {rule}")
            entry.tokens -= 1.0
        entry.active += 1
        return Lease(entry)

    def open_count(self, ruleset: str, rule: str, key: str) -> int:
        entry = self._entries.get((ruleset, rule, key))
        return entry.active if entry is not None else 0

    def sweep(self, now: float) -> int:
        """Forget entries with nothing open and a full bucket; returns how many."""
        dead = []
        for ident, entry in self._entries.items():
            limits = self._limits[ident]
            entry.refill(limits, now)
            if entry.active <= 0 and (limits.rate is None or entry.tokens >= limits.burst):
                dead.append(ident)
        for ident in dead:
            del self._entries[ident]
            del self._limits[ident]
        self._next_sweep = max(SWEEP_MIN, 2 * len(self._entries))
        return len(dead)


def _rate_text(rate: float) -> str:
    return f"{rate:g}/s" if rate >= 1 else f"{rate * 60:g}/m"
