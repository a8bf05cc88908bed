"""``limits.timeout_close``: idle_timeout, close_timeout and max_lifetime end a connection
with a plain close (FIN, the default) or a reset (RST) of both sockets, on the native pump
and on the Python relay alike (``relay_mode``), and the flow record's ``close`` says which.

Each peer is a real socket that reports how its connection ended: a read that returns
end of stream (FIN) or fails with ECONNRESET (RST). A peer that had already received a
FIN (close_timeout) is in CLOSE_WAIT, where Linux reports a later reset as EPIPE in
SO_ERROR; after a plain close its SO_ERROR stays 0.
"""

from __future__ import annotations

import asyncio
import errno
import socket
import ssl
from typing import Any

import pytest

from tests.e2e import harness
from tests.e2e.harness import (
    Backend,
    Enforcer,
    client_ctx,
    inbound_cfg,
    random_bytes,
    running,
    sha,
)

pytestmark = pytest.mark.usefixtures("relay_mode")


def _recv_exactly(sock: socket.socket, n: int) -> bytes:
    got = bytearray()
    while len(got) < n:
        data = sock.recv(n - len(got))
        assert data, f"end of stream after {len(got)} of {n} bytes"
        got += data
    return bytes(got)


def _recv_to_end(sock: socket.socket) -> tuple[bytes, str]:
    """Everything until the end of the stream, and how it ended: "fin" or "rst"."""
    got = bytearray()
    try:
        while data := sock.recv(65536):
            got += data
    except ConnectionResetError:
        return bytes(got), "rst"
    return bytes(got), "fin"


class Watcher:
    """The upstream: echoes what it reads (or, with ``respond_after``, answers once that
    many bytes came, then half-closes), and records how its connection ended."""

    def __init__(self, respond_after: int = 0, response: bytes = b"") -> None:
        self.respond_after = respond_after
        self.response = response
        self.received = bytearray()
        self.ended: asyncio.Future[str] = asyncio.get_running_loop().create_future()
        self.backend: Backend | None = None

    async def start(self) -> Backend:
        self.backend = await Backend.serving(self._handle)
        return self.backend

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        how = "fin"
        try:
            while data := await reader.read(65536):
                self.received += data
                if not self.respond_after:
                    writer.write(data)
                elif len(self.received) == self.respond_after:
                    writer.write(self.response)
                    writer.write_eof()
                await writer.drain()
        except ConnectionResetError:
            how = "rst"
        finally:
            if not self.ended.done():
                self.ended.set_result(how)
            writer.close()


def _cfg(pki: Any, port: int, limits: dict[str, Any]) -> dict[str, Any]:
    return inbound_cfg(pki, port, default="allow", rules=[], mode="off", limits=limits)


def _connect(port: int) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", port), timeout=10)
    sock.settimeout(10)
    return sock


def _relay() -> str:
    return "native" if harness.RELAY == "native" else "python"


@pytest.mark.parametrize("how", ["fin", "rst"])
@pytest.mark.parametrize(("timeout", "limits"), [
    ("idle_timeout", {"idle_timeout": "300ms"}),
    ("max_lifetime", {"max_lifetime": "1s", "idle_timeout": "1h"}),
])
async def test_idle_and_lifetime_timeouts_close_both_sides_as_configured(
        pki: Any, timeout: str, limits: dict[str, Any], how: str) -> None:
    watcher = Watcher()
    backend = await watcher.start()
    if how == "rst":
        limits = {**limits, "timeout_close": "rst"}
    enforcer = await Enforcer(_cfg(pki, backend.port, limits)).start()
    async with running(enforcer, backend):
        payload = random_bytes(100_000)
        sock = _connect(enforcer.port())
        try:
            sock.sendall(payload)
            echoed = await asyncio.to_thread(_recv_exactly, sock, len(payload))
            rest, client_saw = await asyncio.to_thread(_recv_to_end, sock)
        finally:
            sock.close()
        assert sha(echoed) == sha(payload) and rest == b""
        assert client_saw == how
        assert await asyncio.wait_for(watcher.ended, 5) == how
        assert sha(bytes(watcher.received)) == sha(payload)
        rec = (await enforcer.wait_flows(1))[0]
        assert rec["close"] == (f"{timeout}_rst" if how == "rst" else timeout)
        assert (rec["action"], rec["relay"]) == ("allow", _relay())
        assert rec["bytes"] == {"from_client": len(payload), "to_client": len(payload)}
        assert ("reset" in rec["detail"]) is (how == "rst")


