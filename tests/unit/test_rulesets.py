"""Ruleset schema: typed values, and every error reported with its exact key path."""

from __future__ import annotations

import base64
import ipaddress
from typing import Any

import pytest
import yaml

from enforcer.config.errors import ConfigError, ConfigIssue
from enforcer.config.loader import load_rulesets_file, parse_config
from enforcer.config.reader import Node
from enforcer.config.rulesets import (
    DestinationConfig,
    FromConfig,
    PortRange,
    RuleConfig,
    RulesetConfig,
    ToConfig,
    normalize_spki,
    parse_destination,
    parse_port_range,
    parse_rulesets,
)

PIN = base64.b64encode(bytes(range(32))).decode()


def parse(text: str) -> tuple[dict[str, RulesetConfig], list[str]]:
    issues: list[ConfigIssue] = []
    out = parse_rulesets(Node(yaml.safe_load(text), "rulesets", issues))
    return out, [str(i) for i in issues]


def ok(text: str) -> dict[str, RulesetConfig]:
    out, issues = parse(text)
    assert issues == []
    return out


def errors_for_rule(rule: dict[str, Any], *, default: str = "deny") -> list[str]:
    raw = {"rs": {"default": default, "rules": [rule]}}
    return parse(yaml.safe_dump(raw))[1]


def test_full_rule_parses_to_typed_values() -> None:
    rs = ok(f"""
inbound:
  default: deny
  reevaluate_on_reload: true
  rules:
    - name: everything
      description: uses every key
      action: allow
      from:
        identities: ["spiffe://cluster.local/ns/*/sa/**"]
        trust_domains: [cluster.local, "spiffe://other.td"]
        dns: ["*.Shop.SVC.", api.shop]
        cn: ["front*"]
        ou: payments
        spki_sha256: ["{PIN}"]
        cidrs: [10.0.0.0/8, "2001:db8::/32"]
        tlvs: {{aws_vpce_id: "vpce-*", authority: [api.example.com], alpn: h2}}
        tls: required
      to:
        listeners: inbound
        ports: [15006, "8000-8100"]
        sni: ["*.shop.example"]
        destinations: ["db.shop:5432", 10.0.0.0/8]
        server_identities: ["spiffe://cluster.local/ns/db/**", "DB.shop"]
""")["inbound"]
    assert rs.name == "inbound" and rs.default == "deny" and rs.reevaluate_on_reload
    (rule,) = rs.rules
    assert rule.name == "everything" and rule.action == "allow"
    assert rule.description == "uses every key"
    f = rule.from_
    assert f.identities == ("spiffe://cluster.local/ns/*/sa/**",)
    assert f.trust_domains == ("cluster.local", "other.td")
    assert f.dns == ("*.shop.svc", "api.shop")
    assert f.cn == ("front*",) and f.ou == ("payments",)
    assert f.spki_sha256 == (PIN,)
    assert f.cidrs == (ipaddress.ip_network("10.0.0.0/8"), ipaddress.ip_network("2001:db8::/32"))
    assert dict(f.tlvs) == {"aws_vpce_id": ("vpce-*",), "authority": ("api.example.com",),
                            "alpn": ("h2",)}
    assert f.tls == "required"
    t = rule.to
    assert t.listeners == ("inbound",)
    assert t.ports == (PortRange(15006, 15006), PortRange(8000, 8100))
    assert t.sni == ("*.shop.example",)
    assert t.destinations == (
        DestinationConfig("db.shop:5432", host="db.shop", ports=(PortRange(5432, 5432),)),
        DestinationConfig("10.0.0.0/8", network=ipaddress.ip_network("10.0.0.0/8")),
    )
    assert t.server_identities == ("spiffe://cluster.local/ns/db/**", "db.shop")


def test_design_md_example_with_rule_level_ports() -> None:
    rs = ok("""
inbound:
  default: deny
  rules:
    - name: frontend-may-call
      action: allow
      from:
        identities: ["spiffe://cluster.local/ns/shop/sa/frontend"]
        cidrs: ["10.0.0.0/8"]
      ports: [15006]
""")["inbound"]
    assert rs.rules[0].to.ports == (PortRange(15006, 15006),)
    assert rs.reevaluate_on_reload is False


