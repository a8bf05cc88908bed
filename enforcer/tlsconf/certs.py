"""Certificate tooling: throwaway CAs, leaf certificates, CRLs and `certs show` facts.

Used by ``enforcer certs``, ``enforcer demo`` and the tests. Everything here writes PEM
files with the ``cryptography`` library and no event loop:

- ``init_ca`` makes a self-signed CA (``DIR/ca.crt`` + ``DIR/ca.key``);
- ``issue`` signs a leaf with SPIFFE URI / DNS / IP SANs (``OUT/<name>.crt`` + ``.key``);
- ``init_pki`` / ``init_demo_pki`` build a working CA + server + client set (the demo one
  adds a separate "rogue" CA whose client must be refused);
- ``write_crl`` writes a CRL signed by a CA; ``describe`` reports a certificate's identity
  the way rules see it.

Private keys are unencrypted PKCS#8 PEM, created with mode 0600 from the start (written to
a fresh temporary file opened with that mode, then renamed into place), never chmod-ed
after the fact. Every problem is a ``CertsError`` with a one-line message naming the file.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import os
import re
import secrets
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TypeAlias

from cryptography import x509
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from enforcer.tlsconf.files import FileProblem, read_nonempty
from enforcer.tlsconf.identity import IdentityError, identity_from_der, parse_spiffe_id

PrivateKey: TypeAlias = ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey

CA_CERT = "ca.crt"
CA_KEY = "ca.key"
KEY_TYPES = ("ec", "rsa", "rsa2048", "rsa3072")
DEMO_TRUST_DOMAIN = "enforcer.demo"
DEMO_SERVER_ID = f"spiffe://{DEMO_TRUST_DOMAIN}/ns/demo/sa/inbound"
DEMO_CLIENT_ID = f"spiffe://{DEMO_TRUST_DOMAIN}/ns/demo/sa/outbound"
CLOCK_SKEW = dt.timedelta(minutes=5)  # not_before is back-dated by this much
_NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")  # all used with fullmatch
_TRUST_DOMAIN_RE = re.compile(r"[a-z0-9._-]+")
_PATH_SEGMENT_RE = re.compile(r"[A-Za-z0-9._-]+")
_DNS_LABEL_RE = re.compile(r"\*|[A-Za-z0-9_]([A-Za-z0-9_-]*[A-Za-z0-9])?")
_EKU_NAMES = {
    ExtendedKeyUsageOID.SERVER_AUTH: "serverAuth",
    ExtendedKeyUsageOID.CLIENT_AUTH: "clientAuth",
}


class CertsError(Exception):
    """A one-line, user-facing problem that names the file (or input) concerned."""


@dataclass(frozen=True)
class IssuedPaths:
    cert: Path  # the leaf alone, PEM
    key: Path  # PKCS#8 PEM, mode 0600
    ca: Path  # the issuing CA's certificate, PEM


@dataclass(frozen=True)
class Pki:
    dir: Path
    ca: Path
    ca_key: Path
    server: IssuedPaths
    client: IssuedPaths


@dataclass(frozen=True)
class DemoPki:
    dir: Path
    ca: Path
    ca_key: Path
    server: IssuedPaths
    client: IssuedPaths
    rogue_ca: Path  # a CA nobody trusts: dir/rogue/ca.crt
    rogue_client: IssuedPaths  # client leaf signed by the rogue CA


# --------------------------------------------------------------------------- validation


def validate_spiffe_id(spiffe_id: str) -> str:
    """Return the trust domain of a well-formed workload SPIFFE ID, else raise CertsError.

    The final word is ``identity.parse_spiffe_id``, so an ID accepted here is one that
    rules will see as ``spiffe_id`` (the checks before it only give a precise message).
    """
    prefix = "spiffe://"
    if not spiffe_id.startswith(prefix):
        raise CertsError(f"bad SPIFFE ID {spiffe_id!r}: must start with spiffe://")
    trust_domain, _, path = spiffe_id[len(prefix) :].partition("/")
    if not trust_domain:
        raise CertsError(f"bad SPIFFE ID {spiffe_id!r}: no trust domain")
    if not _TRUST_DOMAIN_RE.fullmatch(trust_domain):
        raise CertsError(f"bad SPIFFE ID {spiffe_id!r}: trust domain may use only a-z 0-9 . - _")
    if not path:
        raise CertsError(f"bad SPIFFE ID {spiffe_id!r}: no workload path (spiffe://td/ns/x/sa/y)")
    for segment in path.split("/"):
        if segment in ("", ".", "..") or not _PATH_SEGMENT_RE.fullmatch(segment):
            raise CertsError(
                f"bad SPIFFE ID {spiffe_id!r}: path segment {segment!r} is not allowed"
            )
    parsed = parse_spiffe_id(spiffe_id)
    if parsed is None:
        raise CertsError(f"bad SPIFFE ID {spiffe_id!r}: not a well-formed SPIFFE ID")
    return parsed[0]


def _check_name(name: str) -> None:
    if not _NAME_RE.fullmatch(name):
        raise CertsError(
            f"bad certificate name {name!r}: use 1-64 of A-Z a-z 0-9 . - _ (it names files)"
        )


def _parse_ips(ips: Sequence[str]) -> list[ipaddress.IPv4Address | ipaddress.IPv6Address]:
    parsed = []
    for ip in ips:
        try:
            parsed.append(ipaddress.ip_address(ip))
        except ValueError:
            raise CertsError(f"bad IP address {ip!r}") from None
    return parsed


def _check_dns(dns: Sequence[str]) -> None:
    for name in dns:
        labels = name.split(".")
        ok = name.isascii() and len(name) <= 253 and all(labels)
        ok = ok and all(_DNS_LABEL_RE.fullmatch(label) for label in labels)
        if not ok or "*" in name[1:]:
            raise CertsError(f"bad DNS name {name!r}")


# --------------------------------------------------------------------------- files


def _write_atomic(path: Path, data: bytes, mode: int) -> None:
    """Write ``data`` to ``path`` via a temporary file created with ``mode``, then rename."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise CertsError(f"{path.parent}: cannot create the directory: "
                         f"{exc.strerror or exc}") from None
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(6)}.tmp")
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        raise CertsError(f"{path}: cannot write: {exc.strerror or exc}") from None


