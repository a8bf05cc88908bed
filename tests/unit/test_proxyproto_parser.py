"""HeaderParser mechanics (chunking, rest, bounds, sticky errors, eof) and sniff."""

from __future__ import annotations

import pytest

from enforcer.proxyproto import (
    REASONS,
    V2_SIGNATURE,
    HeaderParser,
    ProxyProtocolError,
    authority_tlv,
    build_v1,
    build_v2,
    sniff,
)
from enforcer.proxyproto import errors as errs

V1 = b"PROXY TCP4 1.2.3.4 5.6.7.8 1111 2222\r\n"
V2 = build_v2(("1.2.3.4", 1111), ("5.6.7.8", 2222), tlvs=[authority_tlv("x.test")], crc32c=True)
APP = b"\x16\x03\x01\x00\xa5\x01\x00\x00\xa1\x03\x03"  # start of a TLS ClientHello


@pytest.mark.parametrize(
    ("prefix", "expected"),
    [
        (b"", None),
        (b"P", None),
        (b"PROXY", None),
        (b"PROXY ", "v1"),
        (b"PROXY TCP4 1.2.3.4", "v1"),
        (b"PROXY\t", "none"),
        (b"PROXYX", "none"),
        (b"PRO!", "none"),
        (b"\r", None),
        (b"\r\n\r\n\x00\r\nQUI", None),
        (V2_SIGNATURE, "v2"),
        (V2_SIGNATURE + b"\x21", "v2"),
        (b"\r\n\r\n\x00\r\nQUIX", "none"),
        (b"\r\n\r\n", None),
        (b"\r\n\r\r", "none"),
        (b"GET / HTTP/1.1\r\n", "none"),
        (b"\x16\x03\x01", "none"),
        (b"p", "none"),
    ],
)
def test_sniff(prefix: bytes, expected: str | None) -> None:
    assert sniff(prefix) == expected
    assert sniff(bytearray(prefix)) == expected


@pytest.mark.parametrize("header", [V1, V2], ids=["v1", "v2"])
def test_whole_byte_by_byte_and_with_trailing_bytes_agree(header: bytes) -> None:
    whole = HeaderParser()
    expected = whole.feed(header + APP)
    assert expected is not None
    assert whole.rest == APP
    assert whole.header_length == len(header)

    stepwise = HeaderParser()
    data = header + APP
    for i in range(len(header) - 1):
        assert stepwise.feed(data[i : i + 1]) is None
        assert stepwise.buffered == i + 1
    got = stepwise.feed(data[len(header) - 1 :])
    assert got == expected
    assert stepwise.rest == APP
    assert stepwise.header is got


def test_header_split_exactly_at_the_boundary_leaves_empty_rest() -> None:
    parser = HeaderParser()
    assert parser.feed(V2[:10]) is None
    assert parser.feed(V2[10:]) is not None
    assert parser.rest == b""


def test_accepts_bytearray_and_memoryview() -> None:
    a, b = HeaderParser(), HeaderParser()
    ha = a.feed(bytearray(V2 + b"x"))
    hb = b.feed(memoryview(b"" + V2 + b"x"))
    assert ha is not None and ha == hb
    assert a.rest == b.rest == b"x"
    assert isinstance(a.rest, bytes) and isinstance(b.rest, bytes)


def test_empty_feed_is_a_no_op() -> None:
    parser = HeaderParser()
    assert parser.feed(b"") is None
    assert parser.buffered == 0
    assert parser.feed(V1) is not None


def test_errors_are_sticky() -> None:
    parser = HeaderParser()
    with pytest.raises(ProxyProtocolError) as first:
        parser.feed(b"PROXY TCP9 a b 1 2\r\n")
    with pytest.raises(ProxyProtocolError) as second:
        parser.feed(V1)
    assert first.value.reason == second.value.reason == "bad_family"
    with pytest.raises(ProxyProtocolError):
        parser.eof()


