"""tlsconf.sni: name matching, certificate coverage of server_names, strict SNI handshakes."""

from __future__ import annotations

import ssl
from pathlib import Path

import pytest

from enforcer.config.model import ListenerTlsConfig
from enforcer.tlsconf.context import build_client_context, build_listener_context
from enforcer.tlsconf.material import LoadedMaterial, MaterialError, load_material
from enforcer.tlsconf.sni import check_names_covered, covered_by, name_matches
from tests.e2e.tls_util import Issued, bio_handshake, make_cert, material_cfg, write

MATCHES = [
    ("a.example.com", "a.example.com", True),
    ("A.Example.COM.", "a.example.com", True),
    ("a.example.com", "b.example.com", False),
    ("*.example.com", "a.example.com", True),
    ("*.example.com", "example.com", False),
    ("*.example.com", "a.b.example.com", False),
    ("*.example.com", ".example.com", False),
    ("*.example.com", "a.example.org", False),
    ("*.example.com", "*.example.com", False),
]


@pytest.mark.parametrize(("pattern", "name", "expected"), MATCHES)
def test_name_matches(pattern: str, name: str, expected: bool) -> None:
    assert name_matches(pattern, name) is expected


COVERAGE = [
    ("ingress.example.com", ["ingress.example.com"], True),
    ("ingress.example.com", ["*.example.com"], True),
    ("a.b.example.com", ["*.example.com"], False),
    ("*.example.com", ["*.example.com"], True),
    ("*.example.com", ["a.example.com"], False),  # a wildcard name needs the wildcard SAN
    ("example.com", ["*.example.com"], False),
    ("Ingress.Example.com", ["ingress.example.COM"], True),
]


@pytest.mark.parametrize(("server_name", "sans", "expected"), COVERAGE)
def test_covered_by(server_name: str, sans: list[str], expected: bool) -> None:
    assert covered_by(server_name, sans) is expected


@pytest.fixture(scope="module")
def root() -> Issued:
    return make_cert("sni root CA", ca=True)


@pytest.fixture
def gateway(tmp_path: Path, root: Issued) -> LoadedMaterial:
    leaf = make_cert("gw", issuer=root, dns=("ingress.example.com", "*.apps.example.com"))
    return load_material(material_cfg("edge", cert=write(tmp_path / "gw.crt", leaf.cert_pem),
                                      key=write(tmp_path / "gw.key", leaf.key_pem),
                                      ca=write(tmp_path / "ca.crt", root.cert_pem)))


def test_coverage_error_names_host_and_certificate_names(gateway: LoadedMaterial) -> None:
    check_names_covered("listeners.gw.tls", ["ingress.example.com", "x.apps.example.com"],
                        True, gateway)
    with pytest.raises(MaterialError) as info:
        check_names_covered("listeners.gw.tls", ["ingress.example.com", "shop.example.com"],
                            False, gateway)
    assert str(info.value) == (
        "listeners.gw.tls.server_names: shop.example.com is not covered by the certificate "
        f"of material 'edge' ({gateway.cert_file}; its DNS names: ingress.example.com, "
        "*.apps.example.com)")


def test_strict_sni_needs_server_names(gateway: LoadedMaterial) -> None:
    with pytest.raises(MaterialError, match=r"^listeners\.gw\.tls\.strict_sni: needs server_names"):
        check_names_covered("listeners.gw.tls", [], True, gateway)


def _client(root_pem: bytes, tmp: Path) -> ssl.SSLContext:
    trust = load_material(material_cfg("trust", ca=write(tmp / "trust.crt", root_pem)))
    return build_client_context(trust, mutual=False, check_hostname=False)


@pytest.mark.parametrize(("sni", "accepted"), [
    ("ingress.example.com", True),
    ("INGRESS.example.com", True),
    ("shop.apps.example.com", True),
    (None, False),
    ("other.example.com", False),
    ("a.b.apps.example.com", False),
])
def test_strict_sni_handshake(tmp_path: Path, root: Issued, gateway: LoadedMaterial,
                              sni: str | None, accepted: bool) -> None:
    tls = ListenerTlsConfig(client_auth="none", strict_sni=True,
                            server_names=("ingress.example.com", "*.apps.example.com"))
    sctx = build_listener_context(gateway, tls, "gw")
    cctx = _client(root.cert_pem, tmp_path)
    if accepted:
        s, _c = bio_handshake(sctx, cctx, server_hostname=sni)
        assert s.enforcer_sni == sni  # type: ignore[attr-defined]
    else:
        with pytest.raises(ssl.SSLError, match=r"(?i)callback failed|unrecognized name"):
            bio_handshake(sctx, cctx, server_hostname=sni)


def test_without_strict_any_sni_is_recorded(tmp_path: Path, root: Issued,
                                            gateway: LoadedMaterial) -> None:
    tls = ListenerTlsConfig(client_auth="none", server_names=("ingress.example.com",))
    sctx = build_listener_context(gateway, tls, "gw")
    for sni in (None, "whatever.example.org"):
        s, _c = bio_handshake(sctx, _client(root.cert_pem, tmp_path), server_hostname=sni)
        assert s.enforcer_sni == sni  # type: ignore[attr-defined]


def test_listener_context_refuses_uncovered_names(gateway: LoadedMaterial) -> None:
    tls = ListenerTlsConfig(client_auth="none", server_names=("shop.example.com",))
    with pytest.raises(MaterialError, match=r"^listeners\.gw\.tls\.server_names: shop\.example\.com"):
        build_listener_context(gateway, tls, "gw")
