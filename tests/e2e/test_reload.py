"""Reloading rulesets under a running enforcer (in-process ``Server`` built from files on
disk): new connections follow the new rules, open ones keep their decision (or are closed
with ``reevaluate_on_reload``), a broken file keeps the last good rules, only the kind of
state whose files changed is reloaded, and the Kubernetes ``..data`` symlink swap is seen.

Most tests call ``Reloader.poll()`` themselves (the watcher's interval is set to an hour)
so each step is deterministic; one test runs the real watcher."""

from __future__ import annotations

import os
import shutil
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from enforcer.config.loader import load_config, parse_config
from enforcer.observe.flowlog import MemoryFlowLog
from enforcer.observe.metrics import Metrics
from enforcer.runtime.server import Server
from enforcer.tlsconf.certs import DEMO_SERVER_ID, IssuedPaths, issue
from tests.e2e.harness import Backend, inbound_cfg, random_bytes, sha
from tests.e2e.policy_util import (
    FRONTEND_ID,
    close_quietly,
    ctx_for,
    decisions,
    issue_identity,
    open_tls,
    reloads,
    tls_exchange,
    wait_until,
    write_rules,
)
from tests.e2e.proc import write_config

FRONTEND_RULE = {"name": "frontend", "action": "allow", "from": {"identities": [FRONTEND_ID]}}
OPS_RULE = {"name": "ops", "action": "allow", "from": {"ou": ["ops"]}}


def ruleset(*rules: dict[str, Any], reevaluate: bool = False) -> dict[str, Any]:
    out: dict[str, Any] = {"inbound": {"default": "deny", "rules": list(rules)}}
    if reevaluate:
        out["inbound"]["reevaluate_on_reload"] = True
    return out


class Peers:
    def __init__(self, pki: Any, out: Path) -> None:
        self.pki = pki
        self.frontend = issue_identity(pki, out, "frontend", spiffe_id=FRONTEND_ID)
        self.ops = issue_identity(pki, out, "ops", ou=["ops"])
        self.other = issue_identity(pki, out, "other", spiffe_id="spiffe://enforcer.demo/x")

    def ctx(self, who: IssuedPaths) -> Any:
        return ctx_for(self.pki, who)


class Running:
    """An in-process Server on a config file with ``rulesets_file``, plus an echo backend."""

    def __init__(self, server: Server, backend: Backend, rules: Path) -> None:
        self.server = server
        self.backend = backend
        self.rules = rules
        assert isinstance(server.flowlog, MemoryFlowLog)
        self.flows: list[dict[str, Any]] = server.flowlog.records
        self.metrics = server.metrics

    @property
    def port(self) -> int:
        return self.server.plane.listeners[0].local_port

    async def wait_flows(self, n: int) -> list[dict[str, Any]]:
        await wait_until(lambda: len(self.flows) >= n)
        return self.flows

    async def allowed(self, peers: Peers, who: IssuedPaths) -> bool:
        payload = random_bytes(50_000)
        got = await tls_exchange(self.port, payload, peers.ctx(who))
        assert got in (b"", payload), "partial relay"
        return sha(got) == sha(payload)


def copy_material(pki: Any, into: Path) -> dict[str, str]:
    into.mkdir(parents=True, exist_ok=True)
    for part, src in (("tls.crt", pki.server.cert), ("tls.key", pki.server.key),
                      ("ca.crt", pki.ca)):
        shutil.copy(src, into / part)
    return {"cert": str(into / "tls.crt"), "key": str(into / "tls.key"),
            "ca": str(into / "ca.crt")}


