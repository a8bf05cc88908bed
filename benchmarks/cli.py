"""``python -m benchmarks`` / ``make bench`` / ``enforcer bench``: the whole comparison.

Order of a run: certificates, the shared HTTP backend, then workload by workload, every
contestant in turn on a freshly started pair (interleaving contestants within a workload
keeps slow drifts of a shared machine from favouring whoever ran first), then the egress
proxies' workloads the same way (``benchmarks.egress``: one proxy process per contestant,
a table of their own), then the micro-benchmarks, then results.json / results.md / charts
into a run directory (``<out>/runs/<stamp>/``, ignored by git) and the summary, latest.json
/ latest.md / latest.png, into ``<out>`` (the only results the repository keeps; a run of
only the egress proxies writes egress.json / egress.md instead). Progress goes to stderr
as it runs.

Cleanup: every child is in ``Processes``; the ``finally`` block stops them all and removes
the temp dir, on success, on error and on Ctrl-C/SIGTERM (which also write the partial
results, marked ``interrupted``). Exit code: 0 done, 1 some measurement failed (see the
report), 2 bad usage, 130 interrupted.
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import re
import resource
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import yaml

from benchmarks import contestants as cmod
from benchmarks import egress as emod
from benchmarks import results as rmod
from benchmarks import transparent
from benchmarks import workloads as wmod
from benchmarks.backends import BODY_SIZE, BULK_SIZE, start_http
from benchmarks.contestants import Contestant, Env, tool_version
from benchmarks.load import MeasureError
from benchmarks.micro import run_micro
from benchmarks.options import (
    CONTESTANTS,
    EGRESS_CONTESTANTS,
    EGRESS_WORKLOADS,
    RUNS_DIR,
    WORKLOADS,
    add_arguments,
)
from benchmarks.pki import make_pki
from benchmarks.procs import (
    Ports,
    Processes,
    StartError,
    install_signal_handlers,
    shield_cleanup,
)
from benchmarks.report import fmt, render, write_all

TOOLS = {"iperf3": (["iperf3", "--version"], r"iperf (\S+)"),
         "wrk": (["wrk", "--version"], r"wrk (\S+)"),
         "openssl": (["openssl", "version"], r"OpenSSL (\S+)")}


class UsageError(Exception):
    pass


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m benchmarks",
        description="Benchmark enforcer against haproxy, stunnel and nginx as a sidecar pair.")
    add_arguments(p)
    return p


def _pick(text: str | None, known: Sequence[str], what: str) -> list[str]:
    if not text or text == "all":
        return list(known)
    chosen = [t.strip() for t in text.split(",") if t.strip()]
    unknown = [t for t in chosen if t not in known]
    if unknown:
        raise UsageError(f"unknown {what} {', '.join(unknown)} (known: {', '.join(known)})")
    return [k for k in known if k in chosen]


def _progress(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def raise_nofile() -> int:
    """Soft RLIMIT_NOFILE up to the hard limit (children inherit it); returns the limit."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return hard


