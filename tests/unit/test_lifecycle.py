"""enforcer.dataplane.lifecycle: every cell of the transition table, the nasty orders, and
random event sequences against the invariants (no sockets: the core is pure)."""

from __future__ import annotations

import dataclasses
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from enforcer.dataplane.lifecycle import OUTCOMES, TABLE, Lifecycle
from enforcer.dataplane.lifecycle_table import events
from enforcer.dataplane.lifecycle_types import Command, Event, LifecycleError, Plan, Stage

PLAN = Plan(proxy=True, tls="auto", detect_timeout=1.0, max_lifetime=60.0, upstream_tls=True,
            idle_timeout=300.0, close_timeout=5.0)
E = Event
ALLOW = E("decision", allow=True)
TO_AUTHORIZE = [E("accept"), E("proxy_done"), E("tls_detected"), E("handshake_done")]
TO_CONNECT = [*TO_AUTHORIZE, ALLOW]
TO_UPTLS = [*TO_CONNECT, E("upstream_connected")]
TO_RELAY = [*TO_UPTLS, E("upstream_tls_done"), E("relay_started")]
TO_HALF = [*TO_RELAY, E("client_eof")]  # the client finished first
TO_CLOSED = [*TO_HALF, E("upstream_eof")]
TO_DRAINING = [*TO_RELAY, E("drain")]
PATHS: dict[Stage, list[Event]] = {
    Stage.ACCEPTED: [], Stage.PROXY: [E("accept")], Stage.DETECT: [E("accept"), E("proxy_done")],
    Stage.HANDSHAKE: TO_AUTHORIZE[:3], Stage.AUTHORIZE: TO_AUTHORIZE, Stage.CONNECT: TO_CONNECT,
    Stage.UPSTREAM_TLS: TO_UPTLS, Stage.RELAY: TO_RELAY, Stage.HALF_CLOSED: TO_HALF,
    Stage.DRAINING: TO_DRAINING, Stage.CLOSED: TO_CLOSED,
}
UNDECIDED_CONNECT = [*TO_AUTHORIZE, E("decision", allow=None), E("upstream_connected")]
EGRESS = {"egress_timeout": 10.0}  # an egress listener: the client's request comes first
PASSTHROUGH = {"tls": "passthrough"}
SILENCE = {"proxy_silence": 0.2}


def drive(path: list[Event], plan: Plan = PLAN) -> Lifecycle:
    core = Lifecycle(plan, 0.0)
    for ev in path:
        core.handle(ev)
    return core


def kinds(cmds: list[Command]) -> list[str]:
    """Command kinds, timer cancellations left out (a close cancels what is armed)."""
    return [c.kind for c in cmds if c.kind != "cancel_timer"]


CLOSE = ["close", "record"]
# (stage, event) -> (event fields, plan changes, path, next stage, command kinds, record)
# record: (action, close reason) or None; path None: PATHS[stage]
Case = tuple[dict[str, Any], dict[str, Any], list[Event] | None, Stage, list[str],
             tuple[str, str] | None]
