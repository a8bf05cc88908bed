"""Ruleset schema (``rulesets:`` in the config, or a separate ``rulesets_file``).

``parse_rulesets(node)`` walks the raw YAML through the config ``Node`` reader, so every
problem is recorded with its key path (``rulesets.inbound.rules[2].from.cidrs[0]: bad
CIDR ...``) and parsing goes on to find the next one. The result is plain frozen
dataclasses holding validated, normalised patterns; ``enforcer.policy`` compiles them.

    rulesets:
      NAME:
        default: allow | deny                  # required
        reevaluate_on_reload: false
        rules:
          - name: NAME                         # required, unique within the ruleset
            description: free text
            action: allow | deny               # required
            from:                              # AND across keys, OR within a list
              identities: [spiffe://td/ns/*/sa/**]     # * one segment, ** any number (>= 0)
              trust_domains: [td]
              dns: [api.shop, "*.shop.svc"]            # *. = exactly one leftmost label
              cn: [frontend, "front*"]                 # * = any characters
              ou: [payments]
              spki_sha256: [BASE64 or hex]
              cidrs: [10.0.0.0/8, 2001:db8::/32]
              tlvs: {aws_vpce_id: [vpce-*], azure_link_id: [], gcp_psc_id: [], authority: [], alpn: []}
              tls: required | none
            to:
              listeners: [inbound]
              ports: [15006, "8000-8100"]
              sni: ["*.shop.example"]
              destinations: ["db.shop:5432", "10.0.0.0/8", "[2001:db8::/32]:443", "*.svc:*"]
              server_identities: [spiffe://td/ns/db/**, "db.shop"]  # spiffe glob or DNS glob
              cidrs: [10.0.0.0/8]              # destination address (transparent listeners)
            ports: [15006]                     # shorthand for to.ports (docs/configuration.md)
            limits:                            # allow rules only (docs/limits-and-revocation.md)
              per: identity | client | listener        # required: what one counter counts
              max_connections: 100             # open at once, per key
              rate: 10/s                       # new connections per key: N/s, N/m or N/h
              burst: 20                        # bucket size (default: rate per second, >= 1)
              ipv4_prefix: 32                  # per client: aggregate addresses per /N
              ipv6_prefix: 64

A single scalar is accepted wherever a list is. An explicitly empty list is an error:
it would silently match nothing (leave the key out to match anything); ``from: {}``
matches everything.
"""

from __future__ import annotations

import base64
import binascii
import ipaddress
import math
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Literal, cast

from enforcer.config.model import ListenerConfig, UpstreamConfig
from enforcer.config.reader import Node

Action = Literal["allow", "deny"]
TlsRequirement = Literal["required", "none"]
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network
_Check = Callable[[str], "str | None"]
_Normalize = Callable[[str], str]

TLV_KEYS = ("aws_vpce_id", "azure_link_id", "gcp_psc_id", "authority", "alpn", "identity")
RULESET_KEYS = ("default", "rules", "reevaluate_on_reload")
RULE_KEYS = ("name", "description", "action", "from", "to", "ports", "limits")
LIMITS_KEYS = ("per", "max_connections", "rate", "burst", "ipv4_prefix", "ipv6_prefix")
LimitPer = Literal["identity", "client", "listener"]
FROM_KEYS = ("identities", "trust_domains", "dns", "cn", "ou", "spki_sha256", "cidrs", "tlvs",
             "tls")
TO_KEYS = ("listeners", "ports", "sni", "destinations", "server_identities", "cidrs", "hosts")


@dataclass(frozen=True, slots=True)
class PortRange:
    low: int
    high: int

    def __str__(self) -> str:
        return str(self.low) if self.low == self.high else f"{self.low}-{self.high}"


ANY_PORT = PortRange(1, 65535)


@dataclass(frozen=True, slots=True)
class DestinationConfig:
    """``host:port`` / ``CIDR`` / ``[v6 CIDR]:ports``: exactly one of host and network."""

    text: str
    host: str | None = None  # DNS glob, lowercase
    network: IPNetwork | None = None
    ports: tuple[PortRange, ...] = ()  # empty = any port


