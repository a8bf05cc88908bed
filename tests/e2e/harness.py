"""Building blocks for end-to-end tests: backends, clients and in-process enforcers."""

from __future__ import annotations

import asyncio
import contextlib
import errno
import hashlib
import os
import socket
import ssl
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any, Self

from enforcer.config.loader import parse_config
from enforcer.dataplane.plane import DataPlane
from enforcer.observe.flowlog import MemoryFlowLog
from enforcer.observe.metrics import Metrics

CHUNK = 256 * 1024


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


class LocalServer:
    """A TCP server on 127.0.0.1 (port 0) whose connections ``_handle`` serves: the
    common part of the tests' backends."""

    server: asyncio.Server | None = None

    @property
    def port(self) -> int:
        assert self.server is not None
        return int(self.server.sockets[0].getsockname()[1])

    async def start(self) -> Self:
        self.server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
        return self

    async def close(self) -> None:
        if self.server is not None:
            self.server.close()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        raise NotImplementedError


@dataclass
class Backend(LocalServer):
    """A TCP backend. mode 'echo' echoes; mode 'swap' reads everything while sending
    its own payload, then half-closes; 'respond' reads until EOF, then sends the reply."""

    mode: str = "echo"
    payload: bytes = b""
    server: asyncio.Server | None = None
    received: list[bytes] = field(default_factory=list)
    connections: int = 0
    done: asyncio.Event = field(default_factory=asyncio.Event)

    @classmethod
    async def serving(cls, handler: Any) -> Backend:
        """A backend whose connections ``handler(reader, writer)`` serves (for a test's
        own behaviour); only ``port`` and ``close`` are meaningful on it."""
        backend = cls()
        backend.server = await asyncio.start_server(handler, "127.0.0.1", 0)
        return backend

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        got = bytearray()
        try:
            if self.mode == "echo":
                while data := await reader.read(CHUNK):
                    got += data
                    writer.write(data)
                    await writer.drain()
                writer.write_eof()
            elif self.mode == "swap":
                send = asyncio.ensure_future(_send_all(writer, self.payload))
                while data := await reader.read(CHUNK):
                    got += data
                await send
            elif self.mode == "respond":
                while data := await reader.read(CHUNK):
                    got += data
                writer.write(self.payload)
                writer.write_eof()
            elif self.mode == "hold":
                while data := await reader.read(CHUNK):
                    got += data
            await writer.drain()
        except (ConnectionError, OSError):
            pass
        finally:
            self.received.append(bytes(got))
            self.done.set()
            writer.close()


async def wait_until(predicate: Any, timeout: float = 20) -> None:
    """Poll ``predicate`` until it is true; TimeoutError after ``timeout`` seconds."""
    async with asyncio.timeout(timeout):
        while not predicate():
            await asyncio.sleep(0.01)


async def _send_all(writer: asyncio.StreamWriter, payload: bytes) -> None:
    view = memoryview(payload)
    for i in range(0, len(view), CHUNK):
        writer.write(view[i : i + CHUNK])
        await writer.drain()
    writer.write_eof()
    await writer.drain()


async def exchange(port: int, payload: bytes, *, ssl_ctx: ssl.SSLContext | None = None,
                   server_hostname: str | None = None, half_close: bool = True,
                   timeout: float = 60, reset_ok: bool = False) -> bytes:
    """Send payload (concurrently with reading), half-close, read until EOF.

    ``reset_ok``: a connection refused before the proxy read everything the client sent
    may end in a reset instead of a FIN (the kernel resets a socket closed with unread
    data); then what arrived before it is returned."""
    reader, writer = await asyncio.open_connection(
        "127.0.0.1", port, ssl=ssl_ctx, server_hostname=server_hostname)
    try:
        async def send() -> None:
            view = memoryview(payload)
            for i in range(0, len(view), CHUNK):
                writer.write(view[i : i + CHUNK])
                await writer.drain()
            if half_close and writer.can_write_eof():
                writer.write_eof()

        sender = asyncio.ensure_future(send())
        got = bytearray()
        try:
            async with asyncio.timeout(timeout):
                while data := await reader.read(CHUNK):
                    got += data
                await sender
        except OSError as exc:
            # a reset shows up as ECONNRESET on a read, or as EPIPE or ENOTCONN when the
            # half-close is sent after it
            if not reset_ok or exc.errno not in (errno.ECONNRESET, errno.EPIPE,
                                                 errno.ENOTCONN):
                raise
            sender.cancel()
            with contextlib.suppress(asyncio.CancelledError, ConnectionError):
                await sender
        return bytes(got)
    finally:
        writer.close()
        with contextlib.suppress(Exception):
            await writer.wait_closed()


def client_ctx(ca: Any, cert: Any = None, key: Any = None) -> ssl.SSLContext:
    ctx = ssl.create_default_context(cafile=str(ca))
    if cert is not None:
        ctx.load_cert_chain(str(cert), str(key))
    return ctx


