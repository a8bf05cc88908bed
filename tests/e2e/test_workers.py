"""`workers: 2`: one supervisor, two worker processes on SO_REUSEPORT, metrics summed."""

from __future__ import annotations

import json
import os
import signal
import socket
import time
import urllib.request
from pathlib import Path
from typing import Any

from prometheus_client.parser import text_string_to_metric_families

from enforcer.tlsconf.certs import DEMO_CLIENT_ID
from tests.e2e.harness import (
    Enforcer,
    exchange,
    inbound_cfg,
    outbound_cfg,
    random_bytes,
    running,
    sha,
)
from tests.e2e.proc import EchoServer, EnforcerProcess, write_config


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _roundtrip(port: int, payload: bytes) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=10) as c:
        c.sendall(payload)
        c.shutdown(socket.SHUT_WR)
        got = b""
        while data := c.recv(65536):
            got += data
    return got


def _get(port: int, path: str) -> tuple[int, str]:
    """(status, body); status 0 when nothing answers yet (the admin endpoint binds after
    the listeners, so a wait for /readyz may start before it exists)."""
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=5) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode()
    except (urllib.error.URLError, ConnectionError) as e:
        return 0, str(e)


def _counter(text: str, name: str, labels: dict[str, str]) -> float:
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items()):
                return float(sample.value)
    return 0.0


def _wait(cond: Any, timeout: float = 15) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, "condition not met in time"
        time.sleep(0.05)


def test_two_workers_share_the_listener_and_survive_a_crash(tmp_path: Path, pki: Any) -> None:
    echo = EchoServer()
    admin_port = _free_port()
    cfg = inbound_cfg(pki, echo.port, default="allow", rules=[], mode="off")
    cfg.update({"workers": 2, "admin": {"listen": f"127.0.0.1:{admin_port}"}})
    proc = EnforcerProcess(write_config(tmp_path / "w.yaml", cfg))
    try:
        port = proc.wait_bound()["inbound"]
        _wait(lambda: _get(admin_port, "/readyz")[0] == 200)
        assert any(f"admin endpoint bound on 127.0.0.1:{admin_port}" in line
                   for line in proc.stderr_lines), "the supervisor says where its admin is"
        payloads = [os.urandom(100_000 + i) for i in range(20)]
        for p in payloads:
            assert _roundtrip(port, p) == p
        status = json.loads(_get(admin_port, "/status")[1])
        pids = [w["pid"] for w in status["workers"]]
        assert len(pids) == 2 and proc.proc.pid not in pids
        _wait(lambda: _counter(_get(admin_port, "/metrics")[1], "enforcer_connections_total",
                               {"listener": "inbound", "action": "allow"}) == 20)
        metrics = _get(admin_port, "/metrics")[1]
        assert _counter(metrics, "enforcer_bytes_total",
                        {"listener": "inbound", "direction": "from_client"}) == sum(
                            len(p) for p in payloads)
        # flow records go out within flowlog.LINGER of the close; a SIGKILL loses the rest
        _wait(lambda: sum(line.startswith("{") for line in proc.stdout_lines) == 20)

        os.kill(pids[0], signal.SIGKILL)  # a crashed worker is started again
        _wait(lambda: any(w["restarts"] == 1
                          for w in json.loads(_get(admin_port, "/status")[1])["workers"]))
        _wait(lambda: _get(admin_port, "/readyz")[0] == 200)
        again = os.urandom(300_000)
        assert _roundtrip(port, again) == again

        proc.proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 0, "\n".join(proc.stderr_lines)
        records = [json.loads(line) for line in proc.stdout_lines if line.startswith("{")]
        assert len(records) == 21
        assert sorted(r["bytes"]["from_client"] for r in records) == sorted(
            [len(p) for p in payloads] + [len(again)])
    finally:
        proc.stop()
        echo.close()


async def test_a_client_resumes_whichever_worker_it_reaches(tmp_path: Path, pki: Any) -> None:
    """Each worker accepts on its own SO_REUSEPORT socket, so consecutive connections of one
    client land on either; both derive the same ticket keys from the supervisor's secret,
    so every connection after the first resumes (with a key per worker, about half would
    make a full handshake). Checked through a real outbound sidecar."""
    echo = EchoServer()
    cfg = inbound_cfg(pki, echo.port)
    cfg["workers"] = 2
    proc = EnforcerProcess(write_config(tmp_path / "in.yaml", cfg))
    try:
        port = proc.wait_bound()["inbound"]
        outbound = await Enforcer(outbound_cfg(pki, port)).start()
        async with running(outbound):
            for _ in range(16):
                payload = random_bytes(50_000)
                assert sha(await exchange(outbound.port(), payload)) == sha(payload)
            out_recs = await outbound.wait_flows(16)
        _wait(lambda: sum(line.startswith("{") for line in proc.stdout_lines) == 16)
        in_recs = [json.loads(line) for line in proc.stdout_lines if line.startswith("{")]
        assert [r["upstream"]["resumed"] for r in out_recs] == [False] + [True] * 15
        assert sorted(r["tls"]["resumed"] for r in in_recs) == [False] + [True] * 15
        assert all(r["tls"]["peer"]["spiffe_id"] == DEMO_CLIENT_ID for r in in_recs)
    finally:
        proc.stop()
        echo.close()