def test_empty_from_and_missing_rules() -> None:
    rs = ok("""
a: {default: allow}
b: {default: deny, rules: [{name: all, action: deny, from: {}, to: {}}]}
""")
    assert rs["a"].rules == ()
    assert rs["b"].rules[0].from_ == FromConfig() and rs["b"].rules[0].to == ToConfig()


def test_scalars_accepted_for_lists() -> None:
    rs = ok("""
a:
  default: deny
  rules:
    - {name: r, action: allow, from: {identities: "spiffe://td/a", cidrs: 10.0.0.1},
       to: {ports: 443}}
""")["a"]
    rule = rs.rules[0]
    assert rule.from_.identities == ("spiffe://td/a",)
    assert rule.from_.cidrs == (ipaddress.ip_network("10.0.0.1/32"),)
    assert rule.to.ports == (PortRange(443, 443),)


def test_rule_config_keeps_the_minimal_constructor() -> None:
    rule = RuleConfig("x", "deny")
    assert rule.from_ == FromConfig() and rule.to == ToConfig()
    assert RulesetConfig("rs", "allow").rules == ()


# ---------------------------------------------------------------------------- errors
P = "rulesets.rs.rules[0]"


@pytest.mark.parametrize("rule, expected", [
    ({"action": "allow"}, f"{P}.name: is required"),
    ({"name": "", "action": "allow"}, f"{P}.name: must not be empty"),
    ({"name": "r"}, f"{P}.action: is required (allow or deny)"),
    ({"name": "r", "action": "permit"}, f"{P}.action: must be one of allow, deny; got 'permit'"),
    ({"name": "r", "action": "allow", "form": {}}, f"{P}.form: unknown key (did you mean 'from'?)"),
    ({"name": "r", "action": "allow", "from": {"identity": ["spiffe://td/a"]}},
     f"{P}.from.identity: unknown key (did you mean 'identities'?)"),
    ({"name": "r", "action": "allow", "to": {"port": [1]}},
     f"{P}.to.port: unknown key (did you mean 'ports'?)"),
    ({"name": "r", "action": "allow", "from": {"tlvs": {"vpce": ["x"]}}},
     f"{P}.from.tlvs.vpce: unknown key (known: aws_vpce_id, azure_link_id, gcp_psc_id, "
     "authority, alpn, identity)"),
    ({"name": "r", "action": "allow", "from": {"cidrs": ["10.0.0.0/8", "10.0.0.0/33"]}},
     f"{P}.from.cidrs[1]: bad CIDR '10.0.0.0/33' (use 10.0.0.0/8, 2001:db8::/32 or a single "
     "address)"),
    ({"name": "r", "action": "allow", "from": {"cidrs": "banana"}},
     f"{P}.from.cidrs: bad CIDR 'banana' (use 10.0.0.0/8, 2001:db8::/32 or a single address)"),
    ({"name": "r", "action": "allow", "from": {"identities": ["cluster.local/ns/a"]}},
     f"{P}.from.identities[0]: bad identity glob 'cluster.local/ns/a': must start with spiffe:// "
     "(e.g. spiffe://cluster.local/ns/shop/sa/*)"),
    ({"name": "r", "action": "allow", "from": {"identities": ["spiffe://td/ns/a**"]}},
     f"{P}.from.identities[0]: bad identity glob 'spiffe://td/ns/a**': ** must be a whole path "
     "segment (/**/)"),
    ({"name": "r", "action": "allow", "from": {"identities": ["spiffe://td//a"]}},
     f"{P}.from.identities[0]: bad identity glob 'spiffe://td//a': has an empty path segment "
     "(// or a trailing /)"),
    ({"name": "r", "action": "allow", "from": {"identities": ["spiffe://td/a/"]}},
     f"{P}.from.identities[0]: bad identity glob 'spiffe://td/a/': has an empty path segment "
     "(// or a trailing /)"),
    ({"name": "r", "action": "allow", "from": {"identities": ["spiffe://TD/a"]}},
     f"{P}.from.identities[0]: bad identity glob 'spiffe://TD/a': bad trust domain 'TD' "
     "(lowercase letters, digits, '.', '-', '_'; * as a wildcard)"),
    ({"name": "r", "action": "allow", "from": {"identities": ["spiffe://td/a?b"]}},
     f"{P}.from.identities[0]: bad identity glob 'spiffe://td/a?b': bad path segment 'a?b' "
     "(letters, digits, '.', '-', '_'; * as a wildcard)"),
    ({"name": "r", "action": "allow", "from": {"identities": ["spiffe://td/a/../b"]}},
     f"{P}.from.identities[0]: bad identity glob 'spiffe://td/a/../b': has a . or .. segment"),
    ({"name": "r", "action": "allow", "from": {"dns": ["a.*.example"]}},
     f"{P}.from.dns[0]: bad DNS name 'a.*.example': * is only allowed as the whole leftmost "
     "label (*.example.com)"),
    ({"name": "r", "action": "allow", "from": {"dns": ["api*.example"]}},
     f"{P}.from.dns[0]: bad DNS name 'api*.example': * is only allowed as the whole leftmost "
     "label (*.example.com)"),
    ({"name": "r", "action": "allow", "from": {"dns": ["*"]}},
     f"{P}.from.dns[0]: bad DNS name '*': * needs a domain after it (*.example.com)"),
    ({"name": "r", "action": "allow", "to": {"sni": ["a..b"]}},
     f"{P}.to.sni[0]: bad SNI pattern 'a..b': has an empty label"),
    ({"name": "r", "action": "allow", "from": {"trust_domains": ["Cluster.Local"]}},
     f"{P}.from.trust_domains[0]: bad trust domain 'Cluster.Local': bad trust domain (lowercase "
     "letters, digits, '.', '-', '_')"),
    ({"name": "r", "action": "allow", "from": {"spki_sha256": ["abc"]}},
     f"{P}.from.spki_sha256[0]: bad spki_sha256 'abc' (base64 or hex of a 32-byte sha256)"),
    ({"name": "r", "action": "allow", "from": {"tls": "optional"}},
     f"{P}.from.tls: must be one of required, none; got 'optional'"),
    ({"name": "r", "action": "allow", "from": {"identities": []}},
     f"{P}.from.identities: is an empty list, which would match nothing (leave the key out to "
     "match anything)"),
    ({"name": "r", "action": "allow", "from": {"cidrs": []}},
     f"{P}.from.cidrs: is an empty list, which would match nothing (leave the key out to "
     "match anything)"),
    ({"name": "r", "action": "allow", "to": {"ports": [0]}},
     f"{P}.to.ports[0]: bad port 0 (1-65535, or a range like \"8000-8100\")"),
    ({"name": "r", "action": "allow", "to": {"ports": [443, 65536]}},
     f"{P}.to.ports[1]: bad port 65536 (1-65535, or a range like \"8000-8100\")"),
    ({"name": "r", "action": "allow", "to": {"ports": ["9000-8000"]}},
     f"{P}.to.ports[0]: bad port '9000-8000' (1-65535, or a range like \"8000-8100\")"),
    ({"name": "r", "action": "allow", "ports": [True]},
     f"{P}.ports[0]: bad port True (1-65535, or a range like \"8000-8100\")"),
    ({"name": "r", "action": "allow", "ports": [1], "to": {"ports": [2]}},
     f"{P}.ports: give ports here or under to.ports, not both"),
    ({"name": "r", "action": "allow", "to": {"destinations": ["db:http"]}},
     f"{P}.to.destinations[0]: bad destination 'db:http': bad port 'http' (1-65535, a range "
     "8000-8100, or *)"),
    ({"name": "r", "action": "allow", "to": {"destinations": ["a*b.example:1"]}},
     f"{P}.to.destinations[0]: bad destination 'a*b.example:1': bad host 'a*b.example': * is "
     "only allowed as the whole leftmost label (*.example.com)"),
    ({"name": "r", "action": "allow", "to": {"server_identities": ["spiffe://td/a**"]}},
     f"{P}.to.server_identities[0]: bad server identity 'spiffe://td/a**': ** must be a whole "
     "path segment (/**/)"),
    ({"name": "r", "action": "allow", "from": {"cn": [""]}},
     f"{P}.from.cn[0]: bad CN pattern '': is empty"),
    ({"name": "r", "action": "allow", "from": {"identities": {"a": 1}}},
     f"{P}.from.identities: expected a string, got a mapping"),
    ({"name": "r", "action": "allow", "from": "everyone"},
     f"{P}.from: expected a mapping, got a string"),
])
def test_rule_errors_name_the_key_path(rule: dict[str, Any], expected: str) -> None:
    assert errors_for_rule(rule) == [expected]


