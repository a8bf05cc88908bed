"""Material sources end to end (PEM files, Kubernetes secret dir, inline base64, PKCS#12
with a password from the environment), and bad material through `enforcer check` (exit 2)
and `enforcer run` (exit 4): one line naming the file and the problem, never a traceback."""

from __future__ import annotations

import base64
import datetime as dt
import os
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.serialization import pkcs12

from enforcer.cli.main import main
from enforcer.tlsconf.certs import issue
from tests.e2e.harness import Backend, Enforcer, inbound_cfg, running
from tests.e2e.proc import EnforcerProcess, write_config
from tests.e2e.tls_util import (
    ChainPki,
    SecretMount,
    echo_once,
    make_cert,
    mtls_client,
    serial_of_file,
    sha,
    write,
)

CLIENT_ID = "spiffe://enforcer.demo/ns/demo/sa/outbound"


def _with_material(pki: Any, backend_port: int, material: dict[str, Any]) -> dict[str, Any]:
    cfg = inbound_cfg(pki, backend_port, default="deny")
    cfg["tls"] = {"mesh": material}
    return cfg


async def _handshake_and_echo(pki: Any, material: dict[str, Any], expected_serial: int) -> None:
    backend = await Backend().start()
    enforcer = await Enforcer(_with_material(pki, backend.port, material)).start()
    async with running(enforcer, backend):
        payload = os.urandom(100_000)
        got, serial = await echo_once(enforcer.port(),
                                      mtls_client(pki.ca, pki.client.cert, pki.client.key),
                                      payload)
        assert sha(got) == sha(payload)
        assert serial == expected_serial
        rec = (await enforcer.wait_flows(1))[0]
        assert rec["action"] == "allow" and rec["tls"]["peer"]["spiffe_id"] == CLIENT_ID
        await backend.done.wait()
        assert sha(backend.received[0]) == sha(payload)


def _server_key(pki: Any) -> Any:
    return serialization.load_pem_private_key(pki.server.key.read_bytes(), None)


def _server_cert(pki: Any) -> Any:
    from cryptography import x509

    return x509.load_pem_x509_certificate(pki.server.cert.read_bytes())


async def test_pem_files(pki: Any) -> None:
    material = {"cert": str(pki.server.cert), "key": str(pki.server.key), "ca": str(pki.ca)}
    await _handshake_and_echo(pki, material, serial_of_file(pki.server.cert))


async def test_kubernetes_secret_dir(pki: Any, tmp_path: Path) -> None:
    mount = SecretMount(tmp_path / "secret")
    mount.update({"tls.crt": pki.server.cert.read_bytes(), "tls.key": pki.server.key.read_bytes(),
                  "ca.crt": pki.ca.read_bytes()})
    await _handshake_and_echo(pki, {"dir": str(mount.path)}, serial_of_file(pki.server.cert))


async def test_inline_base64(pki: Any) -> None:
    def b64(path: Path) -> str:
        return base64.b64encode(path.read_bytes()).decode()

    material = {"inline": {"cert": b64(pki.server.cert), "key": b64(pki.server.key),
                           "ca": b64(pki.ca)}}
    await _handshake_and_echo(pki, material, serial_of_file(pki.server.cert))


async def test_pkcs12_with_password_env(pki: Any, tmp_path: Path,
                                        monkeypatch: pytest.MonkeyPatch) -> None:
    p12 = pkcs12.serialize_key_and_certificates(
        b"server", _server_key(pki), _server_cert(pki), None,
        serialization.BestAvailableEncryption(b"correct horse"))
    path = write(tmp_path / "server.p12", p12)
    monkeypatch.setenv("ENFORCER_TEST_P12", "correct horse")
    material = {"pkcs12": path, "password_env": "ENFORCER_TEST_P12", "ca": str(pki.ca)}
    await _handshake_and_echo(pki, material, serial_of_file(pki.server.cert))


# --------------------------------------------------------------------------- bad input


