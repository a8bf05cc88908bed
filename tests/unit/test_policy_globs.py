"""Glob matching against small reference implementations (Hypothesis), plus examples."""

from __future__ import annotations

import time

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from enforcer.config.rulesets import dns_glob_problem, identity_glob_problem
from enforcer.policy.globs import (
    DnsSet,
    Glob,
    IdentityGlob,
    identity_set,
    normalize_name,
    parent_domain,
    simple_set,
)


# ---------------------------------------------------------------------------- references
def ref_simple(pattern: str, text: str) -> bool:
    """``*`` matches any run of characters; everything else literal. Plain recursion."""
    if not pattern:
        return not text
    if pattern[0] == "*":
        return any(ref_simple(pattern[1:], text[i:]) for i in range(len(text) + 1))
    return bool(text) and text[0] == pattern[0] and ref_simple(pattern[1:], text[1:])


def ref_segments(pats: list[str], segs: list[str]) -> bool:
    if not pats:
        return not segs
    head = pats[0]
    if head == "**":
        return any(ref_segments(pats[1:], segs[i:]) for i in range(len(segs) + 1))
    if not segs:
        return False
    ok = segs[0] != "" if head == "*" else ref_simple(head, segs[0])
    return ok and ref_segments(pats[1:], segs[1:])


def ref_identity(pattern: str, spiffe_id: str) -> bool:
    assert pattern.startswith("spiffe://")
    if not spiffe_id.startswith("spiffe://"):
        return False
    return ref_segments(pattern[9:].split("/"), spiffe_id[9:].split("/"))


def ref_dns(pattern: str, name: str) -> bool:
    pattern, name = normalize_name(pattern), normalize_name(name)
    if pattern.startswith("*."):
        labels = name.split(".")
        return len(labels) >= 2 and labels[0] != "" and ".".join(labels[1:]) == pattern[2:]
    return name == pattern


# ---------------------------------------------------------------------------- strategies
chars = st.sampled_from("ab-")
segment = st.text(chars, min_size=1, max_size=3)
pattern_segment = st.one_of(
    st.just("*"), st.just("**"), segment,
    st.builds(lambda a, b: a + "*" + b, st.text(chars, max_size=2), st.text(chars, max_size=2)),
)
spiffe_ids = st.lists(segment, min_size=1, max_size=6).map(lambda s: "spiffe://" + "/".join(s))
identity_globs = st.lists(pattern_segment, min_size=1, max_size=5).map(
    lambda s: "spiffe://" + "/".join(s)).filter(lambda p: identity_glob_problem(p) is None)


@settings(max_examples=600, deadline=None)
@given(identity_globs, spiffe_ids)
def test_identity_glob_matches_reference(pattern: str, spiffe_id: str) -> None:
    assert IdentityGlob(pattern).match(spiffe_id) == ref_identity(pattern, spiffe_id)
    assert identity_set([pattern]).match(spiffe_id) == ref_identity(pattern, spiffe_id)


@settings(max_examples=300, deadline=None)
@given(st.lists(identity_globs, min_size=1, max_size=4), spiffe_ids)
def test_identity_set_is_or_of_patterns(patterns: list[str], spiffe_id: str) -> None:
    assert identity_set(patterns).match(spiffe_id) == any(
        ref_identity(p, spiffe_id) for p in patterns)


@settings(max_examples=600, deadline=None)
@given(st.text(st.sampled_from("ab*.\\[]?+()|$^"), min_size=1, max_size=7),
       st.text(st.sampled_from("ab.\n\\[]?+()|$^"), max_size=8))
def test_simple_glob_matches_reference(pattern: str, text: str) -> None:
    assert Glob(pattern).match(text) == ref_simple(pattern, text)
    assert simple_set([pattern]).match(text) == ref_simple(pattern, text)


labels = st.text(st.sampled_from("aB1-"), min_size=1, max_size=2).filter(
    lambda s: not s.startswith("-") and not s.endswith("-"))
