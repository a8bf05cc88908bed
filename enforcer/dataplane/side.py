"""One socket of a proxied connection: its ``RawTransport`` (the only transport a
connection's sockets have: see ``rawtransport.py``) plus, when TLS, a ``TlsEngine``.

A ``Side`` is the asyncio Protocol for that socket. It owns no policy: every event goes
to its ``Connection`` (the state machine), which decides what the bytes mean. What it
does own is how to send: plaintext through the TLS engine when there is one, and
half-close (close_notify then FIN for TLS; FIN for plain TCP).

Reading is paused for named reasons (bit flags) so that back-pressure from the other
side and the bounded pre-relay buffer never resume each other by mistake.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import struct
from typing import TYPE_CHECKING, Final, cast

from enforcer.dataplane.tlsengine import TlsEngine

if TYPE_CHECKING:
    from enforcer.dataplane.connection import Connection
    from enforcer.dataplane.rawtransport import RawTransport

PAUSE_BACKPRESSURE: Final = 1  # the other side's write buffer is above its high-water mark
PAUSE_BUFFER: Final = 2  # pre-relay buffer full (upstream not connected yet)

WRITE_HIGH_WATER: Final = 512 * 1024
WRITE_LOW_WATER: Final = 128 * 1024
LINGER_ZERO: Final = struct.pack("ii", 1, 0)  # struct linger {l_onoff = 1, l_linger = 0}


class Side(asyncio.Protocol):
    __slots__ = ("conn", "eof_in", "eof_out", "is_client", "lost", "pause_flags", "tls",
                 "transport")

    def __init__(self, conn: Connection, *, is_client: bool) -> None:
        self.conn = conn
        self.is_client = is_client
        self.transport: RawTransport | None = None
        self.tls: TlsEngine | None = None
        self.eof_in = False  # the peer finished sending (FIN or close_notify)
        self.eof_out = False  # we finished sending to the peer
        self.lost = False
        self.pause_flags = 0

    # -- asyncio.Protocol ------------------------------------------------------------------
    # Every callback is guarded: a bug must close this connection (fail closed), never
    # leave it hanging or reach the event loop's exception handler.
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast("RawTransport", transport)
        try:
            self.transport.set_write_buffer_limits(WRITE_HIGH_WATER, WRITE_LOW_WATER)
            self.conn.side_connected(self)
        except Exception as exc:
            self.conn.internal_error(exc)

    def data_received(self, data: bytes) -> None:
        try:
            self.conn.side_data(self, data)
        except Exception as exc:
            self.conn.internal_error(exc)

    def eof_received(self) -> bool:
        try:
            self.conn.side_eof(self)
        except Exception as exc:
            self.conn.internal_error(exc)
        return True  # keep the socket open: the other direction may still flow

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost = True
        conn = self.conn
        try:
            conn.side_lost(self, exc)
        except Exception as err:
            conn.internal_error(err)
        # The socket is gone: drop the protocol <-> transport cycle, and the connection's
        # once both of its sockets are gone, so that everything (the OpenSSL state too) is
        # freed now by reference counting instead of at the next garbage collection.
        self.transport = None
        conn.release_if_done()

    def pause_writing(self) -> None:
        self._write_paused(True)

    def resume_writing(self) -> None:
        self._write_paused(False)

    def _write_paused(self, paused: bool) -> None:  # (per buffer threshold, not per read)
        try:
            self.conn.side_write_paused(self, paused)
        except Exception as exc:
            self.conn.internal_error(exc)

    # -- sending -------------------------------------------------------------------------
    def send(self, data: bytes | memoryview) -> None:
        transport = self.transport
        if transport is None or self.eof_out or transport.is_closing():
            return
        tls = self.tls
        if tls is None:
            transport.write(data)  # (it copies what it keeps of a view: rawtransport.py)
        else:
            chunks = tls.encrypt(data)
            if len(chunks) == 1:
                transport.write(chunks[0])
            else:
                transport.writelines(chunks)  # one writev

    def flush_tls(self) -> None:
        tls, transport = self.tls, self.transport
        if (tls is not None and transport is not None and tls.has_output
                and not transport.is_closing()):
            transport.write(tls.take_output())

    def send_eof(self) -> None:
        """Half-close towards this peer: close_notify (TLS) and FIN; reading continues."""
        transport = self.transport
        if self.eof_out or transport is None or transport.is_closing():
            self.eof_out = True
            return
        self.eof_out = True
        if self.tls is not None:
            self.tls.close_notify()
            self.flush_tls()
        if transport.can_write_eof():
            transport.write_eof()

    # -- reading control -----------------------------------------------------------------
    def pause(self, reason: int) -> None:
        was = self.pause_flags
        self.pause_flags |= reason
        if not was and self.transport is not None and not self.transport.is_closing():
            self.transport.pause_reading()

    def resume(self, reason: int) -> None:
        if not self.pause_flags & reason:
            return
        self.pause_flags &= ~reason
        if not self.pause_flags and self.transport is not None and not self.transport.is_closing():
            self.transport.resume_reading()

    def release(self) -> None:
        """Forget the connection (see ``Connection.release_if_done``): no callback follows."""
        del self.conn

    # -- closing ---------------------------------------------------------------------------
    def close(self, *, abort: bool = False, reset: bool = False) -> None:
        """Close: gracefully (pending bytes first), aborted (at once, FIN), or reset (at
        once, RST: ``SO_LINGER`` 0 makes the kernel's close send a reset)."""
        transport = self.transport
        if transport is None or self.lost:
            return
        if reset:
            set_linger_zero(transport.get_extra_info("socket"))
        if abort or reset:
            transport.abort()
        else:
            if self.tls is not None and not self.tls.detached:
                self.tls.close_notify()  # a deliberate end is a clean one (no-op after an alert)
            self.flush_tls()
            transport.close()



def set_linger_zero(sock: socket.socket | None) -> None:
    """Make the next close() of ``sock`` send a reset (RST) instead of a FIN."""
    if sock is None:
        return
    # an error (the peer reset first) leaves a plain close: all that is left to do
    with contextlib.suppress(OSError):
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, LINGER_ZERO)
