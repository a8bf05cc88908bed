"""PROXY protocol interop with a real peer: HAProxy (Debian package; .ci/run installs it).

- HAProxy ``send-proxy`` / ``send-proxy-v2`` (with ``proxy-v2-options`` ssl, cert-cn,
  ssl-cipher, crc32c, unique-id, authority, behind an HAProxy TLS frontend so the ssl and
  authority TLVs have something to describe) into an enforcer listener: the flow record's
  client is the address and port HAProxy saw, the TLVs are decoded, and the enforcer
  passes the original client on to the app.
- enforcer ``send: v1`` / ``send: v2`` (with TLVs) into an HAProxy frontend with
  ``accept-proxy``: HAProxy's log shows the original client (and the TLVs it understood).

Bytes go through HAProxy both ways and are checked by sha256. HAProxy runs in the
foreground (``-db``) with its log on stdout and is stopped at the end of each test.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from enforcer.proxyproto import build_v1
from tests.conftest import require_tool
from tests.e2e.harness import Backend, Enforcer, client_ctx, random_bytes, running, sha
from tests.e2e.proxy_util import (
    TEST_NET,
    Haproxy,
    HeaderApp,
    free_port,
    pp_cfg,
    raw_exchange,
)

OTHER_ID = "spiffe://enforcer.demo/ns/other/sa/intruder"  # pki.other

GLOBAL = """
global
    log stdout format raw local0
    maxconn 100
defaults
    mode tcp
    log global
    timeout connect 5s
    timeout client 30s
    timeout server 30s
"""


@pytest.fixture
def haproxy_bin() -> str:
    return require_tool("haproxy")


@pytest.fixture
async def haproxies() -> AsyncIterator[list[Haproxy]]:
    started: list[Haproxy] = []
    yield started
    for hp in started:
        hp.stop()


def _start(haproxies: list[Haproxy], binary: str, workdir: Path, config: str) -> Haproxy:
    hp = Haproxy(binary, workdir, GLOBAL + config)
    haproxies.append(hp)
    hp.wait_ready()
    return hp


def _frontend_pem(pki: Any, workdir: Path) -> Path:
    pem = workdir / "frontend.pem"
    pem.write_text(Path(pki.server.cert).read_text() + Path(pki.server.key).read_text())
    return pem


# ------------------------------------------------------------------ HAProxy -> enforcer
async def test_haproxy_send_proxy_v1_into_enforcer(pki: Any, tmp_path: Path, haproxy_bin: str,
                                                   haproxies: list[Haproxy]) -> None:
    app = await HeaderApp(mode="echo").start()
    enf = await Enforcer(pp_cfg(pki, app.port, send="v2")).start()
    front = free_port()
    _start(haproxies, haproxy_bin, tmp_path, f"""
frontend fe
    bind 127.0.0.1:{front}
    default_backend be
backend be
    server enforcer 127.0.0.1:{enf.port()} send-proxy
""")
    async with running(enf, app):
        payload = random_bytes(2 * 1024 * 1024)
        res = await raw_exchange(front, [payload])
        assert not res.reset
        assert sha(res.data) == sha(payload), "bytes back through haproxy and enforcer"
        await app.done.wait()
        assert sha(app.accepted[0].received) == sha(payload), "bytes to the app"
        rec = (await enf.wait_flows(1))[0]
        assert rec["action"] == "allow"
        assert rec["client"] == {"ip": "127.0.0.1", "port": res.local[1]}
        assert rec["peer"]["port"] != res.local[1], "the TCP peer is haproxy itself"
        assert rec["proxy_protocol"] == {"version": 1, "command": "PROXY", "tlvs": {}}
        header = app.accepted[0].header
        assert header is not None
        assert header.source == ("127.0.0.1", res.local[1])
        assert header.destination == ("127.0.0.1", front), "haproxy's frontend address"


async def test_haproxy_send_proxy_v2_with_tlvs_into_enforcer(
        pki: Any, tmp_path: Path, haproxy_bin: str, haproxies: list[Haproxy]) -> None:
    app = await HeaderApp(mode="echo").start()
    enf = await Enforcer(pp_cfg(pki, app.port, send="v1")).start()
    front = free_port()
    pem = _frontend_pem(pki, tmp_path)
    _start(haproxies, haproxy_bin, tmp_path, f"""
