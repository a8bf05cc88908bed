"""Network namespaces, veth pairs and bridges that a test creates and always removes.

``Topology`` names everything with a per-test prefix, records what it made, and deletes
it in reverse order on ``close`` (deleting a namespace removes its veth ends and nft
tables with it). Tests that cannot create namespaces here (not root, no ``ip``) skip.
"""

from __future__ import annotations

import itertools
import os
import shutil
import subprocess
from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import pytest

_counter = itertools.count()
IP = shutil.which("ip") or shutil.which("ip", path="/usr/sbin:/sbin") or "ip"


def require_netns() -> None:
    if os.geteuid() != 0:
        pytest.skip("network namespace tests need root")
    for tool in ("ip", "nft"):
        if shutil.which(tool) is None and shutil.which(tool, path="/usr/sbin:/sbin") is None:
            pytest.skip(f"{tool} is not installed (.ci/run installs it)")


def sh(*cmd: str, check: bool = True, timeout: float = 30.0) -> subprocess.CompletedProcess[str]:
    done = subprocess.run(list(cmd), capture_output=True, text=True, timeout=timeout,
                          check=False)
    if check and done.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} failed ({done.returncode}): {done.stderr}")
    return done


class Netns:
    def __init__(self, name: str) -> None:
        self.name = name

    def cmd(self, *args: str) -> list[str]:
        return [IP, "netns", "exec", self.name, *args]

    def run(self, *args: str, check: bool = True,
            timeout: float = 30.0) -> subprocess.CompletedProcess[str]:
        return sh(*self.cmd(*args), check=check, timeout=timeout)

    def popen(self, args: Sequence[str], **kw: object) -> subprocess.Popen[bytes]:
        return subprocess.Popen(self.cmd(*args), **kw)  # type: ignore[call-overload,no-any-return]


class Topology:
    def __init__(self, tag: str) -> None:
        self.prefix = f"e{os.getpid() % 10000}{next(_counter)}{tag}"[:8]
        self.namespaces: list[Netns] = []
        self.switch: Netns | None = None  # holds the bridges: nothing in the root namespace

    def ns(self, short: str) -> Netns:
        ns = Netns(f"{self.prefix}-{short}")
        sh("ip", "netns", "add", ns.name)
        self.namespaces.append(ns)
        ns.run("ip", "link", "set", "lo", "up")
        return ns

    def bridge(self, name: str) -> str:
        """A bridge inside the topology's own switch namespace."""
        if self.switch is None:
            self.switch = self.ns("sw")
        self.switch.run("ip", "link", "add", name, "type", "bridge")
        self.switch.run("ip", "link", "set", name, "up")
        return name

    def attach(self, ns: Netns, bridge: str, ifname: str, addrs: Sequence[str]) -> str:
        """A veth from ``ns`` (named ``ifname`` there) to ``bridge``; returns the switch
        end's name (where a capture sees the host's traffic)."""
        assert self.switch is not None
        sw_end = f"{ns.name.rsplit('-', 1)[1]}-{ifname}"[:15]
        self.switch.run("ip", "link", "add", sw_end, "type", "veth", "peer", "name", ifname,
                        "netns", ns.name)
        self.switch.run("ip", "link", "set", sw_end, "master", bridge, "up")
        for addr in addrs:
            extra = ["nodad"] if ":" in addr else []
            ns.run("ip", "addr", "add", addr, "dev", ifname, *extra)
        ns.run("ip", "link", "set", ifname, "up")
        return sw_end

    def close(self) -> None:
        for ns in reversed(self.namespaces):
            sh("ip", "netns", "del", ns.name, check=False)


@contextmanager
def topology(tag: str) -> Iterator[Topology]:
    require_netns()
    topo = Topology(tag)
    try:
        yield topo
    finally:
        topo.close()
