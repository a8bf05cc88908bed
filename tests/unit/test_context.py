"""tlsconf.context: secure defaults, resumption that keeps the peer identity, CRL chains.

Handshakes run between real OpenSSL contexts over memory BIOs (no sockets, no loop)."""

from __future__ import annotations

import ssl
from pathlib import Path

import pytest

from enforcer.config.errors import ConfigError
from enforcer.config.loader import parse_config
from enforcer.config.model import CIPHER_SUITES
from enforcer.tlsconf.context import (
    build_client_context,
    build_server_context,
    tls13_suites,
)
from enforcer.tlsconf.identity import identity_from_der
from enforcer.tlsconf.material import LoadedMaterial, MaterialError, load_material
from tests.e2e.tls_util import (
    ChainPki,
    Issued,
    bio_handshake,
    make_cert,
    make_crl,
    material_cfg,
    write,
)


@pytest.fixture(scope="module")
def pkis() -> tuple[Issued, Issued, Issued]:
    root = make_cert("ctx root CA", ca=True)
    server = make_cert("server", issuer=root, dns=("localhost",), uri=("spiffe://t/ns/a/sa/server",))
    client = make_cert("client", issuer=root, uri=("spiffe://t/ns/a/sa/client",))
    return root, server, client


def _material(tmp: Path, leaf: Issued, root: Issued, name: str, **kw: object) -> LoadedMaterial:
    return load_material(material_cfg(
        name, cert=write(tmp / f"{name}.crt", leaf.cert_pem),
        key=write(tmp / f"{name}.key", leaf.key_pem),
        ca=write(tmp / f"{name}-ca.crt", root.cert_pem), **kw))  # type: ignore[arg-type]


@pytest.fixture
def server_m(tmp_path: Path, pkis: tuple[Issued, Issued, Issued]) -> LoadedMaterial:
    return _material(tmp_path, pkis[1], pkis[0], "srv")


@pytest.fixture
def client_m(tmp_path: Path, pkis: tuple[Issued, Issued, Issued]) -> LoadedMaterial:
    return _material(tmp_path, pkis[2], pkis[0], "cli")


# --------------------------------------------------------------------------- defaults


def _tls12_ciphers(ctx: ssl.SSLContext) -> list[str]:
    return [c["name"] for c in ctx.get_ciphers() if c["protocol"] == "TLSv1.2"]


def test_every_context_has_the_secure_defaults(server_m: LoadedMaterial,
                                               client_m: LoadedMaterial) -> None:
    contexts = [build_server_context(server_m, auth) for auth in ("required", "optional", "none")]
    contexts += [build_client_context(client_m, mutual=m, check_hostname=h)
                 for m in (True, False) for h in (True, False)]
    contexts.append(build_client_context(None, mutual=False, check_hostname=True))
    for ctx in contexts:
        assert ctx.minimum_version == ssl.TLSVersion.TLSv1_2
        assert ctx.options & ssl.OP_NO_COMPRESSION
        assert ctx.options & ssl.OP_NO_RENEGOTIATION
        assert not ctx.options & ssl.OP_NO_TICKET  # resumption on
        names = _tls12_ciphers(ctx)
        assert names, "no TLS 1.2 suite at all"
        for name in names:
            assert name.startswith("ECDHE-") and ("-GCM-" in name or "CHACHA20" in name), name
        tls13 = [c for c in ctx.get_ciphers() if c["protocol"] == "TLSv1.3"]
        assert all(c["aead"] for c in tls13)


def test_tls12_suites_follow_cipher_suites(tmp_path: Path, pkis: tuple[Issued, Issued, Issued],
                                           server_m: LoadedMaterial,
                                           client_m: LoadedMaterial) -> None:
    assert _tls12_ciphers(build_server_context(server_m, "required")) == [
        "ECDHE-ECDSA-AES128-GCM-SHA256", "ECDHE-RSA-AES128-GCM-SHA256",
        "ECDHE-ECDSA-AES256-GCM-SHA384", "ECDHE-RSA-AES256-GCM-SHA384",
        "ECDHE-ECDSA-CHACHA20-POLY1305", "ECDHE-RSA-CHACHA20-POLY1305"]
    root, server, _ = pkis
    chacha = _material(tmp_path, server, root, "chacha",
                       cipher_suites=("TLS_CHACHA20_POLY1305_SHA256",))
    sctx = build_server_context(chacha, "required")
    assert _tls12_ciphers(sctx) == ["ECDHE-ECDSA-CHACHA20-POLY1305",
                                    "ECDHE-RSA-CHACHA20-POLY1305"]
    cctx = build_client_context(client_m, mutual=True, check_hostname=False)
    cctx.maximum_version = ssl.TLSVersion.TLSv1_2
    s, _c = bio_handshake(sctx, cctx)
    assert s.cipher()[0] == "ECDHE-ECDSA-CHACHA20-POLY1305"  # type: ignore[index]
    assert tls13_suites(chacha) == "TLS_CHACHA20_POLY1305_SHA256"
    assert tls13_suites(None) == "TLS_AES_128_GCM_SHA256:TLS_AES_256_GCM_SHA384:" \
                                 "TLS_CHACHA20_POLY1305_SHA256"


