"""The native pump's own TLS 1.3 records (``_pump.c``, "TLS 1.3 records"): once a
handshake is over the pump protects the records itself and OpenSSL's SSL object is freed.

A real TLS client (Python's ``ssl`` over memory BIOs on a real socket) talks to an inbound
enforcer. Where a test needs records that no ordinary peer sends (a KeyUpdate split over
two records, a ticket from a client, an alert), it makes them itself with the client's
traffic secret from its keylog and its record count from its message callback, the same
two sources the pump uses, and AES-GCM from ``cryptography``: an independent
implementation, so a shared mistake cannot hide.
"""

from __future__ import annotations

import asyncio
import gc
import socket
import ssl
import struct
import tempfile
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDFExpand

from enforcer.dataplane import native
from tests.e2e.harness import (
    Backend,
    Enforcer,
    client_ctx,
    inbound_cfg,
    outbound_cfg,
    random_bytes,
    running,
    sha,
    wait_until,
)
from tests.e2e.tls_util import read_over_bio

pytestmark = pytest.mark.skipif(not native.available(), reason=native.unavailable_reason())


def _expand_label(secret: bytes, label: bytes, length: int) -> bytes:
    algorithm = hashes.SHA384() if len(secret) == 48 else hashes.SHA256()
    info = struct.pack(">HB", length, 6 + len(label)) + b"tls13 " + label + b"\x00"
    return HKDFExpand(algorithm, length, info).derive(secret)


class Client:
    """A mutual-TLS client on a real socket whose own records a test can also forge."""

    def __init__(self, pki: Any, port: int, keylog: Path, *, tls12: bool = False) -> None:
        ctx = client_ctx(pki.ca, pki.client.cert, pki.client.key)
        if tls12:
            ctx.maximum_version = ssl.TLSVersion.TLSv1_2
        ctx.keylog_filename = str(keylog)
        self.keylog = keylog
        self.written = 0  # encrypted records written since our Finished
        ctx._msg_callback = self._on_message  # type: ignore[attr-defined]
        self.incoming, self.outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
        self.tls = ctx.wrap_bio(self.incoming, self.outgoing, server_hostname="localhost")
        self.sock = socket.create_connection(("127.0.0.1", port))
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.sock.setblocking(False)
        self.loop = asyncio.get_running_loop()
        self.secret = b""
        self.seq = 0

    def _on_message(self, conn: Any, direction: str, version: Any, content_type: Any,
                    msg_type: Any, data: bytes) -> None:
        if direction == "write" and int(content_type) == 256 and data[0] == 23:
            self.written += 1
        elif direction == "write" and int(content_type) == 22 and data[0] == 20:
            self.written = 0  # our Finished: the application keys start after it

    async def handshake(self) -> None:
        while True:
            try:
                self.tls.do_handshake()
                break
            except ssl.SSLWantReadError:
                await self.flush()
                self.incoming.write(await self.loop.sock_recv(self.sock, 65536))
        await self.flush()

    async def flush(self) -> None:
        if self.outgoing.pending:
            await self.loop.sock_sendall(self.sock, self.outgoing.read())

    async def send(self, data: bytes) -> None:
        self.tls.write(data)
        await self.flush()

    async def receive(self, n: int) -> bytes:
        return await read_over_bio(self.tls, self.incoming, self.sock, n, "the connection ended")

    # -- records of our own making -------------------------------------------------------
    def take_over(self) -> None:
        """From now on this client's records are forged here (the SSLObject only reads)."""
        line = next(ln for ln in self.keylog.read_text().splitlines()
                    if ln.startswith("CLIENT_TRAFFIC_SECRET_0 "))
        self.secret = bytes.fromhex(line.split()[2])
        self.seq = self.written

    def record(self, inner_type: int, content: bytes) -> bytes:
        key_len = 16 if "AES_128" in (self.tls.cipher() or ("",))[0] else 32
        key = _expand_label(self.secret, b"key", key_len)
        iv = _expand_label(self.secret, b"iv", 12)
        nonce = bytes(a ^ b for a, b in zip(iv, bytes(4) + struct.pack(">Q", self.seq),
                                            strict=True))
        plain = content + bytes([inner_type])
        header = b"\x17\x03\x03" + struct.pack(">H", len(plain) + 16)
        self.seq += 1
        return header + AESGCM(key).encrypt(nonce, plain, header)

    def next_secret(self) -> None:
        self.secret = _expand_label(self.secret, b"traffic upd", len(self.secret))
        self.seq = 0

    async def send_raw(self, data: bytes) -> None:
        await self.loop.sock_sendall(self.sock, data)

    def close(self) -> None:
        self.sock.close()


