"""PROXY protocol end to end with in-process enforcers (issue 3).

Accept (required / optional, trusted sources, LOCAL), every malformed header kind, the
real client in flow records, in rules and upstream, TLVs both ways, and the chain
client -> gateway enforcer -> sidecar enforcer -> app. Real sockets; bytes checked by
sha256 both ways wherever bytes move; an app behind enforcer parses the header it gets
with ``enforcer.proxyproto``.
"""

from __future__ import annotations

import asyncio
import socket
import ssl
from pathlib import Path
from typing import Any, cast

import pytest
import yaml

from enforcer.proxyproto import (
    REASONS,
    V2_SIGNATURE,
    ProxyHeader,
    Tlv,
    authority_tlv,
    aws_vpce_tlv,
    build_v1,
    build_v2,
    unique_id_tlv,
)
from tests.e2e.harness import Enforcer, client_ctx, random_bytes, running, sha
from tests.e2e.proxy_util import (
    TEST_NET,
    HeaderApp,
    pp_cfg,
    proxy_errors,
    raw_exchange,
)

REPO = Path(__file__).resolve().parents[2]
CLIENT_ID = "spiffe://enforcer.demo/ns/demo/sa/outbound"  # pki.client
OTHER_ID = "spiffe://enforcer.demo/ns/other/sa/intruder"  # pki.other
INBOUND_ID = "spiffe://enforcer.demo/ns/demo/sa/inbound"  # pki.server


def _header(app: HeaderApp, i: int = 0) -> ProxyHeader:
    header = app.accepted[i].header
    assert header is not None, app.accepted[i].error
    return header


# ------------------------------------------------------------------ the real client
V4 = ((TEST_NET, 51234), ("198.51.100.1", 443))
V6 = (("2001:db8::7", 40000), ("2001:db8::1", 443))


@pytest.mark.parametrize(("received", "send", "addrs"), [
    (1, "v2", V4), (2, "v1", V4), (2, "v1", V6), (1, "v2", V6),
], ids=["v1-in-v2-out", "v2-in-v1-out", "v2-in-v1-out-ipv6", "v1-in-v2-out-ipv6"])
async def test_proxy_source_is_the_client_in_records_and_upstream(
        pki: Any, received: int, send: str, addrs: tuple[tuple[str, int], ...]) -> None:
    src, dst = addrs
    incoming = build_v1(src, dst) if received == 1 else build_v2(src, dst)
    app = await HeaderApp(mode="echo").start()
    enf = await Enforcer(pp_cfg(pki, app.port, send=send)).start()
    async with running(enf, app):
        payload = random_bytes(300_000)
        res = await raw_exchange(enf.port(), [incoming + payload[:1000], payload[1000:]])
        assert sha(res.data) == sha(payload)
        await app.done.wait()
        assert sha(app.accepted[0].received) == sha(payload)
        got = _header(app)
        assert got.version == (1 if send == "v1" else 2)
        assert got.source == src, "the app must see the original client"
        assert got.destination == dst, "the destination the balancer saw is passed on"
        rec = (await enf.wait_flows(1))[0]
        assert rec["action"] == "allow"
        assert rec["client"] == {"ip": src[0], "port": src[1]}
        assert rec["peer"] == {"ip": "127.0.0.1", "port": res.local[1]}
        assert rec["proxy_protocol"] == {"version": received, "command": "PROXY", "tlvs": {}}
        assert rec["bytes"] == {"from_client": len(payload), "to_client": len(payload)}


