"""Micro-benchmark: what reading the negotiated key-exchange group costs per handshake.

Run: python benchmarks/micro/bench_tls_groups.py [--number N]
Two ``TlsEngine``s handshake in memory (ECDSA P-256 mutual TLS 1.3, as between two
enforcers); the flow record's ``tls.group`` is read once per side through
``tlsconf.groups`` (ctypes into the ssl module's libssl, pointers verified each call).
Prints the rate of a bare group read on a finished handshake, and a full handshake of both
sides without and with the read on each side, so the read is seen against what it adds to.
"""

from __future__ import annotations

import argparse
import importlib.util
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # run from a checkout

from benchmarks.pki import make_pki
from enforcer.tlsconf import groups


def _engine_bench() -> Any:
    """The TLS engine micro-benchmark beside this file, for its in-memory handshake."""
    spec = importlib.util.spec_from_file_location(
        "bench_tls_engine", Path(__file__).with_name("bench_tls_engine.py"))
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def rate(label: str, number: int, fn: object) -> None:
    assert callable(fn)
    started = time.perf_counter()
    for _ in range(number):
        fn()
    seconds = time.perf_counter() - started
    print(f"{label:<48} {number / seconds:>10,.0f} ops/s  ({seconds / number * 1e6:,.1f} us each)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--number", type=int, default=20000)
    args = parser.parse_args()
    if groups.binding() is None:
        print(f"group reads unavailable here: {groups.unavailable_reason()}")
        return
    bench = _engine_bench()
    connect = bench.connect
    with tempfile.TemporaryDirectory() as tmp:
        sctx, cctx = bench.contexts(make_pki(Path(tmp)))
    server, _client = connect(sctx, cctx)
    state = server.state
    assert groups.negotiated(state) is not None
    handshakes = max(20, args.number // 40)

    def both_sides_read() -> None:
        s, c = connect(sctx, cctx)
        groups.negotiated(s.state)
        groups.negotiated(c.state)

    rate("negotiated group read (one side)", args.number, lambda: groups.negotiated(state))
    rate("full mTLS handshake, both sides", handshakes, lambda: connect(sctx, cctx))
    rate("full mTLS handshake + group read on each side", handshakes, both_sides_read)


if __name__ == "__main__":
    main()