names = st.lists(labels, min_size=1, max_size=4).map(".".join)
dns_globs = st.one_of(names, names.map(lambda n: "*." + n)).filter(
    lambda p: dns_glob_problem(normalize_name(p)) is None)


@settings(max_examples=600, deadline=None)
@given(st.lists(dns_globs, min_size=1, max_size=3), st.lists(names, max_size=4))
def test_dns_set_matches_reference(patterns: list[str], sans: list[str]) -> None:
    dns = DnsSet([normalize_name(p) for p in patterns])
    for name in sans:
        assert dns.match(name) == any(ref_dns(p, name) for p in patterns)
    normalized = frozenset(normalize_name(n) for n in sans)
    parents = frozenset(p for p in map(parent_domain, normalized) if p is not None)
    assert dns.match_sets(normalized, parents) == any(
        ref_dns(p, n) for p in patterns for n in sans)


# ---------------------------------------------------------------------------- examples
@pytest.mark.parametrize("pattern, spiffe_id, expected", [
    ("spiffe://td/ns/*/sa/app", "spiffe://td/ns/shop/sa/app", True),
    ("spiffe://td/ns/*/sa/app", "spiffe://td/ns/a/b/sa/app", False),
    ("spiffe://td/ns/**", "spiffe://td/ns", True),
    ("spiffe://td/ns/**", "spiffe://td/ns/a/b", True),
    ("spiffe://td/ns/**", "spiffe://td/nsx", False),
    ("spiffe://td/**/app", "spiffe://td/app", True),
    ("spiffe://td/**/app", "spiffe://td/a/b/app", True),
    ("spiffe://td/**/**/app", "spiffe://td/a/app", True),
    ("spiffe://td/ns/front*", "spiffe://td/ns/frontend", True),
    ("spiffe://td/ns/front*", "spiffe://td/ns/front", True),
    ("spiffe://td/ns/front*", "spiffe://td/ns/frontend/x", False),
    ("spiffe://*/ns/a", "spiffe://any.td/ns/a", True),
    ("spiffe://td/a.b", "spiffe://td/aXb", False),  # '.' is literal
    ("spiffe://td/a", "spiffe://td/a/", False),
])
def test_identity_glob_examples(pattern: str, spiffe_id: str, expected: bool) -> None:
    assert identity_set([pattern]).match(spiffe_id) is expected
    assert ref_identity(pattern, spiffe_id) is expected


def test_adversarial_inputs_stay_fast() -> None:
    """Backtracking matchers take hours on these; ours answer at once."""
    pattern = "spiffe://td/" + "/".join(["**", "x"] * 10) + "/end"
    assert identity_glob_problem(pattern) is None
    long_id = "spiffe://td/" + "/".join(["x"] * 1000) + "/nope"
    started = time.perf_counter()
    assert identity_set([pattern]).match(long_id) is False
    assert identity_set([pattern]).match(long_id[:-4] + "end") is True
    assert simple_set(["*a*a*a*a*a*a*b"]).match("a" * 65535) is False
    assert simple_set(["*.*.example.com"]).match("." * 65535) is False
    assert simple_set(["*.*.example.com"]).match("a.b.example.com") is True
    assert time.perf_counter() - started < 1.0


@pytest.mark.parametrize("pattern, text, expected", [
    ("ab", "ab", True), ("ab", "abc", False), ("*", "", True), ("a*", "a", True),
    ("*a", "ba", True), ("a*a", "a", False), ("a*a", "aa", True), ("*ab*ab*", "abab", True),
    ("*ab*ab*", "aba", False), ("x*y*z", "xyz", True), ("x*y*z", "xzy", False),
])
def test_simple_glob_examples(pattern: str, text: str, expected: bool) -> None:
    assert Glob(pattern).match(text) is expected
    assert ref_simple(pattern, text) is expected
