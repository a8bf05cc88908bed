"""The data plane: builds listener/upstream runtime state from a ``Config``, binds the
listeners, tracks open connections, and answers the questions connections ask (policy
decision, PROXY header to send, upstream identity check). Drain stops accepting, waits
for open connections up to a deadline, then closes what is left.

Metrics and the flow log are passed in as objects, never imported as globals.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import logging
import os
import socket
import ssl
import time
from collections.abc import Mapping
from typing import Any

from enforcer.config.model import (
    CIPHER_SUITES,
    Address,
    Config,
    ListenerConfig,
    ListenerTlsConfig,
    ProxyProtocolSendConfig,
    UpstreamConfig,
    UpstreamTlsConfig,
)
from enforcer.config.passthrough import SniRouter
from enforcer.dataplane import native, tcpopts
from enforcer.dataplane.acceptor import Acceptor
from enforcer.dataplane.certwatch import CertWatch
from enforcer.dataplane.connection import Connection
from enforcer.dataplane.context import ListenerRuntime, UpstreamRuntime
from enforcer.dataplane.limitgate import LimitGate
from enforcer.dataplane.loopwatch import LoopPoller
from enforcer.dataplane.sockets import (
    dual_stack,
    dual_stack_socket,
    remove_stale_unix_socket,
    split_ports,
)
from enforcer.dataplane.tlsengine import SESSION_GETTER_LEAKS
from enforcer.observe.flowid import new_flow_id
from enforcer.policy import CompiledRuleset, Decision, FlowFacts, compile_rulesets
from enforcer.policy.globs import identity_set
from enforcer.tlsconf.context import build_client_context, build_listener_context, tls13_suites
from enforcer.tlsconf.groups import GroupsError, apply_groups
from enforcer.tlsconf.identity import PeerIdentity
from enforcer.tlsconf.material import LoadedMaterial, MaterialError, load_material
from enforcer.tlsconf.sni import name_matches
from enforcer.tlsconf.tickets import ROTATION_PERIOD, rotation_epoch, ticket_keys

log = logging.getLogger("enforcer.dataplane")


# Native pumps are visited by one plane-wide tick (no timer per connection): their bytes
# reach the counters, busy TLS ends that went quiet give their buffers back (_pump.c,
# burst_over) and idle timeouts are checked, every second or, for short idle timeouts,
# every quarter of the shortest (but at most ten times a second).
PUMP_TICK = 1.0
PUMP_TICK_MIN = 0.1


class StartupError(Exception):
    """The data plane cannot start; ``kind`` picks the exit code (config, tls, bind)."""

    def __init__(self, kind: str, message: str) -> None:
        super().__init__(message)
        self.kind = kind


class DataPlane:
    def __init__(self, cfg: Config, *, metrics: Any, flowlog: Any,
                 ticket_secret: bytes | None = None) -> None:
        """``ticket_secret``: the supervisor's, in a worker process (``tlsconf.tickets``)."""
        self.cfg = cfg
        self.metrics = metrics
        self.flowlog = flowlog
        self.node_name = cfg.node.name
        self.listeners: list[ListenerRuntime] = []
        self.rulesets: Mapping[str, CompiledRuleset] = {}
        self.active: set[Connection] = set()
        self.limit_gate = LimitGate(metrics)  # rules' limits (policy.limits)
        self.materials: dict[str, LoadedMaterial] = {}
        self.cert_watch = CertWatch(metrics, self.materials)  # tls.close_on_revocation ...
        self.max_connections = cfg.limits.max_connections
        self.sockopts = tcpopts.socket_options(cfg.limits)  # dead-peer detection
        self.open_events = cfg.flow_log.open_events
        self.draining = False
        self.native_relay = False  # decided in build() from cfg.relay
        self.ticket_secret = ticket_secret
        self.ticket_epoch = 0  # rotation period of the ticket keys in use (tlsconf.tickets)
        self.ticket_period = float(ROTATION_PERIOD)  # seconds (tests shorten it)
        self.pumped: set[Connection] = set()  # connections relayed by the native pump
        # the native pumps' epoll set, watched by the loop (loopwatch.LoopPoller without
        # the native relay): every connection's sockets are watched by it before the relay
        self.poller: Any = None
        self._pump_tick: asyncio.TimerHandle | None = None
        self._pump_every = PUMP_TICK
        self.warned_no_resumption = False
        self.owns_unix_paths: list[str] = []
        self.mesh_upstream: UpstreamRuntime | None = None  # mTLS to mesh peers (mesh:)
        self.ready = False
        self._idle = asyncio.Event()
        self._idle.set()

    # ------------------------------------------------------------------ build and bind
    def build(self) -> None:
        """Load materials, build TLS contexts, compile rulesets (no sockets yet)."""
        self.native_relay = _choose_relay(self.cfg.relay)
        self.enter_ticket_period()
        if self.ticket_secret is not None and not self.native_relay:
            log.warning("workers do not share session tickets without the native extension "
                        "(%s): a resumption that reaches another worker makes a full "
                        "handshake", "relay: python" if self.cfg.relay == "python"
                        else native.unavailable_reason())
        errors: list[str] = []
        for name, mcfg in self.cfg.tls.items():
            try:
                self.materials[name] = load_material(mcfg)
            except MaterialError as exc:
                errors.append(str(exc))
        if errors:
            raise StartupError("tls", "\n".join(errors))
        self.rulesets = compile_rulesets(self.cfg.rulesets)
        upstreams = {name: self._build_upstream(u) for name, u in self.cfg.upstreams.items()}
        if self.cfg.mesh.enabled:
            self.mesh_upstream = self._build_mesh_upstream()
        for lcfg in self.cfg.listeners:
            self.listeners.append(self._build_listener(lcfg, upstreams))
        for name, material in self.materials.items():
            if material.not_after is not None:
                self.metrics.certificate_expiry_timestamp_seconds.labels(material=name).set(
                    material.not_after.timestamp())

    def _build_upstream(self, ucfg: UpstreamConfig) -> UpstreamRuntime:
        up = self._upstream_runtime(ucfg)
        addr = ucfg.address
        if not addr.is_unix and not tcpopts.is_local_host(addr.host):
            up.sockopts = self.sockopts  # a host name resolving to loopback: see _connect
        return up

    def _upstream_runtime(self, ucfg: UpstreamConfig) -> UpstreamRuntime:
        tls = ucfg.tls
        connect = self.metrics.upstream_connect_seconds
        if tls.mode == "off":
            return UpstreamRuntime(ucfg, None, None, connect_histogram=connect)
        material = self.materials.get(tls.material) if tls.material else None
        by_identity = not tls.verify.empty and tls.server_name is None
        hostname = tls.server_name or (None if ucfg.address.is_unix or ucfg.address.original
                                       else ucfg.address.host)
        if by_identity:
            # The server is checked against verify.{uri,dns,cn} after the handshake; SNI
            # still carries a name when the address is one.
            hostname = None if _is_ip(ucfg.address.host) else hostname
        if hostname is None and not by_identity:
            raise StartupError("config", f"upstreams.{ucfg.name}.tls: give server_name or "
                               "verify (a unix socket or original_destination has no host "
                               "name to check)")
        try:
            ctx = self.client_context(material, mutual=tls.mode == "mtls",
                                      check_hostname=not by_identity)
        except MaterialError as exc:
            raise StartupError("tls", str(exc)) from None
        return UpstreamRuntime(ucfg, ctx, hostname, connect_histogram=connect)

    def _build_mesh_upstream(self) -> UpstreamRuntime:
        """Outbound to mesh peers: mTLS with the mesh material to the original destination;
        the chain is verified against its CA, the peer's identity by the rules
        (``to.server_identities``), after the handshake."""
        mesh = self.cfg.mesh
        assert mesh.material is not None
        ucfg = UpstreamConfig("mesh", Address(original=True),
                              UpstreamTlsConfig("mtls", mesh.material), ProxyProtocolSendConfig())
        # No host-name check: the destination is a pod address and a mesh peer's certificate
        # names a SPIFFE ID, not that address. Verification stays fail closed: the chain must
        # verify against the mesh CA only (CERT_REQUIRED), the verified identity goes into
        # the flow record, and rules pin it (to.server_identities) before any client byte
        # is forwarded (docs/interception.md).
        try:
            ctx = self.client_context(self.materials[mesh.material], mutual=True,
                                      check_hostname=False)
        except MaterialError as exc:
            raise StartupError("tls", f"mesh: {exc}") from None
        return UpstreamRuntime(ucfg, ctx, None, connect_histogram=self.metrics.upstream_connect_seconds)

    def mesh_route(self, dest: tuple[str, int]) -> str | None:
        """How an outbound connection to ``dest`` goes: ``mtls`` (a mesh peer),
        ``external`` (plaintext, allowed by mesh.external) or None (refused)."""
        mesh = self.cfg.mesh
        try:
            ip = ipaddress.ip_address(dest[0].split("%", 1)[0])
        except ValueError:
            return None
        if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
            ip = ip.ipv4_mapped
        if any(net.contains(ip, dest[1]) for net in mesh.networks):
            return "mtls"
        if mesh.external_default == "plaintext" or any(
                net.contains(ip, dest[1]) for net in mesh.external_plaintext):
            return "external"
        return None

    def _build_listener(self, lcfg: ListenerConfig,
                        upstreams: Mapping[str, UpstreamRuntime]) -> ListenerRuntime:
        default = upstreams.get(lcfg.upstream)  # none: a strict_sni passthrough listener
        upstream = default if default is not None else upstreams[lcfg.tls.routes[0].upstream]
        lst = ListenerRuntime(cfg=lcfg, plane=self, upstream=upstream, limits=self.cfg.limits,
                              trusted=lcfg.proxy_protocol.trusted_sources)
        if lcfg.tls.mode == "passthrough":
            lst.sni_router = SniRouter(lcfg.tls.routes, upstreams, default)
        if lcfg.proxy_protocol.trusted_identities:
            lst.proxy_identities = identity_set(lcfg.proxy_protocol.trusted_identities)
        _bind_metrics(lst, self.metrics)
        if lcfg.egress is not None:
            lst.egress = _egress_runtime(lcfg, self.metrics)
        if lcfg.tls.mode in ("terminate", "auto"):
            assert lcfg.tls.material is not None
            try:
                lst.server_ctx = self.listener_context(self.materials[lcfg.tls.material],
                                                       lcfg.tls, lcfg.name)
            except MaterialError as exc:
                raise StartupError("tls", str(exc)) from None
        return lst

    def listener_context(self, material: LoadedMaterial, tls: ListenerTlsConfig,
                         name: str) -> ssl.SSLContext:
        """A listener's server context: at startup, and on every reload and key rotation."""
        ctx = build_listener_context(material, tls, name)
        self._set_tls13_suites(ctx, material)
        self._set_groups(ctx, material)
        if self.native_relay:
            native.use_session_cache(ctx, stateful=not self.shares_tickets)
        if self.shares_tickets:
            assert self.ticket_secret is not None
            # The process's period, not the clock's: a context rebuilt by a reload just
            # after the hour keeps the keys of its siblings until rotate_ticket_keys
            # moves them all (and every worker) to the new period together.
            keys = ticket_keys(self.ticket_secret, name, material.fingerprint,
                               self.ticket_epoch)
            try:
                native.set_ticket_keys(ctx, keys)
            except RuntimeError as exc:
                raise MaterialError(f"listeners.{name}: session-ticket keys: {exc}") from None
        return ctx

    def enter_ticket_period(self) -> int:
        """Record the rotation period the wall clock is in: listener contexts built from now
        on derive their ticket keys for it (at startup, and by rotate_ticket_keys on the
        hour, so every worker rotates together)."""
        self.ticket_epoch = rotation_epoch(time.time(), self.ticket_period)
        return self.ticket_epoch

    def ticket_keys_due(self) -> bool:
        """Whether the wall clock has left the rotation period of the ticket keys in use."""
        return rotation_epoch(time.time(), self.ticket_period) != self.ticket_epoch

    @property
    def shares_tickets(self) -> bool:
        """Whether listener contexts use the ticket keys every worker derives alike."""
        return self.ticket_secret is not None and self.native_relay

    def client_context(self, material: LoadedMaterial | None, *, mutual: bool,
                       check_hostname: bool) -> ssl.SSLContext:
        """An upstream's client context: at startup and on every reload and key rotation."""
        ctx = build_client_context(material, mutual=mutual, check_hostname=check_hostname)
        self._set_tls13_suites(ctx, material)
        self._set_groups(ctx, material)
        if self.native_relay:
            native.track_sessions(ctx)
        elif SESSION_GETTER_LEAKS and not self.warned_no_resumption:
            self.warned_no_resumption = True
            log.warning("upstream TLS sessions are not resumed with the Python relay on this "
                        "Python (its ssl module leaks a session each time one is read: "
                        "CPython gh-116810, fixed in 3.12.8 and 3.13.1); the native "
                        "extension resumes without reading them")
        return ctx

    def _set_tls13_suites(self, ctx: ssl.SSLContext, material: LoadedMaterial | None) -> None:
        """TLS 1.3 suites in the material's order, with the extension; without it (relay:
        python) OpenSSL's own order of all three, and a narrowed list is refused."""
        where = f"tls.{material.name}.cipher_suites" if material else "cipher_suites"
        if self.native_relay:
            try:
                native.set_ciphersuites(ctx, tls13_suites(material))
            except RuntimeError as exc:
                raise MaterialError(f"{where}: {exc}") from None
        elif material is not None and set(material.cipher_suites) != set(CIPHER_SUITES):
            why = ("relay: python" if self.cfg.relay == "python"
                   else native.unavailable_reason())
            raise MaterialError(f"{where}: leaving out TLS 1.3 suites needs the native "
                                f"extension ({why})")

    def _set_groups(self, ctx: ssl.SSLContext, material: LoadedMaterial | None) -> None:
        """Key-exchange groups: the material's ``groups``, or the default (see
        ``tlsconf.groups``); raises MaterialError naming the key when they cannot be set."""
        cfg = self.cfg.tls.get(material.name) if material is not None else None
        key = f"tls.{material.name}.groups" if material is not None else "groups"
        try:
            apply_groups(ctx, cfg.groups if cfg is not None else None, key)
        except GroupsError as exc:
            raise MaterialError(str(exc)) from None

    async def bind(self, sockets: Mapping[str, socket.socket] | None = None) -> None:
        """Listen on every listener; ``sockets`` are ready-made ones (worker processes)."""
        loop = asyncio.get_running_loop()
        if self.poller is None:  # what watches every connection's sockets before the relay
            self.poller = native.new_poller(loop) if self.native_relay else LoopPoller(loop)
        # Listeners accept into bare sockets (see acceptor.py): the loop binds them but
        # does not serve them.
        split = split_ports(lst.cfg.listen for lst in self.listeners)
        for lst in self.listeners:
            addr = lst.cfg.listen
            factory = _not_served
            try:
                if sockets is not None:
                    if addr.is_unix:
                        server = await loop.create_unix_server(
                            factory, sock=sockets[lst.name], start_serving=False)
                    else:  # bound, not listening yet (sockets.worker_socket_for)
                        server = await loop.create_server(
                            factory, sock=sockets[lst.name], backlog=1024,
                            start_serving=False)
                elif addr.is_unix:
                    assert addr.path is not None
                    remove_stale_unix_socket(addr.path)
                    server = await loop.create_unix_server(factory, addr.path, backlog=1024,
                                                           start_serving=False)
                    self.owns_unix_paths.append(addr.path)
                elif dual_stack(addr.host) and addr.port not in split:  # [::]: IPv4 too
                    # (the loop would set IPV6_V6ONLY)
                    sock = dual_stack_socket(addr)
                    try:
                        server = await loop.create_server(factory, sock=sock, backlog=1024,
                                                          start_serving=False)
                    except BaseException:
                        sock.close()
                        raise
                else:
                    server = await loop.create_server(
                        factory, addr.host or None, addr.port, backlog=1024, reuse_address=True,
                        start_serving=False)
                lst.server = server  # closed by close_servers() if the next step fails
                self._set_listener_options(lst, server)
                lst.server = Acceptor(server, lst, self.poller, Connection)
            except OSError as exc:
                await self.close_servers()
                raise StartupError("bind", f"listeners.{lst.name}.listen: cannot bind {addr}: "
                                   f"{exc.strerror or exc}") from None
            _note_bound(lst)
            self.metrics.register_listener(lst.name)
            log.info("listener %s bound on %s (tls %s, upstream %s)", lst.name, lst.bound,
                     lst.cfg.tls.mode, lst.upstream.cfg.address)
        self.ready = True

    def _set_listener_options(self, lst: ListenerRuntime, server: Any) -> None:
        """Dead-peer detection for a listener's connections: they inherit the options from
        the listening socket (see tcpopts.py). Not for local-only listeners."""
        addr = lst.cfg.listen
        if not self.sockopts or addr.is_unix or (addr.host and tcpopts.is_local_host(addr.host)):
            return
        for sock in server.sockets:
            if sock.family in (socket.AF_INET, socket.AF_INET6):
                tcpopts.apply(sock, self.sockopts)

    async def start(self) -> None:
        self.build()
        await self.bind()

    # ------------------------------------------------------------------ connection hooks
    def new_flow_id(self) -> str:
        return new_flow_id()

    def connection_opened(self, conn: Connection) -> None:
        self.active.add(conn)
        self._idle.clear()
        conn.listener.active += 1
        conn.listener.active_gauge.inc()

    def pump_started(self, conn: Connection) -> None:
        self.pumped.add(conn)
        self._pump_every = max(PUMP_TICK_MIN, min(self._pump_every,
                                                  conn.listener.limits.idle_timeout / 4))
        if self._pump_tick is None:
            self._pump_tick = asyncio.get_running_loop().call_later(self._pump_every,
                                                                    self._tick_pumps)

    def pump_stopped(self, conn: Connection) -> None:
        self.pumped.discard(conn)

    def _tick_pumps(self) -> None:
        """Bytes moved by native pumps reach enforcer_bytes_total while transfers run, and
        pumped connections idle past their listener's idle_timeout close."""
        self._pump_tick = None
        now = time.monotonic()
        for conn in list(self.pumped):  # a tick may close (and so remove) connections
            conn.pump_tick(now)
        if self.pumped:
            self._pump_tick = asyncio.get_running_loop().call_later(self._pump_every,
                                                                    self._tick_pumps)

    def over_limit(self) -> bool:
        return len(self.active) > self.max_connections

    def connection_closed(self, conn: Connection, record: dict[str, Any]) -> None:
        self.cert_watch.closed(conn)
        if conn in self.active:
            self.active.discard(conn)
            conn.listener.active -= 1
        lst = conn.listener
        lst.active_gauge.dec()
        lst.totals[record["action"]].inc()
        lst.duration.observe(record["duration_s"])
        self.flowlog.emit(record)
        if not self.active:
            self._idle.set()

    def schedule_abort(self, conn: Connection) -> None:
        """After a graceful close, make sure both sockets are gone within close_timeout."""
        for side in (conn.client, conn.upstream):
            t = side.transport if side is not None else None
            if t is not None and not side.lost and t.get_write_buffer_size() > 0:  # type: ignore[union-attr]
                asyncio.get_running_loop().call_later(self.cfg.limits.close_timeout,
                                                      conn.abort_sockets)
                return

    def decide_before_upstream(self, lst: ListenerRuntime, facts: FlowFacts) -> Decision | None:
        """The decision if it is certain before connecting; None when it depends on the
        upstream's verified identity (rules with ``to.server_identities``)."""
        ruleset = self.rulesets.get(lst.cfg.ruleset)
        if ruleset is None or not ruleset.uses_server_identity:
            return self.decide(lst, facts)
        try:
            return ruleset.decide_before_upstream(facts)
        except Exception:  # fail closed
            log.exception("ruleset %s failed to evaluate; denying", lst.cfg.ruleset)
            return Decision("deny", lst.cfg.ruleset, None, "error")

    def decide(self, lst: ListenerRuntime, facts: FlowFacts) -> Decision:
        ruleset = self.rulesets.get(lst.cfg.ruleset)
        if ruleset is None:
            return Decision("deny", lst.cfg.ruleset, None, "error")
        try:
            return ruleset.decide(facts)
        except Exception:  # fail closed
            log.exception("ruleset %s failed to evaluate; denying", lst.cfg.ruleset)
            return Decision("deny", lst.cfg.ruleset, None, "error")

    def check_upstream_identity(self, up: UpstreamRuntime, ident: PeerIdentity | None) -> str | None:
        verify = up.cfg.tls.verify
        if verify.empty:
            return None
        if ident is None:
            return f"upstream {up.cfg.address} presented no certificate"
        if verify.uri and not set(verify.uri) & set(ident.uri):
            return (f"upstream {up.cfg.address} identity {list(ident.uri)} is not one of "
                    f"verify.uri {list(verify.uri)}")
        if verify.dns and not any(name_matches(p, n) for p in verify.dns for n in ident.dns):
            return (f"upstream {up.cfg.address} DNS names {list(ident.dns)} match none of "
                    f"verify.dns {list(verify.dns)}")
        if verify.cn and ident.cn not in verify.cn:
            return f"upstream {up.cfg.address} CN {ident.cn!r} is not one of verify.cn"
        return None

    def is_own_endpoint(self, ip: str, port: int) -> bool:
        """Whether ``ip:port`` is one of this process's TCP listeners (a transparent
        listener must not connect there: it would loop)."""
        for lst in self.listeners:
            listen = lst.cfg.listen
            if listen.is_unix or lst.local_port != port:
                continue
            if listen.host not in ("", "0.0.0.0", "::"):
                if _same_ip(listen.host, ip):
                    return True
            elif _is_local_ip(ip):
                return True
        return False

    def proxy_header_for(self, conn: Connection) -> bytes | None:
        pp = conn.up_rt.cfg.proxy_protocol
        if pp.send == "off":
            return None
        # imported here: only upstreams that send PROXY headers need the builders
        from enforcer.proxyproto import build_v1, build_v2

        src = _ip_endpoint(conn.client_addr)
        dst = _ip_endpoint(conn.original_dst or conn.local)
        received = conn.proxy_header
        if received is not None and received.command == "PROXY" and received.destination:
            dst = _ip_endpoint(received.destination) or dst
        # An IPv4/IPv6 mix is written as IPv4-mapped IPv6 by the builders (as HAProxy does).
        if src is not None and dst is not None:
            if pp.send == "v1":
                return build_v1(src, dst)
            return build_v2(src, dst, tlvs=_send_tlvs(conn, pp.tlvs))
        # A unix socket: v1 UNKNOWN, v2 LOCAL with AF_UNSPEC (what HAProxy sends for such
        # clients; it resets a PROXY command without addresses). The receiver keeps its own
        # socket addresses.
        if pp.send == "v1":
            return build_v1(None, None)
        return build_v2(None, None, command="LOCAL", tlvs=_send_tlvs(conn, pp.tlvs))

    # ------------------------------------------------------------------ reload
    def swap_rulesets(self, compiled: Mapping[str, CompiledRuleset]) -> int:
        """Use new rulesets for new connections (one assignment: a connection sees either
        the old or the new set, never a mix). Open connections keep their decision, unless
        their ruleset says ``reevaluate_on_reload``: then each connection already allowed
        is decided again, and closed (flow record: action deny, close policy_reload, the
        deciding rule and reason) if the new rules deny it. Returns how many were closed."""
        self.rulesets = compiled
        revoked = 0
        for conn in list(self.active):
            rs = compiled.get(conn.listener.cfg.ruleset)
            previous = conn.decision
            if rs is None or not rs.reevaluate_on_reload or previous is None \
                    or previous.action != "allow":
                continue  # not yet decided (it will use the new rules), or already denied
            decision = self.decide(conn.listener, conn._facts())
            if decision.action == "allow":
                continue
            conn.listener.count_decision(decision.ruleset, decision.rule or "", decision.action)
            log.info("flow %s on %s: denied after the ruleset reload (%s%s); closing",
                     conn.flow_id, conn.listener.name, decision.reason,
                     f" rule {decision.rule}" if decision.rule else "")
            conn.policy_revoked(decision)
            revoked += 1
        return revoked

    # ------------------------------------------------------------------ shutdown
    async def close_servers(self) -> None:
        for lst in self.listeners:
            if lst.server is not None:
                lst.server.close()
        for lst in self.listeners:
            if lst.server is not None:
                with contextlib.suppress(Exception):
                    await lst.server.wait_closed()
                lst.server = None
        for path in self.owns_unix_paths:
            with contextlib.suppress(OSError):
                os.unlink(path)
        self.owns_unix_paths.clear()

    async def drain(self, timeout: float) -> int:
        """Stop accepting; wait up to ``timeout`` for open connections; close the rest.
        Returns how many connections had to be closed at the deadline."""
        self.draining = True
        self.ready = False
        for lst in self.listeners:
            if lst.server is not None:
                lst.server.close()
        for conn in list(self.active):
            conn.drain_begin()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._idle.wait(), timeout)
        left = list(self.active)
        for conn in left:
            conn.drain_close()
        await self.close_servers()
        self.cert_watch.stop()
        if self.poller is not None:  # every pump has closed with its connection
            if self.native_relay:
                native.close_poller(asyncio.get_running_loop(), self.poller)
            else:
                self.poller.close()
            self.poller = None
        return len(left)


