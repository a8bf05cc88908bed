"""Rules over identity and network facts, end to end: real certificates of several
identities through a real listener. The allowed identity's bytes get through both ways;
every other peer is refused before any upstream connection, with a flow record naming
the rule (or the default) and a count in enforcer_policy_decisions_total."""

from __future__ import annotations

import base64
import hashlib
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from enforcer.tlsconf.certs import IssuedPaths
from tests.e2e.harness import (
    Backend,
    Enforcer,
    exchange,
    inbound_cfg,
    outbound_cfg,
    random_bytes,
    running,
    sha,
)
from tests.e2e.policy_util import (
    FRONTEND_ID,
    OPS_ID,
    ctx_for,
    decisions,
    issue_identity,
    refused,
    tls_exchange,
    wait_until,
)
from tests.e2e.tls_util import openssl_issued


def spki_pin(cert: Path) -> str:
    pub = x509.load_pem_x509_certificate(cert.read_bytes()).public_key()
    der = pub.public_bytes(Encoding.DER, PublicFormat.SubjectPublicKeyInfo)
    return base64.b64encode(hashlib.sha256(der).digest()).decode()


def identities(pki: Any, out: Path) -> dict[str, IssuedPaths]:
    return {
        "frontend": issue_identity(pki, out, "frontend", spiffe_id=FRONTEND_ID),
        # the same SPIFFE ID on a key that leaked: pinned by a deny rule
        "leaked": issue_identity(pki, out, "leaked", spiffe_id=FRONTEND_ID),
        # no SPIFFE ID: an operator certificate matched by OU and DNS wildcard
        "ops": issue_identity(pki, out, "ops-laptop", ou=["ops"], dns=["laptop7.ops.internal"]),
        "ops-runner": issue_identity(pki, out, "runner", spiffe_id=OPS_ID),
        "no-san": issue_identity(pki, out, "bare"),  # CN only, no SAN at all
    }


def rules(leaked_pin: str) -> list[dict[str, Any]]:
    return [
        {"name": "quarantine", "action": "deny", "from": {"cidrs": ["127.0.0.66/32", "fd00:66::/32"]}},
        {"name": "leaked-key", "action": "deny", "from": {"spki_sha256": [leaked_pin]}},
        {"name": "frontend", "action": "allow",
         "from": {"identities": ["spiffe://enforcer.demo/ns/shop/sa/*"],
                  "cidrs": ["127.0.0.0/8", "::1/128"]}},
        {"name": "ops-by-ou", "action": "allow",
         "from": {"ou": ["ops"], "dns": ["*.ops.internal"]}, "to": {"listeners": ["inbound"]}},
        {"name": "ops-workloads", "action": "allow",
         "from": {"trust_domains": ["enforcer.demo"], "identities": ["spiffe://*/ns/ops/**"]},
         "to": {"listeners": ["inbound6"]}},
    ]


def two_listeners(pki: Any, backend_port: int, leaked_pin: str) -> dict[str, Any]:
    cfg = inbound_cfg(pki, backend_port, rules=rules(leaked_pin))
    v6 = dict(cfg["listeners"][0], name="inbound6", listen="[::1]:0")
    cfg["listeners"].append(v6)
    return cfg


