"""tlsconf.revocation: a CRL revokes a certificate by issuer and serial, not by serial
alone; several PEM CRLs in one file all count."""

from __future__ import annotations

import ssl
from pathlib import Path

from cryptography.hazmat.primitives.serialization import Encoding

from enforcer.tlsconf import peerchain
from enforcer.tlsconf.identity import identity_from_der
from enforcer.tlsconf.revocation import CrlIndex, complete_chain, load_chain
from tests.e2e.tls_util import Issued, bio_handshake, make_cert, make_crl, write


def der(issued: Issued) -> bytes:
    return issued.cert.public_bytes(Encoding.DER)


def test_revoked_by_issuer_and_serial() -> None:
    ca_a, ca_b = make_cert("CA A", ca=True), make_cert("CA B", ca=True)
    leaf = make_cert("leaf", issuer=ca_a)
    other = make_cert("other", issuer=ca_a)
    ident = identity_from_der(der(leaf))
    assert ident.issuer_der == ca_a.cert.subject.public_bytes()
    serial = leaf.cert.serial_number
    chain = load_chain([der(leaf), der(ca_a)])
    assert chain.complete and chain is load_chain([der(leaf), der(ca_a)])  # shared
    assert CrlIndex(make_crl(ca_a, (serial,))).revoked_in(chain) == (0, chain.leaf)
    # the same serial on another CA's CRL revokes another certificate, not this one
    assert CrlIndex(make_crl(ca_b, (serial,))).revoked_in(chain) is None
    assert CrlIndex(make_crl(ca_a, (other.cert.serial_number,))).revoked_in(chain) is None
    both = make_crl(ca_b) + make_crl(ca_a, (serial,))
    assert CrlIndex(both).revoked_in(chain) is not None
    assert not CrlIndex(None) and not CrlIndex(b"") and not CrlIndex(b"not a CRL")


def test_an_intermediate_is_looked_up_on_its_issuers_crl_with_its_signature() -> None:
    root = make_cert("root", ca=True, path_length=1)
    inter = make_cert("inter", issuer=root, ca=True, path_length=0)
    leaf = make_cert("leaf", issuer=inter)
    chain = load_chain([der(leaf), der(inter), der(root)])
    assert CrlIndex(make_crl(root, (inter.cert.serial_number,))).revoked_in(chain) == (
        1, chain.certs[1])
    # a CRL under the root's name but signed by another key revokes nothing
    impostor = make_cert("root", ca=True)
    assert CrlIndex(make_crl(impostor, (inter.cert.serial_number,))).revoked_in(chain) is None
    # the root itself is a trust anchor: never looked up
    assert CrlIndex(make_crl(root, (root.cert.serial_number,))).revoked_in(chain) is None
    # expiry: the earliest notAfter of the chain
    short = make_cert("short inter", issuer=root, ca=True, path_length=0, days=1)
    under = make_cert("under", issuer=short)
    depth, cert = load_chain([der(under), der(short), der(root)]).earliest
    assert depth == 1 and cert.not_after == short.cert.not_valid_after_utc


def test_complete_chain_by_name_and_signature() -> None:
    root = make_cert("root", ca=True, path_length=1)
    inter = make_cert("inter", issuer=root, ca=True, path_length=0)
    namesake = make_cert("inter", issuer=root, ca=True, path_length=0)  # same name, other key
    leaf = make_cert("leaf", issuer=inter)
    chain = complete_chain(der(leaf), [der(namesake), der(inter)], [root.cert])
    assert chain.complete
    assert [c.sha256 for c in chain.certs] == [load_chain([d]).leaf.sha256
                                               for d in (der(leaf), der(inter), der(root))]
    partial = complete_chain(der(leaf), [], [root.cert])  # the intermediate is unknown
    assert not partial.complete and len(partial.certs) == 1