def _pumps(enforcer: Enforcer) -> list[Any]:
    return [c.pump for c in enforcer.plane.pumped if c.pump is not None]


def _live_ssl_objects(ctx: ssl.SSLContext | None) -> int:
    return sum(1 for o in gc.get_objects()
               if type(o).__name__ == "_SSLSocket" and getattr(o, "context", None) is ctx)


async def _echo_server(pki: Any) -> tuple[Backend, Enforcer]:
    backend = await Backend(mode="echo").start()
    enforcer = await Enforcer({**inbound_cfg(pki, backend.port), "relay": "native"}).start()
    return backend, enforcer


async def _connected(pki: Any, enforcer: Enforcer, tmp_path: Path, **kw: Any) -> Client:
    client = Client(pki, enforcer.port(), tmp_path / "keys.log", **kw)
    await client.handshake()
    first = random_bytes(100)
    await client.send(first)
    assert await client.receive(len(first)) == first
    await wait_until(lambda: bool(_pumps(enforcer)))
    return client


async def test_the_pump_takes_the_records_over_and_the_ssl_object_is_freed(
        pki: Any, tmp_path: Path) -> None:
    backend, enforcer = await _echo_server(pki)
    async with running(enforcer, backend):
        client = await _connected(pki, enforcer, tmp_path)
        try:
            pump = _pumps(enforcer)[0]
            assert pump.own_records == 1
            gc.collect()
            assert _live_ssl_objects(enforcer.plane.listeners[0].server_ctx) == 0
            sent = bytearray()
            for size in (1, 16 * 1024, 16 * 1024 + 1, 300 * 1024):  # record edges, bursts
                data = random_bytes(size)
                sent += data
                await client.send(data)
                assert sha(await client.receive(size)) == sha(data)
        finally:
            client.close()
        rec = (await enforcer.wait_flows(1))[0]
        assert rec["relay"] == "native" and rec["bytes"]["to_client"] == 100 + len(sent)


async def test_with_openssl_keeping_the_records_the_ssl_object_stays(
        pki: Any, tmp_path: Path) -> None:
    backend, enforcer = await _echo_server(pki)
    was = native.own_records()
    native.own_records(False)
    try:
        async with running(enforcer, backend):
            client = await _connected(pki, enforcer, tmp_path)
            try:
                assert _pumps(enforcer)[0].own_records == 0
                gc.collect()
                assert _live_ssl_objects(enforcer.plane.listeners[0].server_ctx) == 1
            finally:
                client.close()
    finally:
        native.own_records(was)


async def test_tls12_stays_with_openssl(pki: Any, tmp_path: Path) -> None:
    backend, enforcer = await _echo_server(pki)
    async with running(enforcer, backend):
        client = await _connected(pki, enforcer, tmp_path, tls12=True)
        try:
            assert client.tls.version() == "TLSv1.2"
            assert _pumps(enforcer)[0].own_records == 0
            data = random_bytes(200 * 1024)
            await client.send(data)
            assert sha(await client.receive(len(data))) == sha(data)
        finally:
            client.close()


