"""Build ``ssl.SSLContext`` objects from loaded material, with secure defaults only.

Every context: TLS 1.2 minimum (or 1.3), TLS 1.2 suites ECDHE with AES-GCM or
ChaCha20-Poly1305 only, in the order of the material's ``cipher_suites`` (TLS 1.3
names; each maps to its two ECDHE TLS 1.2 suites), no compression, no renegotiation, peer
verification on with no way to turn it off. Server contexts ask for a client certificate
per ``client_auth``; client contexts always verify the server chain, and check either
the host name or the configured identity (``verify: {uri, dns, cn}``, checked by the data
plane after the handshake).

The TLS 1.3 suites themselves cannot be set through Python's ``ssl`` module: the data plane
sets them with the native extension (``tls13_suites`` gives the string it passes).

Security level 2 is pinned in the cipher string (at least 112-bit keys: RSA >= 2048, no
SHA-1 signatures), whatever the system's openssl.cnf says.

Session resumption stays on: a server context issues TLS 1.3 tickets (and keeps a TLS 1.2
session cache) under ticket keys that OpenSSL draws at random for each context and never
writes anywhere. Every reload, and the periodic ticket-key rotation, builds a new context,
so keys rotate and no session outlives a change of certificate, CA bundle or CRL: a peer
revoked by a new CRL cannot resume its way back in. A resumed session still carries the
peer's certificate (``getpeercert`` returns it), so identity checks and rules see the same
peer as after a full handshake.

With a CRL, revocation is checked for the whole peer chain (``VERIFY_CRL_CHECK_CHAIN``;
see ``material`` for what that asks of the CRL file).

``ssl`` can only load certificates, keys and CRLs from files, so in-memory material is
written to a private temporary file (mode 0600, in /dev/shm when present) that is removed
as soon as OpenSSL has read it.

``build_listener_context`` is what the data plane and the reloader call for a listener:
it checks that the certificate covers the listener's ``server_names``, builds the server
context and installs the listener's SNI callback (``tlsconf.sni``).
"""

from __future__ import annotations

import contextlib
import os
import ssl
import tempfile
from collections.abc import Iterator

from enforcer.config.model import CIPHER_SUITES, ListenerTlsConfig
from enforcer.tlsconf.material import LoadedMaterial, MaterialError
from enforcer.tlsconf.sni import check_names_covered, sni_callback

# The TLS 1.2 suites standing for each TLS 1.3 one (same AEAD and hash; ECDHE only).
_TLS12_EQUIVALENTS = {
    "TLS_AES_128_GCM_SHA256": ("ECDHE-ECDSA-AES128-GCM-SHA256", "ECDHE-RSA-AES128-GCM-SHA256"),
    "TLS_AES_256_GCM_SHA384": ("ECDHE-ECDSA-AES256-GCM-SHA384", "ECDHE-RSA-AES256-GCM-SHA384"),
    "TLS_CHACHA20_POLY1305_SHA256": ("ECDHE-ECDSA-CHACHA20-POLY1305",
                                     "ECDHE-RSA-CHACHA20-POLY1305"),
}
_SECURE_OPTIONS = (
    ssl.OP_NO_COMPRESSION
    | ssl.OP_NO_RENEGOTIATION
    | ssl.OP_CIPHER_SERVER_PREFERENCE
    | ssl.OP_SINGLE_ECDH_USE
)
_TMPDIR = "/dev/shm" if os.path.isdir("/dev/shm") and os.access("/dev/shm", os.W_OK) else None


def _versions(min_version: str) -> ssl.TLSVersion:
    return ssl.TLSVersion.TLSv1_3 if min_version == "1.3" else ssl.TLSVersion.TLSv1_2


@contextlib.contextmanager
def _private_file(data: bytes) -> Iterator[str]:
    fd, path = tempfile.mkstemp(prefix="enforcer-", dir=_TMPDIR)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
        yield path
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)


def tls12_ciphers(suites: tuple[str, ...] = CIPHER_SUITES) -> str:
    """The OpenSSL cipher string for TLS 1.2: the equivalents of ``suites``, in order."""
    names = [name for suite in suites for name in _TLS12_EQUIVALENTS[suite]]
    return ":".join(names) + ":@SECLEVEL=2"


def tls13_suites(material: LoadedMaterial | None) -> str:
    """The OpenSSL TLS 1.3 cipher-suite string of a context built from ``material``."""
    return ":".join(_suites(material))


