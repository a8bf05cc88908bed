"""The benchmark's headline table pins every pair to one TLS 1.3 suite, and a second table
leaves every tool its own defaults (benchmarks/contestants.py, cli.py, report.py).

Each installed contestant's inbound is started pinned to each suite and probed with
``openssl s_client`` (its default offer): it must negotiate exactly that suite. Nothing
is measured here.
"""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from benchmarks import contestants as cmod
from benchmarks import report
from benchmarks.load import tls_probe
from benchmarks.options import HEADLINE_SUITE, SUITES
from benchmarks.pki import make_pki
from benchmarks.procs import Ports, Processes, wait_listening

PEERS = [c for c in cmod.ALL if c.name != "direct"]


@pytest.fixture
def env() -> Iterator[cmod.Env]:
    tmp = Path(tempfile.mkdtemp(prefix="enforcer-bench-suites-"))
    procs = Processes()
    try:
        yield cmod.Env(tmp, make_pki(tmp / "pki"), procs, Ports())
    finally:
        procs.stop_all()
        shutil.rmtree(tmp, ignore_errors=True)


def test_the_options_and_the_harness_agree() -> None:
    assert cmod.HEADLINE_SUITE == HEADLINE_SUITE and cmod.SUITES == SUITES


@pytest.mark.parametrize("c", PEERS, ids=lambda c: c.name)
def test_every_config_pins_the_suite_or_leaves_the_default(env: cmod.Env, c: Any) -> None:
    texts = {}
    for suite in (HEADLINE_SUITE, None):
        env.suite = suite
        d = env.workdir(c.name)
        texts[suite] = (c.outbound_config(env, d, 1, 2).read_text()
                        + c.inbound_config(env, d, 3, 4).read_text())
    assert texts[HEADLINE_SUITE].count(HEADLINE_SUITE) == 2  # both sides of the pair
    assert "TLS_AES" not in texts[None] and "CHACHA" not in texts[None]


@pytest.mark.parametrize("suite", SUITES)
@pytest.mark.parametrize("c", PEERS, ids=lambda c: c.name)
def test_a_pinned_inbound_negotiates_exactly_that_suite(
        env: cmod.Env, c: Any, suite: str) -> None:
    if c.missing() or not shutil.which("openssl"):
        pytest.skip(c.missing() or "openssl not installed")
    env.suite = suite
    d = env.workdir(c.name)
    port = env.ports.take()
    proc = c.spawn_role(env, d, "inbound", c.inbound_config(env, d, port, env.ports.take()))
    wait_listening([port], [proc], env.procs, f"{c.name} inbound")
    seen = tls_probe(env.pki, port)
    assert seen is not None and seen["cipher"] == suite, seen


def test_the_report_has_both_tables() -> None:
    w = {"title": "bulk, 1 stream", "status": "ok", "params": {},
         "metrics": [{"key": "gbps", "label": "throughput", "short": "", "unit": "Gbit/s",
                      "better": "higher", "ratio_target": None, "absolute_max": None}],
         "comparison": {"gbps": {"ratio": None, "best_peer": None, "target": None,
                                 "met": None}}}
    doc: dict[str, Any] = {
        "settings": {"suite": HEADLINE_SUITE},
        "contestants": {"enforcer": {"status": "ok", "tls_defaults": {
            "cipher": "TLS_AES_128_GCM_SHA256"}}},
        "workloads": {"bulk-1": {**w, "results": {
            "enforcer": {"status": "ok", "values": {"gbps": 3.5}}}}},
        "defaults": {"workloads": {"bulk-1": {**w, "results": {
            "enforcer": {"status": "ok", "values": {"gbps": 4.25}}}}}},
    }
    text = "\n".join(report.results_table(doc) + report._defaults_lines(doc))
    assert "3.5" in text and "4.25" in text
    assert "## Defaults vs defaults" in text and "enforcer TLS_AES_128_GCM_SHA256" in text
    assert HEADLINE_SUITE in report._suite_sentence(doc)
