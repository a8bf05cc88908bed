"""``tls.<name>.cipher_suites``: the order and the set of suites a context offers, TLS 1.3
and TLS 1.2, checked with real peers (openssl s_client, and an outbound -> inbound pair
moving bytes). The default prefers AES-128-GCM whatever the client prefers."""

from __future__ import annotations

from typing import Any

import pytest

from enforcer.dataplane import native
from enforcer.dataplane.plane import StartupError
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
from tests.e2e.tls_util import run_tool

AES128, AES256, CHACHA = ("TLS_AES_128_GCM_SHA256", "TLS_AES_256_GCM_SHA384",
                          "TLS_CHACHA20_POLY1305_SHA256")

needs_native = pytest.mark.skipif(not native.available(), reason=native.unavailable_reason())


def _suites(cfg: dict[str, Any], suites: list[str]) -> dict[str, Any]:
    cfg["tls"]["mesh"]["cipher_suites"] = suites
    return cfg


async def _s_client(pki: Any, port: int, *args: str) -> tuple[int, str]:
    openssl = require_tool("openssl")
    code, out, err = await run_tool(
        openssl, "s_client", "-connect", f"127.0.0.1:{port}", "-brief", "-CAfile", str(pki.ca),
        "-cert", str(pki.client.cert), "-key", str(pki.client.key), *args, timeout=30)
    return code, (out + err).decode(errors="replace")


@needs_native
@pytest.mark.parametrize(("args", "negotiated"), [
    (("-tls1_3", "-ciphersuites", f"{AES256}:{CHACHA}:{AES128}"), AES128),
    (("-tls1_2", "-cipher", "ECDHE-ECDSA-AES256-GCM-SHA384:ECDHE-ECDSA-AES128-GCM-SHA256"),
     "ECDHE-ECDSA-AES128-GCM-SHA256"),
    (("-tls1_3", "-ciphersuites", AES256), AES256),  # still offered, just not preferred
])
async def test_the_default_prefers_aes128_over_the_clients_order(
        pki: Any, args: tuple[str, ...], negotiated: str) -> None:
    backend = await Backend().start()
    enforcer = await Enforcer(inbound_cfg(pki, backend.port, default="allow")).start()
    async with running(enforcer, backend):
        code, text = await _s_client(pki, enforcer.port(), *args)
        assert code == 0 and f"Ciphersuite: {negotiated}" in text, text
        (rec,) = await enforcer.wait_flows(1)
    assert rec["tls"]["cipher"] == negotiated


@needs_native
@pytest.mark.parametrize(("args", "accepted"), [
    (("-tls1_3", "-ciphersuites", AES256), True),
    (("-tls1_3", "-ciphersuites", f"{AES128}:{CHACHA}"), False),
    (("-tls1_2", "-cipher", "ECDHE-ECDSA-AES256-GCM-SHA384"), True),
    (("-tls1_2", "-cipher", "ECDHE-ECDSA-AES128-GCM-SHA256:ECDHE-ECDSA-CHACHA20-POLY1305"),
     False),
])
async def test_a_narrowed_list_refuses_every_other_suite(pki: Any, args: tuple[str, ...],
                                                        accepted: bool) -> None:
    backend = await Backend().start()
    cfg = _suites(inbound_cfg(pki, backend.port, default="allow"), [AES256])
    enforcer = await Enforcer(cfg).start()
    async with running(enforcer, backend):
        code, text = await _s_client(pki, enforcer.port(), *args)
        (rec,) = await enforcer.wait_flows(1)
    if accepted:
        assert code == 0 and "CONNECTION ESTABLISHED" in text, text
        assert rec["tls"]["cipher"] in (AES256, "ECDHE-ECDSA-AES256-GCM-SHA384")
    else:
        assert code != 0 and "CONNECTION ESTABLISHED" not in text, text
        assert rec["close"] == "handshake_failed" and "shared_cipher" in rec["detail"].lower(), rec


