"""TLS or plaintext? What the first bytes of a connection on a ``tls.mode: auto`` listener
are (a pure function: no I/O).

How it works. ``classify(head)`` looks at the bytes the client sent first:

- ``TLS``: a TLS handshake record (first byte 0x16): the TLS engine takes it from there;
- ``SSLV2_HELLO``: a ClientHello in the SSLv2 record format: a two-byte header with the
  high bit set (length >= 9), message type 1 (CLIENT-HELLO), then the version: 0x0002
  (SSL 2.0) or 0x0300-0x0304 (a TLS client still sending the old hello format). Neither
  SSLv2 nor its hello format is supported: refused as a TLS error, never relayed;
- ``TLS_RECORD``: any other TLS record header: change_cipher_spec (0x14), alert (0x15),
  application_data (0x17) or heartbeat (0x18), then version 0x0300-0x0304: a TLS peer,
  but not one starting a handshake: refused as a TLS error too;
- ``PLAIN``: anything else: relayed as plaintext;
- ``None``: the bytes so far are the start of one of the TLS forms above: wait for more.

``proxy_silence`` says how long a client may stay silent at the very start of a
connection on a ``tls.mode: auto`` or ``off`` listener with ``proxy_protocol.accept:
optional`` before it is taken to send no PROXY header (and, on ``auto``, no TLS either):
``tls.detect_timeout``, so server-first protocols do not wait for the PROXY timeout.

At most ``HEAD`` (5) bytes decide, and a plaintext client is told apart at the first byte
that fits no TLS form, so only a client whose first bytes look exactly like a TLS header
waits for more. (The SSLv2 three-byte header, for padded records, is never used for a
CLIENT-HELLO and is not looked for: its first byte, 0x00-0x3f, is common in plaintext.)
"""

from __future__ import annotations

from typing import Final

TLS: Final = "tls"
SSLV2_HELLO: Final = "sslv2_hello"
TLS_RECORD: Final = "unexpected_tls_record"
PLAIN: Final = "plain"

HEAD: Final = 5
HANDSHAKE: Final = 0x16
OTHER_RECORD_TYPES: Final = frozenset({0x14, 0x15, 0x17, 0x18})
SSLV2_CLIENT_HELLO: Final = 0x01
SSLV2_MIN_LENGTH: Final = 9  # type, version, three two-byte lengths (before any content)
TLS_MAJOR: Final = 0x03
TLS_MINOR_MAX: Final = 0x04  # TLS 1.3 (the record layer says 0x0301-0x0303; 0x0304 is kept)

# The fatal alert sent before closing: protocol_version (70) for an SSLv2-format hello,
# unexpected_message (10) for a record that does not start a handshake.
ALERTS: Final = {SSLV2_HELLO: bytes((0x15, 0x03, 0x01, 0x00, 0x02, 0x02, 70)),
                 TLS_RECORD: bytes((0x15, 0x03, 0x03, 0x00, 0x02, 0x02, 10))}


def classify(head: bytes) -> str | None:
    """``TLS``, ``SSLV2_HELLO``, ``TLS_RECORD``, ``PLAIN``, or None (need more bytes)."""
    if not head:
        return None
    first = head[0]
    if first == HANDSHAKE:
        return TLS
    if first in OTHER_RECORD_TYPES:
        return _record(head)
    if first & 0x80:
        return _sslv2_hello(head)
    return PLAIN


def _record(head: bytes) -> str | None:
    """A TLS record header other than a handshake: type, 0x03, minor <= 4."""
    if len(head) >= 2 and head[1] != TLS_MAJOR:
        return PLAIN
    if len(head) >= 3 and head[2] > TLS_MINOR_MAX:
        return PLAIN
    return TLS_RECORD if len(head) >= 3 else None


def _sslv2_hello(head: bytes) -> str | None:
    """An SSLv2 two-byte record header, CLIENT-HELLO, version 0x0002 or 0x0300-0x0304."""
    if len(head) >= 2 and ((head[0] & 0x7F) << 8 | head[1]) < SSLV2_MIN_LENGTH:
        return PLAIN
    if len(head) >= 3 and head[2] != SSLV2_CLIENT_HELLO:
        return PLAIN
    if len(head) >= 4 and head[3] not in (0x00, TLS_MAJOR):
        return PLAIN
    if len(head) >= HEAD:
        major, minor = head[3], head[4]
        fits = minor == 0x02 if major == 0x00 else minor <= TLS_MINOR_MAX
        return SSLV2_HELLO if fits else PLAIN
    return None


def proxy_silence(tls_mode: str, accept: str, detect_timeout: float,
                  proxy_timeout: float) -> float:
    """Seconds of client silence after which an ``accept: optional`` PROXY stage ends with
    no header (then plaintext, the server speaks first); 0: wait for the PROXY timeout.
    Only ``tls.mode: auto`` and ``off`` listeners: a TLS client (``terminate``,
    ``passthrough``) always speaks first, and a required header is always awaited."""
    if accept != "optional" or tls_mode not in ("auto", "off") \
            or not 0 < detect_timeout < proxy_timeout:
        return 0.0
    return detect_timeout
