"""The supervisor passes SIGHUP/SIGUSR1 on to every worker, also one it is starting at that
moment (runtime/supervisor.py ``_spawn``): a signal held while a worker is spawned is
handled once that worker is among the children. The spawn is faked (no process starts) and
the signal raised inside it, where a loaded host may deliver one."""

from __future__ import annotations

import signal
import socket
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from enforcer.config.loader import load_config
from enforcer.runtime import early_signals, supervisor
from enforcer.runtime.supervisor import Supervisor
from tests.e2e.harness import inbound_cfg
from tests.e2e.proc import write_config


class _Child:
    def __init__(self, pid: int) -> None:
        self.pid = pid


@pytest.fixture
def reserved() -> Iterator[dict[str, socket.socket]]:
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    yield {"inbound": sock}
    sock.close()


@pytest.mark.parametrize("signum", early_signals.HELD)
def test_a_signal_during_a_spawn_reaches_the_new_worker(
        pki: Any, tmp_path: Path, reserved: dict[str, socket.socket],
        monkeypatch: pytest.MonkeyPatch, signum: signal.Signals) -> None:
    cfg = load_config(str(write_config(tmp_path / "e.yaml", inbound_cfg(pki, 9, default="allow", rules=[], mode="off"))))
    metrics = tmp_path / "metrics"
    metrics.mkdir()
    sup = Supervisor(cfg, reserved, 2, str(metrics), [])
    pids = iter([4_000_001, 4_000_002])

    def popen(*args: Any, **kwargs: Any) -> _Child:
        signal.raise_signal(signum)  # held (blocked) during the spawn: pending until after
        return _Child(next(pids))

    sent: list[tuple[int, int]] = []
    monkeypatch.setattr(subprocess, "Popen", popen)
    monkeypatch.setattr(supervisor.os, "kill", lambda pid, sig: sent.append((pid, sig)))
    before = signal.signal(signum, sup._forward)
    try:
        sup._spawn(0)
        assert sent == [(4_000_001, signum)]
        sup._spawn(1)
    finally:
        signal.signal(signum, before)
    assert sent == [(4_000_001, signum), (4_000_001, signum), (4_000_002, signum)]
    assert sup.children == {4_000_001: 0, 4_000_002: 1}
