"""What the native pump's own TLS 1.3 record layer (``_pump.c``, "TLS 1.3 records")
refuses, and the words it uses: the same as OpenSSL's (the ``tls_records`` fixture runs
each test both ways, and both must agree), plus a real OpenSSL peer (s_server) changing
keys towards the outbound. Records no ordinary peer sends are forged as in
``test_tls_records.py`` (keylog secret, record count, AES-GCM from ``cryptography``).
These came from an adversarial review of the layer; each failed against its first version.
"""

from __future__ import annotations

import asyncio
import socket
from pathlib import Path
from typing import Any

import pytest

from enforcer.dataplane import native
from tests.conftest import require_tool
from tests.e2e.harness import Enforcer, outbound_cfg, random_bytes, running, sha, wait_until
from tests.e2e.test_tls_records import Client, _connected, _echo_server, _pumps

pytestmark = pytest.mark.skipif(not native.available(), reason=native.unavailable_reason())


async def _flow(enforcer: Enforcer, timeout: float = 2) -> dict[str, Any] | None:
    """The connection's flow record, or None if it is still open after ``timeout``."""
    try:
        return (await enforcer.wait_flows(1, timeout))[0]
    except TimeoutError:
        return None


# -- RFC 8446 5.1: "Handshake messages MUST NOT be interleaved with other record types" --
@pytest.mark.usefixtures("tls_records")
@pytest.mark.parametrize("between", ["application_data", "close_notify"])
async def test_a_record_of_another_type_inside_a_split_handshake_message_is_refused(
        pki: Any, tmp_path: Path, between: str) -> None:
    """A KeyUpdate split over two records with another record between the halves (RFC 8446
    5.1 forbids it): the connection fails (MIXED_HANDSHAKE_AND_NON_HANDSHAKE_DATA); the
    smuggled data is not relayed and the close_notify is not taken as an end."""
    backend, enforcer = await _echo_server(pki)
    async with running(enforcer, backend):
        client = await _connected(pki, enforcer, tmp_path)
        try:
            client.take_over()
            update = bytes([24, 0, 0, 1, 0])
            first = client.record(22, update[:3])
            middle = (client.record(23, b"smuggled") if between == "application_data"
                      else client.record(21, b"\x01\x00"))
            await client.send_raw(first + middle + client.record(22, update[3:]))
            rec = await _flow(enforcer)
        finally:
            client.close()
    assert rec is not None, "the connection carried on"
    assert (rec["close"], rec["detail"]) == (
        "client_tls_error", "TLS error from the client: MIXED_HANDSHAKE_AND_NON_HANDSHAKE_DATA")
    assert rec["bytes"] == {"from_client": 100, "to_client": 100}


# -- the listener's session after a connection failed in TLS ----------------------------
@pytest.mark.usefixtures("tls_records")
async def test_a_session_whose_connection_failed_in_tls_does_not_resume(
        pki: Any, tmp_path: Path) -> None:
    """A listener's session stays in its cache when a connection ends without close_notify,
    but not when it failed in TLS: with OpenSSL keeping the end, SSL_free drops it; with
    the pump's own records, the pump drops it from the cache by its id."""
    backend, enforcer = await _echo_server(pki)
    async with running(enforcer, backend):
        (tmp_path / "a").mkdir()
        (tmp_path / "b").mkdir()
        client = await _connected(pki, enforcer, tmp_path / "a")
        session = client.tls.session
        assert session is not None  # the listener's tickets came with the first echo
        try:
            client.take_over()
            bad = bytearray(client.record(23, b"forged"))
            bad[-1] ^= 1  # a bad tag
            await client.send_raw(bytes(bad))
            rec = await _flow(enforcer)
        finally:
            client.close()
        assert rec is not None and rec["close"] == "client_tls_error", rec
        again = Client(pki, enforcer.port(), tmp_path / "b" / "keys.log")
        again.tls = client.tls.context.wrap_bio(again.incoming, again.outgoing,
                                                server_hostname="localhost", session=session)
        try:
            await again.handshake()
            ping = random_bytes(64)
            await again.send(ping)
            assert sha(await again.receive(len(ping))) == sha(ping)
            resumed = again.tls.session_reused
        finally:
            again.close()
    assert not resumed, "the session of a connection that failed in TLS resumed"


