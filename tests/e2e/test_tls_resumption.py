"""TLS session resumption between enforcers, through a real outbound -> inbound pair:
connections after the first resume (both sides say so), the resumed sessions still give
both sides the peer identity, ``verify.uri`` is still enforced on a resumed session, and
rotating the outbound's client certificate under load fails no connection (the session
cache goes with the old context)."""

from __future__ import annotations

import asyncio
import dataclasses
import datetime as dt
import gc
import os
import socket
import ssl
import struct
from collections.abc import AsyncIterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from enforcer.config.loader import load_config
from enforcer.config.model import UpstreamVerifyConfig
from enforcer.dataplane import native
from enforcer.observe.flowlog import MemoryFlowLog
from enforcer.observe.metrics import Metrics
from enforcer.runtime.server import Server
from enforcer.runtime.tlsreload import rotate_ticket_keys
from enforcer.tlsconf.certs import DEMO_CLIENT_ID, DEMO_SERVER_ID, issue
from tests.e2e.harness import (
    Backend,
    Enforcer,
    exchange,
    inbound_cfg,
    outbound_cfg,
    random_bytes,
    running,
    sha,
)
from tests.e2e.proc import write_config
from tests.e2e.tls_util import SecretMount, blocking_echo, mtls_client


async def _pair(pki: Any, backend: Backend) -> tuple[Enforcer, Enforcer]:
    inbound = await Enforcer(inbound_cfg(pki, backend.port)).start()
    outbound = await Enforcer(outbound_cfg(pki, inbound.port())).start()
    return inbound, outbound


async def test_connections_after_the_first_resume_and_keep_identities(pki: Any) -> None:
    backend = await Backend(mode="echo").start()
    inbound, outbound = await _pair(pki, backend)
    async with running(outbound, inbound, backend):
        for _ in range(4):
            payload = random_bytes(40_000)
            assert sha(await exchange(outbound.port(), payload)) == sha(payload)
        out_recs = await outbound.wait_flows(4)
        in_recs = await inbound.wait_flows(4)
    assert [r["upstream"]["resumed"] for r in out_recs] == [False, True, True, True]
    assert [r["tls"]["resumed"] for r in in_recs] == [False, True, True, True]
    for rec in in_recs:  # the inbound still knows who called, and the rule still matched
        assert rec["action"] == "allow" and rec["rule"] == "outbound-may-call"
        assert rec["tls"]["peer"]["spiffe_id"] == DEMO_CLIENT_ID
    for rec in out_recs:
        assert rec["upstream"]["peer"]["spiffe_id"] == DEMO_SERVER_ID


@pytest.mark.parametrize("relay", ["native", "python"])
async def test_the_upstream_session_is_never_read_from_python(
        pki: Any, relay: str, monkeypatch: pytest.MonkeyPatch,
        caplog: pytest.LogCaptureFixture) -> None:
    """SSLObject.session leaks a copy of the session per read on CPython before 3.12.8
    (gh-116810): a full upstream handshake used to read it, so clients that reset (every
    next handshake full) leaked ~1 KiB per connection. The native extension keeps the
    newest session itself; the Python relay on such a Python does not resume, and says so."""
    from enforcer.dataplane.tlsengine import SESSION_GETTER_LEAKS

    reads = []
    getter = ssl.SSLObject.session
    monkeypatch.setattr(ssl.SSLObject, "session", property(
        lambda obj: reads.append(obj) or getter.fget(obj), getter.fset))  # type: ignore[attr-defined]
    backend = await Backend(mode="echo").start()
    inbound = await Enforcer({**inbound_cfg(pki, backend.port), "relay": relay}).start()
    outbound = await Enforcer({**outbound_cfg(pki, inbound.port()), "relay": relay}).start()
    async with running(outbound, inbound, backend):
        for _ in range(3):
            payload = random_bytes(10_000)
            assert sha(await exchange(outbound.port(), payload)) == sha(payload)
        records = await outbound.wait_flows(3)
    if relay == "native" or SESSION_GETTER_LEAKS:
        assert reads == []
    resumed = [r["upstream"]["resumed"] for r in records]
    warned = "upstream TLS sessions are not resumed" in caplog.text
    if relay == "native" or not SESSION_GETTER_LEAKS:
        assert resumed == [False, True, True] and not warned
    else:
        assert resumed == [False, False, False] and warned