def _key_pem(key: PrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def _write_key(path: Path, key: PrivateKey) -> None:
    _write_atomic(path, _key_pem(key), 0o600)


def _write_cert(path: Path, cert: x509.Certificate) -> None:
    _write_atomic(path, cert.public_bytes(serialization.Encoding.PEM), 0o644)


def _read_bytes(path: Path) -> bytes:
    try:
        return read_nonempty(path)
    except FileProblem as exc:
        raise CertsError(f"{path}: {exc}") from None


def load_certificates(path: Path) -> list[x509.Certificate]:
    """All certificates in a PEM (or single DER) file; CertsError if there are none."""
    data = _read_bytes(path)
    if b"-----BEGIN" not in data:
        try:
            return [x509.load_der_x509_certificate(data)]
        except ValueError:
            raise CertsError(f"{path}: not a PEM or DER certificate") from None
    if b"-----BEGIN CERTIFICATE-----" not in data:
        raise CertsError(f"{path}: no certificate in file (no BEGIN CERTIFICATE block)")
    try:
        return x509.load_pem_x509_certificates(data)
    except ValueError:
        raise CertsError(f"{path}: garbage PEM: cannot parse the certificate") from None


def _load_key(path: Path) -> PrivateKey:
    data = _read_bytes(path)
    try:
        key = serialization.load_pem_private_key(data, password=None)
    except TypeError:
        raise CertsError(f"{path}: private key is encrypted (need an unencrypted key)") from None
    except (ValueError, UnsupportedAlgorithm):
        raise CertsError(f"{path}: not a PEM private key") from None
    if not isinstance(key, ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey):
        raise CertsError(f"{path}: unsupported key type (need EC or RSA)")
    return key


def load_ca(ca_dir: Path) -> tuple[x509.Certificate, PrivateKey]:
    """Read ``ca_dir/ca.crt`` and ``ca_dir/ca.key`` and check they belong together."""
    cert_path, key_path = ca_dir / CA_CERT, ca_dir / CA_KEY
    if not cert_path.exists() and not key_path.exists():
        raise CertsError(
            f"{ca_dir}: no CA here (expected {CA_CERT} and {CA_KEY}; "
            "create one with `enforcer certs init`)"
        )
    cert = load_certificates(cert_path)[0]
    key = _load_key(key_path)
    if cert.public_key() != key.public_key():
        raise CertsError(f"{key_path}: key does not match certificate {cert_path}")
    if not _is_ca(cert):
        raise CertsError(f"{cert_path}: not a CA certificate (basicConstraints CA:FALSE)")
    return cert, key


# --------------------------------------------------------------------------- building


def _new_key(key_type: str) -> PrivateKey:
    if key_type == "ec":
        return ec.generate_private_key(ec.SECP256R1())
    if key_type in ("rsa", "rsa2048"):
        return rsa.generate_private_key(public_exponent=65537, key_size=2048)
    if key_type == "rsa3072":
        return rsa.generate_private_key(public_exponent=65537, key_size=3072)
    raise CertsError(f"bad key type {key_type!r} (known: {', '.join(KEY_TYPES)})")


def _utcnow() -> dt.datetime:
    return dt.datetime.now(dt.UTC).replace(microsecond=0)


def _aware(when: dt.datetime) -> dt.datetime:
    """Naive datetimes are taken as UTC (as cryptography does)."""
    return when if when.tzinfo is not None else when.replace(tzinfo=dt.UTC)


def _validity(
    days: int, not_before: dt.datetime | None, not_after: dt.datetime | None
) -> tuple[dt.datetime, dt.datetime]:
    if days <= 0 and not_after is None:
        raise CertsError(f"bad validity: days must be positive (got {days})")
    start = _aware(not_before) if not_before is not None else _utcnow() - CLOCK_SKEW
    end = (
        _aware(not_after) if not_after is not None else start + CLOCK_SKEW + dt.timedelta(days=days)
    )
    if end <= start:
        raise CertsError(f"bad validity: not_after {end} is not after not_before {start}")
    return start, end


def _is_ca(cert: x509.Certificate) -> bool:
    try:
        return bool(cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca)
    except x509.ExtensionNotFound:
        return False


def _key_usage(*, ca: bool, rsa_key: bool) -> x509.KeyUsage:
    return x509.KeyUsage(
        digital_signature=True,
        content_commitment=False,
        key_encipherment=rsa_key and not ca,
        data_encipherment=False,
        key_agreement=False,
        key_cert_sign=ca,
        crl_sign=ca,
        encipher_only=False,
        decipher_only=False,
    )


def _build_ca(name: str, key: PrivateKey, start: dt.datetime, end: dt.datetime) -> x509.Certificate:
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    ski = x509.SubjectKeyIdentifier.from_public_key(key.public_key())
    builder = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(start)
        .not_valid_after(end)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(_key_usage(ca=True, rsa_key=False), critical=True)
        .add_extension(ski, critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ski), critical=False
        )
    )
    return builder.sign(key, hashes.SHA256())


