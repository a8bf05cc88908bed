"""The one transport of every connection before the relay, and the rule of the hand-over.

Every socket of every connection is a ``RawTransport`` from the moment it exists: the
client's, accepted by ``acceptor.py``; the upstream's, connected here (``connect()``: an IP
address or a unix socket at once, a host name's addresses one attempt each after
``dialer.py`` resolved it). It carries the pre-relay phase (PROXY header, TLS detection,
the handshakes, the bytes held until the relay starts) and, when the connection is not
handed over, the Python relay after it. There is no other transport: no uvloop transport,
no ``dup`` of a socket.

A transport asks a *watch* to call it back when its socket is ready: on a plane that
relays with the native pump (``plane.native_relay``), an entry in the pumps' own epoll set
(``_pump.Poller.watch``), so that ready sockets of many connections come back from one
``epoll_wait`` in one call from the loop, and the pump later takes the entry over with the
descriptor (``loop.add_reader``/``add_writer`` cost uvloop a poll handle, an ``ioctl`` and
an add/delete probe per registration, more than the transport; measured); on a plane
without it (``relay: python``, or the extension unavailable: no native code runs), a
``loopwatch.LoopWatch`` over those loop calls, with the same interface.

The hand-over rule (``Connection._start_relay``, ``pump.hand_over``). When the lifecycle
core starts the relay, the held bytes go first, on these transports: the client's to the
upstream, a speaking-first upstream's to the client, the upstream handshake's last flight,
and application data that came with a Finished is read. Then the connection leaves this
transport for the native pump only if all of these hold at that moment:

1. the plane relays with the native pump (``relay: auto`` with the extension, or
   ``native``);
2. the core allowed it (``start_relay`` with ``native_ok``: no end of stream was held
   before the relay started) and the connection is still in RELAY;
3. both transports are clean: not closing, no end of stream seen or sent on either side,
   reading not paused for any reason, nothing in their write buffers;
4. each TLS side can give its state away (``TlsEngine.hand_over``: no end of stream
   queued, nothing left to send) and the extension accepts it.

Then ``release(keep_entry=True)`` gives each descriptor and its epoll entry to the pump
(no ``dup``, no ``close``): nothing more comes from these transports. Otherwise (or if the
pump refuses) nothing changed and the connection stays on these transports, relayed by
the Python relay (``Side``/``Connection``), until it closes; it is never handed over later.

How it works:
- ``connect()`` makes a non-blocking socket, starts the connect and watches it for
  writability (unless ``getpeername()`` shows it connected already, as loopback connects
  are, when the next loop turn stands in for that wait); then ``SO_ERROR`` says how the
  connect ended and ``done(transport, None)`` or ``done(None, OSError)`` is called (the
  socket is closed on failure). ``Connecting.cancel()`` (connect timeout, the client
  left, a lost race of dialer.py) closes it silently.
- ``RawTransport`` is the part of ``asyncio.Transport`` that ``Side`` and ``Connection``
  use, with the callback order of asyncio's own socket transports: ``connection_made``
  (from ``start()``), ``data_received``/``eof_received`` when readable,
  ``pause_writing``/``resume_writing`` around the write-buffer marks, and
  ``connection_lost`` exactly once, scheduled with ``call_soon`` after the socket closed.
  Writes go straight to ``send()``; what the kernel does not take is copied to a buffer
  sent when the socket is writable.
- ``release()`` gives the descriptor to the pump: it leaves the epoll set (or, with
  ``keep_entry``, leaves its entry to the pump) and the socket object lets go of it
  without closing it.
"""

from __future__ import annotations

import asyncio
import errno
import os
import socket
from collections.abc import Callable
from typing import Any, Final

from enforcer.config.model import Address

# Reads below glibc's mmap threshold (128 KiB): a 256 KiB recv() costs an mmap, an mremap
# and an munmap per call. The handshake reads a few KiB; the rare Python relay over this
# transport on a pumped plane just makes more calls. A loop-watched transport (no native
# pump: it carries every relay of its plane) reads as much as uvloop's transports did
# (its watch's ``read_size``): fewer, larger reads cost less than the extra syscalls.
READ_CHUNK: Final = 64 * 1024
DEFAULT_HIGH_WATER: Final = 64 * 1024
DEFAULT_LOW_WATER: Final = 16 * 1024