def idle_cap(nofile: int) -> int:
    """Largest idle N whose 2 sockets per connection fit one proxy process's fd limit."""
    return max(100, (nofile - 600) // 2 // 100 * 100)


def list_everything() -> int:
    for c in cmod.ALL:
        print(f"contestant {c.name:<9} {c.missing() or 'ready'}")
    for w in wmod.WORKLOADS:
        print(f"workload   {w.name:<11} {w.missing_tool() or 'ready'}  ({w.title})")
    for proxy in (emod.Dante(), emod.Tinyproxy(), emod.Squid()):
        print(f"egress     {proxy.name:<11} {proxy.missing() or 'ready'}  "
              f"({emod.label_title(proxy.protocol)})")
    for e in emod.WORKLOADS:
        print(f"workload   {e.name:<11} ready  ({e.title})")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return run(args)


def run(args: argparse.Namespace) -> int:
    if getattr(args, "passthrough", False):
        from benchmarks import passthrough  # its own contestants, workloads and report

        return passthrough.run(args)
    if args.list:
        return list_everything()
    if getattr(args, "render", None):
        if not (args.render / "results.json").is_file():
            print(f"enforcer bench: {args.render}: no results.json there", file=sys.stderr)
            return 2
        for path in render(args.render):
            _progress(f"wrote {path}")
        return 0
    if getattr(args, "netns", False) and not transparent.in_private_netns():
        transparent.reexec_in_netns(transparent.harness_argv(sys.argv[1:]))
    try:
        names = _pick(args.only, CONTESTANTS + EGRESS_CONTESTANTS, "contestant")
        chosen = [cmod.BY_NAME[n] for n in names if n in cmod.BY_NAME]
        chosen += _variants(getattr(args, "variant", None) or [])
        chosen += _checkouts(getattr(args, "enforcer_at", None) or [])
        if getattr(args, "netns", False):
            chosen += [transparent.NatHooksEnforcer(), transparent.TransparentEnforcer()]
        picked = _pick(_expand_egress(args.workloads), WORKLOADS + EGRESS_WORKLOADS,
                       "workload")
        works = [wmod.BY_NAME[n] for n in picked if n in wmod.BY_NAME] if chosen else []
        chosen = chosen if works else []  # only egress proxies: no pair to describe
        egress = [emod.BY_NAME[n] for n in picked if n in emod.BY_NAME]
        extra = _load_extra(args.enforcer_extra)
    except UsageError as exc:
        print(f"enforcer bench: {exc}", file=sys.stderr)
        return 2
    settings = wmod.Settings.make(args.quick, args.duration, idle_cap(raise_nofile()),
                                  getattr(args, "repeat", 1) or 1)
    stamp = dt.datetime.now().strftime("%Y%m%d-%H%M%S") + ("-quick" if args.quick else "")
    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)
    run_dir = out / RUNS_DIR / stamp  # raw runs: an ignored folder (see .gitignore)
    doc = rmod.new_doc(settings, f"{RUNS_DIR}/{stamp}")
    doc["settings"]["enforcer_extra"] = extra  # merged into every enforcer config
    runner = Runner(doc, settings, chosen, works, extra, args)
    runner.add_egress(egress, set(names))
    return runner.go(out, run_dir)


def _expand_egress(text: str | None) -> str | None:
    """``--workloads`` with ``egress`` standing for every egress workload."""
    if not text or text == "all":
        return text
    parts = [t.strip() for t in text.split(",")]
    return ",".join(n for t in parts for n in (EGRESS_WORKLOADS if t == "egress" else (t,)))


def _load_extra(path: Path | None, option: str = "--enforcer-extra") -> dict[str, Any]:
    if path is None:
        return {}
    try:
        data = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError) as exc:
        raise UsageError(f"{option} {path}: {exc}") from None
    if not isinstance(data, dict):
        raise UsageError(f"{option} {path}: must be a YAML mapping")
    return data


def _named(spec: str, option: str, value: str) -> tuple[str, str]:
    """NAME=VALUE of a column option, NAME usable in a column's name."""
    name, sep, rest = spec.partition("=")
    if not sep or not re.fullmatch(r"[a-z0-9][a-z0-9_.-]{0,30}", name):
        raise UsageError(f"{option} {spec!r}: use NAME={value}, NAME in a-z 0-9 . _ -")
    return name, rest


def _checkouts(specs: list[str]) -> list[Contestant]:
    out: list[Contestant] = []
    for spec in specs:
        name, directory = _named(spec, "--enforcer-at", "DIR")
        checkout = Path(directory).resolve()
        if not (checkout / "enforcer" / "__init__.py").is_file():
            raise UsageError(f"--enforcer-at {spec!r}: {checkout} is not an enforcer checkout")
        out.append(cmod.Enforcer(name, checkout=checkout))
    return out


def _variants(specs: list[str]) -> list[Contestant]:
    out: list[Contestant] = []
    for spec in specs:
        name, file = _named(spec, "--variant", "FILE.yaml")
        out.append(cmod.Enforcer(name, _load_extra(Path(file), "--variant")))
    if len({c.name for c in out}) < len(out):
        raise UsageError("--variant: names must differ")
    return out


