"""The TLS engine over memory BIOs: bytes both ways in any slicing, EOF, bounded BIOs."""

from __future__ import annotations

import ctypes
import ctypes.util
import gc
import hashlib
import os
import ssl
from collections.abc import Iterator

import pytest

from enforcer.dataplane.tlsengine import READ_CHUNK, TlsEngine

MiB = 1024 * 1024


def contexts(pki) -> tuple[ssl.SSLContext, ssl.SSLContext]:  # type: ignore[no-untyped-def]
    server = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server.load_cert_chain(str(pki.server.cert), str(pki.server.key))
    server.load_verify_locations(str(pki.ca))
    server.verify_mode = ssl.CERT_REQUIRED
    client = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    client.load_cert_chain(str(pki.client.cert), str(pki.client.key))
    client.load_verify_locations(str(pki.ca))
    return server, client


def handshake(server: TlsEngine, client: TlsEngine) -> None:
    for _ in range(10):
        done_c = client.handshake()
        server.feed(client.take_output())
        done_s = server.handshake()
        client.feed(server.take_output())
        if done_c and done_s:
            return
    raise AssertionError("handshake did not finish")


def pair(pki) -> tuple[TlsEngine, TlsEngine]:  # type: ignore[no-untyped-def]
    sctx, cctx = contexts(pki)
    server = TlsEngine(sctx, server_side=True)
    client = TlsEngine(cctx, server_side=False, server_hostname="localhost")
    handshake(server, client)
    return server, client


def slices(data: bytes, sizes: list[int]) -> Iterator[bytes]:
    i = k = 0
    while i < len(data):
        n = sizes[k % len(sizes)]
        yield data[i : i + n]
        i += n
        k += 1


def drain(engine: TlsEngine) -> tuple[bytes, bool]:
    """Everything decryptable now, as the relay reads it (again while buffers come back full)."""
    got = bytearray()
    while True:
        view, eof = engine.read()
        if view is not None:
            got += view
        if view is None or len(view) < READ_CHUNK:
            return bytes(got), eof


def send(src: TlsEngine, dst: TlsEngine, payload: bytes, write_sizes: list[int],
         wire_sizes: list[int]) -> bytes:
    """Encrypt payload in write_sizes pieces, deliver the ciphertext in wire_sizes pieces."""
    wire = b"".join(c for piece in slices(payload, write_sizes) for c in src.encrypt(piece))
    got = bytearray()
    for segment in slices(wire, wire_sizes):
        dst.feed(segment)
        data, eof = drain(dst)
        assert not eof
        got += data
    return bytes(got)


@pytest.mark.parametrize(("write_sizes", "wire_sizes"), [
    ([256 * 1024], [256 * 1024]),  # what the relay sees in bulk
    ([100, 70_000, 1], [1, 5, 16_645, 300_000, 17 * 1024 + 1]),  # any slicing at all
    ([3 * MiB], [64 * 1024]),  # one write much larger than a read
])
def test_bytes_arrive_intact_both_ways(pki, write_sizes, wire_sizes) -> None:  # type: ignore[no-untyped-def]
    server, client = pair(pki)
    up, down = os.urandom(3 * MiB + 11), os.urandom(2 * MiB + 5)
    got_up = send(client, server, up, write_sizes, wire_sizes)
    got_down = send(server, client, down, write_sizes, wire_sizes)
    assert hashlib.sha256(got_up).hexdigest() == hashlib.sha256(up).hexdigest()
    assert hashlib.sha256(got_down).hexdigest() == hashlib.sha256(down).hexdigest()


def test_close_notify_after_a_burst_ends_the_stream_after_all_data(pki) -> None:  # type: ignore[no-untyped-def]
    server, client = pair(pki)
    payload = os.urandom(MiB)
    wire = b"".join(client.encrypt(payload))
    client.close_notify()
    server.feed(wire + client.take_output())  # data and close_notify in one read
    got = bytearray()
    eof = False
    while not eof:
        view, eof = server.read()
        assert view is not None or eof
        if view is not None:
            got += view
    assert hashlib.sha256(got).digest() == hashlib.sha256(payload).digest()
    # half-close: the server can still answer after the client's close_notify
    reply = os.urandom(50_000)
    client.feed(b"".join(server.encrypt(reply)))
    assert drain(client) == (reply, False)