# ``relay`` for enforcers whose config does not set it; the ``relay_mode`` fixture runs a
# test module once with the native pump and once with the Python relay.
RELAY = "auto"


class Enforcer:
    """An in-process enforcer: a DataPlane with its own metrics and an in-memory flow log."""

    def __init__(self, cfg: dict[str, Any]) -> None:
        self.cfg = parse_config({"relay": RELAY, **cfg})
        self.metrics = Metrics()
        self.flows = MemoryFlowLog()
        self.plane = DataPlane(self.cfg, metrics=self.metrics, flowlog=self.flows)

    async def start(self) -> Enforcer:
        await self.plane.start()
        return self

    def port(self, listener: str | None = None) -> int:
        for lst in self.plane.listeners:
            if listener is None or lst.name == listener:
                return lst.local_port
        raise KeyError(listener)

    async def wait_flows(self, n: int, timeout: float = 10) -> list[dict[str, Any]]:
        async with asyncio.timeout(timeout):
            while len(self.flows.records) < n:
                await asyncio.sleep(0.01)
        return self.flows.records

    async def stop(self) -> None:
        await self.plane.drain(0.5)


@contextlib.asynccontextmanager
async def running(*enforcers_or_backends: Any) -> AsyncIterator[None]:
    try:
        yield
    finally:
        for item in enforcers_or_backends:
            if isinstance(item, Enforcer):
                await item.stop()
            else:
                await item.close()


def relay_reason(reason: str) -> str:
    """The reason the flow record names for a record layer failure: the cause, except in the
    Python relay with OpenSSL >= 3.2, where CPython's SSLError keeps only OpenSSL's last
    error, the RECORD_LAYER_FAILURE wrapper (docs/tls-data-plane.md, "Reasons")."""
    if RELAY == "python" and ssl.OPENSSL_VERSION_INFO >= (3, 2):
        return "RECORD_LAYER_FAILURE"
    return reason


def random_bytes(n: int) -> bytes:
    return os.urandom(n)


def inbound_cfg(pki: Any, backend_port: int, *, rules: list[dict[str, Any]] | None = None,
                default: str = "deny", client_auth: str = "required",
                limits: dict[str, Any] | None = None, mode: str = "terminate",
                listener_extra: dict[str, Any] | None = None,
                upstream_extra: dict[str, Any] | None = None) -> dict[str, Any]:
    if rules is None:
        rules = [{"name": "outbound-may-call", "action": "allow",
                  "from": {"identities": ["spiffe://enforcer.demo/ns/demo/sa/outbound"]}}]
    listener: dict[str, Any] = {
        "name": "inbound", "listen": "127.0.0.1:0",
        "tls": {"mode": mode, "material": "mesh", "client_auth": client_auth},
        "ruleset": "inbound", "upstream": "app"}
    listener.update(listener_extra or {})
    upstream: dict[str, Any] = {"address": f"127.0.0.1:{backend_port}"}
    upstream.update(upstream_extra or {})
    cfg: dict[str, Any] = {
        "version": 1, "node": {"name": "test-inbound"},
        "tls": {"mesh": {"cert": str(pki.server.cert), "key": str(pki.server.key),
                         "ca": str(pki.ca)}},
        "listeners": [listener],
        "upstreams": {"app": upstream},
        "rulesets": {"inbound": {"default": default, "rules": rules}},
    }
    if limits:
        cfg["limits"] = limits
    return cfg


def outbound_cfg(pki: Any, inbound_port: int, *, verify_uri: str | None = None,
                 limits: dict[str, Any] | None = None, cert: Any = None,
                 key: Any = None) -> dict[str, Any]:
    uri = verify_uri or "spiffe://enforcer.demo/ns/demo/sa/inbound"
    cfg: dict[str, Any] = {
        "version": 1, "node": {"name": "test-outbound"},
        "tls": {"mesh": {"cert": str(cert or pki.client.cert), "key": str(key or pki.client.key),
                         "ca": str(pki.ca)}},
        "listeners": [{"name": "outbound", "listen": "127.0.0.1:0", "tls": {"mode": "off"},
                       "ruleset": "outbound", "upstream": "peer"}],
        "upstreams": {"peer": {"address": f"127.0.0.1:{inbound_port}",
                               "tls": {"mode": "mtls", "material": "mesh",
                                       "verify": {"uri": [uri]}}}},
        "rulesets": {"outbound": {"default": "allow"}},
    }
    if limits:
        cfg["limits"] = limits
    return cfg


def blackhole_listener() -> tuple[socket.socket, int, list[socket.socket]]:
    """A listener whose accept queue is full: the kernel drops SYNs, so connects hang."""
    blackhole = socket.socket()
    blackhole.bind(("127.0.0.1", 0))
    blackhole.listen(0)
    port = blackhole.getsockname()[1]
    fillers = []
    for _ in range(4):
        s = socket.socket()
        s.setblocking(False)
        with contextlib.suppress(BlockingIOError):
            s.connect(("127.0.0.1", port))
        fillers.append(s)
    return blackhole, port, fillers
