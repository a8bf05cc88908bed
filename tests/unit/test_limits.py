"""The pure limiter (policy.limits): token bucket with time passed in, concurrency leases
released exactly once, keys per identity / client network / listener, counters kept
across a reload, idle entries swept; and the ``limits:`` schema's key-path errors."""

from __future__ import annotations

import datetime as dt
import ipaddress
from typing import Any

import pytest
import yaml

from enforcer.config.errors import ConfigError
from enforcer.config.reader import Node
from enforcer.config.rulesets import LimitsConfig, RulesetConfig, parse_rate, parse_rulesets
from enforcer.policy import FlowFacts, compile_rulesets
from enforcer.policy.limits import NO_KEY, SWEEP_MIN, Lease, Limiter, Refused, limit_key
from enforcer.tlsconf.identity import PeerIdentity


def ident(spiffe_id: str | None = None, cn: str | None = None) -> PeerIdentity:
    return PeerIdentity(spiffe_id, None, None, (), (), (), cn, (), (), None, "1",
                        dt.datetime(2030, 1, 1, tzinfo=dt.UTC), "PIN")


def parse_rulesets_document(text: str) -> dict[str, RulesetConfig]:
    issues: list[Any] = []
    out = parse_rulesets(Node(yaml.safe_load(text), "", issues)["rulesets"])
    if issues:
        raise ConfigError(issues)
    return out


def lim(**kw: Any) -> LimitsConfig:
    return LimitsConfig(**{"per": "listener", **kw})


def test_rate_parsing() -> None:
    assert parse_rate("10/s") == 10
    assert parse_rate(" 600 / m ") == 10
    assert parse_rate("36/h") == 0.01
    assert parse_rate("2.5/s") == 2.5
    for bad in ("0/s", "10", "10/d", "-1/s", "ten/s", "/s"):
        assert parse_rate(bad) is None, bad


def test_token_bucket_refills_with_time_passed_in() -> None:
    limiter = Limiter()
    spec = lim(rate=2.0, burst=3)
    got = [limiter.admit("rs", "r", spec, "k", 100.0) for _ in range(4)]
    assert [isinstance(g, Lease) for g in got] == [True, True, True, False]
    refused = got[3]
    assert isinstance(refused, Refused) and refused.reason == "rate_limited"
    assert isinstance(limiter.admit("rs", "r", spec, "k", 100.4), Refused)  # 0.8 token
    assert isinstance(limiter.admit("rs", "r", spec, "k", 100.5), Lease)  # 1.0 token
    # a long pause fills the bucket to burst, never beyond
    assert sum(isinstance(limiter.admit("rs", "r", spec, "k", 1000.0), Lease)
               for _ in range(10)) == 3
    # a clock that goes backwards adds nothing
    assert isinstance(limiter.admit("rs", "r", spec, "k", 10.0), Refused)


def test_concurrency_lease_released_exactly_once() -> None:
    limiter = Limiter()
    spec = lim(max_connections=2)
    a = limiter.admit("rs", "r", spec, "k", 0.0)
    b = limiter.admit("rs", "r", spec, "k", 0.0)
    assert isinstance(a, Lease) and isinstance(b, Lease)
    c = limiter.admit("rs", "r", spec, "k", 0.0)
    assert isinstance(c, Refused) and c.reason == "concurrency_limited"
    assert limiter.open_count("rs", "r", "k") == 2
    a.release()
    a.release()  # a second release must not free b's slot
    assert not a.held and b.held
    assert limiter.open_count("rs", "r", "k") == 1
    assert isinstance(limiter.admit("rs", "r", spec, "k", 0.0), Lease)
    assert isinstance(limiter.admit("rs", "r", spec, "k", 0.0), Refused)


def test_concurrency_refusal_takes_no_token() -> None:
    limiter = Limiter()
    spec = lim(max_connections=1, rate=1.0, burst=2)
    first = limiter.admit("rs", "r", spec, "k", 0.0)
    assert isinstance(first, Lease)
    for _ in range(5):
        assert isinstance(limiter.admit("rs", "r", spec, "k", 0.0), Refused)
    first.release()
    assert isinstance(limiter.admit("rs", "r", spec, "k", 0.0), Lease)  # the second token


def test_keys_are_independent_per_rule_and_key() -> None:
    limiter = Limiter()
    spec = lim(max_connections=1)
    assert isinstance(limiter.admit("rs", "r", spec, "a", 0.0), Lease)
    assert isinstance(limiter.admit("rs", "r", spec, "b", 0.0), Lease)
    assert isinstance(limiter.admit("rs", "other", spec, "a", 0.0), Lease)
    assert isinstance(limiter.admit("rs2", "r", spec, "a", 0.0), Lease)
    assert isinstance(limiter.admit("rs", "r", spec, "a", 0.0), Refused)


def test_reload_keeps_counters_and_clamps_the_bucket() -> None:
    limiter = Limiter()
    old = lim(max_connections=3, rate=1.0, burst=10)
    leases = [limiter.admit("rs", "r", old, "k", 0.0) for _ in range(3)]
    assert all(isinstance(x, Lease) for x in leases)
    new = lim(max_connections=3, rate=1.0, burst=2)  # same rule name, new values
    assert isinstance(limiter.admit("rs", "r", new, "k", 0.0), Refused)  # 3 still open
    for lease in leases:
        assert isinstance(lease, Lease)
        lease.release()
    assert limiter.open_count("rs", "r", "k") == 0
    # 7 tokens were left of the old 10; the new burst of 2 caps them
    assert [isinstance(limiter.admit("rs", "r", new, "k", 0.0), Lease)
            for _ in range(3)] == [True, True, False]


