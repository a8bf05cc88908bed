"""The harness's pure parts: comparisons, targets, report text and charts, settings.

Synthetic results (no process started), so every rule of "enforcer ÷ best peer" is
checked exactly: which peers count, which way is better, absolute targets, and what
happens with nobody to compare against.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from benchmarks import report, results
from benchmarks.cli import combine
from benchmarks.contestants import deep_merge
from benchmarks.workloads import BY_NAME, Metric, Settings, _percentile

HIGHER = Metric("rate", "rate", "req/s", "higher", ratio_target=1.0)
LOWER = Metric("cost", "cost", "CPU µs/req", "lower", ratio_target=1.0)
ABSOLUTE = Metric("kib", "memory", "KiB/conn", "lower", absolute_max=10.0)


def ok(**values: float) -> dict[str, Any]:
    return {"status": "ok", "values": values}


def wdoc(res: dict[str, Any]) -> dict[str, Any]:
    return {"title": "t", "status": "ok", "params": {}, "results": res, "comparison": {},
            "metrics": [results.metric_doc(m) for m in (HIGHER, LOWER, ABSOLUTE)]}


PEERS = ["haproxy", "stunnel", "nginx"]


def test_best_peer_is_picked_per_direction_and_ignores_direct_and_failures() -> None:
    doc = wdoc({
        "direct": ok(rate=1000.0, cost=0.0, kib=0.0),
        "enforcer": ok(rate=300.0, cost=30.0, kib=12.0),
        "haproxy": ok(rate=200.0, cost=40.0, kib=20.0),
        "stunnel": {"status": "error", "error": "boom"},
        "nginx": ok(rate=250.0, cost=50.0, kib=8.0),
    })
    results.compare(doc, (HIGHER, LOWER, ABSOLUTE), PEERS)
    rate, cost, kib = (doc["comparison"][k] for k in ("rate", "cost", "kib"))
    assert (rate["best_peer"], rate["ratio"], rate["met"]) == ("nginx", 1.2, True)
    assert (cost["best_peer"], cost["ratio"], cost["met"]) == ("haproxy", 0.75, True)
    assert (kib["best_peer"], kib["ratio"], kib["met"]) == ("nginx", 1.5, False)  # 12 > 10
    assert rate["target"] == ">= 1x best peer" and cost["target"] == "<= 1x best peer"
    assert kib["target"] == "<= 10 KiB/conn"


def test_losing_ratios_are_not_met() -> None:
    doc = wdoc({"enforcer": ok(rate=100.0, cost=90.0, kib=9.5),
                "haproxy": ok(rate=200.0, cost=45.0, kib=30.0)})
    results.compare(doc, (HIGHER, LOWER, ABSOLUTE), PEERS)
    c = doc["comparison"]
    assert (c["rate"]["ratio"], c["rate"]["met"]) == (0.5, False)
    assert (c["cost"]["ratio"], c["cost"]["met"]) == (2.0, False)
    assert c["kib"]["met"] is True  # absolute target, whatever the peers do


def test_no_peer_means_no_ratio_and_no_verdict_except_absolute() -> None:
    doc = wdoc({"enforcer": ok(rate=100.0, cost=90.0, kib=11.0),
                "haproxy": {"status": "skipped", "reason": "not installed"}})
    results.compare(doc, (HIGHER, LOWER, ABSOLUTE), PEERS)
    c = doc["comparison"]
    assert c["rate"] == {"enforcer": 100.0, "best_peer": None, "best_peer_value": None,
                         "ratio": None, "target": ">= 1x best peer", "met": None}
    assert c["kib"]["met"] is False


def test_enforcer_failure_gives_no_ratio() -> None:
    doc = wdoc({"enforcer": {"status": "error", "error": "x"},
                "nginx": ok(rate=1.0, cost=1.0, kib=1.0)})
    results.compare(doc, (HIGHER,), PEERS)
    assert doc["comparison"]["rate"]["ratio"] is None
    assert doc["comparison"]["rate"]["met"] is None


def full_doc(tmp_path: Path) -> dict[str, Any]:
    settings = Settings.make(False, None, 20000)
    doc = results.new_doc(settings, "run-1")
    for name in ("direct", "enforcer", "haproxy", "stunnel"):
        doc["contestants"][name] = {"status": "ok", "peer": name not in ("direct", "enforcer"),
                                    "version": "1", "setup": "s", "tls": None}
    doc["contestants"]["stunnel"] = {"status": "skipped", "peer": True, "version": None,
                                     "setup": "", "tls": None, "apt": "stunnel4",
                                     "reason": "stunnel4 not installed (apt install stunnel4)"}
    w = results.workload_doc(BY_NAME["keepalive"], settings)
    w["results"] = {"direct": ok(req_per_s=50000.0, p99_ms=1.0),
                    "enforcer": ok(req_per_s=12000.0, cpu_us_per_req=80.0, p99_ms=5.0),
                    "haproxy": ok(req_per_s=10000.0, cpu_us_per_req=60.0, p99_ms=4.0),
                    "stunnel": {"status": "skipped", "reason": "not installed"}}
    results.compare(w, BY_NAME["keepalive"].metrics, ["haproxy", "stunnel"])
    doc["workloads"]["keepalive"] = w
    doc["workloads"]["bulk-1"] = {**results.workload_doc(BY_NAME["bulk-1"], settings),
                                  "status": "skipped", "apt": "iperf3",
                                  "reason": "iperf3 not installed (apt install iperf3)"}
    doc["targets"] = results.collect_targets(doc)
    return doc


def test_targets_and_markdown(tmp_path: Path) -> None:
    doc = full_doc(tmp_path)
    assert [(t["metric"], t["ratio"], t["met"]) for t in doc["targets"]] == [
        ("req_per_s", 1.2, True), ("cpu_us_per_req", 1.333, False)]
    md = report.markdown(doc)
    assert "| workload | metric | direct | enforcer | haproxy | stunnel |" in md
    x, dash = report.TIMES, report.DASH
    assert f"| 50,000 | 12,000 | 10,000 | skipped | 1.20{x} (haproxy) ✅ |" in md
    assert f"| {dash} | 80.0 | 60.0 | skipped | 1.33{x} (haproxy) ❌ |" in md
    assert "skipped: iperf3 not installed (apt install iperf3)" in md
    assert "stunnel4 not installed (apt install stunnel4)" in md


def test_interception_ratios_isolate_conntrack_and_the_redirect(tmp_path: Path) -> None:
    """--netns runs: the transparent pair against its control (the NAT hooks loaded, no
    redirect) and the control against the explicit pair, in CPU per unit of work."""
    doc = full_doc(tmp_path)
    assert report.interception_lines(doc) == []  # no --netns columns: no section
    for name in ("enforcer-nathooks", "enforcer-transparent"):
        doc["contestants"][name] = {"status": "ok", "peer": False, "version": "1",
                                    "setup": "s", "tls": None}
    w = doc["workloads"]["keepalive"]
    w["results"]["enforcer-nathooks"] = ok(req_per_s=11000.0, cpu_us_per_req=88.0)
    w["results"]["enforcer-transparent"] = ok(req_per_s=10500.0, cpu_us_per_req=96.8)
    lines = report.interception_lines(doc)
    x = report.TIMES
    header = next(line for line in lines if line.startswith("| workload"))
    assert "enforcer-nathooks ÷ enforcer (conntrack + NAT hooks)" in header
    assert "enforcer-transparent ÷ enforcer-nathooks (redirect + SO_ORIGINAL_DST)" in header
    rows = [line for line in lines if line.startswith("| keep-alive")]
    dash = report.DASH
    assert rows == [f"| keep-alive requests, 32 connections | CPU µs/req | 1.10{x} | "
                    f"1.10{x} ❌ | 1.21{x} |",
                    f"| keep-alive requests, 32 connections | CPU µs/req, user space | "
                    f"{dash} | {dash} | {dash} |"], lines  # no user/system split recorded
    w["results"]["enforcer-transparent"] = ok(cpu_us_per_req=92.0)
    assert f"| 1.05{x} ✅ |" in "\n".join(report.interception_lines(doc))
    w["results"]["enforcer-nathooks"] = {"status": "error", "error": "boom"}
    assert f"| {report.DASH} | {report.DASH} | 1.15{x} |" in "\n".join(
        report.interception_lines(doc))
    assert "## Interception" in report.markdown(doc)


def test_interception_ratios_pair_rounds_and_split_user_space(tmp_path: Path) -> None:
    """With --repeat, a ratio is the median of the ratios within each round (a slow drift
    of the machine cancels out), and the user-space row leaves the system time out."""
    doc = full_doc(tmp_path)
    for name in ("enforcer-nathooks", "enforcer-transparent"):
        doc["contestants"][name] = {"status": "ok", "peer": False, "version": "1",
                                    "setup": "s", "tls": None}
    w = doc["workloads"]["keepalive"]

    def rounds(costs: list[float], user_share: float) -> dict[str, Any]:
        samples = [{"cpu_us_per_req": c, "cpu_s": 10.0, "cpu_s_user": 10.0 * user_share}
                   for c in costs]
        return {"status": "ok", "values": samples[1], "samples": samples}

    # the machine slows down round after round; within each round transparent costs 2 %
    # more than its control, and all of it in the kernel (same user-space share of more)
    w["results"]["enforcer"] = rounds([50.0, 80.0, 120.0], 0.5)
    w["results"]["enforcer-nathooks"] = rounds([60.0, 90.0, 100.0], 0.5)
    w["results"]["enforcer-transparent"] = rounds([61.2, 91.8, 102.0], 0.49)
    x = report.TIMES
    rows = [line for line in report.interception_lines(doc) if line.startswith("| keep")]
    assert rows[0].endswith(f"| CPU µs/req | 1.12{x} | 1.02{x} ✅ | 1.15{x} |"), rows
    assert rows[1].endswith(f"| CPU µs/req, user space | 1.12{x} | 1.00{x} ✅ | 1.12{x} |"), rows


def test_write_all_writes_run_dir_latest_and_charts(tmp_path: Path) -> None:
    pytest.importorskip("matplotlib")
    doc = full_doc(tmp_path)
    run1 = tmp_path / "runs" / "run-1"
    doc["run_dir"] = "runs/run-1"
    written = report.write_all(doc, tmp_path, run1)
    assert (run1 / "keepalive.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (run1 / "summary.png").exists()
    assert not (run1 / "bulk-1.png").exists()  # skipped: no chart
    assert json.loads((tmp_path / "latest.json").read_text())["workloads"]["keepalive"][
        "chart"] == "keepalive.png"
    # the summary kept in the repository links only what is kept beside it
    latest_md = (tmp_path / "latest.md").read_text()
    assert "](latest.png)" in latest_md and "](runs/" not in latest_md
    assert "`runs/run-1/`" in latest_md
    assert (tmp_path / "latest.png").read_bytes() == (run1 / "summary.png").read_bytes()
    assert "](keepalive.png)" in (run1 / "results.md").read_text()
    assert tmp_path / "latest.md" in written
    doc["mode"] = "quick"  # an indicative run must not replace the full run's latest.*
    doc["run_dir"] = "runs/run-2"
    report.write_all(doc, tmp_path, tmp_path / "runs" / "run-2")
    assert (tmp_path / "latest-quick.md").exists() and (tmp_path / "latest-quick.png").exists()
    assert "`runs/run-1/`" in (tmp_path / "latest.md").read_text()
    # --render of a run folder writes the summary next to runs/, not into it
    report.render(run1)
    assert not (tmp_path / "runs" / "latest.md").exists()


@pytest.mark.parametrize(("values", "pct", "expected"), [
    ([1.0], 50, 1.0), ([1.0], 99, 1.0), ([1.0, 2.0], 50, 1.0), ([1.0, 2.0], 99, 2.0),
    ([float(i) for i in range(1, 101)], 99, 99.0), ([float(i) for i in range(1, 101)], 50, 50.0),
    ([float(i) for i in range(1, 1001)], 99, 990.0)])
def test_nearest_rank_percentile(values: list[float], pct: float, expected: float) -> None:
    assert _percentile(values, pct) == expected


def test_idle_n_is_capped_by_the_fd_limit_and_says_so() -> None:
    full = Settings.make(False, None, 9700)
    assert (full.idle_small, full.idle_large) == (1000, 9700)
    assert "RLIMIT_NOFILE" in full.idle_note
    assert Settings.make(False, None, 20000).idle_note == ""
    quick = Settings.make(True, None, 9700)
    assert quick.idle_large < quick.idle_small * 10 and quick.idle_note == ""


def test_enforcer_extra_merges_deeply() -> None:
    base = {"limits": {"a": 1, "b": 2}, "flow_log": {"sink": "stdout"}}
    assert deep_merge(base, {"limits": {"b": 3}, "workers": 2}) == {
        "limits": {"a": 1, "b": 3}, "flow_log": {"sink": "stdout"}, "workers": 2}
    assert base["limits"] == {"a": 1, "b": 2}  # not modified


def test_repetitions_combine_to_medians_and_keep_samples() -> None:
    a, b, c = ok(rate=10.0, n=3), ok(rate=30.0, n=5), ok(rate=20.0, n=4)
    combined = combine([a, b, c])
    assert combined["values"] == {"rate": 20.0, "n": 4}
    assert combined["samples"] == [a["values"], b["values"], c["values"]]
    assert combine([a]) == a
    failure = {"status": "error", "error": "boom"}
    assert combine([a, failure, c]) == failure  # one failed repetition fails the result


def test_enforcer_at_runs_another_checkouts_code_as_its_own_column(tmp_path: Path) -> None:
    """--enforcer-at NAME=DIR: a before/after column in one run, refused unless DIR is an
    enforcer checkout, and not offered until its native extension is built."""
    from benchmarks.cli import UsageError, _checkouts

    with pytest.raises(UsageError, match="not an enforcer checkout"):
        _checkouts([f"before={tmp_path}"])
    with pytest.raises(UsageError, match="NAME=DIR"):
        _checkouts([str(tmp_path)])
    (tmp_path / "enforcer" / "dataplane").mkdir(parents=True)
    (tmp_path / "enforcer" / "__init__.py").write_text("")
    [before] = _checkouts([f"before={tmp_path}"])
    assert before.name == "enforcer-before" and not before.is_peer
    assert "native extension not built" in (before.missing() or "")
    (tmp_path / "enforcer" / "dataplane" / "_pump.cpython-311-x86_64-linux-gnu.so").touch()
    assert before.missing() is None
