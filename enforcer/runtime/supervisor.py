"""Worker processes (``workers: N|auto``) under one supervisor.

How it works. The supervisor validates everything a start needs (materials, contexts,
rulesets) and reserves every listener address (``dataplane.sockets``) before it forks, so
bad config exits 2/4 and a taken port exits 3, once, from one process. Then it starts N
workers as fresh processes (``enforcer run`` again, told by ``ENFORCER_WORKER`` which
sockets to serve; a fresh interpreter, because forking a process that has threads (the
admin endpoint) can leave locks held forever in the child). Each worker builds its own
event loop and data plane on its own ``SO_REUSEPORT`` socket (or the inherited UNIX
socket) and runs exactly like a single-process enforcer, minus the admin endpoint. A
worker whose supervisor is gone stops by itself.

The supervisor owns the signals: SIGTERM/SIGINT go to every worker (each drains), a
second one forces them; SIGHUP (reload) and SIGUSR1 (reopen the flow log) are passed on.
A worker that dies while not stopping is started again (with a back-off if it keeps
dying). The supervisor serves the admin endpoint: metrics come from prometheus-client's
multiprocess mode (every worker writes its samples to files in a private directory that
the supervisor sums on each scrape), /readyz is 200 while every worker runs, /healthz is
200 while every worker's event loop keeps stamping its heartbeat into its ready file
(``observe.heartbeat``; a worker still starting counts for up to STARTUP_TIMEOUT).

Flow records: every worker writes its own, one write per line (see ``FlowLog(shared=)``).

Session tickets: the supervisor draws one secret, in memory, and hands it to every worker
(also a restarted one) through an inherited pipe; the workers derive the same ticket keys
from it (``tlsconf.tickets``), so a client resumes whichever worker ``SO_REUSEPORT`` gives
its next connection to.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from types import FrameType
from typing import Any, Final

from prometheus_client.core import CounterMetricFamily, Metric

from enforcer import __version__
from enforcer.config.model import Config
from enforcer.dataplane.plane import StartupError
from enforcer.dataplane.sockets import is_dual_stack, reserve, split_ports, worker_socket_for
from enforcer.observe.flowlog import utc_timestamp
from enforcer.observe.heartbeat import read_stamp, verdict
from enforcer.observe.metrics import PREFIX
from enforcer.runtime import early_signals, workerstatus
from enforcer.tlsconf.tickets import SECRET_BYTES, new_secret

log = logging.getLogger("enforcer.supervisor")
# the supervisor's own metrics, beside the workers' summed ones (observe/metrics.py SPEC)
SUPERVISOR_METRICS: Final = {"worker_restarts_total": "counter"}

RESTART_BACKOFF = 1.0  # seconds before restarting a worker that died young
YOUNG = 5.0  # a worker that dies within this many seconds of starting is "young"
FORWARDED = early_signals.HELD  # passed on to every worker
STARTUP_TIMEOUT = 60.0


def run_workers(cfg: Config, workers: int, run_args: list[str] | None = None) -> int:
    """Serve with ``workers`` processes until stopped. Raises ``StartupError``."""
    metrics_dir = tempfile.mkdtemp(prefix="enforcer-metrics-")
    _multiprocess_metrics(metrics_dir)
    reserved: dict[str, socket.socket] = {}
    try:
        _validate(cfg)
        split = split_ports(lst.listen for lst in cfg.listeners)
        for lst in cfg.listeners:
            try:
                reserved[lst.name] = reserve(lst.listen, lst.listen.port in split)
            except OSError as exc:
                raise StartupError("bind", f"listeners.{lst.name}.listen: cannot bind "
                                   f"{lst.listen}: {exc.strerror or exc}") from None
        return Supervisor(cfg, reserved, workers, metrics_dir, run_args or []).run()
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
    from enforcer.tlsconf import spiffe

    spiffe.close_all()  # the workers keep their own Workload API streams; not this process


def _bound(addr: Any, sock: socket.socket) -> str:
    if addr.is_unix:
        return f"unix:{addr.path}"
    host, port = sock.getsockname()[:2]
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


class Supervisor:
    def __init__(self, cfg: Config, reserved: dict[str, socket.socket], workers: int,
                 metrics_dir: str, run_args: list[str]) -> None:
        self.cfg = cfg
        self.run_args = run_args  # --log-level etc., passed on to the workers
        self.ready_dir = Path(metrics_dir) / "ready"
        self.ready_dir.mkdir()
        self.status_dir = Path(metrics_dir) / "status"  # the workers' reports (workerstatus)
        self.status_dir.mkdir()
        self.reserved = reserved
        self.workers = workers
        self.metrics_dir = metrics_dir
        self.children: dict[int, int] = {}  # pid -> worker index
        self.started: dict[int, float] = {}  # worker index -> start time
        self.restarts: dict[int, int] = dict.fromkeys(range(workers), 0)
        self.last_exit: dict[int, str] = {}  # worker index -> how its last process ended
        self.stopping = 0
        self.exit_codes: list[int] = []
        self.admin: Any = None
        self.started_at = time.time()
        self.ticket_secret = new_secret()  # every worker derives the same ticket keys from it

    # ------------------------------------------------------------------ parent
    def run(self) -> int:
        self._start_admin()
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, self._on_stop)
        for sig in FORWARDED:
            signal.signal(sig, self._forward)
        early_signals.release()  # forwarded to the workers, which hold them until they serve
        for index in range(self.workers):
            self._spawn(index)
        try:
            failed = self._await_ready(STARTUP_TIMEOUT)
            if failed is not None:
                return failed
            for lst in self.cfg.listeners:
                log.info("listener %s bound on %s (%d workers)", lst.name,
                         _bound(lst.listen, self.reserved[lst.name]), self.workers)
            self._wait_children()
        finally:
            if self.admin is not None:
                self.admin.close()
        forced = self.stopping > 1
        if forced:
            return 130
        return 0 if all(code == 0 for code in self.exit_codes) else 1

    def _serving(self) -> set[int]:
        return {int(p.name) for p in self.ready_dir.iterdir() if p.name.isdigit()}

    def _await_ready(self, timeout: float) -> int | None:
        """Wait until every worker serves. A worker that exits first ends the start:
        the others are stopped and its exit code (bad config 2, bind 3, TLS 4) returned."""
        deadline = time.monotonic() + timeout
        while not set(self.children) <= self._serving():
            pid, status = os.waitpid(-1, os.WNOHANG)
            if pid:
                code = os.waitstatus_to_exitcode(status)
                self.children.pop(pid, None)
                log.error("worker (pid %d) exited with %d while starting", pid, code)
                return self._abort_start(code if code > 0 else 1)
            if time.monotonic() > deadline:
                log.error("workers did not start within %ss", timeout)
                return self._abort_start(1)
            time.sleep(0.02)
        return None

    def _abort_start(self, code: int) -> int:
        self.stopping = 1
        for pid in list(self.children):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGTERM)
        self._wait_children()
        return code

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
        self.last_exit[index] = _how_it_ended(code)
        log.error("worker %d (pid %d) %s; starting it again", index, pid, self.last_exit[index])
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

        metrics = AggregatedMetrics(self.metrics_dir)
        metrics.registry.register(_RestartCollector(self))
        self.admin = AdminServer(self.cfg.admin.listen, metrics, status=self.status,
                                 ready=self.ready, health=self.health)
        try:
            self.admin.start()
        except OSError as exc:
            raise StartupError("bind", f"admin.listen: cannot bind {self.cfg.admin.listen}: "
                               f"{exc.strerror or exc}") from None
        log.info("admin endpoint bound on %s (/metrics /healthz /readyz /status)",
                 self.admin.bound)

    def ready(self) -> bool:
        children = set(self.children)
        return (not self.stopping and len(children) == self.workers
                and children <= self._serving())

    def health(self) -> tuple[bool, str]:
        """/healthz: every worker's loop turned within ``admin.stall_timeout``."""
        now = time.monotonic()
        stamps: dict[str, float | None] = {}
        for pid, index in sorted(dict(self.children).items(), key=lambda kv: kv[1]):
            stamp = read_stamp(self.ready_dir / str(pid))
            if stamp is None and now - self.started.get(index, now) < STARTUP_TIMEOUT:
                continue  # still starting: _await_ready / the restart path watch that
            stamps[f"worker {index} (pid {pid})"] = stamp
        return verdict(stamps, now, self.cfg.admin.stall_timeout)

    def status(self) -> dict[str, Any]:
        """Every section of a single process's /status, combined over the workers' reports
        (workerstatus.py), and each worker's own under ``workers``."""
        children = sorted(dict(self.children).items(), key=lambda kv: kv[1])  # by index
        reports = workerstatus.read(self.status_dir, [pid for pid, _ in children])
        out = workerstatus.combine([(index, reports[pid][0]) for pid, index in children
                                    if pid in reports])
        listeners = {entry.get("name"): entry for entry in out.get("listeners") or ()}
        out.update({
            "version": __version__, "node": self.cfg.node.name,
            "started": utc_timestamp(self.started_at),
            "uptime_s": round(time.time() - self.started_at, 3),
            "ready": self.ready(), "draining": bool(self.stopping),
            "listeners": [{**listeners.get(lst.name, {"name": lst.name}),
                           "bound": _bound(lst.listen, self.reserved[lst.name])}
                          for lst in self.cfg.listeners],
            "workers": [{"index": index, "pid": pid, "restarts": self.restarts.get(index, 0),
                         "last_exit": self.last_exit.get(index),
                         **workerstatus.per_worker(*reports.get(pid, (None, None)))}
                        for pid, index in children],
        })
        return out

    # ------------------------------------------------------------------ child
    def _spawn(self, index: int) -> None:
        spec: dict[str, Any] = {"index": index, "sockets": {}, "ready_dir": str(self.ready_dir),
                                "status_dir": str(self.status_dir)}
        fds: list[int] = []
        for lst in self.cfg.listeners:
            sock = self.reserved[lst.name]
            if lst.listen.is_unix:
                spec["sockets"][lst.name] = {"fd": sock.fileno()}
                fds.append(sock.fileno())
            else:
                host, port = sock.getsockname()[:2]
                spec["sockets"][lst.name] = {"host": host, "port": port,
                                             "dual": is_dual_stack(sock)}
        secret_fd = self._secret_pipe()
        spec["ticket_secret_fd"] = secret_fd
        env = dict(os.environ, ENFORCER_WORKER=json.dumps(spec),
                   ENFORCER_SUPERVISOR_PID=str(os.getpid()))
        assert self.cfg.source is not None
        try:
            # The forwarded signals stay held here until the new worker is in
            # self.children: one that comes meanwhile is handled (by _forward) as soon as
            # spawning() unblocks it, and must reach this worker too.
            with early_signals.spawning():
                child = subprocess.Popen(
                    [sys.executable, "-m", "enforcer", "run", "-c", self.cfg.source,
                     *self.run_args], env=env, pass_fds=[*fds, secret_fd])
                self.children[child.pid] = index
                self.started[index] = time.monotonic()
        finally:
            os.close(secret_fd)

    def _secret_pipe(self) -> int:
        """The read end of a pipe holding the ticket secret, for one child to inherit (a
        pipe, not the environment, which other processes of the user can read)."""
        read_end, write_end = os.pipe()
        try:
            os.write(write_end, self.ticket_secret)  # far below the pipe's capacity
        except OSError:
            os.close(read_end)
            raise
        finally:
            os.close(write_end)
        return read_end


