"""Handing a connection in RELAY over to the native relay pump (``_pump.c``).

Whether the pump can run at all is ``native.available()``. A connection is handed over
only from a clean state (nothing buffered, no end of stream seen); anything else stays on
the Python relay, which behaves the same way. A ``RawTransport`` (a bare socket: every
socket of a plane that uses the pump, see ``rawtransport.py``) gives its descriptor
itself; a uvloop transport's socket (an upstream reached by host name) is given as a
duplicate and the transport then aborted.

The pump moves bytes; it decides nothing about a connection's life. It reports what
happens (``on_event``: an end of stream, with its kind for a TLS end's FIN without
close_notify, resets, TLS errors, ``done``) to the connection's lifecycle core
(connection.py), and executes what the core answers: ``shut_write`` (pass an EOF on:
close_notify and FIN once the bytes it holds for that socket are sent) and ``close``
(optionally with RST).
"""

from __future__ import annotations

import asyncio
import os
import ssl
from typing import TYPE_CHECKING

from enforcer.dataplane import native
from enforcer.dataplane.rawtransport import RawTransport

if TYPE_CHECKING:
    from enforcer.dataplane._pump import OnEvent, Poller, Pump, Watch
    from enforcer.dataplane.side import Side

    NativePump = Pump


class _Detached(asyncio.Protocol):
    """Takes a handed-over transport's last callbacks (its socket now belongs to a pump)."""


_DETACHED = _Detached()


def _transport_ready(side: Side) -> bool:
    t = side.transport
    return (t is not None and not t.is_closing() and not side.eof_in and not side.eof_out
            and not side.pause_flags and t.get_write_buffer_size() == 0)


def hand_over(client: Side, upstream: Side, poller: Poller | None,
              on_event: OnEvent) -> Pump | None:
    """Move both sockets (and TLS states) of a connection in RELAY to a new pump, to be
    started (``Pump.start``) once the caller holds it: what it finds buffered may report
    events at once. None if it cannot be done now (the Python relay then carries on,
    nothing changed)."""
    if not native.available() or poller is None or not (_transport_ready(client)
                                                         and _transport_ready(upstream)):
        return None
    tls_states: list[tuple[ssl.SSLObject, ssl.MemoryBIO, ssl.MemoryBIO] | None] = []
    for side in (client, upstream):
        if side.tls is None:
            tls_states.append(None)
            continue
        state = side.tls.hand_over()
        if state is None:
            return None
        tls_states.append(state)
    fds: list[int] = []
    watches: list[Watch | None] = []  # a bare socket's epoll entry, taken over by the pump
    duplicates: list[int] = []  # a bare socket's descriptor is given away, not duplicated
    try:
        for side in (client, upstream):
            transport = side.transport
            assert transport is not None
            if isinstance(transport, RawTransport):
                fds.append(transport.fileno())
                watches.append(transport.handover_watch())
            else:
                fds.append(os.dup(transport.get_extra_info("socket").fileno()))
                duplicates.append(fds[-1])
                watches.append(None)
        pump = native.new_pump((fds[0], fds[1]), (tls_states[0], tls_states[1]), poller,
                               on_event, (watches[0], watches[1]))
    except (OSError, AttributeError, RuntimeError, TypeError, ValueError) as exc:
        native.note_refusal(exc)
        for fd in duplicates:
            os.close(fd)
        return None
    for side in (client, upstream):
        _detach(side)
        if side.tls is not None:
            side.tls.detach()
    return pump


def _detach(side: Side) -> None:
    """The transport lets go of its socket (the pump has its own descriptor of it, or, for
    a bare socket, the descriptor itself)."""
    transport = side.transport
    assert transport is not None
    if isinstance(transport, RawTransport):
        transport.release(keep_entry=True)  # Pump.start() takes the epoll entry over
    else:
        transport.set_protocol(_DETACHED)
        transport.abort()
    side.transport = None
    side.lost = True
