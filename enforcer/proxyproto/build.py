"""Building headers (for ``proxy_protocol.send``) and the TLVs enforcer sends.

The family is chosen from the addresses: IPv4 text -> TCP4 / AF_INET, IPv6 text -> TCP6 /
AF_INET6, a path starting with ``/`` (or ``@`` for a Linux abstract socket) -> AF_UNIX
(v2 only). When one side is IPv4 and the other IPv6 the IPv4 one is written as
IPv4-mapped IPv6 (``::ffff:a.b.c.d``), as HAProxy does. A missing address (None) gives
``PROXY UNKNOWN`` in v1 and AF_UNSPEC in v2. Bad input raises ``ValueError`` (a bug in
the caller, not a protocol error). With ``crc32c=True`` a PP2_TYPE_CRC32C TLV is put
first and filled in over the finished header.
"""

from __future__ import annotations

import struct
from collections.abc import Sequence

from enforcer.proxyproto import constants as c
from enforcer.proxyproto.addr import ipv4_packed, ipv6_packed, ipv6_text, unix_packed
from enforcer.proxyproto.crc32c import crc32c as _crc32c
from enforcer.proxyproto.tlv import Tlv

Address = tuple[str, int]

_TL = struct.Struct("!BH")
_PORTS = struct.Struct("!HH")
_U32 = struct.Struct("!I")

_INET, _INET6, _UNIX = "inet", "inet6", "unix"
_TRANSPORTS = {"STREAM": c.TRANSPORT_STREAM, "DGRAM": c.TRANSPORT_DGRAM}
_FAMILY_NIBBLE = {_INET: c.AF_INET, _INET6: c.AF_INET6, _UNIX: c.AF_UNIX}


def _port(port: int) -> int:
    if isinstance(port, bool) or not isinstance(port, int) or not 0 <= port <= 0xFFFF:
        raise ValueError(f"port must be an int 0-65535, got {port!r}")
    return port


def _classify(host: str) -> tuple[str, bytes]:
    if not isinstance(host, str):
        raise ValueError(f"address must be a str, got {host!r}")
    packed = ipv4_packed(host)
    if packed is not None:
        return _INET, packed
    packed = ipv6_packed(host)
    if packed is not None:
        return _INET6, packed
    if host.startswith("/") or (host.startswith("@") and len(host) > 1):
        return _UNIX, unix_packed(host)
    raise ValueError(f"{host!r} is neither an IP address nor a UNIX socket path")


def _endpoints(source: Address, destination: Address) -> tuple[str, bytes, bytes]:
    sfam, spacked = _classify(source[0])
    dfam, dpacked = _classify(destination[0])
    if sfam != dfam:
        if _UNIX in (sfam, dfam):
            raise ValueError("cannot mix a UNIX path with an IP address in one header")
        if sfam == _INET:
            spacked = b"\x00" * 10 + b"\xff\xff" + spacked
        else:
            dpacked = b"\x00" * 10 + b"\xff\xff" + dpacked
        sfam = dfam = _INET6
    return sfam, spacked, dpacked


def build_v1(source: Address | None, destination: Address | None) -> bytes:
    """A v1 line; ``PROXY UNKNOWN`` when either address is None."""
    if source is None or destination is None:
        return b"PROXY UNKNOWN\r\n"
    fam, spacked, dpacked = _endpoints(source, destination)
    sport, dport = _port(source[1]), _port(destination[1])
    if fam == _UNIX:
        raise ValueError("PROXY v1 cannot carry UNIX socket addresses")
    if fam == _INET:
        proto, src, dst = "TCP4", source[0], destination[0]
    else:
        proto, src, dst = "TCP6", ipv6_text(spacked), ipv6_text(dpacked)
    return f"PROXY {proto} {src} {dst} {sport} {dport}\r\n".encode("ascii")


