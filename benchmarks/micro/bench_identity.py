"""Micro-benchmark: peer identity extraction per handshake, cached vs uncached.

Run: python benchmarks/micro/bench_identity.py [--number N]
Prints operations per second (best of 5 timeit repeats) for a typical SPIFFE X.509-SVID
(ECDSA P-256, one URI SAN, a DNS SAN), an RSA-2048 certificate with a dozen SANs, and a
certificate with 2,000 DNS SANs:
- uncached: ``parse_der`` (what the first handshake from a certificate costs),
- cached: ``identity_from_der`` on a fresh ``bytes`` copy of a certificate already seen
  (what every later handshake costs: one sha256 and one dict lookup).
"""

from __future__ import annotations

import argparse
import datetime as dt
import functools
import ipaddress
import sys
import timeit
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # run from a checkout

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import NameOID

from enforcer.tlsconf.identity import cache_clear, identity_from_der, parse_der


def make_der(key: ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey,
             sans: list[x509.GeneralName]) -> bytes:
    now = dt.datetime.now(dt.UTC)
    subject = x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "Shop"),
                         x509.NameAttribute(NameOID.ORGANIZATIONAL_UNIT_NAME, "payments"),
                         x509.NameAttribute(NameOID.COMMON_NAME, "frontend")])
    issuer = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "Mesh CA")])
    cert = (x509.CertificateBuilder().subject_name(subject).issuer_name(issuer)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now).not_valid_after(now + dt.timedelta(hours=24))
            .add_extension(x509.SubjectAlternativeName(sans), critical=False)
            .sign(key, hashes.SHA256()))
    return cert.public_bytes(serialization.Encoding.DER)


def certificates() -> list[tuple[str, bytes]]:
    ec_key = ec.generate_private_key(ec.SECP256R1())
    rsa_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    svid = make_der(ec_key, [
        x509.UniformResourceIdentifier("spiffe://cluster.local/ns/shop/sa/frontend"),
        x509.DNSName("frontend.shop.svc.cluster.local")])
    several: list[x509.GeneralName] = [x509.DNSName(f"host{i}.shop.example") for i in range(8)]
    several += [x509.IPAddress(ipaddress.ip_address(f"10.0.0.{i}")) for i in range(1, 4)]
    several.append(x509.UniformResourceIdentifier("spiffe://cluster.local/ns/shop/sa/api"))
    huge: list[x509.GeneralName] = [x509.DNSName(f"h{i}.big.example") for i in range(2000)]
    return [("SPIFFE SVID, P-256", svid), ("RSA-2048, 12 SANs", make_der(rsa_key, several)),
            ("P-256, 2,000 DNS SANs", make_der(ec_key, huge))]


def _cached(copy: bytearray) -> object:
    return identity_from_der(bytes(copy))  # a fresh bytes object, as from a handshake


def rate(fn: Callable[[], object], number: int) -> float:
    return number / min(timeit.repeat(fn, number=number, repeat=5))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--number", type=int, default=20000)
    args = parser.parse_args(argv)
    cache_clear()
    for name, der in certificates():
        size = len(der)
        slow = max(1, args.number // (200 if size > 10000 else 10))
        uncached = rate(functools.partial(parse_der, der), slow)
        identity_from_der(der)
        cached = rate(functools.partial(_cached, bytearray(der)), args.number)
        print(f"{name:<24} ({size:>6} B DER)  uncached {uncached:>10,.0f}/s "
              f"({1e6 / uncached:>8.1f} µs)   cached {cached:>10,.0f}/s "
              f"({1e6 / cached:>6.2f} µs)")


if __name__ == "__main__":
    main()