def _bad_cases(pki: Any, tmp: Path) -> dict[str, tuple[dict[str, Any], str]]:
    """name -> (material, expected one-line error)."""
    good = {"cert": str(pki.server.cert), "key": str(pki.server.key), "ca": str(pki.ca)}
    now = dt.datetime.now(dt.UTC)
    expired = issue(pki.base, tmp / "expired", name="expired", dns=["localhost"],
                    not_before=now - dt.timedelta(days=10), not_after=now - dt.timedelta(days=1))
    future = issue(pki.base, tmp / "future", name="future", dns=["localhost"],
                   not_before=now + dt.timedelta(days=1), not_after=now + dt.timedelta(days=10))
    chain = ChainPki.create()
    stranger = make_cert("stranger CA", issuer=chain.root, ca=True, path_length=0)
    broken = write(tmp / "broken-chain.crt", chain.server.cert_pem + stranger.cert_pem)
    broken_key = write(tmp / "broken-chain.key", chain.server.key_pem)
    garbage = write(tmp / "garbage.crt",
                    b"-----BEGIN CERTIFICATE-----\nZ2FyYmFnZQ==\n-----END CERTIFICATE-----\n")
    empty = write(tmp / "empty.key", b"")
    leaf_ca = write(tmp / "leaf-as-ca.crt", pki.ca.read_bytes() + pki.client.cert.read_bytes())
    p12 = write(tmp / "pw.p12", pkcs12.serialize_key_and_certificates(
        b"s", _server_key(pki), _server_cert(pki), None,
        serialization.BestAvailableEncryption(b"right")))
    return {
        "key not matching": (
            {**good, "key": str(pki.client.key)},
            f"tls.mesh.key: the private key does not match the certificate (key "
            f"{pki.client.key}, certificate {pki.server.cert} with subject CN=server)"),
        "chain broken": (
            {"cert": broken, "key": broken_key, "ca": str(pki.ca)},
            "tls.mesh.cert: the chain is broken: certificate 2 (CN=stranger CA) did not sign "
            f"certificate 1 (CN=server) in {broken}"),
        "expired": (
            {**good, "cert": str(expired.cert), "key": str(expired.key)},
            "tls.mesh.cert: certificate CN=expired expired at "),
        "not yet valid": (
            {**good, "cert": str(future.cert), "key": str(future.key)},
            "tls.mesh.cert: certificate CN=future is not valid before "),
        "wrong pkcs12 password": (
            {"pkcs12": p12, "password_env": "ENFORCER_TEST_WRONG_PW", "ca": str(pki.ca)},
            f"tls.mesh.pkcs12: {p12}: cannot open the PKCS#12 bundle (wrong password, or not "
            "PKCS#12)"),
        "garbage PEM": (
            {**good, "cert": garbage},
            f"tls.mesh.cert: garbage PEM: a CERTIFICATE block does not decode in {garbage}"),
        "empty file": (
            {**good, "key": empty}, f"tls.mesh.key: {empty}: file is empty"),
        "CA file with a leaf": (
            {**good, "ca": leaf_ca},
            "tls.mesh.ca: the CA bundle holds a certificate that is not a CA (CN=client, a "
            f"leaf?) in {leaf_ca}"),
    }


CASES = ["key not matching", "chain broken", "expired", "not yet valid", "wrong pkcs12 password",
         "garbage PEM", "empty file", "CA file with a leaf"]


@pytest.mark.parametrize("case", CASES)
def test_check_reports_bad_material(pki: Any, tmp_path: Path, case: str,
                                    capsys: pytest.CaptureFixture[str],
                                    monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ENFORCER_TEST_WRONG_PW", "wrong")
    material, expected = _bad_cases(pki, tmp_path)[case]
    cfg = write_config(tmp_path / "c.yaml", _with_material(pki, 8080, material))
    assert main(["check", "-c", str(cfg)]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    errors = [line for line in lines if line.startswith("enforcer: error: ")]
    assert len(errors) == 1, lines
    assert errors[0].startswith(f"enforcer: error: {expected}"), errors[0]
    assert not any("Traceback" in line for line in lines)


@pytest.mark.parametrize("case", ["expired", "CA file with a leaf", "wrong pkcs12 password"])
def test_run_refuses_bad_material_with_exit_4(pki: Any, tmp_path: Path, case: str) -> None:
    os.environ["ENFORCER_TEST_WRONG_PW"] = "wrong"  # inherited by the subprocess
    try:
        material, expected = _bad_cases(pki, tmp_path)[case]
        cfg = write_config(tmp_path / "c.yaml", _with_material(pki, 8080, material))
        proc = EnforcerProcess(cfg)
        assert proc.wait(30) == 4
    finally:
        del os.environ["ENFORCER_TEST_WRONG_PW"]
    errors = [line for line in proc.stderr_lines if "error" in line]
    assert any(expected in line for line in errors), proc.stderr_lines
    assert not any("Traceback" in line for line in proc.stderr_lines)
    # the error is the last word: no task of the server left pending behind it
    assert not any("Task was destroyed" in line for line in proc.stderr_lines), proc.stderr_lines
