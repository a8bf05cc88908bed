"""The SNI passthrough comparison's load and checks (``benchmarks/passthrough.py`` runs
them): wrk over https, the byte checks, the two workloads, and one measurement.

wrk resolves the URL's host and sends it as the SNI; ``RESOLVE_LUA`` makes every name
127.0.0.1, so the names need no DNS entry. ``measure`` starts a fresh proxy, probes every
route (``check_routes``: each probe name must reach its route's backend, body compared by
sha256, certificate verified for the name), runs the workload with the proxy's CPU counted
over the measured window only (``Window``), then checks the 1 MiB body through the tunnel
(``check_bulk``) and that the proxy is still alive.
"""

from __future__ import annotations

import hashlib
import socket
import ssl
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from benchmarks.backends import BODY_SIZE
from benchmarks.contestants import Env, Pair, stop_pair
from benchmarks.load import WRK_LUA, MeasureError, check_socket_errors, wrk_summary
from benchmarks.passthrough_peers import (
    BULK_PATH,
    BULK_SIZE,
    LOAD_NAME,
    PROBES,
    ROUTE_PATH,
    SMALL_PATH,
    Backend,
    PtContestant,
    bulk_body,
    route_body,
)
from benchmarks.procs import log_tail
from benchmarks.workloads import Metric, Window

Values = dict[str, Any]


# --------------------------------------------------------------------------- settings


@dataclass(frozen=True)
class Settings:
    quick: bool
    seconds: int
    warmup_s: int
    newconn_connections: int
    bulk_connections: int
    threads: int
    repeat: int = 1

    @classmethod
    def make(cls, quick: bool, duration: int | None, repeat: int) -> Settings:
        return cls(quick=quick, seconds=duration or (2 if quick else 10),
                   warmup_s=1 if quick else 2, newconn_connections=32, bulk_connections=8,
                   threads=2, repeat=max(1, repeat))


# --------------------------------------------------------------------------- load: wrk over https

# wrk resolves the URL's host and sends it as SNI; this makes every name 127.0.0.1
# (and skips wrk's probe connection to each address)
RESOLVE_LUA = """
wrk.resolve = function(host, service)
  wrk.addrs = wrk.lookup("127.0.0.1", service)
end
"""


@dataclass(frozen=True)
class Got:
    requests: int
    seconds: float
    bytes: int
    errors: int
    p50_ms: float
    p99_ms: float


def wrk_https(env: Env, d: Path, port: int, *, seconds: int, connections: int, threads: int,
              path: str, size: int, close: bool) -> Got:
    r, errors = wrk_summary(env, d, f"https://{LOAD_NAME}:{port}{path}", RESOLVE_LUA + WRK_LUA,
                            seconds=seconds, connections=connections, threads=threads,
                            close=close)
    if r["requests"] == 0 or r["status_errors"]:
        raise MeasureError(f"wrk: {r['requests']} responses, {r['status_errors']} not 2xx/3xx, "
                           f"{errors} errors through the proxy")
    check_socket_errors(r, errors)
    if r["bytes"] < r["requests"] * size:  # every counted response carried its whole body
        raise MeasureError(f"wrk: {r['bytes']} bytes for {r['requests']} responses of "
                           f"{size} B: responses were cut short")
    return Got(int(r["requests"]), r["duration_us"] / 1e6, int(r["bytes"]), errors,
               r["p50_us"] / 1e3, r["p99_us"] / 1e3)


# --------------------------------------------------------------------------- byte checks


def fetch(port: int, ca: Path, sni: str | None, path: str, timeout: float = 10.0
          ) -> tuple[bytes, str]:
    """GET ``path`` over TLS with this SNI (None: no SNI; the chain is verified, and the
    name too when there is one); the body and the negotiated version + suite."""
    ctx = ssl.create_default_context(cafile=str(ca))
    ctx.check_hostname = sni is not None
    req = (f"GET {path} HTTP/1.1\r\nHost: {sni or 'bench'}\r\nConnection: close\r\n\r\n"
           ).encode()
    with socket.create_connection(("127.0.0.1", port), timeout) as raw, \
            ctx.wrap_socket(raw, server_hostname=sni) as tls:
        tls.sendall(req)
        chunks = []
        while data := tls.recv(1 << 16):
            chunks.append(data)
        negotiated = f"{tls.version()} {(tls.cipher() or ('?',))[0]}"
    head, _, payload = b"".join(chunks).partition(b"\r\n\r\n")
    if not head.startswith(b"HTTP/1.1 200"):
        raise MeasureError(f"{sni or 'no SNI'}: bad response {head[:60]!r}")
    return payload, negotiated


def _same(got: bytes, want: bytes) -> bool:
    return hashlib.sha256(got).digest() == hashlib.sha256(want).digest()


def check_routes(port: int, ca: Path) -> str:
    """Every probe name reaches its route's backend; returns the negotiated TLS."""
    negotiated = ""
    for sni, route in PROBES:
        try:
            got, negotiated = fetch(port, ca, sni, ROUTE_PATH)
        except (OSError, ssl.SSLError) as exc:
            raise MeasureError(f"route probe {sni or 'without SNI'}: {exc}") from None
        if not _same(got, route_body(route)):
            raise MeasureError(f"route probe {sni or 'without SNI'}: expected route {route}, "
                               f"got {got[:40]!r}")
    return negotiated