def _leaf_subject(name: str, o: str | None, ou: Sequence[str]) -> x509.Name:
    attrs = []
    if o:
        attrs.append(x509.NameAttribute(NameOID.ORGANIZATION_NAME, o))
    attrs += [x509.NameAttribute(NameOID.ORGANIZATIONAL_UNIT_NAME, unit) for unit in ou]
    attrs.append(x509.NameAttribute(NameOID.COMMON_NAME, name))
    return x509.Name(attrs)


def _sans(spiffe_id: str | None, dns: Sequence[str], ips: Sequence[str]) -> list[x509.GeneralName]:
    names: list[x509.GeneralName] = []
    if spiffe_id is not None:
        validate_spiffe_id(spiffe_id)
        names.append(x509.UniformResourceIdentifier(spiffe_id))
    _check_dns(dns)
    names += [x509.DNSName(d) for d in dns]
    names += [x509.IPAddress(ip) for ip in _parse_ips(ips)]
    return names


def _eku(server: bool, client: bool) -> x509.ExtendedKeyUsage:
    if not (server or client):
        raise CertsError("a leaf needs serverAuth, clientAuth or both")
    usages = [ExtendedKeyUsageOID.SERVER_AUTH] if server else []
    usages += [ExtendedKeyUsageOID.CLIENT_AUTH] if client else []
    return x509.ExtendedKeyUsage(usages)


# --------------------------------------------------------------------------- public API