async def test_rules_match_the_proxy_source_not_the_balancer(pki: Any) -> None:
    app = await HeaderApp(mode="echo", expect_header=False).start()
    rules = [{"name": "testnet-only", "action": "allow", "from": {"cidrs": ["203.0.113.0/24"]}}]
    enf = await Enforcer(pp_cfg(pki, app.port, rules=rules, default="deny")).start()
    async with running(enf, app):
        payload = random_bytes(10_000)
        ok = await raw_exchange(enf.port(), [build_v1((TEST_NET, 1000), ("10.0.0.1", 443)),
                                             payload])
        assert sha(ok.data) == sha(payload)
        await app.done.wait()
        assert sha(app.accepted[0].received) == sha(payload)
        denied = await raw_exchange(enf.port(), [build_v1(("198.51.100.9", 1000),
                                                          ("10.0.0.1", 443)), payload])
        assert denied.data == b""
        recs = await enf.wait_flows(2)
        assert [(r["action"], r["rule"], r["client"]["ip"]) for r in recs] == [
            ("allow", "testnet-only", TEST_NET), ("deny", None, "198.51.100.9")]
        assert recs[1]["reason"] == "default" and recs[1]["upstream"] is None
        assert len(app.accepted) == 1, "a denied client must not reach the upstream"


async def test_tlvs_in_the_record_and_in_rules(pki: Any) -> None:
    app = await HeaderApp(mode="echo", expect_header=False).start()
    rules = [{"name": "our-endpoint", "action": "allow",
              "from": {"tlvs": {"aws_vpce_id": ["vpce-0abc*"]}}}]
    enf = await Enforcer(pp_cfg(pki, app.port, rules=rules, default="deny")).start()
    async with running(enf, app):
        payload = random_bytes(5000)

        def header(vpce: str) -> bytes:
            return build_v2((TEST_NET, 2000), ("10.0.0.1", 443), crc32c=True, tlvs=[
                aws_vpce_tlv(vpce), authority_tlv("api.example.com"),
                unique_id_tlv(b"\x01\x02req"), Tlv(0x99, b"\xca\xfe")])

        ok = await raw_exchange(enf.port(), [header("vpce-0abc123"), payload])
        assert sha(ok.data) == sha(payload)
        denied = await raw_exchange(enf.port(), [header("vpce-0ffff"), payload])
        assert denied.data == b""
        recs = await enf.wait_flows(2)
        assert recs[0]["action"] == "allow" and recs[0]["rule"] == "our-endpoint"
        assert recs[0]["proxy_protocol"] == {"version": 2, "command": "PROXY", "tlvs": {
            "crc32c": "ok", "aws_vpce_id": "vpce-0abc123", "authority": "api.example.com",
            "unique_id": "0102726571", "0x99": "cafe"}}
        assert recs[1]["action"] == "deny" and recs[1]["upstream"] is None
        assert recs[1]["proxy_protocol"]["tlvs"]["aws_vpce_id"] == "vpce-0ffff"
        await app.done.wait()
        assert len(app.accepted) == 1 and sha(app.accepted[0].received) == sha(payload)


# ------------------------------------------------------------------ who may send a header
@pytest.mark.parametrize(("accept", "header"), [
    ("required", build_v1((TEST_NET, 1), ("10.0.0.1", 2))),
    ("required", build_v2((TEST_NET, 1), ("10.0.0.1", 2))),
    ("optional", build_v1((TEST_NET, 1), ("10.0.0.1", 2))),
    ("optional", build_v2((TEST_NET, 1), ("10.0.0.1", 2))),
], ids=["required-v1", "required-v2", "optional-v1", "optional-v2"])
async def test_valid_header_from_untrusted_source_is_closed(pki: Any, accept: str,
                                                            header: bytes) -> None:
    app = await HeaderApp(expect_header=False).start()
    enf = await Enforcer(pp_cfg(pki, app.port, accept=accept, trusted=["10.0.0.0/8"])).start()
    async with running(enf, app):
        res = await raw_exchange(enf.port(), [header + b"hello"])
        assert res.data == b""
        rec = (await enf.wait_flows(1))[0]
        assert rec["action"] == "error"
        assert rec["reason"] == rec["close"] == "proxy_protocol_untrusted_source"
        assert rec["client"] == rec["peer"], "an untrusted header is never believed"
        assert rec["upstream"] is None and rec["proxy_protocol"] is None
        assert proxy_errors(enf, "edge", "untrusted_source") == 1
        assert app.accepted == [], "no upstream connection for an untrusted header"


