"""Transparent listeners, the pure parts: reading a kernel sockaddr, refusing what was
not redirected or would loop, the config rules tying them to original_destination, and
``to.cidrs`` in policy."""

from __future__ import annotations

import ipaddress
import socket
import struct
from typing import Any

import pytest
import yaml

from enforcer.config.errors import ConfigError, ConfigIssue
from enforcer.config.loader import parse_config
from enforcer.config.reader import Node
from enforcer.config.rulesets import parse_rulesets
from enforcer.dataplane import origdst
from enforcer.policy import FlowFacts, compile_rulesets


def test_parse_sockaddr_in_and_in6() -> None:
    v4 = struct.pack("=H", socket.AF_INET) + struct.pack("!H4s8x", 8080,
                                                         socket.inet_aton("10.1.2.3"))
    assert origdst.parse_sockaddr(v4) == ("10.1.2.3", 8080)
    v6 = struct.pack("=H", socket.AF_INET6) + struct.pack(
        "!HI16sI", 443, 0, socket.inet_pton(socket.AF_INET6, "fd00::7"), 0)
    assert origdst.parse_sockaddr(v6) == ("fd00::7", 443)
    with pytest.raises(ValueError, match="not a sockaddr"):
        origdst.parse_sockaddr(b"\x00" * 16)


def test_read_on_a_socket_nothing_redirected_is_none() -> None:
    with socket.socket() as sock:  # no conntrack entry: the kernel answers ENOENT
        assert origdst.read(sock) is None


def test_classify() -> None:
    never = lambda ip, port: False  # noqa: E731
    assert origdst.classify(("10.0.0.5", 80), ("127.0.0.1", 15001), never) is None
    reason, detail = origdst.classify(None, ("127.0.0.1", 15001), never) or ("", "")
    assert reason == "not_redirected" and "interception" in detail
    reason, _ = origdst.classify(("127.0.0.1", 15001), ("127.0.0.1", 15001), never) or ("", "")
    assert reason == "not_redirected"
    reason, detail = origdst.classify(("10.0.0.1", 15006), ("127.0.0.1", 15001),
                                      lambda ip, port: port == 15006) or ("", "")
    assert reason == "loop" and "10.0.0.1:15006" in detail


def _cfg(listener: dict[str, Any], address: str) -> dict[str, Any]:
    return {"version": 1, "listeners": [{"name": "out", "listen": "127.0.0.1:15001",
                                         "tls": {"mode": "off"}, "ruleset": "r",
                                         "upstream": "u", **listener}],
            "upstreams": {"u": {"address": address}},
            "rulesets": {"r": {"default": "allow",
                               "rules": [{"name": "x", "action": "deny",
                                          "to": {"ports": [8080], "cidrs": ["10.0.0.0/8"]}}]}}}


def test_transparent_listener_with_original_destination_loads() -> None:
    cfg = parse_config(_cfg({"transparent": True}, "original_destination"))
    assert cfg.listeners[0].transparent
    assert cfg.upstreams["u"].address.original
    assert str(cfg.upstreams["u"].address) == "original_destination"


@pytest.mark.parametrize(("listener", "address", "message"), [
    ({"transparent": True}, "10.0.0.1:80", "needs address: original_destination"),
    ({}, "original_destination", "only a listener with transparent: true knows it"),
    ({"transparent": True, "listen": "unix:/tmp/x.sock"}, "original_destination",
     "needs a TCP listen address"),
])
def test_transparent_config_mistakes(listener: dict[str, Any], address: str,
                                     message: str) -> None:
    with pytest.raises(ConfigError) as err:
        parse_config(_cfg(listener, address))
    assert message in str(err.value.issues)


def test_original_destination_is_no_listen_address() -> None:
    raw = _cfg({"transparent": True, "listen": "original_destination"}, "original_destination")
    with pytest.raises(ConfigError, match="listen"):
        parse_config(raw)


