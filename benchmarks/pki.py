"""The one set of certificates every contestant uses: ECDSA P-256 CA, server and client.

Made with ``enforcer.tlsconf.certs.init_pki`` (SPIFFE URI SANs, DNS SAN ``localhost``),
plus the combined cert+key PEM files haproxy wants for ``crt``.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from enforcer.tlsconf.certs import DEMO_CLIENT_ID, DEMO_SERVER_ID, init_pki

SERVER_NAME = "localhost"  # DNS SAN on the server certificate; peers verify this name


@dataclass(frozen=True)
class BenchPki:
    ca: Path
    server_cert: Path
    server_key: Path
    server_pem: Path  # cert + key in one file
    client_cert: Path
    client_key: Path
    client_pem: Path
    server_id: str = DEMO_SERVER_ID
    client_id: str = DEMO_CLIENT_ID


def make_pki(directory: Path) -> BenchPki:
    pki = init_pki(directory, force=True)
    server_pem = directory / "server.pem"
    client_pem = directory / "client.pem"
    for pem, issued in ((server_pem, pki.server), (client_pem, pki.client)):
        pem.write_bytes(issued.cert.read_bytes() + issued.key.read_bytes())
        pem.chmod(0o600)
    return BenchPki(ca=pki.ca, server_cert=pki.server.cert, server_key=pki.server.key,
                    server_pem=server_pem, client_cert=pki.client.cert,
                    client_key=pki.client.key, client_pem=client_pem)
