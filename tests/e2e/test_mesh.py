"""Automatic mTLS between enforcers, in namespaces the test creates: two pods (app +
sidecar with interception) and an outside host without enforcer on one bridge.

Pod A's app dials pod B's IP and app port with no enforcer address configured: A's
sidecar upgrades to mTLS (the bytes between the hosts are TLS records, checked on a
capture), B's interception hands it to B's inbound listener, both check the other's
identity by policy. A peer whose identity the rules do not name is refused, with that
identity in the flow record. Outside the mesh, mesh.external decides: plaintext to the
one destination allowed, refused elsewhere. The outside host dialing B's app port
directly still meets B's sidecar: plaintext refused (strict) or denied by the rules
(permissive)."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from enforcer.tlsconf.certs import DEMO_CLIENT_ID, DEMO_SERVER_ID
from tests.e2e.meshnet import Host, assert_tls_only, capture, render
from tests.e2e.netns import Topology, topology

A, B, OUT = "10.9.0.1", "10.9.0.2", "10.9.0.9"
A6, B6 = "fd09::1", "fd09::2"
MESH_CIDR, MESH_CIDR6, EXTERNAL_CIDR = "10.9.0.0/30", "fd09::/126", "10.9.0.9/32"


@dataclass
class Mesh:
    topo: Topology
    a: Host
    b: Host
    out: Host
    capture_if: str  # pod A's port on the bridge (in the switch namespace)


def sidecar_cfg(pki: Any, host: Host, ident: Any, peer_id: str, client_id: str,
                mode: str) -> dict[str, Any]:
    return render("sidecar.yaml", CERT=ident.cert, KEY=ident.key, CA=pki.ca, FLOWS=host.flows,
                  NODE=host.ns.name, MESH_CIDR=MESH_CIDR, MESH_CIDR6=MESH_CIDR6,
                  EXTERNAL_CIDR=EXTERNAL_CIDR,
                  INBOUND_MODE=mode, PEER_ID=peer_id, CLIENT_ID=client_id,
                  GATEWAY_ID="spiffe://enforcer.demo/ns/edge/sa/gateway",
                  TRUSTED_SOURCES=MESH_CIDR, APP_PROXY="off")


pytestmark = pytest.mark.slow  # about 8 s per test (three hosts, two sidecars)


@pytest.fixture
def mesh(request: pytest.FixtureRequest, pki: Any, tmp_path: Path) -> Iterator[Mesh]:
    """The hosts, with both sidecars' mesh.inbound strict unless the test asks for
    permissive (indirect parametrization)."""
    mode = getattr(request, "param", "strict")
    with topology("ms") as topo:
        topo.bridge("br0")
        hosts = {}
        for short, ip, ip6 in (("a", A, A6), ("b", B, B6), ("out", OUT, "fd09::9")):
            ns = topo.ns(short)
            port = topo.attach(ns, "br0", "eth0", [f"{ip}/24", f"{ip6}/64"])
            hosts[short] = (Host(ns, ip, flows=tmp_path / f"{short}.jsonl"), port)
        a, b, out = hosts["a"][0], hosts["b"][0], hosts["out"][0]
        try:
            # A is the client (the outbound identity), B the server (the inbound one)
            a.sidecar(sidecar_cfg(pki, a, pki.client, DEMO_SERVER_ID, DEMO_SERVER_ID,
                                  mode), tmp_path, 4, ["--inbound-ports", "8080"])
            b.sidecar(sidecar_cfg(pki, b, pki.server, DEMO_CLIENT_ID, DEMO_CLIENT_ID,
                                  mode), tmp_path, 4,
                      ["--inbound-ports", "8080,8081"])
            for port in ("8080", "8081"):
                b.app("echo", B, port, "podB")
            b.app("echo", B6, "8080", "podB")
            for port in ("7000", "7001"):
                out.app("echo", OUT, port, "outside")
            yield Mesh(topo, a, b, out, hosts["a"][1])
        finally:
            for host in (a, b, out):
                host.stop()


def _ok(result: dict[str, Any]) -> None:
    assert result["error"] is None, result
    assert result["received"] == result["sent"], result


def test_pod_to_pod_is_mtls_on_the_wire(mesh: Mesh, tmp_path: Path) -> None:
    assert mesh.topo.switch is not None
    pcap = tmp_path / "wire.pcap"
    with capture(mesh.topo.switch, mesh.capture_if, "tcp port 8080", pcap):
        result = mesh.a.client(B, 8080, size=300_000, seed=7)
    _ok(result)
    assert_tls_only(pcap, 8080, 300_000, 7)
    a_rec = next(r for r in mesh.a.records(1) if r["listener"] == "outbound")
    b_rec = next(r for r in mesh.b.records(1) if r["listener"] == "inbound")
    assert a_rec["mesh"] == "mtls" and a_rec["original_dst"] == {"ip": B, "port": 8080}
    assert a_rec["upstream"]["peer"]["spiffe_id"] == DEMO_SERVER_ID
    assert a_rec["upstream"]["tls"] == "mtls" and a_rec["action"] == "allow"
    assert b_rec["mesh"] == "mtls" and b_rec["tls"]["peer"]["spiffe_id"] == DEMO_CLIENT_ID
    assert b_rec["client"]["ip"] == A and b_rec["action"] == "allow"
    assert b_rec["bytes"]["from_client"] == 300_000


def test_pod_to_pod_over_ipv6(mesh: Mesh) -> None:
    _ok(mesh.a.client(B6, 8080, size=200_000, seed=8))
    a_rec = next(r for r in mesh.a.records(1) if r["listener"] == "outbound6")
    assert a_rec["mesh"] == "mtls" and a_rec["original_dst"] == {"ip": B6, "port": 8080}
    assert a_rec["upstream"]["address"] == f"[{B6}]:8080"
    b_rec = next(r for r in mesh.b.records(1) if r["listener"] == "inbound6")
    assert b_rec["mesh"] == "mtls" and b_rec["client"]["ip"] == A6
    assert b_rec["tls"]["peer"]["spiffe_id"] == DEMO_CLIENT_ID


def test_a_peer_the_rules_do_not_name_is_refused(mesh: Mesh) -> None:
    refused = mesh.a.client(B, 8081)  # rules want another identity on 8081
    assert refused["bytes"] == 0, refused
    rec = next(r for r in mesh.a.records(1) if r["original_dst"]["port"] == 8081)
    assert rec["action"] == "deny" and rec["mesh"] == "mtls"
    assert rec["upstream"]["peer"]["spiffe_id"] == DEMO_SERVER_ID


def test_outside_the_mesh_the_external_policy_decides(mesh: Mesh) -> None:
    _ok(mesh.a.client(OUT, 7000))  # allowed in plaintext
    refused = mesh.a.client(OUT, 7001)  # rules would allow; mesh.external does not
    assert refused["bytes"] == 0, refused
    recs = {r["original_dst"]["port"]: r for r in mesh.a.records(2)}
    assert recs[7000]["mesh"] == "external" and recs[7000]["action"] == "allow"
    assert recs[7000]["upstream"]["tls"] == "off"
    assert recs[7001]["close"] == "mesh_external_denied" and recs[7001]["action"] == "deny"
    for mode in ("external", "external_denied"):
        assert mesh.a.metric("enforcer_mesh_connections_total", listener="outbound",
                             mode=mode) == 1


@pytest.mark.parametrize("mesh", ["strict", "permissive"], indirect=True)
def test_a_direct_dial_to_the_app_port_meets_the_sidecar(
        mesh: Mesh, request: pytest.FixtureRequest) -> None:
    direct = mesh.out.client(B, 8080, as_app=False)  # plaintext, from outside the mesh
    assert direct["bytes"] == 0, direct
    rec = mesh.b.records(1)[0]
    assert rec["listener"] == "inbound" and rec["mesh"] == "plaintext"
    assert rec["action"] == "deny" and rec["client"]["ip"] == OUT
    assert mesh.b.metric("enforcer_mesh_connections_total", listener="inbound",
                         mode="plaintext") == 1
    if request.node.callspec.params["mesh"] == "strict":
        assert rec["close"] == "mesh_plaintext_refused"
    else:  # accepted as plaintext, then denied by the rules (they want an identity)
        assert (rec["reason"], rec["rule"]) == ("default", None)
