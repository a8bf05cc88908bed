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
import logging
import signal
import time
from collections.abc import Callable
from typing import Any

from enforcer import __version__
from enforcer.config.model import Config
from enforcer.dataplane.plane import DataPlane, StartupError
from enforcer.observe.admin import AdminServer
from enforcer.observe.flowlog import FlowLog
from enforcer.observe.metrics import Metrics
from enforcer.runtime.reload import Reloader

log = logging.getLogger("enforcer.runtime")

EXIT_FORCED = 130


def new_event_loop() -> asyncio.AbstractEventLoop:
    """uvloop when it loads, else the standard loop."""
    try:
        import uvloop
    except ImportError:  # pragma: no cover - uvloop is a dependency on Linux
        log.warning("uvloop is not available; using the standard asyncio loop")
        return asyncio.new_event_loop()
    loop: asyncio.AbstractEventLoop = uvloop.new_event_loop()
    return loop


class Server:
    def __init__(self, cfg: Config, *, metrics: Metrics | None = None,
                 flowlog: Any = None) -> None:
        self.cfg = cfg
        self.metrics = metrics or Metrics()
        self.flowlog = flowlog if flowlog is not None else FlowLog(cfg.flow_log, self.metrics)
        self.plane = DataPlane(cfg, metrics=self.metrics, flowlog=self.flowlog)
        self.reloader = Reloader(self)
        self.admin: AdminServer | None = None
        self.started = time.time()
        self._stop = asyncio.Event()
        self._forced = False
        self._signals = 0

    # ------------------------------------------------------------------ lifecycle
    async def start(self) -> None:
        self.plane.build()
        await self.plane.bind()
        if self.cfg.admin.listen is not None:
            self.admin = AdminServer(self.cfg.admin.listen, self.metrics, status=self.status,
                                     ready=self.is_ready)
            try:
                self.admin.start()
            except OSError as exc:
                await self.plane.close_servers()
                raise StartupError("bind", f"admin.listen: cannot bind {self.cfg.admin.listen}: "
                                   f"{exc.strerror or exc}") from None
        self.reloader.start()

    async def serve(self, on_ready: Callable[[Server], None] | None = None) -> int:
        await self.start()
        self._install_signals()
        if on_ready is not None:
            on_ready(self)
        await self._stop.wait()
        code = await self.shutdown()
        return code

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
        drain = self.cfg.limits.drain_timeout
        closed = await self.plane.drain(0.0 if self._forced else drain)
        if closed:
            log.warning("drain deadline reached: closed %d open connection(s)", closed)
        if self.admin is not None:
            self.admin.close()
        await asyncio.sleep(0)  # let transports finish closing
        return EXIT_FORCED if self._forced else 0

    def _install_signals(self) -> None:
        loop = asyncio.get_running_loop()
        loop.add_signal_handler(signal.SIGTERM, self.request_stop)
        loop.add_signal_handler(signal.SIGINT, self.request_stop)
        loop.add_signal_handler(signal.SIGHUP, self.reloader.reload_now)
        loop.add_signal_handler(signal.SIGUSR1, self.flowlog.reopen)

    # ------------------------------------------------------------------ admin callbacks
    def is_ready(self) -> bool:
        return self.plane.ready and not self.plane.draining

    def status(self) -> dict[str, Any]:
        out: dict[str, Any] = {"version": __version__, "node": self.cfg.node.name,
                               "uptime_s": round(time.time() - self.started, 3)}
        out.update(self.plane.status())
        out["materials"] = [_material_status(name, m)
                            for name, m in sorted(self.plane.materials.items())]
        out["reloads"] = self.reloader.status()
        return out


def _material_status(name: str, material: Any) -> dict[str, Any]:
    leaf = material.leaf
    out: dict[str, Any] = {"name": name, "has_certificate": leaf is not None}
    if leaf is not None:
        from cryptography.hazmat.primitives.serialization import Encoding

        from enforcer.tlsconf.identity import identity_from_der

        ident = identity_from_der(leaf.public_bytes(Encoding.DER))
        out.update({"subject": leaf.subject.rfc4514_string(), "spiffe_id": ident.spiffe_id,
                    "dns": list(ident.dns), "uri": list(ident.uri), "ip": list(ident.ip),
                    "serial": ident.serial, "not_after": ident.not_after.isoformat()})
    return out


def run(cfg: Config, *, on_ready: Callable[[Server], None] | None = None) -> int:
    """Run until stopped; returns the exit code. Raises ``StartupError``."""
    loop = new_event_loop()
    asyncio.set_event_loop(loop)
    server: Server | None = None
    try:
        async def main() -> int:
            nonlocal server
            server = Server(cfg)
            server.flowlog.start()
            return await server.serve(on_ready)

        return loop.run_until_complete(main())
    finally:
        if server is not None:
            server.flowlog.close()
        with contextlib.suppress(Exception):
            loop.run_until_complete(loop.shutdown_asyncgens())
        loop.close()
