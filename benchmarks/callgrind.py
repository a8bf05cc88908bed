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

``--transparent`` counts the harness's ``enforcer-transparent`` pair instead
(``benchmarks/transparent.py``, whose start, configs, rules and uids are used as they
are): the run re-executes itself in a private network namespace as ``--netns`` does
(root), the sidecars run as uids 1337/1338 (``setpriv``, then valgrind) with
``transparent: true`` listeners and ``address: original_destination``, and the nftables
redirects are loaded. Each connection dials the backend's own address, as the harness's
transparent workload does; the rules send it to the outbound sidecar, and the outbound
sidecar's connection to the inbound one. The dump directory is made writable by those
uids, ``callgrind_control`` runs as each sidecar's uid (vgdb's FIFOs are private to
their owner), the uids must be able to read the interpreter (``sys.executable``: a
virtualenv made from a Python under ``/root`` is not), and after the window the redirect rules' counters must show every connection
redirected twice (else the count would be of connections that went straight to the
backend). ``--nathooks`` counts the control, ``enforcer-nathooks``: the explicit pair
in the namespace while the same rules are loaded for a port nobody dials (their counters
must stay at zero). ``--netns`` runs the explicit pair in such a namespace without rules.
The kernel's NAT and conntrack work is not in these counts (user space only): what they
show is what interception adds to the sidecars themselves, reading
``SO_ORIGINAL_DST`` and routing to it.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from benchmarks import transparent
from benchmarks.backends import body, request, start_http
from benchmarks.contestants import Enforcer, Env, Pair, stop_pair
from benchmarks.pki import make_pki
from benchmarks.procs import Ports, Processes, StartError

VALGRIND = ["valgrind", "--tool=callgrind", "--dump-instr=no", "--collect-systime=no"]


class Callgrinded(Enforcer):
    """The benchmark's enforcer pair, each sidecar under callgrind."""

    start_timeout = 600.0  # an interpreter under callgrind starts some 50 times slower

    def __init__(self, out: Path) -> None:
        super().__init__()
        self.out = out

    def command(self, config: Path, d: Path, role: str) -> list[str]:
        dump = self.out / f"callgrind.{role}.%p"
        return [*VALGRIND, f"--callgrind-out-file={dump}", *super().command(config, d, role)]


class CallgrindedTransparent(Callgrinded, transparent.TransparentEnforcer):
    """``enforcer-transparent`` (redirect rules, uids 1337/1338), each sidecar under
    callgrind (valgrind runs inside ``setpriv``, so as the sidecar's uid)."""


class CallgrindedNatHooks(Callgrinded, transparent.NatHooksEnforcer):
    """``enforcer-nathooks`` (the explicit pair, the rules loaded for an unused port),
    each sidecar under callgrind."""


def pick(args: argparse.Namespace, out: Path) -> Callgrinded:
    if args.transparent:
        return CallgrindedTransparent(out)
    if args.nathooks:
        return CallgrindedNatHooks(out)
    return Callgrinded(out)


def check_redirects(args: argparse.Namespace, connections: int) -> None:
    """The rules did what the mode says: every connection redirected twice (outbound's
    to the inbound sidecar, the load tool's to the outbound one), or none at all."""
    if args.transparent:
        counters = transparent.redirected()
        if len(counters) != 2 or min(counters) < connections:
            raise SystemExit(f"the redirect rules matched {counters} packets, fewer than "
                             f"the {connections} connections: they did not go through the pair")
    elif args.nathooks:
        counters = transparent.redirected(transparent.HOOKS_TABLE)
        if any(counters):
            raise SystemExit(f"the control's rules redirected {counters} connections")


def one_connection(port: int, want: bytes) -> None:
    with socket.create_connection(("127.0.0.1", port), timeout=60) as s:
        s.sendall(request(close=True))
        got = b""
        while chunk := s.recv(65536):
            got += chunk
    if not got.startswith(b"HTTP/1.1 200 ") or not got.endswith(want):
        raise SystemExit(f"bad response through the pair: {got[:200]!r}")


def control(command: str, pid: int) -> None:
    """``callgrind_control`` as the process's own uid: vgdb makes its reply FIFO
    readable by itself only, so a root vgdb would wait forever on a sidecar of uid 1337."""
    owner = os.stat(f"/proc/{pid}").st_uid
    setpriv = [] if owner == os.geteuid() else [
        "setpriv", "--reuid", str(owner), "--regid", str(owner), "--clear-groups"]
    subprocess.run([*setpriv, "callgrind_control", command, str(pid)], check=True,
                   capture_output=True, timeout=300)


