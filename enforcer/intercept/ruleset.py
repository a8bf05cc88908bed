"""The nftables ruleset of ``enforcer intercept`` (pure: text in, text out, no I/O).

How it works. Everything lives in one table of the ``inet`` family (IPv4 and IPv6 in one
place), ``table inet enforcer`` by default, with two NAT chains:

- ``output`` (hook output, priority -100 = dstnat): locally generated TCP. Packets from
  the enforcer's own uid(s) (``meta skuid``) or carrying the bypass mark (``meta mark``)
  return first, so enforcer's own upstream connections are never caught again (no loop);
  then loopback destinations, excluded ports and excluded CIDRs return; every other TCP
  connection is redirected to the outbound listener's port on the local host. NAT rules
  only see a connection's first packet: conntrack applies the result to the rest, and the
  listener reads the original destination back with ``SO_ORIGINAL_DST``.
- ``prerouting`` (hook prerouting, priority dstnat): TCP arriving from other hosts for the
  app's ports (or every port but the excluded ones) is redirected to the inbound listener.

Apply is one ``nft -f`` transaction: ``table`` (creates it if missing), ``delete table``,
then the full table. Whatever a previous run left, the result is exactly this ruleset,
atomically; nothing outside the table is touched. Remove is the same without the last part.
"""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass

IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network
PortRange = tuple[int, int]

DEFAULT_TABLE = "enforcer"
DEFAULT_OUTBOUND_PORT = 15001
DEFAULT_INBOUND_PORT = 15006
DEFAULT_UID = 10001  # the enforcer user of the container image (Dockerfile)
DEFAULT_MARK = 0x539  # 1337, as Istio's
_TABLE_NAME = re.compile(r"^[A-Za-z][A-Za-z0-9_-]{0,31}$")


class SpecError(ValueError):
    """A value that cannot go into the ruleset; the message names it."""


@dataclass(frozen=True, slots=True)
class InterceptSpec:
    """What to intercept. ``inbound_ports`` empty with ``inbound_all`` False: no inbound."""

    outbound_port: int = DEFAULT_OUTBOUND_PORT
    inbound_port: int = DEFAULT_INBOUND_PORT
    outbound: bool = True
    inbound_all: bool = True  # every inbound TCP port but the excluded ones
    inbound_ports: tuple[PortRange, ...] = ()
    exclude_inbound_ports: tuple[PortRange, ...] = ()
    exclude_outbound_ports: tuple[PortRange, ...] = ()
    exclude_cidrs: tuple[IPNetwork, ...] = ()  # outbound destinations left alone
    uids: tuple[int, ...] = (DEFAULT_UID,)
    mark: int = DEFAULT_MARK
    table: str = DEFAULT_TABLE

    def __post_init__(self) -> None:
        for name in ("outbound_port", "inbound_port"):
            _check_port(getattr(self, name), name.replace("_", "-"))
        for name in ("inbound_ports", "exclude_inbound_ports", "exclude_outbound_ports"):
            for low, high in getattr(self, name):
                _check_port(low, name.replace("_", "-"))
                _check_port(high, name.replace("_", "-"))
                if low > high:
                    raise SpecError(f"{name.replace('_', '-')}: range {low}-{high} is reversed")
        if not self.uids:
            raise SpecError("uid: at least one uid (the enforcer's) is needed to avoid loops")
        for uid in self.uids:
            if not 0 <= uid < 2**32:
                raise SpecError(f"uid: {uid} is out of range")
        if not 0 < self.mark < 2**32:
            raise SpecError(f"mark: {self.mark:#x} must be 1..0xffffffff")
        if not _TABLE_NAME.match(self.table):
            raise SpecError(f"table: {self.table!r} is not a valid nftables table name")


def _check_port(port: int, what: str) -> None:
    if not 1 <= port <= 65535:
        raise SpecError(f"{what}: port {port} is out of range 1-65535")


