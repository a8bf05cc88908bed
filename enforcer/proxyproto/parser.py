"""The incremental, sans-IO header parser and the accept-time sniffer.

``HeaderParser.feed`` takes whatever the socket delivered. The first byte picks the
version ('P' -> v1, CR -> v2, anything else is ``bad_signature``); then the version's
scanner (``find_v1_end`` / ``scan_v2``) checks the prefix that has arrived and says how
long the header is once it can. Until then the bytes are buffered, and the scanners
refuse before the buffer can outgrow the limit (107 bytes for v1, 16 + ``max_v2_length``
for v2). Every check is a function of the bytes before it, applied in wire order, so
feeding a header whole, byte by byte or in any other chunking gives the same header or the
same error reason. Whatever follows the header in the chunk that completed it is left
untouched in ``rest``.

The common case - the whole header in the first read - parses straight from the caller's
bytes without copying them into the buffer.

``sniff`` is for ``accept: optional``: it decides by the exact ``"PROXY "`` and 12-byte v2
signature prefixes only, answering None while the bytes so far are still a prefix of one.
"""

from __future__ import annotations

from enforcer.proxyproto.constants import (
    DEFAULT_MAX_V2_LENGTH,
    V1_PREFIX,
    V2_MAX_LENGTH,
    V2_SIGNATURE,
)
from enforcer.proxyproto.errors import BAD_SIGNATURE, TRUNCATED, ProxyProtocolError
from enforcer.proxyproto.model import ProxyHeader
from enforcer.proxyproto.v1 import find_v1_end, parse_v1
from enforcer.proxyproto.v2 import parse_v2, scan_v2

_V1_FIRST = V1_PREFIX[0]
_V2_FIRST = V2_SIGNATURE[0]


def sniff(prefix: bytes | bytearray | memoryview) -> str | None:
    """Classify the first bytes of a connection.

    ``"v1"`` / ``"v2"`` once the full ``"PROXY "`` / v2 signature is there, ``"none"`` as
    soon as the bytes can no longer become either, None while they still might (need more).
    """
    if prefix[:6] == V1_PREFIX:
        return "v1"
    if prefix[:12] == V2_SIGNATURE:
        return "v2"
    if V1_PREFIX.startswith(prefix[:6]) or V2_SIGNATURE.startswith(prefix[:12]):
        return None
    return "none"


class HeaderParser:
    """Feed bytes until a :class:`ProxyHeader` comes out; see the module docstring.

    ``max_v2_length`` caps the v2 length field (bytes after the 16-byte fixed part,
    0-65535, default 4096): a longer header is ``too_long``. After a header, ``rest`` holds
    the bytes that followed it and ``feed`` must not be called again. After an error every
    call raises that error again.
    """

    __slots__ = ("_buf", "_error", "_header", "_header_length", "_max_v2_length", "_rest")

    def __init__(self, *, max_v2_length: int = DEFAULT_MAX_V2_LENGTH) -> None:
        if not 0 <= max_v2_length <= V2_MAX_LENGTH:
            raise ValueError(f"max_v2_length must be 0-{V2_MAX_LENGTH}, got {max_v2_length}")
        self._max_v2_length = max_v2_length
        self._buf = bytearray()
        self._header: ProxyHeader | None = None
        self._header_length = 0
        self._rest = b""
        self._error: ProxyProtocolError | None = None

    @property
    def max_v2_length(self) -> int:
        return self._max_v2_length

    @property
    def header(self) -> ProxyHeader | None:
        """The parsed header, once ``feed`` has returned it."""
        return self._header

    @property
    def header_length(self) -> int:
        """Size of the header on the wire (0 until parsed)."""
        return self._header_length

    @property
    def rest(self) -> bytes:
        """Bytes received after the header (valid once ``feed`` returned a header)."""
        return self._rest

    @property
    def buffered(self) -> int:
        """Bytes held while waiting for the rest of the header."""
        return len(self._buf)

    def feed(self, data: bytes | bytearray | memoryview) -> ProxyHeader | None:
        """Add ``data``; return the header once complete, None while more is needed.

        Raises :class:`ProxyProtocolError` for a malformed header.
        """
        if self._error is not None:
            raise self._error
        if self._header is not None:
            raise RuntimeError("HeaderParser.feed called after the header was parsed")
        if self._buf:
            self._buf += data
            buf: bytes | bytearray = self._buf
        else:
            buf = data if type(data) is bytes else bytes(data)
            if not buf:
                return None
        try:
            result = self._parse(buf)
        except ProxyProtocolError as exc:
            self._error = exc
            self._buf = bytearray()
            raise
        if result is None:
            if buf is not self._buf:
                self._buf += buf
            return None
        header, length = result
        self._header = header
        self._header_length = length
        self._rest = bytes(buf[length:])
        self._buf = bytearray()
        return header

    def eof(self) -> None:
        """The peer closed the connection: raise ``truncated`` unless a header is complete."""
        if self._error is not None:
            raise self._error
        if self._header is None:
            got = len(self._buf)
            self._error = ProxyProtocolError(
                TRUNCATED, f"connection closed after {got} byte(s) of a PROXY header"
            )
            self._buf = bytearray()
            raise self._error

    def _parse(self, buf: bytes | bytearray) -> tuple[ProxyHeader, int] | None:
        first = buf[0]
        if first == _V2_FIRST:
            total = scan_v2(buf, self._max_v2_length)
            if total is None or len(buf) < total:
                return None
            return parse_v2(bytes(buf[:total]) if type(buf) is not bytes else buf, total), total
        if first == _V1_FIRST:
            end = find_v1_end(buf)
            if end is None:
                return None
            return parse_v1(bytes(buf[:end])), end
        raise ProxyProtocolError(BAD_SIGNATURE, "not a PROXY protocol header")
