"""What the data plane knows about a connection (``FlowFacts``) and what policy answers.

``FlowFacts`` is built once per connection, after the PROXY header and the TLS handshake,
before any upstream connection exists. ``Decision`` objects are preallocated per rule by
the compiler, so deciding allocates nothing.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Literal

from enforcer.config.rulesets import LimitsConfig
from enforcer.tlsconf.identity import PeerIdentity

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
DecisionAction = Literal["allow", "deny"]
DecisionReason = Literal["rule", "default", "error", "rate_limited", "concurrency_limited"]
EMPTY_TLVS: Mapping[str, str] = MappingProxyType({})


@dataclass(frozen=True, slots=True)
class FlowFacts:
    listener: str
    port: int  # the listener's local port
    client_ip: IPAddress | None  # the REAL client (after PROXY protocol)
    identity: PeerIdentity | None  # verified peer certificate (None: plaintext or no cert)
    tls: bool  # the downstream connection is TLS
    sni: str | None = None
    tlvs: Mapping[str, str] = field(default_factory=lambda: EMPTY_TLVS)  # tlvs_for_policy()
    destination: tuple[str, int] | None = None  # outbound: upstream host, port
    server_identity: PeerIdentity | None = None  # outbound: upstream's verified identity
    host: str | None = None  # egress listeners: the host the client asked for (normalised)
    # egress listeners, once a requested name resolved: the address about to be connected
    # to, which address rules (to.cidrs, to.destinations with a CIDR) then test
    # (egress/resolved.py); None when deciding on the request as asked
    resolved: str | None = None


@dataclass(frozen=True, slots=True)
class Decision:
    action: DecisionAction
    ruleset: str
    rule: str | None
    reason: DecisionReason  # "rule" | "default" | "error"; a limit's refusal (policy.limits)
    limits: LimitsConfig | None = field(default=None, compare=False)  # the rule's ``limits``

    @property
    def allowed(self) -> bool:
        return self.action == "allow"


@dataclass(frozen=True, slots=True)
class RuleExplanation:
    name: str
    action: DecisionAction
    matched: bool
    why_not: tuple[str, ...]  # one entry per key that did not match; empty when matched


@dataclass(frozen=True, slots=True)
class Explanation:
    decision: Decision
    rules: tuple[RuleExplanation, ...]
    error: str | None = None  # what went wrong when decision.reason == "error"
