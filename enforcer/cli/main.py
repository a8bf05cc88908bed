"""``enforcer`` command line: run | check | demo | certs | policy explain | bench |
intercept.

Each subcommand lives in its own module exposing ``register(subparsers)``, which adds a
parser whose ``func(args) -> int`` returns the process exit code (see ``exitcodes``).
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence

from enforcer import __version__
from enforcer.cli import exitcodes

SUBCOMMAND_MODULES = (
    "enforcer.cli.run",
    "enforcer.cli.check",
    "enforcer.cli.demo",
    "enforcer.cli.certs",
    "enforcer.cli.policy",
    "enforcer.cli.bench",
    "enforcer.cli.intercept",
    "enforcer.cli.egress",
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="enforcer",
        description="mTLS-terminating TCP/TLS proxy: sidecar, gateway and benchmark harness.",
    )
    parser.add_argument("--version", action="version", version=f"enforcer {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in SUBCOMMAND_MODULES:
        try:
            module = importlib.import_module(name)
        except ModuleNotFoundError as exc:
            if exc.name == name:  # subcommand not shipped in this build
                continue
            raise
        module.register(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    func = getattr(args, "func", None)
    if func is None:
        parser.print_help(sys.stderr)
        return exitcodes.USAGE
    try:
        return int(func(args))
    except KeyboardInterrupt:
        return exitcodes.INTERRUPTED
    except BrokenPipeError:
        return exitcodes.OK


if __name__ == "__main__":
    raise SystemExit(main())
