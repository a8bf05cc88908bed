"""Helpers for the PROXY protocol end-to-end tests.

- ``HeaderApp``: a backend that reads a PROXY header with ``enforcer.proxyproto`` (the
  way an application behind enforcer would), records it, then echoes or swaps payloads.
- ``raw_exchange``: a plain TCP client that sends raw bytes (a hand-made header and
  data), half-closes, and reads until EOF or reset, so malformed headers can be sent.
- ``pp_cfg``: a one-listener enforcer config with ``proxy_protocol`` on both sides.
- ``Haproxy``: a real HAProxy in the foreground (``-db``) with its log on stdout.
- ``proxy_errors``: a value of ``enforcer_proxy_protocol_errors_total``.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import subprocess
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from enforcer.proxyproto import HeaderParser, ProxyHeader, ProxyProtocolError
from tests.e2e.harness import LocalServer

CHUNK = 256 * 1024
TEST_NET = "203.0.113.7"  # RFC 5737 TEST-NET-3: the "real client" behind a load balancer


def free_port() -> int:
    """A port that was free a moment ago (for peers that cannot bind port 0 themselves)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class Accepted:
    header: ProxyHeader | None
    peer: tuple[str, int]
    received: bytes = b""
    error: str | None = None


@dataclass
class HeaderApp(LocalServer):
    """An app behind enforcer that expects a PROXY header, records it and its payload.

    mode 'echo' echoes; 'swap' sends ``payload`` while reading, then half-closes."""

    mode: str = "echo"
    payload: bytes = b""
    expect_header: bool = True
    server: asyncio.Server | None = None
    accepted: list[Accepted] = field(default_factory=list)
    done: asyncio.Event = field(default_factory=asyncio.Event)

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        peer = writer.get_extra_info("peername")
        item = Accepted(None, (peer[0], peer[1]))
        self.accepted.append(item)
        got = bytearray()
        try:
            first = await self._read_header(reader, item) if self.expect_header else b""
            got += first
            if self.mode == "echo":
                writer.write(first)
                while data := await reader.read(CHUNK):
                    got += data
                    writer.write(data)
                    await writer.drain()
                writer.write_eof()
            else:
                writer.write(self.payload)
                writer.write_eof()
                while data := await reader.read(CHUNK):
                    got += data
            await writer.drain()
        except (ConnectionError, OSError, ProxyProtocolError) as exc:
            item.error = repr(exc)
        finally:
            item.received = bytes(got)
            self.done.set()
            writer.close()

    @staticmethod
    async def _read_header(reader: asyncio.StreamReader, item: Accepted) -> bytes:
        parser = HeaderParser()
        while True:
            data = await reader.read(CHUNK)
            if not data:
                parser.eof()
            header = parser.feed(data)
            if header is not None:
                item.header = header
                return parser.rest


@dataclass
class RawResult:
    data: bytes
    reset: bool  # the connection ended with a reset rather than a FIN
    local: tuple[str, int]  # the client socket's own address (what the enforcer saw)


