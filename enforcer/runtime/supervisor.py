"""Worker processes (``workers: N|auto``) under one supervisor.

How it works. The supervisor validates everything a start needs (materials, contexts,
rulesets) and reserves every listener address (``dataplane.sockets``) before it forks, so
bad config exits 2/4 and a taken port exits 3, once, from one process. Then it forks N
workers; each builds its own event loop and data plane on ``SO_REUSEPORT`` sockets and
runs exactly like a single-process enforcer, minus the admin endpoint.

The supervisor owns the signals: SIGTERM/SIGINT go to every worker (each drains), a
second one forces them; SIGHUP (reload) and SIGUSR1 (reopen the flow log) are passed on.
A worker that dies while not stopping is started again (with a back-off if it keeps
dying). The supervisor serves the admin endpoint: metrics come from prometheus-client's
multiprocess mode (every worker writes its samples to files in a private directory that
the supervisor sums on each scrape), /readyz is 200 while every worker runs.

Flow records: every worker writes its own, one write per line (see ``FlowLog(shared=)``).
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import signal
import socket
import tempfile
import time
from types import FrameType
from typing import Any

from enforcer import __version__
from enforcer.config.model import Config
from enforcer.dataplane.plane import StartupError
from enforcer.dataplane.sockets import reserve, worker_socket

log = logging.getLogger("enforcer.supervisor")

RESTART_BACKOFF = 1.0  # seconds before restarting a worker that died young
YOUNG = 5.0  # a worker that dies within this many seconds of starting is "young"
FORWARDED = (signal.SIGHUP, signal.SIGUSR1)


def run_workers(cfg: Config, workers: int) -> int:
    """Serve with ``workers`` processes until stopped. Raises ``StartupError``."""
    metrics_dir = tempfile.mkdtemp(prefix="enforcer-metrics-")
    _multiprocess_metrics(metrics_dir)
    reserved: dict[str, socket.socket] = {}
    try:
        _validate(cfg)
        for lst in cfg.listeners:
            try:
                reserved[lst.name] = reserve(lst.listen)
            except OSError as exc:
                raise StartupError("bind", f"listeners.{lst.name}.listen: cannot bind "
                                   f"{lst.listen}: {exc.strerror or exc}") from None
        return Supervisor(cfg, reserved, workers, metrics_dir).run()
    finally:
        for sock in reserved.values():
            sock.close()
        for lst in cfg.listeners:
            if lst.listen.is_unix and lst.name in reserved and lst.listen.path:
                with contextlib.suppress(OSError):
                    os.unlink(lst.listen.path)
        shutil.rmtree(metrics_dir, ignore_errors=True)


def _multiprocess_metrics(directory: str) -> None:
    """Switch prometheus-client to multiprocess mode. It picks its value class from the
    environment when imported, so choose it again now that the directory is known."""
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = directory
    from prometheus_client import values

    values.ValueClass = values.get_value_class()  # type: ignore[no-untyped-call]


def _validate(cfg: Config) -> None:
    from enforcer.dataplane.plane import DataPlane
    from enforcer.observe.metrics import NullMetrics

    DataPlane(cfg, metrics=NullMetrics(), flowlog=None).build()


def _bound(addr: Any, sock: socket.socket) -> str:
    if addr.is_unix:
        return f"unix:{addr.path}"
    host, port = sock.getsockname()[:2]
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


class Supervisor:
    def __init__(self, cfg: Config, reserved: dict[str, socket.socket], workers: int,
                 metrics_dir: str) -> None:
        self.cfg = cfg
        self.reserved = reserved
        self.workers = workers
        self.metrics_dir = metrics_dir
        self.children: dict[int, int] = {}  # pid -> worker index
        self.started: dict[int, float] = {}  # worker index -> start time
        self.restarts: dict[int, int] = dict.fromkeys(range(workers), 0)
        self.stopping = 0
        self.exit_codes: list[int] = []
        self.admin: Any = None
        self.started_at = time.time()

    # ------------------------------------------------------------------ parent
    def run(self) -> int:
        self._start_admin()
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, self._on_stop)
        for sig in FORWARDED:
            signal.signal(sig, self._forward)
        for lst in self.cfg.listeners:
            log.info("listener %s bound on %s (%d workers)", lst.name,
                     _bound(lst.listen, self.reserved[lst.name]), self.workers)
        for index in range(self.workers):
            self._spawn(index)
        try:
            self._wait_children()
        finally:
            if self.admin is not None:
                self.admin.close()
        forced = self.stopping > 1
        if forced:
            return 130
        return 0 if all(code == 0 for code in self.exit_codes) else 1

    def _wait_children(self) -> None:
        while self.children:
            try:
                pid, status = os.waitpid(-1, 0)
            except ChildProcessError:
                return
            self._reaped(pid, os.waitstatus_to_exitcode(status))

    def _reaped(self, pid: int, code: int) -> None:
        index = self.children.pop(pid, None)
        with contextlib.suppress(Exception):
            from prometheus_client import multiprocess

            multiprocess.mark_process_dead(pid, self.metrics_dir)  # type: ignore[no-untyped-call]
        if index is None:
            return
        if self.stopping:
            self.exit_codes.append(code)
            return
        self.restarts[index] += 1
        log.error("worker %d (pid %d) exited with %d; starting it again", index, pid, code)
        if time.monotonic() - self.started.get(index, 0.0) < YOUNG:
            time.sleep(RESTART_BACKOFF)
        if not self.stopping:
            self._spawn(index)

    def _on_stop(self, signum: int, frame: FrameType | None) -> None:
        self.stopping += 1
        log.info("stopping %d workers (%s)", len(self.children), signal.Signals(signum).name)
        for pid in list(self.children):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGTERM)

    def _forward(self, signum: int, frame: FrameType | None) -> None:
        for pid in list(self.children):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signum)

    def _start_admin(self) -> None:
        if self.cfg.admin.listen is None:
            return
        from enforcer.observe.admin import AdminServer
        from enforcer.observe.metrics import AggregatedMetrics

        self.admin = AdminServer(self.cfg.admin.listen, AggregatedMetrics(self.metrics_dir),
                                 status=self.status, ready=self.ready)
        try:
            self.admin.start()
        except OSError as exc:
            raise StartupError("bind", f"admin.listen: cannot bind {self.cfg.admin.listen}: "
                               f"{exc.strerror or exc}") from None

    def ready(self) -> bool:
        return not self.stopping and len(self.children) == self.workers

    def status(self) -> dict[str, Any]:
        children = dict(self.children)
        return {
            "version": __version__, "node": self.cfg.node.name,
            "uptime_s": round(time.time() - self.started_at, 3),
            "workers": [{"index": index, "pid": pid, "restarts": self.restarts.get(index, 0)}
                        for pid, index in sorted(children.items(), key=lambda kv: kv[1])],
            "listeners": [{"name": lst.name, "bound": _bound(lst.listen, self.reserved[lst.name])}
                          for lst in self.cfg.listeners],
            "draining": bool(self.stopping),
        }

    # ------------------------------------------------------------------ child
    def _spawn(self, index: int) -> None:
        pid = os.fork()
        if pid == 0:  # the worker: never returns into the supervisor's stack
            code = 1
            try:
                code = self._worker(index)
            except BaseException:  # report anything, then leave
                log.exception("worker %d failed", index)
            finally:
                logging.shutdown()
                os._exit(code)
        self.children[pid] = index
        self.started[index] = time.monotonic()

    def _worker(self, index: int) -> int:
        for sig in (signal.SIGTERM, signal.SIGINT, *FORWARDED):
            signal.signal(sig, signal.SIG_DFL)
        if self.admin is not None:
            self.admin.forget_after_fork()
        sockets = {lst.name: worker_socket(lst.listen, self.reserved[lst.name])
                   for lst in self.cfg.listeners}
        from enforcer.runtime.server import run

        return run(self.cfg, sockets=sockets, admin=False, shared_flowlog=True)
