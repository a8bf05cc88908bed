"""Per-listener and per-upstream runtime state that connections read (swapped on reload)."""

from __future__ import annotations

import ipaddress
import ssl
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from enforcer.config.model import LimitsConfig, ListenerConfig, UpstreamConfig

if TYPE_CHECKING:
    from enforcer.dataplane.plane import DataPlane


@dataclass(slots=True, eq=False)
class UpstreamRuntime:
    cfg: UpstreamConfig
    client_ctx: ssl.SSLContext | None
    server_hostname: str | None
    session: ssl.SSLSession | None = None  # last session, for TLS resumption

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
    server: Any = None  # asyncio.Server once bound
    bound: str = ""
    active: int = 0
    bytes_in: Any = None  # enforcer_bytes_total{direction="from_client"} child
    bytes_out: Any = None  # enforcer_bytes_total{direction="to_client"} child

    @property
    def name(self) -> str:
        return self.cfg.name

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
