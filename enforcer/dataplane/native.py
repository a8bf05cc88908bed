"""The optional C extension (``_pump.c``): whether it can run here, and the two TLS
shortcuts it makes possible for new connections. The relay pump itself is handed
connections in ``pump.py``.

It also sets the TLS 1.3 cipher suites of every context (``set_ciphersuites``) and, for
worker processes, the session-ticket keys they share (``set_ticket_keys``, see
``tlsconf.tickets``), which Python's ``ssl`` module cannot.

The extension reaches the OpenSSL objects behind Python's ``ssl`` objects through CPython's
private ``_ssl`` layout, and uses such a pointer only once a public OpenSSL call confirmed
it (an SSL's two memory BIOs, a context's SSL, a session's id); every OpenSSL function is
declared by OpenSSL's own headers and looked up in the library the ``_ssl`` module itself
uses. A pointer that does not confirm refuses the native path (Python's public path carries
on), logs a warning and is counted (``verification_failures``, in ``/status``). ``relay: auto`` (the default) uses it when it was built and
passed that check; ``relay: python`` runs no native code at all; ``relay: native`` refuses
to start without it.

The session cache (``use_session_cache``, for listener contexts): OpenSSL's TLS 1.3 tickets
normally carry the whole session, encrypted, so every resumption decrypts and decodes it,
the client's certificate included (OpenSSL 3.0's decoders make that slow). With
``OP_NO_TICKET`` a server keeps sessions in its context's cache and a ticket only names one
("stateful tickets"): a resumed mutual-TLS handshake then costs about a third less CPU for
both sides together. Python cannot bound that cache (OpenSSL's default is 20,480 sessions),
so it is used only with the extension, which sets the bound. Two details keep it working
for real clients: OpenSSL drops a session from the cache when its connection ends in a fatal
error, and a client closing without close_notify is one in OpenSSL 3.0 (``unexpected eof``),
so listeners also set ``OP_IGNORE_UNEXPECTED_EOF`` (the relay treats such an EOF exactly as
before: the TCP stream ended, and it passes the FIN on); OpenSSL also drops the session of a
connection freed without having sent close_notify (a reset, a timeout, a client that left
before the relay), so ``keep_session`` marks such connections as shut down, as nginx does,
unless they failed in TLS. The cache lives in the context, so every reload and ticket-key
rotation (a new context) starts it empty, as new ticket keys did. TLS 1.2 clients resume
by session id instead of tickets.

Clients resume the newest session (``track_sessions``, ``resume_latest``): a tracked client
context keeps, in C, the last session its server gave it (with TLS 1.3, the ticket that
arrives after each handshake), and every new connection resumes a copy of it. Taking the
session only when a connection ends would leave a burst of connections that stay open all
presenting the ticket of the last one that ended; once the server's bounded cache (above)
has forgotten it, every later connection of the burst makes a full handshake.

And ``set_session`` (the fallback before a tracked context has a session): resuming a TLS
session on an outbound connection through a copy made by ``SSL_SESSION_dup``
(certificates shared by reference) instead of CPython's copy, which
encodes the session and decodes it again, parsing the server's certificate (~140 us per
connection, against ~2 us). Sharing the session itself without a copy does not work: with
TLS 1.3 OpenSSL changes a session while it resumes with it, so it would resume only once.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib
import logging
import os
import ssl
import weakref
from collections.abc import Callable
from types import ModuleType
from typing import TYPE_CHECKING, Final

if TYPE_CHECKING:  # the types of the extension: _pump.pyi
    from enforcer.dataplane import _pump
    from enforcer.dataplane._pump import OnEvent, Poller, Pump, Watch
else:
    _pump = None  # the module once bound (see _bind)

Triple = tuple[ssl.SSLObject, ssl.MemoryBIO, ssl.MemoryBIO]

API_VERSION: Final = 11  # what _pump.c must say it offers (its API_VERSION)
SESSION_CACHE_SIZE: Final = 2048  # sessions per listener context (about 1-2 KiB each)

log = logging.getLogger("enforcer.native")


def _sample(ctx: ssl.SSLContext, *, server_side: bool = False) -> Triple:
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    hostname = None if server_side else "native.check"
    return ctx.wrap_bio(incoming, outgoing, server_side=server_side,
                        server_hostname=hostname), incoming, outgoing


def _bind() -> tuple[ModuleType | None, str | None]:
    """The bound extension module, or None and why not. Once bound, ``_pump`` is it."""
    global _pump
    try:
        ext = importlib.import_module("enforcer.dataplane._pump")
    except ImportError as exc:
        return None, f"the native extension is not built ({exc})"
    built = getattr(ext, "API_VERSION", None)
    if built != API_VERSION:
        return None, (f"the native extension is out of date (built for API {built}, this "
                      f"enforcer needs {API_VERSION}): reinstall enforcer to rebuild it")
    import _ssl

    try:
        ext.bind(_ssl.__file__, _sample(ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)))
    except (RuntimeError, TypeError, ValueError, AttributeError) as exc:
        return None, f"the native extension cannot use this Python's ssl module: {exc}"
    _pump = ext
    if os.environ.get("ENFORCER_TLS_RECORDS") == "openssl":
        _pump.own_records(False)  # troubleshooting: OpenSSL keeps every TLS end (docs/operations.md)
    return ext, None


_warned_failures = 0  # verification failures already logged


def verification_failures() -> int:
    """How many private-layout pointers a public OpenSSL call did not confirm (each
    refused the native path for one object), since the process started."""
    return _pump.verification_failures() if available() else 0


def note_refusal(exc: BaseException) -> None:
    """A native call refused: log a warning if it was a verification failure (the first,
    then every 100th, so a systematic mismatch cannot flood the log)."""
    global _warned_failures
    count = verification_failures()
    if count > _warned_failures and (_warned_failures == 0 or count >= _warned_failures + 100):
        log.warning("native fast path refused (%d so far): %s; the public path carries on",
                    count, exc)
        _warned_failures = count


_bound: tuple[ModuleType | None, str | None] | None = None  # bound on first use (never with
# relay: python)


def module() -> ModuleType | None:
    """The bound extension, or None (untyped: this module's functions are the typed way)."""
    global _bound
    if _bound is None:
        _bound = _bind()
    return _bound[0]


def available() -> bool:
    return module() is not None


def bound() -> bool:
    """Whether the extension is bound already (never binds it, unlike ``available``)."""
    return _bound is not None and _bound[0] is not None


def unavailable_reason() -> str:
    module()
    assert _bound is not None
    return _bound[1] or ""


def use_session_cache(ctx: ssl.SSLContext, *, stateful: bool = True) -> bool:
    """Give a listener context a bounded session cache, with stateful TLS 1.3 tickets (see
    the module comment) unless ``stateful`` is False (worker processes sharing ticket keys:
    their tickets must carry the session). False, and the context unchanged, without the
    extension."""
    if not available():
        return False
    try:
        _pump.session_cache(ctx, _sample(ctx, server_side=True), SESSION_CACHE_SIZE)
    except (RuntimeError, TypeError, ValueError, AttributeError) as exc:
        note_refusal(exc)
        return False
    ctx.options |= ssl.OP_IGNORE_UNEXPECTED_EOF
    if stateful:
        ctx.options |= ssl.OP_NO_TICKET
    return True


def set_ticket_keys(ctx: ssl.SSLContext, keys: bytes) -> None:
    """Make a listener context encrypt and accept session tickets under ``keys`` (80 bytes,
    see ``tlsconf.tickets``). Raises RuntimeError naming why when it cannot be done."""
    _configure(ctx, "set_ticket_keys", keys)


def session_cache_stats(ctx: ssl.SSLContext) -> tuple[int, int] | None:
    """(bound, sessions held now) of a listener context's cache; None if not known."""
    if not available() or not ctx.options & ssl.OP_NO_TICKET:
        return None
    try:
        stats = _pump.session_cache(ctx, _sample(ctx, server_side=True), -1)
    except (RuntimeError, TypeError, ValueError, AttributeError) as exc:
        note_refusal(exc)
        return None
    return stats


def keep_session(engine_state: Triple) -> None:
    """At the end of a server-side connection that completed its handshake and did not fail
    in TLS: keep its session in the listener's cache even if the connection was not shut
    down cleanly (reset, timeout, the client left early). A no-op without the extension."""
    if available():
        try:
            _pump.keep_session(engine_state)
        except (RuntimeError, TypeError, ValueError, AttributeError) as exc:
            note_refusal(exc)


def set_session(engine_state: Triple, session: ssl.SSLSession) -> bool:
    """Resume a copy of ``session`` (from the same client context) on a client SSLObject
    before its handshake. False if it cannot be done natively: use ``SSLObject.session``."""
    if not available():
        return False
    try:
        _pump.set_session(engine_state, session)
    except (RuntimeError, TypeError, ValueError, AttributeError, MemoryError) as exc:
        note_refusal(exc)
        return False
    return True


def set_ciphersuites(ctx: ssl.SSLContext, suites: str) -> None:
    """Set a context's TLS 1.3 cipher suites (``"TLS_A:TLS_B"``, preference order); Python's
    ``ssl`` cannot. Raises RuntimeError naming why when it cannot be done."""
    _configure(ctx, "set_ciphersuites", suites)


def _configure(ctx: ssl.SSLContext, function: str, value: bytes | str) -> None:
    """Call the extension's ``function(ctx, sample, value)``; RuntimeError if it cannot."""
    if not available():
        raise RuntimeError(unavailable_reason())
    sample = _sample(ctx, server_side=ctx.protocol == ssl.PROTOCOL_TLS_SERVER)
    try:
        if function == "set_ticket_keys" and isinstance(value, bytes):
            _pump.set_ticket_keys(ctx, sample, value)
        elif function == "set_ciphersuites" and isinstance(value, str):
            _pump.set_ciphersuites(ctx, sample, value)
        else:
            raise TypeError(f"{function}({type(value).__name__})")
    except (TypeError, ValueError, AttributeError) as exc:
        raise RuntimeError(str(exc)) from None


_tracking: weakref.WeakSet[ssl.SSLContext] = weakref.WeakSet()


def track_sessions(ctx: ssl.SSLContext) -> bool:
    """Make a client context keep its newest session for ``resume_latest``. False, and the
    context unchanged, without the extension."""
    if not available():
        return False
    try:
        _pump.track_sessions(ctx, _sample(ctx))
    except (RuntimeError, TypeError, ValueError, AttributeError) as exc:
        note_refusal(exc)
        return False
    _tracking.add(ctx)
    return True


def tracks_sessions(ctx: ssl.SSLContext) -> bool:
    """Whether ``track_sessions`` made this context keep its newest session."""
    return ctx in _tracking


def _engine_call(function: str, engine_state: Triple) -> bool:
    """``_pump.<function>(engine_state)`` as a bool: False without the extension, or if
    it refuses (the refusal is noted)."""
    if not available():
        return False
    try:
        return bool(getattr(_pump, function)(engine_state))
    except (RuntimeError, TypeError, ValueError, AttributeError, MemoryError) as exc:
        note_refusal(exc)
        return False


def resume_latest(engine_state: Triple) -> bool:
    """Resume a copy of the newest session of a tracked client context on a client
    SSLObject before its handshake. False if there is none (or no extension)."""
    return _engine_call("resume_latest", engine_state)


def track_records(engine_state: Triple) -> bool:
    """Before a handshake: let a pump take this SSLObject's TLS 1.3 records over from
    OpenSSL once the handshake is done, freeing its SSL object (see "TLS 1.3 records" in
    ``_pump.c``). False if it cannot be (no extension, or a context logging its keys)."""
    return _engine_call("track_records", engine_state)


def negotiated_group(engine_state: Triple) -> str | None:
    """The key-exchange group a finished handshake used (see ``tlsconf.groups``), read by
    the extension; RuntimeError when it cannot (no extension, or a state that does not
    verify: counted and logged as any refusal), so the caller can take the ctypes path."""
    if not available():
        raise RuntimeError(unavailable_reason())
    try:
        return _pump.negotiated_group(engine_state)
    except (RuntimeError, TypeError, ValueError, AttributeError) as exc:
        note_refusal(exc)
        raise RuntimeError(str(exc)) from None


def own_records(on: bool | None = None) -> bool:
    """Whether pumps take TLS 1.3 records over (tests set it to compare both ways)."""
    if not available():
        return False
    return bool(_pump.own_records() if on is None else _pump.own_records(on))


def frees_tls_buffers() -> bool:
    """Whether idle pumps give OpenSSL's record buffers back: only with an OpenSSL release
    that has the CVE-2024-4741 fix (SSL_free_buffers could free a buffer in use before)."""
    return available() and _pump.frees_tls_buffers()


def new_poller(loop: asyncio.AbstractEventLoop) -> Poller:
    """The epoll set the pumps of ``loop`` share, registered with the loop."""
    if not available():
        raise RuntimeError(unavailable_reason())
    poller = _pump.Poller()
    loop.add_reader(poller.fileno(), poller.run)
    return poller


def close_poller(loop: asyncio.AbstractEventLoop, poller: Poller) -> None:
    with contextlib.suppress(OSError, ValueError):
        loop.remove_reader(poller.fileno())
    poller.close()


def new_pump(fds: tuple[int, int], tls: tuple[Triple | None, Triple | None], poller: Poller,
             on_event: OnEvent, watches: tuple[Watch | None, Watch | None]) -> Pump:
    """A pump for one connection's two sockets (see pump.py); RuntimeError, TypeError or
    ValueError when the extension refuses them (e.g. a TLS state that does not verify)."""
    if not available():
        raise RuntimeError(unavailable_reason())
    return _pump.Pump(fds[0], tls[0], fds[1], tls[1], poller, on_event, watches[0], watches[1])


def accept_function() -> Callable[[int], tuple[int, int, object] | None]:
    """``accept(listen_fd)``: accept4 of one waiting connection, or None (see acceptor.py)."""
    if not available():
        raise RuntimeError(unavailable_reason())
    return _pump.accept
