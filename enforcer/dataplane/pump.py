"""Handing a connection in RELAY over to the native relay pump (``_pump.c``).

Whether the pump can run at all is ``native.available()``. The rule of when a connection
is handed over (a clean state: nothing buffered, no end of stream seen) and when it stays
on the Python relay, which behaves the same way, is written at the top of
``rawtransport.py``. Both sockets are ``RawTransport``s in the pumps' epoll set: each gives
the pump its descriptor and epoll entry themselves.

The pump moves bytes; it decides nothing about a connection's life. It reports what
happens (``on_event``: an end of stream, with its kind for a TLS end's FIN without
close_notify, resets, TLS errors, ``done``) to the connection's lifecycle core
(connection.py), and executes what the core answers: ``shut_write`` (pass an EOF on:
close_notify and FIN once the bytes it holds for that socket are sent) and ``close``
(optionally with RST).
"""

from __future__ import annotations

import ssl
from typing import TYPE_CHECKING

from enforcer.dataplane import native

if TYPE_CHECKING:
    from enforcer.dataplane._pump import OnEvent, Poller, Pump
    from enforcer.dataplane.side import Side

    NativePump = Pump


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
    ct, ut = client.transport, upstream.transport
    assert ct is not None and ut is not None
    try:
        pump = native.new_pump((ct.fileno(), ut.fileno()), (tls_states[0], tls_states[1]),
                               poller, on_event, (ct.handover_watch(), ut.handover_watch()))
    except (OSError, AttributeError, RuntimeError, TypeError, ValueError) as exc:
        native.note_refusal(exc)
        return None
    for side in (client, upstream):
        _detach(side)
        if side.tls is not None:
            side.tls.detach()
    return pump


def _detach(side: Side) -> None:
    """The transport lets go of its socket: the pump has the descriptor itself."""
    assert side.transport is not None
    side.transport.release(keep_entry=True)  # Pump.start() takes the epoll entry over
    side.transport = None
    side.lost = True