@pytest.fixture
async def running(pki: Any, tmp_path: Path) -> AsyncIterator[Any]:
    made: list[Running] = []

    async def start(rules: dict[str, Any], *, rules_path: Path | None = None,
                    interval: float = 3600) -> Running:
        backend = await Backend(mode="echo").start()
        path = rules_path or write_rules(tmp_path / "rules.yaml", rules)
        cfg = inbound_cfg(pki, backend.port, limits={"drain_timeout": "1s"})
        del cfg["rulesets"]
        cfg["rulesets_file"] = str(path)
        cfg["tls"]["mesh"] = copy_material(pki, tmp_path / "tls")
        server = Server(load_config(str(write_config(tmp_path / "enforcer.yaml", cfg))),
                        metrics=Metrics(), flowlog=MemoryFlowLog())
        server.reloader.interval = interval
        await server.start()
        made.append(Running(server, backend, path))
        return made[-1]

    yield start
    for r in made:
        await r.server.shutdown()
        await r.backend.close()


async def test_new_connections_follow_new_rules_and_a_broken_file_keeps_the_old(
        running: Any, pki: Any, tmp_path: Path) -> None:
    peers = Peers(pki, tmp_path / "peers")
    r = await running(ruleset(FRONTEND_RULE))
    assert await r.allowed(peers, peers.frontend)
    assert not await r.allowed(peers, peers.ops)

    # a connection open across the reloads keeps its decision (no reevaluate_on_reload)
    reader, writer = await open_tls(r.port, peers.ctx(peers.frontend))
    first = random_bytes(64_000)
    writer.write(first)
    assert sha(await reader.readexactly(len(first))) == sha(first)

    write_rules(r.rules, ruleset(OPS_RULE))
    assert r.server.reloader.poll() == ["rulesets"]
    assert reloads(r.metrics, "rulesets", "ok") == 1
    assert not await r.allowed(peers, peers.frontend)
    assert await r.allowed(peers, peers.ops)

    broken = ruleset({**OPS_RULE, "from": {"ou": ["ops"], "cidrs": ["10.0.0.0/33"]}})
    broken["inbound"]["rules"].append({"name": "typo", "action": "allow", "form": {}})
    write_rules(r.rules, broken)
    assert r.server.reloader.poll() == ["rulesets"]
    assert reloads(r.metrics, "rulesets", "error") == 1
    status = r.server.status()["reloads"]["rulesets"]
    assert status["result"] == "error"
    assert "rulesets.inbound.rules[0].from.cidrs[0]: bad CIDR '10.0.0.0/33'" in status["last_error"]
    assert "rulesets.inbound.rules[1].form: unknown key" in status["last_error"]
    assert not await r.allowed(peers, peers.frontend), "the broken file changed the rules"
    assert await r.allowed(peers, peers.ops), "the last good rules were dropped"
    assert r.server.reloader.poll() == [], "an unchanged broken file is retried"

    second = random_bytes(64_000)  # still relaying, under the rules it was allowed by
    writer.write(second)
    assert sha(await reader.readexactly(len(second))) == sha(second)
    await close_quietly(writer)

    write_rules(r.rules, ruleset(FRONTEND_RULE, OPS_RULE))
    assert r.server.reloader.poll() == ["rulesets"]
    assert await r.allowed(peers, peers.frontend)
    assert r.server.status()["reloads"]["rulesets"]["last_error"] is None

    flows = await r.wait_flows(8)
    summary = [(f["action"], f["rule"], f["reason"]) for f in flows]
    assert summary.count(("allow", "frontend", "rule")) == 3  # incl. the long-lived one
    assert summary.count(("allow", "ops", "rule")) == 2
    assert summary.count(("deny", None, "default")) == 3
    long_lived = [f for f in flows if f["bytes"]["from_client"] == len(first) + len(second)]
    assert [(f["action"], f["rule"]) for f in long_lived] == [("allow", "frontend")]
    assert r.backend.connections == 5
    assert reloads(r.metrics, "rulesets", "ok") == 2
    assert reloads(r.metrics, "tls", "ok") == reloads(r.metrics, "tls", "error") == 0


