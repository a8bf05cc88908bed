"""The per-connection state machine: accept -> [PROXY] -> [detect] -> [TLS] -> authorize
-> connect -> [PROXY out] -> [upstream TLS] -> relay -> half-closed -> closed.

How it works. A ``Connection`` owns two ``Side`` protocols (client and upstream) and is
driven entirely by their callbacks; the only task it creates is the upstream connect.
Bytes from the client are interpreted according to ``stage``:

- PROXY: fed to the sans-IO ``HeaderParser`` until a header, an error or the timeout;
- DETECT (``tls.mode: auto``): the first bytes decide TLS (a handshake record), a TLS
  client we refuse (an SSLv2-format hello, another record type) or plaintext (detect.py);
  a client silent for ``tls.detect_timeout`` is plaintext (server-first protocols: SMTP,
  MySQL, SSH wait for the server's banner); on ``tls.mode: passthrough`` the ClientHello
  is read instead, without terminating TLS, and routes the connection (passthrough.py);
- HANDSHAKE: fed to the server ``TlsEngine`` until the handshake completes;
- AUTHORIZE/CONNECT/UPSTREAM_TLS: plaintext is held in a bounded buffer (reading pauses
  when it is full); no upstream connection exists before the policy said allow;
- RELAY: plaintext is forwarded. Each direction is flow controlled: when one side's
  write buffer passes its high-water mark, reading from the other side pauses.

Half-close: an EOF (TCP FIN or TLS close_notify) from one side is passed on to the other
(FIN, or close_notify + FIN), and the other direction keeps flowing until it too ends or
``close_timeout`` passes. Every way out goes through ``_finish`` exactly once: it cancels
timers and the connect task, closes both sockets, and emits one flow record.
"""

from __future__ import annotations

import asyncio
import datetime
import errno
import functools
import ipaddress
import logging
import os
import socket
import ssl
import time
from enum import IntEnum
from typing import TYPE_CHECKING, Any, Final

from enforcer.config.model import Address
from enforcer.dataplane import (
    detect,
    dialer,
    flowrecord,
    native,
    origdst,
    passthrough,
    pump,
    rawtransport,
    tcpopts,
)
from enforcer.dataplane.clienthello import HelloParser
from enforcer.dataplane.side import PAUSE_BACKPRESSURE, PAUSE_BUFFER, Side
from enforcer.dataplane.tasks import spawn
from enforcer.dataplane.tlsengine import (
    READ_CHUNK,
    SESSION_GETTER_LEAKS,
    TlsEngine,
    reset_on_close,
    unclean_detail,
)
from enforcer.egress import session as egress
from enforcer.policy import FlowFacts
from enforcer.proxyproto import HeaderParser, ProxyHeader, ProxyProtocolError, sniff
from enforcer.tlsconf.identity import IdentityError, PeerIdentity, identity_from_der

if TYPE_CHECKING:
    from enforcer.dataplane.context import ListenerRuntime, UpstreamRuntime
    from enforcer.dataplane.pump import NativePump
    from enforcer.egress.session import EgressSession

log = logging.getLogger("enforcer.dataplane")

PENDING_LIMIT: Final = 256 * 1024  # client bytes held while the upstream connects
# close reasons after which a client's TLS session must not be resumed
TLS_FAILURES: Final = frozenset({"client_tls_error", "handshake_failed", "bad_peer_certificate"})
# timeouts that limits.timeout_close: rst ends with a reset (close reason "<reason>_rst")
RESETTING_TIMEOUTS: Final = frozenset({"idle_timeout", "close_timeout", "max_lifetime"})
# an upstream socket that cannot be opened: an upstream error (errno as its reason),
# logged as a warning at most every WARN_EVERY seconds (it comes in floods)
OUT_OF_DESCRIPTORS: Final = frozenset({errno.EMFILE, errno.ENFILE})
WARN_EVERY: Final = 1.0
_warned = {"at": -WARN_EVERY, "since": 0}
# close reason: the kernel timed a silent peer out (TCP keepalive / TCP_USER_TIMEOUT)
PEER_TIMEOUT: Final = "peer_timeout"


class Stage(IntEnum):
    ACCEPTED = 0
    PROXY = 1
    DETECT = 2
    HANDSHAKE = 3
    AUTHORIZE = 4
    CONNECT = 5
    UPSTREAM_TLS = 6
    RELAY = 7
    CLOSED = 8


