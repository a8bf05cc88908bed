"""Wire constants of the PROXY protocol (HAProxy doc/proxy-protocol.txt) and enforcer's own.

Names follow the specification (PP2_TYPE_*, PP2_SUBTYPE_*, PP2_CLIENT_*) so they can be
grepped against it. The cloud TLVs live in the spec's custom range 0xE0-0xEF:
AWS (0xEA, subtype 0x01 VPC endpoint id), Azure (0xEE, subtype 0x01 private link id,
uint32 little-endian), GCP (0xE0, Private Service Connect id, uint64 big-endian, no
subtype), and enforcer's PP2_TYPE_ENFORCER_IDENTITY (0xE4, subtype 0x01, the UTF-8 SPIFFE
ID of the verified peer).
"""

from __future__ import annotations

# --- version 1 (text)
V1_PREFIX = b"PROXY "
V1_MAX_LENGTH = 107  # worst case "PROXY UNKNOWN <ipv6> <ipv6> 65535 65535\r\n", CRLF included

# --- version 2 (binary)
V2_SIGNATURE = b"\r\n\r\n\x00\r\nQUIT\n"  # 0D 0A 0D 0A 00 0D 0A 51 55 49 54 0A
V2_FIXED_LENGTH = 16  # signature, ver_cmd, fam, len
V2_VERSION = 0x2
V2_MAX_LENGTH = 0xFFFF  # the length field is 16 bits
# Default cap on the v2 length field (bytes after the 16-byte fixed part). Enough for a
# UNIX address block (216) plus SSL, authority, unique-id and cloud TLVs with room to
# spare, while one header can never pin more than 4112 bytes per connection.
DEFAULT_MAX_V2_LENGTH = 4096

CMD_LOCAL = 0x0
CMD_PROXY = 0x1

AF_UNSPEC = 0x0
AF_INET = 0x1
AF_INET6 = 0x2
AF_UNIX = 0x3

TRANSPORT_UNSPEC = 0x0
TRANSPORT_STREAM = 0x1
TRANSPORT_DGRAM = 0x2

ADDRESS_LENGTH_INET = 12  # 2 * 4 + 2 * 2
ADDRESS_LENGTH_INET6 = 36  # 2 * 16 + 2 * 2
ADDRESS_LENGTH_UNIX = 216  # 2 * 108
UNIX_PATH_LENGTH = 108

# --- TLV types (section 2.2)
PP2_TYPE_ALPN = 0x01
PP2_TYPE_AUTHORITY = 0x02
PP2_TYPE_CRC32C = 0x03
PP2_TYPE_NOOP = 0x04
PP2_TYPE_UNIQUE_ID = 0x05
PP2_TYPE_SSL = 0x20
PP2_SUBTYPE_SSL_VERSION = 0x21
PP2_SUBTYPE_SSL_CN = 0x22
PP2_SUBTYPE_SSL_CIPHER = 0x23
PP2_SUBTYPE_SSL_SIG_ALG = 0x24
PP2_SUBTYPE_SSL_KEY_ALG = 0x25
PP2_TYPE_NETNS = 0x30

PP2_TYPE_MIN_CUSTOM = 0xE0
PP2_TYPE_MAX_CUSTOM = 0xEF
PP2_TYPE_MIN_EXPERIMENT = 0xF0
PP2_TYPE_MAX_EXPERIMENT = 0xF7
PP2_TYPE_MIN_FUTURE = 0xF8
PP2_TYPE_MAX_FUTURE = 0xFF

# client field of PP2_TYPE_SSL
PP2_CLIENT_SSL = 0x01
PP2_CLIENT_CERT_CONN = 0x02
PP2_CLIENT_CERT_SESS = 0x04

MAX_UNIQUE_ID_LENGTH = 128

# --- cloud load balancers (custom range)
PP2_TYPE_GCP = 0xE0  # value: PSC connection id, uint64 big-endian (exactly 8 bytes)
PP2_TYPE_AWS = 0xEA
PP2_SUBTYPE_AWS_VPCE_ID = 0x01  # value: US-ASCII VPC endpoint id, e.g. "vpce-0abc..."
PP2_TYPE_AZURE = 0xEE
PP2_SUBTYPE_AZURE_PRIVATEENDPOINT_LINKID = 0x01  # value: uint32 little-endian

# --- enforcer (custom range)
PP2_TYPE_ENFORCER_IDENTITY = 0xE4
PP2_SUBTYPE_ENFORCER_SPIFFE_ID = 0x01  # value: UTF-8 URI, e.g. "spiffe://td/ns/x/sa/y"
