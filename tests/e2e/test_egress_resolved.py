"""Egress rules see the addresses a requested name resolves to (egress/resolved.py): real
curl through ``protocol: socks5`` (``--socks5-hostname``) and ``protocol: http_connect``
(``-x --proxytunnel``), with the native pump and the Python relay.

The ruleset allows every name under ``.egress.test`` and denies the "internal" network
127.0.0.2/32 by CIDR. The test's resolver (``FakeResolver``) maps names:

- ``rebind.egress.test`` -> 127.0.0.2 only: refused before any connect with ``close:
  denied_resolved_address`` (SOCKS5 0x02, HTTP 403), the record naming the host and the
  refused address; the internal listener on 127.0.0.2 never sees a connection;
- ``mixed.egress.test`` -> 127.0.0.2, then 127.0.0.1: only 127.0.0.1 is connected to,
  bytes checked by sha256, and again nothing reaches 127.0.0.2;
- ``app.egress.test`` -> 127.0.0.1: allowed as before.

Every address is on loopback, so even a broken check could not send a packet elsewhere."""

from __future__ import annotations

import asyncio
import hashlib
import os
import struct
from pathlib import Path
from typing import Any

import pytest

from enforcer.config.loader import parse_config
from enforcer.policy import compile_rulesets
from tests.e2e.egress_util import FakeResolver, egress_cfg
from tests.e2e.harness import Backend, Enforcer, running
from tests.e2e.test_egress import _curl, _upload
from tests.e2e.test_real_clients import HttpBackend

pytestmark = [pytest.mark.needs_tool, pytest.mark.usefixtures("relay_mode")]

INTERNAL = "127.0.0.2"


