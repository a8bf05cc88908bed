"""Peer identity from a (verified) X.509 certificate: pure, cached, and hard to crash.

``identity_from_der`` is called once per handshake with the peer's leaf certificate. It
keys a bounded LRU on ``sha256(der)``, so a peer that reconnects costs one hash and one
dict lookup. On a miss the certificate is parsed with ``cryptography``:

- SANs: every URI, DNS and IP SAN is kept, in certificate order. Other GeneralName types
  (email, otherName, directoryName ...) are ignored.
- SPIFFE ID: the X.509-SVID spec says an SVID carries exactly one URI SAN. We take the
  ``spiffe://`` URI SAN when there is exactly one; with several ``spiffe://`` URIs the
  identity is ambiguous and ``spiffe_id`` is None (other, non-spiffe URIs are ignored for
  this purpose). The URI must be a well-formed SPIFFE ID: lowercase trust domain of
  ``[a-z0-9._-]``, a non-empty path of segments of ``[A-Za-z0-9._-]`` (no ``.``/``..``,
  no empty segment, no trailing ``/``), no query, fragment, port or user info; otherwise
  it is just a URI and ``spiffe_id`` is None.
- Subject CN, O and OU, issuer CN, serial (lowercase hex), notAfter (UTC) and the SPKI
  pin: base64 (standard alphabet) of sha256 over the DER SubjectPublicKeyInfo exactly as
  it appears in the certificate.

Odd input must not crash the caller. ``cryptography`` refuses some values a CA may still
have signed (a subject that is not valid UTF-8, a DNS SAN with non-ASCII bytes) by raising
ValueError when the subject or the extensions are read. Then a small lenient DER reader
(below) extracts the same fields with undecodable bytes replaced by U+FFFD, so such
values never match a policy pattern, while the certificate's other valid names (its
SPIFFE ID, say) still do, and a deny rule on them still applies. Only bytes that are not a
certificate at all raise ``IdentityError``.
"""

from __future__ import annotations

import base64
import functools
import hashlib
import ipaddress
import re
import threading
import warnings
from collections import OrderedDict
from dataclasses import dataclass
from datetime import UTC, datetime

from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding
from cryptography.x509.oid import NameOID

__all__ = [
    "CACHE_SIZE",
    "IdentityError",
    "PeerIdentity",
    "cache_clear",
    "cache_info",
    "identity_from_der",
    "identity_from_pem",
    "identity_from_spiffe_id",
    "parse_spiffe_id",
]

# cryptography warns (on stderr, outside the log) when a subject attribute is longer than
# X.520 allows, e.g. a 5,000-character CN; such a name is read all the same.
warnings.filterwarnings("ignore", message="Attribute's length must be", category=UserWarning)

CACHE_SIZE = 4096
RECORD_LIST_LIMIT = 64  # SANs listed per kind in a flow record; the rest is counted


class IdentityError(ValueError):
    """The bytes are not a parseable X.509 certificate."""


@dataclass(frozen=True, slots=True)
class PeerIdentity:
    spiffe_id: str | None
    trust_domain: str | None
    spiffe_path: str | None
    uri: tuple[str, ...]
    dns: tuple[str, ...]
    ip: tuple[str, ...]
    cn: str | None
    o: tuple[str, ...]
    ou: tuple[str, ...]
    issuer_cn: str | None
    serial: str
    not_after: datetime
    spki_sha256: str
    issuer_der: bytes = b""  # the issuer Name as encoded in the certificate (CRL lookups)

    def to_record(self) -> dict[str, object]:
        """The flow record's ``tls.peer`` object (docs/observability.md), SAN lists capped. Built once
        per identity (identities are cached per certificate); each call gets its own dict."""
        return dict(_record_of(self))

    def _build_record(self) -> dict[str, object]:
        out: dict[str, object] = {
            "spiffe_id": self.spiffe_id,
            "cn": self.cn,
            "dns": list(self.dns[:RECORD_LIST_LIMIT]),
            "uri": list(self.uri[:RECORD_LIST_LIMIT]),
            "ip": list(self.ip[:RECORD_LIST_LIMIT]),
            "ou": list(self.ou[:RECORD_LIST_LIMIT]),
            "spki_sha256": self.spki_sha256,
            "serial": self.serial,
            "not_after": self.not_after.isoformat().replace("+00:00", "Z"),
        }
        dropped = sum(max(0, len(v) - RECORD_LIST_LIMIT)
                      for v in (self.dns, self.uri, self.ip, self.ou))
        if dropped:
            out["truncated"] = dropped
        return out