def _same_keys(single: Any, supervisor: Any, path: str = "status") -> None:
    """Every mapping has the same keys in both, recursively (lists: their first items; a
    null on either side, e.g. a worker's session_cache, is not compared further)."""
    if single is None or supervisor is None:
        return
    if isinstance(single, dict):
        assert isinstance(supervisor, dict), path
        assert set(supervisor) == set(single), (path, set(supervisor) ^ set(single))
        for key in single:
            _same_keys(single[key], supervisor[key], f"{path}.{key}")
    elif isinstance(single, list) and single:
        assert isinstance(supervisor, list) and supervisor, path
        _same_keys(single[0], supervisor[0], f"{path}[0]")


def _reload_seen_everywhere(status: dict[str, Any], written: int) -> bool:
    """Every record written and the SIGHUP's TLS reload attempt reported, by the process
    and by each worker (a supervisor combines its workers' latest reports, which arrive
    one worker at a time)."""
    reports = [status, *status.get("workers", ())]
    return status["flow_log"]["written"] == written and all(
        r["reloads"]["tls"]["last_attempt"] is not None for r in reports)


def _status(port: int) -> dict[str, Any]:
    code, body = _get(port, "/status")
    assert code == 200, body
    status: dict[str, Any] = json.loads(body)
    return status


def test_the_supervisors_status_has_every_section_of_a_single_process(
        tmp_path: Path, pki: Any) -> None:
    """The same config served by one process and by a supervisor with two workers: the
    supervisor's /status has the same keys all the way down (plus ``workers``), its
    ``reloads`` and ``flow_log`` are the workers' combined, and each worker lists its own."""
    echo = EchoServer()
    procs: dict[str, tuple[EnforcerProcess, int]] = {}
    try:
        for name, workers in (("single", 1), ("supervisor", 2)):
            admin_port = _free_port()
            cfg = inbound_cfg(pki, echo.port, default="allow", rules=[], mode="off")
            cfg.update({"workers": workers, "admin": {"listen": f"127.0.0.1:{admin_port}"},
                        "flow_log": {"sink": f"file:{tmp_path / name}.jsonl"}})
            procs[name] = (EnforcerProcess(write_config(tmp_path / f"{name}.yaml", cfg)),
                           admin_port)
        payloads = [os.urandom(50_000 + i) for i in range(6)]
        for proc, admin_port in procs.values():
            port = proc.wait_bound()["inbound"]
            _wait(lambda a=admin_port: _get(a, "/readyz")[0] == 200)
            for payload in payloads:
                assert _roundtrip(port, payload) == payload
            proc.proc.send_signal(signal.SIGHUP)  # TLS files unchanged: still an attempt
        single = procs["single"][1]
        supervisor = procs["supervisor"][1]
        for admin_port in (single, supervisor):
            _wait(lambda a=admin_port: _reload_seen_everywhere(_status(a), len(payloads)))

        one, many = _status(single), _status(supervisor)
        assert set(many) == set(one) | {"workers"}
        _same_keys(one, {k: v for k, v in many.items() if k != "workers"})
        for key in ("reloads", "flow_log", "memory", "materials", "listeners", "upstreams"):
            assert many[key], key
        for kind in ("tls", "rulesets"):
            assert many["reloads"][kind]["result"] == one["reloads"][kind]["result"]
        assert many["reloads"]["tls"]["result"] == "ok"
        assert many["reloads"]["tls"]["files"] == one["reloads"]["tls"]["files"]
        assert many["flow_log"]["written"] == len(payloads) and many["flow_log"]["dropped"] == 0
        assert many["open_connections"] == 0 and many["ready"] is True
        assert many["materials"][0]["certificate"]["serial"] == \
            one["materials"][0]["certificate"]["serial"]

        assert [w["index"] for w in many["workers"]] == [0, 1]
        for worker in many["workers"]:
            assert {"reloads", "flow_log", "memory", "open_connections",
                    "status_age_s"} <= set(worker)
            _same_keys(one["reloads"], worker["reloads"], "worker.reloads")
            _same_keys(one["flow_log"], worker["flow_log"], "worker.flow_log")
            assert worker["reloads"]["tls"]["last_attempt"] is not None
        assert sum(w["flow_log"]["written"] for w in many["workers"]) == len(payloads)
        assert sum(w["memory"]["rss_bytes"] for w in many["workers"]) == \
            many["memory"]["rss_bytes"]
    finally:
        for proc, _ in procs.values():
            proc.stop()
        echo.close()
