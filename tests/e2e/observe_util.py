"""Helpers for the observability end-to-end tests: an in-process ``Server`` with its admin
endpoint, an HTTP client for it, a Prometheus scrape parser, a client that reports its own
address and TLS parameters, a PROXY v2 header builder independent of ``enforcer.proxyproto``,
the flow-record shape check (docs/observability.md "Flow records"), and an ``enforcer run`` subprocess
whose stdout the test controls.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import http.client
import ipaddress
import json
import os
import re
import socket
import ssl
import struct
import subprocess
import threading
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat
from prometheus_client.parser import text_string_to_metric_families

from enforcer.config.loader import parse_config
from enforcer.observe.flowid import flow_id_time
from enforcer.runtime.server import Server
from tests.e2e.proc import enforcer_cmd

CHUNK = 256 * 1024
ADMIN_BOUND = re.compile(r"admin endpoint bound on (\S+):(\d+)")
LISTENER_BOUND = re.compile(r"listener (\S+) bound on (\S+):(\d+)")
ULID = re.compile(r"^[0-9A-HJKMNP-TV-Z]{26}$")
TS = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{6}Z$")

# docs/observability.md "Flow records": every key, and the keys of the nested objects.
RECORD_KEYS = {"ts", "event", "flow_id", "node", "listener", "action", "ruleset", "rule",
               "reason", "client", "peer", "local", "proxy_protocol", "tls", "upstream",
               "bytes", "duration_s", "close"}
TLS_KEYS = {"version", "cipher", "sni", "peer"}
TLS_PEER_KEYS = {"spiffe_id", "cn", "dns", "uri", "spki_sha256"}
UPSTREAM_KEYS = {"name", "address", "tls"}


Series = dict[frozenset[tuple[str, str]], float]  # label set -> value
Samples = dict[str, Series]  # sample name -> series


# ----------------------------------------------------------------------- in-process server
@contextlib.asynccontextmanager
async def serving(raw_cfg: dict[str, Any], *, flowlog: Any = None) -> AsyncIterator[Server]:
    """A started ``Server`` (admin on 127.0.0.1:0 unless the config says otherwise) whose
    flow log is running; shut down (drained) and the flow log closed on exit."""
    raw_cfg = dict(raw_cfg)
    raw_cfg.setdefault("admin", {"listen": "127.0.0.1:0"})
    server = Server(parse_config(raw_cfg), flowlog=flowlog)
    server.flowlog.start()
    await server.start()
    try:
        yield server
    finally:
        if not server.plane.draining:
            await server.shutdown()
        elif server.admin is not None:
            server.admin.close()
        await asyncio.to_thread(server.flowlog.close)


def admin_port(server: Server) -> int:
    assert server.admin is not None
    return server.admin.bound.port


def listener_port(server: Server, name: str) -> int:
    for lst in server.plane.listeners:
        if lst.name == name:
            return lst.local_port
    raise KeyError(name)


# ----------------------------------------------------------------------- HTTP
@dataclass
class HttpResult:
    status: int
    headers: dict[str, str]
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body)


def http_get_sync(port: int, path: str, headers: dict[str, str] | None = None,
                  method: str = "GET") -> HttpResult:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        conn.request(method, path, headers=headers or {})
        resp = conn.getresponse()
        body = resp.read()
        return HttpResult(resp.status, {k.lower(): v for k, v in resp.getheaders()}, body)
    finally:
        conn.close()


async def http_get(port: int, path: str, headers: dict[str, str] | None = None,
                   method: str = "GET") -> HttpResult:
    """GET from the admin endpoint on a worker thread (the event loop keeps relaying)."""
    return await asyncio.to_thread(http_get_sync, port, path, headers, method)


def scrape_sync(port: int) -> Samples:
    result = http_get_sync(port, "/metrics")
    assert result.status == 200, result
    return parse_samples(result.body.decode())


async def scrape(port: int) -> Samples:
    result = await http_get(port, "/metrics")
    assert result.status == 200, result
    assert result.headers["content-type"].startswith("text/plain; version=0.0.4")
    return parse_samples(result.body.decode())


def parse_samples(text: str) -> Samples:
    """``{sample name: {frozenset(label items): value}}`` through prometheus-client's parser."""
    out: Samples = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            out.setdefault(sample.name, {})[frozenset(sample.labels.items())] = sample.value
    return out


def labels(**kw: str) -> frozenset[tuple[str, str]]:
    return frozenset(kw.items())


# ----------------------------------------------------------------------- clients
@dataclass
class Talk:
    received: bytes
    local_port: int
    tls_version: str | None = None
    tls_cipher: str | None = None