def _how_it_ended(code: int) -> str:
    """``exited with 1`` or ``killed by SIGKILL`` (a negative code is the signal)."""
    if code < 0:
        try:
            return f"killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"killed by signal {-code}"
    return f"exited with {code}"


class _RestartCollector:
    """``enforcer_worker_restarts_total{worker}``: the supervisor's own counter, added to
    the workers' summed metrics on its admin endpoint."""

    def __init__(self, supervisor: Supervisor) -> None:
        self._supervisor = supervisor

    def collect(self) -> Iterator[Metric]:
        family = CounterMetricFamily(PREFIX + "worker_restarts_total",
                                     "Worker processes started again after they died.",
                                     labels=["worker"])
        for index, count in sorted(self._supervisor.restarts.items()):
            family.add_metric([str(index)], count)
        yield family


def worker_ticket_secret(spec_text: str) -> bytes:
    """In a worker: the supervisor's ticket secret, read from the inherited pipe."""
    fd = json.loads(spec_text).get("ticket_secret_fd")
    if not isinstance(fd, int):
        raise StartupError("config", "the supervisor passed no ticket secret (a worker of "
                           "another enforcer version?)")
    try:
        secret = os.read(fd, SECRET_BYTES + 1)
    finally:
        os.close(fd)
    if len(secret) != SECRET_BYTES:
        raise StartupError("config", f"the supervisor's ticket secret is {len(secret)} bytes, "
                           f"not {SECRET_BYTES}")
    return secret


def worker_sockets(spec_text: str) -> tuple[int, dict[str, socket.socket], Path]:
    """In a worker: the sockets the supervisor described in ``ENFORCER_WORKER``, and the
    file to create once serving (the supervisor's readiness signal)."""
    spec = json.loads(spec_text)
    sockets: dict[str, socket.socket] = {}
    for name, where in spec["sockets"].items():
        if "fd" in where:
            sock = socket.socket(fileno=int(where["fd"]))
            sock.setblocking(False)
        else:
            sock = worker_socket_for(str(where["host"]), int(where["port"]),
                                     bool(where.get("dual", True)))
        sockets[name] = sock
    return int(spec["index"]), sockets, Path(spec["ready_dir"]) / str(os.getpid())