def test_fin_without_close_notify_delivers_the_data_then_reports_truncation(pki) -> None:  # type: ignore[no-untyped-def]
    server, client = pair(pki)
    payload = os.urandom(MiB)
    server.feed(b"".join(client.encrypt(payload)))
    server.feed_eof()
    got = bytearray()
    with pytest.raises(ssl.SSLEOFError):
        while True:
            view, _ = server.read()
            if view is not None:
                got += view
    assert hashlib.sha256(got).digest() == hashlib.sha256(payload).digest()


def _malloc_in_use() -> int:
    class MallInfo2(ctypes.Structure):
        _fields_ = [(name, ctypes.c_size_t) for name in (
            "arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks",
            "uordblks", "fordblks", "keepcost")]

    libc = ctypes.CDLL(ctypes.util.find_library("c"))
    libc.mallinfo2.restype = MallInfo2
    info = libc.mallinfo2()
    return int(info.uordblks + info.hblkhd)


def test_connections_that_moved_bursts_do_not_keep_burst_sized_buffers(pki) -> None:  # type: ignore[no-untyped-def]
    """A memory BIO keeps the largest buffer it ever grew to; the engine feeds and
    encrypts in record-sized slices so an idle connection stays small after a burst."""
    try:
        _malloc_in_use()
    except (AttributeError, OSError, TypeError):
        pytest.skip("needs glibc's mallinfo2")
    payload = os.urandom(MiB)
    held = [pair(pki) for _ in range(2)]  # warm-up: OpenSSL's one-time allocations
    gc.collect()
    before = _malloc_in_use()
    for _ in range(30):
        server, client = pair(pki)
        for src, dst in ((client, server), (server, client)):
            got = send(src, dst, payload, [256 * 1024], [256 * 1024])
            assert hashlib.sha256(got).digest() == hashlib.sha256(payload).digest()
        held.append((server, client))
    gc.collect()
    per_pair = (_malloc_in_use() - before) / 30
    # Two idle SSL objects (~28 KiB each in OpenSSL 3.0) and four BIOs (< 23 KiB each);
    # with whole 256 KiB reads written into the BIOs this was over 1.4 MiB.
    assert per_pair < 300 * 1024, f"{per_pair / 1024:.0f} KiB per idle connection pair"


@pytest.mark.parametrize("native_session", [True, False])
def test_one_session_resumes_again_and_again(pki, native_session: bool) -> None:  # type: ignore[no-untyped-def]
    """Each connection resumes its own copy of the cached session (OpenSSL changes a
    session while resuming with it): natively through SSL_SESSION_dup, else CPython's."""
    sctx, cctx = contexts(pki)
    server, client = TlsEngine(sctx, server_side=True), TlsEngine(
        cctx, server_side=False, server_hostname="localhost")
    handshake(server, client)
    send(server, client, b"ticket please", [13], [4096])  # the client reads the ticket
    session = client.session
    assert session is not None and session.has_ticket and not client.session_reused
    for _ in range(4):
        server2 = TlsEngine(sctx, server_side=True)
        client2 = TlsEngine(cctx, server_side=False, server_hostname="localhost",
                            session=session, native_session=native_session)
        handshake(server2, client2)
        assert client2.session_reused and server2.session_reused
        payload = os.urandom(70_000)
        assert send(client2, server2, payload, [70_000], [17_000]) == payload


def _bounded_cache_server(pki, size: int) -> ssl.SSLContext:  # type: ignore[no-untyped-def]
    """A listener-like server context: stateful tickets in a cache of ``size`` sessions."""
    from enforcer.dataplane import native

    sctx, _ = contexts(pki)
    ext = native.module()
    if ext is None:
        pytest.skip(native.unavailable_reason())
    ext.session_cache(sctx, native._sample(sctx, server_side=True), size)
    sctx.options |= ssl.OP_NO_TICKET
    return sctx


