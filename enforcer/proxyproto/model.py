"""ProxyHeader: what one PROXY protocol header (v1 or v2) said, as an immutable value.

The fields mirror the header; ``tlvs`` keeps every v2 TLV raw and in wire order. The
typed accessors (``alpn``, ``authority``, ``ssl``, ``aws_vpce_id``...) decode, on each
call, the first TLV of their type that has the expected format. :class:`HeaderParser` has
validated every registered TLV already (and refused duplicates), so on parsed headers they
are exact; on a hand-built header an invalid value reads as ``None``, never an exception. ``tlvs_for_record`` and ``tlvs_for_policy``
are the two views the data plane needs: a JSON-able dict for the flow record (cloud TLVs by
name, unknown ones as ``"0x99": "<hex>"``) and a flat str->str dict for rules.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeVar

from enforcer.proxyproto import constants as c
from enforcer.proxyproto.errors import BAD_TLV, ProxyProtocolError
from enforcer.proxyproto.tlv import (
    SslInfo,
    Tlv,
    decode_ascii,
    decode_azure_link_id,
    decode_gcp_psc_id,
    decode_ssl,
    decode_subtyped_text,
    decode_utf8,
)

T = TypeVar("T")


def _try(fn: Callable[[bytes], T], value: bytes) -> T | None:
    try:
        return fn(value)
    except ProxyProtocolError:
        return None


def _aws(v: bytes) -> str:
    if v[:1] != bytes((c.PP2_SUBTYPE_AWS_VPCE_ID,)):
        raise ProxyProtocolError(BAD_TLV, "not the VPC endpoint id subtype")
    return decode_subtyped_text(v, "AWS VPC endpoint id", ascii_only=True)


def _azure(v: bytes) -> int:
    if v[:1] != bytes((c.PP2_SUBTYPE_AZURE_PRIVATEENDPOINT_LINKID,)):
        raise ProxyProtocolError(BAD_TLV, "not the private endpoint link id subtype")
    return decode_azure_link_id(v)


def _identity(v: bytes) -> str:
    if v[:1] != bytes((c.PP2_SUBTYPE_ENFORCER_SPIFFE_ID,)):
        raise ProxyProtocolError(BAD_TLV, "not the SPIFFE ID subtype")
    return decode_subtyped_text(v, "enforcer identity", ascii_only=False)


def _authority(v: bytes) -> str:
    return decode_utf8(v, "AUTHORITY")


def _netns(v: bytes) -> str:
    return decode_ascii(v, "NETNS")


def _text(v: bytes) -> str:
    return v.decode("utf-8", "backslashreplace")


def _ssl_record(info: SslInfo) -> dict[str, object]:
    out: dict[str, object] = {
        "client_flags": info.client_flags,
        "verify": info.verify,
        "verified": info.verified,
    }
    for name in ("version", "cn", "cipher", "sig_alg", "key_alg"):
        value = getattr(info, name)
        if value is not None:
            out[name] = value
    return out


@dataclass(frozen=True, slots=True)
class ProxyHeader:
    """One parsed (or to-be-built) PROXY protocol header.

    ``family`` names the address family as v1 does: "TCP4" (IPv4) and "TCP6" (IPv6) also
    for DGRAM, "UNIX", "UNSPEC" (v2 LOCAL or AF_UNSPEC) or "UNKNOWN" (v1). ``source`` and
    ``destination`` are ``(ip, port)``, ``(path, 0)`` for UNIX, ``None`` when the header
    carries no usable address (LOCAL, UNSPEC, UNKNOWN): then use the socket's addresses.
    """

    version: int
    command: str
    family: str
    transport: str | None
    source: tuple[str, int] | None
    destination: tuple[str, int] | None
    tlvs: tuple[Tlv, ...] = ()

    # ------------------------------------------------------------------ lookups
    def _first(self, t: int) -> bytes | None:
        for tlv in self.tlvs:
            if tlv.type == t:
                return tlv.value
        return None

    def _decoded(self, t: int, decode: Callable[[bytes], T]) -> T | None:
        """The first TLV of type ``t`` that decodes (custom-range types may hold others)."""
        for tlv in self.tlvs:
            if tlv.type == t:
                value = _try(decode, tlv.value)
                if value is not None:
                    return value
        return None

    @property
    def alpn(self) -> bytes | None:
        return self._first(c.PP2_TYPE_ALPN)

    @property
    def authority(self) -> str | None:
        return self._decoded(c.PP2_TYPE_AUTHORITY, _authority)

    @property
    def unique_id(self) -> bytes | None:
        return self._first(c.PP2_TYPE_UNIQUE_ID)

    @property
    def ssl(self) -> SslInfo | None:
        return self._decoded(c.PP2_TYPE_SSL, decode_ssl)

    @property
    def netns(self) -> str | None:
        return self._decoded(c.PP2_TYPE_NETNS, _netns)

    @property
    def aws_vpce_id(self) -> str | None:
        return self._decoded(c.PP2_TYPE_AWS, _aws)

    @property
    def azure_link_id(self) -> int | None:
        return self._decoded(c.PP2_TYPE_AZURE, _azure)

    @property
    def gcp_psc_id(self) -> int | None:
        return self._decoded(c.PP2_TYPE_GCP, decode_gcp_psc_id)

    @property
    def identity(self) -> str | None:
        """The SPIFFE ID an upstream enforcer verified (PP2_TYPE_ENFORCER_IDENTITY)."""
        return self._decoded(c.PP2_TYPE_ENFORCER_IDENTITY, _identity)

    # ------------------------------------------------------------------ views
    def tlvs_for_record(self) -> dict[str, object]:
        """JSON-able TLVs for the flow record's ``proxy_protocol.tlvs``.

        Known TLVs by name (``alpn``, ``authority``, ``crc32c: "ok"`` (the parser has
        verified it), ``unique_id`` as hex, ``ssl`` as a dict, ``netns``, ``aws_vpce_id``,
        ``azure_link_id``, ``gcp_psc_id``, ``identity``); NOOP is left out; anything else
        (or a known TLV whose value does not decode) as ``"0xNN": "<hex>"``, repeats joined
        with commas.
        """
        out: dict[str, object] = {}
        for tlv in self.tlvs:
            t, v = tlv.type, tlv.value
            name: str | None = None
            value: object = None
            if t == c.PP2_TYPE_ALPN:
                name, value = "alpn", _text(v)
            elif t == c.PP2_TYPE_AUTHORITY:
                name, value = "authority", _try(_authority, v)
            elif t == c.PP2_TYPE_CRC32C:
                name, value = "crc32c", "ok"
            elif t == c.PP2_TYPE_NOOP:
                continue
            elif t == c.PP2_TYPE_UNIQUE_ID:
                name, value = "unique_id", v.hex()
            elif t == c.PP2_TYPE_SSL:
                info = _try(decode_ssl, v)
                name, value = "ssl", None if info is None else _ssl_record(info)
            elif t == c.PP2_TYPE_NETNS:
                name, value = "netns", _try(_netns, v)
            elif t == c.PP2_TYPE_GCP:
                name, value = "gcp_psc_id", _try(decode_gcp_psc_id, v)
            elif t == c.PP2_TYPE_AWS:
                name, value = "aws_vpce_id", _try(_aws, v)
            elif t == c.PP2_TYPE_AZURE:
                name, value = "azure_link_id", _try(_azure, v)
            elif t == c.PP2_TYPE_ENFORCER_IDENTITY:
                name, value = "identity", _try(_identity, v)
            if name is not None and value is not None:
                out.setdefault(name, value)
                continue
            key = f"0x{t:02x}"
            previous = out.get(key)
            out[key] = v.hex() if previous is None else f"{previous},{v.hex()}"
        return out

    def tlvs_for_policy(self) -> dict[str, str]:
        """Flat str->str facts for rules; only the TLVs present.

        Keys: ``aws_vpce_id``, ``azure_link_id``, ``gcp_psc_id`` (decimal), ``authority``,
        ``alpn`` (decoded as UTF-8), ``identity``.
        """
        out: dict[str, str] = {}
        if not self.tlvs:
            return out
        alpn = self.alpn
        if alpn is not None:
            out["alpn"] = _text(alpn)
        values: tuple[tuple[str, object], ...] = (
            ("authority", self.authority),
            ("identity", self.identity),
            ("aws_vpce_id", self.aws_vpce_id),
            ("azure_link_id", self.azure_link_id),
            ("gcp_psc_id", self.gcp_psc_id),
        )
        for key, value in values:
            if value is not None:
                out[key] = str(value)
        return out
