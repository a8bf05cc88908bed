"""Decisions, table-driven: every case also checks ``explain`` agrees with ``decide``."""

from __future__ import annotations

import dataclasses
import datetime as dt
import ipaddress
import time
from typing import Any

import pytest
import yaml

from enforcer.config.errors import ConfigIssue
from enforcer.config.reader import Node
from enforcer.config.rulesets import FromConfig, RuleConfig, RulesetConfig, parse_rulesets
from enforcer.policy import (
    CompiledRuleset,
    Decision,
    FlowFacts,
    compile_ruleset,
    compile_rulesets,
    engine,
)
from enforcer.tlsconf.identity import PeerIdentity, identity_from_spiffe_id

FRONTEND = "spiffe://cluster.local/ns/shop/sa/frontend"


def ruleset(rules: str, *, default: str = "deny", name: str = "rs") -> CompiledRuleset:
    raw = {name: {"default": default, "rules": yaml.safe_load(rules) or []}}
    issues: list[ConfigIssue] = []
    cfgs = parse_rulesets(Node(raw, "rulesets", issues))
    assert issues == []
    return compile_rulesets(cfgs)[name]


def peer(spiffe_id: str | None = FRONTEND, *, dns: tuple[str, ...] = (), cn: str | None = None,
         ou: tuple[str, ...] = (), spki: str = "pin", uris: tuple[str, ...] | None = None,
         td: str | None = None) -> PeerIdentity:
    base = identity_from_spiffe_id(spiffe_id) if spiffe_id else identity_from_spiffe_id("x:")
    return dataclasses.replace(
        base, uri=uris if uris is not None else base.uri, dns=dns, cn=cn, ou=ou,
        spki_sha256=spki, trust_domain=td if td is not None else base.trust_domain,
        not_after=dt.datetime(2030, 1, 1, tzinfo=dt.UTC))


def facts(**kw: Any) -> FlowFacts:
    ip = kw.pop("ip", "10.1.2.3")
    ident = kw.pop("identity", peer())
    base: dict[str, Any] = {
        "listener": "inbound", "port": 15006,
        "client_ip": None if ip is None else ipaddress.ip_address(ip),
        "identity": ident, "tls": ident is not None,
    }
    base.update(kw)
    return FlowFacts(**base)


def check(rs: CompiledRuleset, f: FlowFacts, action: str, rule: str | None,
          reason: str = "rule") -> None:
    decision = rs.decide(f)
    assert decision == Decision(action, rs.name, rule, reason)  # type: ignore[arg-type]
    assert rs.explain(f).decision == decision


# ---------------------------------------------------------------------------- the table
INBOUND = ruleset(f"""
- name: quarantine
  action: deny
  from: {{cidrs: [192.168.66.0/24, "2001:db8:bad::/48"]}}
- name: frontend
  action: allow
  from: {{identities: ["{FRONTEND}"], cidrs: ["10.0.0.0/8", "2001:db8::/32"]}}
  ports: [15006]
- name: no-intruder
  action: deny
  from: {{identities: ["spiffe://cluster.local/ns/*/sa/intruder"]}}
- name: ops-anything
  action: allow
  from: {{identities: ["spiffe://cluster.local/ns/ops/**"]}}
- name: ops-intruder-too
  action: allow
  from: {{identities: ["spiffe://cluster.local/ns/ops/sa/intruder"]}}
""")

