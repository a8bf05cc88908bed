"""Rulesets compiled to bitmasks: ``decide`` costs a few dict lookups, however many rules.

Rule *i* is bit *i* of a Python int. Every fact a rule can look at is a *dimension*
(listener, port, tls, peer identity, client address, each TLV, SNI, destination, server
identity). For a dimension and a value of its fact, the mask of rules that accept the
value is ``always`` (the rules that do not constrain this dimension) OR the bits of the
constraining rules whose matchers all accept it. ``decide`` ANDs the masks of the
dimensions any rule uses (stopping at 0); what is left are the matching rules:

- any deny bit set: deny, by the lowest (first written) matching deny rule, so a
  matching deny always beats any allow;
- else any bit: allow, by the first matching allow rule;
- else the ruleset's default (reason "default", rule None);
- any exception: deny with reason "error" (fail closed).

Masks are cached per dimension value (per port, per SNI, per TLV value ...). The peer and
server identities are cached by object: ``identity_from_der`` returns the same
``PeerIdentity`` for a repeat certificate, so a known peer costs one dict lookup; the
cache holds a reference, so an id is never reused while its entry lives. A peer seen for
the first time does not test every rule either: rules are indexed by their most selective
identity key (literal SPIFFE ID prefix, DNS name, trust domain, pin ...), see
``_PeerDim``. Client addresses are not cached: CIDRs are indexed by prefix length (a dict
per length used), so a lookup costs one dict probe per distinct prefix length. Caches
hold at most ``CACHE_LIMIT`` entries and are simply emptied when full.

``explain`` is the plain reference: it runs every matcher of every rule and collects a
one-line reason for each key that failed. Tests check it agrees with ``decide``.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

from enforcer.config.rulesets import RuleConfig, RulesetConfig
from enforcer.policy.facts import Decision, Explanation, FlowFacts, RuleExplanation
from enforcer.policy.matchers import (
    DIMENSIONS,
    OBJECT_DIMENSIONS,
    ClientCidrMatcher,
    Matcher,
    PeerMatcher,
    PeerView,
    compile_rule,
    dimension_of,
    peer_view,
    tlv_dimension,
)

CACHE_LIMIT = 4096
_DIM_ORDER = ("listener", "port", "tls", "peer", "client", "sni", "host", "destination",
              "server")

Extract = Callable[[FlowFacts], Any]
Constrained = list[tuple[int, tuple[Matcher, ...]]]


class _Rule:
    __slots__ = ("action", "decision", "index", "matchers", "name")

    def __init__(self, index: int, name: str, action: str, matchers: list[Matcher],
                 decision: Decision) -> None:
        self.index = index
        self.name = name
        self.action = action
        self.matchers = tuple(matchers)
        self.decision = decision


def _all_accept(matchers: tuple[Matcher, ...], value: Any) -> bool:
    return all(m.test(value) for m in matchers)


class _ValueDim:
    """A dimension whose fact is a hashable value (port, SNI, TLV ...): cache by value."""

    __slots__ = ("always", "cache", "constrained", "extract")

    def __init__(self, extract: Extract, always: int, constrained: Constrained) -> None:
        self.extract = extract
        self.always = always
        self.constrained = constrained
        self.cache: dict[Any, int] = {}

    def mask(self, facts: FlowFacts) -> int:
        value = self.extract(facts)
        m = self.cache.get(value)
        if m is None:
            m = self.compute(value)
            if len(self.cache) >= CACHE_LIMIT:
                self.cache.clear()
            self.cache[value] = m
        return m

    def compute(self, value: Any) -> int:
        m = self.always
        for bit, matchers in self.constrained:
            if _all_accept(matchers, value):
                m |= bit
        return m


class _ObjectDim(_ValueDim):
    """Peer / server identity: cache by object identity, match on a ``PeerView``."""

    __slots__ = ("objects",)

    def __init__(self, extract: Extract, always: int, constrained: Constrained) -> None:
        super().__init__(extract, always, constrained)
        self.objects: dict[int, tuple[object, int]] = {}

    def mask(self, facts: FlowFacts) -> int:
        ident = self.extract(facts)
        if ident is None:
            return self.always
        entry = self.objects.get(id(ident))
        if entry is not None and entry[0] is ident:
            return entry[1]
        m = self.compute(PeerView(ident))
        if len(self.objects) >= CACHE_LIMIT:
            self.objects.clear()
        self.objects[id(ident)] = (ident, m)
        return m


class _PeerDim(_ObjectDim):
    """The peer identity, with an index so a new certificate is not tested against every
    rule: each rule is filed under the keys of its most selective indexable matcher (the
    literal prefix of its SPIFFE globs, its exact DNS names, trust domains, pins ...), and
    a peer only tests the rules filed under one of its own keys, plus the unindexed ones."""

    __slots__ = ("index", "unindexed")

    def __init__(self, extract: Extract, always: int, constrained: Constrained) -> None:
        super().__init__(extract, always, constrained)
        self.index: dict[str, list[tuple[int, tuple[Matcher, ...]]]] = {}
        self.unindexed: Constrained = []
        for bit, matchers in constrained:
            keys = _best_keys(matchers)
            if keys is None:
                self.unindexed.append((bit, matchers))
            for key in keys or ():
                self.index.setdefault(key, []).append((bit, matchers))

    def compute(self, value: Any) -> int:
        m = self.always
        for bit, matchers in self.unindexed:
            if _all_accept(matchers, value):
                m |= bit
        tested = 0
        for key in value.index_keys():
            for bit, matchers in self.index.get(key, ()):
                if not bit & tested:
                    tested |= bit
                    if _all_accept(matchers, value):
                        m |= bit
        return m


def _best_keys(matchers: tuple[Matcher, ...]) -> frozenset[str] | None:
    best: frozenset[str] | None = None
    for m in matchers:
        keys = m.index_keys() if isinstance(m, PeerMatcher) else None
        if keys is not None and (best is None or len(keys) < len(best)):
            best = keys
    return best


class _CidrDim:
    """Client address: per family, a dict per prefix length of network -> rule bits."""

    __slots__ = ("always", "v4", "v6")

    def __init__(self, always: int, constrained: Constrained) -> None:
        self.always = always
        tables: dict[int, dict[int, dict[int, int]]] = {4: {}, 6: {}}
        for bit, matchers in constrained:
            (matcher,) = matchers
            assert isinstance(matcher, ClientCidrMatcher)
            for net in matcher.networks:
                shift = net.max_prefixlen - net.prefixlen
                table = tables[net.version].setdefault(shift, {})
                key = int(net.network_address) >> shift
                table[key] = table.get(key, 0) | bit
        self.v4 = tuple(tables[4].items())
        self.v6 = tuple(tables[6].items())

    def mask(self, facts: FlowFacts) -> int:
        ip = facts.client_ip
        if ip is None:
            return self.always
        if ip.version == 6:
            mapped = ip.ipv4_mapped
            if mapped is not None:
                ip = mapped
        x = int(ip)
        m = self.always
        for shift, table in self.v4 if ip.version == 4 else self.v6:
            m |= table.get(x >> shift, 0)
        return m


_Dim = _ValueDim | _CidrDim


class CompiledRuleset:
    """One ruleset, ready to ``decide`` per connection. Immutable apart from its caches."""

    __slots__ = ("_all", "_decisions", "_default", "_deny", "_dims", "_error", "_pre_dims",
                 "_rules", "_server_bits", "default", "name", "reevaluate_on_reload")

    def __init__(self, cfg: RulesetConfig) -> None:
        self.name = cfg.name
        self.default = cfg.default
        self.reevaluate_on_reload = cfg.reevaluate_on_reload
        self._rules = tuple(_compile_rule(cfg.name, i, r.name, r.action, r)
                            for i, r in enumerate(cfg.rules))
        self._decisions = tuple(r.decision for r in self._rules)
        self._all = (1 << len(self._rules)) - 1
        self._deny = sum(1 << r.index for r in self._rules if r.action == "deny")
        self._default = Decision(cfg.default, cfg.name, None, "default")
        self._error = Decision("deny", cfg.name, None, "error")
        self._dims = _build_dims(self._rules, self._all)
        self._server_bits = sum(1 << r.index for r in self._rules
                                if any(dimension_of(m) == "server" for m in r.matchers))
        self._pre_dims = tuple(d for d in self._dims
                               if getattr(d, "extract", None) is not DIMENSIONS["server"])

    @property
    def rule_names(self) -> tuple[str, ...]:
        return tuple(r.name for r in self._rules)

    def decide(self, facts: FlowFacts) -> Decision:
        try:
            m = self._all
            for dim in self._dims:
                m &= dim.mask(facts)
                if not m:
                    return self._default
            hits = m & self._deny or m
            if not hits:
                return self._default
            return self._decisions[(hits & -hits).bit_length() - 1]
        except Exception:
            return self._error

    @property
    def uses_server_identity(self) -> bool:
        """Some rule looks at the upstream's verified identity (``to.server_identities``),
        which is known only after connecting: see ``decide_before_upstream``."""
        return self._server_bits != 0

    def decide_before_upstream(self, facts: FlowFacts) -> Decision | None:
        """The decision, if it is already certain without the upstream's identity; None
        when it depends on it (connect, handshake, then ``decide`` with
        ``server_identity`` set, before relaying a byte).

        Certain: a matching deny rule that does not look at the server identity (deny
        wins whatever the server is), or no allow possible under a default deny, or no
        matching rule looks at the server identity at all."""
        try:
            m = self._all
            for dim in self._pre_dims:
                m &= dim.mask(facts)
                if not m:
                    return self._default
            if not m & self._server_bits:
                return self.decide(facts)
            certain_deny = m & self._deny & ~self._server_bits
            if certain_deny:
                return self._decisions[(certain_deny & -certain_deny).bit_length() - 1]
            if not m & ~self._deny and self.default == "deny":
                return self._default
            return None
        except Exception:
            return self._error

    def explain(self, facts: FlowFacts) -> Explanation:
        try:
            peer, server = peer_view(facts.identity), peer_view(facts.server_identity)
            results = [_explain_rule(r, facts, peer, server) for r in self._rules]
        except Exception as exc:
            return Explanation(self._error, (), f"{type(exc).__name__}: {exc}")
        decision = self._default
        for action in ("deny", "allow"):
            first = next((i for i, x in enumerate(results) if x.matched and x.action == action),
                         None)
            if first is not None:
                decision = self._decisions[first]
                break
        return Explanation(decision, tuple(results))

    def __repr__(self) -> str:
        return f"<CompiledRuleset {self.name!r}: {len(self._rules)} rules, default {self.default}>"


def _compile_rule(ruleset: str, index: int, name: str, action: str, rule: RuleConfig) -> _Rule:
    if action not in ("allow", "deny"):
        raise ValueError(f"ruleset {ruleset!r} rule {name!r}: bad action {action!r}")
    try:
        matchers = compile_rule(rule)
    except ValueError as exc:
        raise ValueError(f"ruleset {ruleset!r} rule {name!r}: {exc}") from None
    decision = Decision("allow" if action == "allow" else "deny", ruleset, name, "rule",
                        rule.limits)
    return _Rule(index, name, action, matchers, decision)


def _build_dims(rules: tuple[_Rule, ...], all_bits: int) -> tuple[_Dim, ...]:
    groups: dict[str, dict[int, list[Matcher]]] = {}
    for rule in rules:
        for m in rule.matchers:
            groups.setdefault(dimension_of(m), {}).setdefault(rule.index, []).append(m)
    tlvs = sorted(d for d in groups if d.startswith("tlv:"))
    order = ([d for d in _DIM_ORDER[:5] if d in groups] + tlvs
             + [d for d in _DIM_ORDER[5:] if d in groups])
    dims: list[_Dim] = []
    for name in order:
        by_rule = groups[name]
        constrained = [(1 << i, tuple(ms)) for i, ms in sorted(by_rule.items())]
        always = all_bits & ~sum(bit for bit, _ in constrained)
        dims.append(_make_dim(name, always, constrained))
    return tuple(dims)


def _make_dim(name: str, always: int, constrained: Constrained) -> _Dim:
    if name == "client":
        return _CidrDim(always, constrained)
    extract = tlv_dimension(name[4:]) if name.startswith("tlv:") else DIMENSIONS[name]
    if name == "peer":
        return _PeerDim(extract, always, constrained)
    if name in OBJECT_DIMENSIONS:
        return _ObjectDim(extract, always, constrained)
    return _ValueDim(extract, always, constrained)


def _explain_rule(rule: _Rule, facts: FlowFacts, peer: PeerView | None,
                  server: PeerView | None) -> RuleExplanation:
    reasons: list[str] = []
    for m in rule.matchers:
        dim = dimension_of(m)
        if dim == "peer":
            value: Any = peer
        elif dim == "server":
            value = server
        elif dim.startswith("tlv:"):
            value = tlv_dimension(dim[4:])(facts)
        else:
            value = DIMENSIONS[dim](facts)
        if not m.test(value):
            reasons.append(f"{m.key}: {m.why_not(value)}")
    return RuleExplanation(rule.name, rule.decision.action, not reasons, tuple(reasons))


def compile_ruleset(cfg: RulesetConfig) -> CompiledRuleset:
    """Compile one ruleset; raises ValueError on a pattern the config layer should have
    refused (only possible for hand-built configs)."""
    return CompiledRuleset(cfg)


def compile_rulesets(cfgs: Mapping[str, RulesetConfig]) -> dict[str, CompiledRuleset]:
    return {name: compile_ruleset(cfg) for name, cfg in cfgs.items()}
