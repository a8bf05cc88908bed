"""Process lifecycle: startup -> serve -> drain -> exit.

``serve_config`` builds the observability objects, the data plane and the admin endpoint,
binds everything, then waits for a signal:

- SIGTERM / SIGINT: stop accepting, let open connections finish within
  ``limits.drain_timeout``, close the rest, flush the flow log, exit 0. A second signal
  closes everything at once and exits 130.
- SIGHUP: reload rulesets and TLS material (``runtime.reload``); a failed reload keeps the
  last good state.
- SIGUSR1: reopen the flow-log file (external log rotation).
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import gc
import logging
import os
import signal
import socket
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from cryptography.hazmat.primitives.serialization import Encoding

from enforcer import __version__
from enforcer.config.model import Config, UpstreamConfig
from enforcer.dataplane import native
from enforcer.dataplane.context import ListenerRuntime
from enforcer.dataplane.plane import DataPlane, StartupError
from enforcer.dataplane.tasks import spawn
from enforcer.observe.flowlog import FlowLog, utc_timestamp
from enforcer.observe.heartbeat import Heartbeat
from enforcer.observe.metrics import RELOAD_KINDS, Metrics
from enforcer.runtime import early_signals, workerstatus
from enforcer.runtime.heaptrim import HeapTrimmer
from enforcer.runtime.reload import Reloader
from enforcer.tlsconf.identity import IdentityError, identity_from_der
from enforcer.tlsconf.material import LoadedMaterial

if TYPE_CHECKING:
    from enforcer.observe.admin import AdminServer

log = logging.getLogger("enforcer.runtime")

EXIT_FORCED = 130


def new_event_loop() -> asyncio.AbstractEventLoop:
    """uvloop when it loads, else the standard loop."""
    try:
        import uvloop
    except ImportError:  # uvloop is a dependency, but has no build for some platforms
        log.warning("uvloop is not available; using the standard asyncio loop")
        return asyncio.new_event_loop()
    loop: asyncio.AbstractEventLoop = uvloop.new_event_loop()
    return loop


class Server:
    def __init__(self, cfg: Config, *, metrics: Metrics | None = None,
                 flowlog: Any = None, sockets: Mapping[str, socket.socket] | None = None,
                 admin: bool = True, ticket_secret: bytes | None = None) -> None:
        """``sockets``: listening sockets made by the supervisor (worker processes), which
        also runs the admin endpoint for all of them (``admin=False`` here) and gives them
        the secret their session-ticket keys come from (``ticket_secret``)."""
        self.cfg = cfg
        self.sockets = sockets
        self.admin_enabled = admin
        self.metrics = metrics or Metrics()
        self.flowlog = flowlog if flowlog is not None else FlowLog(cfg.flow_log, self.metrics)
        self.plane = DataPlane(cfg, metrics=self.metrics, flowlog=self.flowlog,
                               ticket_secret=ticket_secret)
        self.reloader = Reloader(self)
        self.admin: AdminServer | None = None
        self.started = time.time()
        self._stop = asyncio.Event()
        self._orphan_watch: asyncio.Task[None] | None = None
        self.heap_trimmer = HeapTrimmer()
        self._heap_trim: asyncio.Task[None] | None = None
        self.heartbeat = Heartbeat(cfg.admin.stall_timeout)  # /healthz (observe.heartbeat)
        self._heartbeat: asyncio.Task[None] | None = None
        self._forced = False
        self._signals = 0
        self._status_writer: asyncio.Task[None] | None = None

    # ------------------------------------------------------------------ lifecycle
    async def start(self) -> None:
        self._heartbeat = spawn(self.heartbeat.run(), name="heartbeat")
        try:
            await self._start_serving()
        except BaseException:  # a startup error: nothing of this server outlives it
            self._heartbeat.cancel()
            self.heartbeat.close()
            raise

    async def _start_serving(self) -> None:
        self.plane.build()
        await self.plane.bind(self.sockets)
        if self.cfg.admin.listen is not None and self.admin_enabled:
            from enforcer.observe.admin import AdminServer  # only with admin.listen set

            self.admin = AdminServer(self.cfg.admin.listen, self.metrics, status=self.status,
                                     ready=self.is_ready, health=self.heartbeat.check)
            try:
                self.admin.start()
            except OSError as exc:
                await self.plane.close_servers()
                raise StartupError("bind", f"admin.listen: cannot bind {self.cfg.admin.listen}: "
                                   f"{exc.strerror or exc}") from None
            log.info("admin endpoint bound on %s (/metrics /healthz /readyz /status)",
                     self.admin.bound)
        self.reloader.start()
        self._heap_trim = spawn(self.heap_trimmer.run(), name="heap-trim")
        if self.sockets is not None:
            self._orphan_watch = spawn(self._stop_when_orphaned(), name="orphan-watch")

    async def _stop_when_orphaned(self) -> None:
        """A worker whose supervisor is gone (killed) drains and exits by itself."""
        supervisor = int(os.environ.get("ENFORCER_SUPERVISOR_PID", "0") or 0)
        while supervisor and os.getppid() == supervisor:  # noqa: ASYNC110 - no event for this
            await asyncio.sleep(1.0)
        if supervisor:
            log.warning("supervisor %d is gone: stopping this worker", supervisor)
            self.request_stop()

    async def serve(self, on_ready: Callable[[Server], None] | None = None) -> int:
        await self.start()
        self._install_signals()
        # Everything built so far (modules, config, TLS contexts) lives as long as the
        # process: keep it out of every garbage collection (connections break their own
        # cycles, so collections are rare and only look at young objects).
        gc.freeze()
        if on_ready is not None:
            on_ready(self)
        await self._stop.wait()
        code = await self.shutdown()
        return code

    def publish_status(self, path: Path) -> None:
        """A worker: write status() to ``path`` now and then every second, for the
        supervisor's /status (see workerstatus.py)."""
        workerstatus.write(path, self.status())
        self._status_writer = spawn(self._write_status(path), name="status-writer")

    async def _write_status(self, path: Path) -> None:
        while True:
            await asyncio.sleep(workerstatus.INTERVAL)
            try:
                workerstatus.write(path, self.status())
            except OSError as exc:  # e.g. a full disk: the next second tries again
                log.debug("cannot write the status for the supervisor: %s", exc)

    def request_stop(self) -> None:
        self._signals += 1
        if self._signals == 1:
            log.info("stopping: draining open connections for up to %ss",
                     self.cfg.limits.drain_timeout)
            self.plane.draining = True
            self._stop.set()
        else:
            log.warning("second stop signal: closing all connections now")
            self._forced = True
            for conn in list(self.plane.active):
                conn.drain_close()

    async def shutdown(self) -> int:
        self.reloader.stop()
        for task in (self._orphan_watch, self._heap_trim, self._status_writer):
            if task is not None:
                task.cancel()
        drain = self.cfg.limits.drain_timeout
        closed = await self.plane.drain(0.0 if self._forced else drain)
        if closed:
            log.warning("drain deadline reached: closed %d open connection(s)", closed)
        if self.admin is not None:
            self.admin.close()
        if self._heartbeat is not None:  # beats through the drain: a wedged drain is unhealthy
            self._heartbeat.cancel()
        self.heartbeat.close()
        await asyncio.sleep(0)  # let transports finish closing
        return EXIT_FORCED if self._forced else 0

    def _install_signals(self) -> None:
        loop = asyncio.get_running_loop()
        loop.add_signal_handler(signal.SIGTERM, self.request_stop)
        loop.add_signal_handler(signal.SIGINT, self.request_stop)
        loop.add_signal_handler(signal.SIGHUP, self.reloader.reload_now)
        loop.add_signal_handler(signal.SIGUSR1, self.flowlog.reopen)
        early_signals.release()  # what came while starting is handled now

    # ------------------------------------------------------------------ admin callbacks
    # Both run on admin threads, concurrently with the event loop. They only read, and
    # copy every container the loop may replace or resize (materials, reload results)
    # before iterating it; single attribute reads and len() are atomic under the GIL.
    def is_ready(self) -> bool:
        """/readyz: every listener bound and every material loaded, and not draining."""
        plane = self.plane
        return (plane.ready and not plane.draining
                and all(lst.server is not None for lst in list(plane.listeners))
                and set(dict(plane.materials)) >= set(self.cfg.tls))

    def status(self) -> dict[str, Any]:
        """/status: what runs, what it serves, and how fresh its materials and rules are."""
        plane = self.plane
        listeners = list(plane.listeners)
        materials = dict(plane.materials)
        return {
            "version": __version__,
            "node": self.cfg.node.name,
            "started": utc_timestamp(self.started),
            "uptime_s": round(time.time() - self.started, 3),
            "ready": self.is_ready(),
            "draining": plane.draining,
            "open_connections": len(plane.active),
            "relay": "native" if plane.native_relay else "python",
            "native_relayed": len(plane.pumped),
            "native_verification_failures": native.verification_failures(),
            "listeners": [_listener_status(lst) for lst in listeners],
            "upstreams": [_upstream_status(u) for u in self.cfg.upstreams.values()],
            "materials": [_material_status(name, m) for name, m in sorted(materials.items())],
            "reloads": _reload_status(self.reloader.status()),
            "flow_log": _flowlog_status(self.cfg, self.flowlog),
            "memory": self.heap_trimmer.status(),
        }


