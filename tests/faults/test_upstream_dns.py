"""An upstream named by a host name: one of its addresses dead, then the name gone.

The proxy host runs enforcer in its own mount namespace with a bind-mounted /etc/hosts
the test owns (the system's /etc/hosts is never touched), so the test decides what
``app.test`` resolves to: first a host that drops every packet (no answer ever comes),
then one where nothing listens (refused), then the live backend. Every connection must
reach the live backend byte-exact; the first one pays the race (dialer.py) and counts
both failures, the next ones go straight to the live address. Then the name is removed
from the file: connections fail cleanly as ``upstream_resolve_failed`` (counted), and
work again once it is back.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.e2e.proc import write_config
from tests.faults.netns import hosts
from tests.faults.peers import Backend, NsEnforcer, closed_on_arrival, echo_roundtrip, http_get, sha

pytestmark = [pytest.mark.faults]

NAME = "app.test"
PORT = 8080


def _errors(metrics: str, reason: str) -> float:
    for family in text_string_to_metric_families(metrics):
        for s in family.samples:
            if (s.name == "enforcer_upstream_errors_total" and s.labels.get("reason") == reason
                    and s.labels.get("upstream") == "app"):
                return float(s.value)
    return 0.0


def test_dead_addresses_and_a_name_that_stops_resolving(tmp_path: Path,
                                                        faults_summary: Any) -> None:
    with hosts() as made:
        proxy = made.host("p")
        dead, refusing, live = made.host("d"), made.host("r"), made.host("l")
        _, dead_ip = made.link(proxy, dead)
        _, refusing_ip = made.link(proxy, refusing)
        _, live_ip = made.link(proxy, live)
        dead.partition()
        backend = Backend(live.listen(live_ip, PORT), "echo")
        etc_hosts = tmp_path / "hosts"
        mapped = (f"127.0.0.1 localhost\n{dead_ip} {NAME}\n{refusing_ip} {NAME}\n"
                  f"{live_ip} {NAME}\n")
        etc_hosts.write_text(mapped)
        cfg = {
            "version": 1, "node": {"name": "proxy"},
            "listeners": [{"name": "app", "listen": "127.0.0.1:0", "tls": {"mode": "off"},
                           "ruleset": "open", "upstream": "app"}],
            "upstreams": {"app": {"address": f"{NAME}:{PORT}"}},
            "rulesets": {"open": {"default": "allow"}},
            "admin": {"listen": "127.0.0.1:0"},
        }
        wrap = ["unshare", "--mount", "sh", "-c", 'mount --bind "$0" /etc/hosts && exec "$@"',
                str(etc_hosts)]
        enf = NsEnforcer(proxy, write_config(tmp_path / "p.yaml", cfg), wrap=wrap)
        try:
            port = enf.wait_bound()["app"]
            for i in range(12):
                payload = os.urandom(100_000 + i)
                got = echo_roundtrip(proxy.socket(), ("127.0.0.1", port), payload, timeout=30)
                assert sha(got) == sha(payload)
            recs = enf.wait_records(12)
            assert all(r["close"] == "client_fin" for r in recs)
            metrics = http_get(proxy, enf.admin_port, "/metrics")[1]
            refused, silent = _errors(metrics, "econnrefused"), _errors(metrics, "etimedout")
            assert (refused, silent) == (1.0, 1.0), (refused, silent)
            assert sum(f"connect to {ip}:{PORT}" in line for line in enf.stderr_lines
                       for ip in (dead_ip, refusing_ip)) == 2

            etc_hosts.write_text("127.0.0.1 localhost\n")  # the name stops resolving
            got = closed_on_arrival(proxy.socket(), ("127.0.0.1", port), b"anyone?")
            assert got == b""
            rec = enf.wait_records(13)[-1]
            assert (rec["action"], rec["close"]) == ("error", "upstream_resolve_failed")
            assert NAME in rec["detail"]
            metrics = http_get(proxy, enf.admin_port, "/metrics")[1]
            assert _errors(metrics, "resolve_failed") == 1.0

            etc_hosts.write_text(mapped)  # and comes back
            payload = os.urandom(50_000)
            got = echo_roundtrip(proxy.socket(), ("127.0.0.1", port), payload, timeout=30)
            assert sha(got) == sha(payload)
            faults_summary(f"13 connections through {NAME} (blackholed, refusing, live "
                           f"addresses) byte-exact; 1 etimedout + 1 econnrefused counted, "
                           f"then the live address first; an unresolvable name: "
                           f"upstream_resolve_failed, counted, recovered")
        finally:
            enf.stop()
            backend.close()
