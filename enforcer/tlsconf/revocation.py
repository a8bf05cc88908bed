"""Which certificate of a peer's chain a CRL file revokes, and when the chain expires, for
closing open connections (dataplane.certwatch). Pure: bytes in, objects out.

A connection is authenticated by a whole chain (leaf, intermediates, trust anchor), and a
revoked or expired intermediate breaks every leaf under it: OpenSSL would refuse each of
them at a new handshake. So the unit watched here is the chain, not the leaf:

- ``PeerChain``: the certificates, leaf first, as ``ChainCert`` (subject and issuer names
  as encoded, serial, notAfter, the parsed certificate for signatures). ``load_chain``
  builds one from the DER chain OpenSSL verified at the handshake
  (``tlsconf.peerchain``); equal chains give the same object while it is in a bounded
  cache, so connections through one chain share it. ``complete_chain`` rebuilds one from
  a leaf and a pool of candidate issuers (the certificates the peer sent, the trust
  bundle) when OpenSSL kept no verified chain (a resumed session): each step takes a
  candidate whose subject is the current certificate's issuer *and* whose key verifies
  its signature.
- ``PeerChain.earliest``: the certificate whose notAfter comes first: the chain stops
  verifying then.
- ``CrlIndex``: every PEM CRL in the material's CRL bytes (already checked by
  ``tlsconf.material``: parseable, not past their next update), each with its issuer (the
  encoded Name) and the revoked serials. ``revoked_in(chain)`` walks the chain from the
  leaf: certificate *i* is revoked by a CRL whose issuer is certificate *i*'s issuer, that
  lists its serial, and whose signature verifies with the key of certificate *i+1* (its
  issuer, in the chain): a serial is unique only per CA, and a CRL file may hold another
  CA's list under a similar name. A self-issued certificate (the trust anchor) is not
  looked up. When the chain ends before a certificate's issuer (it could not be rebuilt),
  the issuer's name alone decides, as for the leaf before chains were kept (``material``
  verified the CRLs of the CAs in the bundle). Signature checks are cached per (CRL,
  issuer certificate).
"""

from __future__ import annotations

import hashlib
import re
from collections import OrderedDict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Final

from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding

from enforcer.tlsconf.identity import _RawTbs

_DER: Final = Encoding.DER
CHAIN_CACHE: Final = 1024  # distinct chains kept for reuse (a few KiB each)
MAX_DEPTH: Final = 16  # certificates in a rebuilt chain, at most
_PEM_CRL = re.compile(rb"-----BEGIN X509 CRL-----.+?-----END X509 CRL-----", re.DOTALL)


@dataclass(frozen=True, slots=True, eq=False)
class ChainCert:
    sha256: bytes
    subject_der: bytes
    issuer_der: bytes
    serial: str  # lowercase hex
    not_after: datetime
    cert: x509.Certificate = field(repr=False)

    @property
    def self_issued(self) -> bool:
        return self.subject_der == self.issuer_der

    @property
    def subject(self) -> str:
        try:
            return self.cert.subject.rfc4514_string()
        except ValueError:  # a name cryptography will not decode
            return "(undecodable subject)"

    def role(self, depth: int) -> str:
        """How a close detail names it: the leaf, or a CA of the chain."""
        if depth == 0:
            return f"the client certificate (serial {self.serial})"
        return (f"the CA certificate {self.subject!r} (serial {self.serial}, depth {depth} "
                "of the client's chain)")


@dataclass(frozen=True, slots=True, eq=False)
class PeerChain:
    certs: tuple[ChainCert, ...]  # leaf first
    complete: bool  # ends with a self-issued certificate, or one of the trust anchors

    @property
    def leaf(self) -> ChainCert:
        return self.certs[0]

    @property
    def earliest(self) -> tuple[int, ChainCert]:
        """(depth, certificate) of the first notAfter in the chain."""
        return min(enumerate(self.certs), key=lambda item: item[1].not_after)


_chains: OrderedDict[tuple[bytes, ...], PeerChain] = OrderedDict()


def parse_cert(der: bytes) -> ChainCert:
    """Raises ValueError when ``der`` is not a certificate."""
    cert = x509.load_der_x509_certificate(der)
    try:
        raw = _RawTbs(cert.tbs_certificate_bytes)
    except IndexError as exc:
        raise ValueError(f"unreadable certificate structure: {exc}") from None
    return ChainCert(hashlib.sha256(der).digest(), raw.subject_der, raw.issuer_der,
                     format(cert.serial_number, "x"), cert.not_valid_after_utc, cert)