def test_to_cidrs_matches_the_destination_address() -> None:
    raw = yaml.safe_load("""
rs:
  default: deny
  rules:
    - {name: mesh, action: allow, to: {cidrs: [10.9.0.0/16, "fd09::/64"], ports: [7000]}}
""")
    issues: list[ConfigIssue] = []
    rs = compile_rulesets(parse_rulesets(Node(raw, "rulesets", issues)))["rs"]
    assert issues == []

    def decide(dest: tuple[str, int]) -> str:
        facts = FlowFacts(listener="out", port=dest[1], client_ip=None, identity=None,
                          tls=False, destination=dest)
        assert rs.explain(facts).decision == rs.decide(facts)
        return rs.decide(facts).action

    assert decide(("10.9.3.4", 7000)) == "allow"
    assert decide(("fd09::5", 7000)) == "allow"
    assert decide(("10.10.0.1", 7000)) == "deny"
    assert decide(("10.9.3.4", 7001)) == "deny"
    why = rs.explain(FlowFacts(listener="out", port=7000, client_ip=None, identity=None,
                               tls=False, destination=("192.0.2.1", 7000))).rules[0].why_not
    assert any("192.0.2.1:7000" in w for w in why)


def _mesh_cfg(listener: dict[str, Any], mesh: dict[str, Any] | None) -> dict[str, Any]:
    cfg = _cfg({"transparent": True, **listener}, "original_destination")
    cfg["tls"] = {"m": {"ca": "/nonexistent/ca.pem"}}
    if mesh is not None:
        cfg["mesh"] = mesh
    return cfg


MESH = {"material": "m", "networks": [{"cidrs": ["10.9.0.0/16"], "ports": [8080, "9000-9001"]}],
        "external": {"plaintext": [{"cidrs": ["192.0.2.0/24"]}]}}


def test_mesh_section_loads() -> None:
    cfg = parse_config(_mesh_cfg({"mesh": "outbound"}, MESH))
    assert cfg.listeners[0].mesh == "outbound"
    net = cfg.mesh.networks[0]
    assert net.contains(ipaddress.ip_address("10.9.1.1"), 9001)
    assert not net.contains(ipaddress.ip_address("10.9.1.1"), 22)
    assert not net.contains(ipaddress.ip_address("10.10.0.1"), 8080)
    assert cfg.mesh.inbound == "strict" and cfg.mesh.external_default == "deny"
    assert cfg.mesh.external_plaintext[0].contains(ipaddress.ip_address("192.0.2.9"), 1)


@pytest.mark.parametrize(("listener", "mesh", "message"), [
    ({"mesh": "outbound", "transparent": False}, MESH, "needs transparent: true"),
    ({"mesh": "inbound"}, MESH, "needs tls mode auto"),
    ({"mesh": "outbound"}, None, "needs a top-level mesh section"),
    ({}, {"material": "m"}, "networks: is required"),
    ({}, {"networks": [{"cidrs": ["10.0.0.0/8"]}]}, "material: is required"),
    ({}, {**MESH, "material": "nope"}, "unknown material 'nope'"),
    ({}, {**MESH, "inbound": "lax"}, "inbound"),
])
def test_mesh_config_mistakes(listener: dict[str, Any], mesh: dict[str, Any] | None,
                              message: str) -> None:
    with pytest.raises(ConfigError) as err:
        parse_config(_mesh_cfg(listener, mesh))
    assert message in str(err.value)


def test_header_flow_id_takes_printable_ids_only() -> None:
    from enforcer.dataplane.connection import _header_flow_id

    assert _header_flow_id(b"9bfa7e5f-4921-4316-8925-2b7935781e4c") == \
        "9bfa7e5f-4921-4316-8925-2b7935781e4c"
    for bad in (None, b"", b"a b", b"\x00id", b"x" * 129, "é".encode()):
        assert _header_flow_id(bad) is None


def test_has_unread_peeks_without_consuming() -> None:
    from enforcer.dataplane.connection import _has_unread

    class Transport:
        def __init__(self, sock: socket.socket) -> None:
            self.sock = sock

        def get_extra_info(self, name: str) -> Any:
            return self.sock if name == "socket" else None

    a, b = socket.socketpair()
    with a, b:
        a.setblocking(False)
        assert not _has_unread(Transport(a))
        b.sendall(b"\x16\x03\x01")
        assert _has_unread(Transport(a))
        assert a.recv(10) == b"\x16\x03\x01"  # still there: peeked, not read
    assert not _has_unread(None)
