"""Turn a results document into results.md, results.json and one PNG chart per workload.

The markdown table has one row per (workload, metric), one column per contestant, and
enforcer's ratio to the best peer with the target and a check mark. Each chart shows the
contestants' bars for every metric of a workload: enforcer highlighted, direct hatched
(the ceiling, not a peer), the best peer's value as a dashed line, and enforcer's ratio
in the panel title. ``summary.png`` shows every target at once, oriented so that a bar
right of 1.0 is always a win for enforcer.
"""

from __future__ import annotations

import json
import shutil
import statistics
from collections.abc import Callable
from pathlib import Path
from typing import Any

from benchmarks import egress_report
from benchmarks import results as rmod
from benchmarks.options import RUNS_DIR
from benchmarks.results import Doc

ORDER = ("direct", "enforcer", "haproxy", "stunnel", "nginx")
COLORS = {"enforcer": "#e8590c", "direct": "#adb5bd"}
PEER_COLOR = "#4c6ef5"
VARIANT_COLOR = "#fab005"
DASH = "\u2013"  # en dash: no value
TIMES = "\u00d7"  # multiplication sign in ratios


def fmt(value: Any) -> str:
    if value is None:
        return DASH
    if isinstance(value, bool):
        return "yes" if value else "no"
    if not isinstance(value, int | float):
        return str(value)
    v = float(value)
    if abs(v) >= 100:
        return f"{v:,.0f}"
    if abs(v) >= 10:
        return f"{v:.1f}"
    return f"{v:.2f}"


def _order(name: str) -> float:
    if name.startswith("enforcer-"):  # variants right after enforcer
        return ORDER.index("enforcer") + 0.5
    return ORDER.index(name) if name in ORDER else len(ORDER)


def contestant_names(doc: Doc) -> list[str]:
    return sorted(doc["contestants"], key=_order)


def _cell(result: dict[str, Any] | None, key: str) -> str:
    if not result:
        return DASH
    status = result.get("status")
    if status == "ok":
        return fmt(result["values"].get(key))
    return {"skipped": "skipped", "n/a": "n/a", "error": "**error**"}.get(str(status), DASH)


def _ratio_cell(c: dict[str, Any] | None) -> str:
    if not c or c.get("ratio") is None:
        if c and c.get("met") is not None:  # absolute target without peers
            return "✅" if c["met"] else "❌"
        return DASH
    mark = {True: " ✅", False: " ❌", None: ""}[c["met"]]
    return f"{c['ratio']:.2f}{TIMES} ({c['best_peer']}){mark}"


def _arrow(better: str) -> str:
    return "↑" if better == "higher" else "↓"


def results_table(doc: Doc) -> list[str]:
    names = contestant_names(doc)
    lines = ["| workload | metric | " + " | ".join(names) + " | enforcer ÷ best peer | target |",
             "|---|---|" + "---:|" * len(names) + "---|---|"]
    for w in doc["workloads"].values():
        if w["status"] != "ok":
            lines.append(f"| {w['title']} | skipped: {w.get('reason', '')} |"
                         + " |" * (len(names) + 2))
            continue
        for i, m in enumerate(w["metrics"]):
            cells = [_cell(w["results"].get(n), m["key"]) for n in names]
            c = w["comparison"].get(m["key"])
            title = _workload_title(w) if i == 0 else ""
            target = (c or {}).get("target") or ""
            label = f"{m.get('short') or ''} {m['unit']}".strip()
            lines.append(f"| {title} | {label} {_arrow(m['better'])} | "
                         + " | ".join(cells) + f" | {_ratio_cell(c)} | {target} |")
    return lines


def _workload_title(w: dict[str, Any]) -> str:
    n = w["params"].get("connections")
    if w["title"].startswith("idle") and n:
        return f"{w['title'].split(' (')[0]} (N = {n:,})"
    return str(w["title"])


def _contestant_lines(doc: Doc) -> list[str]:
    out = []
    for name in contestant_names(doc):
        c = doc["contestants"][name]
        if c["status"] != "ok":
            out.append(f"- **{name}**: skipped: {c.get('reason', '')}")
            continue
        tls = c.get("tls") or {}
        tls_text = (f"; inbound TLS as seen by `openssl s_client`: {tls.get('protocol')}, "
                    f"{tls.get('cipher')}, {tls.get('group')}; refuses a client without a "
                    f"certificate: {fmt(tls.get('client_cert_required'))}"
                    ) if tls.get("protocol") else ""
        version = f" {c['version']}" if c.get("version") else ""
        out.append(f"- **{name}**{version}: {c.get('setup', '')}{tls_text}")
    return out


