"""The whole path across hosts, in network namespaces the test creates on one bridge:

    client --> nlb (haproxy, send-proxy-v2 + unique id) --> gw1 | gw2 (enforcer)
           --PROXY v2 + mTLS--> pod B (sidecar, interception) --PROXY v1--> app B
    pod A app --(intercepted, mTLS by A's sidecar)--> pod B

Asserted: the client's address reaches the app (its PROXY v1 line) and every hop's flow
record, with one flow id (haproxy's unique id, adopted by each hop); pod A's app calls pod
B's IP and port with no enforcer address configured and the bytes between the hosts are
TLS (capture); the client dialing pod B's app port directly meets B's sidecar and is
denied by the rules; a PROXY header forged from a host inside trusted_sources without the
gateway's identity is refused; killing one gateway loses no connection on the other;
sha256 of every payload both ways. The configs are files (tests/e2e/configs/) so that
the manifests rendered from deploy/ can replace them.
"""

from __future__ import annotations

import json
import re
import string
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from enforcer.tlsconf.certs import DEMO_CLIENT_ID, DEMO_SERVER_ID, issue
from tests.conftest import require_tool
from tests.e2e.meshnet import (
    APPS,
    CONFIGS,
    Host,
    assert_tls_only,
    capture,
    expected,
    render,
)
from tests.e2e.netns import Topology, topology
from tests.e2e.proc import EnforcerProcess

pytestmark = pytest.mark.slow  # about a minute: six hosts, four enforcers, haproxy

CLIENT, NLB, GW1, GW2, POD_A, POD_B = ("10.9.0.50", "10.9.0.100", "10.9.0.11", "10.9.0.12",
                                       "10.9.0.1", "10.9.0.2")
GATEWAY_ID = "spiffe://enforcer.demo/ns/edge/sa/gateway"
UUID = re.compile(r"^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$")
SIZE = 400_000


@dataclass
class World:
    topo: Topology
    hosts: dict[str, Host]
    ports: dict[str, str]  # host -> its port on the bridge (switch namespace)
    tmp: Path


def sidecar(pki: Any, host: Host, ident: Any, peer_id: str, client_id: str) -> dict[str, Any]:
    return render("sidecar.yaml", CERT=ident.cert, KEY=ident.key, CA=pki.ca, FLOWS=host.flows,
                  NODE=host.ns.name, MESH_CIDR="10.9.0.0/30", MESH_CIDR6="fd09::/126",
                  EXTERNAL_CIDR=f"{CLIENT}/32",
                  INBOUND_MODE="permissive", PEER_ID=peer_id, CLIENT_ID=client_id,
                  GATEWAY_ID=GATEWAY_ID, TRUSTED_SOURCES="10.9.0.0/28", APP_PROXY="v1")


@pytest.fixture
def world(pki: Any, tmp_path: Path) -> Iterator[World]:
    haproxy = require_tool("haproxy")
    gw_cert = issue(pki.base, pki.base / "gateway", name="gateway", spiffe_id=GATEWAY_ID)
    with topology("xh") as topo:
        topo.bridge("br0")
        hosts: dict[str, Host] = {}
        ports: dict[str, str] = {}
        for short, ip in (("client", CLIENT), ("nlb", NLB), ("gw1", GW1), ("gw2", GW2),
                          ("poda", POD_A), ("podb", POD_B)):
            ns = topo.ns(short)
            ports[short] = topo.attach(ns, "br0", "eth0", [f"{ip}/24"])
            hosts[short] = Host(ns, ip, flows=tmp_path / f"{short}.jsonl")
        try:
            b = hosts["podb"]
            b.sidecar(sidecar(pki, b, pki.server, DEMO_CLIENT_ID, DEMO_CLIENT_ID), tmp_path, 4,
                      ["--inbound-ports", "8080,8081"])
            b.app("echo", POD_B, "8080", "podB")
            a = hosts["poda"]
            a.sidecar(sidecar(pki, a, pki.client, DEMO_SERVER_ID, DEMO_SERVER_ID), tmp_path, 4,
                      ["--inbound-ports", "8080"])
            for name in ("gw1", "gw2"):
                gw = hosts[name]
                cfg = render("gateway.yaml", NODE=name, CERT=gw_cert.cert, KEY=gw_cert.key,
                             CA=pki.ca, FLOWS=gw.flows, NLB=NLB, POD_B=POD_B,
                             POD_B_ID=DEMO_SERVER_ID)
                path = tmp_path / f"{name}.yaml"
                path.write_text(json.dumps(cfg))
                gw.enforcer = EnforcerProcess(path, prefix=gw.ns.cmd())
                gw.enforcer.wait_bound(1)
            nlb_cfg = tmp_path / "nlb.cfg"
            nlb_cfg.write_text(string.Template((CONFIGS / "nlb.haproxy.cfg").read_text())
                               .substitute(NLB=NLB, GW1=GW1, GW2=GW2))
            nlb = hosts["nlb"]
            nlb.procs.append(nlb.ns.popen([haproxy, "-db", "-f", str(nlb_cfg)],
                                          stdout=subprocess.DEVNULL, stderr=subprocess.PIPE))
            _wait_listening(nlb, 443)
            yield World(topo, hosts, ports, tmp_path)
        finally:
            for host in hosts.values():
                host.stop()


