"""How a TLS stream ends (docs/tls-data-plane.md, "Close semantics"), in every relay: the
native pump with its own TLS 1.3 records, the pump with OpenSSL keeping the records
(``tls_records``), and the Python relay (``relay_mode``).

- A record error gets the alert OpenSSL would send before the close: the peer, a real TLS
  stack (Python's ``ssl``, i.e. OpenSSL, reading with an SSLObject), receives it.
- A FIN in the middle of a record is ``truncated``; a FIN without close_notify on a record
  boundary is ``eof_without_close_notify``: both reach the other side as an RST (never as
  a clean end it could take for the whole stream), unless the listener's
  ``tls.allow_eof_without_close_notify`` relaxes the second case.
- A real OpenSSL server (s_server) killed mid-stream (its kernel sends a FIN, no
  close_notify) is an unclean end of the upstream: the client gets an RST.

Records no ordinary peer sends are forged as in ``test_tls_records.py``.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import ssl
import struct
from pathlib import Path
from typing import Any

import pytest

from enforcer.dataplane import native
from tests.conftest import require_tool
from tests.e2e import harness
from tests.e2e.harness import (
    Enforcer,
    LocalServer,
    inbound_cfg,
    outbound_cfg,
    random_bytes,
    running,
    sha,
    wait_until,
)
from tests.e2e.test_tls_records import Client

pytestmark = [
    pytest.mark.skipif(not native.available(), reason=native.unavailable_reason()),
    pytest.mark.usefixtures("tls_records", "relay_mode"),
]


class Upstream(LocalServer):
    """Echoes, and tells how its client's stream ended: ``fin`` or ``reset``."""

    def __init__(self) -> None:
        self.received = bytearray()
        self.ended: asyncio.Future[str] = asyncio.get_running_loop().create_future()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        how = "fin"
        try:
            while data := await reader.read(65536):
                self.received += data
                writer.write(data)
        except ConnectionResetError:
            how = "reset"
        if not self.ended.done():
            self.ended.set_result(how)
        writer.close()


async def _start(pki: Any, **tls: Any) -> tuple[Upstream, Enforcer]:
    upstream = await Upstream().start()
    cfg = inbound_cfg(pki, upstream.port)
    cfg["listeners"][0]["tls"].update(tls)
    return upstream, await Enforcer(cfg).start()


async def _client(pki: Any, enforcer: Enforcer, tmp_path: Path) -> Client:
    """A mutual-TLS client that exchanged 100 bytes (the relay is running)."""
    client = Client(pki, enforcer.port(), tmp_path / "keys.log")
    await client.handshake()
    first = random_bytes(100)
    await client.send(first)
    assert sha(await client.receive(len(first))) == sha(first)
    if harness.RELAY == "native":
        await wait_until(lambda: bool(enforcer.plane.pumped))
    client.take_over()
    return client


async def _alert_read(client: Client) -> ssl.SSLError:
    """The SSLError the client's SSLObject raises on what the enforcer sent last."""
    while True:
        data = await asyncio.wait_for(client.loop.sock_recv(client.sock, 65536), 5)
        if not data:
            raise AssertionError("the connection ended without an alert")
        client.incoming.write(data)
        try:
            client.tls.read(65536)
        except ssl.SSLWantReadError:
            continue
        except ssl.SSLError as exc:
            return exc


def _bad_tag(c: Client) -> bytes:
    rec = bytearray(c.record(23, b"forged"))
    rec[-1] ^= 1
    return bytes(rec)


def _too_long(c: Client) -> bytes:  # RFC 8446 5.2: at most 2^14 + 256 bytes of ciphertext
    return b"\x17\x03\x03" + struct.pack(">H", 16 * 1024 + 257) + bytes(16 * 1024 + 257)


@pytest.mark.parametrize(("forge", "reason", "alert"), [
    (_bad_tag, "DECRYPTION_FAILED_OR_BAD_RECORD_MAC", "SSLV3_ALERT_BAD_RECORD_MAC"),
    (_too_long, "ENCRYPTED_LENGTH_TOO_LONG", "TLSV1_ALERT_RECORD_OVERFLOW"),
], ids=["bad_record_mac", "record_overflow"])
async def test_a_record_error_sends_the_alert_before_closing(
        pki: Any, tmp_path: Path, forge: Any, reason: str, alert: str) -> None:
    upstream, enforcer = await _start(pki)
    async with running(enforcer, upstream):
        client = await _client(pki, enforcer, tmp_path)
        try:
            await client.send_raw(forge(client))
            received = await _alert_read(client)
            rec = (await enforcer.wait_flows(1))[0]
        finally:
            client.close()
    assert received.reason == alert, received
    assert (rec["close"], rec["detail"]) == (
        "client_tls_error", f"TLS error from the client: {harness.relay_reason(reason)}")
    assert len(upstream.received) == 100  # nothing of the forged record went through


@pytest.mark.parametrize(("cut", "close"), [
    ("mid_record", "client_truncated"),
    ("mid_header", "client_truncated"),
    ("on_boundary", "client_eof_without_close_notify"),
])
async def test_a_fin_without_close_notify_is_an_abort_towards_the_upstream(
        pki: Any, tmp_path: Path, cut: str, close: str) -> None:
    upstream, enforcer = await _start(pki)
    async with running(enforcer, upstream):
        client = await _client(pki, enforcer, tmp_path)
        try:
            data = random_bytes(5000)
            record = client.record(23, data)
            wire = {"mid_record": record[:-7], "mid_header": record + record[:3],
                    "on_boundary": record}[cut]
            await client.send_raw(wire)
            if cut != "mid_record":
                await wait_until(lambda: len(upstream.received) == 5100)
            client.sock.shutdown(socket.SHUT_WR)
            ended = await asyncio.wait_for(upstream.ended, 5)
            rec = (await enforcer.wait_flows(1))[0]
        finally:
            client.close()
    assert ended == "reset"
    assert (rec["action"], rec["close"]) == ("allow", close)
    assert len(upstream.received) == (100 if cut == "mid_record" else 5100)


