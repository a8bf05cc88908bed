"""The whole path across hosts, with the Kubernetes objects of deploy/ as they render, in
network namespaces the test creates on one bridge:

    client --TLS--> nlb (haproxy, send-proxy-v2 + unique id) --> gw1 | gw2 (deploy/gateway)
           --PROXY v2 + mTLS--> pod B's app port (intercepted: deploy/sidecar) --PROXY v1--> app B
    pod A app --(intercepted, mTLS by A's sidecar)--> pod B

Everything enforcer runs comes from `kubectl kustomize deploy/sidecar` and `deploy/gateway`
(tests/e2e/deployed.py): the ConfigMaps' config.yaml and rules.yaml, with only addresses
(pod and balancer networks, the upstream's host), the TLS directories, the rules file
and the flow log rewritten; the certificates carry the SPIFFE IDs and DNS names of the
rendered Certificates; the interception is `enforcer intercept apply` with the `intercept`
init container's own arguments, run as root, and the sidecar runs as the enforcer
container's uid, the apps as the app container's. So the manifests and the tested
topology cannot drift apart.

Asserted: the client's address reaches the app (its PROXY v1 line) and every hop's flow
record, with one flow id (haproxy's unique id, adopted by each hop); pod A's app calls pod
B's IP and port with no enforcer address configured and the bytes between the hosts are
TLS (capture), over IPv4 and over IPv6 (the pods are dual-stack); a client dialing pod B's app port directly meets B's sidecar: plaintext
refused (mesh.inbound strict), mTLS with an identity the rules do not name denied; a PROXY
header forged from a host inside trusted_sources without the gateway's identity is
refused; killing one gateway loses no connection on the other; sha256 of every payload
both ways.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import string
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml

from enforcer.tlsconf.certs import DEMO_CLIENT_ID, issue
from tests.conftest import require_tool
from tests.e2e import deployed
from tests.e2e.deployed import Doc
from tests.e2e.meshnet import (
    APPS,
    Host,
    as_user,
    assert_tls_only,
    capture,
    expected,
)
from tests.e2e.netns import Topology, topology
from tests.e2e.proc import EnforcerProcess, enforcer_cmd

pytestmark = pytest.mark.slow  # about a minute: six hosts, four enforcers, haproxy

NLB_CFG = Path(__file__).with_name("configs") / "nlb.haproxy.cfg"
SUBNET = "10.9.0.0/24"
CLIENT, NLB, GW1, GW2, POD_A, POD_B = ("10.9.0.50", "10.9.0.100", "10.9.0.11", "10.9.0.12",
                                       "10.9.0.1", "10.9.0.2")
# the pods are dual-stack: an IPv6 address each too (the IPv6 leg, pod A -> pod B)
SUBNET6 = "fd09::/64"
POD_A6, POD_B6 = "fd09::1", "fd09::2"
# Pod A plays a frontend pod (deploy/sidecar's rules let this workload call payments); pod
# B is a payments pod, the gateways are the gateway pods: their identities come from the
# rendered Certificates.
FRONTEND = "spiffe://cluster.local/ns/shop/sa/frontend"
UUID = re.compile(r"^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$")
SIZE = 400_000


@dataclass
class World:
    topo: Topology
    hosts: dict[str, Host]
    ports: dict[str, str]  # host -> its port on the bridge (switch namespace)
    tmp: Path
    app_port: int  # the app's port: what the gateways dial (deploy/gateway's upstream)
    sni: str  # the gateway's public name (its Certificate's dnsName)
    ca: Path
    payments_id: str  # pod B's identity (deploy/sidecar's Certificate)
    gateway_id: str
    side_uid: int  # the sidecar's uid (the interception skips it)
    a_tls: Path  # pod A's mesh certificate directory


def _port(address: str) -> int:
    return int(address.rsplit(":", 1)[1])


def _materials(docs: list[Doc], pki: Any, into: Path, uid: int,
               spiffe_override: str | None = None) -> dict[str, Path]:
    """Each TLS Secret the enforcer container mounts, as a directory (tls.crt, tls.key,
    ca.crt) holding a certificate with the SPIFFE ID and DNS names of the Certificate that
    fills that Secret. Returns mount path -> directory (owned by ``uid``)."""
    spec = deployed.pod_spec(docs)
    volumes = {v["name"]: v for v in spec["volumes"]}
    certs = {c["spec"]["secretName"]: c["spec"] for c in deployed.by_kind(docs, "Certificate")}
    out: dict[str, Path] = {}
    for mount in deployed.container(docs, "enforcer")["volumeMounts"]:
        secret = volumes[mount["name"]].get("secret")
        if secret is None:
            continue
        cert = certs[secret["secretName"]]
        where = into / mount["name"]
        uri = spiffe_override or (cert.get("uris") or [None])[0]
        leaf = issue(pki.base, into / f"{mount['name']}-pki", name=mount["name"],
                     spiffe_id=uri, dns=cert.get("dnsNames", []))
        where.mkdir(parents=True)
        shutil.copy(leaf.cert, where / "tls.crt")
        shutil.copy(leaf.key, where / "tls.key")
        shutil.copy(pki.ca, where / "ca.crt")
        out[mount["mountPath"]] = where
    for path in [into, *into.rglob("*")]:
        os.chown(path, uid, uid)
    return out


def _localize(docs: list[Doc], host: Host, into: Path, tls: dict[str, Path]) -> dict[str, Any]:
    """The rendered config.yaml with what a pod has at other paths rewritten: the TLS
    directories, the rules file (rules.yaml written beside), the flow log (a file, with
    open events)."""
    cfg = deployed.config(docs)
    for material in cfg["tls"].values():
        material["dir"] = str(tls[material["dir"]])
    rules = into / "rules.yaml"
    rules.write_text(deployed.files(docs)["rules.yaml"])
    cfg["rulesets_file"] = str(rules)
    cfg["flow_log"] = {"sink": f"file:{host.flows}", "open_events": True}
    return cfg


def _sidecar_cfg(docs: list[Doc], host: Host, into: Path, tls: dict[str, Path]) -> dict[str, Any]:
    """deploy/sidecar's config; addresses: the pod network is this bridge's subnets (one
    per family, as the manifest's lists)."""
    cfg = _localize(docs, host, into, tls)
    for network in cfg["mesh"]["networks"]:
        network["cidrs"] = [SUBNET, SUBNET6]
    for listener in cfg["listeners"]:
        if "proxy_protocol" in listener:
            listener["proxy_protocol"]["trusted_sources"] = [SUBNET, SUBNET6]
    return cfg


def _gateway_cfg(docs: list[Doc], host: Host, into: Path, tls: dict[str, Path]) -> dict[str, Any]:
    """deploy/gateway's config; addresses: the balancer is ``nlb``, the Service is pod B."""
    cfg = _localize(docs, host, into, tls)
    (listener,) = cfg["listeners"]
    listener["proxy_protocol"]["trusted_sources"] = [f"{NLB}/32"]
    upstream = cfg["upstreams"][listener["upstream"]]
    upstream["address"] = f"{POD_B}:{_port(upstream['address'])}"
    return cfg


@pytest.fixture
def world(pki: Any, tmp_path: Path) -> Iterator[World]:
    haproxy = require_tool("haproxy")
    side, gate = deployed.render("sidecar"), deployed.render("gateway")
    side_uid = deployed.run_as_user(side, "enforcer")
    app_uid = deployed.run_as_user(side, "app")
    intercept = deployed.intercept_args(side)
    gate_cfg = deployed.config(gate)
    app_port = _port(gate_cfg["upstreams"][gate_cfg["listeners"][0]["upstream"]]["address"])
    gw_port = _port(gate_cfg["listeners"][0]["listen"])
    # a directory the sidecars' uid can reach (pytest's tmp_path is root's alone)
    root = Path(tempfile.mkdtemp(prefix="enforcer-xh-"))
    root.chmod(0o755)
    with topology("xh") as topo:
        topo.bridge("br0")
        hosts: dict[str, Host] = {}
        ports: dict[str, str] = {}
        six = {"poda": POD_A6, "podb": POD_B6}
        for short, ip in (("client", CLIENT), ("nlb", NLB), ("gw1", GW1), ("gw2", GW2),
                          ("poda", POD_A), ("podb", POD_B)):
            ns = topo.ns(short)
            addrs = [f"{ip}/24"] + ([f"{six[short]}/64"] if short in six else [])
            ports[short] = topo.attach(ns, "br0", "eth0", addrs)
            hosts[short] = Host(ns, ip, flows=root / short / "flows.jsonl",
                                user=as_user(app_uid))
        try:
            tls_dirs: dict[str, dict[str, Path]] = {}
            for name, override in (("podb", None), ("poda", FRONTEND)):
                pod = hosts[name]
                tls_dirs[name] = _materials(side, pki, root / name, side_uid, override)
                pod.sidecar(_sidecar_cfg(side, pod, root / name, tls_dirs[name]), root / name,
                            len(deployed.config(side)["listeners"]), intercept, uid=side_uid)
            hosts["podb"].app("echo", POD_B, str(app_port), "podB")
            hosts["podb"].app("echo", POD_B6, str(app_port), "podB")  # its IPv6 address
            for name in ("gw1", "gw2"):
                gw = hosts[name]
                tls = _materials(gate, pki, root / name, 0)
                path = root / name / "config.yaml"
                path.write_text(yaml.safe_dump(_gateway_cfg(gate, gw, root / name, tls)))
                gw.enforcer = EnforcerProcess(path, prefix=gw.ns.cmd())
                gw.enforcer.wait_bound(1)
            nlb_cfg = tmp_path / "nlb.cfg"
            nlb_cfg.write_text(string.Template(NLB_CFG.read_text()).substitute(
                NLB=NLB, GW1=GW1, GW2=GW2, GW_PORT=gw_port))
            nlb = hosts["nlb"]
            nlb.procs.append(nlb.ns.popen([haproxy, "-db", "-f", str(nlb_cfg)],
                                          stdout=subprocess.DEVNULL, stderr=subprocess.PIPE))
            _wait_listening(nlb, 443)
            public = deployed.certificate(gate, "enforcer-public-tls")
            yield World(topo, hosts, ports, tmp_path, app_port, public["dnsNames"][0],
                        pki.ca, deployed.spiffe_id(side), deployed.spiffe_id(gate), side_uid,
                        tls_dirs["poda"]["/etc/enforcer/tls"])
        finally:
            for host in hosts.values():
                host.stop()
            shutil.rmtree(root, ignore_errors=True)


def _wait_listening(host: Host, port: int) -> None:
    deadline = time.monotonic() + 20
    while f":{port} " not in host.ns.run("ss", "-ltnH").stdout:
        assert time.monotonic() < deadline, f"nothing listens on {port} in {host.ns.name}"
        time.sleep(0.05)


def _flows(host: Host, pred: Any, count: int = 1, timeout: float = 20) -> list[dict[str, Any]]:
    deadline = time.monotonic() + timeout
    while True:
        recs = [r for r in host.records(0) if r["event"] == "flow" and pred(r)]
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


def _through_nlb(world: World, seed: int) -> dict[str, Any]:
    """The outside client's TLS connection to the balancer, as the gateway's public name."""
    out = world.hosts["client"].ns.run(
        sys.executable, APPS, "tlsclient", NLB, "443", str(SIZE), str(seed), world.sni,
        str(world.ca), timeout=90).stdout
    return dict(json.loads(out))


def test_the_client_address_and_one_flow_id_reach_every_hop(world: World) -> None:
    b = world.hosts["podb"]
    result = _through_nlb(world, 3)
    assert result["error"] is None, result
    assert result["head"].startswith(f"podB proxy={CLIENT}\n")  # the app saw the client
    assert result["received"] == expected(SIZE, 3, f"podB proxy={CLIENT}\n".encode())
    # (haproxy's health checks, PROXY v2 LOCAL every 300 ms, are flows too: from the nlb)
    gw_recs = _gateway_flows(world, lambda r: r["event"] == "flow"
                             and r["client"]["ip"] == CLIENT)
    assert len(gw_recs) == 1, gw_recs
    gw = gw_recs[0]
    assert UUID.match(gw["flow_id"]), gw  # haproxy's unique id, adopted
    assert gw["action"] == "allow" and gw["tls"]["sni"] == world.sni
    assert gw["upstream"]["peer"]["spiffe_id"] == world.payments_id
    side = _flows(b, lambda r: r["flow_id"] == gw["flow_id"])
    assert len(side) == 1, b.records(0)
    rec = side[0]
    assert rec["client"]["ip"] == CLIENT and rec["action"] == "allow"
    assert rec["mesh"] == "mtls" and rec["tls"]["peer"]["spiffe_id"] == world.gateway_id
    assert rec["original_dst"] == {"ip": POD_B, "port": world.app_port}
    assert rec["bytes"]["from_client"] == SIZE == gw["bytes"]["from_client"]


def test_pod_a_calls_pod_b_by_its_address_over_mtls(world: World) -> None:
    a, b = world.hosts["poda"], world.hosts["podb"]
    assert world.topo.switch is not None
    pcap = world.tmp / "a-to-b.pcap"
    with capture(world.topo.switch, world.ports["poda"], f"tcp port {world.app_port}", pcap):
        result = a.client(POD_B, world.app_port, SIZE, seed=4)  # as the app: no enforcer address
    assert result["error"] is None, result
    assert result["received"] == expected(SIZE, 4, f"podB proxy={POD_A}\n".encode())
    assert_tls_only(pcap, world.app_port, SIZE, 4)
    a_rec = _flows(a, lambda r: r["listener"] == "outbound")[0]
    assert a_rec["mesh"] == "mtls" and a_rec["upstream"]["peer"]["spiffe_id"] == world.payments_id
    b_rec = _flows(b, lambda r: r["client"]["ip"] == POD_A)[0]
    assert b_rec["mesh"] == "mtls" and b_rec["tls"]["peer"]["spiffe_id"] == FRONTEND


def test_pod_a_calls_pod_b_over_ipv6(world: World) -> None:
    """The same call to pod B's IPv6 address: A's [::]:15001 takes the ip6 redirect (to
    ::1), B's [::]:15006 the ip6 prerouting one; both sidecars read IP6T_SO_ORIGINAL_DST,
    the app sees pod A's IPv6 address in the PROXY line."""
    a, b = world.hosts["poda"], world.hosts["podb"]
    assert world.topo.switch is not None
    pcap = world.tmp / "a-to-b-v6.pcap"
    with capture(world.topo.switch, world.ports["poda"], f"ip6 and tcp port {world.app_port}",
                 pcap):
        result = a.client(POD_B6, world.app_port, SIZE, seed=6)
    assert result["error"] is None, result
    assert result["received"] == expected(SIZE, 6, f"podB proxy={POD_A6}\n".encode())
    assert_tls_only(pcap, world.app_port, SIZE, 6)
    a_rec = _flows(a, lambda r: r["listener"] == "outbound"
                   and r["original_dst"]["ip"] == POD_B6)[0]
    assert a_rec["mesh"] == "mtls" and a_rec["upstream"]["peer"]["spiffe_id"] == world.payments_id
    assert a_rec["bytes"]["from_client"] == SIZE
    b_rec = _flows(b, lambda r: r["client"]["ip"] == POD_A6)[0]
    assert b_rec["mesh"] == "mtls" and b_rec["tls"]["peer"]["spiffe_id"] == FRONTEND
    assert b_rec["original_dst"] == {"ip": POD_B6, "port": world.app_port}
    assert b_rec["action"] == "allow" and b_rec["bytes"]["from_client"] == SIZE


def test_a_direct_dial_to_pod_b_meets_its_sidecar(world: World, pki: Any) -> None:
    """From outside: plaintext is refused (mesh.inbound strict); mTLS with a certificate
    of the mesh CA whose identity the rules do not name is denied by the rules."""
    client, b = world.hosts["client"], world.hosts["podb"]
    direct = client.client(POD_B, world.app_port, 1000, as_app=False)
    assert direct["bytes"] == 0, direct
    rec = _flows(b, lambda r: r["client"]["ip"] == CLIENT)[0]
    assert rec["listener"] == "inbound" and rec["mesh"] == "plaintext"
    assert (rec["action"], rec["reason"]) == ("deny", "mesh_plaintext_refused")
    assert rec["upstream"] is None
    out = client.ns.run(sys.executable, APPS, "forge", POD_B, str(world.app_port), "-",
                        str(pki.client.cert), str(pki.client.key), str(pki.ca)).stdout
    assert json.loads(out)["bytes"] == 0, out
    recs = _flows(b, lambda r: r["client"]["ip"] == CLIENT, count=2)
    rec = recs[1]
    assert rec["mesh"] == "mtls" and rec["tls"]["peer"]["spiffe_id"] == DEMO_CLIENT_ID
    assert (rec["action"], rec["reason"]) == ("deny", "default") and rec["upstream"] is None


@pytest.mark.parametrize("with_cert", [True, False])
def test_a_forged_proxy_header_from_inside_trusted_sources_is_refused(
        world: World, with_cert: bool) -> None:
    """Pod A's own sidecar uid is not intercepted: straight to pod B's app port, with
    pod A's mesh certificate (a real peer, but not the gateway) or in plaintext."""
    a, b = world.hosts["poda"], world.hosts["podb"]
    tls = world.a_tls
    cert = [str(tls / "tls.crt"), str(tls / "tls.key")] if with_cert else ["-", "-"]
    out = a.ns.run(*as_user(world.side_uid), sys.executable, APPS, "forge", POD_B,
                   str(world.app_port), "198.51.100.7", *cert, str(tls / "ca.crt")).stdout
    assert json.loads(out)["bytes"] == 0, out
    rec = _flows(b, lambda r: r["client"]["ip"] == POD_A)[0]
    assert rec["close"] == "proxy_protocol_untrusted_identity", rec
    assert rec["upstream"] is None  # refused before any upstream connect
    if with_cert:
        assert rec["tls"]["peer"]["spiffe_id"] == FRONTEND


def test_killing_one_gateway_loses_no_connection_on_the_other(world: World) -> None:
    client = world.hosts["client"]
    gate = world.tmp / "gate"
    procs = [client.ns.popen([sys.executable, APPS, "tlsslowclient", NLB, "443", str(SIZE),
                              str(10 + i), str(gate), world.sni, str(world.ca)],
                             stdout=subprocess.PIPE)
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
    assert survivors
    for i, port in enumerate(by_port):
        if port in survivors:
            res = results[port]
            assert res["error"] is None, res
            assert res["received"] == expected(SIZE, 10 + i, f"podB proxy={CLIENT}\n".encode())
    after = _through_nlb(world, 30)  # gw2 takes new ones
    assert after["received"] == expected(SIZE, 30, f"podB proxy={CLIENT}\n".encode()), after


def test_the_interception_is_the_init_containers(world: World) -> None:
    """Pod B's installed rules are what the rendered init container's arguments install
    (`enforcer intercept show` against `show --dry-run` with the same arguments)."""
    b = world.hosts["podb"]
    args = deployed.intercept_args(deployed.render("sidecar"))
    want = b.ns.run(*enforcer_cmd("intercept", "show", "--dry-run", *args)).stdout
    have = b.ns.run(*enforcer_cmd("intercept", "show", *args)).stdout
    assert "redirect to :" in want
    assert deployed.ruleset_words(want) == deployed.ruleset_words(have), (want, have)
