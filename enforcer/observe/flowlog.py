"""Flow log: one JSON line per flow record, written off the data path.

``FlowLog.emit()`` is called on the data path: it appends the record dict to a bounded
``collections.deque`` and wakes the writer thread. It takes no lock, does no I/O and never
serialises; when the queue is full the record is dropped and counted
(``enforcer_flowlog_dropped_total`` and ``.dropped``). So a slow, blocked or broken sink
can only fill the queue, never stall relaying.

The writer thread takes records in batches (after letting them gather for ``LINGER``),
serialises them (compact JSON), and hands the lines to a sink:

- stdout (or any text stream passed in): one ``write`` + ``flush`` per batch.
- ``file:/path``: an ``O_APPEND`` file descriptor. With ``max_bytes > 0`` and
  ``backups > 0`` it rotates by size like ``logging.handlers.RotatingFileHandler``
  (path -> path.1 -> ... -> path.N, never splitting a line). ``reopen()`` (SIGUSR1) makes
  the writer reopen the path after an external rotation; independently, once a second the
  writer checks that the path still names the open file (renamed or removed -> reopen), as
  ``logging.handlers.WatchedFileHandler`` does. Rotation is only done on regular files
  (never on a FIFO or a device).
- off: nothing is queued, nothing is counted.

A sink failing at run time (disk full, file removed, EPIPE) costs the records of the
failed write, which are counted as dropped; the error is logged on ``enforcer.flowlog``
at most once a minute, and the writer keeps going (the file is reopened on the next batch,
and a WARNING says when writing works again). A full disk takes part of a write before
ENOSPC: that part is cut off again (or, in a file shared by workers, ended with a
newline), so every complete line in the file stays a whole record.

``close()`` flushes what is queued and stops the thread; if the sink stays blocked past the
timeout, what is still queued is counted as dropped and ``close()`` returns anyway (the
writer is a daemon thread).
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import stat
import sys
import tempfile
import threading
import time
from collections import deque
from collections.abc import Callable
from typing import Any, Protocol, TextIO

import orjson

from enforcer.config.model import FlowLogConfig
from enforcer.observe.metrics import Metrics, NullMetrics

log = logging.getLogger("enforcer.flowlog")

BATCH = 1024  # records per write
# After a wake-up the writer lets records gather this long (unless a full batch is queued
# or close() was called): under load it then wakes ~50 times a second instead of once per
# connection, and the data path rarely has to signal it (a futex wake and a GIL hand-over).
# The cost: a record reaches the sink up to this much later, and a SIGKILL in that window
# loses it (a clean stop flushes everything).
LINGER = 0.02
WATCH_INTERVAL = 1.0  # seconds between checks that the file path still names our file
ERROR_LOG_INTERVAL = 60.0  # at most one sink-error log line per this many seconds
ROTATE_RETRY = 60.0  # after a failed rotation, keep appending and retry this much later

# Compact JSON, one line per record: the same text as json.dumps(record,
# separators=(",", ":")) except that non-ASCII characters are written as UTF-8 rather than
# \u escapes (~0.7 us a record against ~8.7 us, in the writer thread but under the GIL).
# default=str turns stray non-JSON values (IP objects) into strings; keys that are not
# strings are written as strings, as json does. orjson's OPT_NON_STR_KEYS costs about 40%
# more per record (~21k instead of ~13k instructions in callgrind), and every record's keys
# are strings, so it is used only for a record that has another key (orjson refuses it
# first): the same bytes either way.
_OPTIONS = orjson.OPT_APPEND_NEWLINE
_OPTIONS_ANY_KEYS = orjson.OPT_APPEND_NEWLINE | orjson.OPT_NON_STR_KEYS


def encode_record(record: dict[str, Any]) -> bytes:
    """One flow-log line (UTF-8, ending in a newline)."""
    try:
        return orjson.dumps(record, default=str, option=_OPTIONS)
    except TypeError:  # orjson.JSONEncodeError: a key that is not a string, or worse
        return orjson.dumps(record, default=str, option=_OPTIONS_ANY_KEYS)


_last_second: tuple[int, str] = (-1, "")  # the last second formatted: records come in bursts


def utc_timestamp(t: float | None = None) -> str:
    """``2026-11-23T19:50:00.123456Z`` for Unix time ``t`` (default: now)."""
    global _last_second
    if t is None:
        t = time.time()
    sec, micros = divmod(round(t * 1_000_000), 1_000_000)
    cached_sec, text = _last_second
    if sec != cached_sec:
        text = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(sec))
        _last_second = (sec, text)
    return f"{text}.{micros:06d}Z"


class FlowRecorder(Protocol):
    """What the data plane needs from a flow log (``FlowLog`` or ``MemoryFlowLog``)."""

    def start(self) -> None: ...
    def emit(self, record: dict[str, Any]) -> None: ...
    def reopen(self) -> None: ...
    def close(self, timeout: float = 5.0) -> None: ...
    @property
    def dropped(self) -> int: ...
    @property
    def written(self) -> int: ...


class _ErrorLog:
    """Logs sink errors at most once per interval, saying how many were suppressed."""

    def __init__(self, interval: float = ERROR_LOG_INTERVAL) -> None:
        self._interval = interval
        self._next = 0.0
        self._suppressed = 0

    def __call__(self, what: str, exc: BaseException) -> None:
        now = time.monotonic()
        if now < self._next:
            self._suppressed += 1
            return
        more = f" ({self._suppressed} more errors since the last report)" if self._suppressed else ""
        log.error("flow log: %s: %s%s; records are being dropped", what, exc, more)
        self._suppressed = 0
        self._next = now + self._interval


Report = Callable[[str, BaseException], None]


class _StreamSink:
    """A text stream (stdout by default): one write and one flush per batch. The lines are
    UTF-8 already: a stream with a bytes layer (stdout) gets them as they are, whatever
    its text encoding; any other text stream gets them decoded."""

    def __init__(self, stream: TextIO, report: Report, *, line_writes: bool = False) -> None:
        self._stream = stream
        self._binary: Any = getattr(stream, "buffer", None)
        self._report = report
        self._line_writes = line_writes

    def write(self, lines: list[bytes]) -> int:
        try:
            if self._line_writes:
                for line in lines:
                    self._put(line)
            else:
                self._put(b"".join(lines))
        except (OSError, ValueError) as exc:  # ValueError: write to a closed stream
            self._report("writing to the stream failed", exc)
            return 0
        return len(lines)

    def _put(self, data: bytes) -> None:
        if self._binary is not None:
            self._stream.flush()  # text written to the stream before stays before
            self._binary.write(data)
            self._binary.flush()
        else:
            self._stream.write(data.decode("utf-8"))
            self._stream.flush()

    def reopen(self) -> None:
        pass

    def close(self) -> None:
        with contextlib.suppress(OSError, ValueError):
            self._stream.flush()


class _FileSink:
    """An append-only file, rotated by size, reopened when moved or on request."""

    def __init__(self, path: str, max_bytes: int, backups: int, report: Report, *,
                 line_writes: bool = False) -> None:
        self._line_writes = line_writes
        self._path = path
        self._max_bytes = max_bytes
        self._backups = backups
        self._report = report
        self._fd: int | None = None
        self._size = 0
        self._regular = False
        self._ident = (0, 0)
        self._next_watch = 0.0
        self._rotate_after = 0.0
        self._partial = 0  # bytes of the chunk being written that reached the file
        self._torn = False  # the file ends in a fragment of a line (see _untear)
        self._failing = False  # the last write failed (log when writing works again)

    # -- file handling -------------------------------------------------------------------
    def _open(self) -> int:
        fd = os.open(self._path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o640)
        st = os.fstat(fd)
        self._fd = fd
        self._size = st.st_size
        self._regular = stat.S_ISREG(st.st_mode)
        self._ident = (st.st_dev, st.st_ino)
        self._next_watch = time.monotonic() + WATCH_INTERVAL
        return fd

    def _close_fd(self) -> None:
        fd, self._fd = self._fd, None
        if fd is not None:
            with contextlib.suppress(OSError):
                os.close(fd)

    def _watch(self) -> None:
        """Close the file if the path no longer names it (renamed or removed)."""
        now = time.monotonic()
        if now < self._next_watch:
            return
        self._next_watch = now + WATCH_INTERVAL
        try:
            st = os.stat(self._path)
            moved = (st.st_dev, st.st_ino) != self._ident
        except OSError:
            moved = True
        if moved:
            self._close_fd()

    def _rotate(self) -> None:
        """path.N-1 -> path.N, ..., path -> path.1, then a fresh path."""
        self._close_fd()
        try:
            for i in range(self._backups - 1, 0, -1):
                src = f"{self._path}.{i}"
                if os.path.lexists(src):
                    os.replace(src, f"{self._path}.{i + 1}")
            os.replace(self._path, f"{self._path}.1")
        except OSError as exc:
            self._report(f"rotating {self._path} failed (appending instead)", exc)
            self._rotate_after = time.monotonic() + ROTATE_RETRY
        self._open()

    def _needs_rotation(self, pending: int, incoming: int) -> bool:
        if self._max_bytes <= 0 or self._backups <= 0 or not self._regular:
            return False
        used = self._size + pending
        if used == 0 or used + incoming <= self._max_bytes:
            return False
        return time.monotonic() >= self._rotate_after

    # -- sink interface ------------------------------------------------------------------
    def write(self, lines: list[bytes]) -> int:
        """Append the lines; return how many were written (the rest are lost)."""
        written = 0
        chunk: list[bytes] = []
        pending = 0
        try:
            if self._fd is not None:
                self._watch()
            fd = self._fd if self._fd is not None else self._open()
            if self._torn:  # end the fragment a failed write left, on its own line
                self._write_all(fd, b"\n")
                self._torn = False
            for data in lines:
                if self._needs_rotation(pending, len(data)):
                    self._write_all(fd, b"".join(chunk))
                    written += len(chunk)
                    chunk, pending = [], 0
                    self._rotate()
                    assert self._fd is not None
                    fd = self._fd
                chunk.append(data)
                pending += len(data)
                if self._line_writes:
                    self._write_all(fd, b"".join(chunk))
                    written += 1
                    chunk, pending = [], 0
            self._write_all(fd, b"".join(chunk))
            written += len(chunk)
        except OSError as exc:
            self._report(f"writing {self._path} failed", exc)
            self._failing = True
            self._untear()
            self._close_fd()  # reopen on the next batch (the file may be gone or fixed)
            return written
        if self._failing:
            self._failing = False
            log.warning("flow log: writing %s again", self._path)
        return written

    def _write_all(self, fd: int, data: bytes) -> None:
        """Write all of ``data``. A failure after part of it (a full disk takes what fits,
        then says ENOSPC) leaves ``_partial`` bytes of it at the end of the file."""
        view = memoryview(data)
        self._partial = 0
        while view:
            n = os.write(fd, view)
            view = view[n:]
            self._size += n
            self._partial += n
        self._partial = 0

    def _untear(self) -> None:
        """After a failed write, take back the part of it that did reach the file: the
        lines of a half-written chunk are counted as lost, and a line cut in the middle
        would make the next one unreadable. With one writer the file is cut back to where
        the chunk started; a shared file (other processes append to it too) cannot be cut
        safely, so the fragment is ended with a newline before the next line instead."""
        partial, self._partial = self._partial, 0
        if not partial:
            return
        if self._fd is not None and self._regular and not self._line_writes:
            try:
                os.ftruncate(self._fd, self._size - partial)
                self._size -= partial
                return
            except OSError:
                pass
        self._torn = True

    def reopen(self) -> None:
        self._close_fd()

    def close(self) -> None:
        self._close_fd()


class _Sink(Protocol):
    def write(self, lines: list[bytes]) -> int: ...
    def reopen(self) -> None: ...
    def close(self) -> None: ...


class FlowLog:
    """Bounded-queue flow log with a writer thread. See the module comment."""

    def __init__(self, cfg: FlowLogConfig, metrics: Metrics | NullMetrics, *,
                 stream: TextIO | None = None, shared: bool = False) -> None:
        """``shared``: several worker processes write to the same sink, so each line goes
        out in its own write (atomic for pipes up to PIPE_BUF, and for O_APPEND files) and
        the file is not rotated by size (rotate it externally and send SIGUSR1)."""
        if cfg.sink == "file" and not cfg.path:
            raise ValueError("flow_log: the file sink needs a path")
        self._cfg = cfg
        self._dropped_metric = metrics.flowlog_dropped_total
        self._off = cfg.sink == "off"
        self._max = max(1, cfg.queue_size)
        self._queue: deque[dict[str, Any]] = deque()
        self._wake = threading.Event()
        self._closing = False
        self._reopen_requested = False
        self._count_lock = threading.Lock()
        self._dropped = 0
        self._written = 0
        self._stream = stream
        self._shared = shared
        self._in_flight = 0  # records the writer thread is writing right now
        self._abandoned = False  # close() timed out and counted the in-flight batch
        self._thread: threading.Thread | None = None
        self._report = _ErrorLog()

    # -- data path -----------------------------------------------------------------------
    def emit(self, record: dict[str, Any]) -> None:
        """Queue a record for writing. Never blocks, never raises; drops when full."""
        if self._off:
            return
        try:
            queue = self._queue
            if len(queue) >= self._max or self._closing:
                self._drop(1)
                return
            queue.append(record)
            if not self._wake.is_set():
                self._wake.set()
        except Exception:  # emit must never break the caller
            pass

    def _drop(self, n: int) -> None:
        with self._count_lock:
            self._dropped += n
        self._dropped_metric.inc(n)

    # -- control -------------------------------------------------------------------------
    def start(self) -> None:
        """Start the writer thread (idempotent)."""
        if self._off or self._thread is not None:
            return
        sink = self._make_sink()
        self._thread = threading.Thread(target=self._run, args=(sink,),
                                        name="enforcer-flowlog", daemon=True)
        self._thread.start()

    def _make_sink(self) -> _Sink:
        if self._cfg.sink == "file":
            assert self._cfg.path is not None
            return _FileSink(self._cfg.path, 0 if self._shared else self._cfg.max_bytes,
                             self._cfg.backups, self._report, line_writes=self._shared)
        return _StreamSink(self._stream if self._stream is not None else sys.stdout,
                           self._report, line_writes=self._shared)

    def reopen(self) -> None:
        """Ask the writer to reopen the file (after external rotation). Thread-safe.

        Call it from the event loop (``loop.add_signal_handler``), not from a raw
        ``signal.signal`` handler: waking the writer takes a lock.
        """
        self._reopen_requested = True
        self._wake.set()

    def close(self, timeout: float = 5.0) -> None:
        """Write what is queued, then stop the writer; give up after ``timeout`` seconds."""
        self._closing = True
        if self._off:
            return
        if self._thread is None and self._queue:
            self.start()  # never started: still flush what was emitted
        thread = self._thread
        self._wake.set()
        if thread is None:
            return
        thread.join(timeout)
        if thread.is_alive():
            # The writer is stuck in the sink with a batch in hand: count that batch too
            # (if the write ever finishes, it is not counted again: see _write).
            lost = self._discard_queue() + self._in_flight
            self._abandoned = True
            if self._in_flight:
                self._drop(self._in_flight)
            if lost:
                log.error("flow log: sink blocked at shutdown; %d queued records dropped", lost)

    def _discard_queue(self) -> int:
        lost = 0
        while True:
            try:
                self._queue.popleft()
            except IndexError:
                break
            lost += 1
        if lost:
            self._drop(lost)
        return lost

    @property
    def dropped(self) -> int:
        return self._dropped

    @property
    def written(self) -> int:
        return self._written

    @property
    def queued(self) -> int:
        return len(self._queue)

    # -- writer thread -------------------------------------------------------------------
    def _run(self, sink: _Sink) -> None:
        try:
            while True:
                if 0 < len(self._queue) < BATCH and not self._closing:
                    time.sleep(LINGER)
                if self._reopen_requested:  # after the sleep: a reopen may have come in it
                    self._reopen_requested = False
                    sink.reopen()
                batch = self._take()
                if batch:
                    self._write(sink, batch)
                    continue
                if self._closing:
                    break
                self._wake.clear()
                if not self._queue and not self._closing and not self._reopen_requested:
                    self._wake.wait(WATCH_INTERVAL)
        finally:
            sink.close()

    def _take(self) -> list[dict[str, Any]]:
        queue = self._queue
        batch: list[dict[str, Any]] = []
        try:
            for _ in range(min(len(queue), BATCH)):
                batch.append(queue.popleft())
        except IndexError:  # close() discarded the queue under us
            pass
        return batch

    def _write(self, sink: _Sink, batch: list[dict[str, Any]]) -> None:
        self._in_flight = len(batch)
        try:
            self._write_batch(sink, batch)
        finally:
            self._in_flight = 0

    def _write_batch(self, sink: _Sink, batch: list[dict[str, Any]]) -> None:
        lines: list[bytes] = []
        for record in batch:
            try:
                lines.append(encode_record(record))
            except (TypeError, ValueError) as exc:  # orjson.JSONEncodeError is a TypeError
                self._report("a flow record could not be serialised", exc)
        try:
            n = sink.write(lines)
        except Exception as exc:  # a broken custom stream must not kill the writer
            self._report("the sink raised", exc)
            n = 0
        if self._abandoned:
            return  # close() gave up on this batch and counted it as dropped
        self._written += n
        if n < len(batch):
            self._drop(len(batch) - n)


class MemoryFlowLog:
    """Keeps records in ``.records``. Same interface as ``FlowLog``; for tests."""

    def __init__(self, cfg: FlowLogConfig | None = None,
                 metrics: Metrics | NullMetrics | None = None) -> None:
        self.records: list[dict[str, Any]] = []
        self.reopened = 0
        self.closed = False

    def start(self) -> None:
        pass

    def emit(self, record: dict[str, Any]) -> None:
        self.records.append(record)

    def reopen(self) -> None:
        self.reopened += 1

    def close(self, timeout: float = 5.0) -> None:
        self.closed = True

    @property
    def dropped(self) -> int:
        return 0

    @property
    def written(self) -> int:
        return len(self.records)


# -- `enforcer check` -------------------------------------------------------------------


def check_sink_writable(cfg: FlowLogConfig) -> str | None:
    """An error message if the file sink's path cannot be created or appended, else None.

    Creates nothing that stays: a missing file is probed by creating and removing a
    temporary file beside it (the only test that is also right for root and read-only
    mounts). Rotation also needs the directory to be writable.
    """
    if cfg.sink != "file":
        return None
    if not cfg.path:
        return "the file sink needs a path"
    path = os.path.abspath(cfg.path)
    parent = os.path.dirname(path)
    if not os.path.isdir(parent):
        what = "is not a directory" if os.path.lexists(parent) else "does not exist"
        return f"cannot write flow log {cfg.path}: {parent} {what}"
    if os.path.isdir(path):
        return f"cannot write flow log {cfg.path}: it is a directory"
    if not os.path.exists(path):
        return _probe_dir(f"cannot create flow log {cfg.path}", parent)
    err = _probe_append(cfg.path)
    if err is None and cfg.max_bytes > 0 and cfg.backups > 0 and os.path.isfile(path):
        err = _probe_dir(f"cannot rotate flow log {cfg.path}", parent)
    return err


def _probe_append(path: str) -> str | None:
    try:  # O_NONBLOCK: a FIFO with no reader must not hang `enforcer check`
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError as exc:
        if exc.errno == errno.ENXIO:  # a FIFO nobody reads yet: writable once it is
            return None
        return f"cannot append to flow log {path}: {exc.strerror}"
    os.close(fd)
    return None


def _probe_dir(what: str, parent: str) -> str | None:
    try:
        fd, probe = tempfile.mkstemp(prefix=".enforcer-check-", dir=parent)
    except OSError as exc:
        return f"{what}: cannot create files in {parent}: {exc.strerror}"
    os.close(fd)
    os.unlink(probe)
    return None
