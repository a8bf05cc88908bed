"""The benchmark harness end to end, in its quickest mode (no timing assertions).

- ``test_quick_run_enforcer_and_direct``: ``python -m benchmarks --quick`` against
  enforcer and direct: every workload produced a number for every metric (or is skipped
  with the apt package to install), the JSON has the documented shape, the markdown,
  latest-quick.* and charts are written, and no process the harness started is left.
- ``test_missing_tools_are_skipped``: with a PATH holding no tool at all, peers and
  workloads are reported as skipped with their apt package, enforcer still runs on the
  Python fallback backend, and the exit code is 0.

The harness checks the bytes itself: every latency/idle response is compared with the
backend's file, and wrk responses other than 2xx/3xx fail the measurement.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import shutil
import socket
import ssl
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

import pytest

from benchmarks import contestants, workloads
from benchmarks.load import refuses_anonymous
from benchmarks.options import CONTESTANTS, WORKLOADS
from benchmarks.pki import BenchPki, make_pki
from benchmarks.results import SCHEMA

ROOT = Path(__file__).resolve().parents[2]
TOP_KEYS = {"schema", "mode", "interrupted", "started_at", "finished_at", "duration_s",
            "run_dir", "host", "settings", "backends", "tools", "contestants", "workloads",
            "targets", "micro"}
WORKLOAD_KEYS = {"title", "status", "params", "metrics", "results", "comparison"}
METRIC_KEYS = {"key", "label", "short", "unit", "better", "ratio_target", "absolute_max"}
COMPARISON_KEYS = {"enforcer", "best_peer", "best_peer_value", "ratio", "target", "met"}
TARGET_KEYS = {"workload", "metric", "unit", "target", "enforcer", "best_peer", "ratio", "met"}


def run_bench(out: Path, *args: str, env: dict[str, str] | None = None
              ) -> tuple[subprocess.CompletedProcess[str], dict[str, Any]]:
    """Run the harness with its temp dir under ``out`` (so leftovers are ours to find)."""
    (out / "tmp").mkdir(parents=True)
    env = dict(env if env is not None else os.environ, TMPDIR=str(out / "tmp"))
    done = subprocess.run(
        [sys.executable, "-m", "benchmarks", "--quick", "--no-micro", "--out", str(out), *args],
        cwd=ROOT, capture_output=True, text=True, timeout=170, env=env, check=False)
    latest = out / "latest-quick.json"  # a quick run never replaces latest.json
    assert latest.exists(), done.stderr
    return done, json.loads(latest.read_text())


def is_number(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def assert_shape(doc: dict[str, Any], expected_workloads: set[str]) -> None:
    assert set(doc) >= TOP_KEYS
    assert doc["schema"] == SCHEMA
    assert doc["mode"] == "quick"
    assert doc["interrupted"] is False
    assert is_number(doc["duration_s"])
    assert set(doc["workloads"]) == expected_workloads
    for name, c in doc["contestants"].items():
        assert name in CONTESTANTS
        assert c["status"] in ("ok", "skipped")
        assert isinstance(c["peer"], bool)
        if c["status"] == "skipped":
            assert "apt install" in c["reason"] and c["apt"]
    for w in doc["workloads"].values():
        assert set(w) >= WORKLOAD_KEYS
        assert w["status"] in ("ok", "skipped")
        for m in w["metrics"]:
            assert set(m) == METRIC_KEYS and m["better"] in ("higher", "lower")
        if w["status"] == "skipped":
            assert "apt install" in w["reason"] and w["apt"]
            continue
        assert set(w["results"]) == set(doc["contestants"])
        for r in w["results"].values():
            assert r["status"] in ("ok", "skipped", "n/a", "error")
        for c in w["comparison"].values():
            assert set(c) == COMPARISON_KEYS
    for t in doc["targets"]:
        assert set(t) == TARGET_KEYS


def assert_numbers(doc: dict[str, Any], contestant: str) -> None:
    """Every metric of every workload that ran has a finite number for ``contestant``."""
    for name, w in doc["workloads"].items():
        if w["status"] == "skipped":
            continue
        result = w["results"][contestant]
        if contestant == "direct" and workloads.BY_NAME[name].proxies_only:
            assert result["status"] == "n/a"
            continue
        assert result["status"] == "ok", (name, result)
        for m in w["metrics"]:
            if contestant == "direct" and m["key"].startswith(("cpu_", "kib_", "rss_")):
                continue  # direct has no proxy process: no CPU or memory of its own
            assert is_number(result["values"][m["key"]]), (name, m["key"], result)


def harness_leftovers(tmp_root: str) -> list[str]:
    """Processes whose command line or working directory is under ``tmp_root`` (where the
    harness's temp dir was): every process it starts runs in, or names a file in, it."""
    found = []
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            cmdline = Path(entry.path, "cmdline").read_bytes().replace(b"\0", b" ").decode()
            cwd = os.readlink(Path(entry.path, "cwd"))
        except OSError:
            continue
        if tmp_root in cmdline or cwd.startswith(tmp_root):
            found.append(cmdline)
    return found


def test_option_lists_match_the_harness() -> None:
    assert tuple(contestants.BY_NAME) == CONTESTANTS
    assert tuple(workloads.BY_NAME) == WORKLOADS


def test_quick_run_enforcer_and_direct(tmp_path: Path) -> None:
    # every pair workload, and one egress workload (its own table in the same summary;
    # tests/e2e/test_bench_egress.py runs them all)
    done, doc = run_bench(tmp_path, "--only", "enforcer,direct", "--duration", "1",
                          "--workloads", ",".join((*WORKLOADS, "socks5-newconn")))
    assert done.returncode == 0, done.stderr[-3000:]
    assert_shape(doc, set(WORKLOADS))
    assert set(doc["contestants"]) == {"enforcer", "direct"}
    assert doc["contestants"]["enforcer"]["status"] == "ok"
    assert_numbers(doc, "enforcer")
    assert_numbers(doc, "direct")
    tls = doc["contestants"]["enforcer"]["tls"]
    if shutil.which("openssl"):  # the probe ran on the first HTTP workload
        assert tls["protocol"].startswith("TLSv1.") and tls["client_cert_required"] is True
    for w in doc["workloads"].values():  # no peer ran: nothing to compare against
        for m in w["metrics"]:
            c = w["comparison"].get(m["key"])
            if w["status"] == "ok" and m["absolute_max"] is None:
                assert c["ratio"] is None and c["met"] is None
    run_dir = tmp_path / doc["run_dir"]
    assert run_dir.parent == tmp_path / "runs"  # raw runs: the folder git ignores
    assert json.loads((run_dir / "results.json").read_text()) == doc
    assert not (tmp_path / "latest.json").exists()
    md = (tmp_path / "latest-quick.md").read_text()
    assert "| workload | metric | direct | enforcer |" in md
    assert set(doc["egress"]["workloads"]) == {"socks5-newconn"}
    assert doc["egress"]["workloads"]["socks5-newconn"]["results"]["enforcer"]["status"] == "ok"
    assert "## Egress proxies" in md and "| SOCKS5: new connections, 32 at a time |" in md
    for name, w in doc["workloads"].items():
        if w["status"] == "ok":
            assert w["title"].split(" (")[0] in md
            if w.get("chart"):
                assert (run_dir / w["chart"]).stat().st_size > 1000
                assert name in md.split("## Charts")[1]  # named; the chart stays in run_dir
    if doc.get("summary_chart"):
        assert "](latest-quick.png)" in md and (tmp_path / "latest-quick.png").exists()
    assert "[" in done.stderr and "enforcer" in done.stderr  # progress was shown
    assert harness_leftovers(str(tmp_path / "tmp")) == []
    assert list((tmp_path / "tmp").iterdir()) == []  # the temp dir was removed


def test_missing_tools_are_skipped(tmp_path: Path) -> None:
    empty_bin = tmp_path / "bin"
    empty_bin.mkdir()
    env = dict(os.environ, PATH=str(empty_bin))
    done, doc = run_bench(tmp_path / "out", "--only", "enforcer,haproxy,stunnel,nginx",
                          "--workloads", "bulk-1,keepalive,latency", env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    assert_shape(doc, {"bulk-1", "keepalive", "latency"})
    assert doc["contestants"]["haproxy"] == {**doc["contestants"]["haproxy"],
                                             "status": "skipped", "apt": "haproxy"}
    assert doc["contestants"]["stunnel"]["apt"] == "stunnel4"
    assert "libnginx-mod-stream" in doc["contestants"]["nginx"]["reason"]
    bulk, keepalive = doc["workloads"]["bulk-1"], doc["workloads"]["keepalive"]
    assert bulk["status"] == "skipped" and bulk["reason"] == \
        "iperf3 not installed (apt install iperf3)"
    assert keepalive["status"] == "skipped" and keepalive["apt"] == "wrk"
    latency = doc["workloads"]["latency"]
    assert latency["status"] == "ok"
    assert doc["backends"]["http"].startswith("python")  # the fallback backend
    assert latency["results"]["haproxy"]["status"] == "skipped"
    assert is_number(latency["results"]["enforcer"]["values"]["p99_ms"])
    assert doc["tools"]["wrk"] == {"installed": False, "apt": "wrk", "version": None}


def serve_tls_once(pki: BenchPki, require_cert: bool) -> int:
    """A one-connection TLS server answering "HTTP/1.1 200" to whoever completes TLS."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(pki.server_cert, pki.server_key)
    ctx.load_verify_locations(pki.ca)
    ctx.verify_mode = ssl.CERT_REQUIRED if require_cert else ssl.CERT_NONE
    listener = socket.create_server(("127.0.0.1", 0))

    def serve() -> None:
        with listener, contextlib.suppress(OSError):
            conn, _ = listener.accept()
            with ctx.wrap_socket(conn, server_side=True) as tls:
                tls.recv(1024)
                tls.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n")

    threading.Thread(target=serve, daemon=True).start()
    return int(listener.getsockname()[1])


@pytest.mark.parametrize("require_cert", [True, False])
def test_the_mtls_probe_tells_enforced_from_not(tmp_path: Path, require_cert: bool) -> None:
    pki = make_pki(tmp_path)
    assert refuses_anonymous(pki, serve_tls_once(pki, require_cert)) is require_cert


@pytest.mark.parametrize(("argv", "message"), [
    (["--only", "nosuch"], "unknown contestant nosuch (known: direct, enforcer,"),
    (["--workloads", "bulk-9"], "unknown workload bulk-9 (known: bulk-1,"),
    (["--variant", "Bad Name=x.yaml"], "use NAME=FILE.yaml"),
    (["--variant", "a=/nonexistent.yaml"], "--variant /nonexistent.yaml:"),
    (["--render", "/nonexistent"], "/nonexistent: no results.json there")])
def test_bad_options_are_usage_errors(tmp_path: Path, argv: list[str], message: str) -> None:
    done = subprocess.run([sys.executable, "-m", "benchmarks", "--out", str(tmp_path), *argv],
                          cwd=ROOT, capture_output=True, text=True, timeout=60, check=False)
    assert done.returncode == 2
    assert done.stderr.startswith("enforcer bench: ") and message in done.stderr
    assert list(tmp_path.iterdir()) == []  # nothing written
