"""Peer identity extraction from real certificates built here with ``cryptography``."""

from __future__ import annotations

import base64
import datetime as dt
import hashlib
import ipaddress
import json
from collections.abc import Sequence

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from cryptography.x509.name import _ASN1Type
from cryptography.x509.oid import NameOID
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from enforcer.tlsconf import identity as identity_mod
from enforcer.tlsconf.identity import (
    IdentityError,
    PeerIdentity,
    cache_clear,
    cache_info,
    identity_from_der,
    identity_from_pem,
    identity_from_spiffe_id,
    parse_der,
    parse_spiffe_id,
)

EC_KEY = ec.generate_private_key(ec.SECP256R1())
NOW = dt.datetime(2030, 1, 2, 3, 4, 5, tzinfo=dt.UTC)
GeneralName = x509.GeneralName


def make_cert(
    sans: Sequence[GeneralName] = (),
    *,
    subject: x509.Name | None = None,
    issuer: x509.Name | None = None,
    key: object = EC_KEY,
    serial: int = 0x1F2E3D,
) -> x509.Certificate:
    subject = subject if subject is not None else x509.Name(
        [x509.NameAttribute(NameOID.COMMON_NAME, "workload")])
    builder = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(issuer if issuer is not None else x509.Name(
            [x509.NameAttribute(NameOID.COMMON_NAME, "Test CA")]))
        .public_key(key.public_key())  # type: ignore[attr-defined]
        .serial_number(serial)
        .not_valid_before(NOW - dt.timedelta(days=1))
        .not_valid_after(NOW)
    )
    if sans:  # as real issuers do: no names, no SubjectAlternativeName extension at all
        builder = builder.add_extension(x509.SubjectAlternativeName(list(sans)), critical=False)
    algorithm = None if isinstance(key, ed25519.Ed25519PrivateKey) else hashes.SHA256()
    return builder.sign(key, algorithm)  # type: ignore[arg-type]


def der_of(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.DER)


def uri(u: str) -> GeneralName:
    return x509.UniformResourceIdentifier(u)


def dns(d: str) -> GeneralName:
    return x509.DNSName(d)


def spki_pin(cert: x509.Certificate) -> str:
    spki = cert.public_key().public_bytes(serialization.Encoding.DER,
                                          serialization.PublicFormat.SubjectPublicKeyInfo)
    return base64.b64encode(hashlib.sha256(spki).digest()).decode()


# ---------------------------------------------------------------------------- fields
def test_spiffe_svid_fields() -> None:
    cert = make_cert([uri("spiffe://cluster.local/ns/shop/sa/frontend")])
    ident = parse_der(der_of(cert))
    assert ident.spiffe_id == "spiffe://cluster.local/ns/shop/sa/frontend"
    assert ident.trust_domain == "cluster.local"
    assert ident.spiffe_path == "/ns/shop/sa/frontend"
    assert ident.uri == ("spiffe://cluster.local/ns/shop/sa/frontend",)
    assert ident.cn == "workload"
    assert ident.issuer_cn == "Test CA"
    assert ident.serial == "1f2e3d"
    assert ident.not_after == NOW and ident.not_after.tzinfo is not None
    assert ident.spki_sha256 == spki_pin(cert)


def test_several_sans_all_kept_in_order() -> None:
    cert = make_cert([
        dns("frontend.shop.svc"), uri("https://example.com/x"),
        uri("spiffe://td/ns/a"), x509.IPAddress(ipaddress.ip_address("10.1.2.3")),
        dns("Frontend.Example."), x509.IPAddress(ipaddress.ip_address("2001:db8::1")),
        x509.RFC822Name("ops@example.com"),
    ])
    ident = parse_der(der_of(cert))
    assert ident.dns == ("frontend.shop.svc", "Frontend.Example.")
    assert ident.uri == ("https://example.com/x", "spiffe://td/ns/a")
    assert ident.ip == ("10.1.2.3", "2001:db8::1")
    assert ident.spiffe_id == "spiffe://td/ns/a"  # non-spiffe URIs do not make it ambiguous


def test_two_spiffe_uris_mean_no_spiffe_id() -> None:
    cert = make_cert([uri("spiffe://td/a"), uri("spiffe://td/b")])
    ident = parse_der(der_of(cert))
    assert ident.spiffe_id is None and ident.trust_domain is None and ident.spiffe_path is None
    assert ident.uri == ("spiffe://td/a", "spiffe://td/b")


