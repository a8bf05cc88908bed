"""Strict SNI on a gateway listener (accept and refuse, with Python and openssl clients),
and the check that the certificate covers every configured server name."""

from __future__ import annotations

import os
import ssl
from pathlib import Path
from typing import Any

import pytest

from enforcer.cli.main import main
from enforcer.tlsconf.certs import issue
from tests.conftest import require_tool
from tests.e2e.harness import Backend, Enforcer, running
from tests.e2e.proc import EnforcerProcess, write_config
from tests.e2e.tls_util import ExactBackend, echo_once, run_tool, sha

NAMES = ["ingress.example.test", "*.apps.example.test"]


@pytest.fixture(scope="module")
def gateway_cert(pki: Any) -> Any:
    return issue(pki.base, pki.base / "gateway", name="gateway",
                 dns=["ingress.example.test", "*.apps.example.test"], client=False)


def gateway_cfg(pki: Any, cert: Any, backend_port: int, *, strict: bool = True,
                names: list[str] | None = None) -> dict[str, Any]:
    return {
        "version": 1, "node": {"name": "gw"},
        "tls": {"edge": {"cert": str(cert.cert), "key": str(cert.key)}},
        "listeners": [{"name": "gateway", "listen": "127.0.0.1:0", "ruleset": "public",
                       "upstream": "svc",
                       "tls": {"mode": "terminate", "material": "edge", "client_auth": "none",
                               "server_names": NAMES if names is None else names,
                               "strict_sni": strict}}],
        "upstreams": {"svc": {"address": f"127.0.0.1:{backend_port}"}},
        "rulesets": {"public": {"default": "allow"}},
    }


def _client(pki: Any) -> ssl.SSLContext:
    return ssl.create_default_context(cafile=str(pki.ca))


@pytest.mark.parametrize("sni", ["ingress.example.test", "shop.apps.example.test"])
async def test_strict_sni_accepts_configured_names(pki: Any, gateway_cert: Any, sni: str) -> None:
    backend = await Backend().start()
    enforcer = await Enforcer(gateway_cfg(pki, gateway_cert, backend.port)).start()
    async with running(enforcer, backend):
        payload = os.urandom(50_000)
        got, _serial = await echo_once(enforcer.port(), _client(pki), payload, server_hostname=sni)
        assert sha(got) == sha(payload)
        rec = (await enforcer.wait_flows(1))[0]
        assert rec["action"] == "allow" and rec["tls"]["sni"] == sni


async def test_strict_sni_accepts_openssl_with_a_wildcard_name(pki: Any,
                                                              gateway_cert: Any) -> None:
    openssl = require_tool("openssl")
    request, reply = os.urandom(20_000), os.urandom(30_000)
    backend = await ExactBackend(len(request), reply).start()
    enforcer = await Enforcer(gateway_cfg(pki, gateway_cert, backend.port)).start()
    async with running(enforcer, backend):
        code, out, err = await run_tool(
            openssl, "s_client", "-connect", f"127.0.0.1:{enforcer.port()}", "-quiet",
            "-verify_return_error", "-CAfile", str(pki.ca), "-servername",
            "api.apps.example.test", "-verify_hostname", "api.apps.example.test",
            stdin=request)
        assert code == 0, err.decode()
        assert sha(out) == sha(reply)
        assert sha(backend.received[0]) == sha(request)


@pytest.mark.parametrize("sni", [None, "other.example.test", "a.b.apps.example.test"])
async def test_strict_sni_refuses(pki: Any, gateway_cert: Any, sni: str | None) -> None:
    openssl = require_tool("openssl")
    backend = await Backend().start()
    enforcer = await Enforcer(gateway_cfg(pki, gateway_cert, backend.port)).start()
    async with running(enforcer, backend):
        name_args = ["-noservername"] if sni is None else ["-servername", sni]
        code, out, err = await run_tool(
            openssl, "s_client", "-connect", f"127.0.0.1:{enforcer.port()}", "-brief",
            "-CAfile", str(pki.ca), *name_args, stdin=b"hello")
        text = (out + err).decode(errors="replace")
        assert code != 0 and "CONNECTION ESTABLISHED" not in text, text
        assert "unrecognized name" in text, text
        with pytest.raises(ssl.SSLError):
            await echo_once(enforcer.port(), _ctx_without_hostname(pki), b"x",
                            server_hostname=sni)  # type: ignore[arg-type]
        records = await enforcer.wait_flows(2)
        assert [r["close"] for r in records] == ["handshake_failed"] * 2
        assert backend.connections == 0


def _ctx_without_hostname(pki: Any) -> ssl.SSLContext:
    ctx = _client(pki)
    ctx.check_hostname = False
    return ctx


async def test_without_strict_sni_any_name_is_accepted_and_recorded(pki: Any,
                                                                   gateway_cert: Any) -> None:
    backend = await Backend().start()
    enforcer = await Enforcer(gateway_cfg(pki, gateway_cert, backend.port, strict=False)).start()
    async with running(enforcer, backend):
        payload = os.urandom(10_000)
        got, _ = await echo_once(enforcer.port(), _ctx_without_hostname(pki), payload,
                                 server_hostname="elsewhere.example.org")
        assert sha(got) == sha(payload)
        rec = (await enforcer.wait_flows(1))[0]
        assert rec["action"] == "allow" and rec["tls"]["sni"] == "elsewhere.example.org"


# --------------------------------------------------------------------------- coverage check


def test_check_names_an_uncovered_server_name(pki: Any, gateway_cert: Any, tmp_path: Path,
                                              capsys: pytest.CaptureFixture[str]) -> None:
    cfg = gateway_cfg(pki, gateway_cert, 8080,
                      names=["ingress.example.test", "shop.example.test", "*.example.test"])
    assert main(["check", "-c", str(write_config(tmp_path / "c.yaml", cfg))]) == 2
    err = capsys.readouterr().err.strip()
    assert err == (
        "enforcer: error: listeners.gateway.tls.server_names: shop.example.test, *.example.test "
        f"are not covered by the certificate of material 'edge' ({gateway_cert.cert}; its DNS "
        "names: ingress.example.test, *.apps.example.test)")


def test_check_passes_covered_names(pki: Any, gateway_cert: Any, tmp_path: Path,
                                    capsys: pytest.CaptureFixture[str]) -> None:
    cfg = gateway_cfg(pki, gateway_cert, 8080,
                      names=["ingress.example.test", "x.apps.example.test", "*.apps.example.test"])
    assert main(["check", "-c", str(write_config(tmp_path / "c.yaml", cfg))]) == 0
    assert ": ok (" in capsys.readouterr().out


def test_check_strict_sni_without_names(pki: Any, gateway_cert: Any, tmp_path: Path,
                                        capsys: pytest.CaptureFixture[str]) -> None:
    cfg = gateway_cfg(pki, gateway_cert, 8080, names=[])
    assert main(["check", "-c", str(write_config(tmp_path / "c.yaml", cfg))]) == 2
    assert ("listeners.gateway.tls.strict_sni: needs server_names"
            in capsys.readouterr().err)


def test_run_refuses_an_uncovered_server_name(pki: Any, gateway_cert: Any,
                                              tmp_path: Path) -> None:
    cfg = gateway_cfg(pki, gateway_cert, 8080, names=["shop.example.test"])
    proc = EnforcerProcess(write_config(tmp_path / "c.yaml", cfg))
    assert proc.wait(30) == 4
    assert any("shop.example.test is not covered by the certificate" in line
               for line in proc.stderr_lines), proc.stderr_lines