CASES: list[tuple[str, FlowFacts, str, str | None, str]] = [
    ("identity+cidr+port allow", facts(), "allow", "frontend", "rule"),
    ("wrong port -> default", facts(port=8080), "deny", None, "default"),
    ("outside cidr -> default", facts(ip="172.16.0.1"), "deny", None, "default"),
    ("quarantine beats allow", facts(ip="192.168.66.7"), "deny", "quarantine", "rule"),
    ("ipv6 allow", facts(ip="2001:db8:1::5"), "allow", "frontend", "rule"),
    ("ipv6 quarantine", facts(ip="2001:db8:bad:1::5"), "deny", "quarantine", "rule"),
    ("v4-mapped v6 is v4", facts(ip="::ffff:10.9.9.9"), "allow", "frontend", "rule"),
    ("v4-mapped quarantine", facts(ip="::ffff:192.168.66.1"), "deny", "quarantine", "rule"),
    ("no client ip: cidr rules cannot match", facts(ip=None), "deny", None, "default"),
    ("plaintext: identity rules cannot match", facts(identity=None), "deny", None, "default"),
    ("* is one segment", facts(identity=peer("spiffe://cluster.local/ns/x/sa/intruder")),
     "deny", "no-intruder", "rule"),
    ("* is not two segments",
     facts(identity=peer("spiffe://cluster.local/ns/x/y/sa/intruder")), "deny", None, "default"),
    ("** many segments", facts(identity=peer("spiffe://cluster.local/ns/ops/a/b/c")),
     "allow", "ops-anything", "rule"),
    ("** zero segments", facts(identity=peer("spiffe://cluster.local/ns/ops")),
     "allow", "ops-anything", "rule"),
    ("deny written before allow, both match",
     facts(identity=peer("spiffe://cluster.local/ns/ops/sa/intruder")), "deny", "no-intruder",
     "rule"),
    ("other trust domain", facts(identity=peer("spiffe://evil.td/ns/ops/sa/x")),
     "deny", None, "default"),
    ("cert without spiffe id", facts(identity=peer(None)), "deny", None, "default"),
]


@pytest.mark.parametrize("f, action, rule, reason", [c[1:] for c in CASES],
                         ids=[c[0] for c in CASES])
def test_inbound_table(f: FlowFacts, action: str, rule: str | None, reason: str) -> None:
    check(INBOUND, f, action, rule, reason)


def test_deny_beats_allow_whatever_the_order() -> None:
    rs = ruleset("""
- {name: allow-all, action: allow}
- {name: allow-td, action: allow, from: {trust_domains: [cluster.local]}}
- {name: deny-late, action: deny, from: {cidrs: [10.0.0.0/8]}}
""")
    check(rs, facts(), "deny", "deny-late")
    check(rs, facts(ip="11.0.0.1"), "allow", "allow-all")


def test_default_allow_and_empty_rulesets() -> None:
    check(ruleset("", default="allow"), facts(), "allow", None, "default")
    check(ruleset("", default="deny"), facts(), "deny", None, "default")
    rs = ruleset("- {name: d, action: deny, from: {cidrs: 10.0.0.0/8}}", default="allow")
    check(rs, facts(), "deny", "d")
    check(rs, facts(ip="11.1.1.1"), "allow", None, "default")


def test_empty_from_matches_everything() -> None:
    rs = ruleset("- {name: all, action: allow, from: {}}")
    check(rs, facts(identity=None, ip=None), "allow", "all")


def test_first_matching_rule_of_the_winning_action_is_reported() -> None:
    rs = ruleset("""
- {name: a1, action: allow, from: {cidrs: 11.0.0.0/8}}
- {name: a2, action: allow, from: {cidrs: 10.0.0.0/8}}
- {name: a3, action: allow}
- {name: d1, action: deny, from: {cidrs: 12.0.0.0/8}}
- {name: d2, action: deny, from: {cidrs: 12.1.0.0/16}}
""")
    check(rs, facts(), "allow", "a2")
    check(rs, facts(ip="12.1.1.1"), "deny", "d1")