def check_bulk(port: int, ca: Path) -> None:
    try:
        got, _ = fetch(port, ca, LOAD_NAME, BULK_PATH)
    except (OSError, ssl.SSLError) as exc:
        raise MeasureError(f"bulk check: {exc}") from None
    if not _same(got, bulk_body()):
        raise MeasureError(f"bulk check: {len(got)} bytes, not the backend's {BULK_SIZE} "
                           "(sha256 differs)")


# --------------------------------------------------------------------------- workloads


@dataclass
class Ctx:
    env: Env
    settings: Settings
    backend: Backend
    d: Path = field(default_factory=Path)
    tls_seen: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class Workload:
    name: str
    title: str
    metrics: tuple[Metric, ...]
    run: Callable[[Ctx, Pair], Values]
    params: Callable[[Settings], Values]


def _per(cpu: float | None, units: float, scale: float) -> float | None:
    return None if cpu is None or units <= 0 else round(cpu * scale / units, 3)


def _newconn(ctx: Ctx, pair: Pair) -> Values:
    s = ctx.settings

    def go(seconds: int) -> Got:
        return wrk_https(ctx.env, ctx.d, pair.entry_port, seconds=seconds,
                         connections=s.newconn_connections, threads=s.threads,
                         path=SMALL_PATH, size=BODY_SIZE, close=True)

    go(s.warmup_s)
    with Window(pair) as w:
        got = go(s.seconds)
    return {"conn_per_s": round(got.requests / got.seconds, 1),
            "cpu_us_per_conn": _per(w.total, got.requests, 1e6),
            "p50_ms": round(got.p50_ms, 3), "p99_ms": round(got.p99_ms, 3),
            "requests": got.requests, "errors": got.errors, "bytes": got.bytes, **w.values()}


def _bulk(ctx: Ctx, pair: Pair) -> Values:
    s = ctx.settings

    def go(seconds: int) -> Got:
        return wrk_https(ctx.env, ctx.d, pair.entry_port, seconds=seconds,
                         connections=s.bulk_connections, threads=s.threads,
                         path=BULK_PATH, size=BULK_SIZE, close=False)

    go(s.warmup_s)
    with Window(pair) as w:
        got = go(s.seconds)
    gb = got.bytes / 1e9
    return {"gbit_per_s": round(got.bytes * 8 / got.seconds / 1e9, 3),
            "cpu_s_per_gb": _per(w.total, gb, 1.0), "requests": got.requests,
            "errors": got.errors, "bytes": got.bytes, **w.values()}


WORKLOADS: tuple[Workload, ...] = (
    Workload("sni-newconn", "new connections through SNI routing (TLS handshake end to "
             "end, 256 B response)",
             (Metric("conn_per_s", "new connections/s", "conn/s", "higher", ratio_target=1.0),
              Metric("cpu_us_per_conn", "CPU per new connection", "CPU µs/conn", "lower",
                     ratio_target=1.0),
              Metric("p99_ms", "p99 latency under load", "ms", "lower", short="p99")),
             _newconn, lambda s: {"connections": s.newconn_connections, "threads": s.threads,
                                  "seconds": s.seconds, "warmup_s": s.warmup_s,
                                  "sni": LOAD_NAME}),
    Workload("sni-bulk", "bulk through established tunnels (1 MiB responses, keep-alive)",
             (Metric("gbit_per_s", "throughput", "Gbit/s", "higher", ratio_target=1.0),
              Metric("cpu_s_per_gb", "CPU per GB", "CPU s/GB", "lower", ratio_target=1.0)),
             _bulk, lambda s: {"connections": s.bulk_connections, "threads": s.threads,
                               "seconds": s.seconds, "warmup_s": s.warmup_s,
                               "response_bytes": BULK_SIZE, "sni": LOAD_NAME}),
)
WORKLOAD_NAMES = tuple(w.name for w in WORKLOADS)
BY_WORKLOAD = {w.name: w for w in WORKLOADS}


def measure(ctx: Ctx, w: Workload, c: PtContestant) -> Values:
    """A fresh proxy: route probes, the workload, the bulk sha256 check, stop."""
    pair = c.start_passthrough(ctx.env, ctx.backend)
    try:
        ctx.d = ctx.env.workdir(f"{w.name}-{c.name}")
        if c.routes_by_sni:
            ctx.tls_seen[c.name] = check_routes(pair.entry_port, ctx.backend.ca)
        values = w.run(ctx, pair)
        check_bulk(pair.entry_port, ctx.backend.ca)
        for proc in pair.procs:
            if proc.poll() is not None:
                raise MeasureError(f"{c.name} exited with code {proc.returncode} during the "
                                   f"measurement: {log_tail(ctx.env.procs.log_of(proc), 5)}")
        values["routes_checked"] = len(PROBES) if c.routes_by_sni else 0
        values["bulk_sha256_ok"] = True
        return values
    finally:
        stop_pair(ctx.env, pair)

