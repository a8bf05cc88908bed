"""The hand-over of a TLS end from OpenSSL's record layer to the pump's own, with a record
cut at the worst place: OpenSSL has read a record's five-byte header and waits for its
body. Its BIO and buffers are then empty (``SSL_has_pending()`` is 0), yet the next bytes
on the wire are the body. Taken over in that state, the pump read the body's first bytes
as a header and failed the connection with ENCRYPTED_LENGTH_TOO_LONG (or BAD_RECORD_TYPE)
at random: the rare resets ``make soak`` found (docs/faults.md).

The upstream here is a TLS 1.3 server of the test's own (Python's ``ssl`` over memory BIOs
on a real socket), so the test decides where the bytes are cut: the outbound's client end
is taken over only after the server's first record since the handshake, so the first
burst carries the tickets, a whole record and the next record's header, and the body
follows on its own.
"""

from __future__ import annotations

import asyncio
import socket
import ssl
from typing import Any

import pytest

from enforcer.dataplane import native
from tests.e2e.harness import Enforcer, outbound_cfg, random_bytes, running, sha, wait_until
from tests.e2e.test_tls_records import _pumps
from tests.e2e.tls_util import read_over_bio

pytestmark = pytest.mark.skipif(not native.available(), reason=native.unavailable_reason())


class Server:
    """A mutual-TLS 1.3 server on one accepted socket, whose wire bytes the test sends."""

    def __init__(self, pki: Any, sock: socket.socket) -> None:
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.minimum_version = ssl.TLSVersion.TLSv1_3
        ctx.load_cert_chain(str(pki.server.cert), str(pki.server.key))
        ctx.load_verify_locations(str(pki.ca))
        ctx.verify_mode = ssl.CERT_REQUIRED
        self.incoming, self.outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
        self.tls = ctx.wrap_bio(self.incoming, self.outgoing, server_side=True)
        sock.setblocking(False)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.sock = sock
        self.loop = asyncio.get_running_loop()

    async def handshake(self) -> bytes:
        """The handshake; returns what the server wrote after it (its tickets), unsent."""
        while True:
            try:
                self.tls.do_handshake()
                return self.outgoing.read()
            except ssl.SSLWantReadError:
                if self.outgoing.pending:
                    await self.loop.sock_sendall(self.sock, self.outgoing.read())
                data = await asyncio.wait_for(self.loop.sock_recv(self.sock, 65536), 5)
                assert data, "the outbound ended the handshake"
                self.incoming.write(data)

    def records(self, data: bytes) -> bytes:
        self.tls.write(data)
        return self.outgoing.read()

    async def send_raw(self, data: bytes) -> None:
        await self.loop.sock_sendall(self.sock, data)

    async def receive(self, n: int) -> bytes:
        return await read_over_bio(self.tls, self.incoming, self.sock, n, "the outbound ended the connection")


@pytest.mark.parametrize("cut", [5, 1, 4, 6], ids=lambda c: f"{c}_bytes_of_the_record")
async def test_a_record_whose_header_came_alone_is_finished_before_the_take_over(
        pki: Any, cut: int) -> None:
    """The upstream's first burst after the handshake ends ``cut`` bytes into a record
    (5: exactly its header); its body comes later. Every byte arrives (sha256) and the end
    is still taken over, at the next record boundary."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(1)
    listener.setblocking(False)
    loop = asyncio.get_running_loop()
    port = listener.getsockname()[1]
    outbound = await Enforcer({**outbound_cfg(pki, port), "relay": "native"}).start()
    try:
        async with running(outbound):
            reader, writer = await asyncio.open_connection("127.0.0.1", outbound.port())
            hello = random_bytes(300)
            writer.write(hello)
            accepted, _ = await asyncio.wait_for(loop.sock_accept(listener), 5)
            server = Server(pki, accepted)
            try:
                tickets = await server.handshake()
                await wait_until(lambda: bool(_pumps(outbound)))
                assert sha(await server.receive(len(hello))) == sha(hello)
                pump = _pumps(outbound)[0]
                assert pump.own_records == 0  # the client end waits for the server's tickets
                first, second = random_bytes(1000), random_bytes(3000)
                whole, cut_one = server.records(first), server.records(second)
                await server.send_raw(tickets + whole + cut_one[:cut])
                assert sha(await asyncio.wait_for(reader.readexactly(len(first)), 5)) == sha(
                    first)
                await asyncio.sleep(0.2)  # the pump has read the first burst; a tick passes
                await server.send_raw(cut_one[cut:])
                got = await asyncio.wait_for(reader.readexactly(len(second)), 5)
                assert sha(got) == sha(second), "the record cut after its header was lost"
                third = random_bytes(20_000)  # two records, after which the end is ours
                await server.send_raw(server.records(third))
                assert sha(await asyncio.wait_for(reader.readexactly(len(third)), 5)) == sha(
                    third)
                await wait_until(lambda: pump.own_records == 1)
                up, down = random_bytes(70_000), random_bytes(70_000)
                writer.write(up)
                assert sha(await server.receive(len(up))) == sha(up)
                await server.send_raw(server.records(down))
                assert sha(await asyncio.wait_for(reader.readexactly(len(down)), 5)) == sha(
                    down)
            finally:
                writer.close()
                accepted.close()
        rec = (await outbound.wait_flows(1))[0]
        assert "tls_error" not in rec["close"], rec
        assert rec["bytes"] == {"from_client": len(hello) + len(up),
                                "to_client": len(first) + len(second) + len(third) + len(down)}
    finally:
        listener.close()
