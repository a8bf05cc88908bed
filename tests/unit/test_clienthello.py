"""The passthrough ClientHello parser (pure) and the SNI router."""

from __future__ import annotations

import ssl
from typing import Any

import pytest

from enforcer.config.model import SniRouteConfig
from enforcer.config.passthrough import SniRouter
from enforcer.dataplane import clienthello
from enforcer.dataplane.clienthello import Hello, HelloError, HelloParser, alert, is_grease
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


def parse(data: bytes, step: int | None = None) -> tuple[Hello | None, HelloParser]:
    parser = HelloParser()
    got = None
    step = step or len(data) or 1
    for at in range(0, len(data), step):
        got = parser.feed(data[at:at + step])
        if got is not None:
            break
    return got, parser


def refused(data: bytes, step: int | None = None) -> HelloError:
    with pytest.raises(HelloError) as info:
        parse(data, step)
    return info.value


@pytest.mark.parametrize("step", [None, 1, 7])
def test_a_real_hello_in_any_split_keeps_every_byte(step: int | None) -> None:
    data = real_hello("Shop.Example.Test.", alpn=["h2", "http/1.1"])
    got, parser = parse(data, step)
    assert got is not None and got.sni == "shop.example.test"
    assert bytes(parser.raw) == data


def test_a_hello_without_sni() -> None:
    got, _ = parse(real_hello(None))
    assert got is not None and got.sni is None


def test_a_tls12_only_client_gets_tls10_alert_records() -> None:
    got, parser = parse(real_hello("a.test", max_version=ssl.TLSVersion.TLSv1_2))
    assert got is not None and got.legacy_version == 0x0303 and parser.alert_version == 0x0303
    old = records(handshake(hello_body([sni_ext(b"a.test")], version=0x0301)))
    got, parser = parse(old)
    assert got is not None and parser.alert_version == 0x0301


@pytest.mark.parametrize("sizes", [[100], [1, 1, 1, 1], [3] * 200, [16384]])
def test_a_hello_fragmented_over_records(sizes: list[int]) -> None:
    message = hello_message(real_hello("frag.example.test"))
    data = records(message, sizes)
    got, parser = parse(data, 1)
    assert got is not None and got.sni == "frag.example.test"
    assert bytes(parser.raw) == data


def test_bytes_after_the_hello_are_kept_for_the_relay() -> None:
    data = hello() + bytes.fromhex("140303000101") + b"\x17\x03\x03\x00\x05hello"
    got, parser = parse(data)
    assert got is not None and bytes(parser.raw) == data


def test_grease_and_unknown_extensions_are_ignored() -> None:
    assert is_grease(0x0A0A) and is_grease(0xFAFA) and not is_grease(0x0A1A)
    data = hello(extra=[ext(0x0A0A, b""), ext(0x1A1A, b"\x00"), ext(0x0A0A, b""),
                        ext(0xFE0D, b"\x01" * 40)])
    got, _ = parse(data)
    assert got is not None and got.sni == "api.example.test"


