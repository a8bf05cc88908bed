"""Every micro-benchmark script runs and prints rates the harness can parse."""

from __future__ import annotations

import subprocess
import sys

import pytest

from benchmarks.micro import MICRO_DIR, parse_rates

SCRIPTS = sorted(MICRO_DIR.glob("bench_*.py"))


def test_the_micro_benchmarks_exist() -> None:
    assert {s.stem for s in SCRIPTS} >= {"bench_identity", "bench_policy", "bench_proxyproto",
                                         "bench_tls_engine"}


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda s: s.stem)
def test_micro_benchmark_runs_and_reports_rates(script) -> None:  # type: ignore[no-untyped-def]
    done = subprocess.run([sys.executable, str(script), "--number", "40"], capture_output=True,
                          text=True, timeout=120, cwd=MICRO_DIR.parents[1], check=False)
    assert done.returncode == 0, done.stderr[-2000:]
    lines = [ln for ln in done.stdout.splitlines() if ln.strip()]
    rates = parse_rates(lines)
    assert rates and all(v > 0 for r in rates for v in r["per_second"]), lines
