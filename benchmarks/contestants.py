"""The contestants: one sidecar pair each, started fresh for every measurement.

    load tool --plain--> [outbound] ==mTLS (ECDSA P-256)==> [inbound] --plain--> backend

Each contestant writes two configs (outbound: plain in, mTLS out, verifies the server's
certificate chain and name; inbound: mTLS in with a required client certificate, plain
out) into its own temp dir and runs two processes there in the foreground, through
``Processes`` (so they are measured and cleaned up by session id). Every contestant
gets the same certificates and the same work; none is tuned: threads, workers, buffers
and TLS choices are each tool's own defaults, except that every pair speaks TLS 1.3
(nginx 1.22 needs ``ssl_protocols`` for that, see ``NGINX_PROTOCOLS``; the results
record what each inbound negotiates) and, for the headline table, every pair is pinned to
the same TLS 1.3 cipher suite (``Env.suite``, ``HEADLINE_SUITE`` unless ``--suite`` says
otherwise), each in its own words: enforcer's ``cipher_suites``, haproxy's
``ciphersuites``, stunnel's ``ciphersuites``, nginx's ``ssl_conf_command Ciphersuites``.
Left to their defaults, enforcer prefers AES-128-GCM and OpenSSL-based peers AES-256-GCM:
the second table ("defaults vs defaults", ``Env.suite = None``) shows them that way. The only settings raised are capacity
limits whose defaults cannot hold the idle-connection workload (nginx's
``worker_connections 512``); they are raised to the same number for every tool that
has one (see ``CAPACITY``), and they only admit connections, they do not change speed.

``direct`` has no proxy at all: the load tool talks to the backend. It is the ceiling
of the load tool and backend on this machine, not a peer.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from benchmarks.pki import SERVER_NAME, BenchPki
from benchmarks.procs import Ports, Processes, wait_listening

HEADLINE_SUITE = "TLS_AES_256_GCM_SHA384"  # OpenSSL's own first choice (the peers' default)
SUITES = ("TLS_AES_128_GCM_SHA256", "TLS_AES_256_GCM_SHA384", "TLS_CHACHA20_POLY1305_SHA256")
CAPACITY = 20000  # connections one proxy process may hold (nginx worker_connections)
# nginx 1.22's built-in default is "TLSv1 TLSv1.1 TLSv1.2" (no TLS 1.3; nginx >= 1.23.4
# defaults to exactly the line below). Every other contestant negotiates TLS 1.3 by
# default, so this is the one setting that makes the protocol the same for everyone.
NGINX_PROTOCOLS = "TLSv1.2 TLSv1.3"
NGINX_STREAM_MODULE = Path("/usr/lib/nginx/modules/ngx_stream_module.so")


@dataclass
class Pair:
    """A running sidecar pair: where the load tool connects and what to measure."""

    contestant: str
    entry_port: int
    procs: list[subprocess.Popen[bytes]] = field(default_factory=list)
    roles: dict[str, int] = field(default_factory=dict)  # "outbound"/"inbound" -> sid
    inbound_port: int | None = None  # the mTLS listener, for the TLS probe
    cleanup: list[Callable[[], None]] = field(default_factory=list)  # run by stop_pair

    @property
    def sids(self) -> list[int]:
        return list(self.roles.values())


@dataclass
class Env:
    """What every contestant start needs: temp dir, certificates, processes, ports."""

    tmp: Path
    pki: BenchPki
    procs: Processes
    ports: Ports
    enforcer_extra: dict[str, Any] = field(default_factory=dict)
    suite: str | None = HEADLINE_SUITE  # every pair's one TLS 1.3 suite; None: defaults
    _starts: int = 0

    def workdir(self, name: str) -> Path:
        self._starts += 1
        d = self.tmp / f"{self._starts:03d}-{name}"
        d.mkdir(parents=True)
        return d


def status_entry(c: Any) -> dict[str, Any]:
    """A contestant's entry in a results document: ok or skipped (with why and the apt
    package), whether it is a peer, its version and setup. ``c`` is any contestant
    (sidecar pair, egress proxy or passthrough proxy): ``missing``, ``version``,
    ``describe``, ``is_peer``, ``apt``."""
    reason = c.missing()
    entry: dict[str, Any] = {"status": "skipped" if reason else "ok", "peer": c.is_peer,
                             "version": None if reason else c.version(),
                             "setup": c.describe(), "tls": None}
    if reason:
        entry.update(reason=reason, apt=c.apt)
    return entry


def tool_version(argv: list[str], pattern: str) -> str | None:
    try:
        done = subprocess.run(argv, capture_output=True, text=True, timeout=10, check=False)
    except (OSError, subprocess.TimeoutExpired):
        return None
    m = re.search(pattern, done.stdout + done.stderr)
    return m.group(1) if m else None


class Contestant:
    name = ""
    binary: str | None = None
    apt: str | None = None
    is_peer = True  # counts as a peer when finding the best peer for ratios
    role_names = ("outbound", "inbound")
    start_timeout = 20.0  # seconds for both sidecars to listen

    def missing(self) -> str | None:
        """Why this contestant cannot run here (with the apt package), or None."""
        if self.binary and not shutil.which(self.binary):
            return f"{self.binary} not installed (apt install {self.apt})"
        return None

    def version(self) -> str | None:
        return None

    def describe(self) -> str:
        return ""

    def start(self, env: Env, backend_port: int) -> Pair:
        """Start inbound and outbound together; return once both listen."""
        d = env.workdir(self.name)
        out_port, in_port = env.ports.take(), env.ports.take()
        pair = Pair(self.name, out_port, inbound_port=in_port)
        try:
            for role, config in (
                    ("inbound", self.inbound_config(env, d, in_port, backend_port)),
                    ("outbound", self.outbound_config(env, d, out_port, in_port))):
                proc = self.spawn_role(env, d, role, config)
                pair.procs.append(proc)
                pair.roles[role] = proc.pid
            wait_listening([in_port, out_port], pair.procs, env.procs, f"{self.name} pair",
                           self.start_timeout)
        except BaseException:
            stop_pair(env, pair)
            raise
        return pair

    def outbound_config(self, env: Env, d: Path, port: int, in_port: int) -> Path:
        raise NotImplementedError

    def inbound_config(self, env: Env, d: Path, port: int, backend_port: int) -> Path:
        raise NotImplementedError

    def command(self, config: Path, d: Path, role: str) -> list[str]:
        raise NotImplementedError

    def spawn_role(self, env: Env, d: Path, role: str, config: Path
                   ) -> subprocess.Popen[bytes]:
        return env.procs.spawn(self.command(config, d, role), cwd=d, log=d / f"{role}.log")


def stop_pair(env: Env, pair: Pair) -> None:
    for proc in reversed(pair.procs):
        env.procs.stop(proc)
    for undo in pair.cleanup:
        undo()


# --------------------------------------------------------------------------- direct


class Direct(Contestant):
    name = "direct"
    is_peer = False

    def describe(self) -> str:
        return "no proxy: the load tool talks to the backend (the ceiling, not a peer)"

    def start(self, env: Env, backend_port: int) -> Pair:
        return Pair(self.name, backend_port)


# --------------------------------------------------------------------------- enforcer


def deep_merge(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = deep_merge(out[key], value)
        else:
            out[key] = value
    return out


class Enforcer(Contestant):
    """enforcer itself, or a variant shown as its own column ``enforcer-NAME``, never a
    peer, to see a change's effect within one run: extra config merged in (``--variant
    NAME=YAML``), or the enforcer code of another checkout (``--enforcer-at NAME=DIR``: a
    commit before a change, same configs), run by this harness's Python and libraries with
    that checkout first on ``PYTHONPATH``."""

    is_peer = False

    def __init__(self, variant: str = "", extra: dict[str, Any] | None = None,
                 checkout: Path | None = None) -> None:
        self.name = f"enforcer-{variant}" if variant else "enforcer"
        self.extra = extra or {}
        self.checkout = checkout

    def missing(self) -> str | None:
        if self.checkout is not None and not list(
                (self.checkout / "enforcer" / "dataplane").glob("_pump*.so")):
            return (f"{self.checkout}: native extension not built (there: "
                    f"{sys.executable} setup.py build_ext --inplace)")
        return None

    def version(self) -> str | None:
        if self.checkout is not None:
            return tool_version(["git", "-C", str(self.checkout), "describe", "--always",
                                 "--dirty"], r"(\S+)")
        from enforcer import __version__

        return __version__

    def describe(self) -> str:
        base = "`python -m enforcer run -c <yaml>` per sidecar"
        if self.checkout is not None:
            base += f" from the checkout {self.checkout} at {self.version()}"
        return f"{base} with {json.dumps(self.extra)} merged in" if self.extra else (
            f"{base}, config defaults")

    def _write(self, env: Env, path: Path, cfg: dict[str, Any]) -> Path:
        merged = deep_merge(deep_merge(cfg, env.enforcer_extra), self.extra)
        path.write_text(yaml.safe_dump(merged, sort_keys=False))
        return path

    def _material(self, cert: Path, key: Path, env: Env) -> dict[str, Any]:
        mesh: dict[str, Any] = {"cert": str(cert), "key": str(key), "ca": str(env.pki.ca)}
        if env.suite:
            mesh["cipher_suites"] = [env.suite]
        return {"mesh": mesh}

    def outbound_config(self, env: Env, d: Path, port: int, in_port: int) -> Path:
        return self._write(env, d / "outbound.yaml", {
            "version": 1,
            "node": {"name": "bench-outbound"},
            "tls": self._material(env.pki.client_cert, env.pki.client_key, env),
            "listeners": [{"name": "outbound", "listen": f"127.0.0.1:{port}",
                           "tls": {"mode": "off"}, "ruleset": "bench", "upstream": "inbound"}],
            "upstreams": {"inbound": {
                "address": f"127.0.0.1:{in_port}",
                "tls": {"mode": "mtls", "material": "mesh",
                        "verify": {"uri": [env.pki.server_id]}}}},
            "rulesets": {"bench": {"default": "allow"}},
        })

    def inbound_config(self, env: Env, d: Path, port: int, backend_port: int) -> Path:
        return self._write(env, d / "inbound.yaml", {
            "version": 1,
            "node": {"name": "bench-inbound"},
            "tls": self._material(env.pki.server_cert, env.pki.server_key, env),
            "listeners": [{"name": "inbound", "listen": f"127.0.0.1:{port}",
                           "tls": {"mode": "terminate", "material": "mesh",
                                   "client_auth": "required"},
                           "ruleset": "bench", "upstream": "app"}],
            "upstreams": {"app": {"address": f"127.0.0.1:{backend_port}"}},
            "rulesets": {"bench": {"default": "allow"}},
        })

    def command(self, config: Path, d: Path, role: str) -> list[str]:
        return [sys.executable, "-m", "enforcer", "run", "-c", str(config)]

    def spawn_role(self, env: Env, d: Path, role: str, config: Path
                   ) -> subprocess.Popen[bytes]:
        # flow records (one JSON line per connection, the default stdout sink) are
        # written, as in production, and thrown away
        return env.procs.spawn(self.command(config, d, role), cwd=d, log=d / f"{role}.log",
                               stdout=Path("/dev/null"), env=None if self.checkout is None
                               else {**os.environ, "PYTHONPATH": str(self.checkout)})


# --------------------------------------------------------------------------- haproxy


class Haproxy(Contestant):
    name = "haproxy"
    binary = "haproxy"
    apt = "haproxy"

    def version(self) -> str | None:
        return tool_version(["haproxy", "-v"], r"version (\S+)")

    def describe(self) -> str:
        return "tcp mode, `ssl crt ... ca-file ... verify required` both sides, default nbthread"

    _DEFAULTS = ("defaults\n    mode tcp\n    timeout connect 5s\n"
                 "    timeout client 1h\n    timeout server 1h\n")

    def outbound_config(self, env: Env, d: Path, port: int, in_port: int) -> Path:
        return _written(
            d / "outbound.cfg",
            self._DEFAULTS
            + f"frontend outbound\n    bind 127.0.0.1:{port}\n    default_backend inbound\n"
            f"backend inbound\n    server inbound 127.0.0.1:{in_port} ssl "
            f"crt {env.pki.client_pem} ca-file {env.pki.ca} verify required "
            f"verifyhost {SERVER_NAME}{_haproxy_suite(env)}\n")

    def inbound_config(self, env: Env, d: Path, port: int, backend_port: int) -> Path:
        return _written(
            d / "inbound.cfg",
            self._DEFAULTS
            + f"frontend inbound\n    bind 127.0.0.1:{port} ssl crt {env.pki.server_pem} "
            f"ca-file {env.pki.ca} verify required{_haproxy_suite(env)}\n"
            "    default_backend app\n"
            f"backend app\n    server app 127.0.0.1:{backend_port}\n")

    def command(self, config: Path, d: Path, role: str) -> list[str]:
        return ["haproxy", "-db", "-f", str(config)]


# --------------------------------------------------------------------------- stunnel


class Stunnel(Contestant):
    name = "stunnel"
    binary = "stunnel4"
    apt = "stunnel4"

    def missing(self) -> str | None:
        if not (shutil.which("stunnel4") or shutil.which("stunnel")):
            return "stunnel4 not installed (apt install stunnel4)"
        return None

    def _exe(self) -> str:
        return "stunnel4" if shutil.which("stunnel4") else "stunnel"

    def version(self) -> str | None:
        return tool_version([self._exe(), "-version"], r"stunnel (\S+)")

    def describe(self) -> str:
        return "client and server services, `CAfile` + `verifyChain = yes`, default threading"

    def outbound_config(self, env: Env, d: Path, port: int, in_port: int) -> Path:
        return _written(
            d / "outbound.conf",
            "foreground = yes\npid =\n[outbound]\nclient = yes\n"
            f"accept = 127.0.0.1:{port}\nconnect = 127.0.0.1:{in_port}\n"
            f"cert = {env.pki.client_cert}\nkey = {env.pki.client_key}\n"
            f"CAfile = {env.pki.ca}\nverifyChain = yes\ncheckHost = {SERVER_NAME}\n"
            + _stunnel_suite(env))

    def inbound_config(self, env: Env, d: Path, port: int, backend_port: int) -> Path:
        return _written(
            d / "inbound.conf",
            "foreground = yes\npid =\n[inbound]\n"
            f"accept = 127.0.0.1:{port}\nconnect = 127.0.0.1:{backend_port}\n"
            f"cert = {env.pki.server_cert}\nkey = {env.pki.server_key}\n"
            f"CAfile = {env.pki.ca}\nverifyChain = yes\n" + _stunnel_suite(env))

    def command(self, config: Path, d: Path, role: str) -> list[str]:
        return [self._exe(), str(config)]


# --------------------------------------------------------------------------- nginx


def nginx_stream_directive() -> str | None:
    """``load_module`` line for the stream module, "" if built in, None if unavailable."""
    if not shutil.which("nginx"):
        return None
    flags = tool_version(["nginx", "-V"], r"(--with-stream\S*)") or ""
    if flags == "--with-stream":
        return ""
    if NGINX_STREAM_MODULE.exists():
        return f"load_module {NGINX_STREAM_MODULE};\n"
    return None


def nginx_main(d: Path, role: str, workers: str) -> str:
    directive = nginx_stream_directive() or ""
    return (f"{directive}daemon off;\nmaster_process on;\nworker_processes {workers};\n"
            f"pid {d}/{role}.pid;\nerror_log {d}/{role}.log notice;\n"
            f"events {{ worker_connections {CAPACITY}; }}\n")


class Nginx(Contestant):
    name = "nginx"
    binary = "nginx"
    apt = "nginx libnginx-mod-stream"

    def missing(self) -> str | None:
        if not shutil.which("nginx"):
            return "nginx not installed (apt install nginx libnginx-mod-stream)"
        if nginx_stream_directive() is None:
            return "nginx stream module missing (apt install libnginx-mod-stream)"
        return None

    def version(self) -> str | None:
        return tool_version(["nginx", "-v"], r"nginx/(\S+)")

    def describe(self) -> str:
        return ("stream module, `proxy_ssl on` + `ssl_verify_client on`, "
                f"`ssl_protocols {NGINX_PROTOCOLS}` (the default of nginx >= 1.23.4), "
                "`worker_processes auto` (its shipped default)")

    def outbound_config(self, env: Env, d: Path, port: int, in_port: int) -> Path:
        return _written(
            d / "outbound.conf",
            nginx_main(d, "outbound", "auto")
            + f"stream {{\n  server {{\n    listen 127.0.0.1:{port};\n"
            f"    proxy_pass 127.0.0.1:{in_port};\n    proxy_ssl on;\n"
            f"    proxy_ssl_certificate {env.pki.client_cert};\n"
            f"    proxy_ssl_certificate_key {env.pki.client_key};\n"
            f"    proxy_ssl_trusted_certificate {env.pki.ca};\n"
            f"    proxy_ssl_verify on;\n    proxy_ssl_name {SERVER_NAME};\n"
            f"    proxy_ssl_protocols {NGINX_PROTOCOLS};\n"
            + _nginx_suite(env, "proxy_ssl_conf_command") + "  }\n}\n")

    def inbound_config(self, env: Env, d: Path, port: int, backend_port: int) -> Path:
        return _written(
            d / "inbound.conf",
            nginx_main(d, "inbound", "auto")
            + f"stream {{\n  server {{\n    listen 127.0.0.1:{port} ssl;\n"
            f"    ssl_certificate {env.pki.server_cert};\n"
            f"    ssl_certificate_key {env.pki.server_key};\n"
            f"    ssl_client_certificate {env.pki.ca};\n    ssl_verify_client on;\n"
            f"    ssl_protocols {NGINX_PROTOCOLS};\n" + _nginx_suite(env, "ssl_conf_command")
            + f"    proxy_pass 127.0.0.1:{backend_port};\n  }}\n}}\n")

    def command(self, config: Path, d: Path, role: str) -> list[str]:
        return ["nginx", "-p", f"{d}/", "-e", str(d / f"{role}.log"), "-c", str(config)]


ALL: tuple[Contestant, ...] = (Direct(), Enforcer(), Haproxy(), Stunnel(), Nginx())
BY_NAME = {c.name: c for c in ALL}


def _haproxy_suite(env: Env) -> str:
    """The bind / server option that pins the TLS 1.3 suite (haproxy >= 1.9)."""
    return f" ciphersuites {env.suite}" if env.suite else ""


def _stunnel_suite(env: Env) -> str:
    """The service option that pins the TLS 1.3 suite (stunnel >= 5.50)."""
    return f"ciphersuites = {env.suite}\n" if env.suite else ""


def _nginx_suite(env: Env, directive: str) -> str:
    """``ssl_conf_command`` / ``proxy_ssl_conf_command`` pinning the suite (nginx >= 1.19.4;
    nginx has no directive of its own for TLS 1.3 suites)."""
    return f"    {directive} Ciphersuites {env.suite};\n" if env.suite else ""


def _written(path: Path, text: str) -> Path:
    """Write a contestant's config file; its path."""
    path.write_text(text)
    return path