@dataclass(frozen=True, slots=True)
class FromConfig:
    identities: tuple[str, ...] = ()
    trust_domains: tuple[str, ...] = ()
    dns: tuple[str, ...] = ()
    cn: tuple[str, ...] = ()
    ou: tuple[str, ...] = ()
    spki_sha256: tuple[str, ...] = ()  # normalised to standard padded base64
    cidrs: tuple[IPNetwork, ...] = ()
    tlvs: Mapping[str, tuple[str, ...]] = field(default_factory=lambda: MappingProxyType({}))
    tls: TlsRequirement | None = None


@dataclass(frozen=True, slots=True)
class ToConfig:
    listeners: tuple[str, ...] = ()
    ports: tuple[PortRange, ...] = ()
    sni: tuple[str, ...] = ()
    destinations: tuple[DestinationConfig, ...] = ()
    server_identities: tuple[str, ...] = ()  # spiffe:// globs or DNS globs
    cidrs: tuple[IPNetwork, ...] = ()  # the destination's address (transparent listeners)
    hosts: tuple[str, ...] = ()  # egress listeners: the requested host (DNS globs)


@dataclass(frozen=True, slots=True)
class LimitsConfig:
    """A rule's ``limits``: counted per key (``policy.limits``)."""

    per: LimitPer
    max_connections: int | None = None  # None: no concurrency limit
    rate: float | None = None  # new connections per second; None: no rate limit
    burst: int = 0  # token bucket size (with a rate)
    ipv4_prefix: int = 32
    ipv6_prefix: int = 64


@dataclass(frozen=True, slots=True)
class RuleConfig:
    name: str
    action: Action
    from_: FromConfig = field(default_factory=FromConfig)  # ``from:`` in YAML
    to: ToConfig = field(default_factory=ToConfig)
    description: str | None = None
    limits: LimitsConfig | None = None


@dataclass(frozen=True, slots=True)
class RulesetConfig:
    name: str
    default: Action
    rules: tuple[RuleConfig, ...] = ()
    reevaluate_on_reload: bool = False


# ---------------------------------------------------------------------------- patterns
# Validators return None when the pattern is good, else a message. They are public so
# the policy compiler's tests and other tools can share one definition of the syntax.
_TD_CHARS = re.compile(r"[a-z0-9._*-]+")
_SEGMENT_CHARS = re.compile(r"[A-Za-z0-9._*-]+")
_DNS_LABEL = re.compile(r"[a-z0-9_]([a-z0-9_-]*[a-z0-9_])?")


def identity_glob_problem(text: str) -> str | None:
    """``spiffe://td/seg/...`` where a segment is literal, contains ``*``, or is ``**``."""
    if not text.startswith("spiffe://"):
        return "must start with spiffe:// (e.g. spiffe://cluster.local/ns/shop/sa/*)"
    rest = text[len("spiffe://"):]
    if not rest:
        return "needs a trust domain after spiffe://"
    segments = rest.split("/")
    for i, seg in enumerate(segments):
        if seg == "**":
            continue
        if not seg:
            return "has an empty path segment (// or a trailing /)"
        if "**" in seg:
            return "** must be a whole path segment (/**/)"
        if seg in (".", ".."):
            return "has a . or .. segment"
        if i == 0 and not _TD_CHARS.fullmatch(seg):
            return (f"bad trust domain {seg!r} (lowercase letters, digits, '.', '-', '_'; "
                    "* as a wildcard)")
        if i > 0 and not _SEGMENT_CHARS.fullmatch(seg):
            return f"bad path segment {seg!r} (letters, digits, '.', '-', '_'; * as a wildcard)"
    return None


def dns_glob_problem(text: str) -> str | None:
    """A DNS name, or ``*.`` + DNS name: the ``*`` is exactly one leftmost label."""
    labels = text.split(".")
    if labels[0] == "*":
        labels = labels[1:]
        if not labels:
            return "* needs a domain after it (*.example.com)"
    for label in labels:
        if "*" in label:
            return "* is only allowed as the whole leftmost label (*.example.com)"
        if not _DNS_LABEL.fullmatch(label):
            return f"bad DNS label {label!r}" if label else "has an empty label"
    return None


def normalize_dns(text: str) -> str:
    text = text.strip().lower()
    return text[:-1] if text.endswith(".") and len(text) > 1 else text


def trust_domain_problem(text: str) -> str | None:
    if not _TD_CHARS.fullmatch(text) or "*" in text:
        return "bad trust domain (lowercase letters, digits, '.', '-', '_')"
    return None