async def test_reevaluate_on_reload_closes_connections_now_denied(
        running: Any, pki: Any, tmp_path: Path) -> None:
    peers = Peers(pki, tmp_path / "peers")
    r = await running(ruleset(FRONTEND_RULE, OPS_RULE,
                              {"name": "others", "action": "allow",
                               "from": {"trust_domains": ["enforcer.demo"]}},
                              reevaluate=True))
    conns = {}
    for who in (peers.frontend, peers.ops, peers.other):
        reader, writer = await open_tls(r.port, peers.ctx(who))
        data = random_bytes(10_000)
        writer.write(data)
        assert sha(await reader.readexactly(len(data))) == sha(data)
        conns[who.cert.stem] = (reader, writer)

    write_rules(r.rules, ruleset(
        {"name": "frontend-revoked", "action": "deny", "from": {"identities": [FRONTEND_ID]}},
        OPS_RULE, reevaluate=True))
    assert r.server.reloader.poll() == ["rulesets"]

    flows = await r.wait_flows(2)
    closed = sorted(((f["action"], f["close"], f["rule"], f["reason"],
                      f["tls"]["peer"]["spiffe_id"]) for f in flows), key=str)
    assert closed == sorted([
        ("deny", "policy_reload", "frontend-revoked", "rule", FRONTEND_ID),
        ("deny", "policy_reload", None, "default", "spiffe://enforcer.demo/x"),
    ], key=str)
    assert all(f["bytes"]["from_client"] == 10_000 for f in flows)
    for name in ("frontend", "other"):
        reader, writer = conns[name]
        assert await reader.read() == b""  # closed by the enforcer
        await close_quietly(writer)

    reader, writer = conns["ops"]  # still allowed: keeps relaying
    more = random_bytes(50_000)
    writer.write(more)
    assert sha(await reader.readexactly(len(more))) == sha(more)
    await close_quietly(writer)

    m = r.metrics
    assert decisions(m, "inbound", "inbound", "frontend-revoked", "deny") == 1
    assert decisions(m, "inbound", "inbound", "", "deny") == 1
    assert m.registry.get_sample_value("enforcer_connections_total",
                                       {"listener": "inbound", "action": "deny"}) == 2
    assert not await r.allowed(peers, peers.frontend)  # and new ones follow the new rules


async def test_kubernetes_configmap_symlink_swap_is_seen_by_the_watcher(
        running: Any, pki: Any, tmp_path: Path) -> None:
    peers = Peers(pki, tmp_path / "peers")
    mount = tmp_path / "configmap"
    configmap_version(mount, "..2026_11_23_19_50_00.1", ruleset(FRONTEND_RULE))
    (mount / "rules.yaml").symlink_to("..data/rules.yaml")
    r = await running({}, rules_path=mount / "rules.yaml", interval=0.05)
    assert await r.allowed(peers, peers.frontend)
    assert not await r.allowed(peers, peers.ops)

    configmap_version(mount, "..2026_11_23_19_55_00.2", ruleset(OPS_RULE))
    await wait_until(lambda: reloads(r.metrics, "rulesets", "ok") == 1)
    assert not await r.allowed(peers, peers.frontend)
    assert await r.allowed(peers, peers.ops)
    assert reloads(r.metrics, "rulesets", "error") == 0
    assert not (mount / "..2026_11_23_19_50_00.1").exists()


def configmap_version(mount: Path, version: str, rulesets: dict[str, Any]) -> None:
    """What the kubelet does: write the new files into a fresh timestamped directory,
    point ``..data_tmp`` at it, rename that over ``..data`` atomically, then delete the
    old directory."""
    mount.mkdir(exist_ok=True)
    (mount / version).mkdir()
    write_rules(mount / version / "rules.yaml", rulesets)
    data = mount / "..data"
    old = os.readlink(data) if data.is_symlink() else None
    (mount / "..data_tmp").symlink_to(version)
    os.rename(mount / "..data_tmp", data)
    if old is not None:
        shutil.rmtree(mount / old)


