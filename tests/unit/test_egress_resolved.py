"""egress/resolved.py: each address a requested name resolves to is decided on again, with
the name kept: CIDR deny rules (``to.cidrs``, ``to.destinations`` with a CIDR) beat an
allow by name, name entries still match the name, an address that does not parse is
refused, and a refusal names the host, each address and the rule. Pure: no socket."""

from __future__ import annotations

import dataclasses
import socket
from typing import Any

import pytest

from enforcer.config.reader import Node
from enforcer.config.rulesets import parse_rulesets
from enforcer.egress.resolved import AllRefused, admit, admitter
from enforcer.policy import compile_ruleset
from enforcer.policy.facts import Decision, FlowFacts


def _ruleset(rules: list[dict[str, Any]], default: str = "deny") -> Any:
    issues: list[Any] = []
    parsed = parse_rulesets(Node({"e": {"default": default, "rules": rules}}, "rulesets",
                                 issues))
    assert not issues, issues
    return compile_ruleset(parsed["e"])


def _facts(host: str, port: int = 443) -> FlowFacts:
    return FlowFacts(listener="egress", port=port, client_ip=None, identity=None, tls=False,
                     host=host, destination=(host, port))


def _addrs(*ips: str) -> list[tuple[int, Any]]:
    return [(socket.AF_INET6 if ":" in ip else socket.AF_INET,
             (ip, 443, 0, 0) if ":" in ip else (ip, 443)) for ip in ips]


RULES = [
    {"name": "web", "action": "allow", "to": {"hosts": ["*.example.com"], "ports": [443]}},
    {"name": "api", "action": "allow", "to": {"destinations": ["api.partner.test:443"]}},
    {"name": "no-internal", "action": "deny",
     "to": {"cidrs": ["10.0.0.0/8", "169.254.169.254/32", "fd00::/8"]}},
    {"name": "no-db-port", "action": "deny", "to": {"destinations": ["192.0.2.0/24:443"]}},
]


def test_cidr_denies_beat_a_name_allow() -> None:
    rs = _ruleset(RULES)
    f = _facts("www.example.com")
    assert rs.decide(f).rule == "web"  # the request as asked: allowed by name
    ok = _addrs("203.0.113.5")
    assert admit("www.example.com", f, rs.decide, ok) == ok
    for ip, rule in (("10.1.2.3", "no-internal"), ("169.254.169.254", "no-internal"),
                     ("fd00::1", "no-internal"), ("192.0.2.7", "no-db-port"),
                     ("::ffff:10.0.0.1", "no-internal")):  # an IPv4-mapped address too
        with pytest.raises(AllRefused) as err:
            admit("www.example.com", f, rs.decide, _addrs(ip))
        assert str(err.value) == (f"www.example.com resolved only to addresses the rules "
                                  f"refuse: {ip} (denied by rule {rule!r})")
    mixed = _addrs("10.0.0.1", "203.0.113.5", "169.254.169.254", "203.0.113.6")
    assert admit("www.example.com", f, rs.decide, mixed) == [mixed[1], mixed[3]]


def test_name_entries_still_match_the_name_and_bad_addresses_are_refused() -> None:
    rs = _ruleset(RULES)
    f = _facts("api.partner.test")
    assert rs.decide(f).rule == "api"
    assert admit("api.partner.test", f, rs.decide, _addrs("198.51.100.1")) == \
        _addrs("198.51.100.1")
    with pytest.raises(AllRefused, match=r"10\.9\.9\.9 \(denied by rule 'no-internal'\)"):
        admit("api.partner.test", f, rs.decide, _addrs("10.9.9.9"))
    with pytest.raises(AllRefused, match="not-an-ip \\(not an IP address\\)"):
        admit("api.partner.test", f, rs.decide, [(socket.AF_INET, ("not-an-ip", 443))])
    many = _addrs(*(f"10.0.0.{i}" for i in range(1, 12)))
    with pytest.raises(AllRefused, match=r"\.\.\. \+3 more$"):
        admit("api.partner.test", f, rs.decide, many)


def test_default_allow_ruleset_and_explain_agree() -> None:
    rs = _ruleset([RULES[2]], default="allow")
    f = _facts("metadata.evil.test", 80)
    with pytest.raises(AllRefused, match=r"169\.254\.169\.254 \(denied by rule 'no-internal'\)"):
        admit("metadata.evil.test", f, rs.decide, _addrs("169.254.169.254"))
    resolved = dataclasses.replace(f, resolved="10.0.0.1")
    assert rs.explain(resolved).decision == rs.decide(resolved)
    nothing = Decision("deny", "e", None, "default")
    with pytest.raises(AllRefused, match="default of ruleset 'e'"):
        admit("x.test", f, lambda _f: nothing, _addrs("203.0.113.1"))


def test_admitter_only_for_requested_names() -> None:
    class Session:
        def __init__(self, host: str | None) -> None:
            self.host = host

    rs = _ruleset(RULES)
    for host in (None, "10.0.0.1", "2001:db8::1"):
        assert admitter(Session(host), lambda: _facts("x"), rs.decide, "f") is None  # type: ignore[arg-type]
    check = admitter(Session("www.example.com"), lambda: _facts("www.example.com"),  # type: ignore[arg-type]
                     rs.decide, "f")
    assert check is not None
    assert check(_addrs("10.0.0.1", "203.0.113.9")) == _addrs("203.0.113.9")
