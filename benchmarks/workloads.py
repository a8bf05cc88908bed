"""Workloads: what is measured, in which units, and which way is better.

Each workload runs against one freshly started pair (``contestants``): warm-up first,
then CPU (utime+stime of every process of both sidecars, from /proc) is read before and
after the measured window only, so costs are per unit of the measured work:

| workload    | tool           | per second          | per unit of work           |
|-------------|----------------|---------------------|----------------------------|
| bulk-1/-8   | iperf3 -P 1/8  | Gbit/s              | CPU s per GB               |
| keepalive   | wrk, 32 conns  | requests/s          | CPU µs per request         |
| newconn     | wrk + close    | new connections/s   | CPU µs per connection      |
| latency     | Python client  | p50/p99 ms, connect to first byte, one at a time     |
| idle-small/large | Python client | KiB of RSS per held connection (both sidecars), |
|             |                | and the pair's PSS at rest                             |

Everything a workload returns is a flat dict of numbers; ``METRICS`` says which of them
are compared across contestants, their unit, and the target for enforcer's ratio to the
best peer (or an absolute limit).
"""

from __future__ import annotations

import asyncio
import shutil
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from benchmarks import load
from benchmarks.backends import HttpBackend, start_iperf3
from benchmarks.contestants import Contestant, Env, Pair, stop_pair
from benchmarks.procs import cpu_split, log_tail, pss_bytes, rss_bytes

Values = dict[str, Any]


@dataclass(frozen=True)
class Settings:
    """Every knob, the same for all contestants; recorded in the results."""

    quick: bool
    bulk_seconds: int
    bulk_warmup: str  # iperf3 -n amount
    wrk_seconds: int
    wrk_warmup_seconds: int
    wrk_connections: int
    wrk_threads: int
    latency_n: int
    latency_warmup: int
    idle_small: int
    idle_large: int
    idle_settle_s: float
    idle_note: str = ""
    repeat: int = 1  # repetitions of every measurement (medians reported)

    @classmethod
    def make(cls, quick: bool, duration: int | None, idle_cap: int,
             repeat: int = 1) -> Settings:
        seconds = duration or (2 if quick else 10)
        large = 500 if quick else 10000
        note = ""
        if large > idle_cap:
            note = (f"idle-large capped at {idle_cap} connections: each proxy process "
                    f"holds 2 sockets per connection and RLIMIT_NOFILE allows no more")
            large = idle_cap
        return cls(quick=quick, bulk_seconds=duration or (1 if quick else 10),
                   bulk_warmup="128M" if quick else "1G",
                   wrk_seconds=seconds, wrk_warmup_seconds=1 if quick else 2,
                   wrk_connections=32, wrk_threads=2, latency_n=100 if quick else 1000,
                   latency_warmup=10 if quick else 50, idle_small=100 if quick else 1000,
                   idle_large=large,
                   idle_settle_s=0.5 if quick else 1.0, idle_note=note,
                   repeat=max(1, repeat))


@dataclass(frozen=True)
class Metric:
    key: str
    label: str
    unit: str
    better: str  # "higher" | "lower"
    ratio_target: float | None = None  # enforcer / best peer must be >= (higher) or <=
    absolute_max: float | None = None  # enforcer's own value must be <= this
    short: str = ""  # prefix in progress lines ("p99")


@dataclass
class Ctx:
    """One measurement: the run's environment plus its backends."""

    env: Env
    settings: Settings
    http: HttpBackend | None
    d: Path = field(default_factory=Path)
    tls_seen: dict[str, dict[str, Any] | None] = field(default_factory=dict)  # TLS probes


@dataclass(frozen=True)
class Workload:
    name: str
    title: str
    tools: tuple[str, ...]  # binaries the load needs (apt package names equal them)
    backend: str  # "http" | "iperf3"
    metrics: tuple[Metric, ...]
    run: Callable[[Ctx, Pair], Values]
    proxies_only: bool = False  # meaningless without proxy processes (direct is skipped)
    params: Callable[[Settings], Values] = lambda s: {}

    def missing_tool(self) -> str | None:
        for tool in self.tools:
            if not shutil.which(tool):
                return f"{tool} not installed (apt install {tool})"
        return None


class Window:
    """CPU seconds of the pair's processes (per role) between ``__enter__`` and ``__exit__``."""

    def __init__(self, pair: Pair) -> None:
        self.pair = pair
        self.cpu: dict[str, float] = {}
        self.user = 0.0
        self.wall = 0.0

    def __enter__(self) -> Window:
        self._cpu0 = {role: cpu_split([sid]) for role, sid in self.pair.roles.items()}
        self._t0 = time.perf_counter()
        return self

    def __exit__(self, *exc: object) -> None:
        self.wall = time.perf_counter() - self._t0
        now = {role: cpu_split([sid]) for role, sid in self.pair.roles.items()}
        self.cpu = {role: sum(now[role]) - sum(self._cpu0[role]) for role in now}
        self.user = sum(now[role][0] - self._cpu0[role][0] for role in now)

    @property
    def total(self) -> float | None:
        return sum(self.cpu.values()) if self.cpu else None

    def values(self) -> Values:
        out: Values = {"cpu_s": _round(self.total), "wall_s": round(self.wall, 3)}
        if self.cpu:
            out["cpu_s_user"] = round(self.user, 3)  # the rest is system time
        for role, seconds in self.cpu.items():
            out[f"cpu_s_{role}"] = round(seconds, 3)
        if self.total is not None and self.wall:
            out["cpu_cores"] = round(self.total / self.wall, 3)
        return out


