"""Processes the harness owns, and what /proc says about them.

Every process the harness starts (proxies, backends, load tools) goes through
``Processes.spawn``, which puts it in a session of its own (``start_new_session``), so
the session id equals its pid and every descendant (nginx workers, enforcer workers,
threads) stays findable in /proc by that session id. Three things use that:

- CPU: ``cpu_split(sids)`` sums utime+cutime and stime+cstime of every live process in
  the sessions (threads are included in their process's counters; a child that exited
  and was reaped moves into its parent's cutime/cstime, so nothing is lost or counted
  twice between two snapshots);
- memory: ``rss_bytes(sids)`` sums VmRSS, ``pss_bytes(sids)`` sums Pss (for footprints
  of forked worker trees, whose shared pages VmRSS counts once per process);
- cleanup: ``Processes.stop`` sends SIGTERM to the process group, waits, then SIGKILLs
  whatever is left in the session. ``stop_all`` runs from ``finally`` blocks, from
  ``atexit`` and after SIGINT/SIGTERM/SIGHUP (turned into KeyboardInterrupt by
  ``install_signal_handlers``), and each child also gets PR_SET_PDEATHSIG so that it
  dies with the harness even if the harness is SIGKILLed.

Children write to log files in the run's temp dir, never to pipes: a full pipe would
block a proxy in the middle of a measurement.
"""

from __future__ import annotations

import atexit
import contextlib
import ctypes
import os
import random
import signal
import socket
import subprocess
import time
from collections.abc import Sequence
from pathlib import Path
from types import FrameType

CLK_TCK = os.sysconf("SC_CLK_TCK")
PR_SET_PDEATHSIG = 1
_LIBC = ctypes.CDLL(None, use_errno=True)


class StartError(Exception):
    """A process did not come up; the message names it and quotes its log."""


def _die_with_parent() -> None:  # runs in the child between fork and exec
    _LIBC.prctl(PR_SET_PDEATHSIG, signal.SIGKILL)


def log_tail(path: Path | None, lines: int = 15) -> str:
    if path is None or not path.exists():
        return ""
    text = path.read_text(errors="replace").strip().splitlines()
    return "\n".join(text[-lines:])


class Processes:
    """Registry of every child the harness started; ``stop_all`` ends them all."""

    def __init__(self) -> None:
        self._live: dict[int, tuple[subprocess.Popen[bytes], Path | None]] = {}
        atexit.register(self.stop_all)

    def spawn(self, argv: Sequence[str], *, cwd: Path, log: Path | None = None,
              stdout: Path | None = None, env: dict[str, str] | None = None
              ) -> subprocess.Popen[bytes]:
        err = open(log, "ab") if log else subprocess.DEVNULL  # noqa: SIM115
        out = open(stdout, "ab") if stdout else err  # noqa: SIM115
        try:
            proc = subprocess.Popen(
                list(argv), cwd=cwd, stdin=subprocess.DEVNULL, stdout=out, stderr=err,
                env=env, start_new_session=True, preexec_fn=_die_with_parent)
        except FileNotFoundError:
            raise StartError(f"{argv[0]}: not found") from None
        finally:
            for f in (err, out):
                if not isinstance(f, int):
                    f.close()
        self._live[proc.pid] = (proc, log)
        return proc

    def log_of(self, proc: subprocess.Popen[bytes]) -> Path | None:
        entry = self._live.get(proc.pid)
        return entry[1] if entry else None

    def stop(self, proc: subprocess.Popen[bytes], timeout: float = 5.0) -> None:
        """SIGTERM the group, wait up to ``timeout``, then SIGKILL the whole session."""
        self._live.pop(proc.pid, None)
        sid = proc.pid
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(sid, signal.SIGTERM)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            proc.poll()
            if proc.returncode is not None and not session_pids([sid]):
                return
            time.sleep(0.02)
        for pid in [sid, *session_pids([sid])]:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout)

    def stop_all(self) -> None:
        for proc, _ in list(self._live.values()):
            self.stop(proc, timeout=3.0)


STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)


def install_signal_handlers() -> None:
    """SIGINT, SIGTERM and SIGHUP raise KeyboardInterrupt so ``finally`` cleans up.

    SIGINT is set explicitly: a shell starts background jobs with SIGINT ignored, and
    Python keeps an ignored SIGINT ignored.
    """

    def interrupt(signum: int, frame: FrameType | None) -> None:
        raise KeyboardInterrupt(signal.Signals(signum).name)

    for sig in STOP_SIGNALS:
        signal.signal(sig, interrupt)


def shield_cleanup() -> None:
    """While cleaning up, further stop signals only say so (cleanup must finish)."""

    def busy(signum: int, frame: FrameType | None) -> None:
        os.write(2, b"still stopping processes and writing results...\n")

    for sig in STOP_SIGNALS:
        signal.signal(sig, busy)


# --------------------------------------------------------------------------- /proc


def _stat_fields(pid: int) -> list[str] | None:
    try:
        raw = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        return None
    # comm (field 2) may hold spaces and parentheses: split after the last ')'
    return raw[raw.rindex(")") + 2:].split()  # fields from 3 (state) onwards


def _all_stats() -> dict[int, list[str]]:
    stats = {}
    for entry in os.scandir("/proc"):
        if entry.name.isdigit():
            fields = _stat_fields(int(entry.name))
            if fields is not None:
                stats[int(entry.name)] = fields
    return stats