def normalize_spki(text: str) -> str | None:
    """Standard padded base64 of a 32-byte sha256 given as base64 (std/url) or hex."""
    raw: bytes | None = None
    compact = text.strip()
    if re.fullmatch(r"[0-9a-fA-F]{64}", compact):
        raw = bytes.fromhex(compact)
    else:
        padded = compact + "=" * (-len(compact) % 4)
        try:
            raw = base64.b64decode(padded.replace("-", "+").replace("_", "/"), validate=True)
        except (binascii.Error, ValueError):
            raw = None
    if raw is None or len(raw) != 32:
        return None
    return base64.b64encode(raw).decode("ascii")


def parse_port_range(value: object) -> PortRange | None:
    """``443``, ``"443"`` or ``"8000-8100"`` within 1-65535; None if invalid."""
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return PortRange(value, value) if 1 <= value <= 65535 else None
    if not isinstance(value, str):
        return None
    m = re.fullmatch(r"\s*(\d{1,5})\s*(?:-\s*(\d{1,5})\s*)?", value)
    if m is None:
        return None
    low = int(m.group(1))
    high = int(m.group(2)) if m.group(2) else low
    if not 1 <= low <= high <= 65535:
        return None
    return PortRange(low, high)


def parse_destination(text: str) -> DestinationConfig | str:
    """A ``DestinationConfig``, or a message saying what is wrong."""
    text = text.strip()
    host, ports_text = _split_destination(text)
    if host is None:
        return "bad destination (use host:port, CIDR, CIDR:port or [v6 CIDR]:port)"
    ports: tuple[PortRange, ...] = ()
    if ports_text is not None and ports_text != "*":
        pr = parse_port_range(ports_text)
        if pr is None:
            return f"bad port {ports_text!r} (1-65535, a range 8000-8100, or *)"
        ports = (pr,)
    try:
        return DestinationConfig(text, network=ipaddress.ip_network(host, strict=False),
                                 ports=ports)
    except ValueError:
        pass
    name = normalize_dns(host)
    problem = dns_glob_problem(name)
    if problem is not None:
        return f"bad host {host!r}: {problem}"
    return DestinationConfig(text, host=name, ports=ports)


def _split_destination(text: str) -> tuple[str | None, str | None]:
    if text.startswith("["):
        end = text.find("]")
        if end < 0:
            return None, None
        after = text[end + 1:]
        if after and not after.startswith(":"):
            return None, None
        return text[1:end], (after[1:] if after else None)
    if text.count(":") >= 2:  # a bare IPv6 address or CIDR: any port
        return text, None
    host, sep, port = text.rpartition(":")
    if not sep:
        return text, None
    return (host, port) if host else (None, None)


# ---------------------------------------------------------------------------- parsing
def parse_rulesets(node: Node) -> dict[str, RulesetConfig]:
    out: dict[str, RulesetConfig] = {}
    for name, rs in node.items():
        ruleset = _ruleset(name, rs)
        if ruleset is not None:
            out[name] = ruleset
    return out


def _ruleset(name: str, rs: Node) -> RulesetConfig | None:
    if not rs.keys(RULESET_KEYS):
        if rs.is_null:
            rs.error("expected a mapping with default: allow|deny and rules: [...]")
        return None
    default = _action(rs["default"])
    rules: list[RuleConfig] = []
    seen: dict[str, str] = {}
    for item in rs["rules"].list():
        rule = _rule(item)
        if rule is None:
            continue
        if rule.name in seen:
            item["name"].error(f"duplicate rule name {rule.name!r} (also {seen[rule.name]})")
        else:
            seen[rule.name] = item.path
        rules.append(rule)
    return RulesetConfig(name, default, tuple(rules), rs["reevaluate_on_reload"].bool(False))


def _action(node: Node) -> Action:
    if node.is_null:
        node.error("is required (allow or deny)")
        return "deny"
    return cast(Action, node.choice(("allow", "deny"), "deny"))


