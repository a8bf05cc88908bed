"""`enforcer certs init | issue | show`: output, files written, one-line errors, exit 2."""

from __future__ import annotations

import argparse
import base64
import hashlib
import json
import shutil
import stat
import subprocess
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from enforcer.cli import certs as certs_cli
from enforcer.cli import exitcodes

Capture = pytest.CaptureFixture[str]


def run(*argv: str | Path) -> int:
    """Parse with only the `certs` subcommand registered, as enforcer.cli.main does."""
    parser = argparse.ArgumentParser(prog="enforcer")
    certs_cli.register(parser.add_subparsers(dest="command"))
    args = parser.parse_args([str(a) for a in argv])
    return int(args.func(args))


def one_line_error(capsys: Capture) -> str:
    err = capsys.readouterr().err
    lines = err.splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("enforcer: error: ")
    return lines[0]


def pin_of(cert_path: Path) -> str:
    """SPKI pin computed straight from the certificate with cryptography."""
    cert = x509.load_pem_x509_certificate(cert_path.read_bytes())
    der = cert.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    return base64.b64encode(hashlib.sha256(der).digest()).decode()


@pytest.fixture
def pki(tmp_path: Path, capsys: Capture) -> Path:
    assert run("certs", "init", tmp_path / "pki") == exitcodes.OK
    capsys.readouterr()
    return tmp_path / "pki"


def test_init_writes_ca_server_client(tmp_path: Path, capsys: Capture) -> None:
    d = tmp_path / "pki"
    assert run("certs", "init", d) == 0
    out = capsys.readouterr().out
    for name in ("ca", "server", "client"):
        assert (d / f"{name}.crt").is_file()
        assert stat.S_IMODE((d / f"{name}.key").stat().st_mode) == 0o600
        assert str(d / f"{name}.key") in out
    assert "spiffe://enforcer.demo/ns/demo/sa/inbound" in out
    assert "spiffe://enforcer.demo/ns/demo/sa/outbound" in out
    assert not (d / "rogue").exists()


def test_init_refuses_existing_ca_unless_forced(pki: Path, capsys: Capture) -> None:
    before = (pki / "ca.key").read_bytes()
    assert run("certs", "init", pki) == exitcodes.BAD_CONFIG == 2
    line = one_line_error(capsys)
    assert str(pki / "ca.key") in line and "--force" in line
    assert (pki / "ca.key").read_bytes() == before
    assert run("certs", "init", pki, "--force") == 0
    assert (pki / "ca.key").read_bytes() != before


def test_issue(pki: Path, tmp_path: Path, capsys: Capture) -> None:
    out_dir = tmp_path / "leafs"
    code = run(
        "certs", "issue", pki, "--name", "pay", "--spiffe-id", "spiffe://shop/sa/pay",
        "--dns", "pay.shop", "pay", "--ip", "10.1.2.3", "--ou", "team", "--days", "10",
        "--out", out_dir,
    )  # fmt: skip
    assert code == 0
    out = capsys.readouterr().out
    assert str(out_dir / "pay.crt") in out
    assert stat.S_IMODE((out_dir / "pay.key").stat().st_mode) == 0o600
    cert = x509.load_pem_x509_certificate((out_dir / "pay.crt").read_bytes())
    cert.verify_directly_issued_by(x509.load_pem_x509_certificate((pki / "ca.crt").read_bytes()))
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.UniformResourceIdentifier) == ["spiffe://shop/sa/pay"]
    assert san.get_values_for_type(x509.DNSName) == ["pay.shop", "pay"]


@pytest.mark.parametrize("command", ["init", "issue"])
def test_a_directory_that_cannot_be_created_is_one_line(
        pki: Path, tmp_path: Path, capsys: Capture, command: str) -> None:
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")
    target = blocker / "sub"
    argv = (["certs", "init", target] if command == "init"
            else ["certs", "issue", pki, "--name", "x", "--out", target])
    assert run(*argv) == exitcodes.BAD_CONFIG
    line = one_line_error(capsys)
    assert str(blocker) in line and "Not a directory" in line, line


@pytest.mark.filterwarnings("ignore:Attribute's length")  # building the test certificate
def test_an_over_long_subject_cn_prints_no_library_warning(tmp_path: Path) -> None:
    """cryptography warns about a CN longer than X.520 allows; enforcer reads it (rules and
    records see it) without a raw warning line on stderr, in every command and in run."""
    import datetime as dt
    import sys

    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "c" * 5000, _validate=False)])
    now = dt.datetime.now(dt.UTC)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name)
            .public_key(key.public_key()).serial_number(7).not_valid_before(now)
            .not_valid_after(now + dt.timedelta(days=1)).sign(key, hashes.SHA256()))
    pem = tmp_path / "long-cn.pem"
    pem.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    res = subprocess.run([sys.executable, "-m", "enforcer", "certs", "show", "--json", str(pem)],
                         capture_output=True, text=True, timeout=60)
    assert (res.returncode, res.stderr) == (0, "")
    assert json.loads(res.stdout)["cn"] == "c" * 5000


def test_issue_rsa(pki: Path) -> None:
    assert run("certs", "issue", pki, "--name", "old", "--rsa") == 0
    cert = x509.load_pem_x509_certificate((pki / "old.crt").read_bytes())
    assert isinstance(cert.public_key(), rsa.RSAPublicKey)


