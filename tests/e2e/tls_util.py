"""Helpers for the TLS tests: a two-level PKI, a Kubernetes-style secret mount that can be
rotated with the ``..data`` symlink swap, memory-BIO handshakes and real mTLS clients."""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import hashlib
import os
import socket
import ssl
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from enforcer.config.model import TlsMaterialConfig
from enforcer.tlsconf.certs import IssuedPaths
from tests.e2e.harness import LocalServer

PEM = serialization.Encoding.PEM


# --------------------------------------------------------------------------- certificates


def cert_pem(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(PEM)


def key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def serial_of_der(der: bytes | None) -> int:
    assert der is not None
    return x509.load_der_x509_certificate(der).serial_number


def serial_of_file(path: Path) -> int:
    return x509.load_pem_x509_certificate(path.read_bytes()).serial_number


@dataclass
class Issued:
    cert: x509.Certificate
    key: ec.EllipticCurvePrivateKey

    @property
    def cert_pem(self) -> bytes:
        return cert_pem(self.cert)

    @property
    def key_pem(self) -> bytes:
        return key_pem(self.key)


def _name(cn: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])


def make_cert(cn: str, *, issuer: Issued | None = None, ca: bool = False,
              path_length: int | None = None, dns: tuple[str, ...] = (),
              uri: tuple[str, ...] = (), days: float = 30,
              not_before: dt.datetime | None = None) -> Issued:
    """A certificate signed by ``issuer`` (self-signed without one)."""
    key = ec.generate_private_key(ec.SECP256R1())
    start = not_before or dt.datetime.now(dt.UTC) - dt.timedelta(minutes=10)
    signer_key = issuer.key if issuer else key
    builder = (
        x509.CertificateBuilder()
        .subject_name(_name(cn))
        .issuer_name(issuer.cert.subject if issuer else _name(cn))
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(start)
        .not_valid_after(start + dt.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=ca, path_length=path_length if ca else None),
                       critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()),
                       critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(
            signer_key.public_key()), critical=False)
    )
    if ca:
        builder = builder.add_extension(x509.KeyUsage(
            digital_signature=True, content_commitment=False, key_encipherment=False,
            data_encipherment=False, key_agreement=False, key_cert_sign=True, crl_sign=True,
            encipher_only=False, decipher_only=False), critical=True)
    sans: list[x509.GeneralName] = [x509.DNSName(d) for d in dns]
    sans += [x509.UniformResourceIdentifier(u) for u in uri]
    if sans:
        builder = builder.add_extension(x509.SubjectAlternativeName(sans), critical=False)
    return Issued(builder.sign(signer_key, hashes.SHA256()), key)


