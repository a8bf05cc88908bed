"""``enforcer policy explain``: what would the listener's ruleset decide for this flow, and why.

Builds the same ``FlowFacts`` the data plane builds, asks the compiled ruleset to
``explain`` them, and prints the decision, the deciding rule, then one line per other
rule saying why it did not match (or that it matched but did not decide). Exit 0 for
allow, 1 for deny, 2 for bad input (config errors, unknown listener, bad address ...).
``enforcer policy replay`` lives in ``enforcer.cli.replay``.
"""

from __future__ import annotations

import argparse
import ipaddress
from typing import Any

from enforcer.cli import exitcodes, replay
from enforcer.cli.errors import fail, load_config_or_report
from enforcer.config.model import Config, ListenerConfig
from enforcer.config.passthrough import SniRouter
from enforcer.config.rulesets import TLV_KEYS, normalize_dns
from enforcer.policy import Explanation, FlowFacts, compile_ruleset
from enforcer.tlsconf.identity import (
    IdentityError,
    PeerIdentity,
    identity_from_pem,
    identity_from_spiffe_id,
    parse_spiffe_id,
)


class BadInput(Exception):
    """A command-line value that cannot be used; the message is shown as is."""


def register(subparsers: Any) -> None:
    parser = subparsers.add_parser("policy", help="inspect rulesets",
                                   description="Inspect rulesets.")
    parser.set_defaults(func=lambda _args: _usage(parser))
    sub = parser.add_subparsers(dest="policy_command", metavar="COMMAND")
    explain = sub.add_parser(
        "explain", help="show what a listener's ruleset decides for a flow, and why",
        description="Show the decision a listener's ruleset makes for a described flow, the "
                    "rule that decided, and why each other rule did not match. Exit 0 for "
                    "allow, 1 for deny, 2 for bad input.")
    explain.add_argument("-c", "--config", required=True, metavar="FILE", help="config file")
    explain.add_argument("--listener", required=True, metavar="NAME")
    explain.add_argument("--identity", metavar="URI",
                         help="the peer's SPIFFE ID, as if it presented a verified certificate "
                              "(on a tls mode auto listener: the flow is TLS)")
    explain.add_argument("--cert", metavar="PEM",
                         help="the peer's certificate, PEM file (as --identity, with every "
                              "field of the certificate)")
    explain.add_argument("--source", metavar="IP", help="the real client address")
    explain.add_argument("--port", type=int, metavar="N",
                         help="the listener's local port (default: from the config)")
    explain.add_argument("--sni", metavar="NAME",
                         help="the TLS server name the client sent (on a tls mode auto "
                              "listener: the flow is TLS)")
    explain.add_argument("--tlv", action="extend", nargs="+", default=[], metavar="KEY=VALUE",
                         help=f"a PROXY protocol TLV ({', '.join(TLV_KEYS)}); repeatable")
    explain.add_argument("--destination", metavar="HOST:PORT",
                         help="outbound: the upstream address")
    explain.add_argument("--server-identity", metavar="URI",
                         help="outbound: the upstream's verified SPIFFE ID")
    explain.set_defaults(func=run_explain)
    replay.register(sub)


def _usage(parser: argparse.ArgumentParser) -> int:
    parser.print_help()
    return exitcodes.USAGE


def run_explain(args: argparse.Namespace) -> int:
    cfg = load_config_or_report(args.config)
    if cfg is None:
        return exitcodes.BAD_CONFIG
    try:
        listener = _listener(cfg, args.listener)
        facts = build_facts(args, listener, cfg)
        ruleset = compile_ruleset(cfg.rulesets[listener.ruleset])
    except (BadInput, ValueError) as exc:
        fail(str(exc))
        return exitcodes.BAD_CONFIG
    explanation = ruleset.explain(facts)
    for line in format_explanation(explanation, facts):
        print(line)
    return exitcodes.OK if explanation.decision.action == "allow" else exitcodes.DENY


def _listener(cfg: Config, name: str) -> ListenerConfig:
    for lst in cfg.listeners:
        if lst.name == name:
            return lst
    known = ", ".join(lst.name for lst in cfg.listeners) or "none"
    raise BadInput(f"unknown listener {name!r} (known: {known})")


def build_facts(args: argparse.Namespace, listener: ListenerConfig,
                cfg: Config | None = None) -> FlowFacts:
    """The ``FlowFacts`` the data plane would build for the flow the options describe. The
    destination is the listener's upstream address unless --destination says otherwise; on
    a transparent listener it is --destination (the original destination), whose port is
    then the flow's port unless --port is given."""
    identity = _peer(args.identity, args.cert)
    dest = (_destination(args.destination) if args.destination is not None
            else _upstream_destination(cfg, listener, args.sni))
    port = listener.listen.port if args.port is None else args.port
    if listener.transparent and args.port is None and dest is not None:
        port = dest[1]
    if not 0 <= port <= 65535:
        raise BadInput(f"--port {port}: out of range 0-65535")
    return FlowFacts(
        listener=listener.name,
        port=port,
        client_ip=_ip(args.source),
        identity=identity,
        tls=_is_tls(listener, identity is not None, args.sni is not None),
        sni=args.sni,
        tlvs=_tlvs(args.tlv),
        destination=dest,
        server_identity=(None if args.server_identity is None
                         else _spiffe("--server-identity", args.server_identity)),
    )


