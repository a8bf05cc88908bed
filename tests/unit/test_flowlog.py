"""FlowLog: JSON lines to real files, streams and FIFOs, with real threads."""

from __future__ import annotations

import io
import ipaddress
import json
import logging
import os
import re
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from enforcer.config.model import FlowLogConfig
from enforcer.dataplane.connection import Stage
from enforcer.observe.flowlog import (
    BATCH,
    FlowLog,
    FlowRecorder,
    MemoryFlowLog,
    check_sink_writable,
    encode_record,
    utc_timestamp,
)
from enforcer.observe.metrics import Metrics, NullMetrics


def record(i: int) -> dict[str, Any]:
    return {"ts": "2026-11-23T19:50:00.123456Z", "event": "flow", "flow_id": f"{i:026d}",
            "listener": "inbound", "action": "allow", "client": {"ip": "203.0.113.7", "port": i},
            "bytes": {"from_client": i * 3, "to_client": i * 7}, "duration_s": 0.0123,
            "close": "client_fin"}


def line(rec: dict[str, Any]) -> str:
    return json.dumps(rec, separators=(",", ":")) + "\n"


def file_cfg(path: Path, **kw: Any) -> FlowLogConfig:
    return FlowLogConfig(sink="file", path=str(path), **kw)


def wait_for(cond: Callable[[], bool], timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError("condition not reached in time")
        time.sleep(0.005)


def dropped_metric(m: Metrics) -> float:
    text = m.render()[0].decode()
    match = re.search(r"^enforcer_flowlog_dropped_total (\S+)$", text, re.M)
    assert match
    return float(match.group(1))


class ListHandler(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.records: list[logging.LogRecord] = []

    def emit(self, rec: logging.LogRecord) -> None:
        self.records.append(rec)

    def messages(self) -> list[str]:
        return [r.getMessage() for r in self.records]


@pytest.fixture
def flowlog_errors() -> Iterator[ListHandler]:
    """What the writer logs on ``enforcer.flowlog`` (whatever propagation is set up)."""
    logger = logging.getLogger("enforcer.flowlog")
    handler = ListHandler()
    old_level = logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.DEBUG)
    yield handler
    logger.removeHandler(handler)
    logger.setLevel(old_level)


@pytest.fixture
def flowlogs() -> Iterator[list[FlowLog]]:
    """Closes every FlowLog a test made, even when it fails."""
    made: list[FlowLog] = []
    yield made
    for fl in made:
        fl.close(timeout=5.0)


# -- file sink ------------------------------------------------------------------------


def test_records_written_exactly_as_json_lines(tmp_path: Path) -> None:
    path = tmp_path / "flows.log"
    m = Metrics()
    fl = FlowLog(file_cfg(path), m)
    fl.start()
    recs = [record(i) for i in range(5000)]
    for r in recs:
        fl.emit(r)
    fl.close()
    assert path.read_text() == "".join(line(r) for r in recs)
    assert (fl.written, fl.dropped, dropped_metric(m)) == (5000, 0, 0.0)


def rotated_files(path: Path, backups: int) -> list[Path]:
    """Oldest first: path.N ... path.1, path."""
    older = [Path(f"{path}.{i}") for i in range(backups, 0, -1)]
    return [p for p in older if p.exists()] + [path]


def test_rotation_keeps_every_record_in_order(tmp_path: Path) -> None:
    path = tmp_path / "flows.log"
    fl = FlowLog(file_cfg(path, max_bytes=20_000, backups=50), NullMetrics())
    fl.start()
    recs = [record(i) for i in range(2000)]
    for r in recs:
        fl.emit(r)
    fl.close()
    files = rotated_files(path, 50)
    assert len(files) > 5
    assert all(f.stat().st_size <= 20_000 for f in files)
    text = "".join(f.read_text() for f in files)
    assert text == "".join(line(r) for r in recs)
    assert fl.written == 2000 and fl.dropped == 0


def test_rotation_keeps_at_most_backups_files(tmp_path: Path) -> None:
    path = tmp_path / "flows.log"
    fl = FlowLog(file_cfg(path, max_bytes=5_000, backups=2), NullMetrics())
    fl.start()
    recs = [record(i) for i in range(1000)]
    for r in recs:
        fl.emit(r)
    fl.close()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["flows.log", "flows.log.1",
                                                          "flows.log.2"]
    tail = "".join(f.read_text() for f in rotated_files(path, 2))
    assert "".join(line(r) for r in recs).endswith(tail)  # the newest records, contiguous


def test_no_rotation_when_max_bytes_is_zero(tmp_path: Path) -> None:
    path = tmp_path / "flows.log"
    fl = FlowLog(file_cfg(path, max_bytes=0, backups=3), NullMetrics())
    fl.start()
    for i in range(500):
        fl.emit(record(i))
    fl.close()
    assert [p.name for p in tmp_path.iterdir()] == ["flows.log"]
    assert len(path.read_text().splitlines()) == 500


def test_appends_to_an_existing_file(tmp_path: Path) -> None:
    path = tmp_path / "flows.log"
    path.write_text("earlier\n")
    fl = FlowLog(file_cfg(path), NullMetrics())
    fl.start()
    fl.emit(record(1))
    fl.close()
    assert path.read_text() == "earlier\n" + line(record(1))


def test_reopen_after_external_rename(tmp_path: Path) -> None:
    path = tmp_path / "flows.log"
    fl = FlowLog(file_cfg(path), NullMetrics())
    fl.start()
    first = [record(i) for i in range(10)]
    for r in first:
        fl.emit(r)
    wait_for(lambda: fl.written == 10)
    os.rename(path, tmp_path / "flows.log.old")  # logrotate's "create" mode
    fl.reopen()  # SIGUSR1
    second = [record(i) for i in range(10, 20)]
    for r in second:
        fl.emit(r)
    fl.close()
    assert (tmp_path / "flows.log.old").read_text() == "".join(line(r) for r in first)
    assert path.read_text() == "".join(line(r) for r in second)


def test_removed_file_is_recreated_without_a_signal(tmp_path: Path) -> None:
    path = tmp_path / "flows.log"
    fl = FlowLog(file_cfg(path), NullMetrics())
    fl.start()
    fl.emit(record(1))
    wait_for(lambda: fl.written == 1)
    path.unlink()
    time.sleep(1.1)  # the writer checks the path once a second
    fl.emit(record(2))
    fl.close()
    assert path.read_text() == line(record(2))
    assert fl.dropped == 0


def test_close_flushes_everything_queued(tmp_path: Path) -> None:
    path = tmp_path / "flows.log"
    fl = FlowLog(file_cfg(path, queue_size=100_000), NullMetrics())
    fl.start()
    for i in range(30_000):
        fl.emit(record(i))
    fl.close()
    assert fl.written == 30_000
    assert len(path.read_text().splitlines()) == 30_000


def test_close_without_start_still_flushes(tmp_path: Path) -> None:
    path = tmp_path / "flows.log"
    fl = FlowLog(file_cfg(path), NullMetrics())
    fl.emit(record(1))
    fl.close()
    assert path.read_text() == line(record(1))


def test_emit_after_close_is_dropped_and_counted(tmp_path: Path) -> None:
    m = Metrics()
    fl = FlowLog(file_cfg(tmp_path / "f.log"), m)
    fl.start()
    fl.close()
    fl.emit(record(1))
    assert fl.dropped == 1 and dropped_metric(m) == 1.0


# -- stream sinks ---------------------------------------------------------------------


def test_stdout_is_the_default_stream(capsys: pytest.CaptureFixture[str]) -> None:
    fl = FlowLog(FlowLogConfig(sink="stdout"), NullMetrics())
    fl.start()
    fl.emit(record(7))
    fl.close()
    assert capsys.readouterr().out == line(record(7))


def test_stream_override() -> None:
    out = io.StringIO()
    fl = FlowLog(FlowLogConfig(), NullMetrics(), stream=out)
    fl.start()
    for i in range(3):
        fl.emit(record(i))
    fl.close()
    assert out.getvalue() == "".join(line(record(i)) for i in range(3))


class _Key(str):
    """A str subclass as a key: orjson's fast path refuses it, the fallback writes it."""


@pytest.mark.parametrize("rec", [
    record(7),
    record(8) | {"tls": {"sni": "bücher.example", "peer": None}, "rule": None},
    record(9) | {"proxy_protocol": {"tlvs": {1: "h2", 0xE0: "x"}}},
    record(10) | {"tls": {_Key("sni"): "a"}},
], ids=["plain", "utf8", "int-keys", "str-subclass-key"])
def test_encoded_record_is_compact_json_whichever_keys(rec: dict[str, Any]) -> None:
    """String keys take orjson's faster path and other keys the OPT_NON_STR_KEYS one; both
    give json.dumps' compact text, with UTF-8 instead of \\u escapes."""
    want = json.dumps(rec, separators=(",", ":"), ensure_ascii=False) + "\n"
    assert encode_record(rec) == want.encode("utf-8")


@pytest.mark.parametrize("sink", ["file", "stream"])
def test_unusual_values_are_written_as_json(tmp_path: Path, sink: str) -> None:
    """Non-ASCII text (an SNI, a certificate CN) as UTF-8, IP objects and enums as text or
    numbers, non-string keys (TLV types) as strings: nothing is dropped, every line parses."""
    rec = record(1) | {"tls": {"sni": "bücher.example", "peer": {"cn": "Zoë 🐙"}},
                       "client": {"ip": ipaddress.ip_address("2001:db8::7"), "port": 1},
                       "proxy_protocol": {"tlvs": {1: "h2", 0xE0: "x"}},
                       "stage": Stage.RELAY, "detail": 'quote " and \\ and \n'}
    out = io.StringIO()
    path = tmp_path / "flows.log"
    fl = (FlowLog(file_cfg(path), NullMetrics()) if sink == "file"
          else FlowLog(FlowLogConfig(), NullMetrics(), stream=out))
    fl.start()
    fl.emit(rec)
    fl.close()
    text = path.read_text(encoding="utf-8") if sink == "file" else out.getvalue()
    assert (fl.written, fl.dropped) == (1, 0)
    assert text.endswith("\n") and text.count("\n") == 1
    got = json.loads(text)
    assert got["tls"] == {"sni": "bücher.example", "peer": {"cn": "Zoë 🐙"}}
    assert got["client"] == {"ip": "2001:db8::7", "port": 1}
    assert got["proxy_protocol"] == {"tlvs": {"1": "h2", "224": "x"}}
    assert got["stage"] == int(Stage.RELAY)
    assert got["detail"] == 'quote " and \\ and \n'
    assert "bücher" in text  # UTF-8, not \\u escapes


def test_a_stream_with_a_bytes_layer_gets_utf8_whatever_its_encoding() -> None:
    """stdout under LANG=C (or PYTHONIOENCODING=ascii) cannot encode an SNI like bücher:
    the lines go to its bytes layer as UTF-8, after any text written to it before."""
    raw = io.BytesIO()
    out = io.TextIOWrapper(raw, encoding="ascii", write_through=False)
    out.write("banner\n")  # still in the text layer's buffer
    fl = FlowLog(FlowLogConfig(), NullMetrics(), stream=out)
    fl.start()
    fl.emit(record(1) | {"tls": {"sni": "bücher.example"}})
    fl.close()
    assert (fl.written, fl.dropped) == (1, 0)
    banner, line = raw.getvalue().split(b"\n", 1)
    assert banner == b"banner"
    assert json.loads(line.decode("utf-8"))["tls"] == {"sni": "bücher.example"}


def test_sink_off_writes_and_counts_nothing() -> None:
    m = Metrics()
    fl = FlowLog(FlowLogConfig(sink="off"), m)
    fl.start()
    for i in range(10):
        fl.emit(record(i))
    fl.close()
    assert (fl.written, fl.dropped, dropped_metric(m)) == (0, 0, 0.0)


def test_values_json_cannot_express_become_strings_and_cycles_are_dropped() -> None:
    out = io.StringIO()
    fl = FlowLog(FlowLogConfig(), NullMetrics(), stream=out)
    fl.start()
    cyclic: dict[str, Any] = {"event": "flow"}
    cyclic["self"] = cyclic
    fl.emit({"ip": ipaddress_like()})
    fl.emit(cyclic)
    fl.close()
    assert out.getvalue() == '{"ip":"10.0.0.1"}\n'
    assert fl.written == 1 and fl.dropped == 1


def ipaddress_like() -> object:
    import ipaddress

    return ipaddress.ip_address("10.0.0.1")


# -- blocked and failing sinks ----------------------------------------------------------


class BlockingStream(io.TextIOBase):
    """A stream whose write blocks until released (a stalled stdout consumer)."""

    def __init__(self) -> None:
        self.release = threading.Event()
        self.entered = threading.Event()
        self.data: list[str] = []

    def write(self, s: str) -> int:
        self.entered.set()
        self.release.wait()
        self.data.append(s)
        return len(s)


def test_blocked_stream_never_blocks_emit(flowlogs: list[FlowLog]) -> None:
    m = Metrics()
    stream = BlockingStream()
    fl = FlowLog(FlowLogConfig(queue_size=1000), m, stream=stream)  # type: ignore[arg-type]
    flowlogs.append(fl)
    fl.start()
    fl.emit(record(0))
    assert stream.entered.wait(5)  # the writer is now stuck in write()
    start = time.perf_counter()
    for i in range(1, 100_000):
        fl.emit(record(i))
    assert time.perf_counter() - start < 2.0
    assert fl.dropped == 100_000 - 1 - 1000
    assert dropped_metric(m) == fl.dropped
    start = time.perf_counter()
    fl.close(timeout=0.3)
    assert time.perf_counter() - start < 2.0
    # What close() could not flush counts as dropped at once, including the batch the
    # writer is stuck on (at shutdown the process is about to exit with it).
    assert fl.dropped == 100_000
    stream.release.set()
    fl.close(timeout=5.0)
    assert fl.written == 0 and fl.written + fl.dropped == 100_000
    assert dropped_metric(m) == fl.dropped


def test_fifo_nobody_reads_never_blocks_emit(tmp_path: Path, flowlogs: list[FlowLog],
                                             flowlog_errors: ListHandler) -> None:
    fifo = tmp_path / "flows.fifo"
    os.mkfifo(fifo)
    # The test holds the only reader end (O_RDWR opens without waiting) and never reads.
    reader = os.open(fifo, os.O_RDWR | os.O_NONBLOCK)
    m = Metrics()
    fl = FlowLog(file_cfg(fifo, queue_size=2000, max_bytes=1000, backups=3), m)
    flowlogs.append(fl)
    fl.start()
    try:
        start = time.perf_counter()
        for i in range(100_000):
            fl.emit(record(i))
        assert time.perf_counter() - start < 2.0
        wait_for(lambda: fl.queued == 2000)  # the writer is stuck, the queue is full
        assert fl.dropped >= 100_000 - 2000 - 2 * BATCH
        assert dropped_metric(m) == fl.dropped
        start = time.perf_counter()
        fl.close(timeout=0.3)
        assert time.perf_counter() - start < 2.0
    finally:
        os.close(reader)  # the blocked write now fails with EPIPE
    fl.close(timeout=5.0)
    assert fl.written + fl.dropped == 100_000
    assert fl.written < 100_000
    assert dropped_metric(m) == fl.dropped
    assert fifo.exists() and not Path(f"{fifo}.1").exists()  # a FIFO is never rotated
    messages = flowlog_errors.messages()
    assert any("sink blocked at shutdown" in msg for msg in messages)
    assert any("Broken pipe" in msg for msg in messages)


class FailingStream(io.TextIOBase):
    def __init__(self) -> None:
        self.calls = 0

    def write(self, s: str) -> int:
        self.calls += 1
        raise OSError(28, "No space left on device")


def test_failing_sink_counts_drops_and_logs_once(flowlog_errors: ListHandler) -> None:
    m = Metrics()
    stream = FailingStream()
    fl = FlowLog(FlowLogConfig(), m, stream=stream)  # type: ignore[arg-type]
    fl.start()
    for round_ in range(5):
        for i in range(10):
            fl.emit(record(round_ * 10 + i))
        expected = (round_ + 1) * 10
        wait_for(lambda: fl.dropped == expected)  # noqa: B023 - called before the next round
    fl.close()
    assert stream.calls >= 5  # the writer kept trying
    assert (fl.written, fl.dropped, dropped_metric(m)) == (0, 50, 50.0)
    assert len(flowlog_errors.records) == 1
    assert flowlog_errors.records[0].levelno == logging.ERROR
    assert "No space left on device" in flowlog_errors.messages()[0]


@pytest.mark.skipif(not os.path.exists("/dev/full"), reason="needs /dev/full")
def test_disk_full_file_sink(flowlog_errors: ListHandler) -> None:
    m = Metrics()
    fl = FlowLog(FlowLogConfig(sink="file", path="/dev/full", max_bytes=100, backups=1), m)
    fl.start()
    for i in range(100):
        fl.emit(record(i))
    fl.close()
    assert (fl.written, fl.dropped, dropped_metric(m)) == (0, 100, 100.0)
    assert len(flowlog_errors.records) == 1
    assert "No space left on device" in flowlog_errors.messages()[0]
    assert os.path.exists("/dev/full")  # a device is never rotated away


def test_missing_directory_at_run_time(tmp_path: Path, flowlog_errors: ListHandler) -> None:
    fl = FlowLog(file_cfg(tmp_path / "gone" / "flows.log"), NullMetrics())
    fl.start()
    fl.emit(record(1))
    fl.close()
    assert fl.dropped == 1
    assert len(flowlog_errors.records) == 1
    assert "No such file or directory" in flowlog_errors.messages()[0]


def test_file_sink_needs_a_path() -> None:
    with pytest.raises(ValueError):
        FlowLog(FlowLogConfig(sink="file"), NullMetrics())


# -- MemoryFlowLog and helpers ----------------------------------------------------------


def test_memory_flow_log_has_the_same_interface() -> None:
    mem: FlowRecorder = MemoryFlowLog()
    real: FlowRecorder = FlowLog(FlowLogConfig(sink="off"), NullMetrics())
    for fl in (mem, real):
        fl.start()
        fl.emit(record(1))
        fl.reopen()
        fl.close(timeout=1.0)
    assert isinstance(mem, MemoryFlowLog)
    assert mem.records == [record(1)]
    assert mem.written == 1 and mem.dropped == 0
    public = {n for n in dir(FlowLog) if not n.startswith("_")} - {"queued"}
    assert public <= {n for n in dir(MemoryFlowLog) if not n.startswith("_")}


def test_utc_timestamp_format() -> None:
    assert utc_timestamp(0.0) == "1970-01-01T00:00:00.000000Z"
    assert utc_timestamp(1_795_000_000.123457) == "2026-11-18T11:06:40.123457Z"
    assert utc_timestamp(1_795_000_000.9999996) == "2026-11-18T11:06:41.000000Z"
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{6}Z", utc_timestamp())


# -- enforcer check ---------------------------------------------------------------------


def test_check_accepts_other_sinks_and_writable_paths(tmp_path: Path) -> None:
    assert check_sink_writable(FlowLogConfig()) is None
    assert check_sink_writable(FlowLogConfig(sink="off")) is None
    assert check_sink_writable(file_cfg(tmp_path / "new.log")) is None
    assert list(tmp_path.iterdir()) == []  # the probe leaves nothing behind
    existing = tmp_path / "old.log"
    existing.write_text("x\n")
    assert check_sink_writable(file_cfg(existing)) is None
    assert existing.read_text() == "x\n"


def test_check_missing_directory(tmp_path: Path) -> None:
    err = check_sink_writable(file_cfg(tmp_path / "missing" / "flows.log"))
    assert err is not None and "does not exist" in err


def test_check_path_under_a_regular_file(tmp_path: Path) -> None:
    plain = tmp_path / "plain"
    plain.write_text("")
    err = check_sink_writable(file_cfg(plain / "x"))
    assert err is not None and "not a directory" in err
    if os.path.isfile("/etc/passwd"):
        assert check_sink_writable(FlowLogConfig(sink="file", path="/etc/passwd/x"))


def test_check_path_is_a_directory(tmp_path: Path) -> None:
    err = check_sink_writable(file_cfg(tmp_path))
    assert err is not None and "directory" in err


def test_check_read_only_directory(tmp_path: Path) -> None:
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o500)
    try:
        if os.access(ro, os.W_OK):
            pytest.skip("running as root: permission bits do not stop writes")
        err = check_sink_writable(file_cfg(ro / "flows.log"))
        assert err is not None and "Permission denied" in err
    finally:
        ro.chmod(0o700)


