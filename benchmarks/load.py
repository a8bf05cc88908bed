"""Load generators: iperf3 and wrk as subprocesses, plus two small Python clients.

- ``iperf3_run``: ``iperf3 -c ... -J`` (control and data connections all go through the
  pair); bytes and rate come from its JSON ``end.sum_received``.
- ``wrk_run``: ``wrk`` with a Lua ``done()`` hook that prints one JSON line (requests,
  bytes, errors, latency percentiles), so nothing depends on wrk's text layout.
- ``connect_latencies``: N sequential new connections, each timed from connect() to the
  first response byte, each response checked (status 200 and the whole body).
- ``hold_idle``: N connections opened (64 at a time), each doing one checked request, then
  all held open while a callback measures the proxies; then all closed.
"""

from __future__ import annotations

import asyncio
import json
import shutil
import socket
import ssl
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from benchmarks.backends import PATH, body, request
from benchmarks.contestants import Env
from benchmarks.pki import SERVER_NAME, BenchPki
from benchmarks.procs import log_tail


class MeasureError(Exception):
    """A measurement failed; the message says which tool and why, in one line or a few."""


def run_to_end(env: Env, proc: subprocess.Popen[bytes], what: str, timeout: float) -> None:
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        env.procs.stop(proc)
        raise MeasureError(f"{what}: no result after {timeout:.0f}s") from None
    log = env.procs.log_of(proc)
    env.procs.stop(proc)
    if proc.returncode != 0:
        tail = log_tail(log, 5)
        raise MeasureError(f"{what}: exit code {proc.returncode}" + (f": {tail}" if tail else ""))


# --------------------------------------------------------------------------- iperf3


@dataclass(frozen=True)
class Bulk:
    bytes: int
    seconds: float
    bits_per_second: float


def iperf3_run(env: Env, d: Path, port: int, streams: int, *, seconds: int = 0,
               nbytes: str = "") -> Bulk:
    """One iperf3 test: for ``seconds`` or (warm-up) for ``nbytes`` like "256M"."""
    out = d / f"iperf3-{time.monotonic_ns()}.json"
    amount = ["-n", nbytes] if nbytes else ["-t", str(seconds)]
    proc = env.procs.spawn(["iperf3", "-c", "127.0.0.1", "-p", str(port), "-P", str(streams),
                            "-J", "--connect-timeout", "5000", *amount],
                           cwd=d, stdout=out, log=d / "iperf3-client.log")
    try:
        run_to_end(env, proc, "iperf3", timeout=max(seconds, 10) + 30)
    except MeasureError as exc:
        raise MeasureError(f"{exc}{_iperf3_error(out)}") from None
    data = json.loads(out.read_text())
    if data.get("error"):
        raise MeasureError(f"iperf3: {data['error']}")
    got = data["end"]["sum_received"]
    return Bulk(int(got["bytes"]), float(got["seconds"]), float(got["bits_per_second"]))


def _iperf3_error(out: Path) -> str:
    try:
        return f" ({json.loads(out.read_text()).get('error', '')})"
    except (OSError, ValueError):
        return ""


# --------------------------------------------------------------------------- wrk

WRK_LUA = """
done = function(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    'WRKJSON {"duration_us": %d, "requests": %d, "bytes": %d, "connect_errors": %d, ' ..
    '"read_errors": %d, "write_errors": %d, "status_errors": %d, "timeout_errors": %d, ' ..
    '"p50_us": %d, "p90_us": %d, "p99_us": %d, "max_us": %d, "mean_us": %.1f}\\n',
    summary.duration, summary.requests, summary.bytes, e.connect, e.read, e.write,
    e.status, e.timeout, latency:percentile(50), latency:percentile(90),
    latency:percentile(99), latency.max, latency.mean))
end
"""


@dataclass(frozen=True)
class Requests:
    requests: int
    seconds: float
    errors: int
    p50_ms: float
    p90_ms: float
    p99_ms: float

    @property
    def per_second(self) -> float:
        return self.requests / self.seconds if self.seconds else 0.0


def wrk_summary(env: Env, d: Path, url: str, lua: str, *, seconds: int, connections: int,
                threads: int, close: bool) -> tuple[dict[str, Any], int]:
    """Run wrk with ``lua`` (which prints the WRKJSON summary line) against ``url``: its
    summary and the socket errors it counted."""
    script = d / f"wrk-{time.monotonic_ns()}.lua"
    script.write_text(lua)
    out = d / f"wrk-{time.monotonic_ns()}.txt"
    argv = ["wrk", "-t", str(threads), "-c", str(connections), "-d", f"{seconds}s",
            "--timeout", "10s", "-s", str(script)]
    if close:
        argv += ["-H", "Connection: close"]
    proc = env.procs.spawn([*argv, url], cwd=d, stdout=out, log=d / "wrk.log")
    run_to_end(env, proc, "wrk", timeout=seconds + 30)
    line = next((ln for ln in out.read_text().splitlines() if ln.startswith("WRKJSON ")), "")
    if not line:
        raise MeasureError(f"wrk: no summary in its output: {out.read_text()[-300:]!r}")
    r: dict[str, Any] = json.loads(line[len("WRKJSON "):])
    return r, sum(int(r[k]) for k in r if k.endswith("_errors"))