def parse_ports(text: str, what: str) -> tuple[PortRange, ...]:
    """``"80,443,8000-8100"`` -> ranges; raise SpecError naming the bad item."""
    out: list[PortRange] = []
    for item in (p.strip() for p in text.split(",")):
        if not item:
            continue
        low_text, sep, high_text = item.partition("-")
        if not low_text.isdigit() or (sep and not high_text.isdigit()):
            raise SpecError(f"{what}: bad port {item!r} (use 8080 or 8000-8100)")
        low = int(low_text)
        high = int(high_text) if sep else low
        for port in (low, high):
            _check_port(port, what)
        if low > high:
            raise SpecError(f"{what}: range {item!r} is reversed")
        out.append((low, high))
    return tuple(out)


def parse_cidrs(text: str, what: str) -> tuple[IPNetwork, ...]:
    out: list[IPNetwork] = []
    for item in (c.strip() for c in text.split(",")):
        if not item:
            continue
        try:
            out.append(ipaddress.ip_network(item, strict=False))
        except ValueError:
            raise SpecError(f"{what}: bad CIDR {item!r}") from None
    return tuple(out)


def _set(items: list[str]) -> str:
    return items[0] if len(items) == 1 else "{ " + ", ".join(items) + " }"


def _ports(ranges: tuple[PortRange, ...]) -> str:
    return _set([str(lo) if lo == hi else f"{lo}-{hi}" for lo, hi in ranges])


def _output_chain(spec: InterceptSpec) -> list[str]:
    rules = [
        "meta l4proto != tcp return",
        f"meta skuid {_set([str(u) for u in spec.uids])} return",
        f"meta mark & {spec.mark:#x} == {spec.mark:#x} return",
        "ip daddr 127.0.0.0/8 return",
        "ip6 daddr ::1 return",
    ]
    if spec.exclude_outbound_ports:
        rules.append(f"tcp dport {_ports(spec.exclude_outbound_ports)} return")
    v4 = [str(n) for n in spec.exclude_cidrs if n.version == 4]
    v6 = [str(n) for n in spec.exclude_cidrs if n.version == 6]
    if v4:
        rules.append(f"ip daddr {_set(v4)} return")
    if v6:
        rules.append(f"ip6 daddr {_set(v6)} return")
    rules.append(f"meta l4proto tcp redirect to :{spec.outbound_port}")
    return _chain("output", "type nat hook output priority -100; policy accept;", rules)


def _prerouting_chain(spec: InterceptSpec) -> list[str]:
    rules = ["meta l4proto != tcp return", "iifname \"lo\" return"]
    if spec.exclude_inbound_ports:
        rules.append(f"tcp dport {_ports(spec.exclude_inbound_ports)} return")
    if spec.inbound_all:
        rules.append(f"meta l4proto tcp redirect to :{spec.inbound_port}")
    else:
        rules.append(f"tcp dport {_ports(spec.inbound_ports)} redirect to :{spec.inbound_port}")
    return _chain("prerouting", "type nat hook prerouting priority dstnat; policy accept;",
                  rules)


def _chain(name: str, hook: str, rules: list[str]) -> list[str]:
    return [f"\tchain {name} {{", f"\t\t{hook}", *(f"\t\t{r}" for r in rules), "\t}"]


def table_text(spec: InterceptSpec) -> str:
    """The table as ``nft list table`` would show it (what ``show --dry-run`` prints)."""
    lines = [f"table inet {spec.table} {{"]
    if spec.inbound_all or spec.inbound_ports:
        lines += _prerouting_chain(spec)
    if spec.outbound:
        lines += _output_chain(spec)
    lines.append("}")
    return "\n".join(lines) + "\n"


def apply_script(spec: InterceptSpec) -> str:
    """One ``nft -f`` transaction: replace the table (whatever was there) by this one."""
    return remove_script(spec.table) + table_text(spec)


def remove_script(table: str = DEFAULT_TABLE) -> str:
    """One ``nft -f`` transaction deleting the table, present or not."""
    if not _TABLE_NAME.match(table):
        raise SpecError(f"table: {table!r} is not a valid nftables table name")
    return f"table inet {table}\ndelete table inet {table}\n"