class Connection:
    """One proxied client connection. Created by the listener's protocol factory."""

    __slots__ = ("bytes_from_client", "bytes_to_client", "client", "client_addr",
                 "client_eof_pending", "close_timer", "connect_task", "connecting", "decision",
                 "early_upstream", "egress", "first_eof",
                 "flow_id", "hs_started", "identity", "idle_timer", "last_active", "life_timer",
                 "listener", "local", "loop", "mesh", "original_dst", "peek", "peer", "pending", "pending_bytes", "plane",
                 "proxy_header", "proxy_parser", "pump", "relay", "sni", "sniff_buf", "stage", "stage_timer",
                 "started", "started_mono", "tls_info", "up_rt", "upstream", "upstream_eof_pending",
                 "upstream_identity")

    def __init__(self, listener: ListenerRuntime) -> None:
        self.listener = listener
        self.plane = listener.plane
        self.loop = asyncio.get_running_loop()
        self.client = Side(self, is_client=True)
        self.upstream: Side | None = None
        self.stage = Stage.ACCEPTED
        self.started = time.time()
        # Durations use time.monotonic(): uvloop's loop.time() has 1 ms resolution.
        self.started_mono = time.monotonic()
        self.last_active = self.loop.time()
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
        self.identity: PeerIdentity | None = None
        self.upstream_identity: PeerIdentity | None = None
        self.decision: Any = None
        self.pending: list[bytes] = []
        self.pending_bytes = 0
        self.client_eof_pending = False
        self.early_upstream: list[bytes] | None = None  # a plaintext upstream spoke first
        self.upstream_eof_pending = False
        self.pump: NativePump | None = None  # set once the native pump relays this connection
        self.relay: str | None = None  # who relayed: "python" or "native" (flow record)
        self.bytes_from_client = 0
        self.bytes_to_client = 0
        self.first_eof: str | None = None
        self.connect_task: asyncio.Task[None] | None = None
        self.connecting: rawtransport.Connecting | None = None  # a bare-socket connect
        self.stage_timer: asyncio.TimerHandle | None = None
        self.idle_timer: asyncio.TimerHandle | None = None
        self.close_timer: asyncio.TimerHandle | None = None
        self.life_timer: asyncio.TimerHandle | None = None
        self.hs_started = 0.0
        self.egress: EgressSession | None = None  # egress listeners (enforcer.egress.session)

    # ===================================================================== side callbacks
    def side_connected(self, side: Side) -> None:
        if side is self.client:
            self._accepted()
        elif self.stage == Stage.CLOSED:  # client left while we were connecting
            side.close(abort=True)

    def side_data(self, side: Side, data: bytes) -> None:
        self.last_active = self.loop.time()
        if side is self.client:
            self._client_data(data)
        else:
            self._upstream_data(data)

    def side_eof(self, side: Side) -> None:
        if side is self.client and self.stage == Stage.PROXY:
            self._proxy_eof()
            return
        if side.tls is not None:
            side.tls.feed_eof()
            if side is self.client and self.stage == Stage.HANDSHAKE:
                self._fail("client_closed", "the client closed during the TLS handshake")
                return
            if side is not self.client and self.stage == Stage.UPSTREAM_TLS:
                self._fail("upstream_tls_failed", "the upstream closed during the TLS handshake",
                           upstream_reason="tls_handshake")
                return
            if not side.tls.peer_closed and self._unclean_eof(side):
                return
            self._read_tls(side)
            if not side.eof_in:  # FIN without close_notify, allowed by the listener
                self._eof(side)
            return
        self._eof(side)

    def _unclean_eof(self, side: Side) -> bool:
        """A FIN without close_notify from a TLS peer: unless it fell on a record boundary
        and its config allows it, the connection fails and both sockets reset (the other
        side must not take a cut stream for a whole one). True if it failed."""
        assert side.tls is not None
        kind = "truncated" if side.tls.mid_record() else "eof_without_close_notify"
        cfg = self.listener.cfg.tls if side is self.client else self.up_rt.cfg.tls
        if kind == "eof_without_close_notify" and cfg.allow_eof_without_close_notify:
            return False
        for other in (self.client, self.upstream):
            if other is not None and other.transport is not None:
                reset_on_close(other.transport)
        who = "client" if side is self.client else "upstream"
        self._fail(f"{who}_{kind}", unclean_detail(who, kind), action="allow", abort=True)
        return True

    def side_lost(self, side: Side, exc: Exception | None) -> None:
        if self.stage == Stage.CLOSED:
            return
        who = "client" if side is self.client else "upstream"
        if side.eof_in and side.eof_out and exc is None:
            return
        action = "allow" if self.stage == Stage.RELAY else "error"
        if isinstance(exc, OSError) and exc.errno == errno.ETIMEDOUT:
            self._peer_timeout(who, action)
            return
        reason = f"{who}_reset" if exc is not None else f"{who}_closed"
        self._fail(reason, str(exc) if exc else f"the {who} closed the connection",
                   action=action)

    def _peer_timeout(self, who: str, action: str) -> None:
        """The kernel gave up on a peer that stopped answering (keepalive probes or data
        unacknowledged past tcp_user_timeout: see tcpopts.py)."""
        self._fail(PEER_TIMEOUT, f"the {who} stopped answering (no ACK to keepalive probes "
                   "or data within the TCP timeouts): connection timed out", action=action)

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
        plane, lst = self.plane, self.listener
        transport = self.client.transport
        assert transport is not None
        self.flow_id = plane.new_flow_id()
        self.peer = _addr(transport.get_extra_info("peername"))
        self.local = _addr(transport.get_extra_info("sockname"))
        self.client_addr = self.peer
        plane.connection_opened(self)
        if plane.over_limit():
            self._fail("max_connections", "max_connections reached", abort=True)
            return
        if lst.cfg.transparent and not self._learn_original_dst(transport):
            return
        limits = lst.limits
        if limits.max_lifetime > 0:
            self.life_timer = self.loop.call_later(limits.max_lifetime, self._timeout,
                                                   "max_lifetime")
        pp = lst.cfg.proxy_protocol
        if pp.accept != "off":
            trusted = lst.is_trusted(self.peer[0] if self.peer else None)
            if not trusted and pp.accept == "required":
                self._proxy_error("untrusted_source",
                                  f"PROXY header required but {self._peer_text()} is not a "
                                  "trusted source")
                return
            self.stage = Stage.PROXY
            if trusted:
                self.proxy_parser = HeaderParser()
            silence = detect.proxy_silence(lst.cfg.tls.mode, pp.accept,
                                           lst.cfg.tls.detect_timeout, pp.timeout)
            if silence:  # a server-first client says nothing: no header, plaintext
                self._set_stage_timer(silence, "proxy_silence")
            else:
                self._set_stage_timer(pp.timeout, "proxy_protocol_timeout")
            return
        self._after_proxy(b"")

    def _learn_original_dst(self, transport: Any) -> bool:
        """A transparent listener's connection: where it was going, or refused (no loops)."""
        sock = transport.get_extra_info("socket")
        self.original_dst = origdst.read(sock) if sock is not None else None
        refused = origdst.classify(self.original_dst, self.local, self.plane.is_own_endpoint)
        if refused is None:
            return self._mesh_outbound() if self.listener.cfg.mesh == "outbound" else True
        if refused[0] == "not_redirected":
            self.original_dst = None  # the socket's own address, not a destination
        self._finish("deny", refused[0], detail=refused[1], abort=True)
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
        self._finish("deny", "mesh_external_denied", abort=True,
                     detail=f"{self.upstream_address()} is outside the mesh and mesh.external "
                     "does not allow plaintext to it")
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
        self._finish("deny", "mesh_plaintext_refused", abort=True,
                     detail=f"plaintext from {self._peer_text()} refused: mesh.inbound is strict")
        return False

    def _after_proxy(self, data: bytes) -> None:
        mode = self.listener.cfg.tls.mode
        if mode == "off":
            self._cancel_stage_timer()
            self._authorize(data)
            return
        detect = self.listener.cfg.tls.detect_timeout if mode == "auto" else 0.0
        if detect > 0:  # a silent client is plaintext after this (server-first protocols)
            self._set_stage_timer(detect, "detect_timeout")
        else:
            self._set_stage_timer(self.listener.limits.handshake_timeout, "handshake_timeout")
        if mode == "auto":
            self.stage = Stage.DETECT
            if data:
                self._detect(data)
            return
        if mode == "passthrough":
            passthrough.begin(self, data)
            return
        self._start_server_tls(data)

    # ===================================================================== client bytes
    def _client_data(self, data: bytes) -> None:
        stage = self.stage
        if stage >= Stage.AUTHORIZE:
            if self.client.tls is not None:
                self.client.tls.feed(data)
                self._read_tls(self.client)
            else:
                self._from_client(data)
        elif stage == Stage.HANDSHAKE:
            self._handshake_data(data)
        elif stage == Stage.PROXY:
            self._proxy_data(data)
        elif stage == Stage.DETECT:
            if self.peek is not None:
                passthrough.feed(self, data)
            else:
                self._detect(data)

    def _from_client(self, data: bytes | memoryview) -> None:
        if self.egress is not None and not self.egress.done:  # hook: the egress request
            rest = self.egress.feed(data)
            if rest is not None:
                self._authorize(rest)
            return
        self.bytes_from_client += len(data)
        self.listener.bytes_in.inc(len(data))
        if self.stage == Stage.RELAY and self.upstream is not None:
            self.upstream.send(data)
            return
        self.pending.append(bytes(data))  # may be a view of the shared TLS read buffer
        self.pending_bytes += len(data)
        if self.pending_bytes >= PENDING_LIMIT:
            self.client.pause(PAUSE_BUFFER)

    def _upstream_data(self, data: bytes) -> None:
        up = self.upstream
        assert up is not None
        if up.tls is None:
            self._to_client(data)
            return
        up.tls.feed(data)
        if self.stage == Stage.UPSTREAM_TLS:
            self._upstream_handshake()
        else:
            self._read_tls(up)

    def _to_client(self, data: bytes | memoryview) -> None:
        if self.stage != Stage.RELAY:
            self._early_upstream_data(data)
            return
        self.bytes_to_client += len(data)
        self.listener.bytes_out.inc(len(data))
        self.client.send(data)

    def _early_upstream_data(self, data: bytes | memoryview) -> None:
        """A plaintext upstream that speaks first (SMTP, MySQL and SSH banners) may do so
        before the relay has started: its bytes wait, as the client's do, and reach the
        client once the relay starts. A TLS upstream may not speak before the handshake."""
        if self.stage == Stage.CLOSED:
            return
        up = self.upstream
        assert up is not None
        if self.up_rt.client_ctx is not None:
            self._fail("upstream_tls_failed", f"upstream {self.upstream_address()} "
                       "sent data before the TLS handshake", upstream_reason="tls_handshake")
            return
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
            except ssl.SSLEOFError:
                data, eof = None, True  # TCP FIN without close_notify
            except ssl.SSLError as exc:
                who = "client" if side is self.client else "upstream"
                side.flush_tls()  # the fatal alert OpenSSL wrote goes before the close
                self._fail(f"{who}_tls_error", f"TLS error from the {who}: {exc.reason or exc}")
                return
            side.flush_tls()
            if data is not None:
                forward(data)
            if eof and not side.eof_in:
                self._eof(side)
            if data is None or len(data) < READ_CHUNK or self.stage == Stage.CLOSED:
                return

    # ===================================================================== PROXY protocol
    def _proxy_data(self, data: bytes) -> None:
        parser = self.proxy_parser
        if parser is None:  # untrusted source, accept: optional: refuse anything PROXY-like
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
        self._cancel_stage_timer()
        self._after_proxy(parser.rest)

    def _proxy_eof(self) -> None:
        """The client sent FIN during the PROXY stage: a truncated header (fail closed).

        With ``accept: optional``, a FIN before the first byte is a plain connect-and-close."""
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

    def _proxy_silence(self) -> None:
        """``accept: optional`` on a ``tls.mode: auto`` listener and the client said nothing
        for ``tls.detect_timeout``: no PROXY header and plaintext (a server-first protocol),
        the upstream is connected. A client that has started to send (bytes held, or
        waiting unread in the socket) gets the full PROXY timeout instead."""
        self.stage_timer = None
        parser = self.proxy_parser
        if self.sniff_buf or (parser is not None and parser.buffered) \
                or _has_unread(self.client.transport):
            self._set_stage_timer(self.listener.cfg.proxy_protocol.timeout,
                                  "proxy_protocol_timeout")
            return
        self._authorize(b"")

    def _proxy_error(self, reason: str, detail: str) -> None:
        self.plane.metrics.proxy_protocol_errors_total.labels(
            listener=self.listener.name, reason=reason).inc()
        self._fail(f"proxy_protocol_{reason}", detail, abort=True)

    # ===================================================================== TLS (server)
    def _detect(self, data: bytes) -> None:
        head = self.sniff_buf + data if self.sniff_buf else data
        kind = detect.classify(head)
        if kind is None:  # the start of a TLS header so far (at most 4 bytes are held)
            self.sniff_buf = head
            return
        self.sniff_buf = b""
        if kind == detect.TLS:
            self._start_server_tls(head)
        elif kind == detect.PLAIN:
            self._cancel_stage_timer()
            self._authorize(head)
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

    def _start_server_tls(self, data: bytes) -> None:
        ctx = self.listener.server_ctx
        assert ctx is not None
        if self.stage == Stage.DETECT and self.listener.cfg.tls.detect_timeout > 0:
            self._set_stage_timer(self.listener.limits.handshake_timeout, "handshake_timeout")
        self.stage = Stage.HANDSHAKE
        self.hs_started = time.monotonic()
        self.client.tls = TlsEngine(ctx, server_side=True,
                                    track_records=self.plane.native_relay)
        if data:
            self._handshake_data(data)

    def _handshake_data(self, data: bytes) -> None:
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
        reason = _tls_reason(exc)
        why: str | None = None
        if self.client.tls is not None:  # set by tlsconf.sni when strict_sni refused
            why = getattr(self.client.tls.obj, "enforcer_sni_refused", None)
        if why is not None:
            reason = "sni_refused"
        elif isinstance(exc, ssl.SSLCertVerificationError) and exc.verify_message:
            why = _tls_detail(exc)  # e.g. certificate revoked
        self.plane.metrics.tls_handshake_errors_total.labels(
            listener=self.listener.name, reason=reason).inc()
        self._fail("handshake_failed", f"TLS handshake with {self._peer_text()} failed: "
                   f"{why or exc.reason or exc}")

    def _server_handshake_done(self, tls: TlsEngine) -> None:
        self._cancel_stage_timer()
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
        if tls.session_reused and _expired(self.identity):
            self._fail("handshake_failed", f"{self._peer_text()} resumed a TLS session whose "
                       "client certificate has expired")
            return
        if not self.plane.cert_watch.authenticated(self):  # revocation, expiry: certwatch.py
            return
        self._authorize(b"")
        if self.stage != Stage.CLOSED:
            self._read_tls(self.client)  # application data that came with the Finished

    # ===================================================================== authorize
    def _authorize(self, data: bytes) -> None:
        self.stage = Stage.AUTHORIZE
        if self.listener.egress is not None:  # hook: SOCKS5 / CONNECT request first
            pending = egress.negotiate(self, data, self._authorize)
            if pending is None:
                return
            data = pending
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
        if decision is not None and not self._decided(decision):
            return
        # decision None: it depends on the upstream's verified identity; _start_relay
        # decides once that is known, before any client byte is forwarded.
        self.stage = Stage.CONNECT
        if data:
            self._from_client(data)
        self._start_connect()

    def _decided(self, decision: Any) -> bool:
        """Record and count the decision; on deny, close. Returns True for allow."""
        self.decision = decision
        self.listener.count_decision(decision.ruleset, decision.rule or "", decision.action)
        if decision.action != "allow":
            passthrough.denied(self)
            self._finish("deny", "denied", detail=flowrecord.deny_detail(decision))
            return False
        return self.plane.limit_gate.admit(self, decision)  # the rule's limits (limitgate.py)

    def _facts(self) -> FlowFacts:
        ip = _client_ip(self.client_addr[0]) if self.client_addr is not None else None
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
        )

    # ===================================================================== upstream
    def _start_connect(self) -> None:
        """Connect upstream: on a bare socket when the native pump will relay and no name
        needs resolving (see rawtransport.py), else with the loop's create_connection."""
        poller = self.plane.poller if self.plane.native_relay else None
        target = self.up_rt.raw_target if poller is not None else None
        if poller is not None and self.original_dst is not None:
            target = rawtransport.target_of(Address(*self.original_dst))
        if target is None:
            self.connect_task = spawn(self._connect(), name=f"connect-{self.flow_id}")
            return
        self.upstream = Side(self, is_client=False)
        self._set_stage_timer(self.listener.limits.connect_timeout, "upstream_connect_timeout")
        self.connecting = rawtransport.connect(
            self.loop, poller, target, functools.partial(self._raw_connected, time.monotonic()),
            self.up_rt.sockopts)

    def _raw_connected(self, started: float, transport: rawtransport.RawTransport | None,
                       exc: OSError | None) -> None:
        self.connecting = None  # (a cancelled connect never calls back: see _finish)
        try:
            side = self.upstream
            assert side is not None
            if transport is None:
                assert exc is not None
                side.lost = True  # never connected: no callback will come from it
                self._connect_failed(exc)
                return
            self._cancel_stage_timer()
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
            _warn_out_of_descriptors(self.listener.name, str(addr), exc)
        if self.egress is not None:  # hook: the egress client's reply says why
            self.egress.errno = exc.errno
        self._fail("upstream_connect_failed", f"connect to {addr} failed: {exc.strerror or exc}",
                   upstream_reason=None if counted else code)

    async def _connect(self) -> None:
        try:
            await self._connect_upstream()
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            self.internal_error(exc)
        finally:
            self.connect_task = None  # a finished task is not kept for the connection's life

    async def _connect_upstream(self) -> None:
        up = self.up_rt
        addr = self.upstream_address()
        side = Side(self, is_client=False)
        self.upstream = side
        started = time.monotonic()
        # The stage timer bounds the connect (cheaper than asyncio.timeout): when it fires,
        # _timeout fails the connection and _finish cancels this task.
        self._set_stage_timer(self.listener.limits.connect_timeout, "upstream_connect_timeout")
        try:
            if addr.is_unix:
                assert addr.path is not None
                await self.loop.create_unix_connection(lambda: side, addr.path)
            elif up.raw_target is not None:  # an IP address
                await self.loop.create_connection(lambda: side, addr.host, addr.port)
            else:
                sock = await dialer.dial(self.loop, addr.host, addr.port, up.addresses,
                                         self._attempt_failed)
                await self.loop.create_connection(lambda: side, sock=sock)
        except dialer.ResolveError as exc:
            self._fail("upstream_resolve_failed", exc.strerror or str(exc),
                       upstream_reason="resolve_failed")
            return
        except OSError as exc:
            # a host name's failed addresses were counted one by one (_attempt_failed)
            self._connect_failed(exc, counted=up.raw_target is None and not addr.is_unix)
            return
        self._cancel_stage_timer()
        up.observe_connect(time.monotonic() - started)
        if self.stage == Stage.CLOSED:
            side.close(abort=True)
            return
        if up.sockopts and side.transport is not None:
            _dead_peer_detection(side.transport, up.sockopts)
        self._upstream_connected(side)

    def _attempt_failed(self, addr: dialer.Addr, exc: OSError, fresh: bool) -> None:
        """One address of a host-name upstream refused or failed (another may work)."""
        up = self.up_rt
        code = errno.errorcode.get(exc.errno or 0, "error").lower()
        self.plane.metrics.upstream_errors_total.labels(upstream=up.name, reason=code).inc()
        if fresh:
            log.warning("upstream %s: connect to %s (%s) failed: %s; other addresses of the "
                        "name are tried first while it keeps failing", up.name,
                        _sockaddr_text(addr[1]), up.cfg.address, exc.strerror or exc)

    def _upstream_connected(self, side: Side) -> None:
        up = self.up_rt
        header = self.plane.proxy_header_for(self)
        if header and side.transport is not None:
            side.transport.write(header)
        if up.client_ctx is None:
            self._enter_relay()
            return
        self.stage = Stage.UPSTREAM_TLS
        self.hs_started = time.monotonic()
        self._set_stage_timer(self.listener.limits.handshake_timeout, "upstream_tls_timeout")
        side.tls = TlsEngine(up.client_ctx, server_side=False,
                             server_hostname=up.server_hostname, session=up.session,
                             native_session=self.plane.native_relay,
                             track_records=self.plane.native_relay)
        self._upstream_handshake()

    def _upstream_handshake(self) -> None:
        up = self.upstream
        assert up is not None and up.tls is not None
        try:
            done = up.tls.handshake()
        except ssl.SSLError as exc:
            up.flush_tls()
            self.plane.metrics.tls_handshake_errors_total.labels(
                listener=self.listener.name, reason=_tls_reason(exc)).inc()
            self._fail("upstream_tls_failed",
                       f"TLS handshake with upstream {self.upstream_address()} "
                       f"failed: {_tls_detail(exc)}", upstream_reason="tls_handshake")
            return
        if not done:
            up.flush_tls()
            return
        # Our last flight (TLS 1.3: the Finished) stays in the BIO until _enter_relay has
        # encrypted the client's first bytes behind it: one segment, one wake-up upstream.
        self.listener.observe_handshake("client", time.monotonic() - self.hs_started,
                                        up.tls.group())
        problem = self._upstream_identity_problem(up.tls)
        if problem is not None:
            up.flush_tls()
            self._fail("upstream_identity_mismatch", problem, upstream_reason="identity_mismatch")
            return
        self._cancel_stage_timer()
        self._enter_relay()

    def _upstream_identity_problem(self, tls: TlsEngine) -> str | None:
        """Why the upstream's certificate is not the one expected; None when it is."""
        der = tls.peer_cert_der()
        try:
            self.upstream_identity = identity_from_der(der) if der else None
        except IdentityError as exc:
            return f"cannot read the upstream certificate: {exc}"
        problem = self.plane.check_upstream_identity(self.up_rt,
                                                     self.upstream_identity)
        if problem is None and tls.session_reused and _expired(self.upstream_identity):
            problem = "the upstream's certificate in the resumed TLS session has expired"
        return problem

    # ===================================================================== relay
    def _enter_relay(self) -> None:
        """Decide (if still open), start relaying, then hand over to the native pump."""
        self._start_relay()
        up = self.upstream
        if up is not None:
            up.flush_tls()  # the handshake's last flight, with any first bytes behind it
        if self.stage != Stage.RELAY or up is None:
            return
        if up.tls is not None:
            self._read_tls(up)  # application data that came with the upstream's Finished
        self._go_native()
        if self.stage == Stage.RELAY and self.pump is None:  # pumps are checked by the plane
            self.idle_timer = self.loop.call_later(self.listener.limits.idle_timeout,
                                                   self._check_idle)
        if self.stage == Stage.RELAY and self.plane.open_events:
            self.plane.flowlog.emit(flowrecord.build(self, "allow", "", None, Stage.RELAY,
                                                     event="open"))

    def _start_relay(self) -> None:
        if self.decision is None and not self._decided(
                self.plane.decide(self.listener, self._facts())):
            return
        if self.egress is not None:  # hook: the egress client's success reply
            self.egress.established()
        self.stage = Stage.RELAY
        self.relay = "python"
        up = self.upstream
        assert up is not None
        pending, self.pending, self.pending_bytes = self.pending, [], 0
        for chunk in pending:
            up.send(chunk)
        self.client.resume(PAUSE_BUFFER)
        early, self.early_upstream = self.early_upstream, None
        if early:
            for chunk in early:
                self._to_client(chunk)
            up.resume(PAUSE_BUFFER)
        if self.client_eof_pending:
            self._eof(self.client)
        if self.upstream_eof_pending and self.stage == Stage.RELAY:
            self._eof(up)

    def _go_native(self) -> None:
        """Hand the relay to the native pump when this process uses it (see pump.py)."""
        up = self.upstream
        if self.stage != Stage.RELAY or not self.plane.native_relay or up is None:
            return
        lenient = (self.listener.cfg.tls.allow_eof_without_close_notify,
                   self.up_rt.cfg.tls.allow_eof_without_close_notify)
        self.pump = pump.hand_over(self.client, up, self.plane.poller, self._pump_event, lenient)
        if self.pump is not None:
            self.relay = "native"
            self.plane.pump_started(self)

    def _pump_event(self, kind: str, index: int, detail: object) -> None:
        """What the native pump reports: an end of stream, the end, or a failure."""
        try:
            who = "client" if index == 0 else "upstream"
            if kind == "eof":
                self._pump_eof(index)
            elif kind == "done":
                self._finish("allow", self.first_eof or "client_fin")
            elif kind == "reset":
                code = detail if isinstance(detail, int) else 0
                if code == errno.ETIMEDOUT:
                    self._peer_timeout(who, "allow")
                    return
                self._fail(f"{who}_reset", str(OSError(code, os.strerror(code))),
                           action="allow")
            elif kind == "tls_error":
                self._fail(f"{who}_tls_error", f"TLS error from the {who}: {detail}")
            elif kind == "unclean":  # the pump set both sockets to reset on close
                self._fail(f"{who}_{detail}", unclean_detail(who, str(detail)), action="allow",
                           abort=True)
            else:
                raise RuntimeError(f"native pump: {detail}")
        except Exception as exc:
            self.internal_error(exc)

    def _pump_eof(self, index: int) -> None:
        side = self.client if index == 0 else self.upstream
        other = self.upstream if index == 0 else self.client
        assert side is not None and other is not None
        side.eof_in = other.eof_out = True
        self._first_eof(index == 0)

    def pump_tick(self, now: float) -> None:
        """The plane's periodic visit (see plane.PUMP_TICK): counters catch up, a busy TLS
        end quiet since the last visit gives its buffers back, and a connection idle for
        its listener's idle_timeout closes."""
        assert self.pump is not None
        self.flush_pump_counts()
        self.pump.tick()
        if now - self.pump.last_active >= self.listener.limits.idle_timeout:
            self._timeout("idle_timeout")

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

    def _eof(self, side: Side) -> None:
        if side.eof_in:
            return
        side.eof_in = True
        is_client = side is self.client
        if self.stage != Stage.RELAY:
            # A half-close while the upstream is being reached is replayed by _start_relay
            # (a request then FIN, or FIN alone to read a banner: `nc -N`), as is a FIN that
            # follows a plaintext upstream's first words.
            if is_client and self.stage in (Stage.CONNECT, Stage.UPSTREAM_TLS):
                side.eof_in = False
                self.client_eof_pending = True
                return
            if not is_client and self.stage == Stage.CONNECT and self.early_upstream:
                side.eof_in = False
                self.upstream_eof_pending = True
                return
            who = "client" if is_client else "upstream"
            self._fail(f"{who}_closed", f"the {who} closed before the relay started")
            return
        self._first_eof(is_client)
        other = self.upstream if is_client else self.client
        assert other is not None
        other.send_eof()
        if other.eof_in:  # both directions have finished
            self._finish("allow", self.first_eof or "client_fin")

    def _first_eof(self, from_client: bool) -> None:
        """The first direction ended: remember which, and give the other close_timeout."""
        if self.first_eof is None:
            self.first_eof = "client_fin" if from_client else "upstream_fin"
            self.close_timer = self.loop.call_later(self.listener.limits.close_timeout,
                                                    self._timeout, "close_timeout")

    def _check_idle(self) -> None:
        if self.stage == Stage.CLOSED:
            return
        idle = self.loop.time() - self.last_active
        limit = self.listener.limits.idle_timeout
        if idle >= limit:
            self._timeout("idle_timeout")
        else:
            self.idle_timer = self.loop.call_later(limit - idle, self._check_idle)

    # ===================================================================== timers
    def _set_stage_timer(self, delay: float, reason: str) -> None:
        self._cancel_stage_timer()
        self.stage_timer = self.loop.call_later(delay, self._timeout, reason)

    def _cancel_stage_timer(self) -> None:
        if self.stage_timer is not None:
            self.stage_timer.cancel()
            self.stage_timer = None

    def _timeout(self, reason: str) -> None:
        if self.stage == Stage.CLOSED:
            return
        if reason == "proxy_protocol_timeout":
            optional = self.listener.cfg.proxy_protocol.accept == "optional"
            parser = self.proxy_parser
            silent = not self.sniff_buf and not (parser is not None and parser.buffered)
            self._proxy_error("timeout", "nothing received in time (with accept: optional the "
                              "client must send first)" if optional and silent
                              else "no complete PROXY header in time")
            return
        if reason == "proxy_silence" and self.stage == Stage.PROXY:
            self._proxy_silence()
            return
        if reason == "detect_timeout" and self.stage == Stage.DETECT:
            self.stage_timer = None
            if _has_unread(self.client.transport):  # a late loop turn, not a silent client
                self._set_stage_timer(self.listener.limits.handshake_timeout, reason)
                return
            self._authorize(b"")  # the client said nothing: plaintext, the server speaks
            return
        if reason == "upstream_connect_timeout":
            self._fail(reason, f"connect to {self.upstream_address()} timed out",
                       upstream_reason="connect_timeout")
            return
        if reason == "handshake_timeout":
            self.plane.metrics.tls_handshake_errors_total.labels(
                listener=self.listener.name, reason="timeout").inc()
        if reason == "upstream_tls_timeout":
            self.plane.metrics.upstream_errors_total.labels(
                upstream=self.up_rt.name, reason="tls_timeout").inc()
        action = "allow" if self.stage == Stage.RELAY else "error"
        detail = f"{reason.replace('_', ' ')} reached"
        if reason in RESETTING_TIMEOUTS and self.listener.limits.timeout_close == "rst":
            self._finish(action, f"{reason}_rst", detail=f"{detail}; both sockets reset "
                         "(limits.timeout_close: rst)", abort=True, reset=True)
            return
        self._finish(action, reason, detail=detail, abort=True)

    def drain_close(self) -> None:
        """Called when the drain deadline passes with this connection still open."""
        if self.stage != Stage.CLOSED:
            action = "allow" if self.stage == Stage.RELAY else "error"
            self._finish(action, "drain", detail="closed at the end of the drain", abort=True)

    def policy_revoked(self, decision: Any) -> None:
        """A reloaded ruleset now denies this open connection."""
        if self.stage != Stage.CLOSED:
            self.decision = decision
            self._finish("deny", "policy_reload", detail="denied after a ruleset reload",
                         abort=True)

    def close_with(self, action: str, reason: str, detail: str, decision: Any = None, *,
                   abort: bool = False) -> None:
        """Closed by a rule's limits (limitgate.py) or its certificate (certwatch.py)."""
        if self.stage != Stage.CLOSED:
            if decision is not None:
                self.decision = decision
            self._finish(action, reason, detail=detail, abort=abort)

    # ===================================================================== ending
    def _fail(self, reason: str, detail: str, *, action: str = "error", abort: bool = False,
              upstream_reason: str | None = None) -> None:
        if self.stage == Stage.CLOSED:
            return
        if upstream_reason is not None:
            self.plane.metrics.upstream_errors_total.labels(
                upstream=self.up_rt.name, reason=upstream_reason).inc()
        self._finish(action, reason, detail=detail, abort=abort)

    def _finish(self, action: str, reason: str, *, detail: str | None = None,
                abort: bool = False, reset: bool = False) -> None:
        if self.stage == Stage.CLOSED:
            return
        stage_reached = self.stage
        self.stage = Stage.CLOSED
        if self.egress is not None:  # hook: the egress client's refusal, if no reply yet
            self.egress.closing(action, reason)
        if stage_reached == Stage.RELAY:
            self._keep_session()
        if self.pump is not None:
            self.flush_pump_counts()
            self.pump.close(reset)
            self.plane.pump_stopped(self)
        for timer in (self.stage_timer, self.idle_timer, self.close_timer, self.life_timer):
            if timer is not None:
                timer.cancel()
        self.stage_timer = self.idle_timer = self.close_timer = self.life_timer = None
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
                side.close(abort=abort, reset=reset)
        if self.client.tls is not None and self.plane.native_relay \
                and not self.client.tls.detached \
                and self.tls_info is not None and reason not in TLS_FAILURES:
            native.keep_session(self.client.tls.state)
        if not abort:
            self.plane.schedule_abort(self)
        self.plane.connection_closed(self, flowrecord.build(self, action, reason, detail,
                                                           stage_reached))
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
        if self.stage != Stage.CLOSED or not self.client.lost:
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
        if self.stage != Stage.CLOSED:
            try:
                self._finish("error", "internal_error", detail=f"internal error: {exc!r}",
                             abort=True)
            except Exception:
                log.exception("while closing flow %s", self.flow_id)
                self.stage = Stage.CLOSED
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


