"""One matcher per rule key (``from.identities``, ``to.ports`` ...), compiled from config.

A matcher belongs to a *dimension*: the one fact it looks at (the listener name, the port,
the peer identity, the client address ...). ``test(value)`` answers for that value; the
engine caches answers per dimension value, so most matchers run once per distinct peer or
port, not once per connection. ``why_not(value)`` says in one line why it did not match,
for ``policy explain``.

Identity matchers see a ``PeerView``: the ``PeerIdentity`` plus its DNS names lowercased
and their parent domains as frozensets, built once per identity, so a certificate with
thousands of SANs costs set intersections, not loops.
"""

from __future__ import annotations

import ipaddress
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable, Mapping
from typing import Any

from enforcer.config.rulesets import (
    DestinationConfig,
    FromConfig,
    IPNetwork,
    PortRange,
    RuleConfig,
    ToConfig,
    dns_glob_problem,
    identity_glob_problem,
)
from enforcer.policy.facts import FlowFacts
from enforcer.policy.globs import DnsSet, StringSet, identity_set, normalize_name, parent_domain
from enforcer.policy.globs import simple_set as _simple_set
from enforcer.tlsconf.identity import PeerIdentity

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
_MAPPED_V4 = ipaddress.IPv6Network("::ffff:0:0/96")


class PeerView:
    """A ``PeerIdentity`` with its names pre-normalised for set matching."""

    __slots__ = ("dns", "ident", "parents")

    def __init__(self, ident: PeerIdentity) -> None:
        self.ident = ident
        self.dns = frozenset(normalize_name(n) for n in ident.dns)
        self.parents = frozenset(p for p in map(parent_domain, self.dns) if p is not None)


    def index_keys(self) -> list[str]:
        """Every index key this peer can be found under (see ``PeerMatcher.index_keys``)."""
        ident = self.ident
        keys = [f"dns:{n}" for n in self.dns] + [f"dnsp:{p}" for p in self.parents]
        if ident.spiffe_id is not None:
            keys += spiffe_prefixes(ident.spiffe_id)
        if ident.trust_domain is not None:
            keys.append(f"td:{ident.trust_domain}")
        if ident.cn is not None:
            keys.append(f"cn:{ident.cn}")
        keys += [f"ou:{o}" for o in ident.ou]
        keys.append(f"spki:{ident.spki_sha256}")
        return keys


def spiffe_prefixes(spiffe_id: str) -> list[str]:
    """``spiffe://td/a`` -> ``["spiffe://", "spiffe://td", "spiffe://td/a"]``."""
    out = ["spiffe://"]
    segs = spiffe_id[len("spiffe://"):].split("/")
    for i in range(1, len(segs) + 1):
        out.append("spiffe://" + "/".join(segs[:i]))
    return out


def literal_prefix(pattern: str) -> str:
    """The literal whole segments before the first wildcard: an index key for a glob."""
    literal = []
    for seg in pattern[len("spiffe://"):].split("/"):
        if "*" in seg:
            break
        literal.append(seg)
    return "spiffe://" + "/".join(literal)


def peer_view(ident: PeerIdentity | None) -> PeerView | None:
    return None if ident is None else PeerView(ident)


def normalize_ip(ip: IPAddress) -> IPAddress:
    """IPv4-mapped IPv6 addresses (``::ffff:10.0.0.1``) are their IPv4 address."""
    if ip.version == 6:
        mapped = ip.ipv4_mapped
        if mapped is not None:
            return mapped
    return ip


def normalize_network(net: IPNetwork) -> IPNetwork:
    if net.version == 6 and net.prefixlen >= 96 and net.subnet_of(_MAPPED_V4):
        base = ipaddress.IPv4Address(int(net.network_address) & 0xFFFFFFFF)
        return ipaddress.IPv4Network((base, net.prefixlen - 96))
    return net


def _listing(items: Iterable[object], limit: int = 5) -> str:
    shown = [str(i) for i in items]
    extra = len(shown) - limit
    text = ", ".join(shown[:limit])
    return f"[{text}, ... +{extra} more]" if extra > 0 else f"[{text}]"