def _rule(item: Node) -> RuleConfig | None:
    if not item.keys(RULE_KEYS):
        if item.is_null:
            item.error("expected a rule mapping with name and action")
        return None
    name = item["name"].str("", required=True)
    if not name and not item["name"].is_null:
        item["name"].error("must not be empty")
    action = _action(item["action"])
    from_ = _from(item["from"])
    to = _to(item["to"])
    if not item["ports"].is_null:
        if to.ports:
            item["ports"].error("give ports here or under to.ports, not both")
        else:
            to = ToConfig(to.listeners, _ports(item["ports"]), to.sni, to.destinations,
                          to.server_identities, to.cidrs)
    limits = _limits(item["limits"])
    if limits is not None and action != "allow":
        item["limits"].error("goes on allow rules (a denied connection is never counted)")
    return RuleConfig(name, action, from_, to, item["description"].str(None), limits)


_RATE = re.compile(r"\s*(\d+(?:\.\d+)?)\s*/\s*(s|m|h)\s*")
_PER_SECOND = {"s": 1.0, "m": 60.0, "h": 3600.0}


def parse_rate(text: str) -> float | None:
    """``"10/s"``, ``"600/m"``, ``"2.5/s"`` -> connections per second; None if invalid."""
    m = _RATE.fullmatch(text)
    if m is None:
        return None
    value = float(m.group(1)) / _PER_SECOND[m.group(2)]
    return value if value > 0 else None


def _limits(node: Node) -> LimitsConfig | None:
    if node.is_null or not node.keys(LIMITS_KEYS):
        return None
    per = node["per"]
    if per.is_null:
        per.error("is required (identity, client or listener: what one counter counts)")
    kind = cast(LimitPer, per.choice(("identity", "client", "listener"), "listener"))
    max_conn = node["max_connections"]
    max_connections = None if max_conn.is_null else max_conn.int(1, minimum=1)
    rate = _rate(node["rate"])
    burst_node = node["burst"]
    burst = burst_node.int(1, minimum=1)
    if node["rate"].is_null and not burst_node.is_null:
        burst_node.error("goes with rate (the token bucket's size)")
    if rate is not None and burst_node.is_null:
        burst = max(1, math.ceil(rate))
    if max_conn.is_null and node["rate"].is_null:
        node.error("needs max_connections, rate, or both")
    prefixes = []
    for key, top in (("ipv4_prefix", 32), ("ipv6_prefix", 128)):
        child = node[key]
        prefixes.append(child.int(top if key == "ipv4_prefix" else 64, minimum=0, maximum=top))
        if not child.is_null and kind != "client":
            child.error("goes with per: client (how client addresses are grouped)")
    return LimitsConfig(kind, max_connections, rate, burst, prefixes[0], prefixes[1])


def _rate(node: Node) -> float | None:
    if node.is_null:
        return None
    text = node.str(None)
    if text is None:
        return None
    rate = parse_rate(text)
    if rate is None:
        node.error(f"bad rate {text!r} (N/s, N/m or N/h with N > 0, e.g. 100/s or 600/m)")
    return rate


def _from(node: Node) -> FromConfig:
    if node.is_null or not node.keys(FROM_KEYS):
        return FromConfig()
    tls = node["tls"]
    return FromConfig(
        identities=_patterns(node["identities"], identity_glob_problem, "identity glob"),
        trust_domains=_patterns(node["trust_domains"], trust_domain_problem, "trust domain",
                                normalize=_strip_spiffe),
        dns=_patterns(node["dns"], dns_glob_problem, "DNS name", normalize=normalize_dns),
        cn=_patterns(node["cn"], _nonempty, "CN pattern"),
        ou=_patterns(node["ou"], _nonempty, "OU pattern"),
        spki_sha256=_spki(node["spki_sha256"]),
        cidrs=_cidrs(node["cidrs"]),
        tlvs=_tlvs(node["tlvs"]),
        tls=None if tls.is_null else cast(TlsRequirement, tls.choice(("required", "none"),
                                                                     "required")),
    )


def _to(node: Node) -> ToConfig:
    if node.is_null or not node.keys(TO_KEYS):
        return ToConfig()
    return ToConfig(
        listeners=_patterns(node["listeners"], _nonempty, "listener name"),
        ports=_ports(node["ports"]),
        sni=_patterns(node["sni"], dns_glob_problem, "SNI pattern", normalize=normalize_dns),
        destinations=_destinations(node["destinations"]),
        server_identities=_patterns(node["server_identities"], _server_identity_problem,
                                    "server identity", normalize=_normalize_server_identity),
        cidrs=_cidrs(node["cidrs"]),
        hosts=_patterns(node["hosts"], dns_glob_problem, "host pattern", normalize=normalize_dns),
    )


