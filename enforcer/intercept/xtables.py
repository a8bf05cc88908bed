"""The same interception as ``ruleset`` for iptables (pure): ``iptables-restore`` input
per address family, used when the ``nft`` tool is missing.

How it works. Two chains of the ``nat`` table hold the rules, ``ENFORCER_OUTPUT`` and
``ENFORCER_PREROUTING`` (names from the table name, so two installations can coexist);
``OUTPUT`` and ``PREROUTING`` jump to them for TCP. Applying declares both chains (created
if missing), flushes them and appends the rules, in one ``iptables-restore --noflush``
transaction per family; the jumps are added only when missing (the I/O side checks with
``-C``), so applying twice changes nothing. Removing deletes the jumps, then the chains:
nothing else in the table is touched. ``multiport`` takes at most 15 ports per rule, so
longer lists are split over several rules.
"""

from __future__ import annotations

from collections.abc import Iterator

from enforcer.intercept.ruleset import InterceptSpec, PortRange

MULTIPORT_MAX = 15  # ports per multiport rule (a range counts two)


def chains(spec_table: str) -> tuple[str, str]:
    base = "ENFORCER" if spec_table == "enforcer" else f"ENFORCER_{spec_table.upper()}"
    base = base.replace("-", "_")[:20]
    return f"{base}_OUTPUT", f"{base}_PREROUTING"


def jumps(spec: InterceptSpec) -> list[tuple[str, str]]:
    """(builtin chain, own chain) pairs that must jump, for the directions intercepted."""
    out_chain, pre_chain = chains(spec.table)
    wanted = []
    if spec.inbound_all or spec.inbound_ports:
        wanted.append(("PREROUTING", pre_chain))
    if spec.outbound:
        wanted.append(("OUTPUT", out_chain))
    return wanted


def _port_groups(ranges: tuple[PortRange, ...]) -> Iterator[str]:
    group: list[str] = []
    used = 0
    for low, high in ranges:
        cost = 1 if low == high else 2
        if used + cost > MULTIPORT_MAX:
            yield ",".join(group)
            group, used = [], 0
        group.append(str(low) if low == high else f"{low}:{high}")
        used += cost
    if group:
        yield ",".join(group)


def restore_input(spec: InterceptSpec, family: int) -> str:
    """``iptables-restore --noflush`` input (``family`` 4 or 6) filling both chains."""
    out_chain, pre_chain = chains(spec.table)
    loopback = "127.0.0.0/8" if family == 4 else "::1/128"
    lines = ["*nat", f":{out_chain} - [0:0]", f":{pre_chain} - [0:0]",
             f"-F {out_chain}", f"-F {pre_chain}"]
    out = [f"-A {out_chain} -m owner --uid-owner {uid} -j RETURN" for uid in spec.uids]
    out.append(f"-A {out_chain} -m mark --mark {spec.mark:#x}/{spec.mark:#x} -j RETURN")
    out.append(f"-A {out_chain} -d {loopback} -j RETURN")
    out += [f"-A {out_chain} -p tcp -m multiport --dports {g} -j RETURN"
            for g in _port_groups(spec.exclude_outbound_ports)]
    out += [f"-A {out_chain} -d {net} -j RETURN" for net in spec.exclude_cidrs
            if net.version == family]
    out.append(f"-A {out_chain} -p tcp -j REDIRECT --to-ports {spec.outbound_port}")
    pre = [f"-A {pre_chain} -i lo -j RETURN"]
    pre += [f"-A {pre_chain} -p tcp -m multiport --dports {g} -j RETURN"
            for g in _port_groups(spec.exclude_inbound_ports)]
    if spec.inbound_all:
        pre.append(f"-A {pre_chain} -p tcp -j REDIRECT --to-ports {spec.inbound_port}")
    else:
        pre += [f"-A {pre_chain} -p tcp -m multiport --dports {g} -j REDIRECT --to-ports "
                f"{spec.inbound_port}" for g in _port_groups(spec.inbound_ports)]
    return "\n".join([*lines, *out, *pre, "COMMIT"]) + "\n"


def jump_rule(builtin: str, own: str) -> list[str]:
    """The jump's rule spec (for ``-C``/``-A``/``-D`` on the nat table)."""
    return [builtin, "-p", "tcp", "-j", own]
