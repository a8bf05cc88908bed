"""Rule limits in the data plane: admit or refuse an allowed connection, release at close.

``Connection`` asks ``admit`` once, right after policy allowed it by a rule with
``limits`` and before any upstream connect (for rules on ``to.server_identities``, which
decide only after the upstream handshake, before the first byte is relayed). A refused
connection is closed with ``action: deny``, ``close`` and ``reason`` ``rate_limited`` or
``concurrency_limited`` and counted in ``enforcer_limited_total{listener,reason}``.

The lease of an admitted connection is kept here, by connection, and released from
``DataPlane.connection_closed``, which every way a connection ends goes through exactly
once (``Connection._finish``); ``pop`` makes a second call harmless.

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

    def admit(self, conn: Connection, decision: Decision) -> bool:
        """True: go on (no limits, or admitted). False: refused, and ``conn`` is closed."""
        limits = decision.limits
        if limits is None or decision.rule is None:
            return True
        addr = conn.client_addr
        ip = _ip(addr[0]) if limits.per == "client" and addr is not None else None
        key = limit_key(limits, conn.listener.name, ip, conn.identity)
        got = self.limiter.admit(decision.ruleset, decision.rule, limits, key,
                                 time.monotonic())
        if isinstance(got, Lease):
            self.leases[conn] = got
            return True
        self._refuse(conn, decision, got)
        return False

    def release(self, conn: Connection) -> None:
        lease = self.leases.pop(conn, None)
        if lease is not None:
            lease.release()

    def _refuse(self, conn: Connection, decision: Decision, refused: Refused) -> None:
        self.metrics.limited_total.labels(listener=conn.listener.name,
                                          reason=refused.reason).inc()
        conn.close_with("deny", refused.reason, refused.detail,
                        Decision("deny", decision.ruleset, decision.rule, refused.reason))


@functools.lru_cache(maxsize=4096)
def _ip(text: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    try:
        return ipaddress.ip_address(text.partition("%")[0])
    except ValueError:
        return None
