"""PROXY protocol version 1: the one-line text header.

``find_v1_end`` runs on every chunk: it checks the ``"PROXY "`` prefix as far as it has
arrived and looks for the LF within the first 107 bytes (the spec's maximum line,
CRLF included), so the parser never buffers more than that. ``parse_v1`` then decodes the
complete line, strictly:

    PROXY SP (TCP4|TCP6) SP src SP dst SP srcport SP dstport CRLF
    PROXY SP UNKNOWN [SP anything] CRLF        (the rest of an UNKNOWN line is ignored)

Exactly one space between fields, the line ends with CRLF (a bare LF is refused),
addresses valid for the named family (IPv4 canonical dotted decimal, no leading zeros),
ports decimal 0-65535 without leading zeros. Errors name the first rule broken, in this
order: line ending, characters/spacing (``bad_syntax``), protocol (``bad_family``),
addresses (``bad_address``), ports (``bad_port``).
"""

from __future__ import annotations

from enforcer.proxyproto.addr import ipv4_packed, ipv6_packed, ipv6_text
from enforcer.proxyproto.constants import V1_MAX_LENGTH, V1_PREFIX
from enforcer.proxyproto.errors import (
    BAD_ADDRESS,
    BAD_FAMILY,
    BAD_PORT,
    BAD_SIGNATURE,
    BAD_SYNTAX,
    TOO_LONG,
    ProxyProtocolError,
)
from enforcer.proxyproto.model import ProxyHeader

UNKNOWN_HEADER = ProxyHeader(1, "PROXY", "UNKNOWN", None, None, None)
_UNKNOWN = b"PROXY UNKNOWN"


def find_v1_end(buf: bytes | bytearray) -> int | None:
    """Length of the v1 line (CRLF included) at the start of ``buf``, or None if incomplete.

    Raises ``bad_signature`` as soon as the bytes stop matching ``"PROXY "`` and
    ``too_long`` once 107 bytes hold no LF.
    """
    n = len(buf)
    if n < len(V1_PREFIX):
        if V1_PREFIX[:n] != buf:
            raise ProxyProtocolError(BAD_SIGNATURE, "not a PROXY protocol header")
        return None
    if buf[: len(V1_PREFIX)] != V1_PREFIX:
        raise ProxyProtocolError(BAD_SIGNATURE, "not a PROXY protocol header")
    lf = buf.find(b"\n", 0, V1_MAX_LENGTH)
    if lf >= 0:
        return lf + 1
    if n >= V1_MAX_LENGTH:
        raise ProxyProtocolError(
            TOO_LONG, f"PROXY v1 line has no CRLF within {V1_MAX_LENGTH} bytes"
        )
    return None


def _port(text: str) -> int:
    if not (
        0 < len(text) <= 5
        and text.isdigit()
        and text.isascii()
        and (text[0] != "0" or len(text) == 1)
    ):
        raise ProxyProtocolError(BAD_PORT, f"PROXY v1 port {text!r} is not a decimal 0-65535")
    port = int(text)
    if port > 0xFFFF:
        raise ProxyProtocolError(BAD_PORT, f"PROXY v1 port {port} is above 65535")
    return port


def parse_v1(line: bytes) -> ProxyHeader:
    """Decode one complete v1 line (``line`` ends with the LF that ``find_v1_end`` found)."""
    if len(line) < 2 or line[-2] != 0x0D:
        raise ProxyProtocolError(BAD_SYNTAX, "PROXY v1 line must end with CRLF")
    body = line[:-2]
    if body.startswith(_UNKNOWN) and (len(body) == len(_UNKNOWN) or body[len(_UNKNOWN)] == 0x20):
        return UNKNOWN_HEADER
    try:
        text = body.decode("ascii")
    except UnicodeDecodeError:
        raise ProxyProtocolError(BAD_SYNTAX, "PROXY v1 line is not US-ASCII") from None
    if not text.isprintable():
        raise ProxyProtocolError(BAD_SYNTAX, "PROXY v1 line holds control characters")
    parts = text.split(" ")
    if len(parts) < 2 or not parts[1]:
        raise ProxyProtocolError(BAD_SYNTAX, "PROXY v1 line needs exactly one space per field")
    proto = parts[1]
    if proto not in ("TCP4", "TCP6"):
        raise ProxyProtocolError(
            BAD_FAMILY, f"PROXY v1 protocol {proto[:16]!r} is not TCP4, TCP6 or UNKNOWN"
        )
    if len(parts) != 6 or "" in parts:
        raise ProxyProtocolError(
            BAD_SYNTAX, "PROXY v1 line must be 'PROXY proto src dst sport dport', single spaces"
        )
    src, dst = parts[2], parts[3]
    if proto == "TCP4":
        if ipv4_packed(src) is None or ipv4_packed(dst) is None:
            raise ProxyProtocolError(
                BAD_ADDRESS, "PROXY v1 TCP4 address is not dotted-decimal IPv4"
            )
    else:
        psrc, pdst = ipv6_packed(src), ipv6_packed(dst)
        if psrc is None or pdst is None:
            raise ProxyProtocolError(BAD_ADDRESS, "PROXY v1 TCP6 address is not IPv6")
        src, dst = ipv6_text(psrc), ipv6_text(pdst)
    return ProxyHeader(1, "PROXY", proto, "STREAM", (src, _port(parts[4])), (dst, _port(parts[5])))
