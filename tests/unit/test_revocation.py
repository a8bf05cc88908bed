"""tlsconf.revocation: a CRL revokes a certificate by issuer and serial, not by serial
alone; several PEM CRLs in one file all count."""

from __future__ import annotations

from cryptography.hazmat.primitives.serialization import Encoding

from enforcer.tlsconf.identity import identity_from_der
from enforcer.tlsconf.revocation import is_revoked, revoked_set
from tests.e2e.tls_util import make_cert, make_crl


def test_revoked_by_issuer_and_serial() -> None:
    ca_a, ca_b = make_cert("CA A", ca=True), make_cert("CA B", ca=True)
    leaf = make_cert("leaf", issuer=ca_a)
    other = make_cert("other", issuer=ca_a)
    ident = identity_from_der(leaf.cert.public_bytes(Encoding.DER))
    assert ident.issuer_der == ca_a.cert.subject.public_bytes()
    serial = leaf.cert.serial_number
    assert is_revoked(ident, revoked_set(make_crl(ca_a, (serial,))))
    # the same serial on another CA's CRL revokes another certificate, not this one
    assert not is_revoked(ident, revoked_set(make_crl(ca_b, (serial,))))
    assert not is_revoked(ident, revoked_set(make_crl(ca_a, (other.cert.serial_number,))))
    both = make_crl(ca_b) + make_crl(ca_a, (serial,))
    assert is_revoked(ident, revoked_set(both))
    assert revoked_set(None) == frozenset() and revoked_set(b"") == frozenset()
    assert revoked_set(b"not a CRL") == frozenset()


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


class _Conn:
    """What CertWatch reads of a connection (the race below cannot be produced on purpose
    with real sockets: a handshake that began before a CRL reload and ends after it)."""

    def __init__(self, identity: object, tls: object) -> None:
        self.identity = identity
        self.flow_id = "f"
        self.listener = type("L", (), {"name": "in", "cfg": type("C", (), {"tls": tls})()})()
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
    ident = identity_from_der(leaf.cert.public_bytes(Encoding.DER))
    good_ident = identity_from_der(good.cert.public_bytes(Encoding.DER))
    material = type("M", (), {"fingerprint": "1",
                              "crl_pem": make_crl(ca, (leaf.cert.serial_number,))})()
    metrics = Metrics()
    watch = CertWatch(metrics, {"mesh": material})  # type: ignore[dict-item]
    tls = ListenerTlsConfig(material="mesh", close_on_revocation=True, close_on_expiry=True)
    late = _Conn(ident, tls)
    refused = watch.authenticated(late)  # type: ignore[arg-type]
    assert refused is not None and refused[0] == "revoked" and watch.by_identity == {}
    kept = _Conn(good_ident, tls)
    assert watch.authenticated(kept) is None  # type: ignore[arg-type]
    assert watch.timer is not None and watch.timer_at == good_ident.not_after.timestamp()
    assert watch.expire(now=good_ident.not_after.timestamp() - 1) == 0
    assert watch.expire(now=good_ident.not_after.timestamp()) == 1
    assert kept.closed == ["peer_certificate_expired"]
    off = _Conn(ident, dataclasses.replace(tls, close_on_revocation=False,
                                           close_on_expiry=False))
    assert watch.authenticated(off) is None and off.closed == []  # type: ignore[arg-type]
    assert metrics.registry.get_sample_value("enforcer_certificate_closes_total",
                                             {"listener": "in", "reason": "revoked"}) == 1
    watch.stop()
