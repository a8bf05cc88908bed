"""One proxied connection's I/O: sockets, TLS engines, the upstream connect, the relay.

How it works. The rules of a connection's life (which stage it is in, what an EOF, a
timer or a decision does there, how it ends and with which close reason) are not here:
they are the pure state machine of ``lifecycle.py`` and its table (docs/design.md). A
``Connection`` owns two ``Side`` protocols (client and upstream); it turns their callbacks,
its timers, the policy's answers, the native pump's reports, drain and revocation into
``lifecycle.Event``s, and executes the ``Command``s the core answers with (``_run``):

- bytes from a socket: the core says what they are for (PROXY parser, TLS detection,
  a handshake, held until the relay starts, forwarded); parsers (proxyproto's
  HeaderParser, detect.py, TlsEngine) report their verdicts back as events;
- timers: the core arms and cancels named slots; ``_fire`` reports one that ran out;
- sockets: both are ``RawTransport``s from the start (the client's from acceptor.py, the
  upstream's from ``rawtransport.connect``, after dialer.py's race for a host name), on
  every plane, whichever relay follows;
- ``start_relay``: held bytes go both ways, then the relay is handed to the native pump
  by the hand-over rule written at the top of rawtransport.py (nothing held, no end of
  stream yet: see pump.py), or stays here on the Python relay over the same transports;
  the pump reports EOFs, its end (``done``), resets and TLS errors as events;
- ends of stream: both relays only report them, a TLS end's FIN without close_notify with
  its kind (``truncated`` mid-record, ``no_close_notify`` on a record boundary: ``_eof``).
  The core decides whether that ends a direction (``shut_write``: ``Side.send_eof``, or
  ``Pump.shut_write`` once the pump relays, which sends close_notify and FIN after the
  bytes it holds for that socket) or fails the connection (``close`` with reset);
- ``close`` and ``record``: both sockets closed, one flow record.

Features act through the same core: ``tls.mode: passthrough`` reads the ClientHello in
DETECT (``start_peek``/``peek``: passthrough.py, which reports ``hello_done`` through
``routed`` or refuses through ``refuse``); an egress listener reads the client's SOCKS5 or
CONNECT request in AUTHORIZE (``start_request``/``request``: egress/session.py, then
``request_done``) before the policy; a rule's limits refuse in ``_decided``
(limitgate.py), and certwatch.py closes a connection whose client certificate is revoked
or expired with a ``cert_revoked`` event (``certificate_closed``).

A command list is executed in order; if an event raised while executing it closed the
connection, the rest of that (older) list is dropped.
"""

from __future__ import annotations

import asyncio
import errno
import functools
import logging
import os
import ssl
import time
from collections.abc import Coroutine
from typing import TYPE_CHECKING, Any, Final

from enforcer.config.model import Address
from enforcer.dataplane import (
    connutil,
    detect,
    dialer,
    flowrecord,
    native,
    origdst,
    passthrough,
    pump,
    rawtransport,
)
from enforcer.dataplane.clienthello import HelloParser
from enforcer.dataplane.connutil import has_unread as _has_unread
from enforcer.dataplane.connutil import header_flow_id as _header_flow_id
from enforcer.dataplane.lifecycle import Lifecycle
from enforcer.dataplane.lifecycle_table import TIMERS
from enforcer.dataplane.lifecycle_table import events as lifecycle_events
from enforcer.dataplane.lifecycle_types import (
    AUTHORIZE,
    CLOSED,
    CONNECT,
    HANDSHAKE,
    RELAY,
    UPSTREAM_TLS,
    Command,
    Event,
    Plan,
    Stage,
)
from enforcer.dataplane.limitgate import denial
from enforcer.dataplane.side import PAUSE_BACKPRESSURE, PAUSE_BUFFER, Side
from enforcer.dataplane.tasks import spawn
from enforcer.dataplane.tlsengine import READ_CHUNK, SESSION_GETTER_LEAKS, TlsEngine
from enforcer.egress import resolved
from enforcer.policy import FlowFacts
from enforcer.tlsconf.identity import IdentityError, PeerIdentity, identity_from_der

if TYPE_CHECKING:
    from enforcer.dataplane.context import ListenerRuntime, UpstreamRuntime
    from enforcer.dataplane.pump import NativePump
    from enforcer.egress.session import EgressSession
    from enforcer.proxyproto import HeaderParser, ProxyHeader

__all__ = ["Connection", "Stage"]

log = logging.getLogger("enforcer.dataplane")

PENDING_LIMIT: Final = 256 * 1024  # client bytes held while the upstream connects
# close reasons after which a client's TLS session must not be resumed
TLS_FAILURES: Final = frozenset({"client_tls_error", "handshake_failed", "bad_peer_certificate"})
OUT_OF_DESCRIPTORS: Final = frozenset({errno.EMFILE, errno.ENFILE})
# close reasons counted in enforcer_upstream_errors_total, with their label
UPSTREAM_ERRORS: Final = {"upstream_tls_failed": "tls_handshake",
                          "upstream_identity_mismatch": "identity_mismatch",
                          "upstream_resolve_failed": "resolve_failed",
                          "upstream_connect_timeout": "connect_timeout",
                          "upstream_tls_timeout": "tls_timeout"}
_NO_PLAN: Final = Plan()
# the events that carry nothing but their kind, made once
_EVENTS: Final = {kind: Event(kind) for kind in lifecycle_events()}
_PUMPED: Final = Event("relay_started", flag=True)  # the native pump took the relay
# an end of stream by (0 client | 1 upstream, kind): None is a clean end (a FIN, or a TLS
# end's close_notify), else what a TLS end's FIN without close_notify was (the core decides)
_EOFS: Final[dict[tuple[int, object], Event]] = {
    (i, kind): Event(f"{who}_eof") if kind is None
    else Event(f"{who}_unclean_eof", reason=kind)
    for i, who in enumerate(("client", "upstream"))
    for kind in (None, "truncated", "no_close_notify")}
# no timer armed, nothing held: shared and never written (an idle pumped connection keeps
# no dict or list of its own); _start_timer and _from_client put their own in place first
_NO_TIMERS: Final[dict[str, asyncio.TimerHandle]] = {}
_NOTHING_HELD: Final[list[bytes]] = []


def _unclean_kind(tls: TlsEngine) -> str:
    """What a FIN without close_notify from a TLS end was (the core decides what it does)."""
    return "truncated" if tls.mid_record() else "no_close_notify"


def _silent_detail(tls_mode: str) -> str:
    """Why an ``accept: optional`` listener waited for a silent client's first bytes."""
    why = (f"with tls.mode {tls_mode}" if tls_mode not in ("auto", "off") else
           "tls.detect_timeout is 0s or not shorter than proxy_protocol.timeout")
    return f"nothing received in time ({why}: the client must send first)"


