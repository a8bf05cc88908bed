"""Egress proxies: enforcer's ``socks5`` and ``http_connect`` listeners beside dante
(SOCKS5), tinyproxy and squid (HTTP CONNECT), one proxy process each, the same load.

    egress load tool --SOCKS5 / CONNECT--> [proxy] --plain--> HTTP backend

Every contestant is started fresh for each measurement with no login (the ``-auth``
workload: a username/password login, SOCKS5 RFC 1929: enforcer's scrypt file, and for
dante a system user the harness adds in copies of /etc/passwd and /etc/shadow that only
dante's own mount namespace sees), allows any destination to every local client, and
keeps its own defaults for processes and threads (dante preforks, tinyproxy a thread per
connection, squid one process, enforcer ``workers: 1``). Per-connection logs are written
as each tool ships them to /dev/null, or a file where the tool refuses /dev/null
(tinyproxy at ``LogLevel Connect``); dante logs no connection by default. The load tool
(``benchmarks.egress_load``, its own process) asks each proxy for the backend by IPv4
address, so no proxy resolves a name.

Workloads (``WORKLOADS``): for each protocol, new connections (handshake + CONNECT +
``GET`` of the 256 B file with ``Connection: close``, 32 at a time) and bulk (one tunnel,
keep-alive ``GET`` of the 16 MiB file back to back). Every body is checked by sha256 in the
load tool. CPU is every process of the proxy's session, from /proc, over the measured
window only (``workloads.Window``); the load tool's own share of a core is recorded too
(``load_cpu_cores``), to see whether it, not the proxy, was the limit.
"""

from __future__ import annotations

import json
import os
import shlex
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from benchmarks.backends import BODY_SIZE, BULK_PATH, BULK_SIZE, PATH, sha256_of
from benchmarks.contestants import Env, Pair, deep_merge, stop_pair, tool_version
from benchmarks.load import MeasureError, run_to_end
from benchmarks.procs import log_tail, wait_listening
from benchmarks.workloads import Metric, Settings, Values, Window

SOCKS5, CONNECT = "socks5", "http_connect"
USER, PASSWORD = "bench", "bench-password-26"
CONNECTIONS = 32  # concurrent new-connection workers, as wrk's in the pair workloads
BULK_TUNNELS = 1


# --------------------------------------------------------------------------- contestants


class EgressProxy:
    """One proxy process speaking ``protocol``, listening on 127.0.0.1."""

    name = ""
    protocol = ""
    binary: str | None = None
    apt: str | None = None
    is_peer = True

    def no_login(self) -> str | None:
        """Why this proxy cannot take part in the login workloads here, or None."""
        return "the harness does not set up its logins"

    def exe(self) -> str | None:
        """The binary's path: on PATH, or in /usr/sbin (daemons, off a user's PATH)."""
        if self.binary is None:
            return None
        sbin = Path("/usr/sbin") / self.binary
        return shutil.which(self.binary) or (str(sbin) if sbin.exists() else None)

    def missing(self) -> str | None:
        if self.binary and not self.exe():
            return f"{self.binary} not installed (apt install {self.apt})"
        return None

    def version(self) -> str | None:
        return None

    def describe(self) -> str:
        return ""

    def argv(self, env: Env, d: Path, port: int, login: bool) -> list[str]:
        raise NotImplementedError

    def start(self, env: Env, login: bool) -> Pair:
        d = env.workdir(f"{self.name}-{self.protocol}")
        port = env.ports.take()
        pair = Pair(self.name, port)
        try:
            proc = env.procs.spawn(self.argv(env, d, port, login), cwd=d,
                                   log=d / "proxy.log", stdout=self.stdout(d))
            pair.procs.append(proc)
            pair.roles["proxy"] = proc.pid
            wait_listening([port], pair.procs, env.procs, f"{self.name} ({self.protocol})")
        except BaseException:
            stop_pair(env, pair)
            raise
        return pair

    def stdout(self, d: Path) -> Path | None:
        return None


