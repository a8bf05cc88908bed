"""PROXY protocol version 2: the binary header.

Layout: 12-byte signature, ver_cmd (version 2 in the high nibble, LOCAL=0/PROXY=1 in the
low one), fam (address family high nibble, transport low nibble), a big-endian uint16
length, then exactly ``length`` bytes: the address block followed by TLVs.

``scan_v2`` runs on every chunk and checks the fixed 16 bytes in wire order as far as they
have arrived (signature, version, command, family, length against the configured limit
and the family's address block size), so a bad header fails on the byte that makes it bad
and the parser never waits for a body it would refuse. Once the fixed part is complete it
returns the total header size. ``parse_v2`` decodes the complete header:

- LOCAL: the whole block (family included) is skipped, per spec; the connection's own
  addresses apply. TLVs of a LOCAL header are not read (HAProxy does the same).
- PROXY with AF_UNSPEC (fam 0x00): addresses unknown, the block is skipped.
- PROXY with 0x11/0x12 (IPv4), 0x21/0x22 (IPv6), 0x31/0x32 (UNIX): addresses decoded with
  ``struct``, then TLVs (tlv.py), then PP2_TYPE_CRC32C verified over the whole header with
  its value zeroed. Any other fam byte is refused (``bad_family``).
"""

from __future__ import annotations

import struct

from enforcer.proxyproto import constants as c
from enforcer.proxyproto.addr import ipv4_text, ipv6_text, unix_text
from enforcer.proxyproto.crc32c import crc32c
from enforcer.proxyproto.errors import (
    BAD_ADDRESS,
    BAD_COMMAND,
    BAD_CRC,
    BAD_FAMILY,
    BAD_SIGNATURE,
    BAD_VERSION,
    TOO_LONG,
    ProxyProtocolError,
)
from enforcer.proxyproto.model import ProxyHeader
from enforcer.proxyproto.tlv import Tlv, parse_tlvs

_SIG = c.V2_SIGNATURE
_SIG_LEN = len(_SIG)
_FIXED = c.V2_FIXED_LENGTH
_IPV4 = struct.Struct("!4s4sHH")
_IPV6 = struct.Struct("!16s16sHH")
_UNIX = struct.Struct("!108s108s")
_U32 = struct.Struct("!I")

# fam byte -> (family name, transport name, address block length)
FAMILIES: dict[int, tuple[str, str | None, int]] = {
    0x00: ("UNSPEC", None, 0),
    0x11: ("TCP4", "STREAM", c.ADDRESS_LENGTH_INET),
    0x12: ("TCP4", "DGRAM", c.ADDRESS_LENGTH_INET),
    0x21: ("TCP6", "STREAM", c.ADDRESS_LENGTH_INET6),
    0x22: ("TCP6", "DGRAM", c.ADDRESS_LENGTH_INET6),
    0x31: ("UNIX", "STREAM", c.ADDRESS_LENGTH_UNIX),
    0x32: ("UNIX", "DGRAM", c.ADDRESS_LENGTH_UNIX),
}

LOCAL_HEADER = ProxyHeader(2, "LOCAL", "UNSPEC", None, None, None)
_UNSPEC_HEADER = ProxyHeader(2, "PROXY", "UNSPEC", None, None, None)


def scan_v2(buf: bytes | bytearray, max_length: int) -> int | None:
    """Check what has arrived of the fixed part; return the total header size once known."""
    n = len(buf)
    if n < _SIG_LEN:
        if _SIG[:n] != buf:
            raise ProxyProtocolError(BAD_SIGNATURE, "not a PROXY protocol header")
        return None
    if buf[:_SIG_LEN] != _SIG:
        raise ProxyProtocolError(BAD_SIGNATURE, "not a PROXY protocol header")
    if n <= _SIG_LEN:
        return None
    ver_cmd = buf[12]
    if ver_cmd >> 4 != c.V2_VERSION:
        raise ProxyProtocolError(
            BAD_VERSION, f"PROXY v2 header has version {ver_cmd >> 4}, only 2 is defined"
        )
    cmd = ver_cmd & 0x0F
    if cmd > c.CMD_PROXY:
        raise ProxyProtocolError(BAD_COMMAND, f"PROXY v2 command 0x{cmd:x} is not LOCAL or PROXY")
    if n < 14:
        return None
    fam = buf[13]
    family = None
    if cmd == c.CMD_PROXY:
        family = FAMILIES.get(fam)
        if family is None:
            raise ProxyProtocolError(
                BAD_FAMILY, f"PROXY v2 address family/transport byte 0x{fam:02x} is not defined"
            )
    if n < _FIXED:
        return None
    length = buf[14] << 8 | buf[15]
    if length > max_length:
        raise ProxyProtocolError(
            TOO_LONG, f"PROXY v2 header announces {length} bytes, the limit is {max_length}"
        )
    if family is not None and length < family[2]:
        raise ProxyProtocolError(
            BAD_ADDRESS,
            f"PROXY v2 {family[0]} address block needs {family[2]} bytes, length is {length}",
        )
    return _FIXED + length


def parse_v2(buf: bytes, total: int) -> ProxyHeader:
    """Decode the complete header ``buf[:total]`` (``scan_v2`` has checked the fixed part)."""
    if buf[12] & 0x0F == c.CMD_LOCAL:
        return LOCAL_HEADER
    fam = buf[13]
    if fam == 0x00:
        return _UNSPEC_HEADER
    family, transport, size = FAMILIES[fam]
    source: tuple[str, int]
    destination: tuple[str, int]
    if family == "TCP4":
        s, d, sp, dp = _IPV4.unpack_from(buf, _FIXED)
        source, destination = (ipv4_text(s), sp), (ipv4_text(d), dp)
    elif family == "TCP6":
        s, d, sp, dp = _IPV6.unpack_from(buf, _FIXED)
        source, destination = (ipv6_text(s), sp), (ipv6_text(d), dp)
    else:
        s, d = _UNIX.unpack_from(buf, _FIXED)
        source, destination = (unix_text(s), 0), (unix_text(d), 0)
    start = _FIXED + size
    tlvs: tuple[Tlv, ...] = ()
    if start < total:
        tlvs, crc_offset = parse_tlvs(buf, start, total)
        if crc_offset >= 0:
            _check_crc(buf, total, crc_offset)
    return ProxyHeader(2, "PROXY", family, transport, source, destination, tlvs)


def _check_crc(buf: bytes, total: int, offset: int) -> None:
    (expected,) = _U32.unpack_from(buf, offset)
    actual = crc32c(b"".join((buf[:offset], b"\x00\x00\x00\x00", buf[offset + 4 : total])))
    if actual != expected:
        raise ProxyProtocolError(
            BAD_CRC, f"PROXY v2 CRC32C is 0x{expected:08x}, the header sums to 0x{actual:08x}"
        )
