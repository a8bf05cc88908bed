"""Per-listener and per-upstream runtime state that connections read (swapped on reload)."""

from __future__ import annotations

import ipaddress
import ssl
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from enforcer.config.model import LimitsConfig, ListenerConfig, UpstreamConfig
from enforcer.dataplane.dialer import AddressBook
from enforcer.dataplane.rawtransport import Target, target_of
from enforcer.dataplane.tcpopts import SockOpt
from enforcer.policy.globs import StringSet

if TYPE_CHECKING:
    from enforcer.config.passthrough import SniRouter
    from enforcer.dataplane.plane import DataPlane
    from enforcer.egress.session import EgressRuntime


@dataclass(slots=True, eq=False)
class UpstreamRuntime:
    cfg: UpstreamConfig
    client_ctx: ssl.SSLContext | None
    server_hostname: str | None
    session: ssl.SSLSession | None = None  # last session, for TLS resumption
    connect_histogram: Any = None  # enforcer_upstream_connect_seconds
    _connect_child: Any = None
    # where a bare-socket connect can go without name resolution (see rawtransport.py)
    raw_target: Target | None = field(init=False, default=None)
    address_text: str = field(init=False, default="")  # str(cfg.address): flow records
    # setsockopt triples for dead-peer detection (tcpopts.py); none for a local upstream
    sockopts: tuple[SockOpt, ...] = ()
    # a host-name upstream's addresses that failed lately (dialer.py)
    addresses: AddressBook = field(default_factory=AddressBook)

    def __post_init__(self) -> None:
        self.raw_target = target_of(self.cfg.address)
        self.address_text = str(self.cfg.address)

    def observe_connect(self, seconds: float) -> None:
        """The series appears with the first connect (no zero series for dead upstreams)."""
        if self._connect_child is None:
            self._connect_child = self.connect_histogram.labels(upstream=self.cfg.name)
        self._connect_child.observe(seconds)

    @property
    def name(self) -> str:
        return self.cfg.name


@dataclass(slots=True, eq=False)
class ListenerRuntime:
    cfg: ListenerConfig
    plane: DataPlane
    upstream: UpstreamRuntime
    limits: LimitsConfig
    server_ctx: ssl.SSLContext | None = None
    local_port: int = 0
    trusted: tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...] = ()
    proxy_identities: StringSet | None = None  # proxy_protocol.trusted_identities
    egress: EgressRuntime | None = None  # protocol socks5 / http_connect (enforcer.egress)
    server: Any = None  # its Acceptor (acceptor.py) once bound
    bound: str = ""
    active: int = 0
    # Metric children looked up once (labels() takes a lock and builds a key each call):
    bytes_in: Any = None  # enforcer_bytes_total{direction="from_client"}
    bytes_out: Any = None  # enforcer_bytes_total{direction="to_client"}
    active_gauge: Any = None  # enforcer_connections_active
    duration: Any = None  # enforcer_connection_duration_seconds
    handshakes: dict[str, Any] = field(default_factory=dict)  # tls_handshake_seconds by side
    groups: dict[tuple[str, str], Any] = field(default_factory=dict)  # tls_groups_total
    totals: dict[str, Any] = field(default_factory=dict)  # connections_total by action
    decisions: dict[tuple[str, str, str], Any] = field(default_factory=dict)  # by (ruleset,
    # rule, action): enforcer_policy_decisions_total
    sni_router: SniRouter[UpstreamRuntime] | None = None  # tls.mode passthrough
    routed: dict[str, Any] = field(default_factory=dict)  # enforcer_passthrough_routed_total
    # the lifecycle core's Plan by (upstream runtime, upstream TLS): see Connection._plan
    plans: dict[tuple[UpstreamRuntime, bool], Any] = field(default_factory=dict)

    @property
    def name(self) -> str:
        return self.cfg.name

    def observe_handshake(self, side: str, seconds: float, group: str | None = None) -> None:
        """enforcer_tls_handshake_seconds; the series appears with the first handshake.
        With the negotiated key-exchange group, enforcer_tls_groups_total too."""
        child = self.handshakes.get(side)
        if child is None:
            child = self.handshakes[side] = self.plane.metrics.tls_handshake_seconds.labels(
                listener=self.name, side=side)
        child.observe(seconds)
        if group is not None:
            counter = self.groups.get((side, group))
            if counter is None:
                counter = self.groups[(side, group)] = self.plane.metrics.tls_groups_total.labels(
                    listener=self.name, side=side, group=group)
            counter.inc()

    def count_decision(self, ruleset: str, rule: str, action: str) -> None:
        """enforcer_policy_decisions_total; one child per rule that decided, made once."""
        key = (ruleset, rule, action)
        child = self.decisions.get(key)
        if child is None:
            child = self.decisions[key] = self.plane.metrics.policy_decisions_total.labels(
                listener=self.name, ruleset=ruleset, rule=rule, action=action)
        child.inc()

    def count_route(self, upstream: str) -> None:
        """enforcer_passthrough_routed_total; one child per upstream, made once."""
        child = self.routed.get(upstream)
        if child is None:
            child = self.routed[upstream] = self.plane.metrics.passthrough_routed_total.labels(
                listener=self.name, upstream=upstream)
        child.inc()

    def is_trusted(self, ip: str | None) -> bool:
        if ip is None:
            return False
        try:
            addr = ipaddress.ip_address(ip.split("%", 1)[0])
        except ValueError:
            return False
        if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
            addr = addr.ipv4_mapped
        return any(addr in net for net in self.trusted)
