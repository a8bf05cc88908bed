"""The negotiated key-exchange group as the native extension reads it (``_pump``'s
``negotiated_group``) agrees with the ctypes reading of ``tlsconf.groups`` on real
in-memory TLS handshakes (mutual TLS 1.3 with three groups, TLS 1.2), is
None before a handshake finishes, and refuses a state whose BIOs do not belong to its SSL
(counted as a verification failure). The flow records of both relays carry the group end
to end: tests/e2e/test_tls_groups.py."""

from __future__ import annotations

import ssl
from typing import Any

import pytest

from enforcer.dataplane import native, tlsengine
from enforcer.tlsconf import groups
from tests.unit.test_certs import client_context, server_context

pytestmark = pytest.mark.skipif(not native.available(), reason="native extension not built")


def _pair(pki: Any, group: str, version: ssl.TLSVersion
          ) -> tuple[native.Triple, native.Triple]:
    server_ctx = server_context(pki.server, pki.ca)
    client_ctx = client_context(pki.client, pki.ca)
    client_ctx.maximum_version = version
    b = groups.binding()
    assert b is not None, groups.unavailable_reason()
    b.set_groups(client_ctx, (group,))
    states = []
    for ctx, server in ((server_ctx, True), (client_ctx, False)):
        incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
        obj = ctx.wrap_bio(incoming, outgoing, server_side=server,
                           server_hostname=None if server else "localhost")
        states.append((obj, incoming, outgoing))
    return states[0], states[1]


def _step(state: native.Triple) -> bool:
    try:
        state[0].do_handshake()
    except ssl.SSLWantReadError:
        return False
    return True


def _handshake(server: native.Triple, client: native.Triple) -> None:
    done = (False, False)
    for _ in range(10):
        done = (done[0] or _step(client), done[1] or _step(server))
        server[1].write(client[2].read())
        client[1].write(server[2].read())
        if all(done):
            return
    raise AssertionError("the handshake did not finish")


# TLS 1.2 with an ECDSA P-256 certificate needs P-256 among the client's groups
@pytest.mark.parametrize(("version", "group", "name"), [
    (ssl.TLSVersion.TLSv1_3, "X25519", "x25519"),
    (ssl.TLSVersion.TLSv1_3, "P-256", "secp256r1"),
    (ssl.TLSVersion.TLSv1_3, "P-384", "secp384r1"),
    (ssl.TLSVersion.TLSv1_2, "P-256", "secp256r1"),
])
def test_native_reading_agrees_with_the_ctypes_one(pki: Any, version: ssl.TLSVersion,
                                                   group: str, name: str) -> None:
    server, client = _pair(pki, group, version)
    assert native.negotiated_group(server) is None  # no handshake yet
    assert native.negotiated_group(client) is None
    _handshake(server, client)
    for state in (server, client):
        assert state[0].version() == ("TLSv1.3" if version == ssl.TLSVersion.TLSv1_3
                                      else "TLSv1.2")
        assert native.negotiated_group(state) == name
        assert groups.negotiated(state) == name
        assert tlsengine._negotiated_group(state) == name


def test_a_state_whose_bios_are_not_its_own_is_refused_and_counted(pki: Any) -> None:
    server, client = _pair(pki, "X25519", ssl.TLSVersion.TLSv1_3)
    _handshake(server, client)
    before = native.verification_failures()
    forged = (server[0], client[1], client[2])  # another SSL's BIOs
    with pytest.raises(RuntimeError, match="layout"):
        native.negotiated_group(forged)
    assert native.verification_failures() == before + 1
    # the engine's reading falls back to the ctypes path, which refuses it as well
    assert tlsengine._negotiated_group(forged) is None
