"""The programs around the proxies in the fault battery: enforcer processes run inside a
test host (network namespace), threaded backends on sockets made inside one, and a
blocking client that checks what came back by sha256."""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import re
import socket
import subprocess
import threading
import time
from pathlib import Path
from typing import Any

from tests.e2e.proc import BOUND, enforcer_cmd
from tests.faults.netns import Host

CHUNK = 64 * 1024
ADMIN = re.compile(r"admin endpoint bound on \S+:(\d+)")


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


class NsEnforcer:
    """``enforcer run -c FILE`` inside a host; stdout (flow records) and stderr collected."""

    def __init__(self, host: Host, config: Path, *extra: str,
                 wrap: list[str] | None = None) -> None:
        """``wrap``: a command that runs the rest (e.g. in its own mount namespace)."""
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        self.proc = host.popen([*(wrap or []), *enforcer_cmd("run", "-c", str(config), *extra)],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                               env=env)
        self.stdout_lines: list[str] = []
        self.stderr_lines: list[str] = []
        self.ports: dict[str, int] = {}
        self.admin_port = 0
        self._threads = [
            threading.Thread(target=self._pump, args=(self.proc.stdout, self.stdout_lines),
                             daemon=True),
            threading.Thread(target=self._pump, args=(self.proc.stderr, self.stderr_lines),
                             daemon=True)]
        for t in self._threads:
            t.start()

    def _pump(self, stream: Any, into: list[str]) -> None:
        for line in stream:
            into.append(line.rstrip("\n"))
            m = BOUND.search(line)
            if m:
                self.ports[m.group(1)] = int(m.group(3))
            m = ADMIN.search(line)
            if m:
                self.admin_port = int(m.group(1))

    def wait_bound(self, n: int = 1, timeout: float = 30) -> dict[str, int]:
        deadline = time.monotonic() + timeout
        while len(self.ports) < n:
            if self.proc.poll() is not None:
                raise RuntimeError("enforcer exited early:\n" + self.stderr())
            if time.monotonic() > deadline:
                raise TimeoutError("enforcer did not bind:\n" + self.stderr())
            time.sleep(0.02)
        return self.ports

    def stderr(self) -> str:
        return "\n".join(self.stderr_lines)

    def records(self) -> list[dict[str, Any]]:
        out = []
        for line in list(self.stdout_lines):
            with contextlib.suppress(ValueError):
                rec = json.loads(line)
                if isinstance(rec, dict) and rec.get("event") == "flow":
                    out.append(rec)
        return out

    def wait_records(self, n: int, timeout: float = 60) -> list[dict[str, Any]]:
        deadline = time.monotonic() + timeout
        while len(recs := self.records()) < n:
            if time.monotonic() > deadline:
                raise TimeoutError(f"{len(recs)} of {n} flow records:\n{self.stderr()}")
            time.sleep(0.05)
        return recs

    def fds(self) -> int:
        return len(os.listdir(f"/proc/{self.proc.pid}/fd"))

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        for t in self._threads:
            t.join(5)


class Backend:
    """A threaded TCP backend on a listening socket made inside a host. ``echo`` sends
    back what it reads; ``firehose`` sends ``payload`` over and over until the peer goes.
    ``received``/``errors`` record how each connection ended."""

    def __init__(self, sock: socket.socket, mode: str = "echo", payload: bytes = b"") -> None:
        self.sock = sock
        self.mode = mode
        self.payload = payload or os.urandom(CHUNK)
        self.port = int(sock.getsockname()[1])
        self.ended: list[str] = []
        self.connections = 0
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            self.connections += 1
            threading.Thread(target=self._handle, args=(conn,), daemon=True).start()

    def _handle(self, conn: socket.socket) -> None:
        how = "eof"
        with conn:
            try:
                if self.mode == "firehose":
                    while True:
                        conn.sendall(self.payload)
                while data := conn.recv(CHUNK):
                    conn.sendall(data)
                conn.shutdown(socket.SHUT_WR)
            except OSError as exc:
                how = type(exc).__name__
        self.ended.append(how)

    def close(self) -> None:
        self.sock.close()


def echo_roundtrip(sock: socket.socket, addr: tuple[str, int], payload: bytes,
                   timeout: float = 120) -> bytes:
    """Connect, send ``payload`` while reading, half-close, read until EOF."""
    sock.settimeout(timeout)
    sock.connect(addr)
    got = bytearray()
    sender_error: list[BaseException] = []

    def send() -> None:
        try:
            view = memoryview(payload)
            for i in range(0, len(view), CHUNK):
                sock.sendall(view[i:i + CHUNK])
            sock.shutdown(socket.SHUT_WR)
        except OSError as exc:
            sender_error.append(exc)

    sender = threading.Thread(target=send, daemon=True)
    sender.start()
    with sock:
        while data := sock.recv(CHUNK):
            got += data
    sender.join(timeout)
    if sender_error:
        raise sender_error[0]
    return bytes(got)


def closed_on_arrival(sock: socket.socket, addr: tuple[str, int], payload: bytes,
                      timeout: float = 30) -> bytes:
    """Connect and send ``payload`` to a proxy expected to close without answering.

    Returns every byte that came back. The proxy may close before the payload is
    written or half-closed; the reset that unread bytes cause is how it ends, not
    an error, so ENOTCONN/ECONNRESET/EPIPE on our side end the exchange quietly.
    """
    sock.settimeout(timeout)
    sock.connect(addr)
    got = bytearray()
    with sock:
        try:
            sock.sendall(payload)
            sock.shutdown(socket.SHUT_WR)
        except (BrokenPipeError, ConnectionResetError):
            pass
        except OSError as exc:
            if exc.errno != errno.ENOTCONN:
                raise
        try:
            while data := sock.recv(CHUNK):
                got += data
        except ConnectionResetError:
            pass
    return bytes(got)


def http_get(host: Host, port: int, path: str, timeout: float = 10) -> tuple[int, str]:
    """GET http://127.0.0.1:port/path inside ``host`` (an admin endpoint)."""
    sock = host.socket()
    sock.settimeout(timeout)
    with sock:
        sock.connect(("127.0.0.1", port))
        sock.sendall(f"GET {path} HTTP/1.0\r\nHost: x\r\n\r\n".encode())
        data = b""
        while chunk := sock.recv(CHUNK):
            data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    return int(head.split()[1]), body.decode()


def histogram_quantile(text: str, name: str, labels: dict[str, str], q: float) -> float:
    """Prometheus' histogram_quantile over one histogram of an exposition (linear
    interpolation inside the bucket the quantile falls in)."""
    from prometheus_client.parser import text_string_to_metric_families

    buckets: list[tuple[float, float]] = []
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if s.name == name + "_bucket" and all(s.labels.get(k) == v
                                                   for k, v in labels.items()):
                buckets.append((float(s.labels["le"]), float(s.value)))
    buckets.sort()
    if not buckets or buckets[-1][1] == 0:
        return float("nan")
    rank = q * buckets[-1][1]
    prev_le, prev_count = 0.0, 0.0
    for le, count in buckets:
        if count >= rank:
            if le == float("inf"):
                return prev_le
            return prev_le + (le - prev_le) * (rank - prev_count) / max(count - prev_count, 1e-9)
        prev_le, prev_count = le, count
    return prev_le
