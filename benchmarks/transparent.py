"""The transparent sidecar pair: enforcer reached through nftables redirect rules, so the
load tool dials the backend's own address and the rules send it through both sidecars.

    load tool --connect(127.0.0.1:backend)--> [nat output: redirect] --> outbound (uid 1337)
      ==mTLS to the original destination--> [nat output: redirect, uid 1337] --> inbound
      (uid 1338) --plain--> backend

It runs beside the explicit-port ``enforcer`` pair (same configs but for
``transparent: true`` and ``address: original_destination``) to show what interception
costs: the NAT lookups and reading ``SO_ORIGINAL_DST``. The rules cannot go into the
machine's own network namespace, so the harness runs in a private one: ``--netns``
re-executes it under ``unshare --net`` (root needed) with loopback up, and only then is
this contestant offered. The enforcers run under their own uids (``setpriv``): the uid is
what keeps their own connections from being redirected again, as in a pod. The rules are
installed when the pair starts and removed when it stops (other contestants reach the
same backend port).

The control, ``enforcer-nathooks``: the explicit-port pair while the same rules are
loaded, aimed at a port nobody dials (``UNUSED_PORT``). They register what the redirect
rules register: the NAT hooks (the nat chain) and conntrack for both families (the
redirect expressions; an empty nat chain alone would not make conntrack track anything),
and the chain is evaluated on each connection's first packet as before, but nothing is
redirected. So ``enforcer-nathooks`` ÷ ``enforcer`` is what conntrack and the NAT hooks
cost, and ``enforcer-transparent`` ÷ ``enforcer-nathooks`` what the redirect and
``SO_ORIGINAL_DST`` cost on top.

The private namespace gets a wider ephemeral port range (``EPHEMERAL``): in the
transparent pair the load tool, the outbound sidecar and the inbound one all dial the
backend's own address, so idle-large needs three source ports per connection towards one
destination (3 x 9,700 is more than the default range's 28,232).
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any, NoReturn

from benchmarks.contestants import Enforcer, Env, Pair, stop_pair
from benchmarks.procs import StartError, wait_listening

ENV_FLAG = "ENFORCER_BENCH_NETNS"  # set in the re-executed harness (private namespace)
OUTBOUND_UID, INBOUND_UID = 1337, 1338
TABLE = "enforcer-bench"
HOOKS_TABLE = "enforcer-bench-hooks"
UNUSED_PORT = 9  # discard: nothing in the private namespace dials it
EPHEMERAL = "20000 65535"  # the private namespace's net.ipv4.ip_local_port_range


def reexec_in_netns(argv: Sequence[str], module: str = "benchmarks") -> NoReturn:
    """Run this harness (or another of its entry points, ``python -m module``) again in a
    new network namespace, loopback up (``--netns``)."""
    unshare = shutil.which("unshare")
    if os.geteuid() != 0 or unshare is None:
        who = "enforcer bench" if module == "benchmarks" else f"python -m {module}"
        raise SystemExit(f"{who}: --netns needs root and unshare (util-linux)")
    os.environ[ENV_FLAG] = "1"
    checkout = str(Path(__file__).resolve().parents[1])
    os.environ["PYTHONPATH"] = os.pathsep.join(
        p for p in (checkout, os.environ.get("PYTHONPATH", "")) if p)
    script = (f'ip link set lo up && echo "{EPHEMERAL}" > /proc/sys/net/ipv4/ip_local_port_range'
              ' && exec "$0" "$@"')
    os.execv(unshare, [unshare, "--net", "--", "sh", "-c", script, sys.executable, "-m",
                       module, *argv])


def harness_argv(argv: Sequence[str]) -> list[str]:
    """The harness's own options from a command line (``enforcer bench ...`` or
    ``python -m benchmarks ...``)."""
    out = list(argv)
    return out[1:] if out[:1] == ["bench"] else out


def in_private_netns() -> bool:
    return os.environ.get(ENV_FLAG) == "1"


def rules(backend_port: int, out_port: int, in_port: int, table: str = TABLE) -> str:
    """One ``nft -f`` transaction installing (or replacing) the pair's redirects."""
    return (f"table inet {table}\ndelete table inet {table}\n"
            f"table inet {table} {{\n"
            "\tchain output {\n"
            "\t\ttype nat hook output priority -100; policy accept;\n"
            f"\t\tmeta skuid {INBOUND_UID} return\n"
            f"\t\tmeta skuid {OUTBOUND_UID} ip daddr 127.0.0.1 tcp dport {backend_port} "
            f"counter redirect to :{in_port}\n"
            f"\t\tip daddr 127.0.0.1 tcp dport {backend_port} counter redirect to :{out_port}\n"
            "\t}\n}\n")