async def _one_record_then_fin(client: Client, upstream: Upstream) -> bytes:
    """The client sends one application-data record, then a bare FIN (no close_notify),
    which the listener allows: the upstream gets the bytes and a FIN."""
    data = random_bytes(3000)
    await client.send_raw(client.record(23, data))
    await wait_until(lambda: len(upstream.received) == 3100)
    client.sock.shutdown(socket.SHUT_WR)
    assert await asyncio.wait_for(upstream.ended, 5) == "fin"
    return data


async def test_the_listener_may_allow_a_fin_without_close_notify(
        pki: Any, tmp_path: Path) -> None:
    """``tls.allow_eof_without_close_notify: true``: a FIN on a record boundary ends the
    stream as a FIN would (the upstream gets a FIN); a cut record is still a truncation."""
    upstream, enforcer = await _start(pki, allow_eof_without_close_notify=True)
    async with running(enforcer, upstream):
        client = await _client(pki, enforcer, tmp_path)
        try:
            data = await _one_record_then_fin(client, upstream)
            assert sha(bytes(upstream.received[100:])) == sha(data)
            # the record before the client's socket goes: a close_notify sent to a closed
            # socket would be answered with a reset (client_reset), a race on fast machines
            rec = (await enforcer.wait_flows(1))[0]
        finally:
            client.close()
        assert rec["close"] == "client_fin"
        upstream.ended = asyncio.get_running_loop().create_future()
        upstream.received.clear()
        (tmp_path / "again").mkdir()
        client = await _client(pki, enforcer, tmp_path / "again")
        try:
            await client.send_raw(client.record(23, data)[:100])
            client.sock.shutdown(socket.SHUT_WR)
            assert await asyncio.wait_for(upstream.ended, 5) == "reset"
        finally:
            client.close()
        rec = (await enforcer.wait_flows(2))[1]
        assert rec["close"] == "client_truncated"


async def _read_to_the_end(client: Client) -> tuple[bytes, str]:
    """What the client reads until its stream ends, and how: ``close_notify`` (then the
    FIN) or a bare ``fin``; an alert raises its SSLError."""
    got = bytearray()
    ended = ""
    while True:
        with contextlib.suppress(ssl.SSLWantReadError):
            while not ended:
                chunk = client.tls.read(65536)  # b"" once close_notify came
                got += chunk
                ended = "" if chunk else "close_notify"
        data = await asyncio.wait_for(client.loop.sock_recv(client.sock, 65536), 5)
        if not data:
            return bytes(got), ended or "fin"
        client.incoming.write(data)


async def test_a_fin_the_listener_allows_is_a_half_close(pki: Any, tmp_path: Path) -> None:
    """With ``tls.allow_eof_without_close_notify`` a bare FIN on a record boundary is
    passed on as a FIN and the other direction goes on: the client still reads everything
    the upstream sends after it, then close_notify and the FIN (never an alert)."""
    upstream, enforcer = await _start(pki, allow_eof_without_close_notify=True)
    async with running(enforcer, upstream):
        client = await _client(pki, enforcer, tmp_path)
        try:
            data = await _one_record_then_fin(client, upstream)
            echoed, how = await _read_to_the_end(client)  # the echo, then the upstream's end
            assert sha(echoed) == sha(data) and how == "close_notify"
            rec = (await enforcer.wait_flows(1))[0]
        finally:
            client.close()
    assert (rec["action"], rec["close"]) == ("allow", "client_fin")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def test_a_real_server_killed_mid_stream_resets_the_client(pki: Any) -> None:
    """openssl s_server as the upstream of an outbound, killed after an exchange: its
    kernel closes the socket with a FIN and no close_notify; the outbound's client gets an
    RST, and the flow record says so."""
    openssl = require_tool("openssl")
    port = _free_port()
    proc = await asyncio.create_subprocess_exec(
        openssl, "s_server", "-accept", f"127.0.0.1:{port}", "-naccept", "1", "-quiet",
        "-cert", str(pki.server.cert), "-key", str(pki.server.key), "-CAfile", str(pki.ca),
        "-Verify", "1", stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.DEVNULL)
    assert proc.stdin is not None and proc.stdout is not None
    outbound = await Enforcer(outbound_cfg(pki, port)).start()
    try:
        async with running(outbound):
            await asyncio.sleep(0.3)  # s_server binds
            reader, writer = await asyncio.open_connection("127.0.0.1", outbound.port())
            line = b"".join(str(b % 10).encode() for b in random_bytes(40)) + b"\n"
            writer.write(line)
            assert sha(await asyncio.wait_for(proc.stdout.readexactly(len(line)), 10)) == sha(
                line)
            proc.kill()
            await proc.wait()
            with pytest.raises(ConnectionResetError):
                await asyncio.wait_for(reader.read(), 5)
            writer.close()
            with contextlib.suppress(ConnectionResetError):
                await writer.wait_closed()
            rec = (await outbound.wait_flows(1))[0]
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    assert (rec["action"], rec["close"]) == ("allow", "upstream_eof_without_close_notify")