CIPHER_BASE = {
    "version": 1, "node": {"name": "t"},
    "listeners": [{"name": "in", "listen": "127.0.0.1:0", "tls": {"mode": "off"},
                   "ruleset": "r", "upstream": "app"}],
    "upstreams": {"app": {"address": "127.0.0.1:8080"}},
    "rulesets": {"r": {"default": "allow"}},
}


def _cipher_cfg(suites: object) -> dict[str, object]:
    return {**CIPHER_BASE, "tls": {"mesh": {"ca": "/x/ca.crt", "cipher_suites": suites}}}


@pytest.mark.parametrize(("suites", "parsed"), [
    (None, CIPHER_SUITES),
    (["TLS_AES_256_GCM_SHA384"], ("TLS_AES_256_GCM_SHA384",)),
    ("TLS_CHACHA20_POLY1305_SHA256", ("TLS_CHACHA20_POLY1305_SHA256",)),
    (list(reversed(CIPHER_SUITES)), tuple(reversed(CIPHER_SUITES))),
])
def test_cipher_suites_config(suites: object, parsed: tuple[str, ...]) -> None:
    assert parse_config(_cipher_cfg(suites)).tls["mesh"].cipher_suites == parsed


@pytest.mark.parametrize(("suites", "issue"), [
    ([], "tls.mesh.cipher_suites: needs at least one of TLS_AES_128_GCM_SHA256, "
         "TLS_AES_256_GCM_SHA384, TLS_CHACHA20_POLY1305_SHA256"),
    (["TLS_AES_128_GCM_SHA256", "ECDHE-ECDSA-AES128-SHA"],
     "tls.mesh.cipher_suites[1]: unknown cipher suite 'ECDHE-ECDSA-AES128-SHA'; one of "
     "TLS_AES_128_GCM_SHA256, TLS_AES_256_GCM_SHA384, TLS_CHACHA20_POLY1305_SHA256"),
    ("TLS_AES_128_CCM_SHA256", "tls.mesh.cipher_suites: unknown cipher suite "
     "'TLS_AES_128_CCM_SHA256'; one of TLS_AES_128_GCM_SHA256, TLS_AES_256_GCM_SHA384, "
     "TLS_CHACHA20_POLY1305_SHA256"),
    (["TLS_AES_256_GCM_SHA384", "TLS_AES_256_GCM_SHA384"],
     "tls.mesh.cipher_suites[1]: TLS_AES_256_GCM_SHA384 is listed twice"),
    ({"a": 1}, "tls.mesh.cipher_suites: expected a string, got a mapping"),
])
def test_cipher_suites_config_errors(suites: object, issue: str) -> None:
    with pytest.raises(ConfigError) as exc:
        parse_config(_cipher_cfg(suites))
    assert [str(i) for i in exc.value.issues] == [issue]


def test_verification_modes(server_m: LoadedMaterial, client_m: LoadedMaterial) -> None:
    assert build_server_context(server_m, "required").verify_mode == ssl.CERT_REQUIRED
    assert build_server_context(server_m, "optional").verify_mode == ssl.CERT_OPTIONAL
    for mutual in (True, False):
        for hostname in (True, False):
            ctx = build_client_context(client_m, mutual=mutual, check_hostname=hostname)
            assert ctx.verify_mode == ssl.CERT_REQUIRED and ctx.check_hostname is hostname


