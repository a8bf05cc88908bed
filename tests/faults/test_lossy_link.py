"""Two sidecars over a bad network: 5% loss each way, 100 ms ± 20 ms delay, reordering
and duplication; every stream must arrive byte-exact in both directions.

This kernel has no ``tc netem`` (sch_netem is not built), so the network is emulated:
host ``a`` (the client app and the outbound sidecar) and host ``b`` (the inbound sidecar
and the app) share a /24 through a middle host where ``impair.py`` delays every frame by
100 ms ± 20 ms (uniform: frames overtake each other), holds 2% back a further 50 ms and
sends 1% twice; nftables on ``a`` and ``b`` drops 5% of the packets arriving from the link
(``numgen random``). The outbound sidecar relays in Python, the inbound one with the
native pump, so both relays see the same network.

Printed: the TLS handshake p99 of the outbound sidecar (its ``side="client"`` histogram)
and the p99 time to the first echoed byte as the client app sees it (loopback connect,
the mTLS handshake across the link, one round trip of data).
"""

from __future__ import annotations

import asyncio
import json
import math
import random
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from enforcer.tlsconf.certs import DEMO_CLIENT_ID
from tests.e2e.harness import inbound_cfg, outbound_cfg
from tests.e2e.proc import write_config
from tests.faults.netns import Host, hosts
from tests.faults.peers import (
    Backend,
    NsEnforcer,
    histogram_quantile,
    http_get,
    sha,
)

pytestmark = [pytest.mark.faults]

ROOT = Path(__file__).resolve().parents[2]
LONG_STREAMS = 12
LONG_BYTES = 384 * 1024
SHORT_CONNS = 80
SHORT_CONCURRENCY = 8
LOSS_PERCENT = 5
# a SYN or SYN-ACK lost twice costs 1 s + 2 s of retransmission: the default 5 s connect
# timeout is kept away from the link's worst case (users on such links raise it too)
LIMITS = {"connect_timeout": "20s", "handshake_timeout": "30s"}


async def _exchange(host: Host, addr: tuple[str, int], payload: bytes) -> tuple[bytes, float]:
    """Send ``payload`` through the outbound sidecar and read the echo; returns what came
    back and the seconds from connect to its first byte."""
    loop = asyncio.get_running_loop()
    sock = host.socket()
    sock.setblocking(False)
    started = time.monotonic()
    await loop.sock_connect(sock, addr)
    reader, writer = await asyncio.open_connection(sock=sock)

    async def send() -> None:
        for i in range(0, len(payload), 65536):
            writer.write(payload[i:i + 65536])
            await writer.drain()
        writer.write_eof()

    sender = asyncio.ensure_future(send())
    got = bytearray()
    first = 0.0
    async with asyncio.timeout(240):
        while data := await reader.read(65536):
            if not got:
                first = time.monotonic() - started
            got += data
        await sender
    writer.close()
    return bytes(got), first


async def _workload(host: Host, addr: tuple[str, int]) -> list[tuple[str, str, float, bool]]:
    rng = random.Random(2323)
    payloads = [rng.randbytes(LONG_BYTES) for _ in range(LONG_STREAMS)]
    payloads += [rng.randbytes(rng.randint(1, 8192)) for _ in range(SHORT_CONNS)]
    gate = asyncio.Semaphore(SHORT_CONCURRENCY)

    async def one(payload: bytes, short: bool) -> tuple[str, str, float, bool]:
        if short:
            async with gate:
                got, first = await _exchange(host, addr, payload)
        else:
            got, first = await _exchange(host, addr, payload)
        return sha(payload), sha(got), first, short

    return list(await asyncio.gather(*(one(p, i >= LONG_STREAMS)
                                       for i, p in enumerate(payloads))))


def _p99(values: list[float]) -> float:
    ordered = sorted(values)
    return ordered[max(0, math.ceil(0.99 * len(ordered)) - 1)]


async def test_two_sidecars_over_a_lossy_slow_reordering_link(
        pki: Any, tmp_path: Path, faults_summary: Any) -> None:
    with hosts() as made:
        a, middle, b = made.host("a"), made.host("m"), made.host("b")
        _, addr_b, dev_a, dev_b = made.bridged(a, middle, b)
        bridge = middle.popen([sys.executable, "-m", "tests.faults.impair", dev_a, dev_b,
                               "--delay", "0.1", "--jitter", "0.02", "--dup", "1",
                               "--reorder", "2"], cwd=ROOT, stdout=subprocess.PIPE, text=True)
        procs: list[NsEnforcer] = []
        backend = Backend(b.listen("127.0.0.1"), "echo")
        try:
            assert bridge.stdout is not None and "ready" in bridge.stdout.readline()
            a.lossy(LOSS_PERCENT)
            b.lossy(LOSS_PERCENT)
            rules = [{"name": "mesh", "action": "allow", "from": {"identities": [DEMO_CLIENT_ID]}}]
            icfg = inbound_cfg(pki, backend.port, rules=rules, limits=LIMITS,
                               listener_extra={"listen": f"{addr_b}:0"})
            icfg["relay"] = "native"
            inbound = NsEnforcer(b, write_config(tmp_path / "in.yaml", icfg))
            procs.append(inbound)
            in_port = inbound.wait_bound()["inbound"]
            ocfg = outbound_cfg(pki, in_port, limits=LIMITS)
            ocfg["upstreams"]["peer"]["address"] = f"{addr_b}:{in_port}"
            ocfg["admin"] = {"listen": "127.0.0.1:0"}
            ocfg["relay"] = "python"
            outbound = NsEnforcer(a, write_config(tmp_path / "out.yaml", ocfg))
            procs.append(outbound)
            out_port = outbound.wait_bound()["outbound"]

            results = await _workload(a, ("127.0.0.1", out_port))

            broken = [r for r in results if r[0] != r[1]]
            assert not broken, f"{len(broken)} of {len(results)} streams not byte-exact"
            total = len(results)
            for proc in (outbound, inbound):
                recs = proc.wait_records(total, timeout=60)
                assert all(r["action"] == "allow" and r["close"] in ("client_fin", "upstream_fin")
                           for r in recs), [r for r in recs if r["close"] not in
                                            ("client_fin", "upstream_fin")][:3]
            lost = (a.loss_count(), b.loss_count())
            assert min(lost) > 0  # the loss did happen, both ways
            status, metrics = http_get(a, outbound.admin_port, "/metrics")
            assert status == 200
            hs_p99 = histogram_quantile(metrics, "enforcer_tls_handshake_seconds",
                                        {"side": "client"}, 0.99)
            first_p99 = _p99([r[2] for r in results if r[3]])
        finally:
            for proc in procs:
                proc.stop()
            backend.close()
            bridge.terminate()
            out, _ = bridge.communicate(timeout=10)
        stats = json.loads(out.strip().splitlines()[-1])
        assert stats["duplicated"] > 0 and stats["reordered"] > 0 and stats["overflow"] == 0
        faults_summary(f"{total} streams byte-exact both ways "
              f"({LONG_STREAMS} x {LONG_BYTES // 1024} KiB + {SHORT_CONNS} short); "
              f"packets dropped by nftables {lost[0]} into a, {lost[1]} into b; "
              f"bridge {stats}; handshake p99 {hs_p99 * 1000:.0f} ms (outbound sidecar "
              f"histogram), first echoed byte p99 {first_p99 * 1000:.0f} ms")
