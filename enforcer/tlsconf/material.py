"""Load named TLS material (certificate chain, key, trust bundle, CRL) and check it.

Sources (``TlsMaterialConfig``): PEM files; a directory in the Kubernetes TLS secret layout
(``tls.crt``, ``tls.key``, ``ca.crt``); inline PEM (decoded by the config loader); or a
PKCS#12 bundle with its password in an environment variable. A separate ``ca`` file
and a ``crl`` file may be given with any of them.

How a load works:

1. Read every file into memory. Rotation tools replace files while we read them (the
   Kubernetes ``..data`` symlink swap, cert-manager, SPIRE): the ``stat()`` signatures of
   all files are taken before and after reading, and the read is repeated if any of
   them changed, so a certificate is never paired with the key of the next rotation.
2. Check everything with ``cryptography`` before any ``SSLContext`` is built, so a bad
   file gives a one-line ``MaterialError`` naming the key path, the file and the problem
   (never a stack trace): unreadable or empty file, not PEM, garbage PEM, an encrypted
   key, a key not matching the certificate, a chain whose certificates do not sign each
   other, a certificate whose issuer is in the CA bundle under its name but did not sign
   it, an expired or not-yet-valid certificate, a leaf in the CA bundle, a wrong PKCS#12
   password, a CRL that no CA in the bundle signed, an expired CRL, a CA without a CRL.

Chain rules. The certificate file holds the leaf first, then any intermediates: each
must be signed by the next one (else "the chain is broken"). The last certificate's
issuer is then looked up in the CA bundle by name: when found, it must have signed it
(else an error: typically the CA was rotated and the certificate was not reissued).
When it is not in the bundle at all, that is only a warning: the bundle is the trust
bundle for *peers*, and a gateway may legitimately serve a public certificate while
verifying clients against a private CA.

CRL rules. The data plane checks revocation of the whole peer chain (OpenSSL
``VERIFY_CRL_CHECK_CHAIN``), as nginx, HAProxy and Envoy do by default; OpenSSL then
refuses every peer whose chain has a CA without a CRL ("unable to get certificate CRL").
So the CRL file (one or more PEM CRLs, concatenated) must hold a CRL from every CA of the
bundle, and from every intermediate CA that peers send: the first is checked here (the
intermediates are only known at handshake time). A CRL from a CA of the bundle must be
signed by it, and no CRL may be past its next update (OpenSSL would refuse every peer).
"""

from __future__ import annotations

import datetime as dt
import hashlib
import itertools
import logging
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import cast

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.types import CertificateIssuerPublicKeyTypes
from cryptography.hazmat.primitives.serialization import pkcs12

from enforcer.config.model import TlsMaterialConfig
from enforcer.tlsconf.files import FileProblem, read_nonempty

log = logging.getLogger("enforcer.tls")

EXPIRY_WARNING = dt.timedelta(days=7)
CLOCK_SKEW = dt.timedelta(minutes=5)  # a certificate may start this far in the future
READ_ATTEMPTS = 5  # re-reads when files change under us (a rotation in progress)
SECRET_FILES = ("tls.crt", "tls.key", "ca.crt")
_PEM_CRL = re.compile(rb"-----BEGIN X509 CRL-----.+?-----END X509 CRL-----", re.DOTALL)


class MaterialError(ValueError):
    """A TLS material problem, one line, naming the key path and the file."""


@dataclass(frozen=True, slots=True)
class Blob:
    """The bytes of one part of a material and where they came from (for messages)."""

    where: str  # config key path: tls.mesh.cert, tls.mesh.dir, tls.mesh.inline.key
    file: str | None  # the file read, None for inline data
    data: bytes

    def error(self, problem: str) -> MaterialError:
        return MaterialError(f"{self.where}: {problem}{self.at}")

    @property
    def at(self) -> str:
        return f" in {self.file}" if self.file else ""