async def talk(port: int, payload: bytes, *, ssl_ctx: ssl.SSLContext | None = None,
               server_hostname: str | None = None, prefix: bytes = b"",
               timeout: float = 30) -> Talk:
    """One connection to an echo backend through the proxy. ``prefix`` (a PROXY header)
    goes first, in the clear. Plaintext: send ``payload`` while reading, half-close, read
    until EOF. TLS (asyncio's TLS cannot half-close): send, read the echo back, then close
    with close_notify, which the proxy sees as the client's FIN."""
    sock = socket.create_connection(("127.0.0.1", port))
    local_port = int(sock.getsockname()[1])
    if prefix:
        sock.sendall(prefix)
    sock.setblocking(False)
    async with asyncio.timeout(timeout):
        reader, writer = await asyncio.open_connection(
            sock=sock, ssl=ssl_ctx, server_hostname=server_hostname if ssl_ctx else None)
        tls = writer.get_extra_info("ssl_object")
        try:
            if tls is not None:
                writer.write(payload)
                got = await reader.readexactly(len(payload))
            else:
                got = await _send_and_read(reader, writer, payload)
        finally:
            writer.close()
            with contextlib.suppress(Exception):
                await writer.wait_closed()
    return Talk(got, local_port, tls.version() if tls else None, tls.cipher()[0] if tls else None)


async def _send_and_read(reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                         payload: bytes) -> bytes:
    async def send() -> None:
        view = memoryview(payload)
        for i in range(0, len(view), CHUNK):
            writer.write(view[i : i + CHUNK])
            await writer.drain()
        writer.write_eof()

    sender = asyncio.ensure_future(send())
    got = bytearray()
    while data := await reader.read(CHUNK):
        got += data
    await sender
    return bytes(got)


async def refused(port: int, payload: bytes = b"", *, ssl_ctx: ssl.SSLContext | None = None,
                  server_hostname: str | None = None, timeout: float = 10) -> bytes:
    """A connection the proxy is expected to close: send, read until EOF or an error;
    returns what was read (nothing, for a proxy that fails closed)."""
    got = bytearray()
    with contextlib.suppress(ssl.SSLError, ConnectionError):
        async with asyncio.timeout(timeout):
            reader, writer = await asyncio.open_connection(
                "127.0.0.1", port, ssl=ssl_ctx, server_hostname=server_hostname)
            try:
                if payload:
                    writer.write(payload)
                while data := await reader.read(CHUNK):
                    got += data
            finally:
                writer.close()
                with contextlib.suppress(Exception):
                    await writer.wait_closed()
    return bytes(got)


def tls_client_ctx(ca: Path, cert: Path | None = None, key: Path | None = None,
                   *, max_version: ssl.TLSVersion | None = None) -> ssl.SSLContext:
    ctx = ssl.create_default_context(cafile=str(ca))
    if cert is not None:
        ctx.load_cert_chain(str(cert), str(key))
    if max_version is not None:
        ctx.maximum_version = max_version
    return ctx


def proxy_v2(src: tuple[str, int], dst: tuple[str, int], *,
             aws_vpce_id: str | None = None) -> bytes:
    """A PROXY v2 PROXY/TCP4 header built by hand (spec section 2.2), optionally with the
    AWS VPC endpoint TLV (type 0xEA, subtype 0x01)."""
    body = (ipaddress.IPv4Address(src[0]).packed + ipaddress.IPv4Address(dst[0]).packed
            + struct.pack("!HH", src[1], dst[1]))
    if aws_vpce_id is not None:
        value = b"\x01" + aws_vpce_id.encode()
        body += struct.pack("!BH", 0xEA, len(value)) + value
    return b"\r\n\r\n\x00\r\nQUIT\n" + bytes([0x21, 0x11]) + struct.pack("!H", len(body)) + body


# ----------------------------------------------------------------------- certificates
def load_cert(path: Path) -> x509.Certificate:
    return x509.load_pem_x509_certificate(Path(path).read_bytes())


def spki_sha256(cert: x509.Certificate) -> str:
    spki = cert.public_key().public_bytes(Encoding.DER, PublicFormat.SubjectPublicKeyInfo)
    return base64.b64encode(hashlib.sha256(spki).digest()).decode()


def sans(cert: x509.Certificate) -> tuple[list[str], list[str]]:
    ext = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    return (list(ext.get_values_for_type(x509.DNSName)),
            list(ext.get_values_for_type(x509.UniformResourceIdentifier)))