def _error_lines(doc: Doc) -> list[str]:
    out = []
    for wname, w in ((n, w) for table in rmod.tables(doc) for n, w in table.items()):
        for cname, r in w["results"].items():
            if r.get("status") == "error":
                first = str(r.get("error", "")).splitlines()[:3]
                out.append(f"- {wname} / {cname}: " + " · ".join(first))
    return out


def markdown(doc: Doc, latest: str | None = None) -> str:
    """The report; ``latest`` (``latest`` or ``latest-quick``) makes the summary kept next
    to the runs folder: it embeds ``<latest>.png`` (the summary chart, copied there) and
    names the per-workload charts, which stay in the run's folder, git-ignored."""
    mode = "quick run (indicative only)" if doc["mode"] == "quick" else "full run"
    lines = [f"# enforcer benchmark: {doc['started_at']} ({mode})", "",
             *(_pair_intro(doc) if pair_run(doc) else _egress_intro()), "", _host_line(doc),
             ""]
    if pair_run(doc):
        lines += ["## Results", "", "↑ higher is better, ↓ lower is better; ratios are "
                  "enforcer ÷ the best of haproxy, stunnel and nginx in this run. "
                  + _suite_sentence(doc), "", *results_table(doc), "", *interception_lines(doc),
                  *_defaults_lines(doc)]
    lines += egress_report.section(doc)
    errors = _error_lines(doc)
    if errors:
        lines += ["## Errors", "", *errors, ""]
    if pair_run(doc):
        lines += ["## Contestants", "", *_contestant_lines(doc), ""]
    b = doc["backends"]
    lines += ["## Backends and load", "", f"- HTTP backend: {b.get('http') or DASH}",
              f"- bulk backend: {b.get('bulk') or DASH}"]
    for name, t in doc["tools"].items():
        state = ((t["version"] or "installed") if t["installed"]
                 else f"missing (apt install {t['apt']})")
        lines.append(f"- {name}: {state}")
    lines += ["", "## Settings", "", "```json", json.dumps(doc["settings"], indent=1), "```", ""]
    if pair_run(doc):
        lines += _micro_lines(doc)
    charts = [name for name, w in doc["workloads"].items() if w.get("chart")]
    if charts or doc.get("summary_chart"):
        lines += ["## Charts", ""]
    if latest is not None:
        if doc.get("summary_chart"):
            lines += [f"![targets]({latest}.png)", ""]
        if charts:
            lines += [f"One chart per workload ({', '.join(charts)}) is in the run's folder, "
                      f"`{doc['run_dir']}/`, which git ignores.", ""]
        return "\n".join(lines)
    if doc.get("summary_chart"):
        lines += [f"![targets]({doc['summary_chart']})", ""]
    for n in charts:
        lines += [f"![{n}]({doc['workloads'][n]['chart']})", ""]
    return "\n".join(lines)


# (numerator, denominator, what the ratio shows): the --netns columns and their control
INTERCEPTION = (
    ("enforcer-nathooks", "enforcer", "conntrack + NAT hooks"),
    ("enforcer-transparent", "enforcer-nathooks", "redirect + SO_ORIGINAL_DST"),
    ("enforcer-transparent", "enforcer", "interception in all"),
)
NAT_TARGET = 1.05  # the redirect within 5 % CPU of the NAT hooks alone


Values = dict[str, Any]


def _number(v: object) -> float | None:
    return float(v) if isinstance(v, int | float) and not isinstance(v, bool) else None


def _total_ratio(key: str) -> Callable[[Values, Values], float | None]:
    def ratio(a: Values, b: Values) -> float | None:
        x, y = _number(a.get(key)), _number(b.get(key))
        return x / y if x is not None and y else None
    return ratio


def _user_ratio(key: str) -> Callable[[Values, Values], float | None]:
    """The same ratio counting user-space CPU only (system time holds the kernel's
    conntrack and NAT work for the pair's own packets)."""
    def user_share(v: Values) -> float | None:
        user, total = _number(v.get("cpu_s_user")), _number(v.get("cpu_s"))
        return user / total if user is not None and total else None

    def ratio(a: Values, b: Values) -> float | None:
        r, sa, sb = _total_ratio(key)(a, b), user_share(a), user_share(b)
        return r * sa / sb if r is not None and sa is not None and sb else None
    return ratio