def _round(value: float | None, digits: int = 3) -> float | None:
    return None if value is None else round(value, digits)


def _per(cpu: float | None, units: float, scale: float) -> float | None:
    return None if cpu is None or units <= 0 else round(cpu * scale / units, 3)


# --------------------------------------------------------------------------- bulk


def _bulk(streams: int) -> Callable[[Ctx, Pair], Values]:
    def run(ctx: Ctx, pair: Pair) -> Values:
        s = ctx.settings
        load.iperf3_run(ctx.env, ctx.d, pair.entry_port, streams, nbytes=s.bulk_warmup)
        with Window(pair) as w:
            got = load.iperf3_run(ctx.env, ctx.d, pair.entry_port, streams,
                                  seconds=s.bulk_seconds)
        gb = got.bytes / 1e9
        return {"gbit_per_s": round(got.bits_per_second / 1e9, 3),
                "cpu_s_per_gb": _per(w.total, gb, 1.0), "bytes": got.bytes, **w.values()}

    return run


# --------------------------------------------------------------------------- wrk


def _wrk(close: bool) -> Callable[[Ctx, Pair], Values]:
    rate_key, cost_key = ("conn_per_s", "cpu_us_per_conn") if close else (
        "req_per_s", "cpu_us_per_req")

    def run(ctx: Ctx, pair: Pair) -> Values:
        s = ctx.settings

        def go(seconds: int) -> load.Requests:
            return load.wrk_run(ctx.env, ctx.d, pair.entry_port, seconds=seconds,
                                connections=s.wrk_connections, threads=s.wrk_threads,
                                close=close)

        go(s.wrk_warmup_seconds)
        with Window(pair) as w:
            got = go(s.wrk_seconds)
        if got.requests == 0:
            raise load.MeasureError(f"wrk: no request completed ({got.errors} errors)")
        return {rate_key: round(got.per_second, 1),
                cost_key: _per(w.total, got.requests, 1e6),
                "p50_ms": round(got.p50_ms, 3), "p99_ms": round(got.p99_ms, 3),
                "requests": got.requests, "errors": got.errors, **w.values()}

    return run


# --------------------------------------------------------------------------- latency


def _latency(ctx: Ctx, pair: Pair) -> Values:
    s = ctx.settings
    load.connect_latencies(pair.entry_port, s.latency_warmup)
    with Window(pair) as w:
        times = load.connect_latencies(pair.entry_port, s.latency_n)
    ms = sorted(t * 1e3 for t in times)
    return {"p50_ms": round(_percentile(ms, 50), 3), "p90_ms": round(_percentile(ms, 90), 3),
            "p99_ms": round(_percentile(ms, 99), 3), "mean_ms": round(statistics.fmean(ms), 3),
            "cpu_us_per_conn": _per(w.total, len(ms), 1e6), "connections": len(ms),
            **w.values()}


def _percentile(sorted_values: list[float], pct: float) -> float:
    """Nearest-rank percentile of an already sorted list."""
    rank = max(1, round(pct / 100 * len(sorted_values)))
    return sorted_values[min(rank, len(sorted_values)) - 1]


# --------------------------------------------------------------------------- idle


def _idle(size: str) -> Callable[[Ctx, Pair], Values]:
    def run(ctx: Ctx, pair: Pair) -> Values:
        s = ctx.settings
        n = s.idle_small if size == "small" else s.idle_large
        asyncio.run(load.hold_idle(pair.entry_port, 20, lambda: None))  # warm-up
        time.sleep(s.idle_settle_s)
        before = {role: rss_bytes([sid]) for role, sid in pair.roles.items()}
        pss_before = pss_bytes(pair.sids)
        held: dict[str, int] = {}

        def measure() -> None:
            time.sleep(s.idle_settle_s)
            held.update({role: rss_bytes([sid]) for role, sid in pair.roles.items()})

        with Window(pair) as w:
            setup = asyncio.run(load.hold_idle(pair.entry_port, n, measure))
        out: Values = {"connections": n, "setup_s": round(setup, 3)}
        for role in pair.roles:
            out[f"kib_per_conn_{role}"] = round((held[role] - before[role]) / 1024 / n, 2)
        out["kib_per_conn"] = round((sum(held.values()) - sum(before.values())) / 1024 / n, 2)
        out["rss_before_mib"] = round(sum(before.values()) / 2**20, 1)
        out["pss_before_mib"] = round(pss_before / 2**20, 1)
        out["rss_held_mib"] = round(sum(held.values()) / 2**20, 1)
        out["cpu_us_per_conn"] = _per(w.total, n, 1e6)
        return {**out, **w.values()}

    return run


