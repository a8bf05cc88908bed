"""``enforcer policy replay`` end to end: real mTLS clients through a running enforcer make
the flow log; the CLI (a subprocess) replays it against a candidate ruleset and predicts
what changes; then the candidate is deployed and the same clients get exactly the
predicted decisions (bytes checked by sha256 where allowed)."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path
from typing import Any

import yaml

from enforcer.observe.flowlog import encode_record
from tests.e2e.harness import Backend, Enforcer, inbound_cfg, random_bytes, running, sha
from tests.e2e.policy_util import FRONTEND_ID, ctx_for, issue_identity, refused, tls_exchange
from tests.e2e.proc import enforcer_cmd

CURRENT = [
    {"name": "quarantine", "action": "deny", "from": {"cidrs": ["127.0.0.66/32"]}},
    {"name": "frontend", "action": "allow",
     "from": {"identities": ["spiffe://enforcer.demo/ns/shop/sa/*"]}},
    {"name": "ops-by-ou", "action": "allow", "from": {"ou": ["ops"]}},
]
# The candidate drops the OU rule (ops is denied by the default) and lets the bare
# certificate in by its CN.
CANDIDATE = [CURRENT[0], CURRENT[1],
             {"name": "bare-cn", "action": "allow", "from": {"cn": ["bare"]}}]

# who, source address
CLIENTS = [("frontend", None), ("ops", None), ("bare", None), ("frontend", "127.0.0.66")]


async def drive(pki: Any, ids: dict[str, Any], rules: list[dict[str, Any]]
                ) -> tuple[dict[tuple[str, str | None], str], list[dict[str, Any]]]:
    """Each client once through an enforcer with ``rules``: who -> allow/deny, records."""
    backend = await Backend(mode="echo").start()
    enforcer = await Enforcer(inbound_cfg(pki, backend.port, rules=rules)).start()
    seen: dict[tuple[str, str | None], str] = {}
    async with running(enforcer, backend):
        for who, local in CLIENTS:
            payload = random_bytes(50_000)
            got = await tls_exchange(enforcer.port(), payload, ctx_for(pki, ids[who]),
                                     local_ip=local)
            if got:
                assert sha(got) == sha(payload), who
                seen[(who, local)] = "allow"
            else:
                seen[(who, local)] = "deny"
            await enforcer.wait_flows(len(seen))
        records = list(await enforcer.wait_flows(len(CLIENTS)))
        assert backend.connections == list(seen.values()).count("allow")
    return seen, records


def write_config(path: Path, pki: Any, rules: list[dict[str, Any]]) -> Path:
    path.write_text(yaml.safe_dump(inbound_cfg(pki, 9, rules=rules), sort_keys=False))
    return path


def replay(config: Path, flows: Path, *extra: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(enforcer_cmd("policy", "replay", "-c", str(config), "--flows",
                                       str(flows), *extra),
                          capture_output=True, text=True, timeout=60)


async def test_replay_predicts_what_the_candidate_then_decides(pki: Any, tmp_path: Path) -> None:
    ids = {"frontend": issue_identity(pki, tmp_path, "frontend", spiffe_id=FRONTEND_ID),
           "ops": issue_identity(pki, tmp_path, "ops-laptop", ou=["ops"]),
           "bare": issue_identity(pki, tmp_path, "bare")}
    before, records = await drive(pki, ids, CURRENT)
    assert before == {("frontend", None): "allow", ("ops", None): "allow",
                      ("bare", None): "deny", ("frontend", "127.0.0.66"): "deny"}
    flows = tmp_path / "flows.jsonl"
    flows.write_bytes(b"".join(encode_record(r) for r in records))

    same = replay(write_config(tmp_path / "current.yaml", pki, CURRENT), flows)
    assert same.returncode == 0, same.stderr
    assert "replayed 4 flow(s)" in same.stdout and "0 would change" in same.stdout

    candidate = write_config(tmp_path / "candidate.yaml", pki, CANDIDATE)
    res = replay(candidate, flows)
    assert res.returncode == 1, res.stderr
    out = res.stdout
    assert "allowed -> denied: 1" in out and "denied -> allowed: 1" in out
    assert ("the default (deny) of ruleset 'inbound': 1 (recorded: rule 'ops-by-ou' x1)"
            in out)
    assert "rule 'bare-cn' of ruleset 'inbound': 1 (recorded: the default x1)" in out
    assert "identity=ops-laptop" in out and "unchanged: 2" in out

    res = replay(candidate, flows, "--format", "json")
    assert res.returncode == 1
    doc = json.loads(res.stdout)
    assert [g["decided_by"] for g in doc["allow_to_deny"]] == [
        "the default (deny) of ruleset 'inbound'"]
    predicted = dict(before)
    for group, action in ((doc["allow_to_deny"], "deny"), (doc["deny_to_allow"], "allow")):
        for g in group:
            for ex in g["examples"]:
                rec = next(r for r in records if r["flow_id"] == ex["flow_id"])
                who = next(k for k, v in ids.items()
                           if rec["tls"]["peer"]["serial"] == _serial(v.cert))
                local = rec["client"]["ip"] if rec["client"]["ip"] != "127.0.0.1" else None
                predicted[(who, local)] = action

    after, new_records = await drive(pki, ids, CANDIDATE)
    assert after == predicted  # the deployed candidate does what replay said
    assert after[("ops", None)] == "deny" and after[("bare", None)] == "allow"
    flows.write_bytes(b"".join(encode_record(r) for r in new_records))
    assert replay(candidate, flows).returncode == 0


def _serial(cert: Path) -> str:
    from cryptography import x509

    return format(x509.load_pem_x509_certificate(cert.read_bytes()).serial_number, "x")


async def test_replay_of_denied_flows_from_a_refusing_client(pki: Any, tmp_path: Path) -> None:
    """A client the running rules refuse outright (no certificate on a client_auth optional
    listener) is recorded as a plain TLS flow without a peer; a candidate allowing
    tls-without-certificate clients from loopback turns it around."""
    backend = await Backend(mode="echo").start()
    rules = [{"name": "mesh", "action": "allow", "from": {"tls": "required"}}]
    enforcer = await Enforcer(inbound_cfg(pki, backend.port, client_auth="optional",
                                          rules=rules)).start()
    async with running(enforcer, backend):
        assert await refused(enforcer.port(), ctx_for(pki, None)) == b""
        (rec,) = await enforcer.wait_flows(1)
    assert rec["action"] == "deny" and rec["tls"]["peer"] is None
    flows = tmp_path / "flows.jsonl"
    flows.write_bytes(encode_record(rec))
    cfg = inbound_cfg(pki, 9, client_auth="optional", rules=[
        *rules, {"name": "loopback", "action": "allow", "from": {"cidrs": ["127.0.0.0/8"]}}])
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(cfg))
    res = replay(tmp_path / "c.yaml", flows)
    assert res.returncode == 1
    assert "rule 'loopback' of ruleset 'inbound': 1 (recorded: the default x1)" in res.stdout
