"""``tls.mode: passthrough`` in the config: what parses, and every problem with its key path."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from enforcer.cli.main import main
from enforcer.config.errors import ConfigError
from enforcer.config.loader import parse_config
from enforcer.config.model import SniRouteConfig
from enforcer.policy.replay import Candidate, Skipped, parse_line
from tests.e2e.proc import write_config


def cfg(tls: dict[str, Any] | None = None, *, upstream: str | None = "fallback",
        up_tls: dict[str, Any] | None = None, rules: list[dict[str, Any]] | None = None,
        **listener: Any) -> dict[str, Any]:
    lst: dict[str, Any] = {"name": "edge", "listen": "127.0.0.1:8443", "ruleset": "edge",
                           "tls": tls if tls is not None else {
                               "mode": "passthrough",
                               "routes": [{"server_names": ["api.example.com"],
                                           "upstream": "api"},
                                          {"server_names": ["*.apps.example.com"],
                                           "upstream": "apps"}]},
                           **listener}
    if upstream is not None:
        lst["upstream"] = upstream
    ups = {n: {"address": f"127.0.0.1:{9000 + i}"} for i, n in
           enumerate(("api", "apps", "fallback"))}
    if up_tls is not None:
        ups["apps"]["tls"] = up_tls
    return {"version": 1, "listeners": [lst], "upstreams": ups,
            "rulesets": {"edge": {"default": "deny", "rules": rules or []}}}


def problems(raw: dict[str, Any]) -> list[str]:
    with pytest.raises(ConfigError) as info:
        parse_config(raw)
    return [str(i) for i in info.value.issues]


def test_routes_parse_normalised() -> None:
    raw = cfg({"mode": "passthrough", "routes": [
        {"server_names": ["API.Example.com."], "upstream": "api"},
        {"server_names": "*.apps.example.com", "upstream": "apps"}]})
    lst = parse_config(raw).listeners[0]
    assert lst.tls.mode == "passthrough" and lst.upstream == "fallback"
    assert lst.tls.routes == (SniRouteConfig(("api.example.com",), "api"),
                              SniRouteConfig(("*.apps.example.com",), "apps"))
    assert lst.tls.client_auth == "none"


def test_strict_sni_without_a_default_route() -> None:
    raw = cfg(upstream=None)
    raw["listeners"][0]["tls"]["strict_sni"] = True
    lst = parse_config(raw).listeners[0]
    assert lst.tls.strict_sni and lst.upstream == ""


def test_default_route_and_strict_sni_go_one_or_the_other() -> None:
    assert problems(cfg(upstream=None)) == [
        "listeners[0].upstream: is required: the default route for names no route matches "
        "(or set tls.strict_sni: true to refuse them)"]
    raw = cfg()
    raw["listeners"][0]["tls"]["strict_sni"] = True
    assert problems(raw) == [
        "listeners[0].upstream: is the default route, but tls.strict_sni refuses every name "
        "no route matches: keep one or the other"]
    raw = cfg({"mode": "passthrough", "strict_sni": True}, upstream=None)
    assert problems(raw) == ["listeners[0].tls.strict_sni: needs routes (the names to accept)"]


def test_bad_routes_are_named_by_key_path() -> None:
    raw = cfg({"mode": "passthrough", "routes": [
        {"server_names": ["a.example.com", "bad name", "*.*.x.com"], "upstream": "api"},
        {"server_names": ["A.example.com"], "upstream": "nope", "weight": 2},
        {"upstream": "apps"},
        {"server_names": [], "upstream": "apps"}]})
    assert problems(raw) == [
        "listeners[0].tls.routes[0].server_names[1]: bad server name 'bad name': bad DNS "
        "label 'bad name'",
        "listeners[0].tls.routes[0].server_names[2]: bad server name '*.*.x.com': * is only "
        "allowed as the whole leftmost label (*.example.com)",
        "listeners[0].tls.routes[1].weight: unknown key (known: server_names, upstream)",
        "listeners[0].tls.routes[1].server_names[0]: a.example.com is already in routes[0] "
        "(each name routes to one upstream)",
        "listeners[0].tls.routes[2].server_names: is required (exact host names, or "
        "*.example.com for one label more)",
        "listeners[0].tls.routes[3].server_names: needs at least one name",
        "listeners[0].tls.routes[1].upstream: unknown upstream 'nope' (known: api, apps, "
        "fallback)"]


def test_keys_of_terminating_modes_are_refused() -> None:
    raw = cfg()
    raw["listeners"][0]["tls"].update(material="edge", client_auth="none",
                                      server_names=["a.example.com"], alpn=["h2"])
    raw["tls"] = {"edge": {"ca": __file__}}
    got = problems(raw)
    assert "listeners[0].tls.server_names: does not apply to mode passthrough (TLS is not " \
           "terminated: use routes[].server_names)" in got
    for key in ("material", "client_auth", "alpn"):
        assert f"listeners[0].tls.{key}: does not apply to mode passthrough (TLS is not " \
               "terminated: the upstream terminates it)" in got


def test_routes_need_passthrough_and_plain_upstreams() -> None:
    raw = cfg({"mode": "off", "routes": [{"server_names": ["a.b"], "upstream": "api"}]})
    assert problems(raw) == ["listeners[0].tls.routes: goes with mode passthrough (routing "
                             "by SNI without terminating TLS)"]
    assert problems(cfg(up_tls={"mode": "tls", "server_name": "x"})) == [
        "listeners[0].tls.routes[1].upstream: upstream 'apps' has tls mode tls: a "
        "passthrough listener relays the client's TLS untouched, so its upstreams need "
        "tls: {mode: off} (the backend terminates TLS)"]
    assert problems(cfg(transparent=True)) == [
        "listeners[0].transparent: does not go with tls mode passthrough (it routes by SNI, "
        "not to the original destination)"]


def test_rules_that_cannot_match_on_passthrough() -> None:
    got = problems(cfg(rules=[
        {"name": "certs", "action": "allow", "from": {"identities": ["spiffe://td/**"]}},
        {"name": "plain", "action": "allow", "from": {"tls": "none"}}]))
    assert got == [
        "rulesets.edge.rules[0]: from.identities: listener(s) edge never see a client "
        "certificate (tls mode off or client_auth none), so rule 'certs' can never match",
        "rulesets.edge.rules[1]: from.tls: none: listener(s) edge only take TLS, so rule "
        "'plain' can never match"]


def test_check_reports_them_all(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    raw = cfg(upstream=None)
    raw["listeners"][0]["tls"]["routes"][0]["upstream"] = "missing"
    assert main(["check", "-c", str(write_config(tmp_path / "c.yaml", raw))]) == 2
    err = capsys.readouterr().err
    assert "listeners[0].upstream: is required: the default route" in err
    assert "listeners[0].tls.routes[0].upstream: unknown upstream 'missing'" in err
    assert main(["check", "-c", str(write_config(tmp_path / "ok.yaml", cfg()))]) == 0


# ----------------------------------------------------------------------------- policy replay
def _flow(sni: str | None, action: str = "allow", reason: str = "rule") -> bytes:
    return json.dumps({
        "event": "flow", "listener": "edge", "action": action, "ruleset": "edge",
        "rule": None, "reason": reason, "client": {"ip": "10.1.2.3", "port": 1},
        "local": {"ip": "127.0.0.1", "port": 8443},
        "tls": {"mode": "passthrough", "sni": sni, "route": None, "version": None,
                "peer": None}, "close": "client_fin"}).encode()


def test_replay_routes_passthrough_flows_by_their_sni() -> None:
    raw = cfg(rules=[{"name": "to-apps", "action": "allow",
                      "to": {"destinations": ["127.0.0.1:9001"]}}])
    config = parse_config(raw)
    candidate = Candidate(config.rulesets, {lst.name: lst for lst in config.listeners},
                          config.upstreams)
    decide = {sni: candidate.decide(parse_line(_flow(sni)))  # type: ignore[arg-type]
              for sni in ("x.apps.example.com", "api.example.com", None)}
    assert decide["x.apps.example.com"].action == "allow"  # type: ignore[union-attr]
    assert decide["api.example.com"].action == "deny"  # type: ignore[union-attr]
    assert decide[None].action == "deny"  # type: ignore[union-attr]


def test_replay_skips_refusals_the_policy_never_saw() -> None:
    assert isinstance(parse_line(_flow("a.test", "deny", "sni_refused")), Skipped)
    assert not isinstance(parse_line(_flow("a.test", "deny", "rule")), Skipped)


def test_explain_routes_by_sni(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    raw = cfg(rules=[{"name": "apps-only", "action": "allow",
                      "to": {"destinations": ["127.0.0.1:9001"]}}])
    path = str(write_config(tmp_path / "c.yaml", raw))
    explain = ["policy", "explain", "-c", path, "--listener", "edge"]
    assert main([*explain, "--sni", "Shop.Apps.example.com"]) == 0
    out = capsys.readouterr().out
    assert "tls=yes" in out and "destination=127.0.0.1:9001" in out
    assert main([*explain, "--sni", "api.example.com"]) == 1
    assert "destination=127.0.0.1:9000" in capsys.readouterr().out
    assert main([*explain, "--identity", "spiffe://td/a"]) == 2
    assert "tls mode passthrough" in capsys.readouterr().err
