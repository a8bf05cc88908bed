"""enforcer.tlsconf.certs: CA, leafs, demo PKI and CRLs, checked with real TLS handshakes.

Handshakes run over ssl.MemoryBIO pairs (what the data plane uses), so they need no
threads and no sockets but exercise OpenSSL's full chain, EKU, hostname and CRL checks.
"""

from __future__ import annotations

import base64
import datetime as dt
import hashlib
import os
import ssl
import stat
from pathlib import Path
from typing import TypeVar

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from enforcer.tlsconf import certs
from enforcer.tlsconf.certs import CertsError, DemoPki, IssuedPaths

# --------------------------------------------------------------------------- helpers

E = TypeVar("E", bound=x509.ExtensionType)


@pytest.fixture(scope="module")
def demo(tmp_path_factory: pytest.TempPathFactory) -> DemoPki:
    return certs.init_demo_pki(tmp_path_factory.mktemp("pki"))


def load_cert(path: Path) -> x509.Certificate:
    return x509.load_pem_x509_certificate(path.read_bytes())


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def ext(cert: x509.Certificate, cls: type[E]) -> x509.Extension[E]:
    return cert.extensions.get_extension_for_class(cls)


def server_context(leaf: IssuedPaths, trust: Path, crl: Path | None = None) -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(leaf.cert, leaf.key)
    ctx.load_verify_locations(trust)
    ctx.verify_mode = ssl.CERT_REQUIRED
    if crl is not None:
        ctx.load_verify_locations(crl)
        ctx.verify_flags |= ssl.VERIFY_CRL_CHECK_LEAF
    return ctx


def client_context(leaf: IssuedPaths | None, trust: Path) -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.load_verify_locations(trust)
    if leaf is not None:
        ctx.load_cert_chain(leaf.cert, leaf.key)
    return ctx


def _step(obj: ssl.SSLObject) -> bool:
    try:
        obj.do_handshake()
    except ssl.SSLWantReadError:
        return False
    return True


def handshake(
    server_ctx: ssl.SSLContext, client_ctx: ssl.SSLContext, hostname: str = "localhost"
) -> tuple[ssl.SSLObject, ssl.SSLObject]:
    """Run a TLS handshake plus one round trip; raises ssl.SSLError from either side."""
    s_in, s_out, c_in, c_out = (ssl.MemoryBIO() for _ in range(4))
    server = server_ctx.wrap_bio(s_in, s_out, server_side=True)
    client = client_ctx.wrap_bio(c_in, c_out, server_hostname=hostname)
    done = (False, False)
    for _ in range(10):
        done = (done[0] or _step(client), done[1] or _step(server))
        s_in.write(c_out.read())
        c_in.write(s_out.read())
        if all(done):
            break
    assert all(done), "handshake did not finish"
    client.write(b"ping")  # TLS 1.3: the server judges the client cert after the flight
    s_in.write(c_out.read())
    assert server.read(4) == b"ping"
    return server, client


def peer_uris(obj: ssl.SSLObject) -> list[str]:
    cert = obj.getpeercert()
    assert cert is not None
    sans: tuple[tuple[str, str], ...] = cert.get("subjectAltName", ())  # type: ignore[assignment]
    return [value for kind, value in sans if kind == "URI"]


# --------------------------------------------------------------------------- CA


def test_init_ca_writes_ca_and_private_key(tmp_path: Path) -> None:
    ca, key = certs.init_ca(tmp_path / "ca", name="test CA")
    assert (ca, key) == (tmp_path / "ca" / "ca.crt", tmp_path / "ca" / "ca.key")
    assert mode(key) == 0o600
    cert = load_cert(ca)
    assert cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == "test CA"
    bc = ext(cert, x509.BasicConstraints)
    assert bc.critical and bc.value.ca
    ku = ext(cert, x509.KeyUsage).value
    assert ku.key_cert_sign and ku.crl_sign
    cert.verify_directly_issued_by(cert)  # self-signed
    pem = key.read_bytes()
    assert pem.startswith(b"-----BEGIN PRIVATE KEY-----")  # PKCS#8, unencrypted
    assert isinstance(serialization.load_pem_private_key(pem, None), ec.EllipticCurvePrivateKey)


