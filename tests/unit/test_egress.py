"""The egress parsers (SOCKS5, HTTP CONNECT, hosts, credentials), the to.hosts rule key
and the egress config keys."""

from __future__ import annotations

import base64
import struct
from pathlib import Path
from typing import Any

import pytest

from enforcer.config.errors import ConfigError
from enforcer.config.loader import parse_config
from enforcer.config.reader import Node
from enforcer.config.rulesets import parse_rulesets
from enforcer.egress import httpconnect, socks5
from enforcer.egress.credentials import (
    Credentials,
    CredentialsError,
    hash_password,
    parse_credentials,
    parse_hash,
)
from enforcer.egress.hosts import BadHost, normalize_host
from enforcer.policy import FlowFacts, compile_ruleset


# ------------------------------------------------------------------------------ hosts
@pytest.mark.parametrize(("text", "want"), [
    ("App.Example.COM.", "app.example.com"), ("10.0.0.1", "10.0.0.1"),
    ("[2001:DB8::1]", "2001:db8::1"), ("_srv.example", "_srv.example"), ("a", "a"),
])
def test_normalize_host(text: str, want: str) -> None:
    assert normalize_host(text) == want


@pytest.mark.parametrize("text", ["", ".", "a..b", "-a.b", "a-.b", "a b", "a" * 64 + ".b",
                                  ("a" * 60 + ".") * 5, "[::1", "[zz]", "1.2.3", "é.com"])
def test_bad_hosts(text: str) -> None:
    with pytest.raises(BadHost):
        normalize_host(text)


# ------------------------------------------------------------------------------ SOCKS5
def _request(atyp: int, addr: bytes, port: int = 443, cmd: int = 1) -> bytes:
    return bytes((5, cmd, 0, atyp)) + addr + struct.pack(">H", port)


def _run(parser: socks5.Socks5Parser, data: bytes, *, split: int = 0) -> list[Any]:
    events: list[Any] = []
    pieces = [data[i:i + split] for i in range(0, len(data), split)] if split else [data]
    for piece in pieces:
        parser.feed(piece)
        while (ev := parser.step()) is not None:
            events.append(ev)
            if isinstance(ev, socks5.Login):
                events.append(parser.login_result(ev.password == b"pw"))
    return events


@pytest.mark.parametrize("split", [0, 1, 3])
def test_socks5_no_auth_domain(split: int) -> None:
    data = b"\x05\x02\x02\x00" + _request(3, b"\x0bExample.COM", 8443) + b"early"
    events = _run(socks5.Socks5Parser(login=False), data, split=split)
    assert events[0] == socks5.Send(b"\x05\x00")
    done = events[-1]
    assert isinstance(done, socks5.Done)
    assert done.request == socks5.Request("example.com", 8443, "domain")
    if split == 0:
        assert done.rest == b"early"


def test_socks5_login_and_addresses() -> None:
    data = b"\x05\x01\x02" + b"\x01\x05alice\x02pw" + _request(4, bytes(10) + b"\xff\xff"
                                                               + bytes([10, 0, 0, 9]), 80)
    events = _run(socks5.Socks5Parser(login=True), data)
    assert events[:3] == [socks5.Send(b"\x05\x02"), socks5.Login(b"alice", b"pw"), b"\x01\x00"]
    assert events[3].request == socks5.Request("10.0.0.9", 80, "ipv6")  # v4-mapped
    events = _run(socks5.Socks5Parser(login=False),
                  b"\x05\x01\x00" + _request(1, bytes([192, 0, 2, 1]), 22))
    assert events[1].request == socks5.Request("192.0.2.1", 22, "ipv4")


@pytest.mark.parametrize(("data", "login", "reason", "reply"), [
    (b"\x04\x01", False, "bad_version", None),
    (b"\x05\x00", False, "no_methods", b"\x05\xff"),
    (b"\x05\x01\x02", False, "no_acceptable_method", b"\x05\xff"),
    (b"\x05\x01\x00", True, "no_acceptable_method", b"\x05\xff"),
    (b"\x05\x01\x02\x01\x01a\x01x", True, "bad_credentials", b"\x01\x01"),
    (b"\x05\x01\x02\x02", True, "bad_login", b"\x01\x01"),
    (b"\x05\x01\x00" + _request(1, bytes(4), 21, cmd=2), False, "command_not_supported",
     socks5.reply(7)),
    (b"\x05\x01\x00" + _request(1, bytes(4), 21, cmd=3), False, "command_not_supported",
     socks5.reply(7)),
    (b"\x05\x01\x00\x05\x01\x00\x07", False, "bad_address_type", socks5.reply(8)),
    (b"\x05\x01\x00\x04\x01\x00\x01", False, "bad_version", socks5.reply(1)),
    (b"\x05\x01\x00" + _request(1, bytes(4), 0), False, "bad_address", socks5.reply(1)),
    (b"\x05\x01\x00" + _request(3, b"\x00"), False, "bad_address", socks5.reply(1)),
    (b"\x05\x01\x00" + _request(3, b"\xff" + b"a" * 255), False, "bad_address",
     socks5.reply(1)),
    (b"\x05\x01\x00" + _request(3, b"\x03\xc3\xa9x"), False, "bad_address", socks5.reply(1)),
    (b"\x05\xff" + b"\x00" * 255 + b"\x05" * 4000, False, "too_long", None),
])
def test_socks5_refusals(data: bytes, login: bool, reason: str, reply: bytes | None) -> None:
    with pytest.raises(socks5.Socks5Error) as info:
        _run(socks5.Socks5Parser(login=login), data)
    assert info.value.reason == reason and info.value.reply == reply