def _connect(sctx: ssl.SSLContext, cctx: ssl.SSLContext, **client_kw) -> tuple[TlsEngine, TlsEngine]:  # type: ignore[no-untyped-def]
    server = TlsEngine(sctx, server_side=True)
    client = TlsEngine(cctx, server_side=False, server_hostname="localhost", **client_kw)
    handshake(server, client)
    payload = os.urandom(3000)  # the client reads the server's ticket with this reply
    assert send(server, client, payload, [3000], [4096]) == payload
    return server, client


def test_a_tracked_client_context_resumes_its_newest_session(pki) -> None:  # type: ignore[no-untyped-def]
    """Connections that stay open each resume the newest session: with a server cache of two
    sessions, the first session is long forgotten by the tenth connection."""
    from enforcer.dataplane import native

    sctx = _bounded_cache_server(pki, 2)
    _, cctx = contexts(pki)
    assert native.track_sessions(cctx)
    held = [_connect(sctx, cctx, native_session=True)]
    first = held[0][1].session
    assert not held[0][1].session_reused and first is not None
    for _ in range(9):
        server, client = _connect(sctx, cctx, native_session=True)
        assert client.session_reused and server.session_reused
        held.append((server, client))
    # what taking the session of the first connection would have done
    stale = TlsEngine(cctx, server_side=False, server_hostname="localhost")
    stale.obj.session = first
    server = TlsEngine(sctx, server_side=True)
    handshake(server, stale)
    assert not stale.session_reused


def test_an_untracked_or_new_context_has_no_session_to_resume(pki) -> None:  # type: ignore[no-untyped-def]
    from enforcer.dataplane import native

    sctx = _bounded_cache_server(pki, 8)
    _, untracked = contexts(pki)
    _connect(sctx, untracked)
    client = TlsEngine(untracked, server_side=False, server_hostname="localhost")
    assert native.resume_latest(client.state) is False
    _, tracked = contexts(pki)
    assert native.track_sessions(tracked) and native.track_sessions(tracked)  # idempotent
    client = TlsEngine(tracked, server_side=False, server_hostname="localhost")
    assert native.resume_latest(client.state) is False  # none came yet
    held = _connect(sctx, tracked)  # (a server frees the session of a dropped connection)
    _, reloaded = contexts(pki)  # a reload: a new context starts without a session
    assert native.track_sessions(reloaded)
    client = TlsEngine(reloaded, server_side=False, server_hostname="localhost")
    assert native.resume_latest(client.state) is False
    server, client = _connect(sctx, tracked, native_session=True)
    assert client.session_reused and server.session_reused and held[1].session is not None
    swapped = (client.state[0], client.state[2], client.state[1])
    assert native.resume_latest(swapped) is False  # not the layout the extension checks


def test_the_native_session_copy_refuses_what_is_not_a_session(pki) -> None:  # type: ignore[no-untyped-def]
    from enforcer.dataplane import native

    _, cctx = contexts(pki)
    client = TlsEngine(cctx, server_side=False, server_hostname="localhost")
    assert native.set_session(client.state, "not a session") is False  # type: ignore[arg-type]
    swapped = (client.state[0], client.state[2], client.state[1])  # BIOs the wrong way round
    other = TlsEngine(cctx, server_side=False, server_hostname="localhost")
    assert native.set_session(swapped, other.obj.session or _a_session(pki)) is False


def _a_session(pki) -> ssl.SSLSession:  # type: ignore[no-untyped-def]
    sctx, cctx = contexts(pki)
    server, client = TlsEngine(sctx, server_side=True), TlsEngine(
        cctx, server_side=False, server_hostname="localhost")
    handshake(server, client)
    send(server, client, b"t", [1], [4096])
    assert client.session is not None
    return client.session