def test_duplicate_rule_names() -> None:
    _, issues = parse("""
rs:
  default: deny
  rules:
    - {name: a, action: allow}
    - {name: b, action: allow}
    - {name: a, action: deny}
""")
    assert issues == ["rulesets.rs.rules[2].name: duplicate rule name 'a' (also rulesets.rs.rules[0])"]


def test_ruleset_level_errors() -> None:
    _, issues = parse("""
a: {rules: []}
b: {default: maybe}
c: {default: deny, reevaluate: true}
d: {default: deny, rules: {name: x}}
e: null
f: {default: deny, rules: [null, 3]}
""")
    assert issues == [
        "rulesets.a.default: is required (allow or deny)",
        "rulesets.b.default: must be one of allow, deny; got 'maybe'",
        "rulesets.c.reevaluate: unknown key (known: default, rules, reevaluate_on_reload)",
        "rulesets.d.rules: expected a list, got a mapping",
        "rulesets.e: expected a mapping with default: allow|deny and rules: [...]",
        "rulesets.f.rules[0]: expected a rule mapping with name and action",
        "rulesets.f.rules[1]: expected a mapping, got int",
    ]


def test_every_error_is_reported_at_once() -> None:
    issues = errors_for_rule({"name": "r", "action": "allow",
                              "from": {"cidrs": ["x"], "identities": ["y"], "dns": ["a.*"]},
                              "to": {"ports": [0]}})
    assert [i.split(":")[0] for i in issues] == [
        f"{P}.from.identities[0]", f"{P}.from.dns[0]", f"{P}.from.cidrs[0]", f"{P}.to.ports[0]"]