async def test_verify_uri_is_enforced_on_a_resumed_session(pki: Any) -> None:
    backend = await Backend(mode="echo").start()
    inbound, outbound = await _pair(pki, backend)
    async with running(outbound, inbound, backend):
        payload = random_bytes(10_000)
        assert sha(await exchange(outbound.port(), payload)) == sha(payload)
        await outbound.wait_flows(1)
        up = outbound.plane.listeners[0].upstream
        assert up.client_ctx is not None and native.tracks_sessions(up.client_ctx)
        # Same context, same cached session: only what the upstream must be changes.
        wrong = UpstreamVerifyConfig(uri=("spiffe://enforcer.demo/ns/demo/sa/somebody-else",))
        up.cfg = dataclasses.replace(up.cfg, tls=dataclasses.replace(up.cfg.tls, verify=wrong))
        assert await exchange(outbound.port(), payload, reset_ok=True) == b""
        rec = (await outbound.wait_flows(2))[1]
        in_rec = (await inbound.wait_flows(2))[1]
    assert rec["close"] == "upstream_identity_mismatch"
    assert rec["upstream"]["resumed"] is True  # the session did resume, and still no entry
    assert rec["upstream"]["peer"]["spiffe_id"] == DEMO_SERVER_ID
    # the inbound saw a resumed session from the right client, but not one byte came through
    assert in_rec["tls"]["resumed"] is True and in_rec["bytes"]["from_client"] == 0
    assert [len(r) for r in backend.received] in ([len(payload)], [len(payload), 0])


@pytest.fixture
async def rotating_outbound(pki: Any, tmp_path: Path) -> AsyncIterator[Any]:
    backend = await Backend(mode="echo").start()
    inbound = await Enforcer(inbound_cfg(pki, backend.port)).start()
    mount = SecretMount(tmp_path / "client-secret")
    mount.update({"tls.crt": pki.client.cert.read_bytes(), "tls.key": pki.client.key.read_bytes(),
                  "ca.crt": pki.ca.read_bytes()})
    cfg = outbound_cfg(pki, inbound.port(), limits={"drain_timeout": "1s"})
    cfg["tls"]["mesh"] = {"dir": str(mount.path)}
    server = Server(load_config(str(write_config(tmp_path / "outbound.yaml", cfg))),
                    metrics=Metrics(), flowlog=MemoryFlowLog())
    server.reloader.interval = 3600  # rotations are polled by the test
    await server.start()
    try:
        yield server, inbound, mount
    finally:
        await server.shutdown()
        await inbound.stop()
        await backend.close()


async def test_client_certificate_rotation_under_load(rotating_outbound: Any, pki: Any,
                                                      tmp_path: Path) -> None:
    server, inbound, mount = rotating_outbound
    port = server.plane.listeners[0].local_port
    stop = asyncio.Event()
    failures: list[str] = []
    done = [0]

    async def client() -> None:
        while not stop.is_set():
            payload = os.urandom(4096)
            try:
                got = await exchange(port, payload, timeout=20)
            except Exception as exc:
                failures.append(f"{type(exc).__name__}: {exc}")
                continue
            if sha(got) != sha(payload):
                failures.append(f"echo differs ({len(got)} of {len(payload)} bytes)")
            done[0] += 1

    tasks = [asyncio.ensure_future(client()) for _ in range(20)]
    serials = []
    try:
        for i in range(3):
            start = done[0]
            async with asyncio.timeout(20):
                while done[0] < start + 40:
                    await asyncio.sleep(0.01)
            fresh = issue(pki.base, tmp_path / f"client{i}", name="client",
                          spiffe_id=DEMO_CLIENT_ID, dns=["localhost"])
            serials.append(fresh)
            mount.update({"tls.crt": fresh.cert.read_bytes(), "tls.key": fresh.key.read_bytes(),
                          "ca.crt": pki.ca.read_bytes()})
            assert server.reloader.poll() == ["tls"]
        start = done[0]
        async with asyncio.timeout(20):
            while done[0] < start + 40:
                await asyncio.sleep(0.01)
    finally:
        stop.set()
        await asyncio.gather(*tasks, return_exceptions=True)
    assert failures == [], failures[:5]
    errors = [r for r in server.flowlog.records if r["action"] != "allow"]
    assert errors == [], errors[:3]
    last_serial = inbound.flows.records[-1]["tls"]["peer"]["serial"]
    from tests.e2e.tls_util import serial_of_file

    assert int(last_serial, 16) == serial_of_file(serials[-1].cert)


