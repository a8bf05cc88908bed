"""``tls.<name>.groups`` and the negotiated key-exchange group (``tls.group`` and
``upstream.group`` in flow records, ``enforcer_tls_groups_total``), checked with real
peers: openssl s_client offering chosen groups (bytes through checked by sha256), and an
outbound -> inbound enforcer pair with either relay."""

from __future__ import annotations

import hashlib
import logging
import os
import ssl
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from enforcer.tlsconf import groups
from tests.conftest import require_tool
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
from tests.e2e.proc import enforcer_cmd
from tests.e2e.test_real_clients import FixedBackend
from tests.e2e.tls_util import run_tool

needs_binding = pytest.mark.skipif(groups.binding() is None,
                                   reason=groups.unavailable_reason() or "bound")
HYBRID = groups.hybrid_available()
pytestmark = needs_binding


def with_groups(cfg: dict[str, Any], names: list[str] | None) -> dict[str, Any]:
    if names is not None:
        cfg["tls"]["mesh"]["groups"] = names
    return cfg


async def s_client(pki: Any, port: int, offer: str, payload: bytes) -> tuple[int, bytes, str]:
    openssl = require_tool("openssl")
    code, out, err = await run_tool(
        openssl, "s_client", "-connect", f"127.0.0.1:{port}", "-quiet", "-ign_eof",
        "-verify_return_error", "-CAfile", str(pki.ca), "-cert", str(pki.client.cert),
        "-key", str(pki.client.key), "-servername", "localhost", "-groups", offer,
        stdin=payload, timeout=60)
    return code, out, err.decode(errors="replace")


def group_count(enforcer: Enforcer, side: str, group: str) -> float:
    value = enforcer.metrics.registry.get_sample_value(
        "enforcer_tls_groups_total", {"listener": "inbound", "side": side, "group": group})
    return float(value or 0.0)


@pytest.mark.parametrize(("configured", "offer", "negotiated"), [
    (None, "X25519:P-256", "X25519MLKEM768" if HYBRID else "x25519"),
    (["P-384", "X25519"], "P-256:P-384", "secp384r1"),  # the one group both have
    (["X25519MLKEM768", "P-256"], "P-256", "secp256r1"),  # hybrid left out on OpenSSL 3.0
])
async def test_s_client_gets_the_configured_group_and_the_record_says_which(
        pki: Any, configured: list[str] | None, offer: str, negotiated: str,
        caplog: pytest.LogCaptureFixture) -> None:
    if HYBRID and configured is None:
        offer = "X25519MLKEM768:X25519"
    payload = os.urandom(100_000)
    backend = await FixedBackend(len(payload)).start()
    caplog.set_level(logging.INFO, logger="enforcer.tls")
    cfg = with_groups(inbound_cfg(pki, backend.port, default="allow"), configured)
    enforcer = await Enforcer(cfg).start()
    async with running(enforcer, backend):
        code, out, err = await s_client(pki, enforcer.port(), offer, payload)
        assert code == 0, err
        assert out.partition(b"\n")[0].decode() == hashlib.sha256(payload).hexdigest()
        (rec,) = await enforcer.wait_flows(1)
    assert rec["action"] == "allow" and rec["tls"]["group"] == negotiated
    assert group_count(enforcer, "server", negotiated) == 1
    if not HYBRID and configured and "X25519MLKEM768" in configured:
        assert "X25519MLKEM768 left out: hybrid post-quantum groups are unavailable" in caplog.text
    groups._logged.clear()  # the once-a-process log lines, for the other cases


async def test_no_shared_group_fails_the_handshake_and_says_so(pki: Any) -> None:
    backend = await Backend().start()
    cfg = with_groups(inbound_cfg(pki, backend.port, default="allow"), ["X25519", "P-256"])
    enforcer = await Enforcer(cfg).start()
    async with running(enforcer, backend):
        code, _, _ = await s_client(pki, enforcer.port(), "P-521", b"")
        assert code != 0
        (rec,) = await enforcer.wait_flows(1)
    assert rec["action"] == "error" and rec["close"] == "handshake_failed"
    assert rec["tls"]["group"] is None
    assert backend.connections == 0


