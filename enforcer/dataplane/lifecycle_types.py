"""The lifecycle core's vocabulary: stages, the plan a listener gives a connection, the
events that come in and the commands that go out (lifecycle.py runs them through the
transition table). Plain data, no behaviour: the I/O layer, the flow record and the tests
import these without the core.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import IntEnum
from typing import Final, NamedTuple


class Stage(IntEnum):
    ACCEPTED = 0
    PROXY = 1
    DETECT = 2
    HANDSHAKE = 3
    AUTHORIZE = 4
    CONNECT = 5
    UPSTREAM_TLS = 6
    RELAY = 7
    HALF_CLOSED = 8  # one direction ended (Lifecycle.first_eof says which)
    DRAINING = 9  # relaying while the process drains (first_eof: a side may have finished)
    CLOSED = 10


# The stages as plain module constants for the code that runs per event: reading
# ``Stage.X`` goes through the enum's metaclass every time (~0.2 µs, as much as a whole
# outcome of the core).
(ACCEPTED, PROXY, DETECT, HANDSHAKE, AUTHORIZE, CONNECT, UPSTREAM_TLS, RELAY, HALF_CLOSED,
 DRAINING, CLOSED) = tuple(Stage)


class LifecycleError(Exception):
    """An event that cannot happen in the current stage: a bug in the I/O layer."""


@dataclass(frozen=True, slots=True)
class Plan:
    """What the listener's and upstream's configuration say about this connection."""

    proxy: bool = False  # a PROXY header is read (proxy_protocol.accept is not off)
    proxy_timeout: float = 5.0
    proxy_silence: float = 0.0  # accept optional, tls auto or off: a client this silent
    # sends no header and is plaintext (detect.proxy_silence; 0: wait for proxy_timeout)
    tls: str = "off"  # tls.mode: off | auto | terminate | passthrough
    detect_timeout: float = 0.0
    handshake_timeout: float = 10.0
    connect_timeout: float = 5.0
    idle_timeout: float = 300.0
    close_timeout: float = 5.0
    max_lifetime: float = 0.0  # 0: none
    timeout_rst: bool = False  # limits.timeout_close: rst
    upstream_tls: bool = False
    # tls.allow_eof_without_close_notify of the listener (client) and of the upstream: a
    # FIN without close_notify on a record boundary ends that side's stream like a FIN
    client_lenient: bool = False
    upstream_lenient: bool = False
    open_events: bool = False  # flow_log.open_events
    egress_timeout: float = 0.0  # egress listeners: egress.request_timeout (0: not one)


class Event(NamedTuple):  # a NamedTuple: cheap to make (one per chunk on the Python relay)
    kind: str  # a row of the table
    now: float = 0.0  # the caller's monotonic clock
    reason: str = ""  # fail, cert_revoked: the close reason; *_error: reset | closed | ...;
    # *_unclean_eof: truncated (mid-record) | no_close_notify (on a record boundary)
    detail: str | None = None
    allow: bool | None = None  # decision: True allow, False deny, None not decidable yet
    flag: bool = False  # detect_timeout: bytes wait unread; relay_started: native pump
    last_active: float | None = None  # idle_timeout from the native pump's tick


class Command(NamedTuple):
    kind: str  # see COMMANDS
    side: str | None = None  # client | upstream
    timer: str | None = None  # slot: stage | idle | close | life
    delay: float = 0.0
    reason: str = ""  # start_timer: the event it fires; close/record: the close reason
    action: str = ""  # close, record: allow | deny | error
    detail: str | None = None
    abort: bool = False  # close: drop unsent bytes
    reset: bool = False  # close: RST (SO_LINGER 0)
    stage: Stage = ACCEPTED  # close/record: the stage reached
    event: str = "flow"  # record: flow | open


COMMANDS: Final = ("start_timer", "cancel_timer", "start_tls", "start_peek", "start_request",
                   "decide", "connect", "start_upstream_tls", "start_relay", "parse_proxy",
                   "proxy_eof", "detect", "peek", "request", "handshake", "upstream_handshake",
                   "hold", "forward", "shut_write", "close", "record")
