"""Policy replay: re-decide recorded flow records with a candidate ruleset. Pure: no I/O.

A flow record (``enforcer.dataplane.flowrecord``) carries every fact a rule can look at:

- ``listener``; ``local.port`` (the listener's port, ``to.ports``);
- ``client.ip``: the real client after PROXY protocol (``from.cidrs``);
- ``tls`` not null: the connection was TLS; ``tls.sni`` (``to.sni``); ``tls.peer``: the
  verified client certificate's SPIFFE ID, CN, DNS/URI/IP SANs, OU and SPKI pin
  (``from.identities``, ``from.dns`` ...);
- ``proxy_protocol.tlvs``: the TLVs rules see (``from.tlvs``);
- ``upstream.peer``: the upstream's verified certificate (``to.server_identities``).

``parse_line`` turns one JSON line into a ``RecordedFlow`` (or ``Skipped`` for records that
hold no decision: ``open`` events and ``action: error``), raising ``ReplayInputError`` with
the key path of the first thing wrong. ``Candidate.decide`` rebuilds the ``FlowFacts`` the
data plane would have built under the candidate config and asks its compiled ruleset; when
the record lacks a fact the decision needs (the upstream's identity of a flow that never
got that far, a listener the candidate does not have ...) the answer is ``Undecidable``
with the reason. ``ReplayReport`` tallies recorded action against candidate action,
grouping the changes by the candidate rule that decides them.

With a full config the listener's ruleset, port and upstream address come from the
candidate (so moving a listener to another ruleset is replayed too); with a rulesets-only
file the record's ``ruleset``, ``local.port`` and ``upstream.address`` are used.

Bounded: a line longer than ``MAX_LINE`` is an error (``split_lines`` never holds more than
that), examples kept per group are capped, peer identities are shared through a bounded
cache so the engine's per-identity caches work across records.
"""

from __future__ import annotations

import ipaddress
from collections import Counter
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import IO, Any, Literal

import orjson

from enforcer.config.model import ListenerConfig, UpstreamConfig
from enforcer.config.passthrough import SniRouter
from enforcer.config.rulesets import TLV_KEYS, RulesetConfig
from enforcer.policy.engine import CompiledRuleset, compile_ruleset
from enforcer.policy.facts import Decision, FlowFacts
from enforcer.tlsconf.identity import PeerIdentity, parse_spiffe_id

MAX_LINE = 1 << 20  # bytes per flow record line (a record with every SAN list full is ~70 KB)
EXAMPLES = 3  # example flows kept per group unless told otherwise
IDENTITY_CACHE = 4096
_FAR_FUTURE = datetime.max.replace(tzinfo=UTC)

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
Action = Literal["allow", "deny"]


class ReplayInputError(ValueError):
    """A line that is not a usable flow record; the message names the key path."""


# a deny record's reason when the policy decided; other reasons (sni_refused,
# mesh_external_denied, not_redirected ...) are refusals the ruleset never saw
POLICY_REASONS = frozenset({"rule", "default", "error"})


@dataclass(frozen=True, slots=True)
class RecordedFlow:
    flow_id: str | None
    ts: str | None
    listener: str
    ruleset: str | None
    action: Action
    rule: str | None
    reason: str | None
    client_ip: IPAddress | None
    local_port: int | None
    tls: bool
    sni: str | None
    identity: PeerIdentity | None
    tlvs: Mapping[str, str]
    upstream_address: tuple[str, int] | None
    upstream_tls: str | None
    server_identity: PeerIdentity | None
    truncated: bool  # a SAN list of tls.peer was capped in the record
    egress: tuple[str, int] | None = None  # egress listeners: the requested host and port


@dataclass(frozen=True, slots=True)
class Skipped:
    why: str  # "event open", "action error"


@dataclass(frozen=True, slots=True)
class Undecidable:
    why: str


