"""PROXY protocol v2: headers written by hand from the spec, malformed ones, the builder."""

from __future__ import annotations

import struct

import pytest

from enforcer.proxyproto import (
    HeaderParser,
    ProxyHeader,
    ProxyProtocolError,
    Tlv,
    authority_tlv,
    build_v2,
    unique_id_tlv,
)

SIG = bytes.fromhex("0D0A0D0A000D0A515549540A")
# The spec's example connection 192.168.0.1:56324 -> 192.168.0.11:443 as an INET block.
INET_BLOCK = bytes.fromhex("C0A80001 C0A8000B DC04 01BB")


def v2(ver_cmd: int, fam: int, body: bytes, length: int | None = None) -> bytes:
    n = len(body) if length is None else length
    return SIG + bytes((ver_cmd, fam)) + struct.pack("!H", n) + body


def tlv(t: int, value: bytes) -> bytes:
    return struct.pack("!BH", t, len(value)) + value


def parse(data: bytes, **kwargs: int) -> tuple[ProxyHeader, bytes]:
    parser = HeaderParser(**kwargs)
    header = parser.feed(data)
    assert header is not None, "expected a complete header"
    return header, parser.rest


def reason_of(data: bytes, **kwargs: int) -> str:
    with pytest.raises(ProxyProtocolError) as info:
        HeaderParser(**kwargs).feed(data)
    return info.value.reason


def bitwise_crc32c(data: bytes) -> int:
    crc = 0xFFFFFFFF
    for byte in data:
        crc ^= byte
        for _ in range(8):
            crc = (crc >> 1) ^ 0x82F63B78 if crc & 1 else crc >> 1
    return crc ^ 0xFFFFFFFF


# ------------------------------------------------------------------ known-good bytes
def test_tcp4_written_from_the_spec() -> None:
    data = SIG + b"\x21\x11\x00\x0c" + INET_BLOCK
    header, rest = parse(data + b"\x16\x03\x01")
    assert header == ProxyHeader(
        2, "PROXY", "TCP4", "STREAM", ("192.168.0.1", 56324), ("192.168.0.11", 443)
    )
    assert rest == b"\x16\x03\x01"


def test_udp4() -> None:
    header, _ = parse(v2(0x21, 0x12, INET_BLOCK))
    assert (header.family, header.transport) == ("TCP4", "DGRAM")
    assert header.source == ("192.168.0.1", 56324)


def test_tcp6_and_udp6() -> None:
    block = (
        bytes.fromhex("20010db8000000000000000000000001")
        + bytes.fromhex("00000000000000000000ffffc0000201")
        + struct.pack("!HH", 40000, 8443)
    )
    header, _ = parse(v2(0x21, 0x21, block))
    assert header == ProxyHeader(
        2, "PROXY", "TCP6", "STREAM", ("2001:db8::1", 40000), ("::ffff:192.0.2.1", 8443)
    )
    assert parse(v2(0x21, 0x22, block))[0].transport == "DGRAM"


def test_unix_stream_and_abstract_dgram() -> None:
    src = b"/run/client.sock".ljust(108, b"\x00")
    dst = b"\x00abstract-name".ljust(108, b"\x00")
    header, _ = parse(v2(0x21, 0x31, src + dst))
    assert header == ProxyHeader(
        2, "PROXY", "UNIX", "STREAM", ("/run/client.sock", 0), ("@abstract-name", 0)
    )
    assert parse(v2(0x21, 0x32, src + dst))[0].transport == "DGRAM"


