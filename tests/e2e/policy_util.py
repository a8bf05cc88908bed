"""Helpers for the policy and reload end-to-end tests: identities signed by the session CA,
mTLS clients that may be refused, and reading the policy metrics."""

from __future__ import annotations

import asyncio
import contextlib
import os
import ssl
from pathlib import Path
from typing import Any

import yaml

from enforcer.tlsconf.certs import IssuedPaths, issue
from tests.e2e.harness import CHUNK, client_ctx

TRUST_DOMAIN = "enforcer.demo"
FRONTEND_ID = f"spiffe://{TRUST_DOMAIN}/ns/shop/sa/frontend"
OPS_ID = f"spiffe://{TRUST_DOMAIN}/ns/ops/sa/runner"


def issue_identity(pki: Any, out: Path, name: str, **kw: Any) -> IssuedPaths:
    """A client certificate signed by the session CA (``pki.base`` is the CA dir)."""
    out.mkdir(parents=True, exist_ok=True)
    return issue(pki.base, out, name=name, server=False, **kw)


def ctx_for(pki: Any, who: IssuedPaths | None) -> ssl.SSLContext:
    if who is None:
        return client_ctx(pki.ca)
    return client_ctx(pki.ca, who.cert, who.key)


async def open_tls(port: int, ctx: ssl.SSLContext, *, host: str = "127.0.0.1",
                   local_ip: str | None = None
                   ) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    return await asyncio.open_connection(
        host, port, ssl=ctx, server_hostname="localhost",
        local_addr=(local_ip, 0) if local_ip else None)


async def tls_exchange(port: int, payload: bytes, ctx: ssl.SSLContext, *,
                       host: str = "127.0.0.1", local_ip: str | None = None,
                       timeout: float = 30) -> bytes:
    """Send payload through an echo path (concurrently with reading), close after
    everything came back, return what came back (less, if the enforcer closed first).
    TLS streams in asyncio cannot half-close, so the echo is read by length, not to EOF."""
    reader, writer = await open_tls(port, ctx, host=host, local_ip=local_ip)
    try:
        async def send() -> None:
            view = memoryview(payload)
            for i in range(0, len(view), CHUNK):
                writer.write(view[i : i + CHUNK])
                await writer.drain()

        sender = asyncio.ensure_future(send())
        got = bytearray()
        try:
            async with asyncio.timeout(timeout):
                while len(got) < len(payload):
                    data = await reader.read(CHUNK)
                    if not data:
                        break
                    got += data
                await sender
        except (ConnectionError, ssl.SSLError):
            sender.cancel()  # refused or cut: the caller looks at what came back
        return bytes(got)
    finally:
        await close_quietly(writer)


async def refused(port: int, ctx: ssl.SSLContext, *, host: str = "127.0.0.1",
                  local_ip: str | None = None, timeout: float = 30) -> bytes:
    """Connect, send a little, and read until the enforcer closes: returns what was
    received (a refused connection receives nothing). TLS 1.3 clients finish their
    handshake before the server has checked their certificate and the rules, so the
    refusal shows as EOF or a reset after the handshake."""
    try:
        reader, writer = await open_tls(port, ctx, host=host, local_ip=local_ip)
    except (ConnectionError, ssl.SSLError):
        return b""
    got = bytearray()
    try:
        writer.write(os.urandom(1000))
        async with asyncio.timeout(timeout):
            while data := await reader.read(CHUNK):
                got += data
    except (ConnectionError, ssl.SSLError):
        pass
    finally:
        await close_quietly(writer)
    return bytes(got)


async def close_quietly(writer: asyncio.StreamWriter) -> None:
    writer.close()
    with contextlib.suppress(Exception):
        await writer.wait_closed()


def decisions(metrics: Any, listener: str, ruleset: str, rule: str, action: str) -> float:
    value = metrics.registry.get_sample_value(
        "enforcer_policy_decisions_total",
        {"listener": listener, "ruleset": ruleset, "rule": rule, "action": action})
    return float(value or 0.0)


def reloads(metrics: Any, kind: str, result: str) -> float:
    value = metrics.registry.get_sample_value("enforcer_reloads_total",
                                              {"kind": kind, "result": result})
    return float(value or 0.0)


def write_rules(path: Path, rulesets: dict[str, Any]) -> Path:
    """Write a rulesets file atomically (write aside, rename over), as editors and
    config-management tools do."""
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(yaml.safe_dump({"rulesets": rulesets}, sort_keys=False))
    os.replace(tmp, path)
    return path


async def wait_until(predicate: Any, timeout: float = 15, step: float = 0.02) -> None:
    async with asyncio.timeout(timeout):
        while not predicate():
            await asyncio.sleep(step)
