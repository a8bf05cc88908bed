"""Micro-benchmark: what one TLS connection costs inside Python's ssl, without sockets.

Run: python benchmarks/micro/bench_tls_engine.py [--number N]
Two ``TlsEngine``s (enforcer's SSLObject-over-memory-BIO engine) handshake with each
other in memory, ECDSA P-256 mutual TLS 1.3 as between two enforcers. Prints:
- handshakes per second for a full and a resumed handshake (both sides' CPU);
- setting up the client engine with and without a session to resume: CPython copies the
  session by encoding and decoding it (which parses the server certificate again), and
  that copy is a large part of a resumed connection's cost on the outbound;
- malloc'd memory held per idle engine after the handshake and after a 1 MiB burst each
  way (glibc only): OpenSSL's own per-connection floor, before any proxy state.
"""

from __future__ import annotations

import argparse
import ctypes
import ctypes.util
import gc
import ssl
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # run from a checkout

from benchmarks.pki import BenchPki, make_pki
from enforcer.dataplane.tlsengine import READ_CHUNK, TlsEngine

MiB = 1024 * 1024


def contexts(pki: BenchPki) -> tuple[ssl.SSLContext, ssl.SSLContext]:
    server = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server.load_cert_chain(str(pki.server_cert), str(pki.server_key))
    server.load_verify_locations(str(pki.ca))
    server.verify_mode = ssl.CERT_REQUIRED
    server.num_tickets = 1
    client = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    client.load_cert_chain(str(pki.client_cert), str(pki.client_key))
    client.load_verify_locations(str(pki.ca))
    client.check_hostname = False
    return server, client


def connect(sctx: ssl.SSLContext, cctx: ssl.SSLContext,
            session: ssl.SSLSession | None = None) -> tuple[TlsEngine, TlsEngine]:
    server = TlsEngine(sctx, server_side=True)
    client = TlsEngine(cctx, server_side=False, server_hostname="localhost", session=session)
    for _ in range(10):
        done_c = client.handshake()
        server.feed(client.take_output())
        done_s = server.handshake()
        client.feed(server.take_output())
        if done_c and done_s:
            # one exchange each way, so the ticket is read and the idle state is the
            # relay's (buffers released)
            client.feed(b"".join(server.encrypt(b"x")))
            drain(client)
            server.feed(b"".join(client.encrypt(b"y")))
            drain(server)
            return server, client
    raise RuntimeError("handshake did not finish")


def drain(engine: TlsEngine) -> int:
    total = 0
    while True:
        view, _ = engine.read()
        total += len(view) if view is not None else 0
        if view is None or len(view) < READ_CHUNK:
            return total


def rate(label: str, number: int, fn: object) -> None:
    assert callable(fn)
    started = time.perf_counter()
    for _ in range(number):
        fn()
    seconds = time.perf_counter() - started
    print(f"{label:<48} {number / seconds:>10,.0f} ops/s  ({seconds / number * 1e6:,.0f} us each)")


def malloc_in_use() -> int | None:
    class MallInfo2(ctypes.Structure):
        _fields_ = [(name, ctypes.c_size_t) for name in (
            "arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks",
            "uordblks", "fordblks", "keepcost")]

    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c"))
        libc.mallinfo2.restype = MallInfo2
        info = libc.mallinfo2()
    except (AttributeError, OSError, TypeError):
        return None
    return int(info.uordblks + info.hblkhd)


def held_per_engine(sctx: ssl.SSLContext, cctx: ssl.SSLContext, n: int, burst: bool) -> None:
    keep = [connect(sctx, cctx) for _ in range(5)]
    gc.collect()
    before = malloc_in_use()
    if before is None:
        print("memory: needs glibc's mallinfo2 (skipped)")
        return
    payload = bytes(MiB)
    for _ in range(n):
        server, client = connect(sctx, cctx)
        if burst:
            for src, dst in ((client, server), (server, client)):
                for chunk in src.encrypt(payload):
                    dst.feed(chunk)
                    drain(dst)
        keep.append((server, client))
    gc.collect()
    after = malloc_in_use()
    assert after is not None
    what = "after a 1 MiB burst each way" if burst else "after the handshake"
    print(f"memory held per idle engine {what}: {(after - before) / n / 2 / 1024:.1f} KiB")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--number", type=int, default=2000)
    args = parser.parse_args()
    handshakes = max(20, args.number // 20)
    with tempfile.TemporaryDirectory() as tmp:
        sctx, cctx = contexts(make_pki(Path(tmp)))
    _, client = connect(sctx, cctx)
    session = client.session
    assert session is not None and session.has_ticket
    rate("full mTLS handshake, both sides", handshakes, lambda: connect(sctx, cctx))
    rate("resumed handshake, both sides", handshakes, lambda: connect(sctx, cctx, session))
    rate("client engine, new session", args.number,
         lambda: TlsEngine(cctx, server_side=False, server_hostname="localhost"))
    rate("client engine, resuming (CPython copies it)", args.number,
         lambda: TlsEngine(cctx, server_side=False, server_hostname="localhost",
                           session=session))
    held_per_engine(sctx, cctx, max(20, args.number // 40), burst=False)
    held_per_engine(sctx, cctx, max(20, args.number // 40), burst=True)


if __name__ == "__main__":
    main()