def _is_tls(listener: ListenerConfig, has_identity: bool, has_sni: bool) -> bool:
    """What the listener's TLS mode allows: terminate is always TLS, off never, auto is TLS
    when the flow described has a certificate or SNI."""
    mode, client_auth = listener.tls.mode, listener.tls.client_auth
    if mode == "passthrough" and has_identity:
        raise BadInput(f"listener {listener.name!r} has tls mode passthrough: it does not "
                       "terminate TLS and never sees a client certificate (drop "
                       "--identity/--cert)")
    if mode == "off" and (has_identity or has_sni):
        raise BadInput(f"listener {listener.name!r} has tls mode off: its connections never "
                       "carry a certificate or SNI (drop --identity/--cert/--sni)")
    if has_identity and client_auth == "none":
        raise BadInput(f"listener {listener.name!r} has client_auth none: it never asks for "
                       "a client certificate (drop --identity/--cert)")
    return mode in ("terminate", "passthrough") or (mode == "auto" and (has_identity or has_sni))


def _peer(uri: str | None, cert: str | None) -> PeerIdentity | None:
    if uri is not None and cert is not None:
        raise BadInput("give --identity or --cert, not both")
    if uri is not None:
        return _spiffe("--identity", uri)
    if cert is None:
        return None
    try:
        with open(cert, "rb") as fh:
            pem = fh.read()
    except OSError as exc:
        raise BadInput(f"--cert {cert}: cannot read: {exc.strerror or exc}") from None
    try:
        return identity_from_pem(pem)
    except IdentityError as exc:
        raise BadInput(f"--cert {cert}: {exc}") from None


def _spiffe(option: str, uri: str) -> PeerIdentity:
    if parse_spiffe_id(uri) is None:
        raise BadInput(f"{option} {uri!r}: not a SPIFFE ID (spiffe://trust-domain/path)")
    return identity_from_spiffe_id(uri)


def _ip(text: str | None) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    if text is None:
        return None
    try:
        return ipaddress.ip_address(text.strip("[]"))
    except ValueError:
        raise BadInput(f"--source {text!r}: not an IP address") from None


def _tlvs(pairs: list[str]) -> dict[str, str]:
    out: dict[str, str] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or key not in TLV_KEYS:
            raise BadInput(f"--tlv {pair!r}: use KEY=VALUE with KEY one of {', '.join(TLV_KEYS)}")
        out[key] = value
    return out


def _upstream_destination(cfg: Config | None, listener: ListenerConfig,
                          sni: str | None = None) -> tuple[str, int] | None:
    """The listener's upstream address; on a passthrough listener, the one ``sni`` routes
    to (None when no route takes it: strict_sni refuses it before the policy)."""
    upstream = cfg.upstreams.get(listener.upstream) if cfg is not None else None
    if cfg is not None and listener.tls.mode == "passthrough":
        routes = listener.tls.routes
        if any(r.upstream not in cfg.upstreams for r in routes):
            return None
        hit = SniRouter(routes, cfg.upstreams, upstream).route(
            normalize_dns(sni) if sni else None)
        upstream = hit[1] if hit is not None else None
    if upstream is None or upstream.address.is_unix or upstream.address.original:
        return None
    return upstream.address.host, upstream.address.port


def _destination(text: str | None) -> tuple[str, int] | None:
    if text is None:
        return None
    if text.startswith("["):
        host, _, port = text[1:].partition("]:")
    else:
        host, _, port = text.rpartition(":")
    if not host or not port.isdigit() or not 0 < int(port) <= 65535:
        raise BadInput(f"--destination {text!r}: use host:port or [v6]:port")
    return host, int(port)


# ---------------------------------------------------------------------------- output
def format_explanation(ex: Explanation, facts: FlowFacts) -> list[str]:
    d = ex.decision
    lines = [f"decision: {d.action}", f"ruleset: {d.ruleset}", f"flow: {_describe(facts)}"]
    if d.reason == "error":
        lines.append(f"decided by: error while evaluating ({ex.error}); failing closed")
        return lines
    if d.rule is None:
        lines.append(f"decided by: default {d.action} (no rule matched)")
    else:
        lines.append(f"decided by: rule {d.rule!r} ({d.action})")
    for r in ex.rules:
        if r.name == d.rule:
            continue
        if r.matched:
            why = ("matched too, but a deny rule wins" if d.action == "deny" and r.action == "allow"
                   else "matched too, but an earlier rule decided")
        else:
            why = "; ".join(r.why_not)
        lines.append(f"  rule {r.name!r} ({r.action}): {why}")
    return lines


def _describe(f: FlowFacts) -> str:
    parts = [f"listener={f.listener}", f"port={f.port}",
             f"source={f.client_ip if f.client_ip is not None else '-'}",
             f"tls={'yes' if f.tls else 'no'}"]
    if f.identity is not None:
        ident = f.identity.spiffe_id or f.identity.cn or f.identity.spki_sha256
        parts.append(f"identity={ident}")
    if f.sni is not None:
        parts.append(f"sni={f.sni}")
    parts.extend(f"tlv.{k}={v}" for k, v in sorted(f.tlvs.items()))
    if f.destination is not None:
        parts.append(f"destination={f.destination[0]}:{f.destination[1]}")
    if f.server_identity is not None:
        parts.append(f"server_identity={f.server_identity.spiffe_id}")
    return " ".join(parts)
