"""``enforcer policy replay``: reading flow records (every malformed line named by file and
line number, never a traceback), re-deciding them with a candidate, grouping, exit codes;
and a bounded hypothesis fuzz of the reader."""

from __future__ import annotations

import io
import json
from pathlib import Path
from typing import Any

import orjson
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from enforcer.cli.main import main
from enforcer.policy.replay import (
    MAX_LINE,
    IdentityCache,
    RecordedFlow,
    ReplayInputError,
    Skipped,
    parse_line,
    split_lines,
)

FRONTEND = "spiffe://cluster.local/ns/shop/sa/frontend"
DB = "spiffe://cluster.local/ns/db/sa/pg"
CONFIG = """
version: 1
node: {name: test}
tls:
  mesh: {cert: /nonexistent/tls.crt, key: /nonexistent/tls.key, ca: /nonexistent/ca.crt}
listeners:
  - name: inbound
    listen: 127.0.0.1:15006
    proxy_protocol: {accept: optional, trusted_sources: [127.0.0.0/8]}
    tls: {mode: terminate, material: mesh}
    ruleset: inbound
    upstream: app
  - name: outbound
    listen: 127.0.0.1:15001
    tls: {mode: "off"}
    ruleset: outbound
    upstream: db
upstreams:
  app: {address: 127.0.0.1:8080}
  db:
    address: db.shop:5432
    tls: {mode: mtls, material: mesh}
rulesets:
  inbound:
    default: deny
    rules:
%s
  outbound:
    default: deny
    rules:
      - name: to-db
        action: allow
        to: {server_identities: ["%s"]}
"""
FRONTEND_RULE = """      - name: frontend
        action: allow
        from: {identities: ["spiffe://cluster.local/ns/shop/**"]}"""
VPCE_RULE = """      - name: via-endpoint
        action: allow
        from: {tlvs: {aws_vpce_id: ["vpce-0abc*"]}}"""
QUARANTINE = """      - name: quarantine
        action: deny
        from: {cidrs: [10.66.0.0/16]}"""


def peer(spiffe_id: str | None = FRONTEND, **kw: Any) -> dict[str, Any]:
    out: dict[str, Any] = {"spiffe_id": spiffe_id, "cn": "frontend", "dns": [],
                           "uri": [spiffe_id] if spiffe_id else [], "ip": [], "ou": [],
                           "spki_sha256": "pin", "serial": "1f",
                           "not_after": "2030-01-01T00:00:00Z"}
    out.update(kw)
    return out


def record(action: str = "allow", rule: str | None = "frontend", *, listener: str = "inbound",
           client: str = "10.1.2.3", identity: dict[str, Any] | None = None,
           tlvs: dict[str, Any] | None = None, upstream: dict[str, Any] | None = None,
           event: str = "flow", flow_id: str = "01FLOW") -> dict[str, Any]:
    return {
        "ts": "2026-11-23T19:50:00.123456Z", "event": event, "flow_id": flow_id,
        "node": "n", "listener": listener, "action": action,
        "ruleset": "inbound" if listener == "inbound" else "outbound", "rule": rule,
        "reason": "rule" if rule else ("default" if action != "error" else "connect_failed"),
        "client": {"ip": client, "port": 40000}, "peer": {"ip": client, "port": 40000},
        "local": {"ip": "127.0.0.1", "port": 15006},
        "proxy_protocol": None if tlvs is None else {"version": 2, "command": "PROXY",
                                                     "tlvs": tlvs},
        "tls": {"version": "TLSv1.3", "cipher": "TLS_AES_128_GCM_SHA256", "sni": None,
                "resumed": False, "peer": identity if identity is not None else peer()},
        "upstream": upstream, "relay": "native", "bytes": {"from_client": 1, "to_client": 1},
        "duration_s": 0.1, "close": "client_fin"}