@dataclass(frozen=True, slots=True)
class LoadedMaterial:
    name: str
    cert_pem: bytes | None  # leaf first, then any intermediates
    key_pem: bytes | None  # PKCS8, unencrypted, kept in memory only
    ca_pem: bytes | None
    crl_pem: bytes | None
    min_version: str
    cipher_suites: tuple[str, ...]  # TLS 1.3 names, preference order (config CIPHER_SUITES)
    leaf: x509.Certificate | None
    sources: tuple[str, ...]  # files this material was read from (for reload watching)
    fingerprint: str  # sha256 over everything loaded: a reload that changes nothing is a no-op
    cert_file: str = "inline"  # where the certificate came from, for messages

    @property
    def not_after(self) -> dt.datetime | None:
        return self.leaf.not_valid_after_utc if self.leaf is not None else None

    @property
    def has_identity(self) -> bool:
        return self.cert_pem is not None and self.key_pem is not None

    @property
    def dns_names(self) -> tuple[str, ...]:
        """The leaf's DNS subject alternative names (what server_names must match)."""
        if self.leaf is None:
            return ()
        try:
            san = self.leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName)
        except x509.ExtensionNotFound:
            return ()
        return tuple(san.value.get_values_for_type(x509.DNSName))


@dataclass(slots=True)
class _Raw:
    cert: Blob | None = None
    key: Blob | None = None
    ca: Blob | None = None
    crl: Blob | None = None


def load_material(cfg: TlsMaterialConfig, *, now: dt.datetime | None = None) -> LoadedMaterial:
    """Read and check one material; raise ``MaterialError`` with a one-line reason."""
    now = now or dt.datetime.now(dt.UTC)
    raw, sources = _read_stable(cfg)
    leaf = None
    chain: list[x509.Certificate] = []
    key_pem = None
    if raw.cert is not None and raw.key is not None:
        chain = _parse_certs(raw.cert)
        leaf = chain[0]
        key_pem = _check_key(raw.key, leaf, raw.cert)
        _check_chain(raw.cert, chain, now)
    bundle = _parse_ca_bundle(raw.ca) if raw.ca is not None else []
    if raw.cert is not None and chain and raw.ca is not None:
        _check_issuer_in_bundle(raw.cert, raw.ca, chain[-1], bundle)
    if raw.crl is not None:
        if raw.ca is None:
            raise raw.crl.error("a CRL needs a ca bundle to check peers against")
        _check_crls(raw.crl, raw.ca, bundle, now)
    parts = (raw.cert, raw.key, raw.ca, raw.crl)
    digest = hashlib.sha256()
    for part in parts:
        digest.update(part.data if part is not None else b"-")
    material = LoadedMaterial(
        name=cfg.name, cert_pem=raw.cert.data if raw.cert else None, key_pem=key_pem,
        ca_pem=raw.ca.data if raw.ca else None, crl_pem=raw.crl.data if raw.crl else None,
        min_version=cfg.min_version, cipher_suites=cfg.cipher_suites, leaf=leaf,
        sources=tuple(sources),
        fingerprint=digest.hexdigest(),
        cert_file=(raw.cert.file or "inline") if raw.cert else "none")
    # an SVID lives about an hour and the agent renews it: no warning for its short life
    warning = None if cfg.spiffe_socket else expiry_warning(material, now)
    if warning:
        log.warning("%s", warning)
    return material


def expiry_warning(material: LoadedMaterial, now: dt.datetime) -> str | None:
    """A warning when the certificate has less than ``EXPIRY_WARNING`` left, else None."""
    if material.not_after is None:
        return None
    left = material.not_after - now
    if left >= EXPIRY_WARNING:
        return None
    hours = left.total_seconds() / 3600
    return (f"tls.{material.name}: certificate {material.cert_file} expires in {hours:.1f} h "
            f"(at {material.not_after.isoformat()}); renew it")


# --------------------------------------------------------------------------- reading


def watched_files(cfg: TlsMaterialConfig) -> list[str]:
    """Every file a material is read from (existing or not): what reload watches."""
    files = [p for p in (cfg.cert, cfg.key, cfg.pkcs12) if p]
    if cfg.dir:
        files += [os.path.join(cfg.dir, name) for name in SECRET_FILES]
    files += [p for p in (cfg.ca, cfg.crl) if p]
    return files


def _signature(path: str) -> tuple[int, int, int] | None:
    try:
        st = os.stat(path)
    except OSError:
        return None
    return (st.st_mtime_ns, st.st_size, st.st_ino)


