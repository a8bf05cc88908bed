"""Fallback HTTP backend when nginx is not installed: ``python -m benchmarks.httpd PORT DIR``.

Answers a request for ``/NAME`` with the file NAME in DIR, any other path with the first
file (by name), HTTP/1.1 keep-alive unless the request says ``Connection: close``. Just enough HTTP for wrk and the harness's own
clients: requests are read up to the blank line, bodies are not expected.
"""

from __future__ import annotations

import asyncio
import sys
from pathlib import Path
from typing import cast

Answers = dict[bytes, tuple[bytes, bytes]]  # path -> (keep-alive, close) responses


class Responder(asyncio.Protocol):
    def __init__(self, answers: Answers, default: bytes) -> None:
        self.answers, self.default = answers, default
        self.buf = b""
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's is not a subclass

    def data_received(self, data: bytes) -> None:
        assert self.transport is not None
        self.buf += data
        while b"\r\n\r\n" in self.buf:
            head, _, self.buf = self.buf.partition(b"\r\n\r\n")
            parts = head.split(b" ", 2)
            path = parts[1] if len(parts) > 2 else b""
            keep, close = self.answers.get(path) or self.answers[self.default]
            if b"connection: close" in head.lower():
                self.transport.write(close)
                self.transport.close()
                return
            self.transport.write(keep)


def responses(body: bytes) -> tuple[bytes, bytes]:
    head = (b"HTTP/1.1 200 OK\r\nServer: bench\r\nContent-Type: text/plain\r\n"
            b"Content-Length: " + str(len(body)).encode() + b"\r\n")
    return (head + b"Connection: keep-alive\r\n\r\n" + body,
            head + b"Connection: close\r\n\r\n" + body)


def load_answers(directory: Path) -> tuple[Answers, bytes]:
    """The responses for every file in the directory, and the default path."""
    files = sorted(p for p in directory.iterdir() if p.is_file())
    answers = {b"/" + p.name.encode(): responses(p.read_bytes()) for p in files}
    return answers, b"/" + files[0].name.encode()


async def serve(port: int, answers: Answers, default: bytes) -> None:
    loop = asyncio.get_running_loop()
    server = await loop.create_server(lambda: Responder(answers, default), "127.0.0.1",
                                      port, backlog=4096)
    async with server:
        await server.serve_forever()


def main() -> None:
    import uvloop  # a dependency of enforcer

    asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())
    asyncio.run(serve(int(sys.argv[1]), *load_answers(Path(sys.argv[2]))))


if __name__ == "__main__":
    main()