# Dimensions: how each matcher's fact is read from ``FlowFacts``.
def _tls_state(f: FlowFacts) -> tuple[bool, bool]:
    return f.tls, f.identity is not None


DIMENSIONS: dict[str, Callable[[FlowFacts], Any]] = {
    "listener": lambda f: f.listener,
    "port": lambda f: f.port,
    "tls": _tls_state,
    "peer": lambda f: f.identity,
    "client": lambda f: f.client_ip,
    "sni": lambda f: f.sni,
    "destination": lambda f: (f.destination if f.resolved is None or f.destination is None
                              else (*f.destination, f.resolved)),
    "host": lambda f: f.host,
    "server": lambda f: f.server_identity,
}
OBJECT_DIMENSIONS = frozenset({"peer", "server"})  # values are PeerIdentity -> PeerView


def tlv_dimension(key: str) -> Callable[[FlowFacts], Any]:
    return lambda f: f.tlvs.get(key)


class Matcher(ABC):
    """Base: ``key`` is the rule key as written; ``dim`` the fact it looks at."""

    __slots__ = ("key",)
    dim = ""

    def __init__(self, key: str) -> None:
        self.key = key

    @abstractmethod
    def test(self, value: Any) -> bool: ...

    @abstractmethod
    def why_not(self, value: Any) -> str: ...


# ---------------------------------------------------------------------------- to.*
class ListenerMatcher(Matcher):
    __slots__ = ("names",)
    dim = "listener"

    def __init__(self, names: Iterable[str]) -> None:
        super().__init__("to.listeners")
        self.names = frozenset(names)

    def test(self, value: str) -> bool:
        return value in self.names

    def why_not(self, value: str) -> str:
        return f"listener {value!r} is not one of {_listing(sorted(self.names))}"


class PortMatcher(Matcher):
    __slots__ = ("ranges",)
    dim = "port"

    def __init__(self, ranges: Iterable[PortRange]) -> None:
        super().__init__("to.ports")
        self.ranges = tuple(ranges)

    def test(self, value: int) -> bool:
        return any(r.low <= value <= r.high for r in self.ranges)

    def why_not(self, value: int) -> str:
        return f"port {value} is not in {_listing(self.ranges)}"


class SniMatcher(Matcher):
    __slots__ = ("names",)
    dim = "sni"

    def __init__(self, patterns: Iterable[str]) -> None:
        super().__init__("to.sni")
        self.names = DnsSet(patterns)

    def test(self, value: str | None) -> bool:
        return value is not None and self.names.match(value)

    def why_not(self, value: str | None) -> str:
        if value is None:
            return "the client sent no SNI"
        return f"SNI {value!r} matches none of {_listing(self.names.patterns)}"


class HostMatcher(Matcher):
    """``to.hosts``: the host an egress client asked for (a name, or an address as text)."""

    __slots__ = ("names",)
    dim = "host"

    def __init__(self, patterns: Iterable[str]) -> None:
        super().__init__("to.hosts")
        self.names = DnsSet(patterns)

    def test(self, value: str | None) -> bool:
        return value is not None and self.names.match(value)

    def why_not(self, value: str | None) -> str:
        if value is None:
            return "no requested host (not an egress listener)"
        return f"host {value!r} matches none of {_listing(self.names.patterns)}"


class DestinationMatcher(Matcher):
    __slots__ = ("dests", "items")
    dim = "destination"

    def __init__(self, dests: Iterable[DestinationConfig]) -> None:
        super().__init__("to.destinations")
        self.dests = tuple(dests)
        self.items = tuple(
            (d.ports, None if d.network is None else normalize_network(d.network),
             None if d.host is None else DnsSet([d.host]))
            for d in self.dests)

    def test(self, value: tuple[str, int] | tuple[str, int, str] | None) -> bool:
        """``value``: (host, port), or (name, port, resolved address) for a requested name
        once resolved (egress/resolved.py): CIDR entries test the address, name entries
        the name."""
        if value is None:
            return False
        host, port = value[0], value[1]
        ip = _parse_ip(value[2] if len(value) > 2 else host)
        for ports, net, names in self.items:
            if ports and not any(r.low <= port <= r.high for r in ports):
                continue
            if net is not None:
                if ip is not None and ip.version == net.version and ip in net:
                    return True
            elif names is not None and names.match(host):
                return True
        return False

    def why_not(self, value: tuple[str, int] | tuple[str, int, str] | None) -> str:
        if value is None:
            return "no destination (not an outbound connection)"
        shown = f"[{value[0]}]:{value[1]}" if ":" in value[0] else f"{value[0]}:{value[1]}"
        if len(value) > 2:
            shown += f" (resolved to {value[2]})"
        return f"destination {shown} matches none of {_listing(d.text for d in self.dests)}"


