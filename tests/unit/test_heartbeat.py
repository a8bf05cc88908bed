"""The event-loop heartbeat behind /healthz: the pure verdict, the stamp file a worker
writes for its supervisor, the admin endpoint's answers and the config key."""

from __future__ import annotations

import asyncio
import http.client
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from enforcer.config.errors import ConfigError
from enforcer.config.loader import parse_config
from enforcer.config.model import Address
from enforcer.observe.admin import AdminServer
from enforcer.observe.heartbeat import STAMP, Heartbeat, read_stamp, verdict
from enforcer.observe.metrics import NullMetrics


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_verdict_names_every_loop_that_stalled() -> None:
    assert verdict({"a": 95.0, "b": 99.0}, 100.0, 10.0) == (True, "ok")
    assert verdict({}, 100.0, 10.0) == (True, "ok")
    healthy, text = verdict({"worker 0": 80.0, "worker 1": 99.0, "worker 2": None}, 100.0, 10)
    assert not healthy
    assert text == ("stalled: worker 0 has not turned for 20.0s; worker 2 has not turned yet "
                    "(admin.stall_timeout 10s)")


def test_a_heartbeat_fails_after_the_stall_time_and_recovers_with_a_beat() -> None:
    clock = Clock()
    hb = Heartbeat(4.0, clock=clock)
    assert hb.interval == 1.0 and Heartbeat(2.0).interval == 0.5
    assert hb.check() == (True, "ok")
    clock.now += 4.0
    assert hb.check()[0], "exactly the stall time is still healthy"
    clock.now += 0.5
    assert hb.check() == (False, "stalled: the event loop has not turned for 4.5s "
                                 "(admin.stall_timeout 4s)")
    hb.beat()
    assert hb.check() == (True, "ok")


async def test_the_running_task_keeps_stamping() -> None:
    hb = Heartbeat(1.0)
    first = hb.last
    task = asyncio.get_running_loop().create_task(hb.run())
    try:
        await asyncio.sleep(0.6)
        assert hb.last > first
        assert hb.check() == (True, "ok")
    finally:
        task.cancel()


def test_a_published_heartbeat_is_read_from_its_file(tmp_path: Path) -> None:
    clock = Clock()
    hb = Heartbeat(5.0, clock=clock)
    path = tmp_path / "1234"
    assert read_stamp(path) is None
    hb.publish_to(path)
    assert read_stamp(path) == 1000.0
    assert not (tmp_path / "1234.tmp").exists(), "renamed into place"
    clock.now = 1003.5
    hb.beat()
    assert read_stamp(path) == 1003.5
    assert path.stat().st_size == STAMP.size
    hb.close()
    clock.now = 1010.0
    hb.beat()  # closed: the file keeps the last stamp
    assert read_stamp(path) == 1003.5
    (tmp_path / "short").write_bytes(b"\x01\x02")
    assert read_stamp(tmp_path / "short") is None


def _get(server: AdminServer, path: str) -> tuple[int, bytes]:
    conn = http.client.HTTPConnection(server.bound.host, server.bound.port, timeout=5)
    try:
        conn.request("GET", path)
        resp = conn.getresponse()
        return resp.status, resp.read()
    finally:
        conn.close()


@pytest.mark.parametrize(("health", "code", "body"), [
    (lambda: (True, "ok"), 200, b"ok\n"),
    (lambda: (False, "stalled: the event loop has not turned for 12.0s"), 503,
     b"stalled: the event loop has not turned for 12.0s\n"),
    (lambda: 1 / 0, 503, b"health check failed: ZeroDivisionError: division by zero\n"),
])
def test_healthz_answers_what_the_health_check_says(health: Any, code: int,
                                                    body: bytes) -> None:
    server = AdminServer(Address("127.0.0.1", 0), NullMetrics(), status=dict,
                         ready=lambda: True, health=health)
    server.start()
    try:
        assert _get(server, "/healthz") == (code, body)
        assert _get(server, "/readyz") == (200, b"ready\n"), "readiness is its own check"
    finally:
        server.close()


def _cfg(admin: dict[str, Any]) -> dict[str, Any]:
    return {"version": 1, "node": {"name": "n"},
            "listeners": [{"name": "l", "listen": "127.0.0.1:0", "tls": {"mode": "off"},
                           "ruleset": "r", "upstream": "u"}],
            "upstreams": {"u": {"address": "127.0.0.1:9"}},
            "rulesets": {"r": {"default": "allow"}}, "admin": admin}


def test_stall_timeout_config_key() -> None:
    assert parse_config(_cfg({"listen": "127.0.0.1:0"})).admin.stall_timeout == 10.0
    assert parse_config(_cfg({"listen": "127.0.0.1:0", "stall_timeout": "30s"})
                        ).admin.stall_timeout == 30.0
    with pytest.raises(ConfigError) as err:
        parse_config(_cfg({"listen": "127.0.0.1:0", "stall_timeout": "500ms"}))
    assert "admin.stall_timeout" in str(err.value) and "at least 1s" in str(err.value)
    with pytest.raises(ConfigError) as err:
        parse_config(_cfg({"stall_timeout": "soon"}))
    assert "admin.stall_timeout" in str(err.value)


def test_stamps_are_one_clock_across_processes(tmp_path: Path) -> None:
    """CLOCK_MONOTONIC is system-wide: another process's stamp is comparable with ours."""
    path = tmp_path / "child"
    before = time.monotonic()
    subprocess.run([sys.executable, "-c", "import sys; from pathlib import Path; "
                    "from enforcer.observe.heartbeat import Heartbeat; "
                    "Heartbeat(5.0).publish_to(Path(sys.argv[1]))", str(path)], check=True)
    stamp = read_stamp(path)
    assert stamp is not None and before <= stamp <= time.monotonic()