@pytest.mark.parametrize(("data", "reason", "alert_desc"), [
    (bytes.fromhex("80 2e 01 03 01 00 15"), "sslv2_hello", 70),
    (bytes.fromhex("17 03 03 00 05") + b"hello", "unexpected_tls_record", 10),
    (b"GET / HTTP/1.1\r\n\r\n", "not_tls", None),
    (bytes.fromhex("16 03 03 00 00"), "client_hello_invalid", 10),
    (bytes.fromhex("16 03 03 40 01"), "client_hello_invalid", 22),
    (bytes.fromhex("16 02 00 00 10"), "client_hello_invalid", 70),
    (records(handshake(b"\x03\x03", msg_type=2)), "client_hello_invalid", 10),
    (records(handshake(hello_body([]) + b"\x00")), "client_hello_invalid", 50),
    (records(handshake(hello_body(None, version=0x0200))), "client_hello_invalid", 70),
    (records(handshake(hello_body(None, session_id=b"x" * 33))), "client_hello_invalid", 47),
    (records(handshake(hello_body(None, suites=b"\x13"))), "client_hello_invalid", 50),
    (records(handshake(hello_body(None, compression=b""))), "client_hello_invalid", 50),
    (hello(extra=[sni_ext(b"b.test")]), "client_hello_invalid", 47),
    (hello(None, extra=[sni_ext(b"a.test", b"b.test")]), "client_hello_invalid", 47),
    (hello(None, extra=[sni_ext(b"a.test", name_type=1)]), "client_hello_invalid", 47),
    (hello(b"bad name.test"), "client_hello_invalid", 47),
    (hello(b"nul\x00.test"), "client_hello_invalid", 47),
    (hello(b"caf\xc3\xa9.test"), "client_hello_invalid", 47),
    (hello(b"a" * 256), "client_hello_invalid", 47),
    (hello(None, extra=[ext(0, b"\x00\x00")]), "client_hello_invalid", 50),
    (hello(None, extra=[ext(0, b"\x00\x09\x00\x00\x05a.test")]), "client_hello_invalid", 50),
    (records(handshake(hello_body([b"\x00\x0a\xff\xff"]))), "client_hello_invalid", 50),
    (records(handshake(hello_body([sni_ext(b"a.test")])) + handshake(b"")),
     "client_hello_invalid", 10),
], ids=lambda v: "hello" if isinstance(v, bytes) else str(v))
def test_refusals(data: bytes, reason: str, alert_desc: int | None) -> None:
    for step in (None, 1):
        exc = refused(data, step)
        assert (exc.reason, exc.alert) == (reason, alert_desc), str(exc)


def test_a_record_of_another_type_inside_the_hello() -> None:
    message = hello_message(real_hello("a.test"))
    data = records(message[:50]) + records(message[50:], kind=0x17)
    assert refused(data).reason == "unexpected_tls_record"


def test_an_oversize_declared_hello_is_refused_before_it_arrives() -> None:
    head = b"\x01" + (clienthello.MAX_HELLO + 1).to_bytes(3, "big")
    exc = refused(records(head + b"\x03\x03"))
    assert exc.reason == "client_hello_too_large" and exc.alert == 40


def test_the_peek_is_capped_whatever_the_records_say() -> None:
    message = handshake(hello_body([ext(0xFFCE, b"\x00" * 60000)]))
    data = records(message, [1] * 20000)  # six bytes per hello byte
    exc = refused(data, 4096)
    assert exc.reason == "client_hello_too_large"


def test_an_incomplete_hello_waits() -> None:
    data = real_hello("a.test")
    for cut in (1, 4, 5, 6, 9, len(data) - 1):
        got, parser = parse(data[:cut])
        assert got is None and bytes(parser.raw) == data[:cut]


def test_alert_records() -> None:
    assert alert(112) == bytes.fromhex("15030300020270")
    assert alert(40, 0x0301) == bytes.fromhex("15030100020228")


# ----------------------------------------------------------------------------- routing
def _router(default: bool = True) -> tuple[SniRouter, dict[str, Any]]:
    ups: dict[str, Any] = {n: object() for n in ("api", "apps", "fallback")}
    routes = (SniRouteConfig(("api.example.test",), "api"),
              SniRouteConfig(("*.example.test", "*.apps.example.test"), "apps"))
    return SniRouter(routes, ups, ups["fallback"] if default else None), ups


def test_exact_names_win_over_wildcards_one_label_deep() -> None:
    router, ups = _router()
    assert router.route("api.example.test") == ("api.example.test", ups["api"])
    assert router.route("www.example.test") == ("*.example.test", ups["apps"])
    assert router.route("x.apps.example.test") == ("*.apps.example.test", ups["apps"])
    assert router.route("a.b.c.example.test") == ("default", ups["fallback"])
    assert router.route("example.test") == ("default", ups["fallback"])
    assert router.route(None) == ("default", ups["fallback"])


def test_without_a_default_route_unknown_names_have_none() -> None:
    router, _ = _router(default=False)
    assert router.route("other.test") is None
    assert router.route(None) is None
    assert router.route("api.example.test") is not None