frontend fe
    bind 127.0.0.1:{front} ssl crt {pem} ca-file {pki.ca} verify optional
    unique-id-format uid-%ci:%cp
    default_backend be
backend be
    server enforcer 127.0.0.1:{enf.port()} send-proxy-v2 proxy-v2-options ssl,cert-cn,ssl-cipher,crc32c,unique-id,authority
""")
    async with running(enf, app):
        payload = random_bytes(1024 * 1024)
        ctx = client_ctx(pki.ca, pki.other.cert, pki.other.key)
        reader, writer = await asyncio.open_connection("127.0.0.1", front, ssl=ctx,
                                                       server_hostname="localhost")
        cport = writer.get_extra_info("sockname")[1]
        tls_version = writer.get_extra_info("ssl_object").version()
        cipher = writer.get_extra_info("cipher")[0]
        try:
            writer.write(payload)
            await writer.drain()
            got = await asyncio.wait_for(reader.readexactly(len(payload)), 30)
        finally:
            writer.close()
        assert sha(got) == sha(payload), "bytes back through haproxy and enforcer"
        rec = (await enf.wait_flows(1))[0]
        assert rec["client"] == {"ip": "127.0.0.1", "port": cport}
        pp = rec["proxy_protocol"]
        assert pp["version"] == 2 and pp["command"] == "PROXY"
        tlvs = pp["tlvs"]
        assert tlvs["crc32c"] == "ok", "haproxy's CRC32C verified"
        assert tlvs["authority"] == "localhost", "the SNI the client sent to haproxy"
        assert bytes.fromhex(tlvs["unique_id"]) == f"uid-127.0.0.1:{cport}".encode()
        assert tlvs["ssl"]["version"] == tls_version
        assert tlvs["ssl"]["cipher"] == cipher
        assert tlvs["ssl"]["cn"] == "other"
        assert tlvs["ssl"]["verified"] is True
        await app.done.wait()
        assert sha(app.accepted[0].received) == sha(payload), "bytes to the app"
        header = app.accepted[0].header
        assert header is not None and header.version == 1
        assert header.source == ("127.0.0.1", cport)


# ------------------------------------------------------------------ enforcer -> HAProxy
@pytest.mark.parametrize(("send", "incoming"), [
    ("v1", None), ("v2", None),
    ("v1", (TEST_NET, 51234)), ("v2", ("2001:db8::7", 40000)),
], ids=["v1", "v2", "v1-chained", "v2-chained-ipv6"])
async def test_enforcer_sends_proxy_into_haproxy_accept_proxy(
        pki: Any, tmp_path: Path, haproxy_bin: str, haproxies: list[Haproxy], send: str,
        incoming: tuple[str, int] | None) -> None:
    """The enforcer's client (its TCP peer, or the PROXY source it accepted from a trusted
    balancer) shows up in HAProxy's log as HAProxy's client."""
    backend = await Backend(mode="swap", payload=random_bytes(3 * 1024 * 1024)).start()
    front = free_port()
    hp = _start(haproxies, haproxy_bin, tmp_path, f"""
frontend fe
    bind 127.0.0.1:{front} accept-proxy
    log-format "PPLOG client=%ci:%cp dst=%fi:%fp up=%U down=%B authority=%[fc_pp_authority] uid=%[fc_pp_unique_id]"
    default_backend be
backend be
    server app 127.0.0.1:{backend.port}
