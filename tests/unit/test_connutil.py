"""enforcer.dataplane.connutil.addr: socket addresses as (host, port), kept as they are
when they already are one (an idle connection holds no copy of its peer's address)."""

from __future__ import annotations

from enforcer.dataplane import connutil


def test_an_address_that_is_already_host_and_port_is_kept_as_it_is() -> None:
    peer = ("192.0.2.7", 40123)
    assert connutil.addr(peer) is peer


def test_other_forms_become_host_and_port() -> None:
    assert connutil.addr(("2001:db8::1", 443, 0, 0)) == ("2001:db8::1", 443)
    assert connutil.addr(("::ffff:192.0.2.7", 40123, 0, 0)) == ("192.0.2.7", 40123)
    assert connutil.addr(("::ffff:192.0.2.7", 40123)) == ("192.0.2.7", 40123)
    assert connutil.addr(("192.0.2.7", True)) == ("192.0.2.7", 1)
    assert type(connutil.addr(("192.0.2.7", True))[1]) is int  # type: ignore[index]
    assert connutil.addr("/run/enforcer.sock") == ("/run/enforcer.sock", 0)
    assert connutil.addr("") is None and connutil.addr(None) is None
