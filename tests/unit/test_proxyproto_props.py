"""Hypothesis properties: build/parse round trips, chunking invariance, and totality.

Totality: for ANY byte string, fed whole or in any chunking, the parser returns a
header, None (need more) or raises ProxyProtocolError with a documented reason; nothing
else. Chunking invariance: the outcome (header and rest, or error reason) does not depend
on how the bytes were split.
"""

from __future__ import annotations

import ipaddress
import itertools
import string
from typing import Any

from hypothesis import event, given, settings
from hypothesis import strategies as st

from enforcer.proxyproto import (
    REASONS,
    V2_SIGNATURE,
    HeaderParser,
    ProxyHeader,
    ProxyProtocolError,
    Tlv,
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

SETTINGS = settings(max_examples=300, deadline=None)

ports = st.integers(0, 65535)
ipv4 = st.ip_addresses(v=4).map(str)
ipv6 = st.ip_addresses(v=6).map(str)
ip_endpoint = st.tuples(st.one_of(ipv4, ipv6), ports)
path_chars = string.ascii_letters + string.digits + "._-/"
unix_path = st.one_of(
    st.text(path_chars, min_size=1, max_size=100).map(lambda s: "/" + s),
    st.text(path_chars, min_size=1, max_size=100).map(lambda s: "@" + s),
)

ascii_text = st.text(string.ascii_letters + string.digits + "-_.:/", min_size=1, max_size=40)
any_text = st.text(min_size=1, max_size=40).filter(lambda s: "\x00" not in s)
KNOWN_TYPES = {0x01, 0x02, 0x03, 0x05, 0x20, 0x30, 0xE0, 0xE4, 0xEA, 0xEE}
unknown_tlv = st.builds(
    Tlv,
    st.integers(0, 255).filter(lambda t: t not in KNOWN_TYPES),
    st.binary(max_size=40),
)
known_tlv_makers = {
    "alpn": st.binary(min_size=1, max_size=20).map(alpn_tlv),
    "authority": any_text.map(authority_tlv),
    "unique_id": st.binary(max_size=128).map(unique_id_tlv),
    "netns": ascii_text.map(netns_tlv),
    "aws": ascii_text.map(aws_vpce_tlv),
    "azure": st.integers(0, 2**32 - 1).map(azure_link_tlv),
    "gcp": st.integers(0, 2**64 - 1).map(gcp_psc_tlv),
    "identity": any_text.map(lambda s: identity_tlv("spiffe://" + s)),
    "noop": st.integers(0, 10).map(noop_tlv),
    "ssl": st.builds(
        lambda version, cipher, cn, sig, key, presented, verified: ssl_tlv(
            version=version,
            cipher=cipher,
            cn=cn,
            sig_alg=sig,
            key_alg=key,
            client_cert_presented=presented,
            verified=presented and verified,
        ),
        st.none() | ascii_text,
        st.none() | ascii_text,
        st.none() | any_text,
        st.none() | ascii_text,
        st.none() | ascii_text,
        st.booleans(),
        st.booleans(),
    ),
}


@st.composite
def tlv_lists(draw: st.DrawFn) -> list[Tlv]:
    kinds = draw(st.sets(st.sampled_from(sorted(known_tlv_makers))))
    tlvs = [draw(known_tlv_makers[k]) for k in sorted(kinds)]
    tlvs += draw(st.lists(unknown_tlv, max_size=4))
    return list(draw(st.permutations(tlvs)))


def same_ip(a: str, b: str) -> bool:
    return ipaddress.ip_address(a) == ipaddress.ip_address(b)


def mapped(host: str) -> ipaddress.IPv6Address:
    ip = ipaddress.ip_address(host)
    return ip if isinstance(ip, ipaddress.IPv6Address) else ipaddress.IPv6Address(f"::ffff:{ip}")


def chunked(data: bytes, cuts: list[int]) -> list[bytes]:
    points = sorted({c % (len(data) + 1) for c in cuts} | {0, len(data)})
    return [data[a:b] for a, b in itertools.pairwise(points)] or [b""]


def outcome(chunks: list[bytes], **kwargs: int) -> tuple[Any, ...]:
    """Feed chunks; ('header', header, rest) | ('more',) | ('error', reason)."""
    parser = HeaderParser(**kwargs)
    for i, chunk in enumerate(chunks):
        try:
            header = parser.feed(chunk)
        except ProxyProtocolError as exc:
            assert exc.reason in REASONS
            assert str(exc)
            return ("error", exc.reason)
        if header is not None:
            assert isinstance(header, ProxyHeader)
            return ("header", header, parser.rest + b"".join(chunks[i + 1 :]))
        assert parser.buffered <= max(107, 16 + parser.max_v2_length)
    return ("more",)


# ------------------------------------------------------------------ round trips
@SETTINGS
@given(ip_endpoint, ip_endpoint, st.binary(max_size=50), st.lists(st.integers(0, 200)))
def test_v1_round_trip(
    src: tuple[str, int], dst: tuple[str, int], app: bytes, cuts: list[int]
) -> None:
    data = build_v1(src, dst)
    assert len(data) <= 107
    result = outcome(chunked(data + app, cuts))
    assert result[0] == "header"
    header, rest = result[1], result[2]
    assert rest == app
    assert header.version == 1 and header.command == "PROXY" and header.transport == "STREAM"
    both_v4 = ":" not in src[0] and ":" not in dst[0]
    assert header.family == ("TCP4" if both_v4 else "TCP6")
    if header.family == "TCP4":
        assert header.source == src and header.destination == dst
    else:
        assert ipaddress.ip_address(header.source[0]) == mapped(src[0])
        assert ipaddress.ip_address(header.destination[0]) == mapped(dst[0])
        assert (header.source[1], header.destination[1]) == (src[1], dst[1])


@SETTINGS
@given(
    st.one_of(
        st.tuples(st.tuples(ipv4, ports), st.tuples(ipv4, ports)),
        st.tuples(st.tuples(ipv6, ports), st.tuples(ipv6, ports)),
        st.tuples(st.tuples(unix_path, st.just(0)), st.tuples(unix_path, st.just(0))),
        st.just((None, None)),
    ),
    st.sampled_from(["STREAM", "DGRAM"]),
    tlv_lists(),
    st.booleans(),
    st.binary(max_size=50),
    st.lists(st.integers(0, 2000)),
)
def test_v2_round_trip(
    addrs: tuple[Any, Any],
    transport: str,
    tlvs: list[Tlv],
    crc: bool,
    app: bytes,
    cuts: list[int],
) -> None:
    src, dst = addrs
    data = build_v2(src, dst, tlvs=tlvs, crc32c=crc, transport=transport)
    result = outcome(chunked(data + app, cuts), max_v2_length=65535)
    assert result[0] == "header", result
    header, rest = result[1], result[2]
    assert rest == app
    assert (header.version, header.command) == (2, "PROXY")
    if src is None:
        assert header == ProxyHeader(2, "PROXY", "UNSPEC", None, None, None)
        return
    assert header.transport == transport
    if src[0][0] in "/@":
        assert header.family == "UNIX"
        assert header.source == src and header.destination == dst
    else:
        assert header.family == ("TCP6" if ":" in src[0] else "TCP4")
        assert same_ip(header.source[0], src[0]) and header.source[1] == src[1]
        assert same_ip(header.destination[0], dst[0]) and header.destination[1] == dst[1]
    got = list(header.tlvs)
    if crc:
        assert got[0].type == 0x03 and header.tlvs_for_record()["crc32c"] == "ok"
        got = got[1:]
    assert got == tlvs
    # typed views agree with what was put in
    for t in tlvs:
        if t.type == 0x02:
            assert header.authority == t.value.decode()
        if t.type == 0xE4:
            assert header.identity == t.value[1:].decode()
            assert header.tlvs_for_policy()["identity"] == header.identity
        if t.type == 0xEA:
            assert header.aws_vpce_id == t.value[1:].decode()
    assert set(header.tlvs_for_policy()) <= {
        "alpn",
        "authority",
        "identity",
        "aws_vpce_id",
        "azure_link_id",
        "gcp_psc_id",
    }


@SETTINGS
@given(ip_endpoint, ip_endpoint, tlv_lists(), st.binary(max_size=20))
def test_v2_local_skips_everything(
    src: tuple[str, int], dst: tuple[str, int], tlvs: list[Tlv], app: bytes
) -> None:
    data = build_v2(src, dst, command="LOCAL", tlvs=tlvs)
    result = outcome([data + app], max_v2_length=65535)
    assert result[0] == "header"
    assert result[1] == ProxyHeader(2, "LOCAL", "UNSPEC", None, None, None)
    assert result[2] == app


# ------------------------------------------------------------------ totality
def _valid_headers() -> st.SearchStrategy[bytes]:
    return st.one_of(
        st.builds(build_v1, ip_endpoint, ip_endpoint),
        st.builds(
            lambda s, d, t, c: build_v2(s, d, tlvs=t, crc32c=c),
            st.tuples(ipv4, ports),
            st.tuples(ipv4, ports),
            tlv_lists(),
            st.booleans(),
        ),
        st.builds(
            lambda s, d, t: build_v2(s, d, tlvs=t),
            st.tuples(ipv6, ports),
            st.tuples(ipv6, ports),
            tlv_lists(),
        ),
    )


@st.composite
def mutated(draw: st.DrawFn) -> bytes:
    data = bytearray(draw(_valid_headers()))
    for _ in range(draw(st.integers(0, 4))):
        op = draw(st.sampled_from(["flip", "cut", "insert", "delete"]))
        i = draw(st.integers(0, max(len(data) - 1, 0)))
        if op == "flip" and data:
            data[i] ^= 1 << draw(st.integers(0, 7))
        elif op == "cut":
            del data[i:]
        elif op == "insert":
            data[i:i] = draw(st.binary(min_size=1, max_size=4))
        elif data:
            del data[i]
    return bytes(data) + draw(st.binary(max_size=8))


any_input = st.one_of(
    st.binary(max_size=300),
    st.binary(max_size=300).map(lambda b: V2_SIGNATURE + b),
    st.binary(max_size=120).map(lambda b: b"PROXY " + b),
    st.text(string.printable, max_size=110).map(lambda s: b"PROXY " + s.encode() + b"\r\n"),
    st.lists(st.sampled_from(["TCP4", "TCP6", "UNKNOWN", "1.2.3.4", "::1", "80", "", "0"])).map(
        lambda parts: ("PROXY " + " ".join(parts) + "\r\n").encode()
    ),
    mutated(),
)


@settings(max_examples=1000, deadline=None)
@given(any_input, st.lists(st.integers(0, 400), max_size=8))
def test_any_bytes_give_header_none_or_protocol_error(data: bytes, cuts: list[int]) -> None:
    whole = outcome([data])
    split = outcome(chunked(data, cuts))
    byte_by_byte = outcome([data[i : i + 1] for i in range(len(data))] or [b""])
    assert whole[0] in {"header", "more", "error"}
    assert whole == split == byte_by_byte
    event(f"outcome: {whole[0]} {whole[1] if whole[0] == 'error' else ''}")


@SETTINGS
@given(any_input, st.integers(0, 300))
def test_the_length_limit_is_honoured_for_any_input(data: bytes, limit: int) -> None:
    result = outcome([data], max_v2_length=limit)
    if result[0] == "header" and result[1].version == 2:
        consumed = len(data) - len(result[2])
        assert consumed <= 16 + limit
    assert result == outcome(chunked(data, [limit, limit * 2]), max_v2_length=limit)


@SETTINGS
@given(
    st.tuples(st.one_of(ipv4, ipv6), ports),
    tlv_lists(),
    st.data(),
)
def test_crc_catches_any_single_bit_flip_after_the_fixed_part(
    src: tuple[str, int], tlvs: list[Tlv], data: st.DataObject
) -> None:
    header = build_v2(src, src, tlvs=tlvs, crc32c=True)
    i = data.draw(st.integers(16, len(header) - 1), label="byte")
    bit = data.draw(st.integers(0, 7), label="bit")
    tampered = bytearray(header)
    tampered[i] ^= 1 << bit
    result = outcome([bytes(tampered)], max_v2_length=65535)
    if result[0] == "header":
        # only possible if the flip removed the CRC TLV itself (its type byte changed)
        assert all(t.type != 0x03 for t in result[1].tlvs)
    else:
        assert result[0] == "error"