def load_chain(ders: Sequence[bytes], *, complete: bool = True) -> PeerChain:
    """The chain of these DER certificates (leaf first), shared while it is cached.
    Raises ValueError when one is not a certificate."""
    key = (*(hashlib.sha256(d).digest() for d in ders), b"c" if complete else b"")
    chain = _chains.get(key)
    if chain is not None:
        _chains.move_to_end(key)
        return chain
    if not ders:
        raise ValueError("an empty certificate chain")
    chain = PeerChain(tuple(parse_cert(d) for d in ders), complete)
    _chains[key] = chain
    if len(_chains) > CHAIN_CACHE:
        _chains.popitem(last=False)
    return chain


def complete_chain(leaf_der: bytes, pool: Iterable[bytes],
                   anchors: Sequence[x509.Certificate]) -> PeerChain:
    """The chain from ``leaf_der`` up through ``pool`` (DER certificates the peer sent) and
    ``anchors`` (the trust bundle), by issuer name and signature. ``complete`` when it
    reached a self-issued certificate or an anchor. Raises ValueError for a bad leaf."""
    candidates: list[ChainCert] = []
    for der in pool:
        try:
            candidates.append(parse_cert(der))
        except ValueError:
            continue  # the handshake verified the chain; a stray extra is only skipped
    anchor_certs = [_of_cert(a) for a in anchors]
    candidates += anchor_certs
    anchor_keys = {c.sha256 for c in anchor_certs}
    ders = [leaf_der]
    current = parse_cert(leaf_der)
    complete = current.self_issued or current.sha256 in anchor_keys
    while not complete and len(ders) < MAX_DEPTH:
        issuer = next((c for c in candidates if c.subject_der == current.issuer_der
                       and c.sha256 != current.sha256 and _issued_by(current, c)), None)
        if issuer is None:
            break
        ders.append(issuer.cert.public_bytes(_DER))
        current = issuer
        complete = current.self_issued or current.sha256 in anchor_keys
    return load_chain(ders, complete=complete)


def _of_cert(cert: x509.Certificate) -> ChainCert:
    return parse_cert(cert.public_bytes(_DER))


def _issued_by(cert: ChainCert, issuer: ChainCert) -> bool:
    try:
        cert.cert.verify_directly_issued_by(issuer.cert)
    except Exception:  # InvalidSignature, ValueError, TypeError (a key type it cannot use)
        return False
    return True


def load_anchors(ca_pem: bytes | None) -> list[x509.Certificate]:
    if not ca_pem:
        return []
    try:
        return x509.load_pem_x509_certificates(ca_pem)
    except ValueError:
        return []  # tlsconf.material refuses such a bundle before it gets here


@dataclass(slots=True, eq=False)
class _Crl:
    issuer_der: bytes
    serials: frozenset[str]
    crl: x509.CertificateRevocationList = field(repr=False)


class CrlIndex:
    """The CRLs of one CRL file, for looking chains up (see the module comment)."""

    __slots__ = ("_signed", "crls")

    def __init__(self, crl_pem: bytes | None) -> None:
        self.crls: list[_Crl] = []
        self._signed: dict[tuple[int, bytes], bool] = {}
        for block in _PEM_CRL.findall(crl_pem or b""):
            try:
                crl = x509.load_pem_x509_crl(block)
                issuer = crl.issuer.public_bytes()
            except ValueError:
                continue  # tlsconf.material refuses such a file before it gets here
            serials = frozenset(format(entry.serial_number, "x") for entry in crl)
            if serials:
                self.crls.append(_Crl(issuer, serials, crl))

    def __bool__(self) -> bool:
        return bool(self.crls)

    def revoked_in(self, chain: PeerChain) -> tuple[int, ChainCert] | None:
        """(depth, certificate) of the first revoked certificate from the leaf up."""
        certs = chain.certs
        for depth, cert in enumerate(certs):
            if cert.self_issued:
                continue  # a trust anchor: no CRL above it
            issuer = certs[depth + 1] if depth + 1 < len(certs) else None
            for index, entry in enumerate(self.crls):
                if entry.issuer_der == cert.issuer_der and cert.serial in entry.serials \
                        and (issuer is None or self._signed_by(index, entry, issuer)):
                    return depth, cert
        return None

    def _signed_by(self, index: int, entry: _Crl, issuer: ChainCert) -> bool:
        key = (index, issuer.sha256)
        ok = self._signed.get(key)
        if ok is None:
            try:
                ok = entry.crl.is_signature_valid(issuer.cert.public_key())  # type: ignore[arg-type]
            except (ValueError, TypeError):  # a key type CRLs cannot be signed with
                ok = False
            self._signed[key] = ok
        return ok


def chain_cache_clear() -> None:
    _chains.clear()