class Enforcer(EgressProxy):
    """An enforcer listener with ``protocol: socks5`` or ``http_connect``."""

    name = "enforcer"
    is_peer = False

    def __init__(self, protocol: str) -> None:
        self.protocol = protocol

    def no_login(self) -> str | None:
        return None

    def version(self) -> str | None:
        from enforcer import __version__

        return __version__

    def describe(self) -> str:
        return (f"a `protocol: {self.protocol}` listener, `upstream: {{address: "
                "original_destination}`, `default: allow`, config defaults (flow records to "
                "/dev/null); the login variant: `egress.credentials` (scrypt)")

    def argv(self, env: Env, d: Path, port: int, login: bool) -> list[str]:
        listener: dict[str, Any] = {
            "name": "egress", "listen": f"127.0.0.1:{port}", "protocol": self.protocol,
            "tls": {"mode": "off"}, "ruleset": "bench", "upstream": "requested"}
        if login:
            from enforcer.egress.credentials import hash_password

            users = d / "egress-users"
            users.write_text(f"{USER}:{hash_password(PASSWORD.encode())}\n")
            listener["egress"] = {"credentials": str(users)}
        cfg = deep_merge({
            "version": 1, "node": {"name": f"bench-{self.protocol}"},
            "listeners": [listener],
            "upstreams": {"requested": {"address": "original_destination"}},
            "rulesets": {"bench": {"default": "allow"}}}, env.enforcer_extra)
        config = d / "egress.yaml"
        config.write_text(yaml.safe_dump(cfg, sort_keys=False))
        return [sys.executable, "-m", "enforcer", "run", "-c", str(config)]

    def stdout(self, d: Path) -> Path | None:
        return Path("/dev/null")  # flow records, written and thrown away as in the pair


class Dante(EgressProxy):
    name = "dante"
    protocol = SOCKS5
    binary = "danted"
    apt = "dante-server"

    def version(self) -> str | None:
        return tool_version([str(self.exe()), "-v"], r"Dante v([0-9.]*[0-9])")

    def describe(self) -> str:
        return ("`danted -f <conf>`, `clientmethod: none`, `socksmethod: none`, one `client "
                "pass` and one `socks pass` rule for 127.0.0.0/8, default child processes; "
                "the login variant: `socksmethod: username` (the system's user database: "
                "a user with a SHA-512 crypt password, `openssl passwd -6`, in copies of "
                "/etc/passwd and /etc/shadow mounted over the originals in a mount namespace "
                "of dante's own)")

    def no_login(self) -> str | None:
        # dante checks a login against the system's users: the harness adds one in copies
        # of /etc/passwd and /etc/shadow that only dante's own mount namespace sees
        if os.geteuid() != 0 or not shutil.which("unshare") or not shutil.which("openssl"):
            return ("dante checks logins against the system's users: the harness adds one "
                    "in a private mount namespace, which needs root, unshare and openssl")
        return None

    def argv(self, env: Env, d: Path, port: int, login: bool) -> list[str]:
        root = os.geteuid() == 0
        (d / "danted.conf").write_text(
            "logoutput: stderr\n"
            f"internal: 127.0.0.1 port = {port}\nexternal: 127.0.0.1\n"
            f"clientmethod: none\nsocksmethod: {'username' if login else 'none'}\n"
            + ("user.privileged: root\nuser.unprivileged: nobody\n" if root else "")
            + "client pass { from: 127.0.0.0/8 to: 0.0.0.0/0 }\n"
            "socks pass { from: 127.0.0.0/8 to: 0.0.0.0/0 command: connect }\n")
        argv = [str(self.exe()), "-f", str(d / "danted.conf"), "-p", str(d / "danted.pid")]
        return self._with_user(d, argv) if login else argv

    @staticmethod
    def _with_user(d: Path, argv: list[str]) -> list[str]:
        """``argv`` in a private mount namespace whose /etc/passwd and /etc/shadow are
        copies with the bench user added (the machine's own files are not touched)."""
        hashed = subprocess.run(["openssl", "passwd", "-6", "-stdin"], input=PASSWORD,
                                capture_output=True, text=True, check=True, timeout=10)
        passwd, shadow = d / "passwd", d / "shadow"
        passwd.write_text(Path("/etc/passwd").read_text()
                          + f"{USER}:x:64026:64026::/nonexistent:/usr/sbin/nologin\n")
        shadow.touch(mode=0o600)
        shadow.write_text(Path("/etc/shadow").read_text()
                          + f"{USER}:{hashed.stdout.strip()}:20000:0:99999:7:::\n")
        script = (f"mount --bind {shlex.quote(str(passwd))} /etc/passwd && "
                  f"mount --bind {shlex.quote(str(shadow))} /etc/shadow && exec \"$@\"")
        return ["unshare", "--mount", "--propagation", "private", "sh", "-c", script,
                "danted", *argv]


