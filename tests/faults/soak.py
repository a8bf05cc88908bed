"""``make soak``: a sustained mixed workload through a sidecar pair, watched for leaks.

Runs an outbound sidecar (plaintext in, mTLS out) and an inbound one (mTLS in, to an echo
app) as real ``enforcer run`` processes on loopback, and drives, all at once for the whole
run:

- requests: new connections with 1-16 KiB each way (8 at a time);
- bulk: 4 MiB streams each way (2 at a time);
- long-lived: 16 connections that send a small message every second and are replaced
  after 30 s;

every exchange checked by sha256. Every ``SAMPLE`` seconds it reads both processes'
RSS and descriptor count. It fails on any lost or altered byte or failed connection, on
RSS growth over ``--rss-limit`` % (default 10) between the end of the warm-up (the first
``--warmup`` share of the run) and the end, on more descriptors once the workload has
stopped than before it started, or when the outbound sidecar's byte counters disagree
with what the clients sent and received. Prints a one-screen summary; exit 0 = passed.

Usage: ``make soak [SOAK_SECONDS=600]`` or ``python -m tests.faults.soak --seconds N
[--requests 8 --bulk 2 --long-lived 16]``. The sidecars inherit the environment
(``ENFORCER_TLS_RECORDS=openssl`` makes OpenSSL keep every TLS end, for comparison).
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import os
import random
import socket
import statistics
import sys
import tempfile
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

import uvloop
from prometheus_client.parser import text_string_to_metric_families

from enforcer.tlsconf.certs import DEMO_CLIENT_ID, init_demo_pki
from tests.e2e.harness import inbound_cfg, outbound_cfg
from tests.e2e.proc import EchoServer, EnforcerProcess, write_config

SAMPLE = 5.0
CHUNK = 64 * 1024


@dataclass
class Tally:
    connections: dict[str, int] = field(default_factory=lambda: {"request": 0, "bulk": 0,
                                                                 "long": 0})
    sent: int = 0
    received: int = 0
    mismatches: int = 0
    failures: list[str] = field(default_factory=list)


@dataclass
class Sample:
    at: float
    rss: dict[str, int]
    fds: dict[str, int]


def _rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


def _fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


async def _talk(port: int, payload: bytes, tally: Tally, kind: str) -> None:
    """One connection: send ``payload`` while reading, half-close, check the echo."""
    try:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
    except OSError as exc:
        tally.failures.append(f"{kind}: connect: {exc}")
        return
    digest = hashlib.sha256()
    got = 0

    async def send() -> None:
        for i in range(0, len(payload), CHUNK):
            writer.write(payload[i:i + CHUNK])
            await writer.drain()
        writer.write_eof()

    try:
        sender = asyncio.ensure_future(send())
        async with asyncio.timeout(120):
            while data := await reader.read(CHUNK):
                digest.update(data)
                got += len(data)
            await sender
    except (OSError, TimeoutError) as exc:
        tally.failures.append(f"{kind}: {exc!r}")
    finally:
        writer.close()
    tally.connections[kind] += 1
    tally.sent += len(payload)
    tally.received += got
    if digest.hexdigest() != hashlib.sha256(payload).hexdigest():
        tally.mismatches += 1


async def _requests(port: int, tally: Tally, stop: asyncio.Event, rng: random.Random) -> None:
    while not stop.is_set():
        await _talk(port, rng.randbytes(rng.randint(1024, 16 * 1024)), tally, "request")


async def _bulk(port: int, tally: Tally, stop: asyncio.Event, rng: random.Random) -> None:
    while not stop.is_set():
        await _talk(port, rng.randbytes(4 * 1024 * 1024), tally, "bulk")


async def _long_lived(port: int, tally: Tally, stop: asyncio.Event, rng: random.Random) -> None:
    while not stop.is_set():
        try:
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
        except OSError as exc:
            tally.failures.append(f"long: connect: {exc}")
            await asyncio.sleep(1)
            continue
        try:
            ends = time.monotonic() + 30
            while not stop.is_set() and time.monotonic() < ends:
                message = rng.randbytes(rng.randint(16, 512))
                writer.write(message)
                got = await asyncio.wait_for(reader.readexactly(len(message)), 30)
                tally.sent += len(message)
                tally.received += len(got)
                if got != message:
                    tally.mismatches += 1
                await asyncio.sleep(1.0)
            writer.write_eof()
            if await asyncio.wait_for(reader.read(), 30) != b"":
                tally.mismatches += 1
            tally.connections["long"] += 1
        except (OSError, asyncio.IncompleteReadError, TimeoutError) as exc:
            tally.failures.append(f"long: {exc!r}")
        finally:
            writer.close()


def _counter(text: str, name: str, labels: dict[str, str]) -> float:
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()):
                return float(s.value)
    return 0.0


class Pair:
    """The two sidecars and the app, in a temp dir."""

    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp
        pki = init_demo_pki(tmp / "pki")
        self.echo = EchoServer()
        rules = [{"name": "mesh", "action": "allow",
                  "from": {"identities": [DEMO_CLIENT_ID]}}]
        logs = {"sink": f"file:{tmp / 'flows-in.log'}", "max_bytes": 10_000_000, "backups": 2}
        icfg = inbound_cfg(pki, self.echo.port, rules=rules)
        icfg["flow_log"] = logs
        self.inbound = EnforcerProcess(write_config(tmp / "in.yaml", icfg))
        in_port = self.inbound.wait_bound()["inbound"]
        ocfg = outbound_cfg(pki, in_port)
        ocfg["flow_log"] = {**logs, "sink": f"file:{tmp / 'flows-out.log'}"}
        self.admin = _free_port()
        ocfg["admin"] = {"listen": f"127.0.0.1:{self.admin}"}
        self.outbound = EnforcerProcess(write_config(tmp / "out.yaml", ocfg))
        self.port = self.outbound.wait_bound()["outbound"]
        self.pids = {"outbound": self.outbound.proc.pid, "inbound": self.inbound.proc.pid}

    def abnormal_closes(self) -> dict[str, list[str]]:
        """Per sidecar, the flow records that did not end with a FIN from either side."""
        out: dict[str, list[str]] = {}
        for name in ("in", "out"):
            bad = []
            for path in sorted(self.tmp.glob(f"flows-{name}.log*")):
                for line in path.read_text().splitlines():
                    rec = json.loads(line)
                    if rec.get("close") not in ("client_fin", "upstream_fin"):
                        bad.append(f"{rec.get('close')} ({rec.get('detail')}; bytes "
                                   f"{rec.get('bytes')}, {rec.get('duration_s')} s)")
            out[f"{name}bound"] = bad
        return out

    def sample(self, at: float) -> Sample:
        return Sample(at, {k: _rss_kib(p) for k, p in self.pids.items()},
                      {k: _fds(p) for k, p in self.pids.items()})

    def metrics(self) -> str:
        with urllib.request.urlopen(f"http://127.0.0.1:{self.admin}/metrics", timeout=5) as r:
            return r.read().decode()

    def close(self) -> None:
        for proc in (self.outbound, self.inbound):
            proc.stop()
        self.echo.close()


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@dataclass
class Mix:
    """How many clients of each kind run at once."""

    requests: int = 8
    bulk: int = 2
    long_lived: int = 16


async def soak(seconds: float, warmup: float, rss_limit: float,
               mix: Mix | None = None) -> tuple[bool, list[str]]:
    with tempfile.TemporaryDirectory(prefix="enforcer-soak-") as tmp:
        pair = Pair(Path(tmp))
        try:
            return await _run(pair, seconds, warmup, rss_limit, mix or Mix())
        finally:
            pair.close()


async def _wait_quiet(pair: Pair, target: dict[str, int], timeout: float = 15) -> Sample:
    deadline = time.monotonic() + timeout
    while True:
        s = pair.sample(0)
        if all(s.fds[k] <= target[k] for k in target) or time.monotonic() > deadline:
            return s
        await asyncio.sleep(0.2)


async def _run(pair: Pair, seconds: float, warmup: float, rss_limit: float,
               mix: Mix) -> tuple[bool, list[str]]:
    tally = Tally()
    stop = asyncio.Event()
    rng = random.Random(23)
    # a first few connections open what stays open (flow-log files, the admin socket)
    for size in (1024, 4 * 1024 * 1024):
        await _talk(pair.port, rng.randbytes(size), tally, "request")
    await asyncio.sleep(1.0)
    idle = pair.sample(0)
    started = time.monotonic()
    tasks = [asyncio.ensure_future(_requests(pair.port, tally, stop, random.Random(rng.random())))
             for _ in range(mix.requests)]
    tasks += [asyncio.ensure_future(_bulk(pair.port, tally, stop, random.Random(rng.random())))
              for _ in range(mix.bulk)]
    tasks += [asyncio.ensure_future(_long_lived(pair.port, tally, stop,
                                                random.Random(rng.random())))
              for _ in range(mix.long_lived)]
    samples: list[Sample] = []
    while (elapsed := time.monotonic() - started) < seconds:
        await asyncio.sleep(min(SAMPLE, seconds - elapsed))
        samples.append(pair.sample(time.monotonic() - started))
    stop.set()
    await asyncio.gather(*tasks)
    ran = time.monotonic() - started
    quiet = await _wait_quiet(pair, idle.fds)
    metrics = pair.metrics()
    counted_in = _counter(metrics, "enforcer_bytes_total", {"direction": "from_client"})
    counted_out = _counter(metrics, "enforcer_bytes_total", {"direction": "to_client"})

    after_warmup = [s for s in samples if s.at >= warmup * seconds] or samples[-1:]
    lines, ok = [], True
    total = sum(tally.connections.values())
    lines.append(f"soak: {ran:.0f} s, {total} connections ({tally.connections['request']} "
                 f"requests, {tally.connections['bulk']} bulk 4 MiB, {tally.connections['long']} "
                 f"long-lived), {tally.sent / 1e6:.1f} MB sent, {tally.received / 1e6:.1f} MB "
                 "back")
    bad = tally.mismatches + len(tally.failures)
    lines.append(f"bytes: {tally.mismatches} streams altered or short, {len(tally.failures)} "
                 f"failed connections; outbound counters {counted_in:.0f}/{counted_out:.0f} "
                 f"vs clients {tally.sent}/{tally.received}")
    if bad or counted_in != tally.sent or counted_out != tally.received:
        ok = False
        lines += [f"  {f}" for f in tally.failures[:5]]
    for name, closes in pair.abnormal_closes().items():
        if closes:
            ok = False
            lines.append(f"{name}: {len(closes)} flows not ended by a FIN: " + "; ".join(closes[:3]))
    for name in pair.pids:
        base = statistics.median(s.rss[name] for s in after_warmup[:3])
        end = statistics.median(s.rss[name] for s in samples[-3:])
        growth = (end - base) / base * 100 if base else 0.0
        peak = max(s.rss[name] for s in samples)
        verdict = "ok" if growth <= rss_limit else f"FAIL (> {rss_limit:.0f}%)"
        ok = ok and growth <= rss_limit
        fd_verdict = "ok" if quiet.fds[name] <= idle.fds[name] else "FAIL (leak)"
        ok = ok and quiet.fds[name] <= idle.fds[name]
        lines.append(f"{name:8s} RSS {base / 1024:.1f} MiB after warm-up -> {end / 1024:.1f} MiB "
                     f"at the end ({growth:+.1f}%, peak {peak / 1024:.1f} MiB) {verdict}; "
                     f"fds idle {idle.fds[name]} -> {quiet.fds[name]} after the run {fd_verdict}")
    lines.append("PASSED" if ok else "FAILED")
    return ok, lines


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--seconds", type=float, default=600.0, help="how long (default 600)")
    p.add_argument("--warmup", type=float, default=0.2,
                   help="share of the run before the RSS baseline (default 0.2)")
    p.add_argument("--rss-limit", type=float, default=10.0,
                   help="allowed RSS growth after the warm-up, %% (default 10)")
    p.add_argument("--requests", type=int, default=8, help="request clients (default 8)")
    p.add_argument("--bulk", type=int, default=2, help="4 MiB stream clients (default 2)")
    p.add_argument("--long-lived", type=int, default=16,
                   help="long-lived connections (default 16)")
    args = p.parse_args(argv)
    mix = Mix(args.requests, args.bulk, args.long_lived)
    ok, lines = uvloop.run(soak(args.seconds, args.warmup, args.rss_limit, mix))
    print("\n".join(lines))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