def test_socks5_reply() -> None:
    assert socks5.reply(0, ("127.0.0.1", 4242)) == b"\x05\x00\x00\x01\x7f\x00\x00\x01\x10\x92"
    assert socks5.reply(2) == b"\x05\x02\x00\x01" + bytes(6)
    assert socks5.reply(0, ("::1", 1))[3] == 4 and len(socks5.reply(0, ("::1", 1))) == 22


# ------------------------------------------------------------------------------ CONNECT
def test_connect_request_pieces() -> None:
    data = (b"CONNECT [2001:db8::1]:8443 HTTP/1.1\r\nHost: x\r\n"
            b"Proxy-Authorization: Basic YWxpY2U6czNjOnJldA==\r\n\r\n\x16\x03")
    parser = httpconnect.ConnectParser()
    got = None
    for i in range(len(data)):
        got = parser.feed(data[i:i + 1]) or got
    assert got is not None and got.host == "2001:db8::1" and got.port == 8443
    assert got.rest == b""  # fed byte by byte: the request ends before the TLS bytes
    assert got.authorization is not None
    assert httpconnect.basic_credentials(got.authorization) == (b"alice", b"s3c:ret")
    whole = httpconnect.ConnectParser().feed(data)
    assert whole is not None and whole.rest == b"\x16\x03"
    lf = httpconnect.ConnectParser().feed(b"CONNECT A.example:1 HTTP/1.0\n\n")
    assert lf is not None and (lf.host, lf.port, lf.authorization) == ("a.example", 1, None)


@pytest.mark.parametrize(("data", "reason", "status"), [
    (b"GET / HTTP/1.1\r\n\r\n", "bad_method", 405),
    (b"CONNECT a:1 HTTP/2\r\n\r\n", "bad_request", 400),
    (b"CONNECT a:1\r\n\r\n", "bad_request", 400),
    (b"CONNECT a HTTP/1.1\r\n\r\n", "bad_request", 400),
    (b"CONNECT a:0 HTTP/1.1\r\n\r\n", "bad_request", 400),
    (b"CONNECT a:65536 HTTP/1.1\r\n\r\n", "bad_request", 400),
    (b"CONNECT ::1:443 HTTP/1.1\r\n\r\n", "bad_request", 400),
    (b"CONNECT a..b:443 HTTP/1.1\r\n\r\n", "bad_request", 400),
    (b"CONNECT a:1 HTTP/1.1\r\nno colon\r\n\r\n", "bad_request", 400),
    (b"CONNECT a:1 HTTP/1.1\r\n folded: x\r\n\r\n", "bad_request", 400),
    (b"CONNECT a:1 HTTP/1.1\r\nProxy-Authorization: a\r\nProxy-Authorization: b\r\n\r\n",
     "bad_request", 400),
    (b"CONNECT a:1 HTTP/1.1\r\n" + b"X: y\r\n" * 101 + b"\r\n", "too_long", 431),
    (b"CONNECT a:1 HTTP/1.1\r\nX: " + b"y" * 9000, "too_long", 431),
])
def test_connect_refusals(data: bytes, reason: str, status: int) -> None:
    with pytest.raises(httpconnect.HttpError) as info:
        httpconnect.ConnectParser().feed(data)
    assert (info.value.reason, info.value.status) == (reason, status)


def test_basic_credentials_and_responses() -> None:
    assert httpconnect.basic_credentials("Bearer x") is None
    assert httpconnect.basic_credentials("Basic !!!") is None
    assert httpconnect.basic_credentials("basic " + base64.b64encode(b"nocolon").decode()) \
        is None
    assert httpconnect.response(200) == b"HTTP/1.1 200 Connection established\r\n\r\n"
    r407 = httpconnect.response(407, "login", realm="edge")
    assert b'Proxy-Authenticate: Basic realm="edge"' in r407 and r407.endswith(b"login\n")
    assert b"Allow: CONNECT" in httpconnect.response(405, "no")


