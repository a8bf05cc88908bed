"""Transparent listeners behind ``enforcer intercept apply``, in namespaces the test
creates (a pod and a peer host on a bridge): the app dials the peer's address, with no
enforcer address configured, and enforcer routes it by its original destination
(SO_ORIGINAL_DST / IP6T_SO_ORIGINAL_DST), decides on ``to.cidrs``/``to.ports``, and says
where it was going in the flow record; inbound TCP for the app's port reaches the app
through the inbound listener. Not redirected, or aimed at enforcer itself: refused."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from tests.e2e.netns import Netns, Topology, topology
from tests.e2e.proc import EnforcerProcess, enforcer_cmd, write_config
from tests.e2e.test_intercept import NOBODY

APPS = str(Path(__file__).with_name("netapps.py"))
POD, PEER, POD6, PEER6 = "10.9.0.1", "10.9.0.2", "fd09::1", "fd09::2"


def pod_config(flows: Path, relay: str = "auto") -> dict[str, Any]:
    orig = "orig"
    return {
        "version": 1,
        "relay": relay,
        "listeners": [
            {"name": "outbound", "listen": "127.0.0.1:15001", "transparent": True,
             "tls": {"mode": "off"}, "ruleset": "outbound", "upstream": orig},
            {"name": "outbound6", "listen": "[::1]:15001", "transparent": True,
             "tls": {"mode": "off"}, "ruleset": "outbound", "upstream": orig},
            {"name": "inbound", "listen": "0.0.0.0:15006", "transparent": True,
             "tls": {"mode": "off"}, "ruleset": "inbound", "upstream": orig},
        ],
        "upstreams": {orig: {"address": "original_destination"}},
        "rulesets": {
            "outbound": {"default": "deny", "rules": [
                {"name": "peer-echo", "action": "allow",
                 "to": {"cidrs": [f"{PEER}/32", f"{PEER6}/128"], "ports": [7000]}}]},
            "inbound": {"default": "deny", "rules": [
                {"name": "app", "action": "allow", "to": {"ports": [8080]}}]},
        },
        "flow_log": {"sink": f"file:{flows}"},
    }


@dataclass
class Pod:
    topo: Topology
    pod: Netns
    peer: Netns
    flows: Path
    procs: list[subprocess.Popen[bytes]]

    def app(self, ns: Netns, *args: str) -> None:
        proc = ns.popen([sys.executable, APPS, *args], stdout=subprocess.PIPE)
        self.procs.append(proc)
        assert proc.stdout is not None and proc.stdout.readline() == b"ready\n"

    def client(self, ns: Netns, host: str, port: int, size: int = 200_000,
               *, as_app: bool = True) -> dict[str, Any]:
        who = NOBODY if as_app else []
        out = ns.run(*who, sys.executable, APPS, "client", host, str(port), str(size),
                     timeout=60).stdout
        return dict(json.loads(out))

    def records(self, count: int) -> list[dict[str, Any]]:
        deadline = time.monotonic() + 20
        while True:
            lines = self.flows.read_text().splitlines() if self.flows.exists() else []
            if len(lines) >= count or time.monotonic() > deadline:
                return [json.loads(line) for line in lines]
            time.sleep(0.05)


@pytest.fixture(params=["auto", "python"])
def pod(tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[Pod]:
    """The pod, with the native relay (auto) and the Python one (uvloop's transports)."""
    with topology("tp") as topo:
        pod_ns, peer_ns = topo.ns("pod"), topo.ns("peer")
        topo.bridge("br0")
        topo.attach(pod_ns, "br0", "eth0", [f"{POD}/24", f"{POD6}/64"])
        topo.attach(peer_ns, "br0", "eth0", [f"{PEER}/24", f"{PEER6}/64"])
        flows = tmp_path / "flows.jsonl"
        cfg = write_config(tmp_path / "pod.yaml", pod_config(flows, request.param))
        done = pod_ns.run(*enforcer_cmd("intercept", "apply", "--uid", "0",
                                        "--inbound-ports", "8080,8081"), check=False)
        assert done.returncode == 0, done.stderr
        enforcer = EnforcerProcess(cfg, prefix=pod_ns.cmd())
        state = Pod(topo, pod_ns, peer_ns, flows, [])
        try:
            enforcer.wait_bound(3)
            for port in ("7000", "7001"):
                state.app(peer_ns, "echo", "::", port, f"peer{port}")
            for port in ("8080", "8081"):
                state.app(pod_ns, "echo", POD, port, f"pod{port}")
            yield state
        finally:
            enforcer.stop()
            for proc in state.procs:
                proc.kill()
                proc.wait()


def _ok(result: dict[str, Any]) -> None:
    assert result["error"] is None, result
    assert result["received"] == result["sent"], result


def test_outbound_goes_to_the_original_destination_v4_and_v6(pod: Pod) -> None:
    _ok(pod.client(pod.pod, PEER, 7000))
    _ok(pod.client(pod.pod, PEER6, 7000))
    denied = pod.client(pod.pod, PEER, 7001)  # the rules allow port 7000 only
    assert denied["bytes"] == 0, denied
    recs = {(r["listener"], r["original_dst"]["port"], r["original_dst"]["ip"]): r
            for r in pod.records(3)}
    v4 = recs[("outbound", 7000, PEER)]
    assert v4["action"] == "allow" and v4["rule"] == "peer-echo"
    assert v4["upstream"]["address"] == f"{PEER}:7000"
    assert v4["bytes"] == {"from_client": 200_000, "to_client": 200_000}
    v6 = recs[("outbound6", 7000, PEER6)]
    assert v6["action"] == "allow" and v6["upstream"]["address"] == f"[{PEER6}]:7000"
    deny = recs[("outbound", 7001, PEER)]
    assert deny["action"] == "deny" and deny["reason"] == "default"


def test_inbound_reaches_the_app_through_the_inbound_listener(pod: Pod) -> None:
    _ok(pod.client(pod.peer, POD, 8080, as_app=False))
    denied = pod.client(pod.peer, POD, 8081, as_app=False)  # intercepted, not allowed
    assert denied["bytes"] == 0, denied
    recs = {r["original_dst"]["port"]: r for r in pod.records(2)}
    assert recs[8080]["listener"] == "inbound" and recs[8080]["action"] == "allow"
    assert recs[8080]["client"]["ip"] == PEER
    assert recs[8081]["action"] == "deny"


def test_not_redirected_and_loops_are_refused(pod: Pod) -> None:
    direct = pod.client(pod.pod, "127.0.0.1", 15001)  # loopback is never redirected
    assert direct["bytes"] == 0, direct
    loop = pod.client(pod.pod, POD, 15006)  # redirected to 15001, aimed at enforcer
    assert loop["bytes"] == 0, loop
    recs = pod.records(2)
    reasons = sorted((r["reason"], r["action"]) for r in recs)
    assert reasons == [("loop", "deny"), ("not_redirected", "deny")], recs
    looped = next(r for r in recs if r["reason"] == "loop")
    assert looped["original_dst"] == {"ip": POD, "port": 15006}
    assert "own listener" in looped["detail"]
