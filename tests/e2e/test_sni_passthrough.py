"""``tls.mode: passthrough``: one listener routes TLS by SNI to backends with their own
certificates, without terminating it.

Real peers: Python ssl and ``openssl s_client`` clients, ``curl --connect-to``, TLS
backends with different certificates (the client sees and verifies each backend's own
certificate: nothing terminated in between), HAProxy sending PROXY v2 in front. Bytes are
checked by sha256 both ways, on both relays. Hand-made first flights: a ClientHello in
1-byte TCP segments, and one split over two TLS records.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import ssl
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest

from enforcer.tlsconf.certs import issue
from tests.conftest import require_tool
from tests.e2e.harness import Enforcer, LocalServer, running, sha
from tests.e2e.proxy_util import Haproxy, free_port
from tests.e2e.tls_util import run_tool, serial_of_der, serial_of_file
from tests.hellos import hello_message, records

API, SHOP = "api.example.test", "shop.apps.example.test"


@pytest.fixture(autouse=True)
def _both_relays(relay_mode: str) -> str:
    return relay_mode


@pytest.fixture(scope="module")
def certs(pki: Any) -> dict[str, Any]:
    return {
        "api": issue(pki.base, pki.base / "pt-api", name="pt-api", dns=[API], client=False),
        "apps": issue(pki.base, pki.base / "pt-apps", name="pt-apps",
                      dns=["*.apps.example.test"], client=False),
        "fallback": issue(pki.base, pki.base / "pt-fallback", name="pt-fallback",
                          dns=["fallback.example.test"], client=False),
    }


class TlsBackend(LocalServer):
    """A TLS server with its own certificate: echoes until EOF, or, with ``expect``, reads
    that many bytes, answers ``reply`` and closes (for clients that never half-close).
    ``names`` records the SNI each handshake carried."""

    def __init__(self, cert: Any, *, expect: int = 0, reply: bytes = b"") -> None:
        self.ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        self.ctx.load_cert_chain(str(cert.cert), str(cert.key))
        self.ctx.sni_callback = self._sni
        self.expect, self.reply = expect, reply
        self.names: list[str | None] = []
        self.received: list[bytes] = []
        self.server: asyncio.Server | None = None

    def _sni(self, obj: Any, name: str | None, ctx: ssl.SSLContext) -> None:
        self.names.append(name)

    async def start(self) -> TlsBackend:
        self.server = await asyncio.start_server(self._handle, "127.0.0.1", 0, ssl=self.ctx)
        return self

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        got = bytearray()
        try:
            if self.expect:
                got += await reader.readexactly(self.expect)
                writer.write(self.reply)
            else:
                while data := await reader.read(65536):
                    got += data
                    writer.write(data)
                    await writer.drain()
            await writer.drain()
        except (ConnectionError, OSError, asyncio.IncompleteReadError, ssl.SSLError):
            pass
        finally:
            self.received.append(bytes(got))
            writer.close()


@contextlib.asynccontextmanager
async def backends(certs: dict[str, Any], **kw: Any) -> AsyncIterator[dict[str, TlsBackend]]:
    started = {name: await TlsBackend(cert, **kw).start() for name, cert in certs.items()}
    try:
        yield started
    finally:
        for b in started.values():
            await b.close()


def pt_cfg(bk: dict[str, TlsBackend], *, strict: bool = False,
           rules: list[dict[str, Any]] | None = None, default: str = "allow",
           proxy: dict[str, Any] | None = None) -> dict[str, Any]:
    tls: dict[str, Any] = {"mode": "passthrough", "routes": [
        {"server_names": [API], "upstream": "api"},
        {"server_names": ["*.apps.example.test"], "upstream": "apps"}]}
    listener: dict[str, Any] = {"name": "edge", "listen": "127.0.0.1:0", "tls": tls,
                                "ruleset": "edge"}
    if strict:
        tls["strict_sni"] = True
    else:
        listener["upstream"] = "fallback"
    if proxy is not None:
        listener["proxy_protocol"] = proxy
    return {
        "version": 1, "node": {"name": "edge"}, "listeners": [listener],
        "upstreams": {name: {"address": f"127.0.0.1:{b.port}"} for name, b in bk.items()},
        "rulesets": {"edge": {"default": default, "rules": rules or []}},
    }


def client_ctx(pki: Any) -> ssl.SSLContext:
    return ssl.create_default_context(cafile=str(pki.ca))


async def tls_echo(port: int, ctx: ssl.SSLContext, sni: str | None, payload: bytes,
                   ) -> tuple[bytes, int]:
    """Through the listener with TLS (the handshake is the backend's): echo and the serial
    of the certificate the client verified."""
    async with asyncio.timeout(30):
        reader, writer = await asyncio.open_connection("127.0.0.1", port, ssl=ctx,
                                                       server_hostname=sni)
        try:
            serial = serial_of_der(writer.get_extra_info("ssl_object").getpeercert(True))
            writer.write(payload)
            await writer.drain()
            got = await reader.readexactly(len(payload))
            return got, serial
        finally:
            writer.close()
            with contextlib.suppress(Exception):
                await writer.wait_closed()


# ---------------------------------------------------------------------- routing by SNI
async def test_each_name_reaches_its_backend_with_its_own_certificate(
        pki: Any, certs: dict[str, Any], relay_mode: str) -> None:
    async with backends(certs) as bk:
        enf = await Enforcer(pt_cfg(bk)).start()
        async with running(enf):
            for sni, name in ((API, "api"), (SHOP, "apps"), ("fallback.example.test",
                                                            "fallback")):
                payload = os.urandom(300_000)
                got, serial = await tls_echo(enf.port(), client_ctx(pki), sni, payload)
                assert sha(got) == sha(payload)
                assert serial == serial_of_file(certs[name].cert), f"{sni}: {name}'s cert"
                await asyncio.sleep(0)
                assert bk[name].names[-1] == sni
                assert sha(bk[name].received[-1]) == sha(payload)
            records = await enf.wait_flows(3)
        by_sni = {r["tls"]["sni"]: r for r in records}
        rec = by_sni[SHOP]
        assert rec["action"] == "allow" and rec["upstream"]["name"] == "apps"
        assert rec["tls"]["mode"] == "passthrough"
        assert rec["tls"]["route"] == "*.apps.example.test"
        assert rec["upstream"]["tls"] == "off"
        assert all(r["relay"] == relay_mode for r in records), "the native pump relays it too"
        assert rec["bytes"]["from_client"] > 300_000  # the TLS bytes, records and all
        assert by_sni[API]["tls"]["route"] == API
        assert by_sni["fallback.example.test"]["tls"]["route"] == "default"
        routed = enf.metrics.passthrough_routed_total
        assert routed.labels(listener="edge", upstream="apps")._value.get() == 1


async def test_openssl_and_curl_verify_the_backends_own_certificates(
        pki: Any, certs: dict[str, Any], tmp_path: Path) -> None:
    openssl, curl = require_tool("openssl"), require_tool("curl")
    request, reply = os.urandom(40_000), os.urandom(70_000)
    async with backends(certs, expect=len(request), reply=reply) as bk:
        enf = await Enforcer(pt_cfg(bk)).start()
        async with running(enf):
            for sni, name in ((API, "api"), (SHOP, "apps")):
                code, out, err = await run_tool(
                    openssl, "s_client", "-connect", f"127.0.0.1:{enf.port()}", "-quiet",
                    "-verify_return_error", "-CAfile", str(pki.ca), "-servername", sni,
                    "-verify_hostname", sni, stdin=request)
                assert code == 0, err.decode()
                assert sha(out) == sha(reply)
                assert sha(bk[name].received[-1]) == sha(request)
            # curl sends an HTTP request: the apps backend answers it with `reply`
            http = b"GET / HTTP/1.1\r\nHost: x.apps.example.test\r\nUser-Agent: t\r\nAccept: */*\r\n\r\n"
            async with backends({"apps": certs["apps"]}, expect=len(http),
                                reply=b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n"
                                b"Connection: close\r\n\r\n" % len(reply) + reply) as web:
                enf2 = await Enforcer(pt_cfg({**bk, "apps": web["apps"]})).start()
                async with running(enf2):
                    body = tmp_path / "body"
                    code, out, err = await run_tool(
                        curl, "-sS", "--http1.1", "--cacert", str(pki.ca), "-A", "t",
                        "--connect-to", f"x.apps.example.test:443:127.0.0.1:{enf2.port()}",
                        "-o", str(body), "https://x.apps.example.test/")
                    assert code == 0, err.decode()
                    assert sha(body.read_bytes()) == sha(reply)
                    assert web["apps"].received[-1] == http
                    rec = (await enf2.wait_flows(1))[0]
                    assert rec["tls"]["sni"] == "x.apps.example.test"


# ---------------------------------------------------------------------- refusals
@pytest.mark.parametrize("sni", [None, "other.example.test", "a.b.apps.example.test"])
async def test_strict_sni_refuses_with_an_alert(pki: Any, certs: dict[str, Any],
                                                sni: str | None) -> None:
    openssl = require_tool("openssl")
    async with backends(certs) as bk:
        enf = await Enforcer(pt_cfg(bk, strict=True)).start()
        async with running(enf):
            name_args = ["-noservername"] if sni is None else ["-servername", sni]
            code, out, err = await run_tool(
                openssl, "s_client", "-connect", f"127.0.0.1:{enf.port()}", "-brief",
                "-CAfile", str(pki.ca), *name_args, stdin=b"hello")
            text = (out + err).decode(errors="replace")
            assert code != 0 and "CONNECTION ESTABLISHED" not in text, text
            assert "unrecognized name" in text, text
            ctx = client_ctx(pki)
            ctx.check_hostname = False
            with pytest.raises(ssl.SSLError, match="UNRECOGNIZED_NAME"):
                await tls_echo(enf.port(), ctx, sni, b"x")
            payload = os.urandom(1000)  # a known name still goes through
            got, _ = await tls_echo(enf.port(), client_ctx(pki), API, payload)
            assert sha(got) == sha(payload)
            records = await enf.wait_flows(3)
        refused = [r for r in records if r["close"] == "sni_refused"]
        assert len(refused) == 2
        for rec in refused:
            assert rec["action"] == "deny" and rec["reason"] == "sni_refused"
            assert rec["tls"]["mode"] == "passthrough" and rec["tls"]["sni"] == sni
            assert rec["upstream"] is None
        assert sum(len(b.received) for b in bk.values()) == 1


async def test_rules_allow_and_deny_by_sni(pki: Any, certs: dict[str, Any]) -> None:
    rules = [{"name": "no-admin", "action": "deny", "to": {"sni": ["admin.apps.example.test"]}},
             {"name": "public", "action": "allow", "to": {"sni": ["*.apps.example.test", API]}}]
    async with backends(certs) as bk:
        enf = await Enforcer(pt_cfg(bk, rules=rules, default="deny")).start()
        async with running(enf):
            payload = os.urandom(5000)
            got, _ = await tls_echo(enf.port(), client_ctx(pki), SHOP, payload)
            assert sha(got) == sha(payload)
            for sni in ("admin.apps.example.test", "fallback.example.test"):
                with pytest.raises(ssl.SSLError, match="HANDSHAKE_FAILURE"):
                    await tls_echo(enf.port(), client_ctx(pki), sni, b"x")
            records = await enf.wait_flows(3)
        by_sni = {r["tls"]["sni"]: r for r in records}
        assert by_sni[SHOP]["rule"] == "public" and by_sni[SHOP]["action"] == "allow"
        admin = by_sni["admin.apps.example.test"]
        assert (admin["action"], admin["rule"], admin["close"]) == ("deny", "no-admin", "denied")
        assert by_sni["fallback.example.test"]["reason"] == "default"
        assert bk["apps"].received and len(bk["apps"].received) == 1  # admin never connected
        assert not bk["fallback"].received


async def test_not_tls_and_sslv2_are_refused_clearly(pki: Any, certs: dict[str, Any]) -> None:
    async with backends(certs) as bk:
        enf = await Enforcer(pt_cfg(bk)).start()
        async with running(enf):
            for first, answer in ((b"GET / HTTP/1.1\r\n\r\n", b""),
                                  (bytes.fromhex("802e0103010015"), bytes.fromhex("15030300020246"))):
                reader, writer = await asyncio.open_connection("127.0.0.1", enf.port())
                writer.write(first)
                got = await asyncio.wait_for(reader.read(), 10)
                writer.close()
                assert got == answer
            records = await enf.wait_flows(2)
        assert [r["close"] for r in records] == ["not_tls", "sslv2_hello"]
        assert all(r["action"] == "error" and r["upstream"] is None for r in records)
        assert not any(b.received for b in bk.values())


async def test_a_silent_client_times_out(pki: Any, certs: dict[str, Any]) -> None:
    async with backends(certs) as bk:
        cfg = pt_cfg(bk)
        cfg["limits"] = {"handshake_timeout": "300ms"}
        enf = await Enforcer(cfg).start()
        async with running(enf):
            reader, writer = await asyncio.open_connection("127.0.0.1", enf.port())
            writer.write(b"\x16\x03\x01\x00\x10" + b"\x01" * 10)  # a hello that stops short
            assert await asyncio.wait_for(reader.read(), 10) == b""
            writer.close()
            rec = (await enf.wait_flows(1))[0]
        assert rec["close"] == "handshake_timeout" and rec["action"] == "error"


# ---------------------------------------------------------------------- hand-made first flights
def one_byte_segments(hello: bytes) -> list[bytes]:
    return [hello[i:i + 1] for i in range(len(hello))]


def two_records(hello: bytes) -> list[bytes]:
    return [records(hello_message(hello), [60])]


@pytest.mark.parametrize("cut", [one_byte_segments, two_records])
async def test_a_fragmented_client_hello_is_still_routed(
        pki: Any, certs: dict[str, Any], cut: Callable[[bytes], list[bytes]]) -> None:
    async with backends(certs) as bk:
        enf = await Enforcer(pt_cfg(bk)).start()
        async with running(enf):
            payload = os.urandom(100_000)
            got, serial = await bio_echo(enf.port(), client_ctx(pki), SHOP, payload, cut)
            assert sha(got) == sha(payload)
            assert serial == serial_of_file(certs["apps"].cert)
            rec = (await enf.wait_flows(1))[0]
        assert rec["tls"]["sni"] == SHOP and rec["upstream"]["name"] == "apps"
        assert sha(bk["apps"].received[0]) == sha(payload)


async def bio_echo(port: int, ctx: ssl.SSLContext, sni: str, payload: bytes,
                   cut: Callable[[bytes], list[bytes]]) -> tuple[bytes, int]:
    """A TLS client over memory BIOs whose first flight is sent as ``cut`` makes it (one
    write, drained and followed by a pause, per piece: separate TCP segments)."""
    async with asyncio.timeout(60):
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.get_extra_info("socket").setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
        obj = ctx.wrap_bio(incoming, outgoing, server_hostname=sni)
        try:
            with contextlib.suppress(ssl.SSLWantReadError):
                obj.do_handshake()
            for piece in cut(outgoing.read()):
                writer.write(piece)
                await writer.drain()
                await asyncio.sleep(0.001)
            while True:
                try:
                    obj.do_handshake()
                    break
                except ssl.SSLWantReadError:
                    if out := outgoing.read():
                        writer.write(out)
                    data = await reader.read(65536)
                    assert data, "closed during the handshake"
                    incoming.write(data)
            serial = serial_of_der(obj.getpeercert(True))
            obj.write(payload)
            writer.write(outgoing.read())
            got = bytearray()
            while len(got) < len(payload):
                try:
                    got += obj.read(65536)
                except ssl.SSLWantReadError:
                    data = await reader.read(65536)
                    if not data:
                        break
                    incoming.write(data)
            return bytes(got), serial
        finally:
            writer.close()


# ---------------------------------------------------------------------- PROXY v2 in front
async def test_haproxy_sends_proxy_v2_in_front(pki: Any, certs: dict[str, Any],
                                              tmp_path: Path) -> None:
    haproxy = require_tool("haproxy")
    async with backends(certs) as bk:
        rules = [{"name": "local-only", "action": "allow",
                  "from": {"cidrs": ["127.0.0.0/8"]}, "to": {"sni": [SHOP]}}]
        enf = await Enforcer(pt_cfg(bk, rules=rules, default="deny", proxy={
            "accept": "required", "trusted_sources": ["127.0.0.0/8"]})).start()
        front = free_port()
        hp = Haproxy(haproxy, tmp_path, f"""
global
    log stdout format raw local0
defaults
    mode tcp
    timeout connect 5s
    timeout client 30s
    timeout server 30s
frontend fe
    bind 127.0.0.1:{front}
    default_backend be
backend be
    server enforcer 127.0.0.1:{enf.port()} send-proxy-v2
""")
        try:
            hp.wait_ready()
            async with running(enf):
                payload = os.urandom(200_000)
                reader, writer = await asyncio.open_connection(
                    "127.0.0.1", front, ssl=client_ctx(pki), server_hostname=SHOP)
                cport = writer.get_extra_info("sockname")[1]
                serial = serial_of_der(writer.get_extra_info("ssl_object").getpeercert(True))
                writer.write(payload)
                await writer.drain()
                got = await asyncio.wait_for(reader.readexactly(len(payload)), 30)
                writer.close()
                assert sha(got) == sha(payload)
                assert serial == serial_of_file(certs["apps"].cert)
                rec = (await enf.wait_flows(1))[0]
        finally:
            hp.stop()
        assert rec["client"] == {"ip": "127.0.0.1", "port": cport}
        assert rec["peer"]["port"] != cport, "the TCP peer is haproxy"
        assert rec["proxy_protocol"]["version"] == 2
        assert (rec["action"], rec["rule"], rec["tls"]["sni"]) == ("allow", "local-only", SHOP)