# ----------------------------------------------------------------------- flow records
def assert_record_shape(rec: dict[str, Any]) -> None:
    """Every documented field is present with the right JSON type; exact values are the
    caller's business."""
    rec = json.loads(json.dumps(rec))  # only JSON types may be in a record
    assert rec.keys() >= RECORD_KEYS, sorted(RECORD_KEYS - rec.keys())
    assert TS.match(rec["ts"]), rec["ts"]
    assert ULID.match(rec["flow_id"]), rec["flow_id"]
    # the flow id was made at accept, the ts at close: the id's time is not later
    ts = time.mktime(time.strptime(rec["ts"][:19], "%Y-%m-%dT%H:%M:%S")) - time.timezone
    ts += float("0." + rec["ts"][20:26])
    assert flow_id_time(rec["flow_id"]) <= ts + 0.001
    assert rec["event"] in ("flow", "open")
    assert rec["action"] in ("allow", "deny", "error")
    for key in ("node", "listener", "ruleset", "reason"):
        assert isinstance(rec[key], str) and rec[key], key
    assert rec["rule"] is None or isinstance(rec["rule"], str)
    for key in ("client", "peer", "local"):
        assert set(rec[key]) == {"ip", "port"}, rec[key]
        ipaddress.ip_address(rec[key]["ip"])
        assert isinstance(rec[key]["port"], int)
    if rec["proxy_protocol"] is not None:
        assert {"version", "command", "tlvs"} <= rec["proxy_protocol"].keys()
    if rec["tls"] is not None:
        assert rec["tls"].keys() >= TLS_KEYS, rec["tls"]
        if rec["tls"]["peer"] is not None:
            assert rec["tls"]["peer"].keys() >= TLS_PEER_KEYS, rec["tls"]["peer"]
    if rec["upstream"] is not None:
        assert rec["upstream"].keys() >= UPSTREAM_KEYS, rec["upstream"]
    assert set(rec["bytes"]) == {"from_client", "to_client"}
    assert all(isinstance(v, int) and v >= 0 for v in rec["bytes"].values())
    assert isinstance(rec["duration_s"], float | int) and rec["duration_s"] >= 0
    if rec["event"] == "flow":
        assert isinstance(rec["close"], str) and rec["close"]


def read_records(path: Path) -> list[dict[str, Any]]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line]


async def wait_until(predicate: Callable[[], bool], timeout: float = 20,
                     what: str = "condition") -> None:
    try:
        async with asyncio.timeout(timeout):
            while not predicate():
                await asyncio.sleep(0.01)
    except TimeoutError:
        raise TimeoutError(f"timed out waiting for {what}") from None


def wait_until_sync(predicate: Callable[[], bool], timeout: float = 20,
                    what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out waiting for {what}")
        time.sleep(0.01)


# ----------------------------------------------------------------------- subprocess
class ObservedProcess:
    """``enforcer run -c FILE``: stderr always collected (listener and admin ports parsed
    from it); stdout read only after ``read_stdout()`` (until then the pipe fills up and
    the flow-log writer blocks, which is the point of some tests)."""

    def __init__(self, config: Path, *, stdout: Any = subprocess.PIPE) -> None:
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        self.proc = subprocess.Popen(enforcer_cmd("run", "-c", str(config)), stdout=stdout,
                                     stderr=subprocess.PIPE, text=True, env=env)
        self.stderr_lines: list[str] = []
        self.stdout_lines: list[str] = []
        self.ports: dict[str, int] = {}
        self.admin: int | None = None
        self._stdout_thread: threading.Thread | None = None
        self._stderr_thread = threading.Thread(target=self._pump_stderr, daemon=True)
        self._stderr_thread.start()

    def _pump_stderr(self) -> None:
        assert self.proc.stderr is not None
        for line in self.proc.stderr:
            self.stderr_lines.append(line.rstrip("\n"))
            if m := LISTENER_BOUND.search(line):
                self.ports[m.group(1)] = int(m.group(3))
            if m := ADMIN_BOUND.search(line):
                self.admin = int(m.group(2))

    def _pump_stdout(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.stdout_lines.append(line.rstrip("\n"))

    def read_stdout(self) -> None:
        if self._stdout_thread is None:
            self._stdout_thread = threading.Thread(target=self._pump_stdout, daemon=True)
            self._stdout_thread.start()

    def wait_ready(self, listeners: int = 1, timeout: float = 20) -> None:
        def ready() -> bool:
            if self.proc.poll() is not None:
                raise RuntimeError("enforcer exited early:\n" + "\n".join(self.stderr_lines))
            return len(self.ports) >= listeners and self.admin is not None
        wait_until_sync(ready, timeout, "enforcer to bind:\n" + "\n".join(self.stderr_lines))

    def records(self) -> list[dict[str, Any]]:
        return [json.loads(line) for line in list(self.stdout_lines) if line.startswith("{")]

    def wait(self, timeout: float = 30) -> int:
        code = self.proc.wait(timeout)
        self._stderr_thread.join(5)
        if self._stdout_thread is not None:
            self._stdout_thread.join(5)
        return code

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)
