"""Rule limits in the data plane: admit or refuse an allowed connection, release at close.

``Connection`` asks ``admit`` once, right after policy allowed it by a rule with
``limits`` and before any upstream connect (for rules on ``to.server_identities``, which
decide only after the upstream handshake, before the first byte is relayed). A refusal
comes back to the connection, which records the ``denial`` decision and refuses through
the lifecycle core: ``action: deny``, ``close`` and ``reason`` ``rate_limited`` or
``concurrency_limited``; it is counted here in ``enforcer_limited_total{listener,reason}``.

The lease of an admitted connection is kept here, by connection, and released from
``Connection._close``, which runs once per connection (the core closes once); ``pop``
makes a second call harmless.

Counters live in this process: with ``workers: N`` each worker counts its own connections
(see docs/limits-and-revocation.md for why and how to size limits).
"""

from __future__ import annotations

import functools
import ipaddress
import time
from typing import TYPE_CHECKING, Any

from enforcer.policy.facts import Decision
from enforcer.policy.limits import Lease, Limiter, Refused, limit_key

if TYPE_CHECKING:
    from enforcer.dataplane.connection import Connection


class LimitGate:
    __slots__ = ("leases", "limiter", "metrics")

    def __init__(self, metrics: Any) -> None:
        self.metrics = metrics
        self.limiter = Limiter()
        self.leases: dict[Connection, Lease] = {}

    def admit(self, conn: Connection, decision: Decision) -> Refused | None:
        """None: go on (no limits, or admitted); else why it is refused (counted)."""
        limits = decision.limits
        if limits is None or decision.rule is None:
            return None
        addr = conn.client_addr
        ip = _ip(addr[0]) if limits.per == "client" and addr is not None else None
        key = limit_key(limits, conn.listener.name, ip, conn.identity)
        got = self.limiter.admit(decision.ruleset, decision.rule, limits, key,
                                 time.monotonic())
        if isinstance(got, Lease):
            self.leases[conn] = got
            return None
        self.metrics.limited_total.labels(listener=conn.listener.name, reason=got.reason).inc()
        return got

    def release(self, conn: Connection) -> None:
        lease = self.leases.pop(conn, None)
        if lease is not None:
            lease.release()


def denial(decision: Decision, refused: Refused) -> Decision:
    """The decision a limit refusal records (the rule that allowed, denying)."""
    return Decision("deny", decision.ruleset, decision.rule, refused.reason)


@functools.lru_cache(maxsize=4096)
def _ip(text: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    try:
        return ipaddress.ip_address(text.partition("%")[0])
    except ValueError:
        return None
