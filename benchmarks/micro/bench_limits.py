"""Micro-benchmark: what a rule's ``limits`` add per connection (policy.limits).

Run: python benchmarks/micro/bench_limits.py [--number N]
Prints operations per second (best of 5 timeit repeats) of one admitted connection's work
in the limiter: the key (per identity, per client /24, per listener), ``admit`` with a
concurrency limit and a token bucket, and the lease's ``release`` at close; over one hot
key and over 10,000 distinct client networks (a table that must be swept). The data
plane adds one dict insert and one pop per connection (``dataplane.limitgate``).
"""

from __future__ import annotations

import argparse
import datetime as dt
import ipaddress
import itertools
import sys
import timeit
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # run from a checkout

from enforcer.config.rulesets import LimitsConfig
from enforcer.policy.limits import Lease, Limiter, limit_key
from enforcer.tlsconf.identity import PeerIdentity

IDENT = PeerIdentity("spiffe://cluster.local/ns/shop/sa/frontend", "cluster.local",
                     "/ns/shop/sa/frontend", (), (), (), None, (), (), None, "1",
                     dt.datetime(2030, 1, 1, tzinfo=dt.UTC), "PIN")


def one_connection(limiter: Limiter, limits: LimitsConfig,
                   addrs: itertools.cycle[ipaddress.IPv4Address], clock: list[float]) -> None:
    clock[0] += 0.001
    key = limit_key(limits, "inbound", next(addrs), IDENT)
    lease = limiter.admit("inbound", "rule", limits, key, clock[0])
    assert isinstance(lease, Lease)
    lease.release()


def rate(fn: Callable[[], object], number: int) -> float:
    return number / min(timeit.repeat(fn, number=number, repeat=5))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--number", type=int, default=100000)
    args = parser.parse_args(argv)
    one = [ipaddress.IPv4Address("203.0.113.7")]
    many = [ipaddress.IPv4Address(0x0A000000 + (i << 8)) for i in range(10000)]
    cases = [
        ("per identity, max_connections + rate", "identity", one),
        ("per client /24, one network", "client", one),
        ("per client /24, 10,000 networks", "client", many),
        ("per listener", "listener", one),
    ]
    for name, per, addrs in cases:
        limits = LimitsConfig(per, max_connections=1000, rate=1e9, burst=1000000,  # type: ignore[arg-type]
                              ipv4_prefix=24 if per == "client" else 32)
        limiter = Limiter()
        clock = [0.0]

        cycle = itertools.cycle(addrs)

        def run(lim: LimitsConfig = limits, lt: Limiter = limiter, c: list[float] = clock,
                cyc: itertools.cycle[ipaddress.IPv4Address] = cycle) -> None:
            one_connection(lt, lim, cyc, c)

        ops = rate(run, args.number)
        print(f"{name:<40} {ops:>12,.0f}/s ({1e6 / ops:>6.2f} µs per connection)")


if __name__ == "__main__":
    main()
