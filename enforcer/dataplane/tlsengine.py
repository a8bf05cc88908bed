"""A TLS engine over two memory BIOs: ciphertext in, plaintext out, and back.

Why not asyncio's SSL transport: it cannot half-close (``write_eof`` raises) and it tears
the whole connection down when the peer sends close_notify, so a relay built on it loses
the response whenever a client half-closes. ``ssl.SSLObject`` over ``MemoryBIO``s does
half-close properly (see docs/design.md), and because the engine only sees bytes we hand it, a
listener can read a PROXY header and peek at the first bytes before any handshake, all
on one raw TCP transport.

How it is driven (by ``dataplane.connection``):
- ``feed(ciphertext)`` queues received bytes for the incoming BIO;
- ``handshake()`` advances the handshake; True once done (raises ``ssl.SSLError``);
- ``read()`` returns decrypted bytes (a view of a shared buffer) and whether the peer
  finished (close_notify);
- ``encrypt(plaintext)`` returns the ciphertext to send, as a list of chunks;
- ``close_notify()`` sends our close_notify but keeps reading (TLS 1.3 half-close).
After every other call that can produce output (handshake, read, close_notify) the caller
sends ``take_output()``.

Bounded memory: a memory BIO never gives back the buffer it grew to (OpenSSL's BUF_MEM
keeps its peak), so writing a 256 KiB read into one would leave ~350 KiB behind on every
connection that ever moved a burst, idle or not. Ciphertext therefore enters the incoming
BIO at most ``BIO_SLICE`` (one full TLS record) at a time, just ahead of ``SSL_read``, and
plaintext is encrypted ``WRITE_SLICE`` at a time, each slice's output taken at once: each
BIO stays below ~23 KiB for the life of the connection, at the cost of a few more calls
per burst (the records are the same; the kernel still gets one ``writev``).
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import ssl
import struct
import sys
from collections import deque
from typing import Any, Final

from enforcer.dataplane import native
from enforcer.tlsconf import groups

READ_CHUNK: Final = 256 * 1024
BIO_SLICE: Final = 17 * 1024  # > the largest TLS record (16 KiB + 256 + 5 header)
WRITE_SLICE: Final = 16 * 1024  # one full TLS record of plaintext

# Decrypted data is read into one shared scratch buffer (the loop is single-threaded and
# every read is forwarded at once), many TLS records per read, so a 256 KiB burst costs one
# buffer and one send() instead of sixteen 16 KiB objects and sends. If whoever consumed a
# view kept a reference (a transport that could not send it all at once keeps the view),
# ``scratch_taken()`` drops the buffer and the next read starts a new one.
_scratch: bytearray | None = None


def scratch_taken() -> None:
    global _scratch
    _scratch = None


def _scratch_buffer() -> memoryview:
    global _scratch
    if _scratch is None:
        _scratch = bytearray(READ_CHUNK)
    return memoryview(_scratch)


_LINGER_ZERO: Final = struct.pack("ii", 1, 0)


def reset_on_close(transport: asyncio.BaseTransport) -> None:
    """Make closing the transport's socket send an RST (SO_LINGER 0): an abortive close,
    for a TLS stream that ended uncleanly (see ``Connection._unclean_eof``)."""
    sock = transport.get_extra_info("socket")
    if sock is not None:
        with contextlib.suppress(OSError):  # already gone
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _LINGER_ZERO)


def unclean_detail(who: str, kind: str) -> str:
    """The flow record's detail for a TLS stream that ended without close_notify."""
    if kind == "truncated":
        return f"the {who}'s TLS stream ended in the middle of a record (truncated)"
    return f"the {who} closed without TLS close_notify"


# Reading SSLObject.session leaks a copy of the session (with its certificate) every time
# on CPython 3.10 to 3.12.7 and 3.13.0 (gh-116810, fixed in 3.12.8 and 3.13.1).
SESSION_GETTER_LEAKS: Final = ((3, 10) <= sys.version_info < (3, 12, 8)
                               or (3, 13) <= sys.version_info < (3, 13, 1))


