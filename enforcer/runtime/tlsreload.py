"""Reload TLS material: load every material again, and for those that changed build new
SSL contexts on the side, then swap them in for new handshakes (open connections keep
theirs). Any failure raises before anything is swapped, so the last good state stays.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from enforcer.tlsconf.context import build_client_context, build_server_context
from enforcer.tlsconf.material import LoadedMaterial, load_material

if TYPE_CHECKING:
    from enforcer.runtime.server import Server


def reload_tls_material(server: Server) -> list[str]:
    """Returns the names of the materials that changed (empty: nothing to do)."""
    plane = server.plane
    fresh: dict[str, LoadedMaterial] = {}
    for name, mcfg in server.cfg.tls.items():
        loaded = load_material(mcfg)
        if loaded.fingerprint != plane.materials[name].fingerprint:
            fresh[name] = loaded
    if not fresh:
        return []
    updates = _build_contexts(server, fresh)
    for target, ctx in updates:
        if hasattr(target, "server_ctx"):
            target.server_ctx = ctx
        else:
            target.client_ctx = ctx
            target.session = None
    plane.materials.update(fresh)
    for name, m in fresh.items():
        if m.not_after is not None:
            server.metrics.certificate_expiry_timestamp_seconds.labels(material=name).set(
                m.not_after.timestamp())
    return sorted(fresh)


def _build_contexts(server: Server, fresh: dict[str, LoadedMaterial]) -> list[tuple[Any, Any]]:
    from enforcer.dataplane.plane import _remember_sni

    updates: list[tuple[Any, Any]] = []
    for lst in server.plane.listeners:
        name = lst.cfg.tls.material
        if name in fresh and lst.server_ctx is not None:
            ctx = build_server_context(fresh[name], lst.cfg.tls.client_auth)
            ctx.sni_callback = _remember_sni
            updates.append((lst, ctx))
    seen: set[int] = set()
    for lst in server.plane.listeners:
        up = lst.upstream
        name = up.cfg.tls.material
        if id(up) in seen or name not in fresh or up.client_ctx is None:
            continue
        seen.add(id(up))
        ctx = build_client_context(fresh[name], mutual=up.cfg.tls.mode == "mtls",
                                   check_hostname=up.client_ctx.check_hostname)
        updates.append((up, ctx))
    return updates
