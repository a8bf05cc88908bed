"""A small typed reader over parsed YAML that remembers key paths and collects every problem.

Each ``Node`` wraps one raw value and its path (``listeners[0].tls``). Accessors return a
typed value or a default, and on a bad value they record a ``ConfigIssue`` on the shared
list instead of raising, so one pass over a config reports every error at once. Unknown
keys are reported by ``Node.keys(allowed)``: typos must not pass silently.
"""

from __future__ import annotations

import builtins
import ipaddress
import re
from collections.abc import Iterator, Sequence
from typing import Any, Final, TypeVar

from enforcer.config.errors import ConfigIssue

T = TypeVar("T")


class _Missing:
    __slots__ = ()

    def __repr__(self) -> str:
        return "<missing>"


MISSING: Final = _Missing()

_DURATION_PART = re.compile(r"(\d+(?:\.\d+)?)(ms|us|s|m|h|d)")
_UNIT_SECONDS = {"us": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}


def parse_duration(text: str) -> float:
    """``250ms`` -> 0.25, ``1h30m`` -> 5400.0; raises ValueError naming the problem."""
    s = text.strip()
    if not s:
        raise ValueError("empty duration")
    pos, total = 0, 0.0
    while pos < len(s):
        m = _DURATION_PART.match(s, pos)
        if m is None:
            raise ValueError(f"bad duration {text!r} (use a number with a unit: 250ms, 3s, 5m, 1h)")
        total += float(m.group(1)) * _UNIT_SECONDS[m.group(2)]
        pos = m.end()
    return total


def format_path(parent: str, key: str | int) -> str:
    if isinstance(key, int):
        return f"{parent}[{key}]"
    return f"{parent}.{key}" if parent else key


class Node:
    """A raw config value at a key path, with typed accessors that record problems."""

    __slots__ = ("issues", "path", "value")

    def __init__(self, value: Any, path: builtins.str, issues: list[ConfigIssue]) -> None:
        self.value = value
        self.path = path
        self.issues = issues

    # -- reporting -------------------------------------------------------------------
    def error(self, message: builtins.str) -> None:
        self.issues.append(ConfigIssue(self.path, message))

    @property
    def missing(self) -> bool:
        return self.value is MISSING

    @property
    def is_null(self) -> bool:
        return self.value is MISSING or self.value is None

    # -- structure -------------------------------------------------------------------
    def is_mapping(self) -> bool:
        if isinstance(self.value, dict):
            return True
        if not self.is_null:
            self.error(f"expected a mapping, got {_type_name(self.value)}")
        return False

    def keys(self, allowed: Sequence[builtins.str]) -> bool:
        """Check this is a mapping whose keys are all in ``allowed``; report the others."""
        if not self.is_mapping():
            return False
        for key in self.value:
            if not isinstance(key, str):
                self.error(f"keys must be strings, got {key!r}")
            elif key not in allowed:
                near = _suggest(key, allowed)
                hint = f" (did you mean '{near}'?)" if near else f" (known: {', '.join(allowed)})"
                self.child(key).error(f"unknown key{hint}")
        return True

    def child(self, key: builtins.str | int) -> Node:
        value: Any = MISSING
        if isinstance(key, str) and isinstance(self.value, dict):
            value = self.value.get(key, MISSING)
        elif isinstance(key, int) and isinstance(self.value, list) and key < len(self.value):
            value = self.value[key]
        return Node(value, format_path(self.path, key), self.issues)

    def __getitem__(self, key: builtins.str | int) -> Node:
        return self.child(key)

    def items(self) -> Iterator[tuple[builtins.str, Node]]:
        if self.is_mapping():
            for key in self.value:
                if isinstance(key, str):
                    yield key, self.child(key)

    def list(self, *, allow_scalar: bool = False) -> builtins.list[Node]:
        if self.is_null:
            return []
        if isinstance(self.value, list):
            return [self.child(i) for i in range(len(self.value))]
        if allow_scalar:
            return [self]
        self.error(f"expected a list, got {_type_name(self.value)}")
        return []

    # -- scalars -----------------------------------------------------------------------
    def str(self, default: T, *, required: bool = False) -> builtins.str | T:
        if self.is_null:
            if required:
                self.error("is required")
            return default
        if isinstance(self.value, bool) or not isinstance(self.value, str | int | float):
            self.error(f"expected a string, got {_type_name(self.value)}")
            return default
        return str(self.value)

    def required_str(self) -> builtins.str:
        return self.str("", required=True)

    def str_list(self) -> tuple[builtins.str, ...]:
        out: list[builtins.str] = []
        for item in self.list(allow_scalar=True):
            value = item.str(None)
            if value is not None:
                out.append(value)
        return tuple(out)

    def bool(self, default: bool) -> bool:
        if self.is_null:
            return default
        if isinstance(self.value, bool):
            return self.value
        self.error(f"expected true or false, got {self.value!r}")
        return default

    def int(self, default: int, *, minimum: int | None = None, maximum: int | None = None) -> int:
        if self.is_null:
            return default
        if isinstance(self.value, bool) or not isinstance(self.value, int):
            self.error(f"expected an integer, got {self.value!r}")
            return default
        if minimum is not None and self.value < minimum:
            self.error(f"must be >= {minimum}, got {self.value}")
            return default
        if maximum is not None and self.value > maximum:
            self.error(f"must be <= {maximum}, got {self.value}")
            return default
        return int(self.value)

    def choice(self, choices: Sequence[builtins.str], default: builtins.str) -> builtins.str:
        if self.is_null:
            return default
        value = self.value
        if value is False:  # YAML 1.1 reads a bare `off` as false
            value = "off"
        elif value is True:
            value = "on"
        if isinstance(value, str) and value in choices:
            return value
        self.error(f"must be one of {', '.join(choices)}; got {self.value!r}")
        return default

    def duration(self, default: float) -> float:
        if self.is_null:
            return default
        if isinstance(self.value, bool) or not isinstance(self.value, str):
            if isinstance(self.value, int) and self.value == 0:
                return 0.0
            self.error(f"expected a duration with a unit (250ms, 3s, 1h), got {self.value!r}")
            return default
        try:
            return parse_duration(self.value)
        except ValueError as exc:
            self.error(str(exc))
            return default

    def cidr_list(self) -> tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...]:
        out: builtins.list[ipaddress.IPv4Network | ipaddress.IPv6Network] = []
        for item in self.list(allow_scalar=True):
            text = item.str(None)
            if text is None:
                continue
            try:
                out.append(ipaddress.ip_network(text, strict=False))
            except ValueError:
                item.error(f"bad CIDR {text!r} (use 10.0.0.0/8, 2001:db8::/32 or a single address)")
        return tuple(out)


def _type_name(value: Any) -> str:
    if value is MISSING or value is None:
        return "nothing"
    return {dict: "a mapping", list: "a list", str: "a string", bool: "a boolean"}.get(
        type(value), type(value).__name__
    )


def _suggest(key: str, allowed: Sequence[str]) -> str | None:
    import difflib

    close = difflib.get_close_matches(key, list(allowed), n=1, cutoff=0.75)
    return close[0] if close else None