async def test_records_arriving_a_few_bytes_at_a_time_are_put_together(
        pki: Any, tmp_path: Path) -> None:
    backend, enforcer = await _echo_server(pki)
    async with running(enforcer, backend):
        client = await _connected(pki, enforcer, tmp_path)
        try:
            assert _pumps(enforcer)[0].own_records == 1
            data = random_bytes(20_000)  # two records
            client.tls.write(data[:7])
            client.tls.write(data[7:])
            wire = client.outgoing.read()
            cuts = [1, 2, 3, 5, 6, 7, 40, 16_000, 16_004, 16_030]
            for start, end in zip([0, *cuts], [*cuts, len(wire)], strict=True):
                await client.send_raw(wire[start:end])
                await asyncio.sleep(0.01)  # each piece its own read
            assert sha(await client.receive(len(data))) == sha(data)
        finally:
            client.close()


@pytest.mark.parametrize("update_requested", [0, 1])
async def test_a_key_update_split_over_two_records(
        pki: Any, tmp_path: Path, update_requested: int) -> None:
    """The KeyUpdate's first three bytes in one record, the rest in the next: the pump puts
    the message together and reads with the next keys from the record after it; asked
    for, it updates its own keys too (which OpenSSL, reading its answer, checks)."""
    backend, enforcer = await _echo_server(pki)
    async with running(enforcer, backend):
        client = await _connected(pki, enforcer, tmp_path)
        try:
            assert _pumps(enforcer)[0].own_records == 1
            client.take_over()
            before = random_bytes(500)
            update = bytes([24, 0, 0, 1, update_requested])
            await client.send_raw(client.record(23, before) + client.record(22, update[:3])
                                  + client.record(22, update[3:]))
            client.next_secret()
            after = random_bytes(70_000)
            await client.send_raw(b"".join(client.record(23, after[i:i + 16384])
                                           for i in range(0, len(after), 16384)))
            assert sha(await client.receive(len(before) + len(after))) == sha(before + after)
        finally:
            client.close()


@pytest.mark.parametrize(("inner_type", "content", "detail"), [
    (22, bytes([4, 0, 0, 4, 0, 0, 0, 0]), "UNEXPECTED_MESSAGE"),  # a ticket from a client
    (22, bytes([24, 0, 0, 1, 2]), "BAD_KEY_UPDATE"),
    (22, bytes([24, 0, 0, 1, 0, 23]), "NOT_ON_RECORD_BOUNDARY"),  # data after a KeyUpdate
    (21, bytes([2, 40]), "SSLV3_ALERT_HANDSHAKE_FAILURE"),  # OpenSSL's words
    (20, b"\x01", "BAD_RECORD_TYPE"),  # change_cipher_spec, inside a protected record
    (0, b"", "BAD_RECORD_TYPE"),  # only padding: no content type
])
@pytest.mark.usefixtures("tls_records")  # the same detail whoever protects the records
async def test_a_record_tls_13_does_not_allow_here_fails_the_connection(
        pki: Any, tmp_path: Path, inner_type: int, content: bytes, detail: str) -> None:
    backend, enforcer = await _echo_server(pki)
    async with running(enforcer, backend):
        client = await _connected(pki, enforcer, tmp_path)
        try:
            client.take_over()
            await client.send_raw(client.record(inner_type, content or bytes(7)))
            rec = (await enforcer.wait_flows(1))[0]
        finally:
            client.close()
        assert rec["close"] == "client_tls_error"
        assert rec["detail"] == f"TLS error from the client: {detail}"
        assert rec["bytes"] == {"from_client": 100, "to_client": 100}