@pytest.mark.parametrize("rule, f, matched", [
    # tls
    ("from: {tls: required}", facts(), True),
    ("from: {tls: required}", facts(identity=None, tls=True), False),
    ("from: {tls: required}", facts(identity=None, tls=False), False),
    ("from: {tls: none}", facts(identity=None, tls=False), True),
    ("from: {tls: none}", facts(identity=None, tls=True), False),
    # trust domains, spki, cn, ou, dns
    ("from: {trust_domains: [cluster.local]}", facts(), True),
    ("from: {trust_domains: [other]}", facts(), False),
    ("from: {trust_domains: [cluster.local]}", facts(identity=None), False),
    (f"from: {{spki_sha256: ['{'A' * 43}=']}}", facts(identity=peer(spki="A" * 43 + "=")), True),
    (f"from: {{spki_sha256: ['{'A' * 43}=']}}", facts(identity=peer(spki="B" * 43 + "=")), False),
    ("from: {cn: [frontend]}", facts(identity=peer(cn="frontend")), True),
    ("from: {cn: [frontend]}", facts(identity=peer(cn="Frontend")), False),
    ("from: {cn: ['front*']}", facts(identity=peer(cn="frontend-7d9f")), True),
    ("from: {cn: ['*-7d9f']}", facts(identity=peer(cn="frontend-7d9f")), True),
    ("from: {cn: ['front*']}", facts(identity=peer(cn=None)), False),
    ("from: {ou: [payments]}", facts(identity=peer(ou=("eu", "payments"))), True),
    ("from: {ou: ['pay*']}", facts(identity=peer(ou=("eu",))), False),
    ("from: {dns: [api.shop]}", facts(identity=peer(dns=("x.y", "API.Shop."))), True),
    ("from: {dns: ['*.shop.svc']}", facts(identity=peer(dns=("a.shop.svc",))), True),
    ("from: {dns: ['*.shop.svc']}", facts(identity=peer(dns=("shop.svc",))), False),
    ("from: {dns: ['*.shop.svc']}", facts(identity=peer(dns=("a.b.shop.svc",))), False),
    ("from: {dns: ['*.shop.svc']}", facts(identity=peer(dns=())), False),
    # identities: partial segment globs
    ("from: {identities: ['spiffe://cluster.local/ns/*/sa/front*']}", facts(), True),
    ("from: {identities: ['spiffe://*/ns/shop/**']}", facts(), True),
    ("from: {identities: ['spiffe://cluster.local/ns/shop/sa/frontend/**']}", facts(), True),
    ("from: {identities: ['spiffe://cluster.local/**/frontend']}", facts(), True),
    ("from: {identities: ['spiffe://cluster.local/**/shop']}", facts(), False),
    ("from: {identities: ['spiffe://cluster.local/ns/shop/sa/Frontend']}", facts(), False),
    ("from: {identities: ['spiffe://cluster.local/ns/shop/sa/frontend']}",
     facts(identity=peer(uris=(FRONTEND, FRONTEND.replace("frontend", "other")))), True),
    # OR within a list, AND across keys
    ("from: {cidrs: [11.0.0.0/8, 10.1.0.0/16]}", facts(), True),
    ("from: {cidrs: [10.0.0.0/8], trust_domains: [other]}", facts(), False),
    ("from: {cidrs: ['::/0']}", facts(), False),
    ("from: {cidrs: ['::ffff:10.0.0.0/104']}", facts(), True),
    ("from: {cidrs: ['0.0.0.0/0']}", facts(ip="::ffff:1.2.3.4"), True),
    ("from: {cidrs: ['0.0.0.0/0']}", facts(ip="2001:db8::1"), False),
    ("from: {cidrs: ['2001:db8::1']}", facts(ip="2001:db8::1"), True),
    # tlvs
    ("from: {tlvs: {aws_vpce_id: ['vpce-0abc*']}}",
     facts(tlvs={"aws_vpce_id": "vpce-0abc123"}), True),
    ("from: {tlvs: {aws_vpce_id: ['vpce-0abc*']}}", facts(tlvs={"aws_vpce_id": "vpce-1"}), False),
    ("from: {tlvs: {aws_vpce_id: ['vpce-0abc*']}}", facts(), False),
    ("from: {tlvs: {authority: [API.example.com]}}",
     facts(tlvs={"authority": "api.EXAMPLE.com"}), True),
    ("from: {tlvs: {alpn: h2, gcp_psc_id: '123'}}", facts(tlvs={"alpn": "h2"}), False),
    ("from: {tlvs: {alpn: h2, gcp_psc_id: '123'}}",
     facts(tlvs={"alpn": "h2", "gcp_psc_id": "123"}), True),
    ("from: {tlvs: {azure_link_id: ['*']}}", facts(tlvs={"azure_link_id": ""}), True),
    # to
    ("to: {listeners: [inbound, gw]}", facts(), True),
    ("to: {listeners: [gw]}", facts(), False),
    ("to: {ports: ['15000-15010']}", facts(), True),
    ("to: {ports: ['15000-15005', 15007]}", facts(), False),
    ("to: {sni: ['*.shop.example']}", facts(sni="Pay.Shop.Example"), True),
    ("to: {sni: ['*.shop.example']}", facts(sni="shop.example"), False),
    ("to: {sni: [shop.example]}", facts(sni=None), False),
    ("to: {destinations: ['db.shop:5432']}", facts(destination=("db.shop", 5432)), True),
    ("to: {destinations: ['db.shop:5432']}", facts(destination=("db.shop", 5433)), False),
    ("to: {destinations: ['*.shop:*']}", facts(destination=("db.shop", 1)), True),
    ("to: {destinations: ['10.0.0.0/8']}", facts(destination=("10.2.3.4", 80)), True),
    ("to: {destinations: ['10.0.0.0/8:80']}", facts(destination=("10.2.3.4", 81)), False),
    ("to: {destinations: ['10.0.0.0/8']}", facts(destination=("db.shop", 80)), False),
    ("to: {destinations: ['[2001:db8::/32]:443']}", facts(destination=("2001:db8::9", 443)), True),
    ("to: {destinations: ['10.0.0.0/8']}", facts(destination=None), False),
    ("to: {server_identities: ['spiffe://cluster.local/ns/db/**']}",
     facts(server_identity=peer("spiffe://cluster.local/ns/db/sa/pg")), True),
    ("to: {server_identities: ['spiffe://cluster.local/ns/db/**']}",
     facts(server_identity=peer("spiffe://cluster.local/ns/web/sa/pg")), False),
    ("to: {server_identities: ['*.db.shop']}",
     facts(server_identity=peer(None, dns=("pg.db.shop",))), True),
    ("to: {server_identities: ['*.db.shop']}", facts(server_identity=None), False),
])
def test_single_key_matching(rule: str, f: FlowFacts, matched: bool) -> None:
    rs = ruleset(f"- {{name: r, action: allow, {rule}}}")
    check(rs, f, "allow" if matched else "deny", "r" if matched else None,
          "rule" if matched else "default")
    explained = rs.explain(f).rules[0]
    assert explained.matched is matched
    assert bool(explained.why_not) is not matched


