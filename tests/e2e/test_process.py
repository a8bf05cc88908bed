"""The real process: SIGTERM drain, exit codes, `enforcer check`, `enforcer demo`."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import socket
import subprocess
import threading
import time
from pathlib import Path

import pytest

from tests.e2e.harness import inbound_cfg
from tests.e2e.proc import EnforcerProcess, enforcer_cmd, write_config

MiB = 1024 * 1024


class SlowSink:
    """A backend that reads slowly and, at EOF, answers with the sha256 of what it read."""

    def __init__(self) -> None:
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(8)
        self.port = self.sock.getsockname()[1]
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            threading.Thread(target=self._one, args=(conn,), daemon=True).start()

    def _one(self, conn: socket.socket) -> None:
        h = hashlib.sha256()
        with conn:
            while data := conn.recv(65536):
                h.update(data)
                time.sleep(0.002)
            conn.sendall(h.hexdigest().encode())


def test_sigterm_drains_in_flight_transfer_and_refuses_new(tmp_path: Path, pki) -> None:  # type: ignore[no-untyped-def]
    sink = SlowSink()
    cfg = inbound_cfg(pki, sink.port, default="allow", rules=[], mode="off",
                      limits={"drain_timeout": "30s"})
    proc = EnforcerProcess(write_config(tmp_path / "e.yaml", cfg))
    try:
        port = proc.wait_bound()["inbound"]
        payload = os.urandom(8 * MiB)
        client = socket.create_connection(("127.0.0.1", port))
        result: dict[str, bytes] = {}

        def transfer() -> None:
            client.sendall(payload)
            client.shutdown(socket.SHUT_WR)
            got = b""
            while data := client.recv(65536):
                got += data
            result["digest"] = got

        t = threading.Thread(target=transfer)
        t.start()
        time.sleep(0.3)  # the transfer is in flight
        proc.proc.send_signal(signal.SIGTERM)
        time.sleep(0.3)
        with pytest.raises(OSError):
            socket.create_connection(("127.0.0.1", port), timeout=2).close()
        t.join(60)
        assert result["digest"] == hashlib.sha256(payload).hexdigest().encode()
        assert proc.wait(60) == 0
        records = [json.loads(line) for line in proc.stdout_lines if line.startswith("{")]
        assert len(records) == 1
        assert records[0]["bytes"]["from_client"] == len(payload)
        assert records[0]["close"] in ("client_fin", "upstream_fin")
    finally:
        proc.stop()
        client.close()
        sink.sock.close()


def test_bind_failure_exits_3(tmp_path: Path, pki) -> None:  # type: ignore[no-untyped-def]
    taken = socket.socket()
    taken.bind(("127.0.0.1", 0))
    taken.listen(1)
    cfg = inbound_cfg(pki, 9, default="allow", rules=[], mode="off",
                      listener_extra={"listen": f"127.0.0.1:{taken.getsockname()[1]}"})
    path = write_config(tmp_path / "e.yaml", cfg)
    out = subprocess.run(enforcer_cmd("run", "-c", str(path)), capture_output=True, text=True,
                         timeout=90)
    taken.close()
    assert out.returncode == 3, out.stderr
    assert "listeners.inbound.listen: cannot bind" in out.stderr


def test_version() -> None:
    out = subprocess.run(enforcer_cmd("--version"), capture_output=True, text=True, timeout=30)
    assert out.returncode == 0
    assert out.stdout.startswith("enforcer ")


def test_make_demo_exits_0() -> None:
    """`make demo` as a newcomer runs it (the venv exists already: `make test` made it)."""
    repo = Path(__file__).resolve().parents[2]
    cmd = ["make", "-s", "demo"] if shutil.which("make") else enforcer_cmd("demo")
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=repo)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "sha256 match" in out.stdout
    assert "untrusted CA" in out.stdout and "refused" in out.stdout
    flows = [json.loads(line) for line in out.stdout.splitlines() if line.startswith("{")]
    assert {f["action"] for f in flows} >= {"allow", "error"}


def test_second_signal_closes_everything_at_once(tmp_path: Path, pki) -> None:  # type: ignore[no-untyped-def]
    sink = SlowSink()
    cfg = inbound_cfg(pki, sink.port, default="allow", rules=[], mode="off",
                      limits={"drain_timeout": "60s"})
    proc = EnforcerProcess(write_config(tmp_path / "e.yaml", cfg))
    client = socket.create_connection(("127.0.0.1", proc.wait_bound()["inbound"]))
    try:
        client.sendall(b"still talking")  # an open connection keeps the drain waiting
        time.sleep(0.3)
        proc.proc.send_signal(signal.SIGTERM)
        time.sleep(0.5)
        assert proc.proc.poll() is None, "the first signal drains"
        started = time.monotonic()
        proc.proc.send_signal(signal.SIGTERM)
        assert proc.wait(20) == 130
        assert time.monotonic() - started < 10, "the second signal does not wait for the drain"
        records = [json.loads(line) for line in proc.stdout_lines if line.startswith("{")]
        assert [r["close"] for r in records] == ["drain"]
        assert records[0]["bytes"]["from_client"] == len(b"still talking")
    finally:
        proc.stop()
        client.close()
        sink.sock.close()