def _wait_listening(host: Host, port: int) -> None:
    deadline = time.monotonic() + 20
    while f":{port} " not in host.ns.run("ss", "-ltnH").stdout:
        assert time.monotonic() < deadline, f"nothing listens on {port} in {host.ns.name}"
        time.sleep(0.05)


def _flows(host: Host, pred: Any, count: int = 1, timeout: float = 20) -> list[dict[str, Any]]:
    deadline = time.monotonic() + timeout
    while True:
        recs = [r for r in host.records(0) if pred(r)]
        if len(recs) >= count or time.monotonic() > deadline:
            return recs
        time.sleep(0.05)


def _gateway_flows(world: World, pred: Any, count: int = 1) -> list[dict[str, Any]]:
    """Both gateways' records that ``pred`` accepts, once there are ``count`` of them."""
    deadline = time.monotonic() + 20
    while True:
        recs = [r for name in ("gw1", "gw2") for r in world.hosts[name].records(0)
                if pred(r)]
        if len(recs) >= count or time.monotonic() > deadline:
            return recs
        time.sleep(0.05)


def test_the_client_address_and_one_flow_id_reach_every_hop(world: World) -> None:
    client, b = world.hosts["client"], world.hosts["podb"]
    result = client.client(NLB, 443, SIZE, seed=3, as_app=False)
    assert result["error"] is None, result
    assert result["head"].startswith(f"podB proxy={CLIENT}\n")  # the app saw the client
    assert result["received"] == expected(SIZE, 3, f"podB proxy={CLIENT}\n".encode())
    # (haproxy's health checks, PROXY v2 LOCAL every 300 ms, are flows too: from the nlb)
    gw_recs = _gateway_flows(world, lambda r: r["event"] == "flow"
                             and r["client"]["ip"] == CLIENT)
    assert len(gw_recs) == 1, gw_recs
    gw = gw_recs[0]
    assert UUID.match(gw["flow_id"]), gw  # haproxy's unique id, adopted
    assert gw["client"]["ip"] == CLIENT and gw["upstream"]["peer"]["spiffe_id"] == DEMO_SERVER_ID
    side = _flows(b, lambda r: r["flow_id"] == gw["flow_id"])
    assert len(side) == 1, b.records(0)
    rec = side[0]
    assert rec["client"]["ip"] == CLIENT and rec["action"] == "allow"
    assert rec["mesh"] == "mtls" and rec["tls"]["peer"]["spiffe_id"] == GATEWAY_ID
    assert rec["original_dst"] == {"ip": POD_B, "port": 8080}
    assert rec["bytes"]["from_client"] == SIZE == gw["bytes"]["from_client"]


