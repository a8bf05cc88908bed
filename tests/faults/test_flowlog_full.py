"""The flow-log file sink on a full file system, then on an unwritable file.

The log lives on a tiny tmpfs the test mounts (256 KiB, mostly taken by a filler file).
While it is full, every connection must still be relayed byte-exact; the records that do
not fit are counted in ``enforcer_flowlog_dropped_total`` and the file holds only whole
lines (a write cut short by ENOSPC is taken back). When the filler goes, the sink writes
again by itself. Then the file is rotated away and its successor made immutable
(``chattr +i``: root ignores permission bits): the sink's periodic check reopens the path,
is refused, counts what it loses, and recovers once the flag is cleared.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.e2e.harness import inbound_cfg
from tests.e2e.proc import EchoServer, EnforcerProcess, write_config
from tests.faults.peers import sha

pytestmark = [pytest.mark.faults]

BATCH = 40


@pytest.fixture
def tiny_fs(tmp_path: Path) -> Iterator[Path]:
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    where = tmp_path / "logfs"
    where.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=256k,mode=0755", "tmpfs", str(where)],
                   check=True)
    try:
        yield where
    finally:
        subprocess.run(["chattr", "-i", str(where / "flows.log")], capture_output=True)
        subprocess.run(["umount", "-l", str(where)], check=False)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _dropped(admin: int) -> float:
    import urllib.request

    with urllib.request.urlopen(f"http://127.0.0.1:{admin}/metrics", timeout=5) as r:
        text = r.read().decode()
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if s.name == "enforcer_flowlog_dropped_total":
                return float(s.value)
    raise AssertionError("no enforcer_flowlog_dropped_total")


def _roundtrips(port: int, n: int) -> None:
    for i in range(n):
        payload = os.urandom(32 * 1024 + i)
        with socket.create_connection(("127.0.0.1", port), timeout=20) as c:
            c.sendall(payload)
            c.shutdown(socket.SHUT_WR)
            got = b""
            while data := c.recv(65536):
                got += data
        assert sha(got) == sha(payload)


def _lines(path: Path) -> list[dict[str, Any]]:
    """Every line of the log, each of which must be a whole JSON record."""
    if not path.exists():
        return []
    text = path.read_bytes()
    assert not text or text.endswith(b"\n"), "the log ends in a cut line"
    return [json.loads(line) for line in text.splitlines()]


def _settle(admin: int, files: list[Path], expected: int, timeout: float = 20) -> float:
    """Wait until every record so far is either in a file or counted as dropped."""
    deadline = time.monotonic() + timeout
    while True:
        dropped = _dropped(admin)
        written = sum(len(_lines(f)) for f in files)
        if written + dropped >= expected:
            assert written + dropped == expected
            return dropped
        assert time.monotonic() < deadline, f"{written} written + {dropped} dropped of {expected}"
        time.sleep(0.1)


def test_full_then_unwritable_sink_keeps_serving_and_recovers(
        tiny_fs: Path, tmp_path: Path, pki: Any, faults_summary: Any) -> None:
    log_path = tiny_fs / "flows.log"
    filler = tiny_fs / "filler"
    with filler.open("wb") as fh:  # leave room for a dozen records or so
        fh.write(b"\0" * (256 - 12) * 1024)
    echo = EchoServer()
    admin = _free_port()
    cfg = inbound_cfg(pki, echo.port, default="allow", rules=[], mode="off")
    cfg.update({"admin": {"listen": f"127.0.0.1:{admin}"},
                "flow_log": {"sink": f"file:{log_path}", "max_bytes": 0}})
    proc = EnforcerProcess(write_config(tmp_path / "c.yaml", cfg))
    try:
        port = proc.wait_bound()["inbound"]
        _roundtrips(port, BATCH)  # the disk fills up on the way
        dropped_full = _settle(admin, [log_path], BATCH)
        assert dropped_full > 0, "the file system never filled up"
        kept_full = len(_lines(log_path))

        filler.unlink()  # space returns: the sink writes again by itself
        _roundtrips(port, BATCH)
        assert _settle(admin, [log_path], 2 * BATCH) == dropped_full
        assert len(_lines(log_path)) == kept_full + BATCH

        rotated = tiny_fs / "flows.log.1"
        log_path.rename(rotated)  # rotated away; its successor cannot be written to
        log_path.touch()
        subprocess.run(["chattr", "+i", str(log_path)], check=True)
        time.sleep(1.2)  # the sink looks at its path at most once a second
        _roundtrips(port, BATCH)
        dropped_locked = _settle(admin, [log_path, rotated], 3 * BATCH)
        assert dropped_locked >= dropped_full + BATCH - 1  # (one batch may reach the old file)
        subprocess.run(["chattr", "-i", str(log_path)], check=True)
        _roundtrips(port, BATCH)
        assert _settle(admin, [log_path, rotated], 4 * BATCH) == dropped_locked
        assert len(_lines(log_path)) == BATCH
        ids = [r["flow_id"] for f in (rotated, log_path) for r in _lines(f)]
        assert len(ids) == len(set(ids))
        assert any("writing" in line and "again" in line for line in proc.stderr_lines)
        faults_summary(f"{4 * BATCH} connections byte-exact; full disk: {dropped_full:.0f} of "
                       f"{BATCH} records dropped and counted, recovered when space returned; "
                       f"immutable file: {dropped_locked - dropped_full:.0f} dropped, recovered")
    finally:
        proc.stop()
        echo.close()
        with contextlib.suppress(OSError):
            subprocess.run(["chattr", "-i", str(log_path)], capture_output=True)