def lines(*records: dict[str, Any] | bytes) -> bytes:
    return b"".join(r if isinstance(r, bytes) else orjson.dumps(r) + b"\n" for r in records)


@pytest.fixture
def files(tmp_path: Path) -> Any:
    def make(rules: str, flows: bytes, server: str = DB) -> tuple[str, str]:
        cfg = tmp_path / "candidate.yaml"
        cfg.write_text(CONFIG % (rules, server))
        log = tmp_path / "flows.jsonl"
        log.write_bytes(flows)
        return str(cfg), str(log)
    return make


def run(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    code = main(["policy", "replay", *args])
    out, err = capsys.readouterr()
    return code, out, err


# ---------------------------------------------------------------------------- decisions
def test_unchanged_flows_exit_0(files: Any, capsys: pytest.CaptureFixture[str]) -> None:
    cfg, log = files(FRONTEND_RULE, lines(record(), record("deny", None, identity=peer(
        "spiffe://cluster.local/ns/other/sa/x"))))
    code, out, err = run(capsys, "-c", cfg, "--flows", log)
    assert code == 0, err
    assert "replayed 2 flow(s)" in out and "0 would change" in out and "unchanged: 2" in out


def test_changes_both_ways_grouped_by_deciding_rule(files: Any,
                                                    capsys: pytest.CaptureFixture[str]) -> None:
    flows = lines(
        record(client="10.66.0.1", flow_id="A"),  # allowed before; quarantine denies now
        record(client="10.66.0.2", flow_id="B"),
        record(client="10.1.0.1", flow_id="C"),  # stays allowed
        record("deny", None, identity=peer("spiffe://cluster.local/ns/x/sa/y"),
               tlvs={"aws_vpce_id": "vpce-0abc1"}, flow_id="D"),  # endpoint rule allows
    )
    cfg, log = files("\n".join([QUARANTINE, FRONTEND_RULE, VPCE_RULE]), flows)
    code, out, err = run(capsys, "-c", cfg, "--flows", log, "--examples", "1")
    assert code == 1, err
    text = out.splitlines()
    assert "allowed -> denied: 2" in text
    assert "  rule 'quarantine' of ruleset 'inbound': 2 (recorded: rule 'frontend' x2)" in text
    assert any(line.startswith("    A ") and "source=10.66.0.1" in line for line in text)
    assert "    ... 1 more" in text
    assert "denied -> allowed: 1" in text
    assert "  rule 'via-endpoint' of ruleset 'inbound': 1 (recorded: the default x1)" in text
    assert any("tlv.aws_vpce_id=vpce-0abc1" in line for line in text)
    assert "unchanged: 1" in text


def test_json_report(files: Any, capsys: pytest.CaptureFixture[str]) -> None:
    cfg, log = files(QUARANTINE, lines(record(client="10.66.0.1")))
    code, out, _ = run(capsys, "-c", cfg, "--flows", log, "--format", "json")
    assert code == 1
    doc = json.loads(out)
    assert doc["changed"] == 1 and doc["replayed"] == 1
    (group,) = doc["allow_to_deny"]
    assert group["decided_by"] == "rule 'quarantine' of ruleset 'inbound'"
    assert group["recorded"] == {"rule 'frontend'": 1}
    assert group["examples"][0]["flow_id"] == "01FLOW"


def test_records_without_a_decision_are_skipped(files: Any,
                                                capsys: pytest.CaptureFixture[str]) -> None:
    cfg, log = files(FRONTEND_RULE, lines(record(event="open"), record("error", None),
                                          b"\n", record()))
    code, out, _ = run(capsys, "-c", cfg, "--flows", log)
    assert code == 0
    assert "skipped (no decision recorded): 2 (action error: 1, event open: 1)" in out


def test_server_identity_decisions(files: Any, capsys: pytest.CaptureFixture[str]) -> None:
    """An outbound flow that reached the upstream carries its identity and is re-decided;
    one that was denied before connecting cannot be, unless the candidate's deny is certain
    without it."""
    db = {"name": "db", "address": "db.shop:5432", "tls": "mtls", "peer": peer(DB, cn="pg")}
    reached = record(listener="outbound", rule="to-db", upstream=db, identity=None)
    reached["tls"] = None
    never = record("deny", None, listener="outbound", flow_id="N")
    never["tls"] = None
    cfg, log = files(FRONTEND_RULE, lines(reached, never))
    code, out, _ = run(capsys, "-c", cfg, "--flows", log)
    assert code == 1
    assert "unchanged: 1" in out
    assert ("cannot be re-decided: 1" in out and "depends on the upstream's verified identity"
            in out)
    cfg, log = files(FRONTEND_RULE, lines(reached), server="spiffe://cluster.local/ns/db/sa/new")
    code, out, _ = run(capsys, "-c", cfg, "--flows", log)
    assert code == 1
    assert "the default (deny) of ruleset 'outbound': 1 (recorded: rule 'to-db' x1)" in out


def test_listener_missing_from_candidate(files: Any, capsys: pytest.CaptureFixture[str]) -> None:
    cfg, log = files(FRONTEND_RULE, lines(record(listener="gone")))
    code, out, _ = run(capsys, "-c", cfg, "--flows", log)
    assert code == 1
    assert "listener 'gone' is not in the candidate config: 1" in out


def test_rulesets_file_candidate(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    rules = tmp_path / "rules.yaml"
    rules.write_text("rulesets:\n  inbound:\n    default: deny\n    rules:\n" + QUARANTINE + "\n")
    log = tmp_path / "f.jsonl"
    log.write_bytes(lines(record(client="10.1.1.1"), record("deny", "quarantine",
                                                              client="10.66.1.2")))
    code, out, _ = run(capsys, "-c", str(rules), "--flows", str(log))
    assert code == 1
    assert "the default (deny) of ruleset 'inbound': 1 (recorded: rule 'frontend' x1)" in out
    assert "unchanged: 1" in out


def test_stdin_and_several_files(files: Any, capsys: pytest.CaptureFixture[str],
                                 monkeypatch: pytest.MonkeyPatch) -> None:
    cfg, log = files(FRONTEND_RULE, lines(record()))
    monkeypatch.setattr("sys.stdin", io.TextIOWrapper(io.BytesIO(lines(record(), record()))))
    code, out, _ = run(capsys, "-c", cfg, "--flows", log, "--flows", "-")
    assert code == 0 and "replayed 3 flow(s)" in out


def test_empty_flow_log_warns(files: Any, capsys: pytest.CaptureFixture[str]) -> None:
    cfg, log = files(FRONTEND_RULE, b"")
    code, _, err = run(capsys, "-c", cfg, "--flows", log)
    assert code == 0 and "no flow record with a decision" in err


# ---------------------------------------------------------------------------- bad input
@pytest.mark.parametrize(("line", "message"), [
    (b"{not json\n", "not JSON"),
    (b"[1, 2]\n", "the line: expected a JSON object, got a list"),
    (b'{"event": "flow"}\n', "action: missing"),
    (b'{"event": "flow", "action": "maybe"}\n', "action: expected allow, deny or error"),
    (b'{"event": "flow", "action": "allow"}\n', "listener: missing"),
    (b'{"event": 3, "action": "allow"}\n', "event: expected a string, got a number"),
    (b"\xff\xfe garbage\n", "not JSON"),
])
def test_malformed_lines_name_file_and_line(files: Any, capsys: pytest.CaptureFixture[str],
                                            line: bytes, message: str) -> None:
    cfg, log = files(FRONTEND_RULE, lines(record()) + line)
    code, out, err = run(capsys, "-c", cfg, "--flows", log)
    assert code == 2 and out == ""
    assert f"enforcer: error: {log}:2: {message}" in err
    assert "Traceback" not in err


@pytest.mark.parametrize(("mutate", "message"), [
    (lambda r: r["client"].update(ip="10.1.2"), "client.ip: '10.1.2' is not an IP address"),
    (lambda r: r["local"].update(port=70000), "local.port: expected a port number"),
    (lambda r: r["local"].update(port=True), "local.port: expected a port number"),
    (lambda r: r["tls"]["peer"].update(spiffe_id="spiffe://BAD/x"),
     "tls.peer.spiffe_id: 'spiffe://BAD/x' is not a SPIFFE ID"),
    (lambda r: r["tls"]["peer"].update(dns="a.b"), "tls.peer.dns: expected a list of strings"),
    (lambda r: r["tls"]["peer"].update(not_after="soon"), "tls.peer.not_after: 'soon' is not"),
    (lambda r: r["tls"].update(peer=[]), "tls.peer: expected a JSON object, got a list"),
    (lambda r: r.update(proxy_protocol={"tlvs": {"authority": ["x"]}}),
     "proxy_protocol.tlvs.authority: expected a string or a number, got a list"),
    (lambda r: r.update(upstream={"address": "nowhere"}),
     "upstream.address: 'nowhere' is not host:port"),
])
def test_malformed_fields_name_their_key_path(files: Any, capsys: pytest.CaptureFixture[str],
                                              mutate: Any, message: str) -> None:
    bad = record()
    mutate(bad)
    cfg, log = files(FRONTEND_RULE, lines(bad))
    code, _, err = run(capsys, "-c", cfg, "--flows", log)
    assert code == 2
    assert f"{log}:1: {message}" in err, err


def test_overlong_line(files: Any, capsys: pytest.CaptureFixture[str]) -> None:
    cfg, log = files(FRONTEND_RULE, lines(record(), b"x" * (MAX_LINE + 10) + b"\n", record()))
    code, _, err = run(capsys, "-c", cfg, "--flows", log)
    assert code == 2 and f"{log}:2: line longer than {MAX_LINE} bytes" in err


def test_skip_malformed_goes_on(files: Any, capsys: pytest.CaptureFixture[str]) -> None:
    bad = [b"{}\n"] * 12
    cfg, log = files(QUARANTINE + "\n" + FRONTEND_RULE,
                     lines(record(), *bad, record(client="10.66.0.9")))
    code, out, err = run(capsys, "-c", cfg, "--flows", log, "--skip-malformed")
    assert code == 1 and "replayed 2 flow(s)" in out and "1 would change" in out
    assert f"enforcer: warning: {log}:2: event: missing" in err
    assert "2 more malformed lines skipped" in err


def test_stops_after_ten_errors(files: Any, capsys: pytest.CaptureFixture[str]) -> None:
    cfg, log = files(FRONTEND_RULE, lines(*([b"{}\n"] * 50)))
    code, _, err = run(capsys, "-c", cfg, "--flows", log)
    assert code == 2 and err.count(": event: missing") == 10


def test_bad_candidate_and_unreadable_log(tmp_path: Path,
                                          capsys: pytest.CaptureFixture[str]) -> None:
    cfg = tmp_path / "c.yaml"
    cfg.write_text("version: 1\nlisteners: 3\n")
    code, _, err = run(capsys, "-c", str(cfg), "--flows", str(tmp_path / "none"))
    assert code == 2 and "listeners" in err
    cfg.write_text(CONFIG % (FRONTEND_RULE, DB))
    code, _, err = run(capsys, "-c", str(cfg), "--flows", str(tmp_path / "none"))
    assert code == 2 and f"--flows {tmp_path / 'none'}: cannot read" in err


# ---------------------------------------------------------------------------- fuzz
JSON = st.recursive(
    st.none() | st.booleans() | st.integers(-2**70, 2**70) | st.floats(allow_nan=False)
    | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=12), inner,
                                                                 max_size=5),
    max_leaves=20)