# ---------------------------------------------------------------------------- helpers
@pytest.mark.parametrize("value, expected", [
    (443, PortRange(443, 443)), ("443", PortRange(443, 443)), (" 80 - 90 ", PortRange(80, 90)),
    ("1-65535", PortRange(1, 65535)), (0, None), (65536, None), ("90-80", None), ("x", None),
    (True, None), (None, None), (4.5, None), ("", None), ("1-", None),
])
def test_parse_port_range(value: object, expected: PortRange | None) -> None:
    assert parse_port_range(value) == expected


@pytest.mark.parametrize("text, host, network, ports", [
    ("db.shop:5432", "db.shop", None, ((5432, 5432),)),
    ("DB.Shop.:5432", "db.shop", None, ((5432, 5432),)),
    ("*.svc:*", "*.svc", None, ()),
    ("*.svc", "*.svc", None, ()),
    ("10.0.0.0/8", None, "10.0.0.0/8", ()),
    ("10.0.0.0/8:443", None, "10.0.0.0/8", ((443, 443),)),
    ("10.1.2.3:8000-8100", None, "10.1.2.3/32", ((8000, 8100),)),
    ("2001:db8::/32", None, "2001:db8::/32", ()),
    ("::1", None, "::1/128", ()),
    ("[2001:db8::/32]:443", None, "2001:db8::/32", ((443, 443),)),
    ("[::1]", None, "::1/128", ()),
])
def test_parse_destination(text: str, host: str | None, network: str | None,
                           ports: tuple[tuple[int, int], ...]) -> None:
    d = parse_destination(text)
    assert isinstance(d, DestinationConfig)
    assert d.host == host
    assert d.network == (ipaddress.ip_network(network) if network else None)
    assert d.ports == tuple(PortRange(*p) for p in ports)


@pytest.mark.parametrize("text", ["", ":443", "[::1", "[::1]x", "a..b:1", "db:0", "db:1-0"])
def test_parse_destination_errors(text: str) -> None:
    assert isinstance(parse_destination(text), str)


