"""PROXY protocol v1: table-driven valid and malformed lines, and the v1 builder."""

from __future__ import annotations

import pytest

from enforcer.proxyproto import HeaderParser, ProxyHeader, ProxyProtocolError, build_v1

MAX_V6 = ":".join(["ffff"] * 8)


def parse(data: bytes) -> ProxyHeader:
    parser = HeaderParser()
    header = parser.feed(data)
    assert header is not None, "expected a complete header"
    assert parser.rest == b""
    return header


def reason_of(data: bytes) -> str:
    with pytest.raises(ProxyProtocolError) as info:
        HeaderParser().feed(data)
    return info.value.reason


@pytest.mark.parametrize(
    ("line", "family", "source", "destination"),
    [
        # the example from the specification
        (
            b"PROXY TCP4 192.168.0.1 192.168.0.11 56324 443\r\n",
            "TCP4",
            ("192.168.0.1", 56324),
            ("192.168.0.11", 443),
        ),
        (
            b"PROXY TCP4 255.255.255.255 255.255.255.255 65535 65535\r\n",
            "TCP4",
            ("255.255.255.255", 65535),
            ("255.255.255.255", 65535),
        ),
        (b"PROXY TCP4 0.0.0.0 10.0.0.1 0 0\r\n", "TCP4", ("0.0.0.0", 0), ("10.0.0.1", 0)),
        (
            f"PROXY TCP6 {MAX_V6} {MAX_V6} 65535 65535\r\n".encode(),
            "TCP6",
            (MAX_V6, 65535),
            (MAX_V6, 65535),
        ),
        # IPv6 text is normalised (lower case, compressed)
        (
            b"PROXY TCP6 2001:DB8:0:0:0:0:0:1 ::1 1 2\r\n",
            "TCP6",
            ("2001:db8::1", 1),
            ("::1", 2),
        ),
        # IPv4-mapped IPv6, as HAProxy writes it
        (
            b"PROXY TCP6 ::ffff:192.0.2.1 ::ffff:198.51.100.7 5 6\r\n",
            "TCP6",
            ("::ffff:192.0.2.1", 5),
            ("::ffff:198.51.100.7", 6),
        ),
    ],
)
def test_valid_lines(
    line: bytes, family: str, source: tuple[str, int], destination: tuple[str, int]
) -> None:
    header = parse(line)
    assert header == ProxyHeader(1, "PROXY", family, "STREAM", source, destination)


def test_tcp6_worst_case_is_104_bytes() -> None:
    line = f"PROXY TCP6 {MAX_V6} {MAX_V6} 65535 65535\r\n".encode()
    assert len(line) == 104
    assert parse(line).family == "TCP6"


@pytest.mark.parametrize(
    "line",
    [
        b"PROXY UNKNOWN\r\n",
        b"PROXY UNKNOWN 1.2.3.4 5.6.7.8 1 2\r\n",
        b"PROXY UNKNOWN  whatever\tgoes\r\n",
        b"PROXY UNKNOWN \xff\x00\xfe\r\n",  # the rest of an UNKNOWN line is ignored
        b"PROXY UNKNOWN bare\rCR is content\r\n",
        f"PROXY UNKNOWN {MAX_V6} {MAX_V6} 65535 65535\r\n".encode(),  # 107 bytes: the max
    ],
)
def test_unknown_ignores_the_rest(line: bytes) -> None:
    header = parse(line)
    assert header == ProxyHeader(1, "PROXY", "UNKNOWN", None, None, None)
    assert header.source is None and header.transport is None


def test_107_bytes_is_the_limit() -> None:
    longest = f"PROXY UNKNOWN {MAX_V6} {MAX_V6} 65535 65535\r\n".encode()
    assert len(longest) == 107
    assert parse(longest).family == "UNKNOWN"
    assert reason_of(longest[:-2] + b" \r\n") == "too_long"
    assert reason_of(b"PROXY UNKNOWN " + b"a" * 93) == "too_long"  # 107 bytes, no LF