def encode_tlv(tlv: Tlv) -> bytes:
    if not 0 <= tlv.type <= 0xFF:
        raise ValueError(f"TLV type must be 0-255, got {tlv.type}")
    if len(tlv.value) > 0xFFFF:
        raise ValueError(f"TLV 0x{tlv.type:02x} value is {len(tlv.value)} bytes, max 65535")
    return _TL.pack(tlv.type, len(tlv.value)) + bytes(tlv.value)


def build_v2(
    source: Address | None,
    destination: Address | None,
    *,
    command: str = "PROXY",
    tlvs: Sequence[Tlv] = (),
    crc32c: bool = False,
    transport: str = "STREAM",
) -> bytes:
    """A v2 header. ``command`` is "PROXY" or "LOCAL" (health checks: addresses usually None).

    Either address None -> AF_UNSPEC with no address block. ``transport`` is "STREAM" or
    "DGRAM". ``crc32c`` adds a verified-by-receivers PP2_TYPE_CRC32C TLV.
    """
    if command == "PROXY":
        ver_cmd = c.V2_VERSION << 4 | c.CMD_PROXY
    elif command == "LOCAL":
        ver_cmd = c.V2_VERSION << 4 | c.CMD_LOCAL
    else:
        raise ValueError(f"command must be 'PROXY' or 'LOCAL', got {command!r}")
    tnibble = _TRANSPORTS.get(transport)
    if tnibble is None:
        raise ValueError(f"transport must be 'STREAM' or 'DGRAM', got {transport!r}")
    if source is None or destination is None:
        fam, block = 0x00, b""
    else:
        family, spacked, dpacked = _endpoints(source, destination)
        sport, dport = _port(source[1]), _port(destination[1])
        fam = _FAMILY_NIBBLE[family] << 4 | tnibble
        block = spacked + dpacked + (b"" if family == _UNIX else _PORTS.pack(sport, dport))
    parts = [block]
    crc_at = -1
    if crc32c:
        if any(t.type == c.PP2_TYPE_CRC32C for t in tlvs):
            raise ValueError("crc32c=True and a CRC32C TLV given: pass only one")
        crc_at = c.V2_FIXED_LENGTH + len(block) + _TL.size
        parts.append(_TL.pack(c.PP2_TYPE_CRC32C, 4) + b"\x00\x00\x00\x00")
    parts.extend(encode_tlv(t) for t in tlvs)
    body = b"".join(parts)
    if len(body) > c.V2_MAX_LENGTH:
        raise ValueError(f"PROXY v2 header body is {len(body)} bytes, max 65535")
    header = c.V2_SIGNATURE + bytes((ver_cmd, fam)) + len(body).to_bytes(2, "big") + body
    if crc_at < 0:
        return header
    checksum = _crc32c(header)
    return header[:crc_at] + _U32.pack(checksum) + header[crc_at + 4 :]


# ---------------------------------------------------------------------------- TLVs
def ssl_tlv(
    *,
    version: str | None,
    cipher: str | None,
    cn: str | None,
    sig_alg: str | None = None,
    key_alg: str | None = None,
    client_cert_presented: bool,
    verified: bool,
    session_resumed: bool = False,
) -> Tlv:
    """PP2_TYPE_SSL for a client that connected over TLS.

    Client flags: PP2_CLIENT_SSL always; with a client certificate PP2_CLIENT_CERT_SESS and,
    unless the session was resumed, PP2_CLIENT_CERT_CONN. ``verify`` is 0 exactly when a
    certificate was presented and verified (the spec's rule), else 1. Sub-TLVs appear in
    the order VERSION, CN, CIPHER, SIG_ALG, KEY_ALG, each only when not None.
    """
    if verified and not client_cert_presented:
        raise ValueError("verified=True needs client_cert_presented=True")
    flags = c.PP2_CLIENT_SSL
    if client_cert_presented:
        flags |= c.PP2_CLIENT_CERT_SESS
        if not session_resumed:
            flags |= c.PP2_CLIENT_CERT_CONN
    value = bytearray(struct.pack("!BI", flags, 0 if verified else 1))
    subs = (
        (c.PP2_SUBTYPE_SSL_VERSION, version, "ascii"),
        (c.PP2_SUBTYPE_SSL_CN, cn, "utf-8"),
        (c.PP2_SUBTYPE_SSL_CIPHER, cipher, "ascii"),
        (c.PP2_SUBTYPE_SSL_SIG_ALG, sig_alg, "ascii"),
        (c.PP2_SUBTYPE_SSL_KEY_ALG, key_alg, "ascii"),
    )
    for sub, text, encoding in subs:
        if text is not None:
            value += encode_tlv(Tlv(sub, text.encode(encoding)))
    return Tlv(c.PP2_TYPE_SSL, bytes(value))


