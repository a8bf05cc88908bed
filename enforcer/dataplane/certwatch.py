"""Close open connections whose client certificate chain is revoked by a reloaded CRL, or
expires.

Opt-in per listener: ``tls.close_on_revocation`` and ``tls.close_on_expiry``. Only
connections on such listeners are tracked: ``authenticated`` (called by ``Connection``
right after the TLS handshake gave a verified peer certificate) files the connection under
the chain it was authenticated with (or returns the refusal the connection closes with),
and ``closed`` (from ``DataPlane.connection_closed``) takes it out again. A handshake that
began under the previous CRL and ended after a reload is checked against the CRL in use
when it is filed, so no connection slips between a reload and the walk over open ones.

The chain (``tlsconf.revocation.PeerChain``, leaf first): the one OpenSSL verified at the
handshake (``tlsconf.peerchain``), remembered per leaf (bounded) for later resumptions of
the session, which verify nothing; failing both, rebuilt from the certificates the peer
sent and the material's trust bundle, by issuer name and signature. A chain that cannot
be completed is watched as far as it is known (logged once per leaf). Connections through
one chain share one object, so the work below is per distinct chain.

Revocation: after the TLS reloader swapped in a material whose bytes changed,
``material_swapped`` reads its CRLs (``tlsconf.revocation.CrlIndex``) and closes the
tracked connections of the listeners that use that material whose chain has a revoked
certificate: the leaf, or an intermediate CA between it and the trust anchor (each looked
up on the CRL of its own issuer, signature checked).

Expiry: one timer for the whole plane, not one per connection. It is set for the earliest
``not_after`` among tracked chains, every certificate of a chain counted (re-set when an
earlier one arrives); when it fires, every tracked chain with a certificate past its
``not_after`` has its connections closed, and the timer is set for the next. A scan costs
one comparison per distinct chain and happens only when a certificate expires (or every
``MAX_SLEEP`` at most, so that a wall clock that was stepped is noticed). Open connections
are closed through their lifecycle core (``Connection.certificate_closed``: a
``cert_revoked`` event) and end with ``action: deny``, ``close: revoked`` or
``peer_certificate_expired`` and a ``detail`` naming the certificate (leaf, or which CA of
the chain); every close counts in ``enforcer_certificate_closes_total{listener,reason}``.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import time
from collections import OrderedDict
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any, Final

from cryptography import x509

from enforcer.tlsconf import peerchain
from enforcer.tlsconf.material import LoadedMaterial
from enforcer.tlsconf.revocation import (
    CrlIndex,
    PeerChain,
    complete_chain,
    load_anchors,
    load_chain,
)

if TYPE_CHECKING:
    from enforcer.dataplane.connection import Connection

log = logging.getLogger("enforcer.dataplane")

MAX_SLEEP: Final = 3600.0  # seconds; the expiry timer wakes at least this often while armed
RECENT: Final = 4096  # chains remembered per leaf, for resumed sessions


class CertWatch:
    __slots__ = ("_anchors", "_revoked", "_warned", "by_chain", "chain_of", "materials",
                 "metrics", "recent", "timer", "timer_at")

    def __init__(self, metrics: Any, materials: Mapping[str, LoadedMaterial]) -> None:
        self.metrics = metrics
        self.materials = materials  # the plane's, updated in place by the TLS reloader
        self._revoked: dict[str, tuple[str, CrlIndex]] = {}  # name -> (fingerprint, CRLs)
        self._anchors: dict[str, tuple[str, list[x509.Certificate]]] = {}  # the same: CAs
        self._warned: set[bytes] = set()  # leaves whose chain could not be completed
        self.by_chain: dict[PeerChain, set[Connection]] = {}
        self.chain_of: dict[Connection, PeerChain] = {}
        self.recent: OrderedDict[bytes, PeerChain] = OrderedDict()  # leaf sha256 -> chain
        self.timer: asyncio.TimerHandle | None = None
        self.timer_at: float | None = None  # wall-clock time the timer is set for

    def authenticated(self, conn: Connection) -> tuple[str, str] | None:
        """Track ``conn``; or the (close reason, detail) to refuse it with: a certificate
        of its chain is on the CRL now in use (a handshake that began under the previous
        CRL and ended after the reload, or a resumed session)."""
        tls = conn.listener.cfg.tls
        if conn.identity is None or not (tls.close_on_revocation or tls.close_on_expiry):
            return None
        chain = self._chain(conn, tls.material)
        if chain is None:
            return None
        if tls.close_on_revocation and tls.material is not None:
            found = self.revoked(tls.material).revoked_in(chain)
            if found is not None:
                detail = f"{found[1].role(found[0])} is on the CRL of tls.{tls.material}"
                self._count(conn, "revoked", detail)
                return "revoked", detail
        self.by_chain.setdefault(chain, set()).add(conn)
        self.chain_of[conn] = chain
        if tls.close_on_expiry:
            self._arm(chain.earliest[1].not_after.timestamp())
        return None

    def revoked(self, name: str) -> CrlIndex:
        """The CRLs of material ``name`` as loaded now, read once per CRL file."""
        material = self.materials.get(name)
        if material is None:
            return CrlIndex(None)
        cached = self._revoked.get(name)
        if cached is None or cached[0] != material.fingerprint:
            cached = self._revoked[name] = (material.fingerprint, CrlIndex(material.crl_pem))
        return cached[1]

    def _trust(self, name: str | None) -> list[x509.Certificate]:
        material = self.materials.get(name) if name is not None else None
        if material is None:
            return []
        cached = self._anchors.get(name or "")
        if cached is None or cached[0] != material.fingerprint:
            cached = self._anchors[name or ""] = (material.fingerprint,
                                                  load_anchors(material.ca_pem))
        return cached[1]

    def _chain(self, conn: Connection, material: str | None) -> PeerChain | None:
        """The chain ``conn`` was authenticated with (see the module comment)."""
        engine = conn.client.tls
        leaf = engine.peer_cert_der() if engine is not None else None
        if engine is None or leaf is None:
            return None
        key = hashlib.sha256(leaf).digest()
        try:
            ders = peerchain.verified(engine.obj)
            if ders is not None:
                chain = load_chain(ders)
                self._remember(key, chain)
                return chain
            known = self.recent.get(key)
            if known is not None:
                self.recent.move_to_end(key)
                return known
            chain = complete_chain(leaf, peerchain.sent(engine.obj) or (), self._trust(material))
        except ValueError as exc:  # identity_from_der read the leaf; a CA it could not
            log.warning("flow %s: cannot read the client's certificate chain (%s); only "
                        "the leaf is watched", conn.flow_id, exc)
            return load_chain([leaf], complete=False)
        if not chain.complete and key not in self._warned and len(self._warned) < RECENT:
            self._warned.add(key)
            log.warning("flow %s on %s: a resumed TLS session whose certificate chain is "
                        "not known here (its CAs are not in the trust bundle); watching %d "
                        "of its certificates", conn.flow_id, conn.listener.name,
                        len(chain.certs))
        self._remember(key, chain)
        return chain

    def _remember(self, key: bytes, chain: PeerChain) -> None:
        self.recent[key] = chain
        self.recent.move_to_end(key)
        if len(self.recent) > RECENT:
            self.recent.popitem(last=False)

    def closed(self, conn: Connection) -> None:
        chain = self.chain_of.pop(conn, None)
        if chain is None:
            return
        conns = self.by_chain.get(chain)
        if conns is not None:
            conns.discard(conn)
            if not conns:
                del self.by_chain[chain]
        if not self.by_chain and self.timer is not None:
            self.timer.cancel()
            self.timer = self.timer_at = None

    def material_swapped(self, name: str, material: LoadedMaterial) -> int:
        """Close the tracked connections on listeners using ``name`` whose chain the
        material's CRLs revoke; returns how many. ``material`` is already in
        ``materials``."""
        if not self.by_chain:
            return 0
        index = self.revoked(name)
        if not index:
            return 0
        closed = 0
        for chain, conns in list(self.by_chain.items()):
            found = index.revoked_in(chain)
            if found is None:
                continue
            detail = f"{found[1].role(found[0])} was revoked by the reloaded CRL of tls.{name}"
            for conn in list(conns):
                tls = conn.listener.cfg.tls
                if tls.material == name and tls.close_on_revocation:
                    self._close(conn, "revoked", detail)
                    closed += 1
        return closed

    def expire(self, now: float | None = None) -> int:
        """Close connections with a certificate past ``not_after`` in their chain; returns
        how many."""
        now = time.time() if now is None else now
        closed = 0
        upcoming: float | None = None
        for chain, conns in list(self.by_chain.items()):
            watched = [c for c in conns if c.listener.cfg.tls.close_on_expiry]
            if not watched:
                continue
            depth, cert = chain.earliest
            when = cert.not_after.timestamp()
            if when > now:
                upcoming = when if upcoming is None else min(upcoming, when)
                continue
            detail = f"{cert.role(depth)} expired at {cert.not_after.isoformat()}"
            for conn in watched:
                self._close(conn, "peer_certificate_expired", detail)
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