KEYS = ["event", "action", "listener", "ruleset", "rule", "reason", "client", "local", "tls",
        "proxy_protocol", "upstream", "flow_id", "ts"]


def _check(line: bytes) -> None:
    try:
        out = parse_line(line, IdentityCache(limit=4))
    except ReplayInputError as exc:
        assert str(exc)
        return
    assert isinstance(out, RecordedFlow | Skipped)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.binary(max_size=300))
def test_fuzz_bytes(data: bytes) -> None:
    _check(data)


@settings(max_examples=150, deadline=None)
@given(st.dictionaries(st.sampled_from(KEYS), JSON, max_size=8))
def test_fuzz_record_shapes(obj: dict[str, Any]) -> None:
    _check(json.dumps(obj).encode())


@settings(max_examples=150, deadline=None)
@given(st.sampled_from(["client", "local", "tls", "proxy_protocol", "upstream"]),
       st.sampled_from(["ip", "port", "peer", "sni", "tlvs", "address", "spiffe_id"]), JSON,
       st.booleans())
def test_fuzz_valid_record_with_one_field_replaced(top: str, sub: str, value: Any,
                                                  deep: bool) -> None:
    rec = record(upstream={"address": "a:1", "peer": peer()},
                 tlvs={"aws_vpce_id": "vpce-1"})
    target = rec[top]
    if deep and isinstance(target, dict) and isinstance(target.get("peer"), dict):
        target["peer"][sub] = value
    elif isinstance(target, dict):
        target[sub] = value
    else:
        rec[top] = value
    _check(json.dumps(rec).encode())


