"""``proxy_protocol.trusted_identities``: a PROXY header is believed only when the TLS
handshake after it shows the gateway's identity. A sender inside ``trusted_sources`` with
another certificate, none, or plaintext after the header is refused before any upstream
connect; the flow record keeps the real peer as client and shows the identity it had."""

from __future__ import annotations

import asyncio
import contextlib
import ssl
from typing import Any

import pytest

from enforcer.config.errors import ConfigError
from enforcer.config.loader import parse_config
from enforcer.proxyproto import build_v2, unique_id_tlv
from enforcer.tlsconf.certs import DEMO_CLIENT_ID
from tests.e2e.harness import (
    Backend,
    Enforcer,
    client_ctx,
    inbound_cfg,
    outbound_cfg,
    random_bytes,
    running,
    sha,
)

pytestmark = pytest.mark.usefixtures("relay_mode")
FORGED = ("203.0.113.7", 40000)


def sidecar_cfg(pki: Any, backend_port: int, mode: str = "terminate") -> dict[str, Any]:
    return inbound_cfg(pki, backend_port, default="allow", rules=[], mode=mode,
                       client_auth="optional",
                       listener_extra={"proxy_protocol": {
                           "accept": "required", "trusted_sources": ["127.0.0.1/32"],
                           "trusted_identities": [DEMO_CLIENT_ID],
                           "flow_id_from_header": True}})


