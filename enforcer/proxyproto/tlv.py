"""TLVs of PROXY v2: the value types, their decoders, and the validating TLV-list parser.

A TLV is one type byte, a 16-bit big-endian length and that many value bytes. The parser
walks the bytes between the end of the address block and the end of the header with
``struct.unpack_from`` on the receive buffer, keeps every TLV (known or not) as a raw
:class:`Tlv` in order, and checks the known ones strictly so that what the typed accessors
of ``ProxyHeader`` later decode is already known to be valid:

- a TLV (or an SSL sub-TLV) that runs past its container is ``tlv_overrun``;
- a registered TLV (or enforcer's identity TLV) with a wrong size or encoding, a
  UNIQUE_ID above 128 bytes, or a second copy of a single-valued TLV (ALPN, AUTHORITY,
  CRC32C, UNIQUE_ID, SSL, NETNS, GCP, AWS VPC endpoint, Azure link id, identity) is
  ``bad_tlv``: two different answers to "who is this?" must never reach policy;
- the cloud TLVs live in the shared custom range 0xE0-0xEF, so a value without the cloud
  format (say a 0xE0 that is not 8 bytes) is somebody else's TLV: kept raw, untyped;
- NOOP and unknown types (including other subtypes) are kept raw.

The decoders (``decode_*``) raise :class:`ProxyProtocolError`; the parser calls them to
validate, the accessors call them to read.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

from enforcer.proxyproto import constants as c
from enforcer.proxyproto.errors import BAD_TLV, TLV_OVERRUN, ProxyProtocolError

_TL = struct.Struct("!BH")
_SSL_HEAD = struct.Struct("!BI")
_U64_BE = struct.Struct("!Q")
_U32_LE = struct.Struct("<I")


@dataclass(frozen=True, slots=True)
class Tlv:
    """One TLV as found on the wire: ``type`` 0-255, ``value`` up to 65535 bytes."""

    type: int
    value: bytes


@dataclass(frozen=True, slots=True)
class SslInfo:
    """The decoded PP2_TYPE_SSL TLV: how the client connected to the sender."""

    client_flags: int
    verify: int
    version: str | None = None
    cn: str | None = None
    cipher: str | None = None
    sig_alg: str | None = None
    key_alg: str | None = None

    @property
    def ssl(self) -> bool:
        """The client connected over SSL/TLS (PP2_CLIENT_SSL)."""
        return bool(self.client_flags & c.PP2_CLIENT_SSL)

    @property
    def client_cert_presented(self) -> bool:
        """A client certificate was presented on this connection or its TLS session."""
        return bool(self.client_flags & (c.PP2_CLIENT_CERT_CONN | c.PP2_CLIENT_CERT_SESS))

    @property
    def verified(self) -> bool:
        """A client certificate was presented and verified (the spec's ``verify == 0``)."""
        return self.client_cert_presented and self.verify == 0


def _bad(message: str) -> ProxyProtocolError:
    return ProxyProtocolError(BAD_TLV, message)


def decode_ascii(value: bytes, what: str) -> str:
    try:
        return value.decode("ascii")
    except UnicodeDecodeError:
        raise _bad(f"{what} is not US-ASCII") from None


def decode_utf8(value: bytes, what: str) -> str:
    try:
        return value.decode("utf-8")
    except UnicodeDecodeError:
        raise _bad(f"{what} is not UTF-8") from None


_SSL_TEXT = {
    c.PP2_SUBTYPE_SSL_VERSION: ("version", True),
    c.PP2_SUBTYPE_SSL_CN: ("cn", False),
    c.PP2_SUBTYPE_SSL_CIPHER: ("cipher", True),
    c.PP2_SUBTYPE_SSL_SIG_ALG: ("sig_alg", True),
    c.PP2_SUBTYPE_SSL_KEY_ALG: ("key_alg", True),
}


def decode_ssl(value: bytes) -> SslInfo:
    """Decode PP2_TYPE_SSL: client flags byte, verify uint32, then sub-TLVs."""
    if len(value) < _SSL_HEAD.size:
        raise _bad(f"SSL TLV is {len(value)} bytes, needs at least {_SSL_HEAD.size}")
    client, verify = _SSL_HEAD.unpack_from(value, 0)
    fields: dict[str, str] = {}
    off, end = _SSL_HEAD.size, len(value)
    while off < end:
        if off + _TL.size > end:
            raise ProxyProtocolError(TLV_OVERRUN, "SSL sub-TLV header runs past the SSL TLV")
        sub, length = _TL.unpack_from(value, off)
        start = off + _TL.size
        off = start + length
        if off > end:
            raise ProxyProtocolError(
                TLV_OVERRUN, f"SSL sub-TLV 0x{sub:02x} of {length} bytes runs past the SSL TLV"
            )
        known = _SSL_TEXT.get(sub)
        if known is None:
            continue  # unknown sub-TLVs are allowed; the raw SSL TLV keeps them
        name, ascii_only = known
        if name in fields:
            raise _bad(f"SSL sub-TLV {name} appears twice")
        raw = value[start:off]
        what = f"SSL {name}"
        fields[name] = decode_ascii(raw, what) if ascii_only else decode_utf8(raw, what)
    return SslInfo(client_flags=client, verify=verify, **fields)


def decode_subtyped_text(value: bytes, what: str, *, ascii_only: bool) -> str:
    """Value after its subtype byte, as text."""
    raw = value[1:]
    if not raw:
        raise _bad(f"{what} is empty")
    return decode_ascii(raw, what) if ascii_only else decode_utf8(raw, what)


def decode_azure_link_id(value: bytes) -> int:
    if len(value) != 1 + _U32_LE.size:
        raise _bad(f"Azure link id TLV is {len(value)} bytes, expected 5")
    (link_id,) = _U32_LE.unpack_from(value, 1)
    return int(link_id)


def decode_gcp_psc_id(value: bytes) -> int:
    if len(value) != _U64_BE.size:
        raise _bad(f"GCP PSC connection id TLV is {len(value)} bytes, expected 8")
    (psc_id,) = _U64_BE.unpack_from(value, 0)
    return int(psc_id)


_AWS_VPCE = c.PP2_TYPE_AWS << 8 | c.PP2_SUBTYPE_AWS_VPCE_ID
_AZURE_LINK = c.PP2_TYPE_AZURE << 8 | c.PP2_SUBTYPE_AZURE_PRIVATEENDPOINT_LINKID
_IDENTITY = c.PP2_TYPE_ENFORCER_IDENTITY << 8 | c.PP2_SUBTYPE_ENFORCER_SPIFFE_ID


def _validate(t: int, value: bytes) -> int:
    """Check one TLV's value; return its uniqueness key, or -1 if it may repeat.

    Registered types and enforcer's identity are strict (ProxyProtocolError). The cloud
    types sit in the shared custom range, where another application may use the same
    number for something else: a value that does not have the cloud format is kept raw
    (untyped) instead of failing the connection.
    """
    if t == c.PP2_TYPE_ALPN:
        return t  # opaque bytes
    if t == c.PP2_TYPE_AUTHORITY:
        decode_utf8(value, "AUTHORITY")
        return t
    if t == c.PP2_TYPE_CRC32C:
        if len(value) != 4:
            raise _bad(f"CRC32C TLV is {len(value)} bytes, expected 4")
        return t
    if t == c.PP2_TYPE_UNIQUE_ID:
        if len(value) > c.MAX_UNIQUE_ID_LENGTH:
            raise _bad(f"UNIQUE_ID TLV is {len(value)} bytes, at most 128 allowed")
        return t
    if t == c.PP2_TYPE_SSL:
        decode_ssl(value)
        return t
    if t == c.PP2_TYPE_NETNS:
        decode_ascii(value, "NETNS")
        return t
    if t == c.PP2_TYPE_ENFORCER_IDENTITY:
        if not value:
            raise _bad("enforcer identity TLV has no subtype byte")
        if value[0] != c.PP2_SUBTYPE_ENFORCER_SPIFFE_ID:
            return -1  # reserved subtypes: kept raw
        decode_subtyped_text(value, "enforcer identity", ascii_only=False)
        return _IDENTITY
    if t == c.PP2_TYPE_GCP:
        return t if len(value) == _U64_BE.size else -1
    if t == c.PP2_TYPE_AWS:
        ok = len(value) > 1 and value[0] == c.PP2_SUBTYPE_AWS_VPCE_ID and value.isascii()
        return _AWS_VPCE if ok else -1
    if t == c.PP2_TYPE_AZURE:
        ok = len(value) == 5 and value[0] == c.PP2_SUBTYPE_AZURE_PRIVATEENDPOINT_LINKID
        return _AZURE_LINK if ok else -1
    return -1  # NOOP and unknown types: kept raw, may repeat


def parse_tlvs(buf: bytes, start: int, end: int) -> tuple[tuple[Tlv, ...], int]:
    """Parse and validate the TLVs in ``buf[start:end]``.

    Returns the TLVs in wire order and the offset in ``buf`` of the CRC32C value (-1 when
    there is none) so the caller can verify it over the whole header.
    """
    tlvs: list[Tlv] = []
    seen: set[int] = set()
    crc_offset = -1
    off = start
    unpack = _TL.unpack_from
    while off < end:
        if off + 3 > end:
            raise ProxyProtocolError(
                TLV_OVERRUN, f"{end - off} trailing byte(s) after the TLVs: not a whole TLV"
            )
        t, length = unpack(buf, off)
        vstart = off + 3
        off = vstart + length
        if off > end:
            raise ProxyProtocolError(
                TLV_OVERRUN,
                f"TLV 0x{t:02x} of {length} bytes runs {off - end} byte(s) past the header",
            )
        value = bytes(buf[vstart:off])
        key = _validate(t, value)
        if key >= 0:
            if key in seen:
                raise _bad(f"TLV 0x{t:02x} appears twice")
            seen.add(key)
            if t == c.PP2_TYPE_CRC32C:
                crc_offset = vstart
        tlvs.append(Tlv(t, value))
    return tuple(tlvs), crc_offset