def test_crc32c_written_by_hand() -> None:
    # TCP4 block + PP2_TYPE_CRC32C, length 12 + 7 = 19. The checksum is over the whole
    # header with the CRC field zeroed; the bit-by-bit reference (itself checked against
    # the standard check value) gives 0x1C1AE9C6.
    zeroed = SIG + b"\x21\x11\x00\x13" + INET_BLOCK + b"\x03\x00\x04" + b"\x00" * 4
    assert bitwise_crc32c(b"123456789") == 0xE3069283
    assert bitwise_crc32c(zeroed) == 0x1C1AE9C6
    good = zeroed[:-4] + bytes.fromhex("1C1AE9C6")
    header, rest = parse(good + b"app")
    assert header.source == ("192.168.0.1", 56324)
    assert header.tlvs == (Tlv(0x03, bytes.fromhex("1C1AE9C6")),)
    assert header.tlvs_for_record() == {"crc32c": "ok"}
    assert rest == b"app"
    assert reason_of(zeroed[:-4] + bytes.fromhex("1C1AE9C7")) == "bad_crc"
    assert reason_of(zeroed) == "bad_crc"
    # the same header from the builder is byte-for-byte identical
    assert build_v2(("192.168.0.1", 56324), ("192.168.0.11", 443), crc32c=True) == good


# Captured from HAProxy 2.6 (`send-proxy-v2 proxy-v2-options
# ssl,crc32c,unique-id,authority,ssl-cipher,cert-sig,cert-key`) behind a TLS frontend
# that asked for a client certificate: a real sender's CRC32C and SSL TLV.
HAPROXY_V2 = bytes.fromhex(
    "0d0a0d0a000d0a515549540a211100827f0000017f000001ee1e480b0300049990145c010002683202"
    "000d66726f6e742e6578616d706c65050010616263313233333936393035343630342000440700000000"
    "210007544c5376312e33250005454332353624001165636473612d776974682d53484132353623001654"
    "4c535f4145535f3235365f47434d5f534841333834"
)


def test_header_captured_from_haproxy() -> None:
    header, rest = parse(HAPROXY_V2)
    assert rest == b""
    assert header.source == ("127.0.0.1", 60958)
    assert header.destination == ("127.0.0.1", 18443)
    assert header.alpn == b"h2"
    assert header.authority == "front.example"
    assert header.unique_id == b"abc1233969054604"
    ssl = header.ssl
    assert ssl is not None
    assert ssl.client_flags == 0x07 and ssl.verify == 0 and ssl.verified
    assert (ssl.version, ssl.cipher) == ("TLSv1.3", "TLS_AES_256_GCM_SHA384")
    assert (ssl.sig_alg, ssl.key_alg, ssl.cn) == ("ecdsa-with-SHA256", "EC256", None)
    # flip one bit anywhere after the fixed part and the CRC (or a stricter check) refuses
    tampered = bytearray(HAPROXY_V2)
    tampered[20] ^= 0x01  # source address
    assert reason_of(bytes(tampered)) == "bad_crc"


# ------------------------------------------------------------------ LOCAL and UNSPEC
def test_local_with_zero_length() -> None:
    header, rest = parse(SIG + b"\x20\x00\x00\x00" + b"HEALTH")
    assert header == ProxyHeader(2, "LOCAL", "UNSPEC", None, None, None)
    assert rest == b"HEALTH"


def test_local_skips_its_bytes_whatever_they_are() -> None:
    # LOCAL with an INET family, an address block and a TLV that would overrun: all of
    # it is discarded (the spec: "discard the protocol block including the family").
    body = INET_BLOCK + b"\x02\xff\xff" + b"junk"
    header, rest = parse(v2(0x20, 0x11, body) + b"app-bytes")
    assert header.command == "LOCAL" and header.source is None and header.tlvs == ()
    assert rest == b"app-bytes"
    # ...and the family byte of a LOCAL header is not checked
    header, rest = parse(v2(0x20, 0xFF, b"\x00" * 5) + b"x")
    assert header.command == "LOCAL" and rest == b"x"


def test_local_waits_for_the_announced_length() -> None:
    parser = HeaderParser()
    data = v2(0x20, 0x00, b"\x00" * 40)
    assert parser.feed(data[:-1]) is None
    assert parser.feed(data[-1:] + b"Z") is not None
    assert parser.rest == b"Z"


def test_proxy_unspec_ignores_address_bytes() -> None:
    header, rest = parse(v2(0x21, 0x00, b"\x01\x02\x03") + b"x")
    assert header == ProxyHeader(2, "PROXY", "UNSPEC", None, None, None)
    assert rest == b"x"