def hook_rules(out_port: int, in_port: int, table: str = HOOKS_TABLE) -> str:
    """The control's table: the transparent pair's rules, for a backend port nobody
    dials (conntrack and the NAT hooks registered, nothing redirected)."""
    return rules(UNUSED_PORT, out_port, in_port, table)


def remove_rules(table: str = TABLE) -> str:
    return f"table inet {table}\ndelete table inet {table}\n"


def nft(script: str) -> None:
    done = subprocess.run(["nft", "-f", "-"], input=script, capture_output=True, text=True,
                          timeout=30, check=False)
    if done.returncode != 0:
        raise StartError(f"nft: {done.stderr.strip()}")


def redirected(table: str = TABLE) -> list[int]:
    """Packets each of ``table``'s redirect rules matched (its counters, in rule order):
    one per connection redirected, as the nat chain sees only a connection's first."""
    done = subprocess.run(["nft", "list", "table", "inet", table], capture_output=True,
                          text=True, timeout=30, check=False)
    if done.returncode != 0:
        raise StartError(f"nft: {done.stderr.strip()}")
    return [int(n) for n in re.findall(r"packets (\d+)", done.stdout)]


def _missing(tools: tuple[str, ...]) -> str | None:
    if not in_private_netns():
        return "needs --netns (root): the nftables rules go into a private namespace"
    for tool in tools:
        if shutil.which(tool) is None:
            return f"{tool} not installed (apt install {'nftables' if tool == 'nft' else 'util-linux'})"
    return None


def other_interpreter(uid: int) -> str | None:
    """Why the sidecars would not run this harness's interpreter under ``uid``, or None.
    An interpreter whose files only root may read (pyenv under /root) makes the loader
    fall back to the system's libpython and standard library: the transparent column would
    then measure another Python than the columns it is compared with."""
    probe = ["setpriv", "--reuid", str(uid), "--regid", str(uid), "--clear-groups",
             sys.executable, "-c", "import sys; print(sys.version)"]
    try:
        done = subprocess.run(probe, capture_output=True, text=True, timeout=30, check=False)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"cannot run {sys.executable} as uid {uid}: {exc}"
    seen = done.stdout.strip()
    if done.returncode != 0 or seen != sys.version:
        return (f"uid {uid} cannot run this harness's Python as it is ({sys.executable}: "
                f"{seen.split()[0] if seen else 'not started'} instead of "
                f"{sys.version.split()[0]}); run the harness with an interpreter every uid "
                "can read")
    return None


class NatHooksEnforcer(Enforcer):
    """The explicit-port pair with the NAT and conntrack hooks loaded but no redirect
    (column ``enforcer-nathooks``): the control for ``enforcer-transparent``."""

    def __init__(self) -> None:
        super().__init__()
        self.name = "enforcer-nathooks"

    def missing(self) -> str | None:
        return _missing(("nft",))

    def describe(self) -> str:
        return ("the explicit-port enforcer pair while enforcer-transparent's nftables rules "
                f"are loaded for a port nobody dials ({UNUSED_PORT}): conntrack and the NAT "
                "hooks, no redirect; the control for enforcer-transparent")

    def start(self, env: Env, backend_port: int) -> Pair:
        pair = super().start(env, backend_port)
        pair.cleanup.append(lambda: nft(remove_rules(HOOKS_TABLE)))
        try:
            assert pair.inbound_port is not None
            nft(hook_rules(pair.entry_port, pair.inbound_port))
        except BaseException:
            stop_pair(env, pair)
            raise
        return pair