def session_pids(sids: Sequence[int]) -> list[int]:
    """Live (non-zombie) pids whose session id is one of ``sids``."""
    wanted = {str(s) for s in sids}
    return [pid for pid, f in _all_stats().items() if f[3] in wanted and f[0] != "Z"]


def cpu_split(sids: Sequence[int]) -> tuple[float, float]:
    """(user, system) CPU seconds of every process in the sessions: utime+cutime and
    stime+cstime. System time includes the kernel's work for the process's own packets
    (conntrack, NAT), which the user-space part does not."""
    wanted = {str(s) for s in sids}
    user = system = 0
    for fields in _all_stats().values():
        if fields[3] in wanted:  # field 6 (session) is index 3 here
            user += int(fields[11]) + int(fields[13])  # fields 14 (utime), 16 (cutime)
            system += int(fields[12]) + int(fields[14])  # fields 15 (stime), 17 (cstime)
    return user / CLK_TCK, system / CLK_TCK


def _sum_field(sids: Sequence[int], file: str, field: str) -> int:
    total = 0
    for pid in session_pids(sids):
        with contextlib.suppress(FileNotFoundError, ProcessLookupError, PermissionError):
            for line in Path(f"/proc/{pid}/{file}").read_text().splitlines():
                if line.startswith(field):
                    total += int(line.split()[1]) * 1024  # kB
                    break
    return total


def rss_bytes(sids: Sequence[int]) -> int:
    """Sum of VmRSS over every live process in the sessions."""
    return _sum_field(sids, "status", "VmRSS:")


def pss_bytes(sids: Sequence[int]) -> int:
    """Sum of Pss (shared pages divided among their users): memory of a process tree
    without counting the pages a master shares with its forked workers several times."""
    return _sum_field(sids, "smaps_rollup", "Pss:")


# --------------------------------------------------------------------------- ports


PORT_RANGE_FILE = Path("/proc/sys/net/ipv4/ip_local_port_range")
BAND = 8192  # how many ports below the ephemeral range listeners get theirs from


def ephemeral_range(path: Path = PORT_RANGE_FILE) -> tuple[int, int]:
    """The source ports connect() picks from (this network namespace's sysctl)."""
    try:
        low, high = (int(v) for v in path.read_text().split())
    except (OSError, ValueError):
        return 32768, 60999  # the kernel's default
    return low, high


def _bindable(port: int) -> bool:
    """Nothing holds ``port`` on 127.0.0.1 (no listener, no connection, no TIME_WAIT)."""
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


class Ports:
    """Hands out free loopback TCP ports, never the same one twice in a run.

    They come from just below the ephemeral range, not from it (as ``bind(port 0)``
    would): the load makes tens of thousands of connections whose source ports, and
    then TIME_WAIT sockets, can fill the ephemeral range for a minute or more, and
    ``bind(port 0)`` then only finds the few ports given out before (idle-large in the
    transparent pair, whose three hops all dial the backend's address, did that).
    Only when that band is too small (a range starting low) does the kernel choose.
    """

    def __init__(self, path: Path = PORT_RANGE_FILE) -> None:
        self._given: set[int] = set()
        low, self._high = ephemeral_range(path)
        self._band = range(max(1024, low - BAND), low)
        self._next = random.randrange(len(self._band)) if self._band else 0

    def take(self) -> int:
        band = self._band
        for _ in range(len(band) if len(band) >= 256 else 0):
            port = band[self._next % len(band)]
            self._next += 1
            if port not in self._given and _bindable(port):
                self._given.add(port)
                return port
        for _ in range(100):  # the kernel's choice, from the ephemeral range
            with socket.socket() as s:
                s.bind(("127.0.0.1", 0))
                port = int(s.getsockname()[1])
            if port not in self._given:
                self._given.add(port)
                return port
        raise StartError(f"no free loopback port below or in the ephemeral range "
                         f"(up to {self._high}): TIME_WAIT or leaked sockets hold them "
                         "(ss -tan)")


def listening_ports() -> set[int]:
    """Ports in LISTEN state on any IPv4/IPv6 address (read from /proc/net/tcp*)."""
    ports = set()
    for name in ("/proc/net/tcp", "/proc/net/tcp6"):
        with contextlib.suppress(FileNotFoundError):
            for line in Path(name).read_text().splitlines()[1:]:
                parts = line.split()
                if parts[3] == "0A":
                    ports.add(int(parts[1].rsplit(":", 1)[1], 16))
    return ports


def wait_listening(ports: Sequence[int], procs: Sequence[subprocess.Popen[bytes]],
                   registry: Processes, what: str, timeout: float = 20.0) -> None:
    """Wait until every port listens; StartError (with the log tail) if a process dies.

    Looking at /proc/net/tcp instead of connecting means no probe connection reaches a
    proxy or a backend (an empty connection can upset iperf3's server).
    """
    deadline = time.monotonic() + timeout
    while True:
        for proc in procs:
            if proc.poll() is not None:
                tail = log_tail(registry.log_of(proc))
                raise StartError(f"{what}: exited with code {proc.returncode} during start"
                                 + (f":\n{tail}" if tail else ""))
        if set(ports) <= listening_ports():
            return
        if time.monotonic() > deadline:
            tails = "\n".join(log_tail(registry.log_of(p)) for p in procs)
            raise StartError(f"{what}: ports {list(ports)} not listening after {timeout:.0f}s"
                             + (f":\n{tails}" if tails.strip() else ""))
        time.sleep(0.02)
