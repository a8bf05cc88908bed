"""Listening sockets shared by worker processes.

With ``workers`` > 1 the supervisor reserves every listener address before forking, so a
bind error stops the start (exit 3) and port 0 resolves to one port for everyone:

- TCP: the supervisor binds a ``SO_REUSEPORT`` socket and does not listen on it (Linux
  only balances connections over *listening* sockets in a reuseport group, so it receives
  none); each worker binds its own ``SO_REUSEPORT`` socket to the same address and listens
  on it once its data plane serves, and the kernel spreads new connections over the
  workers.
- UNIX: there is no reuseport, so the supervisor binds and listens, and the workers share
  the inherited socket (passed to them as a file descriptor).

IPv6: ``[::]`` is one dual-stack socket (``IPV6_V6ONLY`` off, whatever the host's
``net.ipv6.bindv6only``): it accepts IPv4 too, whose peers the kernel shows as
``::ffff:a.b.c.d`` (connutil.addr turns them back into IPv4). Any other IPv6 address is
IPv6 only, and so is ``[::]`` when another listener of the config has ``0.0.0.0`` on the
same port (``split_ports``: the two split the families, as configs written for IPv6-only
``[::]`` do). The same holds with one worker (``dual_stack_socket``, the loop would set
``IPV6_V6ONLY``) and with several (the supervisor's socket says which to the workers),
and for the admin listener.
"""

from __future__ import annotations

import ipaddress
import os
import socket
import stat
from collections.abc import Iterable

from enforcer.config.model import Address

BACKLOG = 1024


def reserve(addr: Address, split: bool = False) -> socket.socket:
    """Bind (without listening, for TCP) in the supervisor; raises OSError. ``split``:
    the port is in ``split_ports`` (``[::]`` stays IPv6 only)."""
    if addr.is_unix:
        assert addr.path is not None
        remove_stale_unix_socket(addr.path)
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.bind(addr.path)
        sock.listen(BACKLOG)
        sock.setblocking(False)
        return sock
    sock = _tcp_socket(addr, not split)
    try:
        sock.bind(_sockaddr(sock, addr.host, addr.port))
    except OSError:
        sock.close()
        raise
    return sock


def worker_socket_for(host: str, port: int, dual: bool = True) -> socket.socket:
    """A worker's own reuseport socket on the address the supervisor reserved, bound but
    not listening: the data plane listens on it once it serves (a listening socket joins
    the kernel's balancing at once, and a worker that is still starting, e.g. one started
    again after a crash, would leave its share of new connections waiting)."""
    sock = _tcp_socket(Address(host=host, port=port), dual)
    sock.bind(_sockaddr(sock, host, port))
    sock.setblocking(False)
    return sock


def split_ports(addrs: Iterable[Address]) -> frozenset[int]:
    """Ports a listener has on ``0.0.0.0``: a ``[::]`` listener there is IPv6 only."""
    return frozenset(a.port for a in addrs if not a.is_unix and a.host == "0.0.0.0")


def dual_stack(host: str | None) -> bool:
    """``[::]``: a listener for IPv6 and IPv4 alike (unless its port is split)."""
    try:
        return ipaddress.ip_address(host or "") == ipaddress.IPv6Address("::")
    except ValueError:
        return False


def set_v6only(sock: socket.socket, host: str | None, dual: bool = True) -> None:
    """IPv6 sockets: dual-stack on ``::`` (unless ``dual`` is False), IPv6 only on any
    other address."""
    if sock.family == socket.AF_INET6:
        on = dual and dual_stack(host)
        sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0 if on else 1)


def is_dual_stack(sock: socket.socket) -> bool:
    """Whether a bound socket takes IPv4 too (the supervisor tells its workers)."""
    return sock.family == socket.AF_INET6 and not sock.getsockopt(
        socket.IPPROTO_IPV6, socket.IPV6_V6ONLY)


def dual_stack_socket(addr: Address) -> socket.socket:
    """A bound, not yet listening ``[::]`` socket that takes IPv4 too (one worker: the
    event loop's create_server would make it IPv6 only); raises OSError."""
    sock = socket.socket(socket.AF_INET6, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        set_v6only(sock, addr.host)
        sock.bind(("::", addr.port))
        sock.setblocking(False)
    except OSError:
        sock.close()
        raise
    return sock


def _tcp_socket(addr: Address, dual: bool) -> socket.socket:
    infos = socket.getaddrinfo(addr.host or None, addr.port, type=socket.SOCK_STREAM,
                               flags=socket.AI_PASSIVE)
    family = infos[0][0]
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        set_v6only(sock, addr.host, dual)
    except OSError:
        sock.close()
        raise
    return sock


def _sockaddr(sock: socket.socket, host: str, port: int) -> tuple[str, int]:
    if not host:
        host = "::" if sock.family == socket.AF_INET6 else "0.0.0.0"
    return host, port


def remove_stale_unix_socket(path: str) -> None:
    """Remove a socket file nobody listens on (left by an earlier run); refuse others."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(st.st_mode):
        raise OSError(17, f"{path} exists and is not a socket")
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        probe.connect(path)
    except OSError:
        os.unlink(path)
    else:
        raise OSError(98, "Address already in use")
    finally:
        probe.close()