@functools.lru_cache(maxsize=1024)
def _record_of(identity: PeerIdentity) -> dict[str, object]:
    return identity._build_record()


# ---------------------------------------------------------------------------- SPIFFE IDs
_TRUST_DOMAIN = re.compile(r"[a-z0-9._-]+")
_PATH_SEGMENT = re.compile(r"[A-Za-z0-9._-]+")


def parse_spiffe_id(uri: str) -> tuple[str, str] | None:
    """``spiffe://td/a/b`` -> ``("td", "/a/b")``; None if not a well-formed SPIFFE ID."""
    if not uri.startswith("spiffe://"):
        return None
    rest = uri[len("spiffe://"):]
    td, slash, path = rest.partition("/")
    if not slash or not _TRUST_DOMAIN.fullmatch(td):
        return None
    for segment in path.split("/"):
        if segment in (".", "..") or not _PATH_SEGMENT.fullmatch(segment):
            return None
    return td, "/" + path


def _spiffe_fields(uris: tuple[str, ...]) -> tuple[str | None, str | None, str | None]:
    candidates = [u for u in uris if u[:9].lower() == "spiffe://"]
    if len(candidates) != 1:
        return None, None, None
    parsed = parse_spiffe_id(candidates[0])
    if parsed is None:
        return None, None, None
    return candidates[0], parsed[0], parsed[1]


def identity_from_spiffe_id(uri: str) -> PeerIdentity:
    """A synthetic identity holding just a URI (for ``policy explain --identity``)."""
    spiffe_id, td, path = _spiffe_fields((uri,))
    return PeerIdentity(spiffe_id, td, path, (uri,), (), (), None, (), (), None, "",
                        datetime.max.replace(tzinfo=UTC), "")


# ---------------------------------------------------------------------------- cache
_cache: OrderedDict[bytes, PeerIdentity] = OrderedDict()
_cache_lock = threading.Lock()
_stats = {"hits": 0, "misses": 0}


def identity_from_der(der: bytes) -> PeerIdentity:
    """Identity of a DER certificate; cached by sha256(der). Raises ``IdentityError``."""
    key = hashlib.sha256(der).digest()
    with _cache_lock:
        ident = _cache.get(key)
        if ident is not None:
            _cache.move_to_end(key)
            _stats["hits"] += 1
            return ident
    ident = parse_der(der)
    with _cache_lock:
        _stats["misses"] += 1
        _cache[key] = ident
        if len(_cache) > CACHE_SIZE:
            _cache.popitem(last=False)
    return ident


def identity_from_pem(pem: bytes) -> PeerIdentity:
    """Identity of the first certificate in a PEM blob. Raises ``IdentityError``."""
    try:
        cert = x509.load_pem_x509_certificate(pem)
    except Exception as exc:  # ValueError, InvalidVersion ...
        raise IdentityError(f"not a PEM certificate: {exc}") from None
    return identity_from_der(cert.public_bytes(Encoding.DER))


def cache_clear() -> None:
    with _cache_lock:
        _cache.clear()
        _stats.update(hits=0, misses=0)


def cache_info() -> dict[str, int]:
    with _cache_lock:
        return {"size": len(_cache), "max_size": CACHE_SIZE, **_stats}


