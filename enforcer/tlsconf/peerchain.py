"""The certificate chain a TLS peer was authenticated with, as DER (leaf first).

OpenSSL keeps the chain it verified (``SSL_get0_verified_chain``) and the certificates the
peer sent (``SSL_get_peer_cert_chain``). Python exposes both as
``SSLObject.get_verified_chain()`` / ``get_unverified_chain()`` from 3.13 (lists of DER
bytes; 3.13.0 returned certificate objects on ``SSLObject``). CPython 3.10 to 3.12 already
ship the same two calls on the ``_ssl`` object behind every ``SSLObject`` (``_sslobj``,
returning ``_ssl.Certificate`` objects), unchanged since then; they are used there when the
public ones are missing, and only after a public call confirms them: the first certificate
must be the one ``getpeercert(binary_form=True)`` returns. Anything else gives None and
the caller rebuilds the chain from what it has (``tlsconf.revocation.complete_chain``).

A resumed session has no verified chain (OpenSSL verifies nothing then): ``verified``
gives None, and ``sent`` gives the peer's chain only when OpenSSL kept it with the session
(a server-side session cache does, a stateless ticket does not).
"""

from __future__ import annotations

import ssl
from typing import Any, Final

_ENCODING_DER: Final = 2  # _ssl.ENCODING_DER, the argument of Certificate.public_bytes


def verified(obj: ssl.SSLObject) -> list[bytes] | None:
    """The chain OpenSSL verified for this handshake, or None."""
    return _chain(obj, "get_verified_chain")


def sent(obj: ssl.SSLObject) -> list[bytes] | None:
    """The certificates the peer sent (unverified), or None."""
    return _chain(obj, "get_unverified_chain")


def _chain(obj: ssl.SSLObject, method: str) -> list[bytes] | None:
    getter = getattr(obj, method, None)  # public from Python 3.13
    if getter is None:
        getter = getattr(getattr(obj, "_sslobj", None), method, None)  # 3.10 - 3.12
    if getter is None:
        return None
    try:
        items: Any = getter()
        ders = [_der(item) for item in items or ()]
        leaf = obj.getpeercert(binary_form=True)
    except (ssl.SSLError, ValueError, TypeError, AttributeError):
        return None
    if not ders or leaf is None or ders[0] != leaf:
        return None  # not confirmed by the public call: do not use it
    return ders


def _der(item: object) -> bytes:
    if isinstance(item, bytes):
        return item
    public_bytes = getattr(item, "public_bytes", None)
    if public_bytes is None:
        raise TypeError(f"not a certificate: {type(item).__name__}")
    der = public_bytes(_ENCODING_DER)
    if not isinstance(der, bytes):
        raise TypeError("public_bytes did not return bytes")
    return der
