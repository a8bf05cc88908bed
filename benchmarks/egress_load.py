"""The egress load tool: ``python -m benchmarks.egress_load ...`` prints one JSON line.

It speaks the proxy handshake itself (``benchmarks.tunnel``: SOCKS5, optionally with a
login, or HTTP CONNECT) to reach the harness's HTTP backend through the proxy under test,
and runs as a process of its own (its CPU is not the proxy's) on uvloop, one
``asyncio.BufferedProtocol`` per connection: bytes are read into a buffer the connection
owns and hashed from there, no stream objects, no copies of bulk bodies.

- ``--mode newconn``: ``--connections`` workers, each in a loop until ``--seconds`` have
  passed: a new TCP connection to the proxy, the handshake, ``GET <path>`` with
  ``Connection: close``, the response checked (status, length, sha256 of the body), close.
  Reports completed connections, errors (the first one's text) and latency percentiles
  (connect to the last response byte).
- ``--mode bulk``: ``--connections`` tunnels, each opened once, then keep-alive ``GET
  <path>`` of a large file back to back until ``--seconds`` have passed (the response in
  flight is finished); every body is checked by sha256. Reports body bytes and seconds.

A proxy that refuses, a wrong byte or a connection lost mid-response is an error of that
connection; the harness fails the measurement when errors exceed 1% (at least 10), and a
bulk run on any error.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, cast

from benchmarks.tunnel import Login, Response, TunnelError, handshake

READ_SIZE = 256 * 1024


@dataclass(frozen=True)
class Job:
    protocol: str
    proxy: tuple[str, int]
    target: tuple[str, int]
    path: str
    size: int
    sha256: str
    login: Login | None
    keep_alive: bool

    def request(self) -> bytes:
        conn = b"keep-alive" if self.keep_alive else b"close"
        return (f"GET {self.path} HTTP/1.1\r\nHost: {self.target[0]}:{self.target[1]}\r\n"
                .encode() + b"Connection: " + conn + b"\r\n\r\n")


@dataclass
class Tally:
    completed: int = 0  # connections (newconn) or responses (bulk) checked
    body_bytes: int = 0
    errors: int = 0
    first_error: str | None = None
    latencies: list[float] = field(default_factory=list)

    def error(self, exc: BaseException) -> None:
        self.errors += 1
        if self.first_error is None:
            self.first_error = f"{type(exc).__name__}: {exc}"


class Conn(asyncio.BufferedProtocol):
    """One connection: handshake, then responses; ``until`` says when to stop asking
    (None: one response, then close)."""

    def __init__(self, job: Job, tally: Tally, until: float | None) -> None:
        self.job, self.tally, self.until = job, tally, until
        self.buf = bytearray(READ_SIZE)
        self.view = memoryview(self.buf)
        self.hs = handshake(job.protocol, *job.target, job.login)
        self.resp: Response | None = None
        self.done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's is not a subclass
        self.transport.write(self.hs.first())

    def get_buffer(self, sizehint: int) -> memoryview:
        return self.view

    def buffer_updated(self, nbytes: int) -> None:
        try:
            self._received(self.view[:nbytes])
        except (TunnelError, ValueError) as exc:
            self._finish(exc)

    def _received(self, data: memoryview) -> None:
        assert self.transport is not None
        if self.resp is None:
            send, open_, rest = self.hs.feed(bytes(data))
            if send:
                self.transport.write(send)
            if not open_:
                return
            if rest:
                raise TunnelError(f"{len(rest)} bytes from the proxy before the request")
            self._ask()
            return
        if self.resp.feed(data):
            self.tally.completed += 1
            self.tally.body_bytes += self.job.size
            if self.until is not None and time.monotonic() < self.until:
                self._ask()
            else:
                self._finish(None)

    def _ask(self) -> None:
        assert self.transport is not None
        self.resp = Response(self.job.size, self.job.sha256)
        self.transport.write(self.job.request())

    def _finish(self, exc: BaseException | None) -> None:
        if self.done.done():
            return
        if exc is None:
            self.done.set_result(None)
        else:
            self.done.set_exception(exc)
        if self.transport is not None:
            self.transport.close() if exc is None else self.transport.abort()

    def eof_received(self) -> bool | None:
        self._finish(ConnectionError("closed by the proxy before the response ended"))
        return None

    def connection_lost(self, exc: Exception | None) -> None:
        self._finish(exc or ConnectionError("connection lost before the response ended"))


async def _one(job: Job, tally: Tally, until: float | None, timeout: float) -> None:
    """One connection to its end; ``timeout`` bounds the connect and, past ``until``,
    the wait for the last response."""
    loop = asyncio.get_running_loop()
    transport, conn = await asyncio.wait_for(
        loop.create_connection(lambda: Conn(job, tally, until), *job.proxy), timeout)
    limit = timeout + (max(0.0, until - time.monotonic()) if until else 0.0)
    try:
        await asyncio.wait_for(asyncio.shield(conn.done), limit)
    except TimeoutError:
        transport.abort()
        raise TunnelError(f"no complete response within {limit:.0f} s") from None


async def newconn(job: Job, connections: int, seconds: float, timeout: float) -> Tally:
    tally = Tally()
    deadline = time.monotonic() + seconds

    async def worker() -> None:
        while time.monotonic() < deadline:
            started = time.perf_counter()
            try:
                await _one(job, tally, None, timeout)
            except (TimeoutError, OSError, TunnelError) as exc:
                tally.error(exc)
                continue
            tally.latencies.append(time.perf_counter() - started)

    await asyncio.gather(*(worker() for _ in range(connections)))
    return tally


async def bulk(job: Job, connections: int, seconds: float, timeout: float) -> Tally:
    tally = Tally()
    until = time.monotonic() + seconds

    async def tunnel() -> None:
        try:
            await _one(job, tally, until, timeout)
        except (TimeoutError, OSError, TunnelError) as exc:
            tally.error(exc)

    await asyncio.gather(*(tunnel() for _ in range(connections)))
    return tally


def _address(text: str) -> tuple[str, int]:
    host, _, port = text.rpartition(":")
    return host, int(port)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m benchmarks.egress_load")
    p.add_argument("--protocol", choices=("socks5", "http_connect"), required=True)
    p.add_argument("--proxy", type=_address, required=True, help="HOST:PORT of the proxy")
    p.add_argument("--target", type=_address, required=True, help="IPv4:PORT behind it")
    p.add_argument("--mode", choices=("newconn", "bulk"), required=True)
    p.add_argument("--path", required=True)
    p.add_argument("--size", type=int, required=True, help="the body's length")
    p.add_argument("--sha256", required=True, help="the body's sha256 (hex)")
    p.add_argument("--connections", type=int, default=32)
    p.add_argument("--seconds", type=float, default=2.0)
    p.add_argument("--user")
    p.add_argument("--password")
    p.add_argument("--timeout", type=float, default=10.0)
    return p


def run(argv: Sequence[str] | None = None) -> dict[str, Any]:
    a = build_parser().parse_args(argv)
    login = Login(a.user, a.password or "") if a.user else None
    job = Job(a.protocol, a.proxy, a.target, a.path, a.size, a.sha256, login,
              keep_alive=a.mode == "bulk")
    go = newconn if a.mode == "newconn" else bulk
    started, cpu0 = time.perf_counter(), time.process_time()
    tally = _event_loop_run(go(job, a.connections, a.seconds, a.timeout))
    elapsed = time.perf_counter() - started
    cpu = time.process_time() - cpu0
    ms = sorted(t * 1e3 for t in tally.latencies)
    return {"mode": a.mode, "protocol": a.protocol, "seconds": round(elapsed, 4),
            "completed": tally.completed, "body_bytes": tally.body_bytes,
            "errors": tally.errors, "first_error": tally.first_error,
            "cpu_cores": round(cpu / elapsed, 3) if elapsed else None,
            "p50_ms": _pct(ms, 50), "p99_ms": _pct(ms, 99)}


def _event_loop_run(coro: Any) -> Tally:
    try:
        import uvloop
    except ImportError:  # the harness's own venv has it; plain asyncio works too
        return cast(Tally, asyncio.run(coro))
    return cast(Tally, uvloop.run(coro))


def _pct(sorted_ms: list[float], pct: float) -> float | None:
    if not sorted_ms:
        return None
    rank = max(1, round(pct / 100 * len(sorted_ms)))
    return round(sorted_ms[min(rank, len(sorted_ms)) - 1], 3)


def main() -> None:
    print("EGRESSJSON " + json.dumps(run(sys.argv[1:])), flush=True)


if __name__ == "__main__":
    main()
