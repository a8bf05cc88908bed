"""The workers' /status, for the supervisor's (``workers: N``).

How it works. Every worker serves no admin endpoint of its own; instead it writes the
``/status`` a single process would serve (``Server.status()``) as JSON to
``<status dir>/<pid>.json`` in the supervisor's private directory: once before it counts
as serving, then every ``INTERVAL`` seconds (written to a temporary file and renamed over,
so a reader never sees half a file). On each ``/status`` the supervisor reads the files of
its live workers (``read``) and combines them (``combine``, pure):

- the total has every key a single process has: numbers are summed (open connections,
  flow records written and dropped, memory), flags hold when they hold for every worker,
  anything else (the config's names, the materials being served) is the first worker's;
  listeners are combined by name; ``reloads`` per kind takes the newest attempt and
  success, and is an error while any worker's last reload of that kind failed;
- ``per_worker`` gives each worker's own view of what differs between workers (its
  reloads, flow log, memory, connections), with the age of its report.

The supervisor then sets what is its own (version, start, readiness, draining, bound
addresses) and lists the workers.
"""

from __future__ import annotations

import contextlib
import json
import os
import time
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any, Final

INTERVAL: Final = 1.0  # seconds between two reports of a worker
# the same in every worker (config and what it serves): not repeated per worker
STATIC: Final = frozenset({"version", "node", "listeners", "upstreams", "materials"})


# ---------------------------------------------------------------------------- worker side
def status_file(spec_text: str) -> Path | None:
    """In a worker: where to write its status (None from a supervisor that reads none)."""
    directory = json.loads(spec_text).get("status_dir")
    return Path(directory) / f"{os.getpid()}.json" if isinstance(directory, str) else None


def write(path: Path, status: Mapping[str, Any]) -> None:
    """Replace ``path`` with ``status`` as JSON, atomically."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(status, default=str))
    os.replace(tmp, path)


# ---------------------------------------------------------------------------- supervisor side
def read(directory: Path, pids: Iterable[int]) -> dict[int, tuple[dict[str, Any], float]]:
    """pid -> (its last report, age in seconds), for the workers that have reported."""
    out: dict[int, tuple[dict[str, Any], float]] = {}
    now = time.time()
    for pid in pids:
        path = directory / f"{pid}.json"
        with contextlib.suppress(OSError, ValueError):
            age = max(0.0, now - path.stat().st_mtime)
            report = json.loads(path.read_text())
            if isinstance(report, dict):
                out[pid] = (report, round(age, 3))
    return out


def per_worker(report: Mapping[str, Any] | None, age: float | None) -> dict[str, Any]:
    """What one worker reported, less what every worker has the same; {} without one."""
    if report is None:
        return {}
    out = {key: value for key, value in report.items() if key not in STATIC}
    out["status_age_s"] = age
    return out


def combine(reports: list[tuple[int, Mapping[str, Any]]]) -> dict[str, Any]:
    """The total of the workers' reports, ``(index, report)`` in index order."""
    if not reports:
        return {}
    total: dict[str, Any] = merge([report for _, report in reports])
    if any("listeners" in report for _, report in reports):
        total["listeners"] = _listeners([report.get("listeners") or [] for _, report in reports])
    if any("reloads" in report for _, report in reports):
        total["reloads"] = _reloads([(i, report.get("reloads") or {}) for i, report in reports])
    return total


def merge(values: list[Any]) -> Any:
    """Numbers summed, flags and-ed, mappings merged key by key, anything else the first."""
    present = [v for v in values if v is not None]
    if not present:
        return None
    if all(isinstance(v, bool) for v in present):
        return all(present)
    if all(isinstance(v, int | float) and not isinstance(v, bool) for v in present):
        return sum(present)
    if all(isinstance(v, Mapping) for v in present):
        keys = list(dict.fromkeys(k for v in present for k in v))
        return {k: merge([v.get(k) for v in present]) for k in keys}
    return present[0]


def _listeners(lists: list[list[Mapping[str, Any]]]) -> list[dict[str, Any]]:
    """Each listener's entries of every worker merged (connections summed), by name."""
    groups: dict[str, list[Mapping[str, Any]]] = {}
    for entries in lists:
        for entry in entries:
            groups.setdefault(str(entry.get("name")), []).append(entry)
    return [merge(group) for group in groups.values()]


def _reloads(per: list[tuple[int, Mapping[str, Any]]]) -> dict[str, Any]:
    kinds = list(dict.fromkeys(kind for _, reloads in per for kind in reloads))
    out: dict[str, Any] = {}
    for kind in kinds:
        entries = [(i, reloads[kind]) for i, reloads in per if isinstance(reloads.get(kind),
                                                                          Mapping)]
        attempts = [e["last_attempt"] for _, e in entries if e.get("last_attempt")]
        oks = [e["last_ok"] for _, e in entries if e.get("last_ok")]
        errors = [f"worker {i}: {e['last_error']}" for i, e in entries if e.get("last_error")]
        files = list(dict.fromkeys(f for _, e in entries for f in e.get("files") or ()))
        out[kind] = {
            # ISO 8601 UTC timestamps of one format: the greatest string is the newest
            "last_attempt": max(attempts, default=None), "last_ok": max(oks, default=None),
            "last_error": "; ".join(errors) or None,
            "result": None if not attempts else ("error" if errors else "ok"),
            "files": files}
    return out