def self_signed_pem(name: str, *, days: int = 1) -> tuple[bytes, bytes]:
    """A self-signed EC certificate for ``name`` and its key, as PEM, written nowhere (a
    throwaway: usable as a server's own certificate, trusted by pinning it)."""
    key = _new_key("ec")
    start, end = _validity(days, None, None)
    return _build_ca(name, key, start, end).public_bytes(serialization.Encoding.PEM), _key_pem(key)


def init_ca(
    dir: Path,
    *,
    name: str = "enforcer demo CA",
    key_type: str = "ec",
    days: int = 365,
    force: bool = False,
) -> tuple[Path, Path]:
    """Create a self-signed CA as ``dir/ca.crt`` and ``dir/ca.key`` (0600).

    Refuses to replace an existing ``ca.key`` unless ``force``: losing a CA key silently
    would orphan every certificate it signed.
    """
    cert_path, key_path = dir / CA_CERT, dir / CA_KEY
    if key_path.exists() and not force:
        raise CertsError(f"{key_path}: a CA key already exists (use --force to replace it)")
    if dir.exists() and not dir.is_dir():
        raise CertsError(f"{dir}: not a directory")
    key = _new_key(key_type)
    start, end = _validity(days, None, None)
    cert = _build_ca(name, key, start, end)
    _write_key(key_path, key)
    _write_cert(cert_path, cert)
    return cert_path, key_path


def issue(
    ca_dir: Path,
    out_dir: Path | None = None,
    *,
    name: str,
    spiffe_id: str | None = None,
    dns: Sequence[str] = (),
    ips: Sequence[str] = (),
    key_type: str = "ec",
    days: int = 90,
    server: bool = True,
    client: bool = True,
    o: str | None = None,
    ou: Sequence[str] = (),
    not_before: dt.datetime | None = None,
    not_after: dt.datetime | None = None,
) -> IssuedPaths:
    """Sign a leaf with ``ca_dir``'s CA; write ``out_dir/<name>.crt`` and ``<name>.key``.

    ``out_dir`` defaults to ``ca_dir``. The certificate file holds the leaf alone; the
    returned ``ca`` points at ``ca_dir/ca.crt``. Subject is CN=name (plus O/OU if given);
    SANs are the SPIFFE URI, DNS names and IPs; EKU is serverAuth and/or clientAuth.
    """
    out = ca_dir if out_dir is None else out_dir
    _check_name(name)
    if name == "ca" and out.resolve() == ca_dir.resolve():
        raise CertsError(f"bad certificate name 'ca': it would overwrite the CA in {ca_dir}")
    sans = _sans(spiffe_id, dns, ips)
    eku = _eku(server, client)
    start, end = _validity(days, not_before, not_after)
    ca_cert, ca_key = load_ca(ca_dir)
    key = _new_key(key_type)
    builder = (
        x509.CertificateBuilder()
        .subject_name(_leaf_subject(name, o, ou))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(start)
        .not_valid_after(end)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            _key_usage(ca=False, rsa_key=isinstance(key, rsa.RSAPrivateKey)), critical=True
        )
        .add_extension(eku, critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False
        )
    )
    if sans:
        builder = builder.add_extension(x509.SubjectAlternativeName(sans), critical=False)
    cert = builder.sign(ca_key, hashes.SHA256())
    paths = IssuedPaths(cert=out / f"{name}.crt", key=out / f"{name}.key", ca=ca_dir / CA_CERT)
    _write_key(paths.key, key)
    _write_cert(paths.cert, cert)
    return paths


def init_pki(dir: Path, *, force: bool = False) -> Pki:
    """A working throwaway set: CA, "server" and "client" leafs with SPIFFE URI SANs."""
    ca, ca_key = init_ca(dir, force=force)
    server = issue(
        dir, dir, name="server", spiffe_id=DEMO_SERVER_ID, dns=["localhost"], ips=["127.0.0.1"]
    )
    client = issue(dir, dir, name="client", spiffe_id=DEMO_CLIENT_ID, dns=["localhost"])
    return Pki(dir=dir, ca=ca, ca_key=ca_key, server=server, client=client)