def test_normalize_spki_forms() -> None:
    raw = bytes(range(32))
    assert normalize_spki(PIN) == PIN
    assert normalize_spki(raw.hex()) == PIN
    assert normalize_spki(raw.hex().upper()) == PIN
    assert normalize_spki(base64.urlsafe_b64encode(raw).decode().rstrip("=")) == PIN
    assert normalize_spki(base64.b64encode(raw[:31]).decode()) is None
    assert normalize_spki("!!!") is None


# ---------------------------------------------------------------------------- loader
BASE = {
    "version": 1,
    "node": {"name": "t"},
    "listeners": [{"name": "in", "listen": "127.0.0.1:15006", "tls": {"mode": "off"},
                   "ruleset": "inbound", "upstream": "app"}],
    "upstreams": {"app": {"address": "127.0.0.1:8080"}},
}


def test_through_parse_config() -> None:
    raw = dict(BASE, rulesets={"inbound": {"default": "deny", "rules": [
        {"name": "a", "action": "allow", "from": {"cidrs": ["10.0.0.0/8"]}}]}})
    cfg = parse_config(raw)
    assert cfg.rulesets["inbound"].rules[0].from_.cidrs == (ipaddress.ip_network("10.0.0.0/8"),)


def test_parse_config_reports_ruleset_errors_with_paths() -> None:
    raw = dict(BASE, rulesets={"inbound": {"default": "deny", "rules": [
        {"name": "a", "action": "allow", "from": {"cidrs": ["10.0.0.0/8", "nope"]}},
        {"name": "a", "action": "deny", "to": {"ports": ["0-5"]}}]}})
    with pytest.raises(ConfigError) as exc:
        parse_config(raw)
    assert [str(i) for i in exc.value.issues] == [
        "rulesets.inbound.rules[0].from.cidrs[1]: bad CIDR 'nope' (use 10.0.0.0/8, "
        "2001:db8::/32 or a single address)",
        "rulesets.inbound.rules[1].to.ports[0]: bad port '0-5' (1-65535, or a range like "
        "\"8000-8100\")",
        "rulesets.inbound.rules[1].name: duplicate rule name 'a' (also rulesets.inbound.rules[0])",
    ]


def test_rulesets_file_errors_carry_the_file_name(tmp_path: Any) -> None:
    path = tmp_path / "rules.yaml"
    path.write_text("rulesets:\n  r:\n    default: deny\n    rules:\n"
                    "      - {name: x, action: allow, from: {identities: [bad]}}\n")
    with pytest.raises(ConfigError) as exc:
        load_rulesets_file(str(path))
    (issue,) = exc.value.issues
    assert issue.path == f"{path}: rulesets.r.rules[0].from.identities[0]"
    assert issue.message.startswith("bad identity glob 'bad'")


# ---------------------------------------------------------------------------- references
MTLS_LISTENER = {"name": "in", "listen": "127.0.0.1:15006",
                 "tls": {"mode": "terminate", "material": "mesh"},
                 "ruleset": "inbound", "upstream": "app"}
PLAIN_LISTENER = {"name": "plain", "listen": "127.0.0.1:15001", "tls": {"mode": "off"},
                  "ruleset": "outbound", "upstream": "app"}
REFS = {
    "version": 1,
    "node": {"name": "t"},
    "tls": {"mesh": {"cert": "/x/tls.crt", "key": "/x/tls.key", "ca": "/x/ca.crt"}},
    "listeners": [MTLS_LISTENER, PLAIN_LISTENER],
    "upstreams": {"app": {"address": "127.0.0.1:8080"}},
}


def reference_errors(rulesets: dict[str, Any], **extra: Any) -> list[str]:
    raw = {**REFS, "rulesets": {"inbound": {"default": "deny"}, "outbound": {"default": "allow"},
                                **rulesets}, **extra}
    try:
        parse_config(raw)
    except ConfigError as exc:
        return [str(i) for i in exc.issues]
    return []


def one_rule(ruleset: str, rule: dict[str, Any]) -> dict[str, Any]:
    return {ruleset: {"default": "deny", "rules": [{"name": "r", "action": "deny", **rule}]}}


