"""A long-lived connection through enforcer to an echo backend, for tests that act on
connections while they are open (limits, revocation, expiry): each round trip sends
random bytes and checks the echo by sha256."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import os
import ssl
from typing import Any


class LiveStream:
    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer
        self.moved = 0  # bytes echoed back intact

    @classmethod
    async def open(cls, port: int, ctx: ssl.SSLContext | None = None, *,
                   prefix: bytes = b"") -> LiveStream:
        """``prefix`` (a PROXY header) is sent first, on a plaintext connection."""
        reader, writer = await asyncio.open_connection(
            "127.0.0.1", port, ssl=ctx, server_hostname="localhost" if ctx else None)
        if prefix:
            writer.write(prefix)
        return cls(reader, writer)

    async def roundtrip(self, n: int = 64 * 1024, timeout: float = 20) -> None:
        payload = os.urandom(n)
        self.writer.write(payload)
        async with asyncio.timeout(timeout):
            await self.writer.drain()
            got = await self.reader.readexactly(n)
        assert hashlib.sha256(got).hexdigest() == hashlib.sha256(payload).hexdigest()
        self.moved += n

    async def ended(self, timeout: float = 20) -> bool:
        """True once the enforcer closed it (EOF, reset or a TLS error on read)."""
        async with asyncio.timeout(timeout):
            try:
                while await self.reader.read(65536):
                    pass
            except (ConnectionError, ssl.SSLError, OSError):
                pass
        return True

    async def close(self) -> None:
        self.writer.close()
        with contextlib.suppress(Exception):
            await self.writer.wait_closed()


def closes(server: Any, reason: str) -> float:
    """``enforcer_certificate_closes_total`` of the listener ``inbound`` for ``reason``."""
    value = server.metrics.registry.get_sample_value(
        "enforcer_certificate_closes_total", {"listener": "inbound", "reason": reason})
    return float(value or 0.0)