CASES: dict[tuple[Stage, str], list[Case]] = {
    (Stage.ACCEPTED, "accept"): [({}, {}, None, Stage.PROXY, ["start_timer"] * 2, None),
                                 ({}, {"proxy": False, "tls": "off"}, None, Stage.AUTHORIZE,
                                  ["start_timer", "decide"], None),
                                 ({}, {"proxy": False, "tls": "terminate", "max_lifetime": 0}, None,
                                  Stage.HANDSHAKE, ["start_timer", "start_tls"], None)],
    (Stage.ACCEPTED, "fail"): [({"reason": "max_connections"}, {}, None, Stage.CLOSED, CLOSE,
                                ("error", "max_connections")),
                               ({"reason": "loop"}, {}, None, Stage.CLOSED, CLOSE,
                                ("deny", "loop"))],
    (Stage.PROXY, "proxy_done"): [({}, {}, None, Stage.DETECT, ["start_timer"], None),
                                  ({}, {"tls": "off"}, None, Stage.AUTHORIZE, ["decide"], None),
                                  ({}, PASSTHROUGH, None, Stage.DETECT,
                                   ["start_timer", "start_peek"], None),
                                  ({}, {"tls": "off", **EGRESS}, None, Stage.AUTHORIZE,
                                   ["start_timer", "start_request"], None)],
    (Stage.PROXY, "client_data"): [({}, {}, None, Stage.PROXY, ["parse_proxy"], None)],
    (Stage.PROXY, "client_eof"): [({}, {}, None, Stage.PROXY, ["proxy_eof"], None)],
    (Stage.PROXY, "fail"): [({"reason": "proxy_protocol_truncated"}, {}, None, Stage.CLOSED,
                             CLOSE, ("error", "proxy_protocol_truncated"))],
    (Stage.PROXY, "proxy_timeout"): [({}, {}, None, Stage.CLOSED, CLOSE,
                                      ("error", "proxy_protocol_timeout"))],
    # accept: optional on tls.mode auto or off: a silent client sends no header and is
    # plaintext (the server speaks first)
    (Stage.PROXY, "proxy_silence"): [({}, SILENCE, None, Stage.AUTHORIZE, ["decide"], None),
                                     ({"flag": True}, SILENCE, None, Stage.PROXY,
                                      ["start_timer"], None),
                                     ({}, {**SILENCE, "tls": "off"}, None, Stage.AUTHORIZE,
                                      ["decide"], None),
                                     ({"flag": True}, {**SILENCE, "tls": "off"}, None,
                                      Stage.PROXY, ["start_timer"], None)],
    (Stage.DETECT, "tls_detected"): [({}, {}, None, Stage.HANDSHAKE,
                                      ["start_timer", "start_tls"], None)],
    (Stage.DETECT, "plain_detected"): [({}, {}, None, Stage.AUTHORIZE, ["decide"], None)],
    (Stage.DETECT, "client_data"): [({}, {}, None, Stage.DETECT, ["detect"], None),
                                    ({}, PASSTHROUGH, None, Stage.DETECT, ["peek"], None)],
    (Stage.DETECT, "hello_done"): [({}, PASSTHROUGH, None, Stage.AUTHORIZE, ["decide"], None),
                                   ({}, {**PASSTHROUGH, **EGRESS}, None, Stage.AUTHORIZE,
                                    ["start_timer", "start_request"], None)],
    (Stage.DETECT, "client_eof"): [({}, {}, None, Stage.CLOSED, CLOSE,
                                    ("error", "client_closed"))],
    (Stage.DETECT, "fail"): [({"reason": "sslv2_hello"}, {}, None, Stage.CLOSED, CLOSE,
                              ("error", "sslv2_hello")),
                             ({"reason": "sni_refused"}, PASSTHROUGH, None, Stage.CLOSED, CLOSE,
                              ("deny", "sni_refused")),
                             ({"reason": "client_hello_too_large"}, PASSTHROUGH, None,
                              Stage.CLOSED, CLOSE, ("error", "client_hello_too_large")),
                             ({"reason": "not_tls"}, PASSTHROUGH, None, Stage.CLOSED, CLOSE,
                              ("error", "not_tls"))],
    (Stage.DETECT, "detect_timeout"): [({}, {}, None, Stage.AUTHORIZE, ["decide"], None),
                                       ({"flag": True}, {}, None, Stage.DETECT,
                                        ["start_timer"], None)],
    (Stage.DETECT, "handshake_timeout"): [({}, {"detect_timeout": 0.0}, None, Stage.CLOSED,
                                           CLOSE, ("error", "handshake_timeout"))],
    (Stage.HANDSHAKE, "handshake_done"): [({}, {}, None, Stage.AUTHORIZE, ["decide"], None),
                                          ({}, EGRESS, None, Stage.AUTHORIZE,
                                           ["start_timer", "start_request"], None)],
    (Stage.HANDSHAKE, "client_data"): [({}, {}, None, Stage.HANDSHAKE, ["handshake"], None)],
    (Stage.HANDSHAKE, "client_eof"): [({}, {}, None, Stage.CLOSED, CLOSE,
                                       ("error", "client_closed"))],
    (Stage.HANDSHAKE, "fail"): [({"reason": "handshake_failed"}, {}, None, Stage.CLOSED,
                                 CLOSE, ("error", "handshake_failed")),
                                ({"reason": "revoked"}, {}, None, Stage.CLOSED, CLOSE,
                                 ("deny", "revoked"))],
    (Stage.HANDSHAKE, "handshake_timeout"): [({}, {}, None, Stage.CLOSED, CLOSE,
                                              ("error", "handshake_timeout"))],
    (Stage.AUTHORIZE, "decision"): [({"allow": True}, {}, None, Stage.CONNECT,
                                     ["start_timer", "connect"], None),
                                    ({"allow": None}, {}, None, Stage.CONNECT,
                                     ["start_timer", "connect"], None),
                                    ({"allow": False}, {}, None, Stage.CLOSED, CLOSE,
                                     ("deny", "denied"))],
    (Stage.AUTHORIZE, "fail"): [({"reason": "mesh_plaintext_refused"}, {}, None, Stage.CLOSED,
                                 CLOSE, ("deny", "mesh_plaintext_refused")),
                                ({"reason": "rate_limited"}, {}, None, Stage.CLOSED, CLOSE,
                                 ("deny", "rate_limited")),
                                ({"reason": "concurrency_limited"}, {}, None, Stage.CLOSED,
                                 CLOSE, ("deny", "concurrency_limited")),
                                ({"reason": "egress_bad_version"}, EGRESS, None, Stage.CLOSED,
                                 CLOSE, ("error", "egress_bad_version"))],
    (Stage.AUTHORIZE, "client_data"): [({}, EGRESS, None, Stage.AUTHORIZE, ["request"], None)],
    (Stage.AUTHORIZE, "request_done"): [({}, EGRESS, None, Stage.AUTHORIZE, ["decide"], None)],
    (Stage.AUTHORIZE, "client_eof"): [({}, EGRESS, None, Stage.CLOSED, CLOSE,
                                       ("error", "client_closed"))],
    (Stage.AUTHORIZE, "request_timeout"): [({}, EGRESS, None, Stage.CLOSED, CLOSE,
                                            ("error", "egress_timeout"))],
    (Stage.CONNECT, "decision"): [({"allow": True}, {"upstream_tls": False},
                                   UNDECIDED_CONNECT, Stage.RELAY, ["start_relay"], None),
                                  ({"allow": False}, {"upstream_tls": False},
                                   UNDECIDED_CONNECT, Stage.CLOSED, CLOSE, ("deny", "denied"))],
    (Stage.CONNECT, "upstream_connected"): [
        ({}, {}, None, Stage.UPSTREAM_TLS, ["start_timer", "start_upstream_tls"], None),
        ({}, {"upstream_tls": False}, None, Stage.RELAY, ["start_relay"], None)],
    (Stage.CONNECT, "client_data"): [({}, {}, None, Stage.CONNECT, ["hold"], None)],
    (Stage.CONNECT, "upstream_data"): [({}, {"upstream_tls": False}, None, Stage.CONNECT,
                                        ["hold"], None),
                                       ({}, {}, None, Stage.CLOSED, CLOSE,
                                        ("error", "upstream_tls_failed"))],
    (Stage.CONNECT, "client_eof"): [({}, {}, None, Stage.CONNECT, [], None)],
    (Stage.CONNECT, "upstream_eof"): [
        ({}, {}, None, Stage.CLOSED, CLOSE, ("error", "upstream_closed")),
        ({}, {"upstream_tls": False}, [*TO_CONNECT, E("upstream_data")], Stage.CONNECT, [],
         None)],
    (Stage.CONNECT, "fail"): [({"reason": "upstream_connect_failed"}, {}, None, Stage.CLOSED,
                               CLOSE, ("error", "upstream_connect_failed"))],
    (Stage.CONNECT, "connect_timeout"): [({}, {}, None, Stage.CLOSED, CLOSE,
                                          ("error", "upstream_connect_timeout"))],
    (Stage.UPSTREAM_TLS, "decision"): [
        ({"allow": True}, {}, [*UNDECIDED_CONNECT, E("upstream_tls_done")], Stage.RELAY,
         ["start_relay"], None)],
    (Stage.UPSTREAM_TLS, "upstream_tls_done"): [({}, {}, None, Stage.RELAY, ["start_relay"],
                                                 None)],
    (Stage.UPSTREAM_TLS, "client_data"): [({}, {}, None, Stage.UPSTREAM_TLS, ["hold"], None)],
    (Stage.UPSTREAM_TLS, "upstream_data"): [({}, {}, None, Stage.UPSTREAM_TLS,
                                             ["upstream_handshake"], None)],
    (Stage.UPSTREAM_TLS, "client_eof"): [({}, {}, None, Stage.UPSTREAM_TLS, [], None)],
    (Stage.UPSTREAM_TLS, "upstream_eof"): [({}, {}, None, Stage.CLOSED, CLOSE,
                                            ("error", "upstream_tls_failed"))],
    (Stage.UPSTREAM_TLS, "fail"): [({"reason": "upstream_identity_mismatch"}, {}, None,
                                    Stage.CLOSED, CLOSE,
                                    ("error", "upstream_identity_mismatch")),
                                   ({"reason": "rate_limited"}, {},  # rules on its identity
                                    [*UNDECIDED_CONNECT, E("upstream_tls_done")], Stage.CLOSED,
                                    CLOSE, ("deny", "rate_limited"))],
    (Stage.UPSTREAM_TLS, "upstream_tls_timeout"): [({}, {}, None, Stage.CLOSED, CLOSE,
                                                    ("error", "upstream_tls_timeout"))],
    (Stage.HALF_CLOSED, "relay_started"): [({}, {}, [*TO_RELAY[:-1], E("upstream_eof")],
                                            Stage.HALF_CLOSED, ["start_timer"], None)],
    (Stage.RELAY, "relay_started"): [({}, {}, TO_RELAY[:-1], Stage.RELAY, ["start_timer"],
                                      None),
                                     ({"flag": True}, {}, TO_RELAY[:-1], Stage.RELAY, [], None)],
    (Stage.RELAY, "client_data"): [({}, {}, None, Stage.RELAY, ["forward"], None)],
    (Stage.RELAY, "upstream_data"): [({}, {}, None, Stage.RELAY, ["forward"], None)],
    (Stage.RELAY, "client_eof"): [({}, {}, None, Stage.HALF_CLOSED,
                                   ["shut_write", "start_timer"], None)],
    (Stage.RELAY, "upstream_eof"): [({}, {}, None, Stage.HALF_CLOSED,
                                     ["shut_write", "start_timer"], None)],
    (Stage.RELAY, "idle_timeout"): [({"now": 300.0}, {}, None, Stage.CLOSED, CLOSE,
                                     ("allow", "idle_timeout")),
                                    ({"now": 100.0}, {}, None, Stage.RELAY, ["start_timer"],
                                     None)],
    (Stage.HALF_CLOSED, "client_data"): [({}, {}, [*TO_RELAY, E("upstream_eof")],
                                          Stage.HALF_CLOSED, ["forward"], None)],
    (Stage.HALF_CLOSED, "upstream_data"): [({}, {}, None, Stage.HALF_CLOSED, ["forward"],
                                            None)],
    (Stage.HALF_CLOSED, "client_eof"): [({}, {}, [*TO_RELAY, E("upstream_eof")], Stage.CLOSED,
                                         ["shut_write", *CLOSE], ("allow", "upstream_fin"))],
    (Stage.HALF_CLOSED, "upstream_eof"): [({}, {}, None, Stage.CLOSED, ["shut_write", *CLOSE],
                                           ("allow", "client_fin"))],
    (Stage.HALF_CLOSED, "done"): [({}, {}, [*TO_RELAY[:-1], E("relay_started", flag=True),
                                            E("client_eof"), E("upstream_eof")],
                                   Stage.CLOSED, CLOSE, ("allow", "client_fin"))],
    (Stage.HALF_CLOSED, "idle_timeout"): [({"now": 301.0}, {}, None, Stage.CLOSED, CLOSE,
                                           ("allow", "idle_timeout"))],
    (Stage.HALF_CLOSED, "close_timeout"): [({}, {}, None, Stage.CLOSED, CLOSE,
                                            ("allow", "close_timeout"))],
    # DRAINING: the relay goes on (a drain does not end a connection before its deadline)
    (Stage.DRAINING, "relay_started"): [({}, {}, [*TO_RELAY[:-1], E("drain")], Stage.DRAINING,
                                         ["start_timer"], None)],
    (Stage.DRAINING, "client_data"): [({}, {}, None, Stage.DRAINING, ["forward"], None)],
    (Stage.DRAINING, "upstream_data"): [({}, {}, None, Stage.DRAINING, ["forward"], None)],
    (Stage.DRAINING, "client_eof"): [({}, {}, None, Stage.DRAINING,
                                      ["shut_write", "start_timer"], None),
                                     ({}, {}, [*TO_RELAY, E("upstream_eof"), E("drain")],
                                      Stage.CLOSED, ["shut_write", *CLOSE],
                                      ("allow", "upstream_fin"))],
    (Stage.DRAINING, "upstream_eof"): [({}, {}, None, Stage.DRAINING,
                                        ["shut_write", "start_timer"], None),
                                       ({}, {}, [*TO_HALF, E("drain")], Stage.CLOSED,
                                        ["shut_write", *CLOSE], ("allow", "client_fin"))],
    (Stage.DRAINING, "done"): [({}, {}, [*TO_RELAY[:-1], E("relay_started", flag=True),
                                         E("drain"), E("client_eof"), E("upstream_eof")],
                                Stage.CLOSED, CLOSE, ("allow", "client_fin"))],
    (Stage.DRAINING, "idle_timeout"): [({"now": 300.0}, {}, None, Stage.CLOSED, CLOSE,
                                        ("allow", "idle_timeout")),
                                       ({"now": 100.0}, {}, None, Stage.DRAINING,
                                        ["start_timer"], None)],
    (Stage.DRAINING, "close_timeout"): [({}, {}, [*TO_HALF, E("drain")], Stage.CLOSED, CLOSE,
                                         ("allow", "close_timeout"))],
    (Stage.CLOSED, "client_error"): [({"reason": "reset"}, {}, None, Stage.CLOSED, [], None)],
    (Stage.CLOSED, "upstream_error"): [({"reason": "closed"}, {}, None, Stage.CLOSED, [],
                                        None)],
    (Stage.CLOSED, "internal_error"): [({}, {}, None, Stage.CLOSED, [], None)],
    (Stage.CLOSED, "cert_revoked"): [({"reason": "revoked"}, {}, None, Stage.CLOSED, [], None)],
    (Stage.CLOSED, "client_data"): [({}, {}, None, Stage.CLOSED, [], None)],
    (Stage.CLOSED, "upstream_data"): [({}, {}, None, Stage.CLOSED, [], None)],
    (Stage.CLOSED, "client_eof"): [({}, {}, None, Stage.CLOSED, [], None)],
    (Stage.CLOSED, "upstream_eof"): [({}, {}, None, Stage.CLOSED, [], None)],
}
# A TLS end's FIN without close_notify (its kind in the event): mid-record (truncated) it
# always fails the connection, on a record boundary (no_close_notify) only without that
# side's tls.allow_eof_without_close_notify; a lenient one is that stage's plain EOF
# (AS_EOF: what the same cell of the ``<side>_eof`` row does).
LENIENT = {"client_lenient": True, "upstream_lenient": True}
TRUNCATED, NO_NOTIFY = {"reason": "truncated"}, {"reason": "no_close_notify"}
UPSTREAM_FIRST = [*TO_RELAY, E("upstream_eof")]
HALF_KINDS = ["shut_write", "start_timer"]
AS_EOF: dict[tuple[Stage, str], tuple[list[Event] | None, Stage, list[str],
                                      tuple[str, str] | None]] = {
    (Stage.AUTHORIZE, "client"): (None, Stage.CLOSED, CLOSE, ("error", "client_closed")),
    (Stage.CONNECT, "client"): (None, Stage.CONNECT, [], None),  # held until the relay
    (Stage.UPSTREAM_TLS, "client"): (None, Stage.UPSTREAM_TLS, [], None),
    (Stage.RELAY, "client"): (None, Stage.HALF_CLOSED, HALF_KINDS, None),
    (Stage.HALF_CLOSED, "client"): (UPSTREAM_FIRST, Stage.CLOSED, ["shut_write", *CLOSE],
                                    ("allow", "upstream_fin")),
    (Stage.DRAINING, "client"): (None, Stage.DRAINING, HALF_KINDS, None),
    (Stage.RELAY, "upstream"): (None, Stage.HALF_CLOSED, HALF_KINDS, None),
    (Stage.HALF_CLOSED, "upstream"): (None, Stage.CLOSED, ["shut_write", *CLOSE],
                                      ("allow", "client_fin")),
    (Stage.DRAINING, "upstream"): (None, Stage.DRAINING, HALF_KINDS, None),
}
for (_stage, _who), (_path, _after, _kinds, _record) in AS_EOF.items():
    CASES[(_stage, f"{_who}_unclean_eof")] = [
        (NO_NOTIFY, LENIENT, _path, _after, _kinds, _record),
        (NO_NOTIFY, {}, _path, Stage.CLOSED, CLOSE, ("allow", f"{_who}_eof_without_close_notify")),
        (TRUNCATED, LENIENT, _path, Stage.CLOSED, CLOSE, ("allow", f"{_who}_truncated")),
        (TRUNCATED, {}, _path, Stage.CLOSED, CLOSE, ("allow", f"{_who}_truncated"))]