def make_crl(issuer: Issued, revoked: tuple[int, ...] = (), *,
             next_update_days: float = 7) -> bytes:
    now = dt.datetime.now(dt.UTC)
    builder = (
        x509.CertificateRevocationListBuilder()
        .issuer_name(issuer.cert.subject)
        .last_update(min(now, now + dt.timedelta(days=next_update_days)) - dt.timedelta(days=1))
        .next_update(now + dt.timedelta(days=next_update_days))
        .add_extension(x509.CRLNumber(time.time_ns() // 1000), critical=False)
    )
    for serial in revoked:
        builder = builder.add_revoked_certificate(
            x509.RevokedCertificateBuilder().serial_number(serial)
            .revocation_date(now - dt.timedelta(minutes=10)).build())
    return builder.sign(issuer.key, hashes.SHA256()).public_bytes(PEM)


@dataclass
class ChainPki:
    """root -> intermediate -> server/client leaves, all in memory."""

    root: Issued
    inter: Issued
    server: Issued
    client: Issued

    @classmethod
    def create(cls) -> ChainPki:
        root = make_cert("test root CA", ca=True, path_length=1)
        inter = make_cert("test intermediate CA", issuer=root, ca=True, path_length=0)
        server = make_cert("server", issuer=inter, dns=("localhost",),
                           uri=("spiffe://test/ns/a/sa/server",))
        client = make_cert("client", issuer=inter, uri=("spiffe://test/ns/a/sa/client",))
        return cls(root, inter, server, client)


def write(path: Path, data: bytes) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return str(path)


def material_cfg(name: str = "mesh", **kw: Any) -> TlsMaterialConfig:
    return TlsMaterialConfig(name=name, path=f"tls.{name}", **kw)


# --------------------------------------------------------------------------- secret mount


class SecretMount:
    """A directory laid out like a Kubernetes Secret volume:

        tls.crt -> ..data/tls.crt      (created once)
        ..data -> ..2026_01_01_00_00_00.123456789   (renamed over atomically on update)
        ..2026_.../tls.crt, tls.key, ca.crt

    ``update()`` writes a new timestamped directory, points ``..data_tmp`` at it, renames
    it over ``..data`` and removes the old directory, as kubelet's AtomicWriter does.
    """

    FILES = ("tls.crt", "tls.key", "ca.crt")

    def __init__(self, path: Path) -> None:
        self.path = path
        self.path.mkdir(parents=True, exist_ok=True)
        self._n = 0

    def update(self, files: dict[str, bytes]) -> None:
        self._n += 1
        stamp = dt.datetime.now(dt.UTC).strftime("..%Y_%m_%d_%H_%M_%S.") + f"{self._n:09d}"
        new = self.path / stamp
        new.mkdir()
        for name, data in files.items():
            (new / name).write_bytes(data)
        data_link = self.path / "..data"
        old = os.readlink(data_link) if data_link.is_symlink() else None
        tmp = self.path / "..data_tmp"
        os.symlink(stamp, tmp)
        os.rename(tmp, data_link)
        for name in files:
            link = self.path / name
            if not link.is_symlink():
                os.symlink(f"..data/{name}", link)
        if old is not None:
            for f in (self.path / old).iterdir():
                f.unlink()
            (self.path / old).rmdir()


# --------------------------------------------------------------------------- handshakes


def bio_handshake(server: ssl.SSLContext, client: ssl.SSLContext, *,
                  server_hostname: str | None = None,
                  session: ssl.SSLSession | None = None) -> tuple[ssl.SSLObject, ssl.SSLObject]:
    """Run a full handshake between two contexts over memory BIOs, then move one byte
    each way (so TLS 1.3 tickets reach the client). Raises ``ssl.SSLError``."""
    s_in, s_out, c_in, c_out = (ssl.MemoryBIO() for _ in range(4))
    s = server.wrap_bio(s_in, s_out, server_side=True)
    c = client.wrap_bio(c_in, c_out, server_side=False, server_hostname=server_hostname,
                        session=session)
    done = [False, False]
    for _ in range(10):
        for i, (obj, out, peer_in) in enumerate(((c, c_out, s_in), (s, s_out, c_in))):
            if not done[i]:
                try:
                    obj.do_handshake()
                    done[i] = True
                except ssl.SSLWantReadError:
                    pass
                finally:
                    peer_in.write(out.read())
        if all(done):
            break
    assert all(done), "handshake did not finish"
    s.write(b"s")
    c_in.write(s_out.read())
    assert c.read(1) == b"s"
    c.write(b"c")
    s_in.write(c_out.read())
    assert s.read(1) == b"c"
    return s, c


# --------------------------------------------------------------------------- real clients


def mtls_client(ca: Path | str, cert: Path | str, key: Path | str,
                min_version: ssl.TLSVersion | None = None) -> ssl.SSLContext:
    ctx = ssl.create_default_context(cafile=str(ca))
    ctx.load_cert_chain(str(cert), str(key))
    if min_version is not None:
        ctx.minimum_version = min_version
    return ctx


async def echo_once(port: int, ctx: ssl.SSLContext, payload: bytes, *,
                    server_hostname: str = "localhost",
                    timeout: float = 30) -> tuple[bytes, int]:
    """Connect with TLS, send ``payload``, half-close, read the echo; returns
    (echoed bytes, serial of the server certificate presented)."""
    async with asyncio.timeout(timeout):
        reader, writer = await asyncio.open_connection(
            "127.0.0.1", port, ssl=ctx, server_hostname=server_hostname)
        try:
            sslobj = writer.get_extra_info("ssl_object")
            serial = serial_of_der(sslobj.getpeercert(binary_form=True))
            writer.write(payload)
            await writer.drain()
            got = bytearray()
            while len(got) < len(payload):
                data = await reader.read(65536)
                if not data:
                    break
                got += data
            return bytes(got), serial
        finally:
            writer.close()
            with contextlib.suppress(Exception):
                await writer.wait_closed()


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


async def run_tool(*cmd: str, stdin: bytes = b"", timeout: float = 120,
                   env: dict[str, str] | None = None) -> tuple[int, bytes, bytes]:
    # Nothing to send: stdin is /dev/null (EOF at once). Otherwise the tool may exit before
    # its stdin is written (s_client after a refused handshake, more often on a loaded
    # host): asyncio's communicate() ignores the closed pipe, but on uvloop it raises
    # RuntimeError ("the handler is closed"), so _feed writes stdin itself.
    feed = bool(stdin)
    proc = await asyncio.create_subprocess_exec(
        *cmd, stdin=asyncio.subprocess.PIPE if feed else asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE, env=env)
    async with asyncio.timeout(timeout):
        if proc.stdin is not None:
            await _feed(proc.stdin, stdin)
        out, err = await proc.communicate()
    assert proc.returncode is not None
    return proc.returncode, out, err


async def _feed(pipe: asyncio.StreamWriter, data: bytes) -> None:
    """Write ``data`` to a tool's stdin and close it, unless the tool closed it first."""
    with contextlib.suppress(BrokenPipeError, ConnectionResetError):
        if not pipe.is_closing():  # closed by the loop once it saw the tool's end go
            pipe.write(data)
            await pipe.drain()
    pipe.close()


class ExactBackend(LocalServer):
    """Reads exactly ``expect`` bytes, answers ``reply`` and closes: for clients such as
    ``openssl s_client -quiet`` that never half-close."""

    def __init__(self, expect: int, reply: bytes) -> None:
        self.expect = expect
        self.reply = reply
        self.server: asyncio.Server | None = None
        self.received: list[bytes] = []

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            self.received.append(await reader.readexactly(self.expect))
            writer.write(self.reply)
            await writer.drain()
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            writer.close()


def blocking_echo(port: int, ctx: ssl.SSLContext, payload: bytes,
                  session: ssl.SSLSession | None) -> tuple[bytes, ssl.SSLSession | None, bool]:
    """One blocking TLS connection (optionally resuming ``session``) that sends ``payload``
    and reads as much back, then closes without close_notify; (echo, session, reused)."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as raw, \
            ctx.wrap_socket(raw, server_hostname="localhost", session=session) as tls:
        tls.sendall(payload)
        got = bytearray()
        while len(got) < len(payload):
            data = tls.recv(65536)
            if not data:
                break
            got += data
        return bytes(got), tls.session, bool(tls.session_reused)


def tls_reloads(server: Any, result: str) -> float:
    """enforcer_reloads_total{kind="tls", result=...} of a Server."""
    value = server.metrics.registry.get_sample_value(
        "enforcer_reloads_total", {"kind": "tls", "result": result})
    return float(value or 0.0)


def openssl_issued(pki: Any, out: Path, serial: str, *,
                   uri: str = "spiffe://enforcer.demo/ns/shop/sa/frontend") -> IssuedPaths:
    """A certificate from the test CA with the given serial and a URI SAN, made by the
    openssl command (cryptography refuses to build non-positive serials)."""
    from tests.conftest import require_tool

    openssl = require_tool("openssl")
    out.mkdir(parents=True, exist_ok=True)
    key, csr, cert = out / f"s{serial}.key", out / f"s{serial}.csr", out / f"s{serial}.crt"
    subprocess.run([openssl, "req", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256",
                    "-nodes", "-keyout", str(key), "-out", str(csr), "-subj", "/CN=odd-serial",
                    "-addext", f"subjectAltName=URI:{uri}"],
                   check=True, capture_output=True)
    subprocess.run([openssl, "x509", "-req", "-in", str(csr), "-CA", str(pki.ca),
                    "-CAkey", str(pki.demo.ca_key), "-set_serial", serial, "-days", "2",
                    "-copy_extensions", "copy", "-out", str(cert)],
                   check=True, capture_output=True)
    return IssuedPaths(cert=cert, key=key, ca=pki.ca)


async def read_over_bio(tls: ssl.SSLObject, incoming: ssl.MemoryBIO, sock: socket.socket,
                        n: int, ended: str) -> bytes:
    """N plaintext bytes from a memory-BIO TLS object fed from a non-blocking socket; the
    peer closing first fails with ``ended``."""
    loop = asyncio.get_running_loop()
    got = bytearray()
    while len(got) < n:
        try:
            got += tls.read(n - len(got))
            continue
        except ssl.SSLWantReadError:
            pass
        data = await asyncio.wait_for(loop.sock_recv(sock, 65536), 5)
        assert data, ended
        incoming.write(data)
    return bytes(got)