# -- what OpenSSL refuses, and the words it uses ---------------------------------------
def _empty_records(c: Client) -> bytes:
    return b"".join(c.record(23, b"") for _ in range(33))


def _user_canceled(c: Client) -> bytes:
    return b"".join(c.record(21, b"\x01\x5a") for _ in range(5))


def _inner_too_long(c: Client) -> bytes:
    return c.record(23, bytes(16 * 1024 + 1))  # fits RFC 8446's ciphertext limit


def _three_byte_alert(c: Client) -> bytes:
    return c.record(21, b"\x01\x00\x00")


def _empty_handshake(c: Client) -> bytes:
    return c.record(22, b"")


def _empty_alert(c: Client) -> bytes:
    return c.record(21, b"")


def _legacy_version(c: Client) -> bytes:
    rec = bytearray(c.record(23, b"abc"))
    rec[1:3] = b"\x03\x01"  # legacy_record_version other than 0x0303
    return bytes(rec)


@pytest.mark.usefixtures("tls_records")
@pytest.mark.parametrize(("forge", "detail"), [
    (_empty_records, "RECORD_TOO_SMALL"),  # OpenSSL allows 32 empty records in a row
    (_user_canceled, "TOO_MANY_WARN_ALERTS"),  # and 4 warning alerts in a row
    (_inner_too_long, "DATA_LENGTH_TOO_LONG"),
    (_three_byte_alert, "INVALID_ALERT"),
    (_empty_handshake, "BAD_LENGTH"),
    (_empty_alert, "BAD_LENGTH"),
    (_legacy_version, "WRONG_VERSION_NUMBER"),
], ids=["33_empty_records", "5_user_canceled", "plaintext_over_2^14", "alert_of_3_bytes",
        "empty_handshake_record", "empty_alert_record", "record_version_0301"])
async def test_openssls_refusals_and_reasons_hold_for_own_records(
        pki: Any, tmp_path: Path, forge: Any, detail: str) -> None:
    """OpenSSL's limits (empty records in a row, warning alerts) and checks hold for the
    pump's own records too, with OpenSSL's reason strings."""
    backend, enforcer = await _echo_server(pki)
    async with running(enforcer, backend):
        client = await _connected(pki, enforcer, tmp_path)
        try:
            client.take_over()
            await client.send_raw(forge(client))
            rec = await _flow(enforcer)
        finally:
            client.close()
    assert rec is not None, "accepted"
    assert (rec["close"], rec["detail"]) == ("client_tls_error",
                                             f"TLS error from the client: {detail}")


# -- KeyUpdate requests: one answer while silent (RFC 8446 4.6.3) -------------------------
class _CountingClient(Client):
    """Counts the KeyUpdates its SSLObject reads (the enforcer's)."""

    key_updates_read = 0

    def _on_message(self, conn: Any, direction: str, version: Any, content_type: Any,
                    msg_type: Any, data: bytes) -> None:
        super()._on_message(conn, direction, version, content_type, msg_type, data)
        if direction == "read" and int(content_type) == 22 and data[:1] == b"\x18":
            self.key_updates_read += 1


async def test_a_burst_of_update_requests_is_answered_with_one_key_update(
        pki: Any, tmp_path: Path) -> None:
    """KeyUpdate requests with nothing sent in between get one answer (RFC 8446 4.6.3
    allows it): otherwise a peer that sends requests and reads nothing would grow the out
    buffer towards it without bound (flow control only stops reading the other side)."""
    backend, enforcer = await _echo_server(pki)
    async with running(enforcer, backend):
        client = _CountingClient(pki, enforcer.port(), tmp_path / "keys.log")
        await client.handshake()
        first = random_bytes(100)
        await client.send(first)
        assert await client.receive(len(first)) == first
        await wait_until(lambda: bool(_pumps(enforcer)))
        try:
            assert _pumps(enforcer)[0].own_records == 1
            client.take_over()
            wire = bytearray()
            for _ in range(200):
                wire += client.record(22, bytes([24, 0, 0, 1, 1]))  # update_requested
                client.next_secret()
            ping = random_bytes(1000)
            wire += client.record(23, ping)
            await client.send_raw(bytes(wire))
            assert sha(await client.receive(len(ping))) == sha(ping)
        finally:
            client.close()
    assert 1 <= client.key_updates_read <= 2, client.key_updates_read