for _who in ("client", "upstream"):
    CASES[(Stage.CLOSED, f"{_who}_unclean_eof")] = [
        (TRUNCATED, {}, None, Stage.CLOSED, [], None),
        (NO_NOTIFY, LENIENT, None, Stage.CLOSED, [], None)]
# events that close every open stage where the table allows them, the same way
RELAYING = (Stage.RELAY, Stage.HALF_CLOSED, Stage.DRAINING)
for (_stage, _event), _outcome in TABLE.items():
    _action = "allow" if _stage in RELAYING else "error"
    if _stage == Stage.CLOSED or (_stage, _event) in CASES:
        continue
    if _event == "client_error":
        CASES[(_stage, _event)] = [({"reason": "reset"}, {}, None, Stage.CLOSED, CLOSE,
                                    (_action, "client_reset"))]
    elif _event == "upstream_error":
        CASES[(_stage, _event)] = [({"reason": "peer_timeout"}, {}, None, Stage.CLOSED, CLOSE,
                                    (_action, "peer_timeout"))]
    elif _event in ("max_lifetime", "drain_deadline"):
        CASES[(_stage, _event)] = [({}, {}, None, Stage.CLOSED, CLOSE,
                                    (_action, _event.removesuffix("_deadline")))]
    elif _event == "drain":  # noted; the relay (or its start) goes on as DRAINING
        CASES[(_stage, _event)] = [({}, {}, None, Stage.DRAINING if _stage in RELAYING
                                    else _stage, [], None)]
    elif _event == "cert_revoked":
        CASES[(_stage, _event)] = [
            ({"reason": "revoked"}, {}, None, Stage.CLOSED, CLOSE, ("deny", "revoked")),
            ({"reason": "peer_certificate_expired"}, {}, None, Stage.CLOSED, CLOSE,
             ("deny", "peer_certificate_expired"))]
    elif _event == "revoke":
        CASES[(_stage, _event)] = [({}, {}, None, Stage.CLOSED, CLOSE,
                                    ("deny", "policy_reload"))]
    elif _event == "internal_error":
        CASES[(_stage, _event)] = [({}, {}, None, Stage.CLOSED, CLOSE,
                                    ("error", "internal_error"))]