def test_sweep_forgets_only_idle_full_entries() -> None:
    limiter = Limiter()
    spec = lim(max_connections=5, rate=1.0, burst=1)
    held = limiter.admit("rs", "r", spec, "held", 0.0)
    assert isinstance(limiter.admit("rs", "r", spec, "drained", 0.0), Lease)
    assert isinstance(held, Lease)
    for lease_key in ("drained",):
        assert limiter.open_count("rs", "r", lease_key) == 1
    assert limiter.sweep(0.5) == 0  # both hold a connection
    limiter._entries[("rs", "r", "drained")].active = 0
    assert limiter.sweep(0.5) == 0  # its bucket is still refilling
    assert limiter.sweep(2.0) == 1
    assert len(limiter) == 1 and limiter.open_count("rs", "r", "held") == 1


def test_table_stays_bounded_under_many_keys() -> None:
    limiter = Limiter()
    spec = lim(max_connections=1)
    for i in range(10 * SWEEP_MIN):
        lease = limiter.admit("rs", "r", spec, f"10.0.{i // 256}.{i % 256}", float(i))
        assert isinstance(lease, Lease)
        lease.release()
    assert len(limiter) <= SWEEP_MIN + 1


def test_limit_keys() -> None:
    by_id = lim(per="identity")
    assert limit_key(by_id, "in", None, ident("spiffe://td/a")) == "spiffe://td/a"
    assert limit_key(by_id, "in", None, ident(cn="frontend")) == "cn:frontend"
    assert limit_key(by_id, "in", None, ident()) == "spki:PIN"
    assert limit_key(by_id, "in", None, None) == NO_KEY
    by_client = lim(per="client", ipv4_prefix=24, ipv6_prefix=64)
    v4 = ipaddress.ip_address("203.0.113.77")
    assert limit_key(by_client, "in", v4, None) == "203.0.113.0/24"
    mapped = ipaddress.ip_address("::ffff:203.0.113.5")
    assert limit_key(by_client, "in", mapped, None) == "203.0.113.0/24"
    v6 = ipaddress.ip_address("2001:db8:1:2:3::9")
    assert limit_key(by_client, "in", v6, None) == "2001:db8:1:2::/64"
    assert limit_key(by_client, "in", None, None) == NO_KEY
    assert limit_key(lim(per="client"), "in", v4, None) == "203.0.113.77/32"
    assert limit_key(lim(), "inbound", v4, ident("spiffe://td/a")) == "inbound"


RULES = """
rulesets:
  rs:
    default: deny
    rules:
      - name: limited
        action: allow
        limits: {per: client, max_connections: 10, rate: 600/m, ipv4_prefix: 24}
      - name: plain
        action: allow
"""


def test_decision_carries_the_rules_limits() -> None:
    compiled = compile_rulesets(parse_rulesets_document(RULES))
    facts = FlowFacts("in", 1, ipaddress.ip_address("10.0.0.1"), None, False)
    decision = compiled["rs"].decide(facts)
    assert decision.rule == "limited"
    assert decision.limits == LimitsConfig("client", 10, 10.0, 10, 24, 64)


@pytest.mark.parametrize(("limits", "path", "message"), [
    ("{max_connections: 1}", "limits.per", "is required"),
    ("{per: ip, max_connections: 1}", "limits.per", "one of"),
    ("{per: client}", "limits", "needs max_connections, rate, or both"),
    ("{per: client, max_connections: 0}", "limits.max_connections", "must be >= 1"),
    ("{per: client, rate: 10 per second}", "limits.rate", "bad rate '10 per second'"),
    ("{per: client, max_connections: 1, burst: 5}", "limits.burst", "goes with rate"),
    ("{per: identity, max_connections: 1, ipv4_prefix: 24}", "limits.ipv4_prefix",
     "goes with per: client"),
    ("{per: client, max_connections: 1, ipv6_prefix: 129}", "limits.ipv6_prefix",
     "must be <= 128"),
    ("{per: client, max_connection: 1}", "limits.max_connection", "did you mean"),
    ("[1]", "limits", "expected a mapping"),
])
def test_check_errors_name_the_key(limits: str, path: str, message: str) -> None:
    doc = ("rulesets:\n  rs:\n    default: deny\n    rules:\n"
           f"      - {{name: r, action: allow, limits: {limits}}}\n")
    with pytest.raises(ConfigError) as err:
        parse_rulesets_document(doc)
    texts = [str(i) for i in err.value.issues]
    assert any(f"rulesets.rs.rules[0].{path}:" in t and message in t for t in texts), texts


def test_limits_on_a_deny_rule_are_refused() -> None:
    doc = ("rulesets:\n  rs:\n    default: allow\n    rules:\n"
           "      - {name: r, action: deny, limits: {per: client, max_connections: 1}}\n")
    with pytest.raises(ConfigError, match=r"rules\[0\]\.limits: goes on allow rules"):
        parse_rulesets_document(doc)


def test_replay_reads_limited_and_revoked_records_as_policy_allows() -> None:
    from enforcer.policy.replay import RecordedFlow, parse_line

    for close in ("rate_limited", "concurrency_limited", "revoked", "peer_certificate_expired"):
        line = (b'{"event": "flow", "listener": "in", "action": "deny", "ruleset": "rs", '
                b'"rule": "limited", "reason": "rule", "close": "' + close.encode() + b'"}')
        flow = parse_line(line)
        assert isinstance(flow, RecordedFlow) and flow.action == "allow", close
    denied = parse_line(b'{"event": "flow", "listener": "in", "action": "deny", '
                        b'"rule": "r", "reason": "rule", "close": "denied"}')
    assert isinstance(denied, RecordedFlow) and denied.action == "deny"
