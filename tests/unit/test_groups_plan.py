"""``plan_groups``: which key-exchange groups a material's contexts get, for an OpenSSL with
and without hybrid post-quantum groups (pure: the OpenSSL is a set of names here)."""

from __future__ import annotations

from collections.abc import Callable

from enforcer.tlsconf.groups import DEFAULT_HYBRID, GroupPlan, plan_groups

OLD = {"x25519", "p-256", "p-384", "p-521", "x448"}  # an OpenSSL 3.0
NEW = OLD | {"x25519mlkem768", "secp256r1mlkem768"}  # an OpenSSL 3.5


def offered(names: set[str]) -> Callable[[str], bool]:
    return lambda name: name.lower() in names


def test_default_prefers_the_hybrid_where_offered() -> None:
    assert plan_groups(None, offered(NEW), "OpenSSL 3.5.0") == GroupPlan(DEFAULT_HYBRID)
    assert DEFAULT_HYBRID[0] == "X25519MLKEM768"


def test_default_keeps_openssls_own_list_without_hybrids() -> None:
    assert plan_groups(None, offered(OLD), "OpenSSL 3.0.2") == GroupPlan(None)


def test_configured_hybrids_are_left_out_on_an_old_openssl() -> None:
    plan = plan_groups(("X25519MLKEM768", "X25519", "P-256"), offered(OLD), "OpenSSL 3.0.2")
    assert plan == GroupPlan(("X25519", "P-256"), ("X25519MLKEM768",))
    plan = plan_groups(("X25519MLKEM768", "X25519"), offered(NEW), "OpenSSL 3.5.0")
    assert plan == GroupPlan(("X25519MLKEM768", "X25519"))


def test_unknown_names_are_problems_with_their_index() -> None:
    plan = plan_groups(("X25519", "X25591"), offered(OLD), "OpenSSL 3.0.2")
    assert plan.problems == ((1, "OpenSSL 3.0.2 does not offer the group 'X25591' "
                                 "(`openssl list -tls-groups` lists those it does)"),)


def test_nothing_left_is_a_problem() -> None:
    plan = plan_groups(("MLKEM768",), offered(OLD), "OpenSSL 3.0.2")
    assert plan.groups == () and plan.dropped == ("MLKEM768",)
    assert plan.problems and plan.problems[0][0] is None
    assert "none of these groups is offered by OpenSSL 3.0.2" in plan.problems[0][1]
