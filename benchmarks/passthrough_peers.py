"""The SNI passthrough comparison's setup (``benchmarks/passthrough.py`` runs it): the
routing table every proxy gets, the TLS backend behind them, and the contestants.

The routing table (``API_NAMES``, ``APPS_GLOB``, default ``fallback``) is written in each
tool's own words: enforcer ``tls.routes`` with the default route as the listener's
``upstream``; haproxy ``mode tcp`` + ``tcp-request inspect-delay`` + ``req.ssl_sni`` →
``use_backend``; nginx ``stream`` + ``ssl_preread on`` + ``map $ssl_preread_server_name``
→ ``proxy_pass``. haproxy and nginx match the ``*.`` name with an anchored regex
(``APPS_REGEX``), since their own wildcards also match deeper names. Each contestant is one
proxy process (tree) in its own session, role ``proxy``; ``direct`` has none.

The backend is one nginx with a TLS 1.3 server per route (ECDSA P-256 certificate for
every probe name, pinned to ``Env.suite``). Each answers ``route.txt`` with its route's
name; only the ``*.`` route's backend has the load's files, so load routed elsewhere gets
404s.
"""

from __future__ import annotations

import os
import random
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from benchmarks import contestants as cmod
from benchmarks.backends import body
from benchmarks.contestants import CAPACITY, Env, Pair, nginx_main, stop_pair
from benchmarks.procs import StartError, wait_listening

CONTESTANTS = ("direct", "enforcer", "enforcer-tcp", "haproxy", "nginx")

# --------------------------------------------------------------------------- routing table

API_NAMES = ("api.localhost", "api2.localhost")  # exact names -> route "api"
APPS_GLOB = "*.apps.localhost"  # exactly one more label -> route "apps"
APPS_REGEX = r"^[^.]+\.apps\.localhost$"  # the same, for haproxy and nginx
ROUTES = ("api", "apps", "fallback")  # fallback: the default route
LOAD_NAME = "shop.apps.localhost"  # the SNI of the load (the *. route)
# (SNI or None for no SNI extension, the route whose backend must answer)
PROBES: tuple[tuple[str | None, str], ...] = (
    ("api.localhost", "api"), ("api2.localhost", "api"), (LOAD_NAME, "apps"),
    ("a.b.apps.localhost", "fallback"), ("apps.localhost", "fallback"),
    ("other.localhost", "fallback"), (None, "fallback"))
SMALL_PATH, BULK_PATH, ROUTE_PATH = "/bench.txt", "/bulk.bin", "/route.txt"
BULK_SIZE = 1 << 20


def bulk_body() -> bytes:
    return random.Random(26).randbytes(BULK_SIZE)  # the same bytes in every run


def route_body(route: str) -> bytes:
    return f"route {route}\n".encode()


# --------------------------------------------------------------------------- the TLS backend


@dataclass
class Backend:
    ports: dict[str, int]  # route -> port of its TLS server
    ca: Path
    suite: str | None