# ---------------------------------------------------------------------------- fail closed
class Exploding:
    def __getattr__(self, name: str) -> Any:
        raise RuntimeError(f"boom reading {name}")


@pytest.mark.parametrize("broken", [
    {"client_ip": "10.1.2.3"},  # a str, not an ip_address
    {"identity": Exploding()},
    {"port": "15006"},
    {"tlvs": None},
    {"listener": ["unhashable"]},
])
def test_evaluation_error_fails_closed(broken: dict[str, Any]) -> None:
    rs = ruleset("""
- {name: allow-all-the-things, action: allow, from: {cidrs: 0.0.0.0/0, tlvs: {alpn: '*'}},
   to: {listeners: [inbound], ports: ['1-65535']}}
- {name: via-identity, action: allow, from: {trust_domains: [cluster.local]}}
""", default="allow")
    f = dataclasses.replace(facts(tlvs={"alpn": "h2"}), **broken)
    assert rs.decide(f) == Decision("deny", "rs", None, "error")
    explanation = rs.explain(f)
    assert explanation.decision == Decision("deny", "rs", None, "error")
    assert explanation.error


def test_errors_are_not_cached() -> None:
    rs = ruleset("- {name: td, action: allow, from: {trust_domains: [cluster.local]}}")
    assert rs.decide(facts(identity=Exploding())).reason == "error"
    check(rs, facts(), "allow", "td")