def test_pod_a_calls_pod_b_by_its_address_over_mtls(world: World) -> None:
    a, b = world.hosts["poda"], world.hosts["podb"]
    assert world.topo.switch is not None
    pcap = world.tmp / "a-to-b.pcap"
    with capture(world.topo.switch, world.ports["poda"], "tcp port 8080", pcap):
        result = a.client(POD_B, 8080, SIZE, seed=4)  # the app, with no enforcer address
    assert result["error"] is None, result
    assert result["received"] == expected(SIZE, 4, f"podB proxy={POD_A}\n".encode())
    assert_tls_only(pcap, 8080, SIZE, 4)
    a_rec = _flows(a, lambda r: r["listener"] == "outbound")[0]
    assert a_rec["mesh"] == "mtls" and a_rec["upstream"]["peer"]["spiffe_id"] == DEMO_SERVER_ID
    b_rec = _flows(b, lambda r: r["client"]["ip"] == POD_A)[0]
    assert b_rec["mesh"] == "mtls" and b_rec["tls"]["peer"]["spiffe_id"] == DEMO_CLIENT_ID


def test_a_direct_dial_to_pod_b_is_denied_by_its_sidecar(world: World) -> None:
    client, b = world.hosts["client"], world.hosts["podb"]
    direct = client.client(POD_B, 8080, 1000, as_app=False)
    assert direct["bytes"] == 0, direct
    rec = _flows(b, lambda r: r["client"]["ip"] == CLIENT)[0]
    assert rec["listener"] == "inbound" and rec["mesh"] == "plaintext"
    assert (rec["action"], rec["reason"]) == ("deny", "default")


@pytest.mark.parametrize("with_cert", [True, False])
def test_a_forged_proxy_header_from_inside_trusted_sources_is_refused(
        world: World, pki: Any, with_cert: bool) -> None:
    a, b = world.hosts["poda"], world.hosts["podb"]
    cert = [str(pki.client.cert), str(pki.client.key)] if with_cert else ["-", "-"]
    # root on pod A: enforcer's uid, so not intercepted: straight to pod B's app port
    out = a.ns.run(sys.executable, APPS, "forge", POD_B, "8080", "198.51.100.7", *cert,
                   str(pki.ca)).stdout
    assert json.loads(out)["bytes"] == 0, out
    rec = _flows(b, lambda r: r["client"]["ip"] == POD_A)[0]
    assert rec["close"] == "proxy_protocol_untrusted_identity", rec
    assert rec["upstream"] is None  # refused before any upstream connect
    if with_cert:
        assert rec["tls"]["peer"]["spiffe_id"] == DEMO_CLIENT_ID


def test_killing_one_gateway_loses_no_connection_on_the_other(world: World) -> None:
    client = world.hosts["client"]
    gate = world.tmp / "gate"
    procs = [client.ns.popen([sys.executable, APPS, "slowclient", NLB, "443", str(SIZE),
                              str(10 + i), str(gate)], stdout=subprocess.PIPE)
             for i in range(6)]
    try:
        by_port: dict[int, subprocess.Popen[bytes]] = {}
        for proc in procs:
            assert proc.stdout is not None
            by_port[json.loads(proc.stdout.readline())["port"]] = proc
        via: dict[str, set[int]] = {"gw1": set(), "gw2": set()}
        deadline = time.monotonic() + 20
        while len(via["gw1"] | via["gw2"]) < len(procs) and time.monotonic() < deadline:
            for name in ("gw1", "gw2"):  # open records of the clients' connections
                via[name] |= {r["client"]["port"] for r in world.hosts[name].records(0)
                              if r["event"] == "open" and r["client"]["ip"] == CLIENT}
            time.sleep(0.05)
        assert via["gw1"] and via["gw2"], via  # round robin used both
        gw1 = world.hosts["gw1"]
        assert gw1.enforcer is not None
        gw1.enforcer.stop()  # SIGKILL: the gateway is gone at once
        gate.touch()
        results = {port: json.loads(proc.communicate(timeout=90)[0]) for port, proc
                   in by_port.items()}
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    survivors = [port for port in by_port if port in via["gw2"]]
    for i, port in enumerate(by_port):
        if port in survivors:
            res = results[port]
            assert res["error"] is None, res
            assert res["received"] == expected(SIZE, 10 + i, f"podB proxy={CLIENT}\n".encode())
    after = client.client(NLB, 443, SIZE, seed=30, as_app=False)  # gw2 takes new ones
    assert after["received"] == expected(SIZE, 30, f"podB proxy={CLIENT}\n".encode()), after
