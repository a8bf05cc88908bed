"""The connection lifecycle as a pure state machine: events in, commands out.

How it works. A ``Lifecycle`` holds one connection's stage and the little state the rules
need (the decision, which side finished first, held EOFs, armed timers, last activity).
The I/O layer (connection.py, the native pump behind it) turns what happens on sockets,
timers, the policy and the process into ``Event``s and passes them to ``handle``, which
looks the (stage, event) pair up in the transition table (lifecycle_table.py, copied into
docs/design.md), runs the named outcome and returns the ``Command``s to execute, in order:
arm or cancel a timer, start a TLS handshake, ask the policy, connect, route bytes (parse,
hold, forward), shut one direction, close, write the flow record. A pair missing from the
table is an impossible event: ``LifecycleError``, never a silent guard.

Both relays (Python's and the native pump) only report what happened on a socket: an end of
stream, and for a TLS end's FIN without close_notify its kind (``*_unclean_eof``: cut
mid-record, or on a record boundary). Whether an EOF ends one direction (``shut_write``
passes it on: the relay sends close_notify and FIN once the bytes before it are out) or
fails the connection (``close`` with reset), and with which close reason, is decided here
from the plan (``tls.allow_eof_without_close_notify`` of each side).

It does no I/O, reads no clock (times come in the events) and imports nothing from the
data plane, so every rule is tested without sockets (tests/unit/test_lifecycle.py).
Parsing stays in its own sans-IO code (proxyproto's HeaderParser, detect.py, the TLS
engine): their verdicts come back as events (``proxy_done``, ``fail``, ...).

Invariants (checked by a property test): nothing is forwarded and the relay does not start
before the policy allowed the connection; every connection that ends emits exactly one
``record`` command; after CLOSED no event yields a command.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Final

from enforcer.dataplane.lifecycle_table import (  # the close reasons' data, re-exported
    CERT_CLOSES,
    KEEP_SOCKETS,
    PROXY_PREFIX,
    REASONS,
    RESETTING,
    SOCKET_ERRORS,
    TIMERS,
    UNCLEAN,
    parse,
)
from enforcer.dataplane.lifecycle_table import OUTCOMES as MEANINGS
from enforcer.dataplane.lifecycle_types import (
    ACCEPTED,
    AUTHORIZE,
    CLOSED,
    CONNECT,
    DETECT,
    DRAINING,
    HALF_CLOSED,
    HANDSHAKE,
    PROXY,
    RELAY,
    UPSTREAM_TLS,
    Command,
    Event,
    LifecycleError,
    Plan,
    Stage,
)

TABLE: Final = {(Stage[stage], event): outcome for (stage, event), outcome in parse().items()}
# the same, as one row per stage indexed by its number (no enum hashing per event)
_ROWS: Final = [{event: outcome for (s, event), outcome in TABLE.items() if s == stage}
                for stage in Stage]

OTHER: Final = {"client": "upstream", "upstream": "client"}
_FORWARD: Final = {side: [Command("forward", side=other)] for side, other in OTHER.items()}

# Commands are immutable: the ones whose fields do not depend on the connection are made
# once here, not per event (a NamedTuple made with keywords is a Python-level call).
_CONST: Final = {kind: Command(kind) for kind in (
    "start_tls", "start_peek", "start_request", "decide", "connect", "start_upstream_tls")}
_START_RELAY: Final = {True: Command("start_relay", reason="native_ok"),
                       False: Command("start_relay", reason="")}
_PROXY_EOF: Final = Command("proxy_eof", side="client")
_OPEN_RECORD: Final = Command("record", action="allow", stage=RELAY, event="open")
_SHUT: Final = {side: Command("shut_write", side=side) for side in OTHER}
_CANCEL: Final = {slot: Command("cancel_timer", timer=slot) for slot, _ in TIMERS.values()}
# bytes events: the side they come from, and the command per (command kind, side)
_SIDE_OF: Final = {"client_data": "client", "upstream_data": "upstream"}
_RELAYING: Final = (RELAY, HALF_CLOSED, DRAINING)
_NONE_HELD: Final[frozenset[str]] = frozenset()  # (rarely any: no set per connection)
_EOF_SIDE: Final = {"client_eof": "client", "upstream_eof": "upstream"}
_EOF_EVENT: Final = {side: Event(kind) for kind, side in _EOF_SIDE.items()}  # held, replayed
_DATA: Final = {(kind, side): Command(kind, side=side) for side in OTHER for kind in (
    "parse_proxy", "detect", "peek", "request", "handshake", "upstream_handshake", "hold")}
_HANDSHAKE: Final = {f"{side}_data": _DATA["handshake", side] for side in OTHER}
_UPSTREAM_HANDSHAKE: Final = {f"{side}_data": _DATA["upstream_handshake", side]
                              for side in OTHER}
# start_timer commands by (slot, event, delay): the delays come from the listeners' plans,
# so there are few; an idle re-arm for the rest of a period is made, not kept
_ARMS: dict[tuple[str, str, float], Command] = {}
_ARMS_MAX: Final = 1024


class _Spent(list[Command]):
    """``Lifecycle.out`` of a pumped connection between events (see ``_started``): the
    last list is its caller's, none is kept while it idles; adding to it is a bug."""

    def append(self, cmd: Command, /) -> None:
        raise LifecycleError(f"command {cmd.kind} outside an event")