# ---------------------------------------------------------------------------- parsing
def parse_der(der: bytes) -> PeerIdentity:
    """Uncached parse (``identity_from_der`` is the one to call)."""
    if _serial_not_positive(der):
        # RFC 5280 4.1.2.2; cryptography only warns today and will refuse such certificates
        raise IdentityError("the certificate's serial number is not positive (RFC 5280)")
    try:
        cert = x509.load_der_x509_certificate(der)
        tbs = cert.tbs_certificate_bytes
        serial = format(cert.serial_number, "x")
        not_after = cert.not_valid_after_utc
    except Exception as exc:  # ValueError, InvalidVersion ...
        raise IdentityError(f"not a DER certificate: {exc}") from None
    try:
        raw = _RawTbs(tbs)
    except (ValueError, IndexError) as exc:
        raise IdentityError(f"unreadable certificate structure: {exc}") from None
    uri, dns, ip = _sans(cert, raw)
    cn, o, ou = _subject(cert, raw)
    issuer_cn = _issuer_cn(cert, raw)
    spiffe_id, td, path = _spiffe_fields(uri)
    spki = base64.b64encode(hashlib.sha256(raw.spki).digest()).decode("ascii")
    return PeerIdentity(spiffe_id, td, path, uri, dns, ip, cn, o, ou, issuer_cn, serial,
                        not_after, spki, raw.issuer_der)


def _sans(cert: x509.Certificate, raw: _RawTbs) -> tuple[tuple[str, ...], ...]:
    try:
        ext = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return (), (), ()
    except Exception:  # ValueError, UnsupportedGeneralNameType (x400Address ...)
        return raw.sans()  # a SAN (or another extension) cryptography will not decode
    uri = tuple(ext.get_values_for_type(x509.UniformResourceIdentifier))
    dns = tuple(ext.get_values_for_type(x509.DNSName))
    ip = tuple(str(a) for a in ext.get_values_for_type(x509.IPAddress))
    return uri, dns, ip


def _name_values(name: x509.Name, oid: x509.ObjectIdentifier) -> tuple[str, ...]:
    out: list[str] = []
    for attr in name.get_attributes_for_oid(oid):
        value = attr.value
        out.append(value if isinstance(value, str) else value.decode("utf-8", "replace"))
    return tuple(out)


def _subject(cert: x509.Certificate, raw: _RawTbs) -> tuple[str | None, tuple[str, ...],
                                                             tuple[str, ...]]:
    try:
        subject = cert.subject
        cns = _name_values(subject, NameOID.COMMON_NAME)
        o = _name_values(subject, NameOID.ORGANIZATION_NAME)
        ou = _name_values(subject, NameOID.ORGANIZATIONAL_UNIT_NAME)
    except Exception:  # e.g. ValueError on a string that is not UTF-8
        attrs = raw.name(raw.subject)
        cns, o, ou = attrs.get(_CN, ()), attrs.get(_O, ()), attrs.get(_OU, ())
    return (cns[-1] if cns else None), o, ou  # the most specific CN, as OpenSSL tools do


def _issuer_cn(cert: x509.Certificate, raw: _RawTbs) -> str | None:
    try:
        cns = _name_values(cert.issuer, NameOID.COMMON_NAME)
    except Exception:  # as for the subject
        cns = raw.name(raw.issuer).get(_CN, ())
    return cns[-1] if cns else None


# ---------------------------------------------------------------------------- lenient DER
# Just enough DER to find the subject, issuer, SPKI and SAN extension in a TBSCertificate
# that cryptography has already accepted as a certificate, decoding strings leniently.
_CN, _O, _OU = bytes.fromhex("550403"), bytes.fromhex("55040a"), bytes.fromhex("55040b")
_SAN_OID = bytes.fromhex("551d11")
_STRING_CODECS = {0x0C: "utf-8", 0x1E: "utf-16-be", 0x1C: "utf-32-be"}  # else latin-1


def _tlv(data: bytes, pos: int) -> tuple[int, int, int]:
    """(tag, value_start, value_end) of the element at ``pos``."""
    tag = data[pos]
    length = data[pos + 1]
    pos += 2
    if length & 0x80:
        n = length & 0x7F
        if n == 0 or n > 4:
            raise ValueError("unsupported DER length")
        length = int.from_bytes(data[pos:pos + n], "big")
        pos += n
    end = pos + length
    if end > len(data):
        raise ValueError("DER element runs past the end")
    return tag, pos, end