@pytest.mark.parametrize("text, expected", [
    ("spiffe://td/a", ("td", "/a")),
    ("spiffe://cluster.local/ns/shop/sa/front-end_1.x", ("cluster.local", "/ns/shop/sa/front-end_1.x")),
    ("spiffe://td", None),
    ("spiffe://td/", None),
    ("spiffe://td//a", None),
    ("spiffe://td/a/", None),
    ("spiffe://td/a/../b", None),
    ("spiffe://td/./b", None),
    ("spiffe://TD/a", None),
    ("SPIFFE://td/a", None),
    ("spiffe://td:443/a", None),
    ("spiffe://user@td/a", None),
    ("spiffe://td/a?x=1", None),
    ("spiffe://td/a#frag", None),
    ("spiffe://td/a%20b", None),
    ("spiffe:///a", None),
    ("https://td/a", None),
    ("", None),
])
def test_parse_spiffe_id(text: str, expected: tuple[str, str] | None) -> None:
    assert parse_spiffe_id(text) == expected


@pytest.mark.parametrize("bad", ["spiffe://TD/a", "spiffe://td", "spiffe://td/a/", "SPIFFE://td/a",
                                 "spiffe://td/a b"])
def test_malformed_spiffe_uri_is_just_a_uri(bad: str) -> None:
    ident = parse_der(der_of(make_cert([uri(bad)])))
    assert ident.spiffe_id is None
    assert ident.uri == (bad,)


def test_no_san_extension_at_all() -> None:
    ident = parse_der(der_of(make_cert([])))
    assert (ident.spiffe_id, ident.uri, ident.dns, ident.ip) == (None, (), (), ())
    assert ident.cn == "workload"


def test_empty_subject_and_issuer() -> None:
    ident = parse_der(der_of(make_cert([dns("a.b")], subject=x509.Name([]),
                                       issuer=x509.Name([]))))
    assert ident.cn is None and ident.issuer_cn is None and ident.o == () and ident.ou == ()


def test_subject_o_ou_and_several_cns() -> None:
    subject = x509.Name([
        x509.NameAttribute(NameOID.ORGANIZATION_NAME, "Shop Inc"),
        x509.NameAttribute(NameOID.ORGANIZATIONAL_UNIT_NAME, "payments"),
        x509.NameAttribute(NameOID.ORGANIZATIONAL_UNIT_NAME, "eu"),
        x509.NameAttribute(NameOID.COMMON_NAME, "first"),
        x509.NameAttribute(NameOID.COMMON_NAME, "last"),
    ])
    ident = parse_der(der_of(make_cert(subject=subject)))
    assert ident.o == ("Shop Inc",)
    assert ident.ou == ("payments", "eu")
    assert ident.cn == "last"  # the most specific one, as openssl prints it


def test_non_ascii_subjects() -> None:
    subject = x509.Name([
        x509.NameAttribute(NameOID.COMMON_NAME, "Zoë 👩‍💻 работник"),
        x509.NameAttribute(NameOID.ORGANIZATIONAL_UNIT_NAME, "Ünit", _type=_ASN1Type.BMPString),
        x509.NameAttribute(NameOID.ORGANIZATION_NAME, "Org\x00with nul"),
    ])
    ident = parse_der(der_of(make_cert(subject=subject)))
    assert ident.cn == "Zoë 👩‍💻 работник"
    assert ident.ou == ("Ünit",)
    assert ident.o == ("Org\x00with nul",)


def _patched(der: bytes, old: bytes, new: bytes) -> bytes:
    """Same-length byte surgery: the signature breaks, which identity does not check."""
    assert len(old) == len(new) and der.count(old) == 1
    return der.replace(old, new)


def test_invalid_utf8_subject_does_not_crash_and_keeps_sans() -> None:
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "MARKERCN"),
                         x509.NameAttribute(NameOID.ORGANIZATIONAL_UNIT_NAME, "unit")])
    cert = make_cert([uri("spiffe://td/ns/x")], subject=subject)
    der = _patched(der_of(cert), b"MARKERCN", b"\xff\xfeAB\xc3\x28CD")
    with pytest.raises(ValueError):
        _ = x509.load_der_x509_certificate(der).subject  # cryptography refuses it
    ident = parse_der(der)
    assert ident.cn is not None and "\ufffd" in ident.cn and ident.cn.endswith("CD")
    assert ident.ou == ("unit",)
    assert ident.spiffe_id == "spiffe://td/ns/x"
    assert ident.issuer_cn == "Test CA"