# ------------------------------------------------------------------ malformed
def _bad_sig(i: int) -> bytes:
    data = bytearray(SIG + b"\x21\x11\x00\x0c" + INET_BLOCK)
    data[i] ^= 0x40
    return bytes(data)


@pytest.mark.parametrize(
    ("data", "reason"),
    [
        *[(_bad_sig(i), "bad_signature") for i in range(12)],
        (b"\x16\x03\x01\x02\x00", "bad_signature"),  # a TLS ClientHello
        (b"\x00" * 16, "bad_signature"),
        # version nibble
        (v2(0x11, 0x11, INET_BLOCK), "bad_version"),
        (v2(0x01, 0x11, INET_BLOCK), "bad_version"),
        (v2(0x31, 0x11, INET_BLOCK), "bad_version"),
        (v2(0xF1, 0x11, INET_BLOCK), "bad_version"),
        # command nibble
        (v2(0x22, 0x11, INET_BLOCK), "bad_command"),
        (v2(0x2F, 0x11, INET_BLOCK), "bad_command"),
        # family / transport byte
        (v2(0x21, 0x41, INET_BLOCK), "bad_family"),
        (v2(0x21, 0x13, INET_BLOCK), "bad_family"),
        (v2(0x21, 0x10, INET_BLOCK), "bad_family"),
        (v2(0x21, 0x01, INET_BLOCK), "bad_family"),
        (v2(0x21, 0x30, b"\x00" * 216), "bad_family"),
        (v2(0x21, 0xFF, INET_BLOCK), "bad_family"),
        # length shorter than the family's address block
        (v2(0x21, 0x11, INET_BLOCK[:11]), "bad_address"),
        (v2(0x21, 0x21, b"\x00" * 35), "bad_address"),
        (v2(0x21, 0x22, b""), "bad_address"),
        (v2(0x21, 0x31, b"\x00" * 215), "bad_address"),
        # TLVs
        (v2(0x21, 0x11, INET_BLOCK + b"\x02\x00\x05abcd"), "tlv_overrun"),
        (v2(0x21, 0x11, INET_BLOCK + b"\x02"), "tlv_overrun"),
        (v2(0x21, 0x11, INET_BLOCK + b"\x02\x00"), "tlv_overrun"),
        (v2(0x21, 0x11, INET_BLOCK + tlv(0x04, b"") + b"\xe0\xff"), "tlv_overrun"),
        (
            v2(0x21, 0x11, INET_BLOCK + tlv(0x20, b"\x01\x00\x00\x00\x00\x21\x00\x09TLS")),
            "tlv_overrun",
        ),
        (v2(0x21, 0x11, INET_BLOCK + tlv(0x20, b"\x01\x00\x00\x00\x00\x21")), "tlv_overrun"),
        (v2(0x21, 0x11, INET_BLOCK + tlv(0x03, b"\x00\x00\x00")), "bad_tlv"),
        (v2(0x21, 0x11, INET_BLOCK + tlv(0x05, b"u" * 129)), "bad_tlv"),
        (v2(0x21, 0x11, INET_BLOCK + tlv(0x02, b"\xff\xfe")), "bad_tlv"),
        (v2(0x21, 0x11, INET_BLOCK + tlv(0x20, b"\x01\x00\x00\x00")), "bad_tlv"),
        (
            v2(0x21, 0x11, INET_BLOCK + tlv(0x20, b"\x01\x00\x00\x00\x00" + tlv(0x21, b"\xff"))),
            "bad_tlv",
        ),
        (
            v2(0x21, 0x11, INET_BLOCK + tlv(0x20, b"\x01\x00\x00\x00\x00" + tlv(0x22, b"\xc3"))),
            "bad_tlv",
        ),
        (
            v2(0x21, 0x11, INET_BLOCK + tlv(0x20, b"\x07\x00\x00\x00\x00" + tlv(0x22, b"a") * 2)),
            "bad_tlv",
        ),
        (v2(0x21, 0x11, INET_BLOCK + tlv(0x30, b"ns\x80")), "bad_tlv"),
        (v2(0x21, 0x11, INET_BLOCK + tlv(0xE4, b"")), "bad_tlv"),
        (v2(0x21, 0x11, INET_BLOCK + tlv(0xE4, b"\x01")), "bad_tlv"),
        (v2(0x21, 0x11, INET_BLOCK + tlv(0xE4, b"\x01spiffe://\xff")), "bad_tlv"),
        # a single-valued TLV twice: two answers must never reach policy
        (v2(0x21, 0x11, INET_BLOCK + tlv(0x02, b"a") + tlv(0x02, b"b")), "bad_tlv"),
        (v2(0x21, 0x11, INET_BLOCK + tlv(0xE4, b"\x01spiffe://a") * 2), "bad_tlv"),
        (
            v2(0x21, 0x11, INET_BLOCK + tlv(0xEA, b"\x01vpce-1") + tlv(0xEA, b"\x01vpce-2")),
            "bad_tlv",
        ),
        (v2(0x21, 0x11, INET_BLOCK + tlv(0x05, b"a") + tlv(0x05, b"a")), "bad_tlv"),
    ],
)
def test_malformed_headers(data: bytes, reason: str) -> None:
    assert reason_of(data) == reason


