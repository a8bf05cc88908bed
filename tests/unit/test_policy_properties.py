"""Hypothesis: the bitmask engine (``decide``) agrees with the plain per-rule reference
(``explain``) on random rulesets and flows, including its caches and the CIDR index.
Small pools of values make matches (and conflicts between allow and deny) frequent."""

from __future__ import annotations

import dataclasses
import datetime as dt
import ipaddress
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st

from enforcer.config.rulesets import (
    DestinationConfig,
    FromConfig,
    PortRange,
    RuleConfig,
    RulesetConfig,
    ToConfig,
)
from enforcer.policy import FlowFacts, compile_ruleset
from enforcer.tlsconf.identity import PeerIdentity, identity_from_spiffe_id

net = ipaddress.ip_network
IDENTITY_GLOBS = ["spiffe://td/a/*", "spiffe://td/**", "spiffe://td/a/b", "spiffe://other/**",
                  "spiffe://td/*/b", "spiffe://td/a/**/c"]
CIDRS = [net("10.0.0.0/8"), net("10.1.0.0/16"), net("10.1.2.3/32"), net("2001:db8::/32"),
         net("::ffff:10.0.0.0/104"), net("0.0.0.0/0"), net("11.0.0.0/8")]
PORTS = [PortRange(1, 100), PortRange(15006, 15006), PortRange(15000, 16000)]
DESTS = [DestinationConfig("db:5432", host="db", ports=(PortRange(5432, 5432),)),
         DestinationConfig("10.0.0.0/8", network=net("10.0.0.0/8")),
         DestinationConfig("*.svc", host="*.svc")]


def _peer(spiffe_id: str, dns: tuple[str, ...], cn: str | None) -> PeerIdentity:
    return dataclasses.replace(identity_from_spiffe_id(spiffe_id), dns=dns, cn=cn,
                               ou=("u1",) if cn else (), spki_sha256=f"pin-{cn}",
                               not_after=dt.datetime(2030, 1, 1, tzinfo=dt.UTC))


PEERS = [
    _peer("spiffe://td/a/b", ("a.svc",), "alpha"),
    _peer("spiffe://td/a/x/c", (), "beta"),
    _peer("spiffe://td/z/b", ("x.y.svc", "db"), None),
    _peer("spiffe://other/q", (), "alpha"),
    _peer("not-spiffe", ("a.svc",), "gamma"),
]

def some(pool: list[Any]) -> st.SearchStrategy[tuple[Any, ...]]:
    return st.lists(st.sampled_from(pool), min_size=1, max_size=2, unique=True).map(tuple)


FROM_KEYS: dict[str, st.SearchStrategy[Any]] = {
    "identities": some(IDENTITY_GLOBS),
    "trust_domains": some(["td", "other"]),
    "dns": some(["*.svc", "db", "a.svc"]),
    "cn": some(["alpha", "b*", "*a"]),
    "ou": some(["u1", "u*"]),
    "spki_sha256": some(["pin-alpha", "pin-None"]),
    "cidrs": some(CIDRS),
    "tlvs": st.fixed_dictionaries(
        {}, optional={"aws_vpce_id": some(["vpce-1", "vpce-*"]),
                      "authority": some(["API.example", "*.example"])}),
    "tls": st.sampled_from(["required", "none"]),
}
TO_KEYS: dict[str, st.SearchStrategy[Any]] = {
    "listeners": some(["in", "out"]),
    "ports": some(PORTS),
    "sni": some(["*.shop", "a.shop"]),
    "destinations": some(DESTS),
    "server_identities": some(["spiffe://td/a/**", "*.svc"]),
}


@st.composite
def rules(draw: st.DrawFn, i: int) -> RuleConfig:
    """A rule constraining 0-3 keys, so that rules match often and conflict."""
    keys = draw(st.lists(st.sampled_from([*FROM_KEYS, *TO_KEYS]), max_size=3, unique=True))
    f = {k: draw(FROM_KEYS[k]) for k in keys if k in FROM_KEYS}
    t = {k: draw(TO_KEYS[k]) for k in keys if k in TO_KEYS}
    return RuleConfig(f"r{i}", draw(st.sampled_from(["allow", "deny"])), FromConfig(**f),
                      ToConfig(**t))


@st.composite
def rulesets(draw: st.DrawFn) -> RulesetConfig:
    n = draw(st.integers(0, 12))
    return RulesetConfig("rs", draw(st.sampled_from(["allow", "deny"])),
                         tuple(draw(rules(i)) for i in range(n)))


ips = st.sampled_from([None, "10.1.2.3", "10.2.0.1", "11.0.0.1", "::ffff:10.1.2.3",
                       "2001:db8::1", "192.0.2.1"]).map(
    lambda s: None if s is None else ipaddress.ip_address(s))
