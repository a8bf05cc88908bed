"""``tls.mode: auto``: a client that speaks TLS but does not start a TLS handshake we
accept (an SSLv2-format ClientHello, as `openssl s_client -ssl2` and the `-ssl23` of old
OpenSSL sent; any other TLS record) is refused as a TLS error with its own reason, and
nothing of it reaches the upstream; plaintext that merely starts with such a byte is
still relayed. The plaintext rule below would let these clients through if they were
taken for plaintext (as they were before)."""

from __future__ import annotations

import asyncio
import contextlib
from typing import Any

import pytest

from enforcer.dataplane import detect
from tests.e2e.harness import Backend, Enforcer, exchange, inbound_cfg, random_bytes, running, sha
from tests.unit.test_detect import SSL2_HELLO, SSL23_HELLO

pytestmark = pytest.mark.usefixtures("relay_mode")

RULES = [{"name": "plain-from-localhost", "action": "allow",
          "from": {"tls": "none", "cidrs": ["127.0.0.0/8"]}}]
ALERT_RECORD = b"\x15\x03\x03\x00\x02\x02\x28"  # a client's fatal handshake_failure alert


async def _send(payload: bytes, port: int, *, byte_at_a_time: bool) -> bytes:
    """Send ``payload`` (whole, or a byte per segment: then only the bytes that decide,
    since more sent after the refusal would meet a reset) and read until the end."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        deciding = detect.HEAD if payload[0] & 0x80 else 3
        for piece in ([payload[i:i + 1] for i in range(deciding)] if byte_at_a_time
                      else [payload]):
            writer.write(piece)
            await writer.drain()
            if byte_at_a_time:
                await asyncio.sleep(0.005)
        got = b""
        with contextlib.suppress(ConnectionResetError):
            async with asyncio.timeout(10):
                while data := await reader.read(65536):
                    got += data
        return got
    finally:
        writer.close()


@pytest.mark.parametrize("byte_at_a_time", [False, True], ids=["whole", "bytewise"])
@pytest.mark.parametrize(("hello", "kind"), [
    (SSL2_HELLO, detect.SSLV2_HELLO),
    (SSL23_HELLO, detect.SSLV2_HELLO),
    (ALERT_RECORD, detect.TLS_RECORD),
    (b"\x17\x03\x03\x00\x05hello", detect.TLS_RECORD),
], ids=["ssl2", "ssl23", "alert", "application_data"])
async def test_a_tls_client_without_a_handshake_we_accept_is_refused(
        pki: Any, hello: bytes, kind: str, byte_at_a_time: bool) -> None:
    backend = await Backend(mode="echo").start()
    enforcer = await Enforcer(inbound_cfg(pki, backend.port, mode="auto", rules=RULES)).start()
    async with running(enforcer, backend):
        got = await _send(hello, enforcer.port(), byte_at_a_time=byte_at_a_time)
        assert got == detect.ALERTS[kind], "a fatal TLS alert, then the end"
        rec = (await enforcer.wait_flows(1))[0]
        assert (rec["action"], rec["reason"], rec["close"]) == ("error", kind, kind)
        assert rec["upstream"] is None and rec["relay"] is None
        assert rec["bytes"] == {"from_client": 0, "to_client": 0}
        assert "SSLv2" in rec["detail"] if kind == detect.SSLV2_HELLO else "TLS record" in \
            rec["detail"]
        assert enforcer.metrics.registry.get_sample_value(
            "enforcer_tls_handshake_errors_total", {"listener": "inbound", "reason": kind}) == 1
        await asyncio.sleep(0.1)
        assert (backend.connections, backend.received) == (0, []), "nothing reached upstream"


async def test_plaintext_that_starts_like_tls_is_still_relayed(pki: Any) -> None:
    backend = await Backend(mode="echo").start()
    enforcer = await Enforcer(inbound_cfg(pki, backend.port, mode="auto", rules=RULES)).start()
    async with running(enforcer, backend):
        payloads = [b"\x80\x2e\x02" + random_bytes(5000),  # not a CLIENT-HELLO
                    b"\x17\x04" + random_bytes(5000),  # not TLS version 3.x
                    b"\xff" + random_bytes(5000)]
        for payload in payloads:
            assert sha(await exchange(enforcer.port(), payload)) == sha(payload)
        recs = await enforcer.wait_flows(len(payloads))
        assert [r["close"] for r in recs] == ["client_fin"] * len(payloads)
        assert sorted(sha(b) for b in backend.received) == sorted(sha(p) for p in payloads)
