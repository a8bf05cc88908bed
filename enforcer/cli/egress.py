"""``enforcer egress-user NAME``: a line for an egress credentials file.

The password is read from stdin (one line; nothing is echoed or stored in clear), and
``NAME:$scrypt$...`` is printed, to append to the file ``listeners[].egress.credentials``
names (see enforcer.egress.credentials)."""

from __future__ import annotations

import argparse
import sys

from enforcer.cli import exitcodes
from enforcer.egress.credentials import DEFAULT_LN, USER_NAME, hash_password


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser("egress-user", help="print a credentials line for an egress proxy "
                       "user (password on stdin)")
    p.add_argument("name", help="the user name (no spaces or ':')")
    p.add_argument("--cost", type=int, default=DEFAULT_LN, choices=range(10, 21),
                   metavar="LN", help=f"scrypt cost, log2 N (default {DEFAULT_LN})")
    p.set_defaults(func=cmd_egress_user)


def cmd_egress_user(args: argparse.Namespace) -> int:
    if not USER_NAME.fullmatch(args.name):
        print(f"enforcer: bad user name {args.name!r} (1-255 characters, no spaces or ':')",
              file=sys.stderr)
        return exitcodes.USAGE
    password = sys.stdin.buffer.readline().rstrip(b"\r\n")
    if not password:
        print("enforcer: no password on stdin", file=sys.stderr)
        return exitcodes.USAGE
    print(f"{args.name}:{hash_password(password, ln=args.cost)}")
    return exitcodes.OK