async def proxied(port: int, payload: bytes, ctx: ssl.SSLContext | None) -> bytes:
    """PROXY v2 (the forged client address), then TLS with ``ctx`` (or plaintext), then
    ``payload``; returns what came back (b"" when refused)."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(build_v2(FORGED, ("127.0.0.1", port), tlvs=[unique_id_tlv("FORGED-ID")]))
        await writer.drain()
        if ctx is not None:
            await writer.start_tls(ctx, server_hostname="localhost")
        writer.write(payload)
        await writer.drain()
        got = bytearray()
        async with asyncio.timeout(30):
            while len(got) < len(payload) and (data := await reader.read(65536)):
                got += data
        return bytes(got)
    except (ssl.SSLError, ConnectionError):
        return b""
    finally:
        writer.close()
        with contextlib.suppress(Exception):
            await writer.wait_closed()


async def test_the_gateway_identity_is_believed(pki: Any) -> None:
    backend = await Backend().start()
    sidecar = await Enforcer(sidecar_cfg(pki, backend.port)).start()
    payload = random_bytes(300_000)
    async with running(sidecar, backend):
        got = await proxied(sidecar.port(), payload, client_ctx(pki.ca, pki.client.cert,
                                                                 pki.client.key))
        assert sha(got) == sha(payload)
        rec = (await sidecar.wait_flows(1))[0]
    assert rec["action"] == "allow"
    assert rec["client"] == {"ip": FORGED[0], "port": FORGED[1]}
    assert rec["flow_id"] == "FORGED-ID"  # believed: flow_id_from_header takes its id
    assert rec["tls"]["peer"]["spiffe_id"] == DEMO_CLIENT_ID


@pytest.mark.parametrize("who", ["other", "no_cert", "plaintext"])
async def test_a_forged_header_without_the_identity_is_refused(pki: Any, who: str) -> None:
    backend = await Backend().start()
    mode = "auto" if who == "plaintext" else "terminate"
    sidecar = await Enforcer(sidecar_cfg(pki, backend.port, mode)).start()
    ctx = {"other": client_ctx(pki.ca, pki.other.cert, pki.other.key),
           "no_cert": client_ctx(pki.ca), "plaintext": None}[who]
    async with running(sidecar, backend):
        got = await proxied(sidecar.port(), b"GET / HTTP/1.0\r\n\r\n", ctx)
        rec = (await sidecar.wait_flows(1))[0]
    assert got == b""
    assert backend.connections == 0  # refused before any upstream connect
    assert rec["close"] == "proxy_protocol_untrusted_identity"
    assert rec["flow_id"] != "FORGED-ID"  # the header's unique_id is not adopted either
    assert rec["client"]["ip"] == "127.0.0.1"  # the header was not believed
    assert rec["upstream"] is None
    if who == "other":
        assert rec["tls"]["peer"]["spiffe_id"] == "spiffe://enforcer.demo/ns/other/sa/intruder"
        assert "identity spiffe://enforcer.demo/ns/other/sa/intruder" in rec["detail"]
    value = sidecar.metrics.registry.get_sample_value(
        "enforcer_proxy_protocol_errors_total",
        {"listener": "inbound", "reason": "untrusted_identity"})
    assert value == 1


async def test_an_enforcer_gateway_sends_header_then_mtls(pki: Any) -> None:
    """The real sender: an enforcer whose upstream sends PROXY v2, then mTLS with the
    identity the sidecar trusts; the client's address reaches the sidecar's record."""
    backend = await Backend().start()
    sidecar = await Enforcer(sidecar_cfg(pki, backend.port)).start()
    gw_cfg = outbound_cfg(pki, sidecar.port())
    gw_cfg["upstreams"]["peer"]["proxy_protocol"] = {"send": "v2", "tlvs": ["unique_id"]}
    gateway = await Enforcer(gw_cfg).start()
    payload = random_bytes(200_000)
    async with running(gateway, sidecar, backend):
        reader, writer = await asyncio.open_connection("127.0.0.1", gateway.port())
        writer.write(payload)
        writer.write_eof()
        got = await reader.read(-1)
        writer.close()
        side = (await sidecar.wait_flows(1))[0]
        gw = (await gateway.wait_flows(1))[0]
    assert sha(got) == sha(payload)
    assert side["action"] == "allow" and side["client"] == gw["client"]
    assert side["flow_id"] == gw["flow_id"]  # flow_id_from_header: one id on both hops
    assert side["tls"]["peer"]["spiffe_id"] == DEMO_CLIENT_ID


@pytest.mark.parametrize(("pp", "tls", "message"), [
    ({"accept": "off", "trusted_identities": [DEMO_CLIENT_ID]}, None, "accept: optional"),
    ({"accept": "required", "trusted_sources": ["10.0.0.0/8"], "trusted_identities":
      ["not-spiffe"]}, None, "bad identity glob"),
    ({"accept": "required", "trusted_sources": ["10.0.0.0/8"], "trusted_identities":
      [DEMO_CLIENT_ID]}, {"mode": "off"}, "client certificate"),
])
def test_config_mistakes(pki: Any, pp: dict[str, Any], tls: dict[str, Any] | None,
                         message: str) -> None:
    extra: dict[str, Any] = {"proxy_protocol": pp}
    if tls is not None:
        extra["tls"] = tls
    with pytest.raises(ConfigError, match=message):
        parse_config(inbound_cfg(pki, 1, listener_extra=extra))


async def test_a_local_header_claims_nothing_and_needs_no_identity(pki: Any) -> None:
    """PROXY v2 LOCAL (haproxy's health checks): no address claimed, so no identity is
    asked for; the connection is the peer's own, and no flow id is taken from it."""
    backend = await Backend().start()
    sidecar = await Enforcer(sidecar_cfg(pki, backend.port, mode="auto")).start()
    payload = random_bytes(50_000)
    async with running(sidecar, backend):
        reader, writer = await asyncio.open_connection("127.0.0.1", sidecar.port())
        writer.write(build_v2(None, None, command="LOCAL", tlvs=[unique_id_tlv("LOCAL-ID")])
                     + payload)
        writer.write_eof()
        got = await reader.read(-1)
        writer.close()
        rec = (await sidecar.wait_flows(1))[0]
    assert sha(got) == sha(payload)
    assert rec["action"] == "allow" and rec["client"]["ip"] == "127.0.0.1"
    assert rec["flow_id"] != "LOCAL-ID"