def test_show_text(pki: Path, capsys: Capture) -> None:
    assert run("certs", "show", pki / "server.crt") == 0
    out = capsys.readouterr().out
    assert "spiffe://enforcer.demo/ns/demo/sa/inbound" in out
    assert "enforcer.demo" in out
    assert pin_of(pki / "server.crt") in out
    assert "127.0.0.1" in out and "localhost" in out
    assert "enforcer demo CA" in out


def test_show_json(pki: Path, capsys: Capture) -> None:
    assert run("certs", "show", pki / "client.crt", "--json") == 0
    facts = json.loads(capsys.readouterr().out)
    assert facts["spiffe_id"] == "spiffe://enforcer.demo/ns/demo/sa/outbound"
    assert facts["trust_domain"] == "enforcer.demo"
    assert facts["spki_sha256"] == pin_of(pki / "client.crt")
    assert facts["cn"] == "client"
    cert = x509.load_pem_x509_certificate((pki / "client.crt").read_bytes())
    assert int(facts["serial"], 16) == cert.serial_number


def test_show_via_main_entry_point(pki: Path, capsys: Capture) -> None:
    from enforcer.cli.main import main

    assert main(["certs", "show", str(pki / "server.crt"), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["cn"] == "server"


@pytest.mark.parametrize(
    ("argv", "expect"),
    [
        (["issue", "{tmp}/none", "--name", "x"], "no CA here"),
        (["issue", "{pki}", "--name", "x", "--spiffe-id", "https://td/x"], "spiffe://"),
        (["issue", "{pki}", "--name", "x", "--spiffe-id", "spiffe:///x"], "trust domain"),
        (["issue", "{pki}", "--name", "x", "--ip", "nope"], "bad IP address"),
        (["issue", "{pki}", "--name", "a/b"], "bad certificate name"),
        (["issue", "{pki}", "--name", "x", "--days", "-1"], "days must be positive"),
        (["show", "{tmp}/missing.pem"], "no such file"),
        (["show", "{tmp}/garbage.pem"], "not a PEM or DER certificate"),
        (["show", "{tmp}/broken.pem"], "garbage PEM"),
        (["show", "{tmp}/empty.pem"], "empty"),
        (["show", "{pki}/server.key"], "no certificate"),
        (["show", "{tmp}"], "is a directory"),
    ],
)
def test_errors_exit_2_with_one_line(
    pki: Path, tmp_path: Path, capsys: Capture, argv: list[str], expect: str
) -> None:
    (tmp_path / "garbage.pem").write_bytes(b"\x00\x01garbage")
    (tmp_path / "broken.pem").write_text(
        "-----BEGIN CERTIFICATE-----\nMIIB\n-----END CERTIFICATE-----\n"
    )
    (tmp_path / "empty.pem").write_bytes(b"")
    args = [a.format(tmp=tmp_path, pki=pki) for a in argv]
    assert run("certs", *args) == 2
    line = one_line_error(capsys)
    assert expect in line
    assert "Traceback" not in line


def test_bare_certs_prints_usage(capsys: Capture) -> None:
    assert run("certs") == exitcodes.USAGE
    assert "init" in capsys.readouterr().err


def test_unreadable_file_is_one_line(
    pki: Path, capsys: Capture, monkeypatch: pytest.MonkeyPatch
) -> None:
    def denied(self: Path) -> bytes:
        raise PermissionError(13, "Permission denied", str(self))

    monkeypatch.setattr(Path, "read_bytes", denied)
    assert run("certs", "show", pki / "server.crt") == 2
    line = one_line_error(capsys)
    assert f"{pki / 'server.crt'}: cannot read: Permission denied" in line


@pytest.mark.needs_tool
@pytest.mark.skipif(shutil.which("openssl") is None, reason="needs the openssl binary")
def test_show_pin_matches_openssl(pki: Path, capsys: Capture) -> None:
    def openssl(*args: str, data: bytes) -> bytes:
        return subprocess.run(
            ["openssl", *args], input=data, capture_output=True, check=True
        ).stdout

    pub = openssl("x509", "-noout", "-pubkey", data=(pki / "server.crt").read_bytes())
    der = openssl("pkey", "-pubin", "-outform", "DER", data=pub)
    expected = base64.b64encode(hashlib.sha256(der).digest()).decode()
    assert run("certs", "show", pki / "server.crt", "--json") == 0
    assert json.loads(capsys.readouterr().out)["spki_sha256"] == expected


def test_crl_revokes_the_named_certificates(tmp_path: Path, capsys: Capture) -> None:
    from cryptography import x509

    pki = tmp_path / "pki"
    assert run("certs", "init", pki) == 0
    out = tmp_path / "crl.pem"
    assert run("certs", "crl", pki, "--out", out) == 0
    assert len(list(x509.load_pem_x509_crl(out.read_bytes()))) == 0
    assert run("certs", "crl", pki, "--out", out, "--revoke", pki / "client.crt") == 0
    crl = x509.load_pem_x509_crl(out.read_bytes())
    client = x509.load_pem_x509_certificate((pki / "client.crt").read_bytes())
    assert [e.serial_number for e in crl] == [client.serial_number]
    assert crl.issuer == client.issuer
    assert f"serial {client.serial_number:x}" in capsys.readouterr().out
    assert run("certs", "crl", pki, "--out", out, "--revoke", tmp_path / "missing.crt") == 2
    assert "missing.crt" in one_line_error(capsys)
