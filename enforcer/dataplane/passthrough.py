"""``tls.mode: passthrough``: route a TLS connection by the SNI of its ClientHello without
terminating it, then relay its bytes untouched (the backend does the TLS).

How it works. After the PROXY stage the lifecycle core (lifecycle.py) puts the connection
in its DETECT stage, arms ``limits.handshake_timeout`` and asks for ``start_peek``:
``begin`` gives the connection a ``HelloParser`` (``clienthello.py``, pure) as
``conn.peek``; the core sends the client's bytes (``peek``) to ``feed`` as they come,
bounded by that timer and the parser's size cap. Once the ClientHello is whole:

- ``SniRouter.route`` (``config/passthrough.py``) picks the upstream: an exact name first, then a ``*.`` name one
  label deep, else the default route (the listener's ``upstream``); with ``strict_sni``
  there is none, and an unknown name or a hello without SNI is refused with a fatal
  ``unrecognized_name`` alert (close ``sni_refused``);
- the route's upstream becomes the connection's (``conn.up_rt``), the SNI a policy fact,
  and ``conn.routed`` tells the core (``hello_done``): it authorizes as for any
  connection (SNI + client address + PROXY facts) before any upstream connect, with every
  peeked byte held as the first bytes: they reach the backend exactly as the client sent
  them;
- a denial sends a ``handshake_failure`` alert (``denied``), a malformed or oversize hello
  the parser's alert; a plaintext client gets no TLS record, only the close.

The flow record's ``tls`` says ``mode: passthrough``, the ``sni`` and the ``route`` (the
server name pattern that matched, or ``default``). Refusals go through ``conn.refuse``
(their close reasons are in lifecycle.REASONS); this module sets the ``sni``, ``up_rt``,
``tls_info`` and ``peek`` attributes, never a stage or a timer.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from enforcer.config.passthrough import SniRouter
from enforcer.dataplane.clienthello import (
    HANDSHAKE_FAILURE,
    UNRECOGNIZED_NAME,
    Hello,
    HelloError,
    HelloParser,
    alert,
)

if TYPE_CHECKING:
    from enforcer.dataplane.connection import Connection

__all__ = ["SniRouter", "begin", "denied", "feed"]


def begin(conn: Connection) -> None:
    """The PROXY stage is over (the handshake timer runs): wait for the ClientHello."""
    conn.peek = HelloParser()
    conn.tls_info = _record(None, None)


def feed(conn: Connection, data: bytes) -> None:
    """Client bytes while the ClientHello is incomplete."""
    parser = conn.peek
    assert parser is not None
    try:
        hello = parser.feed(data)
    except HelloError as exc:
        _refuse_hello(conn, exc)
        return
    if hello is not None:
        _routed(conn, parser, hello)


def _routed(conn: Connection, parser: HelloParser, hello: Hello) -> None:
    conn.sni = hello.sni
    lst = conn.listener
    router = lst.sni_router
    assert router is not None
    hit = router.route(hello.sni)
    if hit is None:
        conn.tls_info = _record(hello.sni, None)
        _metric(conn, "sni_refused")
        _send_alert(conn, UNRECOGNIZED_NAME)
        conn.refuse("sni_refused", (
            "the ClientHello has no SNI (strict_sni)" if hello.sni is None else
            f"SNI {hello.sni!r} matches no route (strict_sni)"))
        return
    label, upstream = hit
    conn.tls_info = _record(hello.sni, label)
    conn.up_rt = upstream
    lst.count_route(upstream.name)
    raw = bytes(parser.raw)
    parser.release()
    conn.routed(raw)


def denied(conn: Connection) -> None:
    """The policy denied a passthrough connection: tell the client with an alert (it is
    still in its handshake: nothing from any backend has reached it)."""
    if conn.peek is not None:
        _send_alert(conn, HANDSHAKE_FAILURE)


def _refuse_hello(conn: Connection, exc: HelloError) -> None:
    _metric(conn, exc.reason)
    if exc.alert is not None:
        _send_alert(conn, exc.alert)
    conn.refuse(exc.reason, f"{conn._peer_text()} sent {exc}")


def _send_alert(conn: Connection, description: int) -> None:
    transport = conn.client.transport
    parser = conn.peek
    if transport is None or transport.is_closing() or parser is None:
        return
    transport.write(alert(description, parser.alert_version))


def _metric(conn: Connection, reason: str) -> None:
    conn.plane.metrics.tls_handshake_errors_total.labels(listener=conn.listener.name,
                                                         reason=reason).inc()


def _record(sni: str | None, route: str | None) -> dict[str, Any]:
    """The flow record's ``tls``: what a passthrough listener knows (nothing negotiated)."""
    return {"mode": "passthrough", "version": None, "cipher": None, "sni": sni,
            "alpn": None, "resumed": None, "group": None, "route": route}
