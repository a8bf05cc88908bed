"""Reload rulesets and TLS material on SIGHUP and when their files change.

Watching is a cheap poll (once a second) of ``stat()`` signatures (mtime, size, inode) of
every file the running state was built from: the config file, the rulesets file and the
material files. ``stat`` follows symlinks, so the Kubernetes ``..data`` symlink swap of a
Secret or ConfigMap mount shows up as a new inode.

A reload builds the new state on the side (parse, validate, compile, load, build SSL
contexts) and swaps it in for new connections only when all of it succeeded; otherwise
the last good state stays, the error is logged, counted in
``enforcer_reloads_total{kind,result="error"}`` and shown in /status.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from typing import TYPE_CHECKING, Any

from enforcer.config.errors import ConfigError
from enforcer.config.loader import load_config
from enforcer.dataplane.tasks import spawn
from enforcer.policy import compile_rulesets
from enforcer.runtime.tlsreload import reload_tls_material
from enforcer.tlsconf.material import MaterialError

if TYPE_CHECKING:
    from enforcer.runtime.server import Server

log = logging.getLogger("enforcer.reload")

POLL_INTERVAL = 1.0
Signature = tuple[int, int, int] | None


def _signature(path: str) -> Signature:
    try:
        st = os.stat(path)
    except OSError:
        return None
    return (st.st_mtime_ns, st.st_size, st.st_ino)


class Reloader:
    def __init__(self, server: Server, *, interval: float = POLL_INTERVAL) -> None:
        self.server = server
        self.interval = interval
        self.last: dict[str, dict[str, Any]] = {}
        self._task: asyncio.Task[None] | None = None
        self._sigs: dict[str, Signature] = {}

    # ------------------------------------------------------------------ watching
    def start(self) -> None:
        self._sigs = {p: _signature(p) for p in self._watched()}
        self._task = spawn(self._watch(), name="reload-watch")

    def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            self._task = None

    def _watched(self) -> list[str]:
        cfg = self.server.cfg
        paths = [p for p in (cfg.source, cfg.rulesets_file) if p]
        for material in self.server.plane.materials.values():
            paths.extend(material.sources)
        return paths

    async def _watch(self) -> None:
        while True:
            await asyncio.sleep(self.interval)
            changed = [p for p in self._watched() if _signature(p) != self._sigs.get(p)]
            if changed:
                log.info("files changed: %s", ", ".join(changed))
                self.reload_now()

    def reload_now(self) -> None:
        self.reload_rulesets()
        self.reload_tls()
        self._sigs = {p: _signature(p) for p in self._watched()}

    # ------------------------------------------------------------------ rulesets
    def reload_rulesets(self) -> bool:
        source = self.server.cfg.source
        if source is None:
            return True
        try:
            cfg = load_config(source)
            compiled = compile_rulesets(cfg.rulesets)
        except ConfigError as exc:
            return self._result("rulesets", False, "; ".join(str(i) for i in exc.issues))
        except Exception as exc:  # a bug must not take the process down
            return self._result("rulesets", False, f"{type(exc).__name__}: {exc}")
        missing = sorted({lst.ruleset for lst in self.server.cfg.listeners} - set(compiled))
        if missing:
            return self._result("rulesets", False,
                                f"rulesets used by listeners are missing: {', '.join(missing)}")
        self.server.plane.swap_rulesets(compiled)
        return self._result("rulesets", True, None)

    # ------------------------------------------------------------------ TLS material
    def reload_tls(self) -> bool:
        try:
            changed = reload_tls_material(self.server)
        except (MaterialError, ValueError) as exc:
            return self._result("tls", False, str(exc))
        except Exception as exc:  # a bug must not take the process down
            return self._result("tls", False, f"{type(exc).__name__}: {exc}")
        if not changed:
            return True
        return self._result("tls", True, None, materials=changed)

    # ------------------------------------------------------------------ reporting
    def _result(self, kind: str, ok: bool, error: str | None, **extra: Any) -> bool:
        self.server.metrics.reloads_total.labels(kind=kind, result="ok" if ok else "error").inc()
        entry = self.last.setdefault(kind, {})
        entry["last_attempt"] = time.time()
        if ok:
            entry["last_ok"] = time.time()
            entry["last_error"] = None
            log.info("reloaded %s %s", kind, extra.get("materials", ""))
        else:
            entry["last_error"] = error
            log.error("reload of %s failed, keeping the last good state: %s", kind, error)
        return ok

    def status(self) -> dict[str, Any]:
        return self.last