def _contexts(tmp: Path, root: Issued, inter: Issued, server: Issued,
              client: Issued, *, tickets: bool) -> tuple[ssl.SSLContext, ssl.SSLContext]:
    sctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    sctx.load_cert_chain(write(tmp / "s.crt", server.cert_pem),
                         write(tmp / "s.key", server.key_pem))
    sctx.load_verify_locations(write(tmp / "root.crt", root.cert_pem))
    sctx.verify_mode = ssl.CERT_REQUIRED
    if not tickets:
        sctx.options |= ssl.OP_NO_TICKET  # the server's session cache keeps the chain
    cctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    cctx.load_verify_locations(str(tmp / "root.crt"))
    cctx.load_cert_chain(write(tmp / "c.crt", client.cert_pem + inter.cert_pem),
                         write(tmp / "c.key", client.key_pem))
    return sctx, cctx


def test_peer_chain_of_real_handshakes_full_and_resumed(tmp_path: Path) -> None:
    root = make_cert("root", ca=True, path_length=1)
    inter = make_cert("inter", issuer=root, ca=True, path_length=0)
    server = make_cert("server", issuer=root, dns=("localhost",))
    client = make_cert("client", issuer=inter)
    for tickets in (True, False):
        sctx, cctx = _contexts(tmp_path, root, inter, server, client, tickets=tickets)
        s, c = bio_handshake(sctx, cctx, server_hostname="localhost")
        assert peerchain.verified(s) == [der(client), der(inter), der(root)]
        again, _ = bio_handshake(sctx, cctx, server_hostname="localhost", session=c.session)
        assert again.session_reused
        assert peerchain.verified(again) is None  # OpenSSL verified nothing this time
        sent = peerchain.sent(again)
        if tickets:
            assert sent is None  # a stateless ticket does not carry the chain
        else:
            assert sent == [der(client), der(inter)]
            rebuilt = complete_chain(der(client), sent, [root.cert])
            assert rebuilt.complete and len(rebuilt.certs) == 3


def test_close_keys_need_client_certificates() -> None:
    import pytest

    from enforcer.config.errors import ConfigError
    from enforcer.config.loader import parse_config

    def cfg(tls: dict[str, object]) -> dict[str, object]:
        return {"version": 1, "tls": {"m": {"cert": "c", "key": "k", "ca": "a"}},
                "listeners": [{"name": "in", "listen": "127.0.0.1:0", "tls": tls,
                               "ruleset": "rs", "upstream": "u"}],
                "upstreams": {"u": {"address": "127.0.0.1:1"}},
                "rulesets": {"rs": {"default": "allow"}}}

    for tls, key in (({"mode": "off", "close_on_revocation": True}, "close_on_revocation"),
                     ({"mode": "terminate", "material": "m", "client_auth": "none",
                       "close_on_expiry": True}, "close_on_expiry")):
        with pytest.raises(ConfigError) as err:
            parse_config(cfg(tls))
        assert any(i.path == f"listeners[0].tls.{key}" and "needs client certificates"
                   in i.message for i in err.value.issues), err.value.issues
    with pytest.raises(ConfigError) as err:
        parse_config(cfg({"mode": "terminate", "material": "m", "close_on_expiry": "yes"}))
    assert any(i.path == "listeners[0].tls.close_on_expiry" for i in err.value.issues)
    with pytest.raises(ConfigError) as err:
        parse_config(cfg({"mode": "terminate", "material": "m", "close_on_revocation": True}))
    assert any(i.path == "listeners[0].tls.close_on_revocation" and "has no crl" in i.message
               for i in err.value.issues), err.value.issues
    with_crl = cfg({"mode": "terminate", "material": "m", "close_on_revocation": True,
                    "close_on_expiry": True})
    with_crl["tls"] = {"m": {"cert": "c", "key": "k", "ca": "a", "crl": "r"}}
    ok = parse_config(with_crl)
    assert ok.listeners[0].tls.close_on_revocation and ok.listeners[0].tls.close_on_expiry


class _Ssl:
    """The public calls peerchain uses of an SSLObject (Python 3.13's)."""

    def __init__(self, chain: list[bytes] | None) -> None:
        self.chain = chain

    def getpeercert(self, binary_form: bool) -> bytes | None:
        return self.chain[0] if self.chain else None

    def get_verified_chain(self) -> list[bytes]:
        return self.chain or []


class _Engine:
    def __init__(self, chain: list[bytes], verified: bool) -> None:
        self.leaf = chain[0]
        self.obj = _Ssl(chain if verified else None)

    def peer_cert_der(self) -> bytes:
        return self.leaf