class DestinationCidrMatcher(DestinationMatcher):
    """``to.cidrs``: the destination's address (a transparent listener's original
    destination, or an upstream given by IP address)."""

    __slots__ = ()

    def __init__(self, cidrs: Iterable[IPNetwork]) -> None:
        super().__init__(DestinationConfig(text=str(net), network=net) for net in cidrs)
        self.key = "to.cidrs"


def _parse_ip(host: str) -> IPAddress | None:
    try:
        return normalize_ip(ipaddress.ip_address(host.strip("[]")))
    except ValueError:
        return None


# ---------------------------------------------------------------------------- from.*
class TlsMatcher(Matcher):
    __slots__ = ("required",)
    dim = "tls"

    def __init__(self, requirement: str) -> None:
        super().__init__("from.tls")
        self.required = requirement == "required"

    def test(self, value: tuple[bool, bool]) -> bool:
        tls, has_identity = value
        return (tls and has_identity) if self.required else not tls

    def why_not(self, value: tuple[bool, bool]) -> str:
        tls, _ = value
        if self.required:
            return ("tls: required, but the connection is TLS without a verified client "
                    "certificate" if tls else "tls: required, but the connection is plaintext")
        return "tls: none, but the connection is TLS"


class ClientCidrMatcher(Matcher):
    __slots__ = ("networks",)
    dim = "client"

    def __init__(self, networks: Iterable[IPNetwork]) -> None:
        super().__init__("from.cidrs")
        self.networks = tuple(normalize_network(n) for n in networks)

    def test(self, value: IPAddress | None) -> bool:
        if value is None:
            return False
        ip = normalize_ip(value)
        return any(ip.version == n.version and ip in n for n in self.networks)

    def why_not(self, value: IPAddress | None) -> str:
        if value is None:
            return "the client address is unknown"
        return f"client {value} is not in {_listing(self.networks)}"


class TlvMatcher(Matcher):
    __slots__ = ("fold", "patterns")

    def __init__(self, key: str, patterns: Iterable[str]) -> None:
        super().__init__(f"from.tlvs.{key}")
        self.fold = key == "authority"  # a host name: case-insensitive
        pats = [p.lower() for p in patterns] if self.fold else list(patterns)
        self.patterns = _simple_set(pats)

    @property
    def tlv(self) -> str:
        return self.key.rsplit(".", 1)[1]

    def test(self, value: str | None) -> bool:
        if value is None:
            return False
        return self.patterns.match(value.lower() if self.fold else value)

    def why_not(self, value: str | None) -> str:
        if value is None:
            return f"the PROXY header carried no {self.tlv} TLV"
        return f"{value!r} matches none of {_listing(_patterns(self.patterns))}"


def _patterns(s: StringSet) -> list[str]:
    return sorted(s.exact) + list(s.patterns)


class PeerMatcher(Matcher):
    """Base of matchers on the peer certificate: no identity never matches."""

    __slots__ = ()
    dim = "peer"

    def test(self, value: PeerView | None) -> bool:
        return value is not None and self.test_peer(value)

    @abstractmethod
    def test_peer(self, view: PeerView) -> bool: ...

    def why_not(self, value: PeerView | None) -> str:
        if value is None:
            return "no verified peer certificate"
        return self.why_not_peer(value)

    @abstractmethod
    def why_not_peer(self, view: PeerView) -> str: ...

    def index_keys(self) -> frozenset[str] | None:
        """Keys such that a peer can only match if ``PeerView.index_keys`` has one of them;
        None when this matcher cannot be indexed (globs over CN/OU)."""
        return None


