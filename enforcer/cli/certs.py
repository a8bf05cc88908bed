"""``enforcer certs init | issue | show | crl``: throwaway PKI and certificate inspection.

A thin layer over ``enforcer.tlsconf.certs``: it parses arguments, turns ``CertsError``
into one line on stderr with exit code 2, and prints what was written or found. ``show``
reports identity fields from ``enforcer.tlsconf.identity``, the same code rules use.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from enforcer.cli import exitcodes
from enforcer.cli.errors import fail
from enforcer.tlsconf import certs

Handler = Callable[[argparse.Namespace], int]

# Order and labels of the human-readable `certs show` output.
SHOW_FIELDS = (
    ("spiffe_id", "SPIFFE ID"),
    ("trust_domain", "trust domain"),
    ("spiffe_path", "SPIFFE path"),
    ("uri", "URI SANs"),
    ("dns", "DNS SANs"),
    ("ip", "IP SANs"),
    ("cn", "CN"),
    ("o", "O"),
    ("ou", "OU"),
    ("issuer_cn", "issuer CN"),
    ("serial", "serial"),
    ("not_before", "not before"),
    ("not_after", "not after"),
    ("spki_sha256", "SPKI sha256"),
    ("key", "key"),
    ("extended_key_usage", "EKU"),
    ("is_ca", "CA"),
    ("sha256_fingerprint", "fingerprint"),
    ("chain_length", "certificates in file"),
)


def register(sub: Any) -> None:
    parser = sub.add_parser(
        "certs",
        help="create a throwaway CA and certificates, or show a certificate's identity",
        description="Certificate tooling: throwaway CA, SPIFFE leaf certificates, inspection.",
    )
    parser.set_defaults(func=_usage(parser))
    actions = parser.add_subparsers(dest="certs_command", metavar="ACTION")
    _register_init(actions)
    _register_issue(actions)
    _register_show(actions)
    _register_crl(actions)


def _usage(parser: argparse.ArgumentParser) -> Handler:
    def run(args: argparse.Namespace) -> int:
        parser.print_help(sys.stderr)
        return exitcodes.USAGE

    return run


def _register_init(actions: Any) -> None:
    p = actions.add_parser(
        "init",
        help="create a CA plus a server and a client certificate in DIR",
        description="Create DIR/ca.crt and DIR/ca.key plus server and client leaf "
        "certificates with SPIFFE URI SANs (keys mode 0600).",
    )
    p.add_argument("dir", metavar="DIR", type=Path)
    p.add_argument("--force", action="store_true", help="replace an existing CA key in DIR")
    p.set_defaults(func=_guarded(cmd_init))


def _register_issue(actions: Any) -> None:
    p = actions.add_parser(
        "issue",
        help="issue a leaf certificate signed by DIR's CA",
        description="Issue OUT/NAME.crt and OUT/NAME.key signed by DIR/ca.crt + DIR/ca.key "
        "(ECDSA P-256 unless --rsa; usable for server and client auth).",
    )
    p.add_argument("dir", metavar="DIR", type=Path, help="directory holding ca.crt and ca.key")
    p.add_argument("--name", required=True, help="subject CN and file name stem")
    p.add_argument("--spiffe-id", metavar="URI", help="spiffe://trust-domain/path URI SAN")
    p.add_argument("--dns", metavar="NAME", nargs="+", action="extend", default=[])
    p.add_argument("--ip", metavar="IP", nargs="+", action="extend", default=[])
    p.add_argument("--ou", metavar="OU", action="append", default=[], help="subject OU")
    p.add_argument("--rsa", action="store_true", help="RSA 2048 key instead of ECDSA P-256")
    p.add_argument("--days", type=int, default=90, help="validity in days (default 90)")
    p.add_argument("--out", metavar="DIR", type=Path, help="output directory (default DIR)")
    p.set_defaults(func=_guarded(cmd_issue))


def _register_show(actions: Any) -> None:
    p = actions.add_parser(
        "show",
        help="print a certificate's identity as rules see it",
        description="Print the first certificate's identity exactly as rules see it: "
        "SPIFFE ID, SANs, CN, O, OU, issuer, serial, validity and SPKI pin.",
    )
    p.add_argument("file", metavar="FILE", type=Path)
    p.add_argument("--json", action="store_true", help="one JSON object instead of text")
    p.set_defaults(func=_guarded(cmd_show))


def _register_crl(actions: Any) -> None:
    p = actions.add_parser(
        "crl",
        help="write a CRL signed by DIR's CA, revoking the given certificates",
        description="Write a PEM CRL signed by DIR/ca.crt + DIR/ca.key that revokes the "
        "certificates named with --revoke (none: an empty CRL). Written atomically, so an "
        "enforcer watching the file reloads it once, whole.",
    )
    p.add_argument("dir", metavar="DIR", type=Path, help="directory holding ca.crt and ca.key")
    p.add_argument("--out", metavar="FILE", type=Path, required=True, help="the CRL file")
    p.add_argument("--revoke", metavar="CERT", type=Path, action="append", default=[],
                   help="a certificate file to revoke (repeatable)")
    p.add_argument("--days", type=int, default=7, help="until the next update (default 7)")
    p.set_defaults(func=_guarded(cmd_crl))


def _guarded(handler: Handler) -> Handler:
    def run(args: argparse.Namespace) -> int:
        try:
            return handler(args)
        except certs.CertsError as exc:
            fail(str(exc))
            return exitcodes.BAD_CONFIG

    return run


def cmd_init(args: argparse.Namespace) -> int:
    pki = certs.init_pki(args.dir, force=args.force)
    print(f"CA:     {pki.ca}")
    print(f"        {pki.ca_key} (private, 0600)")
    for label, issued in (("server", pki.server), ("client", pki.client)):
        print(f"{label + ':':8}{issued.cert} ({certs.describe(issued.cert)['spiffe_id']})")
        print(f"        {issued.key} (private, 0600)")
    return exitcodes.OK


def cmd_issue(args: argparse.Namespace) -> int:
    issued = certs.issue(
        args.dir,
        args.out,
        name=args.name,
        spiffe_id=args.spiffe_id,
        dns=args.dns,
        ips=args.ip,
        ou=args.ou,
        key_type="rsa" if args.rsa else "ec",
        days=args.days,
    )
    print(f"certificate: {issued.cert}")
    print(f"key:         {issued.key} (private, 0600)")
    print(f"CA:          {issued.ca}")
    return exitcodes.OK


def cmd_show(args: argparse.Namespace) -> int:
    facts = certs.describe(args.file)
    if args.json:
        print(json.dumps(facts, indent=2))
    else:
        print(format_facts(facts))
    return exitcodes.OK


def cmd_crl(args: argparse.Namespace) -> int:
    serials = [int(str(certs.describe(path)["serial"]), 16) for path in args.revoke]
    out = certs.write_crl(args.dir, args.out, serials, days=args.days)
    print(f"CRL:     {out} ({len(serials)} revoked, next update in {args.days} days)")
    for path, serial in zip(args.revoke, serials, strict=True):
        print(f"revoked: {path} (serial {serial:x})")
    return exitcodes.OK


def _format_value(value: object) -> str:
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, list | tuple):
        return ", ".join(str(v) for v in value) if value else "-"
    return str(value)


def format_facts(facts: dict[str, object]) -> str:
    width = max(len(label) for _, label in SHOW_FIELDS) + 1
    lines = [f"{facts.get('file', '')}"]
    for key, label in SHOW_FIELDS:
        if key in facts:
            lines.append(f"  {label + ':':{width}} {_format_value(facts[key])}")
    return "\n".join(lines)
