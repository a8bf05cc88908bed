"""``enforcer intercept apply | remove | show [--dry-run]``: the nftables rules that send the
network namespace's TCP through enforcer's transparent listeners (see enforcer.intercept).

Exit codes: 0 done; 1 nft (or iptables) refused the rules (its message is shown), or
``show`` found no rules installed; 2 bad arguments; 5 no ``nft`` tool (nor iptables, with
``--backend auto``); 6 no CAP_NET_ADMIN.
"""

from __future__ import annotations

import argparse
import sys
from typing import Any

from enforcer.cli import exitcodes
from enforcer.cli.errors import fail
from enforcer.intercept import ruleset, xtables
from enforcer.intercept.nft import InterceptError, preflight
from enforcer.intercept.ruleset import InterceptSpec, SpecError

EXIT_OF = {"no_nft": exitcodes.NO_NFT, "no_net_admin": exitcodes.NO_NET_ADMIN,
           "nft_failed": exitcodes.FAILURE}


def register(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "intercept", help="install the rules that send this network namespace's TCP "
        "through enforcer", description="Install, remove or show the nftables rules (table "
        "inet enforcer) that redirect outbound TCP to the outbound listener and inbound TCP "
        "for the app's ports to the inbound listener. Needs the nft tool and CAP_NET_ADMIN "
        "(exit 5 and 6 when either is missing) unless --dry-run.")
    parser.set_defaults(func=lambda _args: _usage(parser))
    sub = parser.add_subparsers(dest="intercept_command", metavar="COMMAND")
    for name, text in (("apply", "install the rules (idempotent: replaces the table)"),
                       ("remove", "delete the table (only enforcer's own rules)"),
                       ("show", "print the rules installed (--dry-run: the rules apply "
                                "would install)")):
        cmd = sub.add_parser(name, help=text, description=text)
        cmd.add_argument("--dry-run", action="store_true",
                         help="print the nft script or ruleset; change nothing")
        _spec_arguments(cmd)
        cmd.set_defaults(func=_run, action=name)


def _spec_arguments(cmd: argparse.ArgumentParser) -> None:
    d = InterceptSpec()
    cmd.add_argument("--backend", choices=("auto", "nft", "iptables"), default="auto",
                     help="auto (default): nft, else iptables/ip6tables (nat table chains)")
    cmd.add_argument("--table", default=d.table, help=f"nft table name (default {d.table})")
    cmd.add_argument("--outbound-port", type=int, default=d.outbound_port, metavar="PORT",
                     help=f"the outbound transparent listener (default {d.outbound_port})")
    cmd.add_argument("--inbound-port", type=int, default=d.inbound_port, metavar="PORT",
                     help=f"the inbound transparent listener (default {d.inbound_port})")
    cmd.add_argument("--inbound-ports", default="*", metavar="LIST",
                     help='app ports to intercept inbound: "*" (all but the excluded, '
                          'default), "8080,9000-9100", or "" for none')
    cmd.add_argument("--no-outbound", action="store_true", help="do not intercept outbound")
    cmd.add_argument("--exclude-inbound-ports", default="", metavar="LIST",
                     help="inbound ports left alone (e.g. the admin port)")
    cmd.add_argument("--exclude-outbound-ports", default="", metavar="LIST",
                     help="outbound destination ports left alone (e.g. 53)")
    cmd.add_argument("--exclude-cidrs", default="", metavar="LIST",
                     help="outbound destinations left alone (e.g. the kube API address)")
    cmd.add_argument("--uid", action="append", type=int, metavar="UID",
                     help=f"enforcer's uid, never redirected; repeatable (default {d.uids[0]})")
    cmd.add_argument("--mark", type=lambda t: int(t, 0), default=d.mark, metavar="MARK",
                     help=f"packets with this mark are never redirected (default {d.mark:#x})")


def spec_from_args(args: argparse.Namespace) -> InterceptSpec:
    inbound = args.inbound_ports.strip()
    return InterceptSpec(
        outbound_port=args.outbound_port, inbound_port=args.inbound_port,
        outbound=not args.no_outbound, inbound_all=inbound == "*",
        inbound_ports=() if inbound in ("*", "") else ruleset.parse_ports(inbound,
                                                                          "inbound-ports"),
        exclude_inbound_ports=ruleset.parse_ports(args.exclude_inbound_ports,
                                                  "exclude-inbound-ports"),
        exclude_outbound_ports=ruleset.parse_ports(args.exclude_outbound_ports,
                                                   "exclude-outbound-ports"),
        exclude_cidrs=ruleset.parse_cidrs(args.exclude_cidrs, "exclude-cidrs"),
        uids=tuple(args.uid) if args.uid else InterceptSpec().uids,
        mark=args.mark, table=args.table)


def _run(args: argparse.Namespace) -> int:
    try:
        spec = spec_from_args(args)
    except SpecError as exc:
        fail(str(exc))
        return exitcodes.USAGE
    if args.dry_run:
        sys.stdout.write(_dry_run_text(args.action, spec, args.backend))
        return exitcodes.OK
    try:
        installer = preflight(args.backend)
        if args.action == "apply":
            installer.apply(spec)
        elif args.action == "remove":
            installer.remove(spec.table)
        else:
            text = installer.list_rules(spec.table)
            if text is None:
                fail(f"no interception rules installed ({installer.where(spec.table)} "
                     "absent)")
                return exitcodes.FAILURE
            sys.stdout.write(text)
    except InterceptError as exc:
        fail(str(exc))
        return EXIT_OF[exc.kind]
    return exitcodes.OK


def _dry_run_text(action: str, spec: InterceptSpec, backend: str) -> str:
    if backend == "iptables":
        if action == "remove":
            return "".join(f"# {'iptables' if family == 4 else 'ip6tables'}: delete the jumps "
                           f"to {', '.join(xtables.chains(spec.table))}, then the chains\n"
                           for family in (4, 6))
        return "".join(f"# {'iptables' if family == 4 else 'ip6tables'}-restore --noflush\n"
                       f"{xtables.restore_input(spec, family)}" for family in (4, 6))
    if action == "apply":
        return ruleset.apply_script(spec)
    if action == "remove":
        return ruleset.remove_script(spec.table)
    return ruleset.table_text(spec)


def _usage(parser: argparse.ArgumentParser) -> int:
    parser.print_help(sys.stderr)
    return exitcodes.USAGE
