"""Load named TLS material (certificate chain, key, trust bundle, CRL) and check it.

Sources (``TlsMaterialConfig``): PEM files; a directory in the Kubernetes TLS secret layout
(``tls.crt``, ``tls.key``, ``ca.crt``); inline PEM (decoded by the config loader); or a
PKCS#12 bundle with its password in an environment variable. Everything is read into
memory and checked with ``cryptography`` before any ``SSLContext`` is built, so a bad
file gives a one-line ``MaterialError`` naming the key path, the file and the problem
(never a stack trace): unreadable, not PEM, key not matching the certificate, a leaf in
the CA bundle, an expired or not-yet-valid certificate, a wrong PKCS#12 password.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import os
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.serialization import pkcs12

from enforcer.config.model import TlsMaterialConfig


class MaterialError(ValueError):
    """A TLS material problem, one line, naming the key path and the file."""


@dataclass(frozen=True, slots=True)
class LoadedMaterial:
    name: str
    cert_pem: bytes | None  # leaf first, then any intermediates
    key_pem: bytes | None  # PKCS8, unencrypted, kept in memory only
    ca_pem: bytes | None
    crl_pem: bytes | None
    min_version: str
    leaf: x509.Certificate | None
    sources: tuple[str, ...]  # files this material was read from (for reload watching)
    fingerprint: str  # sha256 over everything loaded: a reload that changes nothing is a no-op

    @property
    def not_after(self) -> dt.datetime | None:
        return self.leaf.not_valid_after_utc if self.leaf is not None else None

    @property
    def has_identity(self) -> bool:
        return self.cert_pem is not None and self.key_pem is not None


def load_material(cfg: TlsMaterialConfig, *, now: dt.datetime | None = None) -> LoadedMaterial:
    """Read and check one material; raise ``MaterialError`` with a one-line reason."""
    now = now or dt.datetime.now(dt.UTC)
    cert_pem, key_pem, ca_pem, sources = _read_sources(cfg)
    crl_pem = _read(cfg, "crl", cfg.crl) if cfg.crl else None
    if cfg.crl:
        sources.append(cfg.crl)
    leaf = None
    if cert_pem is not None and key_pem is not None:
        chain = _parse_certs(cfg, "cert", cert_pem)
        leaf = chain[0]
        key_pem = _check_key(cfg, leaf, key_pem)
        _check_validity(cfg, leaf, now)
    if ca_pem is not None:
        _check_ca_bundle(cfg, _parse_certs(cfg, "ca", ca_pem))
    if crl_pem is not None:
        _check_crl(cfg, crl_pem)
    digest = hashlib.sha256()
    for part in (cert_pem, key_pem, ca_pem, crl_pem):
        digest.update(part or b"-")
    return LoadedMaterial(cfg.name, cert_pem, key_pem, ca_pem, crl_pem, cfg.min_version, leaf,
                          tuple(sources), digest.hexdigest())


def _where(cfg: TlsMaterialConfig, part: str) -> str:
    return f"{cfg.path}.{part}"


def _read(cfg: TlsMaterialConfig, part: str, path: str) -> bytes:
    try:
        data = Path(path).read_bytes()
    except FileNotFoundError:
        raise MaterialError(f"{_where(cfg, part)}: {path}: no such file") from None
    except IsADirectoryError:
        raise MaterialError(f"{_where(cfg, part)}: {path}: is a directory, expected a file") from None
    except OSError as exc:
        raise MaterialError(f"{_where(cfg, part)}: {path}: cannot read: {exc.strerror}") from None
    if not data.strip():
        raise MaterialError(f"{_where(cfg, part)}: {path}: file is empty")
    return data


def _read_sources(
    cfg: TlsMaterialConfig,
) -> tuple[bytes | None, bytes | None, bytes | None, list[str]]:
    sources: list[str] = []
    cert = key = ca = None
    if cfg.cert and cfg.key:
        cert, key = _read(cfg, "cert", cfg.cert), _read(cfg, "key", cfg.key)
        sources += [cfg.cert, cfg.key]
    elif cfg.dir:
        cert, key, ca, sources = _read_secret_dir(cfg, cfg.dir)
    elif cfg.inline_cert or cfg.inline_key:
        cert, key, ca = cfg.inline_cert, cfg.inline_key, cfg.inline_ca
        if cert is None or key is None:
            raise MaterialError(f"{_where(cfg, 'inline')}: needs both cert and key")
    elif cfg.pkcs12:
        cert, key, ca = _read_pkcs12(cfg, cfg.pkcs12)
        sources.append(cfg.pkcs12)
    if cfg.ca:
        ca = _read(cfg, "ca", cfg.ca)
        sources.append(cfg.ca)
    elif cfg.inline_ca and not cfg.inline_cert:
        ca = cfg.inline_ca
    return cert, key, ca, sources


def _read_secret_dir(
    cfg: TlsMaterialConfig, directory: str
) -> tuple[bytes, bytes, bytes | None, list[str]]:
    if not os.path.isdir(directory):
        raise MaterialError(f"{_where(cfg, 'dir')}: {directory}: not a directory")
    crt, key, ca = (os.path.join(directory, n) for n in ("tls.crt", "tls.key", "ca.crt"))
    ca_pem = _read(cfg, "dir", ca) if os.path.exists(ca) else None
    # Watch the directory's own entries: Kubernetes swaps the ..data symlink.
    return _read(cfg, "dir", crt), _read(cfg, "dir", key), ca_pem, [crt, key, ca]


def _read_pkcs12(cfg: TlsMaterialConfig, path: str) -> tuple[bytes, bytes, bytes | None]:
    data = _read(cfg, "pkcs12", path)
    password: bytes | None = None
    if cfg.pkcs12_password_env:
        value = os.environ.get(cfg.pkcs12_password_env)
        if value is None:
            raise MaterialError(f"{_where(cfg, 'password_env')}: environment variable "
                                f"{cfg.pkcs12_password_env} is not set")
        password = value.encode()
    try:
        key, cert, extra = pkcs12.load_key_and_certificates(data, password)
    except ValueError:
        raise MaterialError(f"{_where(cfg, 'pkcs12')}: {path}: cannot open PKCS#12 bundle "
                            "(wrong password or not PKCS#12)") from None
    if key is None or cert is None:
        raise MaterialError(f"{_where(cfg, 'pkcs12')}: {path}: bundle has no key or no certificate")
    pem = serialization.Encoding.PEM
    key_pem = key.private_bytes(pem, serialization.PrivateFormat.PKCS8,
                                serialization.NoEncryption())
    cert_pem = cert.public_bytes(pem)
    ca_pem = b"".join(c.public_bytes(pem) for c in extra) or None
    return cert_pem, key_pem, ca_pem


def _parse_certs(cfg: TlsMaterialConfig, part: str, pem: bytes) -> list[x509.Certificate]:
    if b"-----BEGIN CERTIFICATE-----" not in pem:
        raise MaterialError(f"{_where(cfg, part)}: no PEM certificate found "
                            f"({_describe_pem(pem)})")
    try:
        return x509.load_pem_x509_certificates(pem)
    except ValueError as exc:
        raise MaterialError(f"{_where(cfg, part)}: cannot parse certificate: {exc}") from None


def _describe_pem(pem: bytes) -> str:
    if b"PRIVATE KEY-----" in pem:
        return "the file holds a private key"
    return "not PEM" if b"-----BEGIN" not in pem else "the file holds another PEM type"


def _check_key(cfg: TlsMaterialConfig, leaf: x509.Certificate, key_pem: bytes) -> bytes:
    if b"PRIVATE KEY-----" not in key_pem:
        raise MaterialError(f"{_where(cfg, 'key')}: no PEM private key found "
                            f"({'the file holds a certificate' if b'CERTIFICATE' in key_pem else 'not PEM'})")
    try:
        key = serialization.load_pem_private_key(key_pem, password=None)
    except TypeError:
        raise MaterialError(f"{_where(cfg, 'key')}: the private key is encrypted; "
                            "give an unencrypted key (or PKCS#12 with password_env)") from None
    except ValueError as exc:
        raise MaterialError(f"{_where(cfg, 'key')}: cannot parse private key: {exc}") from None
    pub = serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    if key.public_key().public_bytes(*pub) != leaf.public_key().public_bytes(*pub):
        raise MaterialError(f"{_where(cfg, 'key')}: the private key does not match the "
                            f"certificate (subject {leaf.subject.rfc4514_string() or '<empty>'})")
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def _check_validity(cfg: TlsMaterialConfig, leaf: x509.Certificate, now: dt.datetime) -> None:
    subject = leaf.subject.rfc4514_string() or "<empty subject>"
    if leaf.not_valid_after_utc <= now:
        raise MaterialError(f"{_where(cfg, 'cert')}: certificate {subject} expired at "
                            f"{leaf.not_valid_after_utc.isoformat()}")
    if leaf.not_valid_before_utc > now + dt.timedelta(minutes=5):
        raise MaterialError(f"{_where(cfg, 'cert')}: certificate {subject} is not valid before "
                            f"{leaf.not_valid_before_utc.isoformat()}")


def _check_ca_bundle(cfg: TlsMaterialConfig, certs: list[x509.Certificate]) -> None:
    for cert in certs:
        try:
            bc = cert.extensions.get_extension_for_class(x509.BasicConstraints).value
            is_ca = bc.ca
        except x509.ExtensionNotFound:
            is_ca = cert.issuer == cert.subject  # legacy v1 self-signed root
        if not is_ca:
            raise MaterialError(f"{_where(cfg, 'ca')}: the CA bundle holds a certificate that is "
                                f"not a CA ({cert.subject.rfc4514_string()})")


def _check_crl(cfg: TlsMaterialConfig, pem: bytes) -> None:
    try:
        x509.load_pem_x509_crl(pem)
    except ValueError as exc:
        raise MaterialError(f"{_where(cfg, 'crl')}: cannot parse CRL: {exc}") from None
