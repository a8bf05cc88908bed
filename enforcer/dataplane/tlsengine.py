"""A TLS engine over two memory BIOs: ciphertext in, plaintext out, and back.

Why not asyncio's SSL transport: it cannot half-close (``write_eof`` raises) and it tears
the whole connection down when the peer sends close_notify, so a relay built on it loses
the response whenever a client half-closes. ``ssl.SSLObject`` over ``MemoryBIO``s does
half-close properly (see DESIGN.md), and because the engine only sees bytes we hand it, a
listener can read a PROXY header and peek at the first bytes before any handshake, all
on one raw TCP transport.

How it is driven (by ``dataplane.connection``):
- ``feed(ciphertext)`` puts received bytes into the incoming BIO;
- ``handshake()`` advances the handshake; True once done (raises ``ssl.SSLError``);
- ``read()`` returns decrypted bytes (a view of a shared buffer) and whether the peer
  finished (close_notify);
- ``write(plaintext)`` encrypts; ``take_output()`` returns the ciphertext to send;
- ``close_notify()`` sends our close_notify but keeps reading (TLS 1.3 half-close).
After every call that can produce output the caller sends ``take_output()``.
"""

from __future__ import annotations

import ssl
from typing import Any, Final

READ_CHUNK: Final = 256 * 1024

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


class TlsEngine:
    __slots__ = ("_in", "_out", "obj", "peer_closed", "we_closed")

    def __init__(
        self,
        context: ssl.SSLContext,
        *,
        server_side: bool,
        server_hostname: str | None = None,
        session: ssl.SSLSession | None = None,
    ) -> None:
        self._in = ssl.MemoryBIO()
        self._out = ssl.MemoryBIO()
        self.obj = context.wrap_bio(
            self._in, self._out, server_side=server_side, server_hostname=server_hostname,
            session=session,
        )
        self.peer_closed = False
        self.we_closed = False

    def feed(self, data: bytes) -> None:
        self._in.write(data)

    def feed_eof(self) -> None:
        """The TCP stream ended (FIN). Without close_notify this is a truncated stream."""
        if not self._in.eof:
            self._in.write_eof()

    def handshake(self) -> bool:
        try:
            self.obj.do_handshake()
        except ssl.SSLWantReadError:
            return False
        return True

    def read(self) -> tuple[memoryview | None, bool]:
        """Decrypt what is buffered, up to READ_CHUNK bytes, into the shared scratch buffer.
        Returns (view or None, eof): eof once close_notify came. Call again while a full
        buffer came back: more may be waiting."""
        buf = _scratch_buffer()
        filled = 0
        obj, incoming = self.obj, self._in
        read: Any = obj.read  # returns an int when given a buffer (typeshed says bytes)
        while not self.peer_closed and filled < READ_CHUNK:
            try:
                n: int = read(READ_CHUNK - filled, buf[filled:])
            except ssl.SSLWantReadError:
                break
            except ssl.SSLZeroReturnError:
                self.peer_closed = True
                break
            if not n:
                self.peer_closed = True
                break
            filled += n
            if not incoming.pending and not obj.pending() and not incoming.eof:
                break  # all consumed: another read would only raise SSLWantReadError
        return (buf[:filled] if filled else None), self.peer_closed

    def write(self, data: bytes | memoryview) -> None:
        view = memoryview(data)
        while view:
            n = self.obj.write(view)
            view = view[n:]

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

    @property
    def session(self) -> ssl.SSLSession | None:
        return self.obj.session

    @property
    def session_reused(self) -> bool:
        return self.obj.session_reused