def _read_stable(cfg: TlsMaterialConfig) -> tuple[_Raw, list[str]]:
    """Read all parts, again if a file changed meanwhile (a rotation in progress)."""
    files = watched_files(cfg)
    for attempt in range(READ_ATTEMPTS):
        before = [_signature(p) for p in files]
        try:
            raw = _read_parts(cfg)
        except MaterialError:
            if attempt + 1 < READ_ATTEMPTS and [_signature(p) for p in files] != before:
                continue  # a file vanished in the middle of a swap: read the new set
            raise
        if [_signature(p) for p in files] == before:
            break
    return raw, files


def _read(where: str, path: str) -> Blob:
    try:
        return Blob(where, path, read_nonempty(Path(path)))
    except FileProblem as exc:
        raise MaterialError(f"{where}: {path}: {exc}") from None


def _read_parts(cfg: TlsMaterialConfig) -> _Raw:
    raw = _Raw()
    if cfg.cert and cfg.key:
        raw.cert, raw.key = _read(f"{cfg.path}.cert", cfg.cert), _read(f"{cfg.path}.key", cfg.key)
    elif cfg.dir:
        raw.cert, raw.key, raw.ca = _read_secret_dir(f"{cfg.path}.dir", cfg.dir)
    elif cfg.inline_cert or cfg.inline_key:
        if cfg.inline_cert is None or cfg.inline_key is None:
            raise MaterialError(f"{cfg.path}.inline: needs both cert and key")
        raw.cert = Blob(f"{cfg.path}.inline.cert", None, cfg.inline_cert)
        raw.key = Blob(f"{cfg.path}.inline.key", None, cfg.inline_key)
    elif cfg.pkcs12:
        raw.cert, raw.key, raw.ca = _read_pkcs12(cfg, cfg.pkcs12)
    elif cfg.spiffe_socket:
        raw.cert, raw.key, raw.ca = _read_spiffe(cfg, cfg.spiffe_socket)
    if cfg.ca:
        raw.ca = _read(f"{cfg.path}.ca", cfg.ca)
    elif cfg.inline_ca:
        raw.ca = Blob(f"{cfg.path}.inline.ca", None, cfg.inline_ca)
    if cfg.crl:
        raw.crl = _read(f"{cfg.path}.crl", cfg.crl)
    return raw


def _read_spiffe(cfg: TlsMaterialConfig, socket_path: str) -> tuple[Blob, Blob, Blob]:
    """The latest X.509 SVID and bundles from the Workload API (``tlsconf.spiffe``)."""
    from enforcer.tlsconf import spiffe

    where = f"{cfg.path}.spiffe"
    try:
        snap = spiffe.watch(socket_path).snapshot(cfg.spiffe_timeout)
    except spiffe.SpiffeError as exc:
        raise MaterialError(f"{where}: {exc}") from None
    source = f"spiffe:unix:{socket_path} (SVID {snap.spiffe_id})"
    return (Blob(where, source, snap.cert_pem), Blob(where, source, snap.key_pem),
            Blob(f"{where} (trust bundles)", source, snap.bundle_pem))


def _read_secret_dir(where: str, directory: str) -> tuple[Blob, Blob, Blob | None]:
    if not os.path.isdir(directory):
        raise MaterialError(f"{where}: {directory}: not a directory")
    crt, key, ca = (os.path.join(directory, name) for name in SECRET_FILES)
    ca_blob = _read(where, ca) if os.path.exists(ca) else None
    return _read(where, crt), _read(where, key), ca_blob