flows = st.builds(
    lambda listener, port, ip, ident, tls, sni, tlvs, dest, server: FlowFacts(
        listener, port, ip, ident, tls or ident is not None, sni, tlvs, dest, server),
    st.sampled_from(["in", "out"]),
    st.sampled_from([50, 15006, 15500, 20000]),
    ips,
    st.sampled_from([None, *PEERS]),
    st.booleans(),
    st.sampled_from([None, "a.shop", "B.Shop", "shop"]),
    st.fixed_dictionaries({}, optional={"aws_vpce_id": st.sampled_from(["vpce-1", "vpce-2"]),
                                        "authority": st.sampled_from(["api.EXAMPLE", "x"])}),
    st.sampled_from([None, ("db", 5432), ("db", 1), ("10.9.9.9", 80), ("a.svc", 9)]),
    st.sampled_from([None, *PEERS]),
)


@settings(max_examples=300, deadline=None)
@given(rulesets(), st.lists(flows, min_size=1, max_size=8))
def test_decide_agrees_with_explain(cfg: RulesetConfig, facts_list: list[FlowFacts]) -> None:
    rs = compile_ruleset(cfg)
    for facts in facts_list * 2:  # the second round is served from the caches
        explanation = rs.explain(facts)
        assert rs.decide(facts) == explanation.decision
        matched = [r for r in explanation.rules if r.matched]
        denies = [r for r in matched if r.action == "deny"]
        if denies:
            assert explanation.decision.rule == denies[0].name
        elif matched:
            assert explanation.decision.rule == matched[0].name
        else:
            assert explanation.decision.reason == "default"
            assert explanation.decision.action == cfg.default


@st.composite
def networks(draw: st.DrawFn) -> ipaddress.IPv4Network | ipaddress.IPv6Network:
    v6 = draw(st.booleans())
    bits = 128 if v6 else 32
    prefix = draw(st.integers(0, bits))
    addr = draw(st.ip_addresses(v=6 if v6 else 4))
    return ipaddress.ip_network(f"{addr}/{prefix}", strict=False)


@st.composite
def addresses_near(draw: st.DrawFn, nets: list[Any]) -> Any:
    """Addresses inside, at the edges of, and just outside the networks, some v4-mapped."""
    base = draw(st.sampled_from(nets))
    pick = draw(st.sampled_from(["first", "last", "below", "above", "random"]))
    bits = base.max_prefixlen
    value = {"first": int(base.network_address), "last": int(base.broadcast_address),
             "below": int(base.network_address) - 1, "above": int(base.broadcast_address) + 1,
             "random": draw(st.integers(0, 2 ** bits - 1))}[pick] % (2 ** bits)
    ip = ipaddress.ip_address(value) if bits == 32 else ipaddress.IPv6Address(value)
    if bits == 32 and draw(st.booleans()):
        ip = ipaddress.IPv6Address(f"::ffff:{ip}")
    return ip


@settings(max_examples=300, deadline=None)
@given(st.data())
def test_cidr_index_matches_ip_in_network(data: st.DataObject) -> None:
    nets = data.draw(st.lists(networks(), min_size=1, max_size=6))
    groups = data.draw(st.lists(st.lists(st.sampled_from(nets), min_size=1, max_size=3),
                                min_size=1, max_size=5))
    cfg = RulesetConfig("rs", "deny", tuple(
        RuleConfig(f"r{i}", "allow", FromConfig(cidrs=tuple(g))) for i, g in enumerate(groups)))
    rs = compile_ruleset(cfg)
    for _ in range(5):
        ip = data.draw(addresses_near(nets))
        plain = ip.ipv4_mapped if ip.version == 6 and ip.ipv4_mapped else ip
        expected = next((f"r{i}" for i, g in enumerate(groups)
                         if any(_contains(n, plain) for n in g)), None)
        assert rs.decide(FlowFacts("in", 1, ip, None, False)).rule == expected


MAPPED = ipaddress.ip_network("::ffff:0:0/96")


def _contains(n: Any, ip: Any) -> bool:
    """Reference: IPv4-mapped IPv6 networks (prefix >= 96) are IPv4 networks."""
    if n.version == 6 and n.prefixlen >= 96 and n.subnet_of(MAPPED):
        n = ipaddress.ip_network((int(n.network_address) & 0xFFFFFFFF, n.prefixlen - 96))
    return bool(ip.version == n.version and ip in n)


@settings(max_examples=120, deadline=None)
@given(rulesets(), st.lists(flows, min_size=1, max_size=8))
def test_decide_before_upstream_is_never_wrong(cfg: RulesetConfig,
                                               facts_list: list[FlowFacts]) -> None:
    """A decision made before connecting is the one ``decide`` makes whoever the upstream
    turns out to be; when it waits (None), some upstream identity changes the outcome or
    the rules look at it."""
    rs = compile_ruleset(cfg)
    for facts in facts_list:
        early = rs.decide_before_upstream(dataclasses.replace(facts, server_identity=None))
        finals = {rs.decide(dataclasses.replace(facts, server_identity=s)).action
                  for s in [None, *PEERS]}
        if early is not None:
            assert finals == {early.action}
        else:
            assert rs.uses_server_identity