def start_backend(env: Env) -> Backend:
    """One nginx, a TLS 1.3 server per route, each serving route.txt from its own root;
    the apps route also bench.txt (256 B) and bulk.bin (1 MiB), so that load routed
    anywhere else gets 404s and fails the measurement."""
    from enforcer.tlsconf.certs import issue

    if not shutil.which("nginx"):
        raise StartError("nginx not installed (apt install nginx): it is the TLS backend")
    d = env.workdir("backend-tls")
    names = sorted({*API_NAMES, APPS_GLOB, *(n for n, _ in PROBES if n)})
    cert = issue(env.pki.ca.parent, d, name="backend", dns=names, client=False)
    ports = {route: env.ports.take() for route in ROUTES}
    servers = ""
    for route, port in ports.items():
        root = d / route
        root.mkdir()
        files = [(ROUTE_PATH, route_body(route))]
        if route == "apps":  # the load's files: any other route answers them with 404
            files += [(SMALL_PATH, body()), (BULK_PATH, bulk_body())]
        for path, data in files:
            (root / path.lstrip("/")).write_bytes(data)
        servers += (f"  server {{\n    listen 127.0.0.1:{port} ssl backlog=4096;\n"
                    f"    root {root};\n  }}\n")
    suite = f"  ssl_conf_command Ciphersuites {env.suite};\n" if env.suite else ""
    temp = "".join(f"  {kind}_temp_path {d}/{kind};\n"
                   for kind in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi"))
    user = "user root;\n" if os.geteuid() == 0 else ""  # as in backends.start_http
    conf = d / "nginx.conf"
    conf.write_text(
        f"{user}daemon off;\nmaster_process on;\nworker_processes auto;\npid {d}/nginx.pid;\n"
        f"error_log {d}/backend.log warn;\nevents {{ worker_connections {CAPACITY}; }}\n"
        f"http {{\n  access_log off;\n{temp}  keepalive_timeout 600s;\n"
        "  keepalive_requests 100000000;\n"
        f"  ssl_certificate {cert.cert};\n  ssl_certificate_key {cert.key};\n"
        f"  ssl_protocols TLSv1.3;\n{suite}{servers}}}\n")
    proc = env.procs.spawn(["nginx", "-p", f"{d}/", "-e", str(d / "backend.log"), "-c",
                            str(conf)], cwd=d, log=d / "backend.log")
    wait_listening(list(ports.values()), [proc], env.procs, "TLS backend (nginx)")
    return Backend(ports, env.pki.ca, env.suite)


# --------------------------------------------------------------------------- contestants


def _single(c: cmod.Contestant, env: Env, config: Callable[[Path, int], Path]) -> Pair:
    """Start one proxy process (role ``proxy``) from ``config(dir, port)``."""
    d = env.workdir(f"passthrough-{c.name}")
    port = env.ports.take()
    pair = Pair(c.name, port)
    try:
        proc = c.spawn_role(env, d, "proxy", config(d, port))
        pair.procs.append(proc)
        pair.roles["proxy"] = proc.pid
        wait_listening([port], pair.procs, env.procs, f"{c.name} passthrough proxy")
    except BaseException:
        stop_pair(env, pair)
        raise
    return pair


class Direct(cmod.Direct):
    routes_by_sni = False

    def describe(self) -> str:
        return ("no proxy: wrk straight to the backend of the `*.` route (the ceiling, "
                "not a peer; no routing, so the route probes are not run)")

    def start_passthrough(self, env: Env, backend: Backend) -> Pair:
        return Pair(self.name, backend.ports["apps"])


class Enforcer(cmod.Enforcer):
    routes_by_sni = True

    def describe(self) -> str:
        return ("`python -m enforcer run -c <yaml>`, a `tls.mode: passthrough` listener "
                "with `tls.routes` and the default route as its `upstream`, config defaults")

    def start_passthrough(self, env: Env, backend: Backend) -> Pair:
        return _single(self, env, lambda d, port: self.config(env, d, port, backend))

    def config(self, env: Env, d: Path, port: int, backend: Backend) -> Path:
        p = backend.ports
        return self._write(env, d / "proxy.yaml", {
            "version": 1,
            "node": {"name": "bench-passthrough"},
            "listeners": [{
                "name": "edge", "listen": f"127.0.0.1:{port}",
                "tls": {"mode": "passthrough", "routes": [
                    {"server_names": list(API_NAMES), "upstream": "api"},
                    {"server_names": [APPS_GLOB], "upstream": "apps"}]},
                "ruleset": "bench", "upstream": "fallback"}],
            "upstreams": {route: {"address": f"127.0.0.1:{p[route]}"} for route in ROUTES},
            "rulesets": {"bench": {"default": "allow"}},
        })


class EnforcerTcp(Enforcer):
    """enforcer relaying plain TCP (``tls.mode: off``) to the `*.` route's backend: no
    ClientHello, no routing. Not a peer: beside ``enforcer`` it shows what passthrough
    itself adds per connection."""

    routes_by_sni = False

    def __init__(self) -> None:
        super().__init__("tcp")

    def describe(self) -> str:
        return ("enforcer with `tls.mode: off` straight to the `*.` route's backend (no "
                "ClientHello peek, no routing; not a peer: what passthrough adds is "
                "`enforcer` minus this)")

    def config(self, env: Env, d: Path, port: int, backend: Backend) -> Path:
        return self._write(env, d / "proxy.yaml", {
            "version": 1,
            "node": {"name": "bench-tcp"},
            "listeners": [{"name": "edge", "listen": f"127.0.0.1:{port}",
                           "tls": {"mode": "off"}, "ruleset": "bench", "upstream": "apps"}],
            "upstreams": {"apps": {"address": f"127.0.0.1:{backend.ports['apps']}"}},
            "rulesets": {"bench": {"default": "allow"}},
        })


class Haproxy(cmod.Haproxy):
    routes_by_sni = True

    def describe(self) -> str:
        return ("`mode tcp`, `tcp-request inspect-delay 5s` + `content accept if "
                "{ req.ssl_hello_type 1 }`, `use_backend` on `req.ssl_sni` (`-i` exact "
                "names, `-m reg` for the `*.` name), `default_backend`, default nbthread")

    def start_passthrough(self, env: Env, backend: Backend) -> Pair:
        return _single(self, env, lambda d, port: self.config(d, port, backend))

    def config(self, d: Path, port: int, backend: Backend) -> Path:
        path = d / "proxy.cfg"
        path.write_text(
            self._DEFAULTS
            + f"frontend edge\n    bind 127.0.0.1:{port}\n"
            "    tcp-request inspect-delay 5s\n"
            "    tcp-request content accept if { req.ssl_hello_type 1 }\n"
            f"    use_backend api if {{ req.ssl_sni -i {' '.join(API_NAMES)} }}\n"
            f"    use_backend apps if {{ req.ssl_sni -m reg -i {APPS_REGEX} }}\n"
            "    default_backend fallback\n"
            + "".join(f"backend {route}\n    server {route} 127.0.0.1:{p}\n"
                      for route, p in backend.ports.items()))
        return path


class Nginx(cmod.Nginx):
    routes_by_sni = True

    def describe(self) -> str:
        return ("`stream` with `ssl_preread on`, `map $ssl_preread_server_name` (exact "
                "names, a `~*` regex for the `*.` name, `default`) → `proxy_pass $route`, "
                "`worker_processes auto`")

    def start_passthrough(self, env: Env, backend: Backend) -> Pair:
        return _single(self, env, lambda d, port: self.config(d, port, backend))

    def config(self, d: Path, port: int, backend: Backend) -> Path:
        p = backend.ports
        entries = "".join(f"    {name} 127.0.0.1:{p['api']};\n" for name in API_NAMES)
        path = d / "proxy.conf"
        path.write_text(
            nginx_main(d, "proxy", "auto")
            + "stream {\n  map $ssl_preread_server_name $route {\n" + entries
            + f"    \"~*{APPS_REGEX}\" 127.0.0.1:{p['apps']};\n"
            f"    default 127.0.0.1:{p['fallback']};\n  }}\n"
            f"  server {{\n    listen 127.0.0.1:{port};\n    ssl_preread on;\n"
            "    proxy_pass $route;\n  }\n}\n")
        return path


PtContestant = Direct | Enforcer | Haproxy | Nginx
ALL: tuple[PtContestant, ...] = (Direct(), Enforcer(), EnforcerTcp(), Haproxy(), Nginx())
BY_NAME = {c.name: c for c in ALL}

