"""A worker SIGKILLed under load (``workers: 2``).

Streams run through both workers (``SO_REUSEPORT`` spreads them; ``ss -tnp`` tells which
worker holds which) while a prober opens a new connection every 20 ms. One worker is
killed with SIGKILL: its own streams die with it (nothing can save a process's sockets),
every stream of the other worker must finish byte-exact, new connections must keep
succeeding with no gap over a second, and the supervisor must start the worker again and
say so in ``/status`` (``restarts``, ``last_exit``) and in
``enforcer_worker_restarts_total``.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import os
import re
import signal
import socket
import subprocess
import threading
import time
import urllib.request
from pathlib import Path
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.e2e.harness import inbound_cfg
from tests.e2e.proc import EchoServer, EnforcerProcess, write_config

pytestmark = [pytest.mark.faults]

STREAMS = 16
CHUNK = 32 * 1024
PROBE_EVERY = 0.02


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _get(port: int, path: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=5) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode()


def _wait(cond: Any, timeout: float = 20) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, "condition not met in time"
        time.sleep(0.05)


class Stream(threading.Thread):
    """Echo ping-pong of CHUNK-sized random blocks until told to stop, then a half-close;
    ``ok`` once everything sent came back byte-exact (sha256 of both directions)."""

    def __init__(self, port: int, stop: threading.Event) -> None:
        super().__init__(daemon=True)
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=30)
        self.local_port = int(self.sock.getsockname()[1])
        self.stop_event = stop
        self.ok = False
        self.error: str | None = None
        self.sent = 0

    def run(self) -> None:
        sent, got = hashlib.sha256(), hashlib.sha256()
        try:
            with self.sock:
                while not self.stop_event.is_set():
                    block = os.urandom(CHUNK)
                    self.sock.sendall(block)
                    sent.update(block)
                    self.sent += len(block)
                    need = len(block)
                    while need:
                        data = self.sock.recv(need)
                        if not data:
                            raise ConnectionError("end of stream in the middle")
                        got.update(data)
                        need -= len(data)
                    time.sleep(0.01)
                self.sock.shutdown(socket.SHUT_WR)
                if self.sock.recv(1) != b"":
                    raise ConnectionError("bytes after the last echo")
            self.ok = sent.hexdigest() == got.hexdigest()
        except OSError as exc:
            self.error = repr(exc)


class Prober(threading.Thread):
    """A new connection every PROBE_EVERY seconds: 1 KiB echoed, then closed."""

    def __init__(self, port: int, stop: threading.Event) -> None:
        super().__init__(daemon=True)
        self.port, self.stop_event = port, stop
        self.successes: list[float] = []
        self.failures = 0
        self.failed: list[tuple[float, float, str]] = []  # (started, took, error)

    def run(self) -> None:
        while not self.stop_event.is_set():
            payload = os.urandom(1024)
            began = time.monotonic()
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=5) as c:
                    c.sendall(payload)
                    c.shutdown(socket.SHUT_WR)
                    got = b""
                    while data := c.recv(4096):
                        got += data
                if got == payload:
                    self.successes.append(time.monotonic())
                else:
                    self.failures += 1
                    self.failed.append((began, time.monotonic() - began, "cut short"))
            except OSError as exc:
                self.failures += 1
                self.failed.append((began, time.monotonic() - began, repr(exc)))
            time.sleep(PROBE_EVERY)

    def longest_gap(self, start: float, end: float) -> float:
        marks = [start, *[t for t in self.successes if start <= t <= end], end]
        return max(b - a for a, b in itertools.pairwise(marks))


def _owners(listen_port: int) -> dict[int, int]:
    """client port -> pid of the worker holding the accepted socket (``ss -tnp``)."""
    out = subprocess.run(["ss", "-tnpH", "state", "established", "(", "sport", "=",
                          f":{listen_port}", ")"], capture_output=True, text=True,
                         check=True).stdout
    owners = {}
    for line in out.splitlines():
        m = re.search(r"127\.0\.0\.1:\d+\s+127\.0\.0\.1:(\d+).*pid=(\d+)", line)
        if m:
            owners[int(m.group(1))] = int(m.group(2))
    return owners


def _restarts(metrics: str, worker: str) -> float:
    for family in text_string_to_metric_families(metrics):
        for s in family.samples:
            if s.name == "enforcer_worker_restarts_total" and s.labels.get("worker") == worker:
                return float(s.value)
    return -1.0


@pytest.mark.parametrize("relay", ["native", "python"])
def test_sigkilled_worker_restarts_and_the_other_keeps_serving(
        relay: str, tmp_path: Path, pki: Any, faults_summary: Any) -> None:
    echo = EchoServer()
    admin = _free_port()
    cfg = inbound_cfg(pki, echo.port, default="allow", rules=[], mode="off")
    cfg.update({"workers": 2, "admin": {"listen": f"127.0.0.1:{admin}"}, "relay": relay})
    proc = EnforcerProcess(write_config(tmp_path / "w.yaml", cfg))
    stop_streams, stop_probe = threading.Event(), threading.Event()
    try:
        port = proc.wait_bound()["inbound"]
        _wait(lambda: _get(admin, "/readyz")[0] == 200)
        workers = json.loads(_get(admin, "/status")[1])["workers"]
        pids = {w["index"]: w["pid"] for w in workers}
        streams = [Stream(port, stop_streams) for _ in range(STREAMS)]
        for s in streams:
            s.start()
        _wait(lambda: all(s.sent > 0 for s in streams))
        owners = _owners(port)
        by_stream = {s: owners.get(s.local_port) for s in streams}
        assert set(by_stream.values()) == set(pids.values()), (
            f"streams not spread over both workers: {by_stream.values()}")
        victim = pids[0]
        prober = Prober(port, stop_probe)
        prober.start()
        _wait(lambda: len(prober.successes) >= 10)

        killed_at = time.monotonic()
        os.kill(victim, signal.SIGKILL)
        _wait(lambda: (st := json.loads(_get(admin, "/status")[1]))["workers"][0]["restarts"]
              == 1 and st["workers"][0]["pid"] != victim)
        _wait(lambda: _get(admin, "/readyz")[0] == 200)
        time.sleep(2.0)  # load continues on the restarted pair
        stop_probe.set()
        prober.join(10)
        ended = time.monotonic()
        stop_streams.set()
        for s in streams:
            s.join(30)

        survivors = [s for s, pid in by_stream.items() if pid != victim]
        victims = [s for s, pid in by_stream.items() if pid == victim]
        assert survivors and victims
        assert all(s.ok for s in survivors), [s.error for s in survivors if not s.ok]
        assert all(not s.ok for s in victims)  # they went down with their worker
        gap = prober.longest_gap(prober.successes[0], ended)  # it had started before the kill
        assert gap <= 1.0, f"no new connection succeeded for {gap:.2f} s"

        status = json.loads(_get(admin, "/status")[1])
        w0 = status["workers"][0]
        assert (w0["restarts"], w0["last_exit"]) == (1, "killed by SIGKILL")
        assert status["workers"][1]["pid"] == pids[1] and status["workers"][1]["restarts"] == 0
        metrics = _get(admin, "/metrics")[1]
        assert _restarts(metrics, "0") == 1.0 and _restarts(metrics, "1") == 0.0
        faults_summary(f"{len(survivors)} streams on the surviving worker byte-exact, "
                       f"{len(victims)} died with the killed one; longest gap between new "
                       f"connections {gap * 1000:.0f} ms; {len(prober.successes)} probes ok, "
                       f"{prober.failures} failed (caught by the kill: "
                       + ", ".join(f"{(t - killed_at) * 1000:+.0f} ms took {d * 1000:.0f} ms"
                                   for t, d, _ in prober.failed) + ")")
    finally:
        stop_streams.set()
        stop_probe.set()
        proc.stop()
        echo.close()