def test_feed_after_the_header_is_a_bug() -> None:
    parser = HeaderParser()
    assert parser.feed(V1) is not None
    with pytest.raises(RuntimeError):
        parser.feed(b"more")
    parser.eof()  # complete: nothing to report
    assert parser.rest == b""


@pytest.mark.parametrize("received", [b"", b"PROX", V1[:-1], V2[:5], V2[:-1]])
def test_eof_before_a_complete_header_is_truncated(received: bytes) -> None:
    parser = HeaderParser()
    assert parser.feed(received) is None
    with pytest.raises(ProxyProtocolError) as info:
        parser.eof()
    assert info.value.reason == "truncated"


def test_v2_buffer_never_exceeds_the_announced_header() -> None:
    body = b"\x01\x02\x03\x04" * 2 + b"\x00\x01\x00\x02" + b"\x99\x00\x64" + b"q" * 100
    data = V2_SIGNATURE + b"\x21\x11" + len(body).to_bytes(2, "big") + body
    parser = HeaderParser(max_v2_length=len(body))
    for i in range(len(data) - 1):
        assert parser.feed(data[i : i + 1]) is None
        assert parser.buffered <= 16 + parser.max_v2_length
    assert parser.feed(data[-1:] + b"z" * 10000) is not None
    assert parser.buffered == 0 and parser.rest == b"z" * 10000


def test_v1_without_lf_fails_at_byte_107() -> None:
    parser = HeaderParser()
    line = b"PROXY UNKNOWN " + b"y" * 200
    for i in range(106):
        assert parser.feed(line[i : i + 1]) is None
    with pytest.raises(ProxyProtocolError) as info:
        parser.feed(line[106:107])
    assert info.value.reason == "too_long"
    assert parser.buffered == 0


def test_v2_refuses_on_the_byte_that_makes_it_bad() -> None:
    data = bytearray(V2)
    data[12] = 0x31  # version 3
    parser = HeaderParser()
    for i in range(12):
        assert parser.feed(bytes(data[i : i + 1])) is None
    with pytest.raises(ProxyProtocolError) as info:
        parser.feed(bytes(data[12:13]))
    assert info.value.reason == "bad_version"


def test_bad_first_byte_fails_immediately() -> None:
    with pytest.raises(ProxyProtocolError) as info:
        HeaderParser().feed(b"G")
    assert info.value.reason == "bad_signature"


def test_error_reasons_are_the_documented_set() -> None:
    assert {
        "truncated",
        "too_long",
        "bad_signature",
        "bad_version",
        "bad_command",
        "bad_family",
        "bad_address",
        "bad_port",
        "bad_syntax",
        "bad_crc",
        "tlv_overrun",
        "bad_tlv",
        "timeout",
        "untrusted_source",
    } == REASONS
    assert errs.TIMEOUT == "timeout" and errs.UNTRUSTED_SOURCE == "untrusted_source"
    for reason in REASONS:
        assert reason.replace("_", "").isalnum() and reason.islower()
    exc = ProxyProtocolError(errs.TIMEOUT, "no PROXY header within 3s")
    assert exc.reason == "timeout" and str(exc) == "no PROXY header within 3s"
    with pytest.raises(ValueError):
        ProxyProtocolError("made_up", "x")


def test_error_pickles_with_its_reason() -> None:
    import pickle

    exc = pickle.loads(pickle.dumps(ProxyProtocolError("bad_crc", "mismatch")))
    assert isinstance(exc, ProxyProtocolError)
    assert (exc.reason, str(exc)) == ("bad_crc", "mismatch")


def test_v1_and_v2_builders_feed_the_parser_in_one_call() -> None:
    for data in (build_v1(("::1", 1), ("::2", 2)), build_v2(("::1", 1), ("::2", 2))):
        parser = HeaderParser()
        header = parser.feed(data + b"tail")
        assert header is not None and header.source == ("::1", 1)
        assert parser.rest == b"tail"
