"""``enforcer demo``: the sidecar pair on built-in defaults, in one process, in seconds.

It creates a throwaway PKI, starts an echo backend, an inbound enforcer (mTLS in, plain
to the backend) and an outbound enforcer (plain in, mTLS to the inbound), sends traffic
through the pair and checks it byte for byte, shows that a client with a certificate from
an untrusted CA is refused, prints the flow records and a summary, and exits 0 (1 if
anything did not behave). ``--keep-running`` leaves it up and prints ports to try.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import hashlib
import json
import os
import ssl
import sys
import tempfile
from pathlib import Path
from typing import Any

from enforcer.cli import exitcodes
from enforcer.config.loader import parse_config
from enforcer.dataplane.plane import DataPlane
from enforcer.observe.flowlog import MemoryFlowLog
from enforcer.observe.metrics import Metrics
from enforcer.tlsconf.certs import DemoPki, init_demo_pki

SPIFFE_OUTBOUND = "spiffe://enforcer.demo/ns/demo/sa/outbound"
SPIFFE_INBOUND = "spiffe://enforcer.demo/ns/demo/sa/inbound"


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser("demo", help="run the sidecar pair on built-in defaults and show it work")
    p.add_argument("--keep-running", action="store_true",
                   help="leave the pair running and print the ports to try")
    p.add_argument("--dir", metavar="DIR", help="where to put the demo PKI (default: a temp dir)")
    p.set_defaults(func=cmd_demo)


def cmd_demo(args: argparse.Namespace) -> int:
    from enforcer.runtime.server import new_event_loop

    loop = new_event_loop()
    try:
        with contextlib.ExitStack() as stack:
            directory = args.dir or stack.enter_context(tempfile.TemporaryDirectory(
                prefix="enforcer-demo-"))
            return loop.run_until_complete(_demo(Path(directory), args.keep_running))
    except KeyboardInterrupt:
        return exitcodes.OK
    finally:
        loop.close()


def _say(text: str) -> None:
    print(text, flush=True)


async def _echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        while data := await reader.read(65536):
            writer.write(data)
            await writer.drain()
        writer.write_eof()
        await writer.drain()
    except (ConnectionError, OSError):
        pass
    finally:
        writer.close()


def _inbound_config(pki: DemoPki, backend_port: int) -> dict[str, Any]:
    return {
        "version": 1,
        "node": {"name": "demo-inbound"},
        "tls": {"mesh": {"cert": str(pki.server.cert), "key": str(pki.server.key),
                         "ca": str(pki.ca)}},
        "listeners": [{"name": "inbound", "listen": "127.0.0.1:0",
                       "tls": {"mode": "terminate", "material": "mesh", "client_auth": "required"},
                       "ruleset": "inbound", "upstream": "app"}],
        "upstreams": {"app": {"address": f"127.0.0.1:{backend_port}"}},
        "rulesets": {"inbound": {"default": "deny", "rules": [
            {"name": "outbound-sidecar-may-call", "action": "allow",
             "from": {"identities": [SPIFFE_OUTBOUND]}}]}},
        "flow_log": {"sink": "stdout"},
    }


def _outbound_config(pki: DemoPki, inbound_port: int) -> dict[str, Any]:
    return {
        "version": 1,
        "node": {"name": "demo-outbound"},
        "tls": {"mesh": {"cert": str(pki.client.cert), "key": str(pki.client.key),
                         "ca": str(pki.ca)}},
        "listeners": [{"name": "outbound", "listen": "127.0.0.1:0", "tls": {"mode": "off"},
                       "ruleset": "outbound", "upstream": "inbound-sidecar"}],
        "upstreams": {"inbound-sidecar": {
            "address": f"127.0.0.1:{inbound_port}",
            "tls": {"mode": "mtls", "material": "mesh", "verify": {"uri": [SPIFFE_INBOUND]}}}},
        "rulesets": {"outbound": {"default": "allow"}},
        "flow_log": {"sink": "stdout"},
    }


async def _roundtrip(port: int, payload: bytes, ssl_ctx: ssl.SSLContext | None = None) -> bytes:
    reader, writer = await asyncio.open_connection("127.0.0.1", port, ssl=ssl_ctx,
                                                   server_hostname="localhost" if ssl_ctx else None)
    try:
        writer.write(payload)
        if ssl_ctx is None:
            writer.write_eof()
        await writer.drain()
        return await asyncio.wait_for(_read_n(reader, len(payload)), 10)
    finally:
        writer.close()
        with contextlib.suppress(Exception):
            await writer.wait_closed()


async def _read_n(reader: asyncio.StreamReader, n: int) -> bytes:
    data = bytearray()
    while len(data) < n:
        chunk = await reader.read(65536)
        if not chunk:
            break
        data += chunk
    return bytes(data)


async def _rogue_attempt(pki: DemoPki, inbound_port: int) -> str:
    ctx = ssl.create_default_context(cafile=str(pki.ca))
    ctx.load_cert_chain(str(pki.rogue_client.cert), str(pki.rogue_client.key))
    try:
        got = await _roundtrip(inbound_port, b"let me in", ctx)
    except (ssl.SSLError, ConnectionError, OSError) as exc:
        return f"refused ({type(exc).__name__})"
    return "refused (connection closed)" if not got else "ACCEPTED (this is a bug)"


async def _demo(directory: Path, keep_running: bool) -> int:
    _say(f"enforcer demo: throwaway PKI in {directory}")
    pki = init_demo_pki(directory)
    backend = await asyncio.start_server(_echo, "127.0.0.1", 0)
    backend_port = backend.sockets[0].getsockname()[1]
    flows = MemoryFlowLog()
    metrics = Metrics()
    inbound = DataPlane(parse_config(_inbound_config(pki, backend_port)), metrics=metrics,
                        flowlog=flows)
    await inbound.start()
    in_port = inbound.listeners[0].local_port
    outbound = DataPlane(parse_config(_outbound_config(pki, in_port)), metrics=metrics,
                         flowlog=flows)
    await outbound.start()
    out_port = outbound.listeners[0].local_port
    _say(f"echo backend 127.0.0.1:{backend_port} <- inbound enforcer (mTLS) 127.0.0.1:{in_port}"
         f" <- outbound enforcer (plain) 127.0.0.1:{out_port}")
    ok = True
    try:
        payload = os.urandom(1024 * 1024)
        echoed = await _roundtrip(out_port, payload)
        same = hashlib.sha256(echoed).digest() == hashlib.sha256(payload).digest()
        ok &= same
        _say(f"1 MiB through outbound -> mTLS -> inbound -> echo: "
             f"{'sha256 match' if same else 'MISMATCH'}")
        verdict = await _rogue_attempt(pki, in_port)
        ok &= verdict.startswith("refused")
        _say(f"client with a certificate from an untrusted CA, straight to inbound: {verdict}")
        await asyncio.sleep(0.2)
        _say("flow records:")
        for record in flows.records:
            _say(json.dumps(record, separators=(",", ":")))
        _summary(flows.records)
        if keep_running:
            _say(f"\nrunning; try:\n  curl -v telnet://127.0.0.1:{out_port}   (plain, via the pair)"
                 f"\n  openssl s_client -connect 127.0.0.1:{in_port} -cert {pki.client.cert} "
                 f"-key {pki.client.key} -CAfile {pki.ca}\nCtrl-C to stop.")
            await asyncio.Event().wait()
    finally:
        await outbound.drain(1.0)
        await inbound.drain(1.0)
        backend.close()
    if not ok:
        print("enforcer demo: something did not behave as expected", file=sys.stderr)
    return exitcodes.OK if ok else exitcodes.FAILURE


def _summary(records: list[dict[str, Any]]) -> None:
    counts: dict[str, int] = {}
    for r in records:
        key = f"{r['listener']}:{r['action']}"
        counts[key] = counts.get(key, 0) + 1
    _say("summary: " + ", ".join(f"{k}={v}" for k, v in sorted(counts.items())))