async def test_only_the_kind_whose_files_changed_is_reloaded(
        running: Any, pki: Any, tmp_path: Path) -> None:
    peers = Peers(pki, tmp_path / "peers")
    r = await running(ruleset(FRONTEND_RULE))
    assert r.server.reloader.poll() == []

    tls = tmp_path / "tls"  # a renewed server certificate: same identity, new key
    new = issue(pki.base, tmp_path / "renewed", name="server", spiffe_id=DEMO_SERVER_ID,
                dns=["localhost"], ips=["127.0.0.1"])
    shutil.copy(new.key, tls / "tls.key.new")
    shutil.copy(new.cert, tls / "tls.crt.new")
    os.replace(tls / "tls.key.new", tls / "tls.key")
    os.replace(tls / "tls.crt.new", tls / "tls.crt")
    assert r.server.reloader.poll() == ["tls"]
    assert reloads(r.metrics, "tls", "ok") == 1
    assert reloads(r.metrics, "rulesets", "ok") == reloads(r.metrics, "rulesets", "error") == 0
    assert await r.allowed(peers, peers.frontend)

    write_rules(r.rules, ruleset(OPS_RULE))
    assert r.server.reloader.poll() == ["rulesets"]
    assert (reloads(r.metrics, "tls", "ok"), reloads(r.metrics, "rulesets", "ok")) == (1, 1)

    before = r.server.status()["reloads"]["tls"]["last_attempt"]
    r.server.reloader.reload_now()  # SIGHUP: both are attempted, and counted
    assert reloads(r.metrics, "rulesets", "ok") == 2
    assert reloads(r.metrics, "tls", "ok") == 2  # also with the material bytes unchanged
    tls_status = r.server.status()["reloads"]["tls"]
    assert tls_status["last_attempt"] > before and tls_status["result"] == "ok"
    assert r.server.reloader.poll() == []
    assert await r.allowed(peers, peers.ops)


async def test_a_rules_file_that_drops_a_running_listeners_ruleset_is_refused(
        running: Any, pki: Any, tmp_path: Path) -> None:
    peers = Peers(pki, tmp_path / "peers")
    r = await running(ruleset(FRONTEND_RULE))
    write_rules(r.rules, {"renamed": {"default": "allow"}})
    r.server.reloader.poll()
    write_rules(r.rules, ruleset({**FRONTEND_RULE, "to": {"listeners": ["outbound"]}}))
    r.server.reloader.poll()
    assert reloads(r.metrics, "rulesets", "error") == 2
    error = r.server.status()["reloads"]["rulesets"]["last_error"]
    assert "rulesets.inbound.rules[0].to.listeners[0]: unknown listener 'outbound' " \
           "(known: inbound)" in error
    assert await r.allowed(peers, peers.frontend)
    assert not await r.allowed(peers, peers.ops)


async def test_a_config_built_in_memory_reloads_its_rules_file(pki: Any, tmp_path: Path) -> None:
    """No config file to read again: the rules file is merged over the inline rulesets."""
    peers = Peers(pki, tmp_path / "peers")
    backend = await Backend(mode="echo").start()
    rules = write_rules(tmp_path / "rules.yaml", ruleset(FRONTEND_RULE))
    cfg = inbound_cfg(pki, backend.port, limits={"drain_timeout": "1s"})
    cfg["listeners"].append(dict(cfg["listeners"][0], name="side", ruleset="inline"))
    cfg["rulesets"] = {"inline": {"default": "allow"}}
    cfg["rulesets_file"] = str(rules)
    server = Server(parse_config(cfg), metrics=Metrics(), flowlog=MemoryFlowLog())
    server.reloader.interval = 3600
    await server.start()
    r = Running(server, backend, rules)
    try:
        write_rules(rules, ruleset(OPS_RULE))
        assert server.reloader.poll() == ["rulesets"]
        assert sorted(server.plane.rulesets) == ["inbound", "inline"]
        assert await r.allowed(peers, peers.ops) and not await r.allowed(peers, peers.frontend)
        write_rules(rules, {**ruleset(OPS_RULE), "inline": {"default": "deny"}})
        assert server.reloader.poll() == ["rulesets"]
        assert "ruleset 'inline' is defined both inline and in" in \
            server.status()["reloads"]["rulesets"]["last_error"]
        assert await r.allowed(peers, peers.ops)
    finally:
        await server.shutdown()
        await backend.close()