def _warn_out_of_descriptors(listener: str, upstream: str, exc: OSError) -> None:
    """A WARNING without traceback, at most one every WARN_EVERY seconds."""
    now = time.monotonic()
    _warned["since"] += 1
    if now - _warned["at"] < WARN_EVERY:
        return
    log.warning("listener %s: cannot open a socket to upstream %s (%s): %d connection(s) "
                "failed this way since the last warning (enforcer_upstream_errors_total)",
                listener, upstream, exc.strerror or exc, _warned["since"])
    _warned["at"], _warned["since"] = now, 0


def _sockaddr_text(sockaddr: Any) -> str:
    host, port = str(sockaddr[0]), int(sockaddr[1])
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def _dead_peer_detection(transport: Any, options: tuple[tuple[int, int, int], ...]) -> None:
    """Keepalive and user timeout on an upstream socket the loop connected (a host name),
    unless the name led to this host (see tcpopts.py)."""
    sock = transport.get_extra_info("socket")
    peer = transport.get_extra_info("peername")
    if sock is None or not isinstance(peer, tuple) or tcpopts.is_local_host(str(peer[0])):
        return
    try:
        tcpopts.apply(sock, options)
    except OSError as exc:
        log.warning("cannot set TCP keepalive/user timeout on an upstream socket: %s", exc)