def test_min_version_13(tmp_path: Path, pkis: tuple[Issued, Issued, Issued],
                        client_m: LoadedMaterial) -> None:
    root, server, _ = pkis
    strict = _material(tmp_path, server, root, "strict", min_version="1.3")
    sctx = build_server_context(strict, "required")
    assert sctx.minimum_version == ssl.TLSVersion.TLSv1_3
    old = build_client_context(client_m, mutual=True, check_hostname=False)
    old.maximum_version = ssl.TLSVersion.TLSv1_2
    with pytest.raises(ssl.SSLError, match=r"(?i)unsupported protocol|version"):
        bio_handshake(sctx, old)
    new = build_client_context(client_m, mutual=True, check_hostname=False)
    s, _c = bio_handshake(sctx, new)
    assert s.version() == "TLSv1.3"


def test_weak_tls12_client_suites_are_refused(server_m: LoadedMaterial,
                                              client_m: LoadedMaterial) -> None:
    sctx = build_server_context(server_m, "required")
    for weak in ("ECDHE-ECDSA-AES128-SHA", "AES128-GCM-SHA256", "ECDHE-ECDSA-AES256-SHA384"):
        cctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        cctx.check_hostname = False
        cctx.verify_mode = ssl.CERT_NONE
        cctx.maximum_version = ssl.TLSVersion.TLSv1_2
        cctx.set_ciphers(weak + ":@SECLEVEL=0")
        with pytest.raises(ssl.SSLError, match=r"(?i)no shared cipher|handshake failure"):
            bio_handshake(sctx, cctx)
    ok = build_client_context(client_m, mutual=True, check_hostname=False)
    ok.maximum_version = ssl.TLSVersion.TLSv1_2
    s, _c = bio_handshake(sctx, ok)
    assert s.version() == "TLSv1.2" and s.cipher() is not None
    assert s.cipher()[0].startswith("ECDHE-ECDSA-")  # type: ignore[index]


def test_client_auth_none_needs_no_ca_and_asks_nothing(tmp_path: Path,
                                                       pkis: tuple[Issued, Issued, Issued],
                                                       client_m: LoadedMaterial) -> None:
    _root, server, _ = pkis
    no_ca = load_material(material_cfg("bare", cert=write(tmp_path / "b.crt", server.cert_pem),
                                       key=write(tmp_path / "b.key", server.key_pem)))
    sctx = build_server_context(no_ca, "none")
    with pytest.raises(MaterialError, match=r"tls\.bare\.ca: client_auth required needs a CA"):
        build_server_context(no_ca, "required")
    s, c = bio_handshake(sctx, build_client_context(client_m, mutual=True, check_hostname=True),
                         server_hostname="localhost")
    assert s.getpeercert(binary_form=True) is None and c.getpeercert(binary_form=True)


def test_hostname_is_checked_in_client_mode(server_m: LoadedMaterial,
                                            client_m: LoadedMaterial) -> None:
    sctx = build_server_context(server_m, "required")
    cctx = build_client_context(client_m, mutual=True, check_hostname=True)
    with pytest.raises(ssl.SSLCertVerificationError, match=r"(?i)hostname"):
        bio_handshake(sctx, cctx, server_hostname="not-localhost.example")


# --------------------------------------------------------------------------- resumption


@pytest.mark.parametrize("version", [ssl.TLSVersion.TLSv1_2, ssl.TLSVersion.TLSv1_3])
def test_resumption_keeps_the_peer_identity(server_m: LoadedMaterial, client_m: LoadedMaterial,
                                            version: ssl.TLSVersion) -> None:
    sctx = build_server_context(server_m, "required")
    cctx = build_client_context(client_m, mutual=True, check_hostname=False)
    cctx.maximum_version = version
    s1, c1 = bio_handshake(sctx, cctx)
    session = c1.session
    assert session is not None and session.has_ticket
    s2, c2 = bio_handshake(sctx, cctx, session=session)
    assert c2.session_reused and s2.session_reused
    assert s2.version() == s1.version() == version.name.replace("v1_", "v1.")
    # both sides still see who the peer is: rules and verify.* have their input
    client_id = identity_from_der(s2.getpeercert(binary_form=True) or b"")
    server_id = identity_from_der(c2.getpeercert(binary_form=True) or b"")
    assert client_id.spiffe_id == "spiffe://t/ns/a/sa/client"
    assert server_id.spiffe_id == "spiffe://t/ns/a/sa/server"


def test_a_new_server_context_has_new_ticket_keys(server_m: LoadedMaterial,
                                                  client_m: LoadedMaterial) -> None:
    cctx = build_client_context(client_m, mutual=True, check_hostname=False)
    _s, c1 = bio_handshake(build_server_context(server_m, "required"), cctx)
    s2, c2 = bio_handshake(build_server_context(server_m, "required"), cctx, session=c1.session)
    assert not c2.session_reused and not s2.session_reused  # full handshake, full checks
    assert s2.getpeercert(binary_form=True) is not None


