"""/healthz follows the event loop: a wedged loop (one process) or a stopped worker (under
a supervisor) turns it 503 after ``admin.stall_timeout``, and it recovers when the loop
turns again."""

from __future__ import annotations

import json
import os
import signal
import socket
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

from tests.e2e.harness import Backend, inbound_cfg
from tests.e2e.observe_util import admin_port, http_get, serving, wait_until
from tests.e2e.proc import EchoServer, EnforcerProcess, write_config

STALL = "1s"


def _plain(backend_port: int) -> dict[str, Any]:
    return {"version": 1, "node": {"name": "hb"},
            "listeners": [{"name": "plain", "listen": "127.0.0.1:0", "tls": {"mode": "off"},
                           "ruleset": "open", "upstream": "app"}],
            "upstreams": {"app": {"address": f"127.0.0.1:{backend_port}"}},
            "rulesets": {"open": {"default": "allow"}}, "flow_log": {"sink": "off"},
            "admin": {"listen": "127.0.0.1:0", "stall_timeout": STALL}}


def _get(port: int, path: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=5) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode()


async def test_a_wedged_event_loop_makes_healthz_503(tmp_path: Path) -> None:
    backend = await Backend(mode="echo").start()
    try:
        async with serving(_plain(backend.port)) as server:
            port = admin_port(server)
            assert (await http_get(port, "/healthz")).body == b"ok\n"
            seen: list[tuple[int, str]] = []

            def probe() -> None:  # on its own thread: the loop below is wedged
                time.sleep(1.8)
                seen.append(_get(port, "/healthz"))
                seen.append(_get(port, "/readyz"))

            prober = threading.Thread(target=probe)
            prober.start()
            time.sleep(2.5)  # noqa: ASYNC251 - the point: this blocks the server's loop
            prober.join(10)
            code, body = seen[0]
            assert code == 503, seen
            assert body.startswith("stalled: the event loop has not turned for ")
            assert body.endswith("s (admin.stall_timeout 1s)\n")
            assert seen[1] == (200, "ready\n"), "readiness does not follow the heartbeat"
            # the loop turns again: the next beat makes it healthy
            await wait_until(lambda: _get(port, "/healthz") == (200, "ok\n"))
    finally:
        await backend.close()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _wait(cond: Any, timeout: float = 15) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, "condition not met in time"
        time.sleep(0.05)


def test_a_stopped_worker_makes_the_supervisors_healthz_503(tmp_path: Path, pki: Any) -> None:
    echo = EchoServer()
    port = _free_port()
    cfg = inbound_cfg(pki, echo.port, default="allow", rules=[], mode="off")
    cfg.update({"workers": 2, "admin": {"listen": f"127.0.0.1:{port}", "stall_timeout": STALL}})
    proc = EnforcerProcess(write_config(tmp_path / "w.yaml", cfg))
    stopped = 0
    try:
        proc.wait_bound()
        _wait(lambda: _get(port, "/readyz")[0] == 200)
        assert _get(port, "/healthz") == (200, "ok\n")
        workers = json.loads(_get(port, "/status")[1])["workers"]
        stopped = workers[1]["pid"]
        os.kill(stopped, signal.SIGSTOP)  # its loop stops turning; the supervisor's does not
        _wait(lambda: _get(port, "/healthz")[0] == 503)
        code, body = _get(port, "/healthz")
        assert code == 503
        assert body.startswith(f"stalled: worker 1 (pid {stopped}) has not turned for "), body
        assert "worker 0" not in body
        os.kill(stopped, signal.SIGCONT)
        stopped = 0
        _wait(lambda: _get(port, "/healthz") == (200, "ok\n"))
        proc.proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 0, "\n".join(proc.stderr_lines)
    finally:
        if stopped:
            os.kill(stopped, signal.SIGCONT)
        proc.stop()
        echo.close()