@functools.lru_cache(maxsize=4096)
def _client_ip(text: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    """The policy's client address (zone id dropped); parsed once per distinct address."""
    try:
        return ipaddress.ip_address(text.split("%", 1)[0])
    except ValueError:
        return None


def _header_flow_id(unique_id: bytes | None) -> str | None:
    """A PROXY unique_id TLV usable as a flow id (1-128 printable ASCII), else None."""
    if not unique_id or len(unique_id) > 128 or not all(0x21 <= b < 0x7F for b in unique_id):
        return None
    return unique_id.decode("ascii")


def _has_unread(transport: Any) -> bool:
    """Whether the client's bytes (or FIN) wait in the socket unread: a busy loop can run
    the detect timer before the read callback of data that came in time."""
    sock = transport.get_extra_info("socket") if transport is not None else None
    if sock is None:
        return False
    try:
        with socket.socket(fileno=os.dup(sock.fileno())) as dup:
            dup.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT)
    except (BlockingIOError, InterruptedError):
        return False
    except OSError:
        return True  # an error is pending: let the read path report it
    return True


def _addr(value: object) -> tuple[str, int] | None:
    if isinstance(value, tuple) and len(value) >= 2:
        return str(value[0]), int(value[1])
    if isinstance(value, str) and value:
        return value, 0
    return None