def test_unique_id_of_128_bytes_is_allowed() -> None:
    header, _ = parse(v2(0x21, 0x11, INET_BLOCK + tlv(0x05, b"u" * 128)))
    assert header.unique_id == b"u" * 128


def test_repeatable_tlvs() -> None:
    body = INET_BLOCK + tlv(0x04, b"") + tlv(0x04, b"\x00\x00") + tlv(0x99, b"a") + tlv(0x99, b"b")
    body += tlv(0xEA, b"\x02x") + tlv(0xEA, b"\x02y")  # AWS subtypes enforcer does not read
    header, _ = parse(v2(0x21, 0x11, body))
    assert [t.type for t in header.tlvs] == [0x04, 0x04, 0x99, 0x99, 0xEA, 0xEA]
    assert header.tlvs_for_record() == {"0x99": "61,62", "0xea": "0278,0279"}


@pytest.mark.parametrize(
    "value",
    [
        tlv(0xEA, b""),
        tlv(0xEA, b"\x01"),  # empty VPC endpoint id
        tlv(0xEA, b"\x01vpce-\xff"),
        tlv(0xEE, b"\x01\x01\x02\x03"),
        tlv(0xEE, b"\x01\x01\x02\x03\x04\x05"),
        tlv(0xE0, b"\x00" * 7),
        tlv(0xE0, b"\x00" * 9),
    ],
)
def test_custom_range_tlvs_of_another_format_are_kept_raw(value: bytes) -> None:
    # 0xE0-0xEF is shared by all applications: a value that does not have the cloud
    # format is somebody else's TLV, not a malformed header.
    header, _ = parse(v2(0x21, 0x11, INET_BLOCK + value))
    assert header.tlvs == (Tlv(value[0], value[3:]),)
    assert (header.aws_vpce_id, header.azure_link_id, header.gcp_psc_id) == (None, None, None)
    assert header.tlvs_for_record() == {f"0x{value[0]:02x}": value[3:].hex()}
    assert header.tlvs_for_policy() == {}


def test_length_limit_is_configurable() -> None:
    body = INET_BLOCK + tlv(0x99, b"x" * 100)  # length 115
    assert parse(v2(0x21, 0x11, body), max_v2_length=115)[0].tlvs == (Tlv(0x99, b"x" * 100),)
    assert reason_of(v2(0x21, 0x11, body), max_v2_length=114) == "too_long"
    # the limit is enforced from the 16 fixed bytes, before any body arrives
    with pytest.raises(ProxyProtocolError) as info:
        HeaderParser(max_v2_length=114).feed(v2(0x21, 0x11, body)[:16])
    assert info.value.reason == "too_long"


def test_default_limit_is_4096_and_the_maximum_is_65535() -> None:
    assert HeaderParser().max_v2_length == 4096
    assert reason_of(SIG + b"\x21\x11\x10\x01") == "too_long"  # 4097
    big = v2(0x21, 0x11, INET_BLOCK + tlv(0x99, b"z" * (65535 - 12 - 3)))
    header, _ = parse(big, max_v2_length=65535)
    assert len(header.tlvs[0].value) == 65520
    for bad in (-1, 65536):
        with pytest.raises(ValueError):
            HeaderParser(max_v2_length=bad)


