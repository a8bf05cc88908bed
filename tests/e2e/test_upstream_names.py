"""Upstreams named by a host name (dialer.py), on loopback: ``localhost`` resolves to ::1
and 127.0.0.1 while the app listens on 127.0.0.1 only; a name that does not resolve.
(Blackholed addresses and a name that stops resolving: tests/faults/test_upstream_dns.py.)
"""

from __future__ import annotations

import socket
from typing import Any

import pytest

from tests.e2e.harness import (
    Backend,
    Enforcer,
    exchange,
    inbound_cfg,
    random_bytes,
    running,
    sha,
)

pytestmark = pytest.mark.usefixtures("relay_mode")


def _errors(enf: Enforcer, upstream: str, reason: str) -> float:
    value = enf.metrics.registry.get_sample_value(
        "enforcer_upstream_errors_total", {"upstream": upstream, "reason": reason})
    return value or 0.0


async def test_localhost_reaches_the_address_that_listens(pki: Any) -> None:
    addrs = {info[4][0] for info in socket.getaddrinfo("localhost", 1, type=socket.SOCK_STREAM)}
    backend = await Backend().start()  # 127.0.0.1 only
    cfg = inbound_cfg(pki, backend.port, default="allow", rules=[], mode="off",
                      upstream_extra={"address": f"localhost:{backend.port}"})
    enf = await Enforcer(cfg).start()
    async with running(enf, backend):
        for _ in range(6):
            payload = random_bytes(200_000)
            assert sha(await exchange(enf.port(), payload)) == sha(payload)
        recs = await enf.wait_flows(6)
        assert all(r["close"] == "client_fin" for r in recs)
        refused = _errors(enf, "app", "econnrefused")
        # ::1 (when localhost has it) is refused once, then tried last
        assert refused == (1.0 if "::1" in addrs and addrs != {"::1"} else 0.0)


async def test_a_name_that_does_not_resolve_is_a_clean_counted_error(pki: Any) -> None:
    cfg = inbound_cfg(pki, 1, default="allow", rules=[], mode="off",
                      upstream_extra={"address": "no-such-host.invalid:8080"})
    enf = await Enforcer(cfg).start()
    async with running(enf):
        got = await exchange(enf.port(), b"hello", timeout=20, reset_ok=True)
        assert got == b""
        rec = (await enf.wait_flows(1))[0]
        assert (rec["action"], rec["close"]) == ("error", "upstream_resolve_failed")
        assert rec["detail"].startswith("cannot resolve no-such-host.invalid")
        assert _errors(enf, "app", "resolve_failed") == 1.0
