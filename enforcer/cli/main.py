"""``enforcer`` command line: run | check | demo | certs | policy explain | bench |
intercept.

Each subcommand lives in its own module exposing ``register(subparsers)``, which adds a
parser whose ``func(args) -> int`` returns the process exit code (see ``exitcodes``).
When the first word names a subcommand, only that subcommand's module is imported (its
parser is the same one the full parser holds): a running proxy does not keep the other
commands' modules (certificate tooling, benchmark, replay, nftables) in memory. Anything
else (``--help``, ``--version``, a typo) builds the full parser.
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
# first command-line word -> the one module that registers it
COMMAND_MODULES = {
    "run": "enforcer.cli.run",
    "check": "enforcer.cli.check",
    "demo": "enforcer.cli.demo",
    "certs": "enforcer.cli.certs",
    "policy": "enforcer.cli.policy",
    "bench": "enforcer.cli.bench",
    "intercept": "enforcer.cli.intercept",
    "egress-user": "enforcer.cli.egress",
}


def build_parser(only: str | None = None) -> argparse.ArgumentParser:
    """The full parser, or (``only``: a module name) one holding just that subcommand."""
    parser = argparse.ArgumentParser(
        prog="enforcer",
        description="mTLS-terminating TCP/TLS proxy: sidecar, gateway and benchmark harness.",
    )
    parser.add_argument("--version", action="version", version=f"enforcer {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in (only,) if only else SUBCOMMAND_MODULES:
        try:
            module = importlib.import_module(name)
        except ModuleNotFoundError as exc:
            if exc.name == name:  # subcommand not shipped in this build
                continue
            raise
        module.register(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    words = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser(COMMAND_MODULES.get(words[0]) if words else None)
    args = parser.parse_args(words)
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
