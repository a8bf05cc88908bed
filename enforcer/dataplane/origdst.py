"""Where a redirected connection was going: ``SO_ORIGINAL_DST`` / ``IP6T_SO_ORIGINAL_DST``.

How it works. When nftables (or iptables) REDIRECTs a connection to a transparent
listener, conntrack keeps the connection's original tuple; ``getsockopt`` on the accepted
socket with ``SO_ORIGINAL_DST`` (IPv4, level SOL_IP) or ``IP6T_SO_ORIGINAL_DST`` (IPv6,
level SOL_IPV6; both option 80) returns its original destination as a ``sockaddr_in`` /
``sockaddr_in6``. An IPv4 connection on a dual-stack ``[::]`` socket (local address
``::ffff:a.b.c.d``) is an IPv4 conntrack entry: it is asked with the IPv4 option. The
kernel answers ENOENT when conntrack has no entry for the socket (nothing redirected it
and conntrack was not tracking it); a connection conntrack tracks
but did not redirect returns the listener's own address. ``classify`` turns the answer into
an original destination or the reason to refuse the connection (no loops).
"""

from __future__ import annotations

import socket
import struct
from collections.abc import Callable
from typing import Any, Final

SO_ORIGINAL_DST: Final = 80  # linux/netfilter_ipv4.h
IP6T_SO_ORIGINAL_DST: Final = 80  # linux/netfilter_ipv6/ip6_tables.h
SOL_IP: Final = 0
SOL_IPV6: Final = 41
SOCKADDR_IN_LEN: Final = 16
SOCKADDR_IN6_LEN: Final = 28

Endpoint = tuple[str, int]


def parse_sockaddr(raw: bytes) -> Endpoint:
    """A ``sockaddr_in`` / ``sockaddr_in6`` as the kernel writes it -> (ip, port)."""
    if len(raw) >= SOCKADDR_IN_LEN and struct.unpack_from("=H", raw)[0] == socket.AF_INET \
            and len(raw) < SOCKADDR_IN6_LEN:
        port, addr = struct.unpack_from("!H4s", raw, 2)
        return socket.inet_ntop(socket.AF_INET, addr), port
    if len(raw) >= SOCKADDR_IN6_LEN and struct.unpack_from("=H", raw)[0] == socket.AF_INET6:
        port, _flow, addr = struct.unpack_from("!HI16s", raw, 2)
        return socket.inet_ntop(socket.AF_INET6, addr), port
    raise ValueError(f"not a sockaddr_in/sockaddr_in6 ({len(raw)} bytes)")


def read(sock: Any) -> Endpoint | None:
    """The original destination of an accepted TCP socket; None when the kernel has none."""
    family = sock.family
    try:
        # (an IPv4 connection on a dual-stack socket is asked as IPv4)
        if family == socket.AF_INET or (family == socket.AF_INET6 and _mapped(sock)):
            raw = sock.getsockopt(SOL_IP, SO_ORIGINAL_DST, SOCKADDR_IN_LEN)
        elif family == socket.AF_INET6:
            raw = sock.getsockopt(SOL_IPV6, IP6T_SO_ORIGINAL_DST, SOCKADDR_IN6_LEN)
        else:
            return None
    except OSError:
        return None
    try:
        return parse_sockaddr(raw)
    except ValueError:
        return None


def _mapped(sock: Any) -> bool:
    """An IPv4 connection accepted by a dual-stack ``[::]`` socket: conntrack tracked it
    as IPv4, so only the IPv4 option finds it."""
    local = sock.getsockname()[0]
    return isinstance(local, str) and local.startswith("::ffff:") and "." in local


def classify(original: Endpoint | None, local: Endpoint | None,
             is_own: Callable[[str, int], bool]) -> tuple[str, str] | None:
    """None when the connection may go to ``original``; else (reason, detail) to refuse
    it: ``not_redirected`` (it came straight to the listener) or ``loop`` (its original
    destination is one of this enforcer's own listeners)."""
    if original is None:
        return ("not_redirected", "the connection reached a transparent listener without "
                "being redirected (no original destination: is interception applied?)")
    if local is not None and _same(original, local):
        return ("not_redirected", f"the connection was addressed to the transparent listener "
                f"itself ({_text(original)}), not redirected to it")
    if is_own(original[0], original[1]):
        return ("loop", f"the original destination {_text(original)} is this enforcer's own "
                "listener (refused: it would loop)")
    return None


def _same(a: Endpoint, b: Endpoint) -> bool:
    return a[1] == b[1] and a[0].split("%", 1)[0] == b[0].split("%", 1)[0]


def _text(ep: Endpoint) -> str:
    return f"[{ep[0]}]:{ep[1]}" if ":" in ep[0] else f"{ep[0]}:{ep[1]}"