def _choose_relay(setting: str) -> bool:
    """True to relay with the native pump (``relay: auto|native|python``)."""
    if setting == "python":
        return False
    if native.available():
        log.info("relay: native pump")
        if not native.frees_tls_buffers():
            log.warning("idle TLS connections keep OpenSSL's record buffers (~34 KiB each): "
                        "%s predates the CVE-2024-4741 fix", ssl.OPENSSL_VERSION)
        return True
    if setting == "native":
        raise StartupError("config", f"relay: native, but {native.unavailable_reason()}")
    log.warning("relay: Python (%s)", native.unavailable_reason())
    return False


def _bind_metrics(lst: ListenerRuntime, metrics: Any) -> None:
    """Look up the listener's metric children once, not per connection or per chunk."""
    name = lst.cfg.name
    # bytes are counted as they move, so a long transfer shows up while it runs
    lst.bytes_in = metrics.bytes_total.labels(listener=name, direction="from_client")
    lst.bytes_out = metrics.bytes_total.labels(listener=name, direction="to_client")
    lst.active_gauge = metrics.connections_active.labels(listener=name)
    lst.duration = metrics.connection_duration_seconds.labels(listener=name)
    lst.totals = {action: metrics.connections_total.labels(listener=name, action=action)
                  for action in ("allow", "deny", "error")}