# -- a real OpenSSL server changing keys towards the outbound (client role) --------------
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.mark.parametrize("suite", ["TLS_AES_128_GCM_SHA256", "TLS_AES_256_GCM_SHA384",
                                   "TLS_CHACHA20_POLY1305_SHA256"])
async def test_openssl_s_server_key_updates_towards_the_outbound(
        pki: Any, tmp_path: Path, suite: str) -> None:
    """openssl s_server as the upstream: its K / k / K commands change keys mid-relay (the
    outbound, TLS client, answers each K), then bulk data both ways, sha256-checked; the
    outbound's end is the pump's own throughout."""
    openssl = require_tool("openssl")
    port, msgs = _free_port(), tmp_path / "msg.txt"
    proc = await asyncio.create_subprocess_exec(
        openssl, "s_server", "-accept", f"127.0.0.1:{port}", "-naccept", "1", "-tls1_3",
        "-ciphersuites", suite, "-cert", str(pki.server.cert), "-key", str(pki.server.key),
        "-CAfile", str(pki.ca), "-Verify", "1", "-msg", "-msgfile", str(msgs),
        stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.DEVNULL)
    assert proc.stdin is not None and proc.stdout is not None
    stdin, stdout = proc.stdin, proc.stdout
    outbound = await Enforcer({**outbound_cfg(pki, port), "relay": "native"}).start()
    try:
        async with running(outbound):
            while (text := await asyncio.wait_for(stdout.readline(), 5)) != b"ACCEPT\n":
                assert text, "s_server did not start"
            reader, writer = await asyncio.open_connection("127.0.0.1", outbound.port())

            def line() -> bytes:
                # digits only: s_server takes a stdin read that starts with a command
                # letter and a newline (c, k, r...) as that command and drops the rest
                return "".join(str(b % 10) for b in random_bytes(40)).encode() + b"\n"

            async def upstream_gets(lines: bytes) -> None:
                got = bytearray()
                while len(got) < len(lines):
                    text = await asyncio.wait_for(stdout.readline(), 10)
                    assert text, "s_server ended"
                    if len(text) == 41:  # ours, not s_server's own output
                        got += text
                assert sha(bytes(got)) == sha(lines)

            async def client_gets(lines: bytes) -> None:
                stdin.write(lines)
                got = await asyncio.wait_for(reader.readexactly(len(lines)), 20)
                assert sha(got) == sha(lines)

            first = line()
            writer.write(first)
            await upstream_gets(first)
            await client_gets(line())
            await wait_until(lambda: [p.own_records for p in _pumps(outbound)] == [1])
            for command in (b"K\n", b"k\n", b"K\n"):
                stdin.write(command)
                await asyncio.sleep(0.2)  # s_server reads a stdin chunk as one command
                up, down = line(), line()
                writer.write(up)
                await upstream_gets(up)
                await client_gets(down)
            bulk_up = b"".join(line() for _ in range(12_000))  # ~0.5 MB each way
            writer.write(bulk_up)
            await upstream_gets(bulk_up)
            await client_gets(b"".join(line() for _ in range(12_000)))
            assert [p.own_records for p in _pumps(outbound)] == [1]
            writer.close()
    finally:
        if proc.returncode is None:
            proc.kill()
        await proc.wait()
    trace = msgs.read_text()
    assert trace.count(">>> TLS 1.3, Handshake [length 0005], KeyUpdate") == 3
    assert trace.count("<<< TLS 1.3, Handshake [length 0005], KeyUpdate") == 2