def _listener_status(lst: ListenerRuntime) -> dict[str, Any]:
    cfg = lst.cfg
    return {"name": lst.name, "listen": str(cfg.listen), "bound": lst.bound or None,
            "tls": cfg.tls.mode, "material": cfg.tls.material,
            "client_auth": cfg.tls.client_auth if cfg.tls.mode != "off" else None,
            "proxy_protocol": cfg.proxy_protocol.accept, "ruleset": cfg.ruleset,
            "upstream": lst.upstream.name, "open_connections": lst.active,
            "session_cache": _session_cache(lst)}


def _session_cache(lst: ListenerRuntime) -> dict[str, int] | None:
    stats = native.session_cache_stats(lst.server_ctx) if lst.server_ctx is not None else None
    return None if stats is None else {"sessions": stats[1], "bound": stats[0]}


def _upstream_status(cfg: UpstreamConfig) -> dict[str, Any]:
    return {"name": cfg.name, "address": str(cfg.address), "tls": cfg.tls.mode,
            "material": cfg.tls.material, "proxy_protocol": cfg.proxy_protocol.send}


def _material_status(name: str, material: LoadedMaterial) -> dict[str, Any]:
    """Subject, SANs and validity of the material's leaf certificate (None without one)."""
    out: dict[str, Any] = {"name": name, "sources": list(material.sources)}
    leaf = material.leaf
    if leaf is None:
        out["certificate"] = None
        return out
    try:
        ident = identity_from_der(leaf.public_bytes(Encoding.DER))
    except IdentityError as exc:  # e.g. a non-positive serial: peers refuse it too
        out["certificate"] = {"subject": leaf.subject.rfc4514_string(), "error": str(exc)}
        return out
    not_after = leaf.not_valid_after_utc
    out["certificate"] = {
        "subject": leaf.subject.rfc4514_string(), "issuer": leaf.issuer.rfc4514_string(),
        "serial": ident.serial, "spiffe_id": ident.spiffe_id, "dns": list(ident.dns),
        "uri": list(ident.uri), "ip": list(ident.ip),
        "not_before": _iso(leaf.not_valid_before_utc), "not_after": _iso(not_after),
        "expires_in_s": round(not_after.timestamp() - time.time()),
        "spki_sha256": ident.spki_sha256}
    return out


