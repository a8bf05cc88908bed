"""The results document (``results.json``): building it, comparing, checking targets.

Shape (``SCHEMA``; every key is always present, values may be null):

    {"schema": "enforcer-bench/1", "mode": "quick"|"full", "interrupted": bool,
     "started_at", "finished_at" (ISO 8601 UTC), "duration_s", "run_dir",
     "host": {cpus, kernel, machine, python, openssl, nofile, loadavg_start, loadavg_end,
              cpu_busy_before (fraction of all CPUs busy in the second before the run)},
     "settings": {... every knob, the same for all contestants ...},
     "backends": {"http": str|null, "bulk": str|null},
     "tools": {name: {"installed": bool, "version": str|null, "apt": str}},
     "contestants": {name: {"status": "ok"|"skipped", "reason"?, "apt"?, "version",
                            "peer": bool, "setup": str, "tls": {...}|null}},
     "workloads": {name: {"title", "status": "ok"|"skipped", "reason"?, "apt"?,
                          "params": {...},
                          "metrics": [{key, label, short, unit, better, ratio_target, absolute_max}],
                          "results": {contestant: {"status": "ok", "values": {...},
                                                   "samples"?: [{...} per repetition]}
                                                | {"status": "skipped"|"n/a"|"error",
                                                   "reason"|"error": str}},
                          "comparison": {metric: {enforcer, best_peer, best_peer_value,
                                                  ratio, target, met}}}},
     "defaults": {"workloads": {...}} | null  (the same workloads, every tool's TLS defaults),
     "egress": {"contestants": {name: {status, reason?, apt?, version, peer,
                                       setup: {protocol: str}}},
                "workloads": {name: {... as above; results of that protocol's proxies}}}
               | null  (the egress proxies, benchmarks/egress.py),
     "targets": [{workload, metric, unit, target, enforcer, best_peer, ratio, met}],
     "micro": {"status": "ok"|"skipped", "reason"?, "benchmarks": {...}}}

With ``--repeat N`` (N > 1) every value is the median of N repetitions, taken in
interleaved rounds, and ``samples`` holds each repetition. Ratios are always enforcer's value divided by the best peer's value in the same run
(peers: haproxy, stunnel, nginx; never direct). For "higher is better" metrics a ratio
above 1 is a win; for "lower is better" (CPU, memory, latency) a ratio below 1 is.
``met`` is null when there is nothing to compare against (no peer ran).
"""

from __future__ import annotations

import datetime as dt
import os
import platform
import resource
import ssl
import time
from dataclasses import asdict
from typing import Any

from benchmarks.workloads import Metric, Settings, Workload

SCHEMA = "enforcer-bench/1"
Doc = dict[str, Any]


def utcnow() -> str:
    return dt.datetime.now(dt.UTC).isoformat(timespec="seconds").replace("+00:00", "Z")


def cpu_busy(seconds: float = 1.0) -> float:
    """Fraction of all CPUs busy over ``seconds`` (from /proc/stat), before we start."""

    def sample() -> tuple[int, int]:
        with open("/proc/stat") as f:
            fields = [int(v) for v in f.readline().split()[1:8]]
        return sum(fields), fields[3] + fields[4]  # total, idle + iowait

    total0, idle0 = sample()
    time.sleep(seconds)
    total1, idle1 = sample()
    return round(1 - (idle1 - idle0) / max(1, total1 - total0), 3)


def host_facts() -> Doc:
    return {"cpus": os.cpu_count(), "kernel": platform.release(),
            "machine": platform.machine(), "python": platform.python_version(),
            "openssl": ssl.OPENSSL_VERSION,
            "nofile": resource.getrlimit(resource.RLIMIT_NOFILE)[1],
            "loadavg_start": [round(v, 2) for v in os.getloadavg()], "loadavg_end": None,
            "cpu_busy_before": None}


def new_doc(settings: Settings, run_dir: str) -> Doc:
    return {"schema": SCHEMA, "mode": "quick" if settings.quick else "full",
            "interrupted": False, "started_at": utcnow(), "finished_at": None,
            "duration_s": None, "run_dir": run_dir, "host": host_facts(),
            "settings": asdict(settings), "backends": {"http": None, "bulk": None},
            "tools": {}, "contestants": {}, "workloads": {}, "defaults": None, "egress": None,
            "targets": [],
            "micro": {"status": "skipped", "reason": "not run", "benchmarks": {}}}


def metric_doc(m: Metric) -> Doc:
    return {"key": m.key, "label": m.label, "short": m.short, "unit": m.unit, "better": m.better,
            "ratio_target": m.ratio_target, "absolute_max": m.absolute_max}


def workload_doc(w: Workload, settings: Settings) -> Doc:
    return {"title": w.title, "status": "ok", "params": w.params(settings),
            "metrics": [metric_doc(m) for m in w.metrics], "results": {}, "comparison": {}}


def ok_values(doc: Doc, contestant: str) -> dict[str, Any] | None:
    result = doc["results"].get(contestant) or {}
    return result.get("values") if result.get("status") == "ok" else None


def target_text(m: Metric) -> str | None:
    if m.absolute_max is not None:
        return f"<= {m.absolute_max:g} {m.unit}"
    if m.ratio_target is not None:
        op = ">=" if m.better == "higher" else "<="
        return f"{op} {m.ratio_target:g}x best peer"
    return None


def compare(doc: Doc, metrics: tuple[Metric, ...], peers: list[str]) -> None:
    """Fill ``doc["comparison"]``: enforcer against the best peer, metric by metric."""
    mine = ok_values(doc, "enforcer") or {}
    for m in metrics:
        candidates = [(p, v[m.key]) for p in peers
                      if (v := ok_values(doc, p)) and v.get(m.key) is not None]
        pick = max if m.better == "higher" else min
        best = pick(candidates, key=lambda pv: pv[1]) if candidates else None
        value = mine.get(m.key)
        ratio = value / best[1] if value is not None and best and best[1] else None
        doc["comparison"][m.key] = {
            "enforcer": value, "best_peer": best[0] if best else None,
            "best_peer_value": best[1] if best else None,
            "ratio": round(ratio, 3) if ratio is not None else None,
            "target": target_text(m), "met": _met(m, value, ratio)}


def _met(m: Metric, value: float | None, ratio: float | None) -> bool | None:
    if m.absolute_max is not None:
        return None if value is None else value <= m.absolute_max
    if m.ratio_target is None or ratio is None:
        return None
    return ratio >= m.ratio_target if m.better == "higher" else ratio <= m.ratio_target


def collect_targets(doc: Doc) -> list[Doc]:
    out = []
    for name, w in doc["workloads"].items():
        for m in w["metrics"]:
            c = w["comparison"].get(m["key"])
            if c and c["target"]:
                out.append({"workload": name, "metric": m["key"], "unit": m["unit"],
                            "target": c["target"], "enforcer": c["enforcer"],
                            "best_peer": c["best_peer"], "ratio": c["ratio"], "met": c["met"]})
    return out


def tables(doc: Doc) -> list[dict[str, Doc]]:
    """The workload tables of a run: the headline one, defaults vs defaults and the egress
    proxies' if run."""
    extra = [t["workloads"] for t in (doc.get("defaults"), doc.get("egress")) if t]
    return [doc["workloads"], *extra]


def had_errors(doc: Doc) -> bool:
    return any(r.get("status") == "error" for table in tables(doc) for w in table.values()
               for r in w["results"].values())
