"""The fault battery's figures (handshake p99, soak numbers, ...) in pytest's summary.

A test records a line with the ``faults_summary`` fixture; the line travels with its
report (also from pytest-xdist workers) and is printed at the end of the run, under
"fault battery", whether or not output is captured."""

from __future__ import annotations

from collections.abc import Callable

import pytest


@pytest.fixture
def faults_summary(record_property: Callable[[str, object], None]) -> Callable[[str], None]:
    def add(line: str) -> None:
        record_property("faults_summary", line)
    return add


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    lines = []
    for kind in ("passed", "failed"):
        for report in terminalreporter.stats.get(kind, []):
            for name, value in getattr(report, "user_properties", []):
                if name == "faults_summary":
                    lines.append(f"{report.nodeid.split('::')[-1]}: {value}")
    if lines:
        terminalreporter.section("fault battery")
        for line in lines:
            terminalreporter.write_line(line)
