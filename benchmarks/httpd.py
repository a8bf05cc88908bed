"""Fallback HTTP backend when nginx is not installed: ``python -m benchmarks.httpd PORT DIR``.

Answers every request (any path) with the one file in DIR, HTTP/1.1 keep-alive unless
the request says ``Connection: close``. Just enough HTTP for wrk and the harness's own
clients: requests are read up to the blank line, bodies are not expected.
"""

from __future__ import annotations

import asyncio
import sys
from pathlib import Path
from typing import cast


class Responder(asyncio.Protocol):
    def __init__(self, keep: bytes, close: bytes) -> None:
        self.keep, self.close = keep, close
        self.buf = b""
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's is not a subclass

    def data_received(self, data: bytes) -> None:
        assert self.transport is not None
        self.buf += data
        while b"\r\n\r\n" in self.buf:
            head, _, self.buf = self.buf.partition(b"\r\n\r\n")
            if b"connection: close" in head.lower():
                self.transport.write(self.close)
                self.transport.close()
                return
            self.transport.write(self.keep)


def responses(body: bytes) -> tuple[bytes, bytes]:
    head = (b"HTTP/1.1 200 OK\r\nServer: bench\r\nContent-Type: text/plain\r\n"
            b"Content-Length: " + str(len(body)).encode() + b"\r\n")
    return (head + b"Connection: keep-alive\r\n\r\n" + body,
            head + b"Connection: close\r\n\r\n" + body)


async def serve(port: int, body: bytes) -> None:
    keep, close = responses(body)
    loop = asyncio.get_running_loop()
    server = await loop.create_server(lambda: Responder(keep, close), "127.0.0.1", port,
                                      backlog=4096)
    async with server:
        await server.serve_forever()


def main() -> None:
    import uvloop  # a dependency of enforcer

    directory = Path(sys.argv[2])
    body = next(p for p in sorted(directory.iterdir()) if p.is_file()).read_bytes()
    asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())
    asyncio.run(serve(int(sys.argv[1]), body))


if __name__ == "__main__":
    main()