@pytest.mark.parametrize(
    ("line", "reason"),
    [
        # signature
        (b"PROXX TCP4 1.2.3.4 5.6.7.8 1 2\r\n", "bad_signature"),
        (b"proxy TCP4 1.2.3.4 5.6.7.8 1 2\r\n", "bad_signature"),
        (b"PROXY\r\n", "bad_signature"),
        (b"PROXY\tTCP4 1.2.3.4 5.6.7.8 1 2\r\n", "bad_signature"),
        (b"GET / HTTP/1.1\r\n", "bad_signature"),
        # line ending
        (b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2\n", "bad_syntax"),
        (b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2\r\r\n", "bad_syntax"),
        (b"PROXY UNKNOWN\n", "bad_syntax"),
        (b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2\rx\r\n", "bad_syntax"),
        # spacing and fields
        (b"PROXY  TCP4 1.2.3.4 5.6.7.8 1 2\r\n", "bad_syntax"),
        (b"PROXY TCP4  1.2.3.4 5.6.7.8 1 2\r\n", "bad_syntax"),
        (b"PROXY TCP4 1.2.3.4  5.6.7.8 1 2\r\n", "bad_syntax"),
        (b"PROXY TCP4 1.2.3.4 5.6.7.8 1  2\r\n", "bad_syntax"),
        (b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2 \r\n", "bad_syntax"),
        (b"PROXY TCP4 1.2.3.4 5.6.7.8 1\r\n", "bad_syntax"),
        (b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2 3\r\n", "bad_syntax"),
        (b"PROXY TCP4\r\n", "bad_syntax"),
        (b"PROXY \r\n", "bad_syntax"),
        (b"PROXY TCP4 1.2.3.4\t5.6.7.8 1 2\r\n", "bad_syntax"),
        (b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2\x00\r\n", "bad_syntax"),
        (b"PROXY TCP4 1.2.3.4 5.6.7.8 \xd9\xa3 2\r\n", "bad_syntax"),  # non-ASCII digit
        # protocol
        (b"PROXY TCP5 1.2.3.4 5.6.7.8 1 2\r\n", "bad_family"),
        (b"PROXY tcp4 1.2.3.4 5.6.7.8 1 2\r\n", "bad_family"),
        (b"PROXY UDP4 1.2.3.4 5.6.7.8 1 2\r\n", "bad_family"),
        (b"PROXY UNKNOWNX\r\n", "bad_family"),
        (b"PROXY UNIX /a /b 0 0\r\n", "bad_family"),
        # addresses
        (b"PROXY TCP4 01.2.3.4 5.6.7.8 1 2\r\n", "bad_address"),
        (b"PROXY TCP4 1.2.3.4 5.6.7.08 1 2\r\n", "bad_address"),
        (b"PROXY TCP4 1.2.3.00 5.6.7.8 1 2\r\n", "bad_address"),
        (b"PROXY TCP4 1.2.3.256 5.6.7.8 1 2\r\n", "bad_address"),
        (b"PROXY TCP4 1.2.3 5.6.7.8 1 2\r\n", "bad_address"),
        (b"PROXY TCP4 1.2.3.4.5 5.6.7.8 1 2\r\n", "bad_address"),
        (b"PROXY TCP4 0x1.2.3.4 5.6.7.8 1 2\r\n", "bad_address"),
        (b"PROXY TCP4 localhost 5.6.7.8 1 2\r\n", "bad_address"),
        (b"PROXY TCP4 ::1 5.6.7.8 1 2\r\n", "bad_address"),
        (b"PROXY TCP6 1.2.3.4 ::1 1 2\r\n", "bad_address"),
        (b"PROXY TCP6 ::1 fe80::1%eth0 1 2\r\n", "bad_address"),
        (b"PROXY TCP6 1:2:3:4:5:6:7:8:9 ::1 1 2\r\n", "bad_address"),
        (b"PROXY TCP6 1::2::3 ::1 1 2\r\n", "bad_address"),
        (b"PROXY TCP6 12345::1 ::1 1 2\r\n", "bad_address"),
        (b"PROXY TCP6 ::ffff:01.2.3.4 ::1 1 2\r\n", "bad_address"),
        # ports
        (b"PROXY TCP4 1.2.3.4 5.6.7.8 080 2\r\n", "bad_port"),
        (b"PROXY TCP4 1.2.3.4 5.6.7.8 1 00\r\n", "bad_port"),
        (b"PROXY TCP4 1.2.3.4 5.6.7.8 65536 2\r\n", "bad_port"),
        (b"PROXY TCP4 1.2.3.4 5.6.7.8 1 99999\r\n", "bad_port"),
        (b"PROXY TCP4 1.2.3.4 5.6.7.8 1 123456\r\n", "bad_port"),
        (b"PROXY TCP4 1.2.3.4 5.6.7.8 -1 2\r\n", "bad_port"),
        (b"PROXY TCP4 1.2.3.4 5.6.7.8 +1 2\r\n", "bad_port"),
        (b"PROXY TCP4 1.2.3.4 5.6.7.8 0x50 2\r\n", "bad_port"),
        (b"PROXY TCP4 1.2.3.4 5.6.7.8 http 2\r\n", "bad_port"),
        # length
        (b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2" + b"0" * 80 + b"\r\n", "too_long"),
        (b"PROXY UNKNOWN" + b" " * 200, "too_long"),
    ],
)
def test_malformed_lines(line: bytes, reason: str) -> None:
    assert reason_of(line) == reason


def test_error_message_is_human_readable() -> None:
    with pytest.raises(ProxyProtocolError) as info:
        HeaderParser().feed(b"PROXY TCP4 1.2.3.4 5.6.7.8 1 65536\r\n")
    assert info.value.reason == "bad_port"
    assert "65536" in str(info.value)
    assert isinstance(info.value, ValueError)


def test_application_bytes_after_the_line_are_kept() -> None:
    parser = HeaderParser()
    header = parser.feed(b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2\r\nGET / HTTP/1.1\r\n\r\n")
    assert header is not None and header.source == ("1.2.3.4", 1)
    assert parser.rest == b"GET / HTTP/1.1\r\n\r\n"
    assert parser.header_length == len(b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2\r\n")


# ------------------------------------------------------------------------ builder
@pytest.mark.parametrize(
    ("source", "destination", "expected"),
    [
        (
            ("192.168.0.1", 56324),
            ("192.168.0.11", 443),
            b"PROXY TCP4 192.168.0.1 192.168.0.11 56324 443\r\n",
        ),
        (("2001:DB8::1", 1), ("::1", 65535), b"PROXY TCP6 2001:db8::1 ::1 1 65535\r\n"),
        # mixed families: IPv4 mapped into IPv6, as HAProxy does
        (("10.0.0.1", 5), ("::1", 6), b"PROXY TCP6 ::ffff:10.0.0.1 ::1 5 6\r\n"),
        (("::1", 5), ("10.0.0.1", 6), b"PROXY TCP6 ::1 ::ffff:10.0.0.1 5 6\r\n"),
        (None, ("10.0.0.1", 6), b"PROXY UNKNOWN\r\n"),
        (("10.0.0.1", 6), None, b"PROXY UNKNOWN\r\n"),
        (None, None, b"PROXY UNKNOWN\r\n"),
    ],
)
def test_build_v1(
    source: tuple[str, int] | None, destination: tuple[str, int] | None, expected: bytes
) -> None:
    line = build_v1(source, destination)
    assert line == expected
    assert parse(line).version == 1


@pytest.mark.parametrize(
    ("source", "destination"),
    [
        (("01.2.3.4", 1), ("1.2.3.4", 2)),  # non-canonical IPv4
        (("1.2.3.4", -1), ("1.2.3.4", 2)),
        (("1.2.3.4", 1), ("1.2.3.4", 65536)),
        (("1.2.3.4", True), ("1.2.3.4", 2)),
        (("example.com", 1), ("1.2.3.4", 2)),
        (("/run/app.sock", 0), ("/run/b.sock", 0)),  # v1 has no UNIX family
        (("fe80::1%eth0", 1), ("::1", 2)),
    ],
)
def test_build_v1_rejects_bad_input(source: tuple[str, int], destination: tuple[str, int]) -> None:
    with pytest.raises(ValueError):
        build_v1(source, destination)
