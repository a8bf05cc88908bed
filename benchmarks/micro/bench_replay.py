"""Micro-benchmark: how fast ``enforcer policy replay`` re-decides recorded flows.

Run: python benchmarks/micro/bench_replay.py [--number N]
Flow-log lines as the data plane writes them (mTLS peers with SPIFFE IDs from a pool of
200, client addresses from a /16, some with PROXY TLVs) are parsed and re-decided against
a 50-rule candidate ruleset. Prints lines per second for parsing alone and for parsing
plus deciding, i.e. how long a day of flow log takes to replay.
"""

from __future__ import annotations

import argparse
import random
import sys
import time
from pathlib import Path
from typing import Any

import orjson

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # run from a checkout

from enforcer.config.loader import parse_config
from enforcer.policy.replay import Candidate, IdentityCache, RecordedFlow, parse_line


def record(i: int, rnd: random.Random) -> bytes:
    sid = f"spiffe://cluster.local/ns/ns{rnd.randrange(20)}/sa/sa{rnd.randrange(10)}"
    rec: dict[str, Any] = {
        "ts": "2026-11-23T19:50:00.123456Z", "event": "flow", "flow_id": f"F{i}",
        "node": "n", "listener": "inbound", "action": rnd.choice(["allow", "deny"]),
        "ruleset": "inbound", "rule": None, "reason": "default",
        "client": {"ip": f"10.1.{rnd.randrange(256)}.{rnd.randrange(256)}", "port": 40000},
        "peer": {"ip": "10.0.0.1", "port": 40000}, "local": {"ip": "10.0.9.9", "port": 15006},
        "proxy_protocol": ({"version": 2, "command": "PROXY",
                            "tlvs": {"aws_vpce_id": f"vpce-{rnd.randrange(5)}"}}
                           if i % 4 == 0 else None),
        "tls": {"version": "TLSv1.3", "cipher": "TLS_AES_128_GCM_SHA256", "sni": None,
                "resumed": False, "group": "x25519",
                "peer": {"spiffe_id": sid, "cn": None, "dns": [], "uri": [sid], "ip": [],
                         "ou": [], "spki_sha256": f"pin{sid}", "serial": "1f",
                         "not_after": "2030-01-01T00:00:00Z"}},
        "upstream": None, "relay": "native", "bytes": {"from_client": 1, "to_client": 1},
        "duration_s": 0.1, "close": "client_fin"}
    return orjson.dumps(rec)


def candidate() -> Candidate:
    rules: list[dict[str, Any]] = [
        {"name": f"ns{n}-sa{s}", "action": "allow",
         "from": {"identities": [f"spiffe://cluster.local/ns/ns{n}/sa/sa{s}"]}}
        for n in range(10) for s in range(4)]
    rules += [{"name": f"quarantine{k}", "action": "deny",
               "from": {"cidrs": [f"10.1.{k * 16}.0/20"]}} for k in range(10)]
    cfg = parse_config({
        "version": 1, "node": {"name": "bench"},
        "tls": {"mesh": {"cert": "/x.crt", "key": "/x.key", "ca": "/ca.crt"}},
        "listeners": [{"name": "inbound", "listen": "127.0.0.1:15006",
                       "proxy_protocol": {"accept": "optional",
                                          "trusted_sources": ["10.0.0.0/8"]},
                       "tls": {"mode": "terminate", "material": "mesh"},
                       "ruleset": "inbound", "upstream": "app"}],
        "upstreams": {"app": {"address": "127.0.0.1:8080"}},
        "rulesets": {"inbound": {"default": "deny", "rules": rules}}})
    return Candidate(cfg.rulesets, {lst.name: lst for lst in cfg.listeners}, cfg.upstreams)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--number", type=int, default=50000)
    args = parser.parse_args()
    rnd = random.Random(26)
    lines = [record(i, rnd) for i in range(args.number)]
    cand = candidate()
    for label, decide in (("parse flow-log lines", False), ("parse + re-decide", True)):
        identities = IdentityCache()
        started = time.perf_counter()
        for line in lines:
            flow = parse_line(line, identities)
            if decide and isinstance(flow, RecordedFlow):
                cand.decide(flow)
        seconds = time.perf_counter() - started
        print(f"{label:<32} {len(lines) / seconds:>10,.0f} ops/s  (flow-log lines)")


if __name__ == "__main__":
    main()
