"""Typed, immutable config objects. Built only by ``enforcer.config.loader``."""

from __future__ import annotations

import ipaddress
from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import TYPE_CHECKING, Literal

if TYPE_CHECKING:
    from enforcer.config.rulesets import RulesetConfig

IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network

ListenerTlsMode = Literal["terminate", "off", "auto", "passthrough"]
ClientAuth = Literal["required", "optional", "none"]
UpstreamTlsMode = Literal["off", "tls", "mtls"]
ProxyAccept = Literal["off", "optional", "required"]
ProxySend = Literal["off", "v1", "v2"]
RelayMode = Literal["auto", "native", "python"]
TimeoutClose = Literal["fin", "rst"]
MeshRole = Literal["outbound", "inbound"]
MeshInbound = Literal["strict", "permissive"]
MeshExternal = Literal["deny", "plaintext"]
PortRange = tuple[int, int]
ListenerProtocol = Literal["tcp", "socks5", "http_connect"]

EMPTY_MAPPING: Mapping[str, str] = MappingProxyType({})
ORIGINAL_DESTINATION = "original_destination"  # an upstream address: see Address.original
DETECT_TIMEOUT = 0.2  # tls.detect_timeout default (Linkerd waits 10s; Istio's sniffing once
# defaulted to 100ms): long enough for a client's first flight, short for a banner


@dataclass(frozen=True, slots=True)
class Address:
    """``host:port``, ``[v6]:port`` or ``unix:/path``."""

    host: str = ""
    port: int = 0
    path: str | None = None
    original: bool = False  # ``original_destination``: where a transparent listener's
    # connection was going before interception redirected it (per connection)

    @property
    def is_unix(self) -> bool:
        return self.path is not None

    def __str__(self) -> str:
        if self.original:
            return ORIGINAL_DESTINATION
        if self.path is not None:
            return f"unix:{self.path}"
        if ":" in self.host:
            return f"[{self.host}]:{self.port}"
        return f"{self.host}:{self.port}"


# TLS 1.3 cipher suites enforcer accepts, and its default preference: AES-128-GCM first, as
# BoringSSL (Envoy) and Go (ghostunnel) order them. P-256 keys and X25519 give 128-bit
# security, so AES-256 and SHA-384 add cost (the key schedule's hashing above all), not
# strength. ``cipher_suites`` reorders or narrows this; TLS 1.2 follows the same list.
CIPHER_SUITES: tuple[str, ...] = (
    "TLS_AES_128_GCM_SHA256",
    "TLS_AES_256_GCM_SHA384",
    "TLS_CHACHA20_POLY1305_SHA256",
)


@dataclass(frozen=True, slots=True)
class TlsMaterialConfig:
    """Where a named certificate/key/trust bundle comes from. Exactly one source is set."""

    name: str
    path: str  # key path in the config, for error messages (``tls.mesh``)
    cert: str | None = None
    key: str | None = None
    ca: str | None = None
    crl: str | None = None
    dir: str | None = None
    inline_cert: bytes | None = None
    inline_key: bytes | None = None
    inline_ca: bytes | None = None
    pkcs12: str | None = None
    pkcs12_password_env: str | None = None
    min_version: Literal["1.2", "1.3"] = "1.2"
    cipher_suites: tuple[str, ...] = CIPHER_SUITES  # preference order; see CIPHER_SUITES
    groups: tuple[str, ...] | None = None  # key-exchange groups; None: tlsconf.groups default
    spiffe_socket: str | None = None  # SPIFFE Workload API unix socket path (tlsconf.spiffe)
    spiffe_timeout: float = 10.0  # seconds to wait for the first SVID at startup


@dataclass(frozen=True, slots=True)
class ProxyProtocolAcceptConfig:
    accept: ProxyAccept = "off"
    trusted_sources: tuple[IPNetwork, ...] = ()
    timeout: float = 3.0
    # SPIFFE IDs (globs as in from.identities): a PROXY header is believed only when the TLS
    # handshake after it shows one of them; empty = believed on trusted_sources alone
    trusted_identities: tuple[str, ...] = ()
    flow_id_from_header: bool = False  # this hop's flow_id is the header's unique_id TLV
    # (when it is 1-128 printable ASCII characters), so every hop's record shares one id


@dataclass(frozen=True, slots=True)
class SniRouteConfig:
    """``tls.routes[]`` of a passthrough listener: ClientHellos naming one of
    ``server_names`` (exact, or ``*.`` one label deep) go to ``upstream``."""

    server_names: tuple[str, ...]
    upstream: str


@dataclass(frozen=True, slots=True)
class ListenerTlsConfig:
    mode: ListenerTlsMode = "terminate"
    material: str | None = None
    client_auth: ClientAuth = "required"
    server_names: tuple[str, ...] = ()
    strict_sni: bool = False
    alpn: tuple[str, ...] = ()  # protocols offered to clients, in preference order
    # a client's FIN without close_notify (on a record boundary) ends its stream cleanly
    # instead of failing the connection (docs/tls-data-plane.md)
    allow_eof_without_close_notify: bool = False
    detect_timeout: float = DETECT_TIMEOUT  # mode auto: a client silent this long is plaintext
    # (server-first protocols); 0 = wait up to handshake_timeout
    routes: tuple[SniRouteConfig, ...] = ()  # mode passthrough: SNI -> upstream (the
    # listener's upstream is the default route)
    # close open connections whose client certificate a reloaded CRL revokes / that expires
    # (dataplane.certwatch, docs/limits-and-revocation.md)
    close_on_revocation: bool = False
    close_on_expiry: bool = False