async def test_identities_and_addresses_decide_per_connection(pki: Any, tmp_path: Path) -> None:
    ids = identities(pki, tmp_path / "ids")
    backend = await Backend(mode="echo").start()
    enforcer = await Enforcer(two_listeners(pki, backend.port,
                                            spki_pin(ids["leaked"].cert))).start()
    v4, v6 = enforcer.port("inbound"), enforcer.port("inbound6")
    async with running(enforcer, backend):
        allowed = [("frontend", v4, "127.0.0.1", None), ("frontend", v6, "::1", None),
                   ("ops", v4, "127.0.0.1", None), ("ops-runner", v6, "::1", None)]
        for who, port, host, local in allowed:
            payload = random_bytes(200_000)
            got = await tls_exchange(port, payload, ctx_for(pki, ids[who]), host=host,
                                     local_ip=local)
            assert sha(got) == sha(payload), who
        assert backend.connections == len(allowed)
        await enforcer.wait_flows(len(allowed))

        denied = [
            ("frontend", v4, "127.0.0.1", "127.0.0.66"),  # deny beats the frontend allow
            ("leaked", v4, "127.0.0.1", None),  # pinned key: deny beats the identity glob
            ("ops-runner", v4, "127.0.0.1", None),  # its rule is for inbound6 only
            ("ops", v6, "::1", None),  # and this one for inbound only
            ("no-san", v4, "127.0.0.1", None),  # no rule matches: default deny
        ]
        for who, port, host, local in denied:
            assert await refused(port, ctx_for(pki, ids[who]), host=host, local_ip=local) == b""
        records = await enforcer.wait_flows(len(allowed) + len(denied))
        assert backend.connections == len(allowed), "a denied peer reached the upstream"

    by_rule = [(r["listener"], r["action"], r["rule"], r["reason"], r["close"])
               for r in records]
    assert sorted(by_rule[:len(allowed)]) == sorted([
        ("inbound", "allow", "frontend", "rule", "client_fin"),
        ("inbound6", "allow", "frontend", "rule", "client_fin"),
        ("inbound", "allow", "ops-by-ou", "rule", "client_fin"),
        ("inbound6", "allow", "ops-workloads", "rule", "client_fin"),
    ])
    assert by_rule[len(allowed):] == [
        ("inbound", "deny", "quarantine", "rule", "denied"),
        ("inbound", "deny", "leaked-key", "rule", "denied"),
        ("inbound", "deny", None, "default", "denied"),
        ("inbound6", "deny", None, "default", "denied"),
        ("inbound", "deny", None, "default", "denied"),
    ]
    for rec in records[len(allowed):]:
        assert rec["upstream"] is None and rec["bytes"]["to_client"] == 0
    quarantined = records[len(allowed)]
    assert quarantined["client"]["ip"] == "127.0.0.66"
    assert quarantined["tls"]["peer"]["spiffe_id"] == FRONTEND_ID
    assert records[-1]["tls"]["peer"]["spiffe_id"] is None
    assert records[-1]["tls"]["peer"]["cn"] == "bare"

    m = enforcer.metrics
    assert decisions(m, "inbound", "inbound", "frontend", "allow") == 1
    assert decisions(m, "inbound6", "inbound", "frontend", "allow") == 1
    assert decisions(m, "inbound", "inbound", "ops-by-ou", "allow") == 1
    assert decisions(m, "inbound6", "inbound", "ops-workloads", "allow") == 1
    assert decisions(m, "inbound", "inbound", "quarantine", "deny") == 1
    assert decisions(m, "inbound", "inbound", "leaked-key", "deny") == 1
    assert decisions(m, "inbound", "inbound", "", "deny") == 2
    assert decisions(m, "inbound6", "inbound", "", "deny") == 1


async def test_plaintext_rules_and_mtls_rules_on_one_auto_listener(pki: Any,
                                                                   tmp_path: Path) -> None:
    """tls: none vs tls: required on a listener that takes both; a client that skips its
    certificate on TLS is neither."""
    frontend = issue_identity(pki, tmp_path, "frontend", spiffe_id=FRONTEND_ID)
    backend = await Backend(mode="echo").start()
    cfg = inbound_cfg(pki, backend.port, mode="auto", client_auth="optional", rules=[
        {"name": "plain-from-loopback", "action": "allow",
         "from": {"tls": "none", "cidrs": ["127.0.0.1/32"]}},
        {"name": "mesh", "action": "allow", "from": {"tls": "required"}},
    ])
    enforcer = await Enforcer(cfg).start()
    async with running(enforcer, backend):
        plain = random_bytes(100_000)
        assert sha(await exchange(enforcer.port(), plain)) == sha(plain)
        secret = random_bytes(100_000)
        assert sha(await tls_exchange(enforcer.port(), secret, ctx_for(pki, frontend))) == \
            sha(secret)
        assert await refused(enforcer.port(), ctx_for(pki, None)) == b""  # TLS, no cert
        recs = await enforcer.wait_flows(3)
        assert backend.connections == 2
    assert [(r["action"], r["rule"], r["reason"]) for r in recs] == [
        ("allow", "plain-from-loopback", "rule"), ("allow", "mesh", "rule"),
        ("deny", None, "default")]
    assert decisions(enforcer.metrics, "inbound", "inbound", "", "deny") == 1


