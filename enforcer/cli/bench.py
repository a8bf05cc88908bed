"""``enforcer bench``: run the benchmark harness (``benchmarks/`` in a source checkout).

The harness is not part of the installed package: it lives next to ``enforcer/`` in the
repository (``make bench`` runs the same thing as ``python -m benchmarks``). This module
finds that directory from the package's own location, puts the checkout on ``sys.path``
and hands over to ``benchmarks.cli`` with the same options.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from pathlib import Path
from typing import Any

from enforcer.cli import exitcodes
from enforcer.cli.errors import fail

CHECKOUT = Path(__file__).resolve().parents[2]


def _harness(module: str = "cli") -> Any | None:
    """``benchmarks.<module>`` from the checkout this package was installed from, or None."""
    if not (CHECKOUT / "benchmarks" / f"{module}.py").is_file():
        return None
    if str(CHECKOUT) not in sys.path:
        sys.path.insert(0, str(CHECKOUT))
    return importlib.import_module(f"benchmarks.{module}")


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser(
        "bench", help="benchmark enforcer against haproxy, stunnel and nginx",
        description="Run the sidecar-pair benchmark (load tool -> outbound -> mTLS -> "
        "inbound -> backend) for enforcer and the peers installed here; each run's markdown, "
        "JSON and charts go to benchmarks/results/runs/, the summary to "
        "benchmarks/results/latest.*.")
    options = _harness("options")  # cheap: the harness itself is imported only to run
    if options is not None:
        options.add_arguments(p)
    p.set_defaults(func=cmd_bench)


def cmd_bench(args: argparse.Namespace) -> int:
    harness = _harness()
    if harness is None:
        fail(f"{CHECKOUT / 'benchmarks'}: not found: `enforcer bench` needs a source "
             "checkout (git clone, then `make bench`)")
        return exitcodes.USAGE
    return int(harness.run(args))
