"""The ClientHello of a ``tls.mode: passthrough`` connection, read without terminating TLS
(a pure, incremental parser: no I/O).

How it works. ``HelloParser.feed(data)`` takes the client's bytes as they arrive, in any
split (one byte per TCP segment is fine), and keeps every byte it was given, unchanged, in
``raw``: the data plane relays exactly those bytes once the connection is routed.

- The first bytes must be a TLS handshake record (0x16, version 0x03 0x00-0x04). Anything
  else is refused at once: an SSLv2-format hello (``sslv2_hello``), another TLS record
  type (``unexpected_tls_record``) or plaintext (``not_tls``); ``detect.classify`` tells
  them apart, as on ``tls.mode: auto`` listeners.
- Records are taken one at a time as they complete: each must be a handshake record of 1
  to 2^14 bytes (RFC 8446 5.1: no empty handshake fragments, no oversize records), and
  their payloads are joined, so a ClientHello fragmented over several records is
  reassembled. Each byte is looked at once: the work is linear in what was received.
- The handshake message must be a ClientHello (type 1) no longer than ``MAX_HELLO``;
  ``raw`` never holds more than ``MAX_PEEK`` bytes (record headers included).
- Once whole, the ClientHello is decoded with every length checked against what
  encloses it: legacy version, random, session id (<= 32), cipher suites (even, >= 2),
  compression methods (>= 1), then the extensions, which must fill the message exactly.
  A repeated extension type is refused (RFC 8446 4.2), except GREASE values (RFC 8701),
  which are otherwise ignored like any unknown extension. The server_name extension
  (RFC 6066 3) must hold a well-formed list whose first entry is a host_name of 1-255
  bytes, letters, digits, ``-``, ``_`` and ``.`` only (no NUL, no spaces, no non-ASCII):
  the name the proxy routes on must be the name the backend sees, byte for byte.

Every refusal is a ``HelloError`` with a short ``reason`` (flow record and metric label),
a message for the flow record's ``detail``, and the TLS alert to send before closing.
A ClientHello without the server_name extension is not an error: ``Hello.sni`` is None.
"""

from __future__ import annotations

import re
import ssl
import struct
from dataclasses import dataclass
from typing import Final

from enforcer.dataplane import detect

RECORD_HEADER: Final = 5
MAX_RECORD: Final = 1 << 14  # TLSPlaintext.length limit (RFC 8446 5.1)
MAX_HELLO: Final = 64 * 1024 - 4  # the ClientHello body (Envoy's tls_inspector caps at 64 KiB)
MAX_PEEK: Final = 80 * 1024  # raw bytes held: the hello plus its record headers, with room
# for a hello cut into many small records
HANDSHAKE_RECORD: Final = 0x16
CLIENT_HELLO: Final = 0x01
EXT_SERVER_NAME: Final = 0x0000
NAME_TYPE_HOST: Final = 0x00
MAX_HOST_NAME: Final = 255

# TLS alert descriptions (RFC 8446 6.2), as the ssl module numbers them
_ALERT: Final = ssl.AlertDescription
UNEXPECTED_MESSAGE, RECORD_OVERFLOW, HANDSHAKE_FAILURE, ILLEGAL_PARAMETER = (
    _ALERT.ALERT_DESCRIPTION_UNEXPECTED_MESSAGE, _ALERT.ALERT_DESCRIPTION_RECORD_OVERFLOW,
    _ALERT.ALERT_DESCRIPTION_HANDSHAKE_FAILURE, _ALERT.ALERT_DESCRIPTION_ILLEGAL_PARAMETER)
DECODE_ERROR, PROTOCOL_VERSION, UNRECOGNIZED_NAME = (
    _ALERT.ALERT_DESCRIPTION_DECODE_ERROR, _ALERT.ALERT_DESCRIPTION_PROTOCOL_VERSION,
    _ALERT.ALERT_DESCRIPTION_UNRECOGNIZED_NAME)

_EXT_HEADER: Final = struct.Struct("!HH")
_HOST_NAME = re.compile(rb"[A-Za-z0-9_-]+(?:\.[A-Za-z0-9_-]+)*\.?")


def is_grease(value: int) -> bool:
    """RFC 8701 GREASE values: 0x0A0A, 0x1A1A ... 0xFAFA."""
    return (value & 0x0F0F) == 0x0A0A and (value >> 8) == (value & 0xFF)


def alert(description: int, version: int = 0x0303) -> bytes:
    """A fatal alert as a plaintext TLS record (level 2), with the given record version."""
    return bytes((0x15, version >> 8, version & 0xFF, 0x00, 0x02, 0x02, description))


class HelloError(Exception):
    """A ClientHello refused: ``reason`` (label), message, and the alert to send (or None:
    the peer does not speak TLS, and gets no TLS record)."""

    def __init__(self, reason: str, message: str, alert_description: int | None) -> None:
        super().__init__(message)
        self.reason = reason
        self.alert = alert_description