def _paired_ratio(w: dict[str, Any], num: str, den: str,
                  ratio: Callable[[Values, Values], float | None]) -> float | None:
    """The median over rounds of one column ÷ another measured in the same round (with
    ``--repeat``; rounds measure every contestant back to back, so a slow drift of the
    machine cancels out), else the ratio of the two values."""
    a, b = w["results"].get(num) or {}, w["results"].get(den) or {}
    if a.get("status") != "ok" or b.get("status") != "ok":
        return None
    rounds = list(zip(a.get("samples") or [a["values"]], b.get("samples") or [b["values"]],
                      strict=False))
    found = [r for x, y in rounds if (r := ratio(x, y)) is not None]
    return statistics.median(found) if found else None


def _interception_cells(w: dict[str, Any], ratios: list[tuple[str, str, str]],
                        ratio: Callable[[Values, Values], float | None]) -> str:
    cells = []
    for num, den, _ in ratios:
        r = _paired_ratio(w, num, den, ratio)
        mark = "" if r is None or den != "enforcer-nathooks" else (
            " ✅" if r <= NAT_TARGET else " ❌")
        cells.append(DASH if r is None else f"{r:.2f}{TIMES}{mark}")
    return " | ".join(cells)


def interception_lines(doc: Doc) -> list[str]:
    """What interception costs in CPU per unit of work (``--netns`` runs): ratios of the
    transparent pair, its control (the NAT hooks loaded, no redirect) and the
    explicit-port pair, in all and in user space only. Above 1.00 costs more."""
    ratios = [r for r in INTERCEPTION if r[0] in doc["contestants"] and r[1] in doc["contestants"]]
    if not ratios:
        return []
    lines = ["## Interception", "",
             "CPU per unit of work, one column ÷ another of the table above (above 1.00 "
             "costs more): the NAT hooks alone (conntrack tracks every packet while they "
             "are loaded), the redirect and reading the original destination on top of "
             f"them (target: at most {NAT_TARGET:.2f}{TIMES}), and both together. With "
             "`--repeat`, each is the median of the ratios measured in the same round. "
             "The user-space rows leave out system time, where the kernel's conntrack and "
             "NAT work for the pair's own packets is counted: what enforcer itself spends.",
             "",
             "| workload | metric | " + " | ".join(f"{n} ÷ {d} ({what})" for n, d, what in ratios)
             + " |", "|---|---|" + "---:|" * len(ratios)]
    for w in doc["workloads"].values():
        if w["status"] != "ok":
            continue
        for m in (m for m in w["metrics"] if str(m["unit"]).startswith("CPU")):
            for label, ratio in ((m["unit"], _total_ratio(m["key"])),
                                 (f"{m['unit']}, user space", _user_ratio(m["key"]))):
                lines.append(f"| {_workload_title(w)} | {label} | "
                             + _interception_cells(w, ratios, ratio) + " |")
    return [*lines, ""]


def pair_run(doc: Doc) -> bool:
    """Whether the run measured the sidecar pairs (not only the egress proxies)."""
    return bool(doc["workloads"]) or not doc.get("egress")


def _pair_intro(doc: Doc) -> list[str]:
    return ["Sidecar pair on one machine, every contestant in the same run with the same "
            "certificates (ECDSA P-256 mutual TLS) and the same load: load tool → outbound "
            "(plain in, mTLS out) → inbound (mTLS in, plain out) → backend. CPU is the "
            "pair's own (both sidecars, all processes and threads, from /proc)."
            + (" The egress proxies have a table of their own (below)."
               if doc.get("egress") else "")]


def _egress_intro() -> list[str]:
    return ["Egress proxies only (`--workloads egress`): enforcer's `socks5` and "
            "`http_connect` listeners beside dante, tinyproxy and squid, on one machine, "
            "in the same run, with the same load. The sidecar pairs' numbers are in "
            "[latest.md](latest.md) (a full run)."]


def _host_line(doc: Doc) -> str:
    h = doc["host"]
    return (f"Host: {h['cpus']} CPUs, Linux {h['kernel']} {h['machine']}, Python "
            f"{h['python']}, {h['openssl']}. CPU busy in the second before the run: "
            f"{fmt(100 * (h.get('cpu_busy_before') or 0))} % (other work on the machine "
            f"during the run makes absolute numbers lower and noisier; ratios compare "
            f"contestants under the same conditions). Duration: {fmt(doc['duration_s'])} s."
            + (" **Interrupted: partial results.**" if doc["interrupted"] else ""))


