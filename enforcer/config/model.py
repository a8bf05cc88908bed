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

EMPTY_MAPPING: Mapping[str, str] = MappingProxyType({})


@dataclass(frozen=True, slots=True)
class Address:
    """``host:port``, ``[v6]:port`` or ``unix:/path``."""

    host: str = ""
    port: int = 0
    path: str | None = None

    @property
    def is_unix(self) -> bool:
        return self.path is not None

    def __str__(self) -> str:
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


@dataclass(frozen=True, slots=True)
class ListenerTlsConfig:
    mode: ListenerTlsMode = "terminate"
    material: str | None = None
    client_auth: ClientAuth = "required"
    server_names: tuple[str, ...] = ()
    strict_sni: bool = False
    alpn: tuple[str, ...] = ()  # protocols offered to clients, in preference order


@dataclass(frozen=True, slots=True)
class ListenerConfig:
    name: str
    listen: Address
    tls: ListenerTlsConfig
    proxy_protocol: ProxyProtocolAcceptConfig
    ruleset: str
    upstream: str


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


@dataclass(frozen=True, slots=True)
class LimitsConfig:
    max_connections: int = 10000
    handshake_timeout: float = 10.0
    connect_timeout: float = 5.0
    idle_timeout: float = 3600.0
    close_timeout: float = 60.0
    max_lifetime: float = 0.0  # 0 = unlimited
    drain_timeout: float = 30.0


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
    source: str | None = None  # the file this was loaded from