@pytest.mark.usefixtures("tls_records")
@pytest.mark.parametrize(("wire", "detail"), [
    (b"\x17\x03\x03" + struct.pack(">H", 16 * 1024 + 257), "ENCRYPTED_LENGTH_TOO_LONG"),
    (b"\x16\x03\x03\x00\x04\x01\x00\x00\x00", "BAD_RECORD_TYPE"),  # plaintext again
])
async def test_a_record_header_tls_13_does_not_allow_fails_the_connection(
        pki: Any, tmp_path: Path, wire: bytes, detail: str) -> None:
    backend, enforcer = await _echo_server(pki)
    async with running(enforcer, backend):
        client = await _connected(pki, enforcer, tmp_path)
        try:
            await client.send_raw(wire)
            rec = (await enforcer.wait_flows(1))[0]
        finally:
            client.close()
        assert (rec["close"], rec["detail"]) == ("client_tls_error",
                                                 f"TLS error from the client: {detail}")


async def test_the_pair_resumes_and_both_sidecars_own_their_records(
        pki: Any, tmp_path: Path) -> None:
    """Outbound (TLS client) and inbound (TLS server) both take over; the outbound only
    once the inbound's tickets came, so the next connection still resumes."""
    backend = await Backend(mode="echo").start()
    inbound = await Enforcer({**inbound_cfg(pki, backend.port), "relay": "native"}).start()
    outbound = await Enforcer({**outbound_cfg(pki, inbound.port()), "relay": "native"}).start()
    async with running(outbound, inbound, backend):
        for _ in range(2):
            reader, writer = await asyncio.open_connection("127.0.0.1", outbound.port())
            data = random_bytes(64 * 1024)
            writer.write(data)
            assert sha(await asyncio.wait_for(reader.readexactly(len(data)), 10)) == sha(data)
            await wait_until(lambda: [p.own_records for p in _pumps(outbound) + _pumps(inbound)]
                             == [1, 1])
            writer.close()
            await wait_until(lambda: not outbound.plane.pumped and not inbound.plane.pumped)
        flows = await outbound.wait_flows(2)
        assert [f["upstream"]["resumed"] for f in flows] == [False, True]


def test_secrets_come_only_from_the_keylog_callback() -> None:
    """The traffic secrets come from OpenSSL's keylog callback, set from C on a context the
    first time one of its SSLs is tracked; nothing is read from OpenSSL's opaque structures
    (no memory scan). A context that logs its keys elsewhere (SSLKEYLOGFILE, here
    keylog_filename) is left to OpenSSL: its ends are not tracked."""
    ext = native.module()
    assert not hasattr(ext, "learn_secrets")
    plain = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    assert native.track_records(native._sample(plain))
    logging_ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    with tempfile.TemporaryDirectory() as tmp:
        logging_ctx.keylog_filename = str(Path(tmp) / "keys.log")
        assert not native.track_records(native._sample(logging_ctx))


def test_a_pointer_that_does_not_verify_refuses_the_fast_path_with_a_warning(
        caplog: pytest.LogCaptureFixture) -> None:
    """The SSL* read from CPython's private layout is used only if SSL_get_rbio and
    SSL_get_wbio return the two memory BIOs given with it: otherwise the call is refused
    (the public path carries on), counted, and logged as a warning."""
    ext = native.module()
    obj, _incoming, _outgoing = native._sample(ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT))
    strangers = (obj, ssl.MemoryBIO(), ssl.MemoryBIO())  # not this SSL's BIOs
    before = native.verification_failures()
    with pytest.raises(RuntimeError, match="BIOs do not match"):
        ext.track_records(strangers)
    assert native.verification_failures() == before + 1
    native._warned_failures = 0
    with caplog.at_level("WARNING", logger="enforcer.native"):
        assert native.track_records(strangers) is False
    assert native.verification_failures() == before + 2
    assert "native fast path refused" in caplog.text and "BIOs do not match" in caplog.text
    poller = ext.Poller()
    try:
        with pytest.raises(RuntimeError, match="BIOs do not match"):
            ext.Pump(-1, strangers, -1, None, poller, lambda *a: None)
    finally:
        poller.close()
    assert native.verification_failures() == before + 3
