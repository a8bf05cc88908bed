"""Regenerate the PROXY header and ClientHello seeds of the fuzz corpus
(``python -m tests.fuzz.make_corpus``).

The config and rules seeds are copies of the example configs plus hand-written edge
cases; an input that once crashed a parser is added here (or as a file) so it is tried
on every run from then on."""

from __future__ import annotations

import ssl
from pathlib import Path

from enforcer.proxyproto.build import (
    alpn_tlv,
    authority_tlv,
    aws_vpce_tlv,
    azure_link_tlv,
    build_v1,
    build_v2,
    gcp_psc_tlv,
    identity_tlv,
    netns_tlv,
    noop_tlv,
    ssl_tlv,
    unique_id_tlv,
)
from tests.hellos import (
    ext,
    handshake,
    hello,
    hello_body,
    hello_message,
    real_hello,
    records,
    sni_ext,
)

HERE = Path(__file__).parent / "corpus" / "proxy"
HELLOS = Path(__file__).parent / "corpus" / "clienthello"


def seeds() -> dict[str, bytes]:
    v4 = (("198.51.100.7", 51234), ("203.0.113.9", 443))
    v6 = (("2001:db8::7", 51234), ("2001:db8::9", 443))
    all_tlvs = [alpn_tlv(b"h2"), authority_tlv("app.example"), unique_id_tlv(b"\x01" * 16),
                netns_tlv("blue"), aws_vpce_tlv("vpce-0123456789abcdef0"),
                azure_link_tlv(7), gcp_psc_tlv(99), noop_tlv(3),
                identity_tlv("spiffe://td/ns/a/sa/b"),
                ssl_tlv(client_cert_presented=True, verified=True, version="TLSv1.3",
                        cn="client", cipher="TLS_AES_128_GCM_SHA256", sig_alg="ECDSA-SHA256",
                        key_alg="EC256")]
    return {
        "v1-tcp4.bin": build_v1(*v4) + b"GET / HTTP/1.1\r\n",
        "v1-tcp6.bin": build_v1(*v6),
        "v1-unknown.bin": build_v1(None, None),
        "v2-tcp4.bin": build_v2(*v4),
        "v2-tcp6-crc.bin": build_v2(*v6, crc32c=True),
        "v2-local.bin": build_v2(None, None, command="LOCAL"),
        "v2-tlvs.bin": build_v2(*v4, tlvs=all_tlvs, crc32c=True) + b"\x16\x03\x01",
        "v2-unix.bin": build_v2(("/run/a.sock", 0), ("/run/b.sock", 0)),
        "v2-dgram.bin": build_v2(*v4, transport="DGRAM"),
        "v2-truncated.bin": build_v2(*v4, tlvs=all_tlvs)[:40],
    }


def hello_seeds() -> dict[str, bytes]:
    """Real OpenSSL hellos, and hand-built ones: fragmented, GREASE, odd server names."""
    openssl = real_hello("api.example.test", alpn=["h2", "http/1.1"])
    message = hello_message(openssl)
    grease = [ext(0x0A0A, b""), ext(0x3A3A, b"\x00"), ext(0xFE0D, b"\x00" * 32)]
    return {
        "openssl-tls13.bin": openssl,
        "openssl-tls12.bin": real_hello("shop.example.test", max_version=ssl.TLSVersion.TLSv1_2),
        "openssl-no-sni.bin": real_hello(None),
        "two-records.bin": records(message, [60]),
        "tiny-records.bin": records(message, [1] * 40 + [7] * 10),
        "grease.bin": hello(extra=grease),
        "no-extensions.bin": records(handshake(hello_body(None))),
        "two-names.bin": hello(None, extra=[sni_ext(b"a.test", b"b.test")]),
        "then-data.bin": hello() + bytes.fromhex("140303000101") + b"\x17\x03\x03\x00\x01x",
        "sslv2.bin": bytes.fromhex("802e0103010015000000100000390000380000350000"),
    }


def main() -> None:
    HERE.mkdir(parents=True, exist_ok=True)
    for name, data in seeds().items():
        (HERE / name).write_bytes(data)
    HELLOS.mkdir(parents=True, exist_ok=True)
    for name, data in hello_seeds().items():
        (HELLOS / name).write_bytes(data)


if __name__ == "__main__":
    main()