@pytest.mark.parametrize("relay", ["native", "python"])
async def test_enforcer_pair_records_the_group_on_both_sides(pki: Any, relay: str) -> None:
    """The outbound's material offers only P-384: the inbound (default groups) agrees on
    it, its record says so in ``tls.group``, the outbound's in ``upstream.group`` (read
    before the native pump lets the SSL go)."""
    backend = await Backend(mode="echo").start()
    inbound = await Enforcer({**inbound_cfg(pki, backend.port), "relay": relay}).start()
    out_cfg = with_groups(outbound_cfg(pki, inbound.port()), ["P-384"])
    outbound = await Enforcer({**out_cfg, "relay": relay}).start()
    async with running(outbound, inbound, backend):
        for _ in range(2):  # a full handshake, then a resumed one (still a key exchange)
            payload = random_bytes(200_000)
            assert sha(await exchange(outbound.port(), payload)) == sha(payload)
        out_recs = await outbound.wait_flows(2)
        in_recs = await inbound.wait_flows(2)
    assert [r["upstream"]["group"] for r in out_recs] == ["secp384r1", "secp384r1"]
    assert [r["tls"]["group"] for r in in_recs] == ["secp384r1", "secp384r1"]
    assert out_recs[0]["relay"] == in_recs[0]["relay"] == relay
    assert outbound.metrics.registry.get_sample_value(
        "enforcer_tls_groups_total",
        {"listener": "outbound", "side": "client", "group": "secp384r1"}) == 2


def test_default_on_an_openssl_without_hybrid_groups_logs_so(
        pki: Any, caplog: pytest.LogCaptureFixture) -> None:
    if HYBRID:
        pytest.skip(f"{ssl.OPENSSL_VERSION} offers X25519MLKEM768")
    groups._logged.clear()
    caplog.set_level(logging.INFO, logger="enforcer.tls")
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    groups.apply_groups(ctx, None, "tls.mesh.groups")
    assert ("hybrid post-quantum key exchange (X25519MLKEM768) is unavailable with "
            f"{ssl.OPENSSL_VERSION}") in caplog.text


@pytest.mark.parametrize(("value", "message"), [
    (["X25591"], "tls.mesh.groups[0]: " + ssl.OPENSSL_VERSION
     + " does not offer the group 'X25591'"),
    (["P-256", "p-256"], "tls.mesh.groups[1]: p-256 is listed twice"),
    ("X25519:P-256", "write the groups as a YAML list"),
    ([], "tls.mesh.groups: needs at least one group"),
    (["x 1"], "tls.mesh.groups[0]: not a group name: 'x 1'"),
    (["MLKEM768"] if not HYBRID else ["X25591b"],
     "none of these groups is offered" if not HYBRID else "does not offer the group"),
])
def test_check_names_the_key(pki: Any, tmp_path: Path, value: Any, message: str) -> None:
    cfg = with_groups(inbound_cfg(pki, 9), value)
    path = tmp_path / "enforcer.yaml"
    path.write_text(yaml.safe_dump(cfg))
    res = subprocess.run(enforcer_cmd("check", "-c", str(path)), capture_output=True,
                         text=True, timeout=60)
    assert res.returncode == 2, res.stdout
    assert message in res.stderr, res.stderr
    assert "Traceback" not in res.stderr


def test_check_accepts_hybrid_names_on_any_openssl(pki: Any, tmp_path: Path) -> None:
    cfg = with_groups(inbound_cfg(pki, 9), ["X25519MLKEM768", "X25519", "P-256"])
    path = tmp_path / "enforcer.yaml"
    path.write_text(yaml.safe_dump(cfg))
    res = subprocess.run(enforcer_cmd("check", "-c", str(path)), capture_output=True,
                         text=True, timeout=60)
    assert res.returncode == 0, res.stderr
    if not HYBRID:
        assert "hybrid post-quantum groups are unavailable" in res.stderr
