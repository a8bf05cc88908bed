"""Helpers for the egress proxy tests (SOCKS5, HTTP CONNECT).

- ``FakeResolver``: replaces the dialer's resolver in-process: names under ``.egress.test``
  resolve to 127.0.0.1 (or to the loopback addresses ``names`` maps them to, in that
  order) and nothing else does (addresses are returned as they are, as getaddrinfo does);
  every name asked is recorded, so a test can show a denied name was never looked up.
- ``egress_cfg``: a one-listener egress config (upstream ``original_destination``).
- ``credentials_file``: a credentials file with scrypt hashes (cheap parameters).
- ``raw_session``: a plain TCP client sending byte chunks and reading what comes back
  until EOF, reset or a timeout (so malformed handshakes can be sent).
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import socket
from pathlib import Path
from typing import Any

from enforcer.dataplane import dialer
from enforcer.egress.credentials import hash_password

SUFFIX = ".egress.test"


class FakeResolver:
    def __init__(self, monkeypatch: Any) -> None:
        self.asked: list[str] = []
        self.names: dict[str, list[str]] = {}  # name -> its addresses (loopback only)
        monkeypatch.setattr(dialer, "resolve", self.resolve)

    async def resolve(self, loop: asyncio.AbstractEventLoop, host: str,
                      port: int) -> list[dialer.Addr]:
        with contextlib.suppress(ValueError):  # an address: getaddrinfo looks nothing up
            ip = ipaddress.ip_address(host)
            family = socket.AF_INET if ip.version == 4 else socket.AF_INET6
            return [(family, (host, port) if ip.version == 4 else (host, port, 0, 0))]
        self.asked.append(host)
        if host in self.names:
            return [(socket.AF_INET, (ip, port)) for ip in self.names[host]]
        if host.endswith(SUFFIX):
            return [(socket.AF_INET, ("127.0.0.1", port))]
        raise dialer.ResolveError(socket.EAI_NONAME, f"cannot resolve {host}: unknown name")


def credentials_file(path: Path, users: dict[str, str]) -> str:
    lines = ["# test users"] + [f"{u}:{hash_password(p.encode(), ln=4)}"
                                for u, p in users.items()]
    path.write_text("\n".join(lines) + "\n")
    return str(path)


def egress_cfg(protocol: str, rules: list[dict[str, Any]], *, default: str = "deny",
               egress: dict[str, Any] | None = None, tls: dict[str, Any] | None = None,
               materials: dict[str, Any] | None = None) -> dict[str, Any]:
    listener: dict[str, Any] = {"name": "egress", "listen": "127.0.0.1:0",
                                "protocol": protocol, "tls": tls or {"mode": "off"},
                                "ruleset": "egress", "upstream": "requested"}
    if egress is not None:
        listener["egress"] = egress
    cfg: dict[str, Any] = {
        "version": 1, "node": {"name": "test-egress"},
        "listeners": [listener],
        "upstreams": {"requested": {"address": "original_destination"}},
        "rulesets": {"egress": {"default": default, "rules": rules}},
    }
    if materials:
        cfg["tls"] = materials
    return cfg


async def raw_session(port: int, chunks: list[bytes], *, pause: float = 0.05,
                      timeout: float = 15, half_close: bool = False) -> tuple[bytes, str]:
    """(bytes received, how it ended: eof | reset | timeout)."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    got = bytearray()
    ended = "eof"
    try:
        for chunk in chunks:
            writer.write(chunk)
            await writer.drain()
            await asyncio.sleep(pause)
        if half_close:
            writer.write_eof()
        async with asyncio.timeout(timeout):
            while data := await reader.read(65536):
                got += data
    except TimeoutError:
        ended = "timeout"
    except OSError:
        ended = "reset"
    finally:
        writer.close()
        with contextlib.suppress(Exception):
            await writer.wait_closed()
    return bytes(got), ended


def egress_errors(enforcer: Any, reason: str, protocol: str = "socks5") -> float:
    value = enforcer.metrics.registry.get_sample_value(
        "enforcer_egress_handshake_errors_total",
        {"listener": "egress", "protocol": protocol, "reason": reason})
    return value or 0.0