class _Conn:
    """What CertWatch reads of a connection (the race below cannot be produced on purpose
    with real sockets: a handshake that began before a CRL reload and ends after it)."""

    def __init__(self, identity: object, tls: object, chain: list[bytes],
                 verified: bool = True) -> None:
        self.identity = identity
        self.flow_id = "f"
        self.listener = type("L", (), {"name": "in", "cfg": type("C", (), {"tls": tls})()})()
        self.client = type("S", (), {"tls": _Engine(chain, verified)})()
        self.closed: list[str] = []

    def certificate_closed(self, reason: str, detail: str) -> None:
        self.closed.append(reason)


async def test_certwatch_checks_the_crl_in_use_and_sweeps_expiry() -> None:
    import dataclasses

    from enforcer.config.model import ListenerTlsConfig
    from enforcer.dataplane.certwatch import CertWatch
    from enforcer.observe.metrics import Metrics

    ca = make_cert("CA A", ca=True)
    leaf, good = make_cert("leaf", issuer=ca), make_cert("good", issuer=ca)
    ident = identity_from_der(der(leaf))
    good_ident = identity_from_der(der(good))
    material = type("M", (), {"fingerprint": "1", "ca_pem": ca.cert_pem,
                              "crl_pem": make_crl(ca, (leaf.cert.serial_number,))})()
    metrics = Metrics()
    watch = CertWatch(metrics, {"mesh": material})  # type: ignore[dict-item]
    tls = ListenerTlsConfig(material="mesh", close_on_revocation=True, close_on_expiry=True)
    late = _Conn(ident, tls, [der(leaf), der(ca)])
    refused = watch.authenticated(late)  # type: ignore[arg-type]
    assert refused is not None and refused[0] == "revoked" and watch.by_chain == {}
    # a resumed session (no verified chain) of the same leaf: the chain remembered
    resumed = _Conn(ident, tls, [der(leaf)], verified=False)
    assert watch.authenticated(resumed) == refused  # type: ignore[arg-type]
    kept = _Conn(good_ident, tls, [der(good), der(ca)])
    assert watch.authenticated(kept) is None  # type: ignore[arg-type]
    assert watch.timer is not None and watch.timer_at == min(
        good.cert.not_valid_after_utc, ca.cert.not_valid_after_utc).timestamp()
    assert watch.timer_at is not None
    assert watch.expire(now=watch.timer_at - 1) == 0
    assert watch.expire(now=watch.timer_at) == 1
    assert kept.closed == ["peer_certificate_expired"]
    off = _Conn(ident, dataclasses.replace(tls, close_on_revocation=False,
                                           close_on_expiry=False), [der(leaf), der(ca)])
    assert watch.authenticated(off) is None and off.closed == []  # type: ignore[arg-type]
    assert metrics.registry.get_sample_value("enforcer_certificate_closes_total",
                                             {"listener": "in", "reason": "revoked"}) == 2
    watch.stop()


async def test_certwatch_rebuilds_a_resumed_chain_from_the_trust_bundle() -> None:
    from enforcer.config.model import ListenerTlsConfig
    from enforcer.dataplane.certwatch import CertWatch
    from enforcer.observe.metrics import Metrics

    root = make_cert("root", ca=True, path_length=1)
    inter = make_cert("inter", issuer=root, ca=True, path_length=0)
    leaf = make_cert("leaf", issuer=inter)
    crl = make_crl(root, (inter.cert.serial_number,)) + make_crl(inter)
    material = type("M", (), {"fingerprint": "1", "crl_pem": crl,
                              "ca_pem": root.cert_pem + inter.cert_pem})()
    watch = CertWatch(Metrics(), {"mesh": material})  # type: ignore[dict-item]
    tls = ListenerTlsConfig(material="mesh", close_on_revocation=True)
    conn = _Conn(identity_from_der(der(leaf)), tls, [der(leaf)], verified=False)
    refused = watch.authenticated(conn)  # type: ignore[arg-type]
    assert refused is not None and refused[0] == "revoked" and "'CN=inter'" in refused[1]
    watch.stop()