class Tinyproxy(EgressProxy):
    name = "tinyproxy"
    protocol = CONNECT
    binary = "tinyproxy"
    apt = "tinyproxy"

    def version(self) -> str | None:
        return tool_version([str(self.exe()), "-v"], r"tinyproxy (\S+)")

    def describe(self) -> str:
        return ("`tinyproxy -d -c <conf>`, `Allow 127.0.0.1`, every port allowed for CONNECT "
                "(no `ConnectPort`), `LogLevel Connect` to a file, default `MaxClients`")

    def no_login(self) -> str | None:
        return None  # BasicAuth (no HTTP CONNECT login workload yet)

    def argv(self, env: Env, d: Path, port: int, login: bool) -> list[str]:
        (d / "tinyproxy.conf").write_text(
            f"Port {port}\nListen 127.0.0.1\nTimeout 600\n"
            f'LogFile "{d}/access.log"\nLogLevel Connect\nPidFile "{d}/tinyproxy.pid"\n'
            "Allow 127.0.0.1\n" + (f"BasicAuth {USER} {PASSWORD}\n" if login else ""))
        return [str(self.exe()), "-d", "-c", str(d / "tinyproxy.conf")]


class Squid(EgressProxy):
    name = "squid"
    protocol = CONNECT
    binary = "squid"
    apt = "squid"

    def version(self) -> str | None:
        return tool_version([str(self.exe()), "-v"], r"Version (\S+)")

    def describe(self) -> str:
        return ("`squid -N -f <conf>`, `http_access allow localhost`, CONNECT to any port, "
                "`cache deny all`, access log to /dev/null, one process (its default)")

    def argv(self, env: Env, d: Path, port: int, login: bool) -> list[str]:
        (d / "squid.conf").write_text(
            f"http_port 127.0.0.1:{port}\nvisible_hostname bench\n"
            "http_access allow localhost\nhttp_access deny all\ncache deny all\n"
            "access_log stdio:/dev/null\ncache_log /dev/null\npid_filename none\n"
            "pinger_enable off\nshutdown_lifetime 0 seconds\n")
        return [str(self.exe()), "-N", "-d", "1", "-f", str(d / "squid.conf")]


CONTESTANTS: dict[str, tuple[EgressProxy, ...]] = {
    SOCKS5: (Enforcer(SOCKS5), Dante()),
    CONNECT: (Enforcer(CONNECT), Tinyproxy(), Squid()),
}
NAMES = ("enforcer", "dante", "tinyproxy", "squid")  # columns of the egress table


def contestants(protocol: str, only: set[str] | None) -> list[EgressProxy]:
    return [c for c in CONTESTANTS[protocol] if only is None or c.name in only]


# --------------------------------------------------------------------------- workloads


@dataclass(frozen=True)
class EgressWorkload:
    name: str
    title: str
    protocol: str
    mode: str  # "newconn" | "bulk"
    login: bool
    metrics: tuple[Metric, ...]

    def params(self, s: Settings) -> Values:
        seconds = s.bulk_seconds if self.mode == "bulk" else s.wrk_seconds
        out: Values = {"protocol": self.protocol, "login": self.login, "seconds": seconds,
                       "connections": BULK_TUNNELS if self.mode == "bulk" else CONNECTIONS}
        out["file_bytes"] = BULK_SIZE if self.mode == "bulk" else BODY_SIZE
        return out

    def doc(self, s: Settings) -> Values:
        """This workload's entry in the results (the shape of a pair workload's)."""
        from benchmarks.results import metric_doc

        return {"title": self.title, "status": "ok", "params": self.params(s),
                "metrics": [metric_doc(m) for m in self.metrics], "results": {},
                "comparison": {}}


NEWCONN = (Metric("conn_per_s", "new connections/s", "conn/s", "higher"),
           Metric("cpu_us_per_conn", "CPU per new connection", "CPU µs/conn", "lower"),
           Metric("p99_ms", "p99 latency under load", "ms", "lower", short="p99"))
BULK = (Metric("gbit_per_s", "throughput", "Gbit/s", "higher"),
        Metric("cpu_s_per_gb", "CPU per GB", "CPU s/GB", "lower"))


def _new(protocol: str, label: str, login: bool = False) -> EgressWorkload:
    suffix, how = ("-auth", " with a username/password login") if login else ("", "")
    return EgressWorkload(f"{label}-newconn{suffix}",
                          f"{label_title(protocol)}: new connections{how}, 32 at a time",
                          protocol, "newconn", login, NEWCONN)


def label_title(protocol: str) -> str:
    return "SOCKS5" if protocol == SOCKS5 else "HTTP CONNECT"