def test_init_ca_refuses_to_overwrite_key(tmp_path: Path) -> None:
    _, key = certs.init_ca(tmp_path)
    before = key.read_bytes()
    with pytest.raises(CertsError, match=r"ca\.key.*already exists"):
        certs.init_ca(tmp_path)
    assert key.read_bytes() == before
    certs.init_ca(tmp_path, force=True)
    assert key.read_bytes() != before
    assert mode(key) == 0o600


def test_keys_are_0600_even_over_a_loose_existing_file(tmp_path: Path) -> None:
    certs.init_ca(tmp_path)
    loose = tmp_path / "svc.key"
    loose.write_bytes(b"old")
    loose.chmod(0o644)
    old_umask = os.umask(0)
    try:
        issued = certs.issue(tmp_path, tmp_path, name="svc")
    finally:
        os.umask(old_umask)
    assert mode(issued.key) == 0o600
    assert mode(issued.cert) == 0o644
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temp files left


# --------------------------------------------------------------------------- leafs


def test_issue_leaf_has_sans_eku_and_chains_to_ca(tmp_path: Path) -> None:
    certs.init_ca(tmp_path)
    issued = certs.issue(
        tmp_path,
        tmp_path / "out",
        name="web",
        spiffe_id="spiffe://example.org/ns/shop/sa/web",
        dns=["web.shop", "*.web.shop"],
        ips=["10.0.0.1", "::1"],
        o="shop",
        ou=["payments", "team-a"],
    )
    assert issued.cert == tmp_path / "out" / "web.crt"
    assert issued.key == tmp_path / "out" / "web.key"
    assert issued.ca == tmp_path / "ca.crt"
    assert mode(issued.key) == 0o600
    assert issued.cert.read_bytes().count(b"BEGIN CERTIFICATE") == 1  # the leaf alone

    cert = load_cert(issued.cert)
    ca = load_cert(issued.ca)
    cert.verify_directly_issued_by(ca)
    assert cert.serial_number != ca.serial_number
    san = ext(cert, x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.UniformResourceIdentifier) == [
        "spiffe://example.org/ns/shop/sa/web"
    ]
    assert san.get_values_for_type(x509.DNSName) == ["web.shop", "*.web.shop"]
    assert [str(ip) for ip in san.get_values_for_type(x509.IPAddress)] == ["10.0.0.1", "::1"]
    assert list(ext(cert, x509.ExtendedKeyUsage).value) == [
        ExtendedKeyUsageOID.SERVER_AUTH,
        ExtendedKeyUsageOID.CLIENT_AUTH,
    ]
    bc = ext(cert, x509.BasicConstraints)
    assert bc.critical and not bc.value.ca
    ku = ext(cert, x509.KeyUsage)
    assert ku.critical and ku.value.digital_signature and not ku.value.key_cert_sign
    aki = ext(cert, x509.AuthorityKeyIdentifier).value
    assert aki.key_identifier == ext(ca, x509.SubjectKeyIdentifier).value.digest
    ext(cert, x509.SubjectKeyIdentifier)
    subject = cert.subject
    assert subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == "web"
    assert subject.get_attributes_for_oid(NameOID.ORGANIZATION_NAME)[0].value == "shop"
    assert [a.value for a in subject.get_attributes_for_oid(NameOID.ORGANIZATIONAL_UNIT_NAME)] == [
        "payments",
        "team-a",
    ]
    key = load_cert(issued.cert).public_key()
    assert isinstance(key, ec.EllipticCurvePublicKey) and key.curve.name == "secp256r1"


def test_issue_serials_are_random(tmp_path: Path) -> None:
    certs.init_ca(tmp_path)
    a = load_cert(certs.issue(tmp_path, name="a").cert)
    b = load_cert(certs.issue(tmp_path, name="b").cert)
    assert a.serial_number != b.serial_number
    assert a.serial_number.bit_length() > 64