def _suites(material: LoadedMaterial | None) -> tuple[str, ...]:
    return material.cipher_suites if material else CIPHER_SUITES


def _secure(ctx: ssl.SSLContext, material: LoadedMaterial | None) -> None:
    ctx.minimum_version = _versions(material.min_version if material else "1.2")
    ctx.options |= _SECURE_OPTIONS
    ctx.set_ciphers(tls12_ciphers(_suites(material)))


def _load_identity(ctx: ssl.SSLContext, material: LoadedMaterial) -> None:
    assert material.cert_pem is not None and material.key_pem is not None
    with _private_file(material.cert_pem) as cert, _private_file(material.key_pem) as key:
        try:
            ctx.load_cert_chain(cert, key)
        except ssl.SSLError as exc:
            raise MaterialError(f"tls.{material.name}: OpenSSL refused the certificate/key: "
                                f"{exc.reason or exc}") from None


def _load_trust(ctx: ssl.SSLContext, material: LoadedMaterial) -> None:
    assert material.ca_pem is not None
    try:
        ctx.load_verify_locations(cadata=material.ca_pem.decode("ascii", "replace"))
    except ssl.SSLError as exc:
        raise MaterialError(f"tls.{material.name}.ca: OpenSSL refused the CA bundle: "
                            f"{exc.reason or exc}") from None
    if material.crl_pem is not None:
        with _private_file(material.crl_pem) as crl:
            try:
                ctx.load_verify_locations(cafile=crl)
            except ssl.SSLError as exc:
                raise MaterialError(f"tls.{material.name}.crl: OpenSSL refused the CRL: "
                                    f"{exc.reason or exc}") from None
        ctx.verify_flags |= ssl.VERIFY_CRL_CHECK_CHAIN


def build_server_context(material: LoadedMaterial, client_auth: str) -> ssl.SSLContext:
    """A server context presenting ``material``; ``client_auth``: required|optional|none."""
    if not material.has_identity:
        raise MaterialError(f"tls.{material.name}: a listener needs a certificate and key")
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    _secure(ctx, material)
    _load_identity(ctx, material)
    if client_auth != "none":
        if material.ca_pem is None:
            raise MaterialError(f"tls.{material.name}.ca: client_auth {client_auth} needs a CA "
                                "bundle to verify clients")
        _load_trust(ctx, material)
        ctx.verify_mode = ssl.CERT_REQUIRED if client_auth == "required" else ssl.CERT_OPTIONAL
    # else client_auth: none, written explicitly (the default is required): a public TLS
    # listener that does not ask clients for a certificate at all, as any HTTPS server; a
    # server context asks for none unless told to. Nothing is half-trusted: rules on
    # certificate fields can never match here (`enforcer check` refuses them on such a
    # listener), so identity-based allows fail closed.

    # One TLS 1.3 ticket per handshake (OpenSSL sends 2): a peer enforcer keeps one session
    # per upstream and reuses it, so the second ticket is only work.
    ctx.num_tickets = 1
    return ctx


def build_client_context(
    material: LoadedMaterial | None, *, mutual: bool, check_hostname: bool
) -> ssl.SSLContext:
    """A client context: always verifies the server chain (system roots if no CA is given)."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    _secure(ctx, material)
    ctx.verify_mode = ssl.CERT_REQUIRED
    ctx.check_hostname = check_hostname
    if material is not None and material.ca_pem is not None:
        _load_trust(ctx, material)
    else:
        ctx.load_default_certs(ssl.Purpose.SERVER_AUTH)
    if mutual:
        if material is None or not material.has_identity:
            name = material.name if material else "?"
            raise MaterialError(f"tls.{name}: mode mtls needs a certificate and key")
        _load_identity(ctx, material)
    return ctx


def build_listener_context(material: LoadedMaterial, tls: ListenerTlsConfig,
                           listener: str) -> ssl.SSLContext:
    """The server context of listener ``listener``: names covered, SNI callback set."""
    where = f"listeners.{listener}.tls"
    check_names_covered(where, tls.server_names, tls.strict_sni, material)
    try:
        ctx = build_server_context(material, tls.client_auth)
    except MaterialError as exc:
        raise MaterialError(f"listeners.{listener}: {exc}") from None
    ctx.sni_callback = sni_callback(tls.server_names, strict=tls.strict_sni)
    if tls.alpn:
        ctx.set_alpn_protocols(list(tls.alpn))
    return ctx