def _reload_status(last: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Per kind: when a reload was last attempted and succeeded, and the last error (None
    once a later reload succeeded)."""
    last = dict(last)
    out: dict[str, dict[str, Any]] = {}
    for kind in RELOAD_KINDS:
        entry = dict(last.get(kind) or {})
        attempt, ok = entry.get("last_attempt"), entry.get("last_ok")
        out[kind] = {"last_attempt": utc_timestamp(attempt) if attempt else None,
                     "last_ok": utc_timestamp(ok) if ok else None,
                     "last_error": entry.get("last_error"),
                     "result": None if attempt is None else
                     ("ok" if entry.get("last_error") is None else "error"),
                     "files": list(entry.get("files") or ())}
    return out


def _flowlog_status(cfg: Config, flowlog: Any) -> dict[str, Any]:
    return {"sink": cfg.flow_log.sink, "path": cfg.flow_log.path,
            "queued": getattr(flowlog, "queued", 0), "written": flowlog.written,
            "dropped": flowlog.dropped}


def _iso(when: dt.datetime) -> str:
    return when.astimezone(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def run(cfg: Config, *, on_ready: Callable[[Server], None] | None = None,
        sockets: Mapping[str, socket.socket] | None = None, admin: bool = True,
        shared_flowlog: bool = False, ticket_secret: bytes | None = None) -> int:
    """Run until stopped; returns the exit code. Raises ``StartupError``.
    ``sockets``/``admin``/``shared_flowlog``/``ticket_secret`` are set by the supervisor
    for a worker."""
    loop = new_event_loop()
    asyncio.set_event_loop(loop)
    server: Server | None = None
    try:
        async def main() -> int:
            nonlocal server
            metrics = Metrics()
            flowlog = FlowLog(cfg.flow_log, metrics, shared=shared_flowlog)
            server = Server(cfg, metrics=metrics, flowlog=flowlog, sockets=sockets, admin=admin,
                            ticket_secret=ticket_secret)
            server.flowlog.start()
            return await server.serve(on_ready)

        return loop.run_until_complete(main())
    finally:
        if server is not None:
            server.flowlog.close()
        with contextlib.suppress(Exception):
            loop.run_until_complete(loop.shutdown_asyncgens())
        loop.close()
