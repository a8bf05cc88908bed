"""Micro-benchmark: the ClientHello peek of ``tls.mode: passthrough`` listeners, per connection.

Run: python benchmarks/micro/bench_clienthello.py [--number N]
Prints operations per second (best of 5 timeit repeats) for:
- parsing an OpenSSL client's ClientHello (TLS 1.3, SNI, ALPN) arriving in one read, in two
  reads, and fragmented over three TLS records,
- the SNI route lookup (an exact name, a ``*.`` name, the default route).
This is the work a passthrough connection adds before its upstream connect; the relay
after it is the plain-TCP relay of ``tls.mode: off``.
"""

from __future__ import annotations

import argparse
import contextlib
import ssl
import struct
import sys
import timeit
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # run from a checkout

from enforcer.config.model import SniRouteConfig
from enforcer.config.passthrough import SniRouter
from enforcer.dataplane.clienthello import HelloParser


def openssl_hello(sni: str) -> bytes:
    """An OpenSSL client's first flight (no socket: memory BIOs)."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    ctx.set_alpn_protocols(["h2", "http/1.1"])
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    obj = ctx.wrap_bio(incoming, outgoing, server_hostname=sni)
    with contextlib.suppress(ssl.SSLWantReadError):
        obj.do_handshake()
    return outgoing.read()


def in_records(first_flight: bytes, parts: int) -> bytes:
    message = first_flight[5:]
    size = -(-len(message) // parts)
    return b"".join(struct.pack("!BHH", 0x16, 0x0301, len(message[i:i + size]))
                    + message[i:i + size] for i in range(0, len(message), size))


def parse(pieces: list[bytes]) -> Callable[[], object]:
    def run() -> object:
        parser = HelloParser()
        hello = None
        for piece in pieces:
            hello = parser.feed(piece)
        assert hello is not None
        return hello

    return run


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--number", type=int, default=20000, help="calls per repeat")
    args = ap.parse_args(argv)
    hello = openssl_hello("shop.apps.example.com")
    router = SniRouter((SniRouteConfig(("api.example.com",), "api"),
                        SniRouteConfig(("*.apps.example.com",), "apps")),
                       {"api": "api", "apps": "apps"}, "fallback")
    cases: list[tuple[str, Callable[[], object]]] = [
        (f"parse ClientHello, 1 read ({len(hello)} B)", parse([hello])),
        ("parse ClientHello, 2 reads", parse([hello[:100], hello[100:]])),
        ("parse ClientHello, 3 records", parse([in_records(hello, 3)])),
        ("route exact name", lambda: router.route("api.example.com")),
        ("route *. name", lambda: router.route("shop.apps.example.com")),
        ("route default", lambda: router.route("other.example.org")),
    ]
    print(f"{'case':44} {'ops/s':>12} {'us/op':>8}")
    for name, fn in cases:
        fn()  # warm up, and fail loudly if broken
        best = min(timeit.repeat(fn, number=args.number, repeat=5))
        per_op = best / args.number
        print(f"{name:44} {1 / per_op:12,.0f} {per_op * 1e6:8.2f}")


if __name__ == "__main__":
    main()