WORKLOADS: tuple[EgressWorkload, ...] = (
    _new(SOCKS5, "socks5"),
    _new(SOCKS5, "socks5", login=True),
    EgressWorkload("socks5-bulk", "SOCKS5: bulk download through one tunnel", SOCKS5,
                   "bulk", False, BULK),
    _new(CONNECT, "connect"),
    EgressWorkload("connect-bulk", "HTTP CONNECT: bulk download through one tunnel", CONNECT,
                   "bulk", False, BULK),
)
BY_NAME = {w.name: w for w in WORKLOADS}


# --------------------------------------------------------------------------- measuring


def load_argv(w: EgressWorkload, proxy_port: int, backend_port: int, seconds: float,
              connections: int | None = None) -> list[str]:
    path = BULK_PATH if w.mode == "bulk" else PATH
    size = BULK_SIZE if w.mode == "bulk" else BODY_SIZE
    argv = [sys.executable, "-m", "benchmarks.egress_load", "--protocol", w.protocol,
            "--proxy", f"127.0.0.1:{proxy_port}", "--target", f"127.0.0.1:{backend_port}",
            "--mode", w.mode, "--path", path, "--size", str(size),
            "--sha256", sha256_of(path), "--seconds", str(seconds),
            "--connections", str(connections or (BULK_TUNNELS if w.mode == "bulk"
                                                 else CONNECTIONS))]
    if w.login:
        argv += ["--user", USER, "--password", PASSWORD]
    return argv


def run_load(env: Env, d: Path, argv: list[str], seconds: float) -> dict[str, Any]:
    out = d / f"egress-load-{time.monotonic_ns()}.txt"
    checkout = Path(__file__).resolve().parents[1]
    proc = env.procs.spawn(argv, cwd=checkout, stdout=out, log=d / "egress-load.log")
    run_to_end(env, proc, "egress load tool", timeout=seconds + 40)
    line = next((ln for ln in out.read_text().splitlines() if ln.startswith("EGRESSJSON ")), "")
    if not line:
        raise MeasureError(f"egress load tool: no summary: {out.read_text()[-300:]!r}")
    got: dict[str, Any] = json.loads(line[len("EGRESSJSON "):])
    if got["completed"] == 0:
        raise MeasureError(f"no request completed through the proxy ({got['errors']} errors;"
                           f" first: {got['first_error']})")
    allowed = 0 if got["mode"] == "bulk" else max(10, got["completed"] // 100)
    if got["errors"] > allowed:
        raise MeasureError(f"{got['errors']} errors for {got['completed']} completed "
                           f"(first: {got['first_error']})")
    return got


def measure(env: Env, s: Settings, backend_port: int, w: EgressWorkload, c: EgressProxy,
            d: Path) -> Values:
    """Start the proxy, warm up, measure, check it still runs, stop it."""
    pair = c.start(env, w.login)
    try:
        warmup = s.wrk_warmup_seconds if w.mode == "newconn" else 0.5
        seconds = s.wrk_seconds if w.mode == "newconn" else s.bulk_seconds
        if w.login:  # one login first: the measured ones are of a user seen before
            run_load(env, d, load_argv(w, pair.entry_port, backend_port, 0.2, 1), 0.2)
        run_load(env, d, load_argv(w, pair.entry_port, backend_port, warmup), warmup)
        with Window(pair) as win:
            got = run_load(env, d, load_argv(w, pair.entry_port, backend_port, seconds),
                           seconds)
        for proc in pair.procs:
            if proc.poll() is not None:
                raise MeasureError(f"{c.name} exited with code {proc.returncode} during the "
                                   f"measurement: {log_tail(env.procs.log_of(proc), 5)}")
        return _values(w, got, win)
    finally:
        stop_pair(env, pair)


def _values(w: EgressWorkload, got: dict[str, Any], win: Window) -> Values:
    cpu = win.total
    out: Values = {"errors": got["errors"], "bytes_checked": got["body_bytes"],
                   "load_seconds": got["seconds"], "cpu_s": _r(cpu),
                   "cpu_cores": _r(cpu / win.wall if cpu is not None and win.wall else None),
                   "load_cpu_cores": got["cpu_cores"]}
    if w.mode == "bulk":
        gb = got["body_bytes"] / 1e9
        out.update(gbit_per_s=round(got["body_bytes"] * 8 / 1e9 / got["seconds"], 3),
                   cpu_s_per_gb=_r(cpu / gb if cpu is not None and gb else None))
    else:
        n = got["completed"]
        out.update(conn_per_s=round(n / got["seconds"], 1),
                   cpu_us_per_conn=_r(cpu * 1e6 / n if cpu is not None and n else None),
                   p50_ms=got["p50_ms"], p99_ms=got["p99_ms"], connections=n)
    return out


def _r(value: float | None) -> float | None:
    return None if value is None else round(value, 3)