def totals(out: Path, pid: int) -> int:
    """Instructions in the last dump of process ``pid`` (after the zeroing)."""
    dumps = sorted(out.glob(f"callgrind.*.{pid}.*"), key=lambda p: int(p.name.rsplit(".", 1)[1]))
    if not dumps:
        raise SystemExit(f"no callgrind dump of process {pid} in {out} (can its uid write "
                         "there?)")
    text = dumps[-1].read_text(errors="replace")
    match = re.search(r"^(?:summary|totals): (\d+)", text, re.M)
    if match is None:
        raise SystemExit(f"no totals in {dumps[-1]}")
    return int(match.group(1))


def measure(pids: dict[str, int], out: Path, run: Callable[[], object]
            ) -> tuple[dict[str, int], float]:
    """Instructions of each process while ``run`` runs, and how long it took (s)."""
    for pid in pids.values():
        control("-z", pid)
    start = time.monotonic()
    run()
    seconds = time.monotonic() - start
    for pid in pids.values():
        control("-d", pid)
    return {role: totals(out, pid) for role, pid in pids.items()}, seconds


def parse_args() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--connections", type=int, default=100)
    ap.add_argument("--warmup", type=int, default=20)
    ap.add_argument("--idle", type=float, default=10.0,
                    help="seconds of the idle window that measures the housekeeping")
    ap.add_argument("--out", type=Path, default=None, help="where the dumps go")
    mode = ap.add_mutually_exclusive_group()
    mode.add_argument("--transparent", action="store_true",
                      help="the transparent pair behind nftables redirects (root; runs in "
                           "a private network namespace)")
    mode.add_argument("--nathooks", action="store_true",
                      help="the control: the explicit pair with the redirect rules loaded "
                           "for a port nobody dials (root; private network namespace)")
    mode.add_argument("--netns", action="store_true",
                      help="the explicit pair in a private network namespace, no rules")
    return ap.parse_args()


def report(name: str, n: int, counts: dict[str, int], net: dict[str, float],
           housekeeping: float, busy_s: float) -> None:
    print(f"{name}: {n} connections in {busy_s:.1f} s; housekeeping "
          f"{housekeeping:,.0f} instructions/s (pair), subtracted")
    for role in counts:
        print(f"{role:9} {net[role] / n:12,.0f} instructions per connection "
              f"({counts[role] / n:,.0f} raw)")
    print(f"{'pair':9} {sum(net.values()) / n:12,.0f} instructions per connection "
          f"({sum(counts.values()) / n:,.0f} raw)")


def count(args: argparse.Namespace, pair: Pair, out: Path) -> None:
    want = body()
    n = args.connections
    for _ in range(args.warmup):
        one_connection(pair.entry_port, want)
    idle, idle_s = measure(pair.roles, out, lambda: time.sleep(args.idle))

    def connections() -> None:
        for _ in range(n):
            one_connection(pair.entry_port, want)

    counts, busy_s = measure(pair.roles, out, connections)
    check_redirects(args, args.warmup + n)
    net = {role: counts[role] - idle[role] * busy_s / idle_s for role in counts}
    report(pair.contestant, n, counts, net, sum(idle.values()) / idle_s, busy_s)
    print(f"dumps in {out} (callgrind_annotate --inclusive=yes FILE)")


def main() -> None:
    args = parse_args()
    if shutil.which("valgrind") is None or shutil.which("callgrind_control") is None:
        raise SystemExit("valgrind is not installed (apt-get install valgrind)")
    private = args.transparent or args.nathooks or args.netns
    if private and not transparent.in_private_netns():
        transparent.reexec_in_netns(sys.argv[1:], module="benchmarks.callgrind")
    tmp = Path(tempfile.mkdtemp(prefix="enforcer-callgrind-"))
    out = args.out or tmp / "dumps"
    out.mkdir(parents=True, exist_ok=True)
    contestant = pick(args, out)
    if reason := contestant.missing():
        raise SystemExit(f"{contestant.name}: {reason}")
    if args.transparent:
        out.chmod(0o1777)  # the sidecars' uids write their dumps there
    env = Env(tmp=tmp, pki=make_pki(tmp / "pki"), procs=Processes(), ports=Ports())
    try:
        try:
            pair = contestant.start(env, start_http(env).port)
        except StartError as exc:
            raise SystemExit(f"{contestant.name}: {exc}") from None
        try:
            count(args, pair, out)
        finally:
            stop_pair(env, pair)
    finally:
        env.procs.stop_all()


if __name__ == "__main__":
    main()
