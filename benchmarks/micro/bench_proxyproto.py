"""Micro-benchmark: PROXY protocol parse/build cost on the connect path.

Run: python benchmarks/micro/bench_proxyproto.py [--number N]
Prints operations per second (best of 5 timeit repeats) for:
- parsing a v2 header as an AWS NLB sends it (TCP4 + VPC endpoint TLV),
- parsing a v2 header as an enforcer gateway sends it (TCP6 + ALPN, AUTHORITY, SSL,
  UNIQUE_ID, identity, CRC32C), whole and split in two reads, with application bytes behind,
- parsing a v1 TCP4 line,
- building that v2 header, and the typed views the data plane reads.
"""

from __future__ import annotations

import argparse
import sys
import timeit
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # run from a checkout

from enforcer.proxyproto import (
    HeaderParser,
    alpn_tlv,
    authority_tlv,
    aws_vpce_tlv,
    build_v1,
    build_v2,
    identity_tlv,
    ssl_tlv,
    unique_id_tlv,
)

APP = b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03" + b"\x00" * 64  # a ClientHello start

NLB_V2 = build_v2(
    ("203.0.113.7", 51234), ("10.0.9.9", 8443), tlvs=[aws_vpce_tlv("vpce-08d2bf15fac5001c9")]
)
GATEWAY_TLVS = [
    alpn_tlv(b"h2"),
    authority_tlv("payments.shop.example.com"),
    ssl_tlv(
        version="TLSv1.3",
        cipher="TLS_AES_128_GCM_SHA256",
        cn="frontend",
        client_cert_presented=True,
        verified=True,
    ),
    unique_id_tlv("01JD3XK8Q7ZQ9V4M2N6P8R0T2W"),
    identity_tlv("spiffe://cluster.local/ns/shop/sa/frontend"),
]
GATEWAY_V2 = build_v2(
    ("2001:db8::7", 51234), ("2001:db8::9", 15006), tlvs=GATEWAY_TLVS, crc32c=True
)
GATEWAY_V2_NO_CRC = build_v2(("2001:db8::7", 51234), ("2001:db8::9", 15006), tlvs=GATEWAY_TLVS)
V1 = build_v1(("203.0.113.7", 51234), ("10.0.9.9", 8443))


def parse_whole(data: bytes) -> Callable[[], object]:
    def run() -> object:
        return HeaderParser().feed(data)

    return run


def parse_split(data: bytes, cut: int) -> Callable[[], object]:
    first, second = data[:cut], data[cut:]

    def run() -> object:
        parser = HeaderParser()
        parser.feed(first)
        return parser.feed(second)

    return run


def views(data: bytes) -> Callable[[], object]:
    header = HeaderParser().feed(data)
    assert header is not None

    def run() -> object:
        return header.tlvs_for_record(), header.tlvs_for_policy()

    return run


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--number", type=int, default=20000, help="calls per repeat")
    args = ap.parse_args(argv)
    cases: list[tuple[str, Callable[[], object]]] = [
        (f"parse v2 NLB ({len(NLB_V2)} B)", parse_whole(NLB_V2 + APP)),
        (f"parse v2 gateway+crc32c ({len(GATEWAY_V2)} B)", parse_whole(GATEWAY_V2 + APP)),
        (f"parse v2 gateway ({len(GATEWAY_V2_NO_CRC)} B)", parse_whole(GATEWAY_V2_NO_CRC + APP)),
        ("parse v2 gateway+crc32c, 2 reads", parse_split(GATEWAY_V2 + APP, 20)),
        (f"parse v1 TCP4 ({len(V1)} B)", parse_whole(V1 + APP)),
        (
            "build v2 gateway+crc32c",
            lambda: build_v2(
                ("2001:db8::7", 51234), ("2001:db8::9", 15006), tlvs=GATEWAY_TLVS, crc32c=True
            ),
        ),
        ("tlvs_for_record + tlvs_for_policy", views(GATEWAY_V2)),
    ]
    print(f"{'case':44} {'ops/s':>12} {'us/op':>8}")
    for name, fn in cases:
        fn()  # warm up, and fail loudly if broken
        best = min(timeit.repeat(fn, number=args.number, repeat=5))
        per_op = best / args.number
        print(f"{name:44} {1 / per_op:12,.0f} {per_op * 1e6:8.2f}")


if __name__ == "__main__":
    main()