def init_demo_pki(dir: Path) -> DemoPki:
    """``init_pki`` plus a rogue CA in ``dir/rogue/`` and a "rogue" client leaf it signed.

    The rogue leaf claims the real client's SPIFFE ID: a server trusting only the real CA
    must refuse it, showing that trust comes from the CA and not from the name.
    """
    pki = init_pki(dir, force=True)
    rogue_dir = dir / "rogue"
    rogue_ca, _ = init_ca(rogue_dir, name="enforcer rogue CA", force=True)
    rogue = issue(
        rogue_dir,
        rogue_dir,
        name="rogue",
        spiffe_id=DEMO_CLIENT_ID,
        dns=["localhost"],
        server=False,
    )
    return DemoPki(
        dir=dir,
        ca=pki.ca,
        ca_key=pki.ca_key,
        server=pki.server,
        client=pki.client,
        rogue_ca=rogue_ca,
        rogue_client=rogue,
    )


def write_crl(ca_dir: Path, out: Path, revoked_serials: Sequence[int], *, days: int = 7) -> Path:
    """Write a PEM CRL signed by ``ca_dir``'s CA listing ``revoked_serials``; atomic."""
    if days <= 0:
        raise CertsError(f"bad CRL validity: days must be positive (got {days})")
    ca_cert, ca_key = load_ca(ca_dir)
    now = _utcnow()
    builder = (
        x509.CertificateRevocationListBuilder()
        .issuer_name(ca_cert.subject)
        .last_update(now - CLOCK_SKEW)
        .next_update(now + dt.timedelta(days=days))
        .add_extension(x509.CRLNumber(time.time_ns() // 1000), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False
        )
    )
    for serial in revoked_serials:
        entry = (
            x509.RevokedCertificateBuilder()
            .serial_number(serial)
            .revocation_date(now - CLOCK_SKEW)
            .build()
        )
        builder = builder.add_revoked_certificate(entry)
    crl = builder.sign(ca_key, hashes.SHA256())
    _write_atomic(out, crl.public_bytes(serialization.Encoding.PEM), 0o644)
    return out


# --------------------------------------------------------------------------- describe


def _eku_names(cert: x509.Certificate) -> list[str]:
    try:
        eku = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    except x509.ExtensionNotFound:
        return []
    return [_EKU_NAMES.get(oid, oid.dotted_string) for oid in eku]


def _key_description(cert: x509.Certificate) -> str:
    key = cert.public_key()
    if isinstance(key, ec.EllipticCurvePublicKey):
        return f"EC {key.curve.name}"
    if isinstance(key, rsa.RSAPublicKey):
        return f"RSA {key.key_size}"
    return type(key).__name__


def _identity_fields(cert: x509.Certificate) -> dict[str, object]:
    """The peer identity exactly as rules and flow records see it (``tlsconf.identity``)."""
    try:
        ident = identity_from_der(cert.public_bytes(serialization.Encoding.DER))
    except IdentityError as exc:
        raise CertsError(f"cannot read the certificate's identity: {exc}") from None
    return {
        "spiffe_id": ident.spiffe_id,
        "trust_domain": ident.trust_domain,
        "spiffe_path": ident.spiffe_path,
        "uri": list(ident.uri),
        "dns": list(ident.dns),
        "ip": list(ident.ip),
        "cn": ident.cn,
        "o": list(ident.o),
        "ou": list(ident.ou),
        "issuer_cn": ident.issuer_cn,
        "serial": ident.serial,
        "not_after": ident.not_after.isoformat(),
        "spki_sha256": ident.spki_sha256,
    }


def describe(pem_path: Path) -> dict[str, object]:
    """Facts about the first certificate in ``pem_path`` for ``enforcer certs show``.

    The identity keys (spiffe_id ... spki_sha256) are exactly what rules and flow records
    see; the rest (subject, fingerprint, EKU, ...) is for people.
    """
    certs = load_certificates(pem_path)
    cert = certs[0]
    return {
        "file": str(pem_path),
        **_identity_fields(cert),
        "not_before": cert.not_valid_before_utc.isoformat(),
        "subject": cert.subject.rfc4514_string(),
        "issuer": cert.issuer.rfc4514_string(),
        "is_ca": _is_ca(cert),
        "key": _key_description(cert),
        "extended_key_usage": _eku_names(cert),
        "sha256_fingerprint": cert.fingerprint(hashes.SHA256()).hex(":"),
        "chain_length": len(certs),
    }
