"""The interception ruleset builder (pure): what apply would install, and bad input."""

from __future__ import annotations

import ipaddress

import pytest

from enforcer.intercept import xtables
from enforcer.intercept.ruleset import (
    InterceptSpec,
    SpecError,
    apply_script,
    parse_cidrs,
    parse_ports,
    remove_script,
    table_text,
)


def test_default_spec_redirects_both_ways_and_skips_the_enforcer() -> None:
    text = table_text(InterceptSpec())
    assert "type nat hook output priority -100" in text
    assert "meta skuid 10001 return" in text  # the image's enforcer user
    assert "meta mark & 0x539 == 0x539 return" in text
    assert "meta l4proto tcp redirect to :15001" in text
    assert "meta l4proto tcp redirect to :15006" in text
    # loop avoidance comes before the redirect
    assert text.index("meta skuid") < text.index("redirect to :15001")
    assert text.index("ip6 daddr ::1 return") < text.index("redirect to :15001")


def test_exclusions_split_by_family_and_ports_as_sets() -> None:
    spec = InterceptSpec(
        inbound_all=False, inbound_ports=((8080, 8080), (9000, 9100)),
        exclude_outbound_ports=((53, 53),), exclude_inbound_ports=((15000, 15000),),
        exclude_cidrs=(ipaddress.ip_network("10.96.0.1/32"), ipaddress.ip_network("fd00::/64")),
        uids=(0, 1337))
    text = table_text(spec)
    assert "tcp dport { 8080, 9000-9100 } redirect to :15006" in text
    assert "tcp dport 53 return" in text
    assert "tcp dport 15000 return" in text
    assert "ip daddr 10.96.0.1/32 return" in text
    assert "ip6 daddr fd00::/64 return" in text
    assert "meta skuid { 0, 1337 } return" in text


def test_no_inbound_and_no_outbound_chains() -> None:
    assert "prerouting" not in table_text(InterceptSpec(inbound_all=False))
    assert "chain output" not in table_text(InterceptSpec(outbound=False))


def test_apply_replaces_the_table_atomically_and_remove_is_exact() -> None:
    script = apply_script(InterceptSpec(table="mine"))
    assert script.startswith("table inet mine\ndelete table inet mine\ntable inet mine {")
    assert remove_script("mine") == "table inet mine\ndelete table inet mine\n"


@pytest.mark.parametrize(("text", "message"), [
    ("80800", "out of range"), ("9-8", "reversed"), ("http", "bad port 'http'"),
    ("80,", None), ("0", "out of range")])
def test_parse_ports(text: str, message: str | None) -> None:
    if message is None:
        assert parse_ports(text, "x") == ((80, 80),)
        return
    with pytest.raises(SpecError, match=message):
        parse_ports(text, "x")


def test_parse_cidrs_names_the_bad_one() -> None:
    assert parse_cidrs("10.0.0.1, ::1", "c")[1] == ipaddress.ip_network("::1/128")
    with pytest.raises(SpecError, match=r"c: bad CIDR '10\.0\.0\.300'"):
        parse_cidrs("10.0.0.300", "c")


@pytest.mark.parametrize(("kw", "message"), [
    ({"outbound_port": 0}, "outbound-port"), ({"uids": ()}, "at least one uid"),
    ({"mark": 0}, "mark"), ({"table": "bad name;"}, "table"),
    ({"inbound_ports": ((10, 5),)}, "reversed")])
def test_bad_spec_is_refused_with_its_name(kw: dict[str, object], message: str) -> None:
    with pytest.raises(SpecError, match=message):
        InterceptSpec(**kw)  # type: ignore[arg-type]


def test_iptables_input_per_family() -> None:
    spec = InterceptSpec(
        inbound_all=False, inbound_ports=((8080, 8080),), exclude_outbound_ports=((53, 53),),
        exclude_cidrs=(ipaddress.ip_network("10.96.0.1/32"), ipaddress.ip_network("fd00::/64")),
        uids=(0, 1337))
    v4, v6 = xtables.restore_input(spec, 4), xtables.restore_input(spec, 6)
    assert v4.startswith("*nat\n:ENFORCER_OUTPUT - [0:0]\n:ENFORCER_PREROUTING - [0:0]\n"
                         "-F ENFORCER_OUTPUT\n-F ENFORCER_PREROUTING\n")
    assert v4.endswith("COMMIT\n")
    assert "-A ENFORCER_OUTPUT -m owner --uid-owner 1337 -j RETURN" in v4
    assert "-A ENFORCER_OUTPUT -d 10.96.0.1/32 -j RETURN" in v4 and "fd00::" not in v4
    assert "-A ENFORCER_OUTPUT -d fd00::/64 -j RETURN" in v6 and "10.96.0.1" not in v6
    assert "-d ::1/128 -j RETURN" in v6 and "-d 127.0.0.0/8 -j RETURN" in v4
    assert ("-A ENFORCER_PREROUTING -p tcp -m multiport --dports 8080 -j REDIRECT "
            "--to-ports 15006") in v4
    assert v4.index("--uid-owner 0 ") < v4.index("REDIRECT --to-ports 15001")


def test_iptables_multiport_lists_are_split_at_15() -> None:
    ports = (*((p, p) for p in range(1000, 1020)), (2000, 2010))
    text = xtables.restore_input(InterceptSpec(exclude_outbound_ports=ports), 4)
    groups = [line.split("--dports ")[1].split(" ")[0] for line in text.splitlines()
              if "--dports" in line]
    assert len(groups) == 2
    assert sum(2 if ":" in p else 1 for p in groups[0].split(",")) == 15
    assert groups[1].endswith("2000:2010")


def test_iptables_chains_and_jumps() -> None:
    assert xtables.chains("enforcer") == ("ENFORCER_OUTPUT", "ENFORCER_PREROUTING")
    assert xtables.chains("pod-2") == ("ENFORCER_POD_2_OUTPUT", "ENFORCER_POD_2_PREROUTING")
    assert xtables.jumps(InterceptSpec(outbound=False, inbound_all=False)) == []
    assert xtables.jumps(InterceptSpec()) == [("PREROUTING", "ENFORCER_PREROUTING"),
                                              ("OUTPUT", "ENFORCER_OUTPUT")]
