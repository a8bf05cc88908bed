"""Hosts for the fault battery: network namespaces the test creates, wired with veths.

Each ``Host`` is a network namespace with loopback up. ``link(a, b, ...)`` joins two
hosts with a veth pair on a /24 of 10.23.x.0; ``Host.partition()`` drops every packet
the host sends or receives with nftables (no FIN, no RST reach anyone: the host has
vanished) and ``heal()`` undoes it; ``Host.lossy(percent)`` drops that share of arriving
packets (``numgen random``). Loss is all nftables can do: this kernel has no ``tc netem``
(sch_netem is not built), so delay, jitter, reordering and duplication come from the
userspace bridge in ``impair.py``.

The test process reaches into a host without leaving its own namespace:
``Host.socket()`` creates a socket inside it (``setns`` in a short-lived thread: a
socket keeps the namespace it was created in, whichever thread uses it afterwards), and
``Host.popen()`` runs a program there (``ip netns exec``). Everything is removed by
``Hosts.close()`` (namespaces, with their veths and nftables tables).
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import shutil
import socket
import subprocess
import threading
import uuid
from collections.abc import Callable
from typing import Any, TypeVar

import pytest

T = TypeVar("T")
CLONE_NEWNET = 0x40000000
_libc = ctypes.CDLL(None, use_errno=True)


def require_netns() -> None:
    """Skip unless this process may create network namespaces and run nft."""
    if os.geteuid() != 0:
        pytest.skip("the fault battery needs root (network namespaces, nftables, mounts)")
    for tool in ("ip", "nft"):
        if shutil.which(tool) is None and shutil.which(tool, path="/usr/sbin:/sbin") is None:
            pytest.skip(f"{tool} is not installed (.ci/run installs it)")


def run(*cmd: str, input: str | None = None) -> str:
    done = subprocess.run(cmd, input=input, capture_output=True, text=True, timeout=30)
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)}: {done.stderr.strip()}")
    return done.stdout


class Host:
    """One network namespace (see the module comment)."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.addrs: list[str] = []
        run("ip", "netns", "add", name)
        self.ip("link", "set", "lo", "up")

    def ip(self, *args: str) -> str:
        return run("ip", "-n", self.name, *args)

    def nft(self, script: str) -> None:
        run("ip", "netns", "exec", self.name, "nft", "-f", "-", input=script)

    def in_ns(self, fn: Callable[[], T]) -> T:
        """Call ``fn`` in a thread that has entered this namespace."""
        out: list[Any] = []

        def enter() -> None:
            try:
                fd = os.open(f"/run/netns/{self.name}", os.O_RDONLY)
                try:
                    if _libc.setns(fd, CLONE_NEWNET) != 0:
                        err = ctypes.get_errno()
                        raise OSError(err, os.strerror(err))
                finally:
                    os.close(fd)
                out.append((True, fn()))
            except BaseException as exc:  # handed to the caller
                out.append((False, exc))

        thread = threading.Thread(target=enter)
        thread.start()
        thread.join()
        ok, value = out[0]
        if not ok:
            raise value
        return value  # type: ignore[no-any-return]

    def socket(self, family: int = socket.AF_INET) -> socket.socket:
        return self.in_ns(lambda: socket.socket(family, socket.SOCK_STREAM))

    def listen(self, host: str, port: int = 0) -> socket.socket:
        def make() -> socket.socket:
            sock = socket.socket()
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind((host, port))
            sock.listen(1024)
            return sock
        return self.in_ns(make)

    def popen(self, cmd: list[str], **kw: Any) -> subprocess.Popen[Any]:
        return subprocess.Popen(["ip", "netns", "exec", self.name, *cmd], **kw)

    def partition(self) -> None:
        """Drop everything this host sends or receives: it vanishes, no FIN, no RST."""
        self.nft("table inet vanish {\n"
                 " chain in { type filter hook prerouting priority -400; policy drop; }\n"
                 " chain out { type filter hook output priority -400; policy drop; }\n"
                 "}\n")

    def heal(self) -> None:
        self.nft("delete table inet vanish\n")

    def lossy(self, percent: int) -> None:
        """Drop ``percent`` % of the IP packets arriving at this host (not loopback)."""
        self.nft("table inet loss {\n"
                 " chain in { type filter hook prerouting priority -300;\n"
                 f'  iifname != "lo" numgen random mod 100 < {percent} counter drop\n'
                 " }\n}\n")

    def loss_count(self) -> int:
        """Packets the ``lossy`` rule dropped so far."""
        out = run("ip", "netns", "exec", self.name, "nft", "list", "table", "inet", "loss")
        for word, nxt in zip(out.split(), out.split()[1:], strict=False):
            if word == "packets":
                return int(nxt)
        return 0

    def delete(self) -> None:
        with contextlib.suppress(RuntimeError):
            run("ip", "netns", "del", self.name)


class Hosts:
    """The namespaces of one test, all removed by ``close()``."""

    def __init__(self) -> None:
        self.tag = uuid.uuid4().hex[:6]
        self.hosts: list[Host] = []
        self._links = 0

    def host(self, role: str) -> Host:
        host = Host(f"f23{self.tag}{role}")
        self.hosts.append(host)
        return host

    def link(self, a: Host, b: Host, *, gso_segs: int | None = None) -> tuple[str, str]:
        """A veth pair between ``a`` and ``b``; returns their addresses (10.23.N.1/.2)."""
        self._links += 1
        n = self._links
        ea, eb = f"v{self.tag}{n}a", f"v{self.tag}{n}b"
        a.ip("link", "add", ea, "type", "veth", "peer", "name", eb, "netns", b.name)
        addr_a, addr_b = f"10.23.{n}.1", f"10.23.{n}.2"
        for host, dev, addr in ((a, ea, addr_a), (b, eb, addr_b)):
            if gso_segs is not None:
                host.ip("link", "set", dev, "gso_max_segs", str(gso_segs))
            host.ip("addr", "add", f"{addr}/24", "dev", dev)
            host.ip("link", "set", dev, "up")
            host.addrs.append(addr)
        return addr_a, addr_b

    def bridged(self, a: Host, middle: Host, b: Host) -> tuple[str, str, str, str]:
        """``a`` and ``b`` on one /24 through two veth pairs whose middle ends (no
        address) sit in ``middle``, where ``impair.py`` moves the frames across. Returns
        (address of a, address of b, middle device toward a, middle device toward b)."""
        self._links += 1
        n = self._links
        addr_a, addr_b = f"10.23.{n}.1", f"10.23.{n}.2"
        devs = []
        for end, addr, side in ((a, addr_a, "a"), (b, addr_b, "b")):
            outer, inner = f"v{self.tag}{n}{side}", f"m{self.tag}{n}{side}"
            end.ip("link", "add", outer, "type", "veth", "peer", "name", inner,
                   "netns", middle.name)
            end.ip("link", "set", outer, "gso_max_segs", "1")  # MTU-sized frames only
            end.ip("addr", "add", f"{addr}/24", "dev", outer)
            end.ip("link", "set", outer, "up")
            end.addrs.append(addr)
            middle.ip("link", "set", inner, "gso_max_segs", "1")
            middle.ip("link", "set", inner, "up")
            devs.append(inner)
        return addr_a, addr_b, devs[0], devs[1]

    def close(self) -> None:
        for host in self.hosts:
            host.delete()
        self.hosts.clear()


@contextlib.contextmanager
def hosts() -> Any:
    require_netns()
    made = Hosts()
    try:
        yield made
    finally:
        made.close()