def _suite_sentence(doc: Doc) -> str:
    suite = doc["settings"].get("suite")
    if not suite:
        return "Every tool used its own TLS defaults."
    return (f"Every pair is pinned to the same TLS 1.3 suite, {suite} (enforcer "
            "`cipher_suites`, haproxy and stunnel `ciphersuites`, nginx `ssl_conf_command "
            "Ciphersuites`); the second table leaves each tool's defaults.")


def _defaults_lines(doc: Doc) -> list[str]:
    """The second table: the same workloads, every tool with its own TLS defaults (enforcer
    prefers TLS_AES_128_GCM_SHA256, OpenSSL-based peers TLS_AES_256_GCM_SHA384)."""
    defaults = doc.get("defaults")
    if not defaults or not defaults.get("workloads"):
        return []
    seen = []
    for name in contestant_names(doc):
        tls = doc["contestants"][name].get("tls_defaults") or {}
        if tls.get("cipher"):
            seen.append(f"{name} {tls['cipher']}")
    negotiated = f" Negotiated: {', '.join(seen)}." if seen else ""
    return ["## Defaults vs defaults", "",
            "The same workloads with every tool's own TLS choices, no suite pinned."
            + negotiated, "", *results_table({**doc, "workloads": defaults["workloads"]}), ""]


def _micro_lines(doc: Doc) -> list[str]:
    micro = doc["micro"]
    lines = ["## Micro-benchmarks (pure cores, one process, no I/O)", ""]
    if micro["status"] != "ok":
        return [*lines, f"Skipped: {micro.get('reason', '')}", ""]
    for name, b in micro["benchmarks"].items():
        lines += [f"### {name}", "", "```text", *b.get("lines", []),
                  *([f"error: {b['error']}"] if b.get("error") else []), "```", ""]
    return lines


# --------------------------------------------------------------------------- charts


def _plt() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def chart_workload(doc: Doc, name: str, path: Path) -> None:
    plt = _plt()
    w = doc["workloads"][name]
    names = [n for n in contestant_names(doc) if (w["results"].get(n) or {}).get("status") != "n/a"]
    metrics = w["metrics"]
    cols = 2 if len(metrics) == 4 else len(metrics)
    rows = -(-len(metrics) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.6 * cols, 3.6 * rows + 0.4), squeeze=False)
    for ax, m in zip(axes.flat, metrics, strict=True):
        _panel(ax, w, m, names)
    fig.suptitle(f"{_workload_title(w)}  ({doc['mode']} run, {doc['started_at']})",
                 fontsize=11)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _panel(ax: Any, w: dict[str, Any], m: dict[str, Any], names: list[str]) -> None:
    values, labels, colors, hatches = [], [], [], []
    for n in names:
        r = w["results"].get(n) or {}
        v = r.get("values", {}).get(m["key"]) if r.get("status") == "ok" else None
        values.append(v)
        status = r.get("status", DASH) if r.get("status") != "ok" else "n/a"
        labels.append(n if v is not None else f"{n}\n({status})")
        colors.append(VARIANT_COLOR if n.startswith("enforcer-") else COLORS.get(n, PEER_COLOR))
        hatches.append("//" if n == "direct" else "")
    # the scale follows the proxies: direct (the ceiling) may run off it, labelled so
    proxied = [v for v, n in zip(values, names, strict=True) if v is not None and n != "direct"]
    top = 1.2 * max(proxied or [v for v in values if v is not None] or [1.0]) or 1.0
    heights = [min(v, top) if v is not None else 0.0 for v in values]
    bars = ax.bar(range(len(names)), heights, color=colors, edgecolor="#343a40", linewidth=0.6)
    for bar, hatch, v in zip(bars, hatches, values, strict=True):
        bar.set_hatch(hatch)
        if v is not None:
            text = fmt(v) + (" (off scale)" if v > top else "")
            ax.annotate(text, (bar.get_x() + bar.get_width() / 2, min(v, top)), ha="center",
                        va="bottom", fontsize=8, xytext=(0, 2), textcoords="offset points")
    ax.set_ylim(0, top * 1.12)
    ax.set_xticks(range(len(names)), labels, fontsize=8)
    ax.set_ylabel(f"{m['unit']} ({m['better']} is better)", fontsize=8)
    c = w["comparison"].get(m["key"]) or {}
    if c.get("best_peer_value") is not None:
        ax.axhline(c["best_peer_value"], color="#2b8a3e", linestyle="--", linewidth=1)
    title = m["label"]
    if c.get("ratio") is not None:
        mark = {True: " ✓", False: " ✗", None: ""}[c["met"]]
        title += f"\nenforcer = {c['ratio']:.2f}{TIMES} best peer ({c['best_peer']}){mark}"
    elif c.get("met") is not None:
        title += f"\ntarget {c['target']}: {'met' if c['met'] else 'not met'}"
    ax.set_title(title, fontsize=9)


