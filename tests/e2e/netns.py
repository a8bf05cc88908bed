"""Network namespaces, veth pairs and bridges that a test creates and always removes.

``Topology`` names everything with a per-test prefix, records what it made, and ends it
in reverse order on ``close`` (a namespace goes with its holder process, and its veth
ends and nft tables with it; the bridges live in a namespace of their own). Tests that
cannot create namespaces here (not root, no ``ip``/``nft``/``unshare``/``nsenter``) skip.
"""

from __future__ import annotations

import itertools
import os
import shutil
import subprocess
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import pytest

_counter = itertools.count()
UNSHARE = shutil.which("unshare") or "unshare"
NSENTER = shutil.which("nsenter") or "nsenter"


def require_netns() -> None:
    if os.geteuid() != 0:
        pytest.skip("network namespace tests need root")
    for tool in ("ip", "nft", "unshare", "nsenter"):
        if shutil.which(tool) is None and shutil.which(tool, path="/usr/sbin:/sbin") is None:
            pytest.skip(f"{tool} is not installed (.ci/run installs it)")


def sh(*cmd: str, check: bool = True, timeout: float = 30.0) -> subprocess.CompletedProcess[str]:
    done = subprocess.run(list(cmd), capture_output=True, text=True, timeout=timeout,
                          check=False)
    if check and done.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} failed ({done.returncode}): {done.stderr}")
    return done


class Netns:
    """A network namespace held by a ``sleep`` process started with ``unshare --net``;
    commands enter it with ``nsenter``. (Not ``ip netns``: its bind mounts under
    /run/netns are shared by every process on the machine, and namespaces created and
    deleted there concurrently by other tests have been seen to lose theirs.)"""

    def __init__(self, name: str) -> None:
        self.name = name
        self.holder = subprocess.Popen([UNSHARE, "--net", "--", "sleep", "infinity"],
                                       stdin=subprocess.DEVNULL)
        own = os.readlink("/proc/self/ns/net")
        deadline = time.monotonic() + 10
        while os.readlink(f"/proc/{self.holder.pid}/ns/net") == own:  # not unshared yet
            if time.monotonic() > deadline or self.holder.poll() is not None:
                self.close()
                raise AssertionError(f"unshare --net did not start for {name}")
            time.sleep(0.01)

    @property
    def pid(self) -> int:
        return self.holder.pid

    def cmd(self, *args: str) -> list[str]:
        return [NSENTER, f"--net=/proc/{self.holder.pid}/ns/net", "--", *args]

    def run(self, *args: str, check: bool = True,
            timeout: float = 30.0) -> subprocess.CompletedProcess[str]:
        return sh(*self.cmd(*args), check=check, timeout=timeout)

    def popen(self, args: Sequence[str], **kw: object) -> subprocess.Popen[bytes]:
        return subprocess.Popen(self.cmd(*args), **kw)  # type: ignore[call-overload,no-any-return]

    def close(self) -> None:
        """The namespace goes once its last process is gone (tests stop theirs first)."""
        if self.holder.poll() is None:
            self.holder.kill()
        self.holder.wait(10)


class Topology:
    def __init__(self, tag: str) -> None:
        self.prefix = f"e{os.getpid() % 10000}{next(_counter)}{tag}"[:8]
        self.namespaces: list[Netns] = []
        self.switch: Netns | None = None  # holds the bridges: nothing in the root namespace

    def ns(self, short: str) -> Netns:
        ns = Netns(f"{self.prefix}-{short}")
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
                        "netns", str(ns.pid))
        self.switch.run("ip", "link", "set", sw_end, "master", bridge, "up")
        for addr in addrs:
            extra = ["nodad"] if ":" in addr else []
            ns.run("ip", "addr", "add", addr, "dev", ifname, *extra)
        ns.run("ip", "link", "set", ifname, "up")
        return sw_end

    def close(self) -> None:
        for ns in reversed(self.namespaces):
            ns.close()


@contextmanager
def topology(tag: str) -> Iterator[Topology]:
    require_netns()
    topo = Topology(tag)
    try:
        yield topo
    finally:
        topo.close()
