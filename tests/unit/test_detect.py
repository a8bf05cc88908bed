"""enforcer.dataplane.detect: TLS, refused TLS forms, or plaintext from the first bytes."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from enforcer.dataplane import detect

# A classic SSL 2.0 CLIENT-HELLO (what `openssl s_client -ssl2` sent): 7 cipher specs and
# a 16-byte challenge; and an SSLv2-format hello of a TLS 1.2 client (`-ssl23` of old).
SSL2_HELLO = (bytes.fromhex("802e0100020015000000100700c0050080030080010080060040040080020080")
              + bytes(range(16)))
SSL23_HELLO = bytes.fromhex("803501030300 0c0000 0020 00002f 000035 00c02f 0000ff".replace(
    " ", "")) + bytes(range(32))


@pytest.mark.parametrize(("head", "kind"), [
    (b"\x16\x03\x01\x02\x00\x01", detect.TLS),
    (b"\x16", detect.TLS),
    (SSL2_HELLO, detect.SSLV2_HELLO),
    (SSL23_HELLO, detect.SSLV2_HELLO),
    (b"\x80\x2e\x01\x03\x04", detect.SSLV2_HELLO),  # TLS 1.3 in the old format
    (b"\x15\x03\x03\x00\x02\x02\x28", detect.TLS_RECORD),  # an alert
    (b"\x17\x03\x03\x00\x20", detect.TLS_RECORD),  # application data
    (b"\x14\x03\x01", detect.TLS_RECORD),  # change_cipher_spec
    (b"\x18\x03\x00", detect.TLS_RECORD),  # heartbeat
    (b"GET / HTTP/1.1\r\n", detect.PLAIN),
    (b"SSH-2.0-OpenSSH_9.6\r\n", detect.PLAIN),
    (b"\x00\x00\x00\x08\x04\xd2\x16\x2f", detect.PLAIN),  # PostgreSQL SSLRequest
    (b"*1\r\n$4\r\nPING\r\n", detect.PLAIN),
    (b"\x17\x04", detect.PLAIN),  # not version 3.x
    (b"\x15\x03\x05", detect.PLAIN),  # minor beyond TLS 1.3
    (b"\x80\x08", detect.PLAIN),  # too short for a CLIENT-HELLO
    (b"\x80\x2e\x02", detect.PLAIN),  # SSLv2 message type other than CLIENT-HELLO
    (b"\x80\x2e\x01\x01", detect.PLAIN),  # version major 1
    (b"\x80\x2e\x01\x00\x03", detect.PLAIN),  # 0x0003 is not a version
    (b"\x80\x2e\x01\x03\x05", detect.PLAIN),
    (b"\xff\xfe\xfd", detect.PLAIN),
])
def test_classify(head: bytes, kind: str) -> None:
    assert detect.classify(head) == kind


@pytest.mark.parametrize("head", [b"", b"\x15", b"\x17\x03", b"\x80", b"\x80\x2e",
                                  b"\x80\x2e\x01", b"\x80\x2e\x01\x03"])
def test_a_prefix_of_a_tls_header_waits_for_more(head: bytes) -> None:
    assert detect.classify(head) is None


@given(st.binary(min_size=detect.HEAD, max_size=64))
def test_five_bytes_always_decide_and_every_prefix_agrees(data: bytes) -> None:
    kind = detect.classify(data)
    assert kind in (detect.TLS, detect.SSLV2_HELLO, detect.TLS_RECORD, detect.PLAIN)
    assert detect.classify(data[:detect.HEAD]) == kind
    for n in range(1, detect.HEAD):
        assert detect.classify(data[:n]) in (None, kind)


def test_the_alerts_are_fatal_tls_alert_records() -> None:
    for kind, alert in detect.ALERTS.items():
        assert alert[:3] in (b"\x15\x03\x01", b"\x15\x03\x03") and alert[3:6] == b"\x00\x02\x02"
        assert alert[6] == (70 if kind == detect.SSLV2_HELLO else 10)


@pytest.mark.parametrize(("mode", "accept", "detect_timeout", "proxy_timeout", "expected"), [
    ("auto", "optional", 0.2, 3.0, 0.2),      # a silent client: no header after 200 ms
    ("auto", "required", 0.2, 3.0, 0.0),      # a header is required: wait for it
    ("terminate", "optional", 0.2, 3.0, 0.0),  # TLS clients speak first
    ("off", "optional", 0.2, 3.0, 0.2),       # plaintext: a silent client has no header
    ("off", "required", 0.2, 3.0, 0.0),       # a required header stays strict
    ("passthrough", "optional", 0.2, 3.0, 0.0),  # the ClientHello comes first
    ("off", "optional", 0.0, 3.0, 0.0),       # detect_timeout 0s: the old wait
    ("auto", "optional", 0.0, 3.0, 0.0),      # detect_timeout 0s: the old wait
    ("auto", "optional", 5.0, 3.0, 0.0),      # the PROXY timeout comes first anyway
])
def test_proxy_silence(mode: str, accept: str, detect_timeout: float, proxy_timeout: float,
                       expected: float) -> None:
    assert detect.proxy_silence(mode, accept, detect_timeout, proxy_timeout) == expected
