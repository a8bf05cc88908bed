"""Policy: rulesets compiled once into matchers; ``decide(FlowFacts) -> Decision`` per connection.

Pure (no I/O, no asyncio). See ``engine`` for how decisions stay cheap with many rules,
``matchers`` for what each rule key means, ``globs`` for the pattern languages.
"""

from enforcer.policy.engine import CompiledRuleset, compile_ruleset, compile_rulesets
from enforcer.policy.facts import Decision, Explanation, FlowFacts, RuleExplanation

__all__ = [
    "CompiledRuleset",
    "Decision",
    "Explanation",
    "FlowFacts",
    "RuleExplanation",
    "compile_ruleset",
    "compile_rulesets",
]