# ------------------------------------------------------------------ builder
def test_build_matches_the_hand_written_header() -> None:
    assert build_v2(("192.168.0.1", 56324), ("192.168.0.11", 443)) == (
        SIG + b"\x21\x11\x00\x0c" + INET_BLOCK
    )


@pytest.mark.parametrize(
    ("kwargs", "expected"),
    [
        ({"source": None, "destination": None}, SIG + b"\x21\x00\x00\x00"),
        ({"source": None, "destination": None, "command": "LOCAL"}, SIG + b"\x20\x00\x00\x00"),
        (
            {"source": ("1.2.3.4", 1), "destination": ("5.6.7.8", 2), "transport": "DGRAM"},
            SIG + b"\x21\x12\x00\x0c" + bytes.fromhex("01020304 05060708 0001 0002"),
        ),
        (
            {"source": ("/a", 0), "destination": ("@b", 0)},
            SIG + b"\x21\x31\x00\xd8" + b"/a".ljust(108, b"\0") + b"\0b".ljust(108, b"\0"),
        ),
        (
            {"source": ("1.2.3.4", 1), "destination": ("::1", 2)},
            SIG
            + b"\x21\x21\x00\x24"
            + bytes(10)
            + b"\xff\xff\x01\x02\x03\x04"
            + bytes(15)
            + b"\x01"
            + b"\x00\x01\x00\x02",
        ),
        (
            {"source": None, "destination": None, "tlvs": [Tlv(0x99, b"ab")]},
            SIG + b"\x21\x00\x00\x05" + b"\x99\x00\x02ab",
        ),
    ],
)
def test_build_v2_bytes(kwargs: dict[str, object], expected: bytes) -> None:
    data = build_v2(**kwargs)  # type: ignore[arg-type]
    assert data == expected
    assert HeaderParser().feed(data) is not None


def test_build_v2_local_with_tlvs_is_skipped_by_the_parser() -> None:
    data = build_v2(("1.2.3.4", 1), ("5.6.7.8", 2), command="LOCAL", tlvs=[authority_tlv("x")])
    assert data[12:14] == b"\x20\x11"
    header, _ = parse(data)
    assert header.command == "LOCAL" and header.tlvs == () and header.source is None


@pytest.mark.parametrize(
    "kwargs",
    [
        {"command": "HEALTH"},
        {"transport": "SEQPACKET"},
        {"source": ("1.2.3.4", 70000)},
        {"source": ("not-an-address", 1)},
        {"source": ("/path", 0), "destination": ("1.2.3.4", 2)},
        {"source": ("/" + "p" * 108, 0), "destination": ("/b", 0)},
        {"tlvs": [Tlv(256, b"")]},
        {"tlvs": [Tlv(0x99, b"x" * 65536)]},
        {"tlvs": [Tlv(0x99, b"x" * 65521)]},  # 12 + 3 + 65521 > 65535
        {"tlvs": [Tlv(0x03, b"\0\0\0\0")], "crc32c": True},
    ],
)
def test_build_v2_rejects_bad_input(kwargs: dict[str, object]) -> None:
    args: dict[str, object] = {"source": ("1.2.3.4", 1), "destination": ("5.6.7.8", 2)}
    args.update(kwargs)
    with pytest.raises(ValueError):
        build_v2(**args)  # type: ignore[arg-type]


def test_build_v2_crc_is_verified_by_the_parser() -> None:
    data = build_v2(("1.2.3.4", 1), ("5.6.7.8", 2), tlvs=[unique_id_tlv(b"id-1")], crc32c=True)
    header, _ = parse(data)
    assert header.tlvs[0].type == 0x03 and header.unique_id == b"id-1"
    (crc,) = struct.unpack("!I", header.tlvs[0].value)
    zeroed = data.replace(header.tlvs[0].value, b"\0\0\0\0")
    assert bitwise_crc32c(zeroed) == crc
