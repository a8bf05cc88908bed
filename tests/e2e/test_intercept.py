"""``enforcer intercept`` in network namespaces the test creates: the rules apply, apply
again to the same table, catch the app's TCP but not enforcer's own (by uid), leave other
tables alone on remove; a missing nft tool or CAP_NET_ADMIN is one line and its exit code."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.e2e.netns import Netns, Topology, sh, topology

ENFORCER = [sys.executable, "-m", "enforcer"]
SETPRIV = shutil.which("setpriv") or "setpriv"
NOBODY = [SETPRIV, "--reuid", "65534", "--regid", "65534", "--clear-groups"]
# Connects to argv[1]:argv[2], sends a line, prints what comes back (or the error's name).
DIAL = """
import socket, sys
try:
    s = socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=5)
    s.sendall(b"hello\\n"); print(s.recv(100).decode().strip())
except OSError as e:
    print(type(e).__name__)
"""
# Accepts on argv[1] once per line on stdin... answers each client with its SO_ORIGINAL_DST.
ORIGDST = """
import socket, struct, sys
srv = socket.create_server(("::", int(sys.argv[1])), family=socket.AF_INET6, dualstack_ipv6=True)
print("ready", flush=True)
while True:
    c, _ = srv.accept()
    c.recv(100)
    try:
        raw = c.getsockopt(socket.SOL_IP, 80, 16)
        port, ip = struct.unpack("!2xH4s8x", raw)
        c.sendall(f"{socket.inet_ntoa(ip)}:{port}".encode())
    except OSError as e:
        c.sendall(f"no-origdst:{e.errno}".encode())
    c.close()
"""


@pytest.fixture
def pod() -> Iterator[tuple[Topology, Netns]]:
    with topology("ic") as topo:
        ns = topo.ns("pod")
        ns.run("ip", "link", "add", "d0", "type", "veth", "peer", "name", "d1")
        ns.run("ip", "addr", "add", "192.0.2.10/24", "dev", "d0")
        ns.run("ip", "addr", "add", "2001:db8::10/64", "dev", "d0", "nodad")
        ns.run("ip", "link", "set", "d0", "up")
        ns.run("ip", "link", "set", "d1", "up")
        yield topo, ns


def intercept(ns: Netns, *args: str) -> subprocess.CompletedProcess[str]:
    return ns.run(*ENFORCER, "intercept", *args, check=False)


def test_apply_is_idempotent_and_remove_is_exact(pod: tuple[Topology, Netns]) -> None:
    _, ns = pod
    ns.run("nft", "add table inet other; add chain inet other keep")
    args = ["--uid", "0", "--inbound-ports", "8080", "--exclude-cidrs", "10.96.0.1,fd00::1"]
    first = intercept(ns, "apply", *args)
    assert first.returncode == 0, first.stderr
    listed = intercept(ns, "show").stdout
    assert "redirect to :15001" in listed and "tcp dport 8080 redirect to :15006" in listed
    again = intercept(ns, "apply", *args)
    assert again.returncode == 0, again.stderr
    assert intercept(ns, "show").stdout == listed  # replaced, not duplicated
    dry = intercept(ns, "show", "--dry-run", *args).stdout
    assert dry.count("redirect") == listed.count("redirect") == 2
    assert intercept(ns, "remove").returncode == 0
    gone = intercept(ns, "show")
    assert gone.returncode == 1 and "table inet enforcer absent" in gone.stderr
    assert "table inet other" in ns.run("nft", "list", "tables").stdout  # not ours: kept
    assert intercept(ns, "remove").returncode == 0  # nothing left to remove: still fine


def test_outbound_is_redirected_except_for_the_enforcer_uid(
        pod: tuple[Topology, Netns]) -> None:
    _, ns = pod
    assert intercept(ns, "apply", "--uid", "0", "--inbound-ports", "").returncode == 0
    server = ns.popen([sys.executable, "-c", ORIGDST, "15001"], stdout=subprocess.PIPE)
    try:
        assert server.stdout is not None and server.stdout.readline() == b"ready\n"
        # the app (uid 65534) dials an address nothing listens on: enforcer's port gets it,
        # and reads the original destination back
        app = ns.run(*NOBODY, sys.executable, "-c", DIAL, "192.0.2.10", "9999").stdout
        assert app.strip() == "192.0.2.10:9999"
        # enforcer's own uid (0 here) is never redirected: the same dial is refused
        own = ns.run(sys.executable, "-c", DIAL, "192.0.2.10", "9999").stdout
        assert own.strip() == "ConnectionRefusedError"
        # IPv6 too (the listener answers the v4 form only; the redirect is what counts)
        v6 = ns.run(*NOBODY, sys.executable, "-c", DIAL, "2001:db8::10", "9999").stdout
        assert v6.strip().startswith("no-origdst:")
        # loopback is left alone
        lo = ns.run(*NOBODY, sys.executable, "-c", DIAL, "127.0.0.1", "9999").stdout
        assert lo.strip() == "ConnectionRefusedError"
    finally:
        server.kill()
        server.wait()


def test_no_nft_tool_is_one_line_and_exit_5(pod: tuple[Topology, Netns]) -> None:
    _, ns = pod
    env = {**os.environ, "PATH": "/nonexistent"}
    for backend, message in (
            ("auto", "neither the nft tool nor iptables is installed or on PATH "
                     "(install nftables)"),
            ("nft", "the nft tool is not installed or not on PATH (install nftables)"),
            ("iptables", "iptables and iptables-restore are not installed or not on PATH")):
        done = subprocess.run(ns.cmd(*ENFORCER, "intercept", "apply", "--backend", backend),
                              env=env, capture_output=True, text=True, timeout=30,
                              check=False)
        assert done.returncode == 5
        assert done.stderr.strip().splitlines() == [f"enforcer: error: {message}"]


def _iptables_only_path(tmp_path: Path) -> dict[str, str]:
    """PATH with iptables and ip6tables (and their -restore) but no nft."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name in ("iptables", "ip6tables", "iptables-restore", "ip6tables-restore"):
        tool = shutil.which(name) or pytest.skip(f"{name} is not installed")
        (bin_dir / name).symlink_to(tool)
    return {**os.environ, "PATH": str(bin_dir)}