async def test_optional_untrusted_source_without_header_proceeds(pki: Any) -> None:
    app = await HeaderApp(expect_header=False).start()
    enf = await Enforcer(pp_cfg(pki, app.port, accept="optional",
                                trusted=["10.0.0.0/8"])).start()
    async with running(enf, app):
        payload = b"PROX" + random_bytes(50_000)  # starts like v1, then is not
        res = await raw_exchange(enf.port(), [payload[:3], payload[3:]], pause=0.02)
        assert sha(res.data) == sha(payload)
        await app.done.wait()
        assert sha(app.accepted[0].received) == sha(payload)
        rec = (await enf.wait_flows(1))[0]
        assert rec["action"] == "allow" and rec["proxy_protocol"] is None
        assert rec["client"] == {"ip": "127.0.0.1", "port": res.local[1]}
        assert proxy_errors(enf, "edge", "untrusted_source") == 0


async def test_optional_trusted_source_with_and_without_header(pki: Any) -> None:
    app = await HeaderApp(expect_header=False).start()
    enf = await Enforcer(pp_cfg(pki, app.port, accept="optional")).start()
    async with running(enf, app):
        payload = random_bytes(20_000)
        plain = await raw_exchange(enf.port(), [payload])
        header = build_v1((TEST_NET, 3000), ("10.0.0.1", 443))
        # the header arrives in pieces: sniffing must not mistake its middle for data
        pieces = [header[:2], header[2:8], header[8:20], header[20:], payload]
        proxied = await raw_exchange(enf.port(), pieces, pause=0.02)
        assert sha(plain.data) == sha(payload) and sha(proxied.data) == sha(payload)
        recs = await enf.wait_flows(2)
        by_client = {r["client"]["ip"]: r for r in recs}
        assert by_client["127.0.0.1"]["proxy_protocol"] is None
        assert by_client[TEST_NET]["client"]["port"] == 3000
        assert by_client[TEST_NET]["proxy_protocol"]["version"] == 1
        assert [sha(a.received) for a in app.accepted] == [sha(payload)] * 2


async def test_local_command_proceeds_with_socket_addresses(pki: Any) -> None:
    app = await HeaderApp(mode="echo").start()
    enf = await Enforcer(pp_cfg(pki, app.port, send="v2")).start()
    async with running(enf, app):
        payload = random_bytes(4000)
        local = build_v2(None, None, command="LOCAL")
        res = await raw_exchange(enf.port(), [local + payload])
        assert sha(res.data) == sha(payload)
        await app.done.wait()
        assert sha(app.accepted[0].received) == sha(payload)
        assert _header(app).source == ("127.0.0.1", res.local[1])
        rec = (await enf.wait_flows(1))[0]
        assert rec["action"] == "allow"
        assert rec["client"] == rec["peer"] == {"ip": "127.0.0.1", "port": res.local[1]}
        assert rec["proxy_protocol"] == {"version": 2, "command": "LOCAL", "tlvs": {}}


async def test_local_command_with_addresses_and_tlvs_keeps_socket_addresses(pki: Any) -> None:
    app = await HeaderApp(mode="echo", expect_header=False).start()
    enf = await Enforcer(pp_cfg(pki, app.port)).start()
    async with running(enf, app):
        payload = random_bytes(100)
        local = build_v2((TEST_NET, 9), ("10.0.0.1", 443), command="LOCAL",
                         tlvs=[aws_vpce_tlv("vpce-1")])
        res = await raw_exchange(enf.port(), [local, payload])
        assert sha(res.data) == sha(payload)
        rec = (await enf.wait_flows(1))[0]
        assert rec["client"]["ip"] == "127.0.0.1", "LOCAL: the addresses are not the client"


# ------------------------------------------------------------------ malformed headers
def _bad_crc() -> bytes:
    good = bytearray(build_v2((TEST_NET, 1), ("10.0.0.1", 2), crc32c=True))
    good[16] ^= 0x01  # one bit of the source address
    return bytes(good)


def _tlv_overrun() -> bytes:
    head = bytearray(build_v2((TEST_NET, 1), ("10.0.0.1", 2)))
    head += b"\x04\x00\x0a\x00\x00"  # a NOOP TLV claiming 10 bytes, 2 present
    head[14:16] = (len(head) - 16).to_bytes(2, "big")
    return bytes(head)


