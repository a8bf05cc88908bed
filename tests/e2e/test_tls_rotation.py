"""Live certificate rotation on a real in-process ``Server`` watching a Kubernetes-style
secret mount (the ``..data`` symlink swap), with the real 1 s poll:

- under load (50 clients connecting continuously, plus long-lived connections opened
  before the first swap): zero failed connections, every handshake that starts after a
  new serial was first seen presents that serial or a newer one, the long-lived
  connections keep moving bytes (checked) on their original certificate;
- a broken certificate swapped in keeps the last good one, is counted in
  ``enforcer_reloads_total{kind="tls",result="error"}`` and shown in status()["reloads"];
- an expired certificate is rejected at reload like any broken material;
- the CA bundle reloads the same way (a client of a newly trusted CA gets in).
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import os
import ssl
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from enforcer.config.loader import load_config
from enforcer.observe.flowlog import MemoryFlowLog
from enforcer.observe.metrics import Metrics
from enforcer.runtime.server import Server
from enforcer.tlsconf.certs import DEMO_SERVER_ID, IssuedPaths, issue
from tests.e2e.harness import Backend, inbound_cfg, wait_until
from tests.e2e.proc import write_config
from tests.e2e.tls_util import (
    SecretMount,
    echo_once,
    mtls_client,
    serial_of_der,
    sha,
    tls_reloads,
)

CLIENTS = 50
ROTATIONS = 5
LONG_LIVED = 5


def _issue_server(pki: Any, out: Path, **kw: Any) -> IssuedPaths:
    return issue(pki.base, out, name="server", spiffe_id=DEMO_SERVER_ID, dns=["localhost"],
                 ips=["127.0.0.1"], **kw)


def _files(cert: IssuedPaths, ca: bytes) -> dict[str, bytes]:
    return {"tls.crt": cert.cert.read_bytes(), "tls.key": cert.key.read_bytes(), "ca.crt": ca}


def _serial(cert: IssuedPaths) -> int:
    from tests.e2e.tls_util import serial_of_file

    return serial_of_file(cert.cert)


@dataclass
class Mounted:
    server: Server
    backend: Backend
    mount: SecretMount

    @property
    def port(self) -> int:
        return self.server.plane.listeners[0].local_port


@pytest.fixture
async def mounted(pki: Any, tmp_path: Path) -> AsyncIterator[Any]:
    made: list[Mounted] = []

    async def start(first: IssuedPaths, *, interval: float = 1.0) -> Mounted:
        backend = await Backend(mode="echo").start()
        mount = SecretMount(tmp_path / "secret")
        mount.update(_files(first, pki.ca.read_bytes()))
        cfg = inbound_cfg(pki, backend.port, limits={"drain_timeout": "1s"})
        cfg["tls"]["mesh"] = {"dir": str(mount.path)}
        server = Server(load_config(str(write_config(tmp_path / "enforcer.yaml", cfg))),
                        metrics=Metrics(), flowlog=MemoryFlowLog())
        server.reloader.interval = interval
        await server.start()
        made.append(Mounted(server, backend, mount))
        return made[-1]

    yield start
    for m in made:
        await m.server.shutdown()
        await m.backend.close()


# --------------------------------------------------------------------------- load


@dataclass
class Load:
    port: int
    ctx: ssl.SSLContext
    stop: asyncio.Event = field(default_factory=asyncio.Event)
    handshakes: list[tuple[float, int]] = field(default_factory=list)  # (started, serial)
    failures: list[str] = field(default_factory=list)
    per_client: list[int] = field(default_factory=lambda: [0] * CLIENTS)

    async def client(self, n: int) -> None:
        while not self.stop.is_set():
            payload = os.urandom(2048)
            started = time.monotonic()
            try:
                got, serial = await echo_once(self.port, self.ctx, payload)
            except Exception as exc:
                self.failures.append(f"client {n}: {type(exc).__name__}: {exc}")
                continue
            if sha(got) != sha(payload):
                self.failures.append(f"client {n}: echo differs ({len(got)} bytes)")
            self.handshakes.append((started, serial))
            self.per_client[n] += 1

    def seen_since(self, since: float) -> set[int]:
        return {serial for started, serial in self.handshakes if started >= since}


class LongLived:
    """A connection opened before the rotations that keeps echoing chunks until stopped."""

    def __init__(self) -> None:
        self.sent = bytearray()
        self.received = bytearray()
        self.serial = 0

    async def run(self, port: int, ctx: ssl.SSLContext, stop: asyncio.Event,
                  opened: asyncio.Event) -> None:
        reader, writer = await asyncio.open_connection("127.0.0.1", port, ssl=ctx,
                                                       server_hostname="localhost")
        self.serial = serial_of_der(
            writer.get_extra_info("ssl_object").getpeercert(binary_form=True))
        opened.set()
        try:
            while not stop.is_set():
                chunk = os.urandom(16_384)
                writer.write(chunk)
                self.sent += chunk
                self.received += await reader.readexactly(len(chunk))
                await asyncio.sleep(0.1)
        finally:
            writer.close()
            with contextlib.suppress(Exception):
                await writer.wait_closed()


async def test_rotation_under_load(mounted: Any, pki: Any, tmp_path: Path) -> None:
    gens = [_issue_server(pki, tmp_path / f"gen{i}") for i in range(ROTATIONS + 2)]
    serials = [_serial(g) for g in gens]
    m = await mounted(gens[0])
    ctx = mtls_client(pki.ca, pki.client.cert, pki.client.key)
    load = Load(m.port, ctx)
    long_lived = [LongLived() for _ in range(LONG_LIVED)]
    opened = [asyncio.Event() for _ in long_lived]
    tasks = [asyncio.ensure_future(c.run(m.port, ctx, load.stop, o))
             for c, o in zip(long_lived, opened, strict=True)]
    for o in opened:
        await asyncio.wait_for(o.wait(), 10)
    tasks += [asyncio.ensure_future(load.client(n)) for n in range(CLIENTS)]
    try:
        first_seen: dict[int, float] = {}
        await wait_until(lambda: serials[0] in load.seen_since(0))
        for gen in range(1, ROTATIONS + 1):
            await asyncio.sleep(1.0)  # the files change every second (or a bit slower)
            swapped = time.monotonic()
            m.mount.update(_files(gens[gen], pki.ca.read_bytes()))
            await wait_until(lambda g=gen, t=swapped: serials[g] in load.seen_since(t))
            first_seen[gen] = min(t for t, s in load.handshakes if s == serials[gen])
        assert tls_reloads(m.server, "ok") >= ROTATIONS

        # a broken certificate: the key of another generation
        broken = {**_files(gens[ROTATIONS + 1], pki.ca.read_bytes()),
                  "tls.key": gens[0].key.read_bytes()}
        errors_before = tls_reloads(m.server, "error")
        broken_at = time.monotonic()
        m.mount.update(broken)
        await wait_until(lambda: tls_reloads(m.server, "error") > errors_before)
        after_error = time.monotonic()
        count = len(load.handshakes)
        await wait_until(lambda: len(load.handshakes) >= count + 2 * CLIENTS)
    finally:
        load.stop.set()
        await asyncio.gather(*tasks, return_exceptions=True)
    for t in tasks:
        assert t.exception() is None, t.exception()

    assert load.failures == [], load.failures[:5]
    assert min(load.per_client) >= 3, load.per_client
    # every handshake that started once a generation had been seen got it or a newer one
    rank = {s: i for i, s in enumerate(serials)}
    for gen, seen_at in first_seen.items():
        stale = [s for t, s in load.handshakes if t > seen_at and rank[s] < gen]
        assert stale == [], f"generation {gen}: {len(stale)} later handshakes got older certs"
    # while the broken material sat in the mount, the last good certificate was served
    during = {s for t, s in load.handshakes if t >= after_error}
    assert during == {serials[ROTATIONS]}
    assert serials[ROTATIONS + 1] not in load.seen_since(broken_at)
    status = m.server.status()["reloads"]["tls"]
    assert "the private key does not match the certificate" in status["last_error"]
    assert status["result"] == "error"
    # long-lived connections: opened on generation 0, every byte echoed across the swaps
    for c in long_lived:
        assert c.serial == serials[0]
        assert len(c.sent) > 0 and sha(bytes(c.received)) == sha(bytes(c.sent))
    flows = m.server.flowlog.records
    assert flows and all(r["action"] == "allow" for r in flows), \
        [r for r in flows if r["action"] != "allow"][:3]
    expiry = m.server.metrics.registry.get_sample_value(
        "enforcer_certificate_expiry_timestamp_seconds", {"material": "mesh"})
    from cryptography import x509

    last = x509.load_pem_x509_certificate(gens[ROTATIONS].cert.read_bytes())
    assert expiry == last.not_valid_after_utc.timestamp()


# --------------------------------------------------------------------------- reload cases


async def test_expired_certificate_at_reload_is_rejected(mounted: Any, pki: Any,
                                                         tmp_path: Path) -> None:
    first = _issue_server(pki, tmp_path / "first")
    m = await mounted(first, interval=3600)
    now = dt.datetime.now(dt.UTC)
    expired = _issue_server(pki, tmp_path / "expired", not_before=now - dt.timedelta(days=9),
                            not_after=now - dt.timedelta(hours=1))
    m.mount.update(_files(expired, pki.ca.read_bytes()))
    assert m.server.reloader.poll() == ["tls"]
    assert tls_reloads(m.server, "error") == 1 and tls_reloads(m.server, "ok") == 0
    last_error = m.server.status()["reloads"]["tls"]["last_error"]
    assert "tls.mesh.dir: certificate CN=server expired at" in last_error
    ctx = mtls_client(pki.ca, pki.client.cert, pki.client.key)
    payload = os.urandom(10_000)
    got, serial = await echo_once(m.port, ctx, payload)
    assert sha(got) == sha(payload) and serial == _serial(first)
    # and a good one afterwards is taken
    good = _issue_server(pki, tmp_path / "good")
    m.mount.update(_files(good, pki.ca.read_bytes()))
    assert m.server.reloader.poll() == ["tls"]
    assert tls_reloads(m.server, "ok") == 1
    assert m.server.status()["reloads"]["tls"]["last_error"] is None
    got, serial = await echo_once(m.port, ctx, payload)
    assert sha(got) == sha(payload) and serial == _serial(good)


async def test_restoring_the_running_material_clears_the_reload_error(
        mounted: Any, pki: Any, tmp_path: Path) -> None:
    """Broken files, then the very files that are running again: nothing new to load, but
    /status and the metric must stop saying the last reload failed."""
    first = _issue_server(pki, tmp_path / "first")
    m = await mounted(first, interval=3600)
    expired = _issue_server(pki, tmp_path / "expired",
                            not_before=dt.datetime.now(dt.UTC) - dt.timedelta(days=9),
                            not_after=dt.datetime.now(dt.UTC) - dt.timedelta(hours=1))
    m.mount.update(_files(expired, pki.ca.read_bytes()))
    assert m.server.reloader.poll() == ["tls"]
    assert m.server.status()["reloads"]["tls"]["result"] == "error"
    m.mount.update(_files(first, pki.ca.read_bytes()))
    assert m.server.reloader.poll() == ["tls"]
    status = m.server.status()["reloads"]["tls"]
    assert (status["result"], status["last_error"]) == ("ok", None)
    assert tls_reloads(m.server, "ok") == 1 and tls_reloads(m.server, "error") == 1
    ctx = mtls_client(pki.ca, pki.client.cert, pki.client.key)
    payload = os.urandom(10_000)
    got, serial = await echo_once(m.port, ctx, payload)
    assert sha(got) == sha(payload) and serial == _serial(first)


async def test_ca_bundle_reload_trusts_a_new_ca(mounted: Any, pki: Any, tmp_path: Path) -> None:
    first = _issue_server(pki, tmp_path / "first")
    m = await mounted(first, interval=3600)
    rogue = pki.rogue_client  # signed by a CA the server does not trust (yet)
    rogue_ctx = mtls_client(pki.ca, rogue.cert, rogue.key)
    with pytest.raises((ssl.SSLError, ConnectionError)):
        await echo_once(m.port, rogue_ctx, b"x" * 100)
    # same certificate, wider trust bundle: the rogue CA is added
    bundle = pki.ca.read_bytes() + rogue.ca.read_bytes()
    m.mount.update(_files(first, bundle))
    assert m.server.reloader.poll() == ["tls"]
    assert tls_reloads(m.server, "ok") == 1
    payload = os.urandom(20_000)
    got, _ = await echo_once(m.port, rogue_ctx, payload)
    assert sha(got) == sha(payload)
    rec = m.server.flowlog.records[-1]
    assert rec["action"] == "allow"
    assert rec["tls"]["peer"]["spiffe_id"] == "spiffe://enforcer.demo/ns/demo/sa/outbound"