@dataclass(frozen=True, slots=True)
class EgressConfig:
    """``egress:`` of a ``protocol: socks5`` or ``http_connect`` listener (enforcer.egress)."""

    credentials: str | None = None  # user:scrypt-hash file; None = no login asked
    request_timeout: float = 10.0  # accept to a complete request (greeting, login, CONNECT)
    max_request_bytes: int = 8192  # http_connect: the request header's size limit


@dataclass(frozen=True, slots=True)
class ListenerConfig:
    name: str
    listen: Address
    tls: ListenerTlsConfig
    proxy_protocol: ProxyProtocolAcceptConfig
    ruleset: str
    upstream: str
    transparent: bool = False  # redirected connections only; the original destination is
    # read from the socket (SO_ORIGINAL_DST) and the upstream is original_destination
    mesh: MeshRole | None = None  # outbound: mTLS to mesh peers; inbound: strict/permissive
    protocol: ListenerProtocol = "tcp"  # socks5 / http_connect: an egress proxy (the client
    # names its destination; the upstream's address is original_destination)
    egress: EgressConfig | None = None  # set for socks5 and http_connect listeners


@dataclass(frozen=True, slots=True)
class UpstreamVerifyConfig:
    uri: tuple[str, ...] = ()
    dns: tuple[str, ...] = ()
    cn: tuple[str, ...] = ()

    @property
    def empty(self) -> bool:
        return not (self.uri or self.dns or self.cn)


@dataclass(frozen=True, slots=True)
class UpstreamTlsConfig:
    mode: UpstreamTlsMode = "off"
    material: str | None = None
    server_name: str | None = None
    verify: UpstreamVerifyConfig = field(default_factory=UpstreamVerifyConfig)
    allow_eof_without_close_notify: bool = False  # as ListenerTlsConfig's, for the upstream


@dataclass(frozen=True, slots=True)
class ProxyProtocolSendConfig:
    send: ProxySend = "off"
    tlvs: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class UpstreamConfig:
    name: str
    address: Address
    tls: UpstreamTlsConfig
    proxy_protocol: ProxyProtocolSendConfig


@dataclass(frozen=True, slots=True)
class FlowLogConfig:
    sink: Literal["stdout", "file", "off"] = "stdout"
    path: str | None = None
    max_bytes: int = 100 * 1024 * 1024
    backups: int = 5
    open_events: bool = False
    queue_size: int = 65536


@dataclass(frozen=True, slots=True)
class AdminConfig:
    listen: Address | None = None
    stall_timeout: float = 10.0  # /healthz: 503 once the event loop has not turned this long


@dataclass(frozen=True, slots=True)
class LimitsConfig:
    max_connections: int = 10000
    handshake_timeout: float = 10.0
    connect_timeout: float = 5.0
    idle_timeout: float = 3600.0
    close_timeout: float = 60.0
    max_lifetime: float = 0.0  # 0 = unlimited
    drain_timeout: float = 30.0
    # how idle_timeout, close_timeout and max_lifetime end a connection: a plain close
    # (FIN) or a reset (RST, SO_LINGER 0) of both sockets
    timeout_close: TimeoutClose = "fin"
    # Dead-peer detection on TCP sockets to and from other hosts (see dataplane/tcpopts.py
    # and docs/faults.md): keepalive probes after this much silence (0 = off), every
    # interval, count of them unanswered ends the connection; the user timeout bounds how
    # long sent data may stay unacknowledged (0 = the kernel's default, ~15 min).
    tcp_keepalive_idle: float = 30.0
    tcp_keepalive_interval: float = 10.0
    tcp_keepalive_count: int = 3
    tcp_user_timeout: float = 30.0


@dataclass(frozen=True, slots=True)
class MeshNetwork:
    """Where peers run enforcer: these addresses (and ports; empty = every port)."""

    cidrs: tuple[IPNetwork, ...]
    ports: tuple[PortRange, ...] = ()

    def contains(self, ip: ipaddress.IPv4Address | ipaddress.IPv6Address, port: int) -> bool:
        if self.ports and not any(low <= port <= high for low, high in self.ports):
            return False
        return any(ip.version == net.version and ip in net for net in self.cidrs)


@dataclass(frozen=True, slots=True)
class MeshConfig:
    """``mesh:``: outbound to ``networks`` is mTLS with ``material``; other destinations
    follow ``external_default`` unless listed in ``external_plaintext``."""

    networks: tuple[MeshNetwork, ...] = ()
    material: str | None = None
    inbound: MeshInbound = "strict"
    external_default: MeshExternal = "deny"
    external_plaintext: tuple[MeshNetwork, ...] = ()

    @property
    def enabled(self) -> bool:
        return bool(self.networks)


@dataclass(frozen=True, slots=True)
class NodeConfig:
    name: str
    labels: Mapping[str, str] = field(default_factory=lambda: EMPTY_MAPPING)


@dataclass(frozen=True, slots=True)
class Config:
    version: int
    node: NodeConfig
    tls: Mapping[str, TlsMaterialConfig]
    listeners: tuple[ListenerConfig, ...]
    upstreams: Mapping[str, UpstreamConfig]
    rulesets: Mapping[str, RulesetConfig]
    flow_log: FlowLogConfig
    admin: AdminConfig
    limits: LimitsConfig
    rulesets_file: str | None = None
    workers: int = 1  # processes sharing the listeners; 0 = one per CPU ("auto")
    relay: RelayMode = "auto"  # who moves bytes once in RELAY
    mesh: MeshConfig = field(default_factory=MeshConfig)
    source: str | None = None  # the file this was loaded from
