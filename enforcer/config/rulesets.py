"""Ruleset schema (``rulesets:`` in the config, or a separate ``rulesets_file``).

Minimal foundation version: a ruleset has a ``default`` and rules with a name and an
action. The policy issue extends the ``from``/``to`` matchers.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from enforcer.config.reader import Node

Action = Literal["allow", "deny"]


@dataclass(frozen=True, slots=True)
class RuleConfig:
    name: str
    action: Action


@dataclass(frozen=True, slots=True)
class RulesetConfig:
    name: str
    default: Action
    rules: tuple[RuleConfig, ...] = ()
    reevaluate_on_reload: bool = False


def parse_rulesets(node: Node) -> dict[str, RulesetConfig]:
    out: dict[str, RulesetConfig] = {}
    for name, rs in node.items():
        if not rs.keys(("default", "rules", "reevaluate_on_reload")):
            continue
        default = rs["default"].choice(("allow", "deny"), "deny")
        if rs["default"].missing:
            rs["default"].error("is required (allow or deny)")
        rules: list[RuleConfig] = []
        seen: set[str] = set()
        for rule in rs["rules"].list():
            if not rule.keys(("name", "action")):
                continue
            rname = rule["name"].required_str()
            if rname in seen:
                rule["name"].error(f"duplicate rule name {rname!r}")
            seen.add(rname)
            action = rule["action"].choice(("allow", "deny"), "deny")
            rules.append(RuleConfig(rname, action))  # type: ignore[arg-type]
        out[name] = RulesetConfig(
            name, default, tuple(rules), rs["reevaluate_on_reload"].bool(False)  # type: ignore[arg-type]
        )
    return out