async def test_an_expired_client_certificate_cannot_resume(pki: Any, tmp_path: Path) -> None:
    now = dt.datetime.now(dt.UTC)
    short = issue(pki.base, tmp_path / "short", name="short", spiffe_id=DEMO_CLIENT_ID,
                  not_before=now - dt.timedelta(minutes=1), not_after=now + dt.timedelta(seconds=3))
    backend = await Backend(mode="echo").start()
    inbound = await Enforcer(inbound_cfg(pki, backend.port)).start()
    async with running(inbound, backend):
        ctx = mtls_client(pki.ca, short.cert, short.key)
        payload = random_bytes(5_000)
        got, session, _ = await asyncio.to_thread(blocking_echo, inbound.port(), ctx, payload,
                                                  None)
        assert sha(got) == sha(payload) and session is not None
        await asyncio.sleep(max(0.0, (now + dt.timedelta(seconds=3.5)
                                      - dt.datetime.now(dt.UTC)).total_seconds()))
        # a full handshake would refuse the expired certificate; a resumed one must too
        try:
            got, _, _ = await asyncio.to_thread(blocking_echo, inbound.port(), ctx, payload,
                                                session)
        except (ssl.SSLError, ConnectionError):
            got = b""
        assert got == b""
        rec = (await inbound.wait_flows(2))[1]
        assert rec["action"] == "error" and rec["tls"]["resumed"] is True
        assert "expired" in rec["detail"]


async def test_ticket_key_rotation_ends_old_sessions_only(pki: Any) -> None:
    backend = await Backend(mode="echo").start()
    inbound, outbound = await _pair(pki, backend)
    async with running(outbound, inbound, backend):
        for i in range(4):
            if i == 2:  # what the reloader does on every hour of the wall clock
                assert rotate_ticket_keys(SimpleNamespace(plane=inbound.plane)) == 1  # type: ignore[arg-type]
            payload = random_bytes(20_000)
            assert sha(await exchange(outbound.port(), payload)) == sha(payload)
        in_recs = await inbound.wait_flows(4)
    # the session from before the rotation no longer resumes: one full handshake, then
    # the new ticket resumes again
    assert [r["tls"]["resumed"] for r in in_recs] == [False, True, False, True]
    assert all(r["action"] == "allow" for r in in_recs)


@pytest.mark.usefixtures("relay_mode")
async def test_clients_that_skip_close_notify_still_resume(pki: Any) -> None:
    """With the native extension the listener keeps sessions in a bounded cache (stateful
    tickets); a client closing without close_notify must not lose its session for it.
    With the Python relay, tickets carry the session as before."""
    from enforcer.dataplane import native
    from tests.e2e import harness

    backend = await Backend(mode="echo").start()
    inbound = await Enforcer(inbound_cfg(pki, backend.port)).start()
    async with running(inbound, backend):
        ctx = mtls_client(pki.ca, pki.client.cert, pki.client.key)
        payload = random_bytes(30_000)
        got, session, reused = await asyncio.to_thread(blocking_echo, inbound.port(), ctx,
                                                       payload, None)
        assert sha(got) == sha(payload) and session is not None and not reused
        for _ in range(3):  # each connection ends with a bare FIN from the client
            got, session, reused = await asyncio.to_thread(blocking_echo, inbound.port(),
                                                           ctx, payload, session)
            assert sha(got) == sha(payload) and reused
        records = await inbound.wait_flows(4)
        assert [r["tls"]["resumed"] for r in records] == [False, True, True, True]
        server_ctx = inbound.plane.listeners[0].server_ctx
        assert server_ctx is not None
        stats = native.session_cache_stats(server_ctx)
        if harness.RELAY == "native":
            assert stats is not None and stats[0] == native.SESSION_CACHE_SIZE
            assert 1 <= stats[1] <= 4  # one session per ticket issued
        else:
            assert stats is None