class Internal:
    """A listener on the internal address that counts the connections reaching it."""

    def __init__(self) -> None:
        self.connections = 0
        self.server: asyncio.Server | None = None

    async def start(self, port: int) -> Internal:
        self.server = await asyncio.start_server(self._handle, INTERNAL, port)
        return self

    async def _handle(self, _r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        self.connections += 1
        w.close()

    async def close(self) -> None:
        if self.server is not None:
            self.server.close()


def _rules(port: int) -> list[dict[str, Any]]:
    return [{"name": "backends", "action": "allow",
             "to": {"hosts": ["*.egress.test"], "ports": [port]}},
            {"name": "no-internal", "action": "deny",
             "to": {"cidrs": [f"{INTERNAL}/32", "169.254.169.254/32"]}}]


def _proxy(protocol: str, port: int) -> list[str]:
    if protocol == "socks5":
        return ["--socks5-hostname", f"127.0.0.1:{port}"]
    return ["-x", f"http://127.0.0.1:{port}", "--proxytunnel"]


@pytest.mark.parametrize("protocol", ["socks5", "http_connect"])
async def test_a_name_resolving_into_a_denied_network_is_refused(
        tmp_path: Path, protocol: str, monkeypatch: pytest.MonkeyPatch) -> None:
    resolver = FakeResolver(monkeypatch)
    backend = await HttpBackend(os.urandom(150_000)).start()
    internal = await Internal().start(backend.port)
    resolver.names = {"rebind.egress.test": [INTERNAL],
                      "mixed.egress.test": [INTERNAL, "127.0.0.1"]}
    enforcer = await Enforcer(egress_cfg(protocol, _rules(backend.port))).start()
    async with running(enforcer, backend):
        proxy = _proxy(protocol, enforcer.port())
        code, _, err = await _curl(*proxy, f"http://rebind.egress.test:{backend.port}/")
        assert code != 0
        if protocol == "socks5":
            assert "(2)" in err, err  # SOCKS5 reply 0x02: not allowed by ruleset
        else:
            assert "403" in err, err
        rec = (await enforcer.wait_flows(1))[0]
        assert rec["action"] == "deny" and rec["close"] == "denied_resolved_address", rec
        assert rec["egress"]["host"] == "rebind.egress.test"
        assert f"{INTERNAL} (denied by rule 'no-internal')" in rec["detail"], rec["detail"]
        assert "rebind.egress.test" in rec["detail"]
        assert rec["relay"] is None and rec["bytes"] == {"from_client": 0, "to_client": 0}

        # a name with an internal and a public address: only the public one is used
        await _upload(tmp_path, backend, f"http://mixed.egress.test:{backend.port}/", *proxy)
        await _upload(tmp_path, backend, f"http://app.egress.test:{backend.port}/", *proxy)
        recs = await enforcer.wait_flows(3)
        assert [r["action"] for r in recs[1:]] == ["allow", "allow"]
        assert all(r["rule"] == "backends" for r in recs[1:])
        assert resolver.asked == ["rebind.egress.test", "mixed.egress.test", "app.egress.test"]
        assert internal.connections == 0, "nothing may reach the denied network"
    await internal.close()


async def test_name_only_allow_under_default_deny_and_an_address_request(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """An address asked for directly is decided once (no resolver); a name allowed by a
    rule that names it is refused when its address falls under a CIDR deny, whatever the
    order of the rules (a deny always wins)."""
    resolver = FakeResolver(monkeypatch)
    backend = await HttpBackend(os.urandom(50_000)).start()
    internal = await Internal().start(backend.port)
    resolver.names = {"db.egress.test": [INTERNAL]}
    rules = [{"name": "no-internal", "action": "deny", "to": {"cidrs": ["127.0.0.2/32"]}},
             {"name": "db-by-name", "action": "allow",
              "to": {"hosts": ["db.egress.test"]}},
             {"name": "loopback", "action": "allow", "to": {"cidrs": ["127.0.0.1/32"]}}]
    enforcer = await Enforcer(egress_cfg("socks5", rules)).start()
    async with running(enforcer, backend):
        proxy = _proxy("socks5", enforcer.port())
        code, _, err = await _curl(*proxy, f"http://db.egress.test:{backend.port}/")
        assert code != 0 and "(2)" in err, err
        await _upload(tmp_path, backend, f"http://127.0.0.1:{backend.port}/", *proxy)
        recs = await enforcer.wait_flows(2)
        assert recs[0]["close"] == "denied_resolved_address" and recs[0]["rule"] == "db-by-name"
        assert recs[1]["action"] == "allow" and recs[1]["rule"] == "loopback"
        assert resolver.asked == ["db.egress.test"]
        assert internal.connections == 0
    await internal.close()


async def test_reload_re_decides_on_the_address_connected_to(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """With ``reevaluate_on_reload``, an open egress connection to a name is decided on
    again with the address it connected to: a new CIDR deny closes it (policy_reload)."""
    resolver = FakeResolver(monkeypatch)
    backend = await Backend(mode="echo").start()
    resolver.names = {"svc.egress.test": ["127.0.0.1"]}
    allow = {"name": "svc", "action": "allow", "to": {"hosts": ["svc.egress.test"]}}
    cfg = egress_cfg("socks5", [allow])
    cfg["rulesets"]["egress"]["reevaluate_on_reload"] = True
    enforcer = await Enforcer(cfg).start()

    def swap(rules: list[dict[str, Any]]) -> None:
        new = parse_config({**cfg, "rulesets": {"egress": {
            "default": "deny", "reevaluate_on_reload": True, "rules": rules}}})
        enforcer.plane.swap_rulesets(compile_rulesets(new.rulesets))

    async with running(enforcer, backend):
        reader, writer = await asyncio.open_connection("127.0.0.1", enforcer.port())
        name = b"svc.egress.test"
        writer.write(b"\x05\x01\x00")
        assert await reader.readexactly(2) == b"\x05\x00"
        writer.write(b"\x05\x01\x00\x03" + bytes([len(name)]) + name
                     + struct.pack(">H", backend.port))
        reply = await reader.readexactly(10)
        assert reply[:2] == b"\x05\x00", reply
        payload = os.urandom(100_000)
        writer.write(payload)
        got = await asyncio.wait_for(reader.readexactly(len(payload)), 20)
        assert hashlib.sha256(got).digest() == hashlib.sha256(payload).digest()
        swap([allow, {"name": "other-net", "action": "deny", "to": {"cidrs": ["10.0.0.0/8"]}}])
        writer.write(payload)  # still allowed: its address is not in the new deny
        got = await asyncio.wait_for(reader.readexactly(len(payload)), 20)
        assert hashlib.sha256(got).digest() == hashlib.sha256(payload).digest()
        swap([allow, {"name": "no-loopback", "action": "deny",
                      "to": {"cidrs": ["127.0.0.1/32"]}}])
        rec = (await enforcer.wait_flows(1))[0]
        assert rec["close"] == "policy_reload" and rec["rule"] == "no-loopback", rec
        assert rec["bytes"]["to_client"] == 2 * len(payload)
        writer.close()
