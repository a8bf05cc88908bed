"""The flow log as a sink: blocked sinks never stall relaying and what they lose is counted
exactly; SIGTERM flushes what is queued; SIGUSR1 reopens the file; size rotation; a disk
that fails at run time; `enforcer check` on unwritable paths; ``open_events``.

Accounting used throughout: every record the data plane emits is either written or counted
in ``enforcer_flowlog_dropped_total``, so ``records read + dropped == connections``.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import subprocess
import threading
from pathlib import Path
from typing import Any

import pytest

from tests.e2e.harness import Backend, sha
from tests.e2e.observe_util import (
    ObservedProcess,
    admin_port,
    assert_record_shape,
    http_get,
    http_get_sync,
    listener_port,
    read_records,
    scrape,
    scrape_sync,
    serving,
    talk,
    wait_until,
    wait_until_sync,
)
from tests.e2e.proc import EchoServer, enforcer_cmd, write_config

MiB = 1024 * 1024
NO_LABELS: frozenset[tuple[str, str]] = frozenset()


def plain_config(backend_port: int, flow_log: dict[str, Any], *,
                 admin: bool = True) -> dict[str, Any]:
    cfg: dict[str, Any] = {
        "version": 1, "node": {"name": "flowlog-node"},
        "listeners": [{"name": "plain", "listen": "127.0.0.1:0", "tls": {"mode": "off"},
                       "ruleset": "open", "upstream": "app"}],
        "upstreams": {"app": {"address": f"127.0.0.1:{backend_port}"}},
        "rulesets": {"open": {"default": "allow"}},
        "flow_log": flow_log,
    }
    if admin:
        cfg["admin"] = {"listen": "127.0.0.1:0"}
    return cfg


def short_connections(port: int, n: int) -> None:
    """``n`` connections one after the other, each echoing a distinct message."""
    for i in range(n):
        message = f"message {i}".encode()
        with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
            sock.sendall(message)
            sock.shutdown(socket.SHUT_WR)
            got = b""
            while data := sock.recv(4096):
                got += data
            assert got == message


def admin_answers(port: int) -> bool:
    return http_status_or_none(port) is not None


def http_status_or_none(port: int) -> int | None:
    try:
        return http_get_sync(port, "/healthz").status
    except OSError:
        return None


# --------------------------------------------------------------------------- blocked sinks
async def test_fifo_nobody_reads_does_not_stall_64mib_and_drops_are_counted(
        tmp_path: Path) -> None:
    """The writer thread blocks opening a FIFO without a reader: relaying goes on, the
    bounded queue fills and the rest is dropped and counted; once a reader appears,
    what was kept is written and nothing is lost without being counted."""
    fifo = tmp_path / "flows.fifo"
    os.mkfifo(fifo)
    to_backend, to_client = os.urandom(64 * MiB), os.urandom(64 * MiB)
    swap = await Backend(mode="swap", payload=to_client).start()
    backend = await Backend(mode="echo").start()
    queue_size, short = 8, 100
    lines: list[str] = []
    try:
        cfg = plain_config(backend.port, {"sink": f"file:{fifo}", "queue_size": queue_size})
        cfg["listeners"].append(dict(cfg["listeners"][0], name="bulk", upstream="bulk"))
        cfg["upstreams"]["bulk"] = {"address": f"127.0.0.1:{swap.port}"}
        async with serving(cfg) as server:
            big = await talk(listener_port(server, "bulk"), to_backend, timeout=120)
            assert sha(big.received) == sha(to_client)
            await wait_until(lambda: len(swap.received) == 1)
            assert sha(swap.received[0]) == sha(to_backend)
            port = listener_port(server, "plain")
            for i in range(short):
                reply = await talk(port, b"short %d" % i)
                assert reply.received == b"short %d" % i
            await wait_until(lambda: len(server.plane.active) == 0)

            dropped = server.flowlog.dropped
            assert dropped >= short + 1 - 2 * queue_size, "queue + one batch kept at most"
            samples = await scrape(admin_port(server))
            assert samples["enforcer_flowlog_dropped_total"] == {NO_LABELS: dropped}
            status = (await http_get(admin_port(server), "/status")).json()
            assert status["flow_log"]["dropped"] == dropped
            assert status["flow_log"]["queued"] == queue_size

            reader = threading.Thread(target=read_fifo, args=(fifo, lines), daemon=True)
            reader.start()  # unblocks the writer; the rest is flushed at shutdown
        reader.join(10)
        assert not reader.is_alive()
        assert server.flowlog.dropped == dropped, "nothing more lost once the sink reads"
        records = [json.loads(line) for line in lines]
        assert len(records) + dropped == short + 1
        for rec in records:
            assert_record_shape(rec)
        first = records[0]
        assert first["bytes"] == {"from_client": 64 * MiB, "to_client": 64 * MiB}
        assert first["close"] in ("client_fin", "upstream_fin")
    finally:
        await backend.close()
        await swap.close()


def read_fifo(path: Path, into: list[str]) -> None:
    with open(path, encoding="utf-8") as f:
        for line in f:
            into.append(line)


@pytest.mark.parametrize("queue_size", [65536, 16], ids=["roomy-queue", "tiny-queue"])
def test_stdout_never_read_then_sigterm_flushes_the_queue(tmp_path: Path,
                                                          queue_size: int) -> None:
    """A real process whose stdout pipe nobody reads: the 64 KiB pipe fills, records wait
    in the queue (or are dropped and counted, with a tiny queue); SIGTERM then a reader:
    everything still queued comes out before exit 0."""
    echo = EchoServer()
    cfg = plain_config(echo.port, {"sink": "stdout", "queue_size": queue_size})
    proc = ObservedProcess(write_config(tmp_path / "e.yaml", cfg))
    connections = 300  # ~150 KB of records: more than a pipe holds
    try:
        proc.wait_ready()
        short_connections(proc.ports["plain"], connections)
        admin = proc.admin
        assert admin is not None

        def all_closed() -> bool:
            return bool(http_get_sync(admin, "/status").json()["open_connections"] == 0)
        wait_until_sync(all_closed, what="connections to close")
        flow_log = http_get_sync(admin, "/status").json()["flow_log"]
        dropped = scrape_sync(admin)["enforcer_flowlog_dropped_total"][NO_LABELS]
        assert flow_log["dropped"] == dropped
        if queue_size == 65536:
            assert flow_log["queued"] > 0, "records are waiting for the blocked sink"
            assert dropped == 0
        else:  # the writer may hold the whole tiny queue in the batch it is blocked on
            assert flow_log["queued"] <= queue_size and dropped > 0

        proc.proc.send_signal(signal.SIGTERM)
        # Start reading only once the admin endpoint is gone: shutdown() closes it just
        # before the flow log's close(), so what is still queued now must be flushed there.
        wait_until_sync(lambda: not admin_answers(admin), what="the admin endpoint to close")
        proc.read_stdout()
        assert proc.wait(30) == 0
        records = proc.records()
        assert len(records) + dropped == connections
        assert len({r["flow_id"] for r in records}) == len(records)
        assert all(r["action"] == "allow" and r["close"] == "client_fin" for r in records)
        assert [r["flow_id"] for r in records] == sorted(r["flow_id"] for r in records)
    finally:
        proc.kill()
        echo.close()


def test_disk_full_is_counted_logged_once_and_relaying_goes_on(tmp_path: Path) -> None:
    """``file:/dev/full``: every write fails with ENOSPC. Records are dropped and counted,
    the error is logged once (not once per record), and connections are unaffected."""
    echo = EchoServer()
    cfg = plain_config(echo.port, {"sink": "file:/dev/full"})
    proc = ObservedProcess(write_config(tmp_path / "e.yaml", cfg))
    try:
        proc.wait_ready()
        short_connections(proc.ports["plain"], 50)
        assert proc.admin is not None
        admin = proc.admin
        wait_until_sync(lambda: scrape_sync(admin)["enforcer_flowlog_dropped_total"][
            NO_LABELS] == 50, what="50 drops")
        proc.proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 0
        errors = [line for line in proc.stderr_lines if "enforcer.flowlog" in line]
        assert len(errors) == 1, errors
        assert "writing /dev/full failed" in errors[0]
        assert "No space left on device" in errors[0]
    finally:
        proc.kill()
        echo.close()


# --------------------------------------------------------------------------- the file sink
def test_sigusr1_reopens_the_file_after_external_rotation(tmp_path: Path) -> None:
    echo = EchoServer()
    log = tmp_path / "flows.log"
    cfg = plain_config(echo.port, {"sink": f"file:{log}"}, admin=False)
    proc = ObservedProcess(write_config(tmp_path / "e.yaml", cfg))
    try:
        wait_until_sync(lambda: "plain" in proc.ports, what="bind")
        port = proc.ports["plain"]
        short_connections(port, 5)
        wait_until_sync(lambda: len(read_records(log)) == 5, what="5 records")
        rotated = tmp_path / "flows.log.1"
        log.rename(rotated)  # what logrotate does before signalling
        proc.proc.send_signal(signal.SIGUSR1)
        short_connections(port, 7)
        wait_until_sync(lambda: len(read_records(log)) == 7, what="7 records in the new file")
        proc.proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 0, "SIGUSR1 is handled (its default action kills)"
        before, after = read_records(rotated), read_records(log)
        assert (len(before), len(after)) == (5, 7)
        assert max(r["flow_id"] for r in before) < min(r["flow_id"] for r in after)
    finally:
        proc.kill()
        echo.close()


def test_sigterm_flushes_every_record_to_the_file(tmp_path: Path) -> None:
    echo = EchoServer()
    log = tmp_path / "flows.log"
    cfg = plain_config(echo.port, {"sink": f"file:{log}"}, admin=False)
    proc = ObservedProcess(write_config(tmp_path / "e.yaml", cfg))
    try:
        wait_until_sync(lambda: "plain" in proc.ports, what="bind")
        short_connections(proc.ports["plain"], 200)
        proc.proc.send_signal(signal.SIGTERM)  # right after the last close
        assert proc.wait(30) == 0
        records = read_records(log)
        assert len(records) == 200
        assert sorted(r["bytes"]["from_client"] for r in records) == sorted(
            len(f"message {i}") for i in range(200))
    finally:
        proc.kill()
        echo.close()


async def test_size_rotation_keeps_whole_lines_and_the_configured_backups(
        tmp_path: Path) -> None:
    backend = await Backend(mode="echo").start()
    log = tmp_path / "flows.log"
    try:
        cfg = plain_config(backend.port, {"sink": f"file:{log}", "max_bytes": 3000,
                                          "backups": 2})
        async with serving(cfg) as server:
            port = listener_port(server, "plain")
            for i in range(40):
                assert (await talk(port, b"r%d" % i)).received == b"r%d" % i
            await wait_until(lambda: server.flowlog.written == 40)
        files = sorted(n for n in os.listdir(tmp_path) if n.startswith("flows.log"))
        assert files == ["flows.log", "flows.log.1", "flows.log.2"]
        kept: list[dict[str, Any]] = []
        for name in ("flows.log.2", "flows.log.1", "flows.log"):
            path = tmp_path / name
            assert 0 < path.stat().st_size <= 3000
            assert path.read_bytes().endswith(b"\n")
            kept += read_records(path)  # every line parses: none was split
        ids = [r["flow_id"] for r in kept]
        assert ids == sorted(ids), "oldest file first, records in order"
        assert kept[-1]["bytes"]["from_client"] == len(b"r39")
    finally:
        await backend.close()


# --------------------------------------------------------------------------- enforcer check
def _unwritable_cases(tmp_path: Path) -> dict[str, tuple[str, str]]:
    a_file = tmp_path / "a-file"
    a_file.write_text("x")
    a_dir = tmp_path / "a-dir"
    a_dir.mkdir()
    return {
        "missing directory": (f"{tmp_path}/missing/flows.log",
                              f"cannot write flow log {tmp_path}/missing/flows.log: "
                              f"{tmp_path}/missing does not exist"),
        "parent is a file": (f"{a_file}/flows.log",
                             f"cannot write flow log {a_file}/flows.log: {a_file} is not a "
                             "directory"),
        "path is a directory": (str(a_dir),
                                f"cannot write flow log {a_dir}: it is a directory"),
        "read-only filesystem": ("/proc/enforcer-flows.log",
                                 "cannot create flow log /proc/enforcer-flows.log: cannot "
                                 "create files in /proc"),
    }


@pytest.mark.parametrize("command", ["check", "run"])  # run refuses to start as check says
@pytest.mark.parametrize("case", ["missing directory", "parent is a file",
                                  "path is a directory", "read-only filesystem"])
def test_check_and_run_reject_an_unwritable_flow_log(tmp_path: Path, case: str,
                                                     command: str) -> None:
    sink, message = _unwritable_cases(tmp_path)[case]
    cfg = plain_config(9, {"sink": f"file:{sink}"}, admin=False)
    result = subprocess.run(enforcer_cmd(command, "-c", str(write_config(tmp_path / "e.yaml",
                                                                          cfg))),
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 2, result
    assert f"flow_log.sink: {message}" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr


def test_check_accepts_a_fifo_without_reader_and_dev_full(tmp_path: Path) -> None:
    fifo = tmp_path / "flows.fifo"
    os.mkfifo(fifo)
    for sink in (str(fifo), "/dev/full", str(tmp_path / "new.log")):
        cfg = plain_config(9, {"sink": f"file:{sink}"}, admin=False)
        result = subprocess.run(enforcer_cmd("check", "-c",
                                             str(write_config(tmp_path / "e.yaml", cfg))),
                                capture_output=True, text=True, timeout=60)
        assert result.returncode == 0, result.stderr
    assert not (tmp_path / "new.log").exists(), "check creates nothing"


# --------------------------------------------------------------------------- open events
async def test_open_events_mark_the_start_of_a_long_connection(tmp_path: Path) -> None:
    backend = await Backend(mode="echo").start()
    log = tmp_path / "flows.log"
    try:
        cfg = plain_config(backend.port, {"sink": f"file:{log}", "open_events": True})
        async with serving(cfg) as server:
            port = listener_port(server, "plain")
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.write(b"first")
            assert await reader.readexactly(5) == b"first"
            await wait_until(lambda: len(read_records(log)) == 1)
            (opened,) = read_records(log)
            assert len(server.plane.active) == 1, "the connection is still open"
            assert_record_shape(opened)
            assert (opened["event"], opened["action"], opened["close"]) == ("open", "allow", None)
            assert opened["upstream"]["name"] == "app"
            assert opened["client"]["port"] == writer.get_extra_info("sockname")[1]

            writer.write(b"second")
            assert await reader.readexactly(6) == b"second"
            writer.write_eof()
            assert await reader.read() == b""
            writer.close()
            await wait_until(lambda: len(read_records(log)) == 2)
        opened, closed = read_records(log)
        assert_record_shape(closed)
        assert closed["flow_id"] == opened["flow_id"]
        assert (closed["event"], closed["close"]) == ("flow", "client_fin")
        assert closed["bytes"] == {"from_client": 11, "to_client": 11}
        assert closed["duration_s"] >= opened["duration_s"]
        assert {k: v for k, v in opened.items() if k not in ("ts", "event", "bytes",
                                                              "duration_s", "close")} == {
            k: v for k, v in closed.items() if k not in ("ts", "event", "bytes", "duration_s",
                                                         "close")}
    finally:
        await backend.close()


async def test_without_open_events_only_the_close_is_recorded(tmp_path: Path) -> None:
    backend = await Backend(mode="echo").start()
    log = tmp_path / "flows.log"
    try:
        async with serving(plain_config(backend.port, {"sink": f"file:{log}"})) as server:
            reply = await talk(listener_port(server, "plain"), b"once")
            assert reply.received == b"once"
            await wait_until(lambda: server.flowlog.written == 1)
        assert [r["event"] for r in read_records(log)] == ["flow"]
    finally:
        await backend.close()