MALFORMED = [
    ("truncated-v1", [b"PROXY TCP4 203.0.113.7"], "truncated"),
    ("truncated-v2", [V2_SIGNATURE + b"\x21\x11"], "truncated"),
    ("truncated-nothing", [], "truncated"),
    ("too-long-v1", [b"PROXY UNKNOWN " + b"x" * 100], "too_long"),
    ("too-long-v2", [V2_SIGNATURE + b"\x21\x11" + (5000).to_bytes(2, "big")], "too_long"),
    ("bad-signature", [b"GET / HTTP/1.1\r\nHost: x\r\n\r\n"], "bad_signature"),
    ("bad-version", [V2_SIGNATURE + b"\x31\x11\x00\x0c" + bytes(12)], "bad_version"),
    ("bad-command", [V2_SIGNATURE + b"\x22\x11\x00\x0c" + bytes(12)], "bad_command"),
    ("bad-family-v2", [V2_SIGNATURE + b"\x21\x41\x00\x0c" + bytes(12)], "bad_family"),
    ("bad-family-v1", [b"PROXY TCP5 1.2.3.4 5.6.7.8 1 2\r\n"], "bad_family"),
    ("bad-address-v1", [b"PROXY TCP4 999.0.0.1 1.2.3.4 1 2\r\n"], "bad_address"),
    ("bad-address-v2", [V2_SIGNATURE + b"\x21\x11\x00\x04" + bytes(4)], "bad_address"),
    ("bad-port", [b"PROXY TCP4 1.2.3.4 5.6.7.8 65536 2\r\n"], "bad_port"),
    ("bad-syntax", [b"PROXY TCP4  1.2.3.4 5.6.7.8 1 2\r\n"], "bad_syntax"),
    ("bad-crc", [_bad_crc()], "bad_crc"),
    ("tlv-overrun", [_tlv_overrun()], "tlv_overrun"),
    ("bad-tlv", [build_v2((TEST_NET, 1), ("10.0.0.1", 2), tlvs=[Tlv(0x05, b"u" * 129)])],
     "bad_tlv"),
]


@pytest.mark.parametrize(("chunks", "reason"), [(c, r) for _, c, r in MALFORMED],
                         ids=[i for i, _, _ in MALFORMED])
async def test_malformed_header_closes_before_upstream(pki: Any, chunks: list[bytes],
                                                       reason: str) -> None:
    app = await HeaderApp(expect_header=False).start()
    enf = await Enforcer(pp_cfg(pki, app.port, send="v2")).start()
    async with running(enf, app):
        # truncated: the client half-closes right after the partial header
        data = [] if reason == "truncated" else [b"app data after the header"]
        res = await raw_exchange(enf.port(), [*chunks, *data])
        assert res.data == b""
        rec = (await enf.wait_flows(1))[0]
        assert rec["action"] == "error"
        assert rec["reason"] == rec["close"] == f"proxy_protocol_{reason}"
        assert rec["upstream"] is None and rec["proxy_protocol"] is None
        assert rec["client"] == rec["peer"] == {"ip": "127.0.0.1", "port": res.local[1]}
        assert proxy_errors(enf, "edge", reason) == 1
        assert sum(proxy_errors(enf, "edge", r) for r in REASONS) == 1
        assert enf.metrics.registry.get_sample_value(
            "enforcer_connections_total", {"listener": "edge", "action": "error"}) == 1
        assert app.accepted == [], "no upstream connection may be opened"


@pytest.mark.parametrize(("trusted", "sent", "close"), [
    (["127.0.0.0/8"], b"", "client_closed"),
    (["10.0.0.0/8"], b"", "client_closed"),
    (["127.0.0.0/8"], b"PROX", "proxy_protocol_truncated"),
    (["10.0.0.0/8"], V2_SIGNATURE[:5], "proxy_protocol_truncated"),
    (["127.0.0.0/8"], b"PROXY TCP4 203.0", "proxy_protocol_truncated"),
], ids=["trusted-nothing", "untrusted-nothing", "trusted-prefix", "untrusted-prefix",
        "trusted-partial-header"])