def _children(data: bytes, start: int, end: int) -> list[tuple[int, int, int, int]]:
    """(tag, element_start, value_start, value_end) of each element in data[start:end]."""
    out = []
    while start < end:
        tag, vs, ve = _tlv(data, start)
        out.append((tag, start, vs, ve))
        start = ve
    return out


def _serial_not_positive(der: bytes) -> bool:
    """Whether the serial INTEGER of a certificate is zero or negative (False when the
    structure cannot be read here: cryptography then says what is wrong with it)."""
    try:
        _, cs, ce = _tlv(der, 0)  # Certificate
        _, _, ts, te = _children(der, cs, ce)[0]  # TBSCertificate
        fields = _children(der, ts, te)
        if fields and fields[0][0] == 0xA0:  # [0] version
            fields = fields[1:]
        tag, _, vs, ve = fields[0]
    except (ValueError, IndexError):
        return False
    value = der[vs:ve]
    return tag == 0x02 and (not value or value[0] & 0x80 != 0 or not any(value))


def _decode(tag: int, value: bytes) -> str:
    return value.decode(_STRING_CODECS.get(tag, "latin-1"), "replace")


class _RawTbs:
    __slots__ = ("data", "extensions", "issuer", "issuer_der", "spki", "subject",
                 "subject_der")

    def __init__(self, tbs: bytes) -> None:
        self.data = tbs
        _, start, end = _tlv(tbs, 0)
        fields = _children(tbs, start, end)
        if fields and fields[0][0] == 0xA0:  # [0] version
            fields = fields[1:]
        # serial, signature, issuer, validity, subject, subjectPublicKeyInfo, [1], [2], [3]
        self.issuer = fields[2][2:]
        self.issuer_der = tbs[fields[2][1]:fields[2][3]]
        self.subject = fields[4][2:]
        self.subject_der = tbs[fields[4][1]:fields[4][3]]
        _, spki_start, _, spki_end = fields[5]
        self.spki = tbs[spki_start:spki_end]
        self.extensions = next((f[2:] for f in fields[6:] if f[0] == 0xA3), None)

    def name(self, where: tuple[int, int]) -> dict[bytes, tuple[str, ...]]:
        out: dict[bytes, list[str]] = {}
        data = self.data
        try:
            for _, _, rs, re_ in _children(data, *where):  # RDN: SET OF
                for _, _, as_, ae in _children(data, rs, re_):  # AttributeTypeAndValue
                    (_, _, os_, oe), (vtag, _, vs, ve) = _children(data, as_, ae)[:2]
                    out.setdefault(data[os_:oe], []).append(_decode(vtag, data[vs:ve]))
        except (ValueError, IndexError):
            pass  # keep what was read before the damage
        return {k: tuple(v) for k, v in out.items()}

    def sans(self) -> tuple[tuple[str, ...], tuple[str, ...], tuple[str, ...]]:
        uri: list[str] = []
        dns: list[str] = []
        ip: list[str] = []
        try:
            value = self._san_value()
            if value is None:
                return (), (), ()
            _, gs, ge = _tlv(value, 0)
            for tag, _, vs, ve in _children(value, gs, ge):
                item = value[vs:ve]
                if tag == 0x86:
                    uri.append(item.decode("ascii", "replace"))
                elif tag == 0x82:
                    dns.append(item.decode("ascii", "replace"))
                elif tag == 0x87 and len(item) in (4, 16):
                    ip.append(str(ipaddress.ip_address(item)))
        except (ValueError, IndexError):
            pass  # keep what was read before the damage
        return tuple(uri), tuple(dns), tuple(ip)

    def _san_value(self) -> bytes | None:
        if self.extensions is None:
            return None
        data = self.data
        _, ls, le = _tlv(data, self.extensions[0])  # [3] holds SEQUENCE OF Extension
        for _, _, es, ee in _children(data, ls, le):
            parts = _children(data, es, ee)
            if data[parts[0][2]:parts[0][3]] == _SAN_OID:
                _, _, vs, ve = parts[-1]  # extnValue OCTET STRING
                return data[vs:ve]
        return None