_SPENT: Final = _Spent()
# no timer armed: one shared empty map (an idle pumped connection keeps none of its own),
# never written: _arm puts a new dict in its place first
_NO_TIMERS: Final[dict[str, str]] = {}


class Lifecycle:
    """One connection's lifecycle. ``handle(event)`` returns the commands to execute."""

    __slots__ = ("asked", "decision", "draining", "early", "ended", "first_eof", "held_eof",
                 "last_active", "native", "native_ok", "out", "plan", "record", "requested",
                 "stage", "timers")

    def __init__(self, plan: Plan, now: float) -> None:
        self.plan = plan
        self.stage = ACCEPTED
        self.decision: bool | None = None  # True once allowed
        self.asked = False  # the policy was asked after the upstream (rules on its identity)
        self.early = False  # a plaintext upstream spoke before the relay started
        self.requested = False  # egress: the client's SOCKS5/CONNECT request is complete
        self.held_eof: frozenset[str] = _NONE_HELD  # EOFs held until the relay starts
        self.first_eof: str | None = None  # client | upstream: who finished first
        self.ended = False  # both directions ended; the native pump still sends
        self.native = False  # the native pump relays
        self.native_ok = False  # start_relay allowed a hand-over to the pump
        self.draining = False  # the process drains: DRAINING once relaying
        self.last_active = now
        self.timers: dict[str, str] = _NO_TIMERS  # armed slot -> the event it fires
        self.record: tuple[str, str, str | None, Stage] | None = None  # how it closed
        self.out: list[Command] = _SPENT

    @property
    def relaying(self) -> bool:
        return self.stage in _RELAYING

    # ------------------------------------------------------------------ dispatch
    def handle(self, ev: Event) -> list[Command]:
        kind = ev.kind
        run = _STEPS[self.stage].get(kind)
        if run is None:
            raise LifecycleError(f"event {kind} cannot happen in stage {self.stage.name}")
        if run is _FWD:  # the hot path: no list is built
            return self._fwd(ev)
        if run is _NOTHING:
            return []
        if kind in TIMERS:
            self._fired(ev)
        out: list[Command] = []
        self.out = out  # (left in place until the next event: see _started for the idle)
        run(self, ev)
        return out

    def _fired(self, ev: Event) -> None:
        slot = TIMERS[ev.kind][0]
        if ev.kind == "idle_timeout" and self.native:
            return  # the pump's tick: no timer of its own
        if self.timers.get(slot) != ev.kind:
            raise LifecycleError(f"timer {ev.kind} fired but was not armed")
        del self.timers[slot]

    # ------------------------------------------------------------------ helpers
    def _arm(self, slot: str, event: str, delay: float, *, keep: bool = True) -> None:
        if self.timers is _NO_TIMERS:
            self.timers = {slot: event}
        else:
            self.timers[slot] = event
        key = (slot, event, delay)
        cmd = _ARMS.get(key)
        if cmd is None:
            cmd = Command("start_timer", timer=slot, reason=event, delay=delay)
            if keep and len(_ARMS) < _ARMS_MAX:
                _ARMS[key] = cmd
        self.out.append(cmd)

    def _disarm(self, slot: str) -> None:
        if self.timers.pop(slot, None) is not None:  # (no-op on _NO_TIMERS)
            self.out.append(_CANCEL[slot])

    def _close(self, action: str, reason: str, detail: str | None = None, *,
               abort: bool = False, reset: bool = False) -> None:
        reached = self.stage
        out = self.out
        if self.timers:
            for slot in self.timers:
                out.append(_CANCEL[slot])
            self.timers = _NO_TIMERS
        self.stage = CLOSED
        self.record = (action, reason, detail, reached)
        # positional (Command's fields in order): no keyword matching per close
        out.append(Command("close", None, None, 0.0, reason, action, None, abort, reset,
                           reached))
        out.append(Command("record", None, None, 0.0, reason, action, detail, False, False,
                           reached))

    def _fail(self, reason: str, detail: str | None) -> None:
        if reason.startswith(PROXY_PREFIX):
            action, abort = "error", True
        elif reason in REASONS:
            action, abort = REASONS[reason]
        else:
            raise LifecycleError(f"unknown close reason {reason!r}")
        self._close(action, reason, detail, abort=abort)

    @property
    def egress(self) -> bool:
        return self.plan.egress_timeout > 0

    def _authorize(self) -> None:
        self.stage = AUTHORIZE
        if self.plan.egress_timeout > 0 and not self.requested:  # (egress) the client's
            # request names the destination
            self._arm("stage", "request_timeout", self.plan.egress_timeout)
            self.out.append(_CONST["start_request"])
            return
        self.out.append(_CONST["decide"])

    def _enter(self, stage: Stage, timer: str, delay: float, command: str = "") -> None:
        """Move to ``stage`` with its stage timer armed, then ``command`` (if any)."""
        self.stage = stage
        self._arm("stage", timer, delay)
        if command:
            self.out.append(_CONST[command])

    def _enter_relay(self) -> None:
        if self.decision is None:  # rules on the upstream's identity: decide now
            self.asked = True
            self.out.append(_CONST["decide"])
            return
        self.stage = RELAY
        self.native_ok = not self.held_eof  # the pump takes only a clean start
        self.out.append(_START_RELAY[self.native_ok])

    def _timeout_close(self, reason: str, detail: str | None) -> None:
        action = "allow" if self.relaying else "error"
        detail = detail or f"{reason.replace('_', ' ')} reached"
        if reason in RESETTING and self.plan.timeout_rst:
            self._close(action, f"{reason}_rst", f"{detail}; both sockets reset "
                        "(limits.timeout_close: rst)", abort=True, reset=True)
            return
        self._close(action, reason, detail, abort=reason not in KEEP_SOCKETS)

    def _eof_in_relay(self, ev: Event) -> None:
        side = _EOF_SIDE[ev.kind]
        if self.first_eof is None:
            self.first_eof = side
            self.out.append(_SHUT[OTHER[side]])
            if self.stage == RELAY:
                self.stage = HALF_CLOSED
            self._arm("close", "close_timeout", self.plan.close_timeout)
            return
        if side == self.first_eof or self.ended:
            raise LifecycleError(f"a second EOF from the {side}")
        self.out.append(_SHUT[OTHER[side]])
        if self.native:
            self.ended = True  # the pump reports done once both ends have their bytes
            return
        self._close("allow", f"{self.first_eof}_fin")

    # ------------------------------------------------------------------ outcomes
    def _begin(self, ev: Event) -> None:
        if self.plan.max_lifetime > 0:
            self._arm("life", "max_lifetime", self.plan.max_lifetime)
        if self.plan.proxy:
            self.stage = PROXY
            if self.plan.proxy_silence > 0:
                self._arm("stage", "proxy_silence", self.plan.proxy_silence)
            else:
                self._arm("stage", "proxy_timeout", self.plan.proxy_timeout)
            return
        self._after()

    def _after(self, ev: Event | None = None) -> None:
        plan = self.plan
        if plan.tls == "off":
            self._plain(ev)
        elif plan.tls == "auto":
            if plan.detect_timeout > 0:  # a silent client is plaintext after this
                self._enter(DETECT, "detect_timeout", plan.detect_timeout)
            else:
                self._enter(DETECT, "handshake_timeout", plan.handshake_timeout)
        elif plan.tls == "passthrough":  # the ClientHello is read, not answered
            self._enter(DETECT, "handshake_timeout", plan.handshake_timeout, "start_peek")
        else:  # terminate
            self._enter(HANDSHAKE, "handshake_timeout", plan.handshake_timeout, "start_tls")

    def _tls(self, ev: Event) -> None:
        if self.plan.detect_timeout > 0:
            self._arm("stage", "handshake_timeout", self.plan.handshake_timeout)
        self.stage = HANDSHAKE
        self.out.append(_CONST["start_tls"])

    def _plain(self, ev: Event | None = None) -> None:
        self._disarm("stage")
        self._authorize()

    def _decided(self, ev: Event) -> None:
        if (self.stage != AUTHORIZE and (not self.asked or ev.allow is None)) \
                or (self.plan.egress_timeout > 0 and not self.requested):
            raise LifecycleError(f"a decision in {self.stage.name} that was not asked for")
        self.asked = False
        if ev.allow is False:
            self._close("deny", "denied", ev.detail)
            return
        self.decision = ev.allow
        if self.stage != AUTHORIZE:
            self._enter_relay()
            return
        self._enter(CONNECT, "connect_timeout", self.plan.connect_timeout, "connect")

    def _upready(self, ev: Event) -> None:
        self._disarm("stage")
        if not self.plan.upstream_tls:
            self._enter_relay()
            return
        self._enter(UPSTREAM_TLS, "upstream_tls_timeout", self.plan.handshake_timeout,
                    "start_upstream_tls")

    def _relay(self, ev: Event) -> None:
        self._disarm("stage")
        self._enter_relay()

    def _started(self, ev: Event) -> None:
        if ev.flag and not self.native_ok:
            raise LifecycleError("the native pump took a connection with a held EOF")
        self.native = ev.flag
        if self.held_eof:
            for side in ("client", "upstream"):
                if side in self.held_eof and self.stage in _RELAYING:
                    self.held_eof = self.held_eof - {side}
                    self._eof_in_relay(_EOF_EVENT[side])
            if self.stage not in _RELAYING:
                return  # (without held EOFs the stage is still RELAY or HALF_CLOSED)
        if self.draining:
            self.stage = DRAINING
        if not self.native:
            self._arm("idle", "idle_timeout", self.plan.idle_timeout)
        if self.plan.open_events:
            self.out.append(_OPEN_RECORD)
        if self.native:  # it may idle from here on: no map or list of its own is kept
            self.out = _SPENT  # (the caller has this event's list)
            if not self.timers:
                self.timers = _NO_TIMERS

    def _data(self, kind: str, ev: Event) -> None:
        self.last_active = ev.now
        self.out.append(_DATA[kind, _SIDE_OF[ev.kind]])

    def _shake(self, ev: Event) -> None:  # (the hot ones without the _data call)
        self.last_active = ev.now
        self.out.append(_HANDSHAKE[ev.kind])

    def _upshake(self, ev: Event) -> None:
        self.last_active = ev.now
        self.out.append(_UPSTREAM_HANDSHAKE[ev.kind])

    def _parse(self, ev: Event) -> None:
        self._data("parse_proxy", ev)

    def _detect(self, ev: Event) -> None:
        self._data("peek" if self.plan.tls == "passthrough" else "detect", ev)

    def _routed(self, ev: Event) -> None:
        if self.plan.tls != "passthrough":
            raise LifecycleError("a ClientHello routed on a listener without passthrough")
        self._plain(ev)

    def _request(self, ev: Event) -> None:
        if not self.egress or self.requested:
            raise LifecycleError("client bytes in AUTHORIZE without a request to read")
        self._data("request", ev)

    def _requested(self, ev: Event) -> None:
        if not self.egress or self.requested:
            raise LifecycleError("an egress request that was not being read")
        self.requested = True
        self._disarm("stage")
        self.out.append(_CONST["decide"])

    def _hold(self, ev: Event) -> None:
        self._data("hold", ev)

    def _early(self, ev: Event) -> None:
        if self.plan.upstream_tls:
            self._fail("upstream_tls_failed", ev.detail)
            return
        self.early = True
        self._data("hold", ev)

    def _fwd(self, ev: Event) -> list[Command]:
        side = "client" if ev.kind == "client_data" else "upstream"
        if side == self.first_eof or self.ended:
            return []  # a TLS peer's bytes after its close_notify: OpenSSL drops them too
        self.last_active = ev.now
        return _FORWARD[side]

    def _proxyeof(self, ev: Event) -> None:
        self.out.append(_PROXY_EOF)

    def _closed(self, ev: Event) -> None:
        when = "during the TLS handshake" if self.stage == HANDSHAKE \
            else "before the relay started"
        self._close("error", "client_closed", f"the client closed {when}")

    def _defer(self, ev: Event) -> None:
        side = "client" if ev.kind == "client_eof" else "upstream"
        if side in self.held_eof:
            raise LifecycleError(f"a second EOF from the {side}")
        self.held_eof = self.held_eof | {side}

    def _updefer(self, ev: Event) -> None:
        if self.early:
            self._defer(ev)
            return
        self._close("error", "upstream_closed", "the upstream closed before the relay started")

    def _uptls(self, ev: Event) -> None:
        self._fail("upstream_tls_failed", "the upstream closed during the TLS handshake")

    def _unclean(self, ev: Event) -> None:
        side = "client" if ev.kind == "client_unclean_eof" else "upstream"
        if ev.reason not in UNCLEAN:
            raise LifecycleError(f"unknown kind of EOF {ev.reason!r}")
        if side == self.first_eof or side in self.held_eof or self.ended:
            raise LifecycleError(f"a second EOF from the {side}")
        plan = self.plan
        if ev.reason == "no_close_notify" and (
                plan.client_lenient if side == "client" else plan.upstream_lenient):
            _STEPS[self.stage][f"{side}_eof"](self, _EOF_EVENT[side])  # as a FIN
            return
        reason, detail = UNCLEAN[ev.reason]
        self._close("allow", reason.format(who=side), detail.format(who=side), abort=True,
                    reset=True)

    def _done(self, ev: Event) -> None:
        if not self.ended:
            raise LifecycleError("the pump reported done before both directions ended")
        self._close("allow", f"{self.first_eof}_fin")

    def _lost(self, ev: Event) -> None:
        who = "client" if ev.kind == "client_error" else "upstream"
        if ev.reason not in SOCKET_ERRORS:
            raise LifecycleError(f"unknown socket error {ev.reason!r}")
        reason, action, abort = SOCKET_ERRORS[ev.reason]
        action = action or ("allow" if self.relaying else "error")
        self._close(action, reason.format(who=who), ev.detail, abort=abort)

    def _failed(self, ev: Event) -> None:
        self._fail(ev.reason, ev.detail)

    def _timeout(self, ev: Event) -> None:
        self._timeout_close(TIMERS[ev.kind][1], ev.detail)

    def _quiet(self, ev: Event) -> None:
        if ev.flag:  # the client started to send (held or unread): the full PROXY timeout
            self._arm("stage", "proxy_timeout", self.plan.proxy_timeout)
            return
        self._authorize()  # no header and no TLS: plaintext, the server speaks first

    def _silent(self, ev: Event) -> None:
        if ev.flag:  # bytes wait unread: a late loop turn, not a silent client
            self._arm("stage", "detect_timeout", self.plan.handshake_timeout)
            return
        self._authorize()  # the client said nothing: plaintext, the server speaks first

    def _idle(self, ev: Event) -> None:
        if self.native and ev.last_active is None:
            raise LifecycleError("an idle check of a pumped connection without its activity")
        last = ev.last_active if self.native and ev.last_active is not None \
            else self.last_active
        idle = ev.now - last
        if idle >= self.plan.idle_timeout:
            self._timeout_close("idle_timeout", ev.detail)
        elif not self.native:
            self._arm("idle", "idle_timeout", self.plan.idle_timeout - idle, keep=False)
        else:
            self.out = _SPENT  # the pump's tick: see _started

    def _drain(self, ev: Event) -> None:
        if self.draining:
            raise LifecycleError("a second drain")
        self.draining = True
        if self.stage in _RELAYING:
            self.stage = DRAINING

    def _deadline(self, ev: Event) -> None:
        action = "allow" if self.relaying else "error"
        self._close(action, "drain", "closed at the end of the drain", abort=True)

    def _revoke(self, ev: Event) -> None:
        if self.decision is not True:
            raise LifecycleError("a revocation of a connection that was not allowed")
        self._close("deny", "policy_reload", "denied after a ruleset reload", abort=True)

    def _cert(self, ev: Event) -> None:
        if ev.reason not in CERT_CLOSES:
            raise LifecycleError(f"unknown certificate close reason {ev.reason!r}")
        self._fail(ev.reason, ev.detail)

    def _internal(self, ev: Event) -> None:
        self._close("error", "internal_error", ev.detail, abort=True)


# each outcome of the table is the method of its name (``_<name>``), but for these
_ALIASES: Final = {"authz": "plain", "half": "eof_in_relay", "fin": "eof_in_relay",
                   "eof": "eof_in_relay", "fail": "failed", "ask": "requested"}
OUTCOMES: Final[dict[str, Callable[[Lifecycle, Event], object]]] = {
    name: getattr(Lifecycle, f"_{_ALIASES.get(name, name)}")
    for name in MEANINGS if name not in ("-", ".", "fwd")}


def _nothing(core: Lifecycle, ev: Event) -> None:
    """The ``-`` cells: nothing to do."""


_FWD: Final = Lifecycle._fwd
_NOTHING: Final = _nothing
# the table's rows with each cell's function, indexed by stage number (one lookup per event)
_STEPS: Final[list[dict[str, Callable[[Lifecycle, Event], object]]]] = [
    {event: _FWD if name == "fwd" else _NOTHING if name == "-" else OUTCOMES[name]
     for event, name in row.items()} for row in _ROWS]