def _egress_runtime(lcfg: ListenerConfig, metrics: Any) -> Any:
    """An egress listener's settings and users (enforcer.egress.session)."""
    from enforcer.egress.credentials import CredentialsError
    from enforcer.egress.session import make_runtime

    assert lcfg.egress is not None
    try:
        return make_runtime(lcfg.name, lcfg.protocol, lcfg.egress, metrics)
    except CredentialsError as exc:
        raise StartupError("config", f"listeners.{lcfg.name}.egress.credentials: {exc}") \
            from None


def _not_served() -> asyncio.Protocol:
    """The loop's protocol factory for listeners it binds but never serves (acceptor.py)."""
    raise RuntimeError("listeners are served by acceptor.py, not by the loop")


def _note_bound(lst: ListenerRuntime) -> None:
    assert lst.server is not None
    name = lst.server.sockets[0].getsockname()
    if lst.cfg.listen.is_unix:
        lst.bound = f"unix:{lst.cfg.listen.path}"
        return
    lst.local_port = int(name[1])
    lst.bound = str(Address(host=str(name[0]), port=int(name[1])))


def _is_ip(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


def _same_ip(a: str, b: str) -> bool:
    try:
        return ipaddress.ip_address(a.split("%", 1)[0]) == ipaddress.ip_address(b.split("%", 1)[0])
    except ValueError:
        return False


def _is_local_ip(ip: str) -> bool:
    """Whether this host has ``ip`` (binding a throwaway socket to it succeeds)."""
    try:
        addr = ipaddress.ip_address(ip.split("%", 1)[0])
    except ValueError:
        return False
    if addr.is_loopback or addr.is_unspecified:
        return True
    family = socket.AF_INET6 if addr.version == 6 else socket.AF_INET
    try:
        with socket.socket(family, socket.SOCK_STREAM) as probe:
            probe.bind((str(addr), 0))
    except OSError:
        return False
    return True


def _ip_endpoint(addr: tuple[str, int] | None) -> tuple[str, int] | None:
    if addr is None or not _is_ip(addr[0].split("%", 1)[0]):
        return None
    ip = ipaddress.ip_address(addr[0].split("%", 1)[0])
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        return str(ip.ipv4_mapped), addr[1]
    return str(ip), addr[1]


def _send_tlvs(conn: Connection, names: tuple[str, ...]) -> list[Any]:
    from enforcer.proxyproto import (
        alpn_tlv,
        authority_tlv,
        identity_tlv,
        ssl_tlv,
        unique_id_tlv,
    )

    tlvs: list[Any] = []
    tls = conn.client.tls
    for name in names:
        if name == "alpn" and tls is not None and tls.alpn():
            tlvs.append(alpn_tlv((tls.alpn() or "").encode()))
        elif name == "authority" and conn.sni:
            tlvs.append(authority_tlv(conn.sni))
        elif name == "ssl" and tls is not None:
            ident = conn.identity
            tlvs.append(ssl_tlv(version=tls.version(), cipher=tls.cipher(),
                                cn=ident.cn if ident else None,
                                client_cert_presented=ident is not None,
                                verified=ident is not None))
        elif name == "unique_id":
            tlvs.append(unique_id_tlv(conn.flow_id.encode()))
        elif name == "identity" and conn.identity is not None and conn.identity.spiffe_id:
            tlvs.append(identity_tlv(conn.identity.spiffe_id))
    return tlvs
