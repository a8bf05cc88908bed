"""workerstatus.combine: the supervisor's /status from its workers' reports."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from enforcer.runtime import workerstatus


def _reload(attempt: str | None, ok: str | None, error: str | None,
            files: list[str]) -> dict[str, Any]:
    return {"last_attempt": attempt, "last_ok": ok, "last_error": error,
            "result": None if attempt is None else ("error" if error else "ok"), "files": files}


def _report(open_connections: int, written: int, tls: dict[str, Any],
            session_cache: dict[str, int] | None = None) -> dict[str, Any]:
    return {
        "version": "0.1.0", "ready": True, "draining": False,
        "open_connections": open_connections, "relay": "native",
        "listeners": [{"name": "a", "open_connections": open_connections, "tls": "off",
                       "session_cache": session_cache},
                      {"name": "b", "open_connections": 1, "tls": "terminate",
                       "session_cache": None}],
        "reloads": {"tls": tls, "rulesets": _reload(None, None, None, [])},
        "flow_log": {"sink": "file", "path": "/x", "queued": 1, "written": written,
                     "dropped": 0},
        "memory": {"rss_bytes": 100, "heap_trim": True},
    }


def test_numbers_add_up_and_names_are_kept() -> None:
    ok = _reload("2026-12-07T10:00:00.000000Z", "2026-12-07T10:00:00.000000Z", None, ["/c"])
    total = workerstatus.combine([(0, _report(3, 10, ok)), (1, _report(4, 5, ok))])
    assert total["open_connections"] == 7 and total["relay"] == "native"
    assert total["flow_log"] == {"sink": "file", "path": "/x", "queued": 2, "written": 15,
                                 "dropped": 0}
    assert total["memory"] == {"rss_bytes": 200, "heap_trim": True}
    assert total["listeners"] == [
        {"name": "a", "open_connections": 7, "tls": "off", "session_cache": None},
        {"name": "b", "open_connections": 2, "tls": "terminate", "session_cache": None}]
    assert total["ready"] is True and total["draining"] is False
    assert total["reloads"]["tls"] == ok
    assert total["reloads"]["rulesets"] == _reload(None, None, None, [])


def test_a_reload_that_failed_in_one_worker_is_an_error_with_the_newest_times() -> None:
    early_ok = _reload("2026-12-07T10:00:00.000000Z", "2026-12-07T10:00:00.000000Z", None,
                       ["/c"])
    late_error = _reload("2026-12-07T11:00:00.000000Z", "2026-12-07T09:00:00.000000Z",
                         "tls.mesh.cert: expired", ["/c", "/k"])
    total = workerstatus.combine([(0, _report(0, 0, early_ok)), (1, _report(0, 0, late_error))])
    assert total["reloads"]["tls"] == {
        "last_attempt": "2026-12-07T11:00:00.000000Z",
        "last_ok": "2026-12-07T10:00:00.000000Z",
        "last_error": "worker 1: tls.mesh.cert: expired", "result": "error",
        "files": ["/c", "/k"]}


def test_session_caches_add_up_and_flags_hold_only_for_all() -> None:
    ok = _reload(None, None, None, [])
    one, two = _report(0, 0, ok, {"sessions": 2, "bound": 10}), _report(0, 0, ok)
    two["memory"]["heap_trim"] = False
    total = workerstatus.combine([(0, one), (1, two)])
    assert total["listeners"][0]["session_cache"] == {"sessions": 2, "bound": 10}
    assert total["memory"]["heap_trim"] is False
    assert workerstatus.combine([]) == {}


def test_per_worker_leaves_out_what_every_worker_shares() -> None:
    report = _report(1, 2, _reload(None, None, None, []))
    mine = workerstatus.per_worker(report, 0.5)
    assert "listeners" not in mine and "version" not in mine
    assert mine["flow_log"]["written"] == 2 and mine["status_age_s"] == 0.5
    assert workerstatus.per_worker(None, None) == {}


def test_reports_are_written_whole_and_read_back(tmp_path: Path) -> None:
    spec = json.dumps({"status_dir": str(tmp_path)})
    path = workerstatus.status_file(spec)
    assert path == tmp_path / f"{os.getpid()}.json"
    workerstatus.write(path, {"open_connections": 3})
    (tmp_path / "999999999.json").write_text("{half")  # never read: not a live worker's
    read = workerstatus.read(tmp_path, [os.getpid(), 12345])
    assert list(read) == [os.getpid()]
    assert read[os.getpid()][0] == {"open_connections": 3} and read[os.getpid()][1] >= 0
    (tmp_path / "12345.json").write_text("{half")
    assert list(workerstatus.read(tmp_path, [12345])) == []
    assert workerstatus.status_file(json.dumps({})) is None