ALL_CASES = [(stage, event, case) for (stage, event), cases in CASES.items()
             for case in cases]


def test_every_cell_has_a_case() -> None:
    assert set(CASES) == set(TABLE)
    assert {o for o in TABLE.values()} - {"-", "fwd"} <= set(OUTCOMES)


@pytest.mark.parametrize(("stage", "event", "case"), ALL_CASES,
                         ids=[f"{s.name}-{e}-{i}" for (s, e), cs in CASES.items()
                              for i, _ in enumerate(cs)])
def test_transition(stage: Stage, event: str, case: Case) -> None:
    fields, changes, path, after, expected, record = case
    core = drive(PATHS[stage] if path is None else path, dataclasses.replace(PLAN, **changes))
    assert core.stage == stage
    cmds = core.handle(Event(event, **fields))
    assert core.stage == after
    assert kinds(cmds) == expected
    if record is not None:
        assert core.record is not None and core.record[:2] == record
        assert not core.timers  # every armed timer was cancelled
    else:
        assert core.record is None or stage == Stage.CLOSED


@pytest.mark.parametrize("stage", list(Stage))
@pytest.mark.parametrize("event", events())
def test_impossible_events_raise(stage: Stage, event: str) -> None:
    if (stage, event) in TABLE:
        return
    core = drive(PATHS[stage])
    with pytest.raises(LifecycleError, match=event):
        core.handle(Event(event))


# ---------------------------------------------------------------------- the nasty orders
def test_fin_during_upstream_connect_is_replayed_when_the_relay_starts() -> None:
    plan = dataclasses.replace(PLAN, upstream_tls=False)
    core = drive([*TO_CONNECT, E("client_data"), E("client_eof")], plan)
    cmds = core.handle(E("upstream_connected"))
    assert [c.kind for c in cmds] == ["cancel_timer", "start_relay"]
    assert cmds[-1].reason == ""  # no hand-over to the pump with a held EOF
    with pytest.raises(LifecycleError, match="held EOF"):
        drive([*TO_CONNECT, E("client_eof"), E("upstream_connected")], plan).handle(
            E("relay_started", flag=True))
    cmds = core.handle(E("relay_started"))
    assert kinds(cmds) == ["shut_write", "start_timer", "start_timer"]
    assert cmds[0].side == "upstream" and core.stage == Stage.HALF_CLOSED
    assert core.handle(E("upstream_data"))[0].side == "client"
    core.handle(E("upstream_eof"))
    assert core.record is not None and core.record[:2] == ("allow", "client_fin")