Target = tuple[int, Any]  # (address family, address for socket.connect)
Done = Callable[["RawTransport | None", "OSError | None"], None]


def target_of(address: Address) -> Target | None:
    """(family, sockaddr) for an upstream that needs no name resolution, else None."""
    if address.path is not None:
        return socket.AF_UNIX, address.path
    host = address.host
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    try:  # inet_pton, not ipaddress: a transparent listener parses every original destination
        socket.inet_pton(family, host)
    except (OSError, ValueError):  # a host name, for the resolver
        return None
    if family == socket.AF_INET:
        return family, (host, address.port)
    return family, (host, address.port, 0, 0)


class Connecting:
    """A connect in progress (see the module comment)."""

    __slots__ = ("_done", "_loop", "_sock", "_watch")

    def __init__(self, loop: asyncio.AbstractEventLoop, sock: socket.socket, watch: Any,
                 done: Done) -> None:
        self._loop = loop
        self._sock: socket.socket | None = sock
        self._watch = watch
        self._done = done

    def _ready(self, readable: bool, writable: bool) -> None:
        sock = self._sock
        if sock is None:
            return
        self._sock = None
        err = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
        if err:
            self._watch.close()
            sock.close()
            self._done(None, OSError(err, os.strerror(err)))
            return
        transport = RawTransport(self._loop, sock, self._watch)
        self._done(transport, None)

    def cancel(self) -> None:
        sock = self._sock
        if sock is not None:
            self._sock = None
            self._watch.close()
            sock.close()


def connect(loop: asyncio.AbstractEventLoop, poller: Any, target: Target,
            done: Done, options: tuple[tuple[int, int, int], ...] = ()) -> Connecting | None:
    """Start connecting to ``target``, watched by ``poller`` (``_pump.Poller`` or
    ``loopwatch.LoopPoller``). A connect that fails at once
    calls ``done`` with the error before returning None; otherwise ``done`` is called when
    the socket is ready. ``options``: setsockopt triples for a TCP socket (tcpopts.py)."""
    family, sockaddr = target
    try:
        sock = socket.socket(family, socket.SOCK_STREAM | socket.SOCK_NONBLOCK)
    except OSError as exc:  # EMFILE/ENFILE (out of descriptors), ENOBUFS, ENOMEM
        done(None, exc)
        return None
    try:
        if family != socket.AF_UNIX:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            for level, name, value in options:
                sock.setsockopt(level, name, value)
        err = sock.connect_ex(sockaddr)
    except OSError as exc:
        sock.close()
        done(None, exc)
        return None
    # TCP: EINPROGRESS. A unix socket connects at once or fails; its EAGAIN (the
    # listener's backlog is full) does not leave a connect in progress: a failure.
    if err not in (0, errno.EINPROGRESS):
        sock.close()
        done(None, OSError(err, os.strerror(err)))
        return None
    pending = Connecting(loop, sock, None, done)
    watch = poller.watch(sock.fileno(), pending._ready)
    pending._watch = watch
    if err == 0 or _connected(sock):
        # Connected within connect(): a loopback peer (the sidecar's own app, a local
        # inbound) or a unix socket. No writability wait, no epoll entry yet; done()
        # still comes from the loop, never from inside the caller.
        loop.call_soon(pending._ready, False, True)
        return pending
    try:
        watch.set(False, True)
    except OSError as exc:
        pending._sock = None
        watch.close()
        sock.close()
        done(None, exc)
        return None
    return pending


def _connected(sock: socket.socket) -> bool:
    """Whether a connect that said EINPROGRESS has in fact completed (on loopback the
    handshake runs inside connect(); a remote peer answers later, or refuses: ENOTCONN)."""
    try:
        sock.getpeername()
    except OSError:
        return False
    return True