def check_socket_errors(r: dict[str, Any], errors: int) -> None:
    """More than 1 % (at least 10) socket errors make a measurement worthless."""
    if errors > max(10, r["requests"] // 100):
        raise MeasureError(f"wrk: {errors} socket errors for {r['requests']} requests "
                           f"(connect {r['connect_errors']}, read {r['read_errors']}, "
                           f"write {r['write_errors']}, timeout {r['timeout_errors']})")


def wrk_run(env: Env, d: Path, port: int, *, seconds: int, connections: int, threads: int,
            close: bool) -> Requests:
    r, errors = wrk_summary(env, d, f"http://127.0.0.1:{port}{PATH}", WRK_LUA, seconds=seconds,
                            connections=connections, threads=threads, close=close)
    if r["status_errors"]:
        raise MeasureError(f"wrk: {r['status_errors']} of {r['requests']} responses were not "
                           "2xx/3xx through the pair")
    check_socket_errors(r, errors)
    return Requests(int(r["requests"]), r["duration_us"] / 1e6, errors,
                    r["p50_us"] / 1e3, r["p90_us"] / 1e3, r["p99_us"] / 1e3)


# --------------------------------------------------------------------------- Python clients


def _check_response(data: bytes, expected: bytes) -> None:
    if not data.startswith(b"HTTP/1.1 200") or not data.endswith(expected):
        raise MeasureError(f"bad response through the pair: {data[:80]!r}")


def connect_latencies(port: int, n: int, timeout: float = 10.0) -> list[float]:
    """Seconds from connect() to the first response byte, for N sequential connections."""
    req, expected, times = request(close=True), body(), []
    for _ in range(n):
        started = time.perf_counter()
        with socket.create_connection(("127.0.0.1", port), timeout) as s:
            s.sendall(req)
            first = s.recv(65536)
            times.append(time.perf_counter() - started)
            chunks = [first]
            while chunks[-1]:
                chunks.append(s.recv(65536))
        _check_response(b"".join(chunks), expected)
    return times


async def _open_one(port: int, req: bytes, expected: bytes
                    ) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    await _exchange(reader, writer, req, expected)
    return reader, writer


async def _exchange(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, req: bytes,
                    expected: bytes) -> None:
    writer.write(req)
    head = await reader.readuntil(b"\r\n\r\n")
    length = next(int(line.split(b":", 1)[1]) for line in head.split(b"\r\n")
                  if line.lower().startswith(b"content-length:"))
    _check_response(head + await reader.readexactly(length), expected)


async def hold_idle(port: int, n: int, measure: Callable[[], None], *,
                    concurrency: int = 64, timeout: float = 60.0) -> float:
    """Open N checked connections, call ``measure()`` while all are held, then check that
    every one still answers (what a proxy saves on idle connections must not break them);
    return setup s."""
    req, expected = request(), body()
    gate = asyncio.Semaphore(concurrency)
    held: list[tuple[asyncio.StreamReader, asyncio.StreamWriter]] = []

    async def one() -> None:
        async with gate:
            held.append(await asyncio.wait_for(_open_one(port, req, expected), timeout))

    started = time.perf_counter()
    try:
        results = await asyncio.gather(*(one() for _ in range(n)), return_exceptions=True)
        failed = [r for r in results if isinstance(r, BaseException)]
        if failed:
            raise MeasureError(f"{len(failed)} of {n} idle connections failed "
                               f"(first: {type(failed[0]).__name__}: {failed[0]})")
        setup = time.perf_counter() - started
        measure()

        async def still_answers(reader: asyncio.StreamReader,
                                writer: asyncio.StreamWriter) -> None:
            async with gate:
                await asyncio.wait_for(_exchange(reader, writer, req, expected), timeout)

        results = await asyncio.gather(*(still_answers(r, w) for r, w in held),
                                       return_exceptions=True)
        failed = [r for r in results if isinstance(r, BaseException)]
        if failed:
            raise MeasureError(f"{len(failed)} of {n} idle connections no longer answer "
                               f"(first: {type(failed[0]).__name__}: {failed[0]})")
        return setup
    finally:
        for _, writer in held:
            writer.close()
        await asyncio.gather(*(w.wait_closed() for _, w in held), return_exceptions=True)


# --------------------------------------------------------------------------- TLS probe

PROBE_FIELDS = {"Protocol version": "protocol", "Ciphersuite": "cipher",
                "Server Temp Key": "group", "Verification": "verification"}


def tls_probe(pki: BenchPki, port: int) -> dict[str, Any] | None:
    """What the inbound negotiates with ``openssl s_client`` (default offer, client cert).

    Only an indication: the outbound of each contestant makes its own offer. None when
    openssl is missing or the handshake fails.
    """
    if not shutil.which("openssl"):
        return None
    argv = ["openssl", "s_client", "-brief", "-connect", f"127.0.0.1:{port}",
            "-cert", str(pki.client_cert), "-key", str(pki.client_key),
            "-CAfile", str(pki.ca), "-verify_return_error"]
    try:
        done = subprocess.run(argv, stdin=subprocess.DEVNULL, capture_output=True, text=True,
                              timeout=10, check=False)
    except subprocess.TimeoutExpired:
        return None
    found: dict[str, Any] = {}
    for line in done.stderr.splitlines():
        key, _, value = line.partition(":")
        if key.strip() in PROBE_FIELDS:
            found[PROBE_FIELDS[key.strip()]] = value.strip()
    if found:
        found["client_cert_required"] = refuses_anonymous(pki, port)
    return found or None


def refuses_anonymous(pki: BenchPki, port: int) -> bool:
    """True if the inbound refuses a TLS client with no certificate (mTLS enforced)."""
    ctx = ssl.create_default_context(cafile=str(pki.ca))
    try:
        with socket.create_connection(("127.0.0.1", port), 10) as raw, \
                ctx.wrap_socket(raw, server_hostname=SERVER_NAME) as tls:
            tls.sendall(request(close=True))
            return not tls.recv(64).startswith(b"HTTP/")
    except (ssl.SSLError, OSError):
        return True