def test_check_fifo_without_reader_does_not_hang(tmp_path: Path) -> None:
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    assert check_sink_writable(file_cfg(fifo)) is None


class _ShortThenFull:
    """os.write stand-in: the first write into the log takes ``fits`` bytes, then ENOSPC
    until ``room`` is set again (what a full file system does)."""

    def __init__(self, fits: int) -> None:
        self.fits = fits
        self.room = False
        self.real = os.write

    def __call__(self, fd: int, data: Any) -> int:
        if self.room:
            return self.real(fd, data)
        if self.fits:
            n, self.fits = self.real(fd, bytes(data)[:self.fits]), 0
            return n
        raise OSError(28, "No space left on device")


@pytest.mark.parametrize("shared", [False, True])
def test_a_write_cut_short_by_a_full_disk_leaves_only_whole_lines(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, shared: bool,
        flowlog_errors: ListHandler) -> None:
    """One writer: the cut chunk is taken back. Shared by workers: the fragment gets its
    newline, so the records after it are whole lines."""
    path = tmp_path / "flows.log"
    fake = _ShortThenFull(fits=100)
    m = Metrics()
    fl = FlowLog(file_cfg(path), m, shared=shared)
    monkeypatch.setattr("enforcer.observe.flowlog.os.write", fake)
    fl.start()
    for i in range(5):
        fl.emit(record(i))
    wait_for(lambda: fl.dropped == 5)
    fake.room = True
    for i in range(5, 8):
        fl.emit(record(i))
    fl.close()
    lines = path.read_bytes().splitlines()
    whole = [json.loads(line) for line in lines if line.startswith(b"{") and line.endswith(b"}")]
    assert [r["flow_id"] for r in whole][-3:] == [record(i)["flow_id"] for i in range(5, 8)]
    if shared:
        assert len(lines) == 4 and len(lines[0]) == 100  # the fragment, on its own line
    else:
        assert len(lines) == 3
    assert (fl.written, fl.dropped, dropped_metric(m)) == (3, 5, 5.0)