# ---------------------------------------------------------------------------- caches
def test_cache_by_identity_object_and_equal_objects() -> None:
    rs = ruleset(f"- {{name: fe, action: allow, from: {{identities: ['{FRONTEND}']}}}}")
    a, b = peer(), peer()
    assert a == b and a is not b
    for ident in (a, b, a, b):
        check(rs, facts(identity=ident), "allow", "fe")
    check(rs, facts(identity=peer("spiffe://cluster.local/ns/x")), "deny", None, "default")


def test_caches_stay_correct_when_they_overflow(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(engine, "CACHE_LIMIT", 8)
    rs = ruleset("""
- {name: even, action: allow, from: {identities: ['spiffe://td/n/*0', 'spiffe://td/n/*2']},
   to: {sni: ['*.even'], ports: ['1-1000']}}
""")
    for i in range(100):
        ident = peer(f"spiffe://td/n/{i}")
        want = i % 10 in (0, 2)
        f = facts(identity=ident, sni=f"x{i}.even", port=i + 1)
        check(rs, f, "allow" if want else "deny", "even" if want else None,
              "rule" if want else "default")


def test_hand_built_config_with_a_bad_pattern_is_refused() -> None:
    cfg = RulesetConfig("rs", "deny", (RuleConfig("r", "allow", FromConfig(identities=("x",))),))
    with pytest.raises(ValueError, match="rule 'r'"):
        compile_ruleset(cfg)


def test_compiled_ruleset_attributes() -> None:
    rs = compile_ruleset(RulesetConfig("rs", "allow", (RuleConfig("a", "deny"),), True))
    assert rs.name == "rs" and rs.default == "allow" and rs.reevaluate_on_reload
    assert rs.rule_names == ("a",)
    assert "rs" in repr(rs)


# ---------------------------------------------------------------------------- scale
def build_big_ruleset(n: int = 1000) -> CompiledRuleset:
    rules: list[dict[str, Any]] = []
    for i in range(n):
        kind = i % 4
        if kind == 0:
            rules.append({"name": f"r{i}", "action": "allow",
                          "from": {"identities": [f"spiffe://td/ns/n{i}/sa/app"]}})
        elif kind == 1:
            rules.append({"name": f"r{i}", "action": "allow",
                          "from": {"identities": [f"spiffe://td/ns/n{i}/**"],
                                   "cidrs": [f"10.{i % 256}.0.0/16"]}, "ports": [15006]})
        elif kind == 2:
            rules.append({"name": f"r{i}", "action": "deny",
                          "from": {"cidrs": [f"192.168.{i % 256}.0/24"]}})
        else:
            rules.append({"name": f"r{i}", "action": "deny",
                          "from": {"dns": [f"*.q{i}.example"]}, "to": {"ports": [i + 1]}})
    return ruleset(yaml.safe_dump(rules))


def test_thousand_rules_are_cheap_and_agree_with_explain() -> None:
    rs = build_big_ruleset()
    flows = [
        facts(identity=peer("spiffe://td/ns/n400/sa/app"), ip="10.0.0.1"),
        facts(identity=peer("spiffe://td/ns/n401/x/y"), ip="10.145.3.3"),
        facts(identity=peer("spiffe://td/ns/n401/x/y"), ip="10.146.3.3"),
        facts(identity=peer("spiffe://td/ns/n400/sa/app"), ip="192.168.2.9"),
        facts(identity=None, ip="8.8.8.8"),
    ]
    expected = [("allow", "r400"), ("allow", "r401"), ("deny", None), ("deny", "r2"),
                ("deny", None)]
    for f, (action, rule) in zip(flows, expected, strict=True):
        d = rs.decide(f)
        assert (d.action, d.rule) == (action, rule)
        assert rs.explain(f).decision == d
    started = time.perf_counter()
    for _ in range(2000):
        for f in flows:
            rs.decide(f)
    per_decision = (time.perf_counter() - started) / 10000
    assert per_decision < 100e-6, f"{per_decision * 1e6:.1f} µs per decision"


# ---------------------------------------------------------------------------- upstream identity
OUTBOUND = ruleset("""
- name: never-from-quarantine
  action: deny
  from: {cidrs: [192.168.66.0/24]}
- name: not-the-old-db
  action: deny
  to: {destinations: ["db:5432"], server_identities: ["spiffe://cluster.local/ns/db/sa/old"]}
- name: db-from-apps
  action: allow
  from: {cidrs: [10.0.0.0/8]}
  to: {server_identities: ["spiffe://cluster.local/ns/db/**"]}
- name: cache-anywhere
  action: allow
  to: {destinations: ["cache:6379"]}
""")
DB, OLD_DB = "spiffe://cluster.local/ns/db/sa/pg", "spiffe://cluster.local/ns/db/sa/old"


def out_facts(ip: str, dest: tuple[str, int], server: str | None = None) -> FlowFacts:
    return facts(ip=ip, identity=None, destination=dest,
                 server_identity=identity_from_spiffe_id(server) if server else None)


@pytest.mark.parametrize(("ip", "dest", "before", "server", "final"), [
    # a deny that does not look at the server decides before connecting
    ("192.168.66.1", ("db", 5432), ("deny", "never-from-quarantine"), None, None),
    # nothing could allow: default deny, before connecting
    ("172.16.0.1", ("db", 5432), ("deny", None), None, None),
    # no matching rule looks at the server: decided now
    ("172.16.0.1", ("cache", 6379), ("allow", "cache-anywhere"), None, None),
    # depends on who answers: connect, then decide with the server's identity
    ("10.1.1.1", ("db", 5432), None, DB, ("allow", "db-from-apps")),
    ("10.1.1.1", ("db", 5432), None, OLD_DB, ("deny", "not-the-old-db")),
    ("10.1.1.1", ("db", 5432), None, "spiffe://other/x", ("deny", None)),
    ("10.1.1.1", ("cache", 6379), None, OLD_DB, ("allow", "db-from-apps")),
    ("10.1.1.1", ("cache", 6379), None, "spiffe://other/x", ("allow", "cache-anywhere")),
])
def test_decide_before_upstream(ip: str, dest: tuple[str, int], before: tuple[str, str | None] | None,
                                server: str | None, final: tuple[str, str | None] | None) -> None:
    rs = OUTBOUND
    assert rs.uses_server_identity
    early = rs.decide_before_upstream(out_facts(ip, dest))
    if before is not None:
        assert early is not None and (early.action, early.rule) == before
        assert rs.decide(out_facts(ip, dest, DB)).action == before[0]  # whoever answers
        assert rs.decide(out_facts(ip, dest, OLD_DB)).action == before[0]
        return
    assert early is None
    assert final is not None
    decision = rs.decide(out_facts(ip, dest, server))
    assert (decision.action, decision.rule) == final
    assert rs.explain(out_facts(ip, dest, server)).decision == decision


def test_decide_before_upstream_without_server_rules_is_decide() -> None:
    assert not INBOUND.uses_server_identity
    for f in (facts(), facts(ip="192.168.66.1"), facts(identity=None)):
        assert INBOUND.decide_before_upstream(f) == INBOUND.decide(f)


def test_decide_before_upstream_default_allow_waits_for_a_server_deny() -> None:
    rs = ruleset("""
- name: not-old
  action: deny
  to: {server_identities: ["spiffe://cluster.local/ns/db/sa/old"]}
""", default="allow")
    f = out_facts("10.0.0.1", ("db", 5432))
    assert rs.decide_before_upstream(f) is None
    assert rs.decide(out_facts("10.0.0.1", ("db", 5432), DB)).action == "allow"
    assert rs.decide(out_facts("10.0.0.1", ("db", 5432), OLD_DB)).action == "deny"
