"""The SNI passthrough comparison of the benchmark harness (``--passthrough``), quickest mode,
no timing assertions.

- ``test_quick_passthrough_run``: enforcer, enforcer-tcp (plain relay, the reference for
  what passthrough adds) and haproxy and nginx when installed, through
  both workloads for a second each: every probe name reached its route's backend, the
  1 MiB body came through by sha256, wrk's bytes cover whole bodies, every metric has a
  number, the table is written to passthrough-quick.md (never latest.* or passthrough.md),
  and no process is left.
- the checks themselves can fail: load sent with a name of another route gets 404s and
  fails the measurement; a proxy that routes everything to one backend fails the route
  probes.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from benchmarks import passthrough as pt
from benchmarks import passthrough_load as ptl
from benchmarks import passthrough_peers as ptp
from benchmarks.contestants import Env
from benchmarks.load import MeasureError
from benchmarks.pki import make_pki
from benchmarks.procs import Ports, Processes
from tests.e2e.test_bench import harness_leftovers

ROOT = Path(__file__).resolve().parents[2]
needs_tools = pytest.mark.skipif(not (shutil.which("wrk") and shutil.which("nginx")),
                                 reason="needs wrk and nginx (the load tool and TLS backend)")


def is_number(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def run_passthrough(out: Path, *args: str) -> tuple[subprocess.CompletedProcess[str], Any]:
    (out / "tmp").mkdir(parents=True)
    env = dict(os.environ, TMPDIR=str(out / "tmp"))
    done = subprocess.run(
        [sys.executable, "-m", "benchmarks", "--passthrough", "--quick", "--duration", "1",
         "--out", str(out), *args],
        cwd=ROOT, capture_output=True, text=True, timeout=170, env=env, check=False)
    summary = out / "passthrough-quick.json"
    assert summary.exists(), done.stderr[-3000:]
    return done, json.loads(summary.read_text())


@needs_tools
def test_quick_passthrough_run(tmp_path: Path) -> None:
    done, doc = run_passthrough(tmp_path, "--only", "enforcer,enforcer-tcp,haproxy,nginx")
    assert done.returncode == 0, done.stderr[-3000:]
    assert doc["schema"] == pt.SCHEMA and doc["mode"] == "quick" and not doc["interrupted"]
    assert set(doc["workloads"]) == set(ptl.WORKLOAD_NAMES)
    assert doc["contestants"]["enforcer"]["status"] == "ok"
    ran = [n for n, c in doc["contestants"].items() if c["status"] == "ok"]
    for name, c in doc["contestants"].items():
        if c["status"] == "skipped":  # a peer not installed here
            assert "apt install" in c["reason"]
        elif name != "enforcer-tcp":  # the suite the backend is pinned to, through the proxy
            assert c["tls"] == "TLSv1.3 TLS_AES_256_GCM_SHA384", name
    sizes = {"sni-newconn": 256, "sni-bulk": ptp.BULK_SIZE}
    for wname, w in doc["workloads"].items():
        for name in ran:
            r = w["results"][name]
            assert r["status"] == "ok", (wname, name, r)
            v = r["values"]
            probes = 0 if name == "enforcer-tcp" else len(ptp.PROBES)  # no routing there
            assert v["routes_checked"] == probes and v["bulk_sha256_ok"] is True
            assert v["errors"] == 0 and v["bytes"] >= v["requests"] * sizes[wname] > 0
            for m in w["metrics"]:
                assert is_number(v[m["key"]]), (wname, name, m["key"])
        c = w["comparison"]["cpu_s_per_gb" if wname == "sni-bulk" else "cpu_us_per_conn"]
        peers = [n for n in ran if n in ("haproxy", "nginx")]  # enforcer-tcp is no peer
        assert (c["ratio"] is None) == (not peers)
    md = (tmp_path / "passthrough-quick.md").read_text()
    assert "| workload | metric | " + " | ".join(ran) + " | enforcer ÷ best peer |" in md
    assert "| conn/s ↑ |" in md and "| CPU s/GB ↓ |" in md
    run_dir = tmp_path / doc["run_dir"]
    assert run_dir.parent == tmp_path / "runs"
    assert json.loads((run_dir / "results.json").read_text()) == doc
    for kept in ("latest.json", "latest-quick.json", "passthrough.md", "passthrough.json"):
        assert not (tmp_path / kept).exists()
    assert harness_leftovers(str(tmp_path / "tmp")) == []
    assert list((tmp_path / "tmp").iterdir()) == []


@pytest.fixture
def backend(tmp_path: Path) -> Iterator[tuple[Env, ptp.Backend]]:
    env = Env(tmp_path, make_pki(tmp_path / "pki"), Processes(), Ports())
    try:
        yield env, ptp.start_backend(env)
    finally:
        env.procs.stop_all()


@needs_tools
def test_the_checks_fail_when_routing_is_wrong(backend: tuple[Env, ptp.Backend],
                                                tmp_path: Path,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    env, be = backend
    # everything to the apps backend (what a proxy ignoring SNI would do): the api probe fails
    with pytest.raises(MeasureError, match="expected route api"):
        ptl.check_routes(be.ports["apps"], be.ca)
    pair = ptp.Enforcer().start_passthrough(env, be)
    assert ptl.check_routes(pair.entry_port, be.ca) == "TLSv1.3 TLS_AES_256_GCM_SHA384"
    ptl.check_bulk(pair.entry_port, be.ca)
    # load whose name takes the default route: the fallback backend has no such file
    monkeypatch.setattr(ptl, "LOAD_NAME", "other.localhost")
    with pytest.raises(MeasureError, match="not 2xx"):
        ptl.wrk_https(env, tmp_path, pair.entry_port, seconds=1, connections=2, threads=1,
                      path=ptp.SMALL_PATH, size=256, close=True)


@pytest.mark.parametrize(("argv", "message"), [
    (["--only", "stunnel"], "unknown contestant stunnel for --passthrough (known: direct, "
     "enforcer, enforcer-tcp, haproxy, nginx)"),
    (["--workloads", "bulk-1"], "unknown workload bulk-1 for --passthrough"),
    (["--variant", "a=b.yaml"], "--variant does not apply to --passthrough"),
    (["--netns"], "--netns does not apply to --passthrough")])
def test_passthrough_usage_errors(tmp_path: Path, argv: list[str], message: str) -> None:
    done = subprocess.run(
        [sys.executable, "-m", "benchmarks", "--passthrough", "--out", str(tmp_path), *argv],
        cwd=ROOT, capture_output=True, text=True, timeout=60, check=False)
    assert done.returncode == 2
    assert done.stderr.startswith("enforcer bench: ") and message in done.stderr
    assert list(tmp_path.iterdir()) == []


def test_passthrough_list() -> None:
    done = subprocess.run([sys.executable, "-m", "benchmarks", "--passthrough", "--list"],
                          cwd=ROOT, capture_output=True, text=True, timeout=60, check=False)
    assert done.returncode == 0, done.stderr
    for name in (*ptp.CONTESTANTS, *ptl.WORKLOAD_NAMES):
        assert f" {name} " in done.stdout