async def raw_exchange(port: int, chunks: list[bytes], *, half_close: bool = True,
                       pause: float = 0.0, timeout: float = 20) -> RawResult:
    """Send ``chunks`` one write each (``pause`` seconds apart), half-close, read to EOF.

    Reading runs alongside writing. The peer may reset the connection at any point (that
    is what enforcer does to a bad header): failed writes are ignored, ``reset`` says so."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    sock = writer.get_extra_info("sockname")
    reset = False

    async def send() -> None:
        nonlocal reset
        try:
            for chunk in chunks:
                writer.write(chunk)
                await writer.drain()
                if pause:
                    await asyncio.sleep(pause)
            if half_close:
                writer.write_eof()
        except (ConnectionError, OSError):
            reset = True

    got = bytearray()
    sender = asyncio.create_task(send())
    try:
        async with asyncio.timeout(timeout):
            try:
                while data := await reader.read(CHUNK):
                    got += data
            except (ConnectionError, OSError):
                reset = True
            await sender
    finally:
        sender.cancel()
        writer.close()
        with contextlib.suppress(Exception):
            await writer.wait_closed()
    return RawResult(bytes(got), reset, (sock[0], sock[1]))


def pp_cfg(pki: Any, upstream_port: int, *, accept: str = "required",
           trusted: list[str] | None = None, timeout: str = "3s", send: str = "off",
           tlvs: list[str] | None = None, tls: dict[str, Any] | None = None,
           upstream_tls: dict[str, Any] | None = None, rules: list[dict[str, Any]] | None = None,
           default: str = "allow", name: str = "edge") -> dict[str, Any]:
    """One listener ``name`` on 127.0.0.1:0 -> upstream ``app``, PROXY on both sides."""
    accept_cfg: dict[str, Any] = {"accept": accept, "timeout": timeout}
    if accept != "off":
        accept_cfg["trusted_sources"] = trusted if trusted is not None else ["127.0.0.0/8"]
    send_cfg: dict[str, Any] = {"send": send}
    if tlvs:
        send_cfg["tlvs"] = tlvs
    upstream: dict[str, Any] = {"address": f"127.0.0.1:{upstream_port}",
                                "proxy_protocol": send_cfg}
    if upstream_tls:
        upstream["tls"] = upstream_tls
    return {
        "version": 1, "node": {"name": f"test-{name}"},
        "tls": {"mesh": {"cert": str(pki.server.cert), "key": str(pki.server.key),
                         "ca": str(pki.ca)},
                "client": {"cert": str(pki.client.cert), "key": str(pki.client.key),
                           "ca": str(pki.ca)}},
        "listeners": [{"name": name, "listen": "127.0.0.1:0", "proxy_protocol": accept_cfg,
                       "tls": tls or {"mode": "off"}, "ruleset": "rs", "upstream": "app"}],
        "upstreams": {"app": upstream},
        "rulesets": {"rs": {"default": default, "rules": rules or []}},
    }


def proxy_errors(enforcer: Any, listener: str, reason: str) -> float:
    value = enforcer.metrics.registry.get_sample_value(
        "enforcer_proxy_protocol_errors_total", {"listener": listener, "reason": reason})
    return float(value or 0.0)


PROBE_FRONTEND = """
frontend readiness_probe
    bind 127.0.0.1:{port}
    mode tcp
    no log
    tcp-request connection reject
"""


class Haproxy:
    """``haproxy -db -f CFG`` as a subprocess; ``lines`` collects its stdout+stderr (the log)."""

    def __init__(self, binary: str, workdir: Path, config: str) -> None:
        self.probe_port = free_port()
        self.cfg_path = workdir / "haproxy.cfg"
        self.cfg_path.write_text(config + PROBE_FRONTEND.format(port=self.probe_port))
        check = subprocess.run([binary, "-c", "-f", str(self.cfg_path)], capture_output=True,
                               text=True, timeout=30)
        if check.returncode != 0:
            raise RuntimeError(f"haproxy rejected its config:\n{check.stdout}{check.stderr}")
        self.proc = subprocess.Popen([binary, "-db", "-f", str(self.cfg_path)],
                                     stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        self.lines: list[str] = []
        self._pump = threading.Thread(target=self._read, daemon=True)
        self._pump.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.append(line.rstrip("\n"))

    def wait_ready(self, timeout: float = 15) -> None:
        """Wait until the silent probe frontend accepts (HAProxy binds all at once)."""
        deadline = time.monotonic() + timeout
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError("haproxy exited:\n" + "\n".join(self.lines))
            try:
                with socket.create_connection(("127.0.0.1", self.probe_port), timeout=1):
                    return
            except OSError:
                if time.monotonic() > deadline:
                    raise TimeoutError("haproxy did not listen:\n"
                                       + "\n".join(self.lines)) from None
                time.sleep(0.05)

    async def wait_log(self, needle: str, timeout: float = 15) -> str:
        async with asyncio.timeout(timeout):
            while True:
                for line in self.lines:
                    if needle in line:
                        return line
                await asyncio.sleep(0.02)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        self._pump.join(5)
