"""SNI passthrough compared: enforcer ``tls.mode: passthrough`` against haproxy and nginx.

    wrk (https, SNI) --TLS--> [proxy: peek the ClientHello, route by SNI] --same TLS bytes-->
        TLS backend (nginx, one port per route: api, apps, fallback)

``python -m benchmarks --passthrough`` (``make bench-passthrough``). Every contestant is one
proxy process (tree) started fresh for each measurement, with the same routing table
(``ROUTES``: two exact names, one ``*.`` name matching exactly one more label, a default
route), written in each tool's own words: enforcer ``tls.routes``, haproxy ``mode tcp`` +
``tcp-request inspect-delay`` + ``req.ssl_sni`` → ``use_backend``, nginx ``stream`` +
``ssl_preread on`` + ``map $ssl_preread_server_name``. haproxy and nginx match the ``*.``
name with an anchored regex, since their own wildcards also match deeper names.

The client's TLS session is with the backend, which the harness owns: one nginx with a
TLS server per route (ECDSA P-256, TLS 1.3 only, pinned to ``Env.suite``), so the suite,
certificate and handshake cost are the same whichever proxy is in between; the proxies
only read the ClientHello and relay bytes. The load is wrk over https with the SNI of a
``*.`` name (its Lua script resolves every name to 127.0.0.1, so no DNS entry is needed).

Workloads (``WORKLOADS``): ``sni-newconn``, a new connection per request (ClientHello
peek + route + upstream connect + the TLS handshake end to end + a 256 B response);
``sni-bulk``, 1 MiB responses over keep-alive tunnels. CPU is the proxy's own (its
processes, from /proc) over the measured window. ``direct`` (wrk straight to the
backend) is the ceiling of load tool and backend, and ``enforcer-tcp`` (enforcer relaying
plain TCP to the same backend, no peek, no routing) shows what passthrough adds to
enforcer's own per-connection work; neither is a peer.

Bytes are checked around every measurement: before it, one connection per probe name
(``PROBES``: exact, ``*.``, names the ``*.`` must not match, no SNI) must reach the
route's backend (its body compared by sha256, the backend's certificate verified for that
name); after it, the 1 MiB body through the tunnel is compared by sha256; wrk fails the
measurement on a non-2xx response, socket errors, or fewer bytes than whole bodies.

Results: ``<out>/runs/<stamp>-passthrough/results.{json,md}`` (ignored by git) and the
summary ``<out>/passthrough.{json,md}`` (``passthrough-quick.*`` for a quick run, ignored).

This module is the run and its report; ``passthrough_peers`` holds the routing table, the
TLS backend and the contestants, ``passthrough_load`` the load, the checks and the
workloads.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import shutil
import sys
import tempfile
import time
from dataclasses import asdict
from pathlib import Path

from benchmarks import results as rmod
from benchmarks.backends import BODY_SIZE
from benchmarks.contestants import Env, status_entry, tool_version
from benchmarks.load import MeasureError
from benchmarks.options import RUNS_DIR
from benchmarks.passthrough_load import (
    BY_WORKLOAD,
    WORKLOAD_NAMES,
    WORKLOADS,
    Ctx,
    Settings,
    Values,
    Workload,
    measure,
)
from benchmarks.passthrough_peers import (
    ALL,
    API_NAMES,
    APPS_GLOB,
    BULK_SIZE,
    BY_NAME,
    CONTESTANTS,
    LOAD_NAME,
    PROBES,
    PtContestant,
    start_backend,
)
from benchmarks.pki import make_pki
from benchmarks.procs import (
    Ports,
    Processes,
    StartError,
    install_signal_handlers,
    shield_cleanup,
)
from benchmarks.report import fmt, results_table

SCHEMA = "enforcer-bench-passthrough/1"


# --------------------------------------------------------------------------- the run


def _progress(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def _pick(text: str | None, known: tuple[str, ...], what: str) -> list[str]:
    if not text or text == "all":
        return list(known)
    chosen = [t.strip() for t in text.split(",") if t.strip()]
    unknown = [t for t in chosen if t not in known]
    if unknown:
        raise ValueError(f"unknown {what} {', '.join(unknown)} for --passthrough "
                         f"(known: {', '.join(known)})")
    return [k for k in known if k in chosen]


def new_doc(settings: Settings, run_dir: str, suite: str | None) -> rmod.Doc:
    return {"schema": SCHEMA, "mode": "quick" if settings.quick else "full",
            "interrupted": False, "started_at": rmod.utcnow(), "finished_at": None,
            "duration_s": None, "run_dir": run_dir, "host": rmod.host_facts(),
            "settings": {**asdict(settings), "suite": suite},
            "routing": {"exact": {"api": list(API_NAMES)}, "glob": {"apps": APPS_GLOB},
                        "default": "fallback", "probes": [list(p) for p in PROBES]},
            "backend": None, "tools": {}, "contestants": {}, "workloads": {}}


# options of the sidecar comparison that mean nothing here: refused, not ignored
NOT_HERE = (("variant", "--variant"), ("enforcer_extra", "--enforcer-extra"),
            ("netns", "--netns"), ("render", "--render"), ("defaults", "--defaults"))


def list_everything() -> int:
    for c in ALL:
        print(f"contestant {c.name:<12} {c.missing() or 'ready'}")
    for w in WORKLOADS:
        print(f"workload   {w.name:<12} ({w.title})")
    for tool in ("wrk", "nginx"):
        print(f"needs      {tool:<12} {'ready' if shutil.which(tool) else 'not installed'}")
    return 0


def run(args: argparse.Namespace) -> int:
    """``python -m benchmarks --passthrough [--quick] [--only ...] [--workloads ...]``."""
    given = [flag for attr, flag in NOT_HERE if getattr(args, attr, None)]
    if given:
        print(f"enforcer bench: {', '.join(given)} does not apply to --passthrough",
              file=sys.stderr)
        return 2
    if getattr(args, "list", False):
        return list_everything()
    try:
        chosen = [BY_NAME[n] for n in _pick(args.only, CONTESTANTS, "contestant")]
        works = [BY_WORKLOAD[n] for n in _pick(args.workloads, WORKLOAD_NAMES, "workload")]
    except ValueError as exc:
        print(f"enforcer bench: {exc}", file=sys.stderr)
        return 2
    settings = Settings.make(args.quick, args.duration, getattr(args, "repeat", 1) or 1)
    stamp = dt.datetime.now().strftime("%Y%m%d-%H%M%S") + "-passthrough" + (
        "-quick" if args.quick else "")
    out: Path = args.out
    run_dir = out / RUNS_DIR / stamp  # raw runs: an ignored folder (see .gitignore)
    doc = new_doc(settings, f"{RUNS_DIR}/{stamp}", getattr(args, "suite", None))
    started = time.monotonic()
    install_signal_handlers()
    procs = Processes()
    tmp = Path(tempfile.mkdtemp(prefix="enforcer-bench-pt-"))
    try:
        _describe(doc, chosen)
        _progress(f"enforcer bench --passthrough: {doc['mode']} run, {len(chosen)} "
                  f"contestants x {len(works)} workloads -> {run_dir}")
        env = Env(tmp, make_pki(tmp / "pki"), procs, Ports(), suite=doc["settings"]["suite"])
        _measure_all(doc, env, settings, chosen, works, started)
    except KeyboardInterrupt:
        doc["interrupted"] = True
        _progress("interrupted: stopping every process, writing partial results")
    finally:
        shield_cleanup()
        procs.stop_all()
        if getattr(args, "keep_temp", False):
            _progress(f"temp dir kept: {tmp}")
        else:
            shutil.rmtree(tmp, ignore_errors=True)
    doc["finished_at"] = rmod.utcnow()
    doc["duration_s"] = round(time.monotonic() - started, 1)
    doc["host"]["loadavg_end"] = [round(v, 2) for v in os.getloadavg()]
    paths = write_all(doc, out, run_dir)
    _progress("wrote " + ", ".join(map(str, paths)))
    if doc["interrupted"]:
        return 130
    return 1 if rmod.had_errors(doc) or doc.get("error") else 0


def _describe(doc: rmod.Doc, chosen: list[PtContestant]) -> None:
    doc["tools"]["wrk"] = {"installed": shutil.which("wrk") is not None, "apt": "wrk",
                           "version": tool_version(["wrk", "--version"], r"wrk (\S+)")}
    doc["host"]["cpu_busy_before"] = rmod.cpu_busy()
    for c in chosen:
        doc["contestants"][c.name] = status_entry(c)


def _measure_all(doc: rmod.Doc, env: Env, settings: Settings, chosen: list[PtContestant],
                 works: list[Workload], started: float) -> None:
    from benchmarks.cli import combine  # cli imports this module lazily

    for tool, role in (("wrk", "the load tool"), ("nginx", "the TLS backend")):
        if not shutil.which(tool):  # nothing to measure with: skipped, like a missing tool
            doc["skipped"] = f"{tool} not installed (apt install {tool}): it is {role}"
            _progress(doc["skipped"])
            return
    try:
        backend = start_backend(env)
    except StartError as exc:
        doc["error"] = str(exc)
        _progress(f"TLS backend failed to start: {exc}")
        return
    version = tool_version(["nginx", "-v"], r"nginx/(\S+)") or ""
    doc["backend"] = (f"nginx {version}, a TLS "
                      f"1.3 server per route (ECDSA P-256, {env.suite or 'default suites'}), "
                      f"static {BODY_SIZE} B and {BULK_SIZE >> 20} MiB files").replace("  ", " ")
    ctx = Ctx(env, settings, backend)
    ready = [c for c in chosen if doc["contestants"][c.name]["status"] == "ok"]
    for w in works:
        wdoc: rmod.Doc = {"title": w.title, "status": "ok", "params": w.params(settings),
                          "metrics": [rmod.metric_doc(m) for m in w.metrics],
                          "results": {}, "comparison": {}}
        doc["workloads"][w.name] = wdoc
        samples: dict[str, list[Values]] = {c.name: [] for c in ready}
        for _ in range(settings.repeat):  # rounds: every contestant once per round
            for c in ready:
                samples[c.name].append(_one(ctx, w, c, started))
        for c in chosen:
            skipped = doc["contestants"][c.name]
            wdoc["results"][c.name] = (combine(samples[c.name]) if c in ready else
                                       {"status": "skipped", "reason": skipped["reason"]})
        rmod.compare(wdoc, w.metrics, [c.name for c in chosen if c.is_peer])
    for name, seen in ctx.tls_seen.items():
        doc["contestants"][name]["tls"] = seen


def _one(ctx: Ctx, w: Workload, c: PtContestant, started: float) -> Values:
    t0 = time.monotonic()
    try:
        values = measure(ctx, w, c)
    except (MeasureError, StartError, OSError) as exc:
        _say(w, c, f"ERROR {str(exc).splitlines()[0]}", t0, started)
        return {"status": "error", "error": str(exc)}
    text = " · ".join(f"{m.short} {fmt(values.get(m.key))} {m.unit}".strip()
                      for m in w.metrics if values.get(m.key) is not None)
    _say(w, c, text, t0, started)
    return {"status": "ok", "values": values}


def _say(w: Workload, c: PtContestant, text: str, t0: float, started: float) -> None:
    elapsed = int(time.monotonic() - started)
    _progress(f"[{elapsed // 60}:{elapsed % 60:02d}] {w.name:<11} {c.name:<8} {text}  "
              f"({time.monotonic() - t0:.1f} s)")


# --------------------------------------------------------------------------- the report


def markdown(doc: rmod.Doc) -> str:
    mode = "quick run, indicative only" if doc["mode"] == "quick" else "full run"
    h = doc["host"]
    lines = [
        f"# enforcer SNI passthrough benchmark: {doc['started_at']} ({mode})", "",
        "wrk (https, SNI `" + LOAD_NAME + "`) → proxy (reads the ClientHello, routes by SNI, "
        "relays the TLS bytes untouched) → a TLS backend per route. Every proxy has the same "
        f"routing table: `{'`, `'.join(API_NAMES)}` → api, `{APPS_GLOB}` (one more label) → "
        "apps, anything else and no SNI → fallback. The TLS session is with the backend, "
        "the same for every proxy: "
        f"{doc.get('backend') or DASH_TEXT}. CPU is the proxy's own (all its processes and "
        "threads, from /proc) over the measured window.", "",
        f"Host: {h['cpus']} CPUs, Linux {h['kernel']}, Python {h['python']}, {h['openssl']}. "
        f"CPU busy in the second before the run: {fmt(100 * (h.get('cpu_busy_before') or 0))} "
        "% (other work on a shared machine makes absolute numbers lower and noisier; ratios "
        f"compare contestants under the same conditions). Duration: {fmt(doc['duration_s'])} s."
        + (" **Interrupted: partial results.**" if doc["interrupted"] else ""), "",
        "## Results", "",
        "↑ higher is better, ↓ lower is better; ratios are enforcer ÷ the best of haproxy and "
        "nginx in this run. Before each measurement every probe name (exact, `*.`, deeper "
        "and shorter names, no SNI) reached its route's backend (body compared by sha256); "
        "after it, 1 MiB through the tunnel was compared by sha256.", ""]
    if doc.get("skipped") or doc.get("error"):
        lines += [f"Not measured: {doc.get('skipped') or doc.get('error')}", ""]
    else:
        lines += [*results_table(doc), ""]
    lines += _spread_lines(doc)
    errors = [f"- {wn} / {cn}: {str(r.get('error', '')).splitlines()[0]}"
              for wn, w in doc["workloads"].items() for cn, r in w["results"].items()
              if r.get("status") == "error"]
    if errors:
        lines += ["## Errors", "", *errors, ""]
    lines += ["## Contestants", ""]
    for name, c in doc["contestants"].items():
        if c["status"] != "ok":
            lines.append(f"- **{name}**: skipped: {c.get('reason', '')}")
            continue
        seen = f"; TLS through it: {c['tls']}" if c.get("tls") else ""
        version = f" {c['version']}" if c.get("version") else ""
        lines.append(f"- **{name}**{version}: {c['setup']}{seen}")
    lines += ["", "## Settings", "", "```json", json.dumps(doc["settings"], indent=1), "```",
              ""]
    return "\n".join(lines)


DASH_TEXT = "not started"


def _spread_lines(doc: rmod.Doc) -> list[str]:
    """With ``--repeat N``: the lowest and highest of the N rounds behind each median."""
    rows = []
    for w in doc["workloads"].values():
        for m in w["metrics"]:
            cells = []
            for name, r in w["results"].items():
                got = [v.get(m["key"]) for v in r.get("samples", [])]
                if got and all(isinstance(x, int | float) for x in got):
                    cells.append(f"{name} {fmt(min(got))} to {fmt(max(got))}")
            if cells:
                rows.append(f"- {w['title'].split(' (')[0]}, {m['unit']}: " + ", ".join(cells))
    if not rows:
        return []
    return ["Spread over the " + str(doc["settings"]["repeat"]) + " rounds (lowest to highest; "
            "the table shows medians):", "", *rows, ""]


def write_all(doc: rmod.Doc, out: Path, run_dir: Path) -> list[Path]:
    """results.{json,md} into the run's folder; the summary passthrough.{json,md} (a quick
    run: passthrough-quick.*, ignored by git) into ``out``."""
    run_dir.mkdir(parents=True, exist_ok=True)
    text, md = json.dumps(doc, indent=2) + "\n", markdown(doc)
    (run_dir / "results.json").write_text(text)
    (run_dir / "results.md").write_text(md)
    name = "passthrough-quick" if doc["mode"] == "quick" else "passthrough"
    (out / f"{name}.json").write_text(text)
    (out / f"{name}.md").write_text(md)
    return [run_dir / "results.md", out / f"{name}.md", out / f"{name}.json"]