def test_iptables_fallback(pod: tuple[Topology, Netns], tmp_path: Path) -> None:
    """Without nft, auto uses iptables/ip6tables: same redirects, idempotent, exact."""
    _, ns = pod
    env = _iptables_only_path(tmp_path)
    ns.run("iptables", "-t", "nat", "-N", "SOMEONE_ELSE")

    def intercept_env(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(ns.cmd(*ENFORCER, "intercept", *args), env=env,
                              capture_output=True, text=True, timeout=60, check=False)

    args = ["--uid", "0", "--inbound-ports", "8080"]
    assert intercept_env("apply", *args).returncode == 0
    first = ns.run("iptables-save", "-t", "nat").stdout
    assert intercept_env("apply", *args).returncode == 0  # again: nothing changes
    rules = ns.run("iptables", "-t", "nat", "-S").stdout
    assert rules.count("-A OUTPUT -p tcp -j ENFORCER_OUTPUT") == 1
    assert rules.count("-A PREROUTING -p tcp -j ENFORCER_PREROUTING") == 1
    assert rules.count("REDIRECT --to-ports 15001") == 1
    assert "ENFORCER_OUTPUT -d ::1/128" in ns.run("ip6tables", "-t", "nat", "-S").stdout
    assert _without_counters(first) == _without_counters(ns.run("iptables-save", "-t",
                                                                "nat").stdout)
    shown = intercept_env("show")
    assert shown.returncode == 0 and "REDIRECT --to-ports 15006" in shown.stdout
    server = ns.popen([sys.executable, "-c", ORIGDST, "15001"], stdout=subprocess.PIPE)
    try:
        assert server.stdout is not None and server.stdout.readline() == b"ready\n"
        app = ns.run(*NOBODY, sys.executable, "-c", DIAL, "192.0.2.10", "9999").stdout
        assert app.strip() == "192.0.2.10:9999"
    finally:
        server.kill()
        server.wait()
    assert intercept_env("remove").returncode == 0
    left = ns.run("iptables", "-t", "nat", "-S").stdout
    assert "ENFORCER" not in left and "-N SOMEONE_ELSE" in left
    assert "ENFORCER" not in ns.run("ip6tables", "-t", "nat", "-S").stdout
    assert intercept_env("show").returncode == 1
    assert intercept_env("remove").returncode == 0


def _without_counters(save: str) -> list[str]:
    return [line for line in save.splitlines() if not line.startswith("#")
            and not line.startswith(":")]


def test_no_net_admin_is_one_line_and_exit_6(pod: tuple[Topology, Netns]) -> None:
    _, ns = pod
    done = ns.run(SETPRIV, "--bounding-set", "-net_admin", "--inh-caps", "-net_admin",
                  *ENFORCER, "intercept", "apply", check=False)
    assert done.returncode == 6
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and "CAP_NET_ADMIN is missing" in lines[0]
    assert "enforcer" not in ns.run("nft", "list", "tables").stdout


def test_dry_run_needs_neither_nft_nor_privilege() -> None:
    done = subprocess.run(
        [SETPRIV, "--bounding-set", "-net_admin", "--inh-caps", "-net_admin",
         *ENFORCER, "intercept", "apply", "--dry-run", "--table", "t1"],
        env={**os.environ, "PATH": "/nonexistent"}, capture_output=True, text=True,
        timeout=30, check=False)
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("table inet t1\ndelete table inet t1\n")


def test_bad_argument_is_exit_2() -> None:
    done = sh(*ENFORCER, "intercept", "apply", "--dry-run", "--exclude-cidrs", "10.1.2.300",
              check=False)
    assert done.returncode == 2
    assert "exclude-cidrs: bad CIDR '10.1.2.300'" in done.stderr