def chart_summary(doc: Doc, path: Path) -> bool:
    """Bars of enforcer's advantage (>1 = better than the best peer) for every target."""
    rows = [t for t in doc["targets"] if t["ratio"] is not None]
    if not rows:
        return False
    plt = _plt()
    better = {(n, m["key"]): m["better"] for n, w in doc["workloads"].items()
              for m in w["metrics"]}
    adv = [t["ratio"] if better[(t["workload"], t["metric"])] == "higher" else 1 / t["ratio"]
           for t in rows]
    labels = [f"{t['workload']} {t['unit']}" for t in rows]
    fig, ax = plt.subplots(figsize=(9.5, 0.45 * len(rows) + 1.4))
    colors = ["#2b8a3e" if t["met"] else "#c92a2a" for t in rows]
    ax.barh(range(len(rows)), adv, color=colors)
    for i, (a, t) in enumerate(zip(adv, rows, strict=True)):
        text = f"{t['ratio']:.2f}{TIMES} vs {t['best_peer']}"
        if not t["target"].endswith("best peer"):  # an absolute target
            text += f"; {fmt(t['enforcer'])} {t['unit']} (target {t['target'].split()[1]})"
        ax.annotate(text, (a, i), xytext=(3, 0),
                    textcoords="offset points", va="center", fontsize=8)
    ax.axvline(1.0, color="black", linewidth=1)
    ax.set_yticks(range(len(rows)), labels, fontsize=8)
    ax.invert_yaxis()
    ax.set_xlabel("enforcer's advantage over the best peer (>1 = enforcer better)")
    ax.set_title(f"enforcer vs best peer, {doc['mode']} run {doc['started_at']}", fontsize=10)
    ax.set_xlim(0, max(1.25, max(adv) * 1.7))
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def write_charts(doc: Doc, run_dir: Path) -> str | None:
    """PNG per workload into run_dir; returns a reason if charts could not be drawn."""
    try:
        _plt()
    except ImportError:
        return "matplotlib not installed (pip install matplotlib, or the [bench] extra)"
    for name, w in doc["workloads"].items():
        if w["status"] == "ok" and any(r.get("status") == "ok" for r in w["results"].values()):
            chart_workload(doc, name, run_dir / f"{name}.png")
            w["chart"] = f"{name}.png"
    if chart_summary(doc, run_dir / "summary.png"):
        doc["summary_chart"] = "summary.png"
    return None


def write_all(doc: Doc, out: Path, run_dir: Path) -> list[Path]:
    """results.json/.md and charts in run_dir (``out/runs/<stamp>``, git-ignored); the
    summary in out: latest.json, latest.md and latest.png (the summary chart), which are
    all the repository keeps of benchmark runs.

    A quick run writes latest-quick.* instead (also ignored), so that an indicative run
    never replaces the latest full run's numbers; a run of only the egress proxies writes
    egress.* (egress-quick.*) for the same reason.
    """
    run_dir.mkdir(parents=True, exist_ok=True)
    reason = write_charts(doc, run_dir)
    if reason:
        doc["charts_skipped"] = reason
    text = json.dumps(doc, indent=2) + "\n"
    (run_dir / "results.json").write_text(text)
    (run_dir / "results.md").write_text(markdown(doc))
    latest = latest_name(doc)
    shutil.copyfile(run_dir / "results.json", out / f"{latest}.json")
    if doc.get("summary_chart"):
        shutil.copyfile(run_dir / doc["summary_chart"], out / f"{latest}.png")
    (out / f"{latest}.md").write_text(markdown(doc, latest=latest))
    return [run_dir / "results.md", run_dir / "results.json", out / f"{latest}.md"]


def render(run_dir: Path) -> list[Path]:
    """Redraw results.md, charts and latest.* from a run's results.json (latest.* go to
    the folder that holds ``runs/``)."""
    doc = json.loads((run_dir / "results.json").read_text())
    out = run_dir.parent.parent if run_dir.parent.name == RUNS_DIR else run_dir.parent
    return write_all(doc, out, run_dir)


def latest_name(doc: Doc) -> str:
    """latest(-quick) for a run of the pairs; egress(-quick) for a run of only the egress
    proxies, which must not replace the latest full run's summary."""
    base = "latest" if pair_run(doc) else "egress"
    return f"{base}-quick" if doc["mode"] == "quick" else base