def identity_tlv(spiffe_id: str) -> Tlv:
    """PP2_TYPE_ENFORCER_IDENTITY (0xE4), subtype 0x01, the UTF-8 SPIFFE ID."""
    if not spiffe_id:
        raise ValueError("identity must not be empty")
    return Tlv(
        c.PP2_TYPE_ENFORCER_IDENTITY,
        bytes((c.PP2_SUBTYPE_ENFORCER_SPIFFE_ID,)) + spiffe_id.encode("utf-8"),
    )


def authority_tlv(name: str) -> Tlv:
    """PP2_TYPE_AUTHORITY: the host name (SNI) the client asked for, UTF-8."""
    if not name:
        raise ValueError("authority must not be empty")
    return Tlv(c.PP2_TYPE_AUTHORITY, name.encode("utf-8"))


def alpn_tlv(proto: bytes) -> Tlv:
    """PP2_TYPE_ALPN: the negotiated application protocol, e.g. b"h2"."""
    if not proto:
        raise ValueError("ALPN protocol must not be empty")
    return Tlv(c.PP2_TYPE_ALPN, bytes(proto))


def unique_id_tlv(b: bytes | str) -> Tlv:
    """PP2_TYPE_UNIQUE_ID: opaque, at most 128 bytes (a str is encoded as UTF-8)."""
    value = b.encode("utf-8") if isinstance(b, str) else bytes(b)
    if len(value) > c.MAX_UNIQUE_ID_LENGTH:
        raise ValueError(f"unique id is {len(value)} bytes, at most 128 allowed")
    return Tlv(c.PP2_TYPE_UNIQUE_ID, value)


def netns_tlv(name: str) -> Tlv:
    """PP2_TYPE_NETNS: a network namespace name, US-ASCII."""
    return Tlv(c.PP2_TYPE_NETNS, name.encode("ascii"))


def noop_tlv(padding: int = 0) -> Tlv:
    """PP2_TYPE_NOOP with ``padding`` zero bytes."""
    return Tlv(c.PP2_TYPE_NOOP, bytes(padding))


def aws_vpce_tlv(vpce_id: str) -> Tlv:
    """AWS (0xEA) subtype 0x01: the VPC endpoint id, as an AWS NLB sends it."""
    if not vpce_id:
        raise ValueError("VPC endpoint id must not be empty")
    return Tlv(c.PP2_TYPE_AWS, bytes((c.PP2_SUBTYPE_AWS_VPCE_ID,)) + vpce_id.encode("ascii"))


def azure_link_tlv(link_id: int) -> Tlv:
    """Azure (0xEE) subtype 0x01: the private endpoint link id, uint32 little-endian."""
    if not 0 <= link_id <= 0xFFFFFFFF:
        raise ValueError(f"link id must be a uint32, got {link_id}")
    sub = bytes((c.PP2_SUBTYPE_AZURE_PRIVATEENDPOINT_LINKID,))
    return Tlv(c.PP2_TYPE_AZURE, sub + link_id.to_bytes(4, "little"))


def gcp_psc_tlv(psc_id: int) -> Tlv:
    """GCP (0xE0): the Private Service Connect connection id, uint64 big-endian."""
    if not 0 <= psc_id <= 0xFFFFFFFFFFFFFFFF:
        raise ValueError(f"PSC connection id must be a uint64, got {psc_id}")
    return Tlv(c.PP2_TYPE_GCP, psc_id.to_bytes(8, "big"))