@needs_native
@pytest.mark.parametrize(("outbound_suites", "inbound_suites", "negotiated"), [
    (None, None, AES128),
    ([AES256], None, AES256),  # the client offers only AES-256: the server's order yields
    ([CHACHA, AES256], [AES256, CHACHA], AES256),  # the server's order wins
])
async def test_a_pair_negotiates_by_the_inbound_order(
        pki: Any, outbound_suites: list[str] | None, inbound_suites: list[str] | None,
        negotiated: str) -> None:
    backend = await Backend(mode="echo").start()
    in_cfg = inbound_cfg(pki, backend.port)
    if inbound_suites:
        _suites(in_cfg, inbound_suites)
    inbound = await Enforcer(in_cfg).start()
    out_cfg = outbound_cfg(pki, inbound.port())
    if outbound_suites:
        _suites(out_cfg, outbound_suites)
    outbound = await Enforcer(out_cfg).start()
    async with running(outbound, inbound, backend):
        for _ in range(2):  # a full handshake, then a resumed one
            payload = random_bytes(100_000)
            assert sha(await exchange(outbound.port(), payload)) == sha(payload)
        out_recs = await outbound.wait_flows(2)
        in_recs = await inbound.wait_flows(2)
    assert [r["tls"]["cipher"] for r in in_recs] == [negotiated, negotiated]
    assert [r["tls"]["resumed"] for r in in_recs] == [False, True]
    assert all(r["upstream"]["resumed"] is not None for r in out_recs)


@needs_native
async def test_no_common_suite_fails_both_sides_by_name(pki: Any) -> None:
    backend = await Backend(mode="echo").start()
    inbound = await Enforcer(_suites(inbound_cfg(pki, backend.port), [AES256])).start()
    outbound = await Enforcer(_suites(outbound_cfg(pki, inbound.port()), [AES128])).start()
    async with running(outbound, inbound, backend):
        got = await exchange(outbound.port(), b"never delivered", reset_ok=True)
        (out_rec,) = await outbound.wait_flows(1)
        (in_rec,) = await inbound.wait_flows(1)
    assert got == b""
    assert in_rec["close"] == "handshake_failed", in_rec
    assert "shared_cipher" in in_rec["detail"].lower(), in_rec
    assert out_rec["close"] == "upstream_tls_failed", out_rec
    assert out_rec["bytes"]["to_client"] == 0, out_rec


async def test_without_the_extension_a_narrowed_list_is_refused_at_startup(pki: Any) -> None:
    backend = await Backend().start()
    cfg = {**_suites(inbound_cfg(pki, backend.port), [AES256]), "relay": "python"}
    try:
        with pytest.raises(StartupError, match=r"tls\.mesh\.cipher_suites: leaving out TLS "
                                               r"1\.3 suites needs the native extension "
                                               r"\(relay: python\)"):
            await Enforcer(cfg).start()
    finally:
        await backend.close()


async def test_without_the_extension_the_full_set_runs_and_orders_tls12(pki: Any) -> None:
    backend = await Backend().start()
    cfg = {**_suites(inbound_cfg(pki, backend.port, default="allow"), [CHACHA, AES256, AES128]),
           "relay": "python"}
    enforcer = await Enforcer(cfg).start()
    async with running(enforcer, backend):
        code, text = await _s_client(pki, enforcer.port(), "-tls1_2", "-cipher",
                                     "ECDHE-ECDSA-AES128-GCM-SHA256:ECDHE-ECDSA-AES256-GCM-SHA384:"
                                     "ECDHE-ECDSA-CHACHA20-POLY1305")
        (rec,) = await enforcer.wait_flows(1)
    assert code == 0 and "CONNECTION ESTABLISHED" in text, text
    assert rec["tls"]["cipher"] == "ECDHE-ECDSA-CHACHA20-POLY1305"