class IdentityMatcher(PeerMatcher):
    __slots__ = ("ids",)

    def __init__(self, patterns: Iterable[str], key: str = "from.identities") -> None:
        super().__init__(key)
        self.ids = identity_set(patterns)

    def test_peer(self, view: PeerView) -> bool:
        sid = view.ident.spiffe_id
        return sid is not None and self.ids.match(sid)

    def index_keys(self) -> frozenset[str] | None:
        return frozenset(self.ids.exact) | {literal_prefix(p) for p in self.ids.patterns}

    def why_not_peer(self, view: PeerView) -> str:
        sid = view.ident.spiffe_id
        if sid is None:
            return "the peer certificate has no (single, well-formed) SPIFFE ID"
        return f"{sid} matches none of {_listing(_patterns(self.ids))}"


class TrustDomainMatcher(PeerMatcher):
    __slots__ = ("domains",)

    def __init__(self, domains: Iterable[str]) -> None:
        super().__init__("from.trust_domains")
        self.domains = frozenset(domains)

    def test_peer(self, view: PeerView) -> bool:
        return view.ident.trust_domain in self.domains

    def index_keys(self) -> frozenset[str] | None:
        return frozenset(f"td:{d}" for d in self.domains)

    def why_not_peer(self, view: PeerView) -> str:
        td = view.ident.trust_domain
        if td is None:
            return "the peer certificate has no SPIFFE ID"
        return f"trust domain {td!r} is not one of {_listing(sorted(self.domains))}"


class DnsMatcher(PeerMatcher):
    __slots__ = ("names",)

    def __init__(self, patterns: Iterable[str]) -> None:
        super().__init__("from.dns")
        self.names = DnsSet(patterns)

    def test_peer(self, view: PeerView) -> bool:
        return self.names.match_sets(view.dns, view.parents)

    def index_keys(self) -> frozenset[str] | None:
        return (frozenset(f"dns:{n}" for n in self.names.exact)
                | {f"dnsp:{p}" for p in self.names.parents})

    def why_not_peer(self, view: PeerView) -> str:
        if not view.dns:
            return "the peer certificate has no DNS SAN"
        return (f"DNS SANs {_listing(view.ident.dns, 3)} match none of "
                f"{_listing(self.names.patterns)}")


class CnMatcher(PeerMatcher):
    __slots__ = ("names",)

    def __init__(self, patterns: Iterable[str]) -> None:
        super().__init__("from.cn")
        self.names = _simple_set(patterns)

    def test_peer(self, view: PeerView) -> bool:
        cn = view.ident.cn
        return cn is not None and self.names.match(cn)

    def index_keys(self) -> frozenset[str] | None:
        return None if self.names.globs else frozenset(f"cn:{c}" for c in self.names.exact)

    def why_not_peer(self, view: PeerView) -> str:
        cn = view.ident.cn
        if cn is None:
            return "the peer certificate has no subject CN"
        return f"CN {cn!r} matches none of {_listing(_patterns(self.names))}"


class OuMatcher(PeerMatcher):
    __slots__ = ("names",)

    def __init__(self, patterns: Iterable[str]) -> None:
        super().__init__("from.ou")
        self.names = _simple_set(patterns)

    def test_peer(self, view: PeerView) -> bool:
        return self.names.match_any(view.ident.ou)

    def index_keys(self) -> frozenset[str] | None:
        return None if self.names.globs else frozenset(f"ou:{o}" for o in self.names.exact)

    def why_not_peer(self, view: PeerView) -> str:
        if not view.ident.ou:
            return "the peer certificate has no subject OU"
        return (f"OU {_listing(view.ident.ou, 3)} matches none of "
                f"{_listing(_patterns(self.names))}")


class SpkiMatcher(PeerMatcher):
    __slots__ = ("pins",)

    def __init__(self, pins: Iterable[str]) -> None:
        super().__init__("from.spki_sha256")
        self.pins = frozenset(pins)

    def test_peer(self, view: PeerView) -> bool:
        return view.ident.spki_sha256 in self.pins

    def index_keys(self) -> frozenset[str] | None:
        return frozenset(f"spki:{p}" for p in self.pins)

    def why_not_peer(self, view: PeerView) -> str:
        if not view.ident.spki_sha256:
            return "the peer identity has no public key (a SPIFFE ID alone was given)"
        return f"public key {view.ident.spki_sha256} is not pinned"