def test_banner_then_fin_before_connect_completes() -> None:
    core = drive([*TO_CONNECT, E("upstream_data"), E("upstream_eof")],
                 dataclasses.replace(PLAN, upstream_tls=False))
    core.handle(E("upstream_connected"))
    cmds = core.handle(E("relay_started"))
    assert cmds[0].kind == "shut_write" and cmds[0].side == "client"
    assert core.first_eof == "upstream"


def test_both_fins_held_close_at_relay_start() -> None:
    core = drive([*TO_CONNECT, E("upstream_data"), E("client_eof"), E("upstream_eof")],
                 dataclasses.replace(PLAN, upstream_tls=False))
    core.handle(E("upstream_connected"))
    cmds = core.handle(E("relay_started"))
    assert core.record is not None and core.record[:2] == ("allow", "client_fin")
    assert "record" in kinds(cmds) and "start_timer" not in kinds(cmds)[2:]


def test_revoke_during_upstream_handshake() -> None:
    core = drive(TO_UPTLS)
    cmds = core.handle(E("revoke"))
    assert kinds(cmds) == CLOSE and cmds[-2].abort
    assert core.record == ("deny", "policy_reload", "denied after a ruleset reload",
                           Stage.UPSTREAM_TLS)
    undecided = drive([*TO_AUTHORIZE, E("decision", allow=None), E("upstream_connected")])
    with pytest.raises(LifecycleError, match="not allowed"):
        undecided.handle(E("revoke"))


def test_drain_during_proxy_header() -> None:
    """The drain does not cut a connection short: the header, handshake and connect go on,
    the relay starts as DRAINING; only the deadline closes it (before the relay: error)."""
    core = drive([E("accept"), E("client_data")])
    assert core.handle(E("drain")) == [] and core.stage == Stage.PROXY and core.draining
    with pytest.raises(LifecycleError, match="second drain"):
        core.handle(E("drain"))
    for ev in TO_RELAY[1:-1]:
        core.handle(ev)
    assert core.stage == Stage.RELAY  # start_relay ran; relay_started says how it relays
    core.handle(E("relay_started"))
    assert core.stage == Stage.DRAINING and core.timers["idle"] == "idle_timeout"
    assert core.handle(E("client_data"))[0].side == "upstream"
    late = drive([E("accept"), E("client_data"), E("drain")])
    cmds = late.handle(E("drain_deadline"))
    assert [c.kind for c in cmds] == ["cancel_timer", "cancel_timer", "close", "record"]
    assert cmds[2].abort and late.record == ("error", "drain", "closed at the end of the drain",
                                             Stage.PROXY)
    with pytest.raises(LifecycleError, match="DRAINING"):
        drive(TO_DRAINING).handle(E("drain"))


def test_drain_with_held_eofs_replays_them_then_drains() -> None:
    plan = dataclasses.replace(PLAN, upstream_tls=False)
    core = drive([*TO_CONNECT, E("client_eof"), E("drain"), E("upstream_connected")], plan)
    cmds = core.handle(E("relay_started"))
    assert kinds(cmds)[0] == "shut_write" and core.stage == Stage.DRAINING
    assert core.first_eof == "client" and core.timers["close"] == "close_timeout"
    core.handle(E("upstream_eof"))
    assert core.record is not None and core.record[:2] == ("allow", "client_fin")
    both = drive([*TO_CONNECT, E("upstream_data"), E("client_eof"), E("upstream_eof"),
                  E("drain"), E("upstream_connected")], plan)
    both.handle(E("relay_started"))
    assert both.stage == Stage.CLOSED and both.record is not None
    assert both.record[:2] == ("allow", "client_fin")


@pytest.mark.parametrize("native", [False, True])
def test_close_timeout_after_half_close_and_drain(native: bool) -> None:
    """A side finished, then the drain: the close_timeout armed at the half-close still
    ends it (same reason, same record as without a drain)."""
    start = [*TO_RELAY[:-1], E("relay_started", flag=native), E("upstream_eof")]
    core = drive([*start, E("drain")])
    assert core.stage == Stage.DRAINING and core.first_eof == "upstream"
    assert core.handle(E("upstream_data")) == []  # after its end: dropped, as in HALF_CLOSED
    with pytest.raises(LifecycleError, match="second EOF"):
        core.handle(E("upstream_eof"))
    cmds = core.handle(E("close_timeout"))
    assert kinds(cmds) == CLOSE and cmds[-2].abort
    assert core.record is not None and core.record[:2] == ("allow", "close_timeout")
    without = drive(start).handle(E("close_timeout"))[-1]  # the same record, but the stage
    assert without == cmds[-1]._replace(stage=Stage.HALF_CLOSED)
    with pytest.raises(LifecycleError, match="not armed"):  # no half-close: nothing armed
        drive(TO_DRAINING).handle(E("close_timeout"))


@pytest.mark.parametrize(("rst", "reason"), [(False, "close_timeout"),
                                             (True, "close_timeout_rst")])
def test_close_timeout_after_half_close(rst: bool, reason: str) -> None:
    core = drive(TO_HALF, dataclasses.replace(PLAN, timeout_rst=rst))
    assert core.timers["close"] == "close_timeout"
    cmds = core.handle(E("close_timeout"))
    close = next(c for c in cmds if c.kind == "close")
    assert close.abort and close.reset == rst
    assert core.record is not None and core.record[:2] == ("allow", reason)


def test_error_after_eof() -> None:
    core = drive(TO_HALF)
    core.handle(E("upstream_error", reason="reset", detail="Connection reset by peer"))
    assert core.record == ("allow", "upstream_reset", "Connection reset by peer",
                           Stage.HALF_CLOSED)
    closed = drive(TO_CLOSED)
    assert closed.handle(E("client_error", reason="reset")) == []


@pytest.mark.parametrize("path", [TO_AUTHORIZE, TO_CONNECT, TO_UPTLS, TO_RELAY, TO_DRAINING,
                                  UPSTREAM_FIRST], ids=lambda p: p[-1].kind)
@pytest.mark.parametrize(("kind", "lenient", "reason", "detail"), [
    ("truncated", True, "client_truncated",
     "the client's TLS stream ended in the middle of a record (truncated)"),
    ("no_close_notify", False, "client_eof_without_close_notify",
     "the client closed without TLS close_notify")])