class TransparentEnforcer(Enforcer):
    """The ``enforcer`` pair behind redirect rules (column ``enforcer-transparent``)."""

    def __init__(self) -> None:
        super().__init__()
        self.name = "enforcer-transparent"

    def missing(self) -> str | None:
        return _missing(("nft", "setpriv")) or other_interpreter(OUTBOUND_UID)

    def describe(self) -> str:
        return ("the enforcer pair behind nftables redirects (transparent listeners, "
                "original destination), in the harness's private network namespace")

    def start(self, env: Env, backend_port: int) -> Pair:
        d = env.workdir(self.name)
        out_port, in_port = env.ports.take(), env.ports.take()
        # the load tool dials the backend itself; no TLS probe (the inbound listener
        # refuses connections that were not redirected)
        pair = Pair(self.name, backend_port)
        pair.cleanup.append(lambda: nft(remove_rules()))
        try:
            for role, uid, config in (
                    ("inbound", INBOUND_UID, self._inbound(env, d, in_port)),
                    ("outbound", OUTBOUND_UID, self._outbound(env, d, out_port))):
                proc = env.procs.spawn(
                    ["setpriv", "--reuid", str(uid), "--regid", str(uid), "--clear-groups",
                     *self.command(config, d, role)],
                    cwd=d, log=d / f"{role}.log", stdout=Path("/dev/null"))
                pair.procs.append(proc)
                pair.roles[role] = proc.pid
            wait_listening([in_port, out_port], pair.procs, env.procs, f"{self.name} pair",
                           self.start_timeout)
            nft(rules(backend_port, out_port, in_port))
        except BaseException:
            stop_pair(env, pair)
            raise
        return pair

    def _own_copy(self, d: Path, role: str, uid: int, files: dict[str, Path]) -> dict[str, str]:
        """The role's certificate files, readable by its uid only."""
        where = d / role
        where.mkdir(mode=0o700)
        os.chown(where, uid, uid)
        out: dict[str, str] = {}
        for name, src in files.items():
            dst = where / src.name
            dst.write_bytes(src.read_bytes())
            os.chown(dst, uid, uid)
            dst.chmod(0o600)
            out[name] = str(dst)
        return out

    def _outbound(self, env: Env, d: Path, port: int) -> Path:
        files = self._own_copy(d, "outbound", OUTBOUND_UID, {
            "cert": env.pki.client_cert, "key": env.pki.client_key, "ca": env.pki.ca})
        return self._readable(self._write(env, d / "outbound.yaml", {
            "version": 1,
            "node": {"name": "bench-outbound"},
            "tls": {"mesh": self._pinned(env, files)},
            "listeners": [{"name": "outbound", "listen": f"127.0.0.1:{port}",
                           "transparent": True, "tls": {"mode": "off"}, "ruleset": "bench",
                           "upstream": "inbound"}],
            "upstreams": {"inbound": {
                "address": "original_destination",
                "tls": {"mode": "mtls", "material": "mesh",
                        "verify": {"uri": [env.pki.server_id]}}}},
            "rulesets": {"bench": {"default": "allow"}},
        }))

    def _inbound(self, env: Env, d: Path, port: int) -> Path:
        files = self._own_copy(d, "inbound", INBOUND_UID, {
            "cert": env.pki.server_cert, "key": env.pki.server_key, "ca": env.pki.ca})
        return self._readable(self._write(env, d / "inbound.yaml", {
            "version": 1,
            "node": {"name": "bench-inbound"},
            "tls": {"mesh": self._pinned(env, files)},
            "listeners": [{"name": "inbound", "listen": f"127.0.0.1:{port}",
                           "transparent": True,
                           "tls": {"mode": "terminate", "material": "mesh",
                                   "client_auth": "required"},
                           "ruleset": "bench", "upstream": "app"}],
            "upstreams": {"app": {"address": "original_destination"}},
            "rulesets": {"bench": {"default": "allow"}},
        }))

    @staticmethod
    def _pinned(env: Env, files: dict[str, str]) -> dict[str, Any]:
        """The material, with the run's TLS suite as the explicit pair has it."""
        return {**files, **({"cipher_suites": [env.suite]} if env.suite else {})}

    @staticmethod
    def _readable(path: Path) -> Path:
        """The config and the directories above it up to the run's temp dir: readable
        by the sidecars' uids (the temp dir is private to root otherwise)."""
        path.chmod(0o644)
        for parent in (path.parent, path.parent.parent):
            parent.chmod(parent.stat().st_mode | 0o011)
        return path