@dataclass(frozen=True, slots=True)
class Hello:
    sni: str | None  # lower case, without a trailing dot; None: no server_name extension
    legacy_version: int  # ClientHello.legacy_version (0x0303 for TLS 1.2 and 1.3)
    length: int  # bytes of the ClientHello message (without its 4-byte header)


def _invalid(message: str, description: int = DECODE_ERROR) -> HelloError:
    return HelloError("client_hello_invalid", message, description)


class HelloParser:
    """Feed the client's first bytes until ``feed`` returns the ``Hello`` (or raises)."""

    __slots__ = ("_at", "_handshake", "alert_version", "raw")

    def __init__(self) -> None:
        self.raw = bytearray()  # every byte fed, unchanged (relayed once routed)
        self._handshake = bytearray()  # the handshake records' payloads, joined
        self._at = 0  # where the next record header starts in ``raw``
        # the record version of an alert to this client: TLS 1.2's unless its ClientHello
        # offers only older versions (then TLS 1.0's, which every such client reads)
        self.alert_version = 0x0303

    def release(self) -> None:
        """Drop the buffers (the bytes were handed on); the parser takes nothing more."""
        self.raw = bytearray()
        self._handshake = bytearray()

    def feed(self, data: bytes) -> Hello | None:
        """The ClientHello once complete; None while more bytes are needed."""
        if len(self.raw) + len(data) > MAX_PEEK:
            raise HelloError("client_hello_too_large", f"more than {MAX_PEEK} bytes before "
                             "the ClientHello was complete", HANDSHAKE_FAILURE)
        self.raw += data
        if self._at == 0 and self.raw[0:1] != bytes((HANDSHAKE_RECORD,)):
            self._not_a_hello()
            return None
        while self._next_record():
            hello = self._hello()
            if hello is not None:
                return hello
        return None

    def _not_a_hello(self) -> None:
        kind = detect.classify(bytes(self.raw[:detect.HEAD]))
        if kind is None:
            return  # could still be an SSLv2 hello or another record: wait
        if kind == detect.SSLV2_HELLO:
            raise HelloError(kind, "a ClientHello in the SSLv2 format (not supported)",
                             PROTOCOL_VERSION)
        if kind == detect.TLS_RECORD:
            raise HelloError(kind, f"a TLS record of type {self.raw[0]} before any "
                             "ClientHello", UNEXPECTED_MESSAGE)
        raise HelloError("not_tls", "the client's first bytes are not TLS", None)

    def _next_record(self) -> bool:
        """Take the next complete record; False when it has not fully arrived."""
        at, raw = self._at, self.raw
        if len(raw) - at < RECORD_HEADER:
            self._check_header(raw[at:])
            return False
        self._check_header(raw[at:at + RECORD_HEADER])
        length = raw[at + 3] << 8 | raw[at + 4]
        if len(raw) - at - RECORD_HEADER < length:
            return False
        self._handshake += raw[at + RECORD_HEADER:at + RECORD_HEADER + length]
        self._at = at + RECORD_HEADER + length
        return True

    @staticmethod
    def _check_header(head: bytearray) -> None:
        """As much of a record header as has arrived (1-5 bytes)."""
        if not head:
            return
        if head[0] != HANDSHAKE_RECORD:
            raise HelloError("unexpected_tls_record" if head[0] in detect.OTHER_RECORD_TYPES
                             else "client_hello_invalid",
                             f"a record of type {head[0]} inside the ClientHello",
                             UNEXPECTED_MESSAGE)
        if len(head) >= 3 and (head[1] != detect.TLS_MAJOR or head[2] > detect.TLS_MINOR_MAX):
            raise HelloError("client_hello_invalid", f"record version {head[1]}.{head[2]} "
                             "is not TLS", PROTOCOL_VERSION)
        if len(head) == RECORD_HEADER:
            length = head[3] << 8 | head[4]
            if length == 0:
                raise _invalid("an empty handshake record", UNEXPECTED_MESSAGE)
            if length > MAX_RECORD:
                raise HelloError("client_hello_invalid", f"a record of {length} bytes "
                                 f"(at most {MAX_RECORD})", RECORD_OVERFLOW)

    def _hello(self) -> Hello | None:
        hs = self._handshake
        if len(hs) < 4:
            return None
        if hs[0] != CLIENT_HELLO:
            raise HelloError("client_hello_invalid", f"handshake message type {hs[0]} "
                             "where a ClientHello (1) was expected", UNEXPECTED_MESSAGE)
        length = hs[1] << 16 | hs[2] << 8 | hs[3]
        if length > MAX_HELLO:
            raise HelloError("client_hello_too_large", f"a ClientHello of {length} bytes "
                             f"(at most {MAX_HELLO})", HANDSHAKE_FAILURE)
        if len(hs) < 4 + length:
            return None
        if len(hs) > 4 + length:  # RFC 8446 5.1: a key change may not follow in one record
            raise _invalid("more handshake bytes after the ClientHello", UNEXPECTED_MESSAGE)
        hello = parse_body(bytes(hs[4:4 + length]))
        self.alert_version = 0x0303 if hello.legacy_version >= 0x0303 else 0x0301
        return hello


