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
from collections.abc import Callable
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


def _holds_sighup(pid: int) -> bool:
    """Whether the process blocks SIGHUP now (its SigBlk mask in /proc)."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return False
    mask = next(line.split()[1] for line in status.splitlines() if line.startswith("SigBlk:"))
    return bool(int(mask, 16) & (1 << (signal.SIGHUP - 1)))


def _children(pid: int) -> list[int]:
    kids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
                kids.append(int(entry.name))
    return kids


def _wait(predicate: object, what: str | Callable[[], str], timeout: float = 20) -> None:
    """Until ``predicate()``; ``what`` (a callable: made at the timeout) names the failure."""
    deadline = time.monotonic() + timeout
    while not predicate():  # type: ignore[operator]
        if time.monotonic() > deadline:
            raise TimeoutError(what if isinstance(what, str) else what())
        time.sleep(0.002)


@pytest.mark.parametrize("workers", [1, 2])
def test_reload_signals_during_startup_wait_for_the_handlers(tmp_path: Path, pki,  # type: ignore[no-untyped-def]
                                                             workers: int) -> None:
    """SIGHUP and SIGUSR1 end a process by default; one that arrives while enforcer (or a
    worker) is still importing is held and handled once the process serves: a reload
    reloads, once, and nothing exits."""
    cfg = {**inbound_cfg(pki, 9, default="allow", rules=[], mode="off"), "workers": workers}
    proc = EnforcerProcess(write_config(tmp_path / "e.yaml", cfg))
    try:
        pid = proc.proc.pid
        if workers == 1:
            _wait(lambda: _holds_sighup(pid), "enforcer run never held SIGHUP")
        else:  # the supervisor passes signals on to workers that are still starting
            _wait(lambda: len(_children(pid)) == workers and all(
                _holds_sighup(kid) for kid in _children(pid)), "workers never held SIGHUP")
        assert not proc.ports, "signalled too late: already serving"
        os.kill(pid, signal.SIGHUP)
        os.kill(pid, signal.SIGUSR1)
        proc.wait_bound()
        _wait(lambda: sum("SIGHUP: reloading" in line for line in proc.stderr_lines) == workers,
              lambda: "no reload after startup:\n" + "\n".join(proc.stderr_lines))
        time.sleep(0.5)
        assert proc.proc.poll() is None, "\n".join(proc.stderr_lines)
        assert sum("SIGHUP: reloading" in line for line in proc.stderr_lines) == workers
        assert not any("exited" in line for line in proc.stderr_lines), proc.stderr_lines
        proc.proc.send_signal(signal.SIGTERM)
        assert proc.wait() == 0
    finally:
        proc.stop()