INBOUND_ID = "spiffe://enforcer.demo/ns/demo/sa/inbound"


async def test_outbound_rules_on_the_upstreams_verified_identity(pki: Any) -> None:
    """An outbound listener's rules see who answered: the decision waits for the upstream
    handshake when (and only when) it depends on the server's identity, and nothing from
    the client is relayed before it."""
    backend = await Backend(mode="echo").start()
    inbound = await Enforcer(inbound_cfg(pki, backend.port)).start()
    cfg = outbound_cfg(pki, inbound.port())
    cfg["rulesets"]["outbound"] = {"default": "deny", "rules": [
        {"name": "never-from-127-0-0-9", "action": "deny", "from": {"cidrs": ["127.0.0.9/32"]}},
        {"name": "not-a-retired-server", "action": "deny",
         "to": {"server_identities": ["spiffe://enforcer.demo/ns/demo/sa/retired"]}},
        {"name": "to-the-inbound-sidecar", "action": "allow",
         "to": {"server_identities": [INBOUND_ID]}},
    ]}
    allowed = await Enforcer(cfg).start()
    cfg = outbound_cfg(pki, inbound.port())
    cfg["rulesets"]["outbound"] = {"default": "allow", "rules": [
        {"name": "not-the-inbound-sidecar", "action": "deny",
         "to": {"server_identities": ["spiffe://enforcer.demo/ns/demo/sa/*"]}}]}
    denied = await Enforcer(cfg).start()
    async with running(allowed, denied, inbound, backend):
        payload = random_bytes(300_000)
        assert sha(await exchange(allowed.port(), payload)) == sha(payload)
        assert backend.connections == 1
        assert await exchange(denied.port(), payload, reset_ok=True) == b""
        (rec,) = await denied.wait_flows(1)
        assert (rec["action"], rec["rule"], rec["reason"], rec["close"]) == (
            "deny", "not-the-inbound-sidecar", "rule", "denied")
        assert rec["upstream"]["peer"]["spiffe_id"] == INBOUND_ID
        assert rec["bytes"]["to_client"] == 0
        (ok,) = await allowed.wait_flows(1)
        assert (ok["action"], ok["rule"]) == ("allow", "to-the-inbound-sidecar")
        await inbound.wait_flows(2)  # the inbound side of the denied one closed too
        await wait_until(lambda: len(backend.received) == backend.connections)
        assert sorted(map(sha, backend.received)) == sorted(
            [sha(payload)] + [sha(b"")] * (backend.connections - 1)), \
            "client bytes were relayed before the decision"
    assert decisions(denied.metrics, "outbound", "outbound", "not-the-inbound-sidecar",
                     "deny") == 1
    assert decisions(allowed.metrics, "outbound", "outbound", "to-the-inbound-sidecar",
                     "allow") == 1


async def test_a_client_certificate_with_a_non_positive_serial_is_refused(
        pki: Any, tmp_path: Path) -> None:
    """RFC 5280 wants a positive serial; OpenSSL verifies such a certificate anyway, and
    cryptography only warns for now. The listener refuses it with the reason, before any
    upstream connection (and the same identity with a positive serial gets through)."""
    backend = await Backend(mode="echo").start()
    frontend_rule = [r for r in rules(spki_pin(pki.client.cert)) if r["name"] == "frontend"]
    inbound = await Enforcer(inbound_cfg(pki, backend.port, rules=frontend_rule)).start()
    async with running(inbound, backend):
        good = openssl_issued(pki, tmp_path, "7")
        payload = random_bytes(20_000)
        assert sha(await tls_exchange(inbound.port(), payload, ctx_for(pki, good))) == \
            sha(payload)
        for serial in ("0", "-5"):
            odd = openssl_issued(pki, tmp_path, serial)
            assert await refused(inbound.port(), ctx_for(pki, odd)) == b""
        records = await inbound.wait_flows(3)
    assert records[0]["action"] == "allow" and records[0]["rule"] == "frontend"
    for rec in records[1:]:
        assert (rec["action"], rec["reason"], rec["upstream"]) == (
            "error", "bad_peer_certificate", None)
        assert rec["detail"] == ("cannot read the client certificate: the certificate's serial "
                                 "number is not positive (RFC 5280)")
    assert backend.connections == 1