async def test_optional_client_closing_during_proxy_stage(
        pki: Any, trusted: list[str], sent: bytes, close: str) -> None:
    app = await HeaderApp(expect_header=False).start()
    enf = await Enforcer(pp_cfg(pki, app.port, accept="optional", trusted=trusted)).start()
    async with running(enf, app):
        res = await raw_exchange(enf.port(), [sent] if sent else [])
        assert res.data == b""
        rec = (await enf.wait_flows(1))[0]
        assert rec["action"] == "error" and rec["close"] == close
        assert proxy_errors(enf, "edge", "truncated") == (close != "client_closed")
        assert app.accepted == []


async def test_header_timeout(pki: Any) -> None:
    app = await HeaderApp(expect_header=False).start()
    enf = await Enforcer(pp_cfg(pki, app.port, timeout="200ms")).start()
    async with running(enf, app):
        res = await raw_exchange(enf.port(), [b"PROXY TCP4 203.0.113.7 "], half_close=False)
        assert res.data == b""
        rec = (await enf.wait_flows(1))[0]
        assert rec["action"] == "error"
        assert rec["reason"] == "proxy_protocol_timeout"
        assert proxy_errors(enf, "edge", "timeout") == 1
        assert app.accepted == []


SILENT_DETAIL = ("nothing received in time (tls.detect_timeout is 0s or not shorter than "
                 "proxy_protocol.timeout: the client must send first)")


@pytest.mark.parametrize(("accept", "trusted", "detail"), [
    ("required", ["127.0.0.0/8"], "no complete PROXY header in time"),
    ("optional", ["127.0.0.0/8"], SILENT_DETAIL),
    ("optional", ["10.0.0.0/8"], SILENT_DETAIL),
], ids=["required", "optional-trusted", "optional-untrusted"])
async def test_header_timeout_silent_client(pki: Any, accept: str, trusted: list[str],
                                            detail: str) -> None:
    """A client waiting for the server to speak first never gets past the PROXY stage when
    the PROXY timeout (200ms) is not longer than tls.detect_timeout (200ms by default): the
    record says why (tests/e2e/test_detect_timeout.py: the banner case with a shorter one)."""
    app = await HeaderApp(expect_header=False).start()
    enf = await Enforcer(pp_cfg(pki, app.port, timeout="200ms", accept=accept,
                                trusted=trusted)).start()
    async with running(enf, app):
        res = await raw_exchange(enf.port(), [], half_close=False)
        assert res.data == b""
        rec = (await enf.wait_flows(1))[0]
        assert rec["reason"] == "proxy_protocol_timeout"
        assert rec["detail"] == detail
        assert proxy_errors(enf, "edge", "timeout") == 1
        assert app.accepted == []


# ------------------------------------------------------------------ TLS and TLVs sent
async def _tls_client(port: int, prefix: bytes, ctx: ssl.SSLContext, payload: bytes) -> bytes:
    """Send ``prefix`` in clear (a PROXY header), then TLS; echo ``payload`` through."""
    sock = socket.create_connection(("127.0.0.1", port))
    sock.sendall(prefix)
    reader, writer = await asyncio.open_connection(sock=sock, ssl=ctx,
                                                   server_hostname="localhost")
    try:
        writer.write(payload)
        await writer.drain()
        return await asyncio.wait_for(reader.readexactly(len(payload)), 30)
    finally:
        writer.close()