# ---------------------------------------------------------------------------- reading
def split_lines(stream: IO[bytes], limit: int = MAX_LINE) -> Iterator[tuple[int, bytes | None]]:
    """(line number, line) for each line of ``stream``; the line is None when it is longer
    than ``limit`` bytes (the rest of it is read and dropped, never held)."""
    number = 0
    while True:
        line = stream.readline(limit + 1)
        if not line:
            return
        number += 1
        if len(line) > limit:
            while line and not line.endswith(b"\n"):
                line = stream.readline(limit)
            yield number, None
            continue
        yield number, line


class _Where:
    """A JSON object and its key path, with typed getters that raise ``ReplayInputError``."""

    __slots__ = ("obj", "path")

    def __init__(self, obj: Any, path: str) -> None:
        if not isinstance(obj, dict):
            raise ReplayInputError(f"{path or 'the line'}: expected a JSON object, got "
                                   f"{_kind(obj)}")
        self.obj = obj
        self.path = path

    def key(self, name: str) -> str:
        return f"{self.path}.{name}" if self.path else name

    def value(self, name: str, required: bool) -> Any:
        if name not in self.obj:
            if required:
                raise ReplayInputError(f"{self.key(name)}: missing")
            return None
        return self.obj[name]

    def text(self, name: str, *, required: bool = False, nullable: bool = True) -> str | None:
        v = self.value(name, required)
        if v is None and nullable:
            return None
        if not isinstance(v, str):
            raise ReplayInputError(f"{self.key(name)}: expected a string, got {_kind(v)}")
        return v

    def port(self, name: str) -> int | None:
        v = self.value(name, False)
        if v is None:
            return None
        if isinstance(v, bool) or not isinstance(v, int) or not 0 <= v <= 65535:
            raise ReplayInputError(f"{self.key(name)}: expected a port number 0-65535, got "
                                   f"{_shown(v)}")
        return v

    def child(self, name: str) -> _Where | None:
        v = self.value(name, False)
        return None if v is None else _Where(v, self.key(name))

    def strings(self, name: str) -> tuple[str, ...]:
        v = self.value(name, False)
        if v is None:
            return ()
        if not isinstance(v, list) or not all(isinstance(x, str) for x in v):
            raise ReplayInputError(f"{self.key(name)}: expected a list of strings")
        return tuple(v)


def _kind(v: Any) -> str:
    if v is None:
        return "null"
    return {bool: "a boolean", int: "a number", float: "a number", str: "a string",
            list: "a list", dict: "an object"}.get(type(v), type(v).__name__)


def _shown(v: Any) -> str:
    text = repr(v)
    return text if len(text) <= 40 else text[:37] + "..."


class IdentityCache:
    """One ``PeerIdentity`` per distinct ``tls.peer`` object, so the engine's per-identity
    caches hit for a peer seen in many records. Emptied when full."""

    def __init__(self, limit: int = IDENTITY_CACHE) -> None:
        self._limit = limit
        self._cache: dict[bytes, PeerIdentity] = {}

    def get(self, where: _Where) -> PeerIdentity:
        key = orjson.dumps(where.obj, option=orjson.OPT_SORT_KEYS)
        ident = self._cache.get(key)
        if ident is None:
            ident = identity_from_record(where)
            if len(self._cache) >= self._limit:
                self._cache.clear()
            self._cache[key] = ident
        return ident