def test_non_ascii_dns_san_does_not_crash_and_keeps_other_sans() -> None:
    cert = make_cert([dns("MARK.example"), uri("spiffe://td/ns/x"),
                      x509.IPAddress(ipaddress.ip_address("192.0.2.1"))])
    der = _patched(der_of(cert), b"MARK.example", b"\xc3\xa9\xff\xfe.example")
    with pytest.raises(ValueError):
        _ = x509.load_der_x509_certificate(der).extensions
    ident = parse_der(der)
    assert ident.spiffe_id == "spiffe://td/ns/x"
    assert ident.ip == ("192.0.2.1",)
    assert len(ident.dns) == 1 and "\ufffd" in ident.dns[0] and ident.dns[0].endswith(".example")


def test_unsupported_general_name_type_does_not_crash() -> None:
    """An EDIPartyName SAN makes cryptography raise UnsupportedGeneralNameType (found by
    the fuzz test below); the other SANs are still read."""
    dirname = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "edi")])
    cert = make_cert([uri("spiffe://td/ns/x"), x509.DirectoryName(dirname)])
    name_der = dirname.public_bytes()
    der = _patched(der_of(cert), b"\xa4" + bytes([len(name_der)]) + name_der,
                   b"\xa5" + bytes([len(name_der)]) + name_der)
    with pytest.raises(x509.UnsupportedGeneralNameType):
        _ = x509.load_der_x509_certificate(der).extensions
    ident = parse_der(der)
    assert ident.spiffe_id == "spiffe://td/ns/x" and ident.dns == ()


def test_invalid_version_is_an_identity_error() -> None:
    der = _patched(der_of(make_cert([uri("spiffe://td/a")])), bytes.fromhex("a003020102"),
                   bytes.fromhex("a00302017e"))
    with pytest.raises(IdentityError):
        parse_der(der)


def test_huge_san_list() -> None:
    names = [dns(f"host-{i}.example.com") for i in range(5000)]
    names += [uri(f"https://x/{i}") for i in range(100)] + [uri("spiffe://td/big")]
    ident = parse_der(der_of(make_cert(names)))
    assert len(ident.dns) == 5000 and ident.dns[4999] == "host-4999.example.com"
    assert ident.spiffe_id == "spiffe://td/big"
    record = ident.to_record()
    assert len(record["dns"]) == identity_mod.RECORD_LIST_LIMIT  # type: ignore[arg-type]
    assert record["truncated"] == (5000 - 64) + (101 - 64)


@pytest.mark.parametrize("key", [
    rsa.generate_private_key(public_exponent=65537, key_size=2048),
    ed25519.Ed25519PrivateKey.generate(),
    ec.generate_private_key(ec.SECP384R1()),
], ids=["rsa", "ed25519", "p384"])
def test_spki_pin_for_key_types(key: object) -> None:
    cert = make_cert([uri("spiffe://td/k")], key=key)
    assert parse_der(der_of(cert)).spki_sha256 == spki_pin(cert)


def test_serial_and_record_shape() -> None:
    cert = make_cert([uri("spiffe://td/a"), dns("a.example")], serial=(1 << 150) + 5)
    ident = parse_der(der_of(cert))
    assert ident.serial == format((1 << 150) + 5, "x")
    record = ident.to_record()
    for key in ("spiffe_id", "cn", "dns", "uri", "spki_sha256", "ou", "ip", "serial", "not_after"):
        assert key in record
    assert record["not_after"] == "2030-01-02T03:04:05Z"
    assert "truncated" not in record
    json.dumps(record)


# ---------------------------------------------------------------------------- cache
def test_cache_returns_the_same_object() -> None:
    cache_clear()
    der = der_of(make_cert([uri("spiffe://td/cached")]))
    first = identity_from_der(der)
    second = identity_from_der(bytes(der))  # a different bytes object, same content
    assert first is second
    info = cache_info()
    assert info["hits"] == 1 and info["misses"] == 1 and info["size"] == 1