def test_a_session_belongs_to_its_client_context(server_m: LoadedMaterial,
                                                 client_m: LoadedMaterial) -> None:
    # Why a reload clears the per-upstream session cache with the context.
    sctx = build_server_context(server_m, "required")
    _s, c1 = bio_handshake(sctx, build_client_context(client_m, mutual=True, check_hostname=False))
    other = build_client_context(client_m, mutual=True, check_hostname=False)
    with pytest.raises(ValueError, match="different SSLContext"):
        bio_handshake(sctx, other, session=c1.session)


# --------------------------------------------------------------------------- CRL


def _crl_server(tmp: Path, pki: ChainPki, ca_pem: bytes, crl_pem: bytes) -> ssl.SSLContext:
    m = load_material(material_cfg(
        "crl", cert=write(tmp / "s.crt", pki.server.cert_pem + pki.inter.cert_pem),
        key=write(tmp / "s.key", pki.server.key_pem), ca=write(tmp / "ca.crt", ca_pem),
        crl=write(tmp / "crl.pem", crl_pem)))
    ctx = build_server_context(m, "required")
    assert ctx.verify_flags & ssl.VERIFY_CRL_CHECK_CHAIN
    return ctx


def _chain_client(tmp: Path, pki: ChainPki, leaf: Issued) -> ssl.SSLContext:
    m = load_material(material_cfg(
        "cc", cert=write(tmp / "c.crt", leaf.cert_pem + pki.inter.cert_pem),
        key=write(tmp / "c.key", leaf.key_pem), ca=write(tmp / "cca.crt", pki.root.cert_pem)))
    return build_client_context(m, mutual=True, check_hostname=False)


def test_crl_chain_check(tmp_path: Path) -> None:
    pki = ChainPki.create()
    revoked_leaf = make_cert("revoked", issuer=pki.inter)
    root_crl = make_crl(pki.root)
    inter_crl = make_crl(pki.inter, (revoked_leaf.cert.serial_number,))
    sctx = _crl_server(tmp_path, pki, pki.root.cert_pem, inter_crl + root_crl)
    s, _c = bio_handshake(sctx, _chain_client(tmp_path, pki, pki.client))
    assert s.getpeercert(binary_form=True) is not None
    with pytest.raises(ssl.SSLError, match="certificate revoked"):
        bio_handshake(sctx, _chain_client(tmp_path, pki, revoked_leaf))


def test_crl_revoked_intermediate_refuses_its_leaves(tmp_path: Path) -> None:
    pki = ChainPki.create()
    crls = make_crl(pki.inter) + make_crl(pki.root, (pki.inter.cert.serial_number,))
    sctx = _crl_server(tmp_path, pki, pki.root.cert_pem, crls)
    with pytest.raises(ssl.SSLError, match="certificate revoked"):
        bio_handshake(sctx, _chain_client(tmp_path, pki, pki.client))


def test_crl_missing_for_an_intermediate_refuses_everyone(tmp_path: Path) -> None:
    # Documented: with the chain checked, every CA of the peer's chain needs a CRL.
    pki = ChainPki.create()
    sctx = _crl_server(tmp_path, pki, pki.root.cert_pem, make_crl(pki.root))
    with pytest.raises(ssl.SSLError, match="unable to get certificate CRL"):
        bio_handshake(sctx, _chain_client(tmp_path, pki, pki.client))


def test_crl_single_level_ca_needs_only_its_crl(tmp_path: Path,
                                                pkis: tuple[Issued, Issued, Issued],
                                                client_m: LoadedMaterial) -> None:
    root, server, client = pkis
    ok = _material(tmp_path, server, root, "one", crl=write(tmp_path / "c1.pem", make_crl(root)))
    bio_handshake(build_server_context(ok, "required"),
                  build_client_context(client_m, mutual=True, check_hostname=False))
    revoked = _material(tmp_path, server, root, "two",
                        crl=write(tmp_path / "c2.pem", make_crl(root, (client.cert.serial_number,))))
    with pytest.raises(ssl.SSLError, match="certificate revoked"):
        bio_handshake(build_server_context(revoked, "required"),
                      build_client_context(client_m, mutual=True, check_hostname=False))