def test_unclean_tls_end_resets_both(path: list[Event], kind: str, lenient: bool, reason: str,
                                     detail: str) -> None:
    """A FIN without close_notify the plan does not take as an end: CLOSED at once in
    every stage (never held while the upstream connects), both sockets reset, the flow
    record allow with the reason and detail from the core."""
    core = drive(path, dataclasses.replace(PLAN, client_lenient=lenient))
    stage = core.stage
    cmds = core.handle(E("client_unclean_eof", reason=kind))
    close = next(c for c in cmds if c.kind == "close")
    assert close.abort and close.reset and close.action == "allow" and close.stage == stage
    assert core.record == ("allow", reason, detail, stage)
    assert "shut_write" not in kinds(cmds) and not core.timers


def test_unclean_upstream_end_follows_the_upstreams_setting() -> None:
    """Each side has its own setting: a lenient client says nothing about the upstream."""
    core = drive(TO_RELAY, dataclasses.replace(PLAN, client_lenient=True))
    core.handle(E("upstream_unclean_eof", reason="no_close_notify"))
    assert core.record is not None and core.record[:2] == (
        "allow", "upstream_eof_without_close_notify")
    up = drive(TO_RELAY, dataclasses.replace(PLAN, upstream_lenient=True))
    cmds = up.handle(E("upstream_unclean_eof", reason="no_close_notify"))
    assert cmds[0] == Command("shut_write", side="client")
    assert up.first_eof == "upstream" and up.stage == Stage.HALF_CLOSED
    with pytest.raises(LifecycleError, match="second EOF"):  # its FIN was its end
        up.handle(E("upstream_unclean_eof", reason="no_close_notify"))


def test_lenient_fin_during_upstream_connect_is_held() -> None:
    """A lenient FIN on a record boundary while the upstream connects waits, like a FIN,
    and is passed on when the relay starts (on the Python relay: the pump takes only a
    clean start); a second one from the same side is impossible."""
    plan = dataclasses.replace(PLAN, upstream_tls=False, client_lenient=True)
    core = drive([*TO_CONNECT, E("client_data"),
                  E("client_unclean_eof", reason="no_close_notify")], plan)
    assert core.held_eof == {"client"} and core.record is None
    with pytest.raises(LifecycleError, match="second EOF"):
        core.handle(E("client_unclean_eof", reason="no_close_notify"))
    with pytest.raises(LifecycleError, match="second EOF"):
        core.handle(E("client_eof"))
    assert core.handle(E("upstream_connected"))[-1].reason == ""  # no hand-over
    cmds = core.handle(E("relay_started"))
    assert cmds[0] == Command("shut_write", side="upstream") and core.first_eof == "client"
    core.handle(E("upstream_eof"))
    assert core.record is not None and core.record[:2] == ("allow", "client_fin")


def test_error_after_an_unclean_eof_taken_as_the_end() -> None:
    core = drive(TO_RELAY, dataclasses.replace(PLAN, client_lenient=True))
    core.handle(E("client_unclean_eof", reason="no_close_notify"))
    core.handle(E("upstream_error", reason="reset", detail="Connection reset by peer"))
    assert core.record == ("allow", "upstream_reset", "Connection reset by peer",
                           Stage.HALF_CLOSED)
    closed = drive(TO_RELAY)  # an unclean end closed it: the other side's last callbacks
    closed.handle(E("upstream_unclean_eof", reason="truncated"))
    assert closed.handle(E("client_error", reason="reset")) == []
    assert closed.handle(E("client_unclean_eof", reason="no_close_notify")) == []


def test_native_pump_lenient_second_eof_waits_for_done() -> None:
    plan = dataclasses.replace(PLAN, client_lenient=True, upstream_lenient=True)
    core = drive([*TO_RELAY[:-1], E("relay_started", flag=True)], plan)
    assert kinds(core.handle(E("upstream_unclean_eof", reason="no_close_notify"))) == \
        HALF_KINDS
    cmds = core.handle(E("client_unclean_eof", reason="no_close_notify"))
    assert cmds == [Command("shut_write", side="upstream")] and core.record is None
    with pytest.raises(LifecycleError, match="second EOF"):  # both ended: none can come
        core.handle(E("client_unclean_eof", reason="truncated"))
    core.handle(E("done"))
    assert core.record is not None and core.record[:2] == ("allow", "upstream_fin")


def test_unknown_kind_of_eof_is_refused() -> None:
    for reason in ("", "eof_without_close_notify", "oops"):
        with pytest.raises(LifecycleError, match="kind of EOF"):
            drive(TO_RELAY).handle(E("client_unclean_eof", reason=reason))
    with pytest.raises(LifecycleError, match="unknown socket error"):  # no longer an error
        drive(TO_RELAY).handle(E("client_error", reason="truncated"))


def test_deferred_decision_deny_never_relays() -> None:
    core = drive([*TO_AUTHORIZE, E("decision", allow=None), E("upstream_connected")])
    assert kinds(core.handle(E("upstream_tls_done"))) == ["decide"]
    cmds = core.handle(E("decision", allow=False))
    assert "start_relay" not in kinds(cmds) and core.record is not None
    assert core.record[:2] == ("deny", "denied")


def test_unasked_decision_is_impossible() -> None:
    with pytest.raises(LifecycleError, match="not asked"):
        drive(TO_CONNECT).handle(ALLOW)


def test_native_pump_waits_for_done() -> None:
    core = drive([*TO_RELAY[:-1], E("relay_started", flag=True)])
    assert "idle" not in core.timers
    core.handle(E("upstream_eof"))
    assert kinds(core.handle(E("client_eof"))) == ["shut_write"]
    assert core.stage == Stage.HALF_CLOSED and core.record is None
    with pytest.raises(LifecycleError, match="without its activity"):
        core.handle(E("idle_timeout", now=400.0))
    assert core.handle(E("idle_timeout", now=400.0, last_active=200.0)) == []
    core.handle(E("done"))
    assert core.record is not None and core.record[:2] == ("allow", "upstream_fin")


def test_an_idle_pumped_connection_keeps_no_timer_map_or_command_list() -> None:
    """Memory per held connection: once the pump relays with no timer armed, the core
    holds the one shared empty timer map and none of the lists it answered with."""
    core = drive([*TO_RELAY[:-1], E("relay_started", flag=True)],
                 dataclasses.replace(PLAN, max_lifetime=0.0))
    cmds = core.handle(E("idle_timeout", now=1.0, last_active=0.0))  # the plane's tick
    fresh = Lifecycle(PLAN, 0.0)
    assert cmds == [] and core.timers == {} and core.timers is fresh.timers
    assert core.out is not cmds and core.out is fresh.out and core.out == []
    with pytest.raises(LifecycleError, match="outside an event"):
        core.out.append(Command("decide"))  # the shared list is never written
    armed = drive(TO_RELAY)  # the Python relay: idle (and max_lifetime) armed, its own map
    assert armed.timers == {"idle": "idle_timeout", "life": "max_lifetime"}
    assert armed.timers is not fresh.timers and fresh.timers == {}