@pytest.mark.parametrize(("key_type", "bits"), [("rsa", 2048), ("rsa3072", 3072)])
def test_issue_rsa(tmp_path: Path, key_type: str, bits: int) -> None:
    certs.init_ca(tmp_path)
    issued = certs.issue(tmp_path, name="legacy", key_type=key_type, dns=["legacy"])
    cert = load_cert(issued.cert)
    key = cert.public_key()
    assert isinstance(key, rsa.RSAPublicKey) and key.key_size == bits
    assert ext(cert, x509.KeyUsage).value.key_encipherment
    cert.verify_directly_issued_by(load_cert(issued.ca))
    priv = serialization.load_pem_private_key(issued.key.read_bytes(), None)
    assert isinstance(priv, rsa.RSAPrivateKey)
    assert mode(issued.key) == 0o600


def test_issue_server_only_and_client_only_eku(tmp_path: Path) -> None:
    certs.init_ca(tmp_path)
    srv = load_cert(certs.issue(tmp_path, name="s", client=False).cert)
    cli = load_cert(certs.issue(tmp_path, name="c", server=False).cert)
    assert list(ext(srv, x509.ExtendedKeyUsage).value) == [ExtendedKeyUsageOID.SERVER_AUTH]
    assert list(ext(cli, x509.ExtendedKeyUsage).value) == [ExtendedKeyUsageOID.CLIENT_AUTH]
    with pytest.raises(CertsError, match="serverAuth, clientAuth or both"):
        certs.issue(tmp_path, name="n", server=False, client=False)


def test_issue_explicit_validity_for_expired_certificates(tmp_path: Path) -> None:
    certs.init_ca(tmp_path)
    start = dt.datetime(2020, 1, 1, tzinfo=dt.UTC)
    end = dt.datetime(2020, 2, 1, tzinfo=dt.UTC)
    cert = load_cert(certs.issue(tmp_path, name="old", not_before=start, not_after=end).cert)
    assert cert.not_valid_before_utc == start
    assert cert.not_valid_after_utc == end


def test_issue_default_validity(tmp_path: Path) -> None:
    certs.init_ca(tmp_path)
    cert = load_cert(certs.issue(tmp_path, name="x", days=30).cert)
    now = dt.datetime.now(dt.UTC)
    assert cert.not_valid_before_utc < now
    assert abs(cert.not_valid_after_utc - (now + dt.timedelta(days=30))) < dt.timedelta(minutes=1)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"spiffe_id": "http://example.org/x"}, "must start with spiffe://"),
        ({"spiffe_id": "spiffe://"}, "no trust domain"),
        ({"spiffe_id": "spiffe:///ns/x"}, "no trust domain"),
        ({"spiffe_id": "spiffe://Example.org/x"}, "trust domain"),
        ({"spiffe_id": "spiffe://example.org/a//b"}, "path segment"),
        ({"spiffe_id": "spiffe://example.org/a/../b"}, "path segment"),
        ({"spiffe_id": "spiffe://example.org/x?y=1"}, "path segment"),
        ({"spiffe_id": "spiffe://example.org/x/"}, "path segment"),
        ({"spiffe_id": "spiffe://example.org/x\n"}, "path segment"),
        ({"spiffe_id": "spiffe://example.org"}, "no workload path"),
        ({"spiffe_id": "spiffe://example.org:443/x"}, "trust domain"),
        ({"spiffe_id": "spiffe://user@example.org/x"}, "trust domain"),
        ({"ips": ["10.0.0.256"]}, "bad IP address"),
        ({"dns": ["bad name"]}, "bad DNS name"),
        ({"dns": ["a.*.b"]}, "bad DNS name"),
        ({"key_type": "dsa"}, "bad key type"),
        ({"days": 0}, "days must be positive"),
        ({"name": "../escape"}, "bad certificate name"),
        ({"name": ""}, "bad certificate name"),
        ({"name": "x\n"}, "bad certificate name"),
        ({"name": "ca"}, "overwrite the CA"),
    ],
)
def test_issue_rejects_bad_input(tmp_path: Path, kwargs: dict[str, object], message: str) -> None:
    certs.init_ca(tmp_path)
    args: dict[str, object] = {"name": "x", **kwargs}
    with pytest.raises(CertsError, match=message) as info:
        certs.issue(tmp_path, **args)  # type: ignore[arg-type]
    assert "\n" not in str(info.value)
    assert not (tmp_path / "x.key").exists()


