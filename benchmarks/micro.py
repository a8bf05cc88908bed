"""Run the micro-benchmarks (``benchmarks/micro/bench_*.py``) and keep what they print.

Each script has a ``main()`` and a ``--number N`` option; each runs in its own Python
process (so one benchmark's caches and garbage do not colour the next) with a timeout.
Their lines are kept verbatim; every "N/s" or "N ops/s" figure found in a line (or the
"ops/s" column of a table they print) is also parsed into ``rates`` so the JSON can be
compared between runs.
"""

from __future__ import annotations

import contextlib
import re
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

MICRO_DIR = Path(__file__).resolve().parent / "micro"
RATE = re.compile(r"([\d][\d,]*(?:\.\d+)?)\s*(?:ops)?/s\b")
COLUMNS = re.compile(r"\s{2,}")
QUICK_NUMBER = 2000


def run_micro(quick: bool, progress: Any, timeout: float = 300.0) -> dict[str, Any]:
    scripts = sorted(MICRO_DIR.glob("bench_*.py"))
    if not scripts:
        return {"status": "skipped", "reason": f"no bench_*.py in {MICRO_DIR}", "benchmarks": {}}
    out: dict[str, Any] = {}
    for script in scripts:
        progress(f"micro {script.stem} ...")
        out[script.stem] = _run_one(script, quick, timeout)
        status = out[script.stem]["status"]
        progress(f"micro {script.stem}: {status} in {out[script.stem]['seconds']:.1f} s")
    return {"status": "ok", "benchmarks": out}


def parse_rates(lines: list[str]) -> list[dict[str, Any]]:
    """Rates per line: "N/s" or "N ops/s" anywhere, or the "ops/s" column of a table."""
    rates, column = [], None
    for line in lines:
        cells = COLUMNS.split(line.strip())
        if "ops/s" in cells and not RATE.search(line):
            column = cells.index("ops/s")  # a table header: read that column below
            continue
        found = [float(v.replace(",", "")) for v in RATE.findall(line)]
        if not found and column is not None and len(cells) > column:
            with contextlib.suppress(ValueError):
                found = [float(cells[column].replace(",", ""))]
        if found:
            rates.append({"line": line, "per_second": found})
    return rates


def _run_one(script: Path, quick: bool, timeout: float) -> dict[str, Any]:
    argv = [sys.executable, str(script)]
    if quick and "--number" in script.read_text():
        argv += ["--number", str(QUICK_NUMBER)]
    started = time.perf_counter()
    try:
        done = subprocess.run(argv, capture_output=True, text=True, timeout=timeout,
                              cwd=MICRO_DIR.parents[1], check=False)
    except subprocess.TimeoutExpired:
        return {"status": "error", "error": f"no result after {timeout:.0f}s",
                "seconds": time.perf_counter() - started, "lines": [], "rates": []}
    lines = [ln.rstrip() for ln in done.stdout.splitlines() if ln.strip()]
    result: dict[str, Any] = {
        "status": "ok" if done.returncode == 0 else "error",
        "seconds": round(time.perf_counter() - started, 2),
        "argv": [script.name, *argv[2:]], "lines": lines, "rates": parse_rates(lines)}
    if done.returncode != 0:
        result["error"] = (done.stderr.strip().splitlines() or ["exit code "
                                                               f"{done.returncode}"])[-1]
    return result