@pytest.mark.parametrize(("ruleset", "rule", "expected"), [
    ("inbound", {"to": {"listeners": ["in", "nope"]}},
     "rulesets.inbound.rules[0].to.listeners[1]: unknown listener 'nope' (known: in, plain)"),
    ("inbound", {"to": {"listeners": ["plain"]}},
     "rulesets.inbound.rules[0].to.listeners[0]: listener 'plain' runs ruleset 'outbound', not "
     "'inbound' (listeners running 'inbound': in)"),
    ("outbound", {"from": {"identities": ["spiffe://td/a"]}},
     "rulesets.outbound.rules[0]: from.identities: listener(s) plain never see a client "
     "certificate (tls mode off or client_auth none), so rule 'r' can never match"),
    ("outbound", {"from": {"tls": "required"}},
     "rulesets.outbound.rules[0]: from.tls: required: listener(s) plain never see a client "
     "certificate (tls mode off or client_auth none), so rule 'r' can never match"),
    ("inbound", {"from": {"tls": "none"}},
     "rulesets.inbound.rules[0]: from.tls: none: listener(s) in always terminate TLS, so rule "
     "'r' can never match"),
    ("inbound", {"from": {"tlvs": {"aws_vpce_id": ["vpce-1"]}}},
     "rulesets.inbound.rules[0]: from.tlvs: listener(s) in do not accept PROXY protocol, so "
     "rule 'r' can never match"),
    ("outbound", {"to": {"sni": ["a.example"]}},
     "rulesets.outbound.rules[0]: to.sni: listener(s) plain have tls mode off (no SNI), so rule "
     "'r' can never match"),
    ("inbound", {"ports": [8080, "9000-9100"]},
     "rulesets.inbound.rules[0]: to.ports ['8080', '9000-9100']: no listener running it "
     "listens there (in on 15006), so rule 'r' can never match"),
    ("inbound", {"to": {"server_identities": ["spiffe://td/db"]}},
     "rulesets.inbound.rules[0]: to.server_identities: the upstreams of listener(s) in do not "
     "use TLS, so rule 'r' can never match"),
])
def test_rules_that_can_never_match_are_errors(ruleset: str, rule: dict[str, Any],
                                               expected: str) -> None:
    assert reference_errors(one_rule(ruleset, rule)) == [expected]


@pytest.mark.parametrize("rule", [
    {"from": {"identities": ["spiffe://td/a"]}, "to": {"listeners": ["in"]}},
    {"from": {"tls": "none"}},  # fine on an auto listener, see below
    {"ports": ["15000-15010"]},
    {"from": {"cidrs": ["10.0.0.0/8"]}, "to": {"listeners": ["in"], "ports": [15006]}},
])
def test_rules_that_can_match_pass(rule: dict[str, Any]) -> None:
    auto = {**MTLS_LISTENER, "tls": {"mode": "auto", "material": "mesh"}}
    assert reference_errors(one_rule("inbound", rule),
                            listeners=[auto, PLAIN_LISTENER]) == []


def test_unused_rulesets_and_unknown_ports_are_not_judged() -> None:
    unused = one_rule("shared", {"to": {"listeners": ["elsewhere"]},
                                 "from": {"identities": ["spiffe://td/a"]}})
    assert reference_errors(unused) == []  # a shared rules file may serve other enforcers
    port0 = {**MTLS_LISTENER, "listen": "127.0.0.1:0"}
    assert reference_errors(one_rule("inbound", {"ports": [8080]}),
                            listeners=[port0, PLAIN_LISTENER]) == []


def test_reference_errors_in_a_rulesets_file_name_the_file(tmp_path: Any) -> None:
    path = tmp_path / "rules.yaml"
    path.write_text(yaml.safe_dump({"rulesets": one_rule("inbound", {
        "to": {"listeners": ["gone"]}})}))
    raw = {**REFS, "rulesets": {"outbound": {"default": "allow"}}, "rulesets_file": str(path)}
    with pytest.raises(ConfigError) as exc:
        parse_config(raw)
    assert [str(i) for i in exc.value.issues] == [
        f"rulesets_file: {path}: rulesets.inbound.rules[0].to.listeners[0]: unknown listener "
        "'gone' (known: in, plain)"]
