"""A real TLS scanner and openssl probes against listeners: only TLS 1.2/1.3, only
forward-secret AEAD suites, no compression, no insecure renegotiation, tickets work.

sslyze (PyPI) pins ``cryptography<47``, so it lives in its own virtualenv, built from
requirements/tools/sslyze.lock into .tools/sslyze (see .ci/run); the openssl probes run
wherever openssl is installed.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from enforcer.tlsconf.certs import issue
from tests.conftest import require_tool
from tests.e2e.harness import Backend, Enforcer, running
from tests.e2e.tls_util import run_tool

AEAD_TLS12 = ("_GCM_", "_CHACHA20_POLY1305_")


def _listener(name: str, material: str, client_auth: str) -> dict[str, Any]:
    return {"name": name, "listen": "127.0.0.1:0", "ruleset": "any", "upstream": "echo",
            "tls": {"mode": "terminate", "material": material, "client_auth": client_auth}}


def scan_cfg(pki: Any, rsa: Any, backend_port: int) -> dict[str, Any]:
    """An ECDSA listener (client certificate optional) and an RSA one (required)."""
    return {
        "version": 1, "node": {"name": "scan"},
        "tls": {"ec": {"cert": str(pki.server.cert), "key": str(pki.server.key),
                       "ca": str(pki.ca)},
                "rsa": {"cert": str(rsa.cert), "key": str(rsa.key), "ca": str(pki.ca)}},
        "listeners": [_listener("ec", "ec", "optional"), _listener("rsa", "rsa", "required")],
        "upstreams": {"echo": {"address": f"127.0.0.1:{backend_port}"}},
        "rulesets": {"any": {"default": "allow"}},
    }


@pytest.fixture(scope="module")
def rsa_leaf(pki: Any) -> Any:
    return issue(pki.base, pki.base / "rsa", name="rsa-server", dns=["localhost"],
                 ips=["127.0.0.1"], key_type="rsa")


async def test_sslyze_finds_only_modern_tls(pki: Any, rsa_leaf: Any, tmp_path: Path) -> None:
    sslyze = require_tool("sslyze")
    backend = await Backend().start()
    enforcer = await Enforcer(scan_cfg(pki, rsa_leaf, backend.port)).start()
    out = tmp_path / "scan.json"
    async with running(enforcer, backend):
        targets = [f"127.0.0.1:{enforcer.port(name)}" for name in ("ec", "rsa")]
        code, stdout, stderr = await run_tool(
            sslyze, f"--json_out={out}", "--sslv2", "--sslv3", "--tlsv1", "--tlsv1_1",
            "--tlsv1_2", "--tlsv1_3", "--compression", "--reneg", "--resum",
            "--mozilla_config=disable", "--cert", str(pki.client.cert), "--key",
            str(pki.client.key), *targets, timeout=240)
        assert code == 0, (stdout + stderr).decode(errors="replace")[-3000:]
    results = json.loads(out.read_text())["server_scan_results"]
    assert len(results) == 2
    for server in results:
        assert server["scan_status"] == "COMPLETED", server.get("connectivity_error_trace")
        _check_scan(server["scan_result"])


def _accepted(scan: dict[str, Any], command: str) -> list[str]:
    entry = scan[command]
    assert entry["status"] == "COMPLETED", (command, entry.get("error_trace"))
    return [c["cipher_suite"]["name"] for c in entry["result"]["accepted_cipher_suites"]]


def _check_scan(scan: dict[str, Any]) -> None:
    for old in ("ssl_2_0", "ssl_3_0", "tls_1_0", "tls_1_1"):
        assert _accepted(scan, f"{old}_cipher_suites") == [], old
    tls12 = _accepted(scan, "tls_1_2_cipher_suites")
    tls13 = _accepted(scan, "tls_1_3_cipher_suites")
    assert tls12 and tls13
    for suite in tls12:  # forward secret (ECDHE) and AEAD only
        assert suite.startswith("TLS_ECDHE_") and any(a in suite for a in AEAD_TLS12), suite
    eph = scan["tls_1_2_cipher_suites"]["result"]["accepted_cipher_suites"]
    assert all(c["ephemeral_key"] is not None for c in eph)
    assert set(tls13) <= {"TLS_AES_128_GCM_SHA256", "TLS_AES_256_GCM_SHA384",
                          "TLS_CHACHA20_POLY1305_SHA256"}
    assert scan["tls_compression"]["result"]["supports_compression"] is False
    reneg = scan["session_renegotiation"]["result"]
    assert reneg["is_vulnerable_to_client_renegotiation_dos"] is False
    assert reneg["client_renegotiations_success_count"] == 0
    assert reneg["supports_secure_renegotiation"] is True  # RFC 5746: no insecure reneg
    resum = scan["session_resumption"]["result"]
    # listeners keep sessions in a bounded cache (native extension): TLS 1.2 clients resume
    # by session id, and no TLS 1.2 ticket carries a session out of the process
    assert resum["session_id_resumption_result"] == "FULLY_SUPPORTED"
    assert resum["tls_ticket_resumption_result"] == "NOT_SUPPORTED"


# --------------------------------------------------------------------------- openssl probes


async def _s_client(openssl: str, port: int, *args: str) -> tuple[int, str]:
    code, out, err = await run_tool(
        openssl, "s_client", "-connect", f"127.0.0.1:{port}", "-brief", "-servername",
        "localhost", *args, stdin=b"", timeout=30)
    return code, (out + err).decode(errors="replace")


@pytest.mark.parametrize(("flag", "accepted"), [
    ("-tls1", False), ("-tls1_1", False), ("-tls1_2", True), ("-tls1_3", True)])
async def test_openssl_protocol_versions(pki: Any, rsa_leaf: Any, flag: str,
                                         accepted: bool) -> None:
    openssl = require_tool("openssl")
    backend = await Backend().start()
    enforcer = await Enforcer(scan_cfg(pki, rsa_leaf, backend.port)).start()
    async with running(enforcer, backend):
        for name in ("ec", "rsa"):
            # SECLEVEL=0 so the client really offers the old protocol
            code, text = await _s_client(openssl, enforcer.port(name), flag, "-cipher",
                                         "DEFAULT:@SECLEVEL=0", "-cert", str(pki.client.cert),
                                         "-key", str(pki.client.key), "-CAfile", str(pki.ca))
            if accepted:
                assert code == 0 and "CONNECTION ESTABLISHED" in text, text
                version = {"-tls1_2": "TLSv1.2", "-tls1_3": "TLSv1.3"}[flag]
                assert f"Protocol version: {version}" in text, text
            else:
                assert code != 0 and "CONNECTION ESTABLISHED" not in text, text
        if not accepted:
            records = await enforcer.wait_flows(2)
            assert {r["close"] for r in records} == {"handshake_failed"}


WEAK_TLS12 = [
    "AES128-SHA", "AES256-GCM-SHA384", "ECDHE-ECDSA-AES128-SHA", "ECDHE-RSA-AES256-SHA384",
    "ECDHE-ECDSA-AES128-SHA256", "DHE-RSA-AES128-GCM-SHA256", "ECDHE-RSA-DES-CBC3-SHA",
    "ECDHE-ECDSA-CAMELLIA128-SHA256", "AECDH-AES128-SHA", "ECDHE-ECDSA-NULL-SHA",
]


async def test_openssl_weak_tls12_suites_are_refused(pki: Any, rsa_leaf: Any) -> None:
    openssl = require_tool("openssl")
    backend = await Backend().start()
    enforcer = await Enforcer(scan_cfg(pki, rsa_leaf, backend.port)).start()
    async with running(enforcer, backend):
        for name in ("ec", "rsa"):
            for suite in WEAK_TLS12:
                code, text = await _s_client(openssl, enforcer.port(name), "-tls1_2",
                                             "-cipher", f"{suite}:@SECLEVEL=0")
                assert code != 0 and "CONNECTION ESTABLISHED" not in text, (name, suite, text)
            code, text = await _s_client(openssl, enforcer.port(name), "-tls1_2", "-cipher",
                                         "ECDHE+AESGCM", "-cert", str(pki.client.cert),
                                         "-key", str(pki.client.key), "-CAfile", str(pki.ca))
            assert code == 0 and "Ciphersuite: ECDHE-" in text, text