class _Reader:
    """Bounds-checked big-endian reads over one byte string."""

    __slots__ = ("data", "end", "pos")

    def __init__(self, data: bytes, pos: int = 0, end: int | None = None) -> None:
        self.data = data
        self.pos = pos
        self.end = len(data) if end is None else end

    @property
    def left(self) -> int:
        return self.end - self.pos

    def uint(self, size: int, what: str) -> int:
        if self.left < size:
            raise _invalid(f"the ClientHello ends inside {what}")
        value = int.from_bytes(self.data[self.pos:self.pos + size], "big")
        self.pos += size
        return value

    def vector(self, length_size: int, what: str) -> _Reader:
        """The next ``<length><bytes>`` as a reader of its own; the length must fit."""
        length = self.uint(length_size, f"the length of {what}")
        if length > self.left:
            raise _invalid(f"{what} is {length} bytes but only {self.left} follow")
        sub = _Reader(self.data, self.pos, self.pos + length)
        self.pos += length
        return sub

    def rest(self) -> bytes:
        return self.data[self.pos:self.end]


def parse_body(body: bytes) -> Hello:
    """Decode a whole ClientHello message body (after the 4-byte handshake header)."""
    r = _Reader(body)
    version = r.uint(2, "legacy_version")
    if version >> 8 != detect.TLS_MAJOR:
        raise HelloError("client_hello_invalid", f"ClientHello version {version:#06x} is "
                         "not TLS", PROTOCOL_VERSION)
    r.uint(32, "random")
    if r.vector(1, "legacy_session_id").left > 32:
        raise _invalid("a session id longer than 32 bytes", ILLEGAL_PARAMETER)
    suites = r.vector(2, "cipher_suites")
    if suites.left < 2 or suites.left % 2:
        raise _invalid(f"cipher_suites of {suites.left} bytes (an even number, at least 2)")
    if r.vector(1, "compression_methods").left < 1:
        raise _invalid("no compression method")
    if r.left == 0:
        return Hello(None, version, len(body))  # no extensions (SSL 3.0-style hello)
    extensions = r.vector(2, "extensions")
    if r.left:
        raise _invalid(f"{r.left} bytes after the extensions")
    return Hello(_extensions(extensions), version, len(body))


def _extensions(r: _Reader) -> str | None:
    """The extension list (read in place: this loop is most of a hello's parsing time)."""
    data, pos, end = r.data, r.pos, r.end
    seen: set[int] = set()
    sni: str | None = None
    while pos < end:
        if end - pos < 4:
            raise _invalid("the ClientHello ends inside an extension header")
        kind, length = _EXT_HEADER.unpack_from(data, pos)
        pos += 4
        if length > end - pos:
            raise _invalid(f"extension {kind} is {length} bytes but only {end - pos} follow")
        if kind in seen and not is_grease(kind):
            raise _invalid(f"extension {kind} appears twice", ILLEGAL_PARAMETER)
        seen.add(kind)
        if kind == EXT_SERVER_NAME:
            sni = _server_name(_Reader(data, pos, pos + length))
        pos += length
    return sni


def _server_name(r: _Reader) -> str:
    """RFC 6066 3: ServerNameList; the first entry must be a host_name."""
    names = r.vector(2, "the server name list")
    if r.left:
        raise _invalid("bytes after the server name list")
    if names.left == 0:
        raise _invalid("an empty server name list")
    name_type = names.uint(1, "the server name type")
    if name_type != NAME_TYPE_HOST:
        raise _invalid(f"server name type {name_type} (only host_name, 0, is defined)",
                       ILLEGAL_PARAMETER)
    host = names.vector(2, "the host name").rest()
    while names.left:  # the rest of the list must be well formed too; no second host_name
        if names.uint(1, "the server name type") == NAME_TYPE_HOST:
            raise _invalid("two host names in server_name", ILLEGAL_PARAMETER)
        names.vector(2, "a server name")
    if not 0 < len(host) <= MAX_HOST_NAME or _HOST_NAME.fullmatch(host) is None:
        shown = host[:64].decode("ascii", "backslashreplace")
        raise HelloError("client_hello_invalid", f"server name {shown!r} is not a host name",
                         ILLEGAL_PARAMETER)
    return host.decode("ascii").lower().rstrip(".")