def test_idle_rearms_for_the_rest() -> None:
    core = drive(TO_RELAY)
    core.handle(E("client_data", now=250.0))
    cmds = core.handle(E("idle_timeout", now=300.0))
    assert cmds[0].delay == pytest.approx(250.0) and core.stage == Stage.RELAY


def test_a_cancelled_timer_cannot_fire() -> None:
    core = drive(TO_CONNECT)
    core.handle(E("upstream_connected"))  # cancels connect_timeout, arms upstream TLS's
    with pytest.raises(LifecycleError, match="cannot happen"):
        core.handle(E("connect_timeout"))
    no_detect = drive(PATHS[Stage.DETECT], dataclasses.replace(PLAN, detect_timeout=0.0))
    with pytest.raises(LifecycleError, match="not armed"):
        no_detect.handle(E("detect_timeout"))
    with pytest.raises(LifecycleError, match="not armed"):
        drive(TO_RELAY, dataclasses.replace(PLAN, max_lifetime=0.0)).handle(E("max_lifetime"))


def test_unknown_reasons_are_refused() -> None:
    with pytest.raises(LifecycleError, match="unknown close reason"):
        drive(PATHS[Stage.CONNECT]).handle(E("fail", reason="oops"))
    with pytest.raises(LifecycleError, match="unknown socket error"):
        drive(TO_RELAY).handle(E("client_error", reason="oops"))


def test_data_after_its_eof_is_dropped_and_a_second_eof_impossible() -> None:
    assert drive(TO_HALF).handle(E("client_data")) == []  # dropped (TLS: after close_notify)
    with pytest.raises(LifecycleError, match="second EOF"):
        drive([*TO_CONNECT, E("client_eof")]).handle(E("client_eof"))


def test_egress_request_comes_before_the_policy() -> None:
    plan = dataclasses.replace(PLAN, **EGRESS)
    core = drive(TO_AUTHORIZE, plan)
    assert core.timers["stage"] == "request_timeout"
    with pytest.raises(LifecycleError, match="not asked for"):
        core.handle(ALLOW)  # no decision before the request names the destination
    assert kinds(core.handle(E("client_data"))) == ["request"]
    assert kinds(core.handle(E("request_done"))) == ["decide"] and "stage" not in core.timers
    with pytest.raises(LifecycleError, match="without a request"):
        core.handle(E("client_data"))  # after the request: the policy answers at once
    assert kinds(core.handle(ALLOW)) == ["start_timer", "connect"]
    with pytest.raises(LifecycleError, match="was not being read"):
        drive(TO_AUTHORIZE).handle(E("request_done"))  # not an egress listener


def test_egress_request_timeout_closes_gracefully() -> None:
    core = drive(TO_AUTHORIZE, dataclasses.replace(PLAN, timeout_rst=True, **EGRESS))
    cmds = core.handle(E("request_timeout", detail="socks5: no complete request"))
    close = next(c for c in cmds if c.kind == "close")
    assert close.reason == "egress_timeout" and not close.abort and not close.reset
    assert close.action == "error"  # (the egress session sends its refusal on close)


def test_proxy_silence_then_the_full_proxy_timeout() -> None:
    core = drive([E("accept")], dataclasses.replace(PLAN, **SILENCE))
    assert core.timers["stage"] == "proxy_silence"
    cmds = core.handle(E("proxy_silence", flag=True))  # a header has begun
    assert [(c.reason, c.delay) for c in cmds if c.kind == "start_timer"] == [
        ("proxy_timeout", PLAN.proxy_timeout)]
    with pytest.raises(LifecycleError, match="not armed"):
        core.handle(E("proxy_silence"))
    assert core.handle(E("proxy_timeout"))[-1].reason == "proxy_protocol_timeout"
    quiet = drive([E("accept")], dataclasses.replace(PLAN, **SILENCE))
    assert kinds(quiet.handle(E("proxy_silence"))) == ["decide"]  # no DETECT: plaintext


def test_tls_off_optional_proxy_silence_connects_and_takes_the_banner() -> None:
    """tls.mode off, accept optional: silence means no header; the upstream's banner (early
    bytes before the relay) is held and then forwarded; a required header stays strict."""
    plan = dataclasses.replace(PLAN, tls="off", upstream_tls=False, **SILENCE)
    core = drive([E("accept")], plan)
    assert core.timers["stage"] == "proxy_silence"
    assert kinds(core.handle(E("proxy_silence"))) == ["decide"]
    assert "stage" not in core.timers
    assert kinds(core.handle(ALLOW)) == ["start_timer", "connect"]
    assert kinds(core.handle(E("upstream_data"))) == ["hold"]  # the banner, before the relay
    assert kinds(core.handle(E("upstream_connected"))) == ["start_relay"]
    assert core.handle(E("relay_started")) and core.stage == Stage.RELAY
    assert core.handle(E("client_data")) == [Command("forward", side="upstream")]
    # a header after a short pause: the parser takes it, then AUTHORIZE at once
    late = drive([E("accept")], plan)
    assert kinds(late.handle(E("proxy_silence", flag=True))) == ["start_timer"]
    assert kinds(late.handle(E("proxy_done"))) == ["decide"]
    # accept required (proxy_silence 0): silence is the PROXY timeout, refused
    strict = drive([E("accept")], dataclasses.replace(plan, proxy_silence=0.0))
    assert strict.timers["stage"] == "proxy_timeout"
    with pytest.raises(LifecycleError):
        strict.handle(E("proxy_silence"))
    assert strict.handle(E("proxy_timeout"))[-1].reason == "proxy_protocol_timeout"


def test_passthrough_hello_routes_then_authorizes() -> None:
    plan = dataclasses.replace(PLAN, **PASSTHROUGH)
    core = drive([E("accept"), E("proxy_done")], plan)
    assert core.timers["stage"] == "handshake_timeout"
    with pytest.raises(LifecycleError, match="without passthrough"):
        drive([E("accept"), E("proxy_done")]).handle(E("hello_done"))
    assert kinds(core.handle(E("hello_done"))) == ["decide"]
    assert "stage" not in core.timers


