"""Reload TLS material, and rotate session-ticket keys, without touching open connections.

``reload_tls_material`` loads every material again (``tlsconf.material`` re-reads files
that change while it reads them, so a half-done Kubernetes ``..data`` swap is never
mixed). For each material whose bytes changed it builds, on the side, every SSL context
that uses it: listener contexts through ``build_listener_context`` (so a certificate that
stops covering a listener's ``server_names`` is refused too) and upstream client contexts.
Only when all of a material's contexts built does it swap them in, one attribute
assignment each on the listener and upstream runtime objects: new handshakes take the
new context, handshakes already running and open connections keep the SSLObject they
have (it holds its own reference to the old context). Upstream session caches are
cleared with their context (a session cannot be resumed under another context).

A material that fails (unreadable, mismatched, expired, not covering a server name, ...)
keeps its last good state; the good ones are still swapped in. The failures are raised
together as one ``MaterialError`` after the swap, for the reloader to log, count and
show in /status.

``rotate_ticket_keys`` rebuilds every listener context from the materials in memory: a
new context draws new ticket keys, so sessions issued under the old ones stop resuming.
"""

from __future__ import annotations

import logging
import ssl
from typing import TYPE_CHECKING

from enforcer.dataplane.context import ListenerRuntime, UpstreamRuntime
from enforcer.tlsconf.material import LoadedMaterial, MaterialError, load_material

if TYPE_CHECKING:
    from enforcer.runtime.server import Server

log = logging.getLogger("enforcer.reload")

Swap = tuple[ListenerRuntime | UpstreamRuntime, ssl.SSLContext]


def reload_tls_material(server: Server) -> list[str]:
    """Returns the names of the materials swapped in (empty: nothing changed).

    Raises ``MaterialError`` (after swapping in the good ones) when any material failed.
    """
    plane = server.plane
    errors: list[str] = []
    swapped: list[str] = []
    for name, mcfg in server.cfg.tls.items():
        try:
            loaded = load_material(mcfg)
            if loaded.fingerprint == plane.materials[name].fingerprint:
                continue
            swaps = _contexts_for(server, name, loaded)
        except MaterialError as exc:
            errors.append(str(exc))
            continue
        _apply(swaps)
        plane.materials[name] = loaded
        _set_expiry(server, name, loaded)
        plane.cert_watch.material_swapped(name, loaded)  # tls.close_on_revocation
        swapped.append(name)
        log.info("tls material %s swapped in (certificate %s, serial %s, not after %s)",
                 name, loaded.cert_file,
                 format(loaded.leaf.serial_number, "x") if loaded.leaf else "-",
                 loaded.not_after.isoformat() if loaded.not_after else "-")
    if errors:
        raise MaterialError("; ".join(errors))
    return swapped


def rotate_ticket_keys(server: Server) -> int:
    """Rebuild every listener context (fresh ticket keys); returns how many."""
    server.plane.enter_ticket_period()  # also with no TLS listener: not due again this hour
    swaps: list[Swap] = []
    for lst in server.plane.listeners:
        if lst.server_ctx is None or lst.cfg.tls.material is None:
            continue
        material = server.plane.materials[lst.cfg.tls.material]
        swaps.append((lst, server.plane.listener_context(material, lst.cfg.tls, lst.name)))
    _apply(swaps)
    return len(swaps)


def _contexts_for(server: Server, name: str, material: LoadedMaterial) -> list[Swap]:
    """Every context that uses material ``name``, built from ``material``; may raise."""
    swaps: list[Swap] = []
    for lst in server.plane.listeners:
        if lst.cfg.tls.material == name and lst.server_ctx is not None:
            swaps.append((lst, server.plane.listener_context(material, lst.cfg.tls, lst.name)))
    seen: set[int] = set()
    mesh = [server.plane.mesh_upstream] if server.plane.mesh_upstream is not None else []
    for up in [lst.upstream for lst in server.plane.listeners] + mesh:
        if id(up) in seen or up.cfg.tls.material != name or up.client_ctx is None:
            continue
        seen.add(id(up))
        try:
            ctx = server.plane.client_context(material, mutual=up.cfg.tls.mode == "mtls",
                                              check_hostname=up.client_ctx.check_hostname)
        except MaterialError as exc:
            raise MaterialError(f"upstreams.{up.name}: {exc}") from None
        swaps.append((up, ctx))
    return swaps


def _apply(swaps: list[Swap]) -> None:
    for target, ctx in swaps:
        if isinstance(target, ListenerRuntime):
            target.server_ctx = ctx
        else:
            target.client_ctx = ctx
            target.session = None


def _set_expiry(server: Server, name: str, material: LoadedMaterial) -> None:
    if material.not_after is not None:
        server.metrics.certificate_expiry_timestamp_seconds.labels(material=name).set(
            material.not_after.timestamp())