def test_issue_without_ca(tmp_path: Path) -> None:
    with pytest.raises(CertsError, match=r"no CA here"):
        certs.issue(tmp_path, name="x")


def test_issue_with_mismatched_ca_key(tmp_path: Path) -> None:
    certs.init_ca(tmp_path / "a")
    certs.init_ca(tmp_path / "b")
    (tmp_path / "a" / "ca.key").write_bytes((tmp_path / "b" / "ca.key").read_bytes())
    with pytest.raises(CertsError, match=r"ca\.key: key does not match certificate"):
        certs.issue(tmp_path / "a", name="x")


def test_valid_spiffe_ids() -> None:
    assert certs.validate_spiffe_id("spiffe://cluster.local/ns/shop/sa/frontend") == "cluster.local"
    assert certs.validate_spiffe_id("spiffe://td/x") == "td"


# --------------------------------------------------------------------------- demo PKI + TLS


def test_demo_pki_layout(demo: DemoPki) -> None:
    assert demo.ca == demo.dir / "ca.crt"
    assert demo.rogue_ca == demo.dir / "rogue" / "ca.crt"
    for key in (demo.ca_key, demo.server.key, demo.client.key, demo.rogue_client.key):
        assert mode(key) == 0o600
    ca = load_cert(demo.ca)
    load_cert(demo.server.cert).verify_directly_issued_by(ca)
    load_cert(demo.client.cert).verify_directly_issued_by(ca)
    with pytest.raises(Exception):  # noqa: B017 - any verification failure
        load_cert(demo.rogue_client.cert).verify_directly_issued_by(ca)
    load_cert(demo.rogue_client.cert).verify_directly_issued_by(load_cert(demo.rogue_ca))
    assert certs.describe(demo.server.cert)["spiffe_id"] == certs.DEMO_SERVER_ID
    assert certs.describe(demo.server.cert)["ip"] == ["127.0.0.1"]
    assert certs.describe(demo.client.cert)["spiffe_id"] == certs.DEMO_CLIENT_ID


def test_mtls_handshake_between_demo_leafs(demo: DemoPki) -> None:
    server, client = handshake(
        server_context(demo.server, demo.ca), client_context(demo.client, demo.ca)
    )
    assert peer_uris(server) == [certs.DEMO_CLIENT_ID]
    assert peer_uris(client) == [certs.DEMO_SERVER_ID]


def test_server_certificate_is_valid_for_ip(demo: DemoPki) -> None:
    handshake(
        server_context(demo.server, demo.ca),
        client_context(demo.client, demo.ca),
        hostname="127.0.0.1",
    )


def test_rogue_client_is_refused(demo: DemoPki) -> None:
    with pytest.raises(ssl.SSLCertVerificationError, match="unable to get local issuer"):
        handshake(server_context(demo.server, demo.ca), client_context(demo.rogue_client, demo.ca))


def test_server_only_leaf_is_refused_as_client(tmp_path: Path, demo: DemoPki) -> None:
    server_only = certs.issue(demo.dir, tmp_path, name="srv-only", client=False)
    with pytest.raises(ssl.SSLCertVerificationError, match="unsuitable certificate purpose"):
        handshake(server_context(demo.server, demo.ca), client_context(server_only, demo.ca))


def test_client_refuses_server_from_other_ca(demo: DemoPki) -> None:
    with pytest.raises(ssl.SSLCertVerificationError):
        handshake(server_context(demo.server, demo.ca), client_context(demo.client, demo.rogue_ca))