def test_cache_is_bounded(monkeypatch: pytest.MonkeyPatch) -> None:
    cache_clear()
    monkeypatch.setattr(identity_mod, "CACHE_SIZE", 3)
    ders = [der_of(make_cert([uri(f"spiffe://td/n{i}")], serial=i + 1)) for i in range(5)]
    idents = [identity_from_der(d) for d in ders]
    assert cache_info()["size"] == 3
    assert identity_from_der(ders[4]) is idents[4]  # recent: still cached
    assert identity_from_der(ders[0]) is not idents[0]  # evicted: parsed again
    assert identity_from_der(ders[0]) == idents[0]
    cache_clear()


def test_pem() -> None:
    cert = make_cert([uri("spiffe://td/pem")])
    pem = cert.public_bytes(serialization.Encoding.PEM)
    assert identity_from_pem(pem).spiffe_id == "spiffe://td/pem"
    assert identity_from_pem(pem) is identity_from_der(der_of(cert))


# ---------------------------------------------------------------------------- bad input
@pytest.mark.parametrize("blob", [b"", b"\x00", b"not a certificate", b"\x30\x82\xff\xff" + b"\x00" * 10])
def test_garbage_raises_identity_error(blob: bytes) -> None:
    with pytest.raises(IdentityError):
        identity_from_der(blob)


def test_truncated_der_raises_identity_error() -> None:
    der = der_of(make_cert([uri("spiffe://td/a")]))
    with pytest.raises(IdentityError):
        identity_from_der(der[: len(der) // 2])


def test_garbage_pem_raises_identity_error() -> None:
    with pytest.raises(IdentityError):
        identity_from_pem(b"-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n")
    with pytest.raises(IdentityError):
        identity_from_pem(b"hello")


_FUZZ_DER = der_of(make_cert([uri("spiffe://td/fuzz"), dns("a.example"),
                              x509.IPAddress(ipaddress.ip_address("10.0.0.1"))],
                             subject=x509.Name([
                                 x509.NameAttribute(NameOID.COMMON_NAME, "fuzz"),
                                 x509.NameAttribute(NameOID.ORGANIZATIONAL_UNIT_NAME, "u")])))


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.tuples(st.sampled_from(["set", "set", "delete", "insert"]),
                          st.integers(0, len(_FUZZ_DER) - 2), st.integers(0, 255)),
                min_size=1, max_size=4))
def test_mutated_certificates_never_crash(edits: list[tuple[str, int, int]]) -> None:
    """Only IdentityError or a PeerIdentity, whatever the bytes (400k runs locally)."""
    der = bytearray(_FUZZ_DER)
    for op, where, value in edits:
        pos = where % len(der)
        if op == "set":
            der[pos] = value
        elif op == "delete":
            del der[pos]
        else:
            der.insert(pos, value)
    try:
        ident = parse_der(bytes(der))
    except IdentityError:
        return
    assert isinstance(ident, PeerIdentity)
    json.dumps(ident.to_record())


def test_synthetic_identity_from_spiffe_id() -> None:
    ident = identity_from_spiffe_id("spiffe://td/ns/a")
    assert (ident.spiffe_id, ident.trust_domain, ident.spiffe_path) == (
        "spiffe://td/ns/a", "td", "/ns/a")
    assert ident.uri == ("spiffe://td/ns/a",)
    assert identity_from_spiffe_id("spiffe://td").spiffe_id is None


@pytest.mark.parametrize(("first", "refused"), [
    (b"\xfb", True), (b"\x80", True), (None, True), (b"\x01", False), (b"\x7f", False)])
def test_a_non_positive_serial_is_refused_by_name(first: bytes | None, refused: bool) -> None:
    """RFC 5280 wants a positive serial (cryptography only warns today): the parse says so,
    before cryptography gets to warn. ``first`` replaces the serial's first byte (the
    length stays, so every enclosing length stays valid); None zeroes the whole serial."""
    import warnings

    der = _FUZZ_DER
    _, cs, ce = identity_mod._tlv(der, 0)
    _, _, ts, te = identity_mod._children(der, cs, ce)[0]
    fields = identity_mod._children(der, ts, te)
    _, _, vs, ve = fields[1] if fields[0][0] == 0xA0 else fields[0]
    value = bytes(ve - vs) if first is None else first + der[vs + 1:ve]
    patched = der[:vs] + value + der[ve:]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        if refused:
            with pytest.raises(IdentityError, match="serial number is not positive"):
                parse_der(patched)
        else:
            assert parse_der(patched).serial == format(int.from_bytes(value, "big"), "x")
