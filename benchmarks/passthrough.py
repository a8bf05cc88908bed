"""SNI passthrough compared: enforcer ``tls.mode: passthrough`` against haproxy and nginx.

    wrk (https, SNI) --TLS--> [proxy: peek the ClientHello, route by SNI] --same TLS bytes-->
        TLS backend (nginx, one port per route: api, apps, fallback)

``python -m benchmarks --passthrough`` (``make bench-passthrough``). Every contestant is one
proxy process (tree) started fresh for each measurement, with the same routing table
(``ROUTES``: two exact names, one ``*.`` name matching exactly one more label, a default
route), written in each tool's own words: enforcer ``tls.routes``, haproxy ``mode tcp`` +
``tcp-request inspect-delay`` + ``req.ssl_sni`` → ``use_backend``, nginx ``stream`` +
``ssl_preread on`` + ``map $ssl_preread_server_name``. haproxy and nginx match the ``*.``
name with an anchored regex, since their own wildcards also match deeper names.

The client's TLS session is with the backend, which the harness owns: one nginx with a
TLS server per route (ECDSA P-256, TLS 1.3 only, pinned to ``Env.suite``), so the suite,
certificate and handshake cost are the same whichever proxy is in between; the proxies
only read the ClientHello and relay bytes. The load is wrk over https with the SNI of a
``*.`` name (its Lua script resolves every name to 127.0.0.1, so no DNS entry is needed).

Workloads (``WORKLOADS``): ``sni-newconn``, a new connection per request (ClientHello
peek + route + upstream connect + the TLS handshake end to end + a 256 B response);
``sni-bulk``, 1 MiB responses over keep-alive tunnels. CPU is the proxy's own (its
processes, from /proc) over the measured window. ``direct`` (wrk straight to the
backend) is the ceiling of load tool and backend, and ``enforcer-tcp`` (enforcer relaying
plain TCP to the same backend, no peek, no routing) shows what passthrough adds to
enforcer's own per-connection work; neither is a peer.

Bytes are checked around every measurement: before it, one connection per probe name
(``PROBES``: exact, ``*.``, names the ``*.`` must not match, no SNI) must reach the
route's backend (its body compared by sha256, the backend's certificate verified for that
name); after it, the 1 MiB body through the tunnel is compared by sha256; wrk fails the
measurement on a non-2xx response, socket errors, or fewer bytes than whole bodies.

Results: ``<out>/runs/<stamp>-passthrough/results.{json,md}`` (ignored by git) and the
summary ``<out>/passthrough.{json,md}`` (``passthrough-quick.*`` for a quick run, ignored).
"""

from __future__ import annotations

import argparse
import datetime as dt
import hashlib
import json
import os
import random
import shutil
import socket
import ssl
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from benchmarks import contestants as cmod
from benchmarks import results as rmod
from benchmarks.backends import BODY_SIZE, body
from benchmarks.contestants import CAPACITY, Env, Pair, nginx_main, stop_pair, tool_version
from benchmarks.load import WRK_LUA, MeasureError, run_to_end
from benchmarks.options import RUNS_DIR
from benchmarks.pki import make_pki
from benchmarks.procs import (
    Ports,
    Processes,
    StartError,
    install_signal_handlers,
    log_tail,
    shield_cleanup,
    wait_listening,
)
from benchmarks.report import fmt, results_table
from benchmarks.workloads import Metric, Window

Values = dict[str, Any]
SCHEMA = "enforcer-bench-passthrough/1"
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


# --------------------------------------------------------------------------- settings


@dataclass(frozen=True)
class Settings:
    quick: bool
    seconds: int
    warmup_s: int
    newconn_connections: int
    bulk_connections: int
    threads: int
    repeat: int = 1

    @classmethod
    def make(cls, quick: bool, duration: int | None, repeat: int) -> Settings:
        return cls(quick=quick, seconds=duration or (2 if quick else 10),
                   warmup_s=1 if quick else 2, newconn_connections=32, bulk_connections=8,
                   threads=2, repeat=max(1, repeat))


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


# --------------------------------------------------------------------------- load: wrk over https

# wrk resolves the URL's host and sends it as SNI; this makes every name 127.0.0.1
# (and skips wrk's probe connection to each address)
RESOLVE_LUA = """
wrk.resolve = function(host, service)
  wrk.addrs = wrk.lookup("127.0.0.1", service)
end
"""