# --------------------------------------------------------------------------- CRL


def test_crl_lists_serial_and_is_signed_by_ca(tmp_path: Path, demo: DemoPki) -> None:
    serial = load_cert(demo.client.cert).serial_number
    out = certs.write_crl(demo.dir, tmp_path / "ca.crl", [serial, 12345], days=3)
    crl = x509.load_pem_x509_crl(out.read_bytes())
    ca = load_cert(demo.ca)
    assert crl.issuer == ca.subject
    assert crl.is_signature_valid(ca.public_key())  # type: ignore[arg-type]
    assert crl.get_revoked_certificate_by_serial_number(serial) is not None
    assert crl.get_revoked_certificate_by_serial_number(12345) is not None
    assert crl.get_revoked_certificate_by_serial_number(54321) is None
    assert crl.next_update_utc is not None and crl.last_update_utc is not None
    assert crl.next_update_utc - dt.datetime.now(dt.UTC) > dt.timedelta(days=2)
    assert not crl.is_signature_valid(load_cert(demo.rogue_ca).public_key())  # type: ignore[arg-type]


def test_crl_numbers_increase(tmp_path: Path, demo: DemoPki) -> None:
    def number(path: Path) -> int:
        crl = x509.load_pem_x509_crl(path.read_bytes())
        return int(crl.extensions.get_extension_for_class(x509.CRLNumber).value.crl_number)

    first = number(certs.write_crl(demo.dir, tmp_path / "a.crl", []))
    second = number(certs.write_crl(demo.dir, tmp_path / "b.crl", []))
    assert second > first


def test_revoked_client_is_refused_and_unrevoked_accepted(tmp_path: Path, demo: DemoPki) -> None:
    serial = load_cert(demo.client.cert).serial_number
    revoked = certs.write_crl(demo.dir, tmp_path / "revoked.crl", [serial])
    with pytest.raises(ssl.SSLCertVerificationError, match="certificate revoked"):
        handshake(
            server_context(demo.server, demo.ca, crl=revoked), client_context(demo.client, demo.ca)
        )
    clean = certs.write_crl(demo.dir, tmp_path / "clean.crl", [])
    handshake(server_context(demo.server, demo.ca, crl=clean), client_context(demo.client, demo.ca))


# --------------------------------------------------------------------------- describe


def independent_spki_pin(key_path: Path) -> str:
    """The pin computed from the private key file, not from the certificate."""
    key = serialization.load_pem_private_key(key_path.read_bytes(), None)
    der = key.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    return base64.b64encode(hashlib.sha256(der).digest()).decode()


def test_describe_identity(tmp_path: Path) -> None:
    certs.init_ca(tmp_path)
    issued = certs.issue(
        tmp_path,
        name="api",
        spiffe_id="spiffe://td.example/ns/a/sa/api",
        dns=["api.local"],
        ips=["192.0.2.1"],
        o="acme",
        ou=["blue"],
    )
    facts = certs.describe(issued.cert)
    cert = load_cert(issued.cert)
    assert facts["spiffe_id"] == "spiffe://td.example/ns/a/sa/api"
    assert facts["trust_domain"] == "td.example"
    assert facts["uri"] == ["spiffe://td.example/ns/a/sa/api"]
    assert facts["dns"] == ["api.local"]
    assert facts["ip"] == ["192.0.2.1"]
    assert (facts["cn"], facts["o"], facts["ou"]) == ("api", ["acme"], ["blue"])
    assert facts["spiffe_path"] == "/ns/a/sa/api"
    assert facts["issuer_cn"] == "enforcer demo CA"
    assert facts["serial"] == format(cert.serial_number, "x")
    assert facts["not_after"] == cert.not_valid_after_utc.isoformat()
    assert facts["not_before"] == cert.not_valid_before_utc.isoformat()
    assert facts["spki_sha256"] == independent_spki_pin(issued.key)
    assert facts["is_ca"] is False
    assert facts["key"] == "EC secp256r1"
    assert facts["extended_key_usage"] == ["serverAuth", "clientAuth"]


