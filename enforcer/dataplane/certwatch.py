"""Close open connections whose client certificate is revoked by a reloaded CRL, or expires.

Opt-in per listener: ``tls.close_on_revocation`` and ``tls.close_on_expiry``. Only
connections on such listeners are tracked: ``authenticated`` (called by ``Connection``
right after the TLS handshake gave a verified peer certificate) files the connection under
its ``PeerIdentity`` (or returns the refusal the connection closes with) (one object per distinct certificate, ``tlsconf.identity``), and
``closed`` (from ``DataPlane.connection_closed``) takes it out again. A handshake that
began under the previous CRL and ended after a reload is checked against the CRL in use
when it is filed, so no connection slips between a reload and the walk over open ones.

Revocation: after the TLS reloader swapped in a material whose bytes changed,
``material_swapped`` reads the revoked (issuer, serial) pairs of its CRL
(``tlsconf.revocation``) and closes the tracked connections of the listeners that use
that material, whose certificate is on it: one set lookup per distinct certificate.

Expiry: one timer for the whole plane, not one per connection. It is set for the earliest
``not_after`` among tracked certificates (re-set when an earlier one arrives); when it
fires, every tracked certificate past its ``not_after`` has its connections closed, and
the timer is set for the next. A scan costs one comparison per distinct certificate and
happens only when a certificate expires (or every ``MAX_SLEEP`` at most, so that a wall
clock that was stepped is noticed). Open connections are closed through their lifecycle
core (``Connection.certificate_closed``: a ``cert_revoked`` event) and end with
``action: deny``, ``close: revoked`` or ``peer_certificate_expired``; every close counts in
``enforcer_certificate_closes_total{listener,reason}``.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from enforcer.tlsconf.identity import PeerIdentity
from enforcer.tlsconf.material import LoadedMaterial
from enforcer.tlsconf.revocation import Revoked, is_revoked, revoked_set

if TYPE_CHECKING:
    from enforcer.dataplane.connection import Connection

log = logging.getLogger("enforcer.dataplane")

MAX_SLEEP = 3600.0  # seconds; the expiry timer wakes at least this often while armed


class CertWatch:
    __slots__ = ("_revoked", "by_identity", "materials", "metrics", "timer", "timer_at")

    def __init__(self, metrics: Any, materials: Mapping[str, LoadedMaterial]) -> None:
        self.metrics = metrics
        self.materials = materials  # the plane's, updated in place by the TLS reloader
        self._revoked: dict[str, tuple[str, Revoked]] = {}  # name -> (fingerprint, set)
        self.by_identity: dict[PeerIdentity, set[Connection]] = {}
        self.timer: asyncio.TimerHandle | None = None
        self.timer_at: float | None = None  # wall-clock time the timer is set for

    def authenticated(self, conn: Connection) -> tuple[str, str] | None:
        """Track ``conn``; or the (close reason, detail) to refuse it with: its certificate
        is on the CRL now in use (a handshake that began under the previous CRL and ended
        after the reload)."""
        ident = conn.identity
        tls = conn.listener.cfg.tls
        if ident is None or not (tls.close_on_revocation or tls.close_on_expiry):
            return None
        if tls.close_on_revocation and tls.material is not None \
                and is_revoked(ident, self.revoked(tls.material)):
            detail = (f"the client certificate (serial {ident.serial}) is on the CRL of "
                      f"tls.{tls.material}")
            self._count(conn, "revoked", detail)
            return "revoked", detail
        self.by_identity.setdefault(ident, set()).add(conn)
        if tls.close_on_expiry:
            self._arm(ident.not_after.timestamp())
        return None

    def revoked(self, name: str) -> Revoked:
        """The revoked set of material ``name`` as loaded now, read once per CRL."""
        material = self.materials.get(name)
        if material is None:
            return frozenset()
        cached = self._revoked.get(name)
        if cached is None or cached[0] != material.fingerprint:
            cached = self._revoked[name] = (material.fingerprint, revoked_set(material.crl_pem))
        return cached[1]

    def closed(self, conn: Connection) -> None:
        ident = conn.identity
        if ident is None:
            return
        conns = self.by_identity.get(ident)
        if conns is not None:
            conns.discard(conn)
            if not conns:
                del self.by_identity[ident]
        if not self.by_identity and self.timer is not None:
            self.timer.cancel()
            self.timer = self.timer_at = None

    def material_swapped(self, name: str, material: LoadedMaterial) -> int:
        """Close the tracked connections on listeners using ``name`` whose certificate the
        material's CRL revokes; returns how many. ``material`` is already in
        ``materials``."""
        if not self.by_identity:
            return 0
        revoked = self.revoked(name)
        if not revoked:
            return 0
        closed = 0
        for ident, conns in list(self.by_identity.items()):
            if not is_revoked(ident, revoked):
                continue
            for conn in list(conns):
                tls = conn.listener.cfg.tls
                if tls.material == name and tls.close_on_revocation:
                    self._close(conn, "revoked", f"the client certificate (serial "
                                f"{ident.serial}) was revoked by the reloaded CRL of tls.{name}")
                    closed += 1
        return closed

    def expire(self, now: float | None = None) -> int:
        """Close connections whose certificate is past ``not_after``; returns how many."""
        now = time.time() if now is None else now
        closed = 0
        upcoming: float | None = None
        for ident, conns in list(self.by_identity.items()):
            watched = [c for c in conns if c.listener.cfg.tls.close_on_expiry]
            if not watched:
                continue
            when = ident.not_after.timestamp()
            if when > now:
                upcoming = when if upcoming is None else min(upcoming, when)
                continue
            for conn in watched:
                self._close(conn, "peer_certificate_expired", "the client certificate "
                            f"(serial {ident.serial}) expired at {ident.not_after.isoformat()}")
                closed += 1
        if upcoming is not None:
            self._arm(upcoming)
        return closed

    def _arm(self, when: float) -> None:
        if self.timer is not None and self.timer_at is not None and self.timer_at <= when:
            return
        if self.timer is not None:
            self.timer.cancel()
        delay = min(max(0.0, when - time.time()), MAX_SLEEP)
        self.timer = asyncio.get_running_loop().call_later(delay, self._fire)
        self.timer_at = when

    def _fire(self) -> None:
        self.timer = self.timer_at = None
        try:
            self.expire()
        except Exception:  # a bug must not stop the loop; the next arrival re-arms
            log.exception("certificate expiry sweep failed")

    def _close(self, conn: Connection, reason: str, detail: str) -> None:
        self._count(conn, reason, detail)
        conn.certificate_closed(reason, detail)

    def _count(self, conn: Connection, reason: str, detail: str) -> None:
        log.info("flow %s on %s: %s; closing", conn.flow_id, conn.listener.name, detail)
        self.metrics.certificate_closes_total.labels(listener=conn.listener.name,
                                                     reason=reason).inc()

    def stop(self) -> None:
        if self.timer is not None:
            self.timer.cancel()
            self.timer = self.timer_at = None