async def test_a_session_survives_a_client_that_resets_right_after_the_handshake(
        pki: Any) -> None:
    """OpenSSL drops the session of a connection freed without close_notify; enforcer marks
    connections that did not fail in TLS as shut down, so such a client resumes later.
    TLS 1.2 (session ids): in TLS 1.3 the server has moved on to the next ticket's session
    by then, so the drop would not show."""
    from enforcer.dataplane import native

    backend = await Backend(mode="echo").start()
    inbound = await Enforcer({**inbound_cfg(pki, backend.port), "relay": "native"}).start()
    async with running(inbound, backend):
        ctx = mtls_client(pki.ca, pki.client.cert, pki.client.key)
        ctx.maximum_version = ssl.TLSVersion.TLSv1_2
        payload = random_bytes(10_000)
        got, session, _ = await asyncio.to_thread(blocking_echo, inbound.port(), ctx, payload,
                                                  None)
        assert sha(got) == sha(payload) and session is not None

        def resume_then_reset() -> bool:
            raw = socket.create_connection(("127.0.0.1", inbound.port()), timeout=10)
            tls = ctx.wrap_socket(raw, server_hostname="localhost", session=session)
            reused = tls.session_reused
            tls.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            tls.close()  # RST, no close_notify
            return reused

        assert await asyncio.to_thread(resume_then_reset)
        records = await inbound.wait_flows(2)
        assert records[1]["close"] in ("client_reset", "client_closed")
        await asyncio.sleep(0.1)
        gc.collect()  # the reset connection's SSL is freed: that is when OpenSSL drops sessions
        got, _, reused = await asyncio.to_thread(blocking_echo, inbound.port(), ctx, payload,
                                                 session)
        assert sha(got) == sha(payload) and reused, "the session was dropped from the cache"
        server_ctx = inbound.plane.listeners[0].server_ctx
        assert server_ctx is not None and native.session_cache_stats(server_ctx) is not None


async def test_a_burst_of_held_connections_keeps_resuming(pki: Any,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    """The outbound resumes the newest ticket the inbound gave it, not the ticket of the
    last connection that ended: connections that all stay open keep resuming even once the
    inbound's bounded session cache has forgotten the first ones' sessions."""
    from enforcer.dataplane import native

    monkeypatch.setattr(native, "SESSION_CACHE_SIZE", 3)  # read when a context is built
    backend = await Backend(mode="echo").start()
    inbound = await Enforcer({**inbound_cfg(pki, backend.port), "relay": "native"}).start()
    outbound = await Enforcer({**outbound_cfg(pki, inbound.port()), "relay": "native"}).start()
    held: list[asyncio.StreamWriter] = []
    async with running(outbound, inbound, backend):
        try:
            for _ in range(12):  # one after the other, each answered before the next opens
                reader, writer = await asyncio.open_connection("127.0.0.1", outbound.port())
                held.append(writer)
                payload = random_bytes(5_000)
                writer.write(payload)
                got = await asyncio.wait_for(reader.readexactly(len(payload)), 20)
                assert sha(got) == sha(payload)
        finally:
            for writer in held:
                writer.close()
        out_recs = await outbound.wait_flows(12)
        in_recs = await inbound.wait_flows(12)
    assert [r["upstream"]["resumed"] for r in out_recs].count(True) == 11
    assert [r["tls"]["resumed"] for r in in_recs].count(True) == 11
    assert all(r["bytes"]["from_client"] == r["bytes"]["to_client"] == 5_000 for r in out_recs)