class RawTransport:
    """A socket transport for ``Side`` (see the module comment)."""

    __slots__ = ("_buffer", "_closing", "_eof_wanted", "_fd", "_gone", "_high", "_loop",
                 "_low", "_peername", "_protocol", "_read_eof", "_read_paused", "_read_size",
                 "_reading", "_sock", "_sockname", "_started", "_watch", "_write_paused",
                 "_writing")

    def __init__(self, loop: asyncio.AbstractEventLoop, sock: socket.socket, watch: Any, *,
                 peername: Any = None, sockname: Any = None) -> None:
        self._loop = loop
        self._sock = sock
        # known from accept() and the listener: no getpeername()/getsockname() needed
        self._peername = peername
        self._sockname = sockname
        self._watch = watch  # _pump.Watch (the pumps' epoll set) or loopwatch.LoopWatch
        watch.set_callback(self._ready)
        self._read_size: int = getattr(watch, "read_size", READ_CHUNK)
        self._fd = sock.fileno()
        self._protocol: Any = None
        self._buffer = bytearray()
        self._high, self._low = DEFAULT_HIGH_WATER, DEFAULT_LOW_WATER
        self._started = False  # start_reading() was called
        self._reading = False  # in the epoll set for reading
        self._writing = False  # in the epoll set for writing
        self._read_paused = False
        self._read_eof = False
        self._write_paused = False  # protocol told to pause writing
        self._eof_wanted = False
        self._closing = False
        self._gone = False  # socket closed or released: no more callbacks

    def start(self, protocol: asyncio.BaseProtocol) -> None:
        """``connection_made``; reading waits for ``start_reading()``, so that a socket
        handed to the pump at once is never registered with the loop."""
        self._protocol = protocol
        protocol.connection_made(self)  # type: ignore[arg-type]

    def start_reading(self) -> None:
        """Read from now on (unless paused, closed or released). Also replaces the
        connect's interest in writability with what the transport needs now."""
        if self._gone:
            return
        self._started = True
        self._reading = self._wants_to_read()
        self._watch_set()

    # -- reading ---------------------------------------------------------------------------
    def _wants_to_read(self) -> bool:
        return self._started and not (self._gone or self._closing or self._read_paused
                                      or self._read_eof)

    def _update_reader(self) -> None:
        want = self._wants_to_read()
        if want != self._reading:
            self._reading = want
            self._watch_set()

    def _watch_set(self) -> None:
        if self._watch is None:  # handed over to the pump
            return
        try:
            self._watch.set(self._reading, self._writing)
        except OSError as exc:  # the epoll set refused: the connection cannot go on
            self._reading = self._writing = False
            self._force_close(exc)

    def _ready(self, readable: bool, writable: bool) -> None:
        if writable and self._writing:
            self._writable()
        if readable and self._reading:
            self._readable()

    def read_now(self) -> None:
        """Read what has already arrived, without waiting for the poller: an accepted
        connection's first bytes (a ClientHello, a PROXY header, a request) have often
        come in with it, which saves a wake-up and a trip through the epoll set."""
        self._readable()

    def _readable(self) -> None:
        if not self._reading:
            return
        try:
            data = self._sock.recv(self._read_size)
        except (BlockingIOError, InterruptedError):
            return
        except OSError as exc:
            self._force_close(exc)
            return
        if data:
            self._protocol.data_received(data)
            return
        self._read_eof = True
        self._update_reader()
        if not self._protocol.eof_received():
            self.close()

    def pause_reading(self) -> None:
        self._read_paused = True
        self._update_reader()

    def resume_reading(self) -> None:
        self._read_paused = False
        self._update_reader()

    # -- writing ---------------------------------------------------------------------------
    def write(self, data: bytes | bytearray | memoryview) -> None:
        if self._gone or self._closing or self._eof_wanted or not data:
            return
        if not self._buffer:
            try:
                sent = self._sock.send(data)
            except (BlockingIOError, InterruptedError):
                sent = 0
            except OSError as exc:
                self._force_close(exc)
                return
            if sent == len(data):
                return
            data = memoryview(data)[sent:]
            self._writing = True
            self._watch_set()
            if self._gone:  # the epoll set refused the socket: closed
                return
        self._buffer += data  # a copy: the caller may reuse its buffer
        if not self._write_paused and len(self._buffer) > self._high:
            self._write_paused = True
            self._protocol.pause_writing()

    def writelines(self, chunks: list[bytes]) -> None:
        self.write(b"".join(chunks))

    def _writable(self) -> None:
        if self._gone:
            return
        try:
            sent = self._sock.send(self._buffer)
        except (BlockingIOError, InterruptedError):
            return
        except OSError as exc:
            self._force_close(exc)
            return
        del self._buffer[:sent]
        if self._buffer:
            self._maybe_resume_writer()
            return
        self._writing = False
        self._watch_set()
        self._maybe_resume_writer()
        if self._closing:
            self._force_close(None)
        elif self._eof_wanted:
            self._shutdown_write()

    def _maybe_resume_writer(self) -> None:
        if self._write_paused and len(self._buffer) <= self._low and not self._gone:
            self._write_paused = False
            self._protocol.resume_writing()

    def can_write_eof(self) -> bool:
        return True

    def write_eof(self) -> None:
        if self._eof_wanted or self._gone:
            return
        self._eof_wanted = True
        if not self._buffer:
            self._shutdown_write()

    def _shutdown_write(self) -> None:
        try:
            self._sock.shutdown(socket.SHUT_WR)
        except OSError as exc:
            self._force_close(exc)

    def get_write_buffer_size(self) -> int:
        return len(self._buffer)

    def set_write_buffer_limits(self, high: int | None = None, low: int | None = None) -> None:
        self._high = DEFAULT_HIGH_WATER if high is None else high
        self._low = (self._high // 4 if low is None else low)

    # -- closing ---------------------------------------------------------------------------
    def is_closing(self) -> bool:
        return self._closing or self._gone

    def close(self) -> None:
        """Stop reading; close once the write buffer has drained."""
        if self._closing or self._gone:
            return
        self._closing = True
        self._update_reader()
        if not self._buffer:
            self._force_close(None)

    def abort(self) -> None:
        self._force_close(None)

    def _force_close(self, exc: OSError | None) -> None:
        if self._gone:
            return
        self._stop_watching()
        self._closing = self._gone = True
        self._buffer = bytearray()
        self._sock.close()
        self._loop.call_soon(self._lost, exc)

    def _lost(self, exc: OSError | None) -> None:
        protocol, self._protocol = self._protocol, None
        if protocol is not None:
            protocol.connection_lost(exc)

    def _stop_watching(self) -> None:
        self._reading = self._writing = False
        if self._watch is not None:
            self._watch.close()  # leaves the epoll set (before the descriptor is closed)

    def release(self, *, keep_entry: bool = False) -> int:
        """Give the descriptor away (to the native pump): no callback comes after this.
        ``keep_entry``: leave the socket's epoll entry for the pump to take over (it was
        given ``handover_watch()``); otherwise the socket leaves the epoll set here."""
        if self._gone:
            raise RuntimeError("the socket is already closed")
        if keep_entry:
            self._reading = self._writing = False
            self._watch = None  # the pump holds it until it takes the entry over
        else:
            self._stop_watching()
        self._closing = self._gone = True
        self._protocol = None
        return self._sock.detach()

    def handover_watch(self) -> Any:
        """The socket's epoll entry (``_pump.Watch``), for ``_pump.Pump`` to take over."""
        return self._watch

    def fileno(self) -> int:
        return self._fd

    # -- the rest of the transport interface that is used -----------------------------------
    def get_extra_info(self, name: str, default: Any = None) -> Any:
        if name == "socket":
            return self._sock
        try:
            if name == "peername":
                if self._peername is None:
                    self._peername = self._sock.getpeername()
                return self._peername
            if name == "sockname":
                if self._sockname is None:
                    self._sockname = self._sock.getsockname()
                return self._sockname
        except OSError:
            return default
        return default