# ------------------------------------------------------------------------------ credentials
def test_credentials(tmp_path: Path) -> None:
    line = hash_password(b"pw", ln=4)
    assert parse_hash(line).verify(b"pw") and not parse_hash(line).verify(b"px")
    path = tmp_path / "users"
    path.write_text(f"# users\n\nalice:{line}\n")
    creds = Credentials(str(path))
    assert set(creds.users) == {"alice"} and creds.users["alice"].verify(b"pw")
    assert not creds.check(b"alice", b"pw")  # not cached yet (tests/unit/test_egress_login.py)


@pytest.mark.parametrize(("text", "needle"), [
    ("alice", "expected user:hash"),
    ("alice:plain", "not a $scrypt$"),
    ("a b:$scrypt$ln=4,r=8,p=1$c2FsdHNhbHQ$" + "A" * 43, "expected user:hash"),
    ("alice:$scrypt$ln=40,r=8,p=1$c2FsdHNhbHQ$" + "A" * 43, "out of range"),
    ("alice:$scrypt$ln=4,r=8,p=1$c2FsdA$" + "A" * 43, "salt under 8 bytes"),
    ("alice:$scrypt$ln=4,r=8,p=1$c2FsdHNhbHQ$A", "bad base64"),
])
def test_bad_credentials_lines(text: str, needle: str) -> None:
    with pytest.raises(CredentialsError, match="line 1") as info:
        parse_credentials(text)
    assert needle in str(info.value)
    line = "u:" + hash_password(b"x", ln=1)
    with pytest.raises(CredentialsError, match="line 2: user 'u' is listed twice"):
        parse_credentials(f"{line}\n{line}")