def _items(node: Node) -> list[Node]:
    """List items (a scalar counts as a one-item list); an explicit [] is an error."""
    _check_not_empty(node)
    return node.list(allow_scalar=True)


def _check_not_empty(node: Node) -> None:
    if isinstance(node.value, list) and not node.value:
        node.error("is an empty list, which would match nothing (leave the key out to match "
                   "anything)")


def _patterns(node: Node, problem_of: _Check, what: str, *,
              normalize: _Normalize | None = None) -> tuple[str, ...]:
    out: list[str] = []
    for item in _items(node):
        text = item.str(None)
        if text is None:
            continue
        value = normalize(text) if normalize is not None else text
        problem = problem_of(value)
        if problem is not None:
            item.error(f"bad {what} {text!r}: {problem}")
        else:
            out.append(value)
    return tuple(out)


def port_ranges(node: Node) -> tuple[tuple[int, int], ...]:
    """A ports list (``[8080, "9000-9100"]``) as (low, high) pairs; problems on ``node``."""
    return tuple((pr.low, pr.high) for pr in _ports(node))


def _ports(node: Node) -> tuple[PortRange, ...]:
    out: list[PortRange] = []
    for item in _items(node):
        pr = parse_port_range(item.value)
        if pr is None:
            item.error(f"bad port {item.value!r} (1-65535, or a range like \"8000-8100\")")
        else:
            out.append(pr)
    return tuple(out)


def _cidrs(node: Node) -> tuple[IPNetwork, ...]:
    _check_not_empty(node)
    return node.cidr_list()


def _spki(node: Node) -> tuple[str, ...]:
    out: list[str] = []
    for item in _items(node):
        text = item.str(None)
        if text is None:
            continue
        pin = normalize_spki(text)
        if pin is None:
            item.error(f"bad spki_sha256 {text!r} (base64 or hex of a 32-byte sha256)")
        else:
            out.append(pin)
    return tuple(out)


def _tlvs(node: Node) -> Mapping[str, tuple[str, ...]]:
    out: dict[str, tuple[str, ...]] = {}
    if node.is_null or not node.keys(TLV_KEYS):
        return MappingProxyType(out)
    for key, child in node.items():
        if key in TLV_KEYS:
            out[key] = _patterns(child, _nonempty, f"{key} pattern")
    return MappingProxyType(out)


def _destinations(node: Node) -> tuple[DestinationConfig, ...]:
    out: list[DestinationConfig] = []
    for item in _items(node):
        text = item.str(None)
        if text is None:
            continue
        parsed = parse_destination(text)
        if isinstance(parsed, str):
            item.error(f"bad destination {text!r}: {parsed}")
        else:
            out.append(parsed)
    return tuple(out)


def _nonempty(text: str) -> str | None:
    return "is empty" if not text else None


def _strip_spiffe(text: str) -> str:
    return text[len("spiffe://"):].rstrip("/") if text.startswith("spiffe://") else text


def _server_identity_problem(text: str) -> str | None:
    if text.startswith("spiffe://"):
        return identity_glob_problem(text)
    return dns_glob_problem(text)


def _normalize_server_identity(text: str) -> str:
    return text if text.startswith("spiffe://") else normalize_dns(text)



# ---------------------------------------------------------------------------- references
# Rules are checked against the listeners that run them. A rule that can never match is
# almost always a mistake, and a silent one: a deny rule that never fires looks like
# protection. Rulesets no listener of this config uses are skipped (one rulesets file can
# serve several enforcers), and a fact is only called impossible when every listener that
# runs the rule lacks it.
_PEER_KEYS = ("identities", "trust_domains", "dns", "cn", "ou", "spki_sha256")


def reference_problems(rulesets: Mapping[str, RulesetConfig],
                       listeners: Sequence[ListenerConfig],
                       upstreams: Mapping[str, UpstreamConfig]) -> list[tuple[str, str, str]]:
    """``(ruleset, key path, message)`` for every rule that names an unknown listener, or
    names a listener that runs another ruleset, or can never match on the listeners that
    run it (peer certificate keys on plaintext listeners, TLVs without PROXY protocol ...)."""
    by_name = {lst.name: lst for lst in listeners}
    out: list[tuple[str, str, str]] = []
    for name, rs in rulesets.items():
        users = [lst for lst in listeners if lst.ruleset == name]
        if not users:
            continue
        for i, rule in enumerate(rs.rules):
            base = f"rulesets.{name}.rules[{i}]"
            runs_on = _listeners_named(rule, name, users, by_name, base, out)
            for message in _impossible(rule, runs_on, upstreams):
                out.append((name, base, f"{message}, so rule {rule.name!r} can never match"))
    return out


