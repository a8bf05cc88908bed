"""Transparent interception: the nftables rules that send a pod's TCP through enforcer.

``ruleset`` builds the rules (pure); ``nft`` applies, removes and lists them (I/O).
"""

from enforcer.intercept.ruleset import InterceptSpec, SpecError, apply_script, remove_script

__all__ = ["InterceptSpec", "SpecError", "apply_script", "remove_script"]