def _read_pkcs12(cfg: TlsMaterialConfig, path: str) -> tuple[Blob, Blob, Blob | None]:
    where = f"{cfg.path}.pkcs12"
    blob = _read(where, path)
    password: bytes | None = None
    if cfg.pkcs12_password_env:
        value = os.environ.get(cfg.pkcs12_password_env)
        if value is None:
            raise MaterialError(f"{cfg.path}.password_env: environment variable "
                                f"{cfg.pkcs12_password_env} is not set")
        password = value.encode()
    try:
        key, cert, extra = pkcs12.load_key_and_certificates(blob.data, password)
    except ValueError:
        hint = "wrong password" if password is not None else "it needs a password (password_env)"
        raise MaterialError(f"{where}: {path}: cannot open the PKCS#12 bundle ({hint}, or "
                            "not PKCS#12)") from None
    except TypeError:  # a password given for an unencrypted bundle, or the reverse
        raise MaterialError(f"{where}: {path}: cannot open the PKCS#12 bundle (password "
                            "given for an unencrypted bundle, or missing)") from None
    if key is None or cert is None:
        raise MaterialError(f"{where}: {path}: the bundle has no key or no certificate")
    pem = serialization.Encoding.PEM
    key_pem = key.private_bytes(pem, serialization.PrivateFormat.PKCS8,
                                serialization.NoEncryption())
    chain_pem = b"".join(c.public_bytes(pem) for c in [cert, *_intermediates(cert, extra)])
    ca_pem = b"".join(c.public_bytes(pem) for c in extra)
    return (Blob(where, path, chain_pem), Blob(where, path, key_pem),
            Blob(where, path, ca_pem) if ca_pem else None)


def _intermediates(leaf: x509.Certificate,
                   extra: Sequence[x509.Certificate]) -> list[x509.Certificate]:
    """The bundle's intermediates in chain order (issuer after subject), roots left out."""
    chain: list[x509.Certificate] = []
    current = leaf
    while len(chain) < len(extra):
        parent = next((c for c in extra if c.subject == current.issuer
                       and c.subject != c.issuer and c not in chain), None)
        if parent is None:
            break
        chain.append(parent)
        current = parent
    return chain


# --------------------------------------------------------------------------- checks


def _describe_pem(pem: bytes) -> str:
    if b"PRIVATE KEY-----" in pem:
        return "the file holds a private key"
    if b"-----BEGIN X509 CRL" in pem:
        return "the file holds a CRL"
    return "not PEM" if b"-----BEGIN" not in pem else "the file holds another PEM type"


def _parse_certs(blob: Blob) -> list[x509.Certificate]:
    if b"-----BEGIN CERTIFICATE-----" not in blob.data:
        raise blob.error(f"no PEM certificate found ({_describe_pem(blob.data)})")
    try:
        return x509.load_pem_x509_certificates(blob.data)
    except ValueError:
        raise blob.error("garbage PEM: a CERTIFICATE block does not decode") from None


def _subject(cert: x509.Certificate) -> str:
    return cert.subject.rfc4514_string() or "<empty subject>"


def _check_key(blob: Blob, leaf: x509.Certificate, cert: Blob) -> bytes:
    if b"PRIVATE KEY-----" not in blob.data:
        holds = "the file holds a certificate" if b"CERTIFICATE" in blob.data else "not PEM"
        raise blob.error(f"no PEM private key found ({holds})")
    try:
        key = serialization.load_pem_private_key(blob.data, password=None)
    except TypeError:
        raise blob.error("the private key is encrypted; give an unencrypted key "
                         "(or PKCS#12 with password_env)") from None
    except ValueError:
        raise blob.error("garbage PEM: the PRIVATE KEY block does not decode") from None
    spki = serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    if key.public_key().public_bytes(*spki) != leaf.public_key().public_bytes(*spki):
        raise MaterialError(
            f"{blob.where}: the private key does not match the certificate "
            f"(key {blob.file or 'inline'}, certificate {cert.file or 'inline'} with subject "
            f"{_subject(leaf)})")
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def _check_validity(blob: Blob, cert: x509.Certificate, now: dt.datetime) -> None:
    if cert.not_valid_after_utc <= now:
        raise blob.error(f"certificate {_subject(cert)} expired at "
                         f"{cert.not_valid_after_utc.isoformat()}")
    if cert.not_valid_before_utc > now + CLOCK_SKEW:
        raise blob.error(f"certificate {_subject(cert)} is not valid before "
                         f"{cert.not_valid_before_utc.isoformat()}")


def _signed_by(cert: x509.Certificate, issuer: x509.Certificate) -> bool:
    try:
        cert.verify_directly_issued_by(issuer)
    except (InvalidSignature, ValueError, TypeError):  # or an unsupported key type
        return False
    return True