def _tls_detail(exc: ssl.SSLError) -> str:
    """OpenSSL's reason, plus the verifier's message when a certificate was refused."""
    if isinstance(exc, ssl.SSLCertVerificationError) and exc.verify_message:
        return f"{exc.reason}: {exc.verify_message}"  # e.g. Hostname mismatch, ...
    return str(exc.reason or exc)


def _tls_reason(exc: ssl.SSLError) -> str:
    """A short, low-cardinality label for a handshake failure."""
    text = (exc.reason or "").lower().replace("_", " ")  # OpenSSL: PEER_DID_NOT_RETURN_...
    if "wrong version number" in text or "http request" in text:
        return "not_tls"
    if "certificate required" in text or "peer did not return a certificate" in text:
        return "no_client_cert"
    if "unknown ca" in text or "certificate verify failed" in text:
        return "bad_certificate"
    if "certificate" in text:
        return "bad_certificate"
    if "version" in text or "protocol" in text:
        return "protocol_version"
    if "cipher" in text:
        return "no_shared_cipher"
    if isinstance(exc, ssl.SSLEOFError) or "unexpected eof" in text:
        return "eof"
    return "other"


def _expired(identity: PeerIdentity | None) -> bool:
    """OpenSSL does not look at the certificate again when a session resumes."""
    return identity is not None and identity.not_after <= datetime.datetime.now(datetime.UTC)