async def test_v2_tlvs_sent_upstream_after_tls(pki: Any) -> None:
    app = await HeaderApp(mode="echo").start()
    tls = {"mode": "terminate", "material": "mesh", "client_auth": "required"}
    enf = await Enforcer(pp_cfg(pki, app.port, send="v2", tls=tls,
                                tlvs=["alpn", "authority", "ssl", "unique_id",
                                      "identity"])).start()
    async with running(enf, app):
        payload = random_bytes(200_000)
        ctx = client_ctx(pki.ca, pki.other.cert, pki.other.key)
        got = await _tls_client(enf.port(), build_v1((TEST_NET, 4444), ("10.0.0.1", 443)), ctx,
                                payload)
        assert sha(got) == sha(payload)
        rec = (await enf.wait_flows(1))[0]
        await app.done.wait()
        assert sha(app.accepted[0].received) == sha(payload)
        header = _header(app)
        assert header.source == (TEST_NET, 4444)
        assert header.authority == "localhost"
        assert header.unique_id == rec["flow_id"].encode()
        assert header.identity == OTHER_ID
        ssl_info = header.ssl
        assert ssl_info is not None
        assert ssl_info.verified
        assert ssl_info.version == rec["tls"]["version"] == "TLSv1.3"
        assert ssl_info.cipher == rec["tls"]["cipher"]
        assert ssl_info.cn == "other"
        assert header.alpn is None, "no ALPN was negotiated, so none is sent"
        assert rec["client"] == {"ip": TEST_NET, "port": 4444}
        assert rec["tls"]["peer"]["spiffe_id"] == OTHER_ID


# ------------------------------------------------------------------ chaining
@pytest.mark.parametrize("last_hop", ["v1", "v2"])
async def test_chain_balancer_gateway_sidecar_app_sees_the_original_client(
        pki: Any, last_hop: str) -> None:
    """client (as an NLB would: PROXY v2 + TLS) -> gateway enforcer (accepts from trusted,
    terminates TLS, mTLS + PROXY v2 with TLVs) -> sidecar enforcer (accepts v2, mTLS, rules
    on the original client) -> app (PROXY v1/v2), which sees the original client."""
    payload = random_bytes(500_000)
    app = await HeaderApp(mode="echo").start()
    sidecar_rules = [{"name": "gateway-for-testnet", "action": "allow",
                      "from": {"identities": [CLIENT_ID], "cidrs": ["203.0.113.0/24"]}}]
    sidecar = await Enforcer(pp_cfg(
        pki, app.port, name="sidecar", send=last_hop, rules=sidecar_rules, default="deny",
        tls={"mode": "terminate", "material": "mesh", "client_auth": "required"})).start()
    gateway = await Enforcer(pp_cfg(
        pki, sidecar.port(), name="gateway", send="v2",
        tlvs=["authority", "ssl", "unique_id", "identity"],
        tls={"mode": "terminate", "material": "mesh", "client_auth": "required"},
        upstream_tls={"mode": "mtls", "material": "client", "verify": {"uri": [INBOUND_ID]}},
    )).start()
    async with running(gateway, sidecar, app):
        nlb = build_v2((TEST_NET, 55555), ("10.0.0.1", 443),
                       tlvs=[aws_vpce_tlv("vpce-0abc")], crc32c=True)
        ctx = client_ctx(pki.ca, pki.other.cert, pki.other.key)
        got = await _tls_client(gateway.port(), nlb, ctx, payload)
        assert sha(got) == sha(payload)
        await app.done.wait()
        assert sha(app.accepted[0].received) == sha(payload)
        at_app = _header(app)
        assert at_app.version == (1 if last_hop == "v1" else 2)
        assert at_app.source == (TEST_NET, 55555), "the app must see the original client"
        assert at_app.destination == ("10.0.0.1", 443)
        gw = (await gateway.wait_flows(1))[0]
        sc = (await sidecar.wait_flows(1))[0]
        assert gw["client"] == sc["client"] == {"ip": TEST_NET, "port": 55555}
        assert gw["proxy_protocol"]["tlvs"] == {"crc32c": "ok", "aws_vpce_id": "vpce-0abc"}
        assert sc["action"] == "allow" and sc["rule"] == "gateway-for-testnet"
        assert sc["tls"]["peer"]["spiffe_id"] == CLIENT_ID  # the gateway itself
        tlvs = sc["proxy_protocol"]["tlvs"]
        assert tlvs["identity"] == OTHER_ID  # whom the gateway verified
        assert tlvs["authority"] == "localhost"
        assert tlvs["unique_id"] == gw["flow_id"].encode().hex()
        assert tlvs["ssl"]["verified"] is True and tlvs["ssl"]["cn"] == "other"