def identity_from_record(w: _Where) -> PeerIdentity:
    """The identity a flow record's ``tls.peer`` (or ``upstream.peer``) describes."""
    spiffe_id = w.text("spiffe_id")
    td = path = None
    if spiffe_id is not None:
        parsed = parse_spiffe_id(spiffe_id)
        if parsed is None:
            raise ReplayInputError(f"{w.key('spiffe_id')}: {_shown(spiffe_id)} is not a "
                                   "SPIFFE ID (spiffe://trust-domain/path)")
        td, path = parsed
    not_after = _FAR_FUTURE
    text = w.text("not_after")
    if text is not None:
        try:
            not_after = datetime.fromisoformat(text.replace("Z", "+00:00"))
        except ValueError:
            raise ReplayInputError(f"{w.key('not_after')}: {_shown(text)} is not an ISO 8601 "
                                   "time") from None
    return PeerIdentity(
        spiffe_id=spiffe_id, trust_domain=td, spiffe_path=path, uri=w.strings("uri"),
        dns=w.strings("dns"), ip=w.strings("ip"), cn=w.text("cn"), o=(), ou=w.strings("ou"),
        issuer_cn=None, serial=w.text("serial") or "", not_after=not_after,
        spki_sha256=w.text("spki_sha256") or "")


def parse_line(line: bytes, identities: IdentityCache | None = None) -> RecordedFlow | Skipped:
    """One flow-log line. Raises ``ReplayInputError`` naming what is wrong."""
    try:
        raw = orjson.loads(line)
    except orjson.JSONDecodeError as exc:
        raise ReplayInputError(f"not JSON ({exc})") from None
    rec = _Where(raw, "")
    event = rec.text("event", required=True, nullable=False)
    if event != "flow":
        return Skipped(f"event {event}")
    action = rec.text("action", required=True, nullable=False)
    if action == "error":
        return Skipped("action error")
    if action not in ("allow", "deny"):
        raise ReplayInputError(f"action: expected allow, deny or error, got {_shown(action)}")
    if rec.text("close") in ALLOWED_THEN_CLOSED:
        action = "allow"  # the policy allowed it; a limit or its certificate ended it
    reason = rec.value("reason", False)
    if action == "deny" and isinstance(reason, str) and reason not in POLICY_REASONS:
        return Skipped(f"refused before the policy ({reason})")
    return _flow(rec, "allow" if action == "allow" else "deny", identities or IdentityCache())


# ``action: deny`` records whose policy decision was allow: refused by the allowing rule's
# limits, closed later for a revoked or expired client certificate, or an egress request
# whose name was allowed and whose every address was refused (egress/resolved.py: the
# addresses are not in the record, so the name's decision is what is replayed)
ALLOWED_THEN_CLOSED = frozenset({"rate_limited", "concurrency_limited", "revoked",
                                 "peer_certificate_expired", "denied_resolved_address"})


def _flow(rec: _Where, action: Action, identities: IdentityCache) -> RecordedFlow:
    listener = rec.text("listener", required=True, nullable=False)
    assert listener is not None
    tls = rec.child("tls")
    peer = tls.child("peer") if tls is not None else None
    upstream = rec.child("upstream")
    server = upstream.child("peer") if upstream is not None else None
    local = rec.child("local")
    return RecordedFlow(
        flow_id=rec.text("flow_id"), ts=rec.text("ts"), listener=listener,
        ruleset=rec.text("ruleset"), action=action, rule=rec.text("rule"),
        reason=rec.text("reason"), client_ip=_client_ip(rec.child("client")),
        local_port=local.port("port") if local is not None else None,
        tls=tls is not None, sni=tls.text("sni") if tls is not None else None,
        identity=identities.get(peer) if peer is not None else None,
        tlvs=_tlvs(rec.child("proxy_protocol")),
        upstream_address=_address(upstream),
        upstream_tls=upstream.text("tls") if upstream is not None else None,
        server_identity=identities.get(server) if server is not None else None,
        truncated=peer is not None and bool(peer.value("truncated", False)),
        egress=_egress(rec.child("egress")),
    )


def _egress(egress: _Where | None) -> tuple[str, int] | None:
    """An egress listener's requested ``(host, port)``; None before a complete request."""
    if egress is None:
        return None
    host, port = egress.text("host"), egress.port("port")
    return (host, port) if host is not None and port is not None else None


