"""Command-line options of the harness, importable cheaply (``enforcer bench`` adds them to
its parser at every ``enforcer`` start, so this module imports nothing heavy)."""

from __future__ import annotations

import argparse
from pathlib import Path

RESULTS_DIR = Path(__file__).resolve().parent / "results"
RUNS_DIR = "runs"  # under --out: one folder per run (raw results, charts); git ignores it
CONTESTANTS = ("direct", "enforcer", "haproxy", "stunnel", "nginx")
SUITES = ("TLS_AES_128_GCM_SHA256", "TLS_AES_256_GCM_SHA384", "TLS_CHACHA20_POLY1305_SHA256")
HEADLINE_SUITE = "TLS_AES_256_GCM_SHA384"
WORKLOADS = ("bulk-1", "bulk-8", "keepalive", "newconn", "latency", "idle-small",
             "idle-large")
# the egress proxies (benchmarks/egress.py): their own contestants beside enforcer, their
# own table; "--workloads egress" picks them all
EGRESS_CONTESTANTS = ("dante", "tinyproxy", "squid")
EGRESS_WORKLOADS = ("socks5-newconn", "socks5-newconn-auth", "socks5-bulk", "connect-newconn",
                    "connect-bulk")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--quick", action="store_true",
                   help="short run (< 2 min): 1-2 s per measurement, smaller N; indicative")
    p.add_argument("--only", metavar="LIST",
                   help="contestants, comma-separated (" + ", ".join(CONTESTANTS) + "; egress "
                   "proxies: " + ", ".join(EGRESS_CONTESTANTS) + ")")
    p.add_argument("--workloads", metavar="LIST",
                   help="workloads, comma-separated (" + ", ".join(WORKLOADS) + "; egress "
                   "proxies: " + ", ".join(EGRESS_WORKLOADS) + ", or egress for all of them)")
    p.add_argument("--out", metavar="DIR", type=Path, default=RESULTS_DIR,
                   help="results directory (default benchmarks/results; runs go to its runs/)")
    p.add_argument("--duration", metavar="S", type=int,
                   help="seconds per throughput measurement (default 10; quick 1-2)")
    p.add_argument("--repeat", metavar="N", type=int, default=1,
                   help="measure everything N times in interleaved rounds; report medians")
    p.add_argument("--no-micro", action="store_true", help="skip the micro-benchmarks")
    p.add_argument("--suite", choices=SUITES, default=HEADLINE_SUITE,
                   help="the TLS 1.3 suite every pair is pinned to in the headline table "
                   f"(default {HEADLINE_SUITE})")
    p.add_argument("--no-defaults", action="store_true",
                   help="skip the second table (every tool's own TLS defaults); quick runs "
                   "skip it unless --defaults")
    p.add_argument("--defaults", action="store_true",
                   help="measure the defaults-vs-defaults table in a quick run too")
    p.add_argument("--enforcer-extra", metavar="YAML", type=Path,
                   help="YAML mapping merged into both enforcer configs (to try a setting)")
    p.add_argument("--variant", metavar="NAME=YAML", action="append", default=[],
                   help="also run enforcer with YAML merged into its configs, as column "
                   "enforcer-NAME (repeatable; compares a change within one run)")
    p.add_argument("--enforcer-at", metavar="NAME=DIR", action="append", default=[],
                   help="also run the enforcer code of another checkout (native extension built "
                   "in place), as column enforcer-NAME: before/after a change in one run")
    p.add_argument("--keep-temp", action="store_true",
                   help="keep the temp dir (generated configs and process logs)")
    p.add_argument("--render", metavar="RUN_DIR", type=Path,
                   help="only redraw results.md, charts and latest.* from RUN_DIR/results.json")
    p.add_argument("--netns", action="store_true",
                   help="run in a private network namespace (root) and add the columns "
                   "enforcer-transparent (the enforcer pair behind nftables redirects) and "
                   "enforcer-nathooks (its control: the explicit-port pair with the same "
                   "rules loaded for an unused port: conntrack and NAT hooks, no redirect)")
    p.add_argument("--passthrough", action="store_true",
                   help="instead of the sidecar pair: SNI passthrough (enforcer tls.mode "
                   "passthrough vs haproxy req.ssl_sni vs nginx ssl_preread), workloads "
                   "sni-newconn,sni-bulk; writes passthrough.md (benchmarks/passthrough.py)")
    p.add_argument("--list", action="store_true",
                   help="list contestants and workloads with what is installed, then exit")
