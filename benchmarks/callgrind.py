"""Instructions per new connection, counted by callgrind: ``python -m benchmarks.callgrind``.

The harness's CPU figures move by 10-20% between runs on a shared machine; instruction
counts do not. This starts the benchmark's enforcer sidecar pair (the same configs, the
same ECDSA P-256 mTLS, one process each) with each sidecar under
``valgrind --tool=callgrind``, makes ``--warmup`` new connections (the first full
handshake, tickets, caches, the interpreter's specialisation), zeroes both processes'
counters (``callgrind_control -z``), counts an idle ``--idle`` window (the
once-a-second housekeeping, whose share grows with the wall time callgrind takes on a busy
machine), zeroes again, makes ``--connections`` more, one at a time, each a
plain HTTP request with ``Connection: close`` through outbound → inbound → backend (the
harness's newconn workload, sequential), dumps the counters (``callgrind_control -d``)
and prints the instructions per connection of each sidecar and of the pair, with the
idle window's rate times the measured window's length subtracted. Every response is
checked against the backend's body.

The counts include everything the processes did in the measured window, every thread (the
flow-record writer too). The dumps stay in ``--out`` for
``callgrind_annotate`` (``--inclusive=yes``) to see where the instructions go.
"""

from __future__ import annotations

import argparse
import re
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from benchmarks.backends import body, request, start_http
from benchmarks.contestants import Enforcer, Env, Pair, stop_pair
from benchmarks.pki import make_pki
from benchmarks.procs import Ports, Processes, wait_listening

VALGRIND = ["valgrind", "--tool=callgrind", "--dump-instr=no", "--collect-systime=no"]


class Callgrinded(Enforcer):
    """The benchmark's enforcer pair, each sidecar under callgrind."""

    def __init__(self, out: Path) -> None:
        super().__init__()
        self.out = out

    def start(self, env: Env, backend_port: int) -> Pair:
        d = env.workdir(self.name)
        out_port, in_port = env.ports.take(), env.ports.take()
        pair = Pair(self.name, out_port, inbound_port=in_port)
        for role, config in (("inbound", self.inbound_config(env, d, in_port, backend_port)),
                             ("outbound", self.outbound_config(env, d, out_port, in_port))):
            proc = self.spawn_role(env, d, role, config)
            pair.procs.append(proc)
            pair.roles[role] = proc.pid
        # an interpreter under callgrind starts some 50 times slower
        wait_listening([in_port, out_port], pair.procs, env.procs, "callgrind pair", 600)
        return pair

    def command(self, config: Path, d: Path, role: str) -> list[str]:
        dump = self.out / f"callgrind.{role}.%p"
        return [*VALGRIND, f"--callgrind-out-file={dump}", *super().command(config, d, role)]


def one_connection(port: int, want: bytes) -> None:
    with socket.create_connection(("127.0.0.1", port), timeout=60) as s:
        s.sendall(request(close=True))
        got = b""
        while chunk := s.recv(65536):
            got += chunk
    if not got.startswith(b"HTTP/1.1 200 ") or not got.endswith(want):
        raise SystemExit(f"bad response through the pair: {got[:200]!r}")


def control(*args: str) -> None:
    subprocess.run(["callgrind_control", *args], check=True, capture_output=True, timeout=300)


def totals(out: Path, pid: int) -> int:
    """Instructions in the last dump of process ``pid`` (after the zeroing)."""
    dumps = sorted(out.glob(f"callgrind.*.{pid}.*"), key=lambda p: int(p.name.rsplit(".", 1)[1]))
    text = dumps[-1].read_text(errors="replace")
    match = re.search(r"^(?:summary|totals): (\d+)", text, re.M)
    if match is None:
        raise SystemExit(f"no totals in {dumps[-1]}")
    return int(match.group(1))


def measure(pids: dict[str, int], out: Path, run: Callable[[], object]
            ) -> tuple[dict[str, int], float]:
    """Instructions of each process while ``run`` runs, and how long it took (s)."""
    for pid in pids.values():
        control("-z", str(pid))
    start = time.monotonic()
    run()
    seconds = time.monotonic() - start
    for pid in pids.values():
        control("-d", str(pid))
    return {role: totals(out, pid) for role, pid in pids.items()}, seconds


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--connections", type=int, default=100)
    ap.add_argument("--warmup", type=int, default=20)
    ap.add_argument("--idle", type=float, default=10.0,
                    help="seconds of the idle window that measures the housekeeping")
    ap.add_argument("--out", type=Path, default=None, help="where the dumps go")
    args = ap.parse_args()
    if shutil.which("valgrind") is None or shutil.which("callgrind_control") is None:
        raise SystemExit("valgrind is not installed (apt-get install valgrind)")
    tmp = Path(tempfile.mkdtemp(prefix="enforcer-callgrind-"))
    out = args.out or tmp / "dumps"
    out.mkdir(parents=True, exist_ok=True)
    env = Env(tmp=tmp, pki=make_pki(tmp / "pki"), procs=Processes(), ports=Ports())
    backend = start_http(env)
    pair = Callgrinded(out).start(env, backend.port)
    want = body()
    n = args.connections
    try:
        for _ in range(args.warmup):
            one_connection(pair.entry_port, want)
        idle, idle_s = measure(pair.roles, out, lambda: time.sleep(args.idle))

        def connections() -> None:
            for _ in range(n):
                one_connection(pair.entry_port, want)

        counts, busy_s = measure(pair.roles, out, connections)
        net = {role: counts[role] - idle[role] * busy_s / idle_s for role in counts}
        print(f"{n} connections in {busy_s:.1f} s; housekeeping "
              f"{sum(idle.values()) / idle_s:,.0f} instructions/s (pair), subtracted")
        for role in counts:
            print(f"{role:9} {net[role] / n:12,.0f} instructions per connection "
                  f"({counts[role] / n:,.0f} raw)")
        print(f"{'pair':9} {sum(net.values()) / n:12,.0f} instructions per connection "
              f"({sum(counts.values()) / n:,.0f} raw)")
        print(f"dumps in {out} (callgrind_annotate --inclusive=yes FILE)")
    finally:
        stop_pair(env, pair)
        env.procs.stop_all()


if __name__ == "__main__":
    main()