def test_describe_agrees_with_rule_identity(demo: DemoPki) -> None:
    from enforcer.tlsconf.identity import identity_from_pem

    ident = identity_from_pem(demo.client.cert.read_bytes())
    facts = certs.describe(demo.client.cert)
    assert facts["spiffe_id"] == ident.spiffe_id == certs.DEMO_CLIENT_ID
    assert facts["trust_domain"] == ident.trust_domain == certs.DEMO_TRUST_DOMAIN
    assert facts["spki_sha256"] == ident.spki_sha256 == independent_spki_pin(demo.client.key)
    assert facts["serial"] == ident.serial
    assert facts["not_after"] == ident.not_after.isoformat()


def test_describe_without_sans_and_of_ca(tmp_path: Path) -> None:
    ca, key = certs.init_ca(tmp_path)
    facts = certs.describe(ca)
    assert facts["spiffe_id"] is None and facts["trust_domain"] is None
    assert facts["uri"] == [] and facts["dns"] == [] and facts["ip"] == []
    assert facts["is_ca"] is True
    assert facts["spki_sha256"] == independent_spki_pin(key)


def test_no_names_means_no_san_extension(tmp_path: Path) -> None:
    """A leaf issued with no SPIFFE ID, DNS name or IP carries no SubjectAlternativeName at
    all (cryptography >= 51 refuses an empty one, and real issuers never write one), and
    neither does the start-up check's throwaway self-signed certificate."""
    certs.init_ca(tmp_path)
    leaf = load_cert(certs.issue(tmp_path, name="plain").cert)
    cert_pem, _ = certs.self_signed_pem("throwaway")
    for cert in (leaf, x509.load_pem_x509_certificate(cert_pem)):
        with pytest.raises(x509.ExtensionNotFound):
            cert.extensions.get_extension_for_class(x509.SubjectAlternativeName)
    assert leaf.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == "plain"


def test_describe_reads_first_certificate_of_a_chain(tmp_path: Path, demo: DemoPki) -> None:
    chain = tmp_path / "chain.pem"
    chain.write_bytes(demo.server.cert.read_bytes() + demo.ca.read_bytes())
    facts = certs.describe(chain)
    assert facts["cn"] == "server" and facts["chain_length"] == 2


def test_describe_der(tmp_path: Path, demo: DemoPki) -> None:
    der = tmp_path / "server.der"
    der.write_bytes(load_cert(demo.server.cert).public_bytes(serialization.Encoding.DER))
    assert certs.describe(der)["spki_sha256"] == independent_spki_pin(demo.server.key)


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (b"", "file is empty"),
        (b"\n  \n", "file is empty"),
        (b"hello world\n", "not a PEM or DER certificate"),
        (b"-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n", "garbage PEM"),
        (b"-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----\n", "no certificate"),
    ],
)
def test_describe_bad_files(tmp_path: Path, content: bytes, message: str) -> None:
    path = tmp_path / "bad.pem"
    path.write_bytes(content)
    with pytest.raises(CertsError, match=message) as info:
        certs.describe(path)
    assert str(info.value).startswith(str(path))
    assert "\n" not in str(info.value)


def test_describe_missing_file_and_directory(tmp_path: Path) -> None:
    with pytest.raises(CertsError, match="no such file"):
        certs.describe(tmp_path / "nope.pem")
    with pytest.raises(CertsError, match="is a directory"):
        certs.describe(tmp_path)


@pytest.mark.skipif(os.geteuid() == 0, reason="root can read mode-000 files")
def test_describe_unreadable_file(tmp_path: Path, demo: DemoPki) -> None:
    path = tmp_path / "locked.pem"
    path.write_bytes(demo.server.cert.read_bytes())
    path.chmod(0)
    with pytest.raises(CertsError, match="cannot read"):
        certs.describe(path)