def test_credentials_reload(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from enforcer.egress import credentials as mod

    path = tmp_path / "users"
    path.write_text(f"alice:{hash_password(b'one', ln=2)}\n")
    creds = Credentials(str(path))
    monkeypatch.setattr(mod, "RECHECK_EVERY", 0.0)
    path.write_text(f"alice:{hash_password(b'two', ln=2)}\nbob:{hash_password(b'b', ln=2)}\n")
    assert set(creds.current().users) == {"alice", "bob"}
    assert creds.users["alice"].verify(b"two") and not creds.users["alice"].verify(b"one")
    path.write_text("broken")
    assert set(creds.current().users) == {"alice", "bob"}  # a bad file keeps the old users


# ------------------------------------------------------------------------------ policy
def _ruleset(rules: list[dict[str, Any]]) -> Any:
    issues: list[Any] = []
    parsed = parse_rulesets(Node({"e": {"default": "deny", "rules": rules}}, "rulesets",
                                 issues))
    assert not issues, issues
    return compile_ruleset(parsed["e"])


def _facts(host: str | None, port: int = 443) -> FlowFacts:
    return FlowFacts(listener="egress", port=port, client_ip=None, identity=None, tls=False,
                     host=host, destination=(host, port) if host else None)


def test_to_hosts_rule() -> None:
    rs = _ruleset([
        {"name": "no-admin", "action": "deny", "to": {"hosts": ["admin.example.com"]}},
        {"name": "web", "action": "allow",
         "to": {"hosts": ["*.example.com", "Example.COM."], "ports": [443]}}])
    for host, port, action, rule in [("www.example.com", 443, "allow", "web"),
                                     ("example.com", 443, "allow", "web"),
                                     ("admin.example.com", 443, "deny", "no-admin"),
                                     ("a.b.example.com", 443, "deny", None),
                                     ("www.example.com", 80, "deny", None),
                                     (None, 443, "deny", None)]:
        d = rs.decide(_facts(host, port))
        assert (d.action, d.rule) == (action, rule), host
        assert rs.explain(_facts(host, port)).decision == d
    why = rs.explain(_facts("evil.org")).rules[1].why_not
    assert why == ("to.hosts: host 'evil.org' matches none of [*.example.com, example.com]",)


# ------------------------------------------------------------------------------ config
def _cfg(listener: dict[str, Any], upstream: dict[str, Any] | None = None,
         rules: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    base = {"name": "egress", "listen": "127.0.0.1:1080", "tls": {"mode": "off"},
            "ruleset": "e", "upstream": "dst"}
    return {"version": 1, "listeners": [{**base, **listener}],
            "upstreams": {"dst": upstream or {"address": "original_destination"}},
            "rulesets": {"e": {"default": "deny", "rules": rules or []}}}


def _errors(cfg: dict[str, Any]) -> list[str]:
    with pytest.raises(ConfigError) as info:
        parse_config(cfg)
    return [str(i) for i in info.value.issues]


def test_egress_config() -> None:
    cfg = parse_config(_cfg({"protocol": "socks5", "egress": {
        "credentials": "/etc/enforcer/users", "request_timeout": "3s"}}))
    lst = cfg.listeners[0]
    assert lst.protocol == "socks5" and lst.egress is not None
    assert (lst.egress.credentials, lst.egress.request_timeout) == ("/etc/enforcer/users", 3.0)
    plain = parse_config(_cfg({"protocol": "http_connect"})).listeners[0]
    assert plain.egress is not None and plain.egress.credentials is None
    assert plain.egress.max_request_bytes == 8192
    default = parse_config(_cfg({}, {"address": "127.0.0.1:1"})).listeners[0]
    assert default.protocol == "tcp" and default.egress is None  # off unless asked for


@pytest.mark.parametrize(("listener", "upstream", "rules", "needle"), [
    ({"protocol": "socks4"}, None, None, "listeners[0].protocol"),
    ({"egress": {}}, {"address": "127.0.0.1:1"}, None,
     "listeners[0].egress: goes with protocol: socks5 or http_connect"),
    ({"protocol": "socks5", "egress": {"max_request_bytes": 4096}}, None, None,
     "listeners[0].egress.max_request_bytes: goes with protocol: http_connect"),
    ({"protocol": "http_connect", "egress": {"request_timeout": "0s"}}, None, None,
     "listeners[0].egress.request_timeout: must be more than 0s"),
    ({"protocol": "http_connect", "egress": {"credential": "x"}}, None, None,
     "listeners[0].egress.credential"),
    ({"protocol": "socks5"}, {"address": "127.0.0.1:1"}, None,
     "listeners[0].upstream: an egress listener"),
    ({"protocol": "socks5"}, {"address": "original_destination", "tls": {"mode": "tls"}},
     None, "must have tls mode off"),
    ({"protocol": "socks5", "transparent": True}, None, None,
     "listeners[0].protocol: protocol: socks5 cannot be combined with transparent"),
    ({}, {"address": "127.0.0.1:1"}, [{"name": "r", "action": "allow",
                                       "to": {"hosts": ["a.example"]}}],
     "to.hosts: listener(s) egress are not egress proxies"),
    ({"protocol": "socks5"}, None, [{"name": "r", "action": "allow",
                                     "to": {"hosts": ["a.*.example"]}}],
     "rulesets.e.rules[0].to.hosts"),
])
def test_egress_config_errors(listener: dict[str, Any], upstream: dict[str, Any] | None,
                              rules: list[dict[str, Any]] | None, needle: str) -> None:
    errors = _errors(_cfg(listener, upstream, rules))
    assert any(needle in e for e in errors), errors


# ------------------------------------------------------------------------------ replay
def test_replay_decides_egress_records_on_the_request() -> None:
    from enforcer.policy.replay import Candidate, RecordedFlow, parse_line

    issues: list[Any] = []
    rulesets = parse_rulesets(Node({"e": {"default": "deny", "rules": [
        {"name": "web", "action": "allow", "to": {"hosts": ["*.example.com"], "ports": [443]}},
    ]}}, "rulesets", issues))
    candidate = Candidate(rulesets)

    def record(host: str, port: int) -> RecordedFlow:
        line = (b'{"event":"flow","listener":"socks","action":"deny","ruleset":"e",'
                b'"rule":null,"reason":"default","local":{"ip":"127.0.0.1","port":1080},'
                b'"tls":null,"upstream":null,"egress":{"protocol":"socks5","host":"'
                + host.encode() + b'","port":' + str(port).encode() + b',"user":"alice"}}')
        flow = parse_line(line)
        assert isinstance(flow, RecordedFlow) and flow.egress == (host, port)
        return flow

    allowed = candidate.decide(record("www.example.com", 443))
    assert getattr(allowed, "action", None) == "allow"
    assert getattr(allowed, "rule", None) == "web"
    assert getattr(candidate.decide(record("www.example.com", 80)), "action", None) == "deny"
    assert getattr(candidate.decide(record("evil.org", 443)), "action", None) == "deny"


def test_check_reports_a_bad_credentials_file(tmp_path: Path) -> None:
    from enforcer.cli.check import check_runtime

    users = tmp_path / "users"
    users.write_text("alice:not-a-hash\n")
    cfg = _cfg({"protocol": "socks5", "egress": {"credentials": str(users)}})
    problems = check_runtime(parse_config(cfg))
    assert problems == [f"listeners.egress.egress.credentials: {users} line 1: user 'alice': "
                        "not a $scrypt$ln=L,r=R,p=P$SALT$HASH hash"], problems
    cfg = _cfg({"protocol": "socks5", "egress": {"credentials": str(tmp_path / "none")}})
    problems = check_runtime(parse_config(cfg))
    assert len(problems) == 1 and "cannot read: No such file or directory" in problems[0]
    users.write_text(f"alice:{hash_password(b'x', ln=2)}\n")
    cfg = _cfg({"protocol": "socks5", "egress": {"credentials": str(users)}})
    assert check_runtime(parse_config(cfg)) == []
