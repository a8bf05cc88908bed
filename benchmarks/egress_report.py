"""The "Egress proxies" section of a report (``doc["egress"]``, see ``benchmarks.egress``).

One table: a row per (workload, metric), a column per egress contestant (enforcer, dante,
tinyproxy, squid), "n/a" where a contestant does not speak the workload's protocol, and
enforcer's ratio to the best peer of the same protocol in the same run. No targets: the
egress table compares, it does not gate.
"""

from __future__ import annotations

from typing import Any

from benchmarks.egress import NAMES, SOCKS5, label_title
from benchmarks.results import Doc

DASH = "\u2013"
TIMES = "\u00d7"


def _fmt(value: Any) -> str:
    from benchmarks.report import fmt

    return fmt(value)


def _cell(result: dict[str, Any] | None, key: str) -> str:
    if not result:
        return "n/a"
    status = result.get("status")
    if status == "ok":
        return _fmt(result["values"].get(key))
    return {"skipped": "skipped", "n/a": "n/a", "error": "**error**"}.get(str(status), DASH)


def _ratio(c: dict[str, Any] | None) -> str:
    if not c or c.get("ratio") is None:
        return DASH
    return f"{c['ratio']:.2f}{TIMES} ({c['best_peer']})"


def table(egress: Doc) -> list[str]:
    names = [n for n in NAMES if n in egress["contestants"]]
    lines = ["| workload | metric | " + " | ".join(names) + " | enforcer ÷ best peer |",
             "|---|---|" + "---:|" * len(names) + "---|"]
    for w in egress["workloads"].values():
        for i, m in enumerate(w["metrics"]):
            cells = [_cell(w["results"].get(n), m["key"]) for n in names]
            label = f"{m.get('short') or ''} {m['unit']}".strip()
            arrow = "↑" if m["better"] == "higher" else "↓"
            lines.append(f"| {w['title'] if i == 0 else ''} | {label} {arrow} | "
                         + " | ".join(cells) + f" | {_ratio(w['comparison'].get(m['key']))} |")
    return lines


def _notes(egress: Doc) -> list[str]:
    out = []
    for w in egress["workloads"].values():
        for name, r in w["results"].items():
            if r.get("status") in ("n/a", "skipped") and r.get("reason"):
                out.append(f"- {w['title']}, {name}: {r['status']}: {r['reason']}")
    return out


def _contestants(egress: Doc) -> list[str]:
    out = []
    for name in NAMES:
        c = egress["contestants"].get(name)
        if c is None:
            continue
        if c["status"] != "ok":
            out.append(f"- **{name}**: skipped: {c.get('reason', '')}")
            continue
        version = f" {c['version']}" if c.get("version") else ""
        for protocol, setup in c["setup"].items():
            out.append(f"- **{name}**{version} ({label_title(protocol)}): {setup}")
    return out


def section(doc: Doc) -> list[str]:
    """The markdown lines of the egress section; none when the run had no egress table."""
    egress = doc.get("egress")
    if not egress or not egress.get("workloads"):
        return []
    socks = any(w["params"]["protocol"] == SOCKS5 for w in egress["workloads"].values())
    return ["## Egress proxies", "",
            "One proxy process per contestant, started fresh for each measurement: the "
            "egress load tool (`benchmarks/egress_load.py`, its own process) speaks "
            + ("SOCKS5 or " if socks else "") + "HTTP CONNECT itself and asks each proxy "
            "for the HTTP backend by IPv4 address; no login unless the workload says so; "
            "every response body checked by sha256. New connections: handshake + CONNECT + "
            "`GET` of the 256 B file with `Connection: close`, 32 at a time; bulk: one "
            "tunnel, keep-alive `GET` of the 16 MiB file back to back. CPU is the proxy's "
            "own (every process and thread, from /proc), over the measured window. Ratios "
            "are enforcer ÷ the best peer of the same protocol in this run.", "",
            *table(egress), "", *_notes(egress), *([""] if _notes(egress) else []),
            *_contestants(egress), ""]