def _listeners_named(rule: RuleConfig, ruleset: str, users: list[ListenerConfig],
                     by_name: Mapping[str, ListenerConfig], base: str,
                     out: list[tuple[str, str, str]]) -> list[ListenerConfig]:
    if not rule.to.listeners:
        return users
    known = ", ".join(by_name) or "none"
    runs_on: list[ListenerConfig] = []
    for j, lname in enumerate(rule.to.listeners):
        path = f"{base}.to.listeners[{j}]"
        lst = by_name.get(lname)
        if lst is None:
            out.append((ruleset, path, f"unknown listener {lname!r} (known: {known})"))
        elif lst.ruleset != ruleset:
            out.append((ruleset, path, f"listener {lname!r} runs ruleset {lst.ruleset!r}, not "
                        f"{ruleset!r} (listeners running {ruleset!r}: "
                        f"{', '.join(u.name for u in users)})"))
        else:
            runs_on.append(lst)
    return runs_on


def _impossible(rule: RuleConfig, runs_on: list[ListenerConfig],
                upstreams: Mapping[str, UpstreamConfig]) -> list[str]:
    if not runs_on:
        return []  # every listener it names was reported above
    names = ", ".join(lst.name for lst in runs_on)
    f, t = rule.from_, rule.to
    out: list[str] = []
    no_certs = all(lst.tls.mode == "off" or lst.tls.client_auth == "none" for lst in runs_on)
    peer_keys = [k for k in _PEER_KEYS if getattr(f, k)]
    if peer_keys and no_certs:
        out.append(f"from.{peer_keys[0]}: listener(s) {names} never see a client certificate "
                   "(tls mode off or client_auth none)")
    if f.tls == "required" and no_certs:
        out.append(f"from.tls: required: listener(s) {names} never see a client certificate "
                   "(tls mode off or client_auth none)")
    if f.tls == "none" and all(lst.tls.mode == "terminate" for lst in runs_on):
        out.append(f"from.tls: none: listener(s) {names} always terminate TLS")
    elif f.tls == "none" and all(lst.tls.mode in ("terminate", "passthrough")
                                 for lst in runs_on):
        out.append(f"from.tls: none: listener(s) {names} only take TLS")
    if f.tlvs and all(lst.proxy_protocol.accept == "off" for lst in runs_on):
        out.append(f"from.tlvs: listener(s) {names} do not accept PROXY protocol")
    if t.sni and all(lst.tls.mode == "off" for lst in runs_on):
        out.append(f"to.sni: listener(s) {names} have tls mode off (no SNI)")
    if t.hosts and all(lst.protocol == "tcp" for lst in runs_on):
        out.append(f"to.hosts: listener(s) {names} are not egress proxies (protocol socks5 "
                   "or http_connect): no client names a host")
    out.extend(_impossible_ports(t.ports, runs_on))
    if t.server_identities and all(
        ((up := upstreams.get(lst.upstream)) is None or up.tls.mode == "off")
        and lst.mesh != "outbound"  # mesh peers are reached with mTLS
        for lst in runs_on
    ):
        out.append(f"to.server_identities: the upstreams of listener(s) {names} do not use TLS")
    return out


def _impossible_ports(ports: tuple[PortRange, ...], runs_on: list[ListenerConfig]) -> list[str]:
    listening = [(lst.name, lst.listen.port) for lst in runs_on]
    if not ports or any(lst.listen.is_unix or not lst.listen.port or lst.transparent
                        or lst.protocol != "tcp" for lst in runs_on):
        return []  # unix sockets and port 0 (chosen at bind) are not known here, and on a
        # transparent listener to.ports is the port the client dialed, on an egress
        # listener the port it asked for
    if any(pr.low <= port <= pr.high for _, port in listening for pr in ports):
        return []
    where = ", ".join(f"{n} on {p}" for n, p in listening)
    return [f"to.ports {[str(p) for p in ports]}: no listener running it listens there ({where})"]
