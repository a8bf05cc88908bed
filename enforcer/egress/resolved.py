"""Egress listeners: the addresses a requested name resolves to are decided on too.

Why: rules decide first on what the client asked for (``to.hosts``, ``to.ports``; the
name is not resolved before an allow, so a denied name never leaves the host). But the
bytes go to an address, and whoever runs the DNS of an allowed name chooses it: a name
that resolves into ``10.0.0.0/8`` or to ``169.254.169.254`` (DNS rebinding, the cloud
metadata service) would otherwise walk past a ``deny to.cidrs`` rule.

How: when the request named a host (not an address) and the policy allowed it, the
dialer (``dataplane.dialer.dial``) resolves the name and hands the addresses to the
``Admit`` callable made here before any connect. Each address is decided on again by the
listener's ruleset, with every fact as before plus the address (``FlowFacts.resolved``:
CIDR entries of ``to.cidrs`` and ``to.destinations`` test the address, name entries still
the name). Only addresses whose decision is ``allow`` are connected to, in the resolver's
order. So:

- a deny rule on networks beats an allow by name: a matching deny always wins in a
  ruleset, and a name is a claim by whoever controls its DNS, while the address is where
  the connection goes (fail closed);
- an allow by name keeps allowing the name's other addresses;
- an address that does not parse as an IP address is refused.

None allowed: ``AllRefused`` (the connection closes with ``denied_resolved_address``,
action deny, and a detail naming the host, each refused address and the rule that refused
it; the client gets SOCKS5 0x02 / HTTP 403). Pure apart from the ruleset lookup.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import logging
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Final

from enforcer.policy.facts import Decision, FlowFacts

if TYPE_CHECKING:
    from enforcer.egress.session import EgressSession

log = logging.getLogger("enforcer.egress")

Addr = tuple[int, Any]  # (family, sockaddr) as dataplane.dialer resolves them
Admit = Callable[[list[Addr]], list[Addr]]
Decide = Callable[[FlowFacts], Decision]
REASON: Final = "denied_resolved_address"
SHOWN: Final = 8  # refused addresses named in a detail


class AllRefused(Exception):
    """No address of the requested name is allowed; ``str()`` is the flow record's detail."""


def address_text(sockaddr: Any) -> str:
    return str(sockaddr[0])


def admit(host: str, facts: FlowFacts, decide: Decide, addrs: list[Addr]) -> list[Addr]:
    """The addresses the ruleset allows, in order; raises ``AllRefused`` if none."""
    allowed: list[Addr] = []
    refused: list[str] = []
    for addr in addrs:
        text = address_text(addr[1])
        why = _refusal(facts, decide, text)
        if why is None:
            allowed.append(addr)
        else:
            refused.append(f"{text} ({why})")
    if not allowed:
        more = len(refused) - SHOWN
        listed = ", ".join(refused[:SHOWN]) + (f", ... +{more} more" if more > 0 else "")
        raise AllRefused(f"{host} resolved only to addresses the rules refuse: {listed}")
    return allowed


def _refusal(facts: FlowFacts, decide: Decide, text: str) -> str | None:
    try:
        ipaddress.ip_address(text)
    except ValueError:
        return "not an IP address"
    decision = decide(dataclasses.replace(facts, resolved=text))
    if decision.allowed:
        return None
    if decision.rule is not None:
        return f"denied by rule {decision.rule!r}"
    return f"{decision.reason} of ruleset {decision.ruleset!r}"


def admitter(egress: EgressSession | None, facts: Callable[[], FlowFacts], decide: Decide,
             flow_id: str) -> Admit | None:
    """For the dialer: the check of a connection's resolved addresses, or None when there
    is nothing to check (not an egress connection, or the client asked for an address)."""
    host = egress.host if egress is not None else None
    if host is None or _is_address(host):
        return None
    known = facts()

    def check(addrs: list[Addr]) -> list[Addr]:
        allowed = admit(host, known, decide, addrs)
        if len(allowed) < len(addrs):
            kept = {id(a) for a in allowed}
            log.info("flow %s: %s resolved also to addresses the rules refuse (%s); "
                     "connecting only to the others", flow_id, host,
                     ", ".join(address_text(a[1]) for a in addrs if id(a) not in kept))
        return allowed

    return check


def _is_address(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True
