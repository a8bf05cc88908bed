"""``enforcer policy explain``: output and exit codes for allow, deny, no match, bad input."""

from __future__ import annotations

import datetime as dt
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from enforcer.cli.main import main
from enforcer.tlsconf.certs import init_ca, issue

FRONTEND = "spiffe://cluster.local/ns/shop/sa/frontend"
CONFIG = f"""
version: 1
node: {{name: test}}
tls:
  mesh: {{cert: /nonexistent/tls.crt, key: /nonexistent/tls.key, ca: /nonexistent/ca.crt}}
listeners:
  - name: inbound
    listen: 127.0.0.1:15006
    tls: {{mode: terminate, material: mesh}}
    ruleset: inbound
    upstream: app
  - name: gateway
    listen: 127.0.0.1:8443
    proxy_protocol: {{accept: required, trusted_sources: [10.0.0.0/16]}}
    tls: {{mode: terminate, material: mesh, client_auth: optional}}
    ruleset: gateway
    upstream: db
  - name: plain
    listen: 127.0.0.1:8000
    tls: {{mode: "off"}}
    ruleset: plain
    upstream: app
upstreams:
  app: {{address: 127.0.0.1:8080}}
  db:
    address: db.shop:5432
    tls: {{mode: mtls, material: mesh, verify: {{uri: ["spiffe://cluster.local/ns/db/sa/pg"]}}}}
rulesets:
  inbound:
    default: deny
    rules:
      - name: quarantine
        action: deny
        from: {{cidrs: [192.168.66.0/24]}}
      - name: frontend-may-call
        action: allow
        from:
          identities: ["{FRONTEND}"]
          cidrs: ["10.0.0.0/8"]
        ports: [15006]
      - name: any-shop
        action: allow
        from: {{identities: ["spiffe://cluster.local/ns/shop/**"]}}
  gateway:
    default: deny
    rules:
      - name: via-endpoint
        action: allow
        from: {{tlvs: {{aws_vpce_id: ["vpce-0abc*"]}}}}
        to: {{sni: ["*.shop.example"]}}
  plain:
    default: allow
"""


@pytest.fixture
def config(tmp_path: Path) -> str:
    path = tmp_path / "enforcer.yaml"
    path.write_text(CONFIG)
    return str(path)


def explain(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    code = main(["policy", "explain", *args])
    out, err = capsys.readouterr()
    return code, out, err


def test_allow(config: str, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = explain(capsys, "-c", config, "--listener", "inbound",
                             "--identity", FRONTEND, "--source", "10.1.2.3")
    assert code == 0 and err == ""
    assert out.splitlines() == [
        "decision: allow",
        "ruleset: inbound",
        f"flow: listener=inbound port=15006 source=10.1.2.3 tls=yes identity={FRONTEND} "
        "destination=127.0.0.1:8080",
        "decided by: rule 'frontend-may-call' (allow)",
        "  rule 'quarantine' (deny): from.cidrs: client 10.1.2.3 is not in [192.168.66.0/24]",
        "  rule 'any-shop' (allow): matched too, but an earlier rule decided",
    ]


def test_deny_by_rule_overrides_allows(config: str, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = explain(capsys, "-c", config, "--listener", "inbound",
                           "--identity", FRONTEND, "--source", "192.168.66.9")
    assert code == 1
    lines = out.splitlines()
    assert lines[0] == "decision: deny"
    assert "decided by: rule 'quarantine' (deny)" in lines
    assert ("  rule 'frontend-may-call' (allow): from.cidrs: client 192.168.66.9 is not in "
            "[10.0.0.0/8]") in lines
    assert "  rule 'any-shop' (allow): matched too, but a deny rule wins" in lines


def test_no_match_falls_to_default(config: str, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = explain(capsys, "-c", config, "--listener", "inbound", "--source", "8.8.8.8",
                           "--port", "9999")
    assert code == 1
    assert out.splitlines()[3:] == [
        "decided by: default deny (no rule matched)",
        "  rule 'quarantine' (deny): from.cidrs: client 8.8.8.8 is not in [192.168.66.0/24]",
        "  rule 'frontend-may-call' (allow): from.identities: no verified peer certificate; "
        "from.cidrs: client 8.8.8.8 is not in [10.0.0.0/8]; to.ports: port 9999 is not in [15006]",
        "  rule 'any-shop' (allow): from.identities: no verified peer certificate",
    ]
    assert "port=9999" in out and "tls=yes" in out


def test_tlvs_and_sni(config: str, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = explain(capsys, "-c", config, "--listener", "gateway", "--sni", "pay.shop.example",
                           "--tlv", "aws_vpce_id=vpce-0abc123", "--source", "203.0.113.7")
    assert code == 0, out
    assert "tlv.aws_vpce_id=vpce-0abc123" in out and "port=8443" in out
    code, out, _ = explain(capsys, "-c", config, "--listener", "gateway", "--sni", "pay.shop.example",
                           "--tlv", "aws_vpce_id=vpce-9")
    assert code == 1
    assert "from.tlvs.aws_vpce_id: 'vpce-9' matches none of [vpce-0abc*]" in out


def _write_cert(path: Path, spiffe_id: str) -> None:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "frontend")])
    now = dt.datetime.now(dt.UTC)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name)
            .public_key(key.public_key()).serial_number(7)
            .not_valid_before(now).not_valid_after(now + dt.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName([x509.UniformResourceIdentifier(spiffe_id)]),
                           critical=False)
            .sign(key, hashes.SHA256()))
    path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))


