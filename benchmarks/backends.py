"""Backends behind the inbound proxy: the same one for every contestant in a run.

- HTTP: nginx serving one small static file (``BODY_SIZE`` bytes) on its own port, one
  worker, no access log, keep-alive without a request cap (nginx's default
  ``keepalive_requests 1000`` would turn the keep-alive workload into a partly
  new-connection one). Without nginx, ``benchmarks.httpd`` (a uvloop responder) stands
  in and the results say so (``backend`` in the JSON). A second, large file
  (``BULK_PATH``, ``BULK_SIZE`` bytes of a fixed pseudo-random stream) is what the egress
  bulk workloads download through a tunnel.
- bulk: ``iperf3 -s``, started fresh for each measurement.

Their CPU is not counted: only the contestants' processes are measured.
"""

from __future__ import annotations

import functools
import hashlib
import os
import random
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from benchmarks.contestants import CAPACITY, Env
from benchmarks.procs import wait_listening

BODY_SIZE = 256
PATH = "/bench.txt"
BULK_PATH = "/bulk.bin"
BULK_SIZE = 16 * 2**20


def request(close: bool = False) -> bytes:
    conn = b"close" if close else b"keep-alive"
    return (b"GET " + PATH.encode() + b" HTTP/1.1\r\nHost: bench\r\nConnection: " + conn
            + b"\r\n\r\n")


@dataclass
class HttpBackend:
    port: int
    kind: str  # "nginx" | "python"
    proc: subprocess.Popen[bytes]


def body() -> bytes:
    return (b"enforcer benchmark body " * 20)[:BODY_SIZE - 1] + b"\n"


@functools.cache
def bulk_body() -> bytes:
    """The large file: the same bytes in every run (a seeded stream, not compressible)."""
    return random.Random(26).randbytes(BULK_SIZE)


@functools.cache
def sha256_of(path: str) -> str:
    data = bulk_body() if path == BULK_PATH else body()
    return hashlib.sha256(data).hexdigest()


def start_http(env: Env) -> HttpBackend:
    d = env.workdir("backend-http")
    port = env.ports.take()
    (d / "www").mkdir()
    (d / "www" / PATH.lstrip("/")).write_bytes(body())
    (d / "www" / BULK_PATH.lstrip("/")).write_bytes(bulk_body())
    if shutil.which("nginx"):
        conf = d / "nginx.conf"
        temp = "".join(f"  {kind}_temp_path {d}/{kind};\n"
                       for kind in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi"))
        # nginx started as root serves as "nobody", who may not reach a temp dir below a
        # private one (pytest's, a TMPDIR): keep root's rights for this loopback backend
        user = "user root;\n" if os.geteuid() == 0 else ""
        conf.write_text(
            f"{user}daemon off;\nmaster_process on;\nworker_processes 1;\npid {d}/nginx.pid;\n"
            f"error_log {d}/backend.log warn;\n"
            f"events {{ worker_connections {CAPACITY}; }}\n"
            f"http {{\n  access_log off;\n{temp}  keepalive_timeout 600s;\n"
            f"  keepalive_requests 100000000;\n"
            f"  server {{\n    listen 127.0.0.1:{port} backlog=4096;\n"
            f"    root {d}/www;\n  }}\n}}\n")
        argv = ["nginx", "-p", f"{d}/", "-e", str(d / "backend.log"), "-c", str(conf)]
        kind = "nginx"
    else:
        argv = [sys.executable, "-m", "benchmarks.httpd", str(port), str(d / "www")]
        kind = "python"
    proc = env.procs.spawn(argv, cwd=Path(__file__).resolve().parents[1],
                           log=d / "backend.log")
    wait_listening([port], [proc], env.procs, f"HTTP backend ({kind})")
    return HttpBackend(port, kind, proc)


def start_iperf3(env: Env) -> tuple[int, subprocess.Popen[bytes]]:
    d = env.workdir("backend-iperf3")
    port = env.ports.take()
    proc = env.procs.spawn(["iperf3", "-s", "-B", "127.0.0.1", "-p", str(port)], cwd=d,
                           log=d / "iperf3-server.log")
    wait_listening([port], [proc], env.procs, "iperf3 server")
    return port, proc
