"""Dead-peer detection: TCP keepalive and ``TCP_USER_TIMEOUT`` on sockets to other hosts.

Why: a peer host that vanishes (power loss, a partition, a pod's node gone) sends no FIN
and no RST. Without help the kernel keeps such a connection for ~2 h when idle (its
keepalive defaults, if keepalive is on at all) or ~15 min while data waits to be
acknowledged (``tcp_retries2``), and the proxy holds two descriptors and a flow for as
long. With the options set here the kernel ends the connection itself with ETIMEDOUT,
which either relay (Python or the native pump) sees as an error on that socket: the flow
then closes with the reason ``peer_timeout`` (``connection.py``).

How: ``socket_options(limits)`` turns the ``limits.tcp_*`` keys into setsockopt triples
(a pure function); ``apply()`` sets them.

- Accepted connections inherit these options from their listening socket (Linux copies
  them into every socket ``accept()`` returns), so they are set once per listener, not
  per connection.
- Upstream sockets get them before ``connect()``, per connection (for a host name, per
  address tried: dialer.py).
- Loopback and unix-socket peers get none: a local peer cannot vanish without the kernel
  knowing, and ``TCP_USER_TIMEOUT`` would also end a connection whose local reader merely
  stops reading for that long (the kernel applies it to zero-window probes too).
"""

from __future__ import annotations

import ipaddress
import math
import socket
from typing import Final

from enforcer.config.model import LimitsConfig

SockOpt = tuple[int, int, int]  # (level, option, value) for setsockopt

# Linux values; older Pythons on other systems may lack the names.
_TCP_KEEPIDLE: Final = getattr(socket, "TCP_KEEPIDLE", 4)
_TCP_KEEPINTVL: Final = getattr(socket, "TCP_KEEPINTVL", 5)
_TCP_KEEPCNT: Final = getattr(socket, "TCP_KEEPCNT", 6)
_TCP_USER_TIMEOUT: Final = getattr(socket, "TCP_USER_TIMEOUT", 18)


def socket_options(limits: LimitsConfig) -> tuple[SockOpt, ...]:
    """The setsockopt calls the limits ask for (none when both mechanisms are off)."""
    out: list[SockOpt] = []
    if limits.tcp_keepalive_idle > 0:
        out += [
            (socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1),
            (socket.IPPROTO_TCP, _TCP_KEEPIDLE, math.ceil(limits.tcp_keepalive_idle)),
            (socket.IPPROTO_TCP, _TCP_KEEPINTVL, math.ceil(limits.tcp_keepalive_interval)),
            (socket.IPPROTO_TCP, _TCP_KEEPCNT, limits.tcp_keepalive_count),
        ]
    if limits.tcp_user_timeout > 0:
        out.append((socket.IPPROTO_TCP, _TCP_USER_TIMEOUT,
                    max(1, round(limits.tcp_user_timeout * 1000))))
    return tuple(out)


def is_local_host(host: str) -> bool:
    """True for a loopback address or ``localhost`` (a peer on this host)."""
    if host.lower() in ("localhost", "localhost."):
        return True
    try:
        return ipaddress.ip_address(host.split("%", 1)[0]).is_loopback
    except ValueError:
        return False


def apply(sock: socket.socket, options: tuple[SockOpt, ...]) -> None:
    """Set the options on a TCP socket; raises OSError."""
    for level, name, value in options:
        sock.setsockopt(level, name, value)


def detection_bound(limits: LimitsConfig) -> float:
    """Roughly how long a vanished peer of an idle connection goes unnoticed: the first
    probe after the idle time, then (with a user timeout) the first unanswered probe past
    the user timeout ends it, or (without one) the last of ``count`` probes. 0: never."""
    if limits.tcp_keepalive_idle <= 0:
        return 0.0
    idle, interval = limits.tcp_keepalive_idle, limits.tcp_keepalive_interval
    if limits.tcp_user_timeout > 0:
        probes = max(1, math.ceil((limits.tcp_user_timeout - idle) / interval))
        return idle + probes * interval
    return idle + limits.tcp_keepalive_count * interval