def test_cert(config: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    pem = tmp_path / "peer.pem"
    _write_cert(pem, FRONTEND)
    code, out, _ = explain(capsys, "-c", config, "--listener", "inbound", "--cert", str(pem),
                           "--source", "10.0.0.1")
    assert code == 0
    assert "decided by: rule 'frontend-may-call' (allow)" in out


@pytest.mark.parametrize("args, message", [
    (["--listener", "nope"], "unknown listener 'nope' (known: inbound, gateway, plain)"),
    (["--listener", "plain", "--identity", FRONTEND],
     "listener 'plain' has tls mode off: its connections never carry a certificate or SNI "
     "(drop --identity/--cert/--sni)"),
    (["--listener", "inbound", "--source", "10.0.0.300"], "--source '10.0.0.300': not an IP address"),
    (["--listener", "inbound", "--identity", "frontend"],
     "--identity 'frontend': not a SPIFFE ID (spiffe://trust-domain/path)"),
    (["--listener", "inbound", "--cert", "/nonexistent/peer.pem"],
     "--cert /nonexistent/peer.pem: cannot read: No such file or directory"),
    (["--listener", "inbound", "--cert", "/dev/null", "--identity", FRONTEND],
     "give --identity or --cert, not both"),
    (["--listener", "inbound", "--tlv", "vpce=1"],
     "--tlv 'vpce=1': use KEY=VALUE with KEY one of aws_vpce_id, azure_link_id, gcp_psc_id, "
     "authority, alpn, identity"),
    (["--listener", "inbound", "--port", "70000"], "--port 70000: out of range 0-65535"),
    (["--listener", "inbound", "--destination", "db"],
     "--destination 'db': use host:port or [v6]:port"),
])
def test_bad_input_exits_2(config: str, capsys: pytest.CaptureFixture[str], args: list[str],
                           message: str) -> None:
    code, out, err = explain(capsys, "-c", config, *args)
    assert code == 2 and out == ""
    assert err == f"enforcer: error: {message}\n"


def test_unparseable_cert_exits_2(config: str, tmp_path: Path,
                                  capsys: pytest.CaptureFixture[str]) -> None:
    pem = tmp_path / "junk.pem"
    pem.write_text("not a certificate")
    code, _, err = explain(capsys, "-c", config, "--listener", "inbound", "--cert", str(pem))
    assert code == 2 and err.startswith(f"enforcer: error: --cert {pem}: not a PEM certificate")


def test_config_errors_exit_2_with_every_issue(tmp_path: Path,
                                               capsys: pytest.CaptureFixture[str]) -> None:
    bad = CONFIG.replace('cidrs: ["10.0.0.0/8"]', 'cidrs: ["10.0.0.0/88"]').replace(
        "name: any-shop", "name: quarantine")
    path = tmp_path / "bad.yaml"
    path.write_text(bad)
    code, out, err = explain(capsys, "-c", str(path), "--listener", "inbound")
    assert code == 2 and out == ""
    assert err.splitlines() == [
        "enforcer: error: rulesets.inbound.rules[1].from.cidrs[0]: bad CIDR '10.0.0.0/88' "
        "(use 10.0.0.0/8, 2001:db8::/32 or a single address)",
        "enforcer: error: rulesets.inbound.rules[2].name: duplicate rule name 'quarantine' "
        "(also rulesets.inbound.rules[0])",
    ]


def test_missing_config_exits_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = explain(capsys, "-c", str(tmp_path / "none.yaml"), "--listener", "inbound")
    assert code == 2 and "cannot read" in err


def test_destination_and_server_identity(tmp_path: Path,
                                         capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "out.yaml"
    path.write_text(CONFIG.replace("  gateway:\n    default: deny", """  gateway:
    default: deny
    rules:
      - name: to-db
        action: allow
        to: {destinations: ["db.shop:5432"], server_identities: ["spiffe://cluster.local/ns/db/**"]}
  unused:
    default: deny""", 1))
    code, out, _ = explain(capsys, "-c", str(path), "--listener", "gateway",
                           "--destination", "db.shop:5432",
                           "--server-identity", "spiffe://cluster.local/ns/db/sa/pg")
    assert code == 0, out
    code, out, _ = explain(capsys, "-c", str(path), "--listener", "gateway",
                           "--destination", "[2001:db8::1]:5432")
    assert code == 1
    assert ("to.destinations: destination [2001:db8::1]:5432 matches none of [db.shop:5432]; "
            "to.server_identities: no verified upstream server certificate") in out


def test_policy_without_subcommand_is_usage(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["policy"]) == 2


# ---------------------------------------------------------------------------- shipped examples
EXAMPLES = Path(__file__).resolve().parents[2] / "config"
OUTBOUND_ID = "spiffe://enforcer.demo/ns/demo/sa/outbound"


def test_example_inbound_allow(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = explain(capsys, "-c", str(EXAMPLES / "sidecar-inbound.yaml"), "--listener",
                             "inbound", "--identity", OUTBOUND_ID, "--source", "10.1.2.3")
    assert (code, err) == (0, "")
    assert out.splitlines()[:4] == [
        "decision: allow",
        "ruleset: inbound",
        f"flow: listener=inbound port=15006 source=10.1.2.3 tls=yes identity={OUTBOUND_ID} "
        "destination=127.0.0.1:8080",
        "decided by: rule 'outbound-sidecars-may-call' (allow)",
    ]
    assert ("  rule 'quarantine-never' (deny): from.cidrs: client 10.1.2.3 is not in "
            "[10.99.0.0/16, fd00:99::/32]") in out


def test_example_inbound_deny_overrides_identity(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = explain(capsys, "-c", str(EXAMPLES / "sidecar-inbound.yaml"), "--listener",
                           "inbound", "--identity", OUTBOUND_ID, "--source", "fd00:99::7")
    assert code == 1
    lines = out.splitlines()
    assert lines[0] == "decision: deny"
    assert lines[3] == "decided by: rule 'quarantine-never' (deny)"
    assert ("  rule 'outbound-sidecars-may-call' (allow): from.cidrs: client fd00:99::7 is not "
            "in [127.0.0.0/8, ::1/128, 10.0.0.0/8]") in lines
    code, out, _ = explain(capsys, "-c", str(EXAMPLES / "sidecar-inbound.yaml"), "--listener",
                           "inbound", "--identity", OUTBOUND_ID, "--source", "10.99.0.7")
    assert code == 1
    assert "  rule 'outbound-sidecars-may-call' (allow): matched too, but a deny rule wins" in out


def test_example_inbound_no_match(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = explain(capsys, "-c", str(EXAMPLES / "sidecar-inbound.yaml"), "--listener",
                           "inbound", "--identity", "spiffe://enforcer.demo/ns/other/sa/x",
                           "--source", "10.1.1.1")
    assert code == 1
    assert "decided by: default deny (no rule matched)" in out
    assert ("  rule 'shop-service-accounts' (allow): from.identities: "
            "spiffe://enforcer.demo/ns/other/sa/x matches none of "
            "[spiffe://enforcer.demo/ns/shop/sa/*]") in out


def test_example_inbound_operator_certificate(tmp_path: Path,
                                              capsys: pytest.CaptureFixture[str]) -> None:
    init_ca(tmp_path)
    sre = issue(tmp_path, tmp_path, name="alice", ou=["sre"], dns=["alice.ops.enforcer.demo"],
                server=False)
    code, out, _ = explain(capsys, "-c", str(EXAMPLES / "sidecar-inbound.yaml"), "--listener",
                           "inbound", "--cert", str(sre.cert), "--source", "192.0.2.1")
    assert code == 0, out
    assert "decided by: rule 'operators' (allow)" in out


def test_example_outbound(capsys: pytest.CaptureFixture[str]) -> None:
    path = str(EXAMPLES / "sidecar-outbound.yaml")
    code, out, _ = explain(capsys, "-c", path, "--listener", "outbound", "--source", "::1")
    assert code == 0
    assert "destination=127.0.0.1:15006" in out and "rule 'pod-local-apps' (allow)" in out
    code, out, _ = explain(capsys, "-c", path, "--listener", "outbound", "--source", "::1",
                           "--destination", "10.0.0.1:5432")
    assert code == 1
    assert ("to.destinations: destination 10.0.0.1:5432 matches none of [127.0.0.1:15006]"
            in out)