def _client_ip(client: _Where | None) -> IPAddress | None:
    if client is None:
        return None
    text = client.text("ip")
    if text is None:
        return None
    try:
        return ipaddress.ip_address(text)
    except ValueError:
        raise ReplayInputError(f"client.ip: {_shown(text)} is not an IP address") from None


def _tlvs(pp: _Where | None) -> Mapping[str, str]:
    """The TLVs rules see (``tlvs_for_policy``) from the record's ``proxy_protocol.tlvs``."""
    tlvs = pp.child("tlvs") if pp is not None else None
    if tlvs is None:
        return {}
    out: dict[str, str] = {}
    for key in TLV_KEYS:
        v = tlvs.value(key, False)
        if v is None:
            continue
        if isinstance(v, bool) or not isinstance(v, str | int):
            raise ReplayInputError(f"{tlvs.key(key)}: expected a string or a number, got "
                                   f"{_kind(v)}")
        out[key] = str(v)
    return out


def _address(upstream: _Where | None) -> tuple[str, int] | None:
    """``upstream.address`` as (host, port); None for a unix socket or no upstream."""
    text = upstream.text("address") if upstream is not None else None
    if text is None or text.startswith("unix:"):
        return None
    host, _, port = text[1:].partition("]:") if text.startswith("[") else text.rpartition(":")
    if not host or not port.isdigit() or not 0 < int(port) <= 65535:
        raise ReplayInputError(f"upstream.address: {_shown(text)} is not host:port")
    return host, int(port)


# ---------------------------------------------------------------------------- deciding
class Candidate:
    """The candidate ruleset(s): with ``listeners`` (a full config) a flow's ruleset, port
    and destination are what the candidate config gives its listener; without (a rulesets
    file) they are the record's."""

    def __init__(self, rulesets: Mapping[str, RulesetConfig],
                 listeners: Mapping[str, ListenerConfig] | None = None,
                 upstreams: Mapping[str, UpstreamConfig] | None = None) -> None:
        self.compiled: dict[str, CompiledRuleset] = {
            name: compile_ruleset(cfg) for name, cfg in rulesets.items()}
        self._uses_destination = {
            name: any(r.to.destinations for r in cfg.rules) for name, cfg in rulesets.items()}
        self.listeners = listeners
        self.upstreams = upstreams or {}

    def decide(self, flow: RecordedFlow) -> Decision | Undecidable:
        where = self._where(flow)
        if isinstance(where, Undecidable):
            return where
        name, port, destination, plain_upstream = where
        ruleset = self.compiled.get(name)
        if ruleset is None:
            return Undecidable(f"ruleset {name!r} is not in the candidate")
        if destination is None and self._uses_destination[name] and self.listeners is None:
            return Undecidable("a rule looks at to.destinations and the record has no upstream "
                               "address (replay with the full config)")
        if flow.egress is not None:  # an egress listener: rules see the request
            port, destination = flow.egress[1], flow.egress
        facts = FlowFacts(listener=flow.listener, port=port, client_ip=flow.client_ip,
                          identity=flow.identity, tls=flow.tls, sni=flow.sni, tlvs=flow.tlvs,
                          destination=destination, server_identity=flow.server_identity,
                          host=flow.egress[0] if flow.egress is not None else None)
        if ruleset.uses_server_identity and flow.server_identity is None and not plain_upstream:
            decision = ruleset.decide_before_upstream(facts)
            if decision is None:
                return Undecidable("the decision depends on the upstream's verified identity "
                                   "(to.server_identities), which the record does not carry")
            return decision
        return ruleset.decide(facts)

    def _where(self, flow: RecordedFlow
               ) -> tuple[str, int, tuple[str, int] | None, bool] | Undecidable:
        if self.listeners is None:
            if flow.ruleset is None:
                return Undecidable("the record names no ruleset")
            if flow.local_port is None:
                return Undecidable("the record has no local port")
            return (flow.ruleset, flow.local_port, flow.upstream_address,
                    flow.upstream_tls == "off")
        lst = self.listeners.get(flow.listener)
        if lst is None:
            return Undecidable(f"listener {flow.listener!r} is not in the candidate config")
        port = flow.local_port if flow.local_port is not None else lst.listen.port
        up = self.upstreams.get(lst.upstream)
        if lst.tls.mode == "passthrough":  # the upstream the recorded SNI routes to
            routed = self._route(lst, flow.sni)
            if routed is None:
                return Undecidable(f"the candidate listener {lst.name!r} has no route for "
                                   f"SNI {flow.sni!r} (strict_sni)")
            up = routed
        destination = (None if up is None or up.address.is_unix
                       else (up.address.host, up.address.port))
        return lst.ruleset, port, destination, up is not None and up.tls.mode == "off"


    def _route(self, lst: ListenerConfig, sni: str | None) -> UpstreamConfig | None:
        """A passthrough listener's upstream for ``sni`` (routes, else the default)."""
        known = {r.upstream: self.upstreams[r.upstream] for r in lst.tls.routes
                 if r.upstream in self.upstreams}
        if len(known) < len({r.upstream for r in lst.tls.routes}):
            return None
        hit = SniRouter(lst.tls.routes, known, self.upstreams.get(lst.upstream)).route(sni)
        return hit[1] if hit is not None else None