def test_certificate_closes_live_and_unknown_reasons_are_refused() -> None:
    core = drive(TO_RELAY)
    cmds = core.handle(E("cert_revoked", reason="peer_certificate_expired", detail="x"))
    close = next(c for c in cmds if c.kind == "close")
    assert close.abort and close.action == "deny"
    assert core.record == ("deny", "peer_certificate_expired", "x", Stage.RELAY)
    with pytest.raises(LifecycleError, match="certificate close reason"):
        drive(TO_RELAY).handle(E("cert_revoked", reason="policy_reload"))
    with pytest.raises(LifecycleError, match="ACCEPTED"):
        drive([]).handle(E("cert_revoked", reason="revoked"))


def test_every_refusal_a_feature_raises_is_a_known_close_reason() -> None:
    """A reason missing from REASONS would close the connection as internal_error."""
    import re
    from pathlib import Path

    from enforcer.dataplane.lifecycle import REASONS

    root = Path(__file__).resolve().parents[2] / "enforcer"
    egress = "".join((root / "egress" / f).read_text() for f in ("socks5.py", "httpconnect.py",
                                                                  "session.py"))
    found = {f"egress_{r}" for r in re.findall(r'(?:Socks5Error|HttpError)\(\s*"(\w+)"', egress)}
    hello = (root / "dataplane" / "clienthello.py").read_text()
    found |= set(re.findall(r'HelloError\(\s*"(\w+)"', hello))
    found |= {"sni_refused", "rate_limited", "concurrency_limited", "revoked",
              "peer_certificate_expired"}
    assert len(found) > 15 and found <= set(REASONS), found - set(REASONS)
    assert all(action in ("allow", "deny", "error") for action, _ in REASONS.values())


# ---------------------------------------------------------------------- property test
SAMPLES = [E(name) for name in events()] + [
    E("decision", allow=None), E("decision", allow=False), E("relay_started", flag=True),
    E("detect_timeout", flag=True), E("client_error", reason="reset"),
    E("upstream_error", reason="tls_error"), E("fail", reason="upstream_connect_failed"),
    E("fail", reason="proxy_protocol_timeout"), E("idle_timeout", now=1e6, last_active=0.0),
    E("client_data", now=5.0), E("upstream_data", now=7.0), E("cert_revoked", reason="revoked"),
    E("fail", reason="rate_limited"), E("fail", reason="egress_timeout"),
    E("client_unclean_eof", reason="truncated"), E("client_unclean_eof", reason="no_close_notify"),
    E("upstream_unclean_eof", reason="no_close_notify"),
    E("upstream_unclean_eof", reason="truncated"),
]
PLANS = st.builds(Plan, proxy=st.booleans(),
                  tls=st.sampled_from(["off", "terminate", "auto", "passthrough"]),
                  egress_timeout=st.sampled_from([0.0, 10.0]),
                  proxy_silence=st.sampled_from([0.0, 0.2]),
                  detect_timeout=st.sampled_from([0.0, 1.0]),
                  max_lifetime=st.sampled_from([0.0, 60.0]), timeout_rst=st.booleans(),
                  upstream_tls=st.booleans(), open_events=st.booleans(),
                  client_lenient=st.booleans(), upstream_lenient=st.booleans())


def _snapshot(core: Lifecycle) -> tuple[object, ...]:
    fields = [getattr(core, name) for name in Lifecycle.__slots__
              if name not in ("out", "timers", "held_eof")]
    return (*fields, frozenset(core.held_eof), tuple(sorted(core.timers.items())))


# None in a sequence: the event that moves the current stage forward (so that random
# sequences also reach the relay and its ends, not only the early stages)
FORWARD: dict[Stage, list[Event]] = {
    Stage.ACCEPTED: [E("accept")], Stage.PROXY: [E("proxy_done"), E("proxy_silence")],
    Stage.DETECT: [E("tls_detected"), E("plain_detected"), E("hello_done")],
    Stage.HANDSHAKE: [E("handshake_done")],
    Stage.AUTHORIZE: [ALLOW, E("decision", allow=None), E("request_done")],
    Stage.CONNECT: [E("upstream_connected"), ALLOW],
    Stage.UPSTREAM_TLS: [E("upstream_tls_done"), ALLOW],
    Stage.RELAY: [E("relay_started"), E("relay_started", flag=True), E("client_eof"),
                  E("upstream_eof"), E("upstream_unclean_eof", reason="no_close_notify")],
    Stage.HALF_CLOSED: [E("client_eof"), E("upstream_eof"), E("done"),
                        E("client_unclean_eof", reason="no_close_notify")],
    Stage.DRAINING: [E("client_eof"), E("upstream_eof"), E("done"), E("drain_deadline")],
    Stage.CLOSED: [E("client_error", reason="closed")],
}


@settings(max_examples=500, deadline=None)
@given(PLANS, st.lists(st.one_of(st.sampled_from(SAMPLES), st.integers(0, 3)), max_size=40))
def test_random_event_sequences_keep_the_invariants(plan: Plan,
                                                    seq: list[Event | int]) -> None:
    core = Lifecycle(plan, 0.0)
    allowed = drained = started = False
    records = 0
    shut: set[str | None] = set()  # sides whose write was shut (their EOF passed on)
    for item in [*seq, E("internal_error")]:
        if isinstance(item, int):
            choices = FORWARD[core.stage]
            ev = choices[item % len(choices)]
        else:
            ev = item
        before = _snapshot(core)
        was_closed = core.stage == Stage.CLOSED
        try:
            cmds = core.handle(ev)
        except LifecycleError:
            assert _snapshot(core) == before  # a refused event changes nothing
            continue
        if was_closed:
            assert cmds == []  # no command after CLOSED
        if ev.kind == "decision" and ev.allow is True:
            allowed = True
        drained = drained or ev.kind == "drain"
        started = started or ev.kind == "relay_started"
        # DRAINING only after a drain; relaying (started) after a drain only as DRAINING
        assert drained or core.stage != Stage.DRAINING
        assert not (drained and started) or core.stage in (Stage.DRAINING, Stage.CLOSED)
        for cmd in cmds:
            if cmd.kind in ("forward", "start_relay"):
                assert allowed, "relayed before the policy allowed"
            if cmd.kind == "record" and cmd.event == "flow":
                records += 1
            # nothing goes to a side after its EOF was passed on, and that happens once
            assert not (cmd.kind in ("forward", "shut_write") and cmd.side in shut), cmd
            if cmd.kind == "shut_write":
                shut.add(cmd.side)
            # an unclean end the core does not take as a FIN resets both sockets
            if cmd.kind == "close" and cmd.reason.endswith(("_truncated", "_close_notify")):
                assert cmd.reset and cmd.abort and cmd.action == "allow"
    assert core.stage == Stage.CLOSED and records == 1  # exactly one flow record
    assert not core.timers