@pytest.mark.parametrize("how", ["fin", "rst"])
async def test_close_timeout_closes_the_side_still_open_as_configured(
        pki: Any, how: str) -> None:
    """The upstream answers and finishes; the client never does: close_timeout ends it."""
    request, response = random_bytes(50_000), random_bytes(70_000)
    watcher = Watcher(respond_after=len(request), response=response)
    backend = await watcher.start()
    limits: dict[str, Any] = {"close_timeout": "300ms"}
    if how == "rst":
        limits["timeout_close"] = "rst"
    enforcer = await Enforcer(_cfg(pki, backend.port, limits)).start()
    async with running(enforcer, backend):
        sock = _connect(enforcer.port())
        try:
            sock.sendall(request)  # and no FIN: the client keeps its side open
            got, ended = await asyncio.to_thread(_recv_to_end, sock)
            assert ended == "fin"  # the upstream's FIN, passed on
            rec = (await enforcer.wait_flows(1))[0]
            await asyncio.sleep(0.1)  # the reset, if any, has crossed loopback
            pending = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
        finally:
            sock.close()
        assert pending == (errno.EPIPE if how == "rst" else 0), errno.errorcode.get(pending)
        assert sha(got) == sha(response)
        assert sha(bytes(watcher.received)) == sha(request)
        assert await asyncio.wait_for(watcher.ended, 5) == how
        assert rec["close"] == ("close_timeout_rst" if how == "rst" else "close_timeout")
        assert (rec["action"], rec["relay"]) == ("allow", _relay())
        assert rec["bytes"] == {"from_client": len(request), "to_client": len(response)}


@pytest.mark.usefixtures("tls_records")
async def test_an_idle_mtls_connection_is_reset_without_a_close_notify(pki: Any) -> None:
    """A TLS client end (OpenSSL's, or the native pump's own TLS 1.3 records): the reset
    comes instead of close_notify and FIN, on both sockets."""
    watcher = Watcher()
    backend = await watcher.start()
    cfg = inbound_cfg(pki, backend.port, limits={"idle_timeout": "300ms",
                                                 "timeout_close": "rst"})
    enforcer = await Enforcer(cfg).start()
    async with running(enforcer, backend):
        payload = random_bytes(100_000)
        ctx = client_ctx(pki.ca, pki.client.cert, pki.client.key)

        def client() -> tuple[bytes, str]:
            """TLS over memory BIOs (the ssl module's sockets report a reset as the end of
            the stream): the TCP socket's own reads tell a FIN from a reset."""
            incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
            tls = ctx.wrap_bio(incoming, outgoing, server_hostname="localhost")
            got = bytearray()
            with _connect(enforcer.port()) as sock:
                while True:
                    try:
                        tls.do_handshake()
                        break
                    except ssl.SSLWantReadError:
                        sock.sendall(outgoing.read())
                        incoming.write(sock.recv(65536))
                tls.write(payload)
                sock.sendall(outgoing.read())
                while len(got) < len(payload):
                    try:
                        got += tls.read(65536)
                    except ssl.SSLWantReadError:
                        data = sock.recv(65536)
                        assert data, "end of stream before the echo"
                        incoming.write(data)
                sock.sendall(outgoing.read())  # e.g. the answer to a key update
                return bytes(got), _recv_to_end(sock)[1]

        echoed, client_saw = await asyncio.to_thread(client)
        assert sha(echoed) == sha(payload)
        assert client_saw == "rst"
        assert await asyncio.wait_for(watcher.ended, 5) == "rst"
        assert sha(bytes(watcher.received)) == sha(payload)
        rec = (await enforcer.wait_flows(1))[0]
        assert (rec["close"], rec["relay"]) == ("idle_timeout_rst", _relay())
        assert rec["tls"]["peer"]["spiffe_id"] == "spiffe://enforcer.demo/ns/demo/sa/outbound"