_warned = connutil._warned  # the out-of-descriptors warning's rate limit (tests set it)
WARN_EVERY: Final = connutil.WARN_EVERY


class Connection:
    """One proxied client connection. Created by the listener's protocol factory."""

    __slots__ = ("bytes_from_client", "bytes_to_client", "client", "client_addr",
                 "connect_task", "connecting", "core", "decision", "early_upstream", "egress",
                 "flow_id", "hs_started", "identity", "listener", "local", "loop", "mesh",
                 "original_dst", "peek", "peer", "pending", "pending_bytes", "plane",
                 "proxy_header", "proxy_parser", "pump", "relay", "sni", "sniff_buf",
                 "started", "started_mono", "timers", "tls_info", "up_rt", "upstream",
                 "upstream_identity")

    def __init__(self, listener: ListenerRuntime) -> None:
        self.listener = listener
        self.plane = listener.plane
        self.loop = asyncio.get_running_loop()
        self.client = Side(self, is_client=True)
        self.upstream: Side | None = None
        self.core = Lifecycle(_NO_PLAN, self.loop.time())  # its plan is set on accept
        self.timers: dict[str, asyncio.TimerHandle] = _NO_TIMERS  # the core's armed slots
        self.started = time.time()
        # Durations use time.monotonic(): uvloop's loop.time() has 1 ms resolution.
        self.started_mono = time.monotonic()
        self.flow_id = ""
        self.peer: tuple[str, int] | None = None
        self.local: tuple[str, int] | None = None
        self.client_addr: tuple[str, int] | None = None  # real client (PROXY source)
        self.original_dst: tuple[str, int] | None = None  # transparent: where it was going
        self.up_rt: UpstreamRuntime = listener.upstream  # or the plane's mesh upstream
        self.mesh: str | None = None  # mesh listeners: mtls | tls | plaintext | external
        self.proxy_header: ProxyHeader | None = None
        self.proxy_parser: HeaderParser | None = None
        self.sniff_buf = b""
        self.tls_info: dict[str, Any] | None = None
        self.sni: str | None = None
        self.peek: HelloParser | None = None  # tls.mode passthrough (passthrough.py)
        self.egress: EgressSession | None = None  # egress listeners (egress/session.py)
        self.identity: PeerIdentity | None = None
        self.upstream_identity: PeerIdentity | None = None
        self.decision: Any = None
        self.pending: list[bytes] = _NOTHING_HELD
        self.pending_bytes = 0
        self.early_upstream: list[bytes] | None = None  # a plaintext upstream spoke first
        self.pump: NativePump | None = None  # set once the native pump relays this connection
        self.relay: str | None = None  # who relayed: "python" or "native" (flow record)
        self.bytes_from_client = 0
        self.bytes_to_client = 0
        self.connect_task: asyncio.Task[None] | None = None
        self.connecting: rawtransport.Connecting | None = None  # a bare-socket connect
        self.hs_started = 0.0

    @property
    def stage(self) -> Stage:
        return self.core.stage

    # ===================================================================== the core
    def _feed(self, ev: Event) -> None:
        """Pass an event to the lifecycle core and execute what it answers."""
        core = self.core
        cmds = core.handle(ev)
        # only a close command ends in CLOSED (and a closed core answers nothing)
        closing = core.stage is CLOSED
        for cmd in cmds:
            if not closing and core.stage is CLOSED:
                return  # an event raised by an earlier command closed the connection
            run = _RUN.get(cmd.kind)
            if run is None:
                raise RuntimeError(f"lifecycle command {cmd.kind} without bytes to act on")
            run(self, cmd)

    def _run(self, cmd: Command) -> None:
        run = _RUN.get(cmd.kind)
        if run is None:
            raise RuntimeError(f"lifecycle command {cmd.kind} without bytes to act on")
        run(self, cmd)

    def _start_timer(self, cmd: Command) -> None:
        slot = cmd.timer
        assert slot is not None
        timers = self.timers
        if timers is _NO_TIMERS:
            timers = self.timers = {}
        old = timers.get(slot)
        if old is not None:
            old.cancel()
        timers[slot] = self.loop.call_later(cmd.delay, self._fire, cmd.reason)

    def _cancel_timer(self, cmd: Command) -> None:
        handle = self.timers.pop(cmd.timer or "", None)
        if handle is not None:
            handle.cancel()

    def _shut_write(self, cmd: Command) -> None:
        """Pass an EOF on: close_notify (TLS), then FIN once the bytes before it are sent."""
        side = self.client if cmd.side == "client" else self.upstream
        assert side is not None
        if self.pump is None:
            side.send_eof()
        elif not side.eof_out:
            side.eof_out = True
            self.pump.shut_write(0 if side is self.client else 1)

    def _fail(self, reason: str, detail: str) -> None:
        if self.core.stage != CLOSED:
            self._feed(Event("fail", reason=reason, detail=detail))

    def refuse(self, reason: str, detail: str) -> None:
        """A feature module refuses the connection (the reason is in lifecycle.REASONS)."""
        self._fail(reason, detail)

    # ===================================================================== side callbacks
    def side_connected(self, side: Side) -> None:
        if side is self.client:
            self._accepted()
        elif self.core.stage == CLOSED:  # client left while we were connecting
            side.close(abort=True)

    def side_data(self, side: Side, data: bytes) -> None:
        core = self.core
        if side is self.client:
            ev = Event("client_data", self.loop.time())
        elif core.stage is CONNECT:
            ev = Event("upstream_data", self.loop.time(), detail=f"upstream "
                       f"{self.upstream_address()} sent data before the TLS handshake")
        else:
            ev = Event("upstream_data", self.loop.time())
        for cmd in core.handle(ev):
            on_bytes = _BYTES.get(cmd.kind)
            if on_bytes is not None:
                on_bytes(self, side, data)
            else:
                self._run(cmd)

    def side_eof(self, side: Side) -> None:
        """A FIN. From a TLS end past its handshake that sent no close_notify (which was its
        end of stream, reported when read) it is reported with its kind: the core decides
        whether it ends that direction or fails the connection."""
        tls, stage = side.tls, self.core.stage
        if tls is None or (side is self.client and stage == HANDSHAKE) \
                or (side is not self.client and stage == UPSTREAM_TLS):
            if tls is not None:
                tls.feed_eof()
            self._eof(side)
            return
        tls.feed_eof()
        if not tls.peer_closed:
            self._eof(side, _unclean_kind(tls))

    def _eof(self, side: Side, kind: str | None = None) -> None:
        """Report an end of stream (``kind``: see ``_EOFS``)."""
        side.eof_in = True
        self._feed(_EOFS[0 if side is self.client else 1, kind])

    def side_lost(self, side: Side, exc: Exception | None) -> None:
        if self.core.stage == CLOSED or (side.eof_in and side.eof_out and exc is None):
            return
        who = "client" if side is self.client else "upstream"
        if isinstance(exc, OSError) and exc.errno == errno.ETIMEDOUT:
            self._peer_timeout(who)
            return
        kind = "reset" if exc is not None else "closed"
        self._feed(Event(f"{who}_error", reason=kind,
                         detail=str(exc) if exc else f"the {who} closed the connection"))

    def _peer_timeout(self, who: str) -> None:
        """The kernel gave up on a peer that stopped answering (keepalive probes or data
        unacknowledged past tcp_user_timeout: see tcpopts.py)."""
        self._feed(Event(f"{who}_error", reason="peer_timeout", detail=(
            f"the {who} stopped answering (no ACK to keepalive probes or data within the "
            "TCP timeouts): connection timed out")))

    def side_write_paused(self, side: Side, paused: bool) -> None:
        other = self.upstream if side is self.client else self.client
        if other is None:
            return
        if paused:
            other.pause(PAUSE_BACKPRESSURE)
        else:
            other.resume(PAUSE_BACKPRESSURE)

    # ===================================================================== accept
    def _accepted(self) -> None:
        plane = self.plane
        transport = self.client.transport
        assert transport is not None
        self.flow_id = plane.new_flow_id()
        self.peer = connutil.addr(transport.get_extra_info("peername"))
        self.local = connutil.addr(transport.get_extra_info("sockname"))
        self.client_addr = self.peer
        plane.connection_opened(self)
        if plane.over_limit():
            self._fail("max_connections", "max_connections reached")
            return
        if self.listener.cfg.transparent and not self._learn_original_dst(transport):
            return
        if not self._proxy_source_allowed():
            return
        self.core.plan = self._plan()
        self._feed(_EVENTS["accept"])
        if plane.draining:  # accepted as the drain began
            self.drain_begin()

    def _plan(self) -> Plan:
        """What the configuration says about this connection: made once per listener and
        upstream (runtimes are replaced, not changed, on reload), not per connection."""
        up = self.up_rt
        key = (up, up.client_ctx is not None)
        plans = self.listener.plans
        plan = plans.get(key)
        if plan is None:
            if len(plans) >= 8:  # mesh upstreams replaced by reloads: keep the map small
                plans.clear()
            plan = plans[key] = self._make_plan()
        return plan

    def _make_plan(self) -> Plan:
        lst, limits = self.listener.cfg, self.listener.limits
        pp = lst.proxy_protocol
        return Plan(proxy=pp.accept != "off", proxy_timeout=pp.timeout, tls=lst.tls.mode,
                    # egress clients always send first (their request): no silence timer
                    proxy_silence=0.0 if lst.protocol != "tcp" else detect.proxy_silence(
                        lst.tls.mode, pp.accept, lst.tls.detect_timeout, pp.timeout),
                    detect_timeout=lst.tls.detect_timeout if lst.tls.mode == "auto" else 0.0,
                    handshake_timeout=limits.handshake_timeout,
                    connect_timeout=limits.connect_timeout, idle_timeout=limits.idle_timeout,
                    close_timeout=limits.close_timeout, max_lifetime=limits.max_lifetime,
                    timeout_rst=limits.timeout_close == "rst",
                    upstream_tls=self.up_rt.client_ctx is not None,
                    client_lenient=lst.tls.allow_eof_without_close_notify,
                    upstream_lenient=self.up_rt.cfg.tls.allow_eof_without_close_notify,
                    open_events=self.plane.open_events,
                    egress_timeout=self.listener.egress.cfg.request_timeout
                    if self.listener.egress is not None else 0.0)

    def _proxy_source_allowed(self) -> bool:
        """PROXY headers are read from trusted sources; ``accept: required`` refuses the
        others."""
        pp = self.listener.cfg.proxy_protocol
        if pp.accept == "off":
            return True
        trusted = self.listener.is_trusted(self.peer[0] if self.peer else None)
        if not trusted and pp.accept == "required":
            self._proxy_error("untrusted_source", f"PROXY header required but "
                              f"{self._peer_text()} is not a trusted source")
            return False
        if trusted:
            from enforcer.proxyproto import HeaderParser  # listeners with proxy_protocol only

            self.proxy_parser = HeaderParser()
        return True

    def _learn_original_dst(self, transport: Any) -> bool:
        """A transparent listener's connection: where it was going, or refused (no loops)."""
        sock = transport.get_extra_info("socket")
        self.original_dst = origdst.read(sock) if sock is not None else None
        refused = origdst.classify(self.original_dst, self.local, self.plane.is_own_endpoint)
        if refused is None:
            return self._mesh_outbound() if self.listener.cfg.mesh == "outbound" else True
        if refused[0] == "not_redirected":
            self.original_dst = None  # the socket's own address, not a destination
        self._fail(refused[0], refused[1])
        return False

    def _mesh_outbound(self) -> bool:
        """A mesh peer's address: mTLS to it (the plane's mesh upstream); elsewhere the
        mesh.external policy: plaintext, or refused."""
        assert self.original_dst is not None
        self.mesh = self.plane.mesh_route(self.original_dst)
        self.plane.metrics.mesh_connections_total.labels(
            listener=self.listener.name, mode=self.mesh or "external_denied").inc()
        if self.mesh == "mtls":
            assert self.plane.mesh_upstream is not None
            self.up_rt = self.plane.mesh_upstream
            return True
        if self.mesh == "external":
            return True
        self._fail("mesh_external_denied", f"{self.upstream_address()} is outside the mesh "
                   "and mesh.external does not allow plaintext to it")
        return False

    def _mesh_inbound(self) -> bool:
        """``mesh: inbound``: say how the peer came (mTLS or not); in strict mode plaintext
        is refused before any upstream connect."""
        tls = self.client.tls is not None
        self.mesh = ("mtls" if self.identity is not None else "tls") if tls else "plaintext"
        self.plane.metrics.mesh_connections_total.labels(listener=self.listener.name,
                                                         mode=self.mesh).inc()
        if tls or self.plane.cfg.mesh.inbound == "permissive":
            return True
        self._fail("mesh_plaintext_refused",
                   f"plaintext from {self._peer_text()} refused: mesh.inbound is strict")
        return False

    def _again(self, data: bytes) -> None:
        """Bytes read past the end of a stage go on as client bytes of the next one."""
        if data and self.core.stage != CLOSED:
            self.side_data(self.client, data)

    # ===================================================================== client bytes
    def _deliver(self, side: Side, data: bytes) -> None:
        """``hold``/``forward``: plaintext on (decrypted when TLS), to the other side or
        held until the relay starts."""
        if side.tls is not None:
            side.tls.feed(data)
            self._read_tls(side)
        elif side is self.client:
            self._from_client(data)
        else:
            self._to_client(data)

    def _from_client(self, data: bytes | memoryview) -> None:
        if self.core.stage == AUTHORIZE:  # an egress client's request (plaintext)
            self._request_data(data)
            return
        self.bytes_from_client += len(data)
        self.listener.bytes_in.inc(len(data))
        if self.core.relaying and self.upstream is not None:
            self.upstream.send(data)
            return
        if self.pending is _NOTHING_HELD:
            self.pending = []
        self.pending.append(bytes(data))  # may be a view of the shared TLS read buffer
        self.pending_bytes += len(data)
        if self.pending_bytes >= PENDING_LIMIT:
            self.client.pause(PAUSE_BUFFER)

    def _to_client(self, data: bytes | memoryview) -> None:
        if not self.core.relaying:
            self._early_upstream_data(data)
            return
        self.bytes_to_client += len(data)
        self.listener.bytes_out.inc(len(data))
        self.client.send(data)

    def _early_upstream_data(self, data: bytes | memoryview) -> None:
        """A plaintext upstream that speaks first (SMTP, MySQL and SSH banners) may do so
        before the relay has started: its bytes wait, as the client's do, and reach the
        client once the relay starts (a TLS upstream may not: the core fails it)."""
        up = self.upstream
        assert up is not None
        early = self.early_upstream
        if early is None:
            early = self.early_upstream = []
        early.append(bytes(data))
        if sum(map(len, early)) >= PENDING_LIMIT:
            up.pause(PAUSE_BUFFER)

    def _read_tls(self, side: Side) -> None:
        tls = side.tls
        assert tls is not None
        forward = self._from_client if side is self.client else self._to_client
        while True:
            try:
                data, eof = tls.read()
            except ssl.SSLEOFError:  # TCP FIN without close_notify (side_eof reports it)
                if not side.eof_in and self.core.stage != CLOSED:
                    self._eof(side, _unclean_kind(tls))
                return
            except ssl.SSLError as exc:
                who = "client" if side is self.client else "upstream"
                side.flush_tls()  # the fatal alert OpenSSL wrote goes before the close
                self._feed(Event(f"{who}_error", reason="tls_error",
                                 detail=f"TLS error from the {who}: {exc.reason or exc}"))
                return
            side.flush_tls()
            if data is not None:
                forward(data)
            if eof and not side.eof_in and self.core.stage != CLOSED:
                self._eof(side)
            if data is None or len(data) < READ_CHUNK or self.core.stage == CLOSED:
                return

    # ===================================================================== features
    def _start_peek(self, cmd: Command) -> None:
        passthrough.begin(self)

    def _peek(self, side: Side, data: bytes) -> None:
        passthrough.feed(self, data)

    def routed(self, raw: bytes) -> None:
        """passthrough.py: the ClientHello chose the route; its bytes go to the upstream."""
        self._feed(_EVENTS["hello_done"])
        self._again(raw)

    def _start_request(self, cmd: Command) -> None:
        # imported here: only egress listeners need it (plane.py imported it for them)
        from enforcer.egress.session import EgressSession

        rt = self.listener.egress
        assert rt is not None
        self.egress = EgressSession(self, rt, self._requested)

    def _request_data(self, data: bytes | memoryview) -> None:
        assert self.egress is not None
        rest = self.egress.feed(data)
        if rest is not None:
            self._requested(rest)

    def _requested(self, rest: bytes) -> None:
        """The egress request is complete (now, or after a login check): the policy
        decides; bytes sent behind the request are held for the upstream."""
        self._feed(_EVENTS["request_done"])
        if rest and self.core.stage != CLOSED:
            self._from_client(rest)

    def certificate_closed(self, reason: str, detail: str) -> None:
        """certwatch.py: the client certificate was revoked or expired."""
        if self.core.stage != CLOSED:
            self._feed(Event("cert_revoked", reason=reason, detail=detail))

    # ===================================================================== PROXY protocol
    # enforcer.proxyproto is imported by the methods below, on the listeners that accept
    # PROXY headers, so a sidecar without them does not hold it in memory.
    def _proxy_data(self, side: Side, data: bytes) -> None:
        from enforcer.proxyproto import ProxyProtocolError, sniff

        parser = self.proxy_parser
        if parser is None:  # untrusted source, accept: optional: refuse anything PROXY-like
            self._sniff_untrusted(data)
            return
        if self.listener.cfg.proxy_protocol.accept == "optional" and not parser.buffered:
            # Still deciding (the parser buffers every byte of a header it is given, so
            # an empty parser means no PROXY prefix has been seen yet).
            self.sniff_buf += data
            kind = sniff(self.sniff_buf)
            if kind is None:
                return
            data, self.sniff_buf = self.sniff_buf, b""
            if kind == "none":
                self._after_proxy(data)
                return
        try:
            header = parser.feed(data)
        except ProxyProtocolError as exc:
            self._proxy_error(exc.reason, f"bad PROXY header: {exc}")
            return
        if header is None:
            return
        self.proxy_header = header
        if header.command == "PROXY" and header.source is not None and header.family in (
            "TCP4", "TCP6"
        ):
            self.client_addr = header.source
        self._after_proxy(parser.rest)

    def _sniff_untrusted(self, data: bytes) -> None:
        from enforcer.proxyproto import sniff

        self.sniff_buf += data
        kind = sniff(self.sniff_buf)
        if kind is None:
            return
        if kind != "none":
            self._proxy_error("untrusted_source",
                              f"PROXY header from untrusted source {self._peer_text()}")
            return
        buf, self.sniff_buf = self.sniff_buf, b""
        self._after_proxy(buf)

    def _after_proxy(self, rest: bytes) -> None:
        self._feed(_EVENTS["proxy_done"])
        self._again(rest)

    def _proxy_eof(self, cmd: Command) -> None:
        """The client sent FIN during the PROXY stage: a truncated header (fail closed).

        With ``accept: optional``, a FIN before the first byte is a plain connect-and-close."""
        from enforcer.proxyproto import ProxyProtocolError

        parser = self.proxy_parser
        sniffing = parser is None or (
            self.listener.cfg.proxy_protocol.accept == "optional" and not parser.buffered)
        if sniffing and not self.sniff_buf:
            self._fail("client_closed", "the client closed before sending anything")
            return
        if sniffing or parser is None:
            self._proxy_error("truncated", f"connection closed after {len(self.sniff_buf)} "
                              "byte(s) that may start a PROXY header")
            return
        try:
            parser.eof()
        except ProxyProtocolError as exc:
            self._proxy_error(exc.reason, f"bad PROXY header: {exc}")
            return
        self._fail("client_closed", "the client closed during the PROXY stage")

    def _proxy_sender_trusted(self) -> bool:
        """``proxy_protocol.trusted_identities``: the PROXY header is believed only when
        the TLS handshake after it showed one of these identities; otherwise the connection
        is refused here, before any upstream connect, with the real peer as its client."""
        allowed = self.listener.proxy_identities
        assert allowed is not None
        ident = self.identity
        if ident is not None and ident.spiffe_id is not None and allowed.match(ident.spiffe_id):
            return True
        who = (f"identity {ident.spiffe_id}" if ident is not None and ident.spiffe_id
               else "a certificate with no SPIFFE ID" if ident is not None
               else "no TLS client certificate")
        self.client_addr = self.peer  # the header's address is not believed
        self._proxy_error("untrusted_identity", f"PROXY header from {self._peer_text()} with "
                          f"{who}, not one of proxy_protocol.trusted_identities")
        return False

    def _proxy_error(self, reason: str, detail: str) -> None:
        self._fail(f"proxy_protocol_{reason}", detail)  # counted by _close

    # ===================================================================== TLS (server)
    def _detect(self, side: Side, data: bytes) -> None:
        head = self.sniff_buf + data if self.sniff_buf else data
        kind = detect.classify(head)
        if kind is None:  # the start of a TLS header so far (at most 4 bytes are held)
            self.sniff_buf = head
            return
        self.sniff_buf = b""
        if kind == detect.TLS:
            self._feed(_EVENTS["tls_detected"])
            if self.client.tls is not None and self.core.stage == HANDSHAKE:
                self._handshake_data(side, head)
        elif kind == detect.PLAIN:
            self._feed(_EVENTS["plain_detected"])
            self._again(head)
        else:
            self._refuse_tls(kind)

    def _refuse_tls(self, kind: str) -> None:
        """A TLS client that is not starting a TLS handshake we accept (see detect.py):
        a TLS error, with its own reason; the client gets a fatal alert, nothing is
        relayed."""
        self.plane.metrics.tls_handshake_errors_total.labels(
            listener=self.listener.name, reason=kind).inc()
        transport = self.client.transport
        if transport is not None and not transport.is_closing():
            transport.write(detect.ALERTS[kind])
        what = ("a ClientHello in the SSLv2 format (not supported)" if kind == detect.SSLV2_HELLO
                else "a TLS record that does not start a handshake")
        self._fail(kind, f"{self._peer_text()} sent {what}")

    def _start_server_tls(self, cmd: Command) -> None:
        ctx = self.listener.server_ctx
        assert ctx is not None
        self.hs_started = time.monotonic()
        self.client.tls = TlsEngine(ctx, server_side=True,
                                    track_records=self.plane.native_relay)

    def _handshake_data(self, side: Side, data: bytes) -> None:
        tls = self.client.tls
        assert tls is not None
        tls.feed(data)
        try:
            done = tls.handshake()
        except ssl.SSLError as exc:
            self.client.flush_tls()  # send the alert so the client knows why
            self._handshake_failed(exc)
            return
        self.client.flush_tls()
        if done:
            self._server_handshake_done(tls)

    def _handshake_failed(self, exc: ssl.SSLError) -> None:
        reason = connutil.tls_reason(exc)
        why: str | None = None
        if self.client.tls is not None:  # set by tlsconf.sni when strict_sni refused
            why = getattr(self.client.tls.obj, "enforcer_sni_refused", None)
        if why is not None:
            reason = "sni_refused"
        elif isinstance(exc, ssl.SSLCertVerificationError) and exc.verify_message:
            why = connutil.tls_detail(exc)  # e.g. certificate revoked
        self.plane.metrics.tls_handshake_errors_total.labels(
            listener=self.listener.name, reason=reason).inc()
        self._fail("handshake_failed", f"TLS handshake with {self._peer_text()} failed: "
                   f"{why or exc.reason or exc}")

    def _server_handshake_done(self, tls: TlsEngine) -> None:
        self.listener.observe_handshake("server", time.monotonic() - self.hs_started, tls.group())
        self.sni = getattr(tls.obj, "enforcer_sni", None)
        der = tls.peer_cert_der()
        if der is not None:
            try:
                self.identity = identity_from_der(der)
            except IdentityError as exc:
                self._fail("bad_peer_certificate", f"cannot read the client certificate: {exc}")
                return
        self.tls_info = {"version": tls.version(), "cipher": tls.cipher(), "sni": self.sni,
                         "alpn": tls.alpn(), "resumed": tls.session_reused,
                         "group": tls.group()}
        if tls.session_reused and connutil.expired(self.identity):
            self._fail("handshake_failed", f"{self._peer_text()} resumed a TLS session whose "
                       "client certificate has expired")
            return
        refused = self.plane.cert_watch.authenticated(self)  # revoked: certwatch.py
        if refused is not None:
            self._fail(*refused)
            return
        self._feed(_EVENTS["handshake_done"])
        if self.core.stage != CLOSED:
            self._read_tls(self.client)  # application data that came with the Finished

    # ===================================================================== authorize
    def _decide(self, cmd: Command) -> None:
        """The core asks for the policy's decision: before the upstream (AUTHORIZE), or
        once the upstream's identity is known (rules on it)."""
        if self.core.stage != AUTHORIZE:
            self._decided(self.plane.decide(self.listener, self._facts()))
            return
        header = self.proxy_header
        # a LOCAL header (health checks) claims no address: no identity needed, none taken
        claims = header is not None and header.command == "PROXY"
        if claims and self.listener.proxy_identities is not None \
                and not self._proxy_sender_trusted():
            return
        if self.listener.cfg.mesh == "inbound" and not self._mesh_inbound():
            return
        if claims and self.listener.cfg.proxy_protocol.flow_id_from_header:
            assert header is not None
            self.flow_id = _header_flow_id(header.unique_id) or self.flow_id  # one id per hop
        decision = self.plane.decide_before_upstream(self.listener, self._facts())
        if decision is None:  # it depends on the upstream's verified identity
            self._feed(Event("decision", allow=None))
            return
        self._decided(decision)

    def _decided(self, decision: Any) -> None:
        """Record and count the decision, then tell the core."""
        self.decision = decision
        self.listener.count_decision(decision.ruleset, decision.rule or "", decision.action)
        allow = decision.action == "allow"
        if not allow and self.peek is not None:
            passthrough.denied(self)  # a handshake_failure alert
        refused = self.plane.limit_gate.admit(self, decision) if allow else None
        if refused is not None:  # the rule's limits (limitgate.py)
            self.decision = denial(decision, refused)
            self._fail(refused.reason, refused.detail)
            return
        self._feed(Event("decision", allow=allow,
                         detail=None if allow else flowrecord.deny_detail(decision)))

    def _facts(self) -> FlowFacts:
        ip = connutil.client_ip(self.client_addr[0]) if self.client_addr is not None else None
        tlvs = self.proxy_header.tlvs_for_policy() if self.proxy_header is not None else {}
        up = self.up_rt.cfg.address
        dest = self.original_dst
        if dest is None and not up.is_unix and not up.original:
            dest = (up.host, up.port)
        port = self.local[1] if self.local else self.listener.local_port
        return FlowFacts(
            listener=self.listener.name,
            port=self.original_dst[1] if self.original_dst is not None else port,
            client_ip=ip,
            identity=self.identity,
            tls=self.client.tls is not None or self.peek is not None,
            sni=self.sni,
            tlvs=tlvs,
            destination=dest,
            server_identity=self.upstream_identity,
            host=self.egress.host if self.egress is not None else None,
            resolved=self.egress.address if self.egress is not None else None,
        )

    # ===================================================================== upstream
    def _start_connect(self, cmd: Command) -> None:
        """Connect upstream on a bare socket (rawtransport.py) watched by the plane's
        poller: at once to an address or a unix socket, after resolving a host name
        (``_connect``). The core armed connect_timeout."""
        target = self.up_rt.raw_target
        if self.original_dst is not None:
            target = rawtransport.target_of(Address(*self.original_dst))
        self.upstream = Side(self, is_client=False)
        if target is None:
            self.connect_task = spawn(self._connect(), name=f"connect-{self.flow_id}")
            return
        self.connecting = rawtransport.connect(
            self.loop, self.plane.poller, target,
            functools.partial(self._raw_connected, time.monotonic()), self.up_rt.sockopts)

    def _raw_connected(self, started: float, transport: rawtransport.RawTransport | None,
                       exc: OSError | None) -> None:
        self.connecting = None  # (a cancelled connect never calls back: see _close)
        try:
            side = self.upstream
            assert side is not None
            if transport is None:
                assert exc is not None
                side.lost = True  # never connected: no callback will come from it
                self._connect_failed(exc)
                return
            self.up_rt.observe_connect(time.monotonic() - started)
            transport.start(side)
            self._upstream_connected(side)
            transport.start_reading()  # a no-op once the pump has the socket
        except Exception as err:
            self.internal_error(err)

    def upstream_address(self) -> Address:
        """Where the upstream connection goes: the original destination (transparent
        listeners) or the upstream's address."""
        if self.original_dst is not None:
            return Address(*self.original_dst)
        return self.up_rt.cfg.address

    def _connect_failed(self, exc: OSError, *, counted: bool = False) -> None:
        addr = self.upstream_address()
        code = errno.errorcode.get(exc.errno or 0, "error").lower()
        if exc.errno in OUT_OF_DESCRIPTORS:
            connutil.warn_out_of_descriptors(self.listener.name, str(addr), exc)
        if self.egress is not None:  # the egress client's reply says why
            self.egress.errno = exc.errno
        if not counted:
            self.plane.metrics.upstream_errors_total.labels(upstream=self.up_rt.name,
                                                            reason=code).inc()
        self._fail("upstream_connect_failed", f"connect to {addr} failed: {exc.strerror or exc}")

    async def _connect(self) -> None:
        """A host-name upstream: resolved and its addresses raced (dialer.py), each attempt
        a bare socket; the winner goes on as ``_raw_connected``. Cancelled by ``_close``."""
        side = self.upstream
        assert side is not None
        started = time.monotonic()
        try:
            transport = await self._dial()
        except asyncio.CancelledError:  # the connection closed
            self.connect_task = None
            side.lost = True
            raise
        except (OSError, resolved.AllRefused) as exc:
            self.connect_task = None
            side.lost = True  # never connected: no callback will come from it
            self._dial_failed(exc)
            return
        except Exception as exc:
            self.connect_task = None
            self.internal_error(exc)
            return
        self.connect_task = None  # done: _close must not cancel it from inside
        if self.core.stage == CLOSED:
            transport.abort()
            side.lost = True
            return
        self._raw_connected(started, transport, None)

    def _dial(self) -> Coroutine[Any, Any, rawtransport.RawTransport]:
        addr, up = self.upstream_address(), self.up_rt
        admit = resolved.admitter(self.egress, self._facts, functools.partial(
            self.plane.decide, self.listener), self.flow_id)  # egress: rules on addresses
        return dialer.dial(self.loop, self.plane.poller, addr.host, addr.port, up.addresses,
                           self._attempt_failed, admit, up.sockopts)

    def _dial_failed(self, exc: OSError | resolved.AllRefused) -> None:
        if isinstance(exc, dialer.ResolveError):
            self._fail("upstream_resolve_failed", exc.strerror or str(exc))
        elif isinstance(exc, resolved.AllRefused):
            self._fail(resolved.REASON, str(exc))
        else:  # every address failed, each counted as it did (_attempt_failed)
            self._connect_failed(exc, counted=True)

    def _attempt_failed(self, addr: dialer.Addr, exc: OSError, fresh: bool) -> None:
        """One address of a host-name upstream refused or failed (another may work)."""
        up = self.up_rt
        code = errno.errorcode.get(exc.errno or 0, "error").lower()
        self.plane.metrics.upstream_errors_total.labels(upstream=up.name, reason=code).inc()
        if fresh:
            log.warning("upstream %s: connect to %s (%s) failed: %s; other addresses of the "
                        "name are tried first while it keeps failing", up.name,
                        connutil.sockaddr_text(addr[1]), up.cfg.address, exc.strerror or exc)

    def _upstream_connected(self, side: Side) -> None:
        header = self.plane.proxy_header_for(self)
        if header and side.transport is not None:
            side.transport.write(header)
        self._feed(_EVENTS["upstream_connected"])

    def _start_upstream_tls(self, cmd: Command) -> None:
        up, side = self.up_rt, self.upstream
        assert up.client_ctx is not None and side is not None
        self.hs_started = time.monotonic()
        side.tls = TlsEngine(up.client_ctx, server_side=False,
                             server_hostname=up.server_hostname, session=up.session,
                             native_session=self.plane.native_relay,
                             track_records=self.plane.native_relay)
        self._upstream_handshake()

    def _upstream_handshake_data(self, side: Side, data: bytes) -> None:
        assert side.tls is not None
        side.tls.feed(data)
        self._upstream_handshake()

    def _upstream_handshake(self) -> None:
        up = self.upstream
        assert up is not None and up.tls is not None
        try:
            done = up.tls.handshake()
        except ssl.SSLError as exc:
            up.flush_tls()
            self.plane.metrics.tls_handshake_errors_total.labels(
                listener=self.listener.name, reason=connutil.tls_reason(exc)).inc()
            self._fail("upstream_tls_failed", f"TLS handshake with upstream "
                       f"{self.upstream_address()} failed: {connutil.tls_detail(exc)}")
            return
        if not done:
            up.flush_tls()
            return
        # Our last flight (TLS 1.3: the Finished) stays in the BIO until the relay starts
        # and encrypts the client's first bytes behind it: one segment, one wake-up.
        self.listener.observe_handshake("client", time.monotonic() - self.hs_started,
                                        up.tls.group())
        problem = self._upstream_identity_problem(up.tls)
        if problem is not None:
            up.flush_tls()
            self._fail("upstream_identity_mismatch", problem)
            return
        self._feed(_EVENTS["upstream_tls_done"])  # (denied: the close sends our Finished)

    def _upstream_identity_problem(self, tls: TlsEngine) -> str | None:
        """Why the upstream's certificate is not the one expected; None when it is."""
        der = tls.peer_cert_der()
        try:
            self.upstream_identity = identity_from_der(der) if der else None
        except IdentityError as exc:
            return f"cannot read the upstream certificate: {exc}"
        problem = self.plane.check_upstream_identity(self.up_rt,
                                                     self.upstream_identity)
        if problem is None and tls.session_reused and connutil.expired(self.upstream_identity):
            problem = "the upstream's certificate in the resumed TLS session has expired"
        return problem

    # ===================================================================== relay
    def _start_relay(self, cmd: Command) -> None:
        """Held bytes go both ways; then (a clean start) the native pump takes over, else
        the core replays the EOFs it held (relay_started)."""
        if self.egress is not None:
            self.egress.established()  # the success reply, before any relayed byte
        self.relay = "python"
        up = self.upstream
        assert up is not None
        pending, self.pending, self.pending_bytes = self.pending, _NOTHING_HELD, 0
        for chunk in pending:
            up.send(chunk)
        self.client.resume(PAUSE_BUFFER)
        early, self.early_upstream = self.early_upstream, None
        if early:
            for chunk in early:
                self._to_client(chunk)
            up.resume(PAUSE_BUFFER)
        native_ok = cmd.reason == "native_ok"
        if not native_ok:
            self._feed(_EVENTS["relay_started"])
        up.flush_tls()  # the handshake's last flight, with any first bytes behind it
        if up.tls is not None and self.core.stage != CLOSED:
            self._read_tls(up)  # application data that came with the upstream's Finished
        if native_ok and self.core.stage != CLOSED and not self._go_native():
            self._feed(_EVENTS["relay_started"])
        if not self.timers:  # (the pump relays: it may idle, with no map of its own)
            self.timers = _NO_TIMERS

    def _go_native(self) -> bool:
        """Hand the relay to the native pump when this process uses it (see pump.py); True
        if it did. The core hears of it before the pump starts: an end of stream the pump
        finds buffered is then passed on by the pump, when the core says so."""
        up = self.upstream
        if not self.plane.native_relay or up is None or self.core.stage != RELAY:
            return False
        handed = pump.hand_over(self.client, up, self.plane.poller, self._pump_event)
        if handed is None:
            return False
        self.pump, self.relay = handed, "native"
        self.plane.pump_started(self)
        self._feed(_PUMPED)
        if self.core.stage != CLOSED:
            handed.start()  # on failure it has closed both sockets; the connection fails
        return True

    def _pump_event(self, kind: str, index: int, detail: object) -> None:
        """What the native pump reports: an end of stream (with its kind: see ``_EOFS``),
        the end, or a failure. It passes nothing on by itself: the core's ``shut_write``
        does (``_shut_write``)."""
        try:
            if kind == "eof":
                if (index, detail) not in _EOFS:
                    raise RuntimeError(f"native pump: an end of stream {index} {detail!r}")
                side = self.client if index == 0 else self.upstream
                assert side is not None
                self._eof(side, None if detail is None else str(detail))
                return
            who = "client" if index == 0 else "upstream"
            if kind == "done":
                self._feed(_EVENTS["done"])
            elif kind == "reset":
                code = detail if isinstance(detail, int) else 0
                if code == errno.ETIMEDOUT:
                    self._peer_timeout(who)
                    return
                self._feed(Event(f"{who}_error", reason="reset",
                                 detail=str(OSError(code, os.strerror(code)))))
            elif kind == "tls_error":
                self._feed(Event(f"{who}_error", reason="tls_error",
                                 detail=f"TLS error from the {who}: {detail}"))
            else:
                raise RuntimeError(f"native pump: {detail}")
        except Exception as exc:
            self.internal_error(exc)

    def pump_tick(self, now: float) -> None:
        """The plane's periodic visit (see plane.PUMP_TICK): counters catch up, a busy TLS
        end quiet since the last visit gives its buffers back, and the core checks
        idle_timeout against the pump's last activity."""
        assert self.pump is not None
        self.flush_pump_counts()
        self.pump.tick()
        self._feed(Event("idle_timeout", now=now, last_active=self.pump.last_active))

    def flush_pump_counts(self) -> None:
        """Add what the native pump relayed since the last call to the counters."""
        assert self.pump is not None
        from_client, to_client = self.pump.take_counts()
        if from_client:
            self.bytes_from_client += from_client
            self.listener.bytes_in.inc(from_client)
        if to_client:
            self.bytes_to_client += to_client
            self.listener.bytes_out.inc(to_client)

    # ===================================================================== timers
    def _fire(self, name: str) -> None:
        """A timer the core armed ran out: tell it (with what only the I/O layer knows)."""
        try:
            self.timers.pop(TIMERS[name][0], None)
            if self.core.stage == CLOSED:
                return
            self._feed(self._timer_event(name))
        except Exception as exc:
            self.internal_error(exc)

    def _timer_event(self, name: str) -> Event:
        if name == "proxy_timeout":
            optional = self.listener.cfg.proxy_protocol.accept == "optional"
            parser = self.proxy_parser
            silent = not self.sniff_buf and not (parser is not None and parser.buffered)
            return Event(name, detail=_silent_detail(self.listener.cfg.tls.mode)
                         if optional and silent else "no complete PROXY header in time")
        if name == "proxy_silence":  # has the client started to send?
            parser = self.proxy_parser
            started = bool(self.sniff_buf) or bool(parser is not None and parser.buffered)
            return Event(name, flag=started or _has_unread(self.client.transport))
        if name == "detect_timeout":  # unread bytes: a late loop turn, not a silent client
            return Event(name, flag=_has_unread(self.client.transport))
        if name == "request_timeout" and self.listener.egress is not None:
            rt = self.listener.egress
            return Event(name, detail=f"{rt.protocol}: no complete request within "
                         f"{rt.cfg.request_timeout:g} s")
        if name == "connect_timeout":
            return Event(name, detail=f"connect to {self.upstream_address()} timed out")
        return Event(name, now=self.loop.time())

    def drain_begin(self) -> None:
        """The process began to drain: a relaying connection goes on, as DRAINING."""
        if self.core.stage != CLOSED and not self.core.draining:
            try:
                self._feed(_EVENTS["drain"])
            except Exception as exc:
                self.internal_error(exc)

    def drain_close(self) -> None:
        """Called when the drain deadline passes with this connection still open."""
        if self.core.stage != CLOSED:
            self._feed(_EVENTS["drain_deadline"])

    def policy_revoked(self, decision: Any) -> None:
        """A reloaded ruleset now denies this open connection."""
        if self.core.stage != CLOSED:
            self.decision = decision
            self._feed(_EVENTS["revoke"])

    # ===================================================================== ending
    def _close(self, cmd: Command) -> None:
        """The core closed the connection: sockets, pump, connect, sessions, counters."""
        if self.egress is not None:  # the egress client's refusal, if it has no reply yet
            self.egress.closing(cmd.action, cmd.reason)
        self.plane.limit_gate.release(self)  # once per connection: the core closes once
        if cmd.stage >= RELAY:
            self._keep_session()
        if self.pump is not None:
            self.flush_pump_counts()
            self.pump.close(cmd.reset)
            self.plane.pump_stopped(self)
        if self.connect_task is not None and not self.connect_task.done():
            self.connect_task.cancel()
        if self.connecting is not None:
            self.connecting.cancel()
            self.connecting = None
            if self.upstream is not None and self.upstream.transport is None:
                self.upstream.lost = True  # never connected: nothing more will come from it
        self.pending.clear()
        for side in (self.client, self.upstream):
            if side is not None:
                side.close(abort=cmd.abort, reset=cmd.reset)
        if self.client.tls is not None and self.plane.native_relay \
                and not self.client.tls.detached \
                and self.tls_info is not None and cmd.reason not in TLS_FAILURES:
            native.keep_session(self.client.tls.state)
        if not cmd.abort:
            self.plane.schedule_abort(self)
        self._count_close(cmd.reason)

    def _count_close(self, reason: str) -> None:
        metrics = self.plane.metrics
        if reason in UPSTREAM_ERRORS:
            metrics.upstream_errors_total.labels(upstream=self.up_rt.name,
                                                 reason=UPSTREAM_ERRORS[reason]).inc()
        elif reason.startswith("proxy_protocol_"):
            metrics.proxy_protocol_errors_total.labels(
                listener=self.listener.name, reason=reason.removeprefix("proxy_protocol_")).inc()
        elif reason == "handshake_timeout":
            metrics.tls_handshake_errors_total.labels(listener=self.listener.name,
                                                      reason="timeout").inc()

    def _record(self, cmd: Command) -> None:
        if cmd.event == "open":
            self.plane.flowlog.emit(flowrecord.build(self, "allow", "", None, RELAY,
                                                     event="open"))
            return
        self.plane.connection_closed(self, flowrecord.build(self, cmd.action, cmd.reason,
                                                           cmd.detail, cmd.stage))
        if self.pump is not None:
            self.pump = None  # drops the pump's reference back to this connection
            self.release_if_done()

    def _keep_session(self) -> None:
        """Remember the upstream TLS session for resumption. TLS 1.3 tickets arrive after
        the handshake, so the session is taken when the connection ends, not before."""
        up = self.upstream
        if up is None or up.tls is None:
            return
        runtime = self.up_rt
        if up.tls.context is not runtime.client_ctx or up.tls.detached:
            return  # a TLS reload replaced the context (its sessions do not fit the new
            # one), or a pump had the TLS state (it resumes with native.py's sessions)
        if native.tracks_sessions(up.tls.context) or SESSION_GETTER_LEAKS:
            return  # it keeps its newest session itself (native.py), or reading one leaks
        if up.tls.session_reused and runtime.session is not None:
            return  # the cached session still works: copying a session is not free
        session = up.tls.session
        if session is not None and session.has_ticket:
            runtime.session = session

    def release_if_done(self) -> None:
        """Once closed with every socket gone, no callback can come: break the cycles
        between this connection and its sides so reference counting frees them."""
        if self.core.stage != CLOSED or not self.client.lost:
            return
        up = self.upstream
        if up is not None and not up.lost:
            return  # still open, or never connected (then the garbage collector frees it)
        self.client.release()
        if up is not None:
            up.release()

    def internal_error(self, exc: BaseException) -> None:
        """A bug in a callback: log it with the flow id and close (fail closed)."""
        log.error("internal error on flow %s (%s): %r", self.flow_id, self.listener.name, exc,
                  exc_info=exc)
        if self.core.stage != CLOSED:
            try:
                self._feed(Event("internal_error", detail=f"internal error: {exc!r}"))
            except Exception:
                log.exception("while closing flow %s", self.flow_id)
                self.core.stage = CLOSED
                self.abort_sockets()
        else:
            self.abort_sockets()

    def abort_sockets(self) -> None:
        """Hard stop after a graceful close did not finish within close_timeout."""
        for side in (self.client, self.upstream):
            if side is not None and not side.lost:
                side.close(abort=True)

    def _peer_text(self) -> str:
        return f"{self.peer[0]}:{self.peer[1]}" if self.peer else "the peer"


# what the I/O layer does for a command (commands that act on bytes are in _BYTES)
_RUN: Final = {
    "start_timer": Connection._start_timer, "cancel_timer": Connection._cancel_timer,
    "shut_write": Connection._shut_write,
    "start_tls": Connection._start_server_tls, "decide": Connection._decide,
    "start_peek": Connection._start_peek, "start_request": Connection._start_request,
    "connect": Connection._start_connect, "start_upstream_tls": Connection._start_upstream_tls,
    "start_relay": Connection._start_relay, "proxy_eof": Connection._proxy_eof,
    "close": Connection._close, "record": Connection._record,
}
_BYTES: Final = {
    "parse_proxy": Connection._proxy_data, "detect": Connection._detect,
    "handshake": Connection._handshake_data, "peek": Connection._peek,
    "request": Connection._deliver,
    "upstream_handshake": Connection._upstream_handshake_data,
    "hold": Connection._deliver, "forward": Connection._deliver,
}