@settings(max_examples=100, deadline=None)
@given(st.lists(st.binary(max_size=40).map(lambda b: b.replace(b"\n", b"")), max_size=8))
def test_split_lines_numbers_every_line(parts: list[bytes]) -> None:
    data = b"\n".join(parts)
    got = list(split_lines(io.BytesIO(data)))
    assert [line for _, line in got] == io.BytesIO(data).readlines()
    assert [n for n, _ in got] == list(range(1, len(got) + 1))


@settings(max_examples=100, deadline=None)
@given(st.lists(st.binary(max_size=40).map(lambda b: b.replace(b"\n", b"")), max_size=8),
       st.integers(1, 20))
def test_split_lines_bounds_long_lines(parts: list[bytes], limit: int) -> None:
    data = b"\n".join(parts)
    expected = [None if len(line) > limit else line for line in io.BytesIO(data).readlines()]
    got = list(split_lines(io.BytesIO(data), limit))
    assert [line for _, line in got] == expected
    assert [n for n, _ in got] == list(range(1, len(got) + 1))


def test_rulesets_file_cannot_guess_a_destination(tmp_path: Path,
                                                  capsys: pytest.CaptureFixture[str]) -> None:
    """A rulesets-only candidate with to.destinations rules: a flow that reached the upstream
    carries its address and is re-decided; a denied one does not, and is reported."""
    rules = tmp_path / "rules.yaml"
    rules.write_text("rulesets:\n  inbound:\n    default: deny\n    rules:\n"
                     "      - name: to-app\n        action: allow\n"
                     "        to: {destinations: ['127.0.0.1:8080']}\n")
    reached = record(upstream={"name": "app", "address": "127.0.0.1:8080", "tls": "off"})
    log = tmp_path / "f.jsonl"
    log.write_bytes(lines(reached, record("deny", None, flow_id="X")))
    code, out, _ = run(capsys, "-c", str(rules), "--flows", str(log), "--format", "json")
    assert code == 1
    doc = json.loads(out)
    assert doc["unchanged"] == 1 and doc["changed"] == 0
    (group,) = doc["undecidable"]
    assert group["why"].startswith("a rule looks at to.destinations") and group["count"] == 1
    assert group["examples"][0]["flow_id"] == "X"
