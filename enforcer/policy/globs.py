"""Pattern sets compiled once: exact values go in a frozenset, globs into matchers.

Three pattern languages (their syntax is validated in ``enforcer.config.rulesets``):

- SPIFFE ID globs: ``spiffe://`` then ``/``-separated segments. A segment that is ``*``
  matches exactly one segment; ``*`` inside a segment (``frontend-*``) matches any run of
  characters except ``/``; a segment that is ``**`` matches ANY NUMBER OF SEGMENTS,
  INCLUDING ZERO, so ``spiffe://td/ns/**`` matches ``spiffe://td/ns`` and
  ``spiffe://td/ns/a/b``. Everything else is literal and case-sensitive (a well-formed
  SPIFFE ID has a lowercase trust domain).
- DNS globs: a name, or ``*.`` + name where ``*`` is exactly one leftmost label
  (``*.shop.svc`` matches ``a.shop.svc``, not ``shop.svc`` nor ``a.b.shop.svc``);
  case-insensitive, a trailing dot ignored. Matched with set lookups: exact names, and
  "parent" domains (the name minus its first label) for the wildcards.
- Simple globs (CN, OU, TLV values): ``*`` matches any run of characters, including
  none; nothing else is special.

No regular expressions: a backtracking regex for ``*a*a*b`` (or ``**/x/**/y``) takes
polynomial time in the input, and the inputs (TLVs, certificate names) come from peers.
A ``*`` glob is split at the stars into literals; the first must be a prefix, the last
a suffix, and the middle ones are found left to right with ``str.find`` (leftmost is
always a safe choice). ``**`` runs the classic two-pointer wildcard algorithm over path
segments, backtracking only to the most recent ``**``: O(segments x pattern) at worst.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence


class Glob:
    """A ``*`` glob over characters, matched without backtracking."""

    __slots__ = ("first", "last", "middle", "min_len", "parts")

    def __init__(self, pattern: str) -> None:
        self.parts = tuple(pattern.split("*"))
        self.first = self.parts[0]
        self.last = self.parts[-1]
        self.middle = self.parts[1:-1]
        self.min_len = sum(len(p) for p in self.parts)

    def match(self, text: str) -> bool:
        if len(self.parts) == 1:
            return text == self.first
        if len(text) < self.min_len or not text.startswith(self.first):
            return False
        end = len(text) - len(self.last)
        if not text.endswith(self.last):
            return False
        pos = len(self.first)
        for part in self.middle:
            found = text.find(part, pos, end)
            if found < 0:
                return False
            pos = found + len(part)
        return True


_ANY_SEGMENTS = None  # the ``**`` token


class IdentityGlob:
    """A SPIFFE ID glob: per-segment globs, with ``**`` spanning whole segments."""

    __slots__ = ("pattern", "tokens")

    def __init__(self, pattern: str) -> None:
        self.pattern = pattern
        tokens: list[Glob | None] = []
        for seg in pattern[len("spiffe://"):].split("/"):
            if seg == "**":
                if not tokens or tokens[-1] is not _ANY_SEGMENTS:  # a/**/**/b is a/**/b
                    tokens.append(_ANY_SEGMENTS)
            else:
                tokens.append(Glob(seg))
        self.tokens = tuple(tokens)

    def match(self, spiffe_id: str) -> bool:
        if not spiffe_id.startswith("spiffe://"):
            return False
        return match_segments(self.tokens, spiffe_id[len("spiffe://"):].split("/"))


def match_segments(tokens: Sequence[Glob | None], segs: Sequence[str]) -> bool:
    """Two-pointer wildcard matching; ``None`` tokens match any number of segments."""
    t = s = 0
    star_t, star_s = -1, 0
    while s < len(segs):
        if t < len(tokens):
            token = tokens[t]
            if token is _ANY_SEGMENTS:
                star_t, star_s = t, s
                t += 1
                continue
            if segs[s] and token.match(segs[s]):
                t += 1
                s += 1
                continue
        if star_t < 0:
            return False
        star_s += 1  # let the last ** swallow one more segment and retry from there
        t, s = star_t + 1, star_s
    return all(token is _ANY_SEGMENTS for token in tokens[t:])


class StringSet:
    """Literal strings and globs; ``match(s)`` is True if any of them matches ``s``."""

    __slots__ = ("exact", "globs", "patterns")

    def __init__(self, exact: Iterable[str], globs: Iterable[Glob | IdentityGlob],
                 patterns: Iterable[str]) -> None:
        self.exact = frozenset(exact)
        self.globs = tuple(globs)
        self.patterns = tuple(patterns)  # the globs as written

    def match(self, value: str) -> bool:
        if value in self.exact:
            return True
        return any(g.match(value) for g in self.globs)

    def match_any(self, values: Iterable[str]) -> bool:
        return any(self.match(v) for v in values)


def identity_set(patterns: Iterable[str]) -> StringSet:
    pats = list(patterns)
    globs = [p for p in pats if "*" in p]
    return StringSet((p for p in pats if "*" not in p), map(IdentityGlob, globs), globs)


def simple_set(patterns: Iterable[str]) -> StringSet:
    pats = list(patterns)
    globs = [p for p in pats if "*" in p]
    return StringSet((p for p in pats if "*" not in p), map(Glob, globs), globs)


def normalize_name(name: str) -> str:
    name = name.lower()
    return name[:-1] if name.endswith(".") and len(name) > 1 else name


def parent_domain(name: str) -> str | None:
    """``a.b.c`` -> ``b.c``; None when there is no non-empty first label and parent."""
    first, dot, parent = name.partition(".")
    return parent if dot and first and parent else None


class DnsSet:
    """Exact DNS names plus ``*.parent`` wildcards, matched by set lookups."""

    __slots__ = ("exact", "parents", "patterns")

    def __init__(self, patterns: Iterable[str]) -> None:
        self.patterns = tuple(patterns)
        names = [normalize_name(p) for p in self.patterns]
        self.exact = frozenset(n for n in names if not n.startswith("*."))
        self.parents = frozenset(n[2:] for n in names if n.startswith("*."))

    def match(self, name: str) -> bool:
        name = normalize_name(name)
        if name in self.exact:
            return True
        parent = parent_domain(name)
        return parent is not None and parent in self.parents

    def match_sets(self, names: frozenset[str], parents: frozenset[str]) -> bool:
        """Match pre-normalised names (and their parents) with C-speed set operations."""
        return not self.exact.isdisjoint(names) or not self.parents.isdisjoint(parents)