# ---------------------------------------------------------------------------- report
@dataclass(slots=True)
class Group:
    """Flows that change the same way, decided by the same candidate rule (or default), or
    that cannot be re-decided for the same reason."""

    title: str
    count: int = 0
    was: Counter[str] = field(default_factory=Counter)  # recorded rule -> flows
    examples: list[RecordedFlow] = field(default_factory=list)


def decided_by(decision: Decision) -> str:
    if decision.reason == "rule":
        return f"rule {decision.rule!r} of ruleset {decision.ruleset!r}"
    if decision.reason == "default":
        return f"the default ({decision.action}) of ruleset {decision.ruleset!r}"
    return f"ruleset {decision.ruleset!r} could not be evaluated (fail closed)"


def recorded_by(flow: RecordedFlow) -> str:
    if flow.rule is not None:
        return f"rule {flow.rule!r}"
    return "the default" if flow.reason == "default" else f"{flow.reason or 'no rule'}"


@dataclass(slots=True)
class ReplayReport:
    examples: int = EXAMPLES
    replayed: int = 0
    unchanged: int = 0
    other_rule: int = 0  # same action, decided by another rule
    truncated: int = 0  # flows whose certificate SAN lists were capped in the record
    skipped: Counter[str] = field(default_factory=Counter)
    to_deny: dict[str, Group] = field(default_factory=dict)
    to_allow: dict[str, Group] = field(default_factory=dict)
    undecidable: dict[str, Group] = field(default_factory=dict)

    def add(self, flow: RecordedFlow, outcome: Decision | Undecidable) -> None:
        self.replayed += 1
        self.truncated += flow.truncated
        if isinstance(outcome, Undecidable):
            self._group(self.undecidable, outcome.why, flow)
        elif outcome.action == flow.action:
            self.unchanged += 1
            self.other_rule += outcome.rule != flow.rule
        else:
            groups = self.to_deny if outcome.action == "deny" else self.to_allow
            self._group(groups, decided_by(outcome), flow)

    def _group(self, groups: dict[str, Group], title: str, flow: RecordedFlow) -> None:
        group = groups.get(title)
        if group is None:
            group = groups[title] = Group(title)
        group.count += 1
        group.was[recorded_by(flow)] += 1
        if len(group.examples) < self.examples:
            group.examples.append(flow)

    @property
    def changed(self) -> int:
        return sum(g.count for g in (*self.to_deny.values(), *self.to_allow.values()))

    @property
    def not_decided(self) -> int:
        return sum(g.count for g in self.undecidable.values())
