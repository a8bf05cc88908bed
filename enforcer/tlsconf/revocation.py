"""Which certificates a CRL file revokes, for closing open connections (dataplane.certwatch).

``revoked_set(crl_pem)`` reads every PEM CRL in the material's CRL bytes (already checked
by ``tlsconf.material``: signed by its CA, not past its next update) and returns the
revoked certificates as ``(issuer Name DER, serial in lowercase hex)`` pairs: a serial is
unique only per issuer. ``is_revoked`` looks a peer identity up: its issuer as encoded in
the certificate (``PeerIdentity.issuer_der``) and its serial. Pure: bytes in, a set out.

New handshakes are checked by OpenSSL against the whole chain; this covers only the
leaves of connections that were already open when the CRL changed (a revoked
intermediate is not followed down to its leaves here; docs/limits-and-revocation.md).
"""

from __future__ import annotations

import re

from cryptography import x509

from enforcer.tlsconf.identity import PeerIdentity

Revoked = frozenset[tuple[bytes, str]]
_PEM_CRL = re.compile(rb"-----BEGIN X509 CRL-----.+?-----END X509 CRL-----", re.DOTALL)


def revoked_set(crl_pem: bytes | None) -> Revoked:
    if not crl_pem:
        return frozenset()
    out: set[tuple[bytes, str]] = set()
    for block in _PEM_CRL.findall(crl_pem):
        try:
            crl = x509.load_pem_x509_crl(block)
            issuer = crl.issuer.public_bytes()
        except ValueError:
            continue  # tlsconf.material refuses such a file before it gets here
        for entry in crl:
            out.add((issuer, format(entry.serial_number, "x")))
    return frozenset(out)


def is_revoked(identity: PeerIdentity, revoked: Revoked) -> bool:
    return (identity.issuer_der, identity.serial) in revoked