@dataclass(frozen=True)
class Got:
    requests: int
    seconds: float
    bytes: int
    errors: int
    p50_ms: float
    p99_ms: float


def wrk_https(env: Env, d: Path, port: int, *, seconds: int, connections: int, threads: int,
              path: str, size: int, close: bool) -> Got:
    script = d / "pt.lua"
    script.write_text(RESOLVE_LUA + WRK_LUA)
    out = d / f"wrk-{time.monotonic_ns()}.txt"
    argv = ["wrk", "-t", str(threads), "-c", str(connections), "-d", f"{seconds}s",
            "--timeout", "10s", "-s", str(script)]
    if close:
        argv += ["-H", "Connection: close"]
    proc = env.procs.spawn([*argv, f"https://{LOAD_NAME}:{port}{path}"], cwd=d, stdout=out,
                           log=d / "wrk.log")
    run_to_end(env, proc, "wrk", timeout=seconds + 30)
    line = next((ln for ln in out.read_text().splitlines() if ln.startswith("WRKJSON ")), "")
    if not line:
        raise MeasureError(f"wrk: no summary in its output: {out.read_text()[-300:]!r}")
    r: dict[str, Any] = json.loads(line[len("WRKJSON "):])
    errors = sum(int(r[k]) for k in r if k.endswith("_errors"))
    if r["requests"] == 0 or r["status_errors"]:
        raise MeasureError(f"wrk: {r['requests']} responses, {r['status_errors']} not 2xx/3xx, "
                           f"{errors} errors through the proxy")
    if errors > max(10, r["requests"] // 100):
        raise MeasureError(f"wrk: {errors} socket errors for {r['requests']} requests "
                           f"(connect {r['connect_errors']}, read {r['read_errors']}, "
                           f"write {r['write_errors']}, timeout {r['timeout_errors']})")
    if r["bytes"] < r["requests"] * size:  # every counted response carried its whole body
        raise MeasureError(f"wrk: {r['bytes']} bytes for {r['requests']} responses of "
                           f"{size} B: responses were cut short")
    return Got(int(r["requests"]), r["duration_us"] / 1e6, int(r["bytes"]), errors,
               r["p50_us"] / 1e3, r["p99_us"] / 1e3)


# --------------------------------------------------------------------------- byte checks


def fetch(port: int, ca: Path, sni: str | None, path: str, timeout: float = 10.0
          ) -> tuple[bytes, str]:
    """GET ``path`` over TLS with this SNI (None: no SNI; the chain is verified, and the
    name too when there is one); the body and the negotiated version + suite."""
    ctx = ssl.create_default_context(cafile=str(ca))
    ctx.check_hostname = sni is not None
    req = (f"GET {path} HTTP/1.1\r\nHost: {sni or 'bench'}\r\nConnection: close\r\n\r\n"
           ).encode()
    with socket.create_connection(("127.0.0.1", port), timeout) as raw, \
            ctx.wrap_socket(raw, server_hostname=sni) as tls:
        tls.sendall(req)
        chunks = []
        while data := tls.recv(1 << 16):
            chunks.append(data)
        negotiated = f"{tls.version()} {(tls.cipher() or ('?',))[0]}"
    head, _, payload = b"".join(chunks).partition(b"\r\n\r\n")
    if not head.startswith(b"HTTP/1.1 200"):
        raise MeasureError(f"{sni or 'no SNI'}: bad response {head[:60]!r}")
    return payload, negotiated


def _same(got: bytes, want: bytes) -> bool:
    return hashlib.sha256(got).digest() == hashlib.sha256(want).digest()


def check_routes(port: int, ca: Path) -> str:
    """Every probe name reaches its route's backend; returns the negotiated TLS."""
    negotiated = ""
    for sni, route in PROBES:
        try:
            got, negotiated = fetch(port, ca, sni, ROUTE_PATH)
        except (OSError, ssl.SSLError) as exc:
            raise MeasureError(f"route probe {sni or 'without SNI'}: {exc}") from None
        if not _same(got, route_body(route)):
            raise MeasureError(f"route probe {sni or 'without SNI'}: expected route {route}, "
                               f"got {got[:40]!r}")
    return negotiated


def check_bulk(port: int, ca: Path) -> None:
    try:
        got, _ = fetch(port, ca, LOAD_NAME, BULK_PATH)
    except (OSError, ssl.SSLError) as exc:
        raise MeasureError(f"bulk check: {exc}") from None
    if not _same(got, bulk_body()):
        raise MeasureError(f"bulk check: {len(got)} bytes, not the backend's {BULK_SIZE} "
                           "(sha256 differs)")


# --------------------------------------------------------------------------- workloads


@dataclass
class Ctx:
    env: Env
    settings: Settings
    backend: Backend
    d: Path = field(default_factory=Path)
    tls_seen: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class Workload:
    name: str
    title: str
    metrics: tuple[Metric, ...]
    run: Callable[[Ctx, Pair], Values]
    params: Callable[[Settings], Values]


def _per(cpu: float | None, units: float, scale: float) -> float | None:
    return None if cpu is None or units <= 0 else round(cpu * scale / units, 3)


def _newconn(ctx: Ctx, pair: Pair) -> Values:
    s = ctx.settings

    def go(seconds: int) -> Got:
        return wrk_https(ctx.env, ctx.d, pair.entry_port, seconds=seconds,
                         connections=s.newconn_connections, threads=s.threads,
                         path=SMALL_PATH, size=BODY_SIZE, close=True)

    go(s.warmup_s)
    with Window(pair) as w:
        got = go(s.seconds)
    return {"conn_per_s": round(got.requests / got.seconds, 1),
            "cpu_us_per_conn": _per(w.total, got.requests, 1e6),
            "p50_ms": round(got.p50_ms, 3), "p99_ms": round(got.p99_ms, 3),
            "requests": got.requests, "errors": got.errors, "bytes": got.bytes, **w.values()}


def _bulk(ctx: Ctx, pair: Pair) -> Values:
    s = ctx.settings

    def go(seconds: int) -> Got:
        return wrk_https(ctx.env, ctx.d, pair.entry_port, seconds=seconds,
                         connections=s.bulk_connections, threads=s.threads,
                         path=BULK_PATH, size=BULK_SIZE, close=False)

    go(s.warmup_s)
    with Window(pair) as w:
        got = go(s.seconds)
    gb = got.bytes / 1e9
    return {"gbit_per_s": round(got.bytes * 8 / got.seconds / 1e9, 3),
            "cpu_s_per_gb": _per(w.total, gb, 1.0), "requests": got.requests,
            "errors": got.errors, "bytes": got.bytes, **w.values()}


WORKLOADS: tuple[Workload, ...] = (
    Workload("sni-newconn", "new connections through SNI routing (TLS handshake end to "
             "end, 256 B response)",
             (Metric("conn_per_s", "new connections/s", "conn/s", "higher", ratio_target=1.0),
              Metric("cpu_us_per_conn", "CPU per new connection", "CPU µs/conn", "lower",
                     ratio_target=1.0),
              Metric("p99_ms", "p99 latency under load", "ms", "lower", short="p99")),
             _newconn, lambda s: {"connections": s.newconn_connections, "threads": s.threads,
                                  "seconds": s.seconds, "warmup_s": s.warmup_s,
                                  "sni": LOAD_NAME}),
    Workload("sni-bulk", "bulk through established tunnels (1 MiB responses, keep-alive)",
             (Metric("gbit_per_s", "throughput", "Gbit/s", "higher", ratio_target=1.0),
              Metric("cpu_s_per_gb", "CPU per GB", "CPU s/GB", "lower", ratio_target=1.0)),
             _bulk, lambda s: {"connections": s.bulk_connections, "threads": s.threads,
                               "seconds": s.seconds, "warmup_s": s.warmup_s,
                               "response_bytes": BULK_SIZE, "sni": LOAD_NAME}),
)
WORKLOAD_NAMES = tuple(w.name for w in WORKLOADS)
BY_WORKLOAD = {w.name: w for w in WORKLOADS}


def measure(ctx: Ctx, w: Workload, c: PtContestant) -> Values:
    """A fresh proxy: route probes, the workload, the bulk sha256 check, stop."""
    pair = c.start_passthrough(ctx.env, ctx.backend)
    try:
        ctx.d = ctx.env.workdir(f"{w.name}-{c.name}")
        if c.routes_by_sni:
            ctx.tls_seen[c.name] = check_routes(pair.entry_port, ctx.backend.ca)
        values = w.run(ctx, pair)
        check_bulk(pair.entry_port, ctx.backend.ca)
        for proc in pair.procs:
            if proc.poll() is not None:
                raise MeasureError(f"{c.name} exited with code {proc.returncode} during the "
                                   f"measurement: {log_tail(ctx.env.procs.log_of(proc), 5)}")
        values["routes_checked"] = len(PROBES) if c.routes_by_sni else 0
        values["bulk_sha256_ok"] = True
        return values
    finally:
        stop_pair(ctx.env, pair)


# --------------------------------------------------------------------------- the run


def _progress(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def _pick(text: str | None, known: tuple[str, ...], what: str) -> list[str]:
    if not text or text == "all":
        return list(known)
    chosen = [t.strip() for t in text.split(",") if t.strip()]
    unknown = [t for t in chosen if t not in known]
    if unknown:
        raise ValueError(f"unknown {what} {', '.join(unknown)} for --passthrough "
                         f"(known: {', '.join(known)})")
    return [k for k in known if k in chosen]


def new_doc(settings: Settings, run_dir: str, suite: str | None) -> rmod.Doc:
    return {"schema": SCHEMA, "mode": "quick" if settings.quick else "full",
            "interrupted": False, "started_at": rmod.utcnow(), "finished_at": None,
            "duration_s": None, "run_dir": run_dir, "host": rmod.host_facts(),
            "settings": {**asdict(settings), "suite": suite},
            "routing": {"exact": {"api": list(API_NAMES)}, "glob": {"apps": APPS_GLOB},
                        "default": "fallback", "probes": [list(p) for p in PROBES]},
            "backend": None, "tools": {}, "contestants": {}, "workloads": {}}


# options of the sidecar comparison that mean nothing here: refused, not ignored
NOT_HERE = (("variant", "--variant"), ("enforcer_extra", "--enforcer-extra"),
            ("netns", "--netns"), ("render", "--render"), ("defaults", "--defaults"))


def list_everything() -> int:
    for c in ALL:
        print(f"contestant {c.name:<12} {c.missing() or 'ready'}")
    for w in WORKLOADS:
        print(f"workload   {w.name:<12} ({w.title})")
    for tool in ("wrk", "nginx"):
        print(f"needs      {tool:<12} {'ready' if shutil.which(tool) else 'not installed'}")
    return 0


def run(args: argparse.Namespace) -> int:
    """``python -m benchmarks --passthrough [--quick] [--only ...] [--workloads ...]``."""
    given = [flag for attr, flag in NOT_HERE if getattr(args, attr, None)]
    if given:
        print(f"enforcer bench: {', '.join(given)} does not apply to --passthrough",
              file=sys.stderr)
        return 2
    if getattr(args, "list", False):
        return list_everything()
    try:
        chosen = [BY_NAME[n] for n in _pick(args.only, CONTESTANTS, "contestant")]
        works = [BY_WORKLOAD[n] for n in _pick(args.workloads, WORKLOAD_NAMES, "workload")]
    except ValueError as exc:
        print(f"enforcer bench: {exc}", file=sys.stderr)
        return 2
    settings = Settings.make(args.quick, args.duration, getattr(args, "repeat", 1) or 1)
    stamp = dt.datetime.now().strftime("%Y%m%d-%H%M%S") + "-passthrough" + (
        "-quick" if args.quick else "")
    out: Path = args.out
    run_dir = out / RUNS_DIR / stamp  # raw runs: an ignored folder (see .gitignore)
    doc = new_doc(settings, f"{RUNS_DIR}/{stamp}", getattr(args, "suite", None))
    started = time.monotonic()
    install_signal_handlers()
    procs = Processes()
    tmp = Path(tempfile.mkdtemp(prefix="enforcer-bench-pt-"))
    try:
        _describe(doc, chosen)
        _progress(f"enforcer bench --passthrough: {doc['mode']} run, {len(chosen)} "
                  f"contestants x {len(works)} workloads -> {run_dir}")
        env = Env(tmp, make_pki(tmp / "pki"), procs, Ports(), suite=doc["settings"]["suite"])
        _measure_all(doc, env, settings, chosen, works, started)
    except KeyboardInterrupt:
        doc["interrupted"] = True
        _progress("interrupted: stopping every process, writing partial results")
    finally:
        shield_cleanup()
        procs.stop_all()
        if getattr(args, "keep_temp", False):
            _progress(f"temp dir kept: {tmp}")
        else:
            shutil.rmtree(tmp, ignore_errors=True)
    doc["finished_at"] = rmod.utcnow()
    doc["duration_s"] = round(time.monotonic() - started, 1)
    doc["host"]["loadavg_end"] = [round(v, 2) for v in os.getloadavg()]
    paths = write_all(doc, out, run_dir)
    _progress("wrote " + ", ".join(map(str, paths)))
    if doc["interrupted"]:
        return 130
    return 1 if rmod.had_errors(doc) or doc.get("error") else 0


def _describe(doc: rmod.Doc, chosen: list[PtContestant]) -> None:
    doc["tools"]["wrk"] = {"installed": shutil.which("wrk") is not None, "apt": "wrk",
                           "version": tool_version(["wrk", "--version"], r"wrk (\S+)")}
    doc["host"]["cpu_busy_before"] = rmod.cpu_busy()
    for c in chosen:
        reason = c.missing()
        entry: dict[str, Any] = {"status": "skipped" if reason else "ok", "peer": c.is_peer,
                                 "version": None if reason else c.version(),
                                 "setup": c.describe(), "tls": None}
        if reason:
            entry.update(reason=reason, apt=c.apt)
        doc["contestants"][c.name] = entry


def _measure_all(doc: rmod.Doc, env: Env, settings: Settings, chosen: list[PtContestant],
                 works: list[Workload], started: float) -> None:
    from benchmarks.cli import combine  # cli imports this module lazily

    for tool, role in (("wrk", "the load tool"), ("nginx", "the TLS backend")):
        if not shutil.which(tool):  # nothing to measure with: skipped, like a missing tool
            doc["skipped"] = f"{tool} not installed (apt install {tool}): it is {role}"
            _progress(doc["skipped"])
            return
    try:
        backend = start_backend(env)
    except StartError as exc:
        doc["error"] = str(exc)
        _progress(f"TLS backend failed to start: {exc}")
        return
    version = tool_version(["nginx", "-v"], r"nginx/(\S+)") or ""
    doc["backend"] = (f"nginx {version}, a TLS "
                      f"1.3 server per route (ECDSA P-256, {env.suite or 'default suites'}), "
                      f"static {BODY_SIZE} B and {BULK_SIZE >> 20} MiB files").replace("  ", " ")
    ctx = Ctx(env, settings, backend)
    ready = [c for c in chosen if doc["contestants"][c.name]["status"] == "ok"]
    for w in works:
        wdoc: rmod.Doc = {"title": w.title, "status": "ok", "params": w.params(settings),
                          "metrics": [rmod.metric_doc(m) for m in w.metrics],
                          "results": {}, "comparison": {}}
        doc["workloads"][w.name] = wdoc
        samples: dict[str, list[Values]] = {c.name: [] for c in ready}
        for _ in range(settings.repeat):  # rounds: every contestant once per round
            for c in ready:
                samples[c.name].append(_one(ctx, w, c, started))
        for c in chosen:
            skipped = doc["contestants"][c.name]
            wdoc["results"][c.name] = (combine(samples[c.name]) if c in ready else
                                       {"status": "skipped", "reason": skipped["reason"]})
        rmod.compare(wdoc, w.metrics, [c.name for c in chosen if c.is_peer])
    for name, seen in ctx.tls_seen.items():
        doc["contestants"][name]["tls"] = seen


def _one(ctx: Ctx, w: Workload, c: PtContestant, started: float) -> Values:
    t0 = time.monotonic()
    try:
        values = measure(ctx, w, c)
    except (MeasureError, StartError, OSError) as exc:
        _say(w, c, f"ERROR {str(exc).splitlines()[0]}", t0, started)
        return {"status": "error", "error": str(exc)}
    text = " · ".join(f"{m.short} {fmt(values.get(m.key))} {m.unit}".strip()
                      for m in w.metrics if values.get(m.key) is not None)
    _say(w, c, text, t0, started)
    return {"status": "ok", "values": values}


def _say(w: Workload, c: PtContestant, text: str, t0: float, started: float) -> None:
    elapsed = int(time.monotonic() - started)
    _progress(f"[{elapsed // 60}:{elapsed % 60:02d}] {w.name:<11} {c.name:<8} {text}  "
              f"({time.monotonic() - t0:.1f} s)")


# --------------------------------------------------------------------------- the report


def markdown(doc: rmod.Doc) -> str:
    mode = "quick run, indicative only" if doc["mode"] == "quick" else "full run"
    h = doc["host"]
    lines = [
        f"# enforcer SNI passthrough benchmark: {doc['started_at']} ({mode})", "",
        "wrk (https, SNI `" + LOAD_NAME + "`) → proxy (reads the ClientHello, routes by SNI, "
        "relays the TLS bytes untouched) → a TLS backend per route. Every proxy has the same "
        f"routing table: `{'`, `'.join(API_NAMES)}` → api, `{APPS_GLOB}` (one more label) → "
        "apps, anything else and no SNI → fallback. The TLS session is with the backend, "
        "the same for every proxy: "
        f"{doc.get('backend') or DASH_TEXT}. CPU is the proxy's own (all its processes and "
        "threads, from /proc) over the measured window.", "",
        f"Host: {h['cpus']} CPUs, Linux {h['kernel']}, Python {h['python']}, {h['openssl']}. "
        f"CPU busy in the second before the run: {fmt(100 * (h.get('cpu_busy_before') or 0))} "
        "% (other work on a shared machine makes absolute numbers lower and noisier; ratios "
        f"compare contestants under the same conditions). Duration: {fmt(doc['duration_s'])} s."
        + (" **Interrupted: partial results.**" if doc["interrupted"] else ""), "",
        "## Results", "",
        "↑ higher is better, ↓ lower is better; ratios are enforcer ÷ the best of haproxy and "
        "nginx in this run. Before each measurement every probe name (exact, `*.`, deeper "
        "and shorter names, no SNI) reached its route's backend (body compared by sha256); "
        "after it, 1 MiB through the tunnel was compared by sha256.", ""]
    if doc.get("skipped") or doc.get("error"):
        lines += [f"Not measured: {doc.get('skipped') or doc.get('error')}", ""]
    else:
        lines += [*results_table(doc), ""]
    lines += _spread_lines(doc)
    errors = [f"- {wn} / {cn}: {str(r.get('error', '')).splitlines()[0]}"
              for wn, w in doc["workloads"].items() for cn, r in w["results"].items()
              if r.get("status") == "error"]
    if errors:
        lines += ["## Errors", "", *errors, ""]
    lines += ["## Contestants", ""]
    for name, c in doc["contestants"].items():
        if c["status"] != "ok":
            lines.append(f"- **{name}**: skipped: {c.get('reason', '')}")
            continue
        seen = f"; TLS through it: {c['tls']}" if c.get("tls") else ""
        version = f" {c['version']}" if c.get("version") else ""
        lines.append(f"- **{name}**{version}: {c['setup']}{seen}")
    lines += ["", "## Settings", "", "```json", json.dumps(doc["settings"], indent=1), "```",
              ""]
    return "\n".join(lines)


DASH_TEXT = "not started"


def _spread_lines(doc: rmod.Doc) -> list[str]:
    """With ``--repeat N``: the lowest and highest of the N rounds behind each median."""
    rows = []
    for w in doc["workloads"].values():
        for m in w["metrics"]:
            cells = []
            for name, r in w["results"].items():
                got = [v.get(m["key"]) for v in r.get("samples", [])]
                if got and all(isinstance(x, int | float) for x in got):
                    cells.append(f"{name} {fmt(min(got))} to {fmt(max(got))}")
            if cells:
                rows.append(f"- {w['title'].split(' (')[0]}, {m['unit']}: " + ", ".join(cells))
    if not rows:
        return []
    return ["Spread over the " + str(doc["settings"]["repeat"]) + " rounds (lowest to highest; "
            "the table shows medians):", "", *rows, ""]


def write_all(doc: rmod.Doc, out: Path, run_dir: Path) -> list[Path]:
    """results.{json,md} into the run's folder; the summary passthrough.{json,md} (a quick
    run: passthrough-quick.*, ignored by git) into ``out``."""
    run_dir.mkdir(parents=True, exist_ok=True)
    text, md = json.dumps(doc, indent=2) + "\n", markdown(doc)
    (run_dir / "results.json").write_text(text)
    (run_dir / "results.md").write_text(md)
    name = "passthrough-quick" if doc["mode"] == "quick" else "passthrough"
    (out / f"{name}.json").write_text(text)
    (out / f"{name}.md").write_text(md)
    return [run_dir / "results.md", out / f"{name}.md", out / f"{name}.json"]