# ------------------------------------------------------------------ the shipped example
def _gateway_example(pki: Any, upstream_port: int) -> dict[str, Any]:
    """config/gateway-nlb.yaml with loopback addresses and the test PKI."""
    cfg = yaml.safe_load((REPO / "config" / "gateway-nlb.yaml").read_text())
    cfg["tls"]["public"].update(cert=str(pki.server.cert), key=str(pki.server.key),
                                ca=str(pki.ca))
    cfg["tls"]["mesh"].update(cert=str(pki.client.cert), key=str(pki.client.key),
                              ca=str(pki.ca))
    listener = cfg["listeners"][0]
    listener["listen"] = "127.0.0.1:0"
    assert listener["proxy_protocol"]["accept"] == "required"
    listener["proxy_protocol"]["trusted_sources"] = ["127.0.0.0/8"]  # the "VPC" here
    cfg["upstreams"]["payments"]["address"] = f"127.0.0.1:{upstream_port}"
    del cfg["admin"]
    return cast(dict[str, Any], cfg)


async def test_gateway_nlb_example_end_to_end(pki: Any) -> None:
    """The shipped gateway config behind a (simulated) NLB, chained to an inbound enforcer
    that accepts its PROXY v2 header and re-sends v1 to the app."""
    app = await HeaderApp(mode="echo").start()
    inbound = await Enforcer(pp_cfg(
        pki, app.port, name="inbound", send="v1", default="deny",
        rules=[{"name": "gateways", "action": "allow", "from": {"identities": [CLIENT_ID]}}],
        tls={"mode": "terminate", "material": "mesh", "client_auth": "required"})).start()
    gateway = await Enforcer(_gateway_example(pki, inbound.port())).start()
    async with running(gateway, inbound, app):
        payload = random_bytes(100_000)
        ctx = client_ctx(pki.ca, pki.other.cert, pki.other.key)
        office = build_v2((TEST_NET, 60000), ("10.0.0.10", 8443), crc32c=True)
        got = await _tls_client(gateway.port(), office, ctx, payload)
        assert sha(got) == sha(payload)
        await app.done.wait()
        assert sha(app.accepted[0].received) == sha(payload)
        assert _header(app).source == (TEST_NET, 60000)
        blocked = build_v2(("198.51.100.5", 60001), ("10.0.0.10", 8443))
        with pytest.raises((ConnectionError, asyncio.IncompleteReadError, ssl.SSLError)):
            await _tls_client(gateway.port(), blocked, ctx, payload)
        recs = await gateway.wait_flows(2)
        by_ip = {r["client"]["ip"]: r for r in recs}
        assert by_ip[TEST_NET]["rule"] == "office-and-partners"
        assert by_ip["198.51.100.5"]["action"] == "deny"
        assert by_ip["198.51.100.5"]["rule"] == "blocked-networks"
        tlvs = (await inbound.wait_flows(1))[0]["proxy_protocol"]["tlvs"]
        assert tlvs["identity"] == OTHER_ID and tlvs["authority"] == "localhost"
        assert len(app.accepted) == 1


async def test_negotiated_alpn_is_sent_upstream(pki: Any) -> None:
    app = await HeaderApp(mode="echo").start()
    tls = {"mode": "terminate", "material": "mesh", "client_auth": "required",
           "alpn": ["h2", "http/1.1"]}
    enf = await Enforcer(pp_cfg(pki, app.port, send="v2", tls=tls, tlvs=["alpn"])).start()
    async with running(enf, app):
        payload = random_bytes(50_000)
        ctx = client_ctx(pki.ca, pki.other.cert, pki.other.key)
        ctx.set_alpn_protocols(["http/1.1"])
        got = await _tls_client(enf.port(), build_v1((TEST_NET, 4445), ("10.0.0.1", 443)), ctx,
                                payload)
        assert sha(got) == sha(payload)
        await app.done.wait()
        assert _header(app).alpn == b"http/1.1"
        rec = (await enf.wait_flows(1))[0]
        assert rec["tls"]["alpn"] == "http/1.1"
