"""Micro-benchmark: policy decision cost per connection with a 1,000-rule ruleset.

Run: python benchmarks/micro/bench_policy.py [--rules N] [--number N]
Prints decisions per second (best of 5 timeit repeats) for:
- warm: peers already seen (identity cached per certificate, as in steady state), client
  addresses varying per connection (gateway-like: the CIDR index is not cached),
- cold peer: a new PeerIdentity object every decision (worst case: a first connection from
  a certificate, or a data plane that does not reuse identities),
- plaintext: no identity at all,
- explain: the per-rule reference path used by ``policy explain`` (for comparison),
and the compile time of the ruleset.

The ruleset mixes what operators write: literal SPIFFE IDs, namespace globs with CIDRs and
ports, deny CIDRs (quarantine subnets), DNS-SAN denies on a port, and TLV allows.
"""

from __future__ import annotations

import argparse
import dataclasses
import ipaddress
import sys
import time
import timeit
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # run from a checkout

from enforcer.config.reader import Node
from enforcer.config.rulesets import RulesetConfig, parse_rulesets
from enforcer.policy import CompiledRuleset, FlowFacts, compile_ruleset
from enforcer.tlsconf.identity import PeerIdentity, identity_from_spiffe_id


def rules_config(n: int) -> RulesetConfig:
    rules: list[dict[str, Any]] = []
    for i in range(n):
        kind = i % 5
        rule: dict[str, Any] = {"name": f"r{i}", "action": "allow"}
        if kind == 0:
            rule["from"] = {"identities": [f"spiffe://cluster.local/ns/ns{i}/sa/app"]}
        elif kind == 1:
            rule["from"] = {"identities": [f"spiffe://cluster.local/ns/ns{i}/**"],
                            "cidrs": [f"10.{i % 256}.0.0/16"]}
            rule["ports"] = [15006]
        elif kind == 2:
            rule.update(action="deny", **{"from": {"cidrs": [f"192.168.{i % 256}.0/24"]}})
        elif kind == 3:
            rule.update(action="deny", **{"from": {"dns": [f"*.q{i}.example"]},
                                          "to": {"ports": [i + 1]}})
        else:
            rule["from"] = {"tlvs": {"aws_vpce_id": [f"vpce-{i:04x}*"]}}
        rules.append(rule)
    issues: list[Any] = []
    cfgs = parse_rulesets(Node({"bench": {"default": "deny", "rules": rules}}, "rulesets",
                               issues))
    if issues:
        raise SystemExit("\n".join(map(str, issues)))
    return cfgs["bench"]


def flows(count: int, peers: list[PeerIdentity]) -> list[FlowFacts]:
    out = []
    for i in range(count):
        ip = ipaddress.ip_address(f"10.{i % 256}.{(i * 7) % 256}.{(i * 13) % 256}")
        out.append(FlowFacts("inbound", 15006, ip, peers[i % len(peers)], True,
                             tlvs={"aws_vpce_id": f"vpce-{i:04x}0abc"} if i % 3 == 0 else {}))
    return out


def rate(fn: Callable[[], object], number: int) -> float:
    best = min(timeit.repeat(fn, number=number, repeat=5))
    return number / best


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rules", type=int, default=1000)
    parser.add_argument("--number", type=int, default=20000)
    args = parser.parse_args(argv)

    cfg = rules_config(args.rules)
    started = time.perf_counter()
    rs: CompiledRuleset = compile_ruleset(cfg)
    compile_ms = (time.perf_counter() - started) * 1000

    peers = [identity_from_spiffe_id(f"spiffe://cluster.local/ns/ns{i}/sa/app")
             for i in range(0, args.rules, 7)]
    warm = flows(1024, peers)
    for f in warm:  # fill the caches, and check the fast path against the reference
        assert rs.decide(f) == rs.explain(f).decision
    it = iter(range(1 << 62))

    def decide_warm() -> None:
        rs.decide(warm[next(it) & 1023])

    def decide_cold() -> None:
        f = warm[next(it) & 1023]
        rs.decide(dataclasses.replace(f, identity=dataclasses.replace(f.identity)))  # type: ignore[type-var]

    plain = [dataclasses.replace(f, identity=None, tls=False) for f in warm]

    def decide_plain() -> None:
        rs.decide(plain[next(it) & 1023])

    def explain() -> None:
        rs.explain(warm[next(it) & 1023])

    print(f"ruleset: {args.rules} rules, compiled in {compile_ms:.1f} ms")
    results = [
        ("decide, warm peers, varying client IPs", rate(decide_warm, args.number)),
        ("decide, cold peer (new identity object)", rate(decide_cold, max(1, args.number // 20))),
        ("decide, plaintext (no identity)", rate(decide_plain, args.number)),
        ("explain (per-rule reference)", rate(explain, max(1, args.number // 200))),
    ]
    for name, ops in results:
        print(f"{name:<45} {ops:>12,.0f} ops/s  {1e6 / ops:>9.2f} µs/op")


if __name__ == "__main__":
    main()