def _check_chain(blob: Blob, chain: Sequence[x509.Certificate], now: dt.datetime) -> None:
    """Every certificate valid now; each one signed by the next ("the chain given")."""
    for cert in chain:
        _check_validity(blob, cert, now)
    for n, (cert, issuer) in enumerate(itertools.pairwise(chain), start=1):
        if not _signed_by(cert, issuer):
            raise blob.error(f"the chain is broken: certificate {n + 1} ({_subject(issuer)}) "
                             f"did not sign certificate {n} ({_subject(cert)})")


def _is_ca(cert: x509.Certificate) -> bool:
    try:
        return bool(cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca)
    except x509.ExtensionNotFound:
        return cert.issuer == cert.subject  # legacy v1 self-signed root


def _parse_ca_bundle(blob: Blob) -> list[x509.Certificate]:
    certs = _parse_certs(blob)
    for cert in certs:
        if not _is_ca(cert):
            raise blob.error(f"the CA bundle holds a certificate that is not a CA "
                             f"({_subject(cert)}, a leaf?)")
    return certs


def _check_issuer_in_bundle(cert_blob: Blob, ca_blob: Blob, top: x509.Certificate,
                            bundle: Sequence[x509.Certificate]) -> None:
    if top.issuer == top.subject:
        return  # the chain ends in a root: nothing to look up
    namesakes = [ca for ca in bundle if ca.subject == top.issuer]
    if not namesakes:
        log.warning("%s: the certificate's issuer %s is not in the CA bundle %s (fine if "
                    "peers are verified against another CA than the one that issued it)",
                    cert_blob.where, top.issuer.rfc4514_string(), ca_blob.file or "inline")
        return
    if not any(_signed_by(top, ca) for ca in namesakes):
        raise cert_blob.error(
            f"the certificate {_subject(top)} is not signed by the CA "
            f"{top.issuer.rfc4514_string()} of the CA bundle {ca_blob.file or 'inline'} "
            "(same name, another key: was the CA rotated without reissuing the certificate?)")


def _load_crls(blob: Blob) -> list[x509.CertificateRevocationList]:
    blocks = _PEM_CRL.findall(blob.data)
    if not blocks:
        raise blob.error(f"no PEM CRL found ({_describe_pem(blob.data)})")
    crls = []
    for block in blocks:
        try:
            crls.append(x509.load_pem_x509_crl(block))
        except ValueError:
            raise blob.error("garbage PEM: an X509 CRL block does not decode") from None
    return crls


def _check_crls(blob: Blob, ca_blob: Blob, bundle: Sequence[x509.Certificate],
                now: dt.datetime) -> None:
    crls = _load_crls(blob)
    covered: set[x509.Name] = set()
    for crl in crls:
        issuer = crl.issuer.rfc4514_string()
        namesakes = [ca for ca in bundle if ca.subject == crl.issuer]
        # A CRL from a CA outside the bundle (an intermediate that peers send) is checked
        # by OpenSSL against the peer's chain at handshake time.
        if namesakes and not any(_crl_signed_by(crl, ca) for ca in namesakes):
            raise blob.error(f"the CRL issued by {issuer} is not signed by the CA of that "
                             f"name in the CA bundle {ca_blob.file or 'inline'}")
        next_update = crl.next_update_utc
        if next_update is not None and next_update <= now:
            raise blob.error(f"the CRL issued by {issuer} expired at {next_update.isoformat()} "
                             "(its next update is past: fetch a fresh one)")
        covered.add(crl.issuer)
    for ca in bundle:
        if ca.subject not in covered:
            raise blob.error(f"no CRL from the CA {_subject(ca)}: the whole peer chain is "
                             "checked for revocation, so every CA of the bundle needs a CRL")


def _crl_signed_by(crl: x509.CertificateRevocationList, ca: x509.Certificate) -> bool:
    key = cast(CertificateIssuerPublicKeyTypes, ca.public_key())
    try:
        return crl.is_signature_valid(key)
    except (TypeError, ValueError):  # a key type that cannot sign
        return False
