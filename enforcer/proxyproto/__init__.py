"""PROXY protocol v1 and v2, parsed and built without I/O (HAProxy doc/proxy-protocol.txt).

Bytes in, headers out: the data plane feeds what it reads into :class:`HeaderParser`,
gets a :class:`ProxyHeader` (or None: need more bytes), and hands ``parser.rest`` on as
the first application bytes. Every malformed header raises :class:`ProxyProtocolError`
whose ``reason`` (see ``errors.REASONS``) labels ``enforcer_proxy_protocol_errors_total``.
``sniff`` decides ``accept: optional`` from the exact signature prefixes. ``build_v1`` /
``build_v2`` and the ``*_tlv`` helpers produce what ``proxy_protocol.send`` emits.

Supported: v1 TCP4/TCP6/UNKNOWN (107-byte line limit, strict syntax); v2 LOCAL/PROXY,
UNSPEC/INET/INET6/UNIX over STREAM/DGRAM; TLVs ALPN, AUTHORITY, CRC32C (verified), NOOP,
UNIQUE_ID (<= 128 bytes), SSL with VERSION/CN/CIPHER/SIG_ALG/KEY_ALG, NETNS, and the cloud
TLVs AWS 0xEA/0x01 (VPC endpoint id), Azure 0xEE/0x01 (link id), GCP 0xE0 (PSC id).
Unknown TLVs are kept raw.

Enforcer's own TLV, PP2_TYPE_ENFORCER_IDENTITY = 0xE4 (in the spec's custom range
0xE0-0xEF, which "will never be used by the PROXY protocol"): the value is one subtype
byte, 0x01 (PP2_SUBTYPE_ENFORCER_SPIFFE_ID), followed by the UTF-8 URI of the peer
identity that the sending enforcer verified with mutual TLS, e.g.
``E4 00 2D 01 "spiffe://cluster.local/ns/shop/sa/frontend"``. A receiver may only
believe it from a trusted source, like the rest of the header. Other subtypes are
reserved and kept raw.

Module map: errors (error type, reasons), constants (wire values), crc32c (table-driven
CRC32C), addr (address text <-> bytes), tlv (Tlv, SslInfo, TLV parsing), model
(ProxyHeader), v1 / v2 (the two formats), parser (HeaderParser, sniff), build (builders).
"""

from enforcer.proxyproto.build import (
    alpn_tlv,
    authority_tlv,
    aws_vpce_tlv,
    azure_link_tlv,
    build_v1,
    build_v2,
    gcp_psc_tlv,
    identity_tlv,
    netns_tlv,
    noop_tlv,
    ssl_tlv,
    unique_id_tlv,
)
from enforcer.proxyproto.constants import (
    DEFAULT_MAX_V2_LENGTH,
    PP2_SUBTYPE_ENFORCER_SPIFFE_ID,
    PP2_TYPE_ENFORCER_IDENTITY,
    V1_MAX_LENGTH,
    V2_SIGNATURE,
)
from enforcer.proxyproto.errors import REASONS, ProxyProtocolError
from enforcer.proxyproto.model import ProxyHeader
from enforcer.proxyproto.parser import HeaderParser, sniff
from enforcer.proxyproto.tlv import SslInfo, Tlv

__all__ = [
    "DEFAULT_MAX_V2_LENGTH",
    "PP2_SUBTYPE_ENFORCER_SPIFFE_ID",
    "PP2_TYPE_ENFORCER_IDENTITY",
    "REASONS",
    "V1_MAX_LENGTH",
    "V2_SIGNATURE",
    "HeaderParser",
    "ProxyHeader",
    "ProxyProtocolError",
    "SslInfo",
    "Tlv",
    "alpn_tlv",
    "authority_tlv",
    "aws_vpce_tlv",
    "azure_link_tlv",
    "build_v1",
    "build_v2",
    "gcp_psc_tlv",
    "identity_tlv",
    "netns_tlv",
    "noop_tlv",
    "sniff",
    "ssl_tlv",
    "unique_id_tlv",
]