# --------------------------------------------------------------------------- the list

GBITS = Metric("gbit_per_s", "throughput", "Gbit/s", "higher", ratio_target=1.0)
CPU_GB = Metric("cpu_s_per_gb", "CPU per GB", "CPU s/GB", "lower", ratio_target=1.0)
IDLE_METRICS = (
    Metric("kib_per_conn", "memory per idle connection (pair)", "KiB/conn", "lower",
           absolute_max=10.0),
    Metric("kib_per_conn_outbound", "outbound sidecar alone", "KiB/conn", "lower",
           short="outbound"),
    Metric("kib_per_conn_inbound", "inbound sidecar alone", "KiB/conn", "lower",
           short="inbound"),
    Metric("pss_before_mib", "memory of the pair at rest (PSS)", "MiB", "lower",
           short="at rest"),
)

WORKLOADS: tuple[Workload, ...] = (
    Workload("bulk-1", "bulk throughput, 1 stream", ("iperf3",), "iperf3", (GBITS, CPU_GB),
             _bulk(1), params=lambda s: {"streams": 1, "seconds": s.bulk_seconds,
                                         "warmup": s.bulk_warmup}),
    Workload("bulk-8", "bulk throughput, 8 streams", ("iperf3",), "iperf3", (GBITS, CPU_GB),
             _bulk(8), params=lambda s: {"streams": 8, "seconds": s.bulk_seconds,
                                         "warmup": s.bulk_warmup}),
    Workload("keepalive", "keep-alive requests, 32 connections", ("wrk",), "http",
             (Metric("req_per_s", "requests/s", "req/s", "higher", ratio_target=1.0),
              Metric("cpu_us_per_req", "CPU per request", "CPU µs/req", "lower",
                     ratio_target=1.0),
              Metric("p99_ms", "p99 latency", "ms", "lower", short="p99")),
             _wrk(close=False),
             params=lambda s: {"connections": s.wrk_connections, "threads": s.wrk_threads,
                               "seconds": s.wrk_seconds, "warmup_s": s.wrk_warmup_seconds}),
    Workload("newconn", "new connections (Connection: close), 32 at a time", ("wrk",), "http",
             (Metric("conn_per_s", "new connections/s", "conn/s", "higher", ratio_target=1.0),
              Metric("cpu_us_per_conn", "CPU per new connection", "CPU µs/conn", "lower",
                     ratio_target=1.0),
              Metric("p99_ms", "p99 latency under load", "ms", "lower", short="p99")),
             _wrk(close=True),
             params=lambda s: {"connections": s.wrk_connections, "threads": s.wrk_threads,
                               "seconds": s.wrk_seconds, "warmup_s": s.wrk_warmup_seconds}),
    Workload("latency", "handshake latency, sequential new connections", (), "http",
             (Metric("p50_ms", "p50 connect to first byte", "ms", "lower", short="p50"),
              Metric("p99_ms", "p99 connect to first byte", "ms", "lower", short="p99"),
              Metric("cpu_us_per_conn", "CPU per connection", "CPU µs/conn", "lower")),
             _latency, params=lambda s: {"connections": s.latency_n,
                                         "warmup": s.latency_warmup}),
    Workload("idle-small", "idle connections held (small N)", (), "http", IDLE_METRICS,
             _idle("small"), proxies_only=True,
             params=lambda s: {"connections": s.idle_small, "settle_s": s.idle_settle_s}),
    Workload("idle-large", "idle connections held (large N)", (), "http", IDLE_METRICS,
             _idle("large"), proxies_only=True,
             params=lambda s: {"connections": s.idle_large, "settle_s": s.idle_settle_s,
                               **({"note": s.idle_note} if s.idle_note else {})}),
)
BY_NAME = {w.name: w for w in WORKLOADS}


def measure(ctx: Ctx, workload: Workload, contestant: Contestant) -> Values:
    """Start the backend (iperf3) and a fresh pair, run the workload, stop everything."""
    iperf3 = None
    pair: Pair | None = None
    try:
        if workload.backend == "iperf3":
            port, iperf3 = start_iperf3(ctx.env)
        else:
            assert ctx.http is not None
            port = ctx.http.port
        pair = contestant.start(ctx.env, port)
        ctx.d = ctx.env.workdir(f"{workload.name}-{contestant.name}")
        values = workload.run(ctx, pair)
        _check_alive(ctx.env, pair)
        if pair.inbound_port and workload.backend == "http" and pair.contestant not in ctx.tls_seen:
            ctx.tls_seen[pair.contestant] = load.tls_probe(ctx.env.pki, pair.inbound_port)
        return values
    finally:
        if pair is not None:
            stop_pair(ctx.env, pair)
        if iperf3 is not None:
            ctx.env.procs.stop(iperf3)


def _check_alive(env: Env, pair: Pair) -> None:
    for proc in pair.procs:
        if proc.poll() is not None:
            tail = log_tail(env.procs.log_of(proc), 5)
            raise load.MeasureError(f"{pair.contestant} exited with code {proc.returncode} "
                                    f"during the measurement: {tail}")
