"""Run ``enforcer`` as a real subprocess and find the ports it bound."""

from __future__ import annotations

import contextlib
import json
import os
import re
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import yaml

BOUND = re.compile(r"listener (\S+) bound on (\S+):(\d+)")


def write_config(path: Path, cfg: dict[str, Any]) -> Path:
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return path


def enforcer_cmd(*args: str) -> list[str]:
    return [sys.executable, "-m", "enforcer", *args]


class EnforcerProcess:
    """``enforcer run -c FILE`` with stderr collected; ``ports`` maps listener -> port."""

    def __init__(self, config: Path, *extra: str, prefix: Sequence[str] = ()) -> None:
        """``prefix``: run under it (``ip netns exec NAME``)."""
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        self.proc = subprocess.Popen(
            [*prefix, *enforcer_cmd("run", "-c", str(config), *extra)], stdout=subprocess.PIPE,
            stderr=subprocess.PIPE, text=True, env=env)
        self.stderr_lines: list[str] = []
        self.stdout_lines: list[str] = []
        self.ports: dict[str, int] = {}
        self._threads = [threading.Thread(target=self._pump, args=(self.proc.stderr,
                                                                     self.stderr_lines), daemon=True),
                         threading.Thread(target=self._pump, args=(self.proc.stdout,
                                                                     self.stdout_lines), daemon=True)]
        for t in self._threads:
            t.start()

    def _pump(self, stream: Any, into: list[str]) -> None:
        for line in stream:
            into.append(line.rstrip("\n"))
            m = BOUND.search(line)
            if m:
                self.ports[m.group(1)] = int(m.group(3))

    def wait_bound(self, n: int = 1, timeout: float = 60) -> dict[str, int]:
        """Until ``n`` listeners logged their port. It returns as soon as they did; the
        timeout only ends a start that hangs: a fresh interpreter importing enforcer took
        20-28 s of wall time (0.4 s of CPU) on the shared 2-core host at load 20, so 20 s
        failed good starts (the supervisor allows its workers 60 s, STARTUP_TIMEOUT)."""
        deadline = time.monotonic() + timeout
        while len(self.ports) < n:
            if self.proc.poll() is not None:
                raise RuntimeError("enforcer exited early:\n" + "\n".join(self.stderr_lines))
            if time.monotonic() > deadline:
                raise TimeoutError("enforcer did not bind:\n" + "\n".join(self.stderr_lines))
            time.sleep(0.02)
        return self.ports

    def flow_records(self, n: int, timeout: float = 20) -> list[dict[str, Any]]:
        """Until at least ``n`` flow records (JSON lines on stdout) were written."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            records = [json.loads(line) for line in list(self.stdout_lines)
                       if line.startswith("{")]
            if len(records) >= n:
                return records
            time.sleep(0.05)
        raise TimeoutError(f"{n} flow records expected:\n" + "\n".join(self.stderr_lines))

    def wait(self, timeout: float = 30) -> int:
        code = self.proc.wait(timeout)
        for t in self._threads:
            t.join(5)
        return code

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)


class EchoServer:
    """A threaded TCP echo backend for tests whose proxy runs in a subprocess; with a
    ``banner``, it speaks first (as SMTP, MySQL and SSH servers do)."""

    def __init__(self, banner: bytes = b"") -> None:
        self.banner = banner
        self.sock = socket.create_server(("127.0.0.1", 0), backlog=512)
        self.port = int(self.sock.getsockname()[1])
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            threading.Thread(target=self._echo, args=(conn,), daemon=True).start()

    def _echo(self, conn: socket.socket) -> None:
        with conn, contextlib.suppress(OSError):  # a client may reset
            conn.sendall(self.banner)
            while data := conn.recv(65536):
                conn.sendall(data)

    def close(self) -> None:
        self.sock.close()