def combine(samples: list[dict[str, Any]]) -> dict[str, Any]:
    """One result from the repetitions: the first failure, else the median of each value.

    With one repetition the result is the sample itself; with more, ``samples`` keeps
    every repetition's values so the spread can be seen.
    """
    failed = [s for s in samples if s["status"] != "ok"]
    if failed or len(samples) == 1:
        return failed[0] if failed else samples[0]
    keys = samples[0]["values"].keys()
    values = {}
    for key in keys:
        column = [s["values"][key] for s in samples]
        numbers = [v for v in column if isinstance(v, int | float) and not isinstance(v, bool)]
        values[key] = _median(numbers) if len(numbers) == len(column) else column[0]
    return {"status": "ok", "values": values, "samples": [s["values"] for s in samples]}


def _median(numbers: list[Any]) -> float | int:
    middle = statistics.median(numbers)
    if all(isinstance(n, int) for n in numbers) and float(middle).is_integer():
        return int(middle)
    return round(float(middle), 3)


class Runner:
    def __init__(self, doc: rmod.Doc, settings: wmod.Settings, chosen: list[Contestant],
                 works: list[wmod.Workload], extra: dict[str, Any],
                 args: argparse.Namespace) -> None:
        self.doc, self.settings, self.chosen, self.works = doc, settings, chosen, works
        self.extra, self.args = extra, args
        self.started = time.monotonic()
        self.ready = [c for c in chosen if not c.missing()]
        self.repeat = settings.repeat
        self.suite: str = getattr(args, "suite", None) or cmod.HEADLINE_SUITE
        self.defaults = not getattr(args, "no_defaults", False) and (
            not settings.quick or getattr(args, "defaults", False))
        self.done = 0
        self.total = len(self.ready) * len(works) * self.repeat * (2 if self.defaults else 1)
        self.http: Any = None  # the HTTP backend, once started
        self.egress: list[emod.EgressWorkload] = []
        self.egress_only: set[str] = set()

    def add_egress(self, works: list[emod.EgressWorkload], names: set[str]) -> None:
        """The egress workloads to measure after the pair's, for the contestants named."""
        self.egress, self.egress_only = works, names
        for w in works:
            ready = [c for c in emod.contestants(w.protocol, names) if not c.missing()
                     and not (w.login and c.no_login())]
            self.total += len(ready) * self.repeat

    def go(self, out: Path, run_dir: Path) -> int:
        install_signal_handlers()
        procs = Processes()
        tmp = Path(tempfile.mkdtemp(prefix="enforcer-bench-"))
        self._header(run_dir)
        try:
            env = Env(tmp, make_pki(tmp / "pki"), procs, Ports(), self.extra)
            self._measure_all(env)
            self._measure_egress(env)
            if not self.args.no_micro and self.works:
                self.doc["micro"] = run_micro(self.settings.quick, _progress)
        except KeyboardInterrupt:
            self.doc["interrupted"] = True
            _progress("interrupted: stopping every process, writing partial results")
        finally:
            shield_cleanup()
            procs.stop_all()
            if self.args.keep_temp:
                _progress(f"temp dir kept: {tmp}")
            else:
                shutil.rmtree(tmp, ignore_errors=True)
        return self._finish(out, run_dir)

    def _header(self, run_dir: Path) -> None:
        self._describe_tools()
        self._describe_contestants()
        mode = "quick" if self.settings.quick else "full"
        what = (f"{len(self.ready)} contestants x {len(self.works)} workloads"
                if self.works else "egress proxies only")
        if self.works and self.egress:
            what += f", then {len(self.egress)} egress workloads"
        _progress(f"enforcer bench: {mode} run, {what} -> {run_dir}")
        for name, c in self.doc["contestants"].items():
            state = c.get("reason") or c.get("version") or "ready"
            _progress(f"  {name:<9} {state}")
        shown = {"enforcer"} if self.doc["contestants"] else set()
        for w in self.egress:
            for proxy in emod.contestants(w.protocol, self.egress_only):
                if proxy.name not in shown:
                    shown.add(proxy.name)
                    _progress(f"  {proxy.name:<9} {proxy.missing() or proxy.version() or 'ready'}"
                              " (egress)")
        busy = self.doc["host"]["cpu_busy_before"] = rmod.cpu_busy()
        if busy > 0.2:
            _progress(f"  warning: the machine is busy ({busy:.0%} of CPU in use before the "
                      "run): absolute numbers will be low and noisy; ratios within this run "
                      "still compare like with like")

    def _describe_tools(self) -> None:
        for name, (argv, pattern) in TOOLS.items():
            installed = shutil.which(name) is not None
            self.doc["tools"][name] = {
                "installed": installed, "apt": name,
                "version": tool_version(argv, pattern) if installed else None}

    def _describe_contestants(self) -> None:
        for c in self.chosen:
            self.doc["contestants"][c.name] = cmod.status_entry(c)

    def _measure_all(self, env: Env) -> None:
        """The headline table (every pair on one TLS 1.3 suite), then, unless skipped, the
        same workloads with every tool's own TLS defaults (a second table)."""
        http = self._start_http(env)
        self.doc["settings"]["suite"] = env.suite = self.suite
        ctx = wmod.Ctx(env, self.settings, http)
        for w in self.works:
            self._workload(ctx, w, self.doc["workloads"])
        for name, seen in ctx.tls_seen.items():
            self.doc["contestants"][name]["tls"] = seen
        if not self.defaults or not self.works:
            return
        env.suite = None
        self.doc["defaults"] = {"workloads": {}}
        ctx = wmod.Ctx(env, self.settings, http)
        _progress("defaults vs defaults: every tool's own TLS choices")
        for w in self.works:
            self._workload(ctx, w, self.doc["defaults"]["workloads"])
        for name, seen in ctx.tls_seen.items():
            self.doc["contestants"][name]["tls_defaults"] = seen

    def _start_http(self, env: Env) -> Any:
        if not any(w.backend == "http" for w in self.works) and not self.egress:
            return None
        if self.http is not None:
            return self.http
        try:
            http = start_http(env)
        except StartError as exc:
            self.http_error = str(exc)
            _progress(f"HTTP backend failed to start: {exc}")
            return None
        version = tool_version(["nginx", "-v"], r"nginx/(\S+)") if http.kind == "nginx" else ""
        self.doc["backends"]["http"] = (
            f"{http.kind} {version}".strip() + f", one static {BODY_SIZE} B file "
            f"(and a {BULK_SIZE // 2**20} MiB one for the egress bulk workloads), "
            "keep-alive without a request cap")
        self.http = http
        return http

    def _workload(self, ctx: wmod.Ctx, w: wmod.Workload, table: dict[str, Any]) -> None:
        doc = rmod.workload_doc(w, self.settings)
        table[w.name] = doc
        reason = w.missing_tool()
        if reason is None and w.backend == "http" and ctx.http is None:
            reason = getattr(self, "http_error", "HTTP backend not running")
        if reason:
            doc.update(status="skipped", reason=reason, apt=" ".join(w.tools) or None)
            self.done += len(self.ready) * self.repeat
            _progress(f"{w.name}: skipped: {reason}")
            return
        if w.backend == "iperf3":
            self.doc["backends"]["bulk"] = "iperf3 -s, started fresh for each measurement"
        samples: dict[str, list[dict[str, Any]]] = {c.name: [] for c in self.chosen}
        for _ in range(self.repeat):  # rounds: every contestant once per round
            for c in self.chosen:
                samples[c.name].append(self._one(ctx, w, c))
        for c in self.chosen:
            doc["results"][c.name] = combine(samples[c.name])
        peers = [c.name for c in self.chosen if c.is_peer]
        rmod.compare(doc, w.metrics, peers)
        self._say_comparison(w, doc)

    def _one(self, ctx: wmod.Ctx, w: wmod.Workload, c: Contestant) -> dict[str, Any]:
        skipped = self.doc["contestants"][c.name]
        if skipped["status"] != "ok":
            return {"status": "skipped", "reason": skipped["reason"]}
        self.done += 1
        if w.proxies_only and c.name == "direct":
            return {"status": "n/a", "reason": "no proxy process to measure"}
        t0 = time.monotonic()
        try:
            values = wmod.measure(ctx, w, c)
        except (MeasureError, StartError, OSError) as exc:
            self._say(w, c, f"ERROR {str(exc).splitlines()[0]}", t0)
            return {"status": "error", "error": str(exc)}
        headline = " · ".join(f"{m.short} {fmt(values.get(m.key))} {m.unit}".strip()
                              for m in w.metrics
                              if values.get(m.key) is not None)
        self._say(w, c, headline, t0)
        return {"status": "ok", "values": values}

    def _say(self, w: wmod.Workload | emod.EgressWorkload, c: Contestant | emod.EgressProxy,
             text: str, t0: float) -> None:
        elapsed = int(time.monotonic() - self.started)
        _progress(f"[{self.done:>2}/{self.total} {elapsed // 60}:{elapsed % 60:02d}] "
                  f"{w.name:<10} {c.name:<9} {text}  ({time.monotonic() - t0:.1f} s)")

    def _say_comparison(self, w: wmod.Workload | emod.EgressWorkload, doc: rmod.Doc) -> None:
        parts = []
        for m in w.metrics:
            c = doc["comparison"][m.key]
            if c["ratio"] is not None:
                parts.append(f"{c['ratio']:.2f}x {c['best_peer']} on {m.short} {m.unit}"
                             .replace("  ", " "))
        if parts:
            _progress(f"    {w.name}: enforcer = " + ", ".join(parts))

    def _measure_egress(self, env: Env) -> None:
        """The egress proxies' table: each workload, its protocol's contestants in turn."""
        if not self.egress:
            return
        http = self._start_http(env)
        table: dict[str, Any] = {"contestants": self._egress_contestants(), "workloads": {}}
        self.doc["egress"] = table
        for w in self.egress:
            doc = table["workloads"][w.name] = w.doc(self.settings)
            proxies = emod.contestants(w.protocol, self.egress_only)
            samples: dict[str, list[dict[str, Any]]] = {c.name: [] for c in proxies}
            for _ in range(self.repeat):
                for c in proxies:
                    samples[c.name].append(self._egress_one(env, http, w, c))
            for c in proxies:
                doc["results"][c.name] = combine(samples[c.name])
            rmod.compare(doc, w.metrics, [c.name for c in proxies if c.is_peer])
            self._say_comparison(w, doc)

    def _egress_contestants(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for w in self.egress:
            for c in emod.contestants(w.protocol, self.egress_only):
                entry = out.setdefault(c.name, {"peer": c.is_peer, "setup": {}})
                entry["setup"][w.protocol] = c.describe()
                reason = c.missing()
                entry.update(status="skipped" if reason else "ok",
                             version=None if reason else c.version())
                if reason:
                    entry.update(reason=reason, apt=c.apt)
        return out

    def _egress_one(self, env: Env, http: Any, w: emod.EgressWorkload,
                    c: emod.EgressProxy) -> dict[str, Any]:
        reason = c.missing()
        if reason:
            return {"status": "skipped", "reason": reason}
        no_login = c.no_login() if w.login else None
        if no_login:
            return {"status": "n/a", "reason": no_login}
        self.done += 1
        t0 = time.monotonic()
        if http is None:
            error = getattr(self, "http_error", "HTTP backend not running")
            self._say(w, c, f"ERROR {error}", t0)
            return {"status": "error", "error": error}
        try:
            values = emod.measure(env, self.settings, http.port, w, c,
                                  env.workdir(f"{w.name}-{c.name}"))
        except (MeasureError, StartError, OSError) as exc:
            self._say(w, c, f"ERROR {str(exc).splitlines()[0]}", t0)
            return {"status": "error", "error": str(exc)}
        self._say(w, c, " · ".join(f"{m.short} {fmt(values.get(m.key))} {m.unit}".strip()
                                   for m in w.metrics), t0)
        return {"status": "ok", "values": values}

    def _finish(self, out: Path, run_dir: Path) -> int:
        self.doc["finished_at"] = rmod.utcnow()
        self.doc["duration_s"] = round(time.monotonic() - self.started, 1)
        self.doc["host"]["loadavg_end"] = [round(v, 2) for v in os.getloadavg()]
        self.doc["targets"] = rmod.collect_targets(self.doc)
        paths = write_all(self.doc, out, run_dir)
        _progress(f"done in {fmt(self.doc['duration_s'])} s: " + ", ".join(map(str, paths)))
        if self.doc["interrupted"]:
            return 130
        return 1 if rmod.had_errors(self.doc) else 0