class TlsEngine:
    __slots__ = ("_backlog", "_context", "_eof_queued", "_group", "_header", "_in", "_out",
                 "_record_left", "_reused", "obj", "peer_closed", "we_closed")

    def __init__(
        self,
        context: ssl.SSLContext,
        *,
        server_side: bool,
        server_hostname: str | None = None,
        session: ssl.SSLSession | None = None,
        native_session: bool = False,
        track_records: bool = False,
    ) -> None:
        self._in = ssl.MemoryBIO()
        self._out = ssl.MemoryBIO()
        self.obj = context.wrap_bio(
            self._in, self._out, server_side=server_side, server_hostname=server_hostname)
        self._context = context
        self._reused: bool | None = None  # set once detached (see detach)
        self._group: str | None = ""  # the negotiated group once read ("": not yet)
        if track_records:
            native.track_records(self.state)  # a pump may take the records over later
        if native_session and native.resume_latest(self.state):
            pass  # the newest session of a tracked context (see native.py)
        elif session is not None and not (native_session and native.set_session(self.state,
                                                                                 session)):
            self.obj.session = session  # CPython's copy: an encode and a decode
        # ciphertext not yet in the BIO; a deque only while there is some (an empty one is
        # ~600 bytes, on every idle connection)
        self._backlog: deque[memoryview] | None = None
        self._eof_queued = False
        self._record_left = 0  # bytes of the current record's body not fed yet
        self._header = b""  # a record header fed in part
        self.peer_closed = False
        self.we_closed = False

    # -- ciphertext in ---------------------------------------------------------------------
    def feed(self, data: bytes) -> None:
        self._follow_records(data)
        incoming = self._in
        if not self._backlog and len(data) <= BIO_SLICE - incoming.pending:
            incoming.write(data)  # the common case: a small read, straight in
        else:
            if self._backlog is None:
                self._backlog = deque()
            self._backlog.append(memoryview(data))
            self._fill()

    def _follow_records(self, data: bytes) -> None:
        """Follow the TLS record boundaries (5-byte headers, plaintext) of what is fed, so
        that a FIN in the middle of a record is known as a truncation (``mid_record``)."""
        left, header, size, at = self._record_left, self._header, len(data), 0
        while at < size:
            if left:
                step = min(left, size - at)
                left -= step
                at += step
                continue
            take = data[at : at + 5 - len(header)]
            header += take
            at += len(take)
            if len(header) == 5:
                left, header = (header[3] << 8) | header[4], b""
        self._record_left, self._header = left, header

    def mid_record(self) -> bool:
        """Whether the ciphertext fed so far ends inside a record."""
        return bool(self._record_left or self._header)

    def feed_eof(self) -> None:
        """The TCP stream ended (FIN). Without close_notify this is a truncated stream."""
        self._eof_queued = True
        self._fill()

    def _fill(self) -> bool:
        """Top the incoming BIO up to BIO_SLICE from the backlog; True if anything moved."""
        incoming, backlog = self._in, self._backlog
        moved = False
        while backlog:
            room = BIO_SLICE - incoming.pending
            if room <= 0:
                break
            head = backlog[0]
            if len(head) <= room:
                incoming.write(head)
                backlog.popleft()
            else:
                incoming.write(head[:room])
                backlog[0] = head[room:]
            moved = True
        if backlog is not None and not backlog:
            self._backlog = None  # drained: let the deque go
        if not backlog and self._eof_queued and not incoming.eof:
            incoming.write_eof()
        return moved

    def handshake(self) -> bool:
        while True:
            try:
                self.obj.do_handshake()
            except ssl.SSLWantReadError:
                if self._fill():
                    continue  # the handshake needs more of what is already queued
                return False
            return True

    def read(self) -> tuple[memoryview | None, bool]:
        """Decrypt what is queued, up to READ_CHUNK bytes, into the shared scratch buffer.
        Returns (view or None, eof): eof once close_notify came. Call again while a full
        buffer came back: more may be waiting."""
        buf = _scratch_buffer()
        filled = 0
        obj, incoming, backlog = self.obj, self._in, self._backlog
        read: Any = obj.read  # returns an int when given a buffer (typeshed says bytes)
        while not self.peer_closed and filled < READ_CHUNK:
            try:
                n: int = read(READ_CHUNK - filled, buf[filled:])
            except ssl.SSLWantReadError:
                if self._fill():
                    continue
                break
            except ssl.SSLZeroReturnError:
                self.peer_closed = True
                break
            if not n:
                self.peer_closed = True
                break
            filled += n
            if backlog:
                self._fill()
            elif not incoming.pending and not obj.pending() and not incoming.eof:
                break  # all consumed: another read would only raise SSLWantReadError
        return (buf[:filled] if filled else None), self.peer_closed

    # -- plaintext in, ciphertext out -------------------------------------------------------
    def encrypt(self, data: bytes | memoryview) -> list[bytes]:
        """Encrypt ``data``; the ciphertext to send (after any output already pending)."""
        obj, out = self.obj, self._out
        if len(data) <= WRITE_SLICE:
            obj.write(data)  # a memory BIO takes everything: no partial writes
            return [out.read()]
        view = memoryview(data)
        chunks = []
        for i in range(0, len(view), WRITE_SLICE):
            obj.write(view[i : i + WRITE_SLICE])
            chunks.append(out.read())
        return chunks

    def take_output(self) -> bytes:
        out = self._out
        return out.read() if out.pending else b""

    @property
    def has_output(self) -> bool:
        return self._out.pending > 0

    def close_notify(self) -> None:
        """Send our close_notify (half-close); reading continues until the peer finishes."""
        if self.we_closed:
            return
        self.we_closed = True
        try:
            self.obj.unwrap()
        except (ssl.SSLWantReadError, ssl.SSLZeroReturnError):
            pass
        except ssl.SSLError:
            pass  # the connection is failing anyway; the caller closes the socket

    @property
    def state(self) -> tuple[ssl.SSLObject, ssl.MemoryBIO, ssl.MemoryBIO]:
        """The SSLObject with its two BIOs, as the native extension takes them."""
        return self.obj, self._in, self._out

    def hand_over(self) -> tuple[ssl.SSLObject, ssl.MemoryBIO, ssl.MemoryBIO] | None:
        """The TLS state for the native pump, with every queued byte moved into the incoming
        BIO; None once an end of stream was seen (the Python relay finishes those)."""
        if self._eof_queued or self.peer_closed or self.we_closed or self._out.pending:
            return None
        while self._backlog:
            self._in.write(self._backlog.popleft())
        self._backlog = None
        return self.state

    def detach(self) -> None:
        """The native pump has the TLS state now (``hand_over``): let go of the SSLObject
        and its BIOs, so that the SSL object is freed as soon as the pump lets go of it too
        (it does once it protects the records itself). What is asked of the engine
        afterwards (``session_reused``, ``context``) was kept; anything else is an error."""
        self.group()  # kept for the flow record: the SSL may be gone by then
        self._reused = self.obj.session_reused
        del self.obj, self._in, self._out

    @property
    def detached(self) -> bool:
        return self._reused is not None

    @property
    def context(self) -> ssl.SSLContext:
        return self._context

    # -- facts after the handshake -------------------------------------------------------
    def peer_cert_der(self) -> bytes | None:
        return self.obj.getpeercert(binary_form=True)

    def version(self) -> str | None:
        return self.obj.version()

    def cipher(self) -> str | None:
        c = self.obj.cipher()
        return c[0] if c else None

    def alpn(self) -> str | None:
        return self.obj.selected_alpn_protocol()

    def group(self) -> str | None:
        """The key-exchange group the handshake negotiated (``x25519``, ``secp256r1``,
        ``X25519MLKEM768`` ...), read once the handshake is done and then kept; None before
        that, or when it cannot be read (see ``tlsconf.groups``)."""
        found = self._group
        if found == "":  # not read yet
            if self.detached or self.obj.version() is None:  # no finished handshake
                return None
            found = self._group = _negotiated_group(self.state)
        return found

    @property
    def session(self) -> ssl.SSLSession | None:
        return self.obj.session

    @property
    def session_reused(self) -> bool:
        if self._reused is not None:
            return self._reused
        return self.obj.session_reused


def _negotiated_group(state: native.Triple) -> str | None:
    """The extension's reading when it is bound (a C call), else ``tlsconf.groups``' (the
    same public OpenSSL calls through ctypes, about 15,000 instructions more)."""
    if native.bound():
        try:
            return native.negotiated_group(state)
        except RuntimeError:
            pass  # refused (counted and logged by native): the ctypes path decides
    return groups.negotiated(state)
