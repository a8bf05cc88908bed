"""Build the flow record (the contract of docs/design.md; fields in docs/observability.md)."""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any

from enforcer.dataplane.lifecycle_types import CONNECT
from enforcer.observe.flowlog import utc_timestamp

if TYPE_CHECKING:
    from enforcer.dataplane.connection import Connection
    from enforcer.policy import Decision


def _endpoint(addr: tuple[str, int] | None) -> dict[str, Any] | None:
    if addr is None:
        return None
    return {"ip": addr[0], "port": addr[1]}


def build(conn: Connection, action: str, close: str, detail: str | None,
          stage: int, *, event: str = "flow") -> dict[str, Any]:
    """The record for ``conn``; ``event="open"`` for the optional record at relay start."""
    lst = conn.listener
    decision = conn.decision
    now = time.monotonic()  # the clock of conn.started_mono (ns resolution)
    record: dict[str, Any] = {
        "ts": utc_timestamp(conn.started + (now - conn.started_mono)),
        "event": event,
        "flow_id": conn.flow_id,
        "node": conn.plane.node_name,
        "listener": lst.name,
        "action": action,
        "ruleset": lst.cfg.ruleset,
        "rule": decision.rule if decision is not None else None,
        "reason": decision.reason if decision is not None and action != "error" else close,
        "client": _endpoint(conn.client_addr),
        "peer": _endpoint(conn.peer),
        "local": _endpoint(conn.local),
        "proxy_protocol": _proxy(conn),
        "tls": _tls(conn),
        "upstream": _upstream(conn, stage),
        "relay": conn.relay,
        "bytes": {"from_client": conn.bytes_from_client, "to_client": conn.bytes_to_client},
        "duration_s": round(now - conn.started_mono, 6),
        "close": close or None,
    }
    if conn.egress is not None:  # egress listeners: what the client asked for, and who
        record["egress"] = conn.egress.record()
    elif conn.original_dst is not None:  # transparent listeners: where the client was going
        record["original_dst"] = _endpoint(conn.original_dst)
    if conn.mesh is not None:  # mesh listeners: mtls | tls | plaintext | external
        record["mesh"] = conn.mesh
    if detail:
        record["detail"] = detail
    return record


def _proxy(conn: Connection) -> dict[str, Any] | None:
    header = conn.proxy_header
    if header is None:
        return None
    return {"version": header.version, "command": header.command,
            "tlvs": header.tlvs_for_record()}


def _tls(conn: Connection) -> dict[str, Any] | None:
    if conn.tls_info is not None:
        out = dict(conn.tls_info)
        out["peer"] = conn.identity.to_record() if conn.identity is not None else None
        return out
    engine = conn.client.tls
    if engine is None:  # plaintext, or closed before the handshake started
        return None
    # The handshake started but did not complete: what is known so far. The SNI comes
    # from the ClientHello; version and cipher are null unless the failure came late
    # (OpenSSL reports them only for a finished handshake).
    return {"version": engine.version(), "cipher": engine.cipher(),
            "sni": getattr(engine.obj, "enforcer_sni", None), "resumed": None, "peer": None,
            "group": engine.group()}


def _upstream(conn: Connection, stage: int) -> dict[str, Any] | None:
    if stage < CONNECT:
        return None
    up = conn.up_rt
    address = up.address_text if conn.original_dst is None else str(conn.upstream_address())
    out: dict[str, Any] = {"name": up.name, "address": address, "tls": up.cfg.tls.mode}
    if conn.upstream_identity is not None:
        out["peer"] = conn.upstream_identity.to_record()
    up_side = conn.upstream
    if up_side is not None and up_side.tls is not None and conn.upstream_identity is not None:
        out["resumed"] = up_side.tls.session_reused
    if up_side is not None and up_side.tls is not None:
        out["group"] = up_side.tls.group()  # the upstream handshake's key exchange
    return out


def deny_detail(decision: Decision) -> str:
    """The record's ``detail`` for a policy denial."""
    if decision.reason == "rule":
        return f"denied by rule {decision.rule} of ruleset {decision.ruleset}"
    if decision.reason == "default":
        return f"denied by the default of ruleset {decision.ruleset}"
    return f"denied: ruleset {decision.ruleset} could not be evaluated (fail closed)"