""")
    tlvs = ["unique_id"] if send == "v2" else None
    enf = await Enforcer(pp_cfg(pki, front, accept="optional", send=send, tlvs=tlvs)).start()
    async with running(enf, backend):
        up = random_bytes(1024 * 1024 + 3)
        dst = ("::1" if incoming and ":" in incoming[0] else "10.0.0.1", 443)
        prefix = [build_v1(incoming, dst)] if incoming else []
        res = await raw_exchange(enf.port(), [*prefix, up])
        await backend.done.wait()
        assert sha(res.data) == sha(backend.payload), "bytes back through haproxy"
        assert sha(backend.received[0]) == sha(up), "bytes to the backend through haproxy"
        rec = (await enf.wait_flows(1))[0]
        client = incoming or ("127.0.0.1", res.local[1])
        assert (rec["client"]["ip"], rec["client"]["port"]) == client
        host = f"[{client[0]}]" if ":" in client[0] else client[0]
        line = await hp.wait_log("PPLOG ")
        assert f"client={client[0]}:{client[1]} " in line or f"client={host}:{client[1]} " \
            in line, line
        dst_seen = dst if incoming else ("127.0.0.1", enf.port())
        assert f" dst={dst_seen[0]}:{dst_seen[1]} " in line, line
        assert f"up={len(up)} down={len(backend.payload)}" in line, line
        if send == "v2":
            assert f"uid={rec['flow_id']}" in line, line


@pytest.mark.parametrize("send", ["v1", "v2"])
async def test_a_unix_socket_listener_sends_a_header_haproxy_accepts(
        pki: Any, tmp_path: Path, haproxy_bin: str, haproxies: list[Haproxy], send: str) -> None:
    """A client on a unix socket has no address to pass on: v1 says UNKNOWN and v2 LOCAL
    with AF_UNSPEC (HAProxy resets a v2 PROXY command without addresses), TLVs included;
    HAProxy keeps its own socket addresses and relays every byte."""
    backend = await Backend(mode="echo").start()
    front = free_port()
    _start(haproxies, haproxy_bin, tmp_path, f"""
frontend fe
    bind 127.0.0.1:{front} accept-proxy
    default_backend be
backend be
    server app 127.0.0.1:{backend.port}
""")
    cfg = pp_cfg(pki, front, accept="off", send=send,
                 tlvs=["unique_id"] if send == "v2" else None)
    path = tmp_path / "in.sock"
    cfg["listeners"][0]["listen"] = f"unix:{path}"
    enf = await Enforcer(cfg).start()
    async with running(enf, backend):
        reader, writer = await asyncio.open_unix_connection(str(path))
        payload = random_bytes(300_000)
        writer.write(payload)
        writer.write_eof()
        got = await asyncio.wait_for(reader.read(), 10)
        writer.close()
        rec = (await enf.wait_flows(1))[0]
    assert sha(got) == sha(payload)
    assert sha(backend.received[0]) == sha(payload)
    assert rec["action"] == "allow"
    assert rec["bytes"] == {"from_client": len(payload), "to_client": len(payload)}


async def test_enforcer_v2_tlvs_after_tls_are_understood_by_haproxy(
        pki: Any, tmp_path: Path, haproxy_bin: str, haproxies: list[Haproxy]) -> None:
    """A TLS-terminating enforcer sends v2 with every TLV it knows (ssl, authority,
    unique_id and the custom identity TLV 0xE4): HAProxy parses the header, logs the
    client, the authority and the unique id, and relays the bytes."""
    backend = await Backend(mode="echo").start()
    front = free_port()
    hp = _start(haproxies, haproxy_bin, tmp_path, f"""
frontend fe
    bind 127.0.0.1:{front} accept-proxy
    log-format "PPLOG client=%ci:%cp authority=%[fc_pp_authority] uid=%[fc_pp_unique_id] up=%U"
    default_backend be
backend be
    server app 127.0.0.1:{backend.port}
""")
    tls = {"mode": "terminate", "material": "mesh", "client_auth": "required"}
    enf = await Enforcer(pp_cfg(pki, front, accept="off", send="v2", tls=tls, tlvs=[
        "alpn", "authority", "ssl", "unique_id", "identity"])).start()
    async with running(enf, backend):
        payload = random_bytes(512 * 1024)
        ctx = client_ctx(pki.ca, pki.other.cert, pki.other.key)
        reader, writer = await asyncio.open_connection("127.0.0.1", enf.port(), ssl=ctx,
                                                       server_hostname="localhost")
        cport = writer.get_extra_info("sockname")[1]
        try:
            writer.write(payload)
            await writer.drain()
            got = await asyncio.wait_for(reader.readexactly(len(payload)), 30)
        finally:
            writer.close()
        assert sha(got) == sha(payload), "bytes back through haproxy"
        rec = (await enf.wait_flows(1))[0]
        assert rec["tls"]["peer"]["spiffe_id"] == OTHER_ID
        line = await hp.wait_log("PPLOG ")
        assert f"client=127.0.0.1:{cport} " in line, line
        assert " authority=localhost " in line, line
        assert f" uid={rec['flow_id']} " in line, line
        await backend.done.wait()
        assert sha(backend.received[0]) == sha(payload), "bytes to the backend"
        assert f" up={len(payload)}" in line, line