class ServerIdentityMatcher(PeerMatcher):
    """``to.server_identities``: spiffe globs on the SPIFFE ID, DNS globs on DNS SANs."""

    __slots__ = ("ids", "names")
    dim = "server"

    def __init__(self, patterns: Iterable[str]) -> None:
        super().__init__("to.server_identities")
        pats = list(patterns)
        self.ids = identity_set(p for p in pats if p.startswith("spiffe://"))
        self.names = DnsSet(p for p in pats if not p.startswith("spiffe://"))

    def test_peer(self, view: PeerView) -> bool:
        sid = view.ident.spiffe_id
        if sid is not None and self.ids.match(sid):
            return True
        return self.names.match_sets(view.dns, view.parents)

    def why_not(self, value: PeerView | None) -> str:
        if value is None:
            return "no verified upstream server certificate"
        return self.why_not_peer(value)

    def why_not_peer(self, view: PeerView) -> str:
        names = [view.ident.spiffe_id] if view.ident.spiffe_id else []
        names += list(view.ident.dns)
        pats = _patterns(self.ids) + list(self.names.patterns)
        return f"server identity {_listing(names, 3)} matches none of {_listing(pats)}"


# ---------------------------------------------------------------------------- compile
def compile_rule(rule: RuleConfig) -> list[Matcher]:
    """Matchers of one rule, in the order explain reports them. Raises ValueError."""
    return _from_matchers(rule.from_) + _to_matchers(rule.to)


def _from_matchers(f: FromConfig) -> list[Matcher]:
    out: list[Matcher] = []
    if f.tls is not None:
        out.append(TlsMatcher(f.tls))
    if f.identities:
        _check(f.identities, identity_glob_problem, "from.identities")
        out.append(IdentityMatcher(f.identities))
    if f.trust_domains:
        out.append(TrustDomainMatcher(f.trust_domains))
    if f.spki_sha256:
        out.append(SpkiMatcher(f.spki_sha256))
    if f.dns:
        _check(f.dns, dns_glob_problem, "from.dns")
        out.append(DnsMatcher(f.dns))
    if f.cn:
        out.append(CnMatcher(f.cn))
    if f.ou:
        out.append(OuMatcher(f.ou))
    if f.cidrs:
        out.append(ClientCidrMatcher(f.cidrs))
    out.extend(_tlv_matchers(f.tlvs))
    return out


def _tlv_matchers(tlvs: Mapping[str, tuple[str, ...]]) -> list[Matcher]:
    return [TlvMatcher(key, pats) for key, pats in sorted(tlvs.items()) if pats]


def _to_matchers(t: ToConfig) -> list[Matcher]:
    out: list[Matcher] = []
    if t.listeners:
        out.append(ListenerMatcher(t.listeners))
    if t.ports:
        out.append(PortMatcher(t.ports))
    if t.sni:
        _check(t.sni, dns_glob_problem, "to.sni")
        out.append(SniMatcher(t.sni))
    if t.hosts:
        _check(t.hosts, dns_glob_problem, "to.hosts")
        out.append(HostMatcher(t.hosts))
    if t.destinations:
        out.append(DestinationMatcher(t.destinations))
    if t.cidrs:
        out.append(DestinationCidrMatcher(t.cidrs))
    if t.server_identities:
        out.append(ServerIdentityMatcher(t.server_identities))
    return out


def _check(patterns: Iterable[str], problem_of: Callable[[str], str | None], key: str) -> None:
    for p in patterns:
        problem = problem_of(p)
        if problem is not None:
            raise ValueError(f"{key}: bad pattern {p!r}: {problem}")


def dimension_of(m: Matcher) -> str:
    """The dimension name; TLV matchers each get their own (``tlv:aws_vpce_id``)."""
    return f"tlv:{m.tlv}" if isinstance(m, TlvMatcher) else m.dim
